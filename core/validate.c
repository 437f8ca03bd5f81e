/* validate.c: argument and parameter validation, done once for all backends. */
#include "validate.h"

#include "error.h"
#include "psm_contract.h"
#include "psm_verify.h"

#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <string.h>

static psm_status check_tensor_shape(const char *name, const psm_tensor *tensor,
                                     int data_needed, int64_t *row_stride_out)
{
    if (data_needed && !tensor->data)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "%s.data is NULL", name);
    if ((int)tensor->dtype < PSM_DTYPE_F32 || (int)tensor->dtype > PSM_DTYPE_BF16)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "%s.dtype has the unknown value %d",
                             name, (int)tensor->dtype);
    if ((int)tensor->memory != PSM_MEMORY_HOST && (int)tensor->memory != PSM_MEMORY_DEVICE)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "%s.memory has the unknown value %d",
                             name, (int)tensor->memory);
    if (tensor->rows < 1)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "%s.rows is %lld; expected >= 1", name,
                             (long long)tensor->rows);
    if (tensor->vocab < 1 || tensor->vocab > INT32_MAX)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s.vocab is %lld; expected 1 .. 2^31-1", name,
                             (long long)tensor->vocab);
    int64_t stride = tensor->row_stride == 0 ? tensor->vocab : tensor->row_stride;
    if (stride < tensor->vocab)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s.row_stride is %lld, below vocab %lld (0 means vocab)", name,
                             (long long)tensor->row_stride, (long long)tensor->vocab);
    if (stride > INT64_MAX / 8 / tensor->rows)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s: rows x row_stride (%lld x %lld) is too large", name,
                             (long long)tensor->rows, (long long)stride);
    *row_stride_out = stride;
    return PSM_OK;
}

static psm_status check_scalar(const char *name, float temperature, int32_t top_k,
                               float top_p, float min_p)
{
    if (!(temperature >= 0.0f && temperature <= PSM_MAX_TEMPERATURE))
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "%stemperature is %g; expected 0 .. 1e6 (0 is greedy)", name,
                             (double)temperature);
    if (top_k < 0)
        return psm_set_error(PSM_ERR_INVALID_PARAMETER, "%stop_k is %d; expected >= 0 (0 = off)",
                             name, (int)top_k);
    if (!(top_p > 0.0f && top_p <= 1.0f))
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "%stop_p is %g; expected in (0, 1] (1 = off)", name,
                             (double)top_p);
    if (!(min_p >= 0.0f && min_p <= 1.0f))
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "%smin_p is %g; expected in [0, 1] (0 = off)", name, (double)min_p);
    return PSM_OK;
}

/* Row `row`'s temperature, top-k, top-p and min-p (its host per-row values,
 * else the scalars) go through the scalars' check, so that the message names
 * the row: "row 5: " for a call, "target_params, request 5: " for
 * psm_verify (which, may be NULL; unit "row" or "request"). */
static psm_status check_row_values(const psm_params *params, int64_t row, const char *which,
                                   const char *unit)
{
    float temperature =
        params->temperature_per_row ? params->temperature_per_row[row] : params->temperature;
    int32_t top_k = params->top_k_per_row ? params->top_k_per_row[row] : params->top_k;
    float top_p = params->top_p_per_row ? params->top_p_per_row[row] : params->top_p;
    float min_p = params->min_p_per_row ? params->min_p_per_row[row] : params->min_p;
    if (psm_row_params_valid(temperature, top_k, top_p, min_p))
        return PSM_OK;
    char name[96];
    if (which)
        snprintf(name, sizeof name, "%s, %s %lld: ", which, unit, (long long)row);
    else
        snprintf(name, sizeof name, "%s %lld: ", unit, (long long)row);
    return check_scalar(name, temperature, top_k, top_p, min_p);
}

/* name: "" for a call's psm_params, "target_params." for psm_verify's. */
static psm_status check_filter_order(const char *name, int32_t filter_order)
{
    if (filter_order >= 0 && filter_order < PSM_FILTER_ORDER_COUNT)
        return PSM_OK;
    return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                         "%sfilter_order has the unknown value %d; expected 0 .. %d "
                         "(psm_filter_order)",
                         name, (int)filter_order, PSM_FILTER_ORDER_COUNT - 1);
}

/* Each value of a host per-row array goes through the same check as the
 * scalar, so the message names the array and the row. */
static psm_status check_per_row_arrays(const psm_params *params, int64_t rows,
                                       int64_t logits_rows)
{
    for (int64_t row = 0; row < rows; ++row) {
        if (params->row_indices &&
            !(params->row_indices[row] >= 0 && params->row_indices[row] < logits_rows))
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "row_indices[%lld] is %lld; logits have %lld rows", (long long)row,
                                 (long long)params->row_indices[row], (long long)logits_rows);
        psm_status status = check_row_values(params, row, NULL, "row");
        if (status != PSM_OK)
            return status;
    }
    return PSM_OK;
}

/* A CSR list per row (logit bias, history, prompt): offsets non-decreasing
 * from >= 0, every token id inside the vocab; at most max_per_row entries
 * a row (0: no limit). */
static psm_status check_row_lists(const char *what, const int64_t *offsets, const int32_t *tokens,
                                  const float *values, int64_t rows, int64_t vocab,
                                  int64_t max_per_row)
{
    if (!offsets)
        return PSM_OK;
    if (!tokens)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "processing: %s_offsets without %s_tokens",
                             what, what);
    if (offsets[0] < 0)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "processing: %s_offsets[0] is %lld; "
                             "expected >= 0", what, (long long)offsets[0]);
    for (int64_t row = 0; row < rows; ++row) {
        int64_t begin = offsets[row], end = offsets[row + 1];
        if (end < begin)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "processing: %s_offsets[%lld] = %lld is below %s_offsets[%lld] = "
                                 "%lld",
                                 what, (long long)(row + 1), (long long)end, what, (long long)row,
                                 (long long)begin);
        if (max_per_row && end - begin > max_per_row)
            return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                 "processing: row %lld has %lld %s tokens; at most %lld",
                                 (long long)row, (long long)(end - begin), what,
                                 (long long)max_per_row);
        for (int64_t e = begin; e < end; ++e) {
            if (tokens[e] < 0 || tokens[e] >= vocab)
                return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                     "processing: row %lld: %s_tokens[%lld] is %d; the vocab is "
                                     "%lld",
                                     (long long)row, what, (long long)e, (int)tokens[e],
                                     (long long)vocab);
            if (values && !isfinite(values[e]))
                return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                     "processing: row %lld: %s_values[%lld] is %g; expected finite",
                                     (long long)row, what, (long long)e, (double)values[e]);
        }
    }
    return PSM_OK;
}

static psm_status check_penalties(const char *name, float repetition, float frequency,
                                  float presence)
{
    if (psm_penalties_valid(repetition, frequency, presence))
        return PSM_OK;
    if (!(repetition >= PSM_MIN_REPETITION_PENALTY && repetition <= PSM_MAX_REPETITION_PENALTY))
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "processing: %srepetition_penalty is %g; expected 1e-3 .. 1e3 (1 = off)",
                             name, (double)repetition);
    if (!(frequency >= -PSM_MAX_ADDITIVE_PENALTY && frequency <= PSM_MAX_ADDITIVE_PENALTY))
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "processing: %sfrequency_penalty is %g; expected -1e3 .. 1e3 (0 = off)",
                             name, (double)frequency);
    return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                         "processing: %spresence_penalty is %g; expected -1e3 .. 1e3 (0 = off)",
                         name, (double)presence);
}

/* Logit processing: the struct's shape always; host arrays' contents when
 * they can be read here. */
static psm_status check_processing(const psm_logit_processing *p, int64_t rows, int64_t vocab,
                                   int host_side_arrays)
{
    psm_status status = check_penalties("", p->repetition_penalty, p->frequency_penalty,
                                        p->presence_penalty);
    if (status != PSM_OK)
        return status;
    int64_t words = (vocab + 31) / 32;
    if (p->allowed_mask_words != 0 && p->allowed_mask_words < words)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "processing: allowed_mask_words is %lld; a row of %lld tokens "
                             "needs %lld (0 means that)",
                             (long long)p->allowed_mask_words, (long long)vocab, (long long)words);
    if (p->allowed_mask_words > INT64_MAX / 8 / rows)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "processing: rows x allowed_mask_words is too large");
    if ((p->bias_offsets != NULL) != (p->bias_tokens != NULL) ||
        (p->bias_offsets != NULL) != (p->bias_values != NULL))
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "processing: bias_offsets, bias_tokens and bias_values go together");
    if ((p->history_offsets != NULL) != (p->history_tokens != NULL))
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "processing: history_offsets and history_tokens go together");
    if ((p->prompt_offsets != NULL) != (p->prompt_tokens != NULL))
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "processing: prompt_offsets and prompt_tokens go together");
    if (!host_side_arrays)
        return PSM_OK;
    status = check_row_lists("bias", p->bias_offsets, p->bias_tokens, p->bias_values, rows, vocab,
                             0);
    if (status == PSM_OK)
        status = check_row_lists("history", p->history_offsets, p->history_tokens, NULL, rows,
                                 vocab, PSM_MAX_HISTORY_TOKENS);
    if (status == PSM_OK)
        status = check_row_lists("prompt", p->prompt_offsets, p->prompt_tokens, NULL, rows, vocab,
                                 0);
    if (status != PSM_OK)
        return status;
    char name[64];
    for (int64_t row = 0; row < rows; ++row) {
        float repetition = p->repetition_penalty_per_row ? p->repetition_penalty_per_row[row]
                                                         : p->repetition_penalty;
        float frequency = p->frequency_penalty_per_row ? p->frequency_penalty_per_row[row]
                                                       : p->frequency_penalty;
        float presence = p->presence_penalty_per_row ? p->presence_penalty_per_row[row]
                                                     : p->presence_penalty;
        if (psm_penalties_valid(repetition, frequency, presence))
            continue;
        snprintf(name, sizeof name, "row %lld: ", (long long)row);
        return check_penalties(name, repetition, frequency, presence);
    }
    return PSM_OK;
}

static psm_status check_output_memory(const char *name, const psm_output *output)
{
    if ((int)output->memory != PSM_MEMORY_HOST && (int)output->memory != PSM_MEMORY_DEVICE)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "%s.memory has the unknown value %d", name,
                             (int)output->memory);
    return PSM_OK;
}

/* Top-N logprobs: psm_sample only, N in range, a known mode, the two
 * outputs present (the ranks optional). */
static psm_status check_top_logprobs(const psm_top_logprobs *top, int for_probs, int data_needed)
{
    if (for_probs)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "top_logprobs is for psm_sample; psm_probs gives every probability");
    if (top->count < 1 || top->count > PSM_MAX_TOP_LOGPROBS)
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "top_logprobs.count is %d; expected 1 .. %d", (int)top->count,
                             PSM_MAX_TOP_LOGPROBS);
    if ((int)top->mode != PSM_LOGPROBS_PROCESSED && (int)top->mode != PSM_LOGPROBS_RAW)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "top_logprobs.mode has the unknown value %d",
                             (int)top->mode);
    if (data_needed && !top->tokens.data)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "top_logprobs.tokens.data is NULL");
    if (data_needed && !top->logprobs.data)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "top_logprobs.logprobs.data is NULL");
    psm_status status = check_output_memory("top_logprobs.tokens", &top->tokens);
    if (status == PSM_OK)
        status = check_output_memory("top_logprobs.logprobs", &top->logprobs);
    if (status == PSM_OK && top->sampled_ranks.data)
        status = check_output_memory("top_logprobs.sampled_ranks", &top->sampled_ranks);
    return status;
}

/* The output rows, and the request-state pointers that exclude each other. */
static psm_status check_rows_and_state(const psm_tensor *logits, const psm_params *params,
                                       int64_t *rows_out)
{
    if (params->row_indices) {
        if (params->output_rows < 1)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "output_rows is %lld with row_indices; expected >= 1 (the "
                                 "number of entries)",
                                 (long long)params->output_rows);
        *rows_out = params->output_rows;
    } else {
        if (params->output_rows != 0 && params->output_rows != logits->rows)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "output_rows is %lld without row_indices; expected 0 (the "
                                 "logits' %lld rows)",
                                 (long long)params->output_rows, (long long)logits->rows);
        *rows_out = logits->rows;
    }
    if (params->seed_pointer && params->seed_per_row)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "seed_pointer and seed_per_row are both set; give one");
    if (params->offset_pointer && params->offset_per_row)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "offset_pointer and offset_per_row are both set; give one");
    if (!params->workspace && params->workspace_bytes != 0)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "workspace is NULL but workspace_bytes is %zu",
                             params->workspace_bytes);
    return PSM_OK;
}

psm_status psm_validate_request(const psm_tensor *logits, const psm_params *params,
                                const psm_output *tokens, const psm_output *logprobs,
                                const psm_tensor *probs, int host_side_arrays,
                                int size_query, psm_request *request)
{
    memset(request, 0, sizeof *request);
    if (!logits)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "logits is NULL");
    if (!params)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "params is NULL");
    const int data_needed = !size_query;
    int64_t stride = 0;
    psm_status status = check_tensor_shape("logits", logits, data_needed, &stride);
    if (status != PSM_OK)
        return status;
    status = check_scalar("", params->temperature, params->top_k, params->top_p, params->min_p);
    if (status != PSM_OK)
        return status;
    if (params->num_samples < 1)
        return psm_set_error(PSM_ERR_INVALID_PARAMETER, "num_samples is %d; expected >= 1",
                             (int)params->num_samples);
    status = check_filter_order("", params->filter_order);
    if (status != PSM_OK)
        return status;
    int64_t rows = 0;
    status = check_rows_and_state(logits, params, &rows);
    if (status != PSM_OK)
        return status;
    if ((int64_t)params->num_samples > INT64_MAX / 8 / rows)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "rows x num_samples is too large");
    if (logits->vocab > INT64_MAX / 8 / rows)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "rows x vocab is too large");
    if (host_side_arrays && !size_query) {
        status = check_per_row_arrays(params, rows, logits->rows);
        if (status != PSM_OK)
            return status;
    }
    if (params->top_logprobs) {
        status = check_top_logprobs(params->top_logprobs, probs != NULL, data_needed);
        if (status != PSM_OK)
            return status;
        if ((int64_t)params->top_logprobs->count > INT64_MAX / 8 / rows)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "rows x top_logprobs.count is too large");
    }
    if (params->processing) {
        status = check_processing(params->processing, rows, logits->vocab,
                                  host_side_arrays && !size_query);
        if (status != PSM_OK)
            return status;
    }

    if (probs) {
        int64_t probs_stride = 0;
        status = check_tensor_shape("probs", probs, data_needed, &probs_stride);
        if (status != PSM_OK)
            return status;
        if (probs->dtype != PSM_DTYPE_F32)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "probs.dtype must be F32");
        if (probs->rows != rows || probs->vocab != logits->vocab)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "probs is %lld x %lld but the call has %lld rows of %lld",
                                 (long long)probs->rows, (long long)probs->vocab,
                                 (long long)rows, (long long)logits->vocab);
        request->probs = *probs;
        request->probs.row_stride = probs_stride;
    } else {
        if (!tokens || (data_needed && !tokens->data))
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "tokens.data is NULL");
        if ((int)tokens->memory != PSM_MEMORY_HOST && (int)tokens->memory != PSM_MEMORY_DEVICE)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "tokens.memory has the unknown value %d",
                                 (int)tokens->memory);
        if (logprobs && logprobs->data && (int)logprobs->memory != PSM_MEMORY_HOST &&
            (int)logprobs->memory != PSM_MEMORY_DEVICE)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "logprobs.memory has the unknown value %d",
                                 (int)logprobs->memory);
        request->tokens = *tokens;
        if (logprobs)
            request->logprobs = *logprobs;
    }
    request->logits = *logits;
    request->logits.row_stride = stride;
    request->params = *params;
    request->rows = rows;
    request->first_bad_row = -1;
    return PSM_OK;
}

/* ---- speculative verification (psm_verify) -------------------------------- */

/* What psm_verify does not run yet in a psm_params (target or draft). */
static psm_status check_verify_unsupported(const char *which, const psm_params *params)
{
    if (params->row_indices)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s.row_indices: psm_verify reads row r * (k + 1) + i for node i "
                             "of request r; row gather is not supported there yet",
                             which);
    if (params->processing)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s.processing: psm_verify has no logit processing yet", which);
    if (params->top_logprobs)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s.top_logprobs: psm_verify has no top-N logprobs", which);
    if (params->workspace || params->workspace_bytes != 0)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s.workspace: psm_verify takes no caller workspace yet", which);
    if (params->seed_pointer && params->seed_per_row)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s: seed_pointer and seed_per_row are both set; give one", which);
    if (params->offset_pointer && params->offset_per_row)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s: offset_pointer and offset_per_row are both set; give one",
                             which);
    return PSM_OK;
}

/* A verification's parameters: the scalars, and each request's entries of
 * the per-row arrays when they can be read here. */
static psm_status check_verify_params(const char *which, const psm_params *params,
                                      int64_t requests, int host_side_arrays)
{
    char name[96];
    snprintf(name, sizeof name, "%s.", which);
    psm_status status =
        check_scalar(name, params->temperature, params->top_k, params->top_p, params->min_p);
    if (status == PSM_OK)
        status = check_filter_order(name, params->filter_order);
    if (status == PSM_OK)
        status = check_verify_unsupported(which, params);
    if (status != PSM_OK || !host_side_arrays)
        return status;
    for (int64_t r = 0; r < requests && status == PSM_OK; ++r)
        status = check_row_values(params, r, which, "request");
    return status;
}

/* A draft tensor: requests x k rows of the target's vocab, in its memory. */
static psm_status check_draft_tensor(const char *name, const psm_tensor *draft,
                                     const psm_tensor *target, int64_t draft_rows,
                                     int64_t *row_stride_out)
{
    psm_status status = check_tensor_shape(name, draft, 1, row_stride_out);
    if (status != PSM_OK)
        return status;
    if (draft->rows != draft_rows || draft->vocab != target->vocab)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s is %lld x %lld; the call needs requests x k = %lld rows of the "
                             "target's vocab %lld",
                             name, (long long)draft->rows, (long long)draft->vocab,
                             (long long)draft_rows, (long long)target->vocab);
    if (draft->memory != target->memory)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "%s.memory differs from target_logits.memory; every array of "
                             "psm_verify lives in the target logits' memory",
                             name);
    return PSM_OK;
}

/* The drafts' values that can be read here: tokens inside the vocab,
 * parents earlier than their node, draft probabilities in [0, 1]. */
static psm_status check_draft_values(const psm_verify_request *request)
{
    const int32_t k = request->nodes;
    const int64_t vocab = request->target.vocab;
    for (int64_t r = 0; r < request->requests; ++r) {
        for (int32_t node = 1; node <= k; ++node) {
            const int64_t at = r * k + node - 1;
            if (request->tokens[at] < 0 || request->tokens[at] >= vocab)
                return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                     "request %lld, draft node %d: token %d is outside the "
                                     "vocab of %lld",
                                     (long long)r, (int)node, (int)request->tokens[at],
                                     (long long)vocab);
            if (request->parents && !(request->parents[at] >= 0 && request->parents[at] < node))
                return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                     "request %lld, draft node %d: parent %d; a node's parent is "
                                     "an earlier node, 0 (the root) .. %d",
                                     (long long)r, (int)node, (int)request->parents[at],
                                     (int)node - 1);
        }
    }
    const psm_tensor *probs = &request->draft_probs;
    if (!probs->data)
        return PSM_OK;
    for (int64_t row = 0; row < probs->rows; ++row) {
        const float *q = (const float *)probs->data + row * probs->row_stride;
        for (int64_t i = 0; i < vocab; ++i)
            if (!psm_draft_prob_valid(q[i]))
                return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                     "request %lld, draft node %lld: draft_probs[%lld] is %g; "
                                     "expected a probability in [0, 1]",
                                     (long long)(row / request->nodes),
                                     (long long)(row % request->nodes + 1), (long long)i,
                                     (double)q[i]);
    }
    return PSM_OK;
}

static psm_status check_verify_outputs(const psm_verification *outputs)
{
    if (!outputs->accepted.data)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "outputs->accepted.data is NULL");
    if (!outputs->tokens.data)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "outputs->tokens.data is NULL");
    psm_status status = check_output_memory("outputs->accepted", &outputs->accepted);
    if (status == PSM_OK)
        status = check_output_memory("outputs->tokens", &outputs->tokens);
    if (status == PSM_OK && outputs->path_nodes.data)
        status = check_output_memory("outputs->path_nodes", &outputs->path_nodes);
    if (status == PSM_OK && outputs->logprobs.data)
        status = check_output_memory("outputs->logprobs", &outputs->logprobs);
    return status;
}

psm_status psm_validate_verify(const psm_tensor *target_logits, const psm_params *target_params,
                               const psm_drafts *drafts, const psm_verification *outputs,
                               int host_side_arrays, psm_verify_request *request)
{
    memset(request, 0, sizeof *request);
    if (!target_logits)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "target_logits is NULL");
    if (!target_params)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "target_params is NULL");
    if (!drafts)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "drafts is NULL");
    if (!outputs)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "outputs is NULL");
    if (drafts->nodes < 1 || drafts->nodes > PSM_MAX_DRAFT_NODES)
        return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                             "drafts->nodes is %d; expected 1 .. %d (PSM_MAX_DRAFT_NODES)",
                             (int)drafts->nodes, PSM_MAX_DRAFT_NODES);
    int64_t stride = 0;
    psm_status status = check_tensor_shape("target_logits", target_logits, 1, &stride);
    if (status != PSM_OK)
        return status;
    const int64_t positions = (int64_t)drafts->nodes + 1;
    if (target_logits->rows % positions != 0)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "target_logits has %lld rows, not a multiple of k + 1 = %lld "
                             "(one row per node, the root included, per request)",
                             (long long)target_logits->rows, (long long)positions);
    const int64_t requests = target_logits->rows / positions;
    if (target_params->num_samples != 1)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "target_params.num_samples is %d; psm_verify emits one token per "
                             "position (1)",
                             (int)target_params->num_samples);
    if (target_params->output_rows != 0 && target_params->output_rows != requests)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "target_params.output_rows is %lld; expected 0 or the %lld requests",
                             (long long)target_params->output_rows, (long long)requests);
    status = check_verify_params("target_params", target_params, requests, host_side_arrays);
    if (status != PSM_OK)
        return status;
    if (!drafts->tokens)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "drafts->tokens is NULL");
    if (drafts->draft_logits && drafts->draft_probs)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "drafts has both draft_logits and draft_probs; give one (or "
                             "neither, for one-hot drafts)");
    if (drafts->draft_params && !drafts->draft_logits)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "drafts->draft_params without draft_logits: the parameters shape "
                             "the draft logits' distribution");
    const int64_t draft_rows = requests * drafts->nodes;
    psm_params_init(&request->draft_params);
    if (drafts->draft_logits) {
        int64_t draft_stride = 0;
        status = check_draft_tensor("drafts->draft_logits", drafts->draft_logits, target_logits,
                                    draft_rows, &draft_stride);
        if (status != PSM_OK)
            return status;
        request->draft_logits = *drafts->draft_logits;
        request->draft_logits.row_stride = draft_stride;
        if (drafts->draft_params) {
            status = check_verify_params("drafts->draft_params", drafts->draft_params, requests,
                                         host_side_arrays);
            if (status != PSM_OK)
                return status;
            request->draft_params = *drafts->draft_params;
        }
    }
    if (drafts->draft_probs) {
        int64_t probs_stride = 0;
        status = check_draft_tensor("drafts->draft_probs", drafts->draft_probs, target_logits,
                                    draft_rows, &probs_stride);
        if (status != PSM_OK)
            return status;
        if (drafts->draft_probs->dtype != PSM_DTYPE_F32)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "drafts->draft_probs.dtype must be F32");
        request->draft_probs = *drafts->draft_probs;
        request->draft_probs.row_stride = probs_stride;
    }
    status = check_verify_outputs(outputs);
    if (status != PSM_OK)
        return status;
    request->target = *target_logits;
    request->target.row_stride = stride;
    request->target_params = *target_params;
    request->requests = requests;
    request->nodes = drafts->nodes;
    request->tokens = drafts->tokens;
    request->parents = drafts->parents;
    request->outputs = *outputs;
    if (host_side_arrays)
        return check_draft_values(request);
    return PSM_OK;
}
