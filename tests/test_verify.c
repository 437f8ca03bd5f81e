/*
 * test_verify.c: psm_verify, speculative decoding verification
 * (docs/SAMPLING.md, section 7).
 *
 * - the contract's wide arithmetic (core/psm_verify.h) against slow
 *   references, on edge values and seeded random ones;
 * - statistics: with a deliberately poor draft, the emitted token at each
 *   position follows the target's float64 reference distribution (Pearson's
 *   chi-square, exact p-value, bound 1e-6, >= 10^6 requests), and the mean
 *   accepted length matches its expectation computed in float64 from the
 *   target and draft distributions (within 6 standard errors), for a chain
 *   with draft logits and a tree of two candidates per level with draft
 *   probabilities;
 * - edge cases with exact answers, bad inputs (a clear status, the outputs
 *   untouched), and determinism (seeds, batch composition, thread counts).
 * - agreement: every backend gives the CPU backend's outputs bit for bit
 *   (accepted counts, tokens, path nodes, logprobs) over chains and trees,
 *   draft logits with their parameters, draft probabilities and one-hot
 *   drafts, greedy and filtered targets, per-request arrays, f32 and bf16,
 *   from host memory and from device memory; and the rule for bad drafts in
 *   device memory (the request made bad, or the call failed in checking
 *   mode, as the CPU backend reports it).
 * A backend without verification skips each property with the reason it
 * gives (the SKIP line), after checking that it wrote nothing.
 */
#include "device_memory.h"
#include "harness.h"
#include "psm_reference.h"
#include "psm_verify.h"
#include "wide_limbs.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL_TOKEN 0x5a5a5a5a
#define P_VALUE_BOUND 1e-6
#define SIGMAS 6.0
#define STAT_REQUESTS_PER_CALL 131072
#define STAT_CALLS 8 /* 1,048,576 requests */

/* ---- slow references for the contract's wide arithmetic ------------------- */

static int reference_accepts(uint64_t u, uint64_t q_x, uint64_t q_total, uint64_t r_x,
                             uint64_t r_total)
{
    limbs256 left = limbs256_times(limbs256_times(limbs256_of(u), q_x), r_total);
    limbs256 right = limbs256_times_2_64(limbs256_times(limbs256_of(r_x), q_total));
    return limbs256_compare(left, right) < 0;
}

typedef unsigned __int128 wide;

static wide wide_of(psm_u128 value)
{
    return ((wide)value.high << 64) | value.low;
}

/* Values that stress carries: powers of two and their neighbours, all-ones,
 * and the bounds of section 7's sizes. */
static uint64_t edge_value(psm_test_rng *rng)
{
    switch (psm_test_rng_below(rng, 6)) {
    case 0:
        return psm_test_rng_next(rng);
    case 1:
        return (uint64_t)1 << psm_test_rng_below(rng, 64);
    case 2:
        return ((uint64_t)1 << psm_test_rng_below(rng, 64)) - 1;
    case 3:
        return UINT64_MAX - psm_test_rng_below(rng, 3);
    case 4:
        return psm_test_rng_below(rng, 4);
    default:
        return psm_test_rng_next(rng) >> psm_test_rng_below(rng, 64);
    }
}

START_TEST(wide_products_match_reference)
{
    psm_test_rng rng = psm_test_rng_make(0x7e51f1u);
    for (int trial = 0; trial < 200000; ++trial) {
        uint64_t a = edge_value(&rng), b = edge_value(&rng), c = edge_value(&rng);
        psm_u128 product = psm_u128_product(a, b);
        ck_assert(wide_of(product) == (wide)a * b);
        psm_u192 triple = psm_u192_product(product, c);
        limbs256 expected = limbs256_times(limbs256_times(limbs256_of(a), b), c);
        limbs256 got = {{(uint32_t)triple.low, (uint32_t)(triple.low >> 32),
                      (uint32_t)triple.middle, (uint32_t)(triple.middle >> 32),
                      (uint32_t)triple.high, (uint32_t)(triple.high >> 32)}};
        ck_assert_msg(limbs256_compare(got, expected) == 0, "a=%llu b=%llu c=%llu",
                      (unsigned long long)a, (unsigned long long)b, (unsigned long long)c);
    }
}
END_TEST

START_TEST(acceptance_test_matches_reference)
{
    psm_test_rng rng = psm_test_rng_make(0xacce97u);
    for (int trial = 0; trial < 400000; ++trial) {
        uint64_t u = edge_value(&rng);
        uint64_t q_total = edge_value(&rng) >> 1; /* <= 2^63 */
        uint64_t q_x = q_total ? 1 + psm_test_rng_below(&rng, q_total) : 1;
        q_total = q_total < q_x ? q_x : q_total;
        uint64_t r_total = edge_value(&rng) | 1;
        uint64_t r_x = psm_test_rng_below(&rng, r_total + (r_total < UINT64_MAX));
        ck_assert_int_eq(psm_draft_accepted(u, q_x, q_total, r_x, r_total),
                         reference_accepts(u, q_x, q_total, r_x, r_total));
    }
    /* Exhaustive over small weights and the extreme u: accepted exactly when
     * u / 2^64 < (r_x / r_total) / (q_x / q_total). */
    const uint64_t us[] = {0, 1, (uint64_t)1 << 63, UINT64_MAX - 1, UINT64_MAX};
    for (uint64_t q_total = 1; q_total <= 9; ++q_total)
        for (uint64_t q_x = 1; q_x <= q_total; ++q_x)
            for (uint64_t r_total = 1; r_total <= 9; ++r_total)
                for (uint64_t r_x = 0; r_x <= r_total; ++r_x)
                    for (size_t i = 0; i < sizeof us / sizeof us[0]; ++i)
                        ck_assert_int_eq(psm_draft_accepted(us[i], q_x, q_total, r_x, r_total),
                                         reference_accepts(us[i], q_x, q_total, r_x, r_total));
}
END_TEST

/* p <= q/q_tot scaled: a token the target gives at least the draft's share
 * is always accepted, whatever u (the largest u included); one the target
 * gives 0 never is. */
START_TEST(acceptance_edges)
{
    psm_test_rng rng = psm_test_rng_make(0xed9e5u);
    for (int trial = 0; trial < 100000; ++trial) {
        uint64_t q_total = 1 + (psm_test_rng_next(&rng) >> 1);
        uint64_t q_x = 1 + psm_test_rng_below(&rng, q_total);
        uint64_t r_total = 1 + psm_test_rng_next(&rng) / 2;
        uint64_t u = psm_test_rng_next(&rng) | ((uint64_t)psm_test_rng_below(&rng, 2) << 63);
        /* r_x / r_total >= q_x / q_total, both sides exact: r_x = r_total,
         * or the same fraction scaled when it fits. */
        ck_assert(psm_draft_accepted(UINT64_MAX, q_x, q_total, r_total, r_total));
        ck_assert(psm_draft_accepted(u, q_x, q_x, 1, 1));
        ck_assert(!psm_draft_accepted(0, q_x, q_total, 0, r_total));
        ck_assert(!psm_draft_accepted(u, q_x, q_total, 0, r_total));
    }
}
END_TEST

START_TEST(residual_step_matches_reference)
{
    psm_test_rng rng = psm_test_rng_make(0x4e51d0u);
    for (int trial = 0; trial < 200000; ++trial) {
        int bits = 32 + (int)psm_test_rng_below(&rng, 9);
        uint64_t r_i = psm_test_rng_below(&rng, (uint64_t)1 << (bits + 1));
        uint64_t q_i = psm_test_rng_below(&rng, ((uint64_t)1 << bits) + 1);
        uint64_t q_total = (psm_test_rng_next(&rng) >> 1) | q_i;
        uint64_t r_total = psm_test_rng_next(&rng) | r_i;
        wide kept = (wide)r_i * q_total, removed = (wide)q_i * r_total;
        wide expected = kept > removed ? kept - removed : 0;
        psm_u128 excess = psm_residual_excess(r_i, q_total, q_i, r_total);
        ck_assert(wide_of(excess) == expected);
        int length = 0;
        for (wide v = expected; v != 0; v >>= 1)
            ++length;
        ck_assert_int_eq(psm_u128_bit_length(excess), length);
        int shift = psm_residual_shift(excess, bits);
        ck_assert_int_eq(shift, length > bits + 1 ? length - (bits + 1) : 0);
        uint64_t shifted = psm_u128_shift_right(excess, shift);
        ck_assert(shifted == (uint64_t)(expected >> shift));
        ck_assert(shifted < ((uint64_t)1 << (bits + 1)));
    }
}
END_TEST

/* Rejection leaves a residual with some mass: a zero residual needs
 * R_i Q_tot <= Q_i R_tot for every i, i.e. r = q, and then every token is
 * accepted. Checked on small random distributions and every u's class. */
START_TEST(rejection_leaves_mass)
{
    psm_test_rng rng = psm_test_rng_make(0x5e51d0u);
    enum { TOKENS = 5 };
    for (int trial = 0; trial < 200000; ++trial) {
        uint64_t r[TOKENS], q[TOKENS], r_total = 0, q_total = 0;
        int equal = psm_test_rng_below(&rng, 4) == 0;
        uint64_t scale = 1 + psm_test_rng_below(&rng, 5);
        for (int i = 0; i < TOKENS; ++i) {
            r[i] = psm_test_rng_below(&rng, 6);
            q[i] = equal ? r[i] * scale : psm_test_rng_below(&rng, 6);
        }
        r[0] += 1;
        q[0] += equal ? scale : 1;
        for (int i = 0; i < TOKENS; ++i) {
            r_total += r[i];
            q_total += q[i];
        }
        int x = (int)psm_test_rng_below(&rng, TOKENS);
        if (q[x] == 0)
            continue;
        uint64_t u = psm_test_rng_next(&rng);
        if (psm_draft_accepted(u, q[x], q_total, r[x], r_total))
            continue;
        ck_assert_msg(!equal, "r = q was rejected");
        uint64_t left = 0;
        for (int i = 0; i < TOKENS; ++i)
            left += psm_u128_shift_right(psm_residual_excess(r[i], q_total, q[i], r_total), 0);
        ck_assert_msg(left > 0, "a rejection left no residual mass");
    }
}
END_TEST

START_TEST(draft_prob_weights)
{
    for (int bits = 32; bits <= 40; ++bits) {
        ck_assert(psm_draft_prob_weight(1.0f, bits) == (uint64_t)1 << bits);
        ck_assert(psm_draft_prob_weight(0.5f, bits) == (uint64_t)1 << (bits - 1));
        ck_assert(psm_draft_prob_weight(0.0f, bits) == 0);
        ck_assert(psm_draft_prob_weight(1e-45f, bits) == 0); /* a denormal */
    }
    psm_test_rng rng = psm_test_rng_make(0x9f0b5u);
    for (int trial = 0; trial < 100000; ++trial) {
        float q = (float)psm_test_rng_uniform(&rng);
        ck_assert(psm_draft_prob_weight(q, 40) == (uint64_t)floor(ldexp((double)q, 40)));
    }
    ck_assert(psm_draft_prob_valid(0.0f) && psm_draft_prob_valid(1.0f));
    ck_assert(!psm_draft_prob_valid(-0.0f - 1e-45f) && !psm_draft_prob_valid(1.0000001f));
    ck_assert(!psm_draft_prob_valid(NAN) && !psm_draft_prob_valid(INFINITY));
}
END_TEST

/* ---- totals known within bounds (psm_total_bounds_of_mass) ---------------- */

/* One row's G (global weights of the kept tokens) and mass (section 5's
 * total over the same tokens), as the contract defines them; kept: every
 * valid token, or each with probability one half. */
static void row_totals(const float *x, int64_t vocab, float temperature, int half_kept,
                       psm_test_rng *rng, uint64_t *g_total, uint64_t *mass)
{
    const float s = psm_inverse_temperature_scale(temperature);
    const int bits = psm_weight_bits(vocab);
    unsigned char *kept = malloc((size_t)vocab);
    ck_assert_ptr_nonnull(kept);
    float row_max = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) {
        kept[i] = x[i] > -INFINITY && (!half_kept || psm_test_rng_below(rng, 2));
        row_max = kept[i] && x[i] > row_max ? x[i] : row_max;
    }
    *g_total = 0;
    *mass = 0;
    for (int64_t first = 0; first < vocab; first += PSM_TILE) {
        const int64_t end = first + PSM_TILE < vocab ? first + PSM_TILE : vocab;
        float tile_max = -INFINITY;
        for (int64_t i = first; i < end; ++i)
            tile_max = kept[i] && x[i] > tile_max ? x[i] : tile_max;
        if (tile_max == -INFINITY)
            continue;
        uint64_t tile_sum = 0;
        for (int64_t i = first; i < end; ++i) {
            if (!kept[i])
                continue;
            *g_total += psm_weight(psm_scaled_gap(row_max, x[i], s), bits);
            tile_sum += psm_weight(psm_scaled_gap(tile_max, x[i], s), bits);
        }
        *mass += psm_rescale_mass(tile_sum, psm_scaled_gap(row_max, tile_max, s));
    }
    free(kept);
}

/* The bounds hold G on rows of normal logits and of a language model's
 * shape, at temperatures from near-greedy to flat, large logits and masked
 * tokens, every valid token kept or a random half; and G stays within
 * 2^-20 of the mass (past the truncations). */
START_TEST(total_bounds_hold)
{
    static const int64_t vocabs[] = {1000, 32000, 151936};
    static const float temperatures[] = {2e-5f, 0.05f, 0.3f, 0.8f, 1.0f, 3.0f, 1e4f};
    psm_test_rng rng = psm_test_rng_make(0xb0b5d5u);
    double worst = 0;
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; ++v) {
        const int64_t vocab = vocabs[v];
        float *x = malloc((size_t)vocab * sizeof *x);
        ck_assert_ptr_nonnull(x);
        for (int shape = 0; shape < 4; ++shape) {
            for (int64_t i = 0; i < vocab; ++i) {
                const double z = psm_test_rng_normal(&rng);
                if (shape == 0)
                    x[i] = (float)(3.0 * z);
                else if (shape == 1) /* a language model's: -1.1 ln(rank) + noise */
                    x[i] = (float)(-1.1 * log(1.0 + (double)psm_test_rng_below(&rng, vocab)) +
                                   0.3 * z);
                else if (shape == 2) /* large logits, small gaps */
                    x[i] = (float)(4096.0 + 2.0 * z);
                else /* masked tokens among them */
                    x[i] = psm_test_rng_below(&rng, 4) ? (float)(2.0 * z) : -INFINITY;
            }
            for (size_t t = 0; t < sizeof temperatures / sizeof temperatures[0]; ++t) {
                for (int half = 0; half <= 1; ++half) {
                    uint64_t g_total, mass;
                    row_totals(x, vocab, temperatures[t], half, &rng, &g_total, &mass);
                    if (mass == 0)
                        continue;
                    const psm_total_bounds bounds = psm_total_bounds_of_mass(mass, vocab);
                    ck_assert_msg(bounds.low <= g_total && g_total <= bounds.high,
                                  "vocab %lld, shape %d, T %g: G %llu outside [%llu, %llu]",
                                  (long long)vocab, shape, (double)temperatures[t],
                                  (unsigned long long)g_total, (unsigned long long)bounds.low,
                                  (unsigned long long)bounds.high);
                    const double gap = fabs((double)g_total - (double)mass) - 2.0 * (double)vocab;
                    if (gap / (double)mass > worst)
                        worst = gap / (double)mass;
                }
            }
        }
        free(x);
    }
    /* Far inside the bounds' 2^-12 (and the 1e-5 of core/psm_verify.h's
     * worst case: here the gaps' roundings mostly cancel). */
    ck_assert_msg(worst < ldexp(1.0, -20), "G differed from the mass by %g relative", worst);
}
END_TEST

/* A test decided within bounds is the exact test's answer, for every pair
 * of totals in them, and few tests are left undecided. */
START_TEST(test_within_bounds_is_exact)
{
    psm_test_rng rng = psm_test_rng_make(0x3b0d5u);
    int undecided = 0;
    const int trials = 400000;
    for (int trial = 0; trial < trials; ++trial) {
        const int64_t vocab = 1 + (int64_t)psm_test_rng_below(&rng, 200000);
        const int bits = psm_weight_bits(vocab);
        const uint64_t top = (uint64_t)1 << bits;
        const uint64_t g_mass = top + psm_test_rng_below(&rng, (uint64_t)vocab * top);
        const uint64_t q_mass = top + psm_test_rng_below(&rng, (uint64_t)vocab * top);
        const psm_total_bounds g = psm_total_bounds_of_mass(g_mass, vocab);
        const psm_total_bounds q = psm_total_bounds_of_mass(q_mass, vocab);
        /* Weights in the ratio's interesting range: the drawn token is
         * often where p and q are close. */
        const uint64_t q_x = 1 + psm_test_rng_below(&rng, top);
        const uint64_t p_x = psm_test_rng_below(&rng, 4) == 0
                                 ? q_x
                                 : psm_test_rng_below(&rng, top + 1);
        const uint64_t u = psm_test_rng_next(&rng);
        const int decided = psm_draft_test_within(u, q_x, q, p_x, g);
        if (decided == PSM_TEST_UNDECIDED) {
            ++undecided;
            continue;
        }
        for (int end = 0; end < 4; ++end) {
            const uint64_t g_total = end & 1 ? g.high : g.low;
            const uint64_t q_total = end & 2 ? q.high : q.low;
            ck_assert_int_eq(decided == PSM_TEST_ACCEPTED,
                             reference_accepts(u, q_x, q_total, p_x, g_total));
        }
        const uint64_t g_total = g.low + psm_test_rng_below(&rng, g.high - g.low + 1);
        const uint64_t q_total = q.low + psm_test_rng_below(&rng, q.high - q.low + 1);
        ck_assert_int_eq(decided == PSM_TEST_ACCEPTED,
                         reference_accepts(u, q_x, q_total, p_x, g_total));
    }
    /* About 2^-11 of uniform u per test lies between the ends. */
    ck_assert_msg(undecided < trials / 256, "%d of %d tests undecided", undecided, trials);
    const psm_total_bounds exact = psm_total_exactly(77u);
    ck_assert(exact.low == 77u && exact.high == 77u);
}
END_TEST

/* ---- chi-square p-values ------------------------------------------------- */

/* Q(a, x), the regularised upper incomplete gamma function: a series for
 * P = 1 - Q below x = a + 1, a continued fraction (Lentz) for Q above. */
static double upper_incomplete_gamma(double a, double x)
{
    if (x <= 0.0)
        return 1.0;
    const double log_front = a * log(x) - x - lgamma(a);
    if (x < a + 1.0) {
        double term = 1.0 / a, sum = term;
        for (int n = 1; n < 100000 && term > sum * 1e-17; ++n) {
            term *= x / (a + n);
            sum += term;
        }
        return 1.0 - sum * exp(log_front);
    }
    const double tiny = 1e-300;
    double b = x + 1.0 - a, c = 1.0 / tiny, d = 1.0 / b, fraction = d;
    for (int n = 1; n < 100000; ++n) {
        double an = -n * (n - a);
        b += 2.0;
        d = an * d + b;
        d = fabs(d) < tiny ? tiny : d;
        c = b + an / c;
        c = fabs(c) < tiny ? tiny : c;
        d = 1.0 / d;
        fraction *= d * c;
        if (fabs(d * c - 1.0) < 1e-16)
            break;
    }
    return exp(log_front) * fraction;
}

static double chi_square_p_value(double statistic, double dof)
{
    return upper_incomplete_gamma(dof / 2.0, statistic / 2.0);
}

/* Upper quantiles of chi-square from tables (to the digits shown), and the
 * closed forms of 2 and 4 degrees of freedom, exp(-x/2) (1 + x/2), out to
 * the tails the tests bound. */
START_TEST(chi_square_p_values)
{
    static const struct {
        double dof, statistic, p;
    } table[] = {{1, 3.841459, 0.05},   {1, 10.827566, 0.001}, {10, 29.588298, 0.001},
                 {4, 9.487729, 0.05},   {30, 67.6326302574, 1e-4},
                 {100, 161.318656959, 1e-4}};
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i) {
        double p = chi_square_p_value(table[i].statistic, table[i].dof);
        ck_assert_msg(fabs(p - table[i].p) < table[i].p * 2e-3, "dof %g: p %g, expected %g",
                      table[i].dof, p, table[i].p);
    }
    for (double x = 0.5; x < 80.0; x += 0.5) {
        double two = exp(-x / 2.0), four = exp(-x / 2.0) * (1.0 + x / 2.0);
        ck_assert(fabs(chi_square_p_value(x, 2.0) - two) <= two * 1e-10);
        ck_assert(fabs(chi_square_p_value(x, 4.0) - four) <= four * 1e-10);
    }
}
END_TEST

/* Pearson's test of counts against probs: neighbouring tokens are merged
 * into bins of >= 5 expected draws; a token of probability 0 must never be
 * seen. Fails the test when the p-value is below P_VALUE_BOUND. */
static void chi_square_check(const char *label, const double *probs, const int64_t *counts,
                             int64_t vocab, int64_t draws)
{
    double statistic = 0.0, bin_expected = 0.0, bin_observed = 0.0, left = 0.0;
    int bins = 0;
    for (int64_t i = 0; i < vocab; ++i)
        left += probs[i] * (double)draws;
    for (int64_t i = 0; i < vocab; ++i) {
        if (probs[i] == 0.0) {
            ck_assert_msg(counts[i] == 0, "%s: token %lld has probability 0, seen %lld times",
                          label, (long long)i, (long long)counts[i]);
            continue;
        }
        bin_expected += probs[i] * (double)draws;
        bin_observed += (double)counts[i];
        left -= probs[i] * (double)draws;
        if (bin_expected >= 5.0 && left >= 5.0) {
            statistic += (bin_observed - bin_expected) * (bin_observed - bin_expected) /
                         bin_expected;
            ++bins;
            bin_expected = bin_observed = 0.0;
        }
    }
    if (bin_expected > 0.0) {
        statistic += (bin_observed - bin_expected) * (bin_observed - bin_expected) / bin_expected;
        ++bins;
    }
    ck_assert_msg(bins >= 2, "%s: %d bin(s); too few draws to test", label, bins);
    double p = chi_square_p_value(statistic, bins - 1);
    ck_assert_msg(p > P_VALUE_BOUND, "%s: chi-square %.2f over %d bins, p-value %.3g < %g", label,
                  statistic, bins, p, P_VALUE_BOUND);
}

/* ---- running psm_verify -------------------------------------------------- */

/* One call's inputs and outputs, host memory, contiguous rows. */
typedef struct verify_call {
    int64_t requests;
    int32_t k;
    int64_t vocab;
    float *target;        /* requests x (k + 1) x vocab */
    psm_params target_params;
    int32_t *tokens;      /* requests x k */
    int32_t *parents;     /* requests x k, or NULL */
    float *draft;         /* requests x k x vocab: logits or probabilities, or NULL */
    int draft_is_probs;
    psm_params draft_params;
    int with_draft_params;
    int32_t *accepted;    /* requests */
    int32_t *out_tokens;  /* requests x (k + 1) */
    int32_t *path_nodes;  /* requests x (k + 1) */
    float *logprobs;      /* requests x (k + 1) */
} verify_call;

static void call_make(verify_call *call, int64_t requests, int32_t k, int64_t vocab)
{
    memset(call, 0, sizeof *call);
    call->requests = requests;
    call->k = k;
    call->vocab = vocab;
    call->target = psm_test_alloc((size_t)(requests * (k + 1) * vocab), sizeof(float));
    call->tokens = psm_test_alloc((size_t)(requests * k), sizeof(int32_t));
    call->accepted = psm_test_alloc((size_t)requests, sizeof(int32_t));
    call->out_tokens = psm_test_alloc((size_t)(requests * (k + 1)), sizeof(int32_t));
    call->path_nodes = psm_test_alloc((size_t)(requests * (k + 1)), sizeof(int32_t));
    call->logprobs = psm_test_alloc((size_t)(requests * (k + 1)), sizeof(float));
    psm_params_init(&call->target_params);
    psm_params_init(&call->draft_params);
}

/* Draft rows (logits or probabilities), all 0 to begin with. */
static void call_add_draft(verify_call *call)
{
    call->draft = psm_test_alloc((size_t)(call->requests * call->k * call->vocab), sizeof(float));
}

static void call_free(verify_call *call)
{
    free(call->target);
    free(call->tokens);
    free(call->parents);
    free(call->draft);
    free(call->accepted);
    free(call->out_tokens);
    free(call->path_nodes);
    free(call->logprobs);
}

static void fill_sentinels(verify_call *call)
{
    int64_t width = call->k + 1;
    for (int64_t r = 0; r < call->requests; ++r) {
        call->accepted[r] = SENTINEL_TOKEN;
        for (int64_t j = 0; j < width; ++j) {
            call->out_tokens[r * width + j] = SENTINEL_TOKEN;
            call->path_nodes[r * width + j] = SENTINEL_TOKEN;
            call->logprobs[r * width + j] = 1234.5f;
        }
    }
}

static int untouched(const verify_call *call)
{
    int64_t width = call->k + 1;
    for (int64_t r = 0; r < call->requests; ++r) {
        if (call->accepted[r] != SENTINEL_TOKEN)
            return 0;
        for (int64_t j = 0; j < width; ++j)
            if (call->out_tokens[r * width + j] != SENTINEL_TOKEN ||
                call->path_nodes[r * width + j] != SENTINEL_TOKEN ||
                call->logprobs[r * width + j] != 1234.5f)
                return 0;
    }
    return 1;
}

/* psm_verify over the call's arrays, outputs first set to sentinels. */
static psm_status call_run(psm_context *context, verify_call *call)
{
    fill_sentinels(call);
    psm_tensor target = psm_test_tensor(call->target, PSM_DTYPE_F32, call->requests * (call->k + 1),
                                        call->vocab, 0);
    psm_tensor draft =
        psm_test_tensor(call->draft, PSM_DTYPE_F32, call->requests * call->k, call->vocab, 0);
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = call->k;
    drafts.tokens = call->tokens;
    drafts.parents = call->parents;
    if (call->draft && call->draft_is_probs)
        drafts.draft_probs = &draft;
    else if (call->draft)
        drafts.draft_logits = &draft;
    if (call->with_draft_params)
        drafts.draft_params = &call->draft_params;
    psm_verification outputs = {psm_test_output(call->accepted),
                                psm_test_output(call->out_tokens),
                                psm_test_output(call->path_nodes),
                                psm_test_output(call->logprobs)};
    return psm_verify(context, &target, &call->target_params, &drafts, &outputs);
}

/* Runs the call, which every backend must accept, and waits for it. */
static void call_runs(psm_context *context, const char *test, verify_call *call)
{
    psm_status status = call_run(context, call);
    ck_assert_msg(status == PSM_OK, "%s: %s: %s", test, psm_status_string(status),
                  psm_last_error());
    PSM_CHECK_OK(psm_synchronize(context));
}

/* Normal logits, sigma 1.5, from a seed. */
static void normal_logits(float *logits, int64_t count, uint64_t seed)
{
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < count; ++i)
        logits[i] = (float)(1.5 * psm_test_rng_normal(&rng));
}

/* A token drawn from probs (summing to 1) with a uniform from rng. */
static int32_t draw_from(const double *probs, int64_t vocab, psm_test_rng *rng)
{
    double u = psm_test_rng_uniform(rng), running = 0.0;
    int32_t last = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        if (probs[i] > 0.0)
            last = (int32_t)i;
        running += probs[i];
        if (u < running)
            return (int32_t)i;
    }
    return last;
}

static void reference_probs(const float *logits, int64_t vocab, psm_ref_params params,
                            double *probs)
{
    ck_assert_int_eq(psm_ref_distribution(logits, vocab, &params, probs), 1);
}

static double overlap(const double *p, const double *q, int64_t vocab)
{
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        sum += p[i] < q[i] ? p[i] : q[i];
    return sum;
}

/* The accepted length's mean against its expectation: at_least[j] is
 * P(accepted >= j), j = 1..depth, so the mean is their sum and the variance
 * comes from the distribution they give. */
static void accepted_mean_check(const char *label, const double *at_least, int depth,
                                double sum, int64_t draws)
{
    double mean = 0.0, second = 0.0;
    for (int j = 1; j <= depth; ++j) {
        double exactly = at_least[j] - (j < depth ? at_least[j + 1] : 0.0);
        mean += j * exactly;
        second += (double)j * j * exactly;
    }
    double standard_error = sqrt((second - mean * mean) / (double)draws);
    double observed = sum / (double)draws;
    ck_assert_msg(fabs(observed - mean) <= SIGMAS * standard_error,
                  "%s: mean accepted length %.6f, expected %.6f (standard error %.2g)", label,
                  observed, mean, standard_error);
}

/* ---- statistics ------------------------------------------------------------ */

#define STAT_VOCAB 40
#define CHAIN_K 4

/* A chain of 4 draft tokens. The target at position j (node j's row) is a
 * fixed row of normal logits with top-k 30, so 10 tokens are masked; the
 * draft for node i, which proposes position i - 1's token, is that
 * position's logits moved by one token at temperature 2 (no filters): a poor
 * draft that also proposes masked tokens. */
PSM_PROPERTY(chain_emits_target_distribution)
{
    const int64_t vocab = STAT_VOCAB, requests = STAT_REQUESTS_PER_CALL;
    const int32_t k = CHAIN_K;
    float position_logits[CHAIN_K + 1][STAT_VOCAB], draft_logits[CHAIN_K][STAT_VOCAB];
    double p[CHAIN_K + 1][STAT_VOCAB], q[CHAIN_K][STAT_VOCAB];
    const psm_ref_params target_ref = {1.0f, 30, 1.0f, 0.0f}, draft_ref = {2.0f, 0, 1.0f, 0.0f};
    normal_logits(&position_logits[0][0], (k + 1) * vocab, 0xc4a1e0u);
    for (int j = 0; j <= k; ++j)
        reference_probs(position_logits[j], vocab, target_ref, p[j]);
    for (int i = 0; i < k; ++i) {
        for (int64_t t = 0; t < vocab; ++t)
            draft_logits[i][t] = position_logits[i][(t + 1) % vocab];
        reference_probs(draft_logits[i], vocab, draft_ref, q[i]);
    }

    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    call_add_draft(&call);
    call.target_params.top_k = target_ref.top_k;
    call.with_draft_params = 1;
    call.draft_params.temperature = draft_ref.temperature;
    for (int64_t r = 0; r < requests; ++r) {
        memcpy(call.target + r * (k + 1) * vocab, position_logits, sizeof position_logits);
        memcpy(call.draft + r * k * vocab, draft_logits, sizeof draft_logits);
    }
    static int64_t counts[CHAIN_K + 1][STAT_VOCAB];
    memset(counts, 0, sizeof counts);
    int64_t reached[CHAIN_K + 1] = {0};
    double accepted_sum = 0.0;
    psm_test_rng rng = psm_test_rng_make(0xd4a75u);
    for (int c = 0; c < STAT_CALLS; ++c) {
        for (int64_t r = 0; r < requests; ++r)
            for (int i = 0; i < k; ++i)
                call.tokens[r * k + i] = draw_from(q[i], vocab, &rng);
        call.target_params.seed = 1000 + (uint64_t)c;
        call_runs(context, "chain_emits_target_distribution", &call);
        for (int64_t r = 0; r < requests; ++r) {
            int32_t accepted = call.accepted[r];
            ck_assert(accepted >= 0 && accepted <= k);
            accepted_sum += accepted;
            for (int j = 0; j <= accepted; ++j) {
                int32_t token = call.out_tokens[r * (k + 1) + j];
                ck_assert(token >= 0 && token < vocab);
                if (j < accepted)
                    ck_assert_int_eq(token, call.tokens[r * k + j]);
                ck_assert_int_eq(call.path_nodes[r * (k + 1) + j], j);
                counts[j][token] += 1;
                reached[j] += 1;
            }
            for (int j = accepted + 1; j <= k; ++j)
                ck_assert_int_eq(call.out_tokens[r * (k + 1) + j], -1);
        }
    }
    for (int j = 0; j <= k; ++j) {
        char label[64];
        snprintf(label, sizeof label, "chain, position %d (%lld draws)", j, (long long)reached[j]);
        chi_square_check(label, p[j], counts[j], vocab, reached[j]);
    }
    double at_least[CHAIN_K + 1] = {1.0};
    for (int j = 1; j <= k; ++j)
        at_least[j] = at_least[j - 1] * overlap(p[j - 1], q[j - 1], vocab);
    accepted_mean_check("chain", at_least, k, accepted_sum, requests * STAT_CALLS);
    call_free(&call);
    psm_context_destroy(context);
}

/* A tree of two candidates per level, depth 2 (node 1, 2: the root's
 * children; 3, 4: node 1's; 5, 6: node 2's), with draft probabilities given
 * as floats and candidates drawn, independently, from their integer weights
 * floor(q 2^B): the second candidate of a level is tested against the
 * residual the first left. The target at depth d is position d's row (every
 * node of a depth has the same target row: no context). */
#define TREE_K 6
#define TREE_DEPTH 2
static const int32_t tree_parents[TREE_K] = {0, 0, 1, 1, 2, 2};
static const int tree_depth_of[TREE_K + 1] = {0, 1, 1, 2, 2, 2, 2};

PSM_PROPERTY(tree_emits_target_distribution)
{
    const int64_t vocab = STAT_VOCAB, requests = STAT_REQUESTS_PER_CALL;
    const int32_t k = TREE_K;
    const int bits = 40;
    float position_logits[TREE_DEPTH + 1][STAT_VOCAB];
    float q_float[TREE_DEPTH][STAT_VOCAB];
    double p[TREE_DEPTH + 1][STAT_VOCAB], q[TREE_DEPTH][STAT_VOCAB];
    uint64_t q_weights[TREE_DEPTH][STAT_VOCAB], q_total[TREE_DEPTH] = {0};
    const psm_ref_params target_ref = {0.8f, 0, 1.0f, 0.0f}, draft_ref = {2.5f, 0, 1.0f, 0.0f};
    normal_logits(&position_logits[0][0], (TREE_DEPTH + 1) * vocab, 0x7eee0u);
    for (int d = 0; d <= TREE_DEPTH; ++d)
        reference_probs(position_logits[d], vocab, target_ref, p[d]);
    for (int d = 0; d < TREE_DEPTH; ++d) {
        float moved[STAT_VOCAB];
        double soft[STAT_VOCAB];
        for (int64_t t = 0; t < vocab; ++t)
            moved[t] = position_logits[d][(t + 3) % vocab];
        reference_probs(moved, vocab, draft_ref, soft);
        for (int64_t t = 0; t < vocab; ++t) {
            q_float[d][t] = (float)soft[t];
            q_weights[d][t] = psm_draft_prob_weight(q_float[d][t], bits);
            q_total[d] += q_weights[d][t];
        }
        for (int64_t t = 0; t < vocab; ++t)
            q[d][t] = (double)q_weights[d][t] / (double)q_total[d];
    }

    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    call_add_draft(&call);
    call.draft_is_probs = 1;
    call.parents = psm_test_alloc((size_t)(requests * k), sizeof(int32_t));
    call.target_params.temperature = target_ref.temperature;
    for (int64_t r = 0; r < requests; ++r) {
        for (int node = 0; node <= k; ++node)
            memcpy(call.target + (r * (k + 1) + node) * vocab,
                   position_logits[tree_depth_of[node]], sizeof position_logits[0]);
        for (int node = 1; node <= k; ++node) {
            memcpy(call.draft + (r * k + node - 1) * vocab, q_float[tree_depth_of[node] - 1],
                   sizeof q_float[0]);
            call.parents[r * k + node - 1] = tree_parents[node - 1];
        }
    }
    static int64_t counts[TREE_DEPTH + 1][STAT_VOCAB];
    memset(counts, 0, sizeof counts);
    int64_t reached[TREE_DEPTH + 1] = {0};
    double accepted_sum = 0.0;
    psm_test_rng rng = psm_test_rng_make(0x7eed5u);
    for (int c = 0; c < STAT_CALLS; ++c) {
        for (int64_t r = 0; r < requests; ++r)
            for (int node = 1; node <= k; ++node) {
                int d = tree_depth_of[node] - 1;
                uint64_t pick = psm_test_rng_below(&rng, q_total[d]), running = 0;
                int32_t token = 0;
                while ((running += q_weights[d][token]) <= pick)
                    ++token;
                call.tokens[r * k + node - 1] = token;
            }
        call.target_params.seed = 2000 + (uint64_t)c;
        call_runs(context, "tree_emits_target_distribution", &call);
        for (int64_t r = 0; r < requests; ++r) {
            int32_t accepted = call.accepted[r];
            ck_assert(accepted >= 0 && accepted <= TREE_DEPTH);
            accepted_sum += accepted;
            int32_t previous = 0;
            for (int j = 0; j <= accepted; ++j) {
                int32_t token = call.out_tokens[r * (k + 1) + j];
                int32_t node = call.path_nodes[r * (k + 1) + j];
                ck_assert(token >= 0 && token < vocab);
                ck_assert_int_eq(tree_depth_of[node], j);
                ck_assert(j == 0 || tree_parents[node - 1] == previous);
                if (j > 0)
                    ck_assert_int_eq(call.out_tokens[r * (k + 1) + j - 1],
                                     call.tokens[r * k + node - 1]);
                previous = node;
                counts[j][token] += 1;
                reached[j] += 1;
            }
        }
    }
    for (int d = 0; d <= TREE_DEPTH; ++d) {
        char label[64];
        snprintf(label, sizeof label, "tree, position %d (%lld draws)", d, (long long)reached[d]);
        chi_square_check(label, p[d], counts[d], vocab, reached[d]);
    }
    /* A level accepts with its first candidate (overlap of p and q), or
     * with its second against the residual r' = max(0, p - q) / (1 - a). */
    double at_least[TREE_DEPTH + 1] = {1.0};
    for (int d = 1; d <= TREE_DEPTH; ++d) {
        double first = overlap(p[d - 1], q[d - 1], vocab);
        double residual[STAT_VOCAB];
        for (int64_t t = 0; t < vocab; ++t)
            residual[t] = fmax(0.0, p[d - 1][t] - q[d - 1][t]) / (1.0 - first);
        double level = first + (1.0 - first) * overlap(residual, q[d - 1], vocab);
        at_least[d] = at_least[d - 1] * level;
    }
    accepted_mean_check("tree", at_least, TREE_DEPTH, accepted_sum, requests * STAT_CALLS);
    call_free(&call);
    psm_context_destroy(context);
}

/* ---- edge cases -------------------------------------------------------------- */

/* The draft is the target (the same logits, the same parameters): Q = P as
 * integers, so every draft token is accepted, whatever the seed; the bonus
 * token comes from the last node. Logprobs are the target's. */
PSM_PROPERTY(draft_equal_to_target_accepts_all)
{
    const int64_t vocab = 3000, requests = 64;
    const int32_t k = 3;
    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    call_add_draft(&call);
    normal_logits(call.target, requests * (k + 1) * vocab, 0xe9a1u);
    call.target_params.temperature = 0.9f;
    call.target_params.top_p = 0.95f;
    call.draft_params = call.target_params;
    call.with_draft_params = 1;
    psm_test_rng rng = psm_test_rng_make(0xe9a2u);
    double *probs = psm_test_alloc((size_t)vocab, sizeof(double));
    const psm_ref_params ref = {0.9f, 0, 0.95f, 0.0f};
    for (int64_t r = 0; r < requests; ++r)
        for (int i = 1; i <= k; ++i) {
            const float *row = call.target + (r * (k + 1) + i - 1) * vocab;
            memcpy(call.draft + (r * k + i - 1) * vocab, row, (size_t)vocab * sizeof(float));
            reference_probs(row, vocab, ref, probs);
            call.tokens[r * k + i - 1] = draw_from(probs, vocab, &rng);
        }
    for (uint64_t seed = 0; seed < 4; ++seed) {
        call.target_params.seed = seed;
        call_runs(context, "draft_equal_to_target_accepts_all", &call);
        for (int64_t r = 0; r < requests; ++r) {
            ck_assert_int_eq(call.accepted[r], k);
            for (int j = 0; j <= k; ++j) {
                int32_t token = call.out_tokens[r * (k + 1) + j];
                if (j < k)
                    ck_assert_int_eq(token, call.tokens[r * k + j]);
                reference_probs(call.target + (r * (k + 1) + j) * vocab, vocab, ref, probs);
                ck_assert_msg(probs[token] > 0.0, "request %lld emitted a token the target "
                              "filters out", (long long)r);
                double expected = log(probs[token]);
                ck_assert_msg(fabs(call.logprobs[r * (k + 1) + j] - expected) <
                                  1e-5 * (1.0 + fabs(expected)),
                              "logprob %.7f, reference %.7f", call.logprobs[r * (k + 1) + j],
                              expected);
            }
        }
    }
    free(probs);
    call_free(&call);
    psm_context_destroy(context);
}

/* A greedy target accepts exactly the argmax tokens: with one-hot drafts
 * (no draft distribution) and with draft logits alike, the output is the
 * target's greedy chain up to the first wrong draft, then its argmax. Half
 * the rows have their argmax planted near the end of the vocabulary, past
 * the first part of the GPUs' totals (PSM_VERIFY_PART), where the bonus
 * draw must find it from the partials. */
PSM_PROPERTY(greedy_target_accepts_argmax_only)
{
    const int64_t vocab = 2100, requests = 12;
    const int32_t k = 4;
    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    normal_logits(call.target, requests * (k + 1) * vocab, 0x9eed1u);
    for (int64_t row = 0; row < requests * (k + 1); row += 2)
        call.target[row * vocab + vocab - 1 - row % 40] = 9.0f;
    call.target_params.temperature = 0.0f;
    for (int64_t r = 0; r < requests; ++r) {
        int wrong_at = (int)(r % (k + 1)) + 1; /* k + 1: every draft right */
        for (int i = 1; i <= k; ++i) {
            int32_t argmax = (int32_t)psm_ref_argmax(call.target + (r * (k + 1) + i - 1) * vocab,
                                                     vocab);
            call.tokens[r * k + i - 1] = i == wrong_at ? (argmax + 1) % (int32_t)vocab : argmax;
        }
    }
    for (int with_logits = 0; with_logits < 2; ++with_logits) {
        if (with_logits) {
            /* Draft logits whose distribution gives every drafted token
             * weight: uniform logits. */
            call_add_draft(&call);
        }
        call_runs(context, "greedy_target_accepts_argmax_only", &call);
        for (int64_t r = 0; r < requests; ++r) {
            int wrong_at = (int)(r % (k + 1)) + 1;
            ck_assert_int_eq(call.accepted[r], wrong_at - 1);
            for (int j = 0; j < wrong_at; ++j) {
                int32_t argmax = (int32_t)psm_ref_argmax(
                    call.target + (r * (k + 1) + j) * vocab, vocab);
                ck_assert_int_eq(call.out_tokens[r * (k + 1) + j], argmax);
                ck_assert_float_eq(call.logprobs[r * (k + 1) + j], 0.0f);
                ck_assert_int_eq(call.path_nodes[r * (k + 1) + j], j);
            }
        }
    }
    call_free(&call);
    psm_context_destroy(context);
}

/* Equal logits everywhere, target and draft: P and Q are the same uniform
 * integers, so everything is accepted. */
PSM_PROPERTY(equal_logits_accept_all)
{
    const int64_t vocab = 1500, requests = 20;
    const int32_t k = 5;
    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    call_add_draft(&call);
    for (int64_t i = 0; i < requests * (k + 1) * vocab; ++i)
        call.target[i] = 2.5f;
    for (int64_t i = 0; i < requests * k * vocab; ++i)
        call.draft[i] = -1.0f;
    psm_test_rng rng = psm_test_rng_make(0xe0a1u);
    for (int64_t i = 0; i < requests * k; ++i)
        call.tokens[i] = (int32_t)psm_test_rng_below(&rng, (uint64_t)vocab);
    call_runs(context, "equal_logits_accept_all", &call);
    for (int64_t r = 0; r < requests; ++r) {
        ck_assert_int_eq(call.accepted[r], k);
        for (int j = 0; j <= k; ++j)
            ck_assert(fabsf(call.logprobs[r * (k + 1) + j] + logf((float)vocab)) < 1e-5f);
    }
    call_free(&call);
    psm_context_destroy(context);
}

/* A draft token the target masks (-inf) or filters out (top-k) has p = 0 and
 * is never accepted; the correction token is never it. One-hot drafts,
 * 4000 seeds. */
PSM_PROPERTY(masked_draft_token_always_rejected)
{
    const int64_t vocab = 64, requests = 4000;
    const int32_t k = 2;
    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    normal_logits(call.target, requests * (k + 1) * vocab, 0x3a5c0u);
    call.target_params.top_k = 8;
    call.target_params.seed_per_row = psm_test_alloc((size_t)requests, sizeof(uint64_t));
    for (int64_t r = 0; r < requests; ++r) {
        float *root = call.target + r * (k + 1) * vocab;
        root[5] = -INFINITY;
        /* Node 1 drafts the masked token for even requests, else the token
         * ranked 9th (filtered out by top-k 8). */
        float sorted[64];
        memcpy(sorted, root, sizeof sorted);
        int32_t ninth = 0;
        for (int rank = 0; rank < 9; ++rank) {
            int best = -1;
            for (int t = 0; t < vocab; ++t)
                if (sorted[t] != -INFINITY && (best < 0 || sorted[t] > sorted[best]))
                    best = t;
            ninth = best;
            sorted[best] = -INFINITY;
        }
        call.tokens[r * k] = r % 2 == 0 ? 5 : ninth;
        call.tokens[r * k + 1] = 0;
        ((uint64_t *)call.target_params.seed_per_row)[r] = 77 + (uint64_t)r;
    }
    call_runs(context, "masked_draft_token_always_rejected", &call);
    for (int64_t r = 0; r < requests; ++r) {
        ck_assert_int_eq(call.accepted[r], 0);
        ck_assert_int_ne(call.out_tokens[r * (k + 1)], call.tokens[r * k]);
        ck_assert_int_eq(call.out_tokens[r * (k + 1) + 1], -1);
    }
    free((void *)call.target_params.seed_per_row);
    call_free(&call);
    psm_context_destroy(context);
}

/* A request with a NaN in a target row is bad (-1, NaN) and leaves the
 * others as they are alone; in checking mode the call fails with
 * PSM_ERR_BAD_ROW and writes nothing. */
PSM_PROPERTY(bad_target_row_makes_request_bad)
{
    const int64_t vocab = 100, requests = 3;
    const int32_t k = 2;
    psm_context *context = psm_test_open(backend);
    verify_call call;
    call_make(&call, requests, k, vocab);
    normal_logits(call.target, requests * (k + 1) * vocab, 0xbadu);
    call.target[(1 * (k + 1) + 2) * vocab + 7] = NAN; /* request 1, node 2's row */
    call.target_params.seed_per_row = psm_test_alloc((size_t)requests, sizeof(uint64_t));
    for (int64_t i = 0; i < requests * k; ++i)
        call.tokens[i] = (int32_t)i;
    call_runs(context, "bad_target_row_makes_request_bad", &call);
    ck_assert_int_eq(call.accepted[1], -1);
    for (int j = 0; j <= k; ++j) {
        ck_assert_int_eq(call.out_tokens[(k + 1) + j], -1);
        ck_assert_int_eq(call.path_nodes[(k + 1) + j], -1);
        ck_assert(isnan(call.logprobs[(k + 1) + j]));
    }
    ck_assert(call.accepted[0] >= 0 && call.accepted[2] >= 0);
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.check_rows = 1;
    psm_context *checking = psm_test_open_with(&options);
    ck_assert_int_eq(call_run(checking, &call), PSM_ERR_BAD_ROW);
    ck_assert_msg(strstr(psm_last_error(), "request 1") != NULL, "%s", psm_last_error());
    ck_assert(untouched(&call));
    psm_context_destroy(checking);
    free((void *)call.target_params.seed_per_row);
    call_free(&call);
    psm_context_destroy(context);
}

/* ---- bad inputs ---------------------------------------------------------------- */

/* A valid small call to break one thing at a time. */
static void small_call(verify_call *call)
{
    call_make(call, 2, 3, 50);
    normal_logits(call->target, 2 * 4 * 50, 0x5a11u);
    for (int i = 0; i < 6; ++i)
        call->tokens[i] = i;
}

static void expect_refused(psm_context *context, verify_call *call, psm_status expected,
                           const char *message_part)
{
    psm_status status = call_run(context, call);
    ck_assert_msg(status == expected, "expected %s, got %s: %s", psm_status_string(expected),
                  psm_status_string(status), psm_last_error());
    ck_assert_msg(strstr(psm_last_error(), message_part) != NULL,
                  "message \"%s\" does not mention \"%s\"", psm_last_error(), message_part);
    ck_assert_msg(untouched(call), "a refused call wrote its outputs");
}

PSM_PROPERTY(bad_inputs_refused_nothing_written)
{
    psm_context *context = psm_test_open(backend);
    verify_call call;
    small_call(&call);
    call_runs(context, "bad_inputs_refused_nothing_written", &call);
    /* k out of range; rows that k + 1 does not divide (8 rows, k = 2). */
    const int32_t bad_nodes[] = {0, PSM_MAX_DRAFT_NODES + 1, -1, 2};
    const psm_status bad_nodes_status[] = {PSM_ERR_INVALID_PARAMETER, PSM_ERR_INVALID_PARAMETER,
                                           PSM_ERR_INVALID_PARAMETER, PSM_ERR_INVALID_ARGUMENT};
    const char *bad_nodes_message[] = {"drafts->nodes is 0", "drafts->nodes is 65",
                                       "PSM_MAX_DRAFT_NODES", "not a multiple of k + 1"};
    for (int i = 0; i < 4; ++i) {
        psm_tensor target = psm_test_tensor(call.target, PSM_DTYPE_F32, 8, 50, 0);
        psm_drafts drafts;
        psm_drafts_init(&drafts);
        drafts.nodes = bad_nodes[i];
        drafts.tokens = call.tokens;
        psm_verification outputs = {psm_test_output(call.accepted),
                                    psm_test_output(call.out_tokens),
                                    psm_test_output(call.path_nodes),
                                    psm_test_output(call.logprobs)};
        fill_sentinels(&call);
        ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, &outputs),
                         bad_nodes_status[i]);
        ck_assert_msg(strstr(psm_last_error(), bad_nodes_message[i]) != NULL, "%s",
                      psm_last_error());
        ck_assert(untouched(&call));
    }

    /* Tokens and parents. */
    call.tokens[4] = 50;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "request 1, draft node 2");
    call.tokens[4] = -1;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "outside the vocab");
    call.tokens[4] = 4;
    call.parents = psm_test_alloc(6, sizeof(int32_t));
    const int32_t good_parents[6] = {0, 0, 1, 0, 1, 2};
    memcpy(call.parents, good_parents, sizeof good_parents);
    PSM_CHECK_OK(call_run(context, &call));
    call.parents[2] = 3; /* node 3's parent must be below 3 */
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "request 0, draft node 3: parent 3");
    call.parents[2] = 1;
    call.parents[3] = -1;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "request 1, draft node 1: parent -1");
    free(call.parents);
    call.parents = NULL;

    /* Draft probabilities: out of [0, 1], NaN, or 0 for the drawn token. */
    call.draft = psm_test_alloc(6 * 50, sizeof(float));
    call.draft_is_probs = 1;
    for (int i = 0; i < 6 * 50; ++i)
        call.draft[i] = 0.02f;
    PSM_CHECK_OK(call_run(context, &call));
    call.draft[3 * 50 + 9] = 1.5f;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "draft_probs[9] is 1.5");
    call.draft[3 * 50 + 9] = NAN;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "request 1, draft node 1");
    call.draft[3 * 50 + 9] = 0.02f;
    call.draft[4 * 50 + 4] = 0.0f; /* request 1, node 2 drew token 4 */
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER,
                   "request 1, draft node 2: token 4 has draft probability 0");
    call.draft[4 * 50 + 4] = 0.02f;

    /* Draft logits: a greedy draft that "drew" a token other than its
     * argmax; a NaN row. */
    call.draft_is_probs = 0;
    normal_logits(call.draft, 6 * 50, 0xd7a1u);
    PSM_CHECK_OK(call_run(context, &call));
    call.with_draft_params = 1;
    call.draft_params.temperature = 0.0f;
    int32_t argmax = (int32_t)psm_ref_argmax(call.draft + 2 * 50, 50);
    for (int i = 0; i < 6; ++i)
        call.tokens[i] = (int32_t)psm_ref_argmax(call.draft + i * 50, 50);
    PSM_CHECK_OK(call_run(context, &call));
    call.tokens[2] = (argmax + 1) % 50;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER,
                   "request 0, draft node 3: token");
    call.tokens[2] = argmax;
    call.draft[5 * 50 + 1] = NAN;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER,
                   "request 1, draft node 3: draft_logits row 5");
    call.draft[5 * 50 + 1] = 0.0f;
    call.draft_params.temperature = -1.0f;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "drafts->draft_params.temperature");
    call.draft_params.temperature = 1.0f;

    /* Target parameters, and what psm_verify does not run yet. */
    call.target_params.top_p = 0.0f;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "target_params.top_p");
    call.target_params.top_p = 1.0f;
    float per_request_temperature[2] = {1.0f, -3.0f};
    call.target_params.temperature_per_row = per_request_temperature;
    expect_refused(context, &call, PSM_ERR_INVALID_PARAMETER, "target_params, request 1");
    call.target_params.temperature_per_row = NULL;
    call.target_params.num_samples = 2;
    expect_refused(context, &call, PSM_ERR_UNSUPPORTED, "num_samples");
    call.target_params.num_samples = 1;
    int64_t gather[2] = {0, 1};
    call.target_params.row_indices = gather;
    call.target_params.output_rows = 2;
    expect_refused(context, &call, PSM_ERR_UNSUPPORTED, "row_indices");
    call.target_params.row_indices = NULL;
    call.target_params.output_rows = 0;
    PSM_CHECK_OK(call_run(context, &call));

    /* NULL arguments and outputs. */
    psm_tensor target = psm_test_tensor(call.target, PSM_DTYPE_F32, 8, 50, 0);
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = 3;
    drafts.tokens = call.tokens;
    psm_verification outputs = {psm_test_output(call.accepted), psm_test_output(call.out_tokens),
                                psm_test_output(NULL), psm_test_output(NULL)};
    fill_sentinels(&call);
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, NULL),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, NULL, &outputs),
                     PSM_ERR_INVALID_ARGUMENT);
    outputs.accepted.data = NULL;
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, &outputs),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(strstr(psm_last_error(), "accepted.data") != NULL, "%s", psm_last_error());
    outputs.accepted.data = call.accepted;
    outputs.tokens.data = NULL;
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, &outputs),
                     PSM_ERR_INVALID_ARGUMENT);
    outputs.tokens.data = call.out_tokens;
    drafts.tokens = NULL;
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, &outputs),
                     PSM_ERR_INVALID_ARGUMENT);
    drafts.tokens = call.tokens;
    psm_tensor draft = psm_test_tensor(call.draft, PSM_DTYPE_F32, 6, 50, 0);
    drafts.draft_logits = &draft;
    drafts.draft_probs = &draft;
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, &outputs),
                     PSM_ERR_INVALID_ARGUMENT);
    drafts.draft_probs = NULL;
    draft.rows = 5;
    ck_assert_int_eq(psm_verify(context, &target, &call.target_params, &drafts, &outputs),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert(untouched(&call));
    /* The optional outputs may be left out. */
    draft.rows = 6;
    PSM_CHECK_OK(psm_verify(context, &target, &call.target_params, &drafts, &outputs));
    call_free(&call);
    psm_context_destroy(context);
}

/* ---- agreement with the CPU backend ------------------------------------------ */

#define AGREE_REQUESTS 6

/* One configuration of the agreement cases. */
typedef struct agree_case {
    const char *name;
    int64_t vocab;
    int32_t k;
    int tree;          /* parents: two candidates per level */
    int draft;         /* 0 logits, 1 probs, 2 one-hot */
    int bf16;          /* target and draft logits in bf16 */
    float temperature; /* the target's */
    int32_t top_k;
    float top_p;
    float min_p;
    int32_t filter_order;
    int per_request;   /* per-request temperature, top-k, seeds and offsets */
    float draft_temperature;
    int32_t draft_top_k;
} agree_case;

static const agree_case agree_cases[] = {
    {"chain, draft logits", 3000, 4, 0, 0, 0, 0.9f, 0, 1.0f, 0.0f, 0, 0, 1.2f, 0},
    {"chain, filters", 3000, 4, 0, 0, 0, 1.1f, 200, 0.9f, 0.0f, 0, 0, 1.0f, 100},
    {"chain, min-p, per request", 2100, 5, 0, 0, 0, 1.0f, 0, 1.0f, 0.01f, 0, 1, 1.3f, 0},
    {"tree, draft probs", 1500, 6, 1, 1, 0, 1.0f, 0, 0.95f, 0.0f, 0, 0, 1.0f, 0},
    {"tree, draft logits, per request", 1500, 6, 1, 0, 0, 0.8f, 50, 1.0f, 0.0f, 0, 1, 1.0f, 0},
    {"chain, one-hot", 1000, 4, 0, 2, 0, 0.7f, 0, 1.0f, 0.0f, 0, 0, 1.0f, 0},
    {"chain, greedy target", 1000, 4, 0, 2, 0, 0.0f, 0, 1.0f, 0.0f, 0, 0, 1.0f, 0},
    {"chain, bf16", 4100, 3, 0, 0, 1, 1.0f, 30, 1.0f, 0.0f, 0, 0, 0.9f, 0},
    {"chain, greedy draft", 800, 3, 0, 0, 0, 1.0f, 0, 1.0f, 0.0f, 0, 0, 0.0f, 0},
    {"tree, one-hot, filter order", 1200, 6, 1, 2, 0, 1.0f, 40, 0.9f, 0.0f,
     PSM_FILTER_ORDER_FLASHINFER_JOINT, 0, 1.0f, 0},
};

/* A case's inputs (host), drafts drawn near their parent's target row so
 * that some are accepted. */
typedef struct agree_inputs {
    float *target, *draft;
    uint16_t *target_bf16, *draft_bf16;
    int32_t *tokens, *parents;
    float temperature[AGREE_REQUESTS];
    int32_t top_k[AGREE_REQUESTS];
    uint64_t seeds[AGREE_REQUESTS], offsets[AGREE_REQUESTS];
} agree_inputs;

static uint16_t to_bf16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)(bits >> 16);
}

static void agree_make(const agree_case *c, uint64_t seed, agree_inputs *in)
{
    const int64_t v = c->vocab, k = c->k, requests = AGREE_REQUESTS;
    const int64_t target_rows = requests * (k + 1), draft_rows = requests * k;
    memset(in, 0, sizeof *in);
    in->target = psm_test_alloc((size_t)(target_rows * v), sizeof(float));
    in->draft = psm_test_alloc((size_t)(draft_rows * v), sizeof(float));
    in->tokens = psm_test_alloc((size_t)draft_rows, sizeof(int32_t));
    normal_logits(in->target, target_rows * v, seed);
    normal_logits(in->draft, draft_rows * v, seed + 1);
    for (int64_t r = 0; r < requests; ++r)
        for (int64_t i = 1; i <= k; ++i) {
            const int64_t parent = c->tree ? (i - 1) / 2 : i - 1;
            float *d = in->draft + (r * k + i - 1) * v;
            const float *t = in->target + (r * (k + 1) + parent) * v;
            for (int64_t j = 0; j < v; ++j)
                d[j] = 0.4f * d[j] + t[j];
        }
    if (c->tree) {
        in->parents = psm_test_alloc((size_t)draft_rows, sizeof(int32_t));
        for (int64_t r = 0; r < requests; ++r)
            for (int32_t i = 1; i <= c->k; ++i)
                in->parents[r * k + i - 1] = (i - 1) / 2;
    }
    psm_test_rng rng = psm_test_rng_make(seed + 2);
    double *probs = psm_test_alloc((size_t)v, sizeof(double));
    for (int64_t row = 0; row < draft_rows; ++row) {
        const float draft_temperature =
            c->draft == 0 && c->draft_temperature > 0.0f ? c->draft_temperature : 1.0f;
        reference_probs(in->draft + row * v, v,
                        (psm_ref_params){draft_temperature, c->draft == 0 ? c->draft_top_k : 0,
                                         1.0f, 0.0f},
                        probs);
        in->tokens[row] = draw_from(probs, v, &rng);
        if (c->draft == 1) /* probabilities: this distribution, in f32 */
            for (int64_t j = 0; j < v; ++j)
                in->draft[row * v + j] = (float)probs[j];
        if (c->draft == 0 && c->draft_temperature == 0.0f) /* a greedy draft's argmax */
            in->tokens[row] = (int32_t)psm_ref_argmax(in->draft + row * v, v);
    }
    free(probs);
    if (c->bf16) {
        in->target_bf16 = psm_test_alloc((size_t)(target_rows * v), sizeof(uint16_t));
        in->draft_bf16 = psm_test_alloc((size_t)(draft_rows * v), sizeof(uint16_t));
        for (int64_t i = 0; i < target_rows * v; ++i)
            in->target_bf16[i] = to_bf16(in->target[i]);
        for (int64_t i = 0; i < draft_rows * v; ++i)
            in->draft_bf16[i] = to_bf16(in->draft[i]);
    }
    for (int r = 0; r < AGREE_REQUESTS; ++r) {
        in->temperature[r] = r == 2 ? 0.0f : 0.6f + 0.15f * (float)r; /* request 2 greedy */
        in->top_k[r] = r % 3 == 0 ? 0 : 20 * r;
        in->seeds[r] = seed * 31u + (uint64_t)r;
        in->offsets[r] = (uint64_t)r * 1000u + 7u;
    }
}

static void agree_free(agree_inputs *in)
{
    free(in->target);
    free(in->draft);
    free(in->target_bf16);
    free(in->draft_bf16);
    free(in->tokens);
    free(in->parents);
}

typedef struct agree_outputs {
    int32_t accepted[AGREE_REQUESTS];
    int32_t tokens[AGREE_REQUESTS * (PSM_MAX_DRAFT_NODES + 1)];
    int32_t path[AGREE_REQUESTS * (PSM_MAX_DRAFT_NODES + 1)];
    float logprobs[AGREE_REQUESTS * (PSM_MAX_DRAFT_NODES + 1)];
} agree_outputs;

/* The case with every array in the memory's kind (tokens and draft values
 * replaced when given), outputs first set to sentinels and read back to
 * host; the message of a failure into message. */
static psm_status agree_run(psm_test_memory *memory, const agree_case *c, const agree_inputs *in,
                            const int32_t *tokens, const float *draft_values, agree_outputs *out,
                            char *message, size_t message_size)
{
    const int64_t v = c->vocab, k = c->k, requests = AGREE_REQUESTS;
    const int64_t target_rows = requests * (k + 1), draft_rows = requests * k;
    const size_t element = c->bf16 ? 2 : 4;
    const psm_dtype dtype = c->bf16 ? PSM_DTYPE_BF16 : PSM_DTYPE_F32;
    const void *target_host = c->bf16 ? (const void *)in->target_bf16 : in->target;
    const int draft_in_bf16 = c->bf16 && c->draft == 0;
    const void *draft_host = draft_values    ? (const void *)draft_values
                             : draft_in_bf16 ? (const void *)in->draft_bf16
                                             : in->draft;
    psm_tensor target = psm_test_tensor(
        psm_test_memory_copy_in(memory, target_host, (size_t)(target_rows * v) * element), dtype,
        target_rows, v, 0);
    target.memory = psm_test_memory_kind(memory);
    psm_tensor draft = psm_test_tensor(
        psm_test_memory_copy_in(memory, draft_host,
                                (size_t)(draft_rows * v) * (draft_in_bf16 ? 2 : 4)),
        draft_in_bf16 ? PSM_DTYPE_BF16 : PSM_DTYPE_F32, draft_rows, v, 0);
    draft.memory = target.memory;
    psm_params params;
    psm_params_init(&params);
    params.temperature = c->temperature;
    params.top_k = c->top_k;
    params.top_p = c->top_p;
    params.min_p = c->min_p;
    params.filter_order = c->filter_order;
    params.seed = 0x5eed + (uint64_t)v;
    params.offset = 3;
    if (c->per_request) {
        params.temperature_per_row =
            psm_test_memory_copy_in(memory, in->temperature, sizeof in->temperature);
        params.top_k_per_row = psm_test_memory_copy_in(memory, in->top_k, sizeof in->top_k);
        params.seed_per_row = psm_test_memory_copy_in(memory, in->seeds, sizeof in->seeds);
        params.offset_per_row = psm_test_memory_copy_in(memory, in->offsets, sizeof in->offsets);
    }
    psm_params draft_params;
    psm_params_init(&draft_params);
    draft_params.temperature = c->draft_temperature;
    draft_params.top_k = c->draft_top_k;
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = c->k;
    drafts.tokens = psm_test_memory_copy_in(memory, tokens ? tokens : in->tokens,
                                            (size_t)draft_rows * sizeof(int32_t));
    drafts.parents =
        psm_test_memory_copy_in(memory, in->parents, (size_t)draft_rows * sizeof(int32_t));
    if (c->draft == 0) {
        drafts.draft_logits = &draft;
        drafts.draft_params = &draft_params;
    } else if (c->draft == 1) {
        drafts.draft_probs = &draft;
    }
    const size_t width = (size_t)(requests * (k + 1));
    int32_t sentinel[AGREE_REQUESTS * (PSM_MAX_DRAFT_NODES + 1)];
    for (size_t i = 0; i < sizeof sentinel / sizeof sentinel[0]; ++i)
        sentinel[i] = SENTINEL_TOKEN;
    psm_verification outputs;
    outputs.accepted.data = psm_test_memory_copy_in(memory, sentinel, sizeof out->accepted);
    outputs.tokens.data = psm_test_memory_copy_in(memory, sentinel, width * sizeof(int32_t));
    outputs.path_nodes.data = psm_test_memory_copy_in(memory, sentinel, width * sizeof(int32_t));
    outputs.logprobs.data = psm_test_memory_copy_in(memory, sentinel, width * sizeof(float));
    outputs.accepted.memory = outputs.tokens.memory = outputs.path_nodes.memory =
        outputs.logprobs.memory = target.memory;
    psm_status status = psm_verify(psm_test_memory_context(memory), &target, &params, &drafts,
                                   &outputs);
    snprintf(message, message_size, "%s", psm_last_error());
    memset(out, 0, sizeof *out);
    psm_test_memory_read(memory, out->accepted, outputs.accepted.data, sizeof out->accepted);
    psm_test_memory_read(memory, out->tokens, outputs.tokens.data, width * sizeof(int32_t));
    psm_test_memory_read(memory, out->path, outputs.path_nodes.data, width * sizeof(int32_t));
    psm_test_memory_read(memory, out->logprobs, outputs.logprobs.data, width * sizeof(float));
    return status;
}

/* Every case on this backend, from host memory and from device memory,
 * against the CPU backend from host memory: equal bytes. */
PSM_PROPERTY(outputs_equal_the_cpu_backends)
{
    const char *no_device = psm_test_memory_unavailable(backend, PSM_MEMORY_DEVICE);
    if (no_device)
        psm_test_skip(psm_backend_name(backend), "outputs_equal_the_cpu_backends (device memory)",
                      no_device);
    psm_test_memory *cpu = psm_test_memory_open(PSM_BACKEND_CPU, PSM_MEMORY_HOST, 0);
    psm_test_memory *host = psm_test_memory_open(backend, PSM_MEMORY_HOST, 0);
    psm_test_memory *device =
        no_device ? NULL : psm_test_memory_open(backend, PSM_MEMORY_DEVICE, 0);
    char message[512];
    const size_t cases = sizeof agree_cases / sizeof agree_cases[0];
    for (size_t i = 0; i < cases; ++i) {
        const agree_case *c = &agree_cases[i];
        agree_inputs in;
        agree_make(c, 0xa9e0 + (uint64_t)i * 17u, &in);
        agree_outputs expected, got;
        psm_status status = agree_run(cpu, c, &in, NULL, NULL, &expected, message, sizeof message);
        ck_assert_msg(status == PSM_OK, "%s: cpu: %s", c->name, message);
        int accepted_total = 0;
        for (int r = 0; r < AGREE_REQUESTS; ++r)
            accepted_total += expected.accepted[r];
        ck_assert_msg(accepted_total > 0 || c->draft == 2 || c->draft_temperature == 0.0f,
                      "%s: no draft accepted", c->name);
        for (int where = 0; where < 2; ++where) {
            psm_test_memory *memory = where ? device : host;
            if (!memory)
                continue;
            status = agree_run(memory, c, &in, NULL, NULL, &got, message, sizeof message);
            ck_assert_msg(status == PSM_OK, "%s (%s memory): %s", c->name,
                          where ? "device" : "host", message);
            const size_t width = (size_t)(AGREE_REQUESTS * (c->k + 1));
            for (int r = 0; r < AGREE_REQUESTS; ++r)
                ck_assert_msg(got.accepted[r] == expected.accepted[r],
                              "%s (%s memory): request %d accepted %d, cpu %d", c->name,
                              where ? "device" : "host", r, got.accepted[r],
                              expected.accepted[r]);
            ck_assert_msg(memcmp(got.tokens, expected.tokens, width * sizeof(int32_t)) == 0,
                          "%s: tokens differ", c->name);
            ck_assert_msg(memcmp(got.path, expected.path, width * sizeof(int32_t)) == 0,
                          "%s: path nodes differ", c->name);
            ck_assert_msg(memcmp(got.logprobs, expected.logprobs, width * sizeof(float)) == 0,
                          "%s: logprobs differ", c->name);
        }
        agree_free(&in);
    }
    if (device)
        psm_test_memory_close(device);
    psm_test_memory_close(host);
    psm_test_memory_close(cpu);
}

/* Bad drafts in device memory (a drawn token of draft probability 0, a
 * token outside the vocab, a parent that is not earlier): where the host
 * reads the arrays (host memory, the CPU backend) or in checking mode the
 * call fails as the CPU backend fails it, writing nothing; otherwise the
 * request holding the bad node gets -1 everywhere and the others their
 * usual outputs. */
PSM_PROPERTY(bad_drafts_in_device_memory)
{
    const char *no_device = psm_test_memory_unavailable(backend, PSM_MEMORY_DEVICE);
    if (no_device) {
        psm_test_skip(psm_backend_name(backend), "bad_drafts_in_device_memory", no_device);
        return;
    }
    const agree_case *c = &agree_cases[3]; /* a tree with draft probabilities */
    agree_inputs in;
    agree_make(c, 0xbad0, &in);
    char message[512];
    agree_outputs expected, got;
    psm_test_memory *cpu = psm_test_memory_open(PSM_BACKEND_CPU, PSM_MEMORY_HOST, 0);
    PSM_CHECK_OK(agree_run(cpu, c, &in, NULL, NULL, &expected, message, sizeof message));
    psm_test_memory_close(cpu);
    const int64_t v = c->vocab, k = c->k;
    const int bad_request = 2, bad_node = 3;
    const int64_t at = bad_request * k + bad_node - 1;
    float *zeroed = psm_test_alloc((size_t)(AGREE_REQUESTS * k * v), sizeof(float));
    memcpy(zeroed, in.draft, (size_t)(AGREE_REQUESTS * k * v) * sizeof(float));
    zeroed[at * v + in.tokens[at]] = 0.0f;
    int32_t *outside = psm_test_alloc((size_t)(AGREE_REQUESTS * k), sizeof(int32_t));
    memcpy(outside, in.tokens, (size_t)(AGREE_REQUESTS * k) * sizeof(int32_t));
    outside[at] = (int32_t)v;
    /* Device memory's message does not read the token (it is not on the host). */
    const char *expected_message[2] = {"draft probability 0", "outside the vocab"};
    for (int check_rows = 0; check_rows < 2; ++check_rows) {
        psm_test_memory *device = psm_test_memory_open(backend, PSM_MEMORY_DEVICE, check_rows);
        const int fails = check_rows || psm_test_memory_checked_on_host(device);
        for (int which = 0; which < 2; ++which) {
            psm_status status =
                agree_run(device, c, &in, which ? outside : NULL, which ? NULL : zeroed, &got,
                          message, sizeof message);
            const size_t width = (size_t)(AGREE_REQUESTS * (k + 1));
            if (fails) {
                ck_assert_msg(status == PSM_ERR_INVALID_PARAMETER, "expected a failure, got %s",
                              psm_status_string(status));
                ck_assert_msg(strstr(message, "request 2, draft node 3:") != NULL &&
                                  strstr(message, expected_message[which]) != NULL,
                              "%s", message);
                for (size_t j = 0; j < width; ++j)
                    ck_assert(got.tokens[j] == SENTINEL_TOKEN);
                continue;
            }
            ck_assert_msg(status == PSM_OK, "%s", message);
            for (int r = 0; r < AGREE_REQUESTS; ++r) {
                const int64_t base = r * (k + 1);
                if (r == bad_request) {
                    ck_assert_int_eq(got.accepted[r], -1);
                    for (int64_t j = 0; j <= k; ++j) {
                        ck_assert_int_eq(got.tokens[base + j], -1);
                        ck_assert_int_eq(got.path[base + j], -1);
                        ck_assert(isnan(got.logprobs[base + j]));
                    }
                    continue;
                }
                ck_assert_int_eq(got.accepted[r], expected.accepted[r]);
                ck_assert(memcmp(got.tokens + base, expected.tokens + base,
                                 (size_t)(k + 1) * sizeof(int32_t)) == 0);
                ck_assert(memcmp(got.logprobs + base, expected.logprobs + base,
                                 (size_t)(k + 1) * sizeof(float)) == 0);
            }
        }
        psm_test_memory_close(device);
    }
    free(zeroed);
    free(outside);
    agree_free(&in);
}

/* ---- determinism ------------------------------------------------------------------ */

/* A batch of 7 requests with per-request seeds (stream 0), a chain drafted
 * by poor draft logits: the same call gives the same outputs; each request
 * alone (a batch of 1) gives its row of the batch; a context of 1 thread and
 * one of 2 agree. */
PSM_PROPERTY(batch_composition_and_threads_do_not_matter)
{
    const int64_t vocab = 2500, requests = 7;
    const int32_t k = 5;
    const int64_t width = k + 1;
    verify_call call;
    call_make(&call, requests, k, vocab);
    call_add_draft(&call);
    normal_logits(call.target, requests * width * vocab, 0xde7e1u);
    normal_logits(call.draft, requests * k * vocab, 0xde7e2u);
    for (int64_t i = 0; i < requests * k * vocab; ++i)
        call.draft[i] = 0.3f * call.draft[i] + 0.7f * call.target[(i / vocab / k) * width * vocab +
                                                                   (i % (k * vocab))];
    uint64_t seeds[7] = {11, 12, 13, 14, 15, 16, 17};
    call.target_params.seed_per_row = seeds;
    call.target_params.temperature = 1.3f;
    call.target_params.top_k = 500;
    call.target_params.min_p = 0.001f;
    call.with_draft_params = 1;
    call.draft_params.temperature = 1.6f;
    psm_test_rng rng = psm_test_rng_make(0xde7e3u);
    double *probs = psm_test_alloc((size_t)vocab, sizeof(double));
    for (int64_t i = 0; i < requests * k; ++i) {
        reference_probs(call.draft + i * vocab, vocab, (psm_ref_params){1.6f, 0, 1.0f, 0.0f},
                        probs);
        call.tokens[i] = draw_from(probs, vocab, &rng);
    }
    free(probs);

    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.cpu_threads = 2;
    psm_context *context = psm_test_open_with(&options);
    call_runs(context, "batch_composition_and_threads_do_not_matter", &call);
    int32_t accepted[7], tokens[7 * 6], path[7 * 6];
    float logprobs[7 * 6];
    memcpy(accepted, call.accepted, sizeof accepted);
    memcpy(tokens, call.out_tokens, sizeof tokens);
    memcpy(path, call.path_nodes, sizeof path);
    memcpy(logprobs, call.logprobs, sizeof logprobs);
    int some_rejected = 0, some_accepted = 0;
    for (int r = 0; r < 7; ++r) {
        some_rejected |= accepted[r] < k;
        some_accepted |= accepted[r] > 0;
    }
    ck_assert_msg(some_rejected && some_accepted, "the case should mix acceptances and "
                  "rejections");

    PSM_CHECK_OK(call_run(context, &call));
    ck_assert(memcmp(accepted, call.accepted, sizeof accepted) == 0);
    ck_assert(memcmp(tokens, call.out_tokens, sizeof tokens) == 0);

    options.cpu_threads = 1;
    psm_context *single = psm_test_open_with(&options);
    PSM_CHECK_OK(call_run(single, &call));
    ck_assert(memcmp(accepted, call.accepted, sizeof accepted) == 0);
    ck_assert(memcmp(tokens, call.out_tokens, sizeof tokens) == 0);
    ck_assert(memcmp(path, call.path_nodes, sizeof path) == 0);
    ck_assert(memcmp(logprobs, call.logprobs, sizeof logprobs) == 0);

    for (int r = 0; r < 7; ++r) {
        verify_call alone = call;
        alone.requests = 1;
        alone.target = call.target + r * width * vocab;
        alone.draft = call.draft + r * k * vocab;
        alone.tokens = call.tokens + r * k;
        alone.target_params.seed_per_row = seeds + r;
        int32_t one_accepted, one_tokens[6], one_path[6];
        float one_logprobs[6];
        alone.accepted = &one_accepted;
        alone.out_tokens = one_tokens;
        alone.path_nodes = one_path;
        alone.logprobs = one_logprobs;
        PSM_CHECK_OK(call_run(context, &alone));
        ck_assert_int_eq(one_accepted, accepted[r]);
        ck_assert(memcmp(one_tokens, tokens + r * width, sizeof one_tokens) == 0);
        ck_assert(memcmp(one_path, path + r * width, sizeof one_path) == 0);
        ck_assert(memcmp(one_logprobs, logprobs + r * width, sizeof one_logprobs) == 0);
    }
    /* Another seed draws anew. */
    uint64_t other_seeds[7] = {21, 22, 23, 24, 25, 26, 27};
    call.target_params.seed_per_row = other_seeds;
    PSM_CHECK_OK(call_run(context, &call));
    ck_assert(memcmp(tokens, call.out_tokens, sizeof tokens) != 0);
    psm_context_destroy(single);
    psm_context_destroy(context);
    call.target_params.seed_per_row = NULL;
    call_free(&call);
}

int main(void)
{
    psm_test_register_common(wide_products_match_reference);
    psm_test_register_common(acceptance_test_matches_reference);
    psm_test_register_common(acceptance_edges);
    psm_test_register_common(residual_step_matches_reference);
    psm_test_register_common(rejection_leaves_mass);
    psm_test_register_common(draft_prob_weights);
    psm_test_register_common(total_bounds_hold);
    psm_test_register_common(test_within_bounds_is_exact);
    psm_test_register_common(chi_square_p_values);
    psm_test_register_property(chain_emits_target_distribution);
    psm_test_register_property(tree_emits_target_distribution);
    psm_test_register_property(draft_equal_to_target_accepts_all);
    psm_test_register_property(greedy_target_accepts_argmax_only);
    psm_test_register_property(equal_logits_accept_all);
    psm_test_register_property(masked_draft_token_always_rejected);
    psm_test_register_property(bad_target_row_makes_request_bad);
    psm_test_register_property(bad_inputs_refused_nothing_written);
    psm_test_register_property(batch_composition_and_threads_do_not_matter);
    psm_test_register_property(outputs_equal_the_cpu_backends);
    psm_test_register_property(bad_drafts_in_device_memory);
    return psm_test_run("test_verify");
}
