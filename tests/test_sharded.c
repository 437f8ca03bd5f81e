/* test_sharded.c: psm_sharded_* against psm_sample on the whole rows
 * (docs/SAMPLING.md, section 8). Ranks are simulated in one process: each
 * has its own call on its columns of the full logits (a strided view), and
 * each round's all-gather is a concatenation in shard_index order. Every
 * rank's tokens and logprobs must equal the unsharded call's bit for bit,
 * for splits at and inside tile boundaries, uneven and one-token shards,
 * shards smaller than a tile, 1 to 8 shards and shard indices out of token
 * order; and a bad exchange or input must fail with nothing written. */
#include "device_memory.h"
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 6
#define VOCAB 5000 /* four whole tiles and a partial one */
#define SAMPLES 3
#define MAX_ROUNDS 40
#define POISON 0x5a5a5a5a

/* A split: piece k (in token order) has sizes[k] tokens and is shard
 * index[k]. */
typedef struct split {
    const char *name;
    int count;
    int64_t sizes[8];
    int index[8];
} split;

static split make_split(const char *name, int count, const int64_t *sizes, const int *index)
{
    split s = {name, count, {0}, {0}};
    for (int k = 0; k < count; ++k) {
        s.sizes[k] = sizes[k];
        s.index[k] = index ? index[k] : k;
    }
    return s;
}

/* Row 0-2: N(0, 2^2); row 3: ties (values on a 0.5 grid); row 4: most
 * tokens masked (-inf), the rest spread over every shard; row 5: a peaked
 * row, one token far above the rest. Values are exact in bf16. */
static float *make_logits(uint64_t seed)
{
    float *logits = psm_test_alloc((size_t)ROWS * VOCAB, sizeof(float));
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int r = 0; r < ROWS; ++r)
        for (int i = 0; i < VOCAB; ++i) {
            float x = (float)(2.0 * psm_test_rng_normal(&rng));
            if (r == 3)
                x = floorf(x * 2.0f) / 2.0f;
            if (r == 4 && psm_test_rng_below(&rng, 10) != 0)
                x = -INFINITY;
            if (r == 5 && i == 4321)
                x = 30.0f;
            /* bf16-exact: the top 16 bits (an infinity keeps its own) */
            uint32_t bits;
            memcpy(&bits, &x, sizeof bits);
            bits &= 0xffff0000u;
            memcpy(&logits[(size_t)r * VOCAB + i], &bits, sizeof bits);
        }
    return logits;
}

static uint16_t *to_bf16(const float *logits)
{
    uint16_t *out = psm_test_alloc((size_t)ROWS * VOCAB, sizeof(uint16_t));
    for (size_t i = 0; i < (size_t)ROWS * VOCAB; ++i)
        out[i] = psm_test_bf16_exact(logits[i]);
    return out;
}

typedef struct rank_outputs {
    int32_t tokens[ROWS * SAMPLES];
    float logprobs[ROWS * SAMPLES];
} rank_outputs;

/* Rank's shard as a tensor: a strided view of the host rows, or (memory
 * given) its columns copied into a buffer of their own of the memory's
 * kind, as a tensor-parallel rank holds them. */
static psm_tensor shard_tensor(psm_test_memory *memory, const void *logits, psm_dtype dtype,
                               int64_t first, int64_t count)
{
    const size_t element = dtype == PSM_DTYPE_F32 ? 4 : 2;
    if (!memory)
        return psm_test_tensor((char *)logits + (size_t)first * element, dtype, ROWS, count,
                               VOCAB);
    unsigned char *packed = psm_test_alloc((size_t)ROWS * (size_t)count, element);
    for (int r = 0; r < ROWS; ++r)
        memcpy(packed + (size_t)r * (size_t)count * element,
               (const char *)logits + ((size_t)r * VOCAB + (size_t)first) * element,
               (size_t)count * element);
    psm_tensor t = psm_test_tensor(
        psm_test_memory_copy_in(memory, packed, (size_t)ROWS * (size_t)count * element), dtype,
        ROWS, count, 0);
    t.memory = psm_test_memory_kind(memory);
    free(packed);
    return t;
}

/* Runs one sharded call over the split, every rank in turn each round, on
 * host logits or (memory given) on copies in its memory. Returns PSM_OK or
 * the first failing status (every rank must fail alike, in the same
 * round). */
static psm_status run_split_in(psm_context *context, psm_test_memory *memory, const void *logits,
                               psm_dtype dtype, const psm_params *params, const split *s,
                               rank_outputs *out)
{
    psm_sharded *calls[8] = {0};
    psm_status status = PSM_OK;
    int64_t first = 0;
    for (int k = 0; k < s->count; ++k) {
        const int rank = s->index[k];
        psm_tensor shard_logits = shard_tensor(memory, logits, dtype, first, s->sizes[k]);
        const psm_shard shard = {first, VOCAB, rank, s->count};
        for (int i = 0; i < ROWS * SAMPLES; ++i) {
            out[rank].tokens[i] = POISON;
            memset(&out[rank].logprobs[i], 0x5a, sizeof(float));
        }
        status = psm_sharded_begin(context, &shard_logits, &shard, params,
                                   psm_test_output(out[rank].tokens),
                                   psm_test_output(out[rank].logprobs), &calls[rank]);
        ck_assert_msg(status == PSM_OK, "%s: begin on rank %d: %s", s->name, rank,
                      psm_last_error());
        first += s->sizes[k];
    }
    ck_assert_int_eq(first, VOCAB);
    unsigned char *gathered = NULL;
    size_t gathered_bytes = 0;
    int round;
    for (round = 0; round < MAX_ROUNDS; ++round) {
        const void *send[8];
        size_t bytes[8];
        psm_status first_status = PSM_OK;
        for (int rank = 0; rank < s->count; ++rank) {
            const psm_status st =
                psm_sharded_next(calls[rank], gathered, gathered_bytes, &send[rank], &bytes[rank]);
            if (rank == 0)
                first_status = st;
            ck_assert_msg(st == first_status, "%s: rank %d returned %s where rank 0 returned %s",
                          s->name, rank, psm_status_string(st), psm_status_string(first_status));
        }
        if (first_status != PSM_OK) {
            status = first_status;
            break;
        }
        for (int rank = 1; rank < s->count; ++rank)
            ck_assert_msg(bytes[rank] == bytes[0], "%s: rank %d sends %zu bytes, rank 0 %zu",
                          s->name, rank, bytes[rank], bytes[0]);
        if (bytes[0] == 0)
            break;
        gathered_bytes = (size_t)s->count * bytes[0];
        free(gathered);
        gathered = psm_test_alloc(gathered_bytes, 1);
        for (int rank = 0; rank < s->count; ++rank)
            memcpy(gathered + (size_t)rank * bytes[0], send[rank], bytes[0]);
    }
    ck_assert_msg(round < MAX_ROUNDS, "%s: more than %d rounds", s->name, MAX_ROUNDS);
    free(gathered);
    for (int rank = 0; rank < s->count; ++rank)
        psm_sharded_end(calls[rank]);
    return status;
}

static psm_status run_split(psm_context *context, const void *logits, psm_dtype dtype,
                            const psm_params *params, const split *s, rank_outputs *out)
{
    return run_split_in(context, NULL, logits, dtype, params, s, out);
}

static void expect_equal(const char *what, const split *s, const rank_outputs *expected,
                         const rank_outputs *out)
{
    for (int rank = 0; rank < s->count; ++rank)
        for (int i = 0; i < ROWS * SAMPLES; ++i) {
            ck_assert_msg(out[rank].tokens[i] == expected->tokens[i],
                          "%s, split %s: rank %d, row %d sample %d: token %d, unsharded %d", what,
                          s->name, rank, i / SAMPLES, i % SAMPLES, out[rank].tokens[i],
                          expected->tokens[i]);
            ck_assert_msg(memcmp(&out[rank].logprobs[i], &expected->logprobs[i], sizeof(float)) == 0,
                          "%s, split %s: rank %d, row %d sample %d: logprob %.9g, unsharded %.9g",
                          what, s->name, rank, i / SAMPLES, i % SAMPLES,
                          (double)out[rank].logprobs[i], (double)expected->logprobs[i]);
        }
}

#define RANDOM_SPLITS 12
static split random_split(psm_test_rng *rng);

static int splits_for(split *splits, uint64_t seed)
{
    int n = 0;
    splits[n++] = make_split("whole", 1, (int64_t[]){VOCAB}, NULL);
    splits[n++] = make_split("two at a tile edge", 2, (int64_t[]){2048, VOCAB - 2048}, NULL);
    splits[n++] = make_split("two inside a tile", 2, (int64_t[]){1500, VOCAB - 1500}, NULL);
    splits[n++] = make_split("one token, then uneven", 3, (int64_t[]){1, 700, VOCAB - 701}, NULL);
    splits[n++] = make_split("reversed indices", 4, (int64_t[]){1000, 1100, 1300, VOCAB - 3400},
                             (int[]){3, 2, 1, 0});
    splits[n++] = make_split("smaller than a tile", 8,
                             (int64_t[]){300, 300, 300, 300, 300, 300, 300, VOCAB - 2100},
                             (int[]){5, 0, 7, 2, 1, 6, 3, 4});
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int r = 0; r < RANDOM_SPLITS; ++r)
        splits[n++] = random_split(&rng);
    return n;
}

/* Up to eight shards at random cuts, in random index order. */
static split random_split(psm_test_rng *rng)
{
    int64_t cuts[7];
    const int cut_count = (int)psm_test_rng_below(rng, 8);
    for (int k = 0; k < cut_count; ++k)
        cuts[k] = 1 + (int64_t)psm_test_rng_below(rng, VOCAB - 1);
    for (int a = 1; a < cut_count; ++a)
        for (int b = a; b > 0 && cuts[b] < cuts[b - 1]; --b) {
            const int64_t t = cuts[b];
            cuts[b] = cuts[b - 1];
            cuts[b - 1] = t;
        }
    int64_t sizes[8];
    int64_t at = 0, kept = 0;
    for (int k = 0; k < cut_count; ++k)
        if (cuts[k] > at) {
            sizes[kept++] = cuts[k] - at;
            at = cuts[k];
        }
    sizes[kept++] = VOCAB - at;
    int index[8];
    for (int k = 0; k < (int)kept; ++k)
        index[k] = k;
    for (int k = (int)kept - 1; k > 0; --k) {
        const int j = (int)psm_test_rng_below(rng, (uint64_t)k + 1);
        const int t = index[k];
        index[k] = index[j];
        index[j] = t;
    }
    return make_split("random", (int)kept, sizes, index);
}

/* The parameter sets: scalars of every filter and their combinations,
 * greedy, per-row arrays with seeds and subsequences, a row gather. */
#define PARAM_SETS 10
static psm_params params_of(int set, float *temperature, int32_t *top_k, float *top_p,
                            float *min_p, uint64_t *seeds, uint32_t *subsequences)
{
    psm_params p;
    psm_params_init(&p);
    p.temperature = 0.8f;
    p.seed = 1234;
    p.offset = 77;
    p.num_samples = SAMPLES;
    switch (set) {
    case 0: break;                                   /* plain */
    case 1: p.top_k = 50; p.top_p = 0.9f; break;
    case 2: p.top_p = 0.9f; break;
    case 3: p.min_p = 0.1f; break;
    case 4: p.top_k = 5; break;
    case 5: p.top_k = 40; p.top_p = 0.8f; p.min_p = 0.05f; break;
    case 6: p.temperature = 0.0f; break;             /* greedy */
    case 7:
        for (int r = 0; r < ROWS; ++r) {
            temperature[r] = r == 2 ? 0.0f : 0.5f + 0.25f * (float)r;
            top_k[r] = r % 3 == 0 ? 0 : 7 * r;
            top_p[r] = r % 2 ? 0.7f : 1.0f;
            min_p[r] = r == 4 ? 0.2f : 0.0f;
            seeds[r] = 1000u + (uint64_t)r * 17u;
            subsequences[r] = (uint32_t)(ROWS - r);
        }
        p.temperature_per_row = temperature;
        p.top_k_per_row = top_k;
        p.top_p_per_row = top_p;
        p.min_p_per_row = min_p;
        p.seed_per_row = seeds;
        p.subsequence_per_row = subsequences;
        break;
    case 8: p.top_p = 0.95f; p.temperature = 1.7f; p.offset = 1u << 20; break;
    case 9: {
        static const int64_t gather[ROWS] = {5, 0, 5, 3, 2, 2};
        p.row_indices = gather;
        p.output_rows = ROWS;
        p.top_k = 20;
        p.min_p = 0.02f;
        break;
    }
    }
    return p;
}

/* Every split's ranks (host logits, or copies in memory) against the
 * reference context's unsharded call on the host logits. */
static void expect_splits_equal(psm_context *context, psm_test_memory *memory,
                                psm_context *reference, const void *data, psm_dtype dtype,
                                const psm_params *p, const split *splits, int split_count,
                                const char *label, int set)
{
    rank_outputs expected;
    psm_tensor whole = psm_test_tensor((void *)data, dtype, ROWS, VOCAB, 0);
    PSM_CHECK_OK(psm_sample(reference, &whole, p, psm_test_output(expected.tokens),
                            psm_test_output(expected.logprobs)));
    for (int k = 0; k < split_count; ++k) {
        rank_outputs out[8];
        const psm_status status = run_split_in(context, memory, data, dtype, p, &splits[k], out);
        ck_assert_msg(status == PSM_OK, "%s: %s", label, psm_last_error());
        char what[96];
        snprintf(what, sizeof what, "%s, parameter set %d", label, set);
        expect_equal(what, &splits[k], &expected, out);
    }
}

/* On a GPU backend with device logits (memory given), the calls the host
 * rounds cannot serve are refused at begin with nothing written: per-row
 * arrays, which would be device memory too, and outputs in device memory.
 * Returns whether parameter set `set` is refused (and so not compared). */
static int refused_with_device_logits(psm_backend backend, psm_test_memory *memory,
                                      const void *data, psm_dtype dtype, const psm_params *p,
                                      int set)
{
    if (!memory || backend == PSM_BACKEND_CPU)
        return 0;
    const int per_row = p->temperature_per_row || p->top_k_per_row || p->top_p_per_row ||
                        p->min_p_per_row || p->seed_per_row || p->offset_per_row ||
                        p->subsequence_per_row || p->row_indices;
    if (!per_row && set != 0)
        return 0;
    psm_context *context = psm_test_memory_context(memory);
    psm_tensor t = shard_tensor(memory, data, dtype, 0, VOCAB);
    const psm_shard shard = {0, VOCAB, 0, 1};
    psm_sharded *call = NULL;
    if (per_row) {
        int32_t tokens[ROWS * SAMPLES];
        for (int i = 0; i < ROWS * SAMPLES; ++i)
            tokens[i] = POISON;
        ck_assert_int_eq(psm_sharded_begin(context, &t, &shard, p, psm_test_output(tokens),
                                           psm_test_output(NULL), &call),
                         PSM_ERR_UNSUPPORTED);
        ck_assert_ptr_null(call);
        for (int i = 0; i < ROWS * SAMPLES; ++i)
            ck_assert_int_eq(tokens[i], POISON);
        return 1;
    }
    /* Set 0 without per-row arrays: outputs are written by the host. */
    psm_output device_tokens = {
        psm_test_memory_filled(memory, ROWS * SAMPLES * sizeof(int32_t), 0x5a),
        PSM_MEMORY_DEVICE};
    ck_assert_int_eq(psm_sharded_begin(context, &t, &shard, p, device_tokens,
                                       psm_test_output(NULL), &call),
                     PSM_ERR_UNSUPPORTED);
    ck_assert_ptr_null(call);
    return 0;
}

/* Every split and parameter set against the CPU backend's unsharded call:
 * host logits as strided views, or (memory given) each rank's shard copied
 * into a buffer of that memory. */
static void check_identity(psm_backend backend, psm_test_memory *memory, psm_dtype dtype,
                           uint64_t logits_seed, uint64_t split_seed, const char *test_name)
{
    psm_context *own = memory ? NULL : psm_test_open(backend);
    psm_context *context = memory ? psm_test_memory_context(memory) : own;
    psm_context *reference = psm_test_open(PSM_BACKEND_CPU);
    float *logits = make_logits(logits_seed);
    uint16_t *bf16 = dtype == PSM_DTYPE_BF16 ? to_bf16(logits) : NULL;
    const void *data = bf16 ? (const void *)bf16 : (const void *)logits;
    split splits[6 + RANDOM_SPLITS];
    const int split_count = splits_for(splits, split_seed);
    float temperature[ROWS], top_p[ROWS], min_p[ROWS];
    int32_t top_k[ROWS];
    uint64_t seeds[ROWS];
    uint32_t subsequences[ROWS];
    for (int set = 0; set < PARAM_SETS; ++set) {
        const psm_params p = params_of(set, temperature, top_k, top_p, min_p, seeds, subsequences);
        if (!refused_with_device_logits(backend, memory, data, dtype, &p, set))
            expect_splits_equal(context, memory, reference, data, dtype, &p, splits, split_count,
                                test_name, set);
    }
    free(bf16);
    free(logits);
    psm_context_destroy(reference);
    psm_context_destroy(own);
}

/* A backend other than the CPU one refuses at begin, writing nothing. */
static int sharded_runs_on(psm_backend backend, const char *test_name)
{
    if (backend == PSM_BACKEND_CPU)
        return 1;
    psm_context *context = psm_test_open(backend);
    float logits[16] = {0};
    int32_t tokens[1] = {POISON};
    psm_tensor t = psm_test_tensor(logits, PSM_DTYPE_F32, 1, 16, 0);
    psm_shard shard = {0, 16, 0, 1};
    psm_params p;
    psm_params_init(&p);
    psm_sharded *call = NULL;
    const psm_status status = psm_sharded_begin(context, &t, &shard, &p, psm_test_output(tokens),
                                                psm_test_output(NULL), &call);
    psm_sharded_end(call);
    const int ran = psm_test_feature_ran(context, backend, status, test_name, "sharded sampling",
                                         tokens, 1, POISON);
    psm_context_destroy(context);
    return ran;
}

PSM_PROPERTY(sharded_f32_equals_unsharded)
{
    if (sharded_runs_on(backend, "sharded_f32_equals_unsharded"))
        check_identity(backend, NULL, PSM_DTYPE_F32, 99, 7, "sharded_f32_equals_unsharded");
}

PSM_PROPERTY(sharded_bf16_equals_unsharded)
{
    if (sharded_runs_on(backend, "sharded_bf16_equals_unsharded"))
        check_identity(backend, NULL, PSM_DTYPE_BF16, 99, 7, "sharded_bf16_equals_unsharded");
}

/* Each rank's shard in a buffer of the backend's device memory (a GPU's, or
 * the CPU backend's host memory), bf16 here: every split; on a GPU backend
 * the parameter sets with per-row arrays, and device outputs, are refused
 * (refused_with_device_logits). */
PSM_PROPERTY(sharded_device_logits_equal_unsharded)
{
    const char *why = psm_test_memory_unavailable(backend, PSM_MEMORY_DEVICE);
    if (why) {
        psm_test_skip(psm_backend_name(backend), "sharded_device_logits_equal_unsharded", why);
        return;
    }
    if (!sharded_runs_on(backend, "sharded_device_logits_equal_unsharded"))
        return;
    psm_test_memory *memory = psm_test_memory_open(backend, PSM_MEMORY_DEVICE, 0);
    check_identity(backend, memory, PSM_DTYPE_BF16, 123, 11, "device logits");
    psm_test_memory_close(memory);
}

/* ---- bad rows and bad input (the CPU backend) ---------------------------- */

/* A NaN in one shard makes its row bad on every rank (token -1, logprob
 * NaN, as unsharded); in checking mode every rank fails in the first
 * exchange with PSM_ERR_BAD_ROW and writes nothing. */
START_TEST(sharded_bad_rows)
{
    float *logits = make_logits(5);
    logits[(size_t)2 * VOCAB + 4500] = NAN;
    for (int i = 0; i < VOCAB; ++i)
        logits[(size_t)1 * VOCAB + i] = -INFINITY; /* no valid token */
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    psm_params p;
    psm_params_init(&p);
    p.num_samples = SAMPLES;
    p.top_p = 0.9f;
    rank_outputs expected, out[8];
    psm_tensor whole = psm_test_tensor(logits, PSM_DTYPE_F32, ROWS, VOCAB, 0);
    PSM_CHECK_OK(psm_sample(context, &whole, &p, psm_test_output(expected.tokens),
                            psm_test_output(expected.logprobs)));
    ck_assert_int_eq(expected.tokens[2 * SAMPLES], -1);
    ck_assert_int_eq(expected.tokens[1 * SAMPLES], -1);
    const split s = make_split("NaN in the second shard", 2, (int64_t[]){4000, VOCAB - 4000}, NULL);
    PSM_CHECK_OK(run_split(context, logits, PSM_DTYPE_F32, &p, &s, out));
    expect_equal("bad rows", &s, &expected, out);
    psm_context_destroy(context);

    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    options.check_rows = 1;
    psm_context *checking = psm_test_open_with(&options);
    const psm_status status = run_split(checking, logits, PSM_DTYPE_F32, &p, &s, out);
    ck_assert_msg(status == PSM_ERR_BAD_ROW, "checking mode: %s", psm_status_string(status));
    ck_assert_msg(strstr(psm_last_error(), "row 1") != NULL, "%s", psm_last_error());
    for (int rank = 0; rank < 2; ++rank)
        for (int i = 0; i < ROWS * SAMPLES; ++i)
            ck_assert_int_eq(out[rank].tokens[i], POISON);
    psm_context_destroy(checking);
    free(logits);
}
END_TEST

/* begin refuses bad shards and unsupported features. */
START_TEST(sharded_begin_refuses)
{
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    float logits[2 * 100] = {0};
    int32_t tokens[2] = {POISON, POISON};
    psm_tensor t = psm_test_tensor(logits, PSM_DTYPE_F32, 2, 100, 0);
    psm_params p;
    psm_params_init(&p);
    psm_sharded *call = NULL;
    const struct {
        psm_shard shard;
        psm_status status;
        const char *message;
    } cases[] = {
        {{0, 100, 0, 0}, PSM_ERR_INVALID_ARGUMENT, "shard_count"},
        {{0, 100, 0, PSM_MAX_SHARDS + 1}, PSM_ERR_INVALID_ARGUMENT, "shard_count"},
        {{0, 100, 2, 2}, PSM_ERR_INVALID_ARGUMENT, "shard_index"},
        {{0, 100, -1, 2}, PSM_ERR_INVALID_ARGUMENT, "shard_index"},
        {{50, 120, 0, 2}, PSM_ERR_INVALID_ARGUMENT, "outside the full row"},
        {{-1, 200, 0, 2}, PSM_ERR_INVALID_ARGUMENT, "outside the full row"},
        {{0, 0, 0, 1}, PSM_ERR_INVALID_ARGUMENT, "full_vocab"},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; ++k) {
        const psm_status status = psm_sharded_begin(context, &t, &cases[k].shard, &p,
                                                    psm_test_output(tokens), psm_test_output(NULL),
                                                    &call);
        ck_assert_msg(status == cases[k].status && strstr(psm_last_error(), cases[k].message),
                      "case %zu: %s: %s", k, psm_status_string(status), psm_last_error());
        ck_assert_ptr_null(call);
    }
    const psm_shard ok = {0, 100, 0, 1};
    ck_assert_int_eq(psm_sharded_begin(context, &t, NULL, &p, psm_test_output(tokens),
                                       psm_test_output(NULL), &call),
                     PSM_ERR_INVALID_ARGUMENT);
    psm_params bad = p;
    bad.top_p = 1.5f;
    ck_assert_int_eq(psm_sharded_begin(context, &t, &ok, &bad, psm_test_output(tokens),
                                       psm_test_output(NULL), &call),
                     PSM_ERR_INVALID_PARAMETER);
    int32_t top_tokens[4];
    float top_values[4];
    psm_top_logprobs top = {0};
    top.count = 2;
    top.mode = PSM_LOGPROBS_PROCESSED;
    top.tokens = psm_test_output(top_tokens);
    top.logprobs = psm_test_output(top_values);
    bad = p;
    bad.top_logprobs = &top;
    ck_assert_int_eq(psm_sharded_begin(context, &t, &ok, &bad, psm_test_output(tokens),
                                       psm_test_output(NULL), &call),
                     PSM_ERR_UNSUPPORTED);
    /* Processing whose lists name tokens of the full row (beyond this
     * shard's columns): refused as unsupported, not as out of range. */
    const int64_t history_offsets[3] = {0, 1, 1};
    const int32_t history_tokens[1] = {150};
    psm_logit_processing processing;
    psm_logit_processing_init(&processing);
    processing.history_offsets = history_offsets;
    processing.history_tokens = history_tokens;
    processing.repetition_penalty = 1.2f;
    bad = p;
    bad.processing = &processing;
    const psm_shard first_half = {0, 200, 0, 2};
    ck_assert_int_eq(psm_sharded_begin(context, &t, &first_half, &bad, psm_test_output(tokens),
                                       psm_test_output(NULL), &call),
                     PSM_ERR_UNSUPPORTED);
    bad = p;
    bad.filter_order = PSM_FILTER_ORDER_VLLM;
    ck_assert_int_eq(psm_sharded_begin(context, &t, &ok, &bad, psm_test_output(tokens),
                                       psm_test_output(NULL), &call),
                     PSM_ERR_UNSUPPORTED);
    ck_assert_ptr_null(call);
    ck_assert_int_eq(tokens[0], POISON);
    ck_assert_int_eq(tokens[1], POISON);
    psm_context_destroy(context);
}
END_TEST

/* Two ranks, each half of the row, through their first round. */
static void start_halves(psm_context *context, float *logits, const psm_params *p,
                         rank_outputs *out, psm_sharded **calls, const void **send, size_t *bytes)
{
    for (int rank = 0; rank < 2; ++rank) {
        psm_tensor t = psm_test_tensor(logits + rank * 2500, PSM_DTYPE_F32, ROWS, 2500, VOCAB);
        const psm_shard shard = {rank * 2500, VOCAB, rank, 2};
        PSM_CHECK_OK(psm_sharded_begin(context, &t, &shard, p, psm_test_output(out[rank].tokens),
                                       psm_test_output(NULL), &calls[rank]));
        PSM_CHECK_OK(psm_sharded_next(calls[rank], NULL, 0, &send[rank], &bytes[rank]));
    }
}

/* A bad exchange fails the call with nothing written: shards that overlap,
 * a gathered buffer of the wrong size or out of shard order, a call asked
 * for more after it finished. */
START_TEST(sharded_bad_exchanges)
{
    float *logits = make_logits(11);
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    psm_params p;
    psm_params_init(&p);
    p.num_samples = SAMPLES;
    rank_outputs out[8];
    /* Overlap: both ranks claim columns 0 .. 2999 of a 5000-token row. */
    psm_sharded *calls[2];
    const void *send[2];
    size_t bytes[2];
    for (int rank = 0; rank < 2; ++rank) {
        psm_tensor t = psm_test_tensor(logits, PSM_DTYPE_F32, ROWS, 3000, VOCAB);
        const psm_shard shard = {0, VOCAB, rank, 2};
        for (int i = 0; i < ROWS * SAMPLES; ++i)
            out[rank].tokens[i] = POISON;
        PSM_CHECK_OK(psm_sharded_begin(context, &t, &shard, &p, psm_test_output(out[rank].tokens),
                                       psm_test_output(NULL), &calls[rank]));
        PSM_CHECK_OK(psm_sharded_next(calls[rank], NULL, 0, &send[rank], &bytes[rank]));
    }
    unsigned char *gathered = psm_test_alloc(2 * bytes[0], 1);
    memcpy(gathered, send[0], bytes[0]);
    memcpy(gathered + bytes[0], send[1], bytes[1]);
    const void *next;
    size_t next_bytes;
    ck_assert_int_eq(psm_sharded_next(calls[0], gathered, 2 * bytes[0], &next, &next_bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "overlap"), "%s", psm_last_error());
    ck_assert_int_eq(next_bytes, 0);
    /* The wrong size, and records out of shard order. */
    ck_assert_int_eq(psm_sharded_next(calls[1], gathered, bytes[0], &next, &next_bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "gathered_bytes"), "%s", psm_last_error());
    for (int rank = 0; rank < 2; ++rank)
        psm_sharded_end(calls[rank]);
    start_halves(context, logits, &p, out, calls, send, bytes);
    memcpy(gathered, send[1], bytes[1]); /* rank 1's record first */
    memcpy(gathered + bytes[0], send[0], bytes[0]);
    ck_assert_int_eq(psm_sharded_next(calls[0], gathered, 2 * bytes[0], &next, &next_bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "shard_index order"), "%s", psm_last_error());
    /* A corrupt record: columns beyond the full row. */
    for (int rank = 0; rank < 2; ++rank)
        psm_sharded_end(calls[rank]);
    start_halves(context, logits, &p, out, calls, send, bytes);
    memcpy(gathered, send[0], bytes[0]);
    memcpy(gathered + bytes[0], send[1], bytes[1]);
    uint64_t huge = UINT64_MAX - 5;
    memcpy(gathered + bytes[0] + 3 * sizeof(uint64_t), &huge, sizeof huge); /* rank 1's count */
    ck_assert_int_eq(psm_sharded_next(calls[0], gathered, 2 * bytes[0], &next, &next_bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "corrupt"), "%s", psm_last_error());
    /* A corrupt record: row 0's best key is +inf's (rank 1's; the header is
     * 4 words, the summary's first word per row the best key). */
    ck_assert_int_eq(psm_sharded_next(calls[1], NULL, 0, &send[1], &bytes[1]),
                     PSM_ERR_INVALID_ARGUMENT); /* calls[1] is mid-call: NULL is refused */
    for (int rank = 0; rank < 2; ++rank)
        psm_sharded_end(calls[rank]);
    start_halves(context, logits, &p, out, calls, send, bytes);
    memcpy(gathered, send[0], bytes[0]);
    memcpy(gathered + bytes[0], send[1], bytes[1]);
    const uint64_t infinite_key = 0xff800000ffffffffull;
    memcpy(gathered + bytes[0] + 4 * sizeof(uint64_t), &infinite_key, sizeof infinite_key);
    ck_assert_int_eq(psm_sharded_next(calls[0], gathered, 2 * bytes[0], &next, &next_bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "not a finite logit"), "%s", psm_last_error());
    /* A failed call is over. */
    ck_assert_int_eq(psm_sharded_next(calls[0], gathered, 2 * bytes[0], &next, &next_bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "finished"), "%s", psm_last_error());
    for (int rank = 0; rank < 2; ++rank) {
        for (int i = 0; i < ROWS * SAMPLES; ++i)
            ck_assert_int_eq(out[rank].tokens[i], POISON);
        psm_sharded_end(calls[rank]);
    }
    psm_sharded_end(NULL);
    free(gathered);
    psm_context_destroy(context);
    free(logits);
}
END_TEST

int main(void)
{
    psm_test_register_property(sharded_f32_equals_unsharded);
    psm_test_register_property(sharded_bf16_equals_unsharded);
    psm_test_register_property(sharded_device_logits_equal_unsharded);
    psm_test_register_common(sharded_bad_rows);
    psm_test_register_common(sharded_begin_refuses);
    psm_test_register_common(sharded_bad_exchanges);
    return psm_test_run("test_sharded");
}
