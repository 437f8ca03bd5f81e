/*
 * test_kept_sets.c: the kept set, the tile masses and the draws on rows of
 * thousands of tokens, against docs/SAMPLING.md written out literally (sort
 * the valid tokens by rank key, walk prefixes, add integers in index
 * order; only core/psm_contract.h's arithmetic). fuzz/contract_model.c does
 * the same for rows of at most four tiles; the rows here are larger, so
 * that they reach the search paths that only large rows take:
 * - top-p's gap bins: a cutoff bin with more tokens than a gather buffer
 *   holds (all logits equal, few distinct values), cutoffs far from the
 *   previous row's (batches mixing distributions), ties across tiles;
 * - top-k beyond the CPU backend's heap (5,000) before top-p and min-p;
 * - min-p's drop gap with many and with few candidates;
 * - tiles that reading changes (-0, magnitudes below 2^-64), masked tokens
 *   and wholly masked tiles, gaps past the weights' range;
 * - batches (a row per thread at a time) and single rows split over threads.
 * Per case: psm_probs has exactly the literal kept set's support (tokens
 * with a nonzero weight) and its probabilities (bit for bit on the CPU
 * backend, whose formula the literal one repeats; to float rounding on the
 * others), and psm_sample draws the literal tokens.
 */
#include "harness.h"
#include "psm_contract.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SAMPLES 24

typedef struct literal_case {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
} literal_case;

static const literal_case cases[] = {
    {0.8f, 0, 0.9f, 0.0f},     {1.5f, 0, 0.5f, 0.0f},      {0.8f, 0, 0.999f, 0.0f},
    {0.8f, 0, 1e-6f, 0.0f},    {0.8f, 0, 1.0f, 0.05f},     {1.0f, 0, 1.0f, 0.9f},
    {3.0f, 0, 1.0f, 1e-4f},    {0.8f, 5000, 0.9f, 0.0f},   {0.8f, 5000, 1.0f, 0.02f},
    {0.8f, 50, 0.95f, 0.0f},   {0.8f, 0, 0.9f, 0.01f},     {1.2f, 7000, 0.7f, 0.001f},
};

/* ---- the contract, literally ---------------------------------------------- */

typedef struct literal_row {
    uint8_t *kept;
    uint64_t *weight; /* w_i, 0 outside the kept set */
    uint64_t *tile_sum;
    uint64_t *tile_mass;
    uint64_t total;
} literal_row;

static const float *sort_logits;

static int by_rank_descending(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    uint64_t ki = psm_rank_key(sort_logits[i], (uint32_t)i);
    uint64_t kj = psm_rank_key(sort_logits[j], (uint32_t)j);
    return ki < kj ? 1 : (ki > kj ? -1 : 0);
}

/* x: the row as read (psm_read_logit); a good row (some valid logit, no NaN
 * or +inf). */
static void literal_evaluate(const float *x, int64_t vocab, const literal_case *c,
                             literal_row *row)
{
    int bits = psm_weight_bits(vocab);
    float scale = psm_inverse_temperature_scale(c->temperature);
    float row_max = -INFINITY;
    int32_t *order = psm_test_alloc((size_t)vocab, sizeof *order);
    int64_t valid = 0;
    for (int64_t i = 0; i < vocab; ++i)
        if (psm_logit_class(x[i]) == PSM_LOGIT_VALID) {
            order[valid++] = (int32_t)i;
            row_max = x[i] > row_max ? x[i] : row_max;
        }
    sort_logits = x;
    qsort(order, (size_t)valid, sizeof *order, by_rank_descending);

    int64_t candidates = c->top_k > 0 && c->top_k < valid ? c->top_k : valid;
    if (c->top_p < 1.0f) {
        uint64_t mass = 0;
        for (int64_t r = 0; r < candidates; ++r)
            mass += psm_weight(psm_scaled_gap(row_max, x[order[r]], scale), bits);
        uint64_t target = psm_top_p_target(mass, c->top_p), running = 0;
        int64_t r = 0;
        for (; r < candidates; ++r) {
            running += psm_weight(psm_scaled_gap(row_max, x[order[r]], scale), bits);
            if (running >= target)
                break;
        }
        candidates = r + 1;
    }
    uint64_t threshold = psm_min_p_threshold(c->min_p, bits);
    memset(row->kept, 0, (size_t)vocab);
    for (int64_t r = 0; r < candidates; ++r)
        row->kept[order[r]] =
            psm_weight(psm_scaled_gap(row_max, x[order[r]], scale), bits) >= threshold;

    int64_t tiles = (vocab + PSM_TILE - 1) / PSM_TILE;
    row->total = 0;
    for (int64_t t = 0; t < tiles; ++t) {
        int64_t end = (t + 1) * PSM_TILE < vocab ? (t + 1) * PSM_TILE : vocab;
        float tile_max = -INFINITY;
        for (int64_t i = t * PSM_TILE; i < end; ++i)
            if (row->kept[i] && x[i] > tile_max)
                tile_max = x[i];
        row->tile_sum[t] = 0;
        for (int64_t i = t * PSM_TILE; i < end; ++i) {
            row->weight[i] =
                row->kept[i] ? psm_weight(psm_scaled_gap(tile_max, x[i], scale), bits) : 0;
            row->tile_sum[t] += row->weight[i];
        }
        row->tile_mass[t] =
            psm_rescale_mass(row->tile_sum[t], psm_scaled_gap(row_max, tile_max, scale));
        row->total += row->tile_mass[t];
    }
    free(order);
}

static int64_t literal_draw(const literal_row *row, int64_t vocab, uint64_t seed, uint32_t stream,
                            uint32_t sample)
{
    psm_draw_bits draw = psm_sample_bits(seed, 0, stream, sample);
    uint64_t a = psm_pick(draw.tile, row->total), running = 0;
    int64_t t = 0;
    for (;; ++t) {
        running += row->tile_mass[t];
        if (running > a)
            break;
    }
    uint64_t b = psm_pick(draw.token, row->tile_sum[t]);
    running = 0;
    for (int64_t i = t * PSM_TILE; i < vocab; ++i) {
        running += row->weight[i];
        if (running > b)
            return i;
    }
    return -1;
}

/* ---- rows ------------------------------------------------------------------ */

typedef enum row_kind {
    ROW_NORMAL,     /* N(0, 2^2) */
    ROW_LANGUAGE,   /* -1.1 ln(rank) + noise, ranks shuffled: a few dominant tokens */
    ROW_EQUAL,      /* every logit 0.5: one gap bin holds the whole row */
    ROW_FEW_VALUES, /* three distinct values: thousands of ties per bin */
    ROW_COARSE,     /* N(0, 2^2) rounded to 3 fraction bits: ties across tiles */
    ROW_MASKED,     /* N(0, 1) with every third token masked, a masked tile, -0 and tiny values */
    ROW_FAR         /* half the tokens 1000 below the rest: weight 0, the last bin */
} row_kind;

static void fill_row(float *x, int64_t vocab, row_kind kind, psm_test_rng *rng)
{
    for (int64_t i = 0; i < vocab; ++i) {
        double normal = psm_test_rng_normal(rng);
        switch (kind) {
        case ROW_NORMAL:
            x[i] = (float)(2.0 * normal);
            break;
        case ROW_LANGUAGE:
            x[i] = (float)(-1.1 * log((double)i + 1.0) + 0.3 * normal);
            break;
        case ROW_EQUAL:
            x[i] = 0.5f;
            break;
        case ROW_FEW_VALUES:
            x[i] = (float)(psm_test_rng_below(rng, 3));
            break;
        case ROW_COARSE:
            x[i] = (float)(round(16.0 * normal) / 8.0);
            break;
        case ROW_MASKED:
            x[i] = i % 3 == 0 || (i >= 2 * PSM_TILE && i < 3 * PSM_TILE) ? -INFINITY
                                                                          : (float)normal;
            if (i % 97 == 5)
                x[i] = -0.0f;
            if (i % 89 == 7)
                x[i] = (i % 2 ? 1e-30f : -1e-25f);
            break;
        case ROW_FAR:
            x[i] = (float)normal - (i % 2 ? 1000.0f : 0.0f);
            break;
        }
    }
    if (kind == ROW_LANGUAGE)
        for (int64_t i = vocab - 1; i > 0; --i) {
            int64_t j = (int64_t)psm_test_rng_below(rng, (uint64_t)i + 1);
            float held = x[i];
            x[i] = x[j];
            x[j] = held;
        }
}

/* ---- the property ----------------------------------------------------------- */

/* Runs every case on a batch of rows (kinds[r] each, vocab tokens) through a
 * context of this backend with `threads` CPU threads, against the literal
 * contract. */
static void expect_literal(psm_backend backend, int threads, const row_kind *kinds, int64_t rows,
                           int64_t vocab, uint64_t seed)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.cpu_threads = backend == PSM_BACKEND_CPU ? threads : 0;
    psm_context *context = psm_test_open_with(&options);

    psm_test_rng rng = psm_test_rng_make(seed);
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
    float *read = psm_test_alloc((size_t)vocab, sizeof *read);
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof *probs);
    int32_t *tokens = psm_test_alloc((size_t)(rows * SAMPLES), sizeof *tokens);
    int64_t tiles = (vocab + PSM_TILE - 1) / PSM_TILE;
    literal_row literal = {psm_test_alloc((size_t)vocab, 1),
                           psm_test_alloc((size_t)vocab, sizeof(uint64_t)),
                           psm_test_alloc((size_t)tiles, sizeof(uint64_t)),
                           psm_test_alloc((size_t)tiles, sizeof(uint64_t)), 0};
    for (int64_t r = 0; r < rows; ++r)
        fill_row(logits + r * vocab, vocab, kinds[r], &rng);

    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        psm_params params;
        psm_params_init(&params);
        params.temperature = cases[c].temperature;
        params.top_k = cases[c].top_k;
        params.top_p = cases[c].top_p;
        params.min_p = cases[c].min_p;
        params.seed = seed + c;
        params.num_samples = SAMPLES;
        PSM_CHECK_OK(psm_test_probs_f32(context, logits, rows, vocab, &params, probs));
        PSM_CHECK_OK(psm_test_sample_f32(context, logits, rows, vocab, &params, tokens, NULL));
        PSM_CHECK_OK(psm_synchronize(context));
        for (int64_t r = 0; r < rows; ++r) {
            for (int64_t i = 0; i < vocab; ++i)
                read[i] = psm_read_logit(logits[r * vocab + i]);
            literal_evaluate(read, vocab, &cases[c], &literal);
            const float *got = probs + r * vocab;
            for (int64_t i = 0; i < vocab; ++i) {
                int64_t t = i / PSM_TILE;
                double expected =
                    literal.weight[i] == 0
                        ? 0.0
                        : ((double)literal.weight[i] / (double)literal.tile_sum[t]) *
                              ((double)literal.tile_mass[t] / (double)literal.total);
                float want = (float)expected;
                int same = backend == PSM_BACKEND_CPU
                               ? got[i] == want
                               : (got[i] > 0.0f) == (want > 0.0f) &&
                                     fabs((double)got[i] - expected) <= 2e-6 * expected;
                ck_assert_msg(same,
                              "threads %d, row %lld (kind %d), case %zu (T %g, k %d, p %g, "
                              "min-p %g): probs[%lld] = %.9g, literal %.9g (kept %d)",
                              threads, (long long)r, (int)kinds[r], c,
                              (double)cases[c].temperature, cases[c].top_k,
                              (double)cases[c].top_p, (double)cases[c].min_p, (long long)i,
                              (double)got[i], (double)want, literal.kept[i]);
            }
            for (uint32_t j = 0; j < SAMPLES; ++j) {
                int64_t want = literal_draw(&literal, vocab, params.seed, (uint32_t)r, j);
                ck_assert_msg(tokens[r * SAMPLES + j] == want,
                              "threads %d, row %lld (kind %d), case %zu: sample %u is token %d, "
                              "literal %lld",
                              threads, (long long)r, (int)kinds[r], c, j,
                              tokens[r * SAMPLES + j], (long long)want);
            }
        }
    }
    free(literal.kept);
    free(literal.weight);
    free(literal.tile_sum);
    free(literal.tile_mass);
    free(tokens);
    free(probs);
    free(read);
    free(logits);
    psm_context_destroy(context);
}

/* Batches mixing the kinds, so that a row's top-p cutoff is near or far
 * from the previous row's, run with one thread (rows in order) and two. */
PSM_PROPERTY(batches_match_the_literal_contract)
{
    const row_kind mixed[] = {ROW_LANGUAGE, ROW_NORMAL, ROW_NORMAL, ROW_COARSE,
                              ROW_FAR,      ROW_MASKED, ROW_LANGUAGE, ROW_FEW_VALUES};
    const int64_t rows = (int64_t)(sizeof mixed / sizeof mixed[0]);
    expect_literal(backend, 1, mixed, rows, 20000, 11);
    expect_literal(backend, 2, mixed, rows, 20000, 12);
    const row_kind ties[] = {ROW_EQUAL, ROW_NORMAL, ROW_EQUAL};
    expect_literal(backend, 1, ties, 3, 9000, 13);
}
END_TEST

/* Single rows, whose tiles are split over the threads. */
PSM_PROPERTY(split_rows_match_the_literal_contract)
{
    const row_kind kinds[] = {ROW_NORMAL, ROW_LANGUAGE, ROW_EQUAL, ROW_FEW_VALUES,
                              ROW_COARSE, ROW_MASKED,   ROW_FAR};
    for (size_t k = 0; k < sizeof kinds / sizeof kinds[0]; ++k)
        expect_literal(backend, 2, &kinds[k], 1, psm_test_quick() ? 12000 : 40000, 20 + k);
}
END_TEST

int main(void)
{
    psm_test_register_property(batches_match_the_literal_contract);
    psm_test_register_property(split_rows_match_the_literal_contract);
    return psm_test_run("test_kept_sets");
}
