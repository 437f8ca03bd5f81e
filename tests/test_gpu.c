/*
 * test_gpu.c: what only the GPU backends have: device pointers (logits,
 * per-row parameters, outputs), the caller's stream, graph capture and
 * replay, checking mode on device memory, and rows whose offsets pass 2^32
 * elements. Every GPU result is compared with the CPU backend on the same
 * inputs: tokens bit for bit, logprobs and probabilities to float rounding.
 *
 * Built twice: as test_cuda (CUDA runtime) and, with PSM_TEST_GPU_HIP=1, as
 * test_hip (HIP runtime); GPU(Name) is cudaName or hipName. The tests need a
 * device of that runtime; without one each is reported as a skip. The CPU
 * backend (always compiled in) is the reference whatever
 * POLYSAMPLE_TEST_BACKENDS selects; only the GPU backend's selection is
 * honoured.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if PSM_TEST_GPU_HIP
#include <hip/hip_runtime_api.h>
#define GPU(name) hip##name
#define GPU_BACKEND PSM_BACKEND_HIP
#define GPU_NAME "hip"
#define GPU_GRAPH_INSTANTIATE(exec, graph) hipGraphInstantiate((exec), (graph), NULL, NULL, 0)
#else
#include <cuda_runtime_api.h>
#define GPU(name) cuda##name
#define GPU_BACKEND PSM_BACKEND_CUDA
#define GPU_NAME "cuda"
#define GPU_GRAPH_INSTANTIATE(exec, graph) cudaGraphInstantiate((exec), (graph), 0)
#endif

#define GPU_OK(call)                                                                        \
    do {                                                                                    \
        GPU(Error_t) gpu_ok_error_ = (call);                                                \
        ck_assert_msg(gpu_ok_error_ == GPU(Success), "%s failed: %s", #call,                \
                      GPU(GetErrorString)(gpu_ok_error_));                                  \
    } while (0)

/* Relative agreement of logprobs and probabilities across backends: both are
 * floats computed from the same exact integers (docs/SAMPLING.md). */
#define FLOAT_AGREEMENT 4e-6

static size_t element_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

/* ---- inputs ------------------------------------------------------------- */

/* Logits of one dtype, rows x row_stride, with some structure: a normal body,
 * a few masked (-inf) tokens, and ties (16-bit dtypes have many). The padding
 * between vocab and row_stride holds NaN, which must never be read. */
typedef struct logit_matrix {
    psm_dtype dtype;
    int64_t rows, vocab, row_stride;
    void *data;
} logit_matrix;

static void put_logit(logit_matrix *m, int64_t index, float value)
{
    if (m->dtype == PSM_DTYPE_F32) {
        ((float *)m->data)[index] = value;
    } else if (m->dtype == PSM_DTYPE_BF16) {
        uint32_t bits;
        memcpy(&bits, &value, sizeof bits);
        /* Truncation gives an exact bf16 (NaN keeps a quiet payload). */
        ((uint16_t *)m->data)[index] = isnan(value) ? (uint16_t)0x7fc0u : (uint16_t)(bits >> 16);
    } else {
        uint16_t bits;
        if (isnan(value))
            bits = 0x7e00u;
        else if (isinf(value))
            bits = value > 0 ? 0x7c00u : 0xfc00u;
        else
            bits = psm_test_f16_exact(value);
        ((uint16_t *)m->data)[index] = bits;
    }
}

static logit_matrix make_logits(psm_dtype dtype, int64_t rows, int64_t vocab, int64_t row_stride,
                                double sigma, uint64_t seed)
{
    logit_matrix m = {dtype, rows, vocab, row_stride, NULL};
    m.data = psm_test_alloc((size_t)(rows * row_stride), element_size(dtype));
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < row_stride; ++i) {
            float value;
            if (i >= vocab) {
                value = NAN;
            } else if (psm_test_rng_below(&rng, 97) == 0) {
                value = -INFINITY;
            } else if (dtype == PSM_DTYPE_F16) {
                /* k / 256 with |k| < 2048: exact in f16, and ties are common. */
                double scaled = sigma * psm_test_rng_normal(&rng) * 256.0;
                if (scaled > 2047.0)
                    scaled = 2047.0;
                if (scaled < -2047.0)
                    scaled = -2047.0;
                value = (float)(floor(scaled) / 256.0);
            } else {
                value = (float)(sigma * psm_test_rng_normal(&rng));
            }
            put_logit(&m, r * row_stride + i, value);
        }
    return m;
}

static void *to_device(const void *host, size_t bytes)
{
    void *device = NULL;
    GPU_OK(GPU(Malloc)(&device, bytes ? bytes : 1));
    if (bytes)
        GPU_OK(GPU(Memcpy)(device, host, bytes, GPU(MemcpyHostToDevice)));
    /* A copy from pageable memory may return before its DMA lands, and the
     * library's non-blocking stream does not wait for the default stream. */
    GPU_OK(GPU(DeviceSynchronize)());
    return device;
}

static psm_tensor tensor_of(const logit_matrix *m, void *data, psm_memory memory)
{
    psm_tensor t = psm_test_tensor(data, m->dtype, m->rows, m->vocab, m->row_stride);
    t.memory = memory;
    return t;
}

static psm_context *open_gpu(void *stream)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = GPU_BACKEND;
    options.native_stream = stream;
    return psm_test_open_with(&options);
}

/* ---- comparison --------------------------------------------------------- */

static void expect_same_draws(const char *what, int64_t count, const int32_t *cpu_tokens,
                              const int32_t *gpu_tokens, const float *cpu_logprobs,
                              const float *gpu_logprobs)
{
    for (int64_t j = 0; j < count; ++j) {
        ck_assert_msg(cpu_tokens[j] == gpu_tokens[j], "%s: draw %lld: cpu token %d, " GPU_NAME " %d",
                      what, (long long)j, cpu_tokens[j], gpu_tokens[j]);
        if (!cpu_logprobs)
            continue;
        const float a = cpu_logprobs[j], b = gpu_logprobs[j];
        if (isnan(a) || isnan(b)) {
            ck_assert_msg(isnan(a) && isnan(b), "%s: draw %lld: logprob cpu %g " GPU_NAME " %g", what,
                          (long long)j, (double)a, (double)b);
            continue;
        }
        /* logprob = log(p): an absolute error of log's argument's relative one */
        ck_assert_msg(fabs((double)a - (double)b) <= FLOAT_AGREEMENT * (1.0 + fabs((double)a)),
                      "%s: draw %lld: logprob cpu %.9g " GPU_NAME " %.9g", what, (long long)j,
                      (double)a, (double)b);
    }
}

/* Samples the matrix on the CPU (host memory) and on the GPU (device memory,
 * outputs in device memory too) and compares. */
static void compare_sample(const char *what, const logit_matrix *m, const psm_params *params)
{
    const int64_t draws = m->rows * params->num_samples;
    const size_t logit_bytes = (size_t)(m->rows * m->row_stride) * element_size(m->dtype);
    int32_t *cpu_tokens = psm_test_alloc((size_t)draws, sizeof *cpu_tokens);
    float *cpu_logprobs = psm_test_alloc((size_t)draws, sizeof *cpu_logprobs);
    int32_t *gpu_tokens = psm_test_alloc((size_t)draws, sizeof *gpu_tokens);
    float *gpu_logprobs = psm_test_alloc((size_t)draws, sizeof *gpu_logprobs);

    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    psm_tensor host_tensor = tensor_of(m, m->data, PSM_MEMORY_HOST);
    PSM_CHECK_OK(psm_sample(cpu, &host_tensor, params, psm_test_output(cpu_tokens),
                            psm_test_output(cpu_logprobs)));
    psm_context_destroy(cpu);

    psm_context *gpu = open_gpu(NULL);
    void *device_logits = to_device(m->data, logit_bytes);
    void *device_tokens = NULL, *device_logprobs = NULL;
    GPU_OK(GPU(Malloc)(&device_tokens, (size_t)draws * sizeof(int32_t)));
    GPU_OK(GPU(Malloc)(&device_logprobs, (size_t)draws * sizeof(float)));
    GPU_OK(GPU(Memset)(device_tokens, 0x5a, (size_t)draws * sizeof(int32_t)));
    GPU_OK(GPU(DeviceSynchronize)()); /* the poison lands before the library's stream runs */
    psm_tensor device_tensor = tensor_of(m, device_logits, PSM_MEMORY_DEVICE);
    psm_output tokens_out = {device_tokens, PSM_MEMORY_DEVICE};
    psm_output logprobs_out = {device_logprobs, PSM_MEMORY_DEVICE};
    PSM_CHECK_OK(psm_sample(gpu, &device_tensor, params, tokens_out, logprobs_out));
    PSM_CHECK_OK(psm_synchronize(gpu));
    GPU_OK(GPU(Memcpy)(gpu_tokens, device_tokens, (size_t)draws * sizeof(int32_t),
                       GPU(MemcpyDeviceToHost)));
    GPU_OK(GPU(Memcpy)(gpu_logprobs, device_logprobs, (size_t)draws * sizeof(float),
                       GPU(MemcpyDeviceToHost)));
    expect_same_draws(what, draws, cpu_tokens, gpu_tokens, cpu_logprobs, gpu_logprobs);

    /* The same call with host logits and host outputs (staged by the backend). */
    memset(gpu_tokens, 0x5a, (size_t)draws * sizeof *gpu_tokens);
    PSM_CHECK_OK(psm_sample(gpu, &host_tensor, params, psm_test_output(gpu_tokens),
                            psm_test_output(NULL)));
    expect_same_draws(what, draws, cpu_tokens, gpu_tokens, NULL, NULL);

    GPU_OK(GPU(Free)(device_logprobs));
    GPU_OK(GPU(Free)(device_tokens));
    GPU_OK(GPU(Free)(device_logits));
    psm_context_destroy(gpu);
    free(gpu_logprobs);
    free(gpu_tokens);
    free(cpu_logprobs);
    free(cpu_tokens);
}

/* psm_probs on both backends; the GPU writes device memory with its own stride. */
static void compare_probs(const char *what, const logit_matrix *m, const psm_params *params)
{
    const int64_t probs_stride = m->vocab + 3;
    const size_t count = (size_t)(m->rows * probs_stride);
    float *cpu_probs = psm_test_alloc(count, sizeof *cpu_probs);
    float *gpu_probs = psm_test_alloc(count, sizeof *gpu_probs);

    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    psm_tensor host_tensor = tensor_of(m, m->data, PSM_MEMORY_HOST);
    psm_tensor cpu_out = psm_test_tensor(cpu_probs, PSM_DTYPE_F32, m->rows, m->vocab, probs_stride);
    PSM_CHECK_OK(psm_probs(cpu, &host_tensor, params, &cpu_out));
    psm_context_destroy(cpu);

    psm_context *gpu = open_gpu(NULL);
    const size_t logit_bytes = (size_t)(m->rows * m->row_stride) * element_size(m->dtype);
    void *device_logits = to_device(m->data, logit_bytes);
    void *device_probs = NULL;
    GPU_OK(GPU(Malloc)(&device_probs, count * sizeof(float)));
    psm_tensor device_tensor = tensor_of(m, device_logits, PSM_MEMORY_DEVICE);
    psm_tensor gpu_out = psm_test_tensor(device_probs, PSM_DTYPE_F32, m->rows, m->vocab, probs_stride);
    gpu_out.memory = PSM_MEMORY_DEVICE;
    PSM_CHECK_OK(psm_probs(gpu, &device_tensor, params, &gpu_out));
    PSM_CHECK_OK(psm_synchronize(gpu));
    GPU_OK(GPU(Memcpy)(gpu_probs, device_probs, count * sizeof(float), GPU(MemcpyDeviceToHost)));

    for (int64_t r = 0; r < m->rows; ++r) {
        double gpu_sum = 0.0;
        for (int64_t i = 0; i < m->vocab; ++i) {
            const float a = cpu_probs[r * probs_stride + i], b = gpu_probs[r * probs_stride + i];
            if (isnan(a) || isnan(b)) {
                ck_assert_msg(isnan(a) && isnan(b), "%s: row %lld token %lld: cpu %g " GPU_NAME " %g",
                              what, (long long)r, (long long)i, (double)a, (double)b);
                continue;
            }
            ck_assert_msg((a == 0.0f) == (b == 0.0f) &&
                              fabs((double)a - (double)b) <= FLOAT_AGREEMENT * fabs((double)a),
                          "%s: row %lld token %lld: cpu %.9g " GPU_NAME " %.9g", what, (long long)r,
                          (long long)i, (double)a, (double)b);
            gpu_sum += b;
        }
        if (!isnan(gpu_probs[r * probs_stride]))
            ck_assert_msg(fabs(gpu_sum - 1.0) < 1e-4, "%s: row %lld sums to %.9g", what,
                          (long long)r, gpu_sum);
    }
    GPU_OK(GPU(Free)(device_probs));
    GPU_OK(GPU(Free)(device_logits));
    psm_context_destroy(gpu);
    free(gpu_probs);
    free(cpu_probs);
}

/* ---- the parameter sets every shape is tried with ----------------------- */

typedef struct named_params {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
} named_params;

static const named_params parameter_sets[] = {
    {"plain", 1.0f, 0, 1.0f, 0.0f},
    {"hot", 2.5f, 0, 1.0f, 0.0f},
    {"greedy", 0.0f, 0, 1.0f, 0.0f},
    {"top-k 50", 0.8f, 50, 1.0f, 0.0f},
    {"top-k 1", 1.0f, 1, 1.0f, 0.0f},
    {"top-p 0.9", 1.0f, 0, 0.9f, 0.0f},
    {"top-p tiny", 1.0f, 0, 1e-6f, 0.0f},
    {"min-p 0.05", 0.7f, 0, 1.0f, 0.05f},
    {"top-k 50 + top-p 0.9", 1.0f, 50, 0.9f, 0.0f},
    {"all filters", 1.3f, 200, 0.8f, 0.02f},
};
#define PARAMETER_SET_COUNT (sizeof parameter_sets / sizeof parameter_sets[0])

static psm_params params_of(const named_params *set, int32_t samples, uint64_t seed)
{
    psm_params p;
    psm_params_init(&p);
    p.temperature = set->temperature;
    p.top_k = set->top_k;
    p.top_p = set->top_p;
    p.min_p = set->min_p;
    p.num_samples = samples;
    p.seed = seed;
    p.offset = 7;
    return p;
}

typedef struct shape {
    int64_t rows, vocab, row_stride;
    int quick; /* also run under POLYSAMPLE_TEST_QUICK (sanitizers) */
} shape;

/* One partial tile; an aligned multi-tile row; an odd stride (no 16-byte
 * loads); a row that fits in shared memory (32000); rows that do not (the
 * global-memory path); a large batch. Batches of at most half the filtered
 * row kernel's resident blocks with 8 tiles or more per row run filtered
 * rows split over several blocks (24576 with an odd stride: also under the
 * sanitizers; 200 rows: more rows than an H100 or H200 has multiprocessors). */
static const shape shapes[] = {
    {3, 1000, 1000, 1},     {5, 4096, 4101, 1},     {2, 24576, 24579, 1},  {2, 32000, 32000, 0},
    {1, 151936, 151936, 0}, {4, 100003, 100008, 0}, {600, 2000, 2000, 0},    {200, 16384, 16387, 0},
};
#define SHAPE_COUNT (sizeof shapes / sizeof shapes[0])

static const psm_dtype dtypes[] = {PSM_DTYPE_F32, PSM_DTYPE_F16, PSM_DTYPE_BF16};
static const char *const dtype_names[] = {"f32", "f16", "bf16"};

START_TEST(gpu_matches_cpu_on_device_memory)
{
    for (size_t s = 0; s < SHAPE_COUNT; ++s) {
        if (psm_test_quick() && !shapes[s].quick)
            continue;
        for (size_t d = 0; d < 3; ++d) {
            logit_matrix m = make_logits(dtypes[d], shapes[s].rows, shapes[s].vocab,
                                         shapes[s].row_stride, 2.0, 100 + s * 3 + d);
            for (size_t p = 0; p < PARAMETER_SET_COUNT; ++p) {
                char what[160];
                snprintf(what, sizeof what, "%s %lldx%lld (stride %lld), %s", dtype_names[d],
                         (long long)m.rows, (long long)m.vocab, (long long)m.row_stride,
                         parameter_sets[p].name);
                psm_params params = params_of(&parameter_sets[p], p % 2 ? 3 : 1, 42 + p);
                compare_sample(what, &m, &params);
            }
            free(m.data);
        }
    }
}
END_TEST

START_TEST(gpu_probs_match_cpu)
{
    const int64_t vocabs[] = {1000, 40000, 70001};
    for (size_t v = 0; v < 3; ++v) {
        if (psm_test_quick() && v > 0)
            continue;
        for (size_t d = 0; d < 3; ++d) {
            logit_matrix m = make_logits(dtypes[d], 3, vocabs[v], vocabs[v], 1.5, 900 + v * 3 + d);
            for (size_t p = 0; p < PARAMETER_SET_COUNT; ++p) {
                char what[160];
                snprintf(what, sizeof what, "probs %s vocab %lld, %s", dtype_names[d],
                         (long long)vocabs[v], parameter_sets[p].name);
                psm_params params = params_of(&parameter_sets[p], 1, 0);
                compare_probs(what, &m, &params);
            }
            free(m.data);
        }
    }
}
END_TEST

/* Bad rows (NaN, +inf, all masked) get token -1 and NaN logprobs, and leave
 * the other rows of the batch alone. */
START_TEST(gpu_bad_rows_match_cpu)
{
    logit_matrix m = make_logits(PSM_DTYPE_F32, 6, 3000, 3000, 2.0, 5);
    float *data = m.data;
    data[1 * 3000 + 17] = NAN;
    data[3 * 3000 + 2999] = INFINITY;
    for (int64_t i = 0; i < 3000; ++i)
        data[4 * 3000 + i] = -INFINITY;
    for (size_t p = 0; p < PARAMETER_SET_COUNT; ++p) {
        psm_params params = params_of(&parameter_sets[p], 4, 11);
        char what[160];
        snprintf(what, sizeof what, "bad rows, %s", parameter_sets[p].name);
        compare_sample(what, &m, &params);
    }
    free(m.data);
}
END_TEST

/* Per-row parameters and seeds in device memory; a value out of range in a
 * device array gives its row token -1 (it cannot be checked on the host). */
START_TEST(gpu_per_row_device_parameters)
{
    const int64_t rows = 64, vocab = 20000;
    const int32_t samples = 5;
    logit_matrix m = make_logits(PSM_DTYPE_BF16, rows, vocab, vocab, 2.5, 77);
    float temperatures[64], top_ps[64], min_ps[64];
    int32_t top_ks[64];
    uint64_t seeds[64];
    psm_test_rng rng = psm_test_rng_make(3);
    for (int r = 0; r < rows; ++r) {
        temperatures[r] = r % 9 == 0 ? 0.0f : (float)(0.3 + psm_test_rng_uniform(&rng) * 1.5);
        top_ks[r] = r % 4 == 0 ? 0 : (int32_t)psm_test_rng_below(&rng, 300);
        top_ps[r] = r % 3 == 0 ? 1.0f : (float)(0.5 + 0.5 * psm_test_rng_uniform(&rng));
        min_ps[r] = r % 5 == 0 ? (float)(0.1 * psm_test_rng_uniform(&rng)) : 0.0f;
        seeds[r] = psm_test_rng_next(&rng);
    }
    psm_params params;
    psm_params_init(&params);
    params.num_samples = samples;
    params.temperature_per_row = temperatures;
    params.top_k_per_row = top_ks;
    params.top_p_per_row = top_ps;
    params.min_p_per_row = min_ps;
    params.seed_per_row = seeds;

    int32_t cpu_tokens[64 * 5], gpu_tokens[64 * 5];
    float cpu_logprobs[64 * 5], gpu_logprobs[64 * 5];
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    psm_tensor host_tensor = tensor_of(&m, m.data, PSM_MEMORY_HOST);
    PSM_CHECK_OK(psm_sample(cpu, &host_tensor, &params, psm_test_output(cpu_tokens),
                            psm_test_output(cpu_logprobs)));
    psm_context_destroy(cpu);

    /* Row 10 gets an out-of-range top-p in the device copy only. */
    const int bad_row = 10;
    float device_top_ps_host[64];
    memcpy(device_top_ps_host, top_ps, sizeof top_ps);
    device_top_ps_host[bad_row] = 1.5f;

    psm_context *gpu = open_gpu(NULL);
    void *device_logits = to_device(m.data, (size_t)(rows * vocab) * 2);
    psm_params device_params = params;
    device_params.temperature_per_row = to_device(temperatures, sizeof temperatures);
    device_params.top_k_per_row = to_device(top_ks, sizeof top_ks);
    device_params.top_p_per_row = to_device(device_top_ps_host, sizeof device_top_ps_host);
    device_params.min_p_per_row = to_device(min_ps, sizeof min_ps);
    device_params.seed_per_row = to_device(seeds, sizeof seeds);
    void *device_tokens = NULL, *device_logprobs = NULL;
    GPU_OK(GPU(Malloc)(&device_tokens, sizeof gpu_tokens));
    GPU_OK(GPU(Malloc)(&device_logprobs, sizeof gpu_logprobs));
    psm_tensor device_tensor = tensor_of(&m, device_logits, PSM_MEMORY_DEVICE);
    psm_output tokens_out = {device_tokens, PSM_MEMORY_DEVICE};
    psm_output logprobs_out = {device_logprobs, PSM_MEMORY_DEVICE};
    PSM_CHECK_OK(psm_sample(gpu, &device_tensor, &device_params, tokens_out, logprobs_out));
    /* The context's stream does not order with the copies below (they run on
     * the default stream): wait for the call first. */
    PSM_CHECK_OK(psm_synchronize(gpu));
    GPU_OK(GPU(Memcpy)(gpu_tokens, device_tokens, sizeof gpu_tokens, GPU(MemcpyDeviceToHost)));
    GPU_OK(GPU(Memcpy)(gpu_logprobs, device_logprobs, sizeof gpu_logprobs,
                       GPU(MemcpyDeviceToHost)));
    for (int r = 0; r < rows; ++r) {
        char what[64];
        snprintf(what, sizeof what, "per-row parameters, row %d", r);
        if (r == bad_row) {
            for (int j = 0; j < samples; ++j) {
                ck_assert_int_eq(gpu_tokens[r * samples + j], -1);
                ck_assert(isnan(gpu_logprobs[r * samples + j]));
            }
            continue;
        }
        expect_same_draws(what, samples, cpu_tokens + r * samples, gpu_tokens + r * samples,
                          cpu_logprobs + r * samples, gpu_logprobs + r * samples);
    }

    /* Checking mode: the device array's bad value is found, nothing written. */
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = GPU_BACKEND;
    options.check_rows = 1;
    psm_context *checking = psm_test_open_with(&options);
    GPU_OK(GPU(Memset)(device_tokens, 0x5a, sizeof gpu_tokens));
    psm_status status = psm_sample(checking, &device_tensor, &device_params, tokens_out, logprobs_out);
    ck_assert_msg(status == PSM_ERR_BAD_ROW, "checking mode returned %s: %s",
                  psm_status_string(status), psm_last_error());
    ck_assert_msg(strstr(psm_last_error(), "10") != NULL, "message does not name row 10: %s",
                  psm_last_error());
    GPU_OK(GPU(Memcpy)(gpu_tokens, device_tokens, sizeof gpu_tokens, GPU(MemcpyDeviceToHost)));
    for (int j = 0; j < rows * samples; ++j)
        ck_assert_msg(gpu_tokens[j] == 0x5a5a5a5a, "checking mode wrote token %d", j);
    /* With the value fixed, checking mode draws what the CPU draws. */
    GPU_OK(GPU(Memcpy)((void *)device_params.top_p_per_row, top_ps, sizeof top_ps,
                       GPU(MemcpyHostToDevice)));
    GPU_OK(GPU(DeviceSynchronize)());
    PSM_CHECK_OK(psm_sample(checking, &device_tensor, &device_params, tokens_out, logprobs_out));
    PSM_CHECK_OK(psm_synchronize(checking));
    GPU_OK(GPU(Memcpy)(gpu_tokens, device_tokens, sizeof gpu_tokens, GPU(MemcpyDeviceToHost)));
    GPU_OK(GPU(Memcpy)(gpu_logprobs, device_logprobs, sizeof gpu_logprobs,
                       GPU(MemcpyDeviceToHost)));
    expect_same_draws("checking mode", rows * samples, cpu_tokens, gpu_tokens, cpu_logprobs,
                      gpu_logprobs);
    psm_context_destroy(checking);

    GPU_OK(GPU(Free)(device_logprobs));
    GPU_OK(GPU(Free)(device_tokens));
    GPU_OK(GPU(Free)((void *)device_params.seed_per_row));
    GPU_OK(GPU(Free)((void *)device_params.min_p_per_row));
    GPU_OK(GPU(Free)((void *)device_params.top_p_per_row));
    GPU_OK(GPU(Free)((void *)device_params.top_k_per_row));
    GPU_OK(GPU(Free)((void *)device_params.temperature_per_row));
    GPU_OK(GPU(Free)(device_logits));
    psm_context_destroy(gpu);
    free(m.data);
}
END_TEST

/* On the caller's stream: the work is ordered on it (waiting on the stream
 * alone is enough), and a call captured into a graph replays to the same
 * tokens, reading the logits anew at each replay. */
START_TEST(gpu_caller_stream_and_graph_replay)
{
    const int64_t rows = 40, vocab = 50000;
    const int32_t samples = 4;
    const int64_t draws = rows * samples;
    logit_matrix first = make_logits(PSM_DTYPE_F32, rows, vocab, vocab, 2.0, 31);
    logit_matrix second = make_logits(PSM_DTYPE_F32, rows, vocab, vocab, 3.0, 32);
    psm_params params = params_of(&parameter_sets[8], samples, 2024); /* top-k + top-p */
    psm_params plain = params_of(&parameter_sets[0], samples, 2025);

    int32_t *expected_first = psm_test_alloc((size_t)draws, sizeof(int32_t));
    int32_t *expected_second = psm_test_alloc((size_t)draws, sizeof(int32_t));
    int32_t *expected_plain = psm_test_alloc((size_t)draws, sizeof(int32_t));
    int32_t *got = psm_test_alloc((size_t)draws, sizeof(int32_t));
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    PSM_CHECK_OK(psm_test_sample_f32(cpu, first.data, rows, vocab, &params, expected_first, NULL));
    PSM_CHECK_OK(psm_test_sample_f32(cpu, second.data, rows, vocab, &params, expected_second, NULL));
    PSM_CHECK_OK(psm_test_sample_f32(cpu, first.data, rows, vocab, &plain, expected_plain, NULL));
    psm_context_destroy(cpu);

    GPU(Stream_t) stream;
    GPU_OK(GPU(StreamCreateWithFlags)(&stream, GPU(StreamNonBlocking)));
    psm_context *gpu = open_gpu(stream);
    const size_t logit_bytes = (size_t)(rows * vocab) * sizeof(float);
    void *device_logits = to_device(first.data, logit_bytes);
    void *device_tokens = NULL, *device_plain_tokens = NULL;
    GPU_OK(GPU(Malloc)(&device_tokens, (size_t)draws * sizeof(int32_t)));
    GPU_OK(GPU(Malloc)(&device_plain_tokens, (size_t)draws * sizeof(int32_t)));
    psm_tensor tensor = tensor_of(&first, device_logits, PSM_MEMORY_DEVICE);
    psm_output tokens_out = {device_tokens, PSM_MEMORY_DEVICE};
    psm_output plain_out = {device_plain_tokens, PSM_MEMORY_DEVICE};
    psm_output no_logprobs = {NULL, PSM_MEMORY_DEVICE};

    /* Direct call on the caller's stream; wait on the stream only. */
    PSM_CHECK_OK(psm_sample(gpu, &tensor, &params, tokens_out, no_logprobs));
    GPU_OK(GPU(MemcpyAsync)(got, device_tokens, (size_t)draws * sizeof(int32_t),
                            GPU(MemcpyDeviceToHost), stream));
    GPU_OK(GPU(StreamSynchronize)(stream));
    expect_same_draws("caller's stream", draws, expected_first, got, NULL, NULL);

    /* Capture two calls (filtered and plain) into one graph. */
    GPU_OK(GPU(MemsetAsync)(device_tokens, 0x5a, (size_t)draws * sizeof(int32_t), stream));
    GPU_OK(GPU(MemsetAsync)(device_plain_tokens, 0x5a, (size_t)draws * sizeof(int32_t), stream));
    GPU_OK(GPU(StreamSynchronize)(stream));
    GPU(Graph_t) graph;
    GPU(GraphExec_t) graph_exec;
    GPU_OK(GPU(StreamBeginCapture)(stream, GPU(StreamCaptureModeGlobal)));
    psm_status captured = psm_sample(gpu, &tensor, &params, tokens_out, no_logprobs);
    psm_status captured_plain = psm_sample(gpu, &tensor, &plain, plain_out, no_logprobs);
    GPU_OK(GPU(StreamEndCapture)(stream, &graph));
    ck_assert_msg(captured == PSM_OK && captured_plain == PSM_OK,
                  "psm_sample under capture failed: %s", psm_last_error());
    GPU_OK(GPU_GRAPH_INSTANTIATE(&graph_exec, graph));

    /* Capturing ran nothing: the buffers still hold the poison. */
    GPU_OK(GPU(Memcpy)(got, device_tokens, (size_t)draws * sizeof(int32_t), GPU(MemcpyDeviceToHost)));
    ck_assert_msg(got[0] == 0x5a5a5a5a, "capture executed the call");

    GPU_OK(GPU(GraphLaunch)(graph_exec, stream));
    GPU_OK(GPU(StreamSynchronize)(stream));
    GPU_OK(GPU(Memcpy)(got, device_tokens, (size_t)draws * sizeof(int32_t), GPU(MemcpyDeviceToHost)));
    expect_same_draws("graph replay", draws, expected_first, got, NULL, NULL);
    GPU_OK(GPU(Memcpy)(got, device_plain_tokens, (size_t)draws * sizeof(int32_t),
                       GPU(MemcpyDeviceToHost)));
    expect_same_draws("graph replay (plain)", draws, expected_plain, got, NULL, NULL);

    /* New logits in the same buffer: the replay reads them. */
    GPU_OK(GPU(Memcpy)(device_logits, second.data, logit_bytes, GPU(MemcpyHostToDevice)));
    GPU_OK(GPU(DeviceSynchronize)());
    GPU_OK(GPU(GraphLaunch)(graph_exec, stream));
    GPU_OK(GPU(StreamSynchronize)(stream));
    GPU_OK(GPU(Memcpy)(got, device_tokens, (size_t)draws * sizeof(int32_t), GPU(MemcpyDeviceToHost)));
    expect_same_draws("graph replay, new logits", draws, expected_second, got, NULL, NULL);

    GPU_OK(GPU(GraphExecDestroy)(graph_exec));
    GPU_OK(GPU(GraphDestroy)(graph));
    psm_context_destroy(gpu);
    GPU_OK(GPU(StreamDestroy)(stream));
    GPU_OK(GPU(Free)(device_plain_tokens));
    GPU_OK(GPU(Free)(device_tokens));
    GPU_OK(GPU(Free)(device_logits));
    free(got);
    free(expected_plain);
    free(expected_second);
    free(expected_first);
    free(second.data);
    free(first.data);
}
END_TEST

/* Rows whose element offsets pass 2^32: f16 rows with a row stride of 2^31 + 64
 * elements (8 GiB of device memory; skipped when the device has less). */
START_TEST(gpu_offsets_beyond_32_bits)
{
    const int64_t rows = 3, vocab = 5000, stride = ((int64_t)1 << 31) + 64;
    logit_matrix compact = make_logits(PSM_DTYPE_F16, rows, vocab, vocab, 2.0, 64);
    void *device_logits = NULL;
    const size_t bytes = (size_t)((rows - 1) * stride + vocab) * 2;
    if (GPU(Malloc)(&device_logits, bytes) != GPU(Success)) {
        (void)GPU(GetLastError)();
        printf("SKIP [" GPU_NAME "] offsets_beyond_32_bits: cannot allocate %zu bytes\n", bytes);
        free(compact.data);
        return;
    }
    GPU_OK(GPU(Memcpy2D)(device_logits, (size_t)stride * 2, compact.data, (size_t)vocab * 2,
                         (size_t)vocab * 2, (size_t)rows, GPU(MemcpyHostToDevice)));
    for (size_t p = 0; p < PARAMETER_SET_COUNT; ++p) {
        psm_params params = params_of(&parameter_sets[p], 6, 99);
        int32_t expected[3 * 6], got[3 * 6];
        psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
        psm_tensor host_tensor = tensor_of(&compact, compact.data, PSM_MEMORY_HOST);
        PSM_CHECK_OK(psm_sample(cpu, &host_tensor, &params, psm_test_output(expected),
                                psm_test_output(NULL)));
        psm_context_destroy(cpu);
        psm_context *gpu = open_gpu(NULL);
        psm_tensor device_tensor = psm_test_tensor(device_logits, PSM_DTYPE_F16, rows, vocab, stride);
        device_tensor.memory = PSM_MEMORY_DEVICE;
        PSM_CHECK_OK(psm_sample(gpu, &device_tensor, &params, psm_test_output(got),
                                psm_test_output(NULL)));
        psm_context_destroy(gpu);
        expect_same_draws(parameter_sets[p].name, rows * 6, expected, got, NULL, NULL);
    }
    GPU_OK(GPU(Free)(device_logits));
    free(compact.data);
}
END_TEST

int main(void)
{
    const TTest *tests[] = {gpu_matches_cpu_on_device_memory, gpu_probs_match_cpu,
                            gpu_bad_rows_match_cpu, gpu_per_row_device_parameters,
                            gpu_caller_stream_and_graph_replay, gpu_offsets_beyond_32_bits};
    const size_t count = sizeof tests / sizeof tests[0];
    const char *skip = psm_test_backend_skip_reason(GPU_BACKEND);
    for (size_t t = 0; t < count; ++t) {
        if (skip)
            psm_test_skip(GPU_NAME, tests[t]->name, skip);
        else if (psm_test_quick() && tests[t] == gpu_offsets_beyond_32_bits)
            psm_test_skip(GPU_NAME, tests[t]->name, "8 GiB test left out in quick mode");
        else
            psm_test_register_common(tests[t]);
    }
    return psm_test_run("test_" GPU_NAME);
}
