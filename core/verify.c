/* verify.c: psm_verify, speculative decoding verification (docs/SAMPLING.md,
 * section 7): validate, then hand to the context's backend. */
#include "context.h"
#include "error.h"
#include "psm_verify.h"
#include "validate.h"

_Static_assert(PSM_VERIFY_MAX_NODES == PSM_MAX_DRAFT_NODES,
               "core/psm_verify.h's node cap differs from polysample.h's");

void psm_drafts_init(psm_drafts *drafts)
{
    if (!drafts)
        return;
    *drafts = (psm_drafts){.nodes = 0};
}

psm_status psm_verify(psm_context *context, const psm_tensor *target_logits,
                      const psm_params *target_params, const psm_drafts *drafts,
                      const psm_verification *outputs)
{
    psm_clear_error();
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    /* The CPU backend's device memory is host memory: its arrays can always
     * be read here (as for psm_sample's per-row arrays). */
    const int host_side_arrays = context->backend == PSM_BACKEND_CPU ||
                                 (target_logits && target_logits->memory == PSM_MEMORY_HOST);
    psm_verify_request request;
    psm_status status = psm_validate_verify(target_logits, target_params, drafts, outputs,
                                            host_side_arrays, &request);
    if (status != PSM_OK)
        return status;
    if (!context->ops->verify)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "the %s backend has no speculative verification yet (psm_verify); "
                             "the CPU backend runs it",
                             psm_backend_name(context->backend));
    request.check_rows = context->check_rows;
    return context->ops->verify(context->state, &request);
}
