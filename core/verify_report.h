/* verify_report.h: the error of a psm_verify call whose checks found a bad
 * draft node or (checking mode) a bad request, written once for every
 * backend: each runs the checks of phase 1 (docs/SAMPLING.md, section 7)
 * into one status per node and one flag per request, and reports them
 * here, so that the CPU and GPU backends fail the same call with the same
 * status and message. A header (static functions), since the GPU modules
 * link only core/module_client.c. */
#ifndef PSM_VERIFY_REPORT_H
#define PSM_VERIFY_REPORT_H

#include "backend.h"
#include "error.h"
#include "psm_verify.h"

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

#endif /* PSM_VERIFY_REPORT_H */
