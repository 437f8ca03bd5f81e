/* bench_run.c: how `polysample bench` times a case: the backends it opens
 * (with their device buffers and clocks, bench_device.h), the read ceiling
 * measured beside each shape, and the timed psm_sample calls. */
#define _POSIX_C_SOURCE 200809L
#include "bench.h"
#include "cli_util.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A device input smaller than this many cache sizes is rotated through
 * copies, so that consecutive calls do not find it in the cache. */
#define BENCH_ROTATION_CACHE_MULTIPLE 4
#define BENCH_MAX_ROTATION 512
/* The L2 size assumed when a device does not report one (H100: 50 MB). */
#define BENCH_DEFAULT_CACHE_BYTES (50u << 20)

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
    psm_output logprobs; /* data NULL: none */
    psm_status status;
} sample_launch;

static int launch_sample(void *argument, int index)
{
    sample_launch *launch = argument;
    (void)index;
    launch->logits.data = launch->inputs[launch->next_input];
    launch->next_input = (launch->next_input + 1) % launch->input_count;
    launch->status = psm_sample(launch->context, &launch->logits, &launch->params,
                                launch->tokens, launch->logprobs);
    return launch->status == PSM_OK ? 0 : -1;
}

/* One psm_verify launch (the verify setting) over the rotation of inputs,
 * each a pair of buffers: the target rows, then the draft rows. */
typedef struct verify_launch {
    psm_context *context;
    psm_tensor target, draft;
    void **inputs;
    int input_count;
    int next_input;
    psm_params params; /* the target's; the draft's are the same */
    psm_drafts drafts;
    psm_verification outputs;
    psm_status status;
} verify_launch;

static int launch_verify(void *argument, int index)
{
    verify_launch *launch = argument;
    (void)index;
    launch->target.data = launch->inputs[2 * launch->next_input];
    launch->draft.data = launch->inputs[2 * launch->next_input + 1];
    launch->next_input = (launch->next_input + 1) % launch->input_count;
    launch->status = psm_verify(launch->context, &launch->target, &launch->params,
                                &launch->drafts, &launch->outputs);
    return launch->status == PSM_OK ? 0 : -1;
}

/* A case's timed call: work(argument, 0) launches it on context and leaves
 * the call's status in *status. */
typedef struct timed_call {
    psm_context *context;
    bench_device_work work;
    void *argument;
    psm_status *status;
} timed_call;

static int call_and_wait(const timed_call *call)
{
    if (call->work(call->argument, 0) != 0)
        return -1;
    *call->status = psm_synchronize(call->context);
    return *call->status == PSM_OK ? 0 : -1;
}

/* A failed call; a refusal of what the setting adds to the draw
 * (PSM_ERR_UNSUPPORTED) is the backend's "unsupported", not a failure. */
static void describe_failure(bench_result *result, const char *what, psm_status status)
{
    snprintf(result->error, sizeof result->error, "%s: %s: %s", what, psm_status_string(status),
             psm_last_error());
    if (status == PSM_ERR_UNSUPPORTED && bench_settings[result->which.setting].extra != EXTRA_NONE)
        result->unsupported = 1;
    else
        result->failed = 1;
}

/* What a case's setting adds to the draw, in the memory its logits are in:
 * the shape's processing arrays (processing, device or host), the lists
 * and penalties each setting uses, and the top-N outputs. */
typedef struct case_extras {
    psm_logit_processing mask_bias, penalties;
    psm_top_logprobs top;
    psm_output logprobs;
    /* verify: the draft tokens (requests x k) and the outputs. */
    psm_output draft_tokens, accepted, emitted;
} case_extras;

/* Adaptive repeats: at least 3 runs and up to 20 within the time budget; a
 * case whose warm-up alone took longer than the budget gets a single timed
 * run, so that the default CPU run stays within minutes. */
int bench_enough_runs(const bench_config *config, int runs, double elapsed_s, double warm_up_s)
{
    int minimum = warm_up_s > config->time_budget_s ? 1 : 3;
    if (config->repeat > 0)
        return runs >= config->repeat;
    return runs >= 20 || (runs >= minimum && elapsed_s >= config->time_budget_s);
}

/* Times a case's call: a warm-up, then the runs; on a device with one
 * row, the whole call on the host too. */
static void time_call(const bench_config *config, bench_backend *backend, const timed_call *call,
                      const char *what, bench_result *result)
{
    double times[BENCH_MAX_RUNS];
    double started, warm_up_s;
    int runs = 0;

    started = cli_now_seconds();
    if (call_and_wait(call) != 0) { /* warm-up */
        describe_failure(result, what, *call->status);
        return;
    }
    warm_up_s = cli_now_seconds() - started;
    started = cli_now_seconds();
    while (!bench_enough_runs(config, runs, cli_now_seconds() - started, warm_up_s)) {
        if (backend->device) {
            if (backend->device->time_work(backend->session, 1, call->work, call->argument,
                                           &times[runs]) != 0) {
                if (*call->status != PSM_OK)
                    describe_failure(result, what, *call->status);
                else {
                    snprintf(result->error, sizeof result->error, "%s",
                             backend->device->last_error(backend->session));
                    result->failed = 1;
                }
                return;
            }
        } else {
            double start = cli_now_seconds();
            if (call_and_wait(call) != 0) {
                describe_failure(result, what, *call->status);
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
            if (call_and_wait(call) != 0) {
                describe_failure(result, what, *call->status);
                return;
            }
            host_times[host_runs] = 1e3 * (cli_now_seconds() - start);
        }
        result->host_call_ms = cli_median(host_times, host_runs);
    }
}

/* A tensor of rows of the case's vocab and dtype in the backend's memory
 * (data set at the launch). */
static psm_tensor case_tensor(const bench_backend *backend, const bench_case *which, int64_t rows)
{
    psm_tensor tensor;
    memset(&tensor, 0, sizeof tensor);
    tensor.dtype = which->dtype;
    tensor.memory = backend->device ? PSM_MEMORY_DEVICE : PSM_MEMORY_HOST;
    tensor.rows = rows;
    tensor.vocab = which->vocab;
    return tensor;
}

/* A setting's parameters in the run's filter order, with the run's seed. */
static psm_params setting_params(const bench_config *config, const bench_setting *setting)
{
    psm_params params;
    psm_params_init(&params);
    params.temperature = setting->temperature;
    params.top_k = setting->top_k;
    params.top_p = setting->top_p;
    params.min_p = setting->min_p;
    params.filter_order = config->filter_order;
    params.seed = config->seed;
    return params;
}

/* A sampling case's parameters: the setting's, with what it adds to the
 * draw (extras) in the backend's memory. */
static psm_params case_params(const bench_config *config, const bench_case *which,
                              const case_extras *extras)
{
    const bench_setting *setting = &bench_settings[which->setting];
    psm_params params = setting_params(config, setting);
    switch (setting->extra) {
    case EXTRA_MASK_BIAS: params.processing = &extras->mask_bias; break;
    case EXTRA_PENALTIES: params.processing = &extras->penalties; break;
    case EXTRA_TOP_20: params.top_logprobs = &extras->top; break;
    case EXTRA_NONE:
    case EXTRA_VERIFY: break;
    }
    return params;
}

/* Times one sampling case on one backend; inputs already hold the logits. */
static void time_case(const bench_config *config, bench_backend *backend, void **inputs,
                      int input_count, void *tokens, const case_extras *extras,
                      bench_result *result)
{
    sample_launch launch;
    psm_status status;

    memset(&launch, 0, sizeof launch);
    launch.context = backend->context;
    launch.logits = case_tensor(backend, &result->which, result->which.rows);
    launch.inputs = inputs;
    launch.input_count = input_count;
    launch.params = case_params(config, &result->which, extras);
    launch.tokens.data = tokens;
    launch.tokens.memory = launch.logits.memory;
    launch.logprobs.memory = launch.logits.memory;
    if (launch.params.top_logprobs)
        launch.logprobs = extras->logprobs;

    status = psm_context_reserve(backend->context, result->which.rows, result->which.vocab, 1);
    if (status != PSM_OK) {
        describe_failure(result, "psm_context_reserve", status);
        return;
    }
    timed_call call = {backend->context, launch_sample, &launch, &launch.status};
    time_call(config, backend, &call, "psm_sample", result);
}

/* Times one verify case: the draft tokens are first drawn greedily from
 * the draft rows (of the first input; every input holds the same values),
 * then psm_verify is timed. */
static void time_verify_case(const bench_config *config, bench_backend *backend, void **inputs,
                             int input_count, const case_extras *extras, bench_result *result)
{
    const bench_setting *setting = &bench_settings[result->which.setting];
    const int32_t k = BENCH_VERIFY_DRAFTS;
    verify_launch launch;
    psm_params greedy;
    psm_output no_logprobs;
    psm_status status;

    memset(&launch, 0, sizeof launch);
    launch.context = backend->context;
    launch.target = case_tensor(backend, &result->which, result->which.rows * (k + 1));
    launch.draft = case_tensor(backend, &result->which, result->which.rows * k);
    launch.draft.data = inputs[1];
    launch.inputs = inputs;
    launch.input_count = input_count;
    launch.params = setting_params(config, setting);
    psm_drafts_init(&launch.drafts);
    launch.drafts.nodes = k;
    launch.drafts.tokens = extras->draft_tokens.data;
    launch.drafts.draft_logits = &launch.draft;
    launch.drafts.draft_params = &launch.params;
    launch.outputs.accepted = extras->accepted;
    launch.outputs.tokens = extras->emitted;
    launch.outputs.path_nodes = (psm_output){NULL, launch.target.memory};
    launch.outputs.logprobs = (psm_output){NULL, launch.target.memory};

    psm_params_init(&greedy);
    greedy.temperature = 0.0f;
    no_logprobs = (psm_output){NULL, launch.target.memory};
    status = psm_sample(backend->context, &launch.draft, &greedy, extras->draft_tokens,
                        no_logprobs);
    if (status == PSM_OK)
        status = psm_synchronize(backend->context);
    if (status != PSM_OK) {
        describe_failure(result, "psm_sample (the draft tokens)", status);
        return;
    }
    timed_call call = {backend->context, launch_verify, &launch, &launch.status};
    time_call(config, backend, &call, "psm_verify", result);
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

/* The buffers of what the settings add to the draw, on one backend. */
enum extra_buffer {
    EXTRA_BUFFER_MASK,
    EXTRA_BUFFER_BIAS_OFFSETS,
    EXTRA_BUFFER_BIAS_TOKENS,
    EXTRA_BUFFER_BIAS_VALUES,
    EXTRA_BUFFER_HISTORY_OFFSETS,
    EXTRA_BUFFER_HISTORY_TOKENS,
    EXTRA_BUFFER_LOGPROBS,
    EXTRA_BUFFER_TOP_TOKENS,
    EXTRA_BUFFER_TOP_LOGPROBS,
    EXTRA_BUFFER_RANKS,
    EXTRA_BUFFER_DRAFT_TOKENS,
    EXTRA_BUFFER_ACCEPTED,
    EXTRA_BUFFER_EMITTED,
    EXTRA_BUFFER_COUNT
};

/* A buffer of `bytes` in the backend's memory, holding host (when not
 * NULL). 0, or -1. */
static int place(bench_backend *backend, const void *host, size_t bytes, void **buffer)
{
    if (!backend->device) {
        *buffer = host ? (void *)host : malloc(bytes);
        return *buffer ? 0 : -1;
    }
    if (backend->device->allocate(backend->session, bytes, buffer) != 0)
        return -1;
    return host ? backend->device->upload(backend->session, *buffer, host, bytes) : 0;
}

static void release_extras(bench_backend *backend, void **buffers)
{
    int i;
    for (i = 0; i < EXTRA_BUFFER_COUNT; ++i) {
        if (backend->device)
            backend->device->release(backend->session, buffers[i]);
        else if (i >= EXTRA_BUFFER_LOGPROBS) /* the outputs; the inputs are the caller's */
            free(buffers[i]);
    }
}

/* The extras of rows rows (processing: the shape's inputs, or NULL) in
 * buffers of the backend's memory. 0, or -1 (release_extras then). */
static int place_extras(bench_backend *backend, const bench_processing *processing, int64_t rows,
                        void **buffers, case_extras *extras)
{
    const size_t count = (size_t)rows;
    int failed = 0;
    memset(extras, 0, sizeof *extras);
    psm_logit_processing_init(&extras->mask_bias);
    psm_logit_processing_init(&extras->penalties);
    if (processing) {
        failed |= place(backend, processing->mask,
                        count * (size_t)processing->mask_words * sizeof(uint32_t),
                        &buffers[EXTRA_BUFFER_MASK]);
        failed |= place(backend, processing->bias_offsets, (count + 1) * sizeof(int64_t),
                        &buffers[EXTRA_BUFFER_BIAS_OFFSETS]);
        failed |= place(backend, processing->bias_tokens,
                        count * BENCH_BIAS_ENTRIES * sizeof(int32_t),
                        &buffers[EXTRA_BUFFER_BIAS_TOKENS]);
        failed |= place(backend, processing->bias_values,
                        count * BENCH_BIAS_ENTRIES * sizeof(float),
                        &buffers[EXTRA_BUFFER_BIAS_VALUES]);
        failed |= place(backend, processing->history_offsets, (count + 1) * sizeof(int64_t),
                        &buffers[EXTRA_BUFFER_HISTORY_OFFSETS]);
        failed |= place(backend, processing->history_tokens,
                        count * BENCH_HISTORY_TOKENS * sizeof(int32_t),
                        &buffers[EXTRA_BUFFER_HISTORY_TOKENS]);
        extras->mask_bias.allowed_mask = buffers[EXTRA_BUFFER_MASK];
        extras->mask_bias.allowed_mask_words = processing->mask_words;
        extras->mask_bias.bias_offsets = buffers[EXTRA_BUFFER_BIAS_OFFSETS];
        extras->mask_bias.bias_tokens = buffers[EXTRA_BUFFER_BIAS_TOKENS];
        extras->mask_bias.bias_values = buffers[EXTRA_BUFFER_BIAS_VALUES];
        extras->penalties.history_offsets = buffers[EXTRA_BUFFER_HISTORY_OFFSETS];
        extras->penalties.history_tokens = buffers[EXTRA_BUFFER_HISTORY_TOKENS];
        extras->penalties.repetition_penalty = BENCH_REPETITION_PENALTY;
        extras->penalties.frequency_penalty = BENCH_FREQUENCY_PENALTY;
        extras->penalties.presence_penalty = BENCH_PRESENCE_PENALTY;
    }
    failed |= place(backend, NULL, count * sizeof(float), &buffers[EXTRA_BUFFER_LOGPROBS]);
    failed |= place(backend, NULL, count * BENCH_TOP_LOGPROBS * sizeof(int32_t),
                    &buffers[EXTRA_BUFFER_TOP_TOKENS]);
    failed |= place(backend, NULL, count * BENCH_TOP_LOGPROBS * sizeof(float),
                    &buffers[EXTRA_BUFFER_TOP_LOGPROBS]);
    failed |= place(backend, NULL, count * sizeof(int32_t), &buffers[EXTRA_BUFFER_RANKS]);
    failed |= place(backend, NULL, count * BENCH_VERIFY_DRAFTS * sizeof(int32_t),
                    &buffers[EXTRA_BUFFER_DRAFT_TOKENS]);
    failed |= place(backend, NULL, count * sizeof(int32_t), &buffers[EXTRA_BUFFER_ACCEPTED]);
    failed |= place(backend, NULL, count * (BENCH_VERIFY_DRAFTS + 1) * sizeof(int32_t),
                    &buffers[EXTRA_BUFFER_EMITTED]);
    {
        psm_memory memory = backend->device ? PSM_MEMORY_DEVICE : PSM_MEMORY_HOST;
        extras->logprobs = (psm_output){buffers[EXTRA_BUFFER_LOGPROBS], memory};
        extras->top.count = BENCH_TOP_LOGPROBS;
        extras->top.mode = PSM_LOGPROBS_PROCESSED;
        extras->top.tokens = (psm_output){buffers[EXTRA_BUFFER_TOP_TOKENS], memory};
        extras->top.logprobs = (psm_output){buffers[EXTRA_BUFFER_TOP_LOGPROBS], memory};
        extras->top.sampled_ranks = (psm_output){buffers[EXTRA_BUFFER_RANKS], memory};
        extras->draft_tokens = (psm_output){buffers[EXTRA_BUFFER_DRAFT_TOKENS], memory};
        extras->accepted = (psm_output){buffers[EXTRA_BUFFER_ACCEPTED], memory};
        extras->emitted = (psm_output){buffers[EXTRA_BUFFER_EMITTED], memory};
    }
    return failed ? -1 : 0;
}

/* The tokens a timed call left in tokens (the backend's memory), copied
 * to host. 0, or -1. */
static int keep_tokens(bench_backend *backend, void *tokens, size_t bytes, int32_t *kept)
{
    if (backend->device)
        return backend->device->download(backend->session, kept, tokens, bytes);
    memcpy(kept, tokens, bytes);
    return 0;
}

/* Runs every case of one (shape, dtype) on one backend. */
void bench_run_backend_cases(const bench_config *config, bench_backend *backend,
                             const void *host_logits, size_t bytes,
                             const bench_processing *processing, bench_result *results,
                             int result_count, bench_sharded_result *sharded, int *progress,
                             int progress_total)
{
    /* Each input is one buffer, or for verify two: the target rows and the
     * draft rows (a cl_mem cannot be offset into). */
    void *inputs[2 * BENCH_MAX_ROTATION];
    size_t part_bytes[2] = {bytes, 0};
    int parts = 1;
    void *extra_buffers[EXTRA_BUFFER_COUNT] = {NULL};
    case_extras extras;
    void *tokens = NULL;
    int input_count = 1;
    int i, p;
    double ceiling_ms = NAN;
    char error[320] = "";
    size_t token_bytes = (size_t)results[0].which.rows * sizeof(int32_t);
    /* With --shards: each case's parameters and tokens, which its sharded
     * runs must draw too. */
    bench_sharded_case *sharded_cases = NULL;
    int32_t *kept_tokens = NULL;

    if (results[0].which.setting == SETTING_VERIFY) {
        parts = 2;
        part_bytes[0] = (size_t)results[0].which.rows * (BENCH_VERIFY_DRAFTS + 1) *
                        (size_t)results[0].which.vocab * cli_dtype_size(results[0].which.dtype);
        part_bytes[1] = bytes - part_bytes[0];
    }
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
        for (i = 0; i < input_count * parts && ok; ++i) {
            p = i % parts;
            ok = backend->device->allocate(backend->session, part_bytes[p], &inputs[i]) == 0 &&
                 backend->device->upload(backend->session, inputs[i],
                                         (const char *)host_logits + (p ? part_bytes[0] : 0),
                                         part_bytes[p]) == 0;
        }
        if (ok)
            ok = backend->device->allocate(backend->session, token_bytes, &tokens) == 0;
        if (!ok)
            snprintf(error, sizeof error, "%s", backend->device->last_error(backend->session));
        else
            for (ceiling_ms = 0.0, p = 0; p < parts && !error[0]; ++p)
                ceiling_ms += device_read_ceiling_ms(backend, inputs[p], part_bytes[p], error,
                                                     sizeof error);
    } else {
        inputs[0] = (void *)host_logits;
        inputs[1] = (char *)host_logits + part_bytes[0];
        tokens = malloc(token_bytes);
        if (!tokens)
            snprintf(error, sizeof error, "out of memory");
        else if (backend->backend == PSM_BACKEND_CPU)
            ceiling_ms = cpu_read_ceiling_ms(host_logits, bytes,
                                             config->threads > 0 ? config->threads
                                                                 : omp_get_max_threads());
    }
    if (!error[0] &&
        place_extras(backend, processing, results[0].which.rows, extra_buffers, &extras) != 0)
        snprintf(error, sizeof error, "%s",
                 backend->device ? backend->device->last_error(backend->session)
                                 : "out of memory");
    if (sharded) {
        sharded_cases = calloc((size_t)result_count, sizeof *sharded_cases);
        kept_tokens = malloc((size_t)result_count * token_bytes);
        if (!sharded_cases || !kept_tokens)
            snprintf(error, sizeof error, "out of memory");
    }

    for (i = 0; i < result_count; ++i) {
        bench_result *result = &results[i];
        const bench_setting *setting = &bench_settings[result->which.setting];
        result->backend = backend;
        result->read_ceiling_ms = ceiling_ms;
        result->host_call_ms = NAN;
        result->speedup_vs_cpu = NAN;
        result->ratio_to_plain = NAN;
        result->filter_order = config->filter_order;
        ++*progress;
        /* The case is named as it starts, so a long one shows what it is. */
        if (config->show_progress)
            fprintf(stderr, "[%d/%d] %s %lld x %lld %s %s %s ... ", *progress, progress_total,
                    psm_backend_name(backend->backend), (long long)result->which.rows,
                    (long long)result->which.vocab,
                    bench_distribution_name(result->which.distribution),
                    cli_dtype_name(result->which.dtype), setting->name);
        if (error[0]) {
            snprintf(result->error, sizeof result->error, "%s", error);
            result->failed = 1;
        } else if (setting->extra == EXTRA_VERIFY) {
            time_verify_case(config, backend, inputs, input_count, &extras, result);
        } else {
            time_case(config, backend, inputs, input_count, tokens, &extras, result);
            if (sharded_cases) {
                int32_t *kept = kept_tokens + (size_t)i * (size_t)result->which.rows;
                sharded_cases[i].params = case_params(config, &result->which, &extras);
                if (!result->failed && !result->unsupported &&
                    keep_tokens(backend, tokens, token_bytes, kept) == 0)
                    sharded_cases[i].expected_tokens = kept;
            }
        }
        if (sharded_cases)
            sharded_cases[i].unsharded = result;
        if (config->show_progress) {
            if (result->unsupported)
                fprintf(stderr, "unsupported: %s\n", result->error);
            else if (result->failed)
                fprintf(stderr, "failed: %s\n", result->error);
            else
                fprintf(stderr, "%.3f ms (%d runs)\n", result->median_ms, result->runs);
        }
    }

    /* The unsharded inputs go before the sharded runs place their shards:
     * a device then holds one set at a time. */
    if (backend->device)
        for (i = 0; i < input_count * parts; ++i)
            backend->device->release(backend->session, inputs[i]);
    if (sharded_cases) {
        bench_run_sharded(config, backend, host_logits, input_count, sharded_cases, result_count,
                          sharded);
    } else if (sharded) {
        for (i = 0; i < result_count * config->sharding_count; ++i) {
            sharded[i].unsharded = &results[i / config->sharding_count];
            sharded[i].shards = config->shard_counts[i % config->sharding_count];
            sharded[i].failed = 1;
            snprintf(sharded[i].error, sizeof sharded[i].error, "out of memory");
        }
    }
    free(sharded_cases);
    free(kept_tokens);

    release_extras(backend, extra_buffers);
    if (backend->device)
        backend->device->release(backend->session, tokens);
    else
        free(tokens);
}

/* The options of a context on the backend's device; with a device helper,
 * on its session's stream or queue (so that its buffers are the context's). */
static psm_context_options context_options(const bench_config *config,
                                           const bench_backend *backend)
{
    psm_context_options options;
    cli_context_options_init(&options);
    options.backend = backend->backend;
    options.device_index = backend->device_index;
    options.cpu_threads = config->threads;
    if (backend->device)
        options.native_stream = backend->device->native_stream(backend->session);
    return options;
}

int bench_open_backend(const char *command, psm_backend backend, int device_index,
                       const bench_config *config, bench_backend *opened)
{
    psm_context_options options;
    psm_status status;
    char error[256] = "";
    memset(opened, 0, sizeof *opened);
    opened->backend = backend;
    opened->device_index = device_index;
    opened->device = bench_device_find(backend);
    if (opened->device &&
        opened->device->open(device_index, &opened->session, error, sizeof error) != 0) {
        cli_error(command, "%s: %s", psm_backend_name(backend), error);
        return -1;
    }
    options = context_options(config, opened);
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

psm_status bench_open_rank_contexts(const bench_config *config, bench_backend *backend,
                                    int count)
{
    while (backend->rank_context_count < count) {
        psm_context_options options = context_options(config, backend);
        psm_status status =
            psm_context_create(&options, &backend->rank_contexts[backend->rank_context_count]);
        if (status != PSM_OK)
            return status;
        ++backend->rank_context_count;
    }
    return PSM_OK;
}

void bench_close_backend(bench_backend *backend)
{
    int rank;
    for (rank = 0; rank < backend->rank_context_count; ++rank)
        psm_context_destroy(backend->rank_contexts[rank]);
    psm_context_destroy(backend->context);
    if (backend->device)
        backend->device->close(backend->session);
}

