/*
 * test_request_state.c: request state (docs/SAMPLING.md, the draw; issue 12)
 * on every backend, from host memory and from the backend's device memory
 * (tests/device_memory.h):
 *   - per-row offsets, and the seed and offset by pointer, give the tokens of
 *     the scalars with the same values; a pointer is read when the call runs;
 *   - subsequences: rows sharing a seed and a position draw independently
 *     (equal pairs of tokens as often as the distribution says, and each
 *     row's draws follow it), equal ids draw alike, and the default streams
 *     are ids like any other;
 *   - row gather equals sampling the copied rows; an out-of-range index in
 *     device memory makes that row bad and nothing else;
 *   - caller workspace: its size, a call in exactly that much, too little.
 * Tokens for today's parameters (every new field NULL) are covered by the
 * known answers of test_contract and test_determinism.
 */
#include "device_memory.h"
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL_BYTE 0xa5

static const psm_memory memory_kinds[] = {PSM_MEMORY_HOST, PSM_MEMORY_DEVICE};
#define MEMORY_KIND_COUNT 2

static const char *kind_name(psm_memory kind)
{
    return kind == PSM_MEMORY_HOST ? "host memory" : "device memory";
}

/* The memory of one kind for a property, or NULL after a visible skip. */
static psm_test_memory *open_memory(psm_backend backend, psm_memory kind, int check_rows,
                                    const char *property)
{
    const char *why = psm_test_memory_unavailable(backend, kind);
    if (why) {
        char name[160];
        snprintf(name, sizeof name, "%s (%s)", property, kind_name(kind));
        psm_test_skip(psm_backend_name(backend), name, why);
        return NULL;
    }
    return psm_test_memory_open(backend, kind, check_rows);
}

static float *normal_logits(int64_t count, double sigma, uint64_t seed)
{
    float *logits = psm_test_alloc((size_t)count, sizeof *logits);
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < count; ++i)
        logits[i] = (float)(sigma * psm_test_rng_normal(&rng));
    return logits;
}

/* Copies of one row of vocab logits, rows times. */
static float *repeated_row(const float *row, int64_t rows, int64_t vocab)
{
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
    for (int64_t r = 0; r < rows; ++r)
        memcpy(logits + r * vocab, row, (size_t)vocab * sizeof *logits);
    return logits;
}

/* ---- calls from either memory --------------------------------------------- */

static int64_t output_rows(const psm_params *params, int64_t logits_rows)
{
    return params->row_indices ? params->output_rows : logits_rows;
}

/* The parameters with every per-row array and pointer copied into memory
 * (host arrays of `rows` entries in, arrays of the memory's kind out). */
static psm_params stage_params(psm_test_memory *memory, const psm_params *host, int64_t rows)
{
    const size_t n = (size_t)rows;
    psm_params p = *host;
    p.temperature_per_row =
        psm_test_memory_copy_in(memory, host->temperature_per_row, n * sizeof(float));
    p.top_k_per_row = psm_test_memory_copy_in(memory, host->top_k_per_row, n * sizeof(int32_t));
    p.top_p_per_row = psm_test_memory_copy_in(memory, host->top_p_per_row, n * sizeof(float));
    p.min_p_per_row = psm_test_memory_copy_in(memory, host->min_p_per_row, n * sizeof(float));
    p.seed_per_row = psm_test_memory_copy_in(memory, host->seed_per_row, n * sizeof(uint64_t));
    p.offset_per_row =
        psm_test_memory_copy_in(memory, host->offset_per_row, n * sizeof(uint64_t));
    p.subsequence_per_row =
        psm_test_memory_copy_in(memory, host->subsequence_per_row, n * sizeof(uint32_t));
    p.row_indices = psm_test_memory_copy_in(memory, host->row_indices, n * sizeof(int64_t));
    p.seed_pointer = psm_test_memory_copy_in(memory, host->seed_pointer, sizeof(uint64_t));
    p.offset_pointer = psm_test_memory_copy_in(memory, host->offset_pointer, sizeof(uint64_t));
    return p;
}

static psm_tensor staged_logits(psm_test_memory *memory, const float *logits, int64_t rows,
                                int64_t vocab)
{
    void *data = psm_test_memory_copy_in(memory, logits, (size_t)(rows * vocab) * sizeof(float));
    psm_tensor tensor = psm_test_tensor(data, PSM_DTYPE_F32, rows, vocab, 0);
    tensor.memory = psm_test_memory_kind(memory);
    return tensor;
}

/* The message of the last call made by sample_staged or probs_in: reading
 * the outputs back goes through the library too, which clears
 * psm_last_error. */
static char call_message[512];

#define CALL_OK(call)                                                                       \
    do {                                                                                    \
        psm_status call_ok_status_ = (call);                                                \
        ck_assert_msg(call_ok_status_ == PSM_OK, "%s returned %s: %s", #call,               \
                      psm_status_string(call_ok_status_), call_message);                    \
    } while (0)

/* psm_sample on staged inputs; the outputs start as sentinels and are read
 * back whatever the status (logprobs may be NULL: not asked for). */
static psm_status sample_staged(psm_test_memory *memory, const psm_tensor *logits,
                                const psm_params *staged, int32_t *tokens, float *logprobs)
{
    const size_t draws = (size_t)(output_rows(staged, logits->rows) * staged->num_samples);
    psm_output token_output = {psm_test_memory_filled(memory, draws * sizeof(int32_t),
                                                      SENTINEL_BYTE),
                               psm_test_memory_kind(memory)};
    psm_output logprob_output = {NULL, psm_test_memory_kind(memory)};
    if (logprobs)
        logprob_output.data =
            psm_test_memory_filled(memory, draws * sizeof(float), SENTINEL_BYTE);
    psm_status status = psm_sample(psm_test_memory_context(memory), logits, staged,
                                   token_output, logprob_output);
    snprintf(call_message, sizeof call_message, "%s", psm_last_error());
    psm_test_memory_read(memory, tokens, token_output.data, draws * sizeof(int32_t));
    if (logprobs)
        psm_test_memory_read(memory, logprobs, logprob_output.data, draws * sizeof(float));
    return status;
}

/* Stages host inputs (f32 logits, logits_rows x vocab) and samples. */
static psm_status sample_in(psm_test_memory *memory, const float *logits, int64_t logits_rows,
                            int64_t vocab, const psm_params *host_params, int32_t *tokens,
                            float *logprobs)
{
    psm_tensor tensor = staged_logits(memory, logits, logits_rows, vocab);
    psm_params staged = stage_params(memory, host_params, output_rows(host_params, logits_rows));
    return sample_staged(memory, &tensor, &staged, tokens, logprobs);
}

/* psm_probs from host inputs; probs (host) gets output rows x vocab. */
static psm_status probs_in(psm_test_memory *memory, const float *logits, int64_t logits_rows,
                           int64_t vocab, const psm_params *host_params, float *probs)
{
    const int64_t rows = output_rows(host_params, logits_rows);
    const size_t bytes = (size_t)(rows * vocab) * sizeof(float);
    psm_tensor tensor = staged_logits(memory, logits, logits_rows, vocab);
    psm_params staged = stage_params(memory, host_params, rows);
    psm_tensor out = psm_test_tensor(psm_test_memory_filled(memory, bytes, SENTINEL_BYTE),
                                     PSM_DTYPE_F32, rows, vocab, 0);
    out.memory = psm_test_memory_kind(memory);
    psm_status status = psm_probs(psm_test_memory_context(memory), &tensor, &staged, &out);
    snprintf(call_message, sizeof call_message, "%s", psm_last_error());
    psm_test_memory_read(memory, probs, out.data, bytes);
    return status;
}

/* ---- comparisons ---------------------------------------------------------- */

static int same_float(float a, float b)
{
    return memcmp(&a, &b, sizeof a) == 0 || (isnan(a) && isnan(b));
}

/* Draws of one row: tokens equal, logprobs equal to the bit (the same
 * backend on the same row computes the same floats). */
static void expect_same_row(const char *what, int64_t row, int32_t samples,
                            const int32_t *tokens, const float *logprobs,
                            const int32_t *expected_tokens, const float *expected_logprobs)
{
    for (int32_t j = 0; j < samples; ++j) {
        ck_assert_msg(tokens[j] == expected_tokens[j],
                      "%s: row %lld sample %d: token %d, expected %d", what, (long long)row, j,
                      tokens[j], expected_tokens[j]);
        if (logprobs)
            ck_assert_msg(same_float(logprobs[j], expected_logprobs[j]),
                          "%s: row %lld sample %d: logprob %.9g, expected %.9g", what,
                          (long long)row, j, (double)logprobs[j], (double)expected_logprobs[j]);
    }
}

static void expect_untouched(const char *what, const void *memory, size_t bytes)
{
    const unsigned char *byte = memory;
    for (size_t i = 0; i < bytes; ++i)
        ck_assert_msg(byte[i] == SENTINEL_BYTE, "%s: byte %zu of the output was written", what,
                      i);
}

/* ---- offsets and the seed and offset by pointer --------------------------- */

#define OFFSET_ROWS 6
#define OFFSET_VOCAB 2100 /* three tiles */
#define OFFSET_SAMPLES 4

static const uint64_t row_offsets[OFFSET_ROWS] = {
    0, 1, 0xffffffffu, 0x100000000u, 0x123456789abcdef0u, UINT64_MAX};
static const uint64_t row_seeds[OFFSET_ROWS] = {5, 0xffffffffffffffffu, 5, 0, 77, 0x100000000u};

/* offset_per_row: row r draws what it draws in a call whose scalar offset is
 * row_offsets[r] (the rest of the call unchanged, so the row's stream too). */
PSM_PROPERTY(offset_per_row_equals_scalar_offsets)
{
    float *logits = normal_logits(OFFSET_ROWS * OFFSET_VOCAB, 2.0, 41);
    const size_t draws = OFFSET_ROWS * OFFSET_SAMPLES;
    int32_t *tokens = psm_test_alloc(draws, sizeof *tokens);
    float *logprobs = psm_test_alloc(draws, sizeof *logprobs);
    int32_t *expected = psm_test_alloc(draws, sizeof *expected);
    float *expected_logprobs = psm_test_alloc(draws, sizeof *expected_logprobs);
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory =
            open_memory(backend, memory_kinds[k], 0, "offset_per_row_equals_scalar_offsets");
        if (!memory)
            continue;
        for (int per_row_seeds = 0; per_row_seeds < 2; ++per_row_seeds) {
            char what[128];
            snprintf(what, sizeof what, "%s, %s", kind_name(memory_kinds[k]),
                     per_row_seeds ? "per-row seeds" : "one seed");
            psm_params params;
            psm_params_init(&params);
            params.num_samples = OFFSET_SAMPLES;
            params.temperature = 0.9f;
            params.top_p = 0.97f;
            params.seed = 2718;
            params.seed_per_row = per_row_seeds ? row_seeds : NULL;
            params.offset_per_row = row_offsets;
            CALL_OK(sample_in(memory, logits, OFFSET_ROWS, OFFSET_VOCAB, &params, tokens,
                                   logprobs));
            params.offset_per_row = NULL;
            for (int r = 0; r < OFFSET_ROWS; ++r) {
                params.offset = row_offsets[r];
                CALL_OK(sample_in(memory, logits, OFFSET_ROWS, OFFSET_VOCAB, &params,
                                       expected, expected_logprobs));
                expect_same_row(what, r, OFFSET_SAMPLES, tokens + r * OFFSET_SAMPLES,
                                logprobs + r * OFFSET_SAMPLES, expected + r * OFFSET_SAMPLES,
                                expected_logprobs + r * OFFSET_SAMPLES);
            }
        }
        psm_test_memory_close(memory);
    }
    free(expected_logprobs);
    free(expected);
    free(logprobs);
    free(tokens);
    free(logits);
}
END_TEST

/* seed_pointer and offset_pointer: the tokens of the scalars with the
 * pointed-to values (the scalars themselves then ignored), alone and with
 * the other's per-row form; and the value is read when the call runs. */
PSM_PROPERTY(seed_and_offset_pointers_equal_scalars)
{
    const int64_t rows = 5, vocab = 1500;
    const int32_t samples = 3;
    const uint64_t seed = 0xfedcba9876543210u, offset = 0x200000003u;
    const uint64_t later_offset = 0x200000004u;
    float *logits = normal_logits(rows * vocab, 1.5, 42);
    const size_t draws = (size_t)(rows * samples);
    int32_t *tokens = psm_test_alloc(draws, sizeof *tokens);
    float *logprobs = psm_test_alloc(draws, sizeof *logprobs);
    int32_t *expected = psm_test_alloc(draws, sizeof *expected);
    float *expected_logprobs = psm_test_alloc(draws, sizeof *expected_logprobs);
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory =
            open_memory(backend, memory_kinds[k], 0, "seed_and_offset_pointers_equal_scalars");
        if (!memory)
            continue;
        /* Which forms: pointers for both; seed pointer with per-row offsets;
         * offset pointer with per-row seeds. */
        for (int form = 0; form < 3; ++form) {
            char what[128];
            snprintf(what, sizeof what, "%s, form %d", kind_name(memory_kinds[k]), form);
            psm_params by_value;
            psm_params_init(&by_value);
            by_value.num_samples = samples;
            by_value.top_k = 100;
            by_value.seed = seed;
            by_value.offset = offset;
            if (form == 1)
                by_value.offset_per_row = row_offsets;
            if (form == 2)
                by_value.seed_per_row = row_seeds;
            CALL_OK(sample_in(memory, logits, rows, vocab, &by_value, expected,
                                   expected_logprobs));

            psm_params by_pointer = by_value;
            by_pointer.seed = 1; /* ignored: the pointers win */
            by_pointer.offset = 2;
            if (form != 2)
                by_pointer.seed_pointer = &seed;
            if (form != 1)
                by_pointer.offset_pointer = &offset;
            CALL_OK(sample_in(memory, logits, rows, vocab, &by_pointer, tokens, logprobs));
            for (int64_t r = 0; r < rows; ++r)
                expect_same_row(what, r, samples, tokens + r * samples, logprobs + r * samples,
                                expected + r * samples, expected_logprobs + r * samples);
        }

        /* One staged call, its offset changed in memory between two runs, as
         * a captured graph's would be: the second run draws at the new one. */
        psm_params params;
        psm_params_init(&params);
        params.num_samples = samples;
        params.seed = seed;
        params.offset_pointer = &offset;
        psm_tensor tensor = staged_logits(memory, logits, rows, vocab);
        psm_params staged = stage_params(memory, &params, rows);
        CALL_OK(sample_staged(memory, &tensor, &staged, tokens, NULL));
        psm_test_memory_write(memory, (void *)staged.offset_pointer, &later_offset,
                              sizeof later_offset);
        int32_t *later = psm_test_alloc(draws, sizeof *later);
        CALL_OK(sample_staged(memory, &tensor, &staged, later, NULL));
        params.offset_pointer = NULL;
        params.offset = later_offset;
        CALL_OK(sample_in(memory, logits, rows, vocab, &params, expected, NULL));
        for (int64_t r = 0; r < rows; ++r)
            expect_same_row("offset changed in memory", r, samples, later + r * samples, NULL,
                            expected + r * samples, NULL);
        ck_assert_msg(memcmp(tokens, later, draws * sizeof *tokens) != 0,
                      "%s: the runs before and after the offset changed drew alike",
                      kind_name(memory_kinds[k]));
        free(later);
        psm_test_memory_close(memory);
    }
    free(expected_logprobs);
    free(expected);
    free(logprobs);
    free(tokens);
    free(logits);
}
END_TEST

/* ---- subsequences ----------------------------------------------------------- */

#define SUBSEQUENCE_ROWS 1000
#define SUBSEQUENCE_SEED 2026
#define SUBSEQUENCE_OFFSET 17

/* Distinct ids spread over the 32 bits: i -> odd constant x i + c is a
 * bijection modulo 2^32. */
static uint32_t *distinct_subsequences(int64_t rows)
{
    uint32_t *ids = psm_test_alloc((size_t)rows, sizeof *ids);
    for (int64_t i = 0; i < rows; ++i)
        ids[i] = (uint32_t)i * 2654435761u + 12345u;
    return ids;
}

static uint64_t *repeated_u64(int64_t rows, uint64_t value)
{
    uint64_t *values = psm_test_alloc((size_t)rows, sizeof *values);
    for (int64_t i = 0; i < rows; ++i)
        values[i] = value;
    return values;
}

/* The final distribution of one row (psm_probs, host memory), in double and
 * normalised. */
static double *row_distribution(psm_backend backend, const float *row, int64_t vocab,
                                const psm_params *params)
{
    psm_context *context = psm_test_open(backend);
    float *probs = psm_test_alloc((size_t)vocab, sizeof *probs);
    psm_params one_row = *params;
    one_row.num_samples = 1;
    PSM_CHECK_OK(psm_test_probs_f32(context, row, 1, vocab, &one_row, probs));
    PSM_CHECK_OK(psm_synchronize(context));
    double *p = psm_test_alloc((size_t)vocab, sizeof *p);
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        sum += probs[i];
    for (int64_t i = 0; i < vocab; ++i)
        p[i] = probs[i] / sum;
    free(probs);
    psm_context_destroy(context);
    return p;
}

/* Two forms that must draw alike, since a row's draw depends only on its
 * seed, offset and stream: a batch of copies of the row with the scalar seed
 * and offset, and one logits row gathered into every output row with
 * per-row seeds and offsets all equal. Both have the subsequence ids. */
static void sample_subsequences(psm_test_memory *memory, const float *row, int64_t vocab,
                                const psm_params *base, const uint32_t *ids, int32_t *tokens)
{
    const int64_t rows = SUBSEQUENCE_ROWS;
    const size_t draws = (size_t)(rows * base->num_samples);
    float *copies = repeated_row(row, rows, vocab);
    psm_params scalar = *base;
    scalar.seed = SUBSEQUENCE_SEED;
    scalar.offset = SUBSEQUENCE_OFFSET;
    scalar.subsequence_per_row = ids;
    CALL_OK(sample_in(memory, copies, rows, vocab, &scalar, tokens, NULL));

    uint64_t *seeds = repeated_u64(rows, SUBSEQUENCE_SEED);
    uint64_t *offsets = repeated_u64(rows, SUBSEQUENCE_OFFSET);
    int64_t *gather = psm_test_alloc((size_t)rows, sizeof *gather); /* all row 0 */
    int32_t *gathered = psm_test_alloc(draws, sizeof *gathered);
    psm_params per_row = *base;
    per_row.seed_per_row = seeds;
    per_row.offset_per_row = offsets;
    per_row.subsequence_per_row = ids;
    per_row.row_indices = gather;
    per_row.output_rows = rows;
    CALL_OK(sample_in(memory, row, 1, vocab, &per_row, gathered, NULL));
    for (size_t d = 0; d < draws; ++d)
        ck_assert_msg(gathered[d] == tokens[d],
                      "%s: draw %zu: per-row seed and offset %d, scalar seed and offset %d",
                      kind_name(psm_test_memory_kind(memory)), d, gathered[d], tokens[d]);
    free(gathered);
    free(gather);
    free(offsets);
    free(seeds);
    free(copies);
}

/* Equal pairs: with one sample per row, U = #{i < j : token_i = token_j}.
 * Independent rows of distribution p give E U = C(n,2) q, q = sum p^2, and
 *   Var U = C(n,2) q (1 - q) + 6 C(n,3) (sum p^3 - q^2):
 * two pairs that share one row (6 C(n,3) ordered such couples) have
 * covariance sum p^3 - q^2, disjoint pairs none.
 * The bound is z = 5 standard deviations. U is a sum of ~5e5 rare, nearly
 * independent indicators, so it is close to normal (Poisson-like, mean
 * ~200 here) and beyond 5 sd lies at most about 1e-6 of it: a correct
 * implementation passes with all but about one seed in a million (the
 * seeds here are fixed, so the test cannot flake). Yet 5 sd is only about
 * 80 of the 499,500 pairs: streams that draw alike for 0.02% of the pairs
 * fail. A nearly flat p over 3 tiles keeps q small, which is what makes the
 * bound tight. */
PSM_PROPERTY(subsequences_pairs_match_sum_of_squares)
{
    const int64_t vocab = 3000, n = SUBSEQUENCE_ROWS;
    float *row = normal_logits(vocab, 0.5, 43);
    uint32_t *ids = distinct_subsequences(n);
    psm_params params;
    psm_params_init(&params);
    double *p = row_distribution(backend, row, vocab, &params);
    double q = 0.0, cubes = 0.0;
    for (int64_t i = 0; i < vocab; ++i) {
        q += p[i] * p[i];
        cubes += p[i] * p[i] * p[i];
    }
    const double pairs = (double)n * (double)(n - 1) / 2.0;
    const double triples = pairs * (double)(n - 2) / 3.0;
    const double mean = pairs * q;
    const double sd = sqrt(pairs * q * (1.0 - q) + 6.0 * triples * (cubes - q * q));

    int32_t *tokens = psm_test_alloc((size_t)n, sizeof *tokens);
    int64_t *counts = psm_test_alloc((size_t)vocab, sizeof *counts);
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory =
            open_memory(backend, memory_kinds[k], 0, "subsequences_pairs_match_sum_of_squares");
        if (!memory)
            continue;
        sample_subsequences(memory, row, vocab, &params, ids, tokens);
        memset(counts, 0, (size_t)vocab * sizeof *counts);
        for (int64_t i = 0; i < n; ++i) {
            ck_assert_msg(tokens[i] >= 0 && tokens[i] < vocab, "row %lld: token %d",
                          (long long)i, tokens[i]);
            ++counts[tokens[i]];
        }
        double equal_pairs = 0.0;
        for (int64_t t = 0; t < vocab; ++t)
            equal_pairs += (double)counts[t] * (double)(counts[t] - 1) / 2.0;
        printf("subsequences [%s, %s]: %.0f equal pairs of %.0f, expected %.1f (sd %.1f, "
               "z %.2f)\n",
               psm_backend_name(backend), kind_name(memory_kinds[k]), equal_pairs, pairs, mean,
               sd, (equal_pairs - mean) / sd);
        ck_assert_msg(fabs(equal_pairs - mean) <= 5.0 * sd,
                      "%s: %.0f equal pairs, expected %.1f +- 5 x %.1f: rows with distinct "
                      "subsequences do not draw independently",
                      kind_name(memory_kinds[k]), equal_pairs, mean, sd);

        /* What subsequences are for: without them the same seed and offset
         * (per-row seeds: stream 0) give every row the same token. */
        uint64_t *seeds = repeated_u64(n, SUBSEQUENCE_SEED);
        float *copies = repeated_row(row, n, vocab);
        psm_params same_stream = params;
        same_stream.seed_per_row = seeds;
        CALL_OK(sample_in(memory, copies, n, vocab, &same_stream, tokens, NULL));
        for (int64_t i = 1; i < n; ++i)
            ck_assert_int_eq(tokens[i], tokens[0]);
        free(copies);
        free(seeds);
        psm_test_memory_close(memory);
    }
    free(counts);
    free(tokens);
    free(p);
    free(ids);
    free(row);
}
END_TEST

/* P(X > x) for X chi-square with an even number 2m of degrees of freedom:
 * exactly e^(-x/2) sum_{i<m} (x/2)^i / i!. */
static double chi_square_even_tail(int degrees_of_freedom, double x)
{
    const double half = x / 2.0;
    double term = 1.0, sum = 0.0;
    for (int i = 0; i < degrees_of_freedom / 2; ++i) {
        sum += term;
        term *= half / (double)(i + 1);
    }
    return exp(-half) * sum;
}

/* The x with P(X > x) = significance, by bisection (the tail decreases). */
static double chi_square_even_critical(int degrees_of_freedom, double significance)
{
    double low = 0.0, high = 1000.0;
    for (int step = 0; step < 200; ++step) {
        double middle = 0.5 * (low + high);
        if (chi_square_even_tail(degrees_of_freedom, middle) > significance)
            low = middle;
        else
            high = middle;
    }
    return high;
}

START_TEST(chi_square_even_tail_is_exact)
{
    /* Two degrees of freedom: P(X > x) = e^(-x/2). */
    ck_assert(fabs(chi_square_even_tail(2, 3.0) - exp(-1.5)) < 1e-15);
    /* Upper quantiles of chi-square(10) (mpmath's regularised incomplete gamma). */
    ck_assert(fabs(chi_square_even_critical(10, 0.05) - 18.307038053275146) < 1e-9);
    ck_assert(fabs(chi_square_even_critical(10, 1e-6) - 46.863046846784383) < 1e-9);
}
END_TEST

#define MARGINAL_VOCAB 11 /* 10 degrees of freedom: an even number, exact tail */
#define MARGINAL_SAMPLES 2000

/* Each row's draws (2,000 of them) follow the distribution: Pearson's
 * chi-square per row at significance 1e-3 / 1000 (Bonferroni: the chance
 * that any of the 1000 rows of a correct implementation fails is at most
 * 1e-3). The rows are independent, so the sum of their statistics is
 * chi-square with 1000 x 10 degrees of freedom too; that sum, nearly normal
 * (mean 10^4, sd 141), catches a bias too small for one row, on either side
 * (draws that fit too well are as wrong), at 5 sd. */
PSM_PROPERTY(subsequences_each_row_follows_the_distribution)
{
    const int64_t vocab = MARGINAL_VOCAB, n = SUBSEQUENCE_ROWS;
    const int dof = MARGINAL_VOCAB - 1;
    float *row = normal_logits(vocab, 1.0, 44);
    uint32_t *ids = distinct_subsequences(n);
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.8f;
    params.num_samples = MARGINAL_SAMPLES;
    double *p = row_distribution(backend, row, vocab, &params);
    for (int64_t t = 0; t < vocab; ++t)
        ck_assert_msg(p[t] * MARGINAL_SAMPLES >= 5.0,
                      "test design: token %lld expects %.2f draws per row (< 5)", (long long)t,
                      p[t] * MARGINAL_SAMPLES);
    const double critical = chi_square_even_critical(dof, 1e-3 / (double)n);
    const double total_dof = (double)(n * dof);

    int32_t *tokens = psm_test_alloc((size_t)(n * MARGINAL_SAMPLES), sizeof *tokens);
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory = open_memory(backend, memory_kinds[k], 0,
                                              "subsequences_each_row_follows_the_distribution");
        if (!memory)
            continue;
        sample_subsequences(memory, row, vocab, &params, ids, tokens);
        double worst = 0.0, total = 0.0;
        int64_t worst_row = -1;
        for (int64_t r = 0; r < n; ++r) {
            int64_t counts[MARGINAL_VOCAB] = {0};
            for (int32_t j = 0; j < MARGINAL_SAMPLES; ++j) {
                int32_t token = tokens[r * MARGINAL_SAMPLES + j];
                ck_assert_msg(token >= 0 && token < vocab, "row %lld: token %d", (long long)r,
                              token);
                ++counts[token];
            }
            double statistic = 0.0;
            for (int64_t t = 0; t < vocab; ++t) {
                double expected = p[t] * MARGINAL_SAMPLES;
                statistic += ((double)counts[t] - expected) * ((double)counts[t] - expected) /
                             expected;
            }
            total += statistic;
            if (statistic > worst) {
                worst = statistic;
                worst_row = r;
            }
        }
        const double total_z = (total - total_dof) / sqrt(2.0 * total_dof);
        printf("subsequences [%s, %s]: largest row chi-square %.2f (row %lld; critical %.2f "
               "on %d dof), sum %.1f on %.0f dof (z %.2f)\n",
               psm_backend_name(backend), kind_name(memory_kinds[k]), worst,
               (long long)worst_row, critical, dof, total, total_dof, total_z);
        ck_assert_msg(worst <= critical,
                      "%s: row %lld's draws: chi-square %.2f > %.2f (%d dof, significance "
                      "1e-6 per row)",
                      kind_name(memory_kinds[k]), (long long)worst_row, worst, critical, dof);
        ck_assert_msg(fabs(total_z) <= 5.0,
                      "%s: the rows' chi-squares sum to %.1f on %.0f dof (z %.2f)",
                      kind_name(memory_kinds[k]), total, total_dof, total_z);
        psm_test_memory_close(memory);
    }
    free(tokens);
    free(p);
    free(ids);
    free(row);
}
END_TEST

/* Equal ids (with the same seed and offset) draw alike; different ids do
 * not; and the default streams are ids like any other: 0 with per-row
 * seeds, the output row with one seed. */
PSM_PROPERTY(subsequence_ids_and_default_streams)
{
    const int64_t rows = 6, vocab = 5000;
    const int32_t samples = 8;
    const uint32_t ids[6] = {41, 7, 41, 0xffffffffu, 7, 41};
    const uint32_t zeros[6] = {0};
    const uint32_t row_numbers[6] = {0, 1, 2, 3, 4, 5};
    float *one = normal_logits(vocab, 2.0, 45);
    float *copies = repeated_row(one, rows, vocab);
    float *logits = normal_logits(rows * vocab, 2.0, 46);
    const size_t draws = (size_t)(rows * samples);
    int32_t *tokens = psm_test_alloc(draws, sizeof *tokens);
    float *logprobs = psm_test_alloc(draws, sizeof *logprobs);
    int32_t *expected = psm_test_alloc(draws, sizeof *expected);
    float *expected_logprobs = psm_test_alloc(draws, sizeof *expected_logprobs);
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory =
            open_memory(backend, memory_kinds[k], 0, "subsequence_ids_and_default_streams");
        if (!memory)
            continue;
        const char *where = kind_name(memory_kinds[k]);
        psm_params params;
        psm_params_init(&params);
        params.num_samples = samples;
        params.top_p = 0.9f;
        params.seed = 99;
        params.offset = 1234;
        params.subsequence_per_row = ids;
        CALL_OK(sample_in(memory, copies, rows, vocab, &params, tokens, logprobs));
        for (int64_t a = 0; a < rows; ++a)
            for (int64_t b = a + 1; b < rows; ++b) {
                int same = memcmp(tokens + a * samples, tokens + b * samples,
                                  (size_t)samples * sizeof *tokens) == 0;
                ck_assert_msg(same == (ids[a] == ids[b]),
                              "%s: rows %lld and %lld (ids %u, %u) drew %s", where,
                              (long long)a, (long long)b, ids[a], ids[b],
                              same ? "alike" : "differently");
            }

        /* Per-row seeds: subsequence 0 is the default stream. */
        params.seed_per_row = row_seeds;
        params.subsequence_per_row = zeros;
        CALL_OK(sample_in(memory, logits, rows, vocab, &params, tokens, logprobs));
        params.subsequence_per_row = NULL;
        CALL_OK(sample_in(memory, logits, rows, vocab, &params, expected,
                               expected_logprobs));
        for (int64_t r = 0; r < rows; ++r)
            expect_same_row("per-row seeds, subsequence 0", r, samples, tokens + r * samples,
                            logprobs + r * samples, expected + r * samples,
                            expected_logprobs + r * samples);

        /* One seed: subsequence i is output row i's default stream. */
        params.seed_per_row = NULL;
        params.subsequence_per_row = row_numbers;
        CALL_OK(sample_in(memory, logits, rows, vocab, &params, tokens, logprobs));
        params.subsequence_per_row = NULL;
        CALL_OK(sample_in(memory, logits, rows, vocab, &params, expected,
                               expected_logprobs));
        for (int64_t r = 0; r < rows; ++r)
            expect_same_row("one seed, subsequence = row", r, samples, tokens + r * samples,
                            logprobs + r * samples, expected + r * samples,
                            expected_logprobs + r * samples);
        psm_test_memory_close(memory);
    }
    free(expected_logprobs);
    free(expected);
    free(logprobs);
    free(tokens);
    free(logits);
    free(copies);
    free(one);
}
END_TEST

/* ---- row gather ------------------------------------------------------------- */

#define GATHER_LOGITS_ROWS 5
#define GATHER_VOCAB 1100 /* two tiles */
#define GATHER_SAMPLES 3
#define GATHER_MAX_ROWS 8

typedef struct gather_case {
    const char *name;
    int64_t rows;
    int64_t indices[GATHER_MAX_ROWS];
} gather_case;

static const gather_case gather_cases[] = {
    {"repeats, out of order, more rows", 8, {3, 0, 3, 4, 1, 1, 0, 3}},
    {"fewer rows", 2, {4, 2}},
    {"one row", 1, {2}},
    {"the identity", 5, {0, 1, 2, 3, 4}},
};

/* Per-row arrays of one length for a gather's output rows. */
typedef struct row_arrays {
    float temperature[GATHER_MAX_ROWS];
    int32_t top_k[GATHER_MAX_ROWS];
    float top_p[GATHER_MAX_ROWS];
    float min_p[GATHER_MAX_ROWS];
    uint64_t seed[GATHER_MAX_ROWS];
    uint64_t offset[GATHER_MAX_ROWS];
    uint32_t subsequence[GATHER_MAX_ROWS];
} row_arrays;

static void fill_row_arrays(row_arrays *arrays, uint64_t seed)
{
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int r = 0; r < GATHER_MAX_ROWS; ++r) {
        arrays->temperature[r] = r == 3 ? 0.0f : 0.5f + (float)psm_test_rng_uniform(&rng);
        arrays->top_k[r] = (int32_t)psm_test_rng_below(&rng, 3) * 40;
        arrays->top_p[r] = r % 2 ? 0.9f : 1.0f;
        arrays->min_p[r] = r % 3 == 1 ? 0.01f : 0.0f;
        arrays->seed[r] = psm_test_rng_next(&rng);
        arrays->offset[r] = psm_test_rng_next(&rng);
        arrays->subsequence[r] = (uint32_t)psm_test_rng_next(&rng);
    }
}

/* Output row i of a gather samples what row i of a batch of the copied rows
 * samples (same per-row values, and the same stream: the output row with one
 * seed); tokens, logprobs and probabilities, to the bit. */
PSM_PROPERTY(gather_equals_sampling_the_copied_rows)
{
    float *logits = normal_logits(GATHER_LOGITS_ROWS * GATHER_VOCAB, 2.0, 47);
    row_arrays arrays;
    fill_row_arrays(&arrays, 48);
    const size_t max_draws = GATHER_MAX_ROWS * GATHER_SAMPLES;
    int32_t *tokens = psm_test_alloc(max_draws, sizeof *tokens);
    float *logprobs = psm_test_alloc(max_draws, sizeof *logprobs);
    int32_t *expected = psm_test_alloc(max_draws, sizeof *expected);
    float *expected_logprobs = psm_test_alloc(max_draws, sizeof *expected_logprobs);
    float *probs = psm_test_alloc(GATHER_MAX_ROWS * GATHER_VOCAB, sizeof *probs);
    float *expected_probs = psm_test_alloc(GATHER_MAX_ROWS * GATHER_VOCAB, sizeof *probs);
    float *copied = psm_test_alloc(GATHER_MAX_ROWS * GATHER_VOCAB, sizeof *copied);
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory =
            open_memory(backend, memory_kinds[k], 0, "gather_equals_sampling_the_copied_rows");
        if (!memory)
            continue;
        for (size_t c = 0; c < sizeof gather_cases / sizeof gather_cases[0]; ++c)
            for (int with_arrays = 0; with_arrays < 2; ++with_arrays) {
                const gather_case *g = &gather_cases[c];
                char what[160];
                snprintf(what, sizeof what, "%s, %s, %s", kind_name(memory_kinds[k]), g->name,
                         with_arrays ? "per-row arrays" : "scalars");
                for (int64_t r = 0; r < g->rows; ++r)
                    memcpy(copied + r * GATHER_VOCAB, logits + g->indices[r] * GATHER_VOCAB,
                           GATHER_VOCAB * sizeof *copied);
                psm_params params;
                psm_params_init(&params);
                params.num_samples = GATHER_SAMPLES;
                params.temperature = 0.8f;
                params.top_k = 300;
                params.seed = 31337;
                params.offset = 0x100000001u;
                if (with_arrays) {
                    params.temperature_per_row = arrays.temperature;
                    params.top_k_per_row = arrays.top_k;
                    params.top_p_per_row = arrays.top_p;
                    params.min_p_per_row = arrays.min_p;
                    params.seed_per_row = arrays.seed;
                    params.offset_per_row = arrays.offset;
                    params.subsequence_per_row = arrays.subsequence;
                }
                CALL_OK(sample_in(memory, copied, g->rows, GATHER_VOCAB, &params, expected,
                                       expected_logprobs));
                CALL_OK(probs_in(memory, copied, g->rows, GATHER_VOCAB, &params,
                                      expected_probs));
                params.row_indices = g->indices;
                params.output_rows = g->rows;
                CALL_OK(sample_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB,
                                       &params, tokens, logprobs));
                CALL_OK(probs_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params,
                                      probs));
                for (int64_t r = 0; r < g->rows; ++r) {
                    expect_same_row(what, r, GATHER_SAMPLES, tokens + r * GATHER_SAMPLES,
                                    logprobs + r * GATHER_SAMPLES,
                                    expected + r * GATHER_SAMPLES,
                                    expected_logprobs + r * GATHER_SAMPLES);
                    for (int64_t i = 0; i < GATHER_VOCAB; ++i)
                        ck_assert_msg(same_float(probs[r * GATHER_VOCAB + i],
                                                 expected_probs[r * GATHER_VOCAB + i]),
                                      "%s: row %lld token %lld: probability %.9g, copied rows "
                                      "%.9g",
                                      what, (long long)r, (long long)i,
                                      (double)probs[r * GATHER_VOCAB + i],
                                      (double)expected_probs[r * GATHER_VOCAB + i]);
                }
            }
        psm_test_memory_close(memory);
    }
    free(copied);
    free(expected_probs);
    free(probs);
    free(expected_logprobs);
    free(expected);
    free(logprobs);
    free(tokens);
    free(logits);
}
END_TEST

/* An out-of-range row index in device memory (which core cannot read
 * before the call) makes that output row bad: token -1 and logprob NaN,
 * probabilities NaN, the other rows as ever; in checking mode the call
 * fails with PSM_ERR_BAD_ROW naming the row and writes nothing. Where core
 * reads the indices on the host (the CPU backend, whose device memory is
 * host memory) the call fails with PSM_ERR_INVALID_ARGUMENT naming the
 * entry instead, writing nothing. Indices far outside the logits (INT64_MAX)
 * would crash a backend that read the row. */
PSM_PROPERTY(out_of_range_row_index_in_device_memory)
{
    const int64_t rows = 5, bad = 2;
    const int32_t samples = 3;
    const int64_t bad_values[] = {-1, GATHER_LOGITS_ROWS, INT64_MAX, INT64_MIN};
    const int64_t good_indices[5] = {4, 0, 1, 0, 3};
    float *logits = normal_logits(GATHER_LOGITS_ROWS * GATHER_VOCAB, 2.0, 49);
    const size_t draws = (size_t)(rows * samples);
    int32_t *tokens = psm_test_alloc(draws, sizeof *tokens);
    float *logprobs = psm_test_alloc(draws, sizeof *logprobs);
    int32_t *expected = psm_test_alloc(draws, sizeof *expected);
    float *expected_logprobs = psm_test_alloc(draws, sizeof *expected_logprobs);
    float *probs = psm_test_alloc((size_t)(rows * GATHER_VOCAB), sizeof *probs);
    float *expected_probs = psm_test_alloc((size_t)(rows * GATHER_VOCAB), sizeof *probs);

    psm_test_memory *memory =
        open_memory(backend, PSM_MEMORY_DEVICE, 0, "out_of_range_row_index_in_device_memory");
    if (!memory)
        goto done;
    psm_test_memory *checking = psm_test_memory_open(backend, PSM_MEMORY_DEVICE, 1);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = samples;
    params.seed = 8;
    params.row_indices = good_indices;
    params.output_rows = rows;
    CALL_OK(sample_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params, expected,
                           expected_logprobs));
    CALL_OK(probs_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params,
                          expected_probs));
    for (size_t v = 0; v < sizeof bad_values / sizeof bad_values[0]; ++v) {
        int64_t indices[5];
        memcpy(indices, good_indices, sizeof indices);
        indices[bad] = bad_values[v];
        params.row_indices = indices;
        char what[96];
        snprintf(what, sizeof what, "row index %lld", (long long)bad_values[v]);

        psm_status status = sample_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params,
                                      tokens, logprobs);
        if (psm_test_memory_checked_on_host(memory)) {
            ck_assert_msg(status == PSM_ERR_INVALID_ARGUMENT, "%s: %s (%s)", what,
                          psm_status_string(status), call_message);
            ck_assert_msg(strstr(call_message, "row_indices[2]") != NULL,
                          "%s: the message does not name the entry: %s", what,
                          call_message);
            expect_untouched(what, tokens, draws * sizeof *tokens);
            expect_untouched(what, logprobs, draws * sizeof *logprobs);
            status = probs_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params, probs);
            ck_assert_int_eq(status, PSM_ERR_INVALID_ARGUMENT);
            expect_untouched(what, probs, (size_t)(rows * GATHER_VOCAB) * sizeof *probs);
            continue;
        }
        PSM_CHECK_OK(status);
        for (int64_t r = 0; r < rows; ++r) {
            if (r != bad) {
                expect_same_row(what, r, samples, tokens + r * samples, logprobs + r * samples,
                                expected + r * samples, expected_logprobs + r * samples);
                continue;
            }
            for (int32_t j = 0; j < samples; ++j) {
                ck_assert_msg(tokens[r * samples + j] == -1, "%s: the bad row drew token %d",
                              what, tokens[r * samples + j]);
                ck_assert_msg(isnan(logprobs[r * samples + j]),
                              "%s: the bad row's logprob is %g", what,
                              (double)logprobs[r * samples + j]);
            }
        }
        CALL_OK(probs_in(memory, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params, probs));
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t i = 0; i < GATHER_VOCAB; ++i) {
                float got = probs[r * GATHER_VOCAB + i];
                ck_assert_msg(r == bad ? isnan(got)
                                       : same_float(got, expected_probs[r * GATHER_VOCAB + i]),
                              "%s: row %lld token %lld: probability %g", what, (long long)r,
                              (long long)i, (double)got);
            }

        status = sample_in(checking, logits, GATHER_LOGITS_ROWS, GATHER_VOCAB, &params, tokens,
                           logprobs);
        ck_assert_msg(status == PSM_ERR_BAD_ROW, "%s, checking mode: %s (%s)", what,
                      psm_status_string(status), call_message);
        ck_assert_msg(strstr(call_message, "row 2") != NULL,
                      "%s, checking mode: the message does not name row 2: %s", what,
                      call_message);
        expect_untouched(what, tokens, draws * sizeof *tokens);
        expect_untouched(what, logprobs, draws * sizeof *logprobs);
    }
    psm_test_memory_close(checking);
    psm_test_memory_close(memory);
done:
    free(expected_probs);
    free(probs);
    free(expected_logprobs);
    free(expected);
    free(logprobs);
    free(tokens);
    free(logits);
}
END_TEST

/* ---- caller workspace ------------------------------------------------------- */

/* The workspace sizes asked before any data exists: every data pointer
 * NULL, the memory kinds those of the call (logits, outputs, and the
 * per-row arrays with the logits). */
static psm_status sample_size(psm_context *context, psm_memory kind, int64_t rows,
                              int64_t vocab, const psm_params *params, size_t *bytes)
{
    psm_tensor logits = psm_test_tensor(NULL, PSM_DTYPE_F32, rows, vocab, 0);
    logits.memory = kind;
    psm_output tokens = {NULL, kind}, logprobs = {NULL, kind};
    return psm_sample_workspace_size(context, &logits, params, tokens, logprobs, bytes);
}

static psm_status probs_size(psm_context *context, psm_memory kind, int64_t rows,
                             int64_t vocab, const psm_params *params, size_t *bytes)
{
    psm_tensor logits = psm_test_tensor(NULL, PSM_DTYPE_F32, rows, vocab, 0);
    psm_tensor probs =
        psm_test_tensor(NULL, PSM_DTYPE_F32, output_rows(params, rows), vocab, 0);
    logits.memory = probs.memory = kind;
    return psm_probs_workspace_size(context, &logits, params, &probs, bytes);
}

/* The sizes, asked with no data yet, never shrink as rows or vocab grow. */
PSM_PROPERTY(workspace_size_grows_with_the_call)
{
    psm_context *context = psm_test_open(backend);
    psm_params params;
    psm_params_init(&params);
    params.top_p = 0.9f;
    const int64_t row_steps[] = {1, 16, 1000, 100000};
    const int64_t vocab_steps[] = {1, 1000, 1024, 1025, 32000, 151936};
    size_t previous_sample = 0, previous_probs = 0;
    for (size_t i = 0; i < sizeof row_steps / sizeof row_steps[0]; ++i) {
        size_t sample_bytes = 0, probs_bytes = 0;
        PSM_CHECK_OK(sample_size(context, PSM_MEMORY_HOST, row_steps[i], 32000, &params,
                                 &sample_bytes));
        PSM_CHECK_OK(probs_size(context, PSM_MEMORY_HOST, row_steps[i], 32000, &params,
                                &probs_bytes));
        printf("workspace [%s]: %lld x 32000: sample %zu bytes, probs %zu bytes\n",
               psm_backend_name(backend), (long long)row_steps[i], sample_bytes, probs_bytes);
        ck_assert_msg(sample_bytes >= previous_sample && probs_bytes >= previous_probs,
                      "%lld rows need less workspace than fewer rows", (long long)row_steps[i]);
        previous_sample = sample_bytes;
        previous_probs = probs_bytes;
    }
    previous_sample = previous_probs = 0;
    for (size_t i = 0; i < sizeof vocab_steps / sizeof vocab_steps[0]; ++i) {
        size_t sample_bytes = 0, probs_bytes = 0;
        PSM_CHECK_OK(sample_size(context, PSM_MEMORY_HOST, 8, vocab_steps[i], &params,
                                 &sample_bytes));
        PSM_CHECK_OK(probs_size(context, PSM_MEMORY_HOST, 8, vocab_steps[i], &params,
                                &probs_bytes));
        printf("workspace [%s]: 8 x %lld: sample %zu bytes, probs %zu bytes\n",
               psm_backend_name(backend), (long long)vocab_steps[i], sample_bytes, probs_bytes);
        ck_assert_msg(sample_bytes >= previous_sample && probs_bytes >= previous_probs,
                      "vocab %lld needs less workspace than a smaller vocab",
                      (long long)vocab_steps[i]);
        previous_sample = sample_bytes;
        previous_probs = probs_bytes;
    }
    psm_context_destroy(context);
}
END_TEST

/* A call in a workspace of exactly the size asked for (filled with garbage
 * first, and used twice) draws what the call without one draws; one byte
 * less is PSM_ERR_INVALID_ARGUMENT with nothing written. The size is asked
 * with no data, and with the call's own pointers: the same. */
PSM_PROPERTY(workspace_of_the_asked_size)
{
    const int64_t logits_rows = 7, vocab = 5000;
    const int32_t samples = 5;
    const int64_t gather[9] = {6, 0, 0, 3, 5, 1, 2, 4, 6};
    float *logits = normal_logits(logits_rows * vocab, 2.0, 50);
    const size_t max_draws = 9 * (size_t)samples;
    int32_t *tokens = psm_test_alloc(max_draws, sizeof *tokens);
    float *logprobs = psm_test_alloc(max_draws, sizeof *logprobs);
    int32_t *expected = psm_test_alloc(max_draws, sizeof *expected);
    float *expected_logprobs = psm_test_alloc(max_draws, sizeof *expected_logprobs);
    float *probs = psm_test_alloc(9 * (size_t)vocab, sizeof *probs);
    float *expected_probs = psm_test_alloc(9 * (size_t)vocab, sizeof *expected_probs);
    const char *why = psm_test_memory_workspace_unavailable(backend);
    if (why) {
        psm_test_skip(psm_backend_name(backend), "workspace_of_the_asked_size", why);
        goto done;
    }
    for (int k = 0; k < MEMORY_KIND_COUNT; ++k) {
        psm_test_memory *memory =
            open_memory(backend, memory_kinds[k], 0, "workspace_of_the_asked_size");
        if (!memory)
            continue;
        psm_context *context = psm_test_memory_context(memory);
        for (int gathered = 0; gathered < 2; ++gathered) {
            char what[96];
            snprintf(what, sizeof what, "%s, %s", kind_name(memory_kinds[k]),
                     gathered ? "gathered rows" : "every row");
            psm_params params;
            psm_params_init(&params);
            params.num_samples = samples;
            params.temperature = 0.7f;
            params.top_k = 64;
            params.top_p = 0.95f;
            params.seed = 606;
            if (gathered) {
                params.row_indices = gather;
                params.output_rows = 9;
            }
            const int64_t rows = output_rows(&params, logits_rows);
            const size_t draws = (size_t)(rows * samples);
            size_t sample_bytes = 0, probs_bytes = 0;
            PSM_CHECK_OK(sample_size(context, memory_kinds[k], logits_rows, vocab, &params,
                                     &sample_bytes));
            PSM_CHECK_OK(probs_size(context, memory_kinds[k], logits_rows, vocab, &params,
                                    &probs_bytes));

            /* Asked with the call's own data pointers: the same sizes. */
            psm_tensor tensor = staged_logits(memory, logits, logits_rows, vocab);
            psm_params staged = stage_params(memory, &params, rows);
            psm_output token_output = {psm_test_memory_filled(memory, draws * sizeof(int32_t),
                                                              SENTINEL_BYTE),
                                       psm_test_memory_kind(memory)};
            psm_output logprob_output = {psm_test_memory_filled(memory, draws * sizeof(float),
                                                                SENTINEL_BYTE),
                                         psm_test_memory_kind(memory)};
            size_t with_data = 0;
            PSM_CHECK_OK(psm_sample_workspace_size(context, &tensor, &staged, token_output,
                                                   logprob_output, &with_data));
            ck_assert_msg(with_data == sample_bytes,
                          "%s: %zu bytes asked with data, %zu without", what, with_data,
                          sample_bytes);

            CALL_OK(sample_staged(memory, &tensor, &staged, expected, expected_logprobs));
            CALL_OK(probs_in(memory, logits, logits_rows, vocab, &params, expected_probs));
            staged.workspace = psm_test_memory_workspace(memory, sample_bytes, 0xff);
            staged.workspace_bytes = sample_bytes;
            for (int run = 0; run < 2; ++run) {
                CALL_OK(sample_staged(memory, &tensor, &staged, tokens, logprobs));
                for (int64_t r = 0; r < rows; ++r)
                    expect_same_row(what, r, samples, tokens + r * samples,
                                    logprobs + r * samples, expected + r * samples,
                                    expected_logprobs + r * samples);
            }
            params.workspace = psm_test_memory_workspace(memory, probs_bytes, 0xff);
            params.workspace_bytes = probs_bytes;
            CALL_OK(probs_in(memory, logits, logits_rows, vocab, &params, probs));
            ck_assert_msg(memcmp(probs, expected_probs, (size_t)(rows * vocab) * sizeof *probs) ==
                              0,
                          "%s: psm_probs in a workspace differs from psm_probs without", what);

            if (sample_bytes == 0 || probs_bytes == 0) {
                psm_test_skip(psm_backend_name(backend), "workspace_of_the_asked_size (too small)",
                              "the backend needs no workspace for this call");
                continue;
            }
            staged.workspace_bytes = sample_bytes - 1;
            psm_status status = sample_staged(memory, &tensor, &staged, tokens, logprobs);
            ck_assert_msg(status == PSM_ERR_INVALID_ARGUMENT, "%s, a byte short: %s (%s)", what,
                          psm_status_string(status), call_message);
            ck_assert_msg(strstr(call_message, "workspace") != NULL,
                          "%s: the message does not say what is short: %s", what,
                          call_message);
            expect_untouched(what, tokens, draws * sizeof *tokens);
            expect_untouched(what, logprobs, draws * sizeof *logprobs);
            params.workspace_bytes = probs_bytes - 1;
            status = probs_in(memory, logits, logits_rows, vocab, &params, probs);
            ck_assert_msg(status == PSM_ERR_INVALID_ARGUMENT, "%s, probs a byte short: %s (%s)",
                          what, psm_status_string(status), call_message);
            expect_untouched(what, probs, (size_t)(rows * vocab) * sizeof *probs);
        }
        psm_test_memory_close(memory);
    }
done:
    free(expected_probs);
    free(probs);
    free(expected_logprobs);
    free(expected);
    free(logprobs);
    free(tokens);
    free(logits);
}
END_TEST

int main(void)
{
    psm_test_register_common(chi_square_even_tail_is_exact);
    psm_test_register_property(offset_per_row_equals_scalar_offsets);
    psm_test_register_property(seed_and_offset_pointers_equal_scalars);
    psm_test_register_property(subsequences_pairs_match_sum_of_squares);
    psm_test_register_property(subsequences_each_row_follows_the_distribution);
    psm_test_register_property(subsequence_ids_and_default_streams);
    psm_test_register_property(gather_equals_sampling_the_copied_rows);
    psm_test_register_property(out_of_range_row_index_in_device_memory);
    psm_test_register_property(workspace_size_grows_with_the_call);
    psm_test_register_property(workspace_of_the_asked_size);
    return psm_test_run("test_request_state");
}
