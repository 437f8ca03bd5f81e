/* bench_sharded.c: `polysample bench --shards`: each case also split by
 * vocabulary over simulated ranks (psm_sharded_*, docs/SAMPLING.md section
 * 8), all on the bench's one device, one rank after another. The ranks'
 * passes are measured; the all-gathers between the rounds are done by
 * memcpy and modelled (bench_exchange_model), since one device has no link
 * to measure. Every rank's tokens must be the unsharded call's. */
#define _POSIX_C_SOURCE 200809L
#include "bench.h"
#include "cli_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A call takes 4 rounds plus at most 16 radix levels (SAMPLING.md section
 * 8); more means the exchange has gone wrong, and the run stops there. */
#define MOST_ROUNDS 64
/* What no draw writes, so that a rank which wrote nothing is caught. */
#define POISON_TOKEN INT32_MIN

int bench_parse_shards_item(const char *item, int *value)
{
    uint64_t parsed;
    if (cli_parse_decimal(item, 1, PSM_MAX_SHARDS, &parsed, NULL, 0) != 0)
        return -1;
    *value = (int)parsed;
    return 0;
}

double bench_all_gather_ms(const bench_exchange_model *model, int shards, double bytes)
{
    /* A ring all-gather: each rank receives the other ranks' bytes. */
    if (shards < 2)
        return 0.0;
    return 1e-3 * model->collective_us +
           1e3 * (double)(shards - 1) * bytes / (model->link_gb_per_s * 1e9);
}

/* Rank k holds the columns [shard_first(k), shard_first(k + 1)): contiguous,
 * in rank order, their sizes within one of each other. */
static int64_t shard_first(int64_t vocab, int shards, int rank)
{
    return vocab * rank / shards;
}

/* One shard count's buffers on one backend. Each rank's tokens are in
 * host memory on every backend: the rounds decide them on the host, and
 * the GPU backends write them from there (core/sharded.c). */
typedef struct shard_set {
    const bench_case *shape;
    int shards;
    int rotation;  /* copies of the split logits, used in turn (as the unsharded inputs) */
    void **logits; /* copy c's rank k at c * shards + k */
    int32_t *tokens[PSM_MAX_SHARDS];
} shard_set;

static void release_shards(bench_backend *backend, shard_set *set)
{
    int i;
    for (i = 0; set->logits && i < set->rotation * set->shards; ++i) {
        if (backend->device)
            backend->device->release(backend->session, set->logits[i]);
        else
            free(set->logits[i]);
    }
    free(set->logits);
    for (i = 0; i < set->shards; ++i)
        free(set->tokens[i]);
    memset(set, 0, sizeof *set);
}

/* Splits host_logits (the shape's rows x vocab) into the set's shards, each
 * its own buffer of rows x shard columns (a cl_mem cannot be offset into),
 * and makes each rank's token output. 0, or -1 with a message in error
 * (release_shards then). */
static int place_shards(bench_backend *backend, const void *host_logits, shard_set *set,
                        char *error, size_t error_size)
{
    const bench_case *shape = set->shape;
    const size_t element = cli_dtype_size(shape->dtype);
    const size_t rows = (size_t)shape->rows;
    const size_t widest = (size_t)(shard_first(shape->vocab, set->shards, 1) + 1);
    unsigned char *staging = NULL;
    int rank, copy;

    set->logits = calloc((size_t)(set->rotation * set->shards), sizeof *set->logits);
    if (!set->logits || (backend->device && !(staging = malloc(rows * widest * element)))) {
        snprintf(error, error_size, "out of memory");
        return -1;
    }
    for (rank = 0; rank < set->shards; ++rank) {
        const int64_t first = shard_first(shape->vocab, set->shards, rank);
        const size_t columns = (size_t)(shard_first(shape->vocab, set->shards, rank + 1) - first);
        const size_t bytes = rows * columns * element;
        unsigned char *split = staging;
        size_t row;
        if (!backend->device && !(split = set->logits[rank] = malloc(bytes))) {
            snprintf(error, error_size, "out of memory");
            return -1;
        }
        for (row = 0; row < rows; ++row)
            memcpy(split + row * columns * element,
                   (const unsigned char *)host_logits +
                       (row * (size_t)shape->vocab + (size_t)first) * element,
                   columns * element);
        for (copy = 0; backend->device && copy < set->rotation; ++copy) {
            void **buffer = &set->logits[copy * set->shards + rank];
            if (backend->device->allocate(backend->session, bytes, buffer) != 0 ||
                backend->device->upload(backend->session, *buffer, split, bytes) != 0) {
                snprintf(error, error_size, "%s", backend->device->last_error(backend->session));
                free(staging);
                return -1;
            }
        }
        if (!(set->tokens[rank] = malloc(rows * sizeof(int32_t)))) {
            snprintf(error, error_size, "out of memory");
            free(staging);
            return -1;
        }
    }
    free(staging);
    return 0;
}

/* One case at one shard count. */
typedef struct sharded_call {
    const bench_config *config;
    bench_backend *backend;
    const shard_set *set;
    const bench_sharded_case *which;
} sharded_call;

/* One call's measurements. */
typedef struct sharded_run {
    double phases_ms;   /* the slowest rank's begin, each round's slowest rank, the slowest end */
    double exchange_ms; /* modelled */
    int rounds;
    size_t sent_bytes;  /* by one rank over the rounds */
} sharded_run;

static psm_tensor shard_tensor(const sharded_call *call, int copy, int rank)
{
    const shard_set *set = call->set;
    psm_tensor tensor;
    memset(&tensor, 0, sizeof tensor);
    tensor.data = set->logits[copy * set->shards + rank];
    tensor.dtype = set->shape->dtype;
    tensor.memory = call->backend->device ? PSM_MEMORY_DEVICE : PSM_MEMORY_HOST;
    tensor.rows = set->shape->rows;
    tensor.vocab = shard_first(set->shape->vocab, set->shards, rank + 1) -
                   shard_first(set->shape->vocab, set->shards, rank);
    tensor.row_stride = tensor.vocab;
    return tensor;
}

/* The failing call's message, naming the rank. */
static void describe(psm_status status, const char *what, int rank, char *error,
                     size_t error_size)
{
    snprintf(error, error_size, "%s on rank %d: %s: %s", what, rank, psm_status_string(status),
             psm_last_error());
}

/* Runs the call once on rotation copy `copy` of the shards: every rank
 * begins, then round by round every rank's psm_sharded_next in turn (the
 * ranks would run at once: a round lasts as long as its slowest rank),
 * the all-gather done by memcpy and its time taken from the model. The
 * passes synchronize, so the host clock times them. */
static psm_status run_once(const sharded_call *call, int copy, sharded_run *run, char *error,
                           size_t error_size)
{
    const shard_set *set = call->set;
    const int shards = set->shards;
    psm_context **contexts = call->backend->rank_contexts;
    psm_sharded *calls[PSM_MAX_SHARDS] = {NULL};
    const void *send[PSM_MAX_SHARDS];
    size_t send_bytes[PSM_MAX_SHARDS];
    unsigned char *gathered = NULL;
    size_t gathered_bytes = 0;
    psm_status status = PSM_OK;
    double slowest = 0.0;
    int rank;

    memset(run, 0, sizeof *run);
    for (rank = 0; rank < shards && status == PSM_OK; ++rank) {
        const psm_tensor logits = shard_tensor(call, copy, rank);
        const psm_shard shard = {shard_first(set->shape->vocab, shards, rank),
                                 set->shape->vocab, rank, shards};
        const double start = cli_now_seconds();
        status = psm_sharded_begin(contexts[rank], &logits, &shard, &call->which->params,
                                   (psm_output){set->tokens[rank], PSM_MEMORY_HOST},
                                   (psm_output){NULL, PSM_MEMORY_HOST}, &calls[rank]);
        if (status != PSM_OK)
            describe(status, "psm_sharded_begin", rank, error, error_size);
        if (1e3 * (cli_now_seconds() - start) > slowest)
            slowest = 1e3 * (cli_now_seconds() - start);
    }
    run->phases_ms += slowest;
    while (status == PSM_OK) {
        slowest = 0.0;
        for (rank = 0; rank < shards && status == PSM_OK; ++rank) {
            const double start = cli_now_seconds();
            status = psm_sharded_next(calls[rank], gathered, gathered_bytes, &send[rank],
                                      &send_bytes[rank]);
            if (status != PSM_OK)
                describe(status, "psm_sharded_next", rank, error, error_size);
            if (1e3 * (cli_now_seconds() - start) > slowest)
                slowest = 1e3 * (cli_now_seconds() - start);
        }
        run->phases_ms += slowest;
        for (rank = 1; rank < shards && status == PSM_OK; ++rank)
            if (send_bytes[rank] != send_bytes[0]) {
                snprintf(error, error_size, "rank %d sends %zu bytes in round %d, rank 0 %zu",
                         rank, send_bytes[rank], run->rounds + 1, send_bytes[0]);
                status = PSM_ERR_INTERNAL;
            }
        if (status != PSM_OK || send_bytes[0] == 0)
            break;
        if (run->rounds == MOST_ROUNDS) {
            snprintf(error, error_size, "more than %d rounds", MOST_ROUNDS);
            status = PSM_ERR_INTERNAL;
            break;
        }
        ++run->rounds;
        run->sent_bytes += send_bytes[0];
        run->exchange_ms +=
            bench_all_gather_ms(&call->config->exchange, shards, (double)send_bytes[0]);
        free(gathered);
        gathered_bytes = (size_t)shards * send_bytes[0];
        gathered = malloc(gathered_bytes);
        if (!gathered) {
            snprintf(error, error_size, "out of memory");
            status = PSM_ERR_OUT_OF_MEMORY;
            break;
        }
        for (rank = 0; rank < shards; ++rank)
            memcpy(gathered + (size_t)rank * send_bytes[0], send[rank], send_bytes[0]);
    }
    slowest = 0.0;
    for (rank = 0; rank < shards; ++rank) {
        const double start = cli_now_seconds();
        psm_sharded_end(calls[rank]);
        if (1e3 * (cli_now_seconds() - start) > slowest)
            slowest = 1e3 * (cli_now_seconds() - start);
    }
    run->phases_ms += slowest;
    free(gathered);
    return status;
}

/* Does every rank hold the unsharded call's tokens? 1 yes; 0 no, and
 * error says where. */
static int same_tokens(const sharded_call *call, char *error, size_t error_size)
{
    const int32_t *expected = call->which->expected_tokens;
    int64_t row;
    int rank;
    for (rank = 0; rank < call->set->shards; ++rank)
        for (row = 0; row < call->set->shape->rows; ++row)
            if (call->set->tokens[rank][row] != expected[row]) {
                snprintf(error, error_size,
                         "TOKENS DIFFER: rank %d drew %d at row %lld where psm_sample drew %d",
                         rank, (int)call->set->tokens[rank][row], (long long)row,
                         (int)expected[row]);
                return 0;
            }
    return 1;
}

/* One run with its outputs poisoned before (a rank that wrote nothing is
 * caught) and checked after. 0, or -1 with the result marked (failed,
 * unsupported or tokens_differ). */
static int run_checked(const sharded_call *call, int copy, sharded_run *run,
                       bench_sharded_result *result)
{
    psm_status status;
    int64_t row;
    int rank;
    for (rank = 0; rank < call->set->shards; ++rank)
        for (row = 0; row < call->set->shape->rows; ++row)
            call->set->tokens[rank][row] = POISON_TOKEN;
    status = run_once(call, copy, run, result->error, sizeof result->error);
    if (status != PSM_OK) {
        if (status == PSM_ERR_UNSUPPORTED)
            result->unsupported = 1;
        else
            result->failed = 1;
        return -1;
    }
    if (!same_tokens(call, result->error, sizeof result->error)) {
        result->failed = 1;
        result->tokens_differ = 1;
        return -1;
    }
    return 0;
}

/* A warm-up, then the timed runs, each on the next rotation copy. */
static void time_sharded_case(const sharded_call *call, bench_sharded_result *result)
{
    const bench_case *which = &call->which->unsharded->which;
    double phases[BENCH_MAX_RUNS];
    sharded_run run;
    double started = cli_now_seconds(), warm_up_s;
    int runs = 0, copy = 0;

    if (run_checked(call, copy, &run, result) != 0)
        return;
    warm_up_s = cli_now_seconds() - started;
    started = cli_now_seconds();
    while (!bench_enough_runs(call->config, runs, cli_now_seconds() - started, warm_up_s)) {
        copy = (copy + 1) % call->set->rotation;
        if (run_checked(call, copy, &run, result) != 0)
            return;
        phases[runs++] = run.phases_ms;
    }
    /* Rounds and bytes are the same every run: the same inputs and seed. */
    result->runs = runs;
    result->phases_ms = cli_median(phases, runs);
    result->rounds = run.rounds;
    result->send_bytes_per_row = (double)run.sent_bytes / (double)which->rows;
    result->exchange_ms = run.exchange_ms;
    result->gather_ms = bench_all_gather_ms(
        &call->config->exchange, result->shards,
        (double)which->rows * (double)which->vocab * (double)cli_dtype_size(which->dtype) /
            result->shards);
}

/* Why a case is not run split, or NULL when it is. */
static const char *not_split(const bench_sharded_case *one, int shards, int *failed)
{
    const bench_result *unsharded = one->unsharded;
    *failed = 0;
    if (unsharded->which.setting == SETTING_VERIFY)
        return "psm_verify has no sharded form";
    if (shards > unsharded->which.vocab)
        return "more shards than tokens in a row";
    if (unsharded->unsupported)
        return "psm_sample refused the case";
    *failed = 1;
    if (unsharded->failed)
        return "psm_sample failed on the case";
    if (!one->expected_tokens)
        return "psm_sample's tokens could not be read back to compare with";
    *failed = 0;
    return NULL;
}

void bench_run_sharded(const bench_config *config, bench_backend *backend,
                       const void *host_logits, int rotation, const bench_sharded_case *cases,
                       int case_count, bench_sharded_result *results)
{
    const bench_case *shape = &cases[0].unsharded->which;
    int s, i;
    for (s = 0; s < config->sharding_count; ++s) {
        const int shards = config->shard_counts[s];
        shard_set set;
        char error[320] = "";
        int runnable = 0, failed;
        psm_status status;
        for (i = 0; i < case_count; ++i)
            runnable += not_split(&cases[i], shards, &failed) == NULL;
        memset(&set, 0, sizeof set);
        set.shape = shape;
        set.shards = shards;
        set.rotation = backend->device ? rotation : 1;
        if (runnable > 0) {
            if ((status = bench_open_rank_contexts(config, backend, shards)) != PSM_OK)
                snprintf(error, sizeof error, "a rank's context: %s: %s",
                         psm_status_string(status), psm_last_error());
            else
                place_shards(backend, host_logits, &set, error, sizeof error);
        }
        for (i = 0; i < case_count; ++i) {
            bench_sharded_result *result = &results[i * config->sharding_count + s];
            const bench_result *unsharded = cases[i].unsharded;
            const char *reason = not_split(&cases[i], shards, &failed);
            memset(result, 0, sizeof *result);
            result->unsharded = unsharded;
            result->shards = shards;
            if (config->show_progress)
                fprintf(stderr, "sharded: %s %lld x %lld %s %s %s, %d shards ... ",
                        psm_backend_name(backend->backend), (long long)unsharded->which.rows,
                        (long long)unsharded->which.vocab,
                        bench_distribution_name(unsharded->which.distribution),
                        cli_dtype_name(unsharded->which.dtype),
                        bench_settings[unsharded->which.setting].name, shards);
            if (reason) {
                snprintf(result->error, sizeof result->error, "%s", reason);
                result->failed = failed;
                result->unsupported = !failed;
            } else if (error[0]) {
                snprintf(result->error, sizeof result->error, "%s", error);
                result->failed = 1;
            } else {
                sharded_call call = {config, backend, &set, &cases[i]};
                time_sharded_case(&call, result);
            }
            if (config->show_progress) {
                if (result->unsupported)
                    fprintf(stderr, "unsupported: %s\n", result->error);
                else if (result->failed)
                    fprintf(stderr, "failed: %s\n", result->error);
                else
                    fprintf(stderr, "%.3f ms of passes, %d rounds (%d runs)\n",
                            result->phases_ms, result->rounds, result->runs);
            }
        }
        release_shards(backend, &set);
    }
}
