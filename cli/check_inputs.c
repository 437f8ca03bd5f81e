/* check_inputs.c: the inputs of one `polysample check` case: random logits
 * with the edges every backend must handle (ties, masked tokens, bad rows,
 * padding between rows), the per-row parameters and seeds, the request
 * state (per-row offsets, subsequences, row indices, seed and offset by
 * pointer), and logit processing (a mask, a bias list, a history and a
 * prompt per row, with the penalties). */
#include "check.h"
#include "cli_util.h"
#include "psm_reference.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static float element_as_float(const void *data, psm_dtype dtype, size_t index)
{
    if (dtype == PSM_DTYPE_F32)
        return ((const float *)data)[index];
    if (dtype == PSM_DTYPE_F16)
        return cli_f16_to_float(((const uint16_t *)data)[index]);
    return cli_bf16_to_float(((const uint16_t *)data)[index]);
}

void check_free_inputs(case_inputs *inputs)
{
    free(inputs->values);
    free(inputs->logits);
    free(inputs->temperature);
    free(inputs->top_k);
    free(inputs->top_p);
    free(inputs->min_p);
    free(inputs->seeds);
    free(inputs->offsets);
    free(inputs->subsequences);
    free(inputs->row_indices);
    free(inputs->mask);
    cli_row_lists_free(&inputs->bias);
    cli_row_lists_free(&inputs->history);
    cli_row_lists_free(&inputs->prompt);
    free(inputs->repetition);
    free(inputs->frequency);
    free(inputs->presence);
    free(inputs->processed);
    memset(inputs, 0, sizeof *inputs);
}

/* Streams of the random source for the processing lists. */
#define LISTS_STREAM 0x4c49535453ull /* "LISTS" */
#define PENALTY_STREAM 0x50454e414c5459ull /* "PENALTY" */

void check_make_row_lists(uint64_t seed, uint64_t row, int64_t vocab, uint32_t *mask,
                          int32_t *bias_tokens, float *bias_values, int64_t *bias_count,
                          int32_t *history, int64_t *history_count, int32_t *prompt,
                          int64_t *prompt_count)
{
    /* Each row's words come from its own counters: word k of row r is
     * counter r * 2^20 + k (a row uses fewer than 2^20 words). */
    uint64_t next = row << 20;
    const int64_t words = (vocab + 31) / 32;
    int32_t pool[48];
    int64_t e, w;
#define WORD() cli_random_u64(seed ^ LISTS_STREAM, next++)
#define TOKEN() ((int32_t)(WORD() % (uint64_t)vocab))
    for (w = 0; w < words; ++w)
        mask[w] = (uint32_t)WORD();
    for (e = 0; e < 48; ++e)
        pool[e] = TOKEN();
    *bias_count = 16 + (int64_t)(WORD() % (CHECK_MAX_BIAS - 16 + 1));
    for (e = 0; e < *bias_count; ++e) {
        /* Every eighth entry repeats an earlier token: entries of one token
         * add in list order. */
        bias_tokens[e] = e % 8 == 7 ? bias_tokens[e / 2] : TOKEN();
        bias_values[e] = (float)(10.0 * cli_random_unit(seed ^ LISTS_STREAM, next++) - 5.0);
    }
    *history_count = 200 + (int64_t)(WORD() % (CHECK_MAX_HISTORY - 200 + 1));
    for (e = 0; e < *history_count; ++e) {
        uint64_t word = WORD();
        /* Three in four from the pool: a token is often repeated. */
        history[e] = (word & 3u) ? pool[(word >> 2) % 48] : (int32_t)((word >> 8) % (uint64_t)vocab);
    }
    *prompt_count = 30 + (int64_t)(WORD() % (CHECK_MAX_PROMPT - 30 + 1));
    for (e = 0; e < *prompt_count; ++e)
        prompt[e] = (e & 1) ? pool[WORD() % 48] : TOKEN();
#undef WORD
#undef TOKEN
}

/* The processing lists of every output row, their penalties, and each
 * output row's logits as the float64 reference processes them (for the
 * checks of the tokens). 0, or -1 when out of memory. */
static int make_processing(const check_batch *shape, const parameter_set *set, uint64_t seed,
                           case_inputs *inputs)
{
    const size_t outputs = (size_t)inputs->output_rows, vocab = (size_t)shape->vocab;
    const int64_t words = (shape->vocab + 31) / 32;
    psm_logit_processing *p = &inputs->processing;
    size_t r;
    cli_row_lists *bias = &inputs->bias, *history = &inputs->history, *prompt = &inputs->prompt;
    inputs->mask = malloc(outputs * (size_t)words * sizeof(uint32_t));
    bias->offsets = calloc(outputs + 1, sizeof(int64_t));
    history->offsets = calloc(outputs + 1, sizeof(int64_t));
    prompt->offsets = calloc(outputs + 1, sizeof(int64_t));
    bias->tokens = malloc(outputs * CHECK_MAX_BIAS * sizeof(int32_t));
    bias->values = malloc(outputs * CHECK_MAX_BIAS * sizeof(float));
    history->tokens = malloc(outputs * CHECK_MAX_HISTORY * sizeof(int32_t));
    prompt->tokens = malloc(outputs * CHECK_MAX_PROMPT * sizeof(int32_t));
    inputs->processed = malloc(outputs * vocab * sizeof(float));
    if (!inputs->mask || !bias->offsets || !history->offsets || !prompt->offsets ||
        !bias->tokens || !bias->values || !history->tokens || !prompt->tokens ||
        !inputs->processed)
        return -1;
    psm_logit_processing_init(p);
    if (set->processing == PROCESSING_PER_ROW_PENALTIES) {
        inputs->repetition = malloc(outputs * sizeof(float));
        inputs->frequency = malloc(outputs * sizeof(float));
        inputs->presence = malloc(outputs * sizeof(float));
        if (!inputs->repetition || !inputs->frequency || !inputs->presence)
            return -1;
        /* Each penalty off in a third of the rows. */
        for (r = 0; r < outputs; ++r) {
            uint64_t word = cli_random_u64(seed ^ PENALTY_STREAM, r);
            inputs->repetition[r] =
                word % 3u == 0 ? 1.0f
                               : (float)(0.8 + 0.7 * cli_random_unit(seed ^ PENALTY_STREAM ^ 1u, r));
            inputs->frequency[r] =
                (word >> 8) % 3u == 0 ? 0.0f
                                      : (float)(cli_random_unit(seed ^ PENALTY_STREAM ^ 2u, r) - 0.2);
            inputs->presence[r] =
                (word >> 16) % 3u == 0 ? 0.0f
                                       : (float)(1.5 * cli_random_unit(seed ^ PENALTY_STREAM ^ 3u, r) -
                                                 0.3);
        }
        p->repetition_penalty_per_row = inputs->repetition;
        p->frequency_penalty_per_row = inputs->frequency;
        p->presence_penalty_per_row = inputs->presence;
    } else {
        p->repetition_penalty = 1.2f;
        p->frequency_penalty = 0.3f;
        p->presence_penalty = 0.4f;
    }
    for (r = 0; r < outputs; ++r) {
        int64_t bias_count, history_count, prompt_count;
        int64_t logits_row = inputs->row_indices ? inputs->row_indices[r] : (int64_t)r;
        psm_ref_processing row;
        row.allowed_mask = inputs->mask + r * (size_t)words;
        row.bias_tokens = bias->tokens + bias->offsets[r];
        row.bias_values = bias->values + bias->offsets[r];
        row.history = history->tokens + history->offsets[r];
        row.prompt = prompt->tokens + prompt->offsets[r];
        check_make_row_lists(seed, r, shape->vocab, inputs->mask + r * (size_t)words,
                             bias->tokens + bias->offsets[r], bias->values + bias->offsets[r],
                             &bias_count, history->tokens + history->offsets[r], &history_count,
                             prompt->tokens + prompt->offsets[r], &prompt_count);
        bias->offsets[r + 1] = bias->offsets[r] + bias_count;
        history->offsets[r + 1] = history->offsets[r] + history_count;
        prompt->offsets[r + 1] = prompt->offsets[r] + prompt_count;
        row.history_count = history_count;
        row.prompt_count = prompt_count;
        row.bias_count = bias_count;
        row.repetition = inputs->repetition ? inputs->repetition[r] : p->repetition_penalty;
        row.frequency = inputs->frequency ? inputs->frequency[r] : p->frequency_penalty;
        row.presence = inputs->presence ? inputs->presence[r] : p->presence_penalty;
        if (psm_ref_process_row(inputs->values + (size_t)logits_row * vocab, shape->vocab, &row,
                                inputs->processed + r * vocab) != 1)
            return -1;
    }
    p->allowed_mask = inputs->mask;
    p->allowed_mask_words = words;
    cli_attach_row_lists(p, bias, history, prompt);
    return 0;
}

/* Random logits ~ N(0, 2^2), plus rows that exercise the edges: row 0 is
 * quantised to halves (ties everywhere), row 1 masks every 7th token with
 * -inf, and with 8 rows or more row 5 holds a NaN and row 6 is all -inf
 * (bad rows: token -1). With a row stride beyond vocab the padding holds
 * NaN, so a backend that read it would turn a good row bad. */
int check_make_inputs(const check_batch *shape, const parameter_set *set, uint64_t seed,
                      uint64_t offset, case_inputs *inputs)
{
    size_t count = (size_t)shape->rows * (size_t)shape->vocab;
    size_t rows = (size_t)shape->rows, i;
    size_t outputs; /* output rows: the entries of the per-row arrays */
    size_t vocab = (size_t)shape->vocab, stride = (size_t)shape->row_stride;
    size_t element = cli_dtype_size(shape->dtype);
    const float padding = NAN;
    memset(inputs, 0, sizeof *inputs);
    inputs->values = malloc(count * sizeof(float));
    inputs->logits = malloc(rows * stride * element);
    if (!inputs->values || !inputs->logits)
        return -1;
    cli_fill_normal(inputs->values, count, 2.0f, seed);
    if (shape->vocab > 1) {
        for (i = 0; i < (size_t)shape->vocab; ++i)
            inputs->values[i] = 0.5f * roundf(2.0f * inputs->values[i]);
        if (rows > 1)
            for (i = 0; i < (size_t)shape->vocab; i += 7)
                inputs->values[(size_t)shape->vocab + i] = -INFINITY;
    }
    if (rows >= 8) {
        inputs->values[5 * (size_t)shape->vocab + (size_t)shape->vocab / 2] = NAN;
        for (i = 0; i < (size_t)shape->vocab; ++i)
            inputs->values[6 * (size_t)shape->vocab + i] = -INFINITY;
    }
    for (i = 0; i < rows; ++i) {
        char *row = (char *)inputs->logits + i * stride * element;
        size_t pad;
        cli_convert_from_f32(inputs->values + i * vocab, vocab, shape->dtype, row);
        for (pad = vocab; pad < stride; ++pad)
            cli_convert_from_f32(&padding, 1, shape->dtype, row + pad * element);
        /* What the backends see, for the host-side checks below. */
        for (pad = 0; pad < vocab; ++pad)
            inputs->values[i * vocab + pad] = element_as_float(row, shape->dtype, pad);
    }

    /* A gather has half as many rows again as the logits: every logits row
     * is likely to be read several times, some not at all. */
    outputs = set->request_state == REQUEST_STATE_GATHER ? rows + rows / 2 : rows;
    inputs->output_rows = (int64_t)outputs;
    if (set->request_state == REQUEST_STATE_GATHER) {
        inputs->row_indices = malloc(outputs * sizeof(int64_t));
        if (!inputs->row_indices)
            return -1;
        for (i = 0; i < outputs; ++i)
            inputs->row_indices[i] = (int64_t)(cli_random_u64(seed ^ 0x6a7eu, i) % rows);
    }

    if (set->per_row_params) {
        inputs->temperature = malloc(outputs * sizeof(float));
        inputs->top_k = malloc(outputs * sizeof(int32_t));
        inputs->top_p = malloc(outputs * sizeof(float));
        inputs->min_p = malloc(outputs * sizeof(float));
        if (!inputs->temperature || !inputs->top_k || !inputs->top_p || !inputs->min_p)
            return -1;
        for (i = 0; i < outputs; ++i) {
            uint64_t word = cli_random_u64(seed ^ 0x5eedu, i);
            static const int32_t k_choices[] = {0, 1, 2, 5, 50, 1000, 2000000};
            inputs->temperature[i] =
                (word & 15u) == 0 ? 0.0f : 0.3f + 1.2f * (float)cli_random_unit(seed ^ 0x7u, i);
            inputs->top_k[i] = k_choices[(word >> 8) % 7u];
            inputs->top_p[i] = (word >> 16) % 3u == 0 ? 1.0f
                                                       : 0.5f + 0.49f * (float)cli_random_unit(seed ^ 0x9u, i);
            inputs->min_p[i] = (word >> 24) % 3u == 0 ? 0.2f * (float)cli_random_unit(seed ^ 0xbu, i)
                                                       : 0.0f;
        }
    }
    if (set->per_row_seeds) {
        inputs->seeds = malloc(outputs * sizeof(uint64_t));
        if (!inputs->seeds)
            return -1;
        /* Subsequences: n completions of one request, one seed for all. */
        for (i = 0; i < outputs; ++i)
            inputs->seeds[i] = cli_random_u64(
                seed ^ 0xabcdu, set->request_state == REQUEST_STATE_SUBSEQUENCES ? 0 : i);
    }
    if (set->request_state == REQUEST_STATE_OFFSETS ||
        set->request_state == REQUEST_STATE_SUBSEQUENCES) {
        inputs->offsets = malloc(outputs * sizeof(uint64_t));
        if (!inputs->offsets)
            return -1;
        for (i = 0; i < outputs; ++i)
            inputs->offsets[i] = set->request_state == REQUEST_STATE_OFFSETS
                                     ? cli_random_u64(seed ^ 0x0ff5e7u, i)
                                     : offset;
    }
    if (set->request_state == REQUEST_STATE_SUBSEQUENCES) {
        /* With the one seed and one position, each row its own subsequence. */
        inputs->subsequences = malloc(outputs * sizeof(uint32_t));
        if (!inputs->subsequences)
            return -1;
        for (i = 0; i < outputs; ++i)
            inputs->subsequences[i] = (uint32_t)cli_random_u64(seed ^ 0x5b5e9u, i);
    }
    if (set->request_state == REQUEST_STATE_POINTERS) {
        inputs->seed_value = cli_random_u64(seed ^ 0x5eedu, 0);
        inputs->offset_value = offset ^ 0x8000000100000000u;
    }
    if (set->processing != PROCESSING_NONE)
        return make_processing(shape, set, seed, inputs);
    return 0;
}

