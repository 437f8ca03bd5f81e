/* psm_reference.c: the float64 reference distribution (psm_reference.h). */
#include "psm_reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

psm_ref_params psm_ref_params_plain(void)
{
    psm_ref_params params = {1.0f, 0, 1.0f, 0.0f};
    return params;
}

/* The contract reads magnitudes below 2^-64 (and -0) as +0; only ties
 * between such values can notice, but the reference follows the reading. */
static double read_logit(float x)
{
    return fabs((double)x) < 0x1p-64 ? 0.0 : (double)x;
}

typedef struct ranked_token {
    double logit;
    int64_t index;
} ranked_token;

/* Most probable first: higher logit, then lower index. */
static int compare_rank(const void *left, const void *right)
{
    const ranked_token *a = left, *b = right;
    if (a->logit != b->logit)
        return a->logit > b->logit ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

/* The valid tokens in rank order into ranked (room for all of them);
 * returns how many. */
static int64_t rank_valid_tokens(const float *logits, int64_t vocab, ranked_token *ranked)
{
    int64_t count = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        if (isfinite(logits[i])) {
            ranked[count].logit = read_logit(logits[i]);
            ranked[count].index = i;
            ++count;
        }
    }
    qsort(ranked, (size_t)count, sizeof *ranked, compare_rank);
    return count;
}

/* Scales the kept weights to sum to 1. */
static void normalise(double *probs, int64_t vocab)
{
    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        total += probs[i];
    for (int64_t i = 0; i < vocab; ++i)
        probs[i] /= total;
}

static int row_is_bad(const float *logits, int64_t vocab)
{
    int64_t finite = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        if (isnan(logits[i]) || (isinf(logits[i]) && logits[i] > 0))
            return 1;
        finite += isfinite(logits[i]) ? 1 : 0;
    }
    return finite == 0;
}

int64_t psm_ref_argmax(const float *logits, int64_t vocab)
{
    if (row_is_bad(logits, vocab))
        return -1;
    int64_t best = -1;
    for (int64_t i = 0; i < vocab; ++i) {
        if (!isfinite(logits[i]))
            continue;
        if (best < 0 || read_logit(logits[i]) > read_logit(logits[best]))
            best = i;
    }
    return best;
}

/* ---- the engines' filter orders ------------------------------------------ *
 * Each filter reads the ranked valid tokens (most probable first), the set
 * it may keep (`pool`, one flag per rank) and each token's weight relative
 * to the top token at the filter temperature, and writes the set it keeps
 * (`kept`, a subset of pool). The orders chain or intersect them as each
 * engine does (docs/SAMPLING.md, section 4, "Filter orders"). */

/* The first k of the pool; with ties, also the later ones whose logit
 * equals the k-th one's. Off unless 0 < k < the pool's size. */
static void filter_top_k(const ranked_token *ranked, int64_t count, const unsigned char *pool,
                         int32_t k, int ties, unsigned char *kept)
{
    int64_t size = 0;
    for (int64_t r = 0; r < count; ++r) {
        kept[r] = pool[r];
        size += pool[r];
    }
    if (!(k > 0 && k < size))
        return;
    int64_t seen = 0;
    double boundary = 0.0;
    for (int64_t r = 0; r < count; ++r) {
        if (!pool[r])
            continue;
        if (seen < k) {
            if (++seen == k)
                boundary = ranked[r].logit;
        } else {
            kept[r] = ties && ranked[r].logit == boundary;
        }
    }
}

/* A token of the pool stays while the pool's weight ranked before it is
 * below p' Z (at most p' Z with at_most), Z the pool's weight and p' the
 * probability truncated to 32 fraction bits; with ties, the later tokens
 * whose logit equals the last kept one's stay too. */
static void filter_top_p(const ranked_token *ranked, int64_t count, const unsigned char *pool,
                         const double *weight, float top_p, int at_most, int ties,
                         unsigned char *kept)
{
    double total = 0.0;
    for (int64_t r = 0; r < count; ++r) {
        kept[r] = pool[r];
        total += pool[r] ? weight[r] : 0.0;
    }
    if (!(top_p < 1.0f))
        return;
    double limit = floor((double)top_p * 0x1p32) * 0x1p-32 * total;
    double before = 0.0, last_kept = 0.0;
    int any_kept = 0;
    for (int64_t r = 0; r < count; ++r) {
        if (!pool[r])
            continue;
        int keep = at_most ? before <= limit : before < limit;
        if (!keep && ties && any_kept && ranked[r].logit == last_kept)
            keep = 1;
        kept[r] = (unsigned char)keep;
        if (keep) {
            last_kept = ranked[r].logit;
            any_kept = 1;
        }
        before += weight[r];
    }
}

/* Each token of the pool whose weight is at least min_p; as a prefix, every
 * token of the pool down to the last such one (llama.cpp's logit test). */
static void filter_min_p(int64_t count, const unsigned char *pool, const double *weight,
                         float min_p, int as_prefix, unsigned char *kept)
{
    int64_t last = -1;
    for (int64_t r = 0; r < count; ++r)
        if (pool[r] && weight[r] >= (double)min_p)
            last = r;
    for (int64_t r = 0; r < count; ++r)
        kept[r] = pool[r] && (min_p <= 0.0f || (as_prefix ? r <= last : weight[r] >= (double)min_p));
}

/* probs holds each valid token's weight at the row's temperature; zeroes
 * those of the tokens the order drops. Returns 1, or -1 without memory. */
static int keep_engine_order(const float *logits, int64_t vocab, const psm_ref_params *params,
                             psm_ref_order order, double maximum, int64_t valid, double *probs)
{
    ranked_token *ranked = calloc((size_t)valid, sizeof *ranked);
    double *weight = calloc((size_t)valid, sizeof *weight);
    unsigned char *sets = calloc((size_t)valid, 4);
    if (!ranked || !weight || !sets) {
        free(ranked);
        free(weight);
        free(sets);
        return -1;
    }
    int64_t count = rank_valid_tokens(logits, vocab, ranked);
    double filter_temperature =
        order == PSM_REF_ORDER_LLAMA_CPP ? 1.0 : (double)params->temperature;
    for (int64_t r = 0; r < count; ++r)
        weight[r] = exp((ranked[r].logit - maximum) / filter_temperature);

    unsigned char *all = sets, *a = sets + count, *b = sets + 2 * count, *c = sets + 3 * count;
    memset(all, 1, (size_t)count);
    const int32_t k = params->top_k;
    const float p = params->top_p, min_p = params->min_p;
    switch (order) {
    case PSM_REF_ORDER_VLLM: /* min-p, top-k (ties kept), top-p over what is left */
        filter_min_p(count, all, weight, min_p, 0, a);
        filter_top_k(ranked, count, a, k, 1, b);
        filter_top_p(ranked, count, b, weight, p, 0, 0, c);
        break;
    case PSM_REF_ORDER_LLAMA_CPP: /* top-k, top-p, min-p at temperature 1 */
        filter_top_k(ranked, count, all, k, 0, a);
        filter_top_p(ranked, count, a, weight, p, 0, 0, b);
        filter_min_p(count, b, weight, min_p, 1, c);
        break;
    case PSM_REF_ORDER_FLASHINFER_TOP_K_FIRST: /* top-k, top-p over it, ties kept; min-p */
        filter_top_k(ranked, count, all, k, 1, a);
        filter_top_p(ranked, count, a, weight, p, 0, 1, b);
        filter_min_p(count, b, weight, min_p, 0, c);
        break;
    default: {
        /* SGLang and FlashInfer's joint order: each filter on the whole
         * distribution. SGLang's top-p keeps a token whose preceding mass is
         * p' Z exactly, and breaks ties by position; FlashInfer's thresholds
         * keep ties. */
        int ties = order == PSM_REF_ORDER_FLASHINFER_JOINT;
        filter_top_k(ranked, count, all, k, ties, a);
        filter_top_p(ranked, count, all, weight, p, order == PSM_REF_ORDER_SGLANG, ties, b);
        filter_min_p(count, all, weight, min_p, 0, c);
        for (int64_t r = 0; r < count; ++r)
            c[r] = a[r] && b[r] && c[r];
        break;
    }
    }
    for (int64_t r = 0; r < count; ++r)
        if (!c[r])
            probs[ranked[r].index] = 0.0;
    free(ranked);
    free(weight);
    free(sets);
    return 1;
}

int psm_ref_distribution(const float *logits, int64_t vocab, const psm_ref_params *params,
                         double *probs)
{
    return psm_ref_distribution_ordered(logits, vocab, params, PSM_REF_ORDER_POLYSAMPLE, probs);
}

int psm_ref_distribution_ordered(const float *logits, int64_t vocab, const psm_ref_params *params,
                                 psm_ref_order order, double *probs)
{
    if (row_is_bad(logits, vocab)) {
        for (int64_t i = 0; i < vocab; ++i)
            probs[i] = NAN;
        return 0;
    }
    for (int64_t i = 0; i < vocab; ++i)
        probs[i] = 0.0;
    if (params->temperature < 1e-5f) {
        probs[psm_ref_argmax(logits, vocab)] = 1.0;
        return 1;
    }

    double maximum = -INFINITY;
    int64_t valid = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        if (isfinite(logits[i])) {
            ++valid;
            if (read_logit(logits[i]) > maximum)
                maximum = read_logit(logits[i]);
        }
    }
    /* Unnormalised weights relative to the top token (which weighs 1);
     * probs holds them until the final normalisation. */
    double temperature = params->temperature;
    for (int64_t i = 0; i < vocab; ++i)
        probs[i] = isfinite(logits[i]) ? exp((read_logit(logits[i]) - maximum) / temperature)
                                       : 0.0;

    if (order != PSM_REF_ORDER_POLYSAMPLE) {
        int status = keep_engine_order(logits, vocab, params, order, maximum, valid, probs);
        if (status == 1)
            normalise(probs, vocab);
        return status;
    }

    int top_k_on = params->top_k > 0 && params->top_k < valid;
    int top_p_on = params->top_p < 1.0f;
    if (top_k_on || top_p_on) {
        ranked_token *ranked = calloc((size_t)valid, sizeof *ranked);
        if (!ranked)
            return -1;
        rank_valid_tokens(logits, vocab, ranked);
        int64_t candidates = top_k_on ? params->top_k : valid;
        if (top_p_on) {
            /* p truncated to 32 fraction bits, as the contract defines p'. */
            double p = floor((double)params->top_p * 0x1p32) * 0x1p-32;
            double mass = 0.0;
            for (int64_t r = 0; r < candidates; ++r)
                mass += probs[ranked[r].index];
            double target = p * mass;
            double running = 0.0;
            int64_t prefix = 0;
            while (prefix < candidates) {
                running += probs[ranked[prefix].index];
                ++prefix;
                if (running >= target)
                    break;
            }
            candidates = prefix;
        }
        for (int64_t r = candidates; r < valid; ++r)
            probs[ranked[r].index] = 0.0;
        free(ranked);
    }
    if (params->min_p > 0.0f) {
        for (int64_t i = 0; i < vocab; ++i)
            if (probs[i] < (double)params->min_p)
                probs[i] = 0.0;
    }

    normalise(probs, vocab);
    return 1;
}

int psm_ref_process_row(const float *logits, int64_t vocab, const psm_ref_processing *processing,
                        float *out)
{
    double *value = malloc((size_t)vocab * sizeof *value);
    int64_t *count = calloc((size_t)vocab, sizeof *count);
    unsigned char *in_prompt = calloc((size_t)vocab, 1);
    if (!value || !count || !in_prompt) {
        free(value);
        free(count);
        free(in_prompt);
        return -1;
    }
    for (int64_t e = 0; e < processing->history_count; ++e)
        count[processing->history[e]]++;
    for (int64_t e = 0; e < processing->prompt_count; ++e)
        in_prompt[processing->prompt[e]] = 1;
    const double r = processing->repetition;
    for (int64_t i = 0; i < vocab; ++i) {
        double x = isnan(logits[i]) || isinf(logits[i]) ? (double)logits[i] : read_logit(logits[i]);
        if (count[i] > 0 || in_prompt[i]) {
            if (r != 1.0)
                x = x > 0.0 ? x / r : x * r;
            if (count[i] > 0)
                x = x - (double)processing->frequency * (double)count[i] -
                    (double)processing->presence;
        }
        value[i] = x;
    }
    for (int64_t e = 0; e < processing->bias_count; ++e)
        value[processing->bias_tokens[e]] += (double)processing->bias_values[e];
    for (int64_t i = 0; i < vocab; ++i) {
        float x = (float)value[i];
        int allowed = !processing->allowed_mask ||
                      ((processing->allowed_mask[i / 32] >> (i % 32)) & 1u);
        /* A mask hides a valid logit only: NaN and +inf keep the row bad. */
        if (!allowed && !isnan(x) && !(isinf(x) && x > 0))
            x = -INFINITY;
        out[i] = isfinite(x) ? (float)read_logit(x) : x;
    }
    free(value);
    free(count);
    free(in_prompt);
    return 1;
}
