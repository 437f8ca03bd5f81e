/*
 * test_precision.c: psm_probs against the float64 softmax with the same kept
 * set: total variation <= 1e-6 (docs/SAMPLING.md, "Precision") for
 * vocabularies up to 2^20, every token of float64 probability >= 1e-9 has a
 * nonzero chance, rows sum to 1, and psm_sample's logprobs are the log of
 * psm_probs at the drawn token.
 */
#include "harness.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TV_BOUND 1e-6
#define SUM_TOLERANCE 1e-5
#define LOGPROB_TOLERANCE 1e-5
#define VISIBLE_PROBABILITY 1e-9

/* N(0, 3^2) logits with a few large outliers (well above the normal maximum)
 * and one far below, at positions spread over the row. */
static void fill_logits(float *row, int64_t vocab, uint64_t seed)
{
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < vocab; ++i)
        row[i] = (float)(3.0 * psm_test_rng_normal(&rng));
    const float outliers[] = {24.0f, 21.5f, 19.0f, 18.99f, -60.0f};
    for (size_t o = 0; o < sizeof outliers / sizeof outliers[0] && (int64_t)o < vocab; ++o)
        row[psm_test_rng_below(&rng, (uint64_t)vocab)] = outliers[o];
}

typedef struct precision_case {
    int64_t vocab;
    psm_ref_params filter;
} precision_case;

/* Rows of one batch share the scalar filters and differ in temperature
 * (temperature_per_row), so per-row parameters are exercised too. */
static const float row_temperatures[] = {1.0f, 0.5f, 1.7f, 3.0f};
#define ROW_COUNT 4

static void check_batch(psm_context *context, const precision_case *c)
{
    const int64_t vocab = c->vocab;
    const int64_t rows = ROW_COUNT;
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof *probs);
    double *expected = psm_test_alloc((size_t)vocab, sizeof *expected);
    for (int64_t r = 0; r < rows; ++r)
        fill_logits(logits + r * vocab, vocab, (uint64_t)(vocab * 10 + r));

    psm_params params;
    psm_params_init(&params);
    params.top_k = c->filter.top_k;
    params.top_p = c->filter.top_p;
    params.min_p = c->filter.min_p;
    params.temperature_per_row = row_temperatures;
    PSM_CHECK_OK(psm_test_probs_f32(context, logits, rows, vocab, &params, probs));
    PSM_CHECK_OK(psm_synchronize(context));

    for (int64_t r = 0; r < rows; ++r) {
        psm_ref_params filter = c->filter;
        filter.temperature = row_temperatures[r];
        ck_assert_int_eq(psm_ref_distribution(logits + r * vocab, vocab, &filter, expected), 1);
        const float *got = probs + r * vocab;
        double distance = 0.0, sum = 0.0;
        for (int64_t i = 0; i < vocab; ++i) {
            ck_assert_msg(isfinite(got[i]) && got[i] >= 0.0f, "vocab %lld row %lld: probs[%lld] = %g",
                          (long long)vocab, (long long)r, (long long)i, (double)got[i]);
            if (expected[i] == 0.0)
                ck_assert_msg(got[i] == 0.0f,
                              "vocab %lld T=%g k=%d p=%g min_p=%g: token %lld is outside the "
                              "kept set but has probability %g",
                              (long long)vocab, (double)filter.temperature, filter.top_k,
                              (double)filter.top_p, (double)filter.min_p, (long long)i,
                              (double)got[i]);
            if (expected[i] >= VISIBLE_PROBABILITY)
                ck_assert_msg(got[i] > 0.0f,
                              "vocab %lld T=%g: token %lld has float64 probability %.3g but "
                              "probs 0",
                              (long long)vocab, (double)filter.temperature, (long long)i,
                              expected[i]);
            distance += fabs((double)got[i] - expected[i]);
            sum += got[i];
        }
        distance *= 0.5;
        printf("precision [%s] vocab %lld T=%g k=%d p=%g min_p=%g: TV %.3g, sum - 1 = %.3g\n",
               psm_backend_name(psm_context_backend(context)), (long long)vocab,
               (double)filter.temperature, filter.top_k, (double)filter.top_p,
               (double)filter.min_p, distance, sum - 1.0);
        ck_assert_msg(distance <= TV_BOUND,
                      "vocab %lld T=%g k=%d p=%g min_p=%g: total variation %.3g > %g",
                      (long long)vocab, (double)filter.temperature, filter.top_k,
                      (double)filter.top_p, (double)filter.min_p, distance, TV_BOUND);
        ck_assert_msg(fabs(sum - 1.0) <= SUM_TOLERANCE, "vocab %lld T=%g: probs sum to %.9g",
                      (long long)vocab, (double)filter.temperature, sum);
    }

    /* logprobs of drawn tokens against psm_probs of the same batch. */
    const int32_t samples = 256;
    int32_t *tokens = psm_test_alloc((size_t)(rows * samples), sizeof *tokens);
    float *logprobs = psm_test_alloc((size_t)(rows * samples), sizeof *logprobs);
    params.num_samples = samples;
    params.seed = (uint64_t)vocab;
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, rows, vocab, &params, tokens, logprobs));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int64_t r = 0; r < rows; ++r) {
        for (int32_t s = 0; s < samples; ++s) {
            int32_t token = tokens[r * samples + s];
            ck_assert_msg(token >= 0 && token < vocab, "token %d", token);
            double probability = probs[r * vocab + token];
            ck_assert_msg(probability > 0.0, "drew token %d of probability 0", token);
            double logprob = logprobs[r * samples + s];
            ck_assert_msg(fabs(logprob - log(probability)) <= LOGPROB_TOLERANCE,
                          "vocab %lld row %lld token %d: logprob %.9g, log(probs) %.9g",
                          (long long)vocab, (long long)r, token, logprob, log(probability));
        }
    }
    free(logprobs);
    free(tokens);
    free(expected);
    free(probs);
    free(logits);
}

PSM_PROPERTY(total_variation_against_float64)
{
    psm_context *context = psm_test_open(backend);
    const precision_case cases[] = {
        {1000, {0, 0, 1.0f, 0.0f}},
        {32000, {0, 0, 1.0f, 0.0f}},
        {151936, {0, 0, 1.0f, 0.0f}},
        {(int64_t)1 << 20, {0, 0, 1.0f, 0.0f}},
        {32000, {0, 40, 1.0f, 0.0f}},
        {32000, {0, 0, 0.9f, 0.0f}},
        {32000, {0, 0, 1.0f, 0.001f}},
        {151936, {0, 1000, 0.95f, 0.0001f}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i)
        check_batch(context, &cases[i]);
    psm_context_destroy(context);
}
END_TEST

int main(void)
{
    psm_test_register_property(total_variation_against_float64);
    return psm_test_run("test_precision");
}
