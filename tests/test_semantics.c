/*
 * test_semantics.c: what the filters keep, on hand-made rows with ties,
 * checked through psm_probs (the kept set is where probs > 0) against the
 * float64 reference; greedy; masks; bad rows; checking mode.
 */
#include "harness.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Ties at 5 (tokens 8, 9), at 3 (1, 2, 4) and at 2 (3, 7).
 * Rank order: 8 9 1 2 4 3 7 0 5 6. */
static const float tied_row[10] = {1, 3, 3, 2, 3, 0, -1, 2, 5, 5};

static psm_params params_of(psm_ref_params reference)
{
    psm_params params;
    psm_params_init(&params);
    params.temperature = reference.temperature;
    params.top_k = reference.top_k;
    params.top_p = reference.top_p;
    params.min_p = reference.min_p;
    return params;
}

static psm_ref_params filters(float temperature, int32_t top_k, float top_p, float min_p)
{
    psm_ref_params params = {temperature, top_k, top_p, min_p};
    return params;
}

static void describe_set(char *text, size_t size, const double *probs, int64_t vocab)
{
    size_t used = (size_t)snprintf(text, size, "{");
    for (int64_t i = 0; i < vocab && used < size; ++i)
        if (probs[i] > 0.0)
            used += (size_t)snprintf(text + used, size - used, " %lld", (long long)i);
    if (used < size)
        snprintf(text + used, size - used, " }");
}

/* psm_probs keeps exactly the reference's set, with the reference's
 * probabilities (to float accuracy), and psm_sample draws only from it. */
static void expect_kept_set(psm_context *context, const float *logits, int64_t vocab,
                            psm_ref_params filter, const char *label)
{
    double *expected = psm_test_alloc((size_t)vocab, sizeof *expected);
    float *probs = psm_test_alloc((size_t)vocab, sizeof *probs);
    ck_assert_msg(psm_ref_distribution(logits, vocab, &filter, expected) == 1,
                  "%s: bad row or no memory", label);
    psm_params params = params_of(filter);
    PSM_CHECK_OK(psm_test_probs_f32(context, logits, 1, vocab, &params, probs));
    PSM_CHECK_OK(psm_synchronize(context));

    double *got = psm_test_alloc((size_t)vocab, sizeof *got);
    for (int64_t i = 0; i < vocab; ++i)
        got[i] = probs[i];
    char expected_text[256], got_text[256];
    describe_set(expected_text, sizeof expected_text, expected, vocab);
    describe_set(got_text, sizeof got_text, got, vocab);
    for (int64_t i = 0; i < vocab; ++i) {
        ck_assert_msg((expected[i] > 0.0) == (got[i] > 0.0),
                      "%s: kept set %s, expected %s (token %lld)", label, got_text,
                      expected_text, (long long)i);
        ck_assert_msg(fabs(got[i] - expected[i]) <= 1e-6,
                      "%s: probs[%lld] = %.9g, reference %.9g", label, (long long)i, got[i],
                      expected[i]);
    }

    const int32_t samples = 2000;
    int32_t *tokens = psm_test_alloc((size_t)samples, sizeof *tokens);
    params.num_samples = samples;
    params.seed = 77;
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, 1, vocab, &params, tokens, NULL));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int32_t s = 0; s < samples; ++s)
        ck_assert_msg(tokens[s] >= 0 && tokens[s] < vocab && expected[tokens[s]] > 0.0,
                      "%s: drew token %d outside the kept set %s", label, tokens[s],
                      expected_text);
    free(tokens);
    free(got);
    free(probs);
    free(expected);
}

PSM_PROPERTY(top_k_with_ties)
{
    psm_context *context = psm_test_open(backend);
    const int32_t ks[] = {1, 2, 3, 4, 5, 6, 9, 10, 11, 1000};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; ++i) {
        char label[64];
        snprintf(label, sizeof label, "top_k=%d", ks[i]);
        expect_kept_set(context, tied_row, 10, filters(1.0f, ks[i], 1.0f, 0.0f), label);
    }
    /* Explicitly: k = 1 keeps token 8 (the lower index of the tie at 5),
     * k = 3 keeps 8, 9 and 1. */
    float probs[10];
    psm_params params = params_of(filters(1.0f, 3, 1.0f, 0.0f));
    PSM_CHECK_OK(psm_test_probs_f32(context, tied_row, 1, 10, &params, probs));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int i = 0; i < 10; ++i)
        ck_assert_msg((probs[i] > 0.0f) == (i == 8 || i == 9 || i == 1), "top_k=3: token %d",
                      i);
    psm_context_destroy(context);
}
END_TEST

PSM_PROPERTY(top_p_with_ties)
{
    psm_context *context = psm_test_open(backend);
    const float ps[] = {0.3f, 0.5f, 0.85f, 0.95f, 0.999f, 1.0f};
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; ++i) {
        char label[64];
        snprintf(label, sizeof label, "top_p=%g", (double)ps[i]);
        expect_kept_set(context, tied_row, 10, filters(1.0f, 0, ps[i], 0.0f), label);
    }
    /* Four equal logits: p = 1/4, 1/2, 3/4 keep exactly 1, 2, 3 tokens (the
     * prefix sum reaches the target exactly), the lowest indices first. */
    const float flat[6] = {-INFINITY, 0.5f, 0.5f, 0.5f, 0.5f, -INFINITY};
    const float quarters[] = {0.25f, 0.5f, 0.75f};
    for (int q = 0; q < 3; ++q) {
        char label[64];
        snprintf(label, sizeof label, "flat top_p=%g", (double)quarters[q]);
        expect_kept_set(context, flat, 6, filters(1.0f, 0, quarters[q], 0.0f), label);
        float probs[6];
        psm_params params = params_of(filters(1.0f, 0, quarters[q], 0.0f));
        PSM_CHECK_OK(psm_test_probs_f32(context, flat, 1, 6, &params, probs));
        PSM_CHECK_OK(psm_synchronize(context));
        for (int i = 0; i < 6; ++i)
            ck_assert_msg((probs[i] > 0.0f) == (i >= 1 && i <= q + 1), "%s: token %d", label, i);
    }
    psm_context_destroy(context);
}
END_TEST

PSM_PROPERTY(min_p_filter)
{
    psm_context *context = psm_test_open(backend);
    const float min_ps[] = {0.01f, 0.04f, 0.1f, 0.14f, 0.5f, 1.0f};
    const float temperatures[] = {1.0f, 0.5f, 2.0f};
    for (size_t t = 0; t < 3; ++t) {
        for (size_t i = 0; i < sizeof min_ps / sizeof min_ps[0]; ++i) {
            char label[64];
            snprintf(label, sizeof label, "T=%g min_p=%g", (double)temperatures[t],
                     (double)min_ps[i]);
            expect_kept_set(context, tied_row, 10, filters(temperatures[t], 0, 1.0f, min_ps[i]),
                            label);
        }
    }
    psm_context_destroy(context);
}
END_TEST

/* Temperature, then top-k, then top-p on the renormalised candidates, then
 * min-p: a larger row where the order of top-k and top-p matters. */
PSM_PROPERTY(filter_combinations)
{
    psm_context *context = psm_test_open(backend);
    float row[40];
    for (int i = 0; i < 40; ++i)
        row[i] = (float)((i * 7) % 13) * 0.25f; /* many ties, 13 levels */
    const psm_ref_params cases[] = {
        {1.0f, 5, 0.5f, 0.0f},  {1.0f, 20, 0.5f, 0.0f}, {0.5f, 12, 0.9f, 0.0f},
        {2.0f, 30, 0.7f, 0.2f}, {0.7f, 0, 0.6f, 0.3f},  {1.3f, 8, 1.0f, 0.5f},
        {1.0f, 39, 0.95f, 0.0f}, {1.0f, 40, 0.95f, 0.0f}, {3.0f, 25, 0.4f, 0.05f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        char label[96];
        snprintf(label, sizeof label, "T=%g k=%d p=%g min_p=%g", (double)cases[i].temperature,
                 cases[i].top_k, (double)cases[i].top_p, (double)cases[i].min_p);
        expect_kept_set(context, row, 40, cases[i], label);
        expect_kept_set(context, tied_row, 10, cases[i], label);
    }
    psm_context_destroy(context);
}
END_TEST

PSM_PROPERTY(greedy_lowest_index_and_zero_logprob)
{
    psm_context *context = psm_test_open(backend);
    const float temperatures[] = {0.0f, 1e-6f, 9.9e-6f};
    const psm_ref_params filter_sets[] = {{0, 0, 1.0f, 0.0f}, {0, 3, 0.2f, 0.9f}};
    /* Rows: the tie at 5 (8 wins over 9); a row whose maximum sits in the
     * second tile, tied with a later one; a row of one token. */
    float two_tiles[2048];
    for (int i = 0; i < 2048; ++i)
        two_tiles[i] = (float)(i % 50) * 0.1f - 3.0f;
    two_tiles[1500] = 7.0f;
    two_tiles[2040] = 7.0f;
    const float single[1] = {-2.0f};
    struct {
        const float *logits;
        int64_t vocab;
        int32_t expected;
    } rows[] = {{tied_row, 10, 8}, {two_tiles, 2048, 1500}, {single, 1, 0}};
    for (size_t r = 0; r < 3; ++r) {
        for (size_t t = 0; t < 3; ++t) {
            for (size_t f = 0; f < 2; ++f) {
                psm_params params = params_of(filter_sets[f]);
                params.temperature = temperatures[t];
                params.num_samples = 5;
                int32_t tokens[5];
                float logprobs[5];
                PSM_CHECK_OK(psm_test_sample_f32(context, rows[r].logits, 1, rows[r].vocab,
                                                 &params, tokens, logprobs));
                PSM_CHECK_OK(psm_synchronize(context));
                for (int s = 0; s < 5; ++s) {
                    ck_assert_msg(tokens[s] == rows[r].expected,
                                  "row %zu T=%g: greedy token %d, expected %d", r,
                                  (double)temperatures[t], tokens[s], rows[r].expected);
                    ck_assert_msg(logprobs[s] == 0.0f, "row %zu T=%g: greedy logprob %g", r,
                                  (double)temperatures[t], (double)logprobs[s]);
                }
                float *probs = psm_test_alloc((size_t)rows[r].vocab, sizeof *probs);
                PSM_CHECK_OK(
                    psm_test_probs_f32(context, rows[r].logits, 1, rows[r].vocab, &params, probs));
                PSM_CHECK_OK(psm_synchronize(context));
                for (int64_t i = 0; i < rows[r].vocab; ++i)
                    ck_assert_msg(probs[i] == (i == rows[r].expected ? 1.0f : 0.0f),
                                  "row %zu greedy probs[%lld] = %g", r, (long long)i,
                                  (double)probs[i]);
                free(probs);
            }
        }
    }
    /* 1e-5 itself is not greedy: the tie at 5 splits (the rest weigh 0). */
    expect_kept_set(context, tied_row, 10, filters(1e-5f, 0, 1.0f, 0.0f), "T=1e-5");
    psm_context_destroy(context);
}
END_TEST

PSM_PROPERTY(masked_tokens_never_drawn)
{
    psm_context *context = psm_test_open(backend);
    const int64_t vocab = 3000;
    float *row = psm_test_alloc((size_t)vocab, sizeof *row);
    for (int64_t i = 0; i < vocab; ++i)
        row[i] = -INFINITY;
    /* Finite logits in the first and third tiles only; the masked ones
     * would be the most likely were they finite. */
    const int64_t open[] = {3, 1023, 2048, 2999};
    const float values[] = {0.0f, 1.0f, -1.0f, 0.5f};
    for (int i = 0; i < 4; ++i)
        row[open[i]] = values[i];

    const psm_ref_params cases[] = {{1.0f, 0, 1.0f, 0.0f}, {1.0f, 2, 1.0f, 0.0f},
                                    {0.3f, 0, 0.9f, 0.0f}, {5.0f, 0, 1.0f, 0.5f}};
    for (size_t c = 0; c < 4; ++c)
        expect_kept_set(context, row, vocab, cases[c], "masked row");

    psm_params params;
    psm_params_init(&params);
    params.num_samples = 20000;
    params.seed = 5;
    int32_t *tokens = psm_test_alloc((size_t)params.num_samples, sizeof *tokens);
    PSM_CHECK_OK(psm_test_sample_f32(context, row, 1, vocab, &params, tokens, NULL));
    PSM_CHECK_OK(psm_synchronize(context));
    int seen[4] = {0, 0, 0, 0};
    for (int32_t s = 0; s < params.num_samples; ++s) {
        int which = -1;
        for (int i = 0; i < 4; ++i)
            if (tokens[s] == open[i])
                which = i;
        ck_assert_msg(which >= 0, "drew token %d, which is masked", tokens[s]);
        seen[which] = 1;
    }
    ck_assert_msg(seen[0] && seen[1] && seen[2] && seen[3], "not every finite token was drawn");
    free(tokens);
    free(row);
    psm_context_destroy(context);
}
END_TEST

#define BAD_ROWS_COUNT 7
#define BAD_VOCAB 1500
#define BAD_SAMPLES 6

/* With make_bad, rows 1 (all -inf), 3 (one NaN), 4 (one +inf) and 6 (-inf
 * everywhere but one NaN) are bad; the other rows are the same either way. */
static void fill_batch_with_bad_rows(float *logits, int make_bad)
{
    psm_test_rng rng = psm_test_rng_make(2024);
    for (int64_t i = 0; i < BAD_ROWS_COUNT * BAD_VOCAB; ++i)
        logits[i] = (float)(2.0 * psm_test_rng_normal(&rng));
    if (!make_bad)
        return;
    for (int64_t i = 0; i < BAD_VOCAB; ++i) {
        logits[1 * BAD_VOCAB + i] = -INFINITY;
        logits[6 * BAD_VOCAB + i] = -INFINITY;
    }
    logits[3 * BAD_VOCAB + 1100] = NAN;
    logits[4 * BAD_VOCAB + 7] = INFINITY;
    logits[6 * BAD_VOCAB + 1499] = NAN;
}

static int is_bad_row(int row)
{
    return row == 1 || row == 3 || row == 4 || row == 6;
}

PSM_PROPERTY(bad_rows_give_minus_one_and_spare_the_others)
{
    psm_context *context = psm_test_open(backend);
    float *bad = psm_test_alloc(BAD_ROWS_COUNT * BAD_VOCAB, sizeof *bad);
    float *good = psm_test_alloc(BAD_ROWS_COUNT * BAD_VOCAB, sizeof *good);
    fill_batch_with_bad_rows(bad, 1);
    fill_batch_with_bad_rows(good, 0);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = BAD_SAMPLES;
    params.seed = 99;
    params.top_k = 100;
    int32_t bad_tokens[BAD_ROWS_COUNT * BAD_SAMPLES], good_tokens[BAD_ROWS_COUNT * BAD_SAMPLES];
    float bad_logprobs[BAD_ROWS_COUNT * BAD_SAMPLES], good_logprobs[BAD_ROWS_COUNT * BAD_SAMPLES];
    PSM_CHECK_OK(psm_test_sample_f32(context, bad, BAD_ROWS_COUNT, BAD_VOCAB, &params,
                                     bad_tokens, bad_logprobs));
    PSM_CHECK_OK(psm_test_sample_f32(context, good, BAD_ROWS_COUNT, BAD_VOCAB, &params,
                                     good_tokens, good_logprobs));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int row = 0; row < BAD_ROWS_COUNT; ++row) {
        for (int s = 0; s < BAD_SAMPLES; ++s) {
            int at = row * BAD_SAMPLES + s;
            if (is_bad_row(row)) {
                ck_assert_msg(bad_tokens[at] == -1, "bad row %d: token %d", row, bad_tokens[at]);
                ck_assert_msg(isnan(bad_logprobs[at]), "bad row %d: logprob %g", row,
                              (double)bad_logprobs[at]);
            } else {
                ck_assert_msg(bad_tokens[at] == good_tokens[at],
                              "row %d sample %d: %d beside bad rows, %d without", row, s,
                              bad_tokens[at], good_tokens[at]);
                ck_assert_msg(bad_logprobs[at] == good_logprobs[at],
                              "row %d sample %d: logprob changed beside bad rows", row, s);
            }
        }
    }

    float *bad_probs = psm_test_alloc(BAD_ROWS_COUNT * BAD_VOCAB, sizeof *bad_probs);
    float *good_probs = psm_test_alloc(BAD_ROWS_COUNT * BAD_VOCAB, sizeof *good_probs);
    PSM_CHECK_OK(psm_test_probs_f32(context, bad, BAD_ROWS_COUNT, BAD_VOCAB, &params, bad_probs));
    PSM_CHECK_OK(
        psm_test_probs_f32(context, good, BAD_ROWS_COUNT, BAD_VOCAB, &params, good_probs));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int row = 0; row < BAD_ROWS_COUNT; ++row) {
        for (int64_t i = 0; i < BAD_VOCAB; ++i) {
            int64_t at = row * BAD_VOCAB + i;
            if (is_bad_row(row))
                ck_assert_msg(isnan(bad_probs[at]), "bad row %d: probs[%lld] = %g", row,
                              (long long)i, (double)bad_probs[at]);
            else
                ck_assert_msg(bad_probs[at] == good_probs[at], "row %d: probs[%lld] changed",
                              row, (long long)i);
        }
    }

    /* Single-token rows: -inf, NaN, +inf are each bad on their own. */
    const float lone[3] = {-INFINITY, NAN, INFINITY};
    for (int i = 0; i < 3; ++i) {
        int32_t token = 12345;
        float logprob = 0.0f;
        params.num_samples = 1;
        PSM_CHECK_OK(psm_test_sample_f32(context, &lone[i], 1, 1, &params, &token, &logprob));
        PSM_CHECK_OK(psm_synchronize(context));
        ck_assert_msg(token == -1 && isnan(logprob), "lone logit %g: token %d logprob %g",
                      (double)lone[i], token, (double)logprob);
    }
    free(bad_probs);
    free(good_probs);
    free(bad);
    free(good);
    psm_context_destroy(context);
}
END_TEST

#define CHECK_ROWS 40
#define CHECK_VOCAB 64
#define CHECK_SAMPLES 4
#define CHECK_BAD_ROW 37

PSM_PROPERTY(checking_mode_names_the_row_and_writes_nothing)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.check_rows = 1;
    psm_context *checking = psm_test_open_with(&options);
    psm_context *plain = psm_test_open(backend);

    float *logits = psm_test_alloc(CHECK_ROWS * CHECK_VOCAB, sizeof *logits);
    psm_test_rng rng = psm_test_rng_make(37);
    for (int64_t i = 0; i < CHECK_ROWS * CHECK_VOCAB; ++i)
        logits[i] = (float)psm_test_rng_normal(&rng);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = CHECK_SAMPLES;
    params.seed = 3;
    int32_t tokens[CHECK_ROWS * CHECK_SAMPLES], plain_tokens[CHECK_ROWS * CHECK_SAMPLES];
    float logprobs[CHECK_ROWS * CHECK_SAMPLES];
    float *probs = psm_test_alloc(CHECK_ROWS * CHECK_VOCAB, sizeof *probs);

    /* Good rows: checking mode draws what the plain mode draws. */
    PSM_CHECK_OK(psm_test_sample_f32(checking, logits, CHECK_ROWS, CHECK_VOCAB, &params, tokens,
                                     logprobs));
    PSM_CHECK_OK(psm_test_sample_f32(plain, logits, CHECK_ROWS, CHECK_VOCAB, &params,
                                     plain_tokens, NULL));
    PSM_CHECK_OK(psm_synchronize(plain));
    ck_assert_msg(memcmp(tokens, plain_tokens, sizeof tokens) == 0,
                  "checking mode changed the tokens of good rows");

    for (int kind = 0; kind < 3; ++kind) {
        float *bad_row = logits + CHECK_BAD_ROW * CHECK_VOCAB;
        float saved[CHECK_VOCAB];
        memcpy(saved, bad_row, sizeof saved);
        if (kind == 0)
            bad_row[10] = NAN;
        else if (kind == 1)
            bad_row[63] = INFINITY;
        else
            for (int i = 0; i < CHECK_VOCAB; ++i)
                bad_row[i] = -INFINITY;

        memset(tokens, 0xa5, sizeof tokens);
        memset(logprobs, 0xa5, sizeof logprobs);
        psm_status status = psm_test_sample_f32(checking, logits, CHECK_ROWS, CHECK_VOCAB,
                                                &params, tokens, logprobs);
        ck_assert_msg(status == PSM_ERR_BAD_ROW, "bad row kind %d: psm_sample returned %s", kind,
                      psm_status_string(status));
        ck_assert_msg(strstr(psm_last_error(), "37") != NULL,
                      "the message does not name row 37: '%s'", psm_last_error());
        for (size_t b = 0; b < sizeof tokens; ++b)
            ck_assert_msg(((unsigned char *)tokens)[b] == 0xa5, "tokens written (kind %d)", kind);
        for (size_t b = 0; b < sizeof logprobs; ++b)
            ck_assert_msg(((unsigned char *)logprobs)[b] == 0xa5, "logprobs written (kind %d)",
                          kind);

        memset(probs, 0xa5, CHECK_ROWS * CHECK_VOCAB * sizeof *probs);
        status = psm_test_probs_f32(checking, logits, CHECK_ROWS, CHECK_VOCAB, &params, probs);
        ck_assert_msg(status == PSM_ERR_BAD_ROW, "bad row kind %d: psm_probs returned %s", kind,
                      psm_status_string(status));
        ck_assert_msg(strstr(psm_last_error(), "37") != NULL,
                      "the message does not name row 37: '%s'", psm_last_error());
        for (size_t b = 0; b < CHECK_ROWS * CHECK_VOCAB * sizeof *probs; ++b)
            ck_assert_msg(((unsigned char *)probs)[b] == 0xa5, "probs written (kind %d)", kind);
        memcpy(bad_row, saved, sizeof saved);
    }
    free(probs);
    free(logits);
    psm_context_destroy(plain);
    psm_context_destroy(checking);
}
END_TEST

int main(void)
{
    psm_test_register_property(top_k_with_ties);
    psm_test_register_property(top_p_with_ties);
    psm_test_register_property(min_p_filter);
    psm_test_register_property(filter_combinations);
    psm_test_register_property(greedy_lowest_index_and_zero_logprob);
    psm_test_register_property(masked_tokens_never_drawn);
    psm_test_register_property(bad_rows_give_minus_one_and_spare_the_others);
    psm_test_register_property(checking_mode_names_the_row_and_writes_nothing);
    return psm_test_run("test_semantics");
}
