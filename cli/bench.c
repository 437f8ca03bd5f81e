/* bench.c: `polysample bench`: how long sampling takes, against how long
 * merely reading the same logits takes on the same device in the same run. */
#define _POSIX_C_SOURCE 200809L
#include "bench_device.h"
#include "cli_commands.h"
#include "cli_util.h"
#include "polysample.h"

#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char bench_usage[] =
    "usage: polysample bench [options]\n"
    "\n"
    "Times psm_sample on random logits ~ N(0, 2^2) (generated once per shape).\n"
    "Default cases: 10000 x 32000 and 2048 x 151936 in f32 and bf16 with the\n"
    "settings plain and topk_topp, those shapes in f32 with top_p and min_p, and\n"
    "one row of 151936 in f32 (plain, topk_topp); on every available backend.\n"
    "\n"
    "Per case: the median time of repeated calls after a warm-up; GB/s of logits\n"
    "read; the read ceiling measured in the same run, the fastest of 7 (CPU: a\n"
    "parallel read-and-sum of the same buffer; CUDA/OpenCL: half a device-to-\n"
    "device copy of the same bytes) and the ratio time / read time; the speedup over the CPU backend\n"
    "when it ran the same case. CUDA and OpenCL keep the logits in device memory\n"
    "and time on the device's queue; other device backends are timed from host\n"
    "memory on the host clock (marked 'host' in the memory column).\n"
    "\n"
    "settings: plain (T 0.8), topk_topp (T 0.8, top-k 50, top-p 0.9),\n"
    "          top_p (T 0.8, top-p 0.9), min_p (T 0.8, min-p 0.05), greedy (T 0)\n"
    "\n"
    "options:\n"
    "  --backend LIST     comma-separated backends (auto, cpu, cuda, hip, opencl,\n"
    "                     each optionally :N); default: every available one\n"
    "  --rows R           one shape of R rows (with --vocab; default 2048)\n"
    "  --vocab V          one shape of vocab V (with --rows; default 32000)\n"
    "  --dtype LIST       f32, f16, bf16 (comma-separated): every listed dtype\n"
    "  --setting LIST     settings above (comma-separated): every listed setting\n"
    "  --repeat N         timed runs per case (default: 3 to 20 within ~2 s; one\n"
    "                     when the warm-up call alone exceeds that)\n"
    "  --threads N        CPU backend and CPU read ceiling threads\n"
    "  --seed S           seed of the random logits (default 1)\n"
    "  --quick            shapes with a tenth of the rows, ~0.5 s per case\n"
    "  --json             write JSON results to stdout instead of the table\n"
    "  --json=PATH        write JSON results to PATH as well as the table\n"
    "\n"
    "Integers are decimal digits only: no sign, spaces or 0x prefix, and a leading\n"
    "zero is not octal (--seed 010 is ten).\n";

typedef struct bench_setting {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
} bench_setting;

static const bench_setting bench_settings[] = {
    {"plain", 0.8f, 0, 1.0f, 0.0f},
    {"topk_topp", 0.8f, 50, 0.9f, 0.0f},
    {"top_p", 0.8f, 0, 0.9f, 0.0f},
    {"min_p", 0.8f, 0, 1.0f, 0.05f},
    {"greedy", 0.0f, 0, 1.0f, 0.0f},
};
#define BENCH_SETTING_COUNT ((int)(sizeof bench_settings / sizeof bench_settings[0]))
enum { SETTING_PLAIN, SETTING_TOPK_TOPP, SETTING_TOP_P, SETTING_MIN_P, SETTING_GREEDY };

#define BENCH_MAX_BACKENDS 8
#define BENCH_MAX_CASES 256
#define BENCH_MAX_RUNS 200
/* A device input smaller than this many cache sizes is rotated through
 * copies, so that consecutive calls do not find it in the cache. */
#define BENCH_ROTATION_CACHE_MULTIPLE 4
#define BENCH_MAX_ROTATION 512
/* The L2 size assumed when a device does not report one (H100: 50 MB). */
#define BENCH_DEFAULT_CACHE_BYTES (50u << 20)

typedef struct bench_case {
    int64_t rows;
    int64_t vocab;
    psm_dtype dtype;
    int setting;
} bench_case;

typedef struct bench_backend {
    psm_backend backend;
    int device_index;
    psm_context *context;
    const bench_device_ops *device; /* NULL: host memory, host clock */
    void *session;
    char device_name[160];
} bench_backend;

typedef struct bench_result {
    bench_case which;
    const bench_backend *backend;
    int failed;
    char error[320];
    int runs;
    double median_ms;
    double read_ceiling_ms; /* NAN when not measured */
    double host_call_ms;    /* device backends, one row: the whole call on the host */
    double speedup_vs_cpu;  /* NAN when the CPU did not run the case */
} bench_result;

typedef struct bench_config {
    int repeat;            /* 0: adaptive */
    double time_budget_s;  /* adaptive: stop adding runs after this */
    int threads;
    uint64_t seed;
    int show_progress;
} bench_config;

/* Keeps the read-and-sum from being optimised away. */
static volatile uint64_t read_sink;

static uint64_t read_and_sum(const void *data, size_t bytes, int threads)
{
    const uint64_t *words = data;
    int64_t word_count = (int64_t)(bytes / sizeof(uint64_t));
    uint64_t sum = 0;
    int64_t i;
    size_t tail;
#pragma omp parallel for reduction(+ : sum) schedule(static) num_threads(threads)
    for (i = 0; i < word_count; ++i)
        sum += words[i];
    for (tail = (size_t)word_count * sizeof(uint64_t); tail < bytes; ++tail)
        sum += ((const unsigned char *)data)[tail];
    return sum;
}

/* The ceiling is the fastest of a few reads: it stands for what the memory
 * system can do, so a read slowed by another process must not lower it (the
 * sampling times, medians, are compared against a best case). */
#define BENCH_CEILING_RUNS 7

static double cpu_read_ceiling_ms(const void *data, size_t bytes, int threads)
{
    double best = INFINITY;
    int run;
    read_sink += read_and_sum(data, bytes, threads); /* warm-up: page in, spin up threads */
    for (run = 0; run < BENCH_CEILING_RUNS; ++run) {
        double start = cli_now_seconds();
        double elapsed_ms;
        read_sink += read_and_sum(data, bytes, threads);
        elapsed_ms = 1e3 * (cli_now_seconds() - start);
        if (elapsed_ms < best)
            best = elapsed_ms;
    }
    return best;
}

/* One psm_sample launch over a rotation of input buffers. */
typedef struct sample_launch {
    psm_context *context;
    psm_tensor logits;
    void **inputs;
    int input_count;
    int next_input;
    psm_params params;
    psm_output tokens;
    psm_status status;
} sample_launch;

static int launch_sample(void *argument, int index)
{
    sample_launch *launch = argument;
    psm_output no_logprobs = {NULL, launch->tokens.memory};
    (void)index;
    launch->logits.data = launch->inputs[launch->next_input];
    launch->next_input = (launch->next_input + 1) % launch->input_count;
    launch->status =
        psm_sample(launch->context, &launch->logits, &launch->params, launch->tokens, no_logprobs);
    return launch->status == PSM_OK ? 0 : -1;
}

static int launch_sample_and_wait(sample_launch *launch)
{
    if (launch_sample(launch, 0) != 0)
        return -1;
    launch->status = psm_synchronize(launch->context);
    return launch->status == PSM_OK ? 0 : -1;
}

static void describe_failure(bench_result *result, const char *what, psm_status status)
{
    snprintf(result->error, sizeof result->error, "%s: %s: %s", what, psm_status_string(status),
             psm_last_error());
    result->failed = 1;
}

/* Adaptive repeats: at least 3 runs and up to 20 within the time budget; a
 * case whose warm-up alone took longer than the budget gets a single timed
 * run, so that the default CPU run stays within minutes. */
static int enough_runs(const bench_config *config, int runs, double elapsed_s, double warm_up_s)
{
    int minimum = warm_up_s > config->time_budget_s ? 1 : 3;
    if (config->repeat > 0)
        return runs >= config->repeat;
    return runs >= 20 || (runs >= minimum && elapsed_s >= config->time_budget_s);
}

/* Times one case on one backend; inputs already hold the logits. */
static void time_case(const bench_config *config, bench_backend *backend, void **inputs,
                      int input_count, void *tokens, bench_result *result)
{
    const bench_setting *setting = &bench_settings[result->which.setting];
    sample_launch launch;
    double times[BENCH_MAX_RUNS];
    double started, warm_up_s;
    int runs = 0;
    psm_status status;

    memset(&launch, 0, sizeof launch);
    launch.context = backend->context;
    launch.logits.dtype = result->which.dtype;
    launch.logits.memory = backend->device ? PSM_MEMORY_DEVICE : PSM_MEMORY_HOST;
    launch.logits.rows = result->which.rows;
    launch.logits.vocab = result->which.vocab;
    launch.inputs = inputs;
    launch.input_count = input_count;
    psm_params_init(&launch.params);
    launch.params.temperature = setting->temperature;
    launch.params.top_k = setting->top_k;
    launch.params.top_p = setting->top_p;
    launch.params.min_p = setting->min_p;
    launch.params.seed = config->seed;
    launch.tokens.data = tokens;
    launch.tokens.memory = launch.logits.memory;

    status = psm_context_reserve(backend->context, result->which.rows, result->which.vocab, 1);
    if (status != PSM_OK) {
        describe_failure(result, "psm_context_reserve", status);
        return;
    }
    started = cli_now_seconds();
    if (launch_sample_and_wait(&launch) != 0) { /* warm-up */
        describe_failure(result, "psm_sample", launch.status);
        return;
    }
    warm_up_s = cli_now_seconds() - started;
    started = cli_now_seconds();
    while (!enough_runs(config, runs, cli_now_seconds() - started, warm_up_s)) {
        if (backend->device) {
            if (backend->device->time_work(backend->session, 1, launch_sample, &launch,
                                           &times[runs]) != 0) {
                if (launch.status != PSM_OK)
                    describe_failure(result, "psm_sample", launch.status);
                else {
                    snprintf(result->error, sizeof result->error, "%s",
                             backend->device->last_error(backend->session));
                    result->failed = 1;
                }
                return;
            }
        } else {
            double start = cli_now_seconds();
            if (launch_sample_and_wait(&launch) != 0) {
                describe_failure(result, "psm_sample", launch.status);
                return;
            }
            times[runs] = 1e3 * (cli_now_seconds() - start);
        }
        ++runs;
    }
    result->runs = runs;
    result->median_ms = cli_median(times, runs);

    /* For one row on a device, the launch overhead is most of the story:
     * time the whole call, synchronisation included, on the host too. */
    if (backend->device && result->which.rows == 1) {
        double host_times[BENCH_MAX_RUNS];
        int host_runs;
        for (host_runs = 0; host_runs < runs; ++host_runs) {
            double start = cli_now_seconds();
            if (launch_sample_and_wait(&launch) != 0) {
                describe_failure(result, "psm_sample", launch.status);
                return;
            }
            host_times[host_runs] = 1e3 * (cli_now_seconds() - start);
        }
        result->host_call_ms = cli_median(host_times, host_runs);
    }
}

static double device_read_ceiling_ms(bench_backend *backend, void *source, size_t bytes,
                                     char *error, size_t error_size)
{
    void *destination = NULL;
    double best = INFINITY;
    int run;
    if (backend->device->allocate(backend->session, bytes, &destination) != 0) {
        snprintf(error, error_size, "%s", backend->device->last_error(backend->session));
        return NAN;
    }
    for (run = -1; run < BENCH_CEILING_RUNS; ++run) { /* run -1 is a warm-up */
        double copy_ms = 0.0;
        if (backend->device->time_copy(backend->session, destination, source, bytes, &copy_ms) !=
            0) {
            snprintf(error, error_size, "%s", backend->device->last_error(backend->session));
            backend->device->release(backend->session, destination);
            return NAN;
        }
        if (run >= 0 && copy_ms < best)
            best = copy_ms;
    }
    backend->device->release(backend->session, destination);
    /* A copy reads and writes the bytes: bandwidth = 2 * bytes / time, and
     * reading the logits once at that bandwidth takes half the copy time. */
    return 0.5 * best;
}

/* Runs every case of one (shape, dtype) on one backend. */
static void run_backend_cases(const bench_config *config, bench_backend *backend,
                              const void *host_logits, size_t bytes, bench_result *results,
                              int result_count, int *progress, int progress_total)
{
    void *inputs[BENCH_MAX_ROTATION];
    void *tokens = NULL;
    int input_count = 1;
    int i;
    double ceiling_ms = NAN;
    char error[320] = "";
    size_t token_bytes = (size_t)results[0].which.rows * sizeof(int32_t);

    memset(inputs, 0, sizeof inputs);
    if (backend->device) {
        size_t cache = backend->device->cache_bytes(backend->session);
        int ok = 1;
        if (cache == 0)
            cache = BENCH_DEFAULT_CACHE_BYTES;
        if (bytes < (size_t)BENCH_ROTATION_CACHE_MULTIPLE * cache) {
            size_t wanted = ((size_t)BENCH_ROTATION_CACHE_MULTIPLE * cache + bytes - 1) / bytes;
            input_count = wanted > BENCH_MAX_ROTATION ? BENCH_MAX_ROTATION : (int)wanted;
        }
        for (i = 0; i < input_count && ok; ++i)
            ok = backend->device->allocate(backend->session, bytes, &inputs[i]) == 0 &&
                 backend->device->upload(backend->session, inputs[i], host_logits, bytes) == 0;
        if (ok)
            ok = backend->device->allocate(backend->session, token_bytes, &tokens) == 0;
        if (!ok)
            snprintf(error, sizeof error, "%s", backend->device->last_error(backend->session));
        else
            ceiling_ms = device_read_ceiling_ms(backend, inputs[0], bytes, error, sizeof error);
    } else {
        inputs[0] = (void *)host_logits;
        tokens = malloc(token_bytes);
        if (!tokens)
            snprintf(error, sizeof error, "out of memory");
        else if (backend->backend == PSM_BACKEND_CPU)
            ceiling_ms = cpu_read_ceiling_ms(host_logits, bytes,
                                             config->threads > 0 ? config->threads
                                                                 : omp_get_max_threads());
    }

    for (i = 0; i < result_count; ++i) {
        bench_result *result = &results[i];
        const bench_setting *setting = &bench_settings[result->which.setting];
        result->backend = backend;
        result->read_ceiling_ms = ceiling_ms;
        result->host_call_ms = NAN;
        result->speedup_vs_cpu = NAN;
        ++*progress;
        /* The case is named as it starts, so a long one shows what it is. */
        if (config->show_progress)
            fprintf(stderr, "[%d/%d] %s %lld x %lld %s %s ... ", *progress, progress_total,
                    psm_backend_name(backend->backend), (long long)result->which.rows,
                    (long long)result->which.vocab, cli_dtype_name(result->which.dtype),
                    setting->name);
        if (error[0]) {
            snprintf(result->error, sizeof result->error, "%s", error);
            result->failed = 1;
        } else {
            time_case(config, backend, inputs, input_count, tokens, result);
        }
        if (config->show_progress) {
            if (result->failed)
                fprintf(stderr, "failed: %s\n", result->error);
            else
                fprintf(stderr, "%.3f ms (%d runs)\n", result->median_ms, result->runs);
        }
    }

    if (backend->device) {
        for (i = 0; i < input_count; ++i)
            backend->device->release(backend->session, inputs[i]);
        backend->device->release(backend->session, tokens);
    } else {
        free(tokens);
    }
}

static double logits_gigabytes(const bench_case *which)
{
    return (double)which->rows * (double)which->vocab * (double)cli_dtype_size(which->dtype) / 1e9;
}

static void print_optional(FILE *out, double value, const char *format)
{
    if (isnan(value))
        fputs("null", out);
    else
        fprintf(out, format, value);
}

static void write_json(FILE *out, const bench_result *results, int result_count)
{
    int i;
    fprintf(out, "{\n  \"polysample_version\": \"%s\",\n  \"results\": [", psm_version_string());
    for (i = 0; i < result_count; ++i) {
        const bench_result *result = &results[i];
        const bench_setting *setting = &bench_settings[result->which.setting];
        double gigabytes = logits_gigabytes(&result->which);
        fprintf(out, "%s\n    {\"backend\": \"%s\", \"device\": \"", i ? "," : "",
                psm_backend_name(result->backend->backend));
        {
            const char *c;
            for (c = result->backend->device_name; *c; ++c)
                if (*c == '"' || *c == '\\')
                    fprintf(out, "\\%c", *c);
                else if ((unsigned char)*c >= 0x20)
                    fputc(*c, out);
        }
        fprintf(out,
                "\", \"memory\": \"%s\", \"rows\": %lld, \"vocab\": %lld, \"dtype\": \"%s\", "
                "\"setting\": \"%s\", \"temperature\": %g, \"top_k\": %d, \"top_p\": %g, "
                "\"min_p\": %g, ",
                result->backend->device ? "device" : "host", (long long)result->which.rows,
                (long long)result->which.vocab, cli_dtype_name(result->which.dtype),
                setting->name, (double)setting->temperature, (int)setting->top_k,
                (double)setting->top_p, (double)setting->min_p);
        if (result->failed) {
            fputs("\"error\": \"", out);
            {
                const char *c;
                for (c = result->error; *c; ++c)
                    if (*c == '"' || *c == '\\')
                        fprintf(out, "\\%c", *c);
                    else if ((unsigned char)*c >= 0x20)
                        fputc(*c, out);
            }
            fputs("\"}", out);
            continue;
        }
        fprintf(out, "\"runs\": %d, \"median_ms\": %.6f, \"gb_per_s\": %.3f, ", result->runs,
                result->median_ms, gigabytes / (result->median_ms * 1e-3));
        fputs("\"read_ceiling_ms\": ", out);
        print_optional(out, result->read_ceiling_ms, "%.6f");
        fputs(", \"read_ceiling_gb_per_s\": ", out);
        print_optional(out, gigabytes / (result->read_ceiling_ms * 1e-3), "%.3f");
        fputs(", \"ratio_to_read\": ", out);
        print_optional(out, result->median_ms / result->read_ceiling_ms, "%.3f");
        fputs(", \"speedup_vs_cpu\": ", out);
        print_optional(out, result->speedup_vs_cpu, "%.3f");
        fputs(", \"host_call_ms\": ", out);
        print_optional(out, result->host_call_ms, "%.6f");
        fputc('}', out);
    }
    fputs("\n  ]\n}\n", out);
}

static void format_optional(char *text, size_t size, double value, const char *format)
{
    if (isnan(value))
        snprintf(text, size, "-");
    else
        snprintf(text, size, format, value);
}

static void print_table(const bench_result *results, int result_count)
{
    int i;
    printf("%-7s %-6s %6s %7s %-5s %-9s %10s %8s %9s %7s %7s %10s %5s\n", "backend", "memory",
           "rows", "vocab", "dtype", "setting", "median_ms", "GB/s", "read_ms", "x_read",
           "vs_cpu", "host_ms", "runs");
    for (i = 0; i < result_count; ++i) {
        const bench_result *result = &results[i];
        const bench_setting *setting = &bench_settings[result->which.setting];
        char read_ms[32], ratio[32], speedup[32], host_ms[32];
        printf("%-7s %-6s %6lld %7lld %-5s %-9s ", psm_backend_name(result->backend->backend),
               result->backend->device ? "device" : "host", (long long)result->which.rows,
               (long long)result->which.vocab, cli_dtype_name(result->which.dtype),
               setting->name);
        if (result->failed) {
            printf("failed: %s\n", result->error);
            continue;
        }
        format_optional(read_ms, sizeof read_ms, result->read_ceiling_ms, "%.3f");
        format_optional(ratio, sizeof ratio, result->median_ms / result->read_ceiling_ms, "%.2f");
        format_optional(speedup, sizeof speedup, result->speedup_vs_cpu, "%.2f");
        format_optional(host_ms, sizeof host_ms, result->host_call_ms, "%.3f");
        printf("%10.3f %8.2f %9s %7s %7s %10s %5d\n", result->median_ms,
               logits_gigabytes(&result->which) / (result->median_ms * 1e-3), read_ms, ratio,
               speedup, host_ms, result->runs);
    }
    printf("\nmedian_ms: median of the timed runs after a warm-up. read_ms: time to read the\n"
           "same logits once at the bandwidth measured in this run; x_read = median / read.\n"
           "vs_cpu: CPU backend median / this median. host_ms: a whole call on the host.\n");
    for (i = 0; i < result_count; ++i)
        if (i == 0 || results[i].backend != results[i - 1].backend) {
            int seen = 0, j;
            for (j = 0; j < i; ++j)
                seen |= results[j].backend == results[i].backend;
            if (!seen)
                printf("%s: %s\n", psm_backend_name(results[i].backend->backend),
                       results[i].backend->device_name);
        }
}

static int parse_list(const char *command, const char *option, const char *text,
                      int (*parse_item)(const char *item, int *value), int *values, int capacity)
{
    char buffer[256];
    char *item, *save = NULL;
    int count = 0;
    if (strlen(text) >= sizeof buffer) {
        cli_error(command, "%s list is too long", option);
        return -1;
    }
    strcpy(buffer, text);
    for (item = strtok_r(buffer, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (count == capacity || parse_item(item, &values[count]) != 0) {
            cli_error(command, "bad %s item '%s'", option, item);
            return -1;
        }
        ++count;
    }
    if (count == 0) {
        cli_error(command, "%s needs at least one item", option);
        return -1;
    }
    return count;
}

static int parse_setting_item(const char *item, int *value)
{
    int i;
    for (i = 0; i < BENCH_SETTING_COUNT; ++i)
        if (!strcmp(item, bench_settings[i].name)) {
            *value = i;
            return 0;
        }
    return -1;
}

static int parse_dtype_item(const char *item, int *value)
{
    psm_dtype dtype;
    if (cli_parse_dtype(item, &dtype) != 0)
        return -1;
    *value = (int)dtype;
    return 0;
}

/* Backend specs are kept as (backend, device) pairs packed in one int. */
static int parse_backend_item(const char *item, int *value)
{
    psm_backend backend;
    int device_index;
    if (cli_parse_backend(item, &backend, &device_index) != 0)
        return -1;
    *value = (int)backend * 4096 + (device_index + 1);
    return 0;
}

static int open_backend(const char *command, psm_backend backend, int device_index,
                        const bench_config *config, bench_backend *opened)
{
    psm_context_options options;
    psm_status status;
    char error[256] = "";
    memset(opened, 0, sizeof *opened);
    opened->backend = backend;
    opened->device_index = device_index;
    opened->device = bench_device_find(backend);
    cli_context_options_init(&options);
    options.backend = backend;
    options.device_index = device_index;
    options.cpu_threads = config->threads;
    if (opened->device) {
        if (opened->device->open(device_index, &opened->session, error, sizeof error) != 0) {
            cli_error(command, "%s: %s", psm_backend_name(backend), error);
            return -1;
        }
        options.native_stream = opened->device->native_stream(opened->session);
    }
    status = psm_context_create(&options, &opened->context);
    if (status != PSM_OK) {
        cli_library_error(command, psm_backend_name(backend), status);
        if (opened->device)
            opened->device->close(opened->session);
        return -1;
    }
    snprintf(opened->device_name, sizeof opened->device_name, "%s",
             psm_context_device_name(opened->context));
    return 0;
}

static void close_backend(bench_backend *backend)
{
    psm_context_destroy(backend->context);
    if (backend->device)
        backend->device->close(backend->session);
}

/* The default case list: the two large shapes in f32 and bf16 with plain and
 * topk_topp, those shapes in f32 with top_p and min_p, and one long row. */
static int default_cases(int quick, bench_case *cases)
{
    const int64_t large[2][2] = {{10000, 32000}, {2048, 151936}};
    const psm_dtype dtypes[2] = {PSM_DTYPE_F32, PSM_DTYPE_BF16};
    int count = 0, shape, dtype, setting;
    for (shape = 0; shape < 2; ++shape) {
        int64_t rows = quick ? large[shape][0] / 10 : large[shape][0];
        for (dtype = 0; dtype < 2; ++dtype)
            for (setting = SETTING_PLAIN; setting <= SETTING_MIN_P; ++setting) {
                bench_case one = {rows, large[shape][1], dtypes[dtype], setting};
                if (dtypes[dtype] != PSM_DTYPE_F32 && setting > SETTING_TOPK_TOPP)
                    continue;
                cases[count++] = one;
            }
    }
    for (setting = SETTING_PLAIN; setting <= SETTING_TOPK_TOPP; ++setting) {
        bench_case one = {1, 151936, PSM_DTYPE_F32, setting};
        cases[count++] = one;
    }
    return count;
}

int cli_bench(int argc, char **argv)
{
    bench_config config = {0, 2.0, 0, 1, 0};
    bench_backend backends[BENCH_MAX_BACKENDS];
    int backend_specs[BENCH_MAX_BACKENDS], backend_spec_count = 0, backend_count = 0;
    int dtype_list[3], dtype_count = 0;
    int setting_list[BENCH_SETTING_COUNT], setting_count = 0;
    int64_t rows = 0, vocab = 0;
    int quick = 0, json_to_stdout = 0;
    const char *json_path = NULL;
    bench_case cases[BENCH_MAX_CASES];
    int case_count = 0;
    bench_result *results = NULL;
    int result_count = 0, progress = 0, progress_total;
    int exit_status = CLI_EXIT_OK;
    int i, b;

    for (i = 0; i < argc; ++i) {
        const char *value = NULL;
        uint64_t integer = 0;
        int matched;
        const char *argument = argv[i];
        if (!strcmp(argument, "--help") || !strcmp(argument, "-h")) {
            fputs(bench_usage, stdout);
            return CLI_EXIT_OK;
        }
        if (!strcmp(argument, "--quick")) {
            quick = 1;
            continue;
        }
        if (!strcmp(argument, "--json")) {
            json_to_stdout = 1;
            continue;
        }
        if (!strncmp(argument, "--json=", 7)) {
            json_path = argument + 7;
            if (!json_path[0]) {
                cli_error("bench", "--json= needs a path");
                return CLI_EXIT_USAGE;
            }
            continue;
        }
#define BENCH_OPTION(name) (matched = cli_match_option("bench", argc, argv, &i, name, &value)) != 0
        if (BENCH_OPTION("--backend")) {
            if (matched < 0)
                return CLI_EXIT_USAGE;
            backend_spec_count = parse_list("bench", "--backend", value, parse_backend_item,
                                            backend_specs, BENCH_MAX_BACKENDS);
            if (backend_spec_count < 0)
                return CLI_EXIT_USAGE;
        } else if (BENCH_OPTION("--dtype")) {
            if (matched < 0)
                return CLI_EXIT_USAGE;
            dtype_count = parse_list("bench", "--dtype", value, parse_dtype_item, dtype_list, 3);
            if (dtype_count < 0)
                return CLI_EXIT_USAGE;
        } else if (BENCH_OPTION("--setting")) {
            if (matched < 0)
                return CLI_EXIT_USAGE;
            setting_count = parse_list("bench", "--setting", value, parse_setting_item,
                                       setting_list, BENCH_SETTING_COUNT);
            if (setting_count < 0)
                return CLI_EXIT_USAGE;
        } else if (BENCH_OPTION("--rows")) {
            if (matched < 0 ||
                cli_option_decimal("bench", "--rows", value, 1, INT32_MAX, &integer) != 0)
                return CLI_EXIT_USAGE;
            rows = (int64_t)integer;
        } else if (BENCH_OPTION("--vocab")) {
            if (matched < 0 ||
                cli_option_decimal("bench", "--vocab", value, 1, INT32_MAX, &integer) != 0)
                return CLI_EXIT_USAGE;
            vocab = (int64_t)integer;
        } else if (BENCH_OPTION("--repeat")) {
            if (matched < 0 ||
                cli_option_decimal("bench", "--repeat", value, 1, BENCH_MAX_RUNS, &integer) != 0)
                return CLI_EXIT_USAGE;
            config.repeat = (int)integer;
        } else if (BENCH_OPTION("--threads")) {
            if (matched < 0 ||
                cli_option_decimal("bench", "--threads", value, 1, 4096, &integer) != 0)
                return CLI_EXIT_USAGE;
            config.threads = (int)integer;
        } else if (BENCH_OPTION("--seed")) {
            if (matched < 0 ||
                cli_option_decimal("bench", "--seed", value, 0, UINT64_MAX, &config.seed) != 0)
                return CLI_EXIT_USAGE;
        } else {
            cli_error("bench", "unknown argument '%s' (see polysample bench --help)", argument);
            return CLI_EXIT_USAGE;
        }
#undef BENCH_OPTION
    }
    if (quick)
        config.time_budget_s = 0.5;
    config.show_progress = isatty(STDERR_FILENO);

    /* The cases: the default list, or the cross product of what was asked. */
    if (rows == 0 && vocab == 0 && dtype_count == 0 && setting_count == 0) {
        case_count = default_cases(quick, cases);
    } else {
        const int64_t default_shapes[3][2] = {{10000, 32000}, {2048, 151936}, {1, 151936}};
        int shape_count = rows || vocab ? 1 : 3, s, d, t;
        if (dtype_count == 0) {
            dtype_list[0] = PSM_DTYPE_F32;
            dtype_list[1] = PSM_DTYPE_BF16;
            dtype_count = 2;
        }
        if (setting_count == 0) {
            setting_list[0] = SETTING_PLAIN;
            setting_list[1] = SETTING_TOPK_TOPP;
            setting_count = 2;
        }
        for (s = 0; s < shape_count; ++s)
            for (d = 0; d < dtype_count; ++d)
                for (t = 0; t < setting_count; ++t) {
                    bench_case one;
                    one.rows = rows || vocab ? (rows ? rows : 2048) : default_shapes[s][0];
                    one.vocab = rows || vocab ? (vocab ? vocab : 32000) : default_shapes[s][1];
                    if (quick && one.rows >= 100)
                        one.rows /= 10;
                    one.dtype = (psm_dtype)dtype_list[d];
                    one.setting = setting_list[t];
                    cases[case_count++] = one;
                }
    }

    /* The backends: those asked for, or every available one. */
    if (backend_spec_count == 0) {
        int backend;
        for (backend = PSM_BACKEND_CPU; backend < PSM_BACKEND_COUNT; ++backend)
            if (psm_backend_available((psm_backend)backend, NULL))
                backend_specs[backend_spec_count++] = backend * 4096;
    }
    for (b = 0; b < backend_spec_count; ++b) {
        psm_backend backend = (psm_backend)(backend_specs[b] / 4096);
        int device_index = backend_specs[b] % 4096 - 1, k, duplicate = 0;
        if (backend == PSM_BACKEND_AUTO) {
            /* Resolve AUTO (and POLYSAMPLE_BACKEND) to the backend it picks. */
            bench_backend probe;
            if (open_backend("bench", PSM_BACKEND_AUTO, -1, &config, &probe) != 0) {
                exit_status = CLI_EXIT_FAILURE;
                goto done;
            }
            backend = psm_context_backend(probe.context);
            close_backend(&probe);
        }
        for (k = 0; k < backend_count; ++k)
            duplicate |= backends[k].backend == backend && backends[k].device_index == device_index;
        if (duplicate)
            continue;
        if (open_backend("bench", backend, device_index, &config, &backends[backend_count]) != 0) {
            exit_status = CLI_EXIT_FAILURE;
            goto done;
        }
        ++backend_count;
    }
    if (backend_count == 0) {
        cli_error("bench", "no backend is available");
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }

    results = calloc((size_t)case_count * (size_t)backend_count, sizeof *results);
    if (!results) {
        cli_error("bench", "out of memory");
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    progress_total = case_count * backend_count;

    /* Shape by shape: generate the logits once, then each dtype, then each
     * backend runs that (shape, dtype)'s settings. */
    {
        int first;
        for (first = 0; first < case_count; ++first) {
            int seen = 0, k;
            size_t count;
            float *logits;
            void *converted = NULL;
            for (k = 0; k < first; ++k)
                seen |= cases[k].rows == cases[first].rows && cases[k].vocab == cases[first].vocab;
            if (seen)
                continue;
            count = (size_t)cases[first].rows * (size_t)cases[first].vocab;
            logits = cli_alloc("bench", count * sizeof(float));
            if (!logits) {
                exit_status = CLI_EXIT_FAILURE;
                goto done;
            }
            if (config.show_progress)
                fprintf(stderr, "generating %lld x %lld logits ~ N(0, 2^2)\n",
                        (long long)cases[first].rows, (long long)cases[first].vocab);
            cli_fill_normal(logits, count, 2.0f, config.seed);
            for (i = PSM_DTYPE_F32; i <= PSM_DTYPE_BF16; ++i) {
                psm_dtype dtype = (psm_dtype)i;
                bench_case group[BENCH_SETTING_COUNT * 4];
                int group_count = 0;
                const void *data = logits;
                for (k = first; k < case_count; ++k)
                    if (cases[k].rows == cases[first].rows && cases[k].vocab == cases[first].vocab &&
                        cases[k].dtype == dtype)
                        group[group_count++] = cases[k];
                if (group_count == 0)
                    continue;
                if (dtype != PSM_DTYPE_F32) {
                    converted = cli_alloc("bench", count * 2);
                    if (!converted) {
                        free(logits);
                        exit_status = CLI_EXIT_FAILURE;
                        goto done;
                    }
                    cli_convert_from_f32(logits, count, dtype, converted);
                    data = converted;
                }
                for (b = 0; b < backend_count; ++b) {
                    bench_result *slice = &results[result_count];
                    for (k = 0; k < group_count; ++k)
                        slice[k].which = group[k];
                    run_backend_cases(&config, &backends[b], data, count * cli_dtype_size(dtype),
                                      slice, group_count, &progress, progress_total);
                    result_count += group_count;
                }
                free(converted);
                converted = NULL;
            }
            free(logits);
        }
    }

    /* Speedups over the CPU backend on the same case. */
    for (i = 0; i < result_count; ++i) {
        int k;
        if (results[i].failed || results[i].backend->backend == PSM_BACKEND_CPU)
            continue;
        for (k = 0; k < result_count; ++k)
            if (!results[k].failed && results[k].backend->backend == PSM_BACKEND_CPU &&
                !memcmp(&results[k].which, &results[i].which, sizeof results[i].which))
                results[i].speedup_vs_cpu = results[k].median_ms / results[i].median_ms;
    }
    for (i = 0; i < result_count; ++i)
        if (results[i].failed)
            exit_status = CLI_EXIT_FAILURE;

    if (json_to_stdout) {
        write_json(stdout, results, result_count);
    } else {
        print_table(results, result_count);
    }
    if (json_path) {
        FILE *out = fopen(json_path, "w");
        if (!out) {
            cli_error("bench", "cannot write '%s': %s", json_path, strerror(errno));
            exit_status = CLI_EXIT_FAILURE;
        } else {
            write_json(out, results, result_count);
            if (fclose(out) != 0) {
                cli_error("bench", "writing '%s' failed", json_path);
                exit_status = CLI_EXIT_FAILURE;
            }
        }
    }

done:
    free(results);
    for (b = 0; b < backend_count; ++b)
        close_backend(&backends[b]);
    return exit_status;
}
