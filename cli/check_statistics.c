/* check_statistics.c: the chi-square tests of `polysample check`: many
 * draws of one row on the CPU backend against the float64 reference
 * distribution (reference/psm_reference.h; with logit processing, of the
 * row as the reference processes it), and psm_probs' distance from it. */
#include "check.h"
#include "cli_util.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Upper 0.1% point of chi-square with df degrees of freedom, by the
 * Wilson-Hilferty cube approximation (accurate to well under 1% here). */
static double chi_square_critical(int df)
{
    const double z = 3.090232306167813; /* standard normal upper 0.1% point */
    double a = 2.0 / (9.0 * df);
    double cube = 1.0 - a + z * sqrt(a);
    return df * cube * cube * cube;
}

/* One row's processing lists for the library (offsets {0, count}) and for
 * the reference. */
typedef struct row_processing {
    uint32_t *mask;
    int32_t bias_tokens[CHECK_MAX_BIAS], history[CHECK_MAX_HISTORY], prompt[CHECK_MAX_PROMPT];
    float bias_values[CHECK_MAX_BIAS];
    int64_t bias_offsets[2], history_offsets[2], prompt_offsets[2];
    psm_logit_processing library;
    psm_ref_processing reference;
} row_processing;

/* Penalties of the processed chi-square test. */
#define CHI_REPETITION 1.3f
#define CHI_FREQUENCY 0.5f
#define CHI_PRESENCE 0.4f

static int make_row_processing(row_processing *lists, int64_t vocab, uint64_t seed)
{
    lists->mask = malloc((size_t)((vocab + 31) / 32) * sizeof(uint32_t));
    if (!lists->mask)
        return -1;
    lists->bias_offsets[0] = lists->history_offsets[0] = lists->prompt_offsets[0] = 0;
    check_make_row_lists(seed, 0, vocab, lists->mask, lists->bias_tokens, lists->bias_values,
                         &lists->bias_offsets[1], lists->history, &lists->history_offsets[1],
                         lists->prompt, &lists->prompt_offsets[1]);
    psm_logit_processing_init(&lists->library);
    lists->library.allowed_mask = lists->mask;
    lists->library.bias_offsets = lists->bias_offsets;
    lists->library.bias_tokens = lists->bias_tokens;
    lists->library.bias_values = lists->bias_values;
    lists->library.history_offsets = lists->history_offsets;
    lists->library.history_tokens = lists->history;
    lists->library.prompt_offsets = lists->prompt_offsets;
    lists->library.prompt_tokens = lists->prompt;
    lists->library.repetition_penalty = CHI_REPETITION;
    lists->library.frequency_penalty = CHI_FREQUENCY;
    lists->library.presence_penalty = CHI_PRESENCE;
    lists->reference.allowed_mask = lists->mask;
    lists->reference.history = lists->history;
    lists->reference.history_count = lists->history_offsets[1];
    lists->reference.prompt = lists->prompt;
    lists->reference.prompt_count = lists->prompt_offsets[1];
    lists->reference.bias_tokens = lists->bias_tokens;
    lists->reference.bias_values = lists->bias_values;
    lists->reference.bias_count = lists->bias_offsets[1];
    lists->reference.repetition = CHI_REPETITION;
    lists->reference.frequency = CHI_FREQUENCY;
    lists->reference.presence = CHI_PRESENCE;
    return 0;
}

int check_chi_square(const double *probs, const uint64_t *counts, int64_t vocab, int64_t draws,
                     double *statistic, int *degrees, double *critical)
{
    double pooled_expected = 0.0, pooled_observed = 0.0;
    int64_t i;
    int bins = 0;
    *statistic = 0.0;
    /* Bins with an expected count below 5 are pooled into one, as the
     * chi-square approximation needs. */
    for (i = 0; i < vocab; ++i) {
        double e = probs[i] * (double)draws;
        if (e >= 5.0) {
            double d = (double)counts[i] - e;
            *statistic += d * d / e;
            ++bins;
        } else {
            pooled_expected += e;
            pooled_observed += (double)counts[i];
        }
    }
    if (pooled_expected > 0.0) {
        if (pooled_expected >= 5.0 || pooled_observed > 0.0) {
            double d = pooled_observed - pooled_expected;
            *statistic += d * d / (pooled_expected > 1e-300 ? pooled_expected : 1e-300);
            ++bins;
        }
    }
    *degrees = bins - 1;
    *critical = chi_square_critical(bins > 1 ? bins - 1 : 1);
    return bins > 1 ? *statistic <= *critical : 1;
}

static int chi_square_test(psm_context *context, const parameter_set *set, int64_t vocab,
                           int64_t draws, uint64_t seed)
{
    row_processing lists = {.mask = NULL};
    float *processed = NULL;
    float *logits = malloc((size_t)vocab * sizeof *logits);
    float *probs = malloc((size_t)vocab * sizeof *probs);
    double *expected = malloc((size_t)vocab * sizeof *expected);
    uint64_t *counts = calloc((size_t)vocab, sizeof *counts);
    int32_t *tokens = malloc((size_t)draws * sizeof *tokens);
    psm_tensor tensor, probs_tensor;
    psm_params params;
    psm_ref_params reference;
    psm_output token_output = {NULL, PSM_MEMORY_HOST}, no_logprobs = {NULL, PSM_MEMORY_HOST};
    psm_status status;
    double statistic = 0.0, distance = 0.0, critical = 0.0;
    int64_t i;
    int degrees = 0, passed = 0, failed_call = 0;

    if (!logits || !probs || !expected || !counts || !tokens ||
        (set->processing != PROCESSING_NONE &&
         (make_row_processing(&lists, vocab, seed) != 0 ||
          !(processed = malloc((size_t)vocab * sizeof *processed))))) {
        cli_error("check", "out of memory for the chi-square test");
        failed_call = 1;
        goto done;
    }
    cli_fill_normal(logits, (size_t)vocab, 2.0f, seed);
    memset(&tensor, 0, sizeof tensor);
    tensor.data = logits;
    tensor.dtype = PSM_DTYPE_F32;
    tensor.memory = PSM_MEMORY_HOST;
    tensor.rows = 1;
    tensor.vocab = vocab;
    probs_tensor = tensor;
    probs_tensor.data = probs;
    psm_params_init(&params);
    params.temperature = set->temperature;
    params.top_k = set->top_k;
    params.top_p = set->top_p;
    params.min_p = set->min_p;
    params.filter_order = set->filter_order;
    params.seed = seed;
    params.num_samples = (int32_t)draws;
    if (set->processing != PROCESSING_NONE)
        params.processing = &lists.library;
    token_output.data = tokens;
    status = psm_sample(context, &tensor, &params, token_output, no_logprobs);
    if (status == PSM_OK)
        status = psm_synchronize(context);
    if (status != PSM_OK) {
        cli_library_error("check", "psm_sample (chi-square)", status);
        failed_call = 1;
        goto done;
    }
    reference.temperature = set->temperature;
    reference.top_k = set->top_k;
    reference.top_p = set->top_p;
    reference.min_p = set->min_p;
    if ((processed && psm_ref_process_row(logits, vocab, &lists.reference, processed) != 1) ||
        psm_ref_distribution_ordered(processed ? processed : logits, vocab, &reference,
                                     (psm_ref_order)set->filter_order, expected) != 1) {
        cli_error("check", "out of memory for the float64 reference");
        failed_call = 1;
        goto done;
    }
    for (i = 0; i < draws; ++i) {
        if (tokens[i] < 0 || tokens[i] >= vocab) {
            printf("  %-28s token %d out of range\n", set->name, (int)tokens[i]);
            failed_call = 1;
            goto done;
        }
        counts[tokens[i]]++;
    }
    passed = check_chi_square(expected, counts, vocab, draws, &statistic, &degrees, &critical);

    status = psm_probs(context, &tensor, &params, &probs_tensor);
    if (status == PSM_OK)
        status = psm_synchronize(context);
    if (status != PSM_OK) {
        cli_library_error("check", "psm_probs (precision)", status);
        failed_call = 1;
        goto done;
    }
    for (i = 0; i < vocab; ++i)
        distance += fabs((double)probs[i] - expected[i]);
    distance *= 0.5;
    printf("  %-24s vocab %-6lld chi2 %10.2f  df %5d  critical(0.001) %9.2f  %s   "
           "TV(psm_probs, f64) %.2e\n",
           set->name, (long long)vocab, statistic, degrees, critical, passed ? "pass" : "FAIL",
           distance);

done:
    free(lists.mask);
    free(processed);
    free(logits);
    free(probs);
    free(expected);
    free(counts);
    free(tokens);
    return failed_call ? -1 : (passed ? 0 : 1);
}


int check_run_chi_square_tests(psm_context *context, int64_t draws, uint64_t seed)
{
    static const parameter_set chi_sets[] = {
        {"plain T=1", 1.0f, 0, 1.0f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
        {"T=0.7 top-k 50", 0.7f, 50, 1.0f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0,
         0, 0},
        {"top-p 0.9", 1.0f, 0, 0.9f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
        {"T=1.3 min-p 0.05", 1.3f, 0, 1.0f, 0.05f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE,
         0, 0, 0},
        {"T=0.8 k100 p0.95 minp0.01", 0.8f, 100, 0.95f, 0.01f, 1, 0, 0, REQUEST_STATE_NONE,
         PROCESSING_NONE, 0, 0, 0},
        /* A mask, a bias list, a history with repeats and a prompt;
         * repetition 1.3, frequency 0.5, presence 0.4. */
        {"processed T=0.9 p0.95", 0.9f, 0, 0.95f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE,
         PROCESSING_SCALAR_PENALTIES, 0, 0, 0},
        /* Each filter order other than the default (fi: FlashInfer), at
         * T 0.7 with top-k 100, top-p 0.8 and min-p 0.02, so that the order
         * decides the kept set, against psm_ref_distribution_ordered. */
        {"order vllm", 0.7f, 100, 0.8f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE,
         PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_VLLM},
        {"order sglang", 0.7f, 100, 0.8f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE,
         PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_SGLANG},
        {"order llama.cpp", 0.7f, 100, 0.8f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE,
         PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_LLAMA_CPP},
        {"order fi-top-k-first", 0.7f, 100, 0.8f, 0.02f, 1, 0, 0,
         REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST},
        {"order fi-joint", 0.7f, 100, 0.8f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE,
         PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_FLASHINFER_JOINT},
    };
    static const int64_t chi_vocabs[] = {5000, 32000, 5000, 5000, 32000, 5000,
                                         5000, 5000, 5000, 5000, 5000};
    _Static_assert(sizeof chi_vocabs / sizeof chi_vocabs[0] == sizeof chi_sets / sizeof chi_sets[0],
                   "a vocab for every chi-square setting");
    int t, failures = 0;
    printf("\nchi-square vs float64 softmax, %lld draws each, CPU backend (alpha 0.001):\n",
           (long long)draws);
    for (t = 0; t < (int)(sizeof chi_sets / sizeof chi_sets[0]); ++t) {
        int outcome = chi_square_test(context, &chi_sets[t], chi_vocabs[t], draws,
                                      cli_random_u64(seed ^ 0xc41u, (uint64_t)t));
        if (outcome != 0)
            failures++;
    }
    return failures;
}
