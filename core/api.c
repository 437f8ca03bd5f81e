/* api.c: the public calls: validate, then hand to the context's backend. */
#include "context.h"
#include "error.h"
#include "validate.h"

#include <stdio.h>

#define PSM_STRINGIFY_INNER(x) #x
#define PSM_STRINGIFY(x) PSM_STRINGIFY_INNER(x)

const char *psm_version_string(void)
{
    return PSM_STRINGIFY(PSM_VERSION_MAJOR) "." PSM_STRINGIFY(PSM_VERSION_MINOR) "." PSM_STRINGIFY(
        PSM_VERSION_PATCH);
}

int psm_version_number(void)
{
    return PSM_VERSION_NUMBER;
}

void psm_logit_processing_init(psm_logit_processing *processing)
{
    if (!processing)
        return;
    *processing = (psm_logit_processing){
        .repetition_penalty = 1.0f, .frequency_penalty = 0.0f, .presence_penalty = 0.0f};
}

void psm_params_init(psm_params *params)
{
    if (!params)
        return;
    *params = (psm_params){.temperature = 1.0f, .top_p = 1.0f, .num_samples = 1};
}

/* The CPU backend's "device" memory is host memory, so its per-row arrays
 * can always be checked here; other backends' only when on the host. */
static int per_row_arrays_on_host(const psm_context *context, const psm_tensor *logits)
{
    return context->backend == PSM_BACKEND_CPU ||
           (logits && logits->memory == PSM_MEMORY_HOST);
}

static psm_status finish_bad_row(psm_status status, const psm_request *request)
{
    if (status == PSM_ERR_BAD_ROW)
        return psm_set_error(PSM_ERR_BAD_ROW,
                             "row %lld has a NaN or +inf logit, no finite logit, or a parameter "
                             "out of range (checking mode; nothing was written)",
                             (long long)request->first_bad_row);
    return status;
}

/* A request the context's backend cannot run: said before anything runs. */
static psm_status check_features(const psm_context *context, const psm_request *request)
{
    if (psm_processing_active(&request->params) &&
        !(context->ops->features & PSM_FEATURE_LOGIT_PROCESSING))
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "logit processing (psm_params.processing) does not run on the %s "
                             "backend yet; the CPU backend runs it",
                             psm_backend_name(context->backend));
    if (request->params.top_logprobs && !(context->ops->features & PSM_FEATURE_TOP_LOGPROBS))
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "top-N logprobs (psm_params.top_logprobs) do not run on the %s "
                             "backend yet; the CPU backend runs them",
                             psm_backend_name(context->backend));
    if (request->params.filter_order != PSM_FILTER_ORDER_POLYSAMPLE &&
        !(context->ops->features & PSM_FEATURE_FILTER_ORDERS))
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "filter order %d (psm_params.filter_order) does not run on the %s "
                             "backend yet; the CPU backend runs every order",
                             (int)request->params.filter_order,
                             psm_backend_name(context->backend));
    return PSM_OK;
}

/* A caller's workspace must hold what the backend says the call needs;
 * checked before the backend sees the request, so that nothing is written. */
static psm_status check_workspace(const psm_context *context, const psm_request *request,
                                  int probs_mode)
{
    if (!request->params.workspace)
        return PSM_OK;
    size_t needed = 0;
    psm_status status =
        context->ops->workspace_size(context->state, request, probs_mode, &needed);
    if (status != PSM_OK)
        return status;
    if (request->params.workspace_bytes < needed)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "workspace_bytes is %zu; this call needs %zu (psm_%s_workspace_size)",
                             request->params.workspace_bytes, needed,
                             probs_mode ? "probs" : "sample");
    return PSM_OK;
}

psm_status psm_sample(psm_context *context, const psm_tensor *logits, const psm_params *params,
                      psm_output tokens, psm_output logprobs)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    psm_request request;
    psm_status status = psm_validate_request(logits, params, &tokens, &logprobs, NULL,
                                             per_row_arrays_on_host(context, logits), 0, &request);
    request.check_rows = context->check_rows;
    if (status == PSM_OK)
        status = check_features(context, &request);
    if (status == PSM_OK)
        status = check_workspace(context, &request, 0);
    if (status != PSM_OK)
        return status;
    return finish_bad_row(context->ops->sample(context->state, &request), &request);
}

psm_status psm_probs(psm_context *context, const psm_tensor *logits, const psm_params *params,
                     const psm_tensor *probs)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    if (!probs)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "probs is NULL");
    psm_request request;
    psm_status status = psm_validate_request(logits, params, NULL, NULL, probs,
                                             per_row_arrays_on_host(context, logits), 0, &request);
    request.check_rows = context->check_rows;
    if (status == PSM_OK)
        status = check_features(context, &request);
    if (status == PSM_OK)
        status = check_workspace(context, &request, 1);
    if (status != PSM_OK)
        return status;
    return finish_bad_row(context->ops->probs(context->state, &request), &request);
}

static psm_status workspace_size(psm_context *context, psm_request *request, int probs_mode,
                                 size_t *bytes)
{
    size_t needed = 0;
    psm_status status = context->ops->workspace_size(context->state, request, probs_mode, &needed);
    if (status == PSM_OK)
        *bytes = needed;
    return status;
}

psm_status psm_sample_workspace_size(psm_context *context, const psm_tensor *logits,
                                     const psm_params *params, psm_output tokens,
                                     psm_output logprobs, size_t *bytes)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    if (!bytes)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "bytes is NULL");
    psm_request request;
    psm_status status =
        psm_validate_request(logits, params, &tokens, &logprobs, NULL, 0, 1, &request);
    if (status == PSM_OK)
        status = check_features(context, &request);
    if (status != PSM_OK)
        return status;
    request.check_rows = context->check_rows;
    return workspace_size(context, &request, 0, bytes);
}

psm_status psm_probs_workspace_size(psm_context *context, const psm_tensor *logits,
                                    const psm_params *params, const psm_tensor *probs,
                                    size_t *bytes)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    if (!probs)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "probs is NULL");
    if (!bytes)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "bytes is NULL");
    psm_request request;
    psm_status status = psm_validate_request(logits, params, NULL, NULL, probs, 0, 1, &request);
    if (status == PSM_OK)
        status = check_features(context, &request);
    if (status != PSM_OK)
        return status;
    request.check_rows = context->check_rows;
    return workspace_size(context, &request, 1, bytes);
}

psm_status psm_context_reserve(psm_context *context, int64_t rows, int64_t vocab,
                               int64_t num_samples)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    if (rows < 1 || vocab < 1 || vocab > INT32_MAX || num_samples < 1)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "reserve(%lld, %lld, %lld): each must be >= 1, vocab <= 2^31-1",
                             (long long)rows, (long long)vocab, (long long)num_samples);
    /* The bounds psm_sample's validation puts on a call (core/validate.c):
     * a shape beyond them can never be sampled, and the backends' workspace
     * sizes, computed from it in size_t, would wrap around. */
    if (vocab > INT64_MAX / 8 / rows || num_samples > INT64_MAX / 8 / rows)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "reserve(%lld, %lld, %lld): rows x vocab or rows x num_samples is "
                             "too large for any call",
                             (long long)rows, (long long)vocab, (long long)num_samples);
    return context->ops->reserve(context->state, rows, vocab, num_samples);
}

psm_status psm_synchronize(psm_context *context)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    return context->ops->synchronize(context->state);
}
