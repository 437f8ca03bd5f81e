/*
 * backend.h: what core/ asks of a backend.
 *
 * A backend is a table of functions (psm_backend_ops) filled with designated
 * initialisers; core/registry.c lists the compiled-in ones. Core validates
 * every request before it reaches a backend, so a backend may assume:
 * non-NULL pointers, rows >= 1, 1 <= vocab <= INT32_MAX, row_stride >= vocab,
 * num_samples >= 1, valid scalar parameters, and host per-row arrays already
 * checked. Per-row arrays in device memory are not checked on the host: a
 * backend gives a row with an out-of-range value token -1 (psm_row_params_ok).
 *
 * Backends report failures through psm_set_error (core/error.h) and return
 * its status; they never print or abort.
 */
#ifndef PSM_BACKEND_H
#define PSM_BACKEND_H

#include "polysample.h"

#include <stddef.h>
#include <stdint.h>

#define PSM_BACKEND_API_VERSION 1

/* One validated call of psm_sample or psm_probs. */
typedef struct psm_request {
    psm_tensor logits;          /* row_stride resolved (never 0) */
    psm_params params;          /* per-row pointers live in logits.memory */
    psm_output tokens;          /* psm_sample: rows x num_samples int32 */
    psm_output logprobs;        /* psm_sample: optional (data may be NULL) */
    psm_tensor probs;           /* psm_probs: rows x vocab f32, row_stride resolved */
    int check_rows;             /* fail with PSM_ERR_BAD_ROW, writing nothing */
    int64_t first_bad_row;      /* out: set with PSM_ERR_BAD_ROW */
} psm_request;

typedef struct psm_backend_ops {
    int api_version;
    psm_backend id;

    /* Can a context be made now? Fills device_count (0 when not) and, when
     * not, a reason ("no CUDA device: cudaGetDeviceCount: ..."). Must be
     * cheap enough to call from psm_backend_available. */
    int (*probe)(int *device_count, char *reason, size_t reason_size);

    /* Makes the backend's state for one device. device_index is >= 0. */
    psm_status (*create)(const psm_context_options *options, int device_index,
                         void **state_out, char *device_name, size_t device_name_size);
    void (*destroy)(void *state);

    /* Grows the workspace so that calls up to this size allocate nothing. */
    psm_status (*reserve)(void *state, int64_t rows, int64_t vocab, int64_t num_samples);

    psm_status (*sample)(void *state, psm_request *request);
    psm_status (*probs)(void *state, psm_request *request);
    psm_status (*synchronize)(void *state);
} psm_backend_ops;

/* The registry (core/registry.c): NULL for a backend not compiled in. */
const psm_backend_ops *psm_registry_lookup(psm_backend backend);

/* Row parameters resolved from the scalars and per-row arrays (host side;
 * device backends do the same on the device with the contract header). */
typedef struct psm_row_params {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    uint64_t seed;
    uint32_t stream;   /* row index with a batch seed, 0 with per-row seeds */
} psm_row_params;

#endif /* PSM_BACKEND_H */
