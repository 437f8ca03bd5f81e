/* check_inputs.c: the inputs of one `polysample check` case: random logits
 * with the edges every backend must handle (ties, masked tokens, bad rows,
 * padding between rows), the per-row parameters and seeds, and the request
 * state (per-row offsets, subsequences, row indices, seed and offset by
 * pointer). */
#include "check.h"
#include "cli_util.h"

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
    memset(inputs, 0, sizeof *inputs);
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
    return 0;
}

