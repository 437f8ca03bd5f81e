/* sharded_nccl.c: sampling logits split by vocabulary across GPUs, one
 * process per GPU, with NCCL all-gathers between psm_sharded_next's rounds
 * (docs/SAMPLING.md, section 8). Each rank holds the columns
 * [vocab * rank / world, vocab * (rank + 1) / world) of batches every rank
 * can generate (fixed seeds) in its GPU's memory, samples them with
 * psm_sharded_* on the CUDA backend, and checks that its tokens and
 * logprobs equal psm_sample's on the whole batch on its own GPU.
 *
 *   sharded_nccl RANK WORLD ID_FILE [ROWS VOCAB [BATCHES]]
 *
 * Start WORLD processes (RANK 0 .. WORLD-1) on one host; rank 0 writes
 * NCCL's unique id to ID_FILE (which must not exist yet) and the others
 * read it. Each rank uses GPU RANK % (GPUs on the host). Per batch it also
 * times what a runtime does today, an all-gather of the logits (equal
 * shares, padded to the largest) and psm_sample on the whole batch, so the
 * two steps are compared in the same run; the medians are printed. Exits 0
 * when every rank agreed on every batch. */
#define _POSIX_C_SOURCE 200809L /* nanosleep, clock_gettime */
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

static double seconds_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

static int compare_doubles(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *values, int count)
{
    qsort(values, (size_t)count, sizeof *values, compare_doubles);
    return values[count / 2];
}

/* Batch `batch` of the logits, the same on every rank: N(0, 2^2)-ish by
 * summing uniforms, from a xorshift seed of the batch. */
static void make_batch(float *logits, size_t count, int batch)
{
    uint64_t state = 0x9e3779b97f4a7c15ull ^ ((uint64_t)(batch + 1) * 0xbf58476d1ce4e5b9ull);
    for (size_t i = 0; i < count; ++i) {
        float sum = 0.0f;
        for (int k = 0; k < 4; ++k) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            sum += (float)(state >> 40) / 16777216.0f;
        }
        logits[i] = 3.5f * (sum - 2.0f);
    }
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 6 && argc != 7) {
        fprintf(stderr, "usage: sharded_nccl RANK WORLD ID_FILE [ROWS VOCAB [BATCHES]]\n");
        return 2;
    }
    const int rank = atoi(argv[1]), world = atoi(argv[2]);
    const int64_t rows = argc >= 6 ? atoll(argv[4]) : 64, vocab = argc >= 6 ? atoll(argv[5]) : 151936;
    const int batches = argc == 7 ? atoi(argv[6]) : 1;
    if (world < 1 || world > PSM_MAX_SHARDS || rank < 0 || rank >= world || rows < 1 ||
        vocab < world || batches < 1)
        return fail("arguments",
                    "need 0 <= RANK < WORLD <= PSM_MAX_SHARDS, VOCAB >= WORLD, BATCHES >= 1");
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

    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CUDA;
    options.device_index = rank % devices;
    options.native_stream = stream;
    psm_context *context;
    PSM_OR_FAIL(psm_context_create(&options, &context));
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.8f;
    params.top_p = 0.9f;
    params.seed = 42;
    params.num_samples = SAMPLES;

    /* This rank's columns, the whole batch (the reference, and where the
     * gather-then-sample step's logits would land) and the all-gather's
     * buffers of equal shares, in this GPU's memory. */
    const int64_t first = vocab * rank / world, next = vocab * (rank + 1) / world;
    const int64_t columns = next - first, share = (vocab + world - 1) / world;
    const size_t whole_bytes = (size_t)rows * (size_t)vocab * sizeof(float);
    const size_t share_bytes = (size_t)rows * (size_t)share * sizeof(float);
    float *logits = malloc(whole_bytes);
    int32_t *tokens = malloc((size_t)rows * SAMPLES * sizeof *tokens);
    float *logprobs = malloc((size_t)rows * SAMPLES * sizeof *logprobs);
    int32_t *expected = malloc((size_t)rows * SAMPLES * sizeof *expected);
    float *expected_logprobs = malloc((size_t)rows * SAMPLES * sizeof *expected_logprobs);
    double *sharded_ms = malloc((size_t)batches * sizeof(double));
    double *gathered_ms = malloc((size_t)batches * sizeof(double));
    if (!logits || !tokens || !logprobs || !expected || !expected_logprobs || !sharded_ms ||
        !gathered_ms)
        return fail("host buffers", "out of memory");
    float *device_mine, *device_whole, *device_share, *device_shares;
    CUDA_OR_FAIL(cudaMalloc((void **)&device_mine, (size_t)rows * (size_t)columns * sizeof(float)));
    CUDA_OR_FAIL(cudaMalloc((void **)&device_whole, whole_bytes));
    CUDA_OR_FAIL(cudaMalloc((void **)&device_share, share_bytes));
    CUDA_OR_FAIL(cudaMalloc((void **)&device_shares, share_bytes * (size_t)world));
    CUDA_OR_FAIL(cudaMemset(device_share, 0, share_bytes));
    const psm_shard shard = {first, vocab, rank, world};
    const psm_output host_tokens = {tokens, PSM_MEMORY_HOST};
    const psm_output host_logprobs = {logprobs, PSM_MEMORY_HOST};

    unsigned char *gathered = NULL, *device_send = NULL, *device_gathered = NULL;
    size_t capacity = 0, sent = 0;
    int rounds = 0, agreed = 0;
    for (int batch = 0; batch < batches; ++batch) {
        make_batch(logits, (size_t)rows * (size_t)vocab, batch);
        CUDA_OR_FAIL(cudaMemcpy2DAsync(device_mine, (size_t)columns * sizeof(float), logits + first,
                                       (size_t)vocab * sizeof(float),
                                       (size_t)columns * sizeof(float), (size_t)rows,
                                       cudaMemcpyHostToDevice, stream));
        CUDA_OR_FAIL(cudaMemcpyAsync(device_whole, logits, whole_bytes, cudaMemcpyHostToDevice,
                                     stream));
        CUDA_OR_FAIL(cudaStreamSynchronize(stream));
        NCCL_OR_FAIL(ncclAllReduce(device_share, device_shares, 1, ncclFloat, ncclSum, comm,
                                   stream)); /* the ranks start each step together */
        CUDA_OR_FAIL(cudaStreamSynchronize(stream));

        /* The sharded step: the rounds, each this rank's record to the GPU,
         * NCCL's all-gather (rank order) and the gathered records back. */
        const double start = seconds_now();
        psm_tensor mine = {device_mine, PSM_DTYPE_F32, PSM_MEMORY_DEVICE, rows, columns, 0};
        psm_sharded *call;
        PSM_OR_FAIL(psm_sharded_begin(context, &mine, &shard, &params, host_tokens, host_logprobs,
                                      &call));
        size_t gathered_bytes = 0;
        rounds = 0;
        sent = 0;
        for (;;) {
            const void *send;
            size_t bytes;
            PSM_OR_FAIL(
                psm_sharded_next(call, rounds ? gathered : NULL, gathered_bytes, &send, &bytes));
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
        sharded_ms[batch] = 1e3 * (seconds_now() - start);

        /* Today's step: every rank gathers the logits (its share padded to
         * the largest; the gathered layout is share-major, and a runtime's
         * reshape to rows is not timed) and samples the whole batch. */
        const double gather_start = seconds_now();
        NCCL_OR_FAIL(ncclAllGather(device_share, device_shares, (size_t)rows * (size_t)share,
                                   ncclFloat, comm, stream));
        psm_tensor whole = {device_whole, PSM_DTYPE_F32, PSM_MEMORY_DEVICE, rows, vocab, 0};
        PSM_OR_FAIL(psm_sample(context, &whole, &params,
                               (psm_output){expected, PSM_MEMORY_HOST},
                               (psm_output){expected_logprobs, PSM_MEMORY_HOST}));
        CUDA_OR_FAIL(cudaStreamSynchronize(stream));
        gathered_ms[batch] = 1e3 * (seconds_now() - gather_start);

        agreed += memcmp(tokens, expected, (size_t)rows * SAMPLES * sizeof *tokens) == 0 &&
                  memcmp(logprobs, expected_logprobs,
                         (size_t)rows * SAMPLES * sizeof *logprobs) == 0;
    }
    printf("rank %d of %d: columns %lld..%lld of %lld, %d batches of %lld rows, top-p 0.9: %d "
           "rounds, %.0f bytes sent a row; tokens and logprobs equal to psm_sample on the whole "
           "batch in %d of %d batches; median step %.3f ms sharded, %.3f ms all-gather of the "
           "logits + psm_sample\n",
           rank, world, (long long)first, (long long)next - 1, (long long)vocab, batches,
           (long long)rows, rounds, (double)sent / (double)rows, agreed, batches,
           median(sharded_ms, batches), median(gathered_ms, batches));

    free(expected);
    free(expected_logprobs);
    free(tokens);
    free(logprobs);
    free(gathered);
    free(logits);
    free(sharded_ms);
    free(gathered_ms);
    cudaFree(device_send);
    cudaFree(device_gathered);
    cudaFree(device_mine);
    cudaFree(device_whole);
    cudaFree(device_share);
    cudaFree(device_shares);
    psm_context_destroy(context);
    ncclCommDestroy(comm);
    cudaStreamDestroy(stream);
    return agreed == batches ? 0 : 1;
}
