/* opencl_programs.c: the OpenCL programs: their sources (embedded at build
 * time, or read from a tree in development mode), the contexts this backend
 * creates (shared per device), the program cache (per cl_context, device,
 * options and source hash) and the binary cache (per device, options and
 * hash, for the process's lifetime), and building the kernels at the
 * largest work-group size they allow (on NVIDIA's driver with the register
 * caps of opencl_ptx.c). psm_kernels.cl holds several programs, chosen by
 * the build option PSM_PROGRAM: the sampling program, built with the
 * context, and one per feature, built by the first call that needs it;
 * all from the sources read at the context's creation. */
#include "environment.h"
#include "error.h"
#include "opencl_backend.h"
#include "opencl_embedded.h"
#include "opencl_ptx.h"

#include <CL/cl.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PSM_BUILD_LOG_LIMIT 3000

const char *const opencl_kernel_names[KERNEL_COUNT] = {
    "psm_tile_reduce", "psm_row_top_k", "psm_row_filter", "psm_tile_filter",
    "psm_row_combine", "psm_draw",      "psm_probs",       "psm_process_read",
    "psm_process_lists", "psm_tile_reduce_on_read", "psm_draw_on_read", "psm_row_orders", "psm_top_logprobs", "psm_top_ranks", "psm_verify_expand",
    "psm_verify_rows", "psm_verify_check", "psm_verify_totals", "psm_verify_walk",
    "psm_shard_pass"};

/* ---- sources: embedded, or read from a tree in development mode --------- */

/* The most source strings a program has: the headers psm_kernels.cl
 * includes, then itself (backends/opencl/CMakeLists.txt lists them), with
 * room for the stage headers still to come; load_sources refuses more. */
#define PROGRAM_SOURCES_MAX 24

typedef struct program_sources {
    const char *texts[PROGRAM_SOURCES_MAX];
    size_t sizes[PROGRAM_SOURCES_MAX];
    char *owned[PROGRAM_SOURCES_MAX];
    size_t count;
    uint64_t hash;
} program_sources;

static void free_sources(program_sources *sources)
{
    for (size_t i = 0; i < sources->count; ++i)
        free(sources->owned[i]);
}

/* FNV-1a, 64 bits: the cache key of sources read at run time. */
static uint64_t fnv1a(uint64_t hash, const char *bytes, size_t size)
{
    for (size_t i = 0; i < size; ++i) {
        hash ^= (unsigned char)bytes[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

/* The sources of the context being created: the environment is only known
 * during psm_context_create. */
static psm_status load_sources(program_sources *sources)
{
    memset(sources, 0, sizeof *sources);
    if (psm_opencl_embedded_source_count > PROGRAM_SOURCES_MAX)
        return psm_set_error(PSM_ERR_INTERNAL, "the OpenCL program has %zu source strings, "
                                               "more than PROGRAM_SOURCES_MAX (%d)",
                             psm_opencl_embedded_source_count, PROGRAM_SOURCES_MAX);
    const psm_environment *environment = psm_environment_of_creation();
    const char *root = environment ? environment->opencl_source_dir : NULL;
    sources->count = psm_opencl_embedded_source_count;
    if (!root) {
        for (size_t i = 0; i < sources->count; ++i) {
            sources->texts[i] = psm_opencl_embedded_sources[i].text;
            sources->sizes[i] = psm_opencl_embedded_sources[i].size;
        }
        sources->hash = psm_opencl_embedded_hash;
        return PSM_OK;
    }
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < sources->count; ++i) {
        char path[4096];
        const char *name = psm_opencl_embedded_sources[i].name;
        snprintf(path, sizeof path, "%s/%s", root, name);
        FILE *file = fopen(path, "rb");
        long size = -1;
        if (file && fseek(file, 0, SEEK_END) == 0)
            size = ftell(file);
        char *text = size >= 0 ? malloc((size_t)size + 1) : NULL;
        int ok = text && fseek(file, 0, SEEK_SET) == 0 &&
                 fread(text, 1, (size_t)size, file) == (size_t)size;
        if (file)
            fclose(file);
        if (!ok) {
            free(text);
            sources->count = i;
            free_sources(sources);
            return psm_set_error(PSM_ERR_ENVIRONMENT,
                                 "POLYSAMPLE_OPENCL_SOURCE_DIR: cannot read %s", path);
        }
        text[size] = '\0';
        sources->owned[i] = text;
        sources->texts[i] = text;
        sources->sizes[i] = (size_t)size;
        hash = fnv1a(hash, name, strlen(name) + 1);
        hash = fnv1a(hash, text, (size_t)size);
    }
    sources->hash = hash;
    return PSM_OK;
}

/* ---- shared contexts and the program cache ------------------------------ */

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

typedef struct shared_context {
    cl_device_id device;
    cl_context context;
    int references;
    struct shared_context *next;
} shared_context;
static shared_context *shared_contexts;

typedef struct cached_program {
    cl_context context;
    cl_device_id device;
    char options[160];
    uint64_t hash;
    cl_program program;
    int references;
    struct cached_program *next;
} cached_program;
static cached_program *cached_programs;

typedef struct cached_binary {
    cl_device_id device;
    char options[160];
    uint64_t hash;
    unsigned char *bytes;
    size_t size;
    struct cached_binary *next;
} cached_binary;
static cached_binary *cached_binaries;

/* A context of our own for the device, shared with other psm_contexts. */
psm_status opencl_acquire_own_context(cl_device_id device, cl_context *context_out)
{
    pthread_mutex_lock(&cache_lock);
    for (shared_context *entry = shared_contexts; entry; entry = entry->next) {
        if (entry->device == device) {
            entry->references += 1;
            *context_out = entry->context;
            pthread_mutex_unlock(&cache_lock);
            return PSM_OK;
        }
    }
    shared_context *entry = calloc(1, sizeof *entry);
    if (!entry) {
        pthread_mutex_unlock(&cache_lock);
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot allocate an OpenCL context entry");
    }
    cl_int code = CL_SUCCESS;
    entry->context = clCreateContext(NULL, 1, &device, NULL, NULL, &code);
    if (code != CL_SUCCESS) {
        free(entry);
        pthread_mutex_unlock(&cache_lock);
        return opencl_failure(code, "clCreateContext");
    }
    entry->device = device;
    entry->references = 1;
    entry->next = shared_contexts;
    shared_contexts = entry;
    *context_out = entry->context;
    pthread_mutex_unlock(&cache_lock);
    return PSM_OK;
}

void opencl_release_own_context(cl_context context)
{
    pthread_mutex_lock(&cache_lock);
    for (shared_context **link = &shared_contexts; *link; link = &(*link)->next) {
        shared_context *entry = *link;
        if (entry->context == context) {
            if (--entry->references == 0) {
                *link = entry->next;
                clReleaseContext(entry->context);
                free(entry);
            }
            break;
        }
    }
    pthread_mutex_unlock(&cache_lock);
}

/* Each program's name in psm_kernels.cl, and what it holds for a failure's
 * message. */
static const char *const program_macros[PROGRAM_COUNT] = {
    "PSM_PROGRAM_SAMPLING", "PSM_PROGRAM_PROCESSING", "PSM_PROGRAM_ORDERS",
    "PSM_PROGRAM_TOP_LOGPROBS", "PSM_PROGRAM_VERIFY", "PSM_PROGRAM_SHARDED"};
static const char *const program_descriptions[PROGRAM_COUNT] = {
    "sampling kernels",
    "logit-processing kernels (built by the first call with logit processing)",
    "filter-order kernel (built by the first call in an engine's filter order)",
    "top-N logprobs kernel (built by the first call with top_logprobs)",
    "psm_verify kernels (built by the first psm_verify)",
    "sharded-pass kernel (built by the first sharded call)"};

/* The build log, cut to a length a message can carry. Caller holds the lock. */
static psm_status build_failure(cl_program program, cl_device_id device, cl_int code,
                                const char *options, int which)
{
    size_t log_size = 0;
    clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, 0, NULL, &log_size);
    char *log = malloc(log_size + 1);
    if (log && clGetProgramBuildInfo(program, device, CL_PROGRAM_BUILD_LOG, log_size, log,
                                     NULL) == CL_SUCCESS)
        log[log_size] = '\0';
    else if (log)
        log[0] = '\0';
    size_t shown = log ? strlen(log) : 0;
    int truncated = shown > PSM_BUILD_LOG_LIMIT;
    psm_status status = psm_set_error(
        opencl_status_of(code),
        "OpenCL: building the polysample %s failed (%s, options \"%s\"); build "
        "log%s:\n%.*s%s",
        program_descriptions[which], opencl_error_name(code), options,
        truncated ? " (first 3000 bytes)" : "", (int)(truncated ? PSM_BUILD_LOG_LIMIT : shown),
        log ? log : "", truncated ? "\n[...]" : "");
    free(log);
    return status;
}

/* The program's binary (malloc'd), or NULL. */
static unsigned char *read_program_binary(cl_program program, size_t *size_out)
{
    size_t size = 0;
    if (clGetProgramInfo(program, CL_PROGRAM_BINARY_SIZES, sizeof size, &size, NULL) !=
            CL_SUCCESS ||
        size == 0)
        return NULL;
    unsigned char *bytes = malloc(size);
    if (bytes &&
        clGetProgramInfo(program, CL_PROGRAM_BINARIES, sizeof bytes, &bytes, NULL) != CL_SUCCESS) {
        free(bytes);
        return NULL;
    }
    *size_out = size;
    return bytes;
}

/* Remembers a program binary for later contexts, taking `bytes`. Caller
 * holds the lock; a failure only means no binary is cached. */
static void remember_binary(cl_device_id device, const char *options, uint64_t hash,
                            unsigned char *bytes, size_t size)
{
    cached_binary *entry = calloc(1, sizeof *entry);
    if (!entry) {
        free(bytes);
        return;
    }
    entry->device = device;
    snprintf(entry->options, sizeof entry->options, "%s", options);
    entry->hash = hash;
    entry->bytes = bytes;
    entry->size = size;
    entry->next = cached_binaries;
    cached_binaries = entry;
}

static cl_program program_from_bytes(cl_context context, cl_device_id device, const char *options,
                                     const unsigned char *bytes, size_t size)
{
    cl_int binary_status = CL_SUCCESS, code = CL_SUCCESS;
    cl_program program =
        clCreateProgramWithBinary(context, 1, &device, &size, &bytes, &binary_status, &code);
    if (code != CL_SUCCESS || binary_status != CL_SUCCESS) {
        if (code == CL_SUCCESS)
            clReleaseProgram(program);
        return NULL;
    }
    if (clBuildProgram(program, 1, &device, options, NULL, NULL) != CL_SUCCESS) {
        clReleaseProgram(program);
        return NULL;
    }
    return program;
}

/* A source-built program as it will be used and cached: rebuilt from its
 * binary with the register caps of opencl_ptx.c where the binary is PTX
 * (NVIDIA's driver); a rebuild that fails leaves the program as the driver
 * built it. The rebuild compiles the PTX a second time, once per device,
 * options and process; later contexts take the capped binary from the
 * cache. Caller holds the lock. */
static cl_program finish_program(cl_context context, cl_device_id device, const char *options,
                                 uint64_t hash, cl_program program)
{
    size_t size = 0, capped_size = 0;
    unsigned char *bytes = read_program_binary(program, &size);
    if (!bytes)
        return program;
    unsigned char *capped = opencl_ptx_with_register_caps(bytes, size, &capped_size);
    cl_program rebuilt =
        capped ? program_from_bytes(context, device, options, capped, capped_size) : NULL;
    if (rebuilt) {
        clReleaseProgram(program);
        free(bytes);
        remember_binary(device, options, hash, capped, capped_size);
        return rebuilt;
    }
    free(capped);
    remember_binary(device, options, hash, bytes, size);
    return program;
}

static cl_program program_from_binary(cl_context context, cl_device_id device,
                                      const char *options, uint64_t hash)
{
    for (cached_binary *entry = cached_binaries; entry; entry = entry->next)
        if (entry->device == device && entry->hash == hash &&
            strcmp(entry->options, options) == 0)
            return program_from_bytes(context, device, options, entry->bytes, entry->size);
    return NULL;
}

/* Tells the caller (psm_context_options.notice, NULL outside
 * psm_context_create) that a long step starts. */
static void notify(const psm_context_options *context_options, const char *format,
                   const char *argument)
{
    if (!context_options || !context_options->notice)
        return;
    char message[512];
    snprintf(message, sizeof message, format, argument);
    context_options->notice(context_options->notice_user_data, message);
}

static psm_status acquire_program(cl_context context, cl_device_id device, const char *options,
                                  const program_sources *sources, int which,
                                  const psm_context_options *context_options,
                                  const char *device_name, cached_program **entry_out)
{
    pthread_mutex_lock(&cache_lock);
    for (cached_program *entry = cached_programs; entry; entry = entry->next) {
        if (entry->context == context && entry->device == device &&
            entry->hash == sources->hash && strcmp(entry->options, options) == 0) {
            entry->references += 1;
            *entry_out = entry;
            pthread_mutex_unlock(&cache_lock);
            return PSM_OK;
        }
    }
    cached_program *entry = calloc(1, sizeof *entry);
    if (!entry) {
        pthread_mutex_unlock(&cache_lock);
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot allocate a program cache entry");
    }
    cl_program program = program_from_binary(context, device, options, sources->hash);
    if (!program) {
        cl_int code = CL_SUCCESS;
        notify(context_options, "compiling OpenCL kernels for %s (first use; cached)",
               device_name);
        program = clCreateProgramWithSource(context, (cl_uint)sources->count,
                                            (const char **)sources->texts,
                                            sources->sizes, &code);
        if (code != CL_SUCCESS) {
            free(entry);
            pthread_mutex_unlock(&cache_lock);
            return opencl_failure(code, "clCreateProgramWithSource");
        }
        code = clBuildProgram(program, 1, &device, options, NULL, NULL);
        if (code != CL_SUCCESS) {
            psm_status status = build_failure(program, device, code, options, which);
            clReleaseProgram(program);
            free(entry);
            pthread_mutex_unlock(&cache_lock);
            return status;
        }
        program = finish_program(context, device, options, sources->hash, program);
    }
    entry->context = context;
    entry->device = device;
    snprintf(entry->options, sizeof entry->options, "%s", options);
    entry->hash = sources->hash;
    entry->program = program;
    entry->references = 1;
    entry->next = cached_programs;
    cached_programs = entry;
    *entry_out = entry;
    pthread_mutex_unlock(&cache_lock);
    return PSM_OK;
}

static void release_program(cached_program *target)
{
    pthread_mutex_lock(&cache_lock);
    for (cached_program **link = &cached_programs; *link; link = &(*link)->next) {
        if (*link == target) {
            if (--target->references == 0) {
                *link = target->next;
                clReleaseProgram(target->program);
                free(target);
            }
            break;
        }
    }
    pthread_mutex_unlock(&cache_lock);
}

/* ---- the kernels ---------------------------------------------------------- */

/* Each program's kernels: [program_first_kernel[p], program_first_kernel[p + 1]). */
static const int program_first_kernel[PROGRAM_COUNT + 1] = {
    KERNEL_TILE_REDUCE,   KERNEL_PROCESS_READ, KERNEL_ROW_ORDERS, KERNEL_TOP_LOGPROBS,
    KERNEL_VERIFY_EXPAND, KERNEL_SHARD_PASS,   KERNEL_COUNT};

/* Releases program `which`'s kernels (those created) and the program. */
static void release_kernels(cached_program **programs, cl_kernel *kernels, int which)
{
    for (int k = program_first_kernel[which]; k < program_first_kernel[which + 1]; ++k) {
        if (kernels[k])
            clReleaseKernel(kernels[k]);
        kernels[k] = NULL;
    }
    if (programs[which])
        release_program(programs[which]);
    programs[which] = NULL;
}

/* Creates program `which`'s kernels; *fits: whether each runs groups of `group` items. */
static psm_status create_kernels(const opencl_state *state, int which, size_t group,
                                 const cached_program *program, cl_kernel *kernels, int *fits)
{
    *fits = 1;
    for (int k = program_first_kernel[which]; k < program_first_kernel[which + 1]; ++k) {
        cl_int code = CL_SUCCESS;
        kernels[k] = clCreateKernel(program->program, opencl_kernel_names[k], &code);
        if (code != CL_SUCCESS) {
            kernels[k] = NULL;
            return opencl_failure(code, "clCreateKernel");
        }
        size_t kernel_group = 0;
        CL_TRY(clGetKernelWorkGroupInfo(kernels[k], state->device, CL_KERNEL_WORK_GROUP_SIZE,
                                        sizeof kernel_group, &kernel_group, NULL),
               "clGetKernelWorkGroupInfo");
        if (kernel_group < group)
            *fits = 0;
    }
    return PSM_OK;
}

/* Builds (or finds) program `which` at work-group size `group` into
 * programs[which], and its kernels into kernels; *fits: whether each of
 * them runs groups of that size. On failure neither holds anything of it. */
static psm_status build_at(opencl_state *state, int which, size_t group,
                           const psm_context_options *context_options, const char *device_name,
                           cached_program **programs, cl_kernel *kernels, int *fits)
{
    if (group < 16)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "OpenCL: the device runs work-groups of at most %zu items; "
                             "polysample needs 16",
                             group);
    char options[160];
    snprintf(options, sizeof options, "-cl-std=CL1.2 -DPSM_WG=%zu", group);
    const size_t used = strlen(options);
    snprintf(options + used, sizeof options - used, " -DPSM_PROGRAM=%s", program_macros[which]);
    PSM_TRY(acquire_program(state->context, state->device, options, state->sources, which,
                            context_options, device_name, &programs[which]));
    psm_status status = create_kernels(state, which, group, programs[which], kernels, fits);
    if (status != PSM_OK)
        release_kernels(programs, kernels, which);
    return status;
}

/* Local memory the row filter uses besides its row cache (plan_filters). */
static psm_status row_filter_local_bytes(const opencl_state *state, cl_kernel row_filter,
                                         cl_ulong *bytes)
{
    CL_TRY(clGetKernelWorkGroupInfo(row_filter, state->device, CL_KERNEL_LOCAL_MEM_SIZE,
                                    sizeof *bytes, bytes, NULL),
           "clGetKernelWorkGroupInfo");
    return PSM_OK;
}

psm_status opencl_build_program(opencl_state *state, const psm_context_options *options,
                                const char *device_name)
{
    state->sources = calloc(1, sizeof *state->sources);
    if (!state->sources)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot allocate the OpenCL sources");
    psm_status status = load_sources(state->sources);
    if (status != PSM_OK) {
        free(state->sources);
        state->sources = NULL;
        return status;
    }
    size_t group = opencl_initial_group_size(state->device, &status);
    PSM_TRY(status);
    for (;;) {
        int fits = 0;
        PSM_TRY(build_at(state, PROGRAM_SAMPLING, group, options, device_name, state->programs,
                         state->kernels, &fits));
        if (fits)
            break;
        /* A kernel needs more registers than the group size allows: halve it. */
        release_kernels(state->programs, state->kernels, PROGRAM_SAMPLING);
        group /= 2;
    }
    state->group_size = group;
    return row_filter_local_bytes(state, state->kernels[KERNEL_ROW_FILTER],
                                  &state->row_filter_local);
}

/* Builds every program of `wanted` at the largest group size below the
 * state's that each of their kernels allows, then gives them to the state
 * in place of its own. On failure the state keeps its own. */
static psm_status rebuild_smaller(opencl_state *state, unsigned wanted)
{
    cached_program *programs[PROGRAM_COUNT] = {NULL};
    cl_kernel kernels[KERNEL_COUNT] = {NULL};
    for (size_t group = state->group_size / 2;; group /= 2) {
        psm_status status = PSM_OK;
        int all_fit = 1;
        for (int which = 0; which < PROGRAM_COUNT && all_fit && status == PSM_OK; ++which)
            if (wanted & PROGRAM_BIT(which))
                status = build_at(state, which, group, NULL, NULL, programs, kernels, &all_fit);
        cl_ulong filter_local = 0;
        if (status == PSM_OK && all_fit)
            status = row_filter_local_bytes(state, kernels[KERNEL_ROW_FILTER], &filter_local);
        if (status == PSM_OK && all_fit) {
            for (int which = 0; which < PROGRAM_COUNT; ++which)
                release_kernels(state->programs, state->kernels, which);
            memcpy(state->programs, programs, sizeof programs);
            memcpy(state->kernels, kernels, sizeof kernels);
            state->group_size = group;
            state->row_filter_local = filter_local;
            return PSM_OK;
        }
        for (int which = 0; which < PROGRAM_COUNT; ++which)
            release_kernels(programs, kernels, which);
        if (status != PSM_OK)
            return status;
    }
}

psm_status opencl_use_programs(opencl_state *state, unsigned programs)
{
    for (int which = 0; which < PROGRAM_COUNT; ++which) {
        if (!(programs & PROGRAM_BIT(which)) || state->programs[which])
            continue;
        int fits = 0;
        PSM_TRY(build_at(state, which, state->group_size, NULL, NULL, state->programs,
                         state->kernels, &fits));
        if (!fits) {
            /* The launch code gives every kernel the state's group size, so
             * every program moves to a smaller one. */
            release_kernels(state->programs, state->kernels, which);
            unsigned wanted = programs;
            for (int held = 0; held < PROGRAM_COUNT; ++held)
                if (state->programs[held])
                    wanted |= PROGRAM_BIT(held);
            return rebuild_smaller(state, wanted);
        }
    }
    return PSM_OK;
}

void opencl_release_programs(opencl_state *state)
{
    for (int which = 0; which < PROGRAM_COUNT; ++which)
        release_kernels(state->programs, state->kernels, which);
    if (state->sources) {
        free_sources(state->sources);
        free(state->sources);
        state->sources = NULL;
    }
}
