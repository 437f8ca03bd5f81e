/*
 * backend.h: what core/ asks of a backend.
 *
 * A backend is a table of functions (psm_backend_ops) filled with designated
 * initialisers; core/registry.c holds the CPU one and loads the GPU modules
 * (core/module.h). Core validates
 * every request before it reaches a backend, so a backend may assume:
 * non-NULL pointers, rows >= 1, 1 <= vocab <= INT32_MAX, row_stride >= vocab,
 * num_samples >= 1, valid scalar parameters, host per-row arrays (and row
 * indices) already checked, and a caller workspace, when given, at least as
 * large as the backend's workspace_size said. Per-row arrays in device memory
 * are not checked on the host: a backend gives a row whose psm_resolve_row
 * says !valid token -1 and never reads its logits.
 *
 * Backends report failures through psm_set_error (core/error.h) and return
 * its status; they never print or abort.
 */
#ifndef PSM_BACKEND_H
#define PSM_BACKEND_H

#include "polysample.h"
#include "psm_processing.h"
#include "psm_row.h"
#include "psm_shard_pass.h"

#include <stddef.h>
#include <stdint.h>

#define PSM_BACKEND_API_VERSION 3

/* One validated call of psm_sample or psm_probs. */
typedef struct psm_request {
    psm_tensor logits;          /* row_stride resolved (never 0) */
    psm_params params;          /* per-row pointers live in logits.memory */
    int64_t rows;               /* output rows: params.output_rows with row_indices, else
                                   logits.rows; per-row arrays have this many entries */
    psm_output tokens;          /* psm_sample: rows x num_samples int32 */
    psm_output logprobs;        /* psm_sample: optional (data may be NULL) */
    psm_tensor probs;           /* psm_probs: rows x vocab f32, row_stride resolved */
    int check_rows;             /* fail with PSM_ERR_BAD_ROW, writing nothing */
    int64_t first_bad_row;      /* out: set with PSM_ERR_BAD_ROW */
} psm_request;

/* What a backend runs beyond plain sampling (psm_backend_ops.features): a
 * request that needs a feature its backend lacks is PSM_ERR_UNSUPPORTED. */
#define PSM_FEATURE_LOGIT_PROCESSING 1u /* psm_params.processing */
#define PSM_FEATURE_TOP_LOGPROBS 2u     /* psm_params.top_logprobs */
#define PSM_FEATURE_FILTER_ORDERS 4u    /* psm_params.filter_order other than POLYSAMPLE */

/* One validated call of psm_verify (docs/SAMPLING.md, section 7). */
typedef struct psm_verify_request {
    psm_tensor target;           /* requests x (nodes + 1) rows, row_stride resolved */
    psm_params target_params;    /* per-row arrays: one entry per request */
    int64_t requests;
    int32_t nodes;               /* k */
    const int32_t *tokens;       /* requests x k */
    const int32_t *parents;      /* requests x k; NULL: a chain */
    psm_tensor draft_logits;     /* requests x k rows, row_stride resolved; data NULL: none */
    psm_params draft_params;     /* with draft_logits (psm_params_init's when not given) */
    psm_tensor draft_probs;      /* requests x k rows of f32, row_stride resolved; data NULL:
                                    none (no draft_logits either: one-hot drafts) */
    psm_verification outputs;
    int check_rows;              /* a bad target row fails with PSM_ERR_BAD_ROW */
} psm_verify_request;

typedef struct psm_backend_ops {
    int api_version;
    psm_backend id;
    unsigned features; /* PSM_FEATURE_* bits */

    /* Can a context be made now? Fills device_count (0 when not) and, when
     * not, a reason ("no CUDA device: cudaGetDeviceCount: ..."). Must be
     * cheap enough to call from psm_backend_available. auto_device_count:
     * how many of the devices, counted from index 0, AUTO may choose (the
     * OpenCL backend lists GPUs and accelerators before CPU devices, which
     * AUTO leaves to the CPU backend); reason then says why not the rest. */
    int (*probe)(int *device_count, int *auto_device_count, char *reason, size_t reason_size);

    /* Makes the backend's state for one device. device_index is >= 0. */
    psm_status (*create)(const psm_context_options *options, int device_index,
                         void **state_out, char *device_name, size_t device_name_size);
    void (*destroy)(void *state);

    /* Grows the workspace so that calls up to this size allocate nothing. */
    psm_status (*reserve)(void *state, int64_t rows, int64_t vocab, int64_t num_samples);

    /* The bytes of caller workspace the request needs (probs_mode: psm_probs);
     * the request's data pointers may be NULL here. */
    psm_status (*workspace_size)(void *state, const psm_request *request, int probs_mode,
                                 size_t *bytes);

    psm_status (*sample)(void *state, psm_request *request);
    psm_status (*probs)(void *state, psm_request *request);
    psm_status (*synchronize)(void *state);

    /* psm_verify; NULL: the backend has no speculative verification yet
     * (PSM_ERR_UNSUPPORTED). The backend writes the message of a failure
     * (a draft token of draft probability 0, checking mode's bad request). */
    psm_status (*verify)(void *state, psm_verify_request *request);

    /* One pass of a sharded call over this rank's shard (core/sharded.c
     * drives the rounds; core/psm_shard_pass.h says what each pass
     * computes). logits: the shard, validated for this backend (host or
     * device memory); items (item_count >= 1) and tile_keys (TILE_MASSES:
     * item_count x local_tiles, else NULL) are host memory; out: item_count
     * x psm_shard_pass_words words of host memory, all written before the
     * call returns (0 for an item whose logits_row is -1). NULL: the backend
     * has no sharded sampling (PSM_ERR_UNSUPPORTED). */
    psm_status (*shard_pass)(void *state, const psm_tensor *logits,
                             const psm_shard_geometry *geometry, const psm_shard_item *items,
                             int64_t item_count, const psm_u64 *tile_keys, psm_u64 *out);
} psm_backend_ops;

/* ---- a request's rows, as psm_resolve_row (core/psm_row.h) reads them ---- */

/* The PSM_PER_ROW_* bits of a call's parameters. */
static inline psm_u32 psm_request_per_row(const psm_params *p)
{
    return (p->temperature_per_row ? PSM_PER_ROW_TEMPERATURE : 0u) |
           (p->top_k_per_row ? PSM_PER_ROW_TOP_K : 0u) |
           (p->top_p_per_row ? PSM_PER_ROW_TOP_P : 0u) |
           (p->min_p_per_row ? PSM_PER_ROW_MIN_P : 0u) |
           (p->seed_per_row ? PSM_PER_ROW_SEED : 0u) |
           (p->offset_per_row ? PSM_PER_ROW_OFFSET : 0u) |
           (p->subsequence_per_row ? PSM_PER_ROW_SUBSEQUENCE : 0u) |
           (p->row_indices ? PSM_PER_ROW_LOGITS_ROW : 0u) |
           (p->seed_pointer ? PSM_SEED_AT_POINTER : 0u) |
           (p->offset_pointer ? PSM_OFFSET_AT_POINTER : 0u);
}

/* The scalars of psm_params as psm_resolve_row takes them, for a call whose
 * per-row arrays have logits_rows entries (psm_verify: one per request). */
static inline psm_row_scalars psm_params_row_scalars(const psm_params *p, int64_t logits_rows)
{
    psm_row_scalars scalars;
    scalars.seed = p->seed;
    scalars.offset = p->offset;
    scalars.logits_rows = logits_rows;
    scalars.temperature = p->temperature;
    scalars.top_k = p->top_k;
    scalars.top_p = p->top_p;
    scalars.min_p = p->min_p;
    return scalars;
}

static inline psm_row_scalars psm_request_row_scalars(const psm_request *request)
{
    return psm_params_row_scalars(&request->params, request->logits.rows);
}

/* The per-row pointers as the caller gave them (a backend whose kernels read
 * copies replaces them with the copies' addresses). */
static inline psm_row_arrays psm_request_row_arrays(const psm_params *p)
{
    psm_row_arrays arrays;
    arrays.temperature = p->temperature_per_row;
    arrays.top_k = p->top_k_per_row;
    arrays.top_p = p->top_p_per_row;
    arrays.min_p = p->min_p_per_row;
    arrays.seed = p->seed_per_row;
    arrays.offset = p->offset_per_row;
    arrays.subsequence = p->subsequence_per_row;
    arrays.logits_row = p->row_indices;
    arrays.seed_pointer = p->seed_pointer;
    arrays.offset_pointer = p->offset_pointer;
    return arrays;
}

/* Does the call process its logits (psm_params.processing with something to
 * do)? Penalties without a history or prompt list change nothing. */
static inline int psm_processing_active(const psm_params *p)
{
    const psm_logit_processing *processing = p->processing;
    return processing && (processing->allowed_mask || processing->bias_offsets ||
                          processing->history_offsets || processing->prompt_offsets);
}

/* Whether a filter may remove a valid token of some row of the request: a
 * per-row filter array, or scalar filters that psm_may_filter finds active.
 * Without one every row keeps its valid tokens. */
static inline int psm_request_may_filter(const psm_request *request)
{
    const psm_params *p = &request->params;
    return p->top_k_per_row || p->top_p_per_row || p->min_p_per_row ||
           psm_may_filter(p->top_k, p->top_p, p->min_p, request->logits.vocab);
}

/* Whether a GPU backend may apply a psm_sample call's logit processing as
 * its tile and draw stages read the rows (psm_read_processing), instead of
 * in a processed copy of the batch that the pipeline then reads: where
 * those stages are the only readers of the rows, which is so when no row
 * can filter and no top-N logprobs are asked for (the filters' cutoff
 * searches and the top-N kernels read the rows through paths of their
 * own). The copy costs a write and a read of the batch more. */
static inline int psm_processing_on_read_possible(const psm_request *request)
{
    return psm_processing_active(&request->params) && !psm_request_may_filter(request) &&
           !request->params.top_logprobs;
}

/* Does the call's processing have lists (history, prompt or bias)? Without
 * them the GPU backends' read step is the whole of it, and the token counts
 * need no memory. */
static inline int psm_processing_has_lists(const psm_params *p)
{
    const psm_logit_processing *processing = p->processing;
    return processing &&
           (processing->bias_offsets || processing->history_offsets || processing->prompt_offsets);
}

/* The call's processing arrays as the caller gave them (request->params
 * .processing must be non-NULL). */
static inline psm_processing_arrays psm_request_processing_arrays(const psm_logit_processing *p)
{
    psm_processing_arrays a;
    a.present = (p->history_offsets ? PSM_LISTS_HISTORY : 0u) |
                (p->prompt_offsets ? PSM_LISTS_PROMPT : 0u) |
                (p->bias_offsets ? PSM_LISTS_BIAS : 0u) | (p->allowed_mask ? PSM_LISTS_MASK : 0u) |
                (p->repetition_penalty_per_row ? PSM_LISTS_REPETITION_PER_ROW : 0u) |
                (p->frequency_penalty_per_row ? PSM_LISTS_FREQUENCY_PER_ROW : 0u) |
                (p->presence_penalty_per_row ? PSM_LISTS_PRESENCE_PER_ROW : 0u);
    a.history_offsets = p->history_offsets;
    a.history_tokens = p->history_tokens;
    a.prompt_offsets = p->prompt_offsets;
    a.prompt_tokens = p->prompt_tokens;
    a.bias_offsets = p->bias_offsets;
    a.bias_tokens = p->bias_tokens;
    a.bias_values = p->bias_values;
    a.repetition_per_row = p->repetition_penalty_per_row;
    a.frequency_per_row = p->frequency_penalty_per_row;
    a.presence_per_row = p->presence_penalty_per_row;
    a.repetition = p->repetition_penalty;
    a.frequency = p->frequency_penalty;
    a.presence = p->presence_penalty;
    return a;
}

/* The registry (core/registry.c). A GPU backend is a module loaded on first
 * use: psm_registry_load gives NULL when it was not built or cannot be
 * loaded, with failure (optional) saying why. */
int psm_registry_built(psm_backend backend);
const psm_backend_ops *psm_registry_load(psm_backend backend, const char **failure);
const psm_backend_ops *psm_registry_lookup(psm_backend backend);

#endif /* PSM_BACKEND_H */
