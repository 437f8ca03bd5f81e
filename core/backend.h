/*
 * backend.h: what core/ asks of a backend.
 *
 * A backend is a table of functions (psm_backend_ops) filled with designated
 * initialisers; core/registry.c holds the CPU one and loads the GPU modules
 * (core/module.h). Core validates
 * every request before it reaches a backend, so a backend may assume:
 * non-NULL pointers, rows >= 1, 1 <= vocab <= INT32_MAX, row_stride >= vocab,
 * num_samples >= 1, valid scalar parameters, and host per-row arrays already
 * checked. Per-row arrays in device memory are not checked on the host: a
 * backend gives a row with an out-of-range value token -1 (psm_row_params_valid).
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

    psm_status (*sample)(void *state, psm_request *request);
    psm_status (*probs)(void *state, psm_request *request);
    psm_status (*synchronize)(void *state);
} psm_backend_ops;

/* The registry (core/registry.c). A GPU backend is a module loaded on first
 * use: psm_registry_load gives NULL when it was not built or cannot be
 * loaded, with failure (optional) saying why. */
int psm_registry_built(psm_backend backend);
const psm_backend_ops *psm_registry_load(psm_backend backend, const char **failure);
const psm_backend_ops *psm_registry_lookup(psm_backend backend);

#endif /* PSM_BACKEND_H */
