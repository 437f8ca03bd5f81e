/*
 * test_chisquare.c: 10^6 draws per setting against the float64 reference
 * distribution, by Pearson's chi-square test at significance 1e-4.
 *
 * The seeds are fixed, so a run cannot flake; the bound is nevertheless a
 * real 1e-4 quantile (Wilson-Hilferty, checked below against exact values),
 * so a wrong distribution fails rather than hiding under a loose bound.
 */
#include "harness.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DRAWS 1000000
#define SIGNIFICANCE 1e-4
#define MIN_EXPECTED 5.0

/* z with P(Z > z) = upper_tail for a standard normal Z, by bisection on
 * erfc (monotone), to double precision. */
static double normal_upper_quantile(double upper_tail)
{
    double low = -40.0, high = 40.0;
    for (int step = 0; step < 200; ++step) {
        double middle = 0.5 * (low + high);
        if (0.5 * erfc(middle / sqrt(2.0)) > upper_tail)
            low = middle;
        else
            high = middle;
    }
    return 0.5 * (low + high);
}

/* Wilson-Hilferty: (X/k)^(1/3) is close to normal with mean 1 - 2/(9k) and
 * variance 2/(9k), so the upper quantile is k (1 - 2/(9k) + z sqrt(2/(9k)))^3. */
static double chi_square_critical(double degrees_of_freedom, double significance)
{
    double z = normal_upper_quantile(significance);
    double v = 2.0 / (9.0 * degrees_of_freedom);
    double cube_root = 1.0 - v + z * sqrt(v);
    return degrees_of_freedom * cube_root * cube_root * cube_root;
}

/* Exact 1 - 1e-4 quantiles of chi-square (regularised incomplete gamma,
 * computed to 30 digits with mpmath); Wilson-Hilferty is within 0.4% and
 * slightly above (conservative) from 30 degrees of freedom up. */
START_TEST(wilson_hilferty_quantile)
{
    ck_assert(fabs(normal_upper_quantile(1e-4) - 3.7190164854556806) < 1e-12);
    static const struct {
        double dof, exact;
    } table[] = {{30, 67.6326302574}, {49, 94.5967219827}, {100, 161.318656959},
                 {1000, 1174.93349658}, {4999, 5379.44610336}};
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i) {
        double approximation = chi_square_critical(table[i].dof, 1e-4);
        ck_assert_msg(approximation >= table[i].exact &&
                          approximation <= table[i].exact * 1.004,
                      "dof %g: Wilson-Hilferty %.6f, exact %.6f", table[i].dof, approximation,
                      table[i].exact);
    }
}
END_TEST

/* Pearson's statistic over bins of neighbouring tokens (index order) with
 * at least 5 expected draws each; a bin closes only when the rest of the
 * row still expects >= 5, so the remainder joins the last bin. Tokens the
 * reference filters out are not binned (they must not be drawn at all). */
static double chi_square_statistic(const char *label, const double *probs,
                                   const int64_t *observed, int64_t vocab, double draws,
                                   int64_t *bins_out)
{
    double remaining = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        remaining += probs[i] * draws;
    double statistic = 0.0, bin_expected = 0.0, bin_observed = 0.0;
    int64_t bins = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        if (probs[i] == 0.0) {
            ck_assert_msg(observed[i] == 0, "%s: token %lld is filtered out but drawn %lld times",
                          label, (long long)i, (long long)observed[i]);
            continue;
        }
        bin_expected += probs[i] * draws;
        bin_observed += (double)observed[i];
        remaining -= probs[i] * draws;
        if (bin_expected >= MIN_EXPECTED && remaining >= MIN_EXPECTED) {
            statistic += (bin_observed - bin_expected) * (bin_observed - bin_expected) /
                         bin_expected;
            ++bins;
            bin_expected = bin_observed = 0.0;
        }
    }
    if (bin_expected > 0.0) {
        statistic +=
            (bin_observed - bin_expected) * (bin_observed - bin_expected) / bin_expected;
        ++bins;
    }
    ck_assert_msg(bins >= 30, "%s: only %lld bins; the quantile approximation wants >= 30",
                  label, (long long)bins);
    *bins_out = bins;
    return statistic;
}

typedef struct setting {
    const char *label;
    int64_t vocab;
    double logit_sigma;
    uint64_t data_seed;
    psm_ref_params filter;
    int quick; /* also run under POLYSAMPLE_TEST_QUICK */
} setting;

static const setting settings[] = {
    {"plain T=1", 200, 1.5, 1, {1.0f, 0, 1.0f, 0.0f}, 1},
    {"T=0.7", 200, 1.5, 1, {0.7f, 0, 1.0f, 0.0f}, 0},
    {"T=1.8", 300, 2.0, 2, {1.8f, 0, 1.0f, 0.0f}, 0},
    {"top-k 50", 1000, 2.0, 3, {1.0f, 50, 1.0f, 0.0f}, 1},
    {"top-p 0.9", 1000, 2.0, 4, {1.0f, 0, 0.9f, 0.0f}, 0},
    {"min-p 0.02", 1000, 2.0, 5, {1.0f, 0, 1.0f, 0.02f}, 0},
    {"all filters", 2000, 2.0, 6, {0.8f, 200, 0.95f, 0.01f}, 0},
    {"5000 tokens, 5 tiles", 5000, 1.0, 7, {1.0f, 0, 1.0f, 0.0f}, 1},
};

static void run_setting(psm_context *context, const setting *s, uint64_t sample_seed,
                        psm_filter_order order)
{
    int64_t vocab = s->vocab;
    float *logits = psm_test_alloc((size_t)vocab, sizeof *logits);
    psm_test_rng rng = psm_test_rng_make(s->data_seed);
    for (int64_t i = 0; i < vocab; ++i)
        logits[i] = (float)(s->logit_sigma * psm_test_rng_normal(&rng));
    double *probs = psm_test_alloc((size_t)vocab, sizeof *probs);
    ck_assert_int_eq(
        psm_ref_distribution_ordered(logits, vocab, &s->filter, (psm_ref_order)order, probs), 1);

    psm_params params = psm_test_params_of(&s->filter, order);
    params.num_samples = DRAWS;
    params.seed = sample_seed;
    int32_t *tokens = psm_test_alloc(DRAWS, sizeof *tokens);
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, 1, vocab, &params, tokens, NULL));
    PSM_CHECK_OK(psm_synchronize(context));

    int64_t *observed = psm_test_alloc((size_t)vocab, sizeof *observed);
    for (int64_t d = 0; d < DRAWS; ++d) {
        ck_assert_msg(tokens[d] >= 0 && tokens[d] < vocab, "%s: token %d out of range", s->label,
                      tokens[d]);
        ++observed[tokens[d]];
    }
    int64_t bins = 0;
    double statistic = chi_square_statistic(s->label, probs, observed, vocab, DRAWS, &bins);
    double critical = chi_square_critical((double)(bins - 1), SIGNIFICANCE);
    printf("chi-square [%s] %s: %.1f on %lld degrees of freedom (critical %.1f)\n",
           psm_backend_name(psm_context_backend(context)), s->label, statistic,
           (long long)(bins - 1), critical);
    ck_assert_msg(statistic <= critical,
                  "%s: chi-square %.2f > %.2f (dof %lld, significance %g): the draws do not "
                  "follow the distribution",
                  s->label, statistic, critical, (long long)(bins - 1), SIGNIFICANCE);
    free(observed);
    free(tokens);
    free(probs);
    free(logits);
}

PSM_PROPERTY(chi_square_goodness_of_fit)
{
    psm_context *context = psm_test_open(backend);
    for (size_t i = 0; i < sizeof settings / sizeof settings[0]; ++i) {
        if (psm_test_quick() && !settings[i].quick)
            continue;
        run_setting(context, &settings[i], 1000 + i, PSM_FILTER_ORDER_POLYSAMPLE);
    }
    psm_context_destroy(context);
}
END_TEST

/* The same test across rows: 8 rows of one batch, each its own stream,
 * pooled into one 10^6-draw histogram of a shared row. */
PSM_PROPERTY(chi_square_across_rows)
{
    psm_context *context = psm_test_open(backend);
    const int64_t rows = 8, vocab = 1500;
    const int32_t per_row = DRAWS / 8;
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
    psm_test_rng rng = psm_test_rng_make(8);
    for (int64_t i = 0; i < vocab; ++i)
        logits[i] = (float)(1.2 * psm_test_rng_normal(&rng));
    for (int64_t r = 1; r < rows; ++r)
        memcpy(logits + r * vocab, logits, (size_t)vocab * sizeof *logits);
    psm_ref_params filter = {0.9f, 0, 0.97f, 0.0f};
    double *probs = psm_test_alloc((size_t)vocab, sizeof *probs);
    ck_assert_int_eq(psm_ref_distribution(logits, vocab, &filter, probs), 1);

    psm_params params;
    psm_params_init(&params);
    params.temperature = filter.temperature;
    params.top_p = filter.top_p;
    params.num_samples = per_row;
    params.seed = 424242;
    int32_t *tokens = psm_test_alloc((size_t)(rows * per_row), sizeof *tokens);
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, rows, vocab, &params, tokens, NULL));
    PSM_CHECK_OK(psm_synchronize(context));

    int64_t *observed = psm_test_alloc((size_t)vocab, sizeof *observed);
    for (int64_t d = 0; d < rows * per_row; ++d) {
        ck_assert_msg(tokens[d] >= 0 && tokens[d] < vocab, "token %d out of range", tokens[d]);
        ++observed[tokens[d]];
    }
    int64_t bins = 0;
    double statistic =
        chi_square_statistic("8 rows pooled", probs, observed, vocab, (double)(rows * per_row),
                             &bins);
    double critical = chi_square_critical((double)(bins - 1), SIGNIFICANCE);
    printf("chi-square [%s] 8 rows pooled: %.1f on %lld degrees of freedom (critical %.1f)\n",
           psm_backend_name(backend), statistic, (long long)(bins - 1), critical);
    ck_assert_msg(statistic <= critical, "pooled rows: chi-square %.2f > %.2f (dof %lld)",
                  statistic, critical, (long long)(bins - 1));
    free(observed);
    free(tokens);
    free(probs);
    free(logits);
    psm_context_destroy(context);
}
END_TEST

/* One engine order, llama.cpp's: its filters at temperature 1 and the draw
 * at 0.6, against the reference in that order. Backends without filter
 * orders refuse it (test_filter_orders checks that) and skip here. */
PSM_PROPERTY(chi_square_llama_cpp_order)
{
    static const setting llama = {"llama.cpp order, T=0.6", 1000, 2.0, 9,
                                  {0.6f, 300, 0.9f, 0.02f}, 1};
    psm_context *context = psm_test_open(backend);
    psm_params probe = psm_test_params_of(&llama.filter, PSM_FILTER_ORDER_LLAMA_CPP);
    float logits[2] = {0.0f, 1.0f};
    int32_t tokens[1];
    psm_status status = psm_test_sample_f32(context, logits, 1, 2, &probe, tokens, NULL);
    if (status == PSM_ERR_UNSUPPORTED && backend != PSM_BACKEND_CPU) {
        psm_test_skip(psm_backend_name(backend), "chi_square_llama_cpp_order",
                      "the backend does not run filter orders (PSM_ERR_UNSUPPORTED)");
    } else {
        PSM_CHECK_OK(status);
        run_setting(context, &llama, 7777, PSM_FILTER_ORDER_LLAMA_CPP);
    }
    psm_context_destroy(context);
}
END_TEST

int main(void)
{
    psm_test_register_common(wilson_hilferty_quantile);
    psm_test_register_property(chi_square_goodness_of_fit);
    psm_test_register_property(chi_square_across_rows);
    psm_test_register_property(chi_square_llama_cpp_order);
    return psm_test_run("test_chisquare");
}
