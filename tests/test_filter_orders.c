/*
 * test_filter_orders.c: psm_params.filter_order, the engines' filter orders
 * (docs/SAMPLING.md, section 4, "Filter orders"), through psm_probs (the
 * kept set is where probs > 0) and psm_sample:
 * - one row on which each of the six orders keeps a different set, asserted
 *   exactly;
 * - the expectations of llama.cpp's own tests (tests/test-sampling.cpp)
 *   that apply to top-k, top-p and min-p;
 * - random rows (normal ones, and coarse ones full of ties) in every order
 *   against the float64 reference (reference/psm_reference.c, written
 *   independently from the CPU backend), in batches and in single rows
 *   split over threads;
 * - every backend draws the CPU backend's tokens, logprobs and probs in every
 *   order, with per-row parameters, logit processing and 16-bit logits;
 * - an unknown order is refused, writing nothing.
 * A backend without the orders must refuse them with PSM_ERR_UNSUPPORTED,
 * writing nothing; its tests then skip visibly.
 */
#include "harness.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL_PROB 7.0f

static const char *const order_names[PSM_FILTER_ORDER_COUNT] = {
    "polysample", "vllm", "sglang", "llama.cpp", "flashinfer top_k_first", "flashinfer joint"};

/* psm_probs in the given order into probs (rows x vocab). On a backend
 * without filter orders: checks the refusal (nothing written), records a
 * visible skip and returns 0. */
static int ordered_probs(psm_context *context, psm_backend backend, const char *test,
                         const float *logits, int64_t rows, int64_t vocab, psm_params *params,
                         float *probs)
{
    for (int64_t i = 0; i < rows * vocab; ++i)
        probs[i] = SENTINEL_PROB;
    psm_status status = psm_test_probs_f32(context, logits, rows, vocab, params, probs);
    if (status == PSM_ERR_UNSUPPORTED && backend != PSM_BACKEND_CPU &&
        params->filter_order != PSM_FILTER_ORDER_POLYSAMPLE) {
        for (int64_t i = 0; i < rows * vocab; ++i)
            ck_assert_msg(probs[i] == SENTINEL_PROB, "%s: refused, yet probs[%lld] was written",
                          test, (long long)i);
        char reason[256];
        snprintf(reason, sizeof reason,
                 "refused as it should be (%s); the rest needs the backend to run filter orders",
                 psm_last_error());
        psm_test_skip(psm_backend_name(backend), test, reason);
        return 0;
    }
    ck_assert_msg(status == PSM_OK, "%s: %s: %s", test, psm_status_string(status),
                  psm_last_error());
    PSM_CHECK_OK(psm_synchronize(context));
    return 1;
}

/* The kept set is exactly `expected` (token ids, count of them). */
static void expect_exact_set(const char *label, const float *probs, int64_t vocab,
                             const int32_t *expected, int count)
{
    for (int64_t i = 0; i < vocab; ++i) {
        int listed = 0;
        for (int e = 0; e < count; ++e)
            listed |= expected[e] == i;
        ck_assert_msg((probs[i] > 0.0f) == listed, "%s: token %lld has probability %g; it "
                      "should%s be kept", label, (long long)i, (double)probs[i],
                      listed ? "" : " not");
    }
}

/* ---- one row, six sets -------------------------------------------------------- */

/* Rank order: 5 (4), 3 (2.5), 1 7 11 (1), 0 2 10 (0.5), 4 8 (0), 6 9 (-1).
 * At T = 3, k = 6, p = 0.6, min-p = 0.02 the orders differ thus (each set is
 * the same when p or min-p moves by 1e-4 of itself, far more than the
 * contract's rounding):
 * - polysample: the top 6 (5 3 1 7 11 0), top-p over them keeps 5 3 1;
 * - vLLM: the top 6 with the ties at 0.5 (2, 10) make top-p's Z larger, so
 *   it keeps one more: 5 3 1 7;
 * - SGLang: top-p over all 12 tokens keeps 5 3 1 7 11 0 2 (its preceding
 *   mass stays below 0.6 Z until token 10), cut by the top 6: 5 3 1 7 11 0;
 * - llama.cpp: the same filters at temperature 1, where 5 alone reaches
 *   0.6 of the top 6's mass: 5;
 * - FlashInfer top_k_first: the top 6 with its ties (9 tokens), top-p over
 *   them keeps 5 3 1 7 and, tied with 7, 11;
 * - FlashInfer joint: top-p over all keeps 5 3 1 7 11 0 and its ties 2 10,
 *   all inside the top 6 with ties. */
static const float six_sets_row[12] = {0.5f, 1, 0.5f, 2.5f, 0, 4, -1, 1, 0, -1, 0.5f, 1};

PSM_PROPERTY(each_order_keeps_its_own_set)
{
    static const int32_t kept[PSM_FILTER_ORDER_COUNT][8] = {
        {5, 3, 1}, {5, 3, 1, 7}, {5, 3, 1, 7, 11, 0}, {5}, {5, 3, 1, 7, 11},
        {5, 3, 1, 7, 11, 0, 2, 10}};
    static const int kept_count[PSM_FILTER_ORDER_COUNT] = {3, 4, 6, 1, 5, 8};
    const psm_ref_params filters = {3.0f, 6, 0.6f, 0.02f};
    psm_context *context = psm_test_open(backend);
    float probs[12];
    for (int32_t order = 0; order < PSM_FILTER_ORDER_COUNT; ++order) {
        psm_params params = psm_test_params_of(&filters, order);
        if (!ordered_probs(context, backend, "each_order_keeps_its_own_set", six_sets_row, 1, 12,
                           &params, probs))
            break;
        expect_exact_set(order_names[order], probs, 12, kept[order], kept_count[order]);

        /* The reference agrees, and so do the draws. */
        double expected[12];
        ck_assert_int_eq(psm_ref_distribution_ordered(six_sets_row, 12, &filters,
                                                      (psm_ref_order)order, expected),
                         1);
        for (int i = 0; i < 12; ++i)
            ck_assert_msg(fabs((double)probs[i] - expected[i]) <= 1e-6,
                          "%s: probs[%d] = %.9g, reference %.9g", order_names[order], i,
                          (double)probs[i], expected[i]);
        int32_t tokens[500];
        params.num_samples = 500;
        params.seed = 5;
        PSM_CHECK_OK(psm_test_sample_f32(context, six_sets_row, 1, 12, &params, tokens, NULL));
        PSM_CHECK_OK(psm_synchronize(context));
        for (int s = 0; s < 500; ++s)
            ck_assert_msg(tokens[s] >= 0 && probs[tokens[s]] > 0.0f,
                          "%s: drew token %d outside the kept set", order_names[order],
                          tokens[s]);
    }
    psm_context_destroy(context);
}
END_TEST

/* ---- llama.cpp's own expectations ------------------------------------------------ */

/* From ggml-org/llama.cpp tests/test-sampling.cpp (commit f0817df5): the
 * rows are log-probabilities, each sampler runs alone at temperature 1 and
 * the test asserts the renormalised probabilities to 1e-5. Left out: top_p
 * = 0 and min_p = 1.05, which psm_params refuses (top_p is in (0, 1], min_p
 * in [0, 1]. top_p = 0.7 is a boundary case: the expected prefix {0.4, 0.3}
 * sums to 0.7 exactly, so either set could follow from float rounding;
 * llama.cpp's float sum reaches 0.7f, and the contract's integers also
 * reach their target with two tokens (the same on every backend). */
typedef struct llama_case {
    const char *name;
    psm_ref_params filters;
    int count;
    float expected[4]; /* the kept probabilities, most probable first */
} llama_case;

static const llama_case llama_cases[] = {
    {"test_top_k k=1", {1.0f, 1, 1.0f, 0.0f}, 1, {1.0f}},
    {"test_top_k k=3", {1.0f, 3, 1.0f, 0.0f}, 3, {0.44444f, 0.33333f, 0.22222f}},
    {"test_top_k k=4", {1.0f, 4, 1.0f, 0.0f}, 4, {0.4f, 0.3f, 0.2f, 0.1f}},
    {"test_top_k k=0", {1.0f, 0, 1.0f, 0.0f}, 4, {0.4f, 0.3f, 0.2f, 0.1f}},
    {"test_top_p p=0.7", {1.0f, 0, 0.7f, 0.0f}, 2, {0.571429f, 0.428571f}},
    {"test_top_p p=0.8", {1.0f, 0, 0.8f, 0.0f}, 3, {0.44444f, 0.33333f, 0.22222f}},
    {"test_top_p p=1", {1.0f, 0, 1.0f, 0.0f}, 4, {0.4f, 0.3f, 0.2f, 0.1f}},
    {"test_min_p 0.00", {1.0f, 0, 1.0f, 0.00f}, 4, {0.4f, 0.3f, 0.2f, 0.1f}},
    {"test_min_p 0.24", {1.0f, 0, 1.0f, 0.24f}, 4, {0.4f, 0.3f, 0.2f, 0.1f}},
    {"test_min_p 0.26", {1.0f, 0, 1.0f, 0.26f}, 3, {0.4f / 0.9f, 0.3f / 0.9f, 0.2f / 0.9f}},
    {"test_min_p 0.49", {1.0f, 0, 1.0f, 0.49f}, 3, {0.4f / 0.9f, 0.3f / 0.9f, 0.2f / 0.9f}},
    {"test_min_p 0.51", {1.0f, 0, 1.0f, 0.51f}, 2, {0.4f / 0.7f, 0.3f / 0.7f}},
    {"test_min_p 0.74", {1.0f, 0, 1.0f, 0.74f}, 2, {0.4f / 0.7f, 0.3f / 0.7f}},
    {"test_min_p 0.76", {1.0f, 0, 1.0f, 0.76f}, 1, {1.0f}},
    {"test_min_p 1.00", {1.0f, 0, 1.0f, 1.00f}, 1, {1.0f}},
};

PSM_PROPERTY(llama_cpp_sampler_expectations)
{
    psm_context *context = psm_test_open(backend);
    const float logits[4] = {logf(0.1f), logf(0.2f), logf(0.3f), logf(0.4f)};
    float probs[4];
    for (size_t c = 0; c < sizeof llama_cases / sizeof llama_cases[0]; ++c) {
        const llama_case *lc = &llama_cases[c];
        psm_params params = psm_test_params_of(&lc->filters, PSM_FILTER_ORDER_LLAMA_CPP);
        if (!ordered_probs(context, backend, "llama_cpp_sampler_expectations", logits, 1, 4,
                           &params, probs))
            break;
        /* Token 3 is the most probable, token 0 the least. */
        for (int r = 0; r < 4; ++r) {
            float want = r < lc->count ? lc->expected[r] : 0.0f;
            ck_assert_msg(fabsf(probs[3 - r] - want) < 1e-5f, "%s: probs[%d] = %.7g, llama.cpp %.7g",
                          lc->name, 3 - r, (double)probs[3 - r], (double)want);
        }
    }
    psm_context_destroy(context);
}
END_TEST

/* test_sampler_queue: 10,000 tokens with logit ln(id) (token 0 is -inf:
 * masked here, never a candidate), p_i proportional to the id. The kept
 * set is the ids from its lowest one up; llama.cpp's test derives that id
 * in integers, and so does this one:
 * - top-k k keeps ids >= 10000 - k (all 9,999 valid ones when k is 10,000);
 * - top-p p keeps, from the top id down, ids until their sum reaches
 *   ceil(p x the candidates' id sum);
 * - min-p m keeps ids >= m x 9999.
 * The chain "kpm" is llama.cpp's default order; every set is the same at
 * other temperatures, since the chain filters at temperature 1. */
typedef struct queue_case {
    const char *chain;
    psm_ref_params filters; /* the temperature is the test's */
} queue_case;

static int64_t queue_lowest_id(const psm_ref_params *q, int64_t vocab)
{
    int64_t lowest = 1;
    if (q->top_k > 0 && q->top_k < vocab - 1)
        lowest = vocab - q->top_k;
    if (q->top_p < 1.0f) {
        int64_t divisor = 0;
        for (int64_t id = lowest; id < vocab; ++id)
            divisor += id;
        double target = ceil((double)q->top_p * (double)divisor);
        int64_t sum = 0, id = vocab;
        do {
            --id;
            sum += id;
        } while ((double)sum < target);
        lowest = id;
    }
    if (q->min_p > 0.0f) {
        int64_t threshold = (int64_t)ceil((double)q->min_p * (double)(vocab - 1));
        lowest = threshold > lowest ? threshold : lowest;
    }
    return lowest;
}

PSM_PROPERTY(llama_cpp_sampler_queue_expectations)
{
    static const queue_case queue[] = {
        {"k", {1.0f, 10000, 1.0f, 0.0f}},
        {"k", {1.0f, 1, 1.0f, 0.0f}},
        {"k", {1.0f, 100, 1.0f, 0.0f}},
        {"p", {1.0f, 0, 0.0003f, 0.0f}},
        {"p", {1.0f, 0, 0.8f, 0.0f}},
        {"m", {1.0f, 0, 1.0f, 0.1f}},
        {"m", {1.0f, 0, 1.0f, 9997.9f / 9999.0f}},
        {"kpm", {1.0f, 100, 0.8f, 0.1f}},
    };
    const int64_t vocab = 10000;
    psm_context *context = psm_test_open(backend);
    float *logits = psm_test_alloc((size_t)vocab, sizeof *logits);
    float *probs = psm_test_alloc((size_t)vocab, sizeof *probs);
    for (int64_t id = 0; id < vocab; ++id)
        logits[id] = logf((float)id);
    const float temperatures[] = {1.0f, 0.4f};
    for (size_t c = 0; c < sizeof queue / sizeof queue[0]; ++c) {
        for (size_t t = 0; t < 2; ++t) {
            const psm_ref_params *q = &queue[c].filters;
            psm_params params = psm_test_params_of(q, PSM_FILTER_ORDER_LLAMA_CPP);
            params.temperature = temperatures[t];
            if (!ordered_probs(context, backend, "llama_cpp_sampler_queue_expectations", logits,
                               1, vocab, &params, probs))
                goto done;
            int64_t lowest = queue_lowest_id(q, vocab);
            for (int64_t id = 0; id < vocab; ++id)
                ck_assert_msg((probs[id] > 0.0f) == (id >= lowest),
                              "chain %s (k %d, p %g, min-p %g) at T %g: token %lld %s; the "
                              "kept ids are %lld and up",
                              queue[c].chain, q->top_k, (double)q->top_p, (double)q->min_p,
                              (double)temperatures[t], (long long)id,
                              probs[id] > 0.0f ? "kept" : "dropped", (long long)lowest);
        }
    }
done:
    free(probs);
    free(logits);
    psm_context_destroy(context);
}
END_TEST

/* ---- random rows against the reference ----------------------------------------- */

static const psm_ref_params order_cases[] = {
    {0.7f, 40, 0.9f, 0.05f}, {1.3f, 200, 0.8f, 0.0f}, {0.9f, 0, 0.95f, 0.01f},
    {1.0f, 20, 1.0f, 0.1f},  {2.0f, 0, 0.5f, 0.0f},   {0.8f, 1500, 0.99f, 0.002f},
};

/* Normal rows (sigma 2) and coarse ones (rounded to 1/4: many ties at every
 * boundary), vocab tokens each. */
static void fill_rows(float *logits, int64_t rows, int64_t vocab, psm_test_rng *rng)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < vocab; ++i) {
            double x = 2.0 * psm_test_rng_normal(rng);
            logits[r * vocab + i] = (float)(r % 2 ? round(4.0 * x) / 4.0 : x);
        }
}

/* Every order and case on rows x vocab logits, each row's kept set and
 * probabilities against the reference. Returns 0 when the backend refused
 * the orders (a skip is recorded). */
static int match_reference(psm_context *context, psm_backend backend, const char *test,
                           int threads, const float *logits, int64_t rows, int64_t vocab,
                           const psm_ref_params *cases, size_t case_count)
{
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof *probs);
    double *expected = psm_test_alloc((size_t)vocab, sizeof *expected);
    int ran = 1;
    for (int32_t order = 0; order < PSM_FILTER_ORDER_COUNT && ran; ++order) {
        for (size_t c = 0; c < case_count; ++c) {
            const psm_ref_params *oc = &cases[c];
            psm_params params = psm_test_params_of(oc, order);
            if (!ordered_probs(context, backend, test, logits, rows, vocab, &params, probs)) {
                ran = 0;
                break;
            }
            for (int64_t r = 0; r < rows; ++r) {
                ck_assert_int_eq(psm_ref_distribution_ordered(logits + r * vocab, vocab, oc,
                                                              (psm_ref_order)order,
                                                              expected),
                                 1);
                const float *got = probs + r * vocab;
                for (int64_t i = 0; i < vocab; ++i) {
                    ck_assert_msg((got[i] > 0.0f) == (expected[i] > 0.0),
                                  "%s: %s, threads %d, row %lld, case %zu (T %g, k %d, p %g, "
                                  "min-p %g): token %lld is %s, the reference %s it",
                                  test, order_names[order], threads, (long long)r, c,
                                  (double)oc->temperature, oc->top_k, (double)oc->top_p,
                                  (double)oc->min_p, (long long)i,
                                  got[i] > 0.0f ? "kept" : "dropped",
                                  expected[i] > 0.0 ? "keeps" : "drops");
                    ck_assert_msg(fabs((double)got[i] - expected[i]) <= 1e-6,
                                  "%s: %s, row %lld, case %zu: probs[%lld] = %.9g, reference "
                                  "%.9g",
                                  test, order_names[order], (long long)r, c, (long long)i,
                                  (double)got[i], expected[i]);
                }
            }
        }
    }
    free(expected);
    free(probs);
    return ran;
}

/* Returns 0 when the backend refused the orders (a skip is recorded). */
static int expect_reference(psm_backend backend, int threads, int64_t rows, int64_t vocab,
                            uint64_t seed)
{
    psm_context *context = psm_test_open_threads(backend, threads);
    psm_test_rng rng = psm_test_rng_make(seed);
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
    fill_rows(logits, rows, vocab, &rng);
    int ran = match_reference(context, backend, "orders_match_the_reference", threads, logits,
                              rows, vocab, order_cases, sizeof order_cases / sizeof order_cases[0]);
    free(logits);
    psm_context_destroy(context);
    return ran;
}

/* A batch (rows taken a thread at a time) and single rows split over the
 * threads, each order and case against the reference. */
PSM_PROPERTY(orders_match_the_reference)
{
    if (expect_reference(backend, 2, 6, 3000, 41))
        expect_reference(backend, 2, 1, psm_test_quick() ? 5000 : 20000, 42);
}
END_TEST

/* ---- the search paths, on shaped rows ------------------------------------------- */

/* The CPU backend finds an order's cutoffs by several paths, each of which
 * must give the reference's set. The rows and cases below reach each one:
 * - top-k by the heap with the order's top-p walked over it (k 50), and
 *   for the orders that keep the k-th token's ties, a heap of k + 1 whose
 *   last token ties (coarse rows, the plateau) or not (the others); k 4095
 *   and 4096 straddle the heap's limit for those orders (4096 tokens);
 * - for the orders that take top-p over the whole row after the heap, Z
 *   from a bound without reading (spread rows, k 5, p 0.9), from a bound
 *   over the tokens near the heap (language-model rows), or exactly: when
 *   an upper bound shows that the walk ends in the heap (the peaked row) or
 *   when no bound decides (p 0.3 on spread rows); single rows split over
 *   the threads always sum exactly;
 * - top-p by the gap bins (no top-k, top-k past the heap, or ties outside
 *   it), with the kept masses made by its band pass or by the kept pass,
 *   over min-p's survivors (vLLM), and with a cutoff bin of more tokens than
 *   a gather buffer holds (the plateau, resolved by the radix select);
 * - llama.cpp's min-p prefix from the heap and from a scan, and its masses
 *   made at the row's temperature while it filters at 1;
 * - vLLM's top-k over min-p's survivors (radix select), also with fewer
 *   survivors than k.
 * Masked tokens (a whole tile, and scattered ones) are in two of the rows. */
#define SHAPED_VOCAB 16384
#define SHAPED_ROWS 5

static const psm_ref_params shaped_cases[] = {
    {0.8f, 50, 0.9f, 0.0f},    {0.8f, 50, 0.3f, 0.0f},     {0.8f, 0, 0.9f, 0.0f},
    {0.8f, 0, 1.0f, 0.05f},    {1.2f, 50, 0.9f, 0.02f},    {0.8f, 300, 0.95f, 0.001f},
    {0.8f, 5000, 0.9f, 0.0f},  {0.7f, 4095, 0.9f, 0.0f},   {0.8f, 4096, 0.9f, 0.0f},
    {0.8f, 20, 0.8f, 0.3f},    {0.8f, 5, 0.9f, 0.0f},
};

/* Row 0: spread (normal, sigma 2; tile 5 masked, PSM_TILE being 1024); row 1: shaped like a
 * language model's (logit -1.1 ln(rank) + U(-0.1, 0.1), ranks shuffled;
 * every 97th token masked); row 2: peaked (one token 25 above a normal
 * row); row 3: coarse (normal rounded to 1/4); row 4: a plateau (four
 * tokens in five at 0, the rest at -8, forty at 3). */
static void fill_shaped_rows(float *logits, psm_test_rng *rng)
{
    const int64_t vocab = SHAPED_VOCAB;
    int32_t *rank = psm_test_alloc((size_t)vocab, sizeof *rank);
    for (int64_t i = 0; i < vocab; ++i)
        rank[i] = (int32_t)i + 1;
    for (int64_t i = vocab - 1; i > 0; --i) {
        int64_t j = (int64_t)psm_test_rng_below(rng, (uint64_t)i + 1);
        int32_t held = rank[i];
        rank[i] = rank[j];
        rank[j] = held;
    }
    for (int64_t i = 0; i < vocab; ++i) {
        float *row = logits;
        row[i] = i / 1024 == 5 ? -INFINITY : (float)(2.0 * psm_test_rng_normal(rng));
        row += vocab;
        row[i] = i % 97 == 0 ? -INFINITY
                             : (float)(-1.1 * log((double)rank[i]) +
                                       0.2 * psm_test_rng_uniform(rng) - 0.1);
        row += vocab;
        row[i] = i == vocab / 3 ? 25.0f : (float)(2.0 * psm_test_rng_normal(rng));
        row += vocab;
        row[i] = (float)(round(8.0 * psm_test_rng_normal(rng)) / 4.0);
        row += vocab;
        row[i] = i % 401 == 7 ? 3.0f : i % 5 != 0 ? 0.0f : -8.0f;
    }
    free(rank);
}

PSM_PROPERTY(each_search_path_matches_the_reference)
{
    const char *test = "each_search_path_matches_the_reference";
    const size_t case_count = sizeof shaped_cases / sizeof shaped_cases[0];
    psm_test_rng rng = psm_test_rng_make(43);
    float *logits = psm_test_alloc((size_t)(SHAPED_ROWS * SHAPED_VOCAB), sizeof *logits);
    fill_shaped_rows(logits, &rng);
    psm_context *context = psm_test_open_threads(backend, 2);
    int ran = match_reference(context, backend, test, 2, logits, SHAPED_ROWS, SHAPED_VOCAB,
                              shaped_cases, case_count);
    for (int64_t r = 0; ran && r < SHAPED_ROWS; ++r)
        ran = match_reference(context, backend, test, 2, logits + r * SHAPED_VOCAB, 1,
                              SHAPED_VOCAB, shaped_cases, case_count);
    psm_context_destroy(context);
    free(logits);
}
END_TEST

/* ---- the CPU backend's tokens ----------------------------------------------------- */

/* Every backend draws the CPU backend's tokens in every order, with the same
 * logprobs and psm_probs (the same kept sets), on batches that mix the
 * cases a row meets, one per row: 0, masked tokens and a top-k past the
 * valid tokens (top-p and min-p decide); 1, greedy; 2, no filter; 3, coarse
 * logits (ties at every boundary) with a top-k that top-p cuts within its
 * ties; 4, min-p strong enough to leave vLLM's top-k fewer survivors than k;
 * 5, top-p and min-p alone. Each row has its own seed and several samples;
 * the batch comes as f32 and as bf16 (more ties), then with logit
 * processing, and a single long row with row 3's filters (many radix
 * levels; on CUDA a row split over several blocks). */
#define MATCH_ROWS 6
#define MATCH_SAMPLES 8
#define MATCH_SENTINEL -7
#define MATCH_SCALAR_ROW 3

static const float match_temperatures[MATCH_ROWS] = {0.7f, 0.0f, 1.3f, 1.0f, 0.5f, 2.0f};
static const int32_t match_top_ks[MATCH_ROWS] = {4700, 10, 0, 25, 300, 0};
static const float match_top_ps[MATCH_ROWS] = {0.9f, 1.0f, 1.0f, 0.9f, 0.95f, 0.5f};
static const float match_min_ps[MATCH_ROWS] = {0.05f, 0.0f, 0.0f, 0.0f, 0.01f, 0.2f};
static const uint64_t match_seeds[MATCH_ROWS] = {11, 12, 13, 14, 15, 16};

/* The batch's parameters: per-row filters for MATCH_ROWS rows, else the
 * scalars of row MATCH_SCALAR_ROW. */
static psm_params match_params(int32_t order, int per_row)
{
    psm_params params;
    psm_params_init(&params);
    params.filter_order = order;
    params.num_samples = MATCH_SAMPLES;
    params.seed = 99;
    params.temperature = match_temperatures[MATCH_SCALAR_ROW];
    params.top_k = match_top_ks[MATCH_SCALAR_ROW];
    params.top_p = match_top_ps[MATCH_SCALAR_ROW];
    params.min_p = match_min_ps[MATCH_SCALAR_ROW];
    if (per_row) {
        params.temperature_per_row = match_temperatures;
        params.top_k_per_row = match_top_ks;
        params.top_p_per_row = match_top_ps;
        params.min_p_per_row = match_min_ps;
        params.seed_per_row = match_seeds;
    }
    return params;
}

/* Samples and probs of `tensor` on both contexts, compared. Returns 0 when
 * the tested backend refused the order (a skip is recorded). */
static int match_cpu(psm_context *tested, psm_context *cpu, psm_backend backend,
                     const char *label, const psm_tensor *tensor, const psm_params *params)
{
    const char *test = "each_order_draws_the_cpu_tokens";
    const int64_t rows = tensor->rows, vocab = tensor->vocab;
    const size_t draws = (size_t)(rows * params->num_samples);
    int32_t *tokens = psm_test_alloc(draws, sizeof *tokens);
    int32_t *cpu_tokens = psm_test_alloc(draws, sizeof *cpu_tokens);
    float *logprobs = psm_test_alloc(draws, sizeof *logprobs);
    float *cpu_logprobs = psm_test_alloc(draws, sizeof *cpu_logprobs);
    float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof *probs);
    float *cpu_probs = psm_test_alloc((size_t)(rows * vocab), sizeof *cpu_probs);
    for (size_t i = 0; i < draws; ++i)
        tokens[i] = MATCH_SENTINEL;
    const char *order = order_names[params->filter_order];
    int ran = psm_test_feature_ran(tested, backend,
                                   psm_sample(tested, tensor, params, psm_test_output(tokens),
                                              psm_test_output(logprobs)),
                                   test, "filter orders", tokens, draws, MATCH_SENTINEL);
    if (ran) {
        PSM_CHECK_OK(psm_sample(cpu, tensor, params, psm_test_output(cpu_tokens),
                                psm_test_output(cpu_logprobs)));
        for (size_t i = 0; i < draws; ++i) {
            const int64_t row = (int64_t)i / params->num_samples;
            ck_assert_msg(tokens[i] == cpu_tokens[i],
                          "%s, %s, row %lld sample %lld: token %d, the CPU backend's %d", label,
                          order, (long long)row, (long long)(i % (size_t)params->num_samples),
                          tokens[i], cpu_tokens[i]);
            ck_assert_msg(fabsf(logprobs[i] - cpu_logprobs[i]) <= 1e-5f,
                          "%s, %s, row %lld: logprob %.9g, the CPU backend's %.9g", label, order,
                          (long long)row, (double)logprobs[i], (double)cpu_logprobs[i]);
        }
        psm_tensor probs_tensor = psm_test_tensor(probs, PSM_DTYPE_F32, rows, vocab, 0);
        psm_tensor cpu_probs_tensor = psm_test_tensor(cpu_probs, PSM_DTYPE_F32, rows, vocab, 0);
        PSM_CHECK_OK(psm_probs(tested, tensor, params, &probs_tensor));
        PSM_CHECK_OK(psm_synchronize(tested));
        PSM_CHECK_OK(psm_probs(cpu, tensor, params, &cpu_probs_tensor));
        for (int64_t i = 0; i < rows * vocab; ++i) {
            const float got = probs[i], want = cpu_probs[i];
            ck_assert_msg((got > 0.0f) == (want > 0.0f) &&
                              fabsf(got - want) <= 1e-5f * fmaxf(got, want),
                          "%s, %s, row %lld: probs[%lld] = %.9g, the CPU backend's %.9g", label,
                          order, (long long)(i / vocab), (long long)(i % vocab), (double)got,
                          (double)want);
        }
    }
    free(cpu_probs);
    free(probs);
    free(cpu_logprobs);
    free(logprobs);
    free(cpu_tokens);
    free(tokens);
    return ran;
}

/* Normal rows (sigma 2), every 13th token of row 0 masked, row 3 coarse
 * (rounded to 1/4: ties at every boundary). */
static void fill_match_rows(float *logits, int64_t rows, int64_t vocab, psm_test_rng *rng)
{
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < vocab; ++i) {
            double x = 2.0 * psm_test_rng_normal(rng);
            logits[r * vocab + i] = r == 0 && i % 13 == 5 ? -INFINITY
                                    : r == 3            ? (float)(round(4.0 * x) / 4.0)
                                                        : (float)x;
        }
}

PSM_PROPERTY(each_order_draws_the_cpu_tokens)
{
    const int64_t vocab = 5000;
    psm_test_rng rng = psm_test_rng_make(44);
    float *logits = psm_test_alloc((size_t)(MATCH_ROWS * vocab), sizeof *logits);
    uint16_t *brain = psm_test_alloc((size_t)(MATCH_ROWS * vocab), sizeof *brain);
    fill_match_rows(logits, MATCH_ROWS, vocab, &rng);
    /* bf16 by truncation: coarse values, many ties. */
    for (int64_t i = 0; i < MATCH_ROWS * vocab; ++i) {
        uint32_t bits;
        memcpy(&bits, &logits[i], sizeof bits);
        brain[i] = (uint16_t)(bits >> 16);
    }
    const psm_tensor f32 = psm_test_tensor(logits, PSM_DTYPE_F32, MATCH_ROWS, vocab, 0);
    const psm_tensor bf16 = psm_test_tensor(brain, PSM_DTYPE_BF16, MATCH_ROWS, vocab, 0);

    /* Logit processing: a history (penalised by frequency and repetition) and
     * a bias per row. */
    int64_t history_offsets[MATCH_ROWS + 1], bias_offsets[MATCH_ROWS + 1];
    int32_t history_tokens[MATCH_ROWS * 4], bias_tokens[MATCH_ROWS * 2];
    float bias_values[MATCH_ROWS * 2];
    for (int r = 0; r <= MATCH_ROWS; ++r) {
        history_offsets[r] = 4 * r;
        bias_offsets[r] = 2 * r;
    }
    for (int e = 0; e < MATCH_ROWS * 4; ++e)
        history_tokens[e] = (int32_t)psm_test_rng_below(&rng, (uint64_t)vocab);
    for (int e = 0; e < MATCH_ROWS * 2; ++e) {
        bias_tokens[e] = (int32_t)psm_test_rng_below(&rng, (uint64_t)vocab);
        bias_values[e] = e % 2 ? -3.0f : 6.0f;
    }
    psm_logit_processing processing;
    psm_logit_processing_init(&processing);
    processing.history_offsets = history_offsets;
    processing.history_tokens = history_tokens;
    processing.bias_offsets = bias_offsets;
    processing.bias_tokens = bias_tokens;
    processing.bias_values = bias_values;
    processing.frequency_penalty = 0.5f;
    processing.repetition_penalty = 1.3f;

    /* One long row, coarse like row 3, with its scalar parameters. */
    const int64_t long_vocab = 151936;
    float *long_row = psm_test_alloc((size_t)long_vocab, sizeof *long_row);
    for (int64_t i = 0; i < long_vocab; ++i)
        long_row[i] = (float)(round(8.0 * psm_test_rng_normal(&rng)) / 4.0);
    const psm_tensor long_f32 = psm_test_tensor(long_row, PSM_DTYPE_F32, 1, long_vocab, 0);

    psm_context *tested = psm_test_open(backend);
    psm_context *cpu = psm_test_open_threads(PSM_BACKEND_CPU, 1);
    int ran = 1;
    for (int32_t order = 1; order < PSM_FILTER_ORDER_COUNT && ran; ++order) {
        psm_params params = match_params(order, 1);
        ran = match_cpu(tested, cpu, backend, "f32 batch", &f32, &params) &&
              match_cpu(tested, cpu, backend, "bf16 batch", &bf16, &params);
        if (!ran)
            break;
        params.processing = &processing;
        ran = match_cpu(tested, cpu, backend, "processed batch", &f32, &params);
        params = match_params(order, 0);
        ran = ran && match_cpu(tested, cpu, backend, "long row", &long_f32, &params);
    }
    psm_context_destroy(cpu);
    psm_context_destroy(tested);
    free(long_row);
    free(brain);
    free(logits);
}
END_TEST

/* ---- refusals ------------------------------------------------------------------- */

START_TEST(bad_filter_orders_are_refused)
{
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    const float logits[4] = {0, 1, 2, 3};
    int32_t tokens[1] = {-7};
    float probs[4] = {SENTINEL_PROB, SENTINEL_PROB, SENTINEL_PROB, SENTINEL_PROB};
    const int32_t bad[] = {-1, PSM_FILTER_ORDER_COUNT, 1000};
    for (size_t b = 0; b < sizeof bad / sizeof bad[0]; ++b) {
        psm_params params;
        psm_params_init(&params);
        params.filter_order = bad[b];
        ck_assert_int_eq(psm_test_sample_f32(context, logits, 1, 4, &params, tokens, NULL),
                         PSM_ERR_INVALID_ARGUMENT);
        ck_assert_msg(strstr(psm_last_error(), "filter_order") != NULL, "message: %s",
                      psm_last_error());
        ck_assert_int_eq(psm_test_probs_f32(context, logits, 1, 4, &params, probs),
                         PSM_ERR_INVALID_ARGUMENT);
        ck_assert_int_eq(tokens[0], -7);
        for (int i = 0; i < 4; ++i)
            ck_assert(probs[i] == SENTINEL_PROB);
    }
    psm_context_destroy(context);
}
END_TEST

int main(void)
{
    psm_test_register_common(bad_filter_orders_are_refused);
    psm_test_register_property(each_order_keeps_its_own_set);
    psm_test_register_property(llama_cpp_sampler_expectations);
    psm_test_register_property(llama_cpp_sampler_queue_expectations);
    psm_test_register_property(orders_match_the_reference);
    psm_test_register_property(each_search_path_matches_the_reference);
    psm_test_register_property(each_order_draws_the_cpu_tokens);
    return psm_test_run("test_filter_orders");
}
