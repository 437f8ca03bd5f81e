/* psm_reference.c: the float64 reference distribution (psm_reference.h). */
#include "psm_reference.h"

#include <math.h>
#include <stdlib.h>

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

int psm_ref_distribution(const float *logits, int64_t vocab, const psm_ref_params *params,
                         double *probs)
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

    int top_k_on = params->top_k > 0 && params->top_k < valid;
    int top_p_on = params->top_p < 1.0f;
    if (top_k_on || top_p_on) {
        ranked_token *ranked = calloc((size_t)valid, sizeof *ranked);
        if (!ranked)
            return -1;
        int64_t count = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            if (isfinite(logits[i])) {
                ranked[count].logit = read_logit(logits[i]);
                ranked[count].index = i;
                ++count;
            }
        }
        qsort(ranked, (size_t)valid, sizeof *ranked, compare_rank);
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

    double total = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        total += probs[i];
    for (int64_t i = 0; i < vocab; ++i)
        probs[i] /= total;
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
