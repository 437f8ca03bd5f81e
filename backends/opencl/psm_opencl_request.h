/*
 * psm_opencl_request.h: what the OpenCL host and kernels exchange, defined
 * once for both (it compiles as C and as OpenCL C 1.2).
 *
 * Every kernel takes the call's description as its first argument, one
 * psm_opencl_request passed by value, then the logits and the per-row
 * arrays (PSM_REQUEST_PARAMS in psm_kernels.cl), then its own buffers:
 * OpenCL 1.2 passes buffers only as kernel arguments, never inside a struct.
 * The host writes the struct with the same definition as the kernels read
 * it. So that both compilers lay it out alike, every member has a fixed
 * size and sits at a multiple of that size with no padding before it (8-byte
 * members first, then 4-byte ones, then an explicit pad to a multiple of 8):
 * C and OpenCL C both align scalars to their size, and the host checks that
 * no padding was added (opencl_launch.c), the kernels that the size agrees.
 */
#ifndef PSM_OPENCL_REQUEST_H
#define PSM_OPENCL_REQUEST_H

#ifndef PSM_ROW_H /* the OpenCL program has it already: see psm_kernels.cl */
#include "psm_row.h"
#endif

/* One call: the request, and the host's choices for this launch. */
typedef struct psm_opencl_request {
    psm_row_scalars scalars; /* the parameters of rows without per-row arrays */
    psm_i64 row_stride;      /* logits: elements from one row to the next */
    psm_i64 probs_stride;    /* psm_probs: output floats from one row to the next */
    psm_i32 dtype;           /* PSM_LOGITS_* (core/psm_row.h) */
    psm_i32 rows;            /* output rows (psm_request.rows) */
    psm_i32 vocab;
    psm_i32 tiles;           /* tiles per row: ceil(vocab / PSM_TILE) */
    psm_u32 per_row;         /* psm_request_per_row: the per-row arrays present */
    psm_i32 num_samples;     /* psm_sample */
    psm_i32 want_logprobs;   /* psm_sample: write logprobs */
    psm_i32 check_rows;      /* checking mode: record the first bad row */
    psm_i32 filters_ran;     /* psm_row_filter ran: the row states hold the cutoffs */
    psm_i32 top_k_ran;       /* psm_row_top_k ran before psm_row_filter */
    psm_i32 top_k_list_capacity; /* psm_row_top_k's list, in keys */
    psm_i32 use_row_cache;   /* psm_row_filter keeps the row in local memory */
    psm_i32 list_capacity;   /* else its candidate list, in keys (0: none) */
    psm_i32 filter_order;    /* psm_params.filter_order: PSM_ORDER_* (kernels/psm_stage_orders.h) */
} psm_opencl_request;

#define PSM_OPENCL_REQUEST_BYTES 112

/* Tokens of an output row that one item of psm_process_read processes: the
 * host launches a group per PSM_WG x PSM_PROCESS_SPAN tokens of a row. */
#define PSM_PROCESS_SPAN 16

/* Tiles of a row that one group of psm_top_ranks counts over: the host
 * launches a group per PSM_RANK_TILES tiles of each row. */
#define PSM_RANK_TILES 8

/* Whether a row is sampled, and how. */
#define PSM_ROW_SAMPLE 0
#define PSM_ROW_GREEDY 1
#define PSM_ROW_BAD 2

/* Whether a row is filtered, and who makes its kept tiles' masses. */
#define PSM_FILTER_NONE 0 /* no filter: psm_tile_reduce's masses stand */
#define PSM_FILTER_SCAN 1 /* psm_tile_filter reads the kept tiles again */
#define PSM_FILTER_DONE 2 /* made in the row kernel: psm_row_top_k from its list,
                            psm_row_filter for top-p alone */

/* Per-row results passed from kernel to kernel; only the kernels read it,
 * the host allocates rows x PSM_ROW_STATE_BYTES. */
typedef struct psm_row_state {
    psm_u64 cutoff;       /* smallest kept rank key; 0 keeps every valid token */
    psm_u64 min_weight;   /* min-p threshold on global weights; 0 when off */
    psm_u64 total;        /* sum of T_t */
    float maximum;        /* M */
    psm_i32 status;       /* PSM_ROW_* */
    psm_i32 filtered;     /* PSM_FILTER_*, set by the filter kernels (else by psm_row_combine) */
    psm_u32 greedy_token;
} psm_row_state;

#define PSM_ROW_STATE_BYTES 40

#endif /* PSM_OPENCL_REQUEST_H */
