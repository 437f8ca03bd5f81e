/*
 * opencl_backend.h: what the OpenCL backend's files share (host side,
 * OpenCL 1.2 API): the backend's state, its workspace buffers, the kernels
 * and the error helpers. opencl_backend.c creates and destroys the state and
 * lists the backend's operations; opencl_devices.c lists and probes devices;
 * opencl_programs.c loads the kernel sources and builds the program (with
 * the shared contexts and the program and binary caches; opencl_ptx.c adds
 * NVIDIA's register caps); opencl_buffers.c
 * holds each call's buffers (the context's own or carved from a caller's
 * workspace) and the checks of the caller's; opencl_launch.c turns a
 * request into the kernels' description and enqueues the pipeline.
 */
#ifndef PSM_OPENCL_BACKEND_H
#define PSM_OPENCL_BACKEND_H

#include "backend.h"
#include "error.h"

#include <CL/cl.h>

#include <stddef.h>

/* ---- errors (opencl_backend.c) -------------------------------------------- */

/* The name of an OpenCL error code ("CL_OUT_OF_RESOURCES"). */
const char *opencl_error_name(cl_int code);
/* PSM_ERR_OUT_OF_MEMORY for the allocation failures, PSM_ERR_DRIVER else. */
psm_status opencl_status_of(cl_int code);
/* Sets "OpenCL: <what> failed: <name> (<code>)" and returns its status. */
psm_status opencl_failure(cl_int code, const char *what);

#define CL_TRY(call, what)                                                                  \
    do {                                                                                    \
        cl_int cl_try_code_ = (call);                                                       \
        if (cl_try_code_ != CL_SUCCESS)                                                     \
            return opencl_failure(cl_try_code_, (what));                                    \
    } while (0)

#define PSM_TRY(call)                                                                       \
    do {                                                                                    \
        psm_status psm_try_status_ = (call);                                                \
        if (psm_try_status_ != PSM_OK)                                                      \
            return psm_try_status_;                                                         \
    } while (0)

/* ---- devices (opencl_devices.c) ---------------------------------------------- */

typedef struct device_list {
    cl_device_id *devices;
    cl_uint count;
} device_list;

/* Every GPU, then accelerator, then CPU device of every platform (the order
 * of device_index; one thread at a time). The caller frees list->devices. */
psm_status opencl_list_devices(device_list *list);
int opencl_probe(int *device_count, int *auto_device_count, char *reason, size_t reason_size);
/* A device's string property, NUL-terminated within size. */
psm_status opencl_device_string(cl_device_id device, cl_device_info what, char *out,
                                size_t size);
/* The work-group size to build the kernels for first (opencl_devices.c says
 * how it is chosen); 0 with *status set on failure. */
size_t opencl_initial_group_size(cl_device_id device, psm_status *status);

/* ---- the state ------------------------------------------------------------- */

/* psm_kernels.cl's programs (its PSM_PROGRAM_* names, in this order): the
 * sampling program, built with the context, and one program per feature,
 * built by the first call that needs it (opencl_use_programs), so that a
 * context compiles only the kernels its calls may run. */
enum {
    PROGRAM_SAMPLING,
    PROGRAM_PROCESSING,
    PROGRAM_ORDERS,
    PROGRAM_TOP_LOGPROBS,
    PROGRAM_VERIFY,
    PROGRAM_SHARDED,
    PROGRAM_COUNT
};
#define PROGRAM_BIT(program) (1u << (program))

/* The kernels, grouped by program in the order above (opencl_programs.c's
 * program_first_kernel). */
enum {
    KERNEL_TILE_REDUCE,
    KERNEL_ROW_TOP_K,
    KERNEL_ROW_FILTER,
    KERNEL_TILE_FILTER,
    KERNEL_ROW_COMBINE,
    KERNEL_DRAW,
    KERNEL_PROBS,
    KERNEL_PROCESS_READ,  /* logit processing, before the pipeline */
    KERNEL_PROCESS_LISTS,
    KERNEL_TILE_REDUCE_ON_READ, /* or applied as the rows are read */
    KERNEL_DRAW_ON_READ,
    KERNEL_ROW_ORDERS,    /* an engine's filter order, instead of the row top-k and filter */
    KERNEL_TOP_LOGPROBS,  /* top-N logprobs, after the draw */
    KERNEL_TOP_RANKS,     /* the sampled ranks, after it */
    KERNEL_VERIFY_EXPAND, /* psm_verify (opencl_verify.c) */
    KERNEL_VERIFY_ROWS,
    KERNEL_VERIFY_CHECK,
    KERNEL_VERIFY_TOTALS,
    KERNEL_VERIFY_WALK,
    KERNEL_SHARD_PASS,    /* a sharded call's pass (opencl_sharded.c) */
    KERNEL_COUNT
};
/* The kernels' names in the program, by the enum above. */
extern const char *const opencl_kernel_names[KERNEL_COUNT];

/* A program in the cache (opencl_programs.c), shared by the psm_contexts of
 * one (cl_context, device, options, sources). */
typedef struct cached_program cached_program;
/* The kernel sources a context builds its programs from (opencl_programs.c),
 * read at its creation and kept for the programs built later. */
typedef struct program_sources program_sources;

typedef struct device_buffer {
    cl_mem mem;
    size_t bytes;
} device_buffer;

/* The per-row arrays as the kernels take them: psm_row_arrays' order. */
#define OPENCL_ROW_ARRAYS 10
#define OPENCL_VERIFY_BUFFERS 48
#define OPENCL_SHARD_BUFFERS 4

/* The logit-processing arrays as the kernels take them: psm_process_lists'
 * arguments in order, then the allowed-token mask. */
enum {
    PROCESSING_HISTORY_OFFSETS,
    PROCESSING_HISTORY_TOKENS,
    PROCESSING_PROMPT_OFFSETS,
    PROCESSING_PROMPT_TOKENS,
    PROCESSING_BIAS_OFFSETS,
    PROCESSING_BIAS_TOKENS,
    PROCESSING_BIAS_VALUES,
    PROCESSING_REPETITION,
    PROCESSING_FREQUENCY,
    PROCESSING_PRESENCE,
    PROCESSING_MASK,
    OPENCL_PROCESSING_ARRAYS
};

/* The device buffers of one call, each the context's own (grown as calls
 * need it) or carved from a caller's workspace: per-tile and per-row state,
 * stagings of host inputs, and of outputs that are host memory or wait for
 * the row check. */
enum {
    PART_TILE_KEY,
    PART_TILE_INFO,
    PART_TILE_REF,
    PART_TILE_MASS,
    PART_TILE_PREFIX,
    PART_LANE_MAX, /* top-k rows: each lane's maximum (psm_tile_reduce) */
    PART_ROW_STATE,
    PART_LOGITS,   /* host logits copied in */
    PART_ROW_ARRAY, /* host per-row arrays copied in: OPENCL_ROW_ARRAYS parts */
    PART_PROCESSED = PART_ROW_ARRAY + OPENCL_ROW_ARRAYS, /* logit processing: rows x vocab f32
                                                          * (on read: the listed tokens' overlay) */
    PART_COUNTS,    /* logit processing: rows x vocab token counts */
    PART_LISTED,    /* processing on read: the rows' listed-token bits */
    PART_PROCESSING_ARRAY, /* host processing arrays copied in: OPENCL_PROCESSING_ARRAYS parts */
    PART_TOKENS = PART_PROCESSING_ARRAY + OPENCL_PROCESSING_ARRAYS,
    PART_LOGPROBS,
    PART_PROBS,
    /* top-N logprobs: the stage's tile keys (rows x tiles), then its
     * outputs' stagings (host memory or checking mode) */
    PART_TOP_KEY,
    PART_TOP_TOKENS,
    PART_TOP_LOGPROBS,
    PART_TOP_RANKS,
    PART_COUNT
};

typedef struct opencl_state {
    cl_context context;
    int own_context;
    cl_device_id device;
    cl_command_queue queue;
    int queue_out_of_order;
    program_sources *sources;
    cached_program *programs[PROGRAM_COUNT]; /* a feature's: NULL until a call needs it */
    cl_kernel kernels[KERNEL_COUNT];         /* NULL where their program is */
    size_t group_size; /* of every kernel of every program */
    cl_uint compute_units;
    cl_ulong local_memory;
    cl_ulong row_filter_local; /* local memory the row filter uses besides its row cache */
    cl_ulong max_allocation;
    size_t base_alignment; /* bytes: a sub-buffer's origin is a multiple of it */

    device_buffer own[PART_COUNT];
    /* psm_verify's buffers (opencl_verify.c): its stagings, per-row filters,
     * row results and checks, the n-th a call takes in the n-th slot. At
     * most 45 in a call: 4 inputs, 2 x 10 per-request arrays, 2 x 4 row
     * filters, 9 results, checks and the list of needed rows, 4 outputs. */
    device_buffer verify_own[OPENCL_VERIFY_BUFFERS];
    /* A sharded call's pass (opencl_sharded.c), by the SHARD_* enum there. */
    device_buffer shard_own[OPENCL_SHARD_BUFFERS];
    device_buffer first_bad_row; /* checking mode's result: allocated with the state */
} opencl_state;

/* One call's device buffers (opencl_buffers.c). */
typedef struct call_plan {
    size_t bytes[PART_COUNT]; /* 0: the call does not use the part */
} call_plan;

typedef struct call_buffers {
    cl_mem part[PART_COUNT];
    cl_mem carved[PART_COUNT]; /* sub-buffers of the caller's workspace, released after the call */
    int carved_count;
} call_buffers;

/* ---- programs (opencl_programs.c) -------------------------------------------- */

/* A context of our own for the device, shared with other psm_contexts. */
psm_status opencl_acquire_own_context(cl_device_id device, cl_context *context_out);
void opencl_release_own_context(cl_context context);
/* At context creation: loads the kernel sources, builds (or finds) the
 * sampling program for the state's context and device at the largest
 * work-group size each of its kernels allows, and creates its kernels:
 * state->sources, programs, kernels, group_size, row_filter_local. A
 * compile is told to options->notice. */
psm_status opencl_build_program(opencl_state *state, const psm_context_options *options,
                                const char *device_name);
/* Before a call enqueues anything: builds (or finds) the programs of
 * `programs` (PROGRAM_BIT()s) that the state does not have yet. The group
 * size stays one for every kernel: where a new kernel cannot run groups of
 * the state's size, every program the state has and the new ones are built
 * again at a smaller one (the state keeps its own until they are). No
 * notice: the callback belongs to psm_context_create. */
psm_status opencl_use_programs(opencl_state *state, unsigned programs);
/* Releases the state's kernels, programs and sources. */
void opencl_release_programs(opencl_state *state);

/* ---- buffers (opencl_buffers.c) ---------------------------------------------- */

/* Grows a context buffer to at least bytes. */
psm_status opencl_ensure_buffer(opencl_state *state, device_buffer *buffer, size_t bytes,
                                const char *what);
/* Releases every buffer the state owns. */
void opencl_release_workspace(opencl_state *state);
size_t opencl_tile_count(int64_t vocab);
psm_status opencl_reserve(void *opaque, int64_t rows, int64_t vocab, int64_t num_samples);
/* A caller's cl_mem: of this context and at least bytes long. */
psm_status opencl_check_device_buffer(opencl_state *state, void *pointer, size_t bytes,
                                      const char *what);
/* The per-row arrays of a request in the kernels' order, with the bytes the
 * kernels may read of each and its name; an absent one is NULL. */
void opencl_row_arrays(const psm_request *request, const void *arrays[OPENCL_ROW_ARRAYS],
                       size_t bytes[OPENCL_ROW_ARRAYS]);
extern const char *const opencl_row_array_names[OPENCL_ROW_ARRAYS];
/* The same for a request with logit processing (psm_processing_active), by
 * the PROCESSING_* enum. A host list's bytes come from its offsets' last
 * entry (the only host value a size query reads); a device list's tokens
 * and values are unknown on the host: 0 bytes (the kernels bound them by
 * their buffers' sizes). */
psm_status opencl_processing_arrays(const psm_request *request,
                                    const void *arrays[OPENCL_PROCESSING_ARRAYS],
                                    size_t bytes[OPENCL_PROCESSING_ARRAYS]);
extern const char *const opencl_processing_array_names[OPENCL_PROCESSING_ARRAYS];
/* The buffers a call needs: from the request's shapes, memory kinds and the
 * per-row pointers it has, never from its data pointers, so that a size
 * query and the call agree. */
psm_status opencl_plan_call(const psm_request *request, int probs_mode, call_plan *plan);
/* Whether a call's logit processing is applied as its rows are read
 * (psm_tile_reduce_on_read, psm_draw_on_read), without a processed copy of
 * the batch: where core/backend.h's psm_processing_on_read_possible says it
 * may be, for psm_sample calls (psm_probs keeps the copy: its on-read
 * kernel would be one more for PoCL to compile). */
int opencl_processing_on_read(const psm_request *request, int probs_mode);
psm_status opencl_workspace_size(void *opaque, const psm_request *request, int probs_mode,
                                 size_t *bytes);
/* The call's buffers: carved from the caller's workspace, or the context's
 * own, grown to the plan. opencl_release_call_buffers after the call's last
 * command is enqueued, whether it succeeded or not. */
psm_status opencl_call_buffers(opencl_state *state, const psm_request *request,
                               const call_plan *plan, call_buffers *buffers);
void opencl_release_call_buffers(call_buffers *buffers);
/* Input data as a cl_mem: the caller's, or a copy of host memory in staging. */
psm_status opencl_input_buffer(opencl_state *state, cl_mem staging, const void *data,
                               psm_memory memory, size_t bytes, const char *what, cl_mem *out);
/* Moves a staged output to where the caller wants it. */
psm_status opencl_deliver(opencl_state *state, cl_mem staged, psm_output output, size_t bytes);

/* ---- launch (opencl_launch.c) -------------------------------------------------- */

psm_status opencl_sample(void *opaque, psm_request *request);
psm_status opencl_probs(void *opaque, psm_request *request);
psm_status opencl_synchronize(void *opaque);
psm_status opencl_verify(void *opaque, psm_verify_request *request);
/* opencl_sharded.c */
psm_status opencl_shard_pass(void *opaque, const psm_tensor *logits,
                             const psm_shard_geometry *geometry, const psm_shard_item *items,
                             int64_t item_count, const psm_u64 *tile_keys, psm_u64 *out);

/* opencl_launch.c's parts that opencl_verify.c runs too. The description
 * type is psm_opencl_request.h's. */
struct psm_opencl_request;
void opencl_describe(const psm_request *request, struct psm_opencl_request *description);
psm_status opencl_set_request_args(cl_kernel kernel, const struct psm_opencl_request *description,
                                   cl_mem logits, const cl_mem arrays[OPENCL_ROW_ARRAYS],
                                   cl_uint *next);
psm_status opencl_set_arg(cl_kernel kernel, cl_uint *index, size_t size, const void *value);
psm_status opencl_enqueue(opencl_state *state, cl_kernel kernel, size_t groups_x, size_t rows,
                          const char *name);
size_t opencl_groups_over(const opencl_state *state, size_t items);
psm_status opencl_verify_row_passes(opencl_state *state, psm_request *request, cl_mem rows);

#endif /* PSM_OPENCL_BACKEND_H */
