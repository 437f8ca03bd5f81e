/*
 * test_top_logprobs.c: top-N logprobs and the ranks of drawn tokens
 * (psm_params.top_logprobs; docs/SAMPLING.md section 6).
 *
 * Processed mode: the N first kept tokens in rank order (the kept set is
 * where psm_probs is above 0, except kept tokens whose weight truncates to
 * 0, which these rows do not have), their logprobs the log of psm_probs'
 * probabilities. Raw mode: the N largest logits as given, their logprobs
 * the float64 log-softmax. Ranks: 1 + the candidates ranked above the drawn
 * token, counted by brute force. A backend that does not run top-N logprobs
 * yet must refuse them with PSM_ERR_UNSUPPORTED, writing nothing.
 */
#include "device_memory.h"
#include "harness.h"

#include "psm_contract.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL (-7)

typedef struct outputs {
    int32_t *tokens, *top_tokens, *ranks;
    float *top_logprobs;
} outputs;

static outputs make_outputs(int64_t rows, int32_t samples, int32_t count)
{
    outputs out;
    out.tokens = psm_test_alloc((size_t)(rows * samples), sizeof(int32_t));
    out.ranks = psm_test_alloc((size_t)(rows * samples), sizeof(int32_t));
    out.top_tokens = psm_test_alloc((size_t)(rows * count), sizeof(int32_t));
    out.top_logprobs = psm_test_alloc((size_t)(rows * count), sizeof(float));
    for (int64_t k = 0; k < rows * count; ++k)
        out.top_tokens[k] = SENTINEL;
    for (int64_t k = 0; k < rows * samples; ++k)
        out.ranks[k] = SENTINEL;
    return out;
}

static void free_outputs(outputs *out)
{
    free(out->tokens);
    free(out->ranks);
    free(out->top_tokens);
    free(out->top_logprobs);
}

/* Runs psm_sample with top-N logprobs; on a backend without them, checks the
 * refusal (nothing written) and skips visibly. */
static int sample_with_top(psm_context *context, psm_backend backend, const char *test,
                           const float *logits, int64_t rows, int64_t vocab, psm_params *params,
                           psm_top_logprobs *top, outputs *out)
{
    top->tokens = psm_test_output(out->top_tokens);
    top->logprobs = psm_test_output(out->top_logprobs);
    top->sampled_ranks = psm_test_output(out->ranks);
    params->top_logprobs = top;
    psm_status status =
        psm_test_sample_f32(context, logits, rows, vocab, params, out->tokens, NULL);
    return psm_test_feature_ran(context, backend, status, test, "top-N logprobs",
                                out->top_tokens, (size_t)(rows * top->count), SENTINEL);
}

/* Candidates in rank order: indices sorted by (logit desc, index asc). */
static const float *sort_logits;
static int by_rank(const void *a, const void *b)
{
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (sort_logits[i] != sort_logits[j])
        return sort_logits[i] > sort_logits[j] ? -1 : 1;
    return (i > j) - (i < j);
}

/* The expected list of one row: candidates (where candidate[i]) in rank
 * order; returns how many there are. */
static int64_t ranked_candidates(const float *row, int64_t vocab, const int *candidate,
                                 int32_t *order)
{
    int64_t n = 0;
    for (int64_t i = 0; i < vocab; ++i)
        if (candidate[i])
            order[n++] = (int32_t)i;
    sort_logits = row;
    qsort(order, (size_t)n, sizeof *order, by_rank);
    return n;
}

static void check_row(const char *label, const float *row, int64_t vocab, const int *candidate,
                      const double *expected_logprob, const int32_t *top_tokens,
                      const float *top_logprobs, int32_t count, const int32_t *drawn,
                      const int32_t *ranks, int32_t samples)
{
    int32_t *order = psm_test_alloc((size_t)vocab, sizeof *order);
    int64_t n = ranked_candidates(row, vocab, candidate, order);
    for (int32_t e = 0; e < count; ++e) {
        if (e < n) {
            ck_assert_msg(top_tokens[e] == order[e], "%s: entry %d is token %d, expected %d",
                          label, e, top_tokens[e], order[e]);
            double want = expected_logprob[order[e]];
            ck_assert_msg(fabs((double)top_logprobs[e] - want) <= 1e-5 + 1e-6 * fabs(want),
                          "%s: entry %d (token %d) logprob %.9g, expected %.9g", label, e,
                          order[e], (double)top_logprobs[e], want);
        } else {
            ck_assert_msg(top_tokens[e] == -1 && top_logprobs[e] == -INFINITY,
                          "%s: entry %d past the %lld candidates is %d, %g", label, e,
                          (long long)n, top_tokens[e], (double)top_logprobs[e]);
        }
    }
    for (int32_t j = 0; j < samples; ++j) {
        int32_t rank = -1;
        for (int64_t k = 0; k < n; ++k)
            if (order[k] == drawn[j])
                rank = (int32_t)k + 1;
        ck_assert_msg(rank > 0, "%s: drawn token %d is not a candidate", label, drawn[j]);
        ck_assert_msg(ranks[j] == rank, "%s: sample %d (token %d) rank %d, expected %d", label, j,
                      drawn[j], ranks[j], rank);
    }
    free(order);
}

/* Rows with ties (values on a grid of 0.25) and a masked token, over two
 * tiles. */
static float *make_rows(int64_t rows, int64_t vocab, uint64_t seed)
{
    psm_test_rng rng = psm_test_rng_make(seed);
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof(float));
    for (int64_t i = 0; i < rows * vocab; ++i)
        logits[i] = (float)(0.25 * (double)(int64_t)(8.0 * psm_test_rng_normal(&rng)));
    for (int64_t r = 0; r < rows; ++r)
        logits[r * vocab + 3] = -INFINITY;
    return logits;
}

/* The raw mode's expectation of a row: its finite logits are the
 * candidates, with their float64 log-softmax. */
static void raw_expectation(const float *row, int64_t vocab, int *candidate, double *expected)
{
    double max = -INFINITY, sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        if (isfinite(row[i]) && row[i] > max)
            max = row[i];
    for (int64_t i = 0; i < vocab; ++i)
        if (isfinite(row[i]))
            sum += exp((double)row[i] - max);
    for (int64_t i = 0; i < vocab; ++i) {
        candidate[i] = isfinite(row[i]);
        expected[i] = (double)row[i] - max - log(sum);
    }
}

/* The processed mode's expectation of a row from psm_probs' row: the
 * tokens of positive probability are the candidates, with its log. */
static void processed_expectation(const float *probs, int64_t vocab, int *candidate,
                                  double *expected)
{
    for (int64_t i = 0; i < vocab; ++i) {
        candidate[i] = probs[i] > 0.0f;
        expected[i] = log((double)probs[i]);
    }
}

PSM_PROPERTY(processed_top_logprobs_follow_the_kept_set)
{
    const int64_t rows = 5, vocab = 1500;
    const int32_t samples = 40, count = 20;
    float *logits = make_rows(rows, vocab, 0x70901);
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof(float));
    int *candidate = psm_test_alloc((size_t)vocab, sizeof(int));
    double *expected = psm_test_alloc((size_t)vocab, sizeof(double));
    psm_context *context = psm_test_open(backend);
    struct {
        float temperature;
        int32_t top_k;
        float top_p, min_p;
    } settings[] = {{1.0f, 0, 1.0f, 0.0f}, {0.7f, 50, 0.9f, 0.0f}, {0.8f, 0, 0.5f, 0.0f},
                    {0.9f, 0, 1.0f, 0.1f}, {1.0f, 7, 1.0f, 0.0f} /* fewer than N */};
    for (size_t s = 0; s < sizeof settings / sizeof settings[0]; ++s) {
        psm_params params;
        psm_params_init(&params);
        params.temperature = settings[s].temperature;
        params.top_k = settings[s].top_k;
        params.top_p = settings[s].top_p;
        params.min_p = settings[s].min_p;
        params.num_samples = samples;
        params.seed = 90 + s;
        PSM_CHECK_OK(psm_test_probs_f32(context, logits, rows, vocab, &params, probs));
        PSM_CHECK_OK(psm_synchronize(context));
        outputs out = make_outputs(rows, samples, count);
        psm_top_logprobs top = {.count = count, .mode = PSM_LOGPROBS_PROCESSED};
        if (!sample_with_top(context, backend, "processed_top_logprobs_follow_the_kept_set",
                             logits, rows, vocab, &params, &top, &out)) {
            free_outputs(&out);
            break;
        }
        for (int64_t r = 0; r < rows; ++r) {
            processed_expectation(probs + r * vocab, vocab, candidate, expected);
            char label[64];
            snprintf(label, sizeof label, "setting %zu row %lld", s, (long long)r);
            check_row(label, logits + r * vocab, vocab, candidate, expected,
                      out.top_tokens + r * count, out.top_logprobs + r * count,
                      count, out.tokens + r * samples, out.ranks + r * samples, samples);
        }
        free_outputs(&out);
    }
    psm_context_destroy(context);
    free(logits);
    free(probs);
    free(candidate);
    free(expected);
}

PSM_PROPERTY(raw_top_logprobs_are_the_log_softmax_as_given)
{
    const int64_t rows = 4, vocab = 2100;
    const int32_t samples = 30, count = 64;
    float *logits = make_rows(rows, vocab, 0x70902);
    int *candidate = psm_test_alloc((size_t)vocab, sizeof(int));
    double *expected = psm_test_alloc((size_t)vocab, sizeof(double));
    psm_context *context = psm_test_open(backend);
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.6f; /* raw mode ignores it, and the filters */
    params.top_k = 10;
    params.num_samples = samples;
    outputs out = make_outputs(rows, samples, count);
    psm_top_logprobs top = {.count = count, .mode = PSM_LOGPROBS_RAW};
    if (sample_with_top(context, backend, "raw_top_logprobs_are_the_log_softmax_as_given", logits,
                        rows, vocab, &params, &top, &out)) {
        for (int64_t r = 0; r < rows; ++r) {
            const float *row = logits + r * vocab;
            raw_expectation(row, vocab, candidate, expected);
            char label[64];
            snprintf(label, sizeof label, "raw row %lld", (long long)r);
            check_row(label, row, vocab, candidate, expected, out.top_tokens + r * count,
                      out.top_logprobs + r * count, count, out.tokens + r * samples,
                      out.ranks + r * samples, samples);
        }
    }
    free_outputs(&out);
    psm_context_destroy(context);
    free(logits);
    free(candidate);
    free(expected);
}

/* Drawn tokens below the top candidate: with one or two samples from a
 * nearly flat row, candidates ranked above every drawn token are the rule
 * (the rank counter's difference array must end its count at its last
 * slot then), in both modes. */
PSM_PROPERTY(ranks_of_few_samples_below_the_top)
{
    const int64_t rows = 6, vocab = 1200;
    const int32_t count = 5;
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof(float));
    psm_test_rng rng = psm_test_rng_make(0x70904);
    for (int64_t i = 0; i < rows * vocab; ++i)
        logits[i] = (float)(0.01 * psm_test_rng_normal(&rng));
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof(float));
    int *candidate = psm_test_alloc((size_t)vocab, sizeof(int));
    double *expected = psm_test_alloc((size_t)vocab, sizeof(double));
    psm_context *context = psm_test_open(backend);
    for (int32_t samples = 1; samples <= 2; ++samples)
        for (int mode = 0; mode < 2; ++mode) {
            psm_params params;
            psm_params_init(&params);
            params.num_samples = samples;
            params.seed = 700 + (uint64_t)(2 * samples + mode);
            outputs out = make_outputs(rows, samples, count);
            psm_top_logprobs top = {.count = count,
                                    .mode = mode ? PSM_LOGPROBS_RAW : PSM_LOGPROBS_PROCESSED};
            PSM_CHECK_OK(psm_test_probs_f32(context, logits, rows, vocab, &params, probs));
            PSM_CHECK_OK(psm_synchronize(context));
            if (!sample_with_top(context, backend, "ranks_of_few_samples_below_the_top", logits,
                                 rows, vocab, &params, &top, &out)) {
                free_outputs(&out);
                goto done;
            }
            int below_top = 0;
            for (int64_t r = 0; r < rows; ++r) {
                const float *row = logits + r * vocab;
                double max = -INFINITY, sum = 0.0;
                for (int64_t i = 0; i < vocab; ++i)
                    max = row[i] > max ? row[i] : max;
                for (int64_t i = 0; i < vocab; ++i)
                    sum += exp((double)row[i] - max);
                for (int64_t i = 0; i < vocab; ++i) {
                    candidate[i] = 1;
                    expected[i] = mode ? (double)row[i] - max - log(sum)
                                       : log((double)probs[r * vocab + i]);
                }
                char label[64];
                snprintf(label, sizeof label, "%d samples, mode %d, row %lld", samples, mode,
                         (long long)r);
                check_row(label, row, vocab, candidate, expected, out.top_tokens + r * count,
                          out.top_logprobs + r * count, count, out.tokens + r * samples,
                          out.ranks + r * samples, samples);
                for (int32_t j = 0; j < samples; ++j)
                    below_top |= out.ranks[r * samples + j] > 1;
            }
            ck_assert_msg(below_top, "%d samples, mode %d: every drawn token was the top one",
                          samples, mode);
            free_outputs(&out);
        }
done:
    psm_context_destroy(context);
    free(logits);
    free(probs);
    free(candidate);
    free(expected);
}

/* A row of more tiles than a group has items (so that choosing the best
 * tiles takes several rounds) and N = 64, with ties on a grid of 0.25
 * across tiles, in both modes; min-p keeps tokens by their own weight. */
PSM_PROPERTY(many_tiles_and_the_longest_list)
{
    const int64_t rows = 1, vocab = 300000;
    const int32_t samples = 8, count = PSM_MAX_TOP_LOGPROBS;
    float *logits = make_rows(rows, vocab, 0x70907);
    /* psm_probs' row, then each mode's candidates and logprobs */
    float *probs = psm_test_alloc((size_t)vocab, sizeof(float));
    int *candidate = psm_test_alloc((size_t)vocab, sizeof(int));
    double *expected = psm_test_alloc((size_t)vocab, sizeof(double));
    psm_context *context = psm_test_open(backend);
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.9f;
    params.min_p = 1e-6f;
    params.num_samples = samples;
    params.seed = 0x70908;
    PSM_CHECK_OK(psm_test_probs_f32(context, logits, rows, vocab, &params, probs));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int mode = 0; mode < 2; ++mode) {
        outputs out = make_outputs(rows, samples, count);
        psm_top_logprobs top = {.count = count,
                                .mode = mode ? PSM_LOGPROBS_RAW : PSM_LOGPROBS_PROCESSED};
        if (!sample_with_top(context, backend, "many_tiles_and_the_longest_list", logits, rows,
                             vocab, &params, &top, &out)) {
            free_outputs(&out);
            break;
        }
        if (mode)
            raw_expectation(logits, vocab, candidate, expected);
        else
            processed_expectation(probs, vocab, candidate, expected);
        check_row(mode ? "raw" : "processed", logits, vocab, candidate, expected, out.top_tokens,
                  out.top_logprobs, count, out.tokens, out.ranks, samples);
        free_outputs(&out);
    }
    free(expected);
    free(candidate);
    free(probs);
    free(logits);
    psm_context_destroy(context);
}

/* Greedy rows: a point mass in the processed mode; bad rows: -1 and NaN. */
PSM_PROPERTY(greedy_and_bad_rows)
{
    const int64_t rows = 2, vocab = 40;
    float logits[2 * 40];
    for (int i = 0; i < 80; ++i)
        logits[i] = (float)(i % 9);
    logits[40 + 5] = NAN; /* row 1 is bad */
    psm_context *context = psm_test_open(backend);
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.0f;
    params.num_samples = 3;
    outputs out = make_outputs(rows, 3, 4);
    psm_top_logprobs top = {.count = 4, .mode = PSM_LOGPROBS_PROCESSED};
    if (sample_with_top(context, backend, "greedy_and_bad_rows", logits, rows, vocab, &params,
                        &top, &out)) {
        ck_assert_int_eq(out.tokens[0], 8); /* the first 8 (i % 9 == 8) */
        ck_assert_int_eq(out.top_tokens[0], 8);
        ck_assert(out.top_logprobs[0] == 0.0f);
        for (int e = 1; e < 4; ++e)
            ck_assert(out.top_tokens[e] == -1 && out.top_logprobs[e] == -INFINITY);
        for (int j = 0; j < 3; ++j)
            ck_assert_int_eq(out.ranks[j], 1);
        for (int e = 4; e < 8; ++e)
            ck_assert(out.top_tokens[e] == -1 && isnan(out.top_logprobs[e]));
        for (int j = 3; j < 6; ++j)
            ck_assert_int_eq(out.ranks[j], -1);
    }
    free_outputs(&out);
    psm_context_destroy(context);
}

/* Through a caller's workspace of the asked size (the ranks' buffers come
 * from it): the same outputs as without. */
START_TEST(top_logprobs_through_a_caller_workspace)
{
    const int64_t rows = 3, vocab = 1500;
    const int32_t samples = 50, count = 8;
    float *logits = make_rows(rows, vocab, 0x70903);
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = samples;
    params.top_p = 0.9f;
    outputs plain = make_outputs(rows, samples, count), carved = make_outputs(rows, samples, count);
    psm_top_logprobs top = {.count = count, .mode = PSM_LOGPROBS_PROCESSED};
    ck_assert(sample_with_top(context, PSM_BACKEND_CPU, "workspace", logits, rows, vocab, &params,
                              &top, &plain));
    size_t bytes = 0;
    psm_tensor tensor = psm_test_tensor(logits, PSM_DTYPE_F32, rows, vocab, 0);
    PSM_CHECK_OK(psm_sample_workspace_size(context, &tensor, &params,
                                           psm_test_output(carved.tokens), psm_test_output(NULL),
                                           &bytes));
    unsigned char *workspace = psm_test_alloc(bytes, 1);
    memset(workspace, 0xa5, bytes);
    params.workspace = workspace;
    params.workspace_bytes = bytes;
    ck_assert(sample_with_top(context, PSM_BACKEND_CPU, "workspace", logits, rows, vocab, &params,
                              &top, &carved));
    ck_assert(memcmp(plain.tokens, carved.tokens, (size_t)(rows * samples) * sizeof(int32_t)) == 0);
    ck_assert(memcmp(plain.ranks, carved.ranks, (size_t)(rows * samples) * sizeof(int32_t)) == 0);
    ck_assert(memcmp(plain.top_tokens, carved.top_tokens, (size_t)(rows * count) * sizeof(int32_t)) ==
              0);
    ck_assert(memcmp(plain.top_logprobs, carved.top_logprobs,
                     (size_t)(rows * count) * sizeof(float)) == 0);
    free(workspace);
    free_outputs(&plain);
    free_outputs(&carved);
    free(logits);
    psm_context_destroy(context);
}
END_TEST

START_TEST(bad_top_logprobs_are_refused)
{
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    float logits[40] = {0};
    int32_t tokens[1] = {SENTINEL}, top_tokens[64];
    float top_logprobs[64];
    psm_params params;
    psm_params_init(&params);
    psm_top_logprobs top = {.count = 4,
                            .mode = PSM_LOGPROBS_PROCESSED,
                            .tokens = psm_test_output(top_tokens),
                            .logprobs = psm_test_output(top_logprobs)};
    params.top_logprobs = &top;
    struct {
        int32_t count;
        int mode;
        int drop_tokens, drop_logprobs;
        psm_status status;
        const char *needle;
    } cases[] = {{0, 0, 0, 0, PSM_ERR_INVALID_PARAMETER, "top_logprobs.count is 0"},
                 {65, 0, 0, 0, PSM_ERR_INVALID_PARAMETER, "top_logprobs.count is 65"},
                 {4, 7, 0, 0, PSM_ERR_INVALID_ARGUMENT, "top_logprobs.mode"},
                 {4, 0, 1, 0, PSM_ERR_INVALID_ARGUMENT, "top_logprobs.tokens.data"},
                 {4, 0, 0, 1, PSM_ERR_INVALID_ARGUMENT, "top_logprobs.logprobs.data"}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; ++c) {
        top.count = cases[c].count;
        top.mode = (psm_logprob_mode)cases[c].mode;
        top.tokens.data = cases[c].drop_tokens ? NULL : top_tokens;
        top.logprobs.data = cases[c].drop_logprobs ? NULL : top_logprobs;
        psm_status status = psm_test_sample_f32(context, logits, 1, 40, &params, tokens, NULL);
        ck_assert_msg(status == cases[c].status, "case %zu: %s (%s)", c,
                      psm_status_string(status), psm_last_error());
        ck_assert_msg(strstr(psm_last_error(), cases[c].needle) != NULL, "case %zu: '%s'", c,
                      psm_last_error());
        ck_assert_int_eq(tokens[0], SENTINEL);
    }
    /* psm_probs has every probability already. */
    top.count = 4;
    top.mode = PSM_LOGPROBS_PROCESSED;
    top.tokens.data = top_tokens;
    top.logprobs.data = top_logprobs;
    float probs[40];
    psm_status status = psm_test_probs_f32(context, logits, 1, 40, &params, probs);
    ck_assert_int_eq(status, PSM_ERR_INVALID_ARGUMENT);
    ck_assert(strstr(psm_last_error(), "for psm_sample") != NULL);
    psm_context_destroy(context);
}
END_TEST

/* ---- logit processing, a row gather, device memory and a workspace ------- */

/* Output rows gather logits rows {2, 0, 2, 1}; each has a bias list that
 * lifts a token of its second tile above the rest (+6.5), pushes another
 * (+3) and touches the masked token 3 (which stays -inf). */
#define GATHER_LOGITS_ROWS 3
#define GATHER_ROWS 4
#define GATHER_VOCAB 2500
#define GATHER_BIAS 3

typedef struct gathered_call {
    float *logits; /* GATHER_LOGITS_ROWS x GATHER_VOCAB */
    int64_t row_indices[GATHER_ROWS];
    int64_t bias_offsets[GATHER_ROWS + 1];
    int32_t bias_tokens[GATHER_ROWS * GATHER_BIAS];
    float bias_values[GATHER_ROWS * GATHER_BIAS];
} gathered_call;

static void make_gathered_call(gathered_call *call)
{
    static const int64_t indices[GATHER_ROWS] = {2, 0, 2, 1};
    call->logits = make_rows(GATHER_LOGITS_ROWS, GATHER_VOCAB, 0x70905);
    call->bias_offsets[0] = 0;
    for (int r = 0; r < GATHER_ROWS; ++r) {
        call->row_indices[r] = indices[r];
        call->bias_offsets[r + 1] = (r + 1) * GATHER_BIAS;
        const int32_t tokens[GATHER_BIAS] = {1500 + 17 * r, 11 + 7 * r, 3};
        const float values[GATHER_BIAS] = {6.5f, 3.0f, 1.0f};
        for (int e = 0; e < GATHER_BIAS; ++e) {
            call->bias_tokens[r * GATHER_BIAS + e] = tokens[e];
            call->bias_values[r * GATHER_BIAS + e] = values[e];
        }
    }
}

/* Output row r's processed logits: the gathered row plus its bias. */
static void processed_row(const gathered_call *call, int r, float *out)
{
    memcpy(out, call->logits + call->row_indices[r] * GATHER_VOCAB, GATHER_VOCAB * sizeof(float));
    for (int64_t e = call->bias_offsets[r]; e < call->bias_offsets[r + 1]; ++e)
        out[call->bias_tokens[e]] += call->bias_values[e];
}

/* One psm_sample with top-N logprobs, every buffer in the memory's kind
 * (and, in device memory, through a caller's workspace of the asked
 * size), the outputs read back into out. */
static void sample_gathered(psm_test_memory *memory, const gathered_call *call,
                            const psm_params *host_params, psm_logprob_mode mode, outputs *out,
                            int32_t samples, int32_t count)
{
    const size_t draws = (size_t)(GATHER_ROWS * samples), entries = (size_t)(GATHER_ROWS * count);
    const psm_memory kind = psm_test_memory_kind(memory);
    psm_params params = *host_params;
    params.row_indices =
        psm_test_memory_copy_in(memory, call->row_indices, sizeof call->row_indices);
    psm_logit_processing processing;
    psm_logit_processing_init(&processing);
    processing.bias_offsets =
        psm_test_memory_copy_in(memory, call->bias_offsets, sizeof call->bias_offsets);
    processing.bias_tokens =
        psm_test_memory_copy_in(memory, call->bias_tokens, sizeof call->bias_tokens);
    processing.bias_values =
        psm_test_memory_copy_in(memory, call->bias_values, sizeof call->bias_values);
    params.processing = &processing;
    psm_tensor logits = psm_test_tensor(
        psm_test_memory_copy_in(memory, call->logits,
                                GATHER_LOGITS_ROWS * GATHER_VOCAB * sizeof(float)),
        PSM_DTYPE_F32, GATHER_LOGITS_ROWS, GATHER_VOCAB, 0);
    logits.memory = kind;
    psm_output tokens = {psm_test_memory_filled(memory, draws * sizeof(int32_t), 0xff), kind};
    psm_top_logprobs top = {.count = count, .mode = mode};
    top.tokens = (psm_output){psm_test_memory_filled(memory, entries * sizeof(int32_t), 0xff), kind};
    top.logprobs = (psm_output){psm_test_memory_filled(memory, entries * sizeof(float), 0xff), kind};
    top.sampled_ranks =
        (psm_output){psm_test_memory_filled(memory, draws * sizeof(int32_t), 0xff), kind};
    params.top_logprobs = &top;
    psm_context *context = psm_test_memory_context(memory);
    if (kind == PSM_MEMORY_DEVICE) {
        size_t bytes = 0;
        PSM_CHECK_OK(psm_sample_workspace_size(context, &logits, &params, tokens,
                                               (psm_output){NULL, kind}, &bytes));
        params.workspace = psm_test_memory_workspace(memory, bytes, 0xa5);
        params.workspace_bytes = bytes;
    }
    PSM_CHECK_OK(psm_sample(context, &logits, &params, tokens, (psm_output){NULL, kind}));
    psm_test_memory_read(memory, out->tokens, tokens.data, draws * sizeof(int32_t));
    psm_test_memory_read(memory, out->top_tokens, top.tokens.data, entries * sizeof(int32_t));
    psm_test_memory_read(memory, out->top_logprobs, top.logprobs.data, entries * sizeof(float));
    psm_test_memory_read(memory, out->ranks, top.sampled_ranks.data, draws * sizeof(int32_t));
}

/* Raw mode lists the logits as given (the gathered row, before the bias),
 * processed mode the distribution psm_probs gives the processed row; then
 * the same calls from the backend's device memory through a caller's
 * workspace give the same outputs, bit for bit. */
PSM_PROPERTY(top_logprobs_with_processing_a_gather_and_device_memory)
{
    const int32_t samples = 12, count = 24;
    gathered_call call;
    make_gathered_call(&call);
    float *probs = psm_test_alloc(GATHER_ROWS * GATHER_VOCAB, sizeof(float));
    float *row = psm_test_alloc(GATHER_VOCAB, sizeof(float));
    int *candidate = psm_test_alloc(GATHER_VOCAB, sizeof(int));
    double *expected = psm_test_alloc(GATHER_VOCAB, sizeof(double));
    psm_params params;
    psm_params_init(&params);
    params.temperature = 0.8f;
    params.top_p = 0.97f;
    params.min_p = 0.002f;
    params.num_samples = samples;
    params.seed = 0x70906;
    params.output_rows = GATHER_ROWS;

    psm_test_memory *host = psm_test_memory_open(backend, PSM_MEMORY_HOST, 0);
    psm_logit_processing processing;
    psm_logit_processing_init(&processing);
    processing.bias_offsets = call.bias_offsets;
    processing.bias_tokens = call.bias_tokens;
    processing.bias_values = call.bias_values;
    psm_params probs_params = params;
    probs_params.row_indices = call.row_indices;
    probs_params.processing = &processing;
    psm_tensor logits =
        psm_test_tensor(call.logits, PSM_DTYPE_F32, GATHER_LOGITS_ROWS, GATHER_VOCAB, 0);
    psm_tensor probs_tensor = psm_test_tensor(probs, PSM_DTYPE_F32, GATHER_ROWS, GATHER_VOCAB, 0);
    PSM_CHECK_OK(psm_probs(psm_test_memory_context(host), &logits, &probs_params, &probs_tensor));
    PSM_CHECK_OK(psm_synchronize(psm_test_memory_context(host)));

    const char *no_device = psm_test_memory_unavailable(backend, PSM_MEMORY_DEVICE);
    if (!no_device)
        no_device = psm_test_memory_workspace_unavailable(backend);
    if (no_device)
        psm_test_skip(psm_backend_name(backend),
                      "top_logprobs_with_processing_a_gather_and_device_memory (device memory)",
                      no_device);
    for (int mode = 0; mode < 2; ++mode) {
        const psm_logprob_mode logprob_mode = mode ? PSM_LOGPROBS_RAW : PSM_LOGPROBS_PROCESSED;
        outputs out = make_outputs(GATHER_ROWS, samples, count);
        sample_gathered(host, &call, &params, logprob_mode, &out, samples, count);
        for (int r = 0; r < GATHER_ROWS; ++r) {
            const float *given = call.logits + call.row_indices[r] * GATHER_VOCAB;
            if (mode) {
                raw_expectation(given, GATHER_VOCAB, candidate, expected);
                memcpy(row, given, GATHER_VOCAB * sizeof(float));
            } else {
                processed_row(&call, r, row);
                processed_expectation(probs + r * GATHER_VOCAB, GATHER_VOCAB, candidate, expected);
            }
            char label[64];
            snprintf(label, sizeof label, "mode %d, output row %d", mode, r);
            check_row(label, row, GATHER_VOCAB, candidate, expected, out.top_tokens + r * count,
                      out.top_logprobs + r * count, count, out.tokens + r * samples,
                      out.ranks + r * samples, samples);
        }
        if (!no_device) {
            outputs device_out = make_outputs(GATHER_ROWS, samples, count);
            psm_test_memory *device = psm_test_memory_open(backend, PSM_MEMORY_DEVICE, 0);
            sample_gathered(device, &call, &params, logprob_mode, &device_out, samples, count);
            psm_test_memory_close(device);
            const size_t draws = (size_t)(GATHER_ROWS * samples);
            const size_t entries = (size_t)(GATHER_ROWS * count);
            ck_assert(memcmp(out.tokens, device_out.tokens, draws * sizeof(int32_t)) == 0);
            ck_assert(memcmp(out.ranks, device_out.ranks, draws * sizeof(int32_t)) == 0);
            ck_assert(memcmp(out.top_tokens, device_out.top_tokens, entries * sizeof(int32_t)) ==
                      0);
            ck_assert(memcmp(out.top_logprobs, device_out.top_logprobs,
                             entries * sizeof(float)) == 0);
            free_outputs(&device_out);
        }
        free_outputs(&out);
    }
    psm_test_memory_close(host);
    free(call.logits);
    free(probs);
    free(row);
    free(candidate);
    free(expected);
}

int main(void)
{
    psm_test_register_common(bad_top_logprobs_are_refused);
    psm_test_register_common(top_logprobs_through_a_caller_workspace);
    psm_test_register_property(processed_top_logprobs_follow_the_kept_set);
    psm_test_register_property(raw_top_logprobs_are_the_log_softmax_as_given);
    psm_test_register_property(greedy_and_bad_rows);
    psm_test_register_property(many_tiles_and_the_longest_list);
    psm_test_register_property(ranks_of_few_samples_below_the_top);
    psm_test_register_property(top_logprobs_with_processing_a_gather_and_device_memory);
    return psm_test_run("test_top_logprobs");
}
