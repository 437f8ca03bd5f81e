/* validate.h: checks every argument before a request reaches a backend. */
#ifndef PSM_VALIDATE_H
#define PSM_VALIDATE_H

#include "backend.h"

/* Fills *request from the public arguments, or fails with a status and a
 * message naming the argument. probs is NULL for psm_sample, and tokens and
 * logprobs are ignored for psm_probs. host_side_arrays: the per-row arrays
 * can be read here (host memory, or a backend whose device memory is host).
 * size_query: for the workspace-size queries, which take the call's
 * arguments before their data exists: data pointers may be NULL and host
 * per-row values are not read. */
psm_status psm_validate_request(const psm_tensor *logits, const psm_params *params,
                                const psm_output *tokens, const psm_output *logprobs,
                                const psm_tensor *probs, int host_side_arrays,
                                int size_query, psm_request *request);

/* psm_verify's arguments (docs/SAMPLING.md, section 7) into *request, or a
 * status and a message naming the argument; with host_side_arrays, also the
 * per-request arrays, the draft tokens and parents, and draft_probs' values
 * (a drawn token's draft probability of 0 needs the draft's distribution:
 * the backend checks it). */
psm_status psm_validate_verify(const psm_tensor *target_logits, const psm_params *target_params,
                               const psm_drafts *drafts, const psm_verification *outputs,
                               int host_side_arrays, psm_verify_request *request);

#endif /* PSM_VALIDATE_H */
