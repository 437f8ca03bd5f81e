/*
 * opencl_backend.c: the OpenCL backend (host side, OpenCL 1.2 API).
 *
 * Devices. device_index counts the GPU, accelerator and CPU devices of every
 * platform the ICD loader reports, in this order: all GPUs (platforms in
 * loader order, devices in platform order), then all accelerators, then all
 * CPUs. Index 0 is therefore the first GPU when there is one. With
 * options->native_stream the caller's cl_command_queue is used instead, and
 * its context and device come from clGetCommandQueueInfo.
 *
 * Memory. PSM_MEMORY_DEVICE means the pointer is a cl_mem of the context's
 * cl_context (per-row parameter arrays then are cl_mem too). Host inputs are
 * copied to device staging buffers with blocking writes (so the caller may
 * reuse them at once); host outputs are read back with blocking reads. With
 * cl_mem inputs and outputs a call enqueues kernels only: no host
 * synchronisation (unless check_rows) and, once the shape has been seen or
 * reserved, no allocation.
 *
 * Programs. The kernels (psm_kernels.cl, after the headers it includes:
 * core/psm_contract.h, core/psm_row.h, psm_opencl_request.h) are embedded at
 * build time (embed.cmake) and handed to the compiler as one program's
 * source strings, headers first. Every kernel takes the call's description,
 * a psm_opencl_request (psm_opencl_request.h, shared with the kernels), as
 * its first argument, then its buffers. A program is built once per
 * (cl_context, device, build options, source hash) and shared by every
 * psm_context using that key; contexts this backend creates are shared per
 * device for the same reason. Program binaries are also kept in host memory
 * for the process's lifetime (keyed by device, options and hash), so that a
 * later context on the same device loads a binary instead of compiling.
 * Development mode: POLYSAMPLE_OPENCL_SOURCE_DIR (read by core/environment.c)
 * names a source tree whose kernel files replace the embedded copies.
 */
#include "alloc.h"
#include "backend.h"
#include "environment.h"
#include "error.h"
#include "module.h"
#include "opencl_embedded.h"
#include "psm_contract.h"
#include "psm_row.h"
#include "psm_opencl_request.h"

#include <CL/cl.h>

#include <limits.h>
#include <stddef.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The kernels read these structs as this file writes them (and check the
 * same sizes): no padding anywhere (psm_opencl_request.h). */
_Static_assert(sizeof(psm_row_scalars) == 24 &&
                   offsetof(psm_opencl_request, dtype) == 48 &&
                   sizeof(psm_opencl_request) == PSM_OPENCL_REQUEST_BYTES,
               "psm_opencl_request is laid out with padding");
_Static_assert(sizeof(psm_row_state) == PSM_ROW_STATE_BYTES,
               "psm_row_state is laid out with padding");
_Static_assert(PSM_OPENCL_DTYPE_F32 == PSM_DTYPE_F32 && PSM_OPENCL_DTYPE_F16 == PSM_DTYPE_F16 &&
                   PSM_OPENCL_DTYPE_BF16 == PSM_DTYPE_BF16,
               "the kernels' dtype values differ from psm_dtype");
#define PSM_BUILD_LOG_LIMIT 3000
/* Keys in psm_row_filter's candidate list on the global path, and in
 * psm_row_top_k's (see plan_filters). */
#define PSM_LIST_CAP 2048
#define PSM_TOP_K_LIST 1024

enum {
    KERNEL_TILE_REDUCE,
    KERNEL_ROW_TOP_K,
    KERNEL_ROW_FILTER,
    KERNEL_TILE_FILTER,
    KERNEL_ROW_COMBINE,
    KERNEL_DRAW,
    KERNEL_PROBS,
    KERNEL_COUNT
};
static const char *const kernel_names[KERNEL_COUNT] = {
    "psm_tile_reduce", "psm_row_top_k", "psm_row_filter", "psm_tile_filter",
    "psm_row_combine", "psm_draw",      "psm_probs"};

/* ---- errors ------------------------------------------------------------- */

static const char *cl_error_name(cl_int code)
{
    switch (code) {
    case CL_DEVICE_NOT_FOUND: return "CL_DEVICE_NOT_FOUND";
    case CL_DEVICE_NOT_AVAILABLE: return "CL_DEVICE_NOT_AVAILABLE";
    case CL_COMPILER_NOT_AVAILABLE: return "CL_COMPILER_NOT_AVAILABLE";
    case CL_MEM_OBJECT_ALLOCATION_FAILURE: return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES: return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY: return "CL_OUT_OF_HOST_MEMORY";
    case CL_BUILD_PROGRAM_FAILURE: return "CL_BUILD_PROGRAM_FAILURE";
    case CL_INVALID_VALUE: return "CL_INVALID_VALUE";
    case CL_INVALID_PLATFORM: return "CL_INVALID_PLATFORM";
    case CL_INVALID_DEVICE: return "CL_INVALID_DEVICE";
    case CL_INVALID_CONTEXT: return "CL_INVALID_CONTEXT";
    case CL_INVALID_COMMAND_QUEUE: return "CL_INVALID_COMMAND_QUEUE";
    case CL_INVALID_MEM_OBJECT: return "CL_INVALID_MEM_OBJECT";
    case CL_INVALID_BINARY: return "CL_INVALID_BINARY";
    case CL_INVALID_BUILD_OPTIONS: return "CL_INVALID_BUILD_OPTIONS";
    case CL_INVALID_PROGRAM: return "CL_INVALID_PROGRAM";
    case CL_INVALID_PROGRAM_EXECUTABLE: return "CL_INVALID_PROGRAM_EXECUTABLE";
    case CL_INVALID_KERNEL_NAME: return "CL_INVALID_KERNEL_NAME";
    case CL_INVALID_KERNEL: return "CL_INVALID_KERNEL";
    case CL_INVALID_ARG_INDEX: return "CL_INVALID_ARG_INDEX";
    case CL_INVALID_ARG_VALUE: return "CL_INVALID_ARG_VALUE";
    case CL_INVALID_ARG_SIZE: return "CL_INVALID_ARG_SIZE";
    case CL_INVALID_KERNEL_ARGS: return "CL_INVALID_KERNEL_ARGS";
    case CL_INVALID_WORK_DIMENSION: return "CL_INVALID_WORK_DIMENSION";
    case CL_INVALID_WORK_GROUP_SIZE: return "CL_INVALID_WORK_GROUP_SIZE";
    case CL_INVALID_GLOBAL_WORK_SIZE: return "CL_INVALID_GLOBAL_WORK_SIZE";
    case CL_INVALID_EVENT_WAIT_LIST: return "CL_INVALID_EVENT_WAIT_LIST";
    case CL_INVALID_OPERATION: return "CL_INVALID_OPERATION";
    case CL_INVALID_BUFFER_SIZE: return "CL_INVALID_BUFFER_SIZE";
    case CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST:
        return "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST";
    case -1001: return "CL_PLATFORM_NOT_FOUND_KHR";
    default: return "unknown OpenCL error";
    }
}

static psm_status status_of(cl_int code)
{
    return (code == CL_MEM_OBJECT_ALLOCATION_FAILURE || code == CL_OUT_OF_HOST_MEMORY ||
            code == CL_INVALID_BUFFER_SIZE)
               ? PSM_ERR_OUT_OF_MEMORY
               : PSM_ERR_DRIVER;
}

static psm_status cl_failure(cl_int code, const char *what)
{
    return psm_set_error(status_of(code), "OpenCL: %s failed: %s (%d)", what, cl_error_name(code),
                         (int)code);
}

#define CL_TRY(call, what)                                                                  \
    do {                                                                                    \
        cl_int cl_try_code_ = (call);                                                       \
        if (cl_try_code_ != CL_SUCCESS)                                                     \
            return cl_failure(cl_try_code_, (what));                                        \
    } while (0)

#define PSM_TRY(call)                                                                       \
    do {                                                                                    \
        psm_status psm_try_status_ = (call);                                                \
        if (psm_try_status_ != PSM_OK)                                                      \
            return psm_try_status_;                                                         \
    } while (0)

/* ---- device enumeration ------------------------------------------------- */

typedef struct device_list {
    cl_device_id *devices;
    cl_uint count;
} device_list;

/* Every GPU, then accelerator, then CPU device of every platform. Callers
 * hold enumeration_lock. */
static psm_status list_devices_locked(device_list *list)
{
    list->devices = NULL;
    list->count = 0;
    cl_uint platform_count = 0;
    cl_int code = clGetPlatformIDs(0, NULL, &platform_count);
    if (code == -1001 /* CL_PLATFORM_NOT_FOUND_KHR */ || platform_count == 0)
        return psm_set_error(PSM_ERR_NO_DEVICE,
                             "no OpenCL platform (the ICD loader lists none)");
    CL_TRY(code, "clGetPlatformIDs");
    cl_platform_id *platforms = calloc(platform_count, sizeof *platforms);
    if (!platforms)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot list OpenCL platforms");
    code = clGetPlatformIDs(platform_count, platforms, NULL);
    if (code != CL_SUCCESS) {
        free(platforms);
        return cl_failure(code, "clGetPlatformIDs");
    }
    static const cl_device_type types[3] = {CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_ACCELERATOR,
                                            CL_DEVICE_TYPE_CPU};
    psm_status status = PSM_OK;
    for (int pass = 0; pass < 2 && status == PSM_OK; ++pass) {
        /* Pass 0 counts, pass 1 fills. */
        cl_uint filled = 0;
        for (int t = 0; t < 3; ++t) {
            for (cl_uint p = 0; p < platform_count; ++p) {
                cl_uint found = 0;
                code = clGetDeviceIDs(platforms[p], types[t], 0, NULL, &found);
                if (code == CL_DEVICE_NOT_FOUND || found == 0)
                    continue;
                if (code != CL_SUCCESS) {
                    status = cl_failure(code, "clGetDeviceIDs");
                    break;
                }
                if (pass == 1) {
                    code = clGetDeviceIDs(platforms[p], types[t], found,
                                          list->devices + filled, NULL);
                    if (code != CL_SUCCESS) {
                        status = cl_failure(code, "clGetDeviceIDs");
                        break;
                    }
                }
                filled += found;
            }
            if (status != PSM_OK)
                break;
        }
        if (status != PSM_OK)
            break;
        if (pass == 0) {
            if (filled == 0) {
                status = psm_set_error(PSM_ERR_NO_DEVICE,
                                       "no OpenCL GPU, accelerator or CPU device on %u "
                                       "platform(s)",
                                       (unsigned)platform_count);
                break;
            }
            list->devices = calloc(filled, sizeof *list->devices);
            if (!list->devices) {
                status = psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot list OpenCL devices");
                break;
            }
        }
        list->count = filled;
    }
    free(platforms);
    if (status != PSM_OK) {
        free(list->devices);
        list->devices = NULL;
        list->count = 0;
    }
    return status;
}

/* PoCL 3.1 initialises its devices on the first clGetDeviceIDs; a second
 * thread enumerating meanwhile is told there are none (two threads making
 * their first OpenCL contexts at once: one got PSM_ERR_NO_DEVICE,
 * tests/test_threads.c). Enumeration is therefore one thread at a time. */
static pthread_mutex_t enumeration_lock = PTHREAD_MUTEX_INITIALIZER;

static psm_status list_devices(device_list *list)
{
    pthread_mutex_lock(&enumeration_lock);
    psm_status status = list_devices_locked(list);
    pthread_mutex_unlock(&enumeration_lock);
    return status;
}

/* Named, the backend runs on any device; AUTO takes only the GPUs and
 * accelerators, which list_devices puts first. */
static int opencl_probe(int *device_count, int *auto_device_count, char *reason,
                        size_t reason_size)
{
    device_list list;
    *device_count = 0;
    *auto_device_count = 0;
    if (list_devices(&list) != PSM_OK) {
        if (reason && reason_size)
            snprintf(reason, reason_size, "%s", psm_last_error());
        psm_clear_error();
        return 0;
    }
    cl_uint cpu_devices = 0;
    char first_cpu[160] = "";
    for (cl_uint i = 0; i < list.count; ++i) {
        cl_device_type type = 0;
        if (clGetDeviceInfo(list.devices[i], CL_DEVICE_TYPE, sizeof type, &type, NULL) !=
                CL_SUCCESS ||
            !(type & CL_DEVICE_TYPE_CPU))
            continue;
        if (cpu_devices++ == 0) {
            cl_platform_id platform = NULL;
            if (clGetDeviceInfo(list.devices[i], CL_DEVICE_PLATFORM, sizeof platform,
                                &platform, NULL) != CL_SUCCESS ||
                clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof first_cpu, first_cpu,
                                  NULL) != CL_SUCCESS)
                snprintf(first_cpu, sizeof first_cpu, "unnamed platform");
            first_cpu[sizeof first_cpu - 1] = '\0';
        }
    }
    *device_count = (int)list.count;
    *auto_device_count = (int)(list.count - cpu_devices);
    if (reason && reason_size) {
        if (cpu_devices == 0)
            snprintf(reason, reason_size, "%d device(s)", *device_count);
        else if (*auto_device_count == 0)
            snprintf(reason, reason_size,
                     "only CPU device(s) (%s), which AUTO leaves to the cpu backend; "
                     "name opencl to use them",
                     first_cpu);
        else
            snprintf(reason, reason_size,
                     "%d GPU or accelerator device(s), then %u CPU device(s) (%s) that AUTO "
                     "does not pick",
                     *auto_device_count, (unsigned)cpu_devices, first_cpu);
    }
    free(list.devices);
    return 1;
}

/* ---- sources: embedded, or read from a tree in development mode --------- */

typedef struct program_sources {
    const char *texts[8];
    size_t sizes[8];
    char *owned[8];
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

static psm_status load_sources(program_sources *sources)
{
    memset(sources, 0, sizeof *sources);
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
static psm_status acquire_own_context(cl_device_id device, cl_context *context_out)
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
        return cl_failure(code, "clCreateContext");
    }
    entry->device = device;
    entry->references = 1;
    entry->next = shared_contexts;
    shared_contexts = entry;
    *context_out = entry->context;
    pthread_mutex_unlock(&cache_lock);
    return PSM_OK;
}

static void release_own_context(cl_context context)
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

/* The build log, cut to a length a message can carry. Caller holds the lock. */
static psm_status build_failure(cl_program program, cl_device_id device, cl_int code,
                                const char *options)
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
        status_of(code),
        "OpenCL: building the polysample kernels failed (%s, options \"%s\"); build "
        "log%s:\n%.*s%s",
        cl_error_name(code), options, truncated ? " (first 3000 bytes)" : "",
        (int)(truncated ? PSM_BUILD_LOG_LIMIT : shown), log ? log : "",
        truncated ? "\n[...]" : "");
    free(log);
    return status;
}

/* Remembers the program's binary for later contexts. Caller holds the lock;
 * a failure only means no binary is cached. */
static void remember_binary(cl_program program, cl_device_id device, const char *options,
                            uint64_t hash)
{
    size_t size = 0;
    if (clGetProgramInfo(program, CL_PROGRAM_BINARY_SIZES, sizeof size, &size, NULL) !=
            CL_SUCCESS ||
        size == 0)
        return;
    cached_binary *entry = calloc(1, sizeof *entry);
    unsigned char *bytes = malloc(size);
    if (!entry || !bytes ||
        clGetProgramInfo(program, CL_PROGRAM_BINARIES, sizeof bytes, &bytes, NULL) !=
            CL_SUCCESS) {
        free(entry);
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

static cl_program program_from_binary(cl_context context, cl_device_id device,
                                      const char *options, uint64_t hash)
{
    for (cached_binary *entry = cached_binaries; entry; entry = entry->next) {
        if (entry->device != device || entry->hash != hash ||
            strcmp(entry->options, options) != 0)
            continue;
        const unsigned char *bytes = entry->bytes;
        cl_int binary_status = CL_SUCCESS, code = CL_SUCCESS;
        cl_program program = clCreateProgramWithBinary(context, 1, &device, &entry->size,
                                                       &bytes, &binary_status, &code);
        if (code != CL_SUCCESS || binary_status != CL_SUCCESS)
            return NULL;
        if (clBuildProgram(program, 1, &device, options, NULL, NULL) != CL_SUCCESS) {
            clReleaseProgram(program);
            return NULL;
        }
        return program;
    }
    return NULL;
}

/* Tells the caller (psm_context_options.notice) that a long step starts. */
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
                                  const program_sources *sources,
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
            return cl_failure(code, "clCreateProgramWithSource");
        }
        code = clBuildProgram(program, 1, &device, options, NULL, NULL);
        if (code != CL_SUCCESS) {
            psm_status status = build_failure(program, device, code, options);
            clReleaseProgram(program);
            free(entry);
            pthread_mutex_unlock(&cache_lock);
            return status;
        }
        remember_binary(program, device, options, sources->hash);
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

/* ---- state -------------------------------------------------------------- */

typedef struct device_buffer {
    cl_mem mem;
    size_t bytes;
} device_buffer;

typedef struct opencl_state {
    cl_context context;
    int own_context;
    cl_device_id device;
    cl_command_queue queue;
    int queue_out_of_order;
    cached_program *program;
    cl_kernel kernels[KERNEL_COUNT];
    size_t group_size;
    cl_ulong local_memory;
    cl_ulong row_filter_local; /* local memory the row filter uses besides its row cache */
    cl_ulong max_allocation;

    device_buffer tile_key, tile_info, tile_ref, tile_mass, tile_prefix;
    device_buffer lane_max; /* top-k rows: each lane's maximum (psm_tile_reduce) */
    device_buffer row_state, first_bad_row;
    device_buffer tokens, logprobs;     /* outputs staged for host or checked calls */
    device_buffer probs;
    device_buffer logits;               /* host logits copied in */
    device_buffer per_row[5];           /* host per-row arrays copied in */
} opencl_state;

static void release_buffer(device_buffer *buffer)
{
    if (buffer->mem)
        clReleaseMemObject(buffer->mem);
    buffer->mem = NULL;
    buffer->bytes = 0;
}

/* Grows a workspace buffer. Work already queued keeps the old one alive
 * (OpenCL reference-counts buffers used by enqueued commands). */
static psm_status ensure_buffer(opencl_state *state, device_buffer *buffer, size_t bytes,
                                const char *what)
{
    if (bytes == 0)
        bytes = 1;
    if (buffer->mem && buffer->bytes >= bytes)
        return PSM_OK;
    if ((cl_ulong)bytes > state->max_allocation)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                             "OpenCL: the %s workspace needs %zu bytes, more than the device's "
                             "largest allocation (%llu bytes)",
                             what, bytes, (unsigned long long)state->max_allocation);
    release_buffer(buffer);
    cl_int code = CL_SUCCESS;
    if (psm_fault_device_allocation())
        code = CL_MEM_OBJECT_ALLOCATION_FAILURE; /* test builds: an injected failure */
    else
        buffer->mem = clCreateBuffer(state->context, CL_MEM_READ_WRITE, bytes, NULL, &code);
    if (code != CL_SUCCESS) {
        buffer->mem = NULL;
        return psm_set_error(status_of(code), "OpenCL: cannot allocate %zu bytes for the %s workspace: %s",
                             bytes, what, cl_error_name(code));
    }
    buffer->bytes = bytes;
    return PSM_OK;
}

static void opencl_destroy(void *opaque)
{
    opencl_state *state = opaque;
    if (!state)
        return;
    if (state->queue)
        clFinish(state->queue);
    device_buffer *buffers[] = {&state->tile_key,   &state->tile_info,
                                &state->tile_ref,   &state->tile_mass, &state->tile_prefix,
                                &state->lane_max,
                                &state->row_state,  &state->first_bad_row, &state->tokens,
                                &state->logprobs,   &state->probs,     &state->logits,
                                &state->per_row[0], &state->per_row[1], &state->per_row[2],
                                &state->per_row[3], &state->per_row[4]};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
        release_buffer(buffers[i]);
    for (int k = 0; k < KERNEL_COUNT; ++k)
        if (state->kernels[k])
            clReleaseKernel(state->kernels[k]);
    if (state->program)
        release_program(state->program);
    if (state->queue)
        clReleaseCommandQueue(state->queue);
    if (state->context) {
        if (state->own_context)
            release_own_context(state->context);
        else
            clReleaseContext(state->context);
    }
    free(state);
}

/* ---- creation ------------------------------------------------------------ */

static psm_status device_string(cl_device_id device, cl_device_info what, char *out,
                                size_t size)
{
    out[0] = '\0';
    CL_TRY(clGetDeviceInfo(device, what, size, out, NULL), "clGetDeviceInfo");
    out[size - 1] = '\0';
    return PSM_OK;
}

/* Work-group size from the device: a power of two, at most the device's
 * limit, 256 on GPUs and accelerators (enough items to hide latency in one
 * 1024-token tile) and 64 on CPUs (a CPU runs a group's items as a loop, so
 * fewer items means less bookkeeping). */
static size_t initial_group_size(cl_device_id device, psm_status *status)
{
    size_t max_group = 0, item_sizes[3] = {0, 0, 0};
    cl_device_type type = 0;
    cl_int code = clGetDeviceInfo(device, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof max_group,
                                  &max_group, NULL);
    if (code == CL_SUCCESS)
        code = clGetDeviceInfo(device, CL_DEVICE_MAX_WORK_ITEM_SIZES, sizeof item_sizes,
                               item_sizes, NULL);
    if (code == CL_SUCCESS)
        code = clGetDeviceInfo(device, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    if (code != CL_SUCCESS) {
        *status = cl_failure(code, "clGetDeviceInfo");
        return 0;
    }
    size_t limit = (type & CL_DEVICE_TYPE_CPU) ? 64 : 256;
    if (max_group < limit)
        limit = max_group;
    if (item_sizes[0] < limit)
        limit = item_sizes[0];
    size_t size = 1;
    while (size * 2 <= limit)
        size *= 2;
    *status = PSM_OK;
    return size;
}

static psm_status build_kernels(opencl_state *state, const program_sources *sources,
                                const psm_context_options *context_options,
                                const char *device_name)
{
    psm_status status = PSM_OK;
    size_t group = initial_group_size(state->device, &status);
    PSM_TRY(status);
    for (;;) {
        if (group < 16)
            return psm_set_error(PSM_ERR_UNSUPPORTED,
                                 "OpenCL: the device runs work-groups of at most %zu items; "
                                 "polysample needs 16",
                                 group);
        char options[160];
        snprintf(options, sizeof options, "-cl-std=CL1.2 -DPSM_WG=%zu", group);
        PSM_TRY(acquire_program(state->context, state->device, options, sources,
                                context_options, device_name, &state->program));
        int fits = 1;
        for (int k = 0; k < KERNEL_COUNT; ++k) {
            cl_int code = CL_SUCCESS;
            state->kernels[k] = clCreateKernel(state->program->program, kernel_names[k], &code);
            if (code != CL_SUCCESS)
                return cl_failure(code, "clCreateKernel");
            size_t kernel_group = 0;
            CL_TRY(clGetKernelWorkGroupInfo(state->kernels[k], state->device,
                                            CL_KERNEL_WORK_GROUP_SIZE, sizeof kernel_group,
                                            &kernel_group, NULL),
                   "clGetKernelWorkGroupInfo");
            if (kernel_group < group)
                fits = 0;
        }
        if (fits) {
            state->group_size = group;
            return PSM_OK;
        }
        /* A kernel needs more registers than the group size allows: halve it. */
        for (int k = 0; k < KERNEL_COUNT; ++k) {
            clReleaseKernel(state->kernels[k]);
            state->kernels[k] = NULL;
        }
        release_program(state->program);
        state->program = NULL;
        group /= 2;
    }
}

static psm_status create_state(const psm_context_options *options, int device_index,
                               opencl_state *state, char *device_name, size_t device_name_size)
{
    cl_int code = CL_SUCCESS;
    if (options->native_stream) {
        cl_command_queue queue = (cl_command_queue)options->native_stream;
        code = clGetCommandQueueInfo(queue, CL_QUEUE_CONTEXT, sizeof state->context,
                                     &state->context, NULL);
        if (code == CL_SUCCESS)
            code = clGetCommandQueueInfo(queue, CL_QUEUE_DEVICE, sizeof state->device,
                                         &state->device, NULL);
        if (code != CL_SUCCESS) {
            state->context = NULL;
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "OpenCL: native_stream is not a cl_command_queue "
                                 "(clGetCommandQueueInfo: %s)",
                                 cl_error_name(code));
        }
        CL_TRY(clRetainContext(state->context), "clRetainContext");
        CL_TRY(clRetainCommandQueue(queue), "clRetainCommandQueue");
        state->queue = queue;
        cl_command_queue_properties properties = 0;
        CL_TRY(clGetCommandQueueInfo(queue, CL_QUEUE_PROPERTIES, sizeof properties,
                                     &properties, NULL),
               "clGetCommandQueueInfo");
        state->queue_out_of_order =
            (properties & CL_QUEUE_OUT_OF_ORDER_EXEC_MODE_ENABLE) != 0;
    } else {
        device_list list;
        PSM_TRY(list_devices(&list));
        if ((cl_uint)device_index >= list.count) {
            cl_uint count = list.count;
            free(list.devices);
            return psm_set_error(PSM_ERR_NO_DEVICE,
                                 "OpenCL: device index %d, but there are %u device(s)",
                                 device_index, (unsigned)count);
        }
        state->device = list.devices[device_index];
        free(list.devices);
        PSM_TRY(acquire_own_context(state->device, &state->context));
        state->own_context = 1;
        state->queue = clCreateCommandQueue(state->context, state->device, 0, &code);
        if (code != CL_SUCCESS) {
            state->queue = NULL;
            return cl_failure(code, "clCreateCommandQueue");
        }
    }

    char name[256], platform_name[256];
    cl_platform_id platform = NULL;
    PSM_TRY(device_string(state->device, CL_DEVICE_NAME, name, sizeof name));
    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_PLATFORM, sizeof platform, &platform, NULL),
           "clGetDeviceInfo");
    CL_TRY(clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof platform_name, platform_name,
                             NULL),
           "clGetPlatformInfo");
    platform_name[sizeof platform_name - 1] = '\0';
    snprintf(device_name, device_name_size, "%s (%s)", name, platform_name);

    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_LOCAL_MEM_SIZE, sizeof state->local_memory,
                           &state->local_memory, NULL),
           "clGetDeviceInfo");
    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_MAX_MEM_ALLOC_SIZE,
                           sizeof state->max_allocation, &state->max_allocation, NULL),
           "clGetDeviceInfo");

    program_sources sources;
    PSM_TRY(load_sources(&sources));
    psm_status status = build_kernels(state, &sources, options, device_name);
    free_sources(&sources);
    PSM_TRY(status);
    CL_TRY(clGetKernelWorkGroupInfo(state->kernels[KERNEL_ROW_FILTER], state->device,
                                    CL_KERNEL_LOCAL_MEM_SIZE, sizeof state->row_filter_local,
                                    &state->row_filter_local, NULL),
           "clGetKernelWorkGroupInfo");
    return ensure_buffer(state, &state->first_bad_row, sizeof(cl_int), "row check");
}

static psm_status opencl_create(const psm_context_options *options, int device_index,
                                void **state_out, char *device_name, size_t device_name_size)
{
    opencl_state *state = calloc(1, sizeof *state);
    if (!state)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot allocate the OpenCL backend state");
    psm_status status = create_state(options, device_index, state, device_name,
                                     device_name_size);
    if (status != PSM_OK) {
        opencl_destroy(state);
        return status;
    }
    *state_out = state;
    return PSM_OK;
}

/* ---- workspace ------------------------------------------------------------ */

static size_t tile_count(int64_t vocab)
{
    return (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
}

static psm_status reserve_rows(opencl_state *state, int64_t rows, int64_t vocab)
{
    size_t slots = (size_t)rows * tile_count(vocab);
    PSM_TRY(ensure_buffer(state, &state->tile_key, slots * sizeof(cl_ulong), "tile"));
    PSM_TRY(ensure_buffer(state, &state->tile_info, slots * sizeof(cl_uint), "tile"));
    PSM_TRY(ensure_buffer(state, &state->tile_ref, slots * sizeof(cl_float), "tile"));
    PSM_TRY(ensure_buffer(state, &state->tile_mass, slots * sizeof(cl_ulong), "tile"));
    PSM_TRY(ensure_buffer(state, &state->tile_prefix, slots * sizeof(cl_ulong), "tile"));
    /* A lane per item of a tile's team: at most 32 (PSM_TEAM). */
    PSM_TRY(ensure_buffer(state, &state->lane_max, slots * 32 * sizeof(cl_uint), "lane"));
    return ensure_buffer(state, &state->row_state, (size_t)rows * PSM_ROW_STATE_BYTES,
                         "row state");
}

/* Everything a cl_mem psm_sample of this size needs, plus its staged
 * outputs (host outputs or checking mode). Host logits are staged on first
 * use instead: a caller with cl_mem logits should not pay for a copy. */
static psm_status opencl_reserve(void *opaque, int64_t rows, int64_t vocab, int64_t num_samples)
{
    opencl_state *state = opaque;
    PSM_TRY(reserve_rows(state, rows, vocab));
    size_t outputs = (size_t)rows * (size_t)num_samples;
    PSM_TRY(ensure_buffer(state, &state->tokens, outputs * sizeof(cl_int), "token"));
    return ensure_buffer(state, &state->logprobs, outputs * sizeof(cl_float), "logprob");
}

/* ---- one call ------------------------------------------------------------ */

static size_t dtype_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

/* A caller's cl_mem: of this context and large enough. */
static psm_status check_device_buffer(opencl_state *state, void *pointer, size_t bytes,
                                      const char *what)
{
    cl_mem mem = (cl_mem)pointer;
    cl_context owner = NULL;
    size_t size = 0;
    cl_int code = clGetMemObjectInfo(mem, CL_MEM_CONTEXT, sizeof owner, &owner, NULL);
    if (code == CL_SUCCESS)
        code = clGetMemObjectInfo(mem, CL_MEM_SIZE, sizeof size, &size, NULL);
    if (code != CL_SUCCESS)
        return psm_set_error(PSM_ERR_WRONG_BACKEND,
                             "OpenCL: %s is not a cl_mem (clGetMemObjectInfo: %s)", what,
                             cl_error_name(code));
    if (owner != state->context)
        return psm_set_error(PSM_ERR_WRONG_BACKEND,
                             "OpenCL: %s is a cl_mem of another cl_context", what);
    if (size < bytes)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "OpenCL: %s holds %zu bytes; the call needs %zu", what, size,
                             bytes);
    return PSM_OK;
}

typedef struct launch {
    opencl_state *state;
    const psm_request *request;
    int64_t rows, vocab, stride;
    size_t tiles;
    cl_mem logits;
    cl_mem per_row_arrays[5];
    int filters;      /* some row may have an active filter */
    int may_top_k;    /* some row may have top-k */
    int may_search;   /* some row may have top-k or top-p (a cutoff search) */
    size_t list_bytes; /* psm_row_filter's local row cache or candidate list */
    psm_opencl_request description; /* every kernel's first argument */
} launch;

/* Input data as a cl_mem: the caller's, or a staged copy of host memory. */
static psm_status input_buffer(opencl_state *state, device_buffer *staging, void *data,
                               psm_memory memory, size_t bytes, const char *what,
                               cl_mem *out)
{
    if (memory == PSM_MEMORY_DEVICE) {
        PSM_TRY(check_device_buffer(state, data, bytes, what));
        *out = (cl_mem)data;
        return PSM_OK;
    }
    PSM_TRY(ensure_buffer(state, staging, bytes, what));
    CL_TRY(clEnqueueWriteBuffer(state->queue, staging->mem, CL_TRUE, 0, bytes, data, 0, NULL,
                                NULL),
           "clEnqueueWriteBuffer");
    *out = staging->mem;
    return PSM_OK;
}

/* Where the filter kernels keep their candidates. The on-chip path keeps
 * the row's values in local memory across the radix passes when they fit
 * next to the row filter's own local use. Otherwise the same local memory
 * holds a list of candidate rank keys (8 bytes each), capped so that more
 * row groups fit on a compute unit at once (the local memory a group asks
 * for limits how many run side by side): PSM_LIST_CAP keys hold the gap-bin
 * tallies and the tokens of the bin that holds a cutoff; longer lists
 * narrow by radix levels first. Min-p alone needs neither.
 * Top-k rows first try the lane maxima (psm_row_top_k, with a list of its
 * own, small enough for several groups per compute unit: top-k up to a few
 * hundred), which reads far less than even the on-chip path; the row filter
 * takes the rows it leaves. */
static void plan_filters(launch *call)
{
    const opencl_state *state = call->state;
    psm_opencl_request *plan = &call->description;
    if (!call->filters)
        return;
    cl_ulong row_bytes = (cl_ulong)call->vocab * sizeof(cl_float);
    cl_ulong free_local = state->local_memory > state->row_filter_local
                              ? state->local_memory - state->row_filter_local
                              : 0;
    int use_cache = call->may_search && row_bytes <= free_local;
    cl_ulong list_bytes =
        use_cache ? row_bytes : free_local / sizeof(cl_ulong) * sizeof(cl_ulong);
    if (!use_cache && list_bytes > PSM_LIST_CAP * sizeof(cl_ulong))
        list_bytes = PSM_LIST_CAP * sizeof(cl_ulong);
    if (!call->may_search)
        list_bytes = 0;
#ifdef PSM_OPENCL_TEST_LIST_BYTES
    /* Test builds only: force the global path with a small list. */
    use_cache = 0;
    list_bytes = PSM_OPENCL_TEST_LIST_BYTES;
#endif
    plan->use_row_cache = use_cache;
    plan->list_capacity = use_cache ? 0 : (psm_i32)(list_bytes / sizeof(cl_ulong));
    call->list_bytes = list_bytes >= sizeof(cl_ulong) ? (size_t)list_bytes : sizeof(cl_ulong);
    plan->top_k_list_capacity = PSM_TOP_K_LIST;
    plan->top_k_ran = call->may_top_k &&
                      (cl_ulong)PSM_TOP_K_LIST * sizeof(cl_ulong) <= free_local;
    plan->filters_ran = 1;
}

/* The rest of the call's description: the request as the kernels read it. */
static void describe(launch *call)
{
    const psm_request *request = call->request;
    const psm_params *params = &request->params;
    psm_opencl_request *description = &call->description;
    description->scalars.seed = params->seed;
    description->scalars.temperature = params->temperature;
    description->scalars.top_k = params->top_k;
    description->scalars.top_p = params->top_p;
    description->scalars.min_p = params->min_p;
    description->offset = params->offset;
    description->row_stride = call->stride;
    description->probs_stride = request->probs.row_stride;
    description->dtype = (psm_i32)request->logits.dtype;
    description->rows = (psm_i32)call->rows;
    description->vocab = (psm_i32)call->vocab;
    description->tiles = (psm_i32)call->tiles;
    description->num_samples = (psm_i32)params->num_samples;
    description->want_logprobs = request->logprobs.data != NULL;
    description->check_rows = request->check_rows;
}

static psm_status prepare(opencl_state *state, const psm_request *request, launch *call)
{
    memset(call, 0, sizeof *call);
    call->state = state;
    call->request = request;
    call->rows = request->logits.rows;
    call->vocab = request->logits.vocab;
    call->stride = request->logits.row_stride;
    call->tiles = tile_count(call->vocab);
    if (call->rows > INT32_MAX)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "OpenCL: %lld rows; this backend handles at most 2^31 - 1",
                             (long long)call->rows);
    PSM_TRY(reserve_rows(state, call->rows, call->vocab));
    size_t element = dtype_size(request->logits.dtype);
    size_t span = ((size_t)(call->rows - 1) * (size_t)call->stride + (size_t)call->vocab) *
                  element;
    PSM_TRY(input_buffer(state, &state->logits, request->logits.data, request->logits.memory,
                         span, "logits", &call->logits));

    const psm_params *params = &request->params;
    const void *arrays[5] = {params->temperature_per_row, params->top_k_per_row,
                             params->top_p_per_row, params->min_p_per_row,
                             params->seed_per_row};
    static const size_t sizes[5] = {4, 4, 4, 4, 8};
    static const char *const names[5] = {"temperature_per_row", "top_k_per_row",
                                         "top_p_per_row", "min_p_per_row", "seed_per_row"};
    static const cl_uint bits[5] = {PSM_PER_ROW_TEMPERATURE, PSM_PER_ROW_TOP_K,
                                    PSM_PER_ROW_TOP_P, PSM_PER_ROW_MIN_P, PSM_PER_ROW_SEED};
    for (int i = 0; i < 5; ++i) {
        if (!arrays[i])
            continue;
        call->description.per_row |= bits[i];
        PSM_TRY(input_buffer(state, &state->per_row[i], (void *)arrays[i],
                             request->logits.memory, (size_t)call->rows * sizes[i], names[i],
                             &call->per_row_arrays[i]));
    }
    int scalar_filter = (params->top_k > 0 && params->top_k < call->vocab) ||
                        params->top_p < 1.0f || params->min_p > 0.0f;
    const cl_uint per_row = call->description.per_row;
    int per_row_filter = (per_row & (PSM_PER_ROW_TOP_K | PSM_PER_ROW_TOP_P |
                                     PSM_PER_ROW_MIN_P)) != 0;
    int all_greedy = !(per_row & PSM_PER_ROW_TEMPERATURE) && psm_is_greedy(params->temperature);
    call->filters = (scalar_filter || per_row_filter) && !all_greedy;
    call->may_top_k = call->filters && (params->top_k > 0 || (per_row & PSM_PER_ROW_TOP_K));
    call->may_search = call->may_top_k || (call->filters && (params->top_p < 1.0f ||
                                                            (per_row & PSM_PER_ROW_TOP_P)));
    plan_filters(call);
    describe(call);
    return PSM_OK;
}

/* The arguments every kernel starts with (PSM_REQUEST_PARAMS): the call's
 * description, the logits and the per-row arrays (NULL where absent). */
static psm_status set_request_args(const launch *call, cl_kernel kernel, cl_uint *next)
{
    cl_uint index = 0;
    cl_int code = clSetKernelArg(kernel, index++, sizeof call->description, &call->description);
    code |= clSetKernelArg(kernel, index++, sizeof(cl_mem), &call->logits);
    for (int i = 0; i < 5; ++i)
        code |= clSetKernelArg(kernel, index++, sizeof(cl_mem), &call->per_row_arrays[i]);
    if (code != CL_SUCCESS)
        return psm_set_error(PSM_ERR_INTERNAL, "OpenCL: clSetKernelArg failed for the request");
    *next = index;
    return PSM_OK;
}

static psm_status set_arg(cl_kernel kernel, cl_uint *index, size_t size, const void *value)
{
    cl_int code = clSetKernelArg(kernel, (*index)++, size, value);
    if (code != CL_SUCCESS)
        return psm_set_error(PSM_ERR_INTERNAL, "OpenCL: clSetKernelArg(%u) failed: %s",
                             (unsigned)(*index - 1), cl_error_name(code));
    return PSM_OK;
}

#define SET_MEM(kernel, index, buffer) set_arg((kernel), (index), sizeof(cl_mem), &(buffer))

/* Enqueues over groups_x x rows groups; on an out-of-order caller queue a
 * barrier keeps our kernels in order. */
static psm_status enqueue(opencl_state *state, cl_kernel kernel, size_t groups_x, size_t rows,
                          const char *name)
{
    size_t global[2] = {groups_x * state->group_size, rows};
    size_t local[2] = {state->group_size, 1};
    cl_int code = clEnqueueNDRangeKernel(state->queue, kernel, 2, NULL, global, local, 0, NULL,
                                         NULL);
    if (code != CL_SUCCESS) {
        char what[96];
        snprintf(what, sizeof what, "clEnqueueNDRangeKernel(%s)", name);
        return cl_failure(code, what);
    }
    if (state->queue_out_of_order)
        CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
               "clEnqueueBarrierWithWaitList");
    return PSM_OK;
}

/* Groups for `units` units of work (tiles, rows or draws) of the kernels
 * that give each unit a team of min(32, group size) items (psm_kernels.cl,
 * PSM_TEAM), several teams per group. */
static size_t team_groups(const opencl_state *state, size_t units)
{
    size_t team = state->group_size < 32 ? state->group_size : 32;
    size_t teams = state->group_size / team;
    return (units + teams - 1) / teams;
}

/* The pipeline up to the per-row combination, shared by sample and probs. */
static psm_status run_rows(const launch *call)
{
    opencl_state *state = call->state;
    const int check_rows = call->request->check_rows;
    cl_uint index = 0;
    if (state->queue_out_of_order)
        CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
               "clEnqueueBarrierWithWaitList");
    if (check_rows) {
        cl_int none = INT32_MAX;
        CL_TRY(clEnqueueFillBuffer(state->queue, state->first_bad_row.mem, &none, sizeof none,
                                   0, sizeof none, 0, NULL, NULL),
               "clEnqueueFillBuffer");
    }

    const size_t tile_groups = team_groups(state, (size_t)call->rows * call->tiles);
    cl_kernel kernel = state->kernels[KERNEL_TILE_REDUCE];
    PSM_TRY(set_request_args(call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_key.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_info.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_ref.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_mass.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->lane_max.mem));
    PSM_TRY(enqueue(state, kernel, tile_groups, 1, kernel_names[KERNEL_TILE_REDUCE]));

    if (call->filters) {
        if (call->description.top_k_ran) {
            kernel = state->kernels[KERNEL_ROW_TOP_K];
            PSM_TRY(set_request_args(call, kernel, &index));
            PSM_TRY(SET_MEM(kernel, &index, state->tile_key.mem));
            PSM_TRY(SET_MEM(kernel, &index, state->tile_info.mem));
            PSM_TRY(SET_MEM(kernel, &index, state->lane_max.mem));
            PSM_TRY(SET_MEM(kernel, &index, state->tile_ref.mem));
            PSM_TRY(SET_MEM(kernel, &index, state->tile_mass.mem));
            PSM_TRY(SET_MEM(kernel, &index, state->row_state.mem));
            PSM_TRY(set_arg(kernel, &index, (size_t)PSM_TOP_K_LIST * sizeof(cl_ulong), NULL));
            PSM_TRY(enqueue(state, kernel, 1, (size_t)call->rows, kernel_names[KERNEL_ROW_TOP_K]));
        }

        kernel = state->kernels[KERNEL_ROW_FILTER];
        PSM_TRY(set_request_args(call, kernel, &index));
        PSM_TRY(SET_MEM(kernel, &index, state->tile_key.mem));
        PSM_TRY(SET_MEM(kernel, &index, state->tile_info.mem));
        PSM_TRY(SET_MEM(kernel, &index, state->row_state.mem));
        PSM_TRY(set_arg(kernel, &index, call->list_bytes, NULL));
        PSM_TRY(enqueue(state, kernel, 1, (size_t)call->rows, kernel_names[KERNEL_ROW_FILTER]));

        kernel = state->kernels[KERNEL_TILE_FILTER];
        PSM_TRY(set_request_args(call, kernel, &index));
        PSM_TRY(SET_MEM(kernel, &index, state->tile_key.mem));
        PSM_TRY(SET_MEM(kernel, &index, state->row_state.mem));
        PSM_TRY(SET_MEM(kernel, &index, state->tile_ref.mem));
        PSM_TRY(SET_MEM(kernel, &index, state->tile_mass.mem));
        PSM_TRY(enqueue(state, kernel, tile_groups, 1, kernel_names[KERNEL_TILE_FILTER]));
    }

    kernel = state->kernels[KERNEL_ROW_COMBINE];
    PSM_TRY(set_request_args(call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_key.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_info.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_ref.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_mass.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_prefix.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->row_state.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->first_bad_row.mem));
    return enqueue(state, kernel, team_groups(state, (size_t)call->rows), 1,
                   kernel_names[KERNEL_ROW_COMBINE]);
}

/* Checking mode: waits for the row check and fails naming the first bad row. */
static psm_status check_rows_result(opencl_state *state, psm_request *request)
{
    cl_int first_bad = INT32_MAX;
    CL_TRY(clEnqueueReadBuffer(state->queue, state->first_bad_row.mem, CL_TRUE, 0,
                               sizeof first_bad, &first_bad, 0, NULL, NULL),
           "clEnqueueReadBuffer");
    if (first_bad == INT32_MAX)
        return PSM_OK;
    request->first_bad_row = first_bad;
    return psm_set_error(PSM_ERR_BAD_ROW,
                         "row %d has a NaN or +inf logit, no finite logit, or a per-row "
                         "parameter out of range",
                         (int)first_bad);
}

/* Moves a staged output to where the caller wants it. */
static psm_status deliver(opencl_state *state, cl_mem staged, psm_output output, size_t bytes)
{
    if (output.memory == PSM_MEMORY_DEVICE) {
        CL_TRY(clEnqueueCopyBuffer(state->queue, staged, (cl_mem)output.data, 0, 0, bytes, 0,
                                   NULL, NULL),
               "clEnqueueCopyBuffer");
        if (state->queue_out_of_order)
            CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
                   "clEnqueueBarrierWithWaitList");
        return PSM_OK;
    }
    CL_TRY(clEnqueueReadBuffer(state->queue, staged, CL_TRUE, 0, bytes, output.data, 0, NULL,
                               NULL),
           "clEnqueueReadBuffer");
    return PSM_OK;
}

/* The cl_mem a kernel writes an output to: the caller's own when it is a
 * cl_mem and nothing has to be checked first, else a staging buffer. */
static psm_status output_target(opencl_state *state, psm_output output, device_buffer *staging,
                                size_t bytes, int check_rows, const char *what, cl_mem *target,
                                int *staged)
{
    if (output.memory == PSM_MEMORY_DEVICE)
        PSM_TRY(check_device_buffer(state, output.data, bytes, what));
    if (output.memory == PSM_MEMORY_DEVICE && !check_rows) {
        *target = (cl_mem)output.data;
        *staged = 0;
        return PSM_OK;
    }
    PSM_TRY(ensure_buffer(state, staging, bytes, what));
    *target = staging->mem;
    *staged = 1;
    return PSM_OK;
}

static psm_status opencl_sample(void *opaque, psm_request *request)
{
    opencl_state *state = opaque;
    launch call;
    PSM_TRY(prepare(state, request, &call));
    const size_t samples = (size_t)request->params.num_samples;
    const size_t outputs = (size_t)call.rows * samples;
    cl_mem tokens = NULL, logprobs = NULL;
    int tokens_staged = 0, logprobs_staged = 0;
    const int want_logprobs = call.description.want_logprobs;
    PSM_TRY(output_target(state, request->tokens, &state->tokens, outputs * sizeof(cl_int),
                          request->check_rows, "tokens", &tokens, &tokens_staged));
    if (want_logprobs)
        PSM_TRY(output_target(state, request->logprobs, &state->logprobs,
                              outputs * sizeof(cl_float), request->check_rows, "logprobs",
                              &logprobs, &logprobs_staged));
    else
        logprobs = tokens; /* never written: want_logprobs is 0 */

    PSM_TRY(run_rows(&call));
    cl_kernel kernel = state->kernels[KERNEL_DRAW];
    cl_uint index = 0;
    PSM_TRY(set_request_args(&call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_ref.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_mass.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_prefix.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->row_state.mem));
    PSM_TRY(SET_MEM(kernel, &index, tokens));
    PSM_TRY(SET_MEM(kernel, &index, logprobs));
    PSM_TRY(enqueue(state, kernel, team_groups(state, outputs), 1, kernel_names[KERNEL_DRAW]));

    if (request->check_rows)
        PSM_TRY(check_rows_result(state, request));
    if (tokens_staged)
        PSM_TRY(deliver(state, tokens, request->tokens, outputs * sizeof(cl_int)));
    if (logprobs_staged)
        PSM_TRY(deliver(state, logprobs, request->logprobs, outputs * sizeof(cl_float)));
    return PSM_OK;
}

static psm_status opencl_probs(void *opaque, psm_request *request)
{
    opencl_state *state = opaque;
    launch call;
    PSM_TRY(prepare(state, request, &call));
    const psm_tensor *probs = &request->probs;
    const size_t probs_bytes =
        ((size_t)(probs->rows - 1) * (size_t)probs->row_stride + (size_t)probs->vocab) *
        sizeof(cl_float);
    cl_mem target = NULL;
    if (probs->memory == PSM_MEMORY_DEVICE) {
        PSM_TRY(check_device_buffer(state, probs->data, probs_bytes, "probs"));
        target = (cl_mem)probs->data;
    }
    if (probs->memory != PSM_MEMORY_DEVICE || request->check_rows) {
        PSM_TRY(ensure_buffer(state, &state->probs, probs_bytes, "probs"));
        target = state->probs.mem;
    }

    PSM_TRY(run_rows(&call));
    cl_kernel kernel = state->kernels[KERNEL_PROBS];
    cl_uint index = 0;
    PSM_TRY(set_request_args(&call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_ref.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_mass.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->tile_prefix.mem));
    PSM_TRY(SET_MEM(kernel, &index, state->row_state.mem));
    PSM_TRY(SET_MEM(kernel, &index, target));
    PSM_TRY(enqueue(state, kernel, team_groups(state, (size_t)call.rows * call.tiles), 1,
                    kernel_names[KERNEL_PROBS]));

    if (request->check_rows)
        PSM_TRY(check_rows_result(state, request));
    if (target == state->probs.mem) {
        /* Only each row's vocab entries: the caller's padding stays untouched.
         * The buffers end at the last row's vocab entries, not at a whole
         * row pitch, and NVIDIA's driver refuses a rectangle whose last row
         * pitch would pass the end (CL_INVALID_VALUE); so the first rows - 1
         * rows go as a rectangle and the last row as a plain transfer. */
        size_t pitch = (size_t)probs->row_stride * sizeof(cl_float);
        size_t last_row = (size_t)(probs->rows - 1) * pitch;
        size_t row_bytes = (size_t)probs->vocab * sizeof(cl_float);
        size_t origin[3] = {0, 0, 0};
        size_t region[3] = {row_bytes, (size_t)probs->rows - 1, 1};
        if (probs->memory == PSM_MEMORY_DEVICE) {
            if (probs->rows > 1)
                CL_TRY(clEnqueueCopyBufferRect(state->queue, target, (cl_mem)probs->data, origin,
                                               origin, region, pitch, 0, pitch, 0, 0, NULL, NULL),
                       "clEnqueueCopyBufferRect");
            CL_TRY(clEnqueueCopyBuffer(state->queue, target, (cl_mem)probs->data, last_row,
                                       last_row, row_bytes, 0, NULL, NULL),
                   "clEnqueueCopyBuffer");
            if (state->queue_out_of_order)
                CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
                       "clEnqueueBarrierWithWaitList");
        } else {
            if (probs->rows > 1)
                CL_TRY(clEnqueueReadBufferRect(state->queue, target, CL_TRUE, origin, origin,
                                               region, pitch, 0, pitch, 0, probs->data, 0, NULL,
                                               NULL),
                       "clEnqueueReadBufferRect");
            CL_TRY(clEnqueueReadBuffer(state->queue, target, CL_TRUE, last_row, row_bytes,
                                       (char *)probs->data + last_row, 0, NULL, NULL),
                   "clEnqueueReadBuffer");
        }
    }
    return PSM_OK;
}

static psm_status opencl_synchronize(void *opaque)
{
    opencl_state *state = opaque;
    CL_TRY(clFinish(state->queue), "clFinish");
    return PSM_OK;
}

static const psm_backend_ops opencl_ops = {
    .api_version = PSM_BACKEND_API_VERSION,
    .id = PSM_BACKEND_OPENCL,
    .probe = opencl_probe,
    .create = opencl_create,
    .destroy = opencl_destroy,
    .reserve = opencl_reserve,
    .sample = opencl_sample,
    .probs = opencl_probs,
    .synchronize = opencl_synchronize,
};

PSM_DEFINE_BACKEND_MODULE(opencl_ops)
