/*
 * test_cuda_graph.c: sampling inside a captured CUDA graph, with the request
 * state in device memory (issue 12).
 *
 * One decode step (psm_sample, whose seed and offset or per-row offsets live
 * in device memory, then a kernel that adds 1 to those offsets) is captured
 * once on the caller's stream and replayed STEPS times. Each replay must draw
 * exactly what an uncaptured call at that step's offset draws, on the GPU and
 * on the CPU backend, and consecutive steps must repeat a row's token as
 * often as chance says (expect_repeats_as_chance): neither the same draw
 * every step nor fewer repeats than the distribution gives.
 *
 * The second test does the same through a caller's workspace, captured on a
 * context that has not yet allocated any per-call buffer of its own: in
 * CUDA's global capture mode a cudaMalloc fails the capture. A build with
 * PSM_FAULT_INJECTION=ON also counts the device allocations that the captured
 * call attempted (core/alloc.h): none, while the same call without the
 * workspace, uncaptured, does allocate. Other builds report that count as a
 * skip.
 *
 * The third captures a step with top-N logprobs (lists and ranks in device
 * memory) through a caller's workspace and checks each replay against the
 * CPU backend.
 *
 * The fourth captures psm_verify (speculative decoding: chains of drafts
 * with draft logits, a filtered target, every array in device memory) once
 * an uncaptured call of the same shape has grown the context's buffers: in
 * global capture mode an allocation or a host wait inside the call fails
 * the capture. The outputs are poisoned before each replay, and each replay
 * must write exactly the uncaptured call's outputs, which are the CPU
 * backend's (logprobs bit for bit).
 *
 * Needs a CUDA device: without one each test is reported as a skip.
 */
#include "harness.h"
#include "test_cuda_graph_kernels.h"

#ifdef PSM_FAULT_INJECTION
#include "alloc.h"
#endif

#include <cuda_runtime_api.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CUDA_OK(call)                                                                       \
    do {                                                                                    \
        cudaError_t cuda_ok_error_ = (call);                                                \
        ck_assert_msg(cuda_ok_error_ == cudaSuccess, "%s failed: %s", #call,                \
                      cudaGetErrorString(cuda_ok_error_));                                  \
    } while (0)

/* Replays of the captured step. */
#define STEPS 100

/* How far the count of repeated tokens may lie from its mean, in standard
 * deviations: the inputs and seeds are fixed, and a correct sampler misses
 * the bound with a probability of about 6e-7. */
#define REPEAT_BOUND_SDS 5.0

/* Rows of N(0, sigma^2) logits from a fixed seed. With sigma 2.5 over a few
 * thousand tokens two draws of a row agree with a probability around 0.1
 * (sum of p_i^2), so that repeats between steps are neither rare nor the
 * rule. */
static float *make_logits(int64_t rows, int64_t vocab, double sigma, uint64_t seed)
{
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof(float));
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < rows * vocab; ++i)
        logits[i] = (float)(sigma * psm_test_rng_normal(&rng));
    return logits;
}

static void *to_device(const void *host, size_t bytes)
{
    void *device = NULL;
    CUDA_OK(cudaMalloc(&device, bytes));
    CUDA_OK(cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice));
    /* A copy from pageable memory may return before its DMA lands, and the
     * library's stream does not wait for the default stream. */
    CUDA_OK(cudaDeviceSynchronize());
    return device;
}

static psm_tensor device_tensor(void *data, int64_t rows, int64_t vocab)
{
    psm_tensor tensor = psm_test_tensor(data, PSM_DTYPE_F32, rows, vocab, 0);
    tensor.memory = PSM_MEMORY_DEVICE;
    return tensor;
}

static psm_context *open_gpu(cudaStream_t stream)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CUDA;
    options.native_stream = stream;
    return psm_test_open_with(&options);
}

/* The captured step: the sample call (its status in *sampled) and the
 * offsets' advance, as one graph ready to launch. The capture ends before
 * anything is asserted, so that a failure leaves the stream usable. */
static cudaGraphExec_t capture_step(cudaStream_t stream, psm_context *gpu,
                                    const psm_tensor *logits, const psm_params *params,
                                    psm_output tokens, uint64_t *device_offsets,
                                    int64_t offset_count)
{
    cudaGraph_t graph = NULL;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const psm_status sampled = psm_sample(gpu, logits, params, tokens,
                                          (psm_output){NULL, PSM_MEMORY_DEVICE});
    const cudaError_t advanced = psm_test_advance_offsets(device_offsets, offset_count, stream);
    const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    ck_assert_msg(sampled == PSM_OK, "psm_sample under capture returned %s: %s",
                  psm_status_string(sampled), psm_last_error());
    CUDA_OK(advanced);
    CUDA_OK(ended);
    cudaGraphExec_t exec = NULL;
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_OK(cudaGraphDestroy(graph));
    return exec;
}

/* Launches the step STEPS times; step k's tokens land in replayed[k * rows ..]. */
static void replay_steps(cudaStream_t stream, cudaGraphExec_t exec, const int32_t *device_tokens,
                         int64_t rows, int32_t *replayed)
{
    for (int k = 0; k < STEPS; ++k) {
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaMemcpyAsync(replayed + k * rows, device_tokens, (size_t)rows * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream));
    }
    CUDA_OK(cudaStreamSynchronize(stream));
}

static void expect_same_steps(const char *what, int64_t rows, const int32_t *expected,
                              const int32_t *got)
{
    for (int k = 0; k < STEPS; ++k)
        for (int64_t r = 0; r < rows; ++r)
            ck_assert_msg(expected[k * rows + r] == got[k * rows + r],
                          "%s: step %d, row %lld: expected token %d, the replay drew %d", what, k,
                          (long long)r, expected[k * rows + r], got[k * rows + r]);
}

/* Repeats between consecutive steps against chance. A row's draws at
 * different offsets are independent draws from its distribution p, so
 * X_k = [token_k == token_(k-1)] has mean q = sum p_i^2; X_k and X_(k+1)
 * share a draw (covariance c - q^2, c = sum p_i^3) and the rest are
 * independent, rows too (each has its own Philox stream). */
static void expect_repeats_as_chance(const char *what, int64_t rows, int64_t vocab,
                                     const float *probs, const int32_t *tokens)
{
    const int pairs = STEPS - 1;
    double mean = 0.0, variance = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
        double q = 0.0, c = 0.0;
        for (int64_t i = 0; i < vocab; ++i) {
            const double p = probs[r * vocab + i];
            q += p * p;
            c += p * p * p;
        }
        mean += pairs * q;
        variance += pairs * q * (1.0 - q) + 2.0 * (pairs - 1) * (c - q * q);
    }
    int64_t repeats = 0;
    for (int k = 1; k < STEPS; ++k)
        for (int64_t r = 0; r < rows; ++r)
            repeats += tokens[k * rows + r] == tokens[(k - 1) * rows + r];
    const double bound = REPEAT_BOUND_SDS * sqrt(variance);
    printf("[cuda] %s: %lld of %lld consecutive steps repeat a token; chance: %.1f +- %.1f\n",
           what, (long long)repeats, (long long)(pairs * rows), mean, bound);
    ck_assert_msg(fabs((double)repeats - mean) <= bound,
                  "%s: %lld of %lld consecutive steps repeat a row's token; chance gives "
                  "%.1f +- %.1f (%.0f sd)",
                  what, (long long)repeats, (long long)(pairs * rows), mean, bound,
                  REPEAT_BOUND_SDS);
}

/* The scalar seed and offset given by pointer: the graph reads them at each
 * replay, and the captured kernel advances the offset. */
START_TEST(graph_replays_with_seed_and_offset_pointers)
{
    const int64_t rows = 16, vocab = 4096;
    const uint64_t seed = 0x5eed, first_offset = 1000;
    float *logits = make_logits(rows, vocab, 2.5, 11);
    psm_params plain;
    psm_params_init(&plain);
    plain.seed = seed;

    /* What each step must draw: uncaptured calls with that step's offset as
     * the scalar, on the CPU backend. */
    int32_t *expected_cpu = psm_test_alloc((size_t)(STEPS * rows), sizeof(int32_t));
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof(float));
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    for (int k = 0; k < STEPS; ++k) {
        psm_params at_step = plain;
        at_step.offset = first_offset + (uint64_t)k;
        PSM_CHECK_OK(psm_test_sample_f32(cpu, logits, rows, vocab, &at_step,
                                         expected_cpu + k * rows, NULL));
    }
    PSM_CHECK_OK(psm_test_probs_f32(cpu, logits, rows, vocab, &plain, probs));
    psm_context_destroy(cpu);

    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    psm_context *gpu = open_gpu(stream);
    void *device_logits = to_device(logits, (size_t)(rows * vocab) * sizeof(float));
    uint64_t *device_seed = to_device(&seed, sizeof seed);
    uint64_t *device_offset = to_device(&first_offset, sizeof first_offset);
    int32_t *device_tokens = NULL;
    CUDA_OK(cudaMalloc((void **)&device_tokens, (size_t)rows * sizeof(int32_t)));
    const psm_tensor tensor = device_tensor(device_logits, rows, vocab);
    const psm_output no_logprobs = {NULL, PSM_MEMORY_DEVICE};

    /* The same uncaptured calls on the GPU (which also size the context's
     * buffers for this shape, so that the captured call allocates nothing). */
    int32_t *expected_gpu = psm_test_alloc((size_t)(STEPS * rows), sizeof(int32_t));
    for (int k = 0; k < STEPS; ++k) {
        psm_params at_step = plain;
        at_step.offset = first_offset + (uint64_t)k;
        PSM_CHECK_OK(psm_sample(gpu, &tensor, &at_step, psm_test_output(expected_gpu + k * rows),
                                no_logprobs));
    }

    psm_params step = plain;
    step.seed = 0; /* read from device_seed instead */
    step.seed_pointer = device_seed;
    step.offset_pointer = device_offset;
    cudaGraphExec_t exec = capture_step(stream, gpu, &tensor, &step,
                                        (psm_output){device_tokens, PSM_MEMORY_DEVICE},
                                        device_offset, 1);
    int32_t *replayed = psm_test_alloc((size_t)(STEPS * rows), sizeof(int32_t));
    replay_steps(stream, exec, device_tokens, rows, replayed);

    uint64_t last_offset = 0;
    CUDA_OK(cudaMemcpy(&last_offset, device_offset, sizeof last_offset, cudaMemcpyDeviceToHost));
    ck_assert_msg(last_offset == first_offset + STEPS,
                  "the device offset is %llu after %d replays from %llu",
                  (unsigned long long)last_offset, STEPS, (unsigned long long)first_offset);
    expect_same_steps("uncaptured cpu calls", rows, expected_cpu, expected_gpu);
    expect_same_steps("seed and offset pointers, against uncaptured calls", rows, expected_gpu,
                      replayed);
    expect_repeats_as_chance("seed and offset pointers", rows, vocab, probs, replayed);

    CUDA_OK(cudaGraphExecDestroy(exec));
    psm_context_destroy(gpu);
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaFree(device_tokens));
    CUDA_OK(cudaFree(device_offset));
    CUDA_OK(cudaFree(device_seed));
    CUDA_OK(cudaFree(device_logits));
    free(replayed);
    free(expected_gpu);
    free(probs);
    free(expected_cpu);
    free(logits);
}
END_TEST

/* Per-row offsets and row indices in device memory, filters on, every
 * per-call buffer in a caller's workspace: captured on a fresh context. */
START_TEST(graph_replays_with_row_offsets_in_a_workspace)
{
    enum { LOGITS_ROWS = 6, ROWS = 16 };
    const int64_t vocab = 5000; /* five tiles, the last one partial */
    float *logits = make_logits(LOGITS_ROWS, vocab, 2.5, 12);
    int64_t row_indices[ROWS];
    uint64_t first_offsets[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        row_indices[r] = (r * 5) % LOGITS_ROWS; /* each logits row serves two or three rows */
        first_offsets[r] = 3 + 7 * (uint64_t)r;
    }
    psm_params filtered;
    psm_params_init(&filtered);
    filtered.top_k = 40;
    filtered.top_p = 0.9f;
    filtered.seed = 777;
    filtered.row_indices = row_indices;
    filtered.output_rows = ROWS;
    const psm_tensor host_logits = psm_test_tensor(logits, PSM_DTYPE_F32, LOGITS_ROWS, vocab, 0);

    /* What each step must draw, from the CPU backend with host arrays. */
    int32_t *expected_cpu = psm_test_alloc((size_t)(STEPS * ROWS), sizeof(int32_t));
    float *probs = psm_test_alloc((size_t)(ROWS * vocab), sizeof(float));
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    for (int k = 0; k < STEPS; ++k) {
        uint64_t offsets[ROWS];
        for (int r = 0; r < ROWS; ++r)
            offsets[r] = first_offsets[r] + (uint64_t)k;
        psm_params at_step = filtered;
        at_step.offset_per_row = offsets;
        PSM_CHECK_OK(psm_sample(cpu, &host_logits, &at_step,
                                psm_test_output(expected_cpu + k * ROWS), psm_test_output(NULL)));
    }
    const psm_tensor probs_out = psm_test_tensor(probs, PSM_DTYPE_F32, ROWS, vocab, 0);
    PSM_CHECK_OK(psm_probs(cpu, &host_logits, &filtered, &probs_out));
    psm_context_destroy(cpu);

    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    psm_context *gpu = open_gpu(stream);
    void *device_logits = to_device(logits, (size_t)(LOGITS_ROWS * vocab) * sizeof(float));
    int64_t *device_row_indices = to_device(row_indices, sizeof row_indices);
    uint64_t *device_offsets = to_device(first_offsets, sizeof first_offsets);
    int32_t *device_tokens = NULL;
    CUDA_OK(cudaMalloc((void **)&device_tokens, ROWS * sizeof(int32_t)));
    const psm_tensor tensor = device_tensor(device_logits, LOGITS_ROWS, vocab);
    const psm_output tokens_out = {device_tokens, PSM_MEMORY_DEVICE};
    const psm_output no_logprobs = {NULL, PSM_MEMORY_DEVICE};

    psm_params step = filtered;
    step.row_indices = device_row_indices;
    step.offset_per_row = device_offsets;
    size_t needed = 0;
    PSM_CHECK_OK(psm_sample_workspace_size(gpu, &tensor, &step, tokens_out, no_logprobs, &needed));
    ck_assert_msg(needed > 0, "a call on the GPU needs a tile workspace, but the size is 0");
    /* One byte more than needed, used from an odd address: any alignment
     * must do. */
    unsigned char *workspace_block = NULL;
    CUDA_OK(cudaMalloc((void **)&workspace_block, needed + 1));
    step.workspace = workspace_block + 1;
    step.workspace_bytes = needed;

    /* One byte short is refused before anything is written. */
    CUDA_OK(cudaMemset(device_tokens, 0x5a, ROWS * sizeof(int32_t)));
    psm_params short_workspace = step;
    short_workspace.workspace_bytes = needed - 1;
    const psm_status refused = psm_sample(gpu, &tensor, &short_workspace, tokens_out, no_logprobs);
    ck_assert_msg(refused == PSM_ERR_INVALID_ARGUMENT,
                  "a workspace one byte short gave %s, expected PSM_ERR_INVALID_ARGUMENT",
                  psm_status_string(refused));
    int32_t untouched[ROWS];
    CUDA_OK(cudaStreamSynchronize(stream));
    CUDA_OK(cudaMemcpy(untouched, device_tokens, sizeof untouched, cudaMemcpyDeviceToHost));
    for (int r = 0; r < ROWS; ++r)
        ck_assert_msg(untouched[r] == 0x5a5a5a5a, "the refused call wrote token %d of row %d",
                      untouched[r], r);

#ifdef PSM_FAULT_INJECTION
    psm_fault_inject(0, 0); /* counts from here, fails nothing */
#endif
    cudaGraphExec_t exec =
        capture_step(stream, gpu, &tensor, &step, tokens_out, device_offsets, ROWS);
#ifdef PSM_FAULT_INJECTION
    int64_t captured_allocations = -1;
    psm_fault_counts(NULL, &captured_allocations);
    ck_assert_msg(captured_allocations == 0,
                  "the captured call with a workspace attempted %lld device allocations",
                  (long long)captured_allocations);
#endif
    int32_t *replayed = psm_test_alloc((size_t)(STEPS * ROWS), sizeof(int32_t));
    replay_steps(stream, exec, device_tokens, ROWS, replayed);

    uint64_t last_offsets[ROWS];
    CUDA_OK(cudaMemcpy(last_offsets, device_offsets, sizeof last_offsets, cudaMemcpyDeviceToHost));
    for (int r = 0; r < ROWS; ++r)
        ck_assert_msg(last_offsets[r] == first_offsets[r] + STEPS,
                      "row %d's device offset is %llu after %d replays from %llu", r,
                      (unsigned long long)last_offsets[r], STEPS,
                      (unsigned long long)first_offsets[r]);

    /* The uncaptured calls, with the context's own buffers: the first of
     * them is the context's first call without a workspace, which must
     * allocate (the counter sees the backend's allocations). */
    int32_t *expected_gpu = psm_test_alloc((size_t)(STEPS * ROWS), sizeof(int32_t));
    uint64_t *device_step_offsets = NULL;
    CUDA_OK(cudaMalloc((void **)&device_step_offsets, sizeof first_offsets));
#ifdef PSM_FAULT_INJECTION
    psm_fault_inject(0, 0);
#endif
    for (int k = 0; k < STEPS; ++k) {
        uint64_t offsets[ROWS];
        for (int r = 0; r < ROWS; ++r)
            offsets[r] = first_offsets[r] + (uint64_t)k;
        CUDA_OK(cudaMemcpy(device_step_offsets, offsets, sizeof offsets, cudaMemcpyHostToDevice));
        CUDA_OK(cudaDeviceSynchronize());
        psm_params at_step = filtered;
        at_step.row_indices = device_row_indices;
        at_step.offset_per_row = device_step_offsets;
        /* Host tokens: the call waits for its work, so the offsets can change. */
        PSM_CHECK_OK(psm_sample(gpu, &tensor, &at_step, psm_test_output(expected_gpu + k * ROWS),
                                no_logprobs));
    }
#ifdef PSM_FAULT_INJECTION
    int64_t own_allocations = 0;
    psm_fault_counts(NULL, &own_allocations);
    ck_assert_msg(own_allocations > 0,
                  "the context's first calls without a workspace counted no device allocation: "
                  "the counter does not see the backend's allocations");
#endif
    expect_same_steps("uncaptured cpu calls", ROWS, expected_cpu, expected_gpu);
    expect_same_steps("row offsets in a workspace, against uncaptured calls", ROWS, expected_gpu,
                      replayed);
    expect_repeats_as_chance("row offsets in a workspace", ROWS, vocab, probs, replayed);

    CUDA_OK(cudaGraphExecDestroy(exec));
    psm_context_destroy(gpu);
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaFree(device_step_offsets));
    CUDA_OK(cudaFree(workspace_block));
    CUDA_OK(cudaFree(device_tokens));
    CUDA_OK(cudaFree(device_offsets));
    CUDA_OK(cudaFree(device_row_indices));
    CUDA_OK(cudaFree(device_logits));
    free(replayed);
    free(expected_gpu);
    free(probs);
    free(expected_cpu);
    free(logits);
}
END_TEST

/* Top-N logprobs (processed mode, with the drawn tokens' ranks) inside the
 * captured step, through a caller's workspace on a fresh context: each
 * replay's tokens, lists and ranks are the CPU backend's at that step's
 * offsets, and its logprobs agree to float rounding. */
START_TEST(graph_replays_with_top_logprobs_in_a_workspace)
{
    enum { ROWS = 4, COUNT = 8, TOP_STEPS = 10 };
    const int64_t vocab = 3000;
    float *logits = make_logits(ROWS, vocab, 2.5, 13);
    const uint64_t first_offsets[ROWS] = {5, 9, 13, 17};
    psm_params filtered;
    psm_params_init(&filtered);
    filtered.top_p = 0.95f;
    filtered.min_p = 0.01f;
    filtered.seed = 778;
    const psm_tensor host_logits = psm_test_tensor(logits, PSM_DTYPE_F32, ROWS, vocab, 0);

    enum { DRAWS = TOP_STEPS * ROWS, ENTRIES = TOP_STEPS * ROWS * COUNT };
    int32_t expected_tokens[DRAWS], expected_ranks[DRAWS], expected_top[ENTRIES];
    float expected_logprobs[ENTRIES];
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    for (int k = 0; k < TOP_STEPS; ++k) {
        uint64_t offsets[ROWS];
        for (int r = 0; r < ROWS; ++r)
            offsets[r] = first_offsets[r] + (uint64_t)k;
        psm_top_logprobs top = {COUNT, PSM_LOGPROBS_PROCESSED,
                                psm_test_output(expected_top + k * ROWS * COUNT),
                                psm_test_output(expected_logprobs + k * ROWS * COUNT),
                                psm_test_output(expected_ranks + k * ROWS)};
        psm_params at_step = filtered;
        at_step.offset_per_row = offsets;
        at_step.top_logprobs = &top;
        PSM_CHECK_OK(psm_sample(cpu, &host_logits, &at_step,
                                psm_test_output(expected_tokens + k * ROWS),
                                psm_test_output(NULL)));
    }
    psm_context_destroy(cpu);

    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    psm_context *gpu = open_gpu(stream);
    void *device_logits = to_device(logits, (size_t)(ROWS * vocab) * sizeof(float));
    uint64_t *device_offsets = to_device(first_offsets, sizeof first_offsets);
    int32_t *device_tokens = NULL, *device_ranks = NULL, *device_top = NULL;
    float *device_logprobs = NULL;
    CUDA_OK(cudaMalloc((void **)&device_tokens, ROWS * sizeof(int32_t)));
    CUDA_OK(cudaMalloc((void **)&device_ranks, ROWS * sizeof(int32_t)));
    CUDA_OK(cudaMalloc((void **)&device_top, ROWS * COUNT * sizeof(int32_t)));
    CUDA_OK(cudaMalloc((void **)&device_logprobs, ROWS * COUNT * sizeof(float)));
    const psm_tensor tensor = device_tensor(device_logits, ROWS, vocab);
    const psm_output tokens_out = {device_tokens, PSM_MEMORY_DEVICE};
    psm_top_logprobs device_top_logprobs = {COUNT, PSM_LOGPROBS_PROCESSED,
                                            {device_top, PSM_MEMORY_DEVICE},
                                            {device_logprobs, PSM_MEMORY_DEVICE},
                                            {device_ranks, PSM_MEMORY_DEVICE}};
    psm_params step = filtered;
    step.offset_per_row = device_offsets;
    step.top_logprobs = &device_top_logprobs;
    size_t needed = 0;
    PSM_CHECK_OK(psm_sample_workspace_size(gpu, &tensor, &step, tokens_out,
                                           (psm_output){NULL, PSM_MEMORY_DEVICE}, &needed));
    void *workspace = NULL;
    CUDA_OK(cudaMalloc(&workspace, needed));
    step.workspace = workspace;
    step.workspace_bytes = needed;
    cudaGraphExec_t exec =
        capture_step(stream, gpu, &tensor, &step, tokens_out, device_offsets, ROWS);

    int32_t tokens[DRAWS], ranks[DRAWS], top[ENTRIES];
    float top_logprobs[ENTRIES];
    for (int k = 0; k < TOP_STEPS; ++k) {
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaMemcpyAsync(tokens + k * ROWS, device_tokens, ROWS * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream));
        CUDA_OK(cudaMemcpyAsync(ranks + k * ROWS, device_ranks, ROWS * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream));
        CUDA_OK(cudaMemcpyAsync(top + k * ROWS * COUNT, device_top, ROWS * COUNT * sizeof(int32_t),
                                cudaMemcpyDeviceToHost, stream));
        CUDA_OK(cudaMemcpyAsync(top_logprobs + k * ROWS * COUNT, device_logprobs,
                                ROWS * COUNT * sizeof(float), cudaMemcpyDeviceToHost, stream));
    }
    CUDA_OK(cudaStreamSynchronize(stream));
    ck_assert(memcmp(tokens, expected_tokens, sizeof tokens) == 0);
    ck_assert(memcmp(ranks, expected_ranks, sizeof ranks) == 0);
    ck_assert(memcmp(top, expected_top, sizeof top) == 0);
    for (int e = 0; e < ENTRIES; ++e) {
        const double want = expected_logprobs[e], got = top_logprobs[e];
        ck_assert_msg(got == want || fabs(got - want) <= 1e-6 * fabs(want) + 1e-7,
                      "entry %d: logprob %.9g, the CPU backend's %.9g", e, got, want);
    }

    CUDA_OK(cudaGraphExecDestroy(exec));
    psm_context_destroy(gpu);
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaFree(workspace));
    CUDA_OK(cudaFree(device_logprobs));
    CUDA_OK(cudaFree(device_top));
    CUDA_OK(cudaFree(device_ranks));
    CUDA_OK(cudaFree(device_tokens));
    CUDA_OK(cudaFree(device_offsets));
    CUDA_OK(cudaFree(device_logits));
    free(logits);
}
END_TEST

/* The fourth test's verification: VERIFY_REQUESTS chains of VERIFY_K drafts. */
#define VERIFY_REQUESTS 8
#define VERIFY_K 4
#define VERIFY_WIDTH (VERIFY_REQUESTS * (VERIFY_K + 1))
#define VERIFY_REPLAYS 5

/* psm_verify's four outputs in one block (no padding: 4-byte members), so
 * that one memset poisons them and one copy reads them back. */
typedef struct verify_result {
    int32_t accepted[VERIFY_REQUESTS];
    int32_t tokens[VERIFY_WIDTH];
    int32_t path_nodes[VERIFY_WIDTH];
    float logprobs[VERIFY_WIDTH];
} verify_result;

/* No output takes this byte pattern: 0x5a5a5a5a is no count, token or node
 * (-1, which 0xff would give, is a valid one), and as a float it is about
 * 1.5e16, no logprob. */
#define VERIFY_POISON 0x5a

/* The outputs of a block laid out as a verify_result, host or device. */
static psm_verification verification_in(void *block, psm_memory memory)
{
    unsigned char *base = block;
    const psm_verification outputs = {{base + offsetof(verify_result, accepted), memory},
                                      {base + offsetof(verify_result, tokens), memory},
                                      {base + offsetof(verify_result, path_nodes), memory},
                                      {base + offsetof(verify_result, logprobs), memory}};
    return outputs;
}

static int32_t argmax_of(const float *row, int64_t vocab)
{
    int64_t best = 0;
    for (int64_t i = 1; i < vocab; ++i)
        if (row[i] > row[best])
            best = i;
    return (int32_t)best;
}

/* A random token with at least `top` larger logits in row: outside a top-k
 * of `top`, so the target gives it weight 0 and never accepts it. */
static int32_t token_outside_top(const float *row, int64_t vocab, int64_t top, psm_test_rng *rng)
{
    for (;;) {
        const int64_t token = (int64_t)psm_test_rng_below(rng, (uint64_t)vocab);
        int64_t larger = 0;
        for (int64_t i = 0; i < vocab; ++i)
            larger += row[i] > row[token];
        if (larger >= top)
            return (int32_t)token;
    }
}

/* Equal outputs; logprobs bit for bit, the NaNs after the emitted tokens
 * included. */
static void expect_same_verification(const char *what, const verify_result *expected,
                                     const verify_result *got)
{
    for (int r = 0; r < VERIFY_REQUESTS; ++r)
        ck_assert_msg(got->accepted[r] == expected->accepted[r],
                      "%s: request %d accepted %d drafts, expected %d", what, r,
                      got->accepted[r], expected->accepted[r]);
    for (int i = 0; i < VERIFY_WIDTH; ++i) {
        const int r = i / (VERIFY_K + 1), j = i % (VERIFY_K + 1);
        ck_assert_msg(got->tokens[i] == expected->tokens[i] &&
                          got->path_nodes[i] == expected->path_nodes[i],
                      "%s: request %d, position %d: token %d at node %d, expected token %d at "
                      "node %d",
                      what, r, j, got->tokens[i], got->path_nodes[i], expected->tokens[i],
                      expected->path_nodes[i]);
        ck_assert_msg(memcmp(&got->logprobs[i], &expected->logprobs[i], sizeof(float)) == 0,
                      "%s: request %d, position %d: logprob %.9g, expected %.9g (bit for bit)",
                      what, r, j, got->logprobs[i], expected->logprobs[i]);
    }
}

/* One psm_verify call captured on the stream, as a graph ready to launch;
 * as in capture_step, the capture ends before anything is asserted. */
static cudaGraphExec_t capture_verify(cudaStream_t stream, psm_context *gpu,
                                      const psm_tensor *target, const psm_params *params,
                                      const psm_drafts *drafts, const psm_verification *outputs)
{
    cudaGraph_t graph = NULL;
    CUDA_OK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
    const psm_status verified = psm_verify(gpu, target, params, drafts, outputs);
    const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    ck_assert_msg(verified == PSM_OK, "psm_verify under capture returned %s: %s",
                  psm_status_string(verified), psm_last_error());
    CUDA_OK(ended);
    cudaGraphExec_t exec = NULL;
    CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
    CUDA_OK(cudaGraphDestroy(graph));
    return exec;
}

/* Speculative verification inside the graph. Each draft node's logits are
 * its parent's target row plus a little noise, and its token that row's
 * argmax, which the target mostly accepts; request r's node r % 6 + 1 (none
 * for r % 6 >= 4) has a token outside the target's top-k instead, which it
 * always rejects: the outputs hold corrections after rejections and bonus
 * tokens after fully accepted chains. The target's seed and offset are
 * fixed, so every replay writes the same outputs. */
START_TEST(graph_replays_speculative_verification)
{
    const int64_t vocab = 6000; /* six tiles, the last one partial */
    const int64_t target_rows = VERIFY_REQUESTS * (VERIFY_K + 1);
    const int64_t draft_rows = VERIFY_REQUESTS * VERIFY_K;
    float *target = make_logits(target_rows, vocab, 2.5, 14);
    float *draft = make_logits(draft_rows, vocab, 0.5, 15);
    int32_t draft_tokens[VERIFY_REQUESTS * VERIFY_K];
    psm_test_rng rng = psm_test_rng_make(16);
    for (int r = 0; r < VERIFY_REQUESTS; ++r)
        for (int i = 1; i <= VERIFY_K; ++i) {
            const float *parent = target + (r * (VERIFY_K + 1) + i - 1) * vocab;
            float *row = draft + (r * VERIFY_K + i - 1) * vocab;
            for (int64_t j = 0; j < vocab; ++j)
                row[j] += parent[j];
            draft_tokens[r * VERIFY_K + i - 1] = i == r % 6 + 1
                                                     ? token_outside_top(parent, vocab, 50, &rng)
                                                     : argmax_of(row, vocab);
        }
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.8f;
    params.top_k = 50;
    params.top_p = 0.9f;
    params.seed = 0x5eed4;
    params.offset = 321;

    /* The CPU backend's outputs, from host memory. */
    verify_result expected_cpu;
    const psm_tensor host_target = psm_test_tensor(target, PSM_DTYPE_F32, target_rows, vocab, 0);
    const psm_tensor host_draft = psm_test_tensor(draft, PSM_DTYPE_F32, draft_rows, vocab, 0);
    psm_drafts host_drafts;
    psm_drafts_init(&host_drafts);
    host_drafts.nodes = VERIFY_K;
    host_drafts.tokens = draft_tokens;
    host_drafts.draft_logits = &host_draft;
    const psm_verification host_outputs = verification_in(&expected_cpu, PSM_MEMORY_HOST);
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    PSM_CHECK_OK(psm_verify(cpu, &host_target, &params, &host_drafts, &host_outputs));
    psm_context_destroy(cpu);
    int fully_accepted = 0;
    for (int r = 0; r < VERIFY_REQUESTS; ++r) {
        ck_assert_msg(expected_cpu.accepted[r] >= 0, "request %d is bad on the cpu backend", r);
        fully_accepted += expected_cpu.accepted[r] == VERIFY_K;
    }
    ck_assert_msg(fully_accepted > 0 && fully_accepted < VERIFY_REQUESTS,
                  "%d of %d requests accept every draft on the cpu backend: the inputs should "
                  "give both bonus tokens and corrections",
                  fully_accepted, VERIFY_REQUESTS);

    cudaStream_t stream;
    CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    psm_context *gpu = open_gpu(stream);
    void *device_target = to_device(target, (size_t)(target_rows * vocab) * sizeof(float));
    void *device_draft = to_device(draft, (size_t)(draft_rows * vocab) * sizeof(float));
    int32_t *device_tokens = to_device(draft_tokens, sizeof draft_tokens);
    void *device_result = NULL;
    CUDA_OK(cudaMalloc(&device_result, sizeof(verify_result)));
    const psm_tensor target_tensor = device_tensor(device_target, target_rows, vocab);
    const psm_tensor draft_tensor = device_tensor(device_draft, draft_rows, vocab);
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = VERIFY_K;
    drafts.tokens = device_tokens;
    drafts.draft_logits = &draft_tensor;
    const psm_verification outputs = verification_in(device_result, PSM_MEMORY_DEVICE);

    /* The uncaptured call, which grows the context's buffers for this
     * shape, so that the captured one allocates nothing. */
    CUDA_OK(cudaMemsetAsync(device_result, VERIFY_POISON, sizeof(verify_result), stream));
    PSM_CHECK_OK(psm_verify(gpu, &target_tensor, &params, &drafts, &outputs));
    verify_result uncaptured;
    CUDA_OK(cudaMemcpyAsync(&uncaptured, device_result, sizeof uncaptured, cudaMemcpyDeviceToHost,
                            stream));
    CUDA_OK(cudaStreamSynchronize(stream));
    expect_same_verification("uncaptured call, against the cpu backend", &expected_cpu,
                             &uncaptured);

    cudaGraphExec_t exec =
        capture_verify(stream, gpu, &target_tensor, &params, &drafts, &outputs);
    for (int replay = 0; replay < VERIFY_REPLAYS; ++replay) {
        verify_result replayed;
        CUDA_OK(cudaMemsetAsync(device_result, VERIFY_POISON, sizeof(verify_result), stream));
        CUDA_OK(cudaGraphLaunch(exec, stream));
        CUDA_OK(cudaMemcpyAsync(&replayed, device_result, sizeof replayed,
                                cudaMemcpyDeviceToHost, stream));
        CUDA_OK(cudaStreamSynchronize(stream));
        char what[64];
        snprintf(what, sizeof what, "replay %d, against the uncaptured call", replay);
        expect_same_verification(what, &uncaptured, &replayed);
    }

    CUDA_OK(cudaGraphExecDestroy(exec));
    psm_context_destroy(gpu);
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaFree(device_result));
    CUDA_OK(cudaFree(device_tokens));
    CUDA_OK(cudaFree(device_draft));
    CUDA_OK(cudaFree(device_target));
    free(draft);
    free(target);
}
END_TEST

int main(void)
{
    const TTest *tests[] = {graph_replays_with_seed_and_offset_pointers,
                            graph_replays_with_row_offsets_in_a_workspace,
                            graph_replays_with_top_logprobs_in_a_workspace,
                            graph_replays_speculative_verification};
    const size_t count = sizeof tests / sizeof tests[0];
    const char *skip = psm_test_backend_skip_reason(PSM_BACKEND_CUDA);
    for (size_t t = 0; t < count; ++t) {
        if (skip)
            psm_test_skip("cuda", tests[t]->name, skip);
        else
            psm_test_register_common(tests[t]);
    }
#ifndef PSM_FAULT_INJECTION
    if (!skip)
        psm_test_skip("cuda", "graph_workspace_allocation_count",
                      "counting device allocations needs a build with PSM_FAULT_INJECTION=ON "
                      "(core/alloc.h); here the capture in global mode, where a cudaMalloc "
                      "fails it, is the check");
#endif
    return psm_test_run("test_cuda_graph");
}
