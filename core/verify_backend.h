/* verify_backend.h: what the backends' psm_verify share on the host
 * (docs/SAMPLING.md, section 7). A header (static functions), since the GPU
 * modules link only core/module_client.c.
 * - psm_verify_report: the error of a call whose checks found a bad draft
 *   node or (checking mode) a bad request. Each backend runs the checks of
 *   phase 1 into one status per node and one flag per request and reports
 *   them here, so that the CPU and GPU backends fail the same call with the
 *   same status and message.
 * - psm_verify_describe, psm_verify_rows_params: the GPU backends' call
 *   description for kernels/psm_stage_verify.h, and the parameters of the
 *   plain call whose row passes give each target or draft row its kept
 *   rule. */
#ifndef PSM_VERIFY_BACKEND_H
#define PSM_VERIFY_BACKEND_H

#include "backend.h"
#include "error.h"
#include "psm_verify.h"

#include <string.h>

/* node_status: requests x k (PSM_NODE_*); request_bad: requests, nonzero
 * for a request with a bad target row or per-request parameter. The first
 * bad node in request and node order fails the call
 * (PSM_ERR_INVALID_PARAMETER); then, in checking mode, the first bad
 * request (PSM_ERR_BAD_ROW). PSM_OK when neither. host_arrays: the drafts'
 * tokens and parents can be read here (host memory), for the message. */
static inline psm_status psm_verify_report(const psm_verify_request *request,
                                           const int32_t *node_status, const int32_t *request_bad,
                                           int host_arrays)
{
    const int64_t count = request->requests * request->nodes;
    for (int64_t at = 0; at < count; ++at) {
        if (node_status[at] == PSM_NODE_GOOD)
            continue;
        const long long r = (long long)(at / request->nodes);
        const int node = (int)(at % request->nodes) + 1;
        switch (node_status[at]) {
        case PSM_NODE_BAD_DRAFT_ROW:
            return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                 "request %lld, draft node %d: draft_logits row %lld has a NaN "
                                 "or +inf logit, or no finite logit, or a draft parameter out "
                                 "of range",
                                 r, node, (long long)at);
        case PSM_NODE_BAD_TOKEN: /* device memory only: validation reads host tokens */
            return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                 "request %lld, draft node %d: its token is outside the vocab "
                                 "of %lld",
                                 r, node, (long long)request->target.vocab);
        case PSM_NODE_BAD_PARENT:
            return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                 "request %lld, draft node %d: its parent is not an earlier "
                                 "node, 0 (the root) .. %d",
                                 r, node, node - 1);
        case PSM_NODE_BAD_PROB:
            return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                 "request %lld, draft node %d: draft_probs row %lld has a value "
                                 "outside [0, 1] (or NaN); expected probabilities",
                                 r, node, (long long)at);
        default:
            if (host_arrays)
                return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                     "request %lld, draft node %d: token %d has draft "
                                     "probability 0 under the draft distribution given for it "
                                     "(it cannot have been drawn from it)",
                                     r, node, (int)request->tokens[at]);
            return psm_set_error(PSM_ERR_INVALID_PARAMETER,
                                 "request %lld, draft node %d: its token has draft probability "
                                 "0 under the draft distribution given for it (it cannot have "
                                 "been drawn from it)",
                                 r, node);
        }
    }
    for (int64_t r = 0; request->check_rows && r < request->requests; ++r)
        if (request_bad[r])
            return psm_set_error(PSM_ERR_BAD_ROW,
                                 "request %lld has a target row with a NaN or +inf logit, or no "
                                 "finite logit, or a parameter out of range (checking mode; "
                                 "nothing was written)",
                                 (long long)r);
    return PSM_OK;
}

/* The draft rows' tensor (logits or probabilities), or NULL for one-hot. */
static inline const psm_tensor *psm_verify_draft_tensor(const psm_verify_request *request)
{
    return request->draft_logits.data  ? &request->draft_logits
           : request->draft_probs.data ? &request->draft_probs
                                       : NULL;
}

/* The call as kernels/psm_stage_verify.h reads it; check_drafts: the drafts'
 * tokens, parents and probabilities were not checked on the host (device
 * memory). */
static inline psm_verify_call psm_verify_describe(const psm_verify_request *request)
{
    const psm_tensor *draft = psm_verify_draft_tensor(request);
    psm_verify_call call;
    memset(&call, 0, sizeof call);
    call.target_stride = request->target.row_stride;
    call.draft_stride = draft ? draft->row_stride : 0;
    call.requests = (psm_i32)request->requests;
    call.nodes = request->nodes;
    call.vocab = (psm_i32)request->target.vocab;
    call.weight_bits = psm_weight_bits(request->target.vocab);
    call.target_dtype = (psm_i32)request->target.dtype;
    call.draft_dtype = draft ? (psm_i32)draft->dtype : PSM_LOGITS_F32;
    call.draft_kind = request->draft_logits.data  ? PSM_DRAFT_LOGITS
                      : request->draft_probs.data ? PSM_DRAFT_PROBS
                                                  : PSM_DRAFT_ONE_HOT;
    call.has_parents = request->parents != NULL;
    call.check_drafts = request->target.memory == PSM_MEMORY_DEVICE;
    call.want_path = request->outputs.path_nodes.data != NULL;
    call.want_logprobs = request->outputs.logprobs.data != NULL;
    return call;
}

/* Does a psm_params have per-request filter arrays (which the GPU backends
 * spread to the rows before the row passes)? */
static inline int psm_verify_per_request_filters(const psm_params *params)
{
    return params->temperature_per_row || params->top_k_per_row || params->top_p_per_row ||
           params->min_p_per_row;
}

/* The parameters of the plain call over a request's target (or draft
 * logits) rows: the filters of `params` (scalars, filter order) and, when
 * given, one filter value per row (device arrays spread from the
 * per-request ones); one sample, nothing else. */
static inline psm_params psm_verify_rows_params(const psm_params *params, const float *temperature,
                                                const int32_t *top_k, const float *top_p,
                                                const float *min_p)
{
    psm_params rows;
    memset(&rows, 0, sizeof rows);
    rows.num_samples = 1;
    rows.temperature = params->temperature;
    rows.top_k = params->top_k;
    rows.top_p = params->top_p;
    rows.min_p = params->min_p;
    rows.filter_order = params->filter_order;
    rows.temperature_per_row = temperature;
    rows.top_k_per_row = top_k;
    rows.top_p_per_row = top_p;
    rows.min_p_per_row = min_p;
    return rows;
}

#endif /* PSM_VERIFY_BACKEND_H */
