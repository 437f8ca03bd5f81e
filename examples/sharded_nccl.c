/* sharded_nccl.c: sampling logits split by vocabulary across GPUs, one
 * process per GPU, with NCCL all-gathers between psm_sharded_next's rounds
 * (docs/SAMPLING.md, section 8). Each rank holds the columns
 * [vocab * rank / world, vocab * (rank + 1) / world) of a batch every rank
 * can generate (a fixed seed), samples them with psm_sharded_*, and checks
 * that its tokens and logprobs equal psm_sample's on the whole batch.
 *
 *   sharded_nccl RANK WORLD ID_FILE [ROWS VOCAB]
 *
 * Start WORLD processes (RANK 0 .. WORLD-1) on one host; rank 0 writes
 * NCCL's unique id to ID_FILE (which must not exist yet) and the others
 * read it. Each rank uses GPU RANK % (GPUs on the host). The sampling runs
 * on the CPU backend with host memory until the GPU backends run the
 * sharded call; NCCL moves the rounds' records through the GPUs as a
 * tensor-parallel runtime would. Exits 0 when every rank agreed. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <cuda_runtime.h>
#include <nccl.h>
#include <polysample.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SAMPLES 2

static int fail(const char *what, const char *why)
{
    fprintf(stderr, "sharded_nccl: %s: %s\n", what, why);
    return 1;
}

#define CUDA_OR_FAIL(call)                                                                 \
    do {                                                                                   \
        cudaError_t e_ = (call);                                                           \
        if (e_ != cudaSuccess)                                                             \
            return fail(#call, cudaGetErrorString(e_));                                    \
    } while (0)
#define NCCL_OR_FAIL(call)                                                                 \
    do {                                                                                   \
        ncclResult_t r_ = (call);                                                          \
        if (r_ != ncclSuccess)                                                             \
            return fail(#call, ncclGetErrorString(r_));                                    \
    } while (0)
#define PSM_OR_FAIL(call)                                                                  \
    do {                                                                                   \
        if ((call) != PSM_OK)                                                              \
            return fail(#call, psm_last_error());                                          \
    } while (0)

/* NCCL's unique id through a file: rank 0 writes it, the others wait for it. */
static int share_id(int rank, const char *path, ncclUniqueId *id)
{
    if (rank == 0) {
        char partial[4096];
        snprintf(partial, sizeof partial, "%s.partial", path);
        FILE *f = fopen(partial, "wb");
        if (!f || fwrite(id, sizeof *id, 1, f) != 1 || fclose(f) != 0 || rename(partial, path))
            return fail("writing the NCCL id", path);
        return 0;
    }
    for (int tries = 0; tries < 600; ++tries) {
        FILE *f = fopen(path, "rb");
        if (f) {
            const size_t read = fread(id, sizeof *id, 1, f);
            fclose(f);
            if (read == 1)
                return 0;
        }
        const struct timespec tenth = {0, 100000000};
        nanosleep(&tenth, NULL);
    }
    return fail("reading the NCCL id (60 s)", path);
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 6) {
        fprintf(stderr, "usage: sharded_nccl RANK WORLD ID_FILE [ROWS VOCAB]\n");
        return 2;
    }
    const int rank = atoi(argv[1]), world = atoi(argv[2]);
    const int64_t rows = argc == 6 ? atoll(argv[4]) : 64, vocab = argc == 6 ? atoll(argv[5]) : 151936;
    if (world < 1 || world > PSM_MAX_SHARDS || rank < 0 || rank >= world || rows < 1 ||
        vocab < world)
        return fail("arguments", "need 0 <= RANK < WORLD <= PSM_MAX_SHARDS, VOCAB >= WORLD");
    int devices = 0;
    CUDA_OR_FAIL(cudaGetDeviceCount(&devices));
    CUDA_OR_FAIL(cudaSetDevice(rank % devices));
    ncclUniqueId id;
    if (rank == 0)
        NCCL_OR_FAIL(ncclGetUniqueId(&id));
    if (share_id(rank, argv[3], &id) != 0)
        return 1;
    ncclComm_t comm;
    NCCL_OR_FAIL(ncclCommInitRank(&comm, world, id, rank));
    cudaStream_t stream;
    CUDA_OR_FAIL(cudaStreamCreate(&stream));

    /* The whole batch, the same on every rank: N(0, 2^2)-ish by summing
     * uniforms, from a fixed xorshift seed. */
    float *logits = malloc((size_t)rows * (size_t)vocab * sizeof *logits);
    if (!logits)
        return fail("logits", "out of memory");
    uint64_t state = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < (size_t)rows * (size_t)vocab; ++i) {
        float sum = 0.0f;
        for (int k = 0; k < 4; ++k) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            sum += (float)(state >> 40) / 16777216.0f;
        }
        logits[i] = 3.5f * (sum - 2.0f);
    }
    const int64_t first = vocab * rank / world, next = vocab * (rank + 1) / world;

    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    psm_context *context;
    PSM_OR_FAIL(psm_context_create(&options, &context));
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.8f;
    params.top_p = 0.9f;
    params.seed = 42;
    params.num_samples = SAMPLES;

    int32_t *tokens = malloc((size_t)rows * SAMPLES * sizeof *tokens);
    float *logprobs = malloc((size_t)rows * SAMPLES * sizeof *logprobs);
    if (!tokens || !logprobs)
        return fail("outputs", "out of memory");
    psm_tensor mine = {logits + first, PSM_DTYPE_F32, PSM_MEMORY_HOST, rows, next - first, vocab};
    const psm_shard shard = {first, vocab, rank, world};
    psm_sharded *call;
    PSM_OR_FAIL(psm_sharded_begin(context, &mine, &shard, &params,
                                  (psm_output){tokens, PSM_MEMORY_HOST},
                                  (psm_output){logprobs, PSM_MEMORY_HOST}, &call));

    /* The rounds: this rank's record to the GPU, NCCL's all-gather (rank
     * order), the gathered records back to the host. */
    unsigned char *gathered = NULL, *device_send = NULL, *device_gathered = NULL;
    size_t gathered_bytes = 0, capacity = 0, sent = 0;
    int rounds = 0;
    for (;;) {
        const void *send;
        size_t bytes;
        PSM_OR_FAIL(psm_sharded_next(call, rounds ? gathered : NULL, gathered_bytes, &send, &bytes));
        if (bytes == 0)
            break;
        if (bytes > capacity) {
            cudaFree(device_send);
            cudaFree(device_gathered);
            free(gathered);
            CUDA_OR_FAIL(cudaMalloc((void **)&device_send, bytes));
            CUDA_OR_FAIL(cudaMalloc((void **)&device_gathered, bytes * (size_t)world));
            gathered = malloc(bytes * (size_t)world);
            if (!gathered)
                return fail("gathered", "out of memory");
            capacity = bytes;
        }
        CUDA_OR_FAIL(cudaMemcpyAsync(device_send, send, bytes, cudaMemcpyHostToDevice, stream));
        NCCL_OR_FAIL(ncclAllGather(device_send, device_gathered, bytes, ncclUint8, comm, stream));
        CUDA_OR_FAIL(cudaMemcpyAsync(gathered, device_gathered, bytes * (size_t)world,
                                     cudaMemcpyDeviceToHost, stream));
        CUDA_OR_FAIL(cudaStreamSynchronize(stream));
        gathered_bytes = bytes * (size_t)world;
        sent += bytes;
        ++rounds;
    }
    psm_sharded_end(call);

    /* The whole batch on this rank, for the comparison. */
    int32_t *expected = malloc((size_t)rows * SAMPLES * sizeof *expected);
    float *expected_logprobs = malloc((size_t)rows * SAMPLES * sizeof *expected_logprobs);
    if (!expected || !expected_logprobs)
        return fail("expected outputs", "out of memory");
    psm_tensor whole = {logits, PSM_DTYPE_F32, PSM_MEMORY_HOST, rows, vocab, 0};
    PSM_OR_FAIL(psm_sample(context, &whole, &params, (psm_output){expected, PSM_MEMORY_HOST},
                           (psm_output){expected_logprobs, PSM_MEMORY_HOST}));
    const int equal =
        memcmp(tokens, expected, (size_t)rows * SAMPLES * sizeof *tokens) == 0 &&
        memcmp(logprobs, expected_logprobs, (size_t)rows * SAMPLES * sizeof *logprobs) == 0;
    printf("rank %d of %d: columns %lld..%lld of %lld, %lld rows: %d rounds, %.0f bytes sent a "
           "row; tokens and logprobs equal to psm_sample on the whole batch: %s\n",
           rank, world, (long long)first, (long long)next - 1, (long long)vocab, (long long)rows,
           rounds, (double)sent / (double)rows, equal ? "yes" : "NO");

    free(expected);
    free(expected_logprobs);
    free(tokens);
    free(logprobs);
    free(gathered);
    free(logits);
    cudaFree(device_send);
    cudaFree(device_gathered);
    psm_context_destroy(context);
    ncclCommDestroy(comm);
    cudaStreamDestroy(stream);
    return equal ? 0 : 1;
}
