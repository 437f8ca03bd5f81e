/* validate.c: argument and parameter validation, done once for all backends. */
#include "validate.h"

#include "error.h"
#include "psm_contract.h"

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

/* Each value of a host per-row array goes through the same check as the
 * scalar, so the message names the array and the row. */
static psm_status check_per_row_arrays(const psm_params *params, int64_t rows,
                                       int64_t logits_rows)
{
    char name[64];
    for (int64_t row = 0; row < rows; ++row) {
        if (params->row_indices &&
            !(params->row_indices[row] >= 0 && params->row_indices[row] < logits_rows))
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "row_indices[%lld] is %lld; logits have %lld rows", (long long)row,
                                 (long long)params->row_indices[row], (long long)logits_rows);
        float temperature =
            params->temperature_per_row ? params->temperature_per_row[row] : params->temperature;
        int32_t top_k = params->top_k_per_row ? params->top_k_per_row[row] : params->top_k;
        float top_p = params->top_p_per_row ? params->top_p_per_row[row] : params->top_p;
        float min_p = params->min_p_per_row ? params->min_p_per_row[row] : params->min_p;
        if (psm_row_params_valid(temperature, top_k, top_p, min_p))
            continue;
        snprintf(name, sizeof name, "row %lld: ", (long long)row);
        return check_scalar(name, temperature, top_k, top_p, min_p);
    }
    return PSM_OK;
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
