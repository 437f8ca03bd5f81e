/*
 * soak.c: polysample_soak, a long run of mixed calls on the CUDA backend,
 * every result checked against the CPU backend.
 *
 *   polysample_soak <minutes> [--seed N] [--max-vocab V] [--device D]
 *
 * Each step picks at random: a shape (1-64 rows, now and then 512; vocab
 * from 1 to --max-vocab, default 256000, padded rows), a dtype, parameters
 * (greedy, temperature, top-k, top-p, min-p, per-row arrays and seeds, 1-4
 * samples), bad rows (NaN, +inf, all -inf), host or device memory for the
 * inputs and outputs, the call (sample with or without logprobs, probs,
 * reserve, an impossible reserve), the context (its own stream, one of three
 * caller streams via native_stream, or checking mode). Calls on different
 * streams are queued together before any is waited for. Tokens must equal
 * the CPU backend's; probabilities and logprobs agree within 1e-6 relative
 * (docs/SAMPLING.md); statuses must be equal (checking mode's BAD_ROW
 * included). Ends with a summary line; exits 1 on any mismatch, 77 when
 * there is no CUDA device. fuzz/gpu-soak.sh runs it (and part of it under
 * compute-sanitizer).
 */
#define _POSIX_C_SOURCE 200809L

#include "half_truncate.h"
#include "polysample.h"

#include <cuda_runtime_api.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define STREAMS 3
#define MAX_ROWS 512
#define MAX_SAMPLES 4
#define RELATIVE 1e-6

static uint64_t rng_state;

static uint64_t next_random(void)
{
    rng_state += 0x9e3779b97f4a7c15u;
    uint64_t z = rng_state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static int64_t below(int64_t bound)
{
    return (int64_t)(next_random() % (uint64_t)bound);
}

static double uniform(void)
{
    return ((double)(next_random() >> 11) + 0.5) * 0x1p-53;
}

static double normal(void)
{
    return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform());
}

static double now_seconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

#define CUDA_OR_DIE(call)                                                                    \
    do {                                                                                     \
        cudaError_t soak_error_ = (call);                                                    \
        if (soak_error_ != cudaSuccess) {                                                    \
            fprintf(stderr, "soak: %s failed: %s\n", #call, cudaGetErrorString(soak_error_)); \
            exit(1);                                                                         \
        }                                                                                    \
    } while (0)

static void *device_copy(const void *host, size_t bytes, cudaStream_t stream)
{
    void *device = NULL;
    CUDA_OR_DIE(cudaMalloc(&device, bytes ? bytes : 1));
    if (host && bytes)
        CUDA_OR_DIE(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, stream));
    return device;
}

/* One call: its inputs, the CPU's results and the CUDA results. */
typedef struct job {
    int kind; /* 0 sample, 1 sample with logprobs, 2 probs */
    int64_t rows, vocab, stride, samples;
    psm_dtype dtype;
    int device_memory;
    int checking;
    int context_index; /* 0: own stream, 1..STREAMS: caller streams, STREAMS + 1: checking */
    void *logits;      /* host */
    psm_params params;
    float *temperature, *top_p, *min_p;
    int32_t *top_k;
    uint64_t *seeds;
    /* device copies */
    void *d_logits, *d_arrays[5], *d_tokens, *d_logprobs, *d_probs;
    /* results */
    int32_t *tokens, *cpu_tokens;
    float *logprobs, *cpu_logprobs, *probs, *cpu_probs;
    psm_status status, cpu_status;
} job;

static const int64_t vocab_choices[] = {1, 2, 7, 100, 1023, 1024, 1025, 4096, 32000, 50257,
                                        128256, 151936, 256000};

static uint16_t to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16); /* finite inputs */
}

static void make_job(job *j, int64_t max_vocab)
{
    memset(j, 0, sizeof *j);
    j->rows = below(10) == 0 ? 1 + below(MAX_ROWS) : 1 + below(64);
    do
        j->vocab = vocab_choices[below(sizeof vocab_choices / sizeof vocab_choices[0])];
    while (j->vocab > max_vocab);
    if (below(4) == 0)
        j->vocab = 1 + below(max_vocab);
    j->stride = j->vocab + (below(4) == 0 ? below(9) : 0);
    j->dtype = (psm_dtype)below(3);
    j->kind = (int)below(3);
    j->device_memory = below(2) == 0;
    j->context_index = (int)below(STREAMS + 2);
    j->checking = j->context_index == STREAMS + 1;

    /* Logits: normal with a row-specific spread, ties, masked entries, and
     * now and then a bad row. */
    size_t count = (size_t)((j->rows - 1) * j->stride + j->vocab);
    size_t element = j->dtype == PSM_DTYPE_F32 ? 4 : 2;
    j->logits = malloc(count * element);
    for (int64_t r = 0; r < j->rows; ++r) {
        double spread = 0.5 + 6.0 * uniform();
        int bad = below(40) == 0 ? (int)(1 + below(3)) : 0;
        for (int64_t i = 0; i < j->stride; ++i) {
            size_t at = (size_t)(r * j->stride + i);
            if (at >= count)
                break;
            float x = (float)(normal() * spread);
            if (below(16) == 0)
                x = (float)(int)(x * 2.0f) / 2.0f; /* ties */
            if (below(50) == 0 || bad == 3)
                x = -INFINITY;
            if (bad == 1 && i == j->vocab / 2)
                x = NAN;
            if (bad == 2 && i == 0)
                x = INFINITY;
            if (i >= j->vocab)
                x = NAN; /* padding: never read */
            if (j->dtype == PSM_DTYPE_F32)
                ((float *)j->logits)[at] = x;
            else if (j->dtype == PSM_DTYPE_BF16)
                ((uint16_t *)j->logits)[at] = isnan(x) ? 0x7fc0u : isinf(x) ? (x > 0 ? 0x7f80u : 0xff80u) : to_bf16(x);
            else
                ((uint16_t *)j->logits)[at] = psm_test_truncate_to_f16(x);
        }
    }

    psm_params_init(&j->params);
    static const float temperatures[] = {1.0f, 0.0f, 0.7f, 1.3f, 0.05f, 1e-5f, 5.0f};
    j->params.temperature = temperatures[below(7)];
    j->params.top_k = below(2) ? 0 : (int32_t)(1 + below(below(2) ? 50 : 5000));
    j->params.top_p = below(2) ? 1.0f : (float)(0.05 + 0.95 * uniform());
    j->params.min_p = below(3) ? 0.0f : (float)(0.2 * uniform());
    j->params.seed = next_random();
    j->params.offset = (uint64_t)below(1000);
    j->samples = 1 + below(MAX_SAMPLES);
    j->params.num_samples = (int32_t)j->samples;
    if (below(4) == 0) {
        j->temperature = malloc((size_t)j->rows * sizeof(float));
        j->top_k = malloc((size_t)j->rows * sizeof(int32_t));
        j->top_p = malloc((size_t)j->rows * sizeof(float));
        j->min_p = malloc((size_t)j->rows * sizeof(float));
        j->seeds = malloc((size_t)j->rows * sizeof(uint64_t));
        for (int64_t r = 0; r < j->rows; ++r) {
            j->temperature[r] = temperatures[below(7)];
            j->top_k[r] = below(2) ? 0 : (int32_t)(1 + below(300));
            j->top_p[r] = below(2) ? 1.0f : (float)(0.05 + 0.95 * uniform());
            j->min_p[r] = below(2) ? 0.0f : (float)(0.2 * uniform());
            j->seeds[r] = next_random();
        }
        int which = (int)below(32);
        j->params.temperature_per_row = which & 1 ? j->temperature : NULL;
        j->params.top_k_per_row = which & 2 ? j->top_k : NULL;
        j->params.top_p_per_row = which & 4 ? j->top_p : NULL;
        j->params.min_p_per_row = which & 8 ? j->min_p : NULL;
        j->params.seed_per_row = which & 16 ? j->seeds : NULL;
    }
    size_t outputs = (size_t)(j->rows * j->samples), probs = (size_t)(j->rows * j->vocab);
    j->tokens = malloc(outputs * sizeof(int32_t));
    j->cpu_tokens = malloc(outputs * sizeof(int32_t));
    j->logprobs = malloc(outputs * sizeof(float));
    j->cpu_logprobs = malloc(outputs * sizeof(float));
    j->probs = j->kind == 2 ? malloc(probs * sizeof(float)) : NULL;
    j->cpu_probs = j->kind == 2 ? malloc(probs * sizeof(float)) : NULL;
}

static void free_job(job *j)
{
    void *host[] = {j->logits, j->temperature, j->top_p, j->min_p, j->top_k, j->seeds,
                    j->tokens, j->cpu_tokens, j->logprobs, j->cpu_logprobs, j->probs,
                    j->cpu_probs};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; ++i)
        free(host[i]);
    void *device[] = {j->d_logits, j->d_arrays[0], j->d_arrays[1], j->d_arrays[2],
                      j->d_arrays[3], j->d_arrays[4], j->d_tokens, j->d_logprobs, j->d_probs};
    for (size_t i = 0; i < sizeof device / sizeof device[0]; ++i)
        if (device[i])
            CUDA_OR_DIE(cudaFree(device[i]));
}

/* Runs a job on a context; device memory is copied in on `stream` first. */
static psm_status submit(psm_context *context, job *j, int on_device, cudaStream_t stream,
                         int32_t *tokens, float *logprobs, float *probs)
{
    size_t element = j->dtype == PSM_DTYPE_F32 ? 4 : 2;
    size_t count = (size_t)((j->rows - 1) * j->stride + j->vocab);
    psm_params params = j->params;
    psm_tensor logits = {j->logits, j->dtype, PSM_MEMORY_HOST, j->rows, j->vocab, j->stride};
    psm_output token_out = {tokens, PSM_MEMORY_HOST};
    psm_output logprob_out = {j->kind == 1 ? logprobs : NULL, PSM_MEMORY_HOST};
    psm_tensor probs_tensor = {probs, PSM_DTYPE_F32, PSM_MEMORY_HOST, j->rows, j->vocab, 0};
    if (on_device) {
        size_t rows = (size_t)j->rows;
        j->d_logits = device_copy(j->logits, count * element, stream);
        const void *arrays[5] = {params.temperature_per_row, params.top_k_per_row,
                                 params.top_p_per_row, params.min_p_per_row, params.seed_per_row};
        const size_t sizes[5] = {4, 4, 4, 4, 8};
        for (int a = 0; a < 5; ++a)
            if (arrays[a])
                j->d_arrays[a] = device_copy(arrays[a], rows * sizes[a], stream);
        params.temperature_per_row = j->d_arrays[0];
        params.top_k_per_row = j->d_arrays[1];
        params.top_p_per_row = j->d_arrays[2];
        params.min_p_per_row = j->d_arrays[3];
        params.seed_per_row = j->d_arrays[4];
        logits.data = j->d_logits;
        logits.memory = PSM_MEMORY_DEVICE;
        size_t outputs = rows * (size_t)j->samples;
        j->d_tokens = device_copy(NULL, outputs * sizeof(int32_t), stream);
        j->d_logprobs = device_copy(NULL, outputs * sizeof(float), stream);
        j->d_probs = device_copy(NULL, rows * (size_t)j->vocab * sizeof(float), stream);
        token_out = (psm_output){j->d_tokens, PSM_MEMORY_DEVICE};
        logprob_out = (psm_output){j->kind == 1 ? j->d_logprobs : NULL, PSM_MEMORY_DEVICE};
        probs_tensor.data = j->d_probs;
        probs_tensor.memory = PSM_MEMORY_DEVICE;
        /* A context with its own (non-blocking) stream is not ordered after
         * copies on the default stream: they must be done first. On a
         * caller's stream they are ordered before the call. */
        if (!stream)
            CUDA_OR_DIE(cudaDeviceSynchronize());
    }
    if (j->kind == 2)
        return psm_probs(context, &logits, &params, &probs_tensor);
    return psm_sample(context, &logits, &params, token_out, logprob_out);
}

static void fetch(job *j, cudaStream_t stream)
{
    if (!j->device_memory || j->status != PSM_OK)
        return;
    size_t outputs = (size_t)(j->rows * j->samples);
    CUDA_OR_DIE(cudaMemcpyAsync(j->tokens, j->d_tokens, outputs * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream));
    CUDA_OR_DIE(cudaMemcpyAsync(j->logprobs, j->d_logprobs, outputs * sizeof(float),
                                cudaMemcpyDeviceToHost, stream));
    if (j->probs)
        CUDA_OR_DIE(cudaMemcpyAsync(j->probs, j->d_probs,
                                    (size_t)(j->rows * j->vocab) * sizeof(float),
                                    cudaMemcpyDeviceToHost, stream));
}

static int close_enough(float a, float b, double relative)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs((double)a - (double)b) <= relative * fmax(fabs((double)a), fabs((double)b)) + 1e-30;
}

static long mismatches;

static void compare(const job *j, long step)
{
    const char *names[] = {"sample", "sample+logprobs", "probs"};
    if (j->status != j->cpu_status) {
        fprintf(stderr, "soak step %ld (%s, %lld x %lld, dtype %d, %s memory): cuda %s, cpu %s: %s\n",
                step, names[j->kind], (long long)j->rows, (long long)j->vocab, (int)j->dtype,
                j->device_memory ? "device" : "host", psm_status_string(j->status),
                psm_status_string(j->cpu_status), psm_last_error());
        ++mismatches;
        return;
    }
    if (j->status != PSM_OK)
        return;
    int64_t outputs = j->rows * j->samples;
    if (j->kind < 2) {
        for (int64_t i = 0; i < outputs; ++i) {
            if (j->tokens[i] != j->cpu_tokens[i] ||
                (j->kind == 1 && !close_enough(j->logprobs[i], j->cpu_logprobs[i], 1e-5))) {
                fprintf(stderr, "soak step %ld (%s, %lld x %lld, dtype %d, %s memory): row %lld "
                        "sample %lld: cuda %d (%g), cpu %d (%g)\n",
                        step, names[j->kind], (long long)j->rows, (long long)j->vocab,
                        (int)j->dtype, j->device_memory ? "device" : "host",
                        (long long)(i / j->samples), (long long)(i % j->samples), j->tokens[i],
                        (double)j->logprobs[i], j->cpu_tokens[i], (double)j->cpu_logprobs[i]);
                ++mismatches;
                return;
            }
        }
        return;
    }
    for (int64_t i = 0; i < j->rows * j->vocab; ++i) {
        if (!close_enough(j->probs[i], j->cpu_probs[i], RELATIVE)) {
            fprintf(stderr, "soak step %ld (probs, %lld x %lld, dtype %d, %s memory): row %lld "
                    "token %lld: cuda %.9g, cpu %.9g\n",
                    step, (long long)j->rows, (long long)j->vocab, (int)j->dtype,
                    j->device_memory ? "device" : "host", (long long)(i / j->vocab),
                    (long long)(i % j->vocab), (double)j->probs[i], (double)j->cpu_probs[i]);
            ++mismatches;
            return;
        }
    }
}

static psm_context *open_context(psm_backend backend, int device, void *stream, int checking)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.device_index = device;
    options.native_stream = stream;
    options.check_rows = checking;
    psm_context *context = NULL;
    psm_status status = psm_context_create(&options, &context);
    if (status != PSM_OK) {
        fprintf(stderr, "soak: cannot create a %s context: %s\n", psm_backend_name(backend),
                psm_last_error());
        exit(status == PSM_ERR_NO_DEVICE || status == PSM_ERR_BACKEND_NOT_COMPILED ? 77 : 1);
    }
    return context;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s <minutes> [--seed N] [--max-vocab V] [--device D]\n", argv[0]);
        return 2;
    }
    double minutes = atof(argv[1]);
    uint64_t seed = 2024;
    int64_t max_vocab = 256000;
    int device = 0;
    for (int a = 2; a + 1 < argc; a += 2) {
        if (strcmp(argv[a], "--seed") == 0)
            seed = strtoull(argv[a + 1], NULL, 0);
        else if (strcmp(argv[a], "--max-vocab") == 0)
            max_vocab = strtoll(argv[a + 1], NULL, 0);
        else if (strcmp(argv[a], "--device") == 0)
            device = atoi(argv[a + 1]);
        else {
            fprintf(stderr, "soak: unknown option %s\n", argv[a]);
            return 2;
        }
    }
    if (!(minutes > 0.0) || max_vocab < 1) {
        fprintf(stderr, "soak: minutes must be > 0 and --max-vocab >= 1\n");
        return 2;
    }
    rng_state = seed;
    if (!psm_backend_available(PSM_BACKEND_CUDA, NULL)) {
        const char *why = NULL;
        psm_backend_available(PSM_BACKEND_CUDA, &why);
        printf("soak: SKIP: the CUDA backend is not available: %s\n", why ? why : "");
        return 77;
    }
    CUDA_OR_DIE(cudaSetDevice(device));
    cudaStream_t streams[STREAMS + 2] = {0};
    for (int s = 1; s <= STREAMS; ++s)
        CUDA_OR_DIE(cudaStreamCreateWithFlags(&streams[s], cudaStreamNonBlocking));
    psm_context *cuda[STREAMS + 2], *cpu = open_context(PSM_BACKEND_CPU, -1, NULL, 0);
    psm_context *cpu_checking = open_context(PSM_BACKEND_CPU, -1, NULL, 1);
    cuda[0] = open_context(PSM_BACKEND_CUDA, device, NULL, 0);
    for (int s = 1; s <= STREAMS; ++s)
        cuda[s] = open_context(PSM_BACKEND_CUDA, device, streams[s], 0);
    cuda[STREAMS + 1] = open_context(PSM_BACKEND_CUDA, device, NULL, 1);

    long calls[3] = {0, 0, 0}, reserves = 0, impossible = 0, device_calls = 0, bad_row_calls = 0,
         steps = 0;
    double start = now_seconds(), deadline = start + minutes * 60.0;
    while (now_seconds() < deadline) {
        ++steps;
        int action = (int)below(20);
        if (action == 0) {
            /* An impossible shape: OUT_OF_MEMORY, and the context goes on. */
            psm_context *context = cuda[below(STREAMS + 2)];
            psm_status status = psm_context_reserve(context, (int64_t)1 << 28, INT32_MAX, 1);
            ++impossible;
            if (status != PSM_ERR_OUT_OF_MEMORY) {
                fprintf(stderr, "soak step %ld: impossible reserve gave %s: %s\n", steps,
                        psm_status_string(status), psm_last_error());
                ++mismatches;
            }
            continue;
        }
        if (action == 1) {
            psm_context *context = cuda[below(STREAMS + 2)];
            psm_status status = psm_context_reserve(context, 1 + below(MAX_ROWS),
                                                    1 + below(max_vocab), 1 + below(MAX_SAMPLES));
            ++reserves;
            if (status != PSM_OK) {
                fprintf(stderr, "soak step %ld: reserve failed: %s\n", steps, psm_last_error());
                ++mismatches;
            }
            continue;
        }
        /* One to three jobs, on distinct contexts, queued before any wait. */
        job jobs[3];
        int count = 1 + (int)below(3);
        int used[STREAMS + 2] = {0};
        for (int k = 0; k < count; ++k) {
            make_job(&jobs[k], max_vocab);
            while (used[jobs[k].context_index])
                jobs[k].context_index = (jobs[k].context_index + 1) % (STREAMS + 2);
            used[jobs[k].context_index] = 1;
            jobs[k].checking = jobs[k].context_index == STREAMS + 1;
            cudaStream_t stream = streams[jobs[k].context_index];
            jobs[k].status = submit(cuda[jobs[k].context_index], &jobs[k], jobs[k].device_memory,
                                    stream, jobs[k].tokens, jobs[k].logprobs, jobs[k].probs);
            if (jobs[k].status != PSM_OK && jobs[k].status != PSM_ERR_BAD_ROW)
                fprintf(stderr, "soak step %ld: %s\n", steps, psm_last_error());
        }
        for (int k = 0; k < count; ++k) {
            job *j = &jobs[k];
            cudaStream_t stream = streams[j->context_index];
            psm_status sync = psm_synchronize(cuda[j->context_index]);
            if (sync != PSM_OK) {
                fprintf(stderr, "soak step %ld: psm_synchronize: %s\n", steps, psm_last_error());
                ++mismatches;
            }
            fetch(j, stream);
            CUDA_OR_DIE(stream ? cudaStreamSynchronize(stream) : cudaDeviceSynchronize());
            j->cpu_status = submit(j->checking ? cpu_checking : cpu, j, 0, NULL, j->cpu_tokens,
                                   j->cpu_logprobs, j->cpu_probs);
            compare(j, steps);
            calls[j->kind] += 1;
            device_calls += j->device_memory;
            bad_row_calls += j->cpu_status == PSM_ERR_BAD_ROW;
            free_job(j);
        }
        if (mismatches > 20)
            break;
    }
    double elapsed = now_seconds() - start;
    for (int s = 0; s < STREAMS + 2; ++s)
        psm_context_destroy(cuda[s]);
    psm_context_destroy(cpu);
    psm_context_destroy(cpu_checking);
    for (int s = 1; s <= STREAMS; ++s)
        CUDA_OR_DIE(cudaStreamDestroy(streams[s]));
    printf("soak summary: %.1f min, seed %llu, max vocab %lld: %ld sample, %ld sample+logprobs, "
           "%ld probs calls (%ld with device memory, %ld refused for a bad row in checking "
           "mode), %ld reserves, %ld impossible reserves; %ld mismatches\n",
           elapsed / 60.0, (unsigned long long)seed, (long long)max_vocab, calls[0], calls[1],
           calls[2], device_calls, bad_row_calls, reserves, impossible, mismatches);
    return mismatches ? 1 : 0;
}
