/*
 * psm_gpu_kernels.cuh: the sampling kernels, shared by the CUDA and HIP
 * backends (vendor names come from psm_gpu.h only).
 *
 * Every quantity that decides a token is computed with core/psm_contract.h;
 * this file only decides how the work is spread over the GPU. The row
 * algorithm is docs/SAMPLING.md:
 *
 *   launch 1, tile kernel (one warp per 1024-token tile, all rows at once):
 *     the tile pass of kernels/psm_stage_tile.h, shared with the OpenCL
 *     backend: reads the tile once, into registers: the tile max m_t (as a
 *     rank key), valid count, bad flag, and for plain rows the tile mass S_t
 *     against m_t.
 *   launch 1b, check kernel (checking mode only): first bad row.
 *   launch 2, row kernel (one block per row; with filters and few enough
 *   rows, several blocks per row, see "split rows"):
 *     combines the tiles (row max M, greedy token, bad rows); with filters,
 *     finds the top-k / top-p cutoff and makes the tile masses over the kept
 *     set; then rescales the tile masses to the row (T_t), scans them, and
 *     draws each sample: the tile by a warp search over the scan, the token
 *     by warp scans of w_i over that tile only. psm_probs runs the same
 *     kernel and writes the final distribution instead of drawing. The
 *     kept tile masses, the draw and the distribution are the stages of
 *     kernels/psm_stage_draw.h, shared with the OpenCL backend.
 *   launch 3, top-N kernel (one block per row; calls with top_logprobs
 *     only): the stage of kernels/psm_stage_top_logprobs.h over the tile
 *     masses launch 2 left, with each row's filter values, which launch 2
 *     stores for it (psm_gpu_kept_filters);
 *   launch 4, rank kernel (with sampled ranks only; a block per few tiles
 *     of a row): the count that finishes each drawn token's rank.
 *
 * Filtered rows: the row kernel bins the row's tokens by their gap to M,
 * gathers the tokens of the bin where the cutoff lies into a short list and
 * ranks it exactly (psm_gpu_select_cutoff). Top-k bins the lane maxima of
 * launch 1 instead of the row, and gathers from the few lanes that can hold
 * a candidate; top-p alone and min-p read the row again.
 */
#ifndef PSM_GPU_KERNELS_CUH
#define PSM_GPU_KERNELS_CUH

#include "psm_gpu.h"
#include "psm_gpu_warp.h"
#include "psm_contract.h"
#include "psm_row.h"
#include "psm_stage_tile.h"
#include "psm_stage_draw.h"
#include "psm_stage_select.h"
#include "psm_stage_bins.h"
#include "psm_stage_orders.h"
#include "psm_stage_top_logprobs.h"
#include "polysample.h"

namespace PSM_GPU_NAMESPACE {

/* Threads of the tile kernel's blocks: several warps, one tile each (at most;
 * a call with few tiles launches blocks of two warps). */
#define PSM_GPU_TILE_THREADS 256
/* Blocks of it per multiprocessor that the variant processing logits as it
 * reads them must fit, as many as the plain variant fits (64 registers a
 * thread, none spilled): left free, the compiler gives it some 100
 * registers, half the blocks at once, and the tile pass then waits on
 * memory with half the loads in flight. 0 (the plain variant's) sets no
 * bound. */
#ifndef PSM_GPU_TILE_ON_READ_BLOCKS
#define PSM_GPU_TILE_ON_READ_BLOCKS 4
#endif
/* Threads of the row kernel's blocks (one row per block): rows with filters
 * and plain rows (whose work is per tile and per sample). A filtered row's
 * work is mostly a chain of short steps, each waiting for the one before
 * (latency, not throughput), so more rows at once beat more threads a row:
 * six blocks of 128 per multiprocessor, as many threads as three of 256. */
#define PSM_GPU_ROW_THREADS 128
#define PSM_GPU_ROW_BLOCKS_PER_SM 6
#define PSM_GPU_ROW_THREADS_PLAIN 128
/* The group operations (kernels/psm_portable.h) combine one value per warp
 * in a single warp. */
static_assert(PSM_GPU_ROW_THREADS <= 32 * 32,
              "psm_group_scratch holds at most 32 warps' values");

/* The kernels test the logits' dtype by psm_dtype's values (the template
 * arguments) and the shared stages by core/psm_row.h's. */
static_assert(PSM_LOGITS_F32 == PSM_DTYPE_F32 && PSM_LOGITS_F16 == PSM_DTYPE_F16 &&
                  PSM_LOGITS_BF16 == PSM_DTYPE_BF16,
              "core/psm_row.h's dtype values are psm_dtype's");
/* ... and kernels/psm_stage_orders.h's order values psm_filter_order's (the
 * OpenCL kernels read the same header). */
static_assert(PSM_ORDER_POLYSAMPLE == PSM_FILTER_ORDER_POLYSAMPLE &&
                  PSM_ORDER_VLLM == PSM_FILTER_ORDER_VLLM &&
                  PSM_ORDER_SGLANG == PSM_FILTER_ORDER_SGLANG &&
                  PSM_ORDER_LLAMA_CPP == PSM_FILTER_ORDER_LLAMA_CPP &&
                  PSM_ORDER_FLASHINFER_TOP_K_FIRST == PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST &&
                  PSM_ORDER_FLASHINFER_JOINT == PSM_FILTER_ORDER_FLASHINFER_JOINT,
              "kernels/psm_stage_orders.h's order values are psm_filter_order's");

/* Filtered rows' cutoff search (psm_gpu_select_cutoff, over the gap bins of
 * core/psm_row.h): the most tokens its candidate list holds. */
#define PSM_GPU_LIST_CAPACITY 1024

/* Split rows. When a call may filter and has too few rows to fill the
 * device (at most half the blocks of the filtered row kernel that can be
 * resident at once), one block per row would leave most of the GPU idle,
 * or at low occupancy, while it reads its row several times. The host then
 * launches the row kernel cooperatively (every block resident at once, or
 * the launch fails) with row_parts blocks per row: the blocks of a row read
 * disjoint slices of it, pool what they found (gap-bin counts, candidate
 * keys, tile masses) here in global memory, and meet at a per-row barrier;
 * the decisions that follow are taken by every block alike from the pooled
 * data, and block 0 of the row alone writes the outputs. */
struct psm_gpu_split_pool {
    unsigned long long bin_mass[PSM_GAP_BINS];
    psm_u32 bin_count[PSM_GAP_BINS];      /* the row's tokens */
    psm_u32 lane_bin_count[PSM_GAP_BINS]; /* top-k: launch 1's lane maxima */
    psm_u32 arrivals;     /* blocks that reached a row barrier, over all barriers */
    psm_u32 list_size[2]; /* candidates found, per gathering round */
    psm_u32 unused;       /* keeps the pool a whole number of 8-byte words */
};
struct psm_gpu_split_row {
    psm_gpu_split_pool pool; /* cleared by launch 1 of every split call */
    psm_u64 list_key[PSM_GPU_LIST_CAPACITY];
};

/* A row's kept rule's filter values, as the row kernel found them, for the
 * top-N kernel (launch 3) and psm_verify: cutoff 0 and min_weight 0 keep
 * every valid token. Written for sampled rows only (not bad or greedy
 * ones). */
struct psm_gpu_kept_filters {
    psm_u64 cutoff;
    psm_u64 min_weight;
    float row_max; /* M, for psm_verify's rows (psm_gpu_verify.cuh) */
    psm_u32 unused;
};

/* Everything one call needs on the device, passed by value to each kernel.
 * Per-row pointers are device pointers or NULL (use the scalar). Rows are
 * the request's output rows: output row r reads logits row
 * psm_resolve_row(r).logits_row, and the logits may have a different number
 * of rows (scalars.logits_rows). */
struct psm_gpu_call {
    const void *logits;
    psm_i64 rows; /* output rows */
    psm_i64 vocab;
    psm_i64 row_stride;
    int logits_aligned; /* base and row stride allow 16-byte loads */
    int weight_bits;

    psm_row_scalars scalars;
    psm_u32 per_row;               /* PSM_PER_ROW_* bits: what is read from memory */
    psm_row_arrays per_row_arrays; /* device pointers */
    psm_i32 num_samples;
    psm_i32 filter_order; /* psm_params.filter_order: PSM_ORDER_* */

    /* workspace: one entry per tile of every output row */
    psm_i64 tiles_per_row;
    psm_u64 *tile_key;    /* best rank key of the tile's (kept) logits, 0: none */
    psm_u64 *tile_mass;   /* S_t */
    psm_u32 *tile_info;   /* valid count | bad flag (launch 1) */
    psm_u32 *lane_max;    /* rows with top-k: each lane's maximum (launch 1, see there) */
    psm_u64 *tile_prefix; /* inclusive running sum of T_t over the row */
    unsigned long long *first_bad_row;

    /* blocks per row of the row kernel: 1, or more in a split launch, whose
     * rows pool their work in split[row] */
    psm_i32 row_parts;
    psm_gpu_split_row *split;

    /* logit processing applied as the tile and draw stages read the rows
     * (psm_read_processing); NULL pointers where the call has none, or where
     * the pipeline reads a processed copy of the batch instead (the launch
     * decides, backends/cuda/psm_gpu_processing.cuh) */
    const psm_u32 *read_mask;   /* the output rows' allowed-token words */
    psm_i64 read_mask_words;    /* per row */
    const psm_u32 *read_listed; /* their listed-token bits, psm_listed_words a row */
    const float *read_overlay;  /* their listed tokens' values, vocab a row */

    /* top-N logprobs and psm_verify: each row's filter values (NULL: the
     * call has none) */
    psm_gpu_kept_filters *kept_filters;
    /* psm_verify's row passes: each row's kept rule, M and running sums of
     * T_t (tile_prefix) are all they use, so a sampled row of the plain
     * variants draws nothing and its token is 0 (a bad row's -1 and a
     * greedy row's token stay); the filtered variants draw all the same,
     * so that their registers stay as they were */
    psm_i32 rule_only;

    /* outputs (device memory) */
    psm_i32 *tokens;
    float *logprobs; /* may be NULL */
    float *probs;    /* psm_probs only */
    psm_i64 probs_stride;
};

/* ---- reading logits ------------------------------------------------------ */

template <int Dtype>
struct psm_gpu_dtype_traits;
template <>
struct psm_gpu_dtype_traits<PSM_DTYPE_F32> {
    enum { element_bytes = 4, per_vector = 4 };
};
template <>
struct psm_gpu_dtype_traits<PSM_DTYPE_F16> {
    enum { element_bytes = 2, per_vector = 8 };
};
template <>
struct psm_gpu_dtype_traits<PSM_DTYPE_BF16> {
    enum { element_bytes = 2, per_vector = 8 };
};

/* 16 bytes of elements starting at index (a multiple of per_vector, with the
 * row base 16-byte aligned). */
template <int Dtype>
PSM_GPU_DEVICE uint4 psm_gpu_load_raw_vector(const unsigned char *row_base, psm_i64 index)
{
    return *(const uint4 *)(row_base + index * psm_gpu_dtype_traits<Dtype>::element_bytes);
}

/* The first element of a logits row (psm_row_params.logits_row, which only a
 * valid row may read). */
template <int Dtype>
PSM_GPU_DEVICE const unsigned char *psm_gpu_row_base(const psm_gpu_call &call, psm_i64 logits_row)
{
    return (const unsigned char *)call.logits +
           logits_row * call.row_stride * (psm_i64)psm_gpu_dtype_traits<Dtype>::element_bytes;
}

/* A row as the selection and draw code reads it: value(i) is the logit after
 * psm_read_logit. */
template <int Dtype>
struct psm_gpu_global_row {
    const unsigned char *base;
    psm_i64 vocab;
    PSM_GPU_DEVICE float value(psm_i64 index) const
    {
        return psm_read_logit(psm_raw_logit(base, Dtype, index));
    }
};

/* The row as the shared selection stage reads it (a reader of
 * kernels/psm_portable.h): every token, its rank key where it is valid. */
template <int Dtype>
PSM_GPU_DEVICE psm_i64 psm_reader_count(const psm_gpu_global_row<Dtype> *row)
{
    return row->vocab;
}

template <int Dtype>
PSM_GPU_DEVICE psm_u64 psm_reader_key(const psm_gpu_global_row<Dtype> *row, psm_i64 index,
                                      float *x)
{
    *x = row->value(index);
    return psm_logit_class(*x) == PSM_LOGIT_VALID ? psm_rank_key(*x, (psm_u32)index) : 0;
}

/* Output row `row`'s processing as its tiles are read. */
PSM_GPU_DEVICE psm_read_processing psm_gpu_read_processing(const psm_gpu_call &call, psm_i64 row)
{
    return psm_row_read_processing(call.read_mask, call.read_mask_words, call.read_listed,
                                   call.read_overlay, row, call.vocab);
}

/* Output row `row`'s parameters (core/psm_row.h). */
PSM_GPU_DEVICE psm_row_params psm_gpu_row_params(const psm_gpu_call &call, psm_i64 row)
{
    return psm_resolve_row(row, call.per_row, call.scalars, call.per_row_arrays);
}

/* ---- block-level helpers (row kernel) ------------------------------------ */

template <int WarpSize>
PSM_GPU_DEVICE int psm_gpu_block_warps(void)
{
    return (int)(blockDim.x / WarpSize);
}

/* The row kernel's group-shared memory besides the filters' own. */
struct psm_gpu_row_scratch {
    psm_group_scratch group;
    psm_radix_scratch radix;
};

/* Loads tile `tile_start` of a row into x, in the team layout of
 * kernels/psm_portable.h (interleaved: 16-byte vectors, consecutive lanes on
 * consecutive vectors). Past the end of the row reads as -inf. Values are
 * raw (before psm_read_logit). */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE void psm_gpu_load_tile(const psm_gpu_call &call, const unsigned char *row_base,
                                      psm_i64 tile_start, int lane, float *x)
{
    const psm_i64 remaining = call.vocab - tile_start;
    psm_team_load_tile(psm_team<WarpSize>{lane},
                       row_base + tile_start * psm_gpu_dtype_traits<Dtype>::element_bytes, Dtype,
                       remaining < PSM_TILE ? (int)remaining : PSM_TILE, call.logits_aligned,
                       PSM_INTERLEAVED, x);
}

/* The token of slot `slot` of lane `lane` in psm_gpu_load_tile's layout. */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE psm_i64 psm_gpu_tile_token(psm_i64 tile_start, int lane, int slot)
{
    return tile_start +
           psm_slot_offset(slot, lane, WarpSize, psm_vector_shift(Dtype), PSM_INTERLEAVED);
}

/* Tokens [begin, end) of a row; begin is a multiple of PSM_TILE. */
struct psm_gpu_slice {
    psm_i64 begin, end;
};

/* Calls visit(i, x) for every token i of the slice, x after psm_read_logit,
 * the whole block together: each thread takes 16-byte vectors, four of them
 * loaded before any is used, so that a pass over the row keeps several loads
 * in flight per thread. */
template <int Dtype, class Visit>
PSM_GPU_DEVICE void psm_gpu_for_each_logit(const psm_gpu_call &call, const unsigned char *row_base,
                                           psm_gpu_slice slice, Visit &&visit)
{
    const int per_vector = psm_gpu_dtype_traits<Dtype>::per_vector;
    const int batch = 4;
    if (slice.begin >= slice.end)
        return;
    psm_i64 vector_end = slice.begin;
    if (call.logits_aligned) {
        const psm_i64 vectors = slice.end / per_vector;
        vector_end = vectors * per_vector;
        for (psm_i64 first = slice.begin / per_vector + threadIdx.x; first < vectors;
             first += (psm_i64)blockDim.x * batch) {
            uint4 raw[batch];
#pragma unroll
            for (int b = 0; b < batch; ++b) {
                const psm_i64 v = first + (psm_i64)b * blockDim.x;
                if (v < vectors)
                    raw[b] = psm_gpu_load_raw_vector<Dtype>(row_base, v * per_vector);
            }
#pragma unroll
            for (int b = 0; b < batch; ++b) {
                const psm_i64 v = first + (psm_i64)b * blockDim.x;
                if (v < vectors) {
                    float values[per_vector];
                    psm_unpack_vector(raw[b], Dtype, values);
#pragma unroll
                    for (int k = 0; k < per_vector; ++k)
                        visit(v * per_vector + k, psm_read_logit(values[k]));
                }
            }
        }
    }
    for (psm_i64 i = vector_end + threadIdx.x; i < slice.end; i += blockDim.x)
        visit(i, psm_read_logit(psm_raw_logit(row_base, Dtype, i)));
}

/* ---- launch 1: tile statistics ------------------------------------------ */

/* A split call's pools start empty: launch 1 clears them (launch 2 runs
 * after it in stream order). */
PSM_GPU_DEVICE void psm_gpu_clear_split_pools(const psm_gpu_call &call)
{
    const psm_i64 words_per_row = sizeof(psm_gpu_split_pool) / sizeof(psm_u32);
    const psm_i64 words = call.rows * words_per_row;
    for (psm_i64 w = (psm_i64)blockIdx.x * blockDim.x + threadIdx.x; w < words;
         w += (psm_i64)gridDim.x * blockDim.x) {
        const psm_i64 row = w / words_per_row;
        ((psm_u32 *)&call.split[row].pool)[w - row * words_per_row] = 0;
    }
}

/* One warp per tile, the blocks' warps taking the call's tiles in turn: the
 * tile pass of kernels/psm_stage_tile.h. The row kernel remakes the tile
 * masses of every row that may filter. OnRead: the variant for calls whose
 * rows it processes as it reads them (call.read_*), a variant of its own
 * because that code takes registers (97 against 57 for f32 on sm_90), which
 * would lower every other call's occupancy. */
template <int WarpSize, int Dtype, bool OnRead>
PSM_GPU_DEVICE void psm_gpu_tile_body(const psm_gpu_call &call)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    const psm_i64 warps_per_block = blockDim.x / WarpSize; /* at most PSM_GPU_TILE_THREADS */
    const psm_i64 total_tiles = call.rows * call.tiles_per_row;
    if (call.row_parts > 1)
        psm_gpu_clear_split_pools(call);

    psm_tile_call tile_call;
    tile_call.logits = (const unsigned char *)call.logits;
    tile_call.row_stride = call.row_stride;
    tile_call.vocab = call.vocab;
    tile_call.dtype = Dtype;
    tile_call.aligned = call.logits_aligned;
    tile_call.weight_bits = call.weight_bits;
    tile_call.mass_rule = PSM_TILE_MASS_UNLESS_MAY_FILTER;
    psm_tile_outputs out;
    out.tile_key = call.tile_key;
    out.tile_info = call.tile_info;
    out.tile_mass = call.tile_mass;
    out.lane_max = call.lane_max;
    out.tile_reference = nullptr; /* the row kernel reads m_t from tile_key */

    for (psm_i64 tile_id = (psm_i64)blockIdx.x * warps_per_block + threadIdx.x / WarpSize;
         tile_id < total_tiles; tile_id += (psm_i64)gridDim.x * warps_per_block) {
        const psm_i64 row = tile_id / call.tiles_per_row;
        /* The seed, offset and stream are not used by the tile pass, so they
         * compile away. */
        psm_stage_tile(team, tile_call, psm_gpu_row_params(call, row),
                       OnRead ? psm_gpu_read_processing(call, row) : psm_no_read_processing(),
                       tile_id,
                       (tile_id - row * call.tiles_per_row) * PSM_TILE, 1, psm_tile_posts(), out);
    }
}

template <int WarpSize, int Dtype, bool OnRead>
PSM_GPU_KERNEL void
    __launch_bounds__(PSM_GPU_TILE_THREADS, OnRead ? PSM_GPU_TILE_ON_READ_BLOCKS : 0)
    psm_gpu_tile_kernel(const psm_gpu_call call)
{
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_gpu_tile_body<WarpSize, Dtype, OnRead>(call);
}

/* ---- launch 1b (checking mode): the first bad row ----------------------- */

template <int WarpSize>
PSM_GPU_DEVICE void psm_gpu_check_body(const psm_gpu_call &call)
{
    const psm_gpu_hardware_lanes<WarpSize> lanes;
    const int lane = threadIdx.x % WarpSize;
    const psm_i64 warps_per_block = PSM_GPU_TILE_THREADS / WarpSize;
    for (psm_i64 row = (psm_i64)blockIdx.x * warps_per_block + threadIdx.x / WarpSize;
         row < call.rows; row += (psm_i64)gridDim.x * warps_per_block) {
        psm_u32 bad = 0;
        psm_u64 valid_count = 0;
        for (psm_i64 tile = lane; tile < call.tiles_per_row; tile += WarpSize) {
            psm_u32 info = call.tile_info[row * call.tiles_per_row + tile];
            bad |= (info & PSM_TILE_BAD_FLAG) ? 1u : 0u;
            valid_count += info & PSM_TILE_COUNT_MASK;
        }
        bad = psm_warp_any<WarpSize>(bad, lanes);
        valid_count = psm_warp_sum<WarpSize>(valid_count, lanes);
        if (lane == 0) {
            psm_row_params p = psm_gpu_row_params(call, row);
            if (bad || valid_count == 0 || !p.valid)
                psm_gpu_atomic_min_u64(call.first_bad_row, (unsigned long long)row);
        }
    }
}

template <int WarpSize>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_TILE_THREADS)
    psm_gpu_check_kernel(const psm_gpu_call call)
{
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_gpu_check_body<WarpSize>(call);
}

/* ---- launch 2: per row --------------------------------------------------- */

/* What a row needs after the tiles are combined. */
struct psm_gpu_row_state {
    psm_i64 row;
    psm_i64 tile_base; /* index of the row's first tile in the workspace */
    float row_max;     /* M */
    float scale;       /* s */
    psm_u64 cutoff;    /* kept: rank key >= cutoff (0: every valid token) */
    psm_u64 min_weight; /* kept: g_i >= min_weight (0: no min-p) */
    int filtered;      /* tile masses are made over the kept set here */
};

/* The row's kept test (core/psm_row.h), once its cutoff is known. */
PSM_GPU_DEVICE psm_kept_rule psm_gpu_kept_rule(const psm_gpu_call &call,
                                               const psm_gpu_row_state &state)
{
    return psm_make_kept_rule(state.cutoff, state.min_weight, state.row_max, state.scale,
                              call.weight_bits);
}

/* Tile `tile` of a row whose logits row starts at row_base, processed as
 * they are read as `processing` says, for the stages of
 * kernels/psm_stage_draw.h. */
template <int Dtype>
PSM_GPU_DEVICE psm_tile_place psm_gpu_tile_place(const psm_gpu_call &call,
                                                 const unsigned char *row_base,
                                                 psm_read_processing processing, psm_i64 tile)
{
    const psm_i64 first = tile * PSM_TILE;
    const psm_i64 remaining = call.vocab - first;
    psm_tile_place place;
    place.logits = row_base + first * psm_gpu_dtype_traits<Dtype>::element_bytes;
    place.first = first;
    place.count = remaining < PSM_TILE ? (int)remaining : PSM_TILE;
    place.dtype = Dtype;
    place.aligned = call.logits_aligned;
    place.processing = processing;
    return place;
}

/* Outputs of a row that has no distribution: bad (token -1, NaN) or greedy
 * (the argmax, logprob 0, a point mass). */
PSM_GPU_DEVICE void psm_gpu_write_point_row(const psm_gpu_call &call, psm_i64 row, int probs_mode,
                                            psm_i32 token)
{
    const float fill = token < 0 ? __int_as_float(0x7fc00000) : 0.0f;
    if (probs_mode) {
        float *out = call.probs + row * call.probs_stride;
        for (psm_i64 i = threadIdx.x; i < call.vocab; i += blockDim.x)
            out[i] = (token >= 0 && i == token) ? 1.0f : fill;
        return;
    }
    for (psm_i64 j = threadIdx.x; j < call.num_samples; j += blockDim.x) {
        call.tokens[row * call.num_samples + j] = token;
        if (call.logprobs)
            call.logprobs[row * call.num_samples + j] = fill;
    }
}

/* ---- split rows (see psm_gpu_split_pool) --------------------------------- */

/* This block's share of its row. */
struct psm_gpu_row_split {
    int part, parts;
    psm_gpu_split_row *shared; /* the row's pool; NULL when parts == 1 */
    psm_u32 barriers;          /* row barriers passed so far */
    psm_gpu_slice slice;       /* the tokens this block reads in a pass over the row */
};

PSM_GPU_DEVICE psm_gpu_row_split psm_gpu_make_split(const psm_gpu_call &call, psm_i64 row, int part)
{
    psm_gpu_row_split split;
    split.part = part;
    split.parts = call.row_parts;
    split.shared = call.row_parts > 1 ? call.split + row : nullptr;
    split.barriers = 0;
    /* Whole tiles per block, so that slices start on 16-byte vectors. */
    const psm_i64 tiles_per_part = (call.tiles_per_row + split.parts - 1) / split.parts;
    const psm_i64 begin = part * tiles_per_part * PSM_TILE;
    const psm_i64 end = begin + tiles_per_part * PSM_TILE;
    split.slice.begin = begin < call.vocab ? begin : call.vocab;
    split.slice.end = end < call.vocab ? end : call.vocab;
    return split;
}

/* Pooled data written by other blocks: read past this block's L1. */
template <class T>
PSM_GPU_DEVICE T psm_gpu_read_pooled(const T *address)
{
    return *(const volatile T *)address;
}

/* The blocks of a split row wait here for each other; the global writes of
 * each before the barrier are visible to all after it. It is the usual grid
 * barrier (block barrier; one thread fences, arrives and spins; fence; block
 * barrier) over the row's blocks only, which the cooperative launch keeps
 * resident together. Every block of a row passes the same barriers, since
 * each decision between them is taken from pooled data. Without a split, a
 * block barrier. */
PSM_GPU_DEVICE void psm_gpu_row_barrier(psm_gpu_row_split &split)
{
    psm_gpu_block_barrier();
    if (split.parts == 1)
        return;
    ++split.barriers;
    if (threadIdx.x == 0) {
        psm_u32 *arrivals = &split.shared->pool.arrivals;
        const psm_u32 everyone = split.barriers * (psm_u32)split.parts;
        psm_gpu_device_fence();
        psm_gpu_atomic_add_u32(arrivals, 1u);
        while (psm_gpu_read_pooled(arrivals) < everyone) {
        }
        psm_gpu_device_fence();
    }
    psm_gpu_block_barrier();
}

/* ---- filtered rows: the cutoff from gap bins and a candidate list -------- */

/* A valid token's bin is its gap to M in 1/16 of a log2 unit (gaps of 64 and
 * more share the last bin). The bin is a non-decreasing function of the gap,
 * and the gap a non-increasing function of the logit, so the bins cut the
 * rank order into consecutive runs: every token of a lower bin ranks before
 * every token of a higher one. One pass counts the bins (and, for top-p
 * alone, sums g_i per bin); the cutoff lies in one bin, whose tokens (for
 * top-k, with every token of the bins before it) are gathered by a second
 * pass into a list that is ranked by counting and walked exactly. */
struct psm_gpu_select_scratch {
    psm_u32 bin_count[PSM_GAP_BINS];
    psm_u64 bin_mass[PSM_GAP_BINS];
    psm_u64 list_key[PSM_GPU_LIST_CAPACITY];
    psm_u64 list_weight[PSM_GPU_LIST_CAPACITY]; /* g_i of each listed token */
    psm_u16 order[PSM_GPU_LIST_CAPACITY];       /* order[rank] = list index */
    psm_u32 list_size;
    psm_u32 pool_base; /* split rows: where this block's candidates go in the pool */
    int first_bin, last_bin; /* the list: valid tokens whose bin is in [first, last] */
    int status;
    psm_u64 need;        /* top-k: k; top-p alone: its target */
    psm_u64 mass_before; /* top-p alone: g mass of the bins before the list */
    psm_u64 cutoff;
    psm_u32 kept;        /* ranks [0, kept) of the list are within the cutoff */
};

#define PSM_GPU_SELECT_LIST 0      /* cutoff found; with top-k the list holds every kept token */
#define PSM_GPU_SELECT_TOP_ONLY 1  /* top-p target 0: the top token alone */
#define PSM_GPU_SELECT_FALLBACK 2  /* the list would not fit: radix select */

/* Split rows: adds this block's gap-bin counts (and, with masses, their
 * masses) to the row's pool, then takes the pooled totals as its own. */
PSM_GPU_DEVICE void psm_gpu_pool_bins(psm_gpu_row_split &split, psm_gpu_select_scratch &select,
                                      psm_u32 *pool_count, unsigned long long *pool_mass)
{
    psm_gpu_block_barrier();
    for (int b = threadIdx.x; b < PSM_GAP_BINS; b += blockDim.x) {
        if (select.bin_count[b] != 0)
            psm_gpu_atomic_add_u32(&pool_count[b], select.bin_count[b]);
        if (pool_mass && select.bin_mass[b] != 0)
            psm_gpu_atomic_add_u64(&pool_mass[b], (unsigned long long)select.bin_mass[b]);
    }
    psm_gpu_row_barrier(split);
    for (int b = threadIdx.x; b < PSM_GAP_BINS; b += blockDim.x) {
        select.bin_count[b] = psm_gpu_read_pooled(&pool_count[b]);
        if (pool_mass)
            select.bin_mass[b] = psm_gpu_read_pooled(&pool_mass[b]);
    }
    psm_gpu_block_barrier();
}

/* Split rows: appends this block's candidates to the row's pooled list, then
 * takes the pooled list as its own (its size, and its keys when they fit). */
PSM_GPU_DEVICE void psm_gpu_pool_list(psm_gpu_row_split &split, psm_gpu_select_scratch &select,
                                      int round)
{
    psm_gpu_split_row &shared = *split.shared;
    const psm_u32 found = select.list_size;
    const psm_u32 held = found < PSM_GPU_LIST_CAPACITY ? found : PSM_GPU_LIST_CAPACITY;
    if (threadIdx.x == 0)
        select.pool_base = psm_gpu_atomic_add_u32(&shared.pool.list_size[round], found);
    psm_gpu_block_barrier();
    for (psm_u32 j = threadIdx.x; j < held; j += blockDim.x) {
        const psm_u32 slot = select.pool_base + j;
        if (slot < PSM_GPU_LIST_CAPACITY)
            shared.list_key[slot] = select.list_key[j];
    }
    psm_gpu_row_barrier(split);
    const psm_u32 pooled = psm_gpu_read_pooled(&shared.pool.list_size[round]);
    if (pooled <= PSM_GPU_LIST_CAPACITY)
        for (psm_u32 j = threadIdx.x; j < pooled; j += blockDim.x)
            select.list_key[j] = psm_gpu_read_pooled(&shared.list_key[j]);
    if (threadIdx.x == 0)
        select.list_size = pooled;
    psm_gpu_block_barrier();
}

/* Calls visit(j, bin) for each lane maximum of launch 1 (top-k rows) in the
 * tiles of this block's slice that is not empty: j indexes the row's lanes
 * (tile * WarpSize + lane), bin is the maximum's gap bin
 * (psm_lane_max_bin). */
template <int WarpSize, class Visit>
PSM_GPU_DEVICE void psm_gpu_for_each_lane_max(const psm_gpu_call &call,
                                              const psm_gpu_row_state &state, psm_gpu_slice slice,
                                              Visit &&visit)
{
    if (slice.begin >= slice.end)
        return;
    const psm_u32 *lane_max = call.lane_max + state.tile_base * WarpSize;
    const psm_i64 end = (slice.end + PSM_TILE - 1) / PSM_TILE * WarpSize;
    for (psm_i64 j = slice.begin / PSM_TILE * WarpSize + threadIdx.x; j < end; j += blockDim.x) {
        const int bin = psm_lane_max_bin(lane_max[j], state.row_max, state.scale);
        if (bin >= 0)
            visit(j, bin);
    }
}

/* Calls visit(i, x) for the tokens of this block's slice that lie in lanes
 * (of launch 1's tile layout, psm_gpu_load_tile) whose maximum falls in a
 * gap bin up to last_bin: no other token can lie in those bins
 * (psm_lane_max_bin), and top-k's gathering reads these lanes (a few per k)
 * instead of the row. */
template <int WarpSize, int Dtype, class Visit>
PSM_GPU_DEVICE void psm_gpu_for_each_logit_of_lanes(const psm_gpu_call &call,
                                                    const unsigned char *row_base,
                                                    const psm_gpu_row_state &state,
                                                    psm_gpu_slice slice, int last_bin, Visit &&visit)
{
    psm_gpu_for_each_lane_max<WarpSize>(call, state, slice, [&](psm_i64 j, int bin) {
        if (bin > last_bin)
            return;
        const psm_i64 tile_start = j / WarpSize * PSM_TILE;
        const int lane = (int)(j % WarpSize);
        float x[PSM_TILE / WarpSize]; /* past the row's end: -inf, never valid */
        psm_gpu_load_tile<WarpSize, Dtype>(call, row_base, tile_start, lane, x);
#pragma unroll
        for (int slot = 0; slot < PSM_TILE / WarpSize; ++slot)
            visit(psm_gpu_tile_token<WarpSize, Dtype>(tile_start, lane, slot), psm_read_logit(x[slot]));
    });
}

/* Top-p alone: the pass after the tally, a warp per tile of this block's
 * share (split rows: the tiles dealt out over the row's warps), which
 * gathers the cutoff bin's tokens into the list and leaves each tile's
 * partial S_t in the workspace (psm_stage_gather_and_weigh). */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE void psm_gpu_gather_and_weigh(const unsigned char *row_base,
                                             const psm_gpu_call &call,
                                             const psm_gpu_row_state &state,
                                             const psm_gpu_row_split &split, int cutoff_bin,
                                             psm_gpu_select_scratch &select)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    const psm_i64 warps = psm_gpu_block_warps<WarpSize>();
    const psm_u64 *tile_key = call.tile_key + state.tile_base;
    psm_u64 *tile_mass = call.tile_mass + state.tile_base;
    for (psm_i64 tile = split.part * warps + threadIdx.x / WarpSize; tile < call.tiles_per_row;
         tile += split.parts * warps) {
        const psm_u64 key = tile_key[tile];
        const psm_u64 mass = psm_stage_gather_and_weigh(
            team, psm_gpu_tile_place<Dtype>(call, row_base, psm_no_read_processing(), tile),
            key != 0 ? psm_rank_key_logit(key) : -INFINITY, state.row_max, state.scale,
            call.weight_bits, cutoff_bin, &select.list_size, select.list_key,
            PSM_GPU_LIST_CAPACITY, psm_no_posts());
        if (team.lane == 0)
            tile_mass[tile] = mass;
    }
}

/* After psm_gpu_gather_and_weigh and the walk: the list's kept tokens
 * added to the tile masses, and a tile that keeps nothing marked so in its
 * key (the kept maximum's key, launch 1's where it is kept). */
PSM_GPU_DEVICE void psm_gpu_finish_weighed_tiles(const psm_gpu_call &call,
                                                 const psm_gpu_row_state &state,
                                                 const psm_gpu_select_scratch &select)
{
    psm_u64 *tile_key = call.tile_key + state.tile_base;
    psm_u64 *tile_mass = call.tile_mass + state.tile_base;
    psm_group_add_list_masses(select.list_key, select.list_size, select.cutoff, state.scale,
                              call.weight_bits, tile_key, tile_mass);
    for (psm_i64 tile = threadIdx.x; tile < call.tiles_per_row; tile += blockDim.x)
        if (tile_mass[tile] == 0)
            tile_key[tile] = 0;
    psm_gpu_block_barrier();
}

/* The top-k / top-p cutoff of one row (called by the whole block; top-p
 * alone when !top_k_on). Returns a PSM_GPU_SELECT_* status; with LIST,
 * select.cutoff and select.kept are set. With weigh_tiles (top-p alone
 * without min-p) and LIST, the list was gathered by psm_gpu_gather_and_weigh
 * and the tile masses want psm_group_add_list_masses, not a pass over the
 * kept tiles. */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE int psm_gpu_select_cutoff(const unsigned char *row_base, const psm_gpu_call &call,
                                         const psm_gpu_row_state &state, int top_k_on,
                                         psm_u64 top_k, int top_p_on, float top_p,
                                         int weigh_tiles, psm_gpu_row_split &split,
                                         psm_gpu_select_scratch &select)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    const int lane = team.lane, warp = threadIdx.x / WarpSize;
    const int by_mass = !top_k_on;
    /* Top-k tries the lane maxima of launch 1 first (a bin that k of them
     * reach holds the cutoff or lies below it: the list is then every token
     * up to that bin, gathered from the lanes whose maximum reaches it), and
     * counts the row itself only when that list would not fit. */
    for (int from_lanes = top_k_on; from_lanes >= 0; --from_lanes) {
        const int round = from_lanes ? 0 : 1; /* of the pooled list, split rows */
        for (int b = threadIdx.x; b < PSM_GAP_BINS; b += blockDim.x) {
            select.bin_count[b] = 0;
            select.bin_mass[b] = 0;
        }
        if (threadIdx.x == 0)
            select.list_size = 0;
        psm_gpu_block_barrier();
        if (from_lanes) {
            /* The lanes of this block's tiles (every tile without a split). */
            psm_gpu_for_each_lane_max<WarpSize>(call, state, split.slice, [&](psm_i64, int bin) {
                psm_local_add_u32(&select.bin_count[bin], 1u);
            });
            if (split.parts > 1)
                psm_gpu_pool_bins(split, select, split.shared->pool.lane_bin_count, nullptr);
        } else {
            psm_gpu_for_each_logit<Dtype>(call, row_base, split.slice, [&](psm_i64, float x) {
                psm_bins_tally(x, state.row_max, state.scale, by_mass, call.weight_bits,
                               select.bin_count, select.bin_mass);
            });
            if (split.parts > 1)
                psm_gpu_pool_bins(split, select, split.shared->pool.bin_count,
                                  by_mass ? split.shared->pool.bin_mass : nullptr);
        }
        psm_gpu_block_barrier();

        /* Warp 0 finds the bin where the running count (top-k) or mass (top-p
         * alone) in bin order first reaches what is needed. */
        if (warp == 0) {
            const psm_team_found hit =
                psm_team_choose_bin(team, select.bin_count, select.bin_mass, by_mass, top_k,
                                    by_mass, top_p, 1, psm_no_posts());
            if (hit.reports) {
                const int found = hit.position;
                int status = PSM_GPU_SELECT_LIST;
                psm_u64 size = 0;
                if (by_mass && hit.need == 0)
                    status = PSM_GPU_SELECT_TOP_ONLY;
                else if (!hit.found)
                    status = PSM_GPU_SELECT_FALLBACK; /* cannot happen: need <= the total */
                else if (!by_mass)
                    size = hit.before + select.bin_count[found];
                if (status == PSM_GPU_SELECT_LIST && size > PSM_GPU_LIST_CAPACITY && !from_lanes)
                    status = PSM_GPU_SELECT_FALLBACK;
                select.status = status;
                select.first_bin = by_mass ? found : 0;
                select.last_bin = found;
                select.need = hit.need;
                select.mass_before = by_mass ? hit.before : 0;
            }
        }
        psm_gpu_block_barrier();
        const int status = select.status;
        const int first_bin = select.first_bin, last_bin = select.last_bin;
        /* Every thread has read these before list_size changes again: the
         * compiler may read list_size, first_bin, last_bin and status in one
         * 16-byte load, which would otherwise race with list_size's reset. */
        psm_gpu_block_barrier();
        if (status != PSM_GPU_SELECT_LIST) {
            if (from_lanes)
                continue; /* fewer than k lane maxima: count the row */
            return status;
        }

        const auto gather = [&](psm_i64 i, float x) {
            psm_bins_gather(x, (psm_u32)i, state.row_max, state.scale, first_bin, last_bin,
                            &select.list_size, select.list_key, PSM_GPU_LIST_CAPACITY);
        };
        if (from_lanes)
            psm_gpu_for_each_logit_of_lanes<WarpSize, Dtype>(call, row_base, state, split.slice,
                                                             last_bin, gather);
        else if (weigh_tiles) /* top-p alone: by mass */
            psm_gpu_gather_and_weigh<WarpSize, Dtype>(row_base, call, state, split, last_bin,
                                                      select);
        else
            psm_gpu_for_each_logit<Dtype>(call, row_base, split.slice, gather);
        psm_gpu_block_barrier();
        if (split.parts > 1)
            psm_gpu_pool_list(split, select, round);
        if (select.list_size <= PSM_GPU_LIST_CAPACITY)
            break;
        /* From the lane maxima the list overflowed: count the row instead (top-p
         * alone: its bin held more tokens than the list). The barrier keeps
         * every thread's read of list_size before the reset. */
        psm_gpu_block_barrier();
        if (!from_lanes)
            return PSM_GPU_SELECT_FALLBACK;
    }

    const psm_u32 size = select.list_size;
    psm_rank_list(select.list_key, size, select.order, select.list_weight, state.row_max,
                  state.scale, call.weight_bits);
    psm_gpu_block_barrier();

    /* Warp 0 walks the ranked list: top-p over the top k (the list holds
     * them, and a few more, in rank order), or top-p alone from the mass of
     * the bins before the list. */
    if (warp == 0) {
        psm_u32 last_rank = (psm_u32)top_k - 1;
        if (top_p_on)
            last_rank = psm_team_walk_ranks(team, select.list_weight, select.order,
                                            top_k_on ? (psm_u32)top_k : size,
                                            top_k_on ? 0 : select.mass_before,
                                            top_k_on ? 0 : select.need, top_k_on, top_p,
                                            psm_no_posts());
        if (lane == 0) {
            select.cutoff = select.list_key[select.order[last_rank]];
            select.kept = last_rank + 1;
        }
    }
    psm_gpu_block_barrier();
    return PSM_GPU_SELECT_LIST;
}

/* Tile masses over the kept set by reading the tiles: one warp per tile,
 * the stage of kernels/psm_stage_draw.h. */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE void psm_gpu_scan_masses(const unsigned char *row_base, const psm_gpu_call &call,
                                        const psm_gpu_row_state &state, psm_kept_rule rule,
                                        psm_gpu_row_split &split)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    const int warp = threadIdx.x / WarpSize;
    const psm_i64 warps = psm_gpu_block_warps<WarpSize>();
    psm_u64 *tile_key = call.tile_key + state.tile_base;
    psm_u64 *tile_mass = call.tile_mass + state.tile_base;
    /* Split rows: the tiles are dealt out over every warp of the row's blocks. */
    for (psm_i64 tile = split.part * warps + warp; tile < call.tiles_per_row;
         tile += split.parts * warps) {
        /* tile_key: launch 1's unfiltered tile maximum, until replaced here. */
        const psm_kept_tile kept =
            psm_stage_kept_masses(team,
                                  psm_gpu_tile_place<Dtype>(call, row_base,
                                                            psm_no_read_processing(), tile),
                                  rule, tile_key[tile], psm_kept_posts());
        if (team.lane == 0) {
            /* Only the logit and non-zero-ness of this key are read later. */
            tile_key[tile] = kept.maximum != -INFINITY
                                 ? psm_rank_key(kept.maximum, (psm_u32)(tile * PSM_TILE))
                                 : 0;
            tile_mass[tile] = kept.mass;
        }
    }
    psm_gpu_row_barrier(split);
}

/* m_t, S_t and T_t of tile `tile` of a row (its entries in the workspace
 * start at tile_base) whose T_t sum to total. */
PSM_GPU_DEVICE psm_tile_share psm_gpu_tile_share(const psm_gpu_call &call, psm_i64 tile_base,
                                                 psm_i64 tile, psm_u64 total)
{
    psm_tile_share share;
    share.reference = psm_rank_key_logit(call.tile_key[tile_base + tile]);
    share.mass = call.tile_mass[tile_base + tile];
    share.rescaled = psm_tile_rescaled(call.tile_prefix + tile_base, (psm_i32)tile);
    share.total = total;
    return share;
}

/* From the tile masses over the kept set to the outputs: T_t and their scan,
 * then the draws (a warp per sample) or the probabilities (a warp per tile),
 * the stages of kernels/psm_stage_draw.h, which read the row as
 * `processing` says. */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE void psm_gpu_finish_row(const unsigned char *row_base,
                                       psm_read_processing processing, const psm_gpu_call &call,
                                       const psm_gpu_row_state &state, psm_kept_rule rule,
                                       const psm_row_params &p, int probs_mode,
                                       bool rule_only, psm_gpu_row_scratch &scratch)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    const int warp = threadIdx.x / WarpSize;
    const psm_i64 tiles = call.tiles_per_row;
    psm_u64 *tile_key = call.tile_key + state.tile_base;
    psm_u64 *tile_mass = call.tile_mass + state.tile_base;
    psm_u64 *tile_prefix = call.tile_prefix + state.tile_base;

    /* T_t = S_t rescaled to the row maximum, and their running sum. */
    psm_u64 carry = 0;
    for (psm_i64 chunk = 0; chunk < tiles; chunk += blockDim.x) {
        const psm_i64 tile = chunk + threadIdx.x;
        psm_u64 rescaled = 0;
        if (tile < tiles && tile_key[tile] != 0)
            rescaled = psm_rescale_mass(
                tile_mass[tile],
                psm_scaled_gap(state.row_max, psm_rank_key_logit(tile_key[tile]), state.scale));
        psm_u64 chunk_total;
        psm_u64 inclusive = psm_group_inclusive_scan_u64(team, rescaled, &chunk_total, &scratch.group);
        if (tile < tiles)
            tile_prefix[tile] = carry + inclusive;
        carry += chunk_total;
    }
    const psm_u64 total = carry;
    psm_gpu_block_barrier();

    if (rule_only) {
        for (psm_i32 sample = threadIdx.x; sample < call.num_samples; sample += blockDim.x)
            call.tokens[state.row * call.num_samples + sample] = 0;
        return;
    }
    if (probs_mode) {
        float *out = call.probs + state.row * call.probs_stride;
        for (psm_i64 tile = warp; tile < tiles; tile += psm_gpu_block_warps<WarpSize>())
            psm_stage_probs(team, psm_gpu_tile_place<Dtype>(call, row_base, processing, tile), rule,
                            psm_gpu_tile_share(call, state.tile_base, tile, total),
                            out + tile * PSM_TILE);
        return;
    }
    for (psm_i32 sample = warp; sample < call.num_samples; sample += psm_gpu_block_warps<WarpSize>()) {
        const psm_draw_bits bits = psm_sample_bits(p.seed, p.offset, p.stream, (psm_u32)sample);
        const psm_i32 tile = psm_draw_tile(team, tile_prefix, (psm_i32)tiles, bits.tile, total);
        const psm_drawn drawn =
            psm_stage_draw(team, psm_gpu_tile_place<Dtype>(call, row_base, processing, tile), rule,
                           psm_gpu_tile_share(call, state.tile_base, tile, total), bits.token, 1,
                           call.logprobs != nullptr, psm_draw_posts());
        if (drawn.writes) {
            call.tokens[state.row * call.num_samples + sample] = drawn.token;
            if (call.logprobs)
                call.logprobs[state.row * call.num_samples + sample] = drawn.log_probability;
        }
    }
}

/* One block per row (several for split rows). Filtered: the variant for
 * calls whose parameters may ask for a filter (with the selection's shared
 * memory); the other runs plain and greedy rows. ProbsMode: write
 * psm_probs' distribution instead of drawing. Ordered (with Filtered): the
 * variant for calls in an engine's filter order, whose cutoffs come from
 * kernels/psm_stage_orders.h; a variant of its own, so that the others'
 * code, registers and local memory stay as they were. OnRead (without
 * Filtered): plain calls whose rows are processed as they are read
 * (call.read_*), likewise a variant of its own. */
template <int WarpSize, int Dtype, bool Filtered, bool ProbsMode, bool Ordered, bool OnRead>
PSM_GPU_DEVICE void psm_gpu_row_loop(const psm_gpu_call &call, psm_gpu_row_scratch &scratch,
                                     psm_gpu_select_scratch *select)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    /* A split launch has row_parts blocks per row and one row per block
     * group; otherwise blocks take rows in turn. */
    const int part = (int)(blockIdx.x % call.row_parts);
    for (psm_i64 row = blockIdx.x / call.row_parts; row < call.rows;
         row += gridDim.x / call.row_parts) {
        const psm_row_params p = psm_gpu_row_params(call, row);
        psm_gpu_row_split split = psm_gpu_make_split(call, row, part);
        const psm_i64 tile_base = row * call.tiles_per_row;

        psm_u64 best_key = 0, valid_count = 0;
        psm_u32 bad = 0;
        for (psm_i64 tile = threadIdx.x; tile < call.tiles_per_row; tile += blockDim.x) {
            const psm_u64 key = call.tile_key[tile_base + tile];
            const psm_u32 info = call.tile_info[tile_base + tile];
            best_key = key > best_key ? key : best_key;
            valid_count += info & PSM_TILE_COUNT_MASK;
            bad |= (info & PSM_TILE_BAD_FLAG) ? 1u : 0u;
        }
        best_key = psm_group_max_u64(team, best_key, &scratch.group);
        valid_count = psm_group_sum_u64(team, valid_count, &scratch.group);
        bad = (psm_u32)psm_group_max_u64(team, bad, &scratch.group);

        if (bad || valid_count == 0 || !p.valid) {
            if (part == 0)
                psm_gpu_write_point_row(call, row, ProbsMode, -1);
            continue;
        }
        if (psm_is_greedy(p.temperature)) {
            if (part == 0)
                psm_gpu_write_point_row(call, row, ProbsMode, (psm_i32)psm_rank_key_token(best_key));
            continue;
        }

        psm_gpu_row_state state;
        state.row = row;
        state.tile_base = tile_base;
        state.row_max = psm_rank_key_logit(best_key);
        state.scale = psm_inverse_temperature_scale(p.temperature);
        state.cutoff = 0;
        state.min_weight = 0;
        /* Launch 1 made no tile masses for these rows (the same test). */
        state.filtered = psm_may_filter(p.top_k, p.top_p, p.min_p, call.vocab);
        /* Only valid rows get here: their logits row lies inside the logits. */
        psm_gpu_global_row<Dtype> source = {psm_gpu_row_base<Dtype>(call, p.logits_row),
                                            call.vocab};

        if constexpr (Ordered) {
            if (state.filtered) {
                /* An engine's order: its cutoffs over the row (every block of
                 * a split row alike), then the kept masses as for any cutoff. */
                psm_order_row filters;
                filters.row_max = state.row_max;
                filters.scale = state.scale;
                filters.weight_bits = call.weight_bits;
                filters.valid = (psm_i64)valid_count;
                filters.top_k = p.top_k;
                filters.top_p = p.top_p;
                filters.min_p = p.min_p;
                const psm_kept_rule test = psm_order_candidates(call.filter_order, filters);
                const auto candidates = psm_survivors_of(&source, test, 1);
                const auto no_candidates = psm_survivors_of(&source, test, 0);
                const psm_kept_rule kept =
                    psm_stage_orders(team, &source, &candidates, &no_candidates,
                                     call.filter_order, filters, &scratch.radix, &scratch.group);
                state.cutoff = kept.cutoff;
                state.min_weight = kept.min_weight;
                psm_gpu_scan_masses<WarpSize, Dtype>(source.base, call, state, kept, split);
            }
        } else if constexpr (Filtered) {
            if (state.filtered) {
                const int top_k_on = psm_top_k_active(p.top_k, (psm_i64)valid_count);
                const int top_p_on = p.top_p < 1.0f;
                if (p.min_p > 0.0f)
                    state.min_weight = psm_min_p_threshold(p.min_p, call.weight_bits);
                const int weigh_tiles = top_p_on && !top_k_on && state.min_weight == 0;
                int status = PSM_GPU_SELECT_LIST;
                if (top_k_on || top_p_on) {
                    status = psm_gpu_select_cutoff<WarpSize, Dtype>(
                        source.base, call, state, top_k_on, (psm_u64)p.top_k, top_p_on, p.top_p,
                        weigh_tiles, split, *select);
                    if (status == PSM_GPU_SELECT_LIST) {
                        state.cutoff = select->cutoff;
                    } else if (status == PSM_GPU_SELECT_TOP_ONLY) {
                        state.cutoff = best_key;
                    } else {
                        if (top_k_on)
                            state.cutoff = psm_radix_select(
                                team, &source, 0, 0, (psm_u64)p.top_k, 1.0f, state.row_max,
                                state.scale, call.weight_bits, &scratch.radix, &scratch.group);
                        if (top_p_on)
                            state.cutoff = psm_radix_select(
                                team, &source, state.cutoff, 1, 0, p.top_p, state.row_max,
                                state.scale, call.weight_bits, &scratch.radix, &scratch.group);
                    }
                }
                if (top_k_on && status == PSM_GPU_SELECT_LIST) {
                    if (part == 0) /* from the list alone: nothing to share */
                        psm_group_list_masses(select->list_key, select->list_weight,
                                              select->order, select->kept, state.min_weight,
                                              state.scale, call.weight_bits,
                                              call.tile_key + state.tile_base,
                                              call.tile_mass + state.tile_base,
                                              call.tiles_per_row);
                } else if (weigh_tiles && status == PSM_GPU_SELECT_LIST) {
                    if (part == 0) /* the other blocks' partial masses are in */
                        psm_gpu_finish_weighed_tiles(call, state, *select);
                } else {
                    psm_gpu_scan_masses<WarpSize, Dtype>(source.base, call, state,
                                                         psm_gpu_kept_rule(call, state), split);
                }
            }
        }
        if (part != 0) /* block 0 of a split row draws */
            continue;
        /* Top-N logprobs are psm_sample's only: psm_probs' kernels do not
         * carry the store. */
        if constexpr (!ProbsMode) {
            if (call.kept_filters && threadIdx.x == 0)
                call.kept_filters[row] =
                    psm_gpu_kept_filters{state.cutoff, state.min_weight, state.row_max, 0u};
        }
        psm_gpu_finish_row<WarpSize, Dtype>(
            source.base, OnRead ? psm_gpu_read_processing(call, row) : psm_no_read_processing(),
            call, state, psm_gpu_kept_rule(call, state), p, ProbsMode,
            !Filtered && call.rule_only, scratch);
        /* The next row reuses the scratch. */
        psm_gpu_block_barrier();
    }
}

template <int WarpSize, int Dtype, bool Filtered, bool ProbsMode, bool Ordered = false,
          bool OnRead = false>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_ROW_THREADS, PSM_GPU_ROW_BLOCKS_PER_SM)
    psm_gpu_row_kernel(const psm_gpu_call call)
{
    __shared__ psm_gpu_row_scratch scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>()) {
        if constexpr (Ordered) {
            /* The orders search with the row scratch alone. */
            psm_gpu_row_loop<WarpSize, Dtype, true, ProbsMode, true, false>(call, scratch,
                                                                            nullptr);
        } else if constexpr (Filtered) {
            __shared__ psm_gpu_select_scratch select;
            psm_gpu_row_loop<WarpSize, Dtype, true, ProbsMode, false, false>(call, scratch,
                                                                             &select);
        } else {
            psm_gpu_row_loop<WarpSize, Dtype, false, ProbsMode, false, OnRead>(call, scratch,
                                                                               nullptr);
        }
    }
}

/* ---- launch 3 (top_logprobs only): top-N logprobs ------------------------ */

/* Threads of the top-N kernel's blocks (one row per block): a round of the
 * stage's list takes PSM_TOP_ROUND keys, PSM_TOP_ROUND / PSM_GPU_TOP_THREADS
 * a thread. The rank kernel's blocks are as large, and count over
 * PSM_GPU_RANK_TILES tiles of a row each. */
#define PSM_GPU_TOP_THREADS 256
#define PSM_GPU_RANK_TILES 8
static_assert(PSM_TOP_ROUND % PSM_GPU_TOP_THREADS == 0,
              "a round of the top-N stage spreads its keys evenly over the threads");
static_assert(PSM_TOP_LIST_MAX == PSM_MAX_TOP_LOGPROBS,
              "the top-N stage's lists hold PSM_MAX_TOP_LOGPROBS entries");
static_assert(PSM_GPU_RANK_TILES <= PSM_TOP_RANK_PART_MAX,
              "a rank part's tiles are bits of a 32-bit word (psm_top_count_ranks)");

/* The top-N call besides psm_gpu_call (whose logits are the processed ones
 * when the call has logit processing): where the mode reads its logits, and
 * the outputs (device memory). */
struct psm_gpu_top_call {
    const void *logits;  /* processed mode: call.logits; raw: the logits as given */
    psm_i64 row_stride;
    psm_u32 per_row;     /* their row gather: call.per_row's PSM_PER_ROW_LOGITS_ROW */
    psm_i64 logits_rows;
    int raw_mode;
    psm_i32 count;       /* N */
    psm_u64 *tile_key;   /* raw mode: per tile of every row, the stage's own keys */
    psm_i32 *tokens;
    float *logprobs;
    psm_i32 *ranks;      /* NULL: not asked for */
};

/* Output row `row` as the stage reads it, for the top-N and rank kernels
 * alike: in the processed mode with the kept rule the row kernel left
 * (psm_gpu_kept_filters, its M among them). Returns false for a row without
 * a list: bad (its tokens are -1, and only a bad row's: a sampled row always
 * draws a token) or, in the processed mode, greedy; psm_top_write_point
 * writes those. *tile_key:
 * the row's tiles' best keys (processed mode: the kept tiles' m_t as a key,
 * or an upper bound with their logit, as the row kernel left them; raw
 * mode: where psm_top_raw_scan writes them). */
template <int Dtype>
PSM_GPU_DEVICE bool psm_gpu_top_source(const psm_gpu_call &call, const psm_gpu_top_call &top,
                                       psm_i64 row, psm_top_row &source, psm_u64 *&tile_key,
                                       psm_top_outputs &out)
{
    const psm_row_params p = psm_gpu_row_params(call, row);
    const psm_i64 tile_base = row * call.tiles_per_row;
    out.tokens = top.tokens + row * top.count;
    out.logprobs = top.logprobs + row * top.count;
    out.ranks = top.ranks ? top.ranks + row * call.num_samples : nullptr;
    out.drawn = call.tokens + row * call.num_samples;
    out.samples = call.num_samples;
    if (out.drawn[0] < 0 || (psm_is_greedy(p.temperature) && !top.raw_mode))
        return false;

    source.dtype = Dtype;
    source.vocab = call.vocab;
    source.tiles = (psm_i32)call.tiles_per_row;
    source.count = top.count;
    tile_key = call.tile_key + tile_base;
    if (top.raw_mode) {
        psm_row_scalars scalars = call.scalars;
        scalars.logits_rows = top.logits_rows;
        const psm_row_params given =
            psm_resolve_row(row, top.per_row, scalars, call.per_row_arrays);
        source.logits = (const unsigned char *)top.logits +
                        given.logits_row * top.row_stride *
                            (psm_i64)psm_gpu_dtype_traits<Dtype>::element_bytes;
        source.rule = psm_make_kept_rule(0, 0, 0.0f, psm_inverse_temperature_scale(1.0f),
                                         call.weight_bits);
        tile_key = top.tile_key + tile_base;
    } else {
        const psm_gpu_kept_filters filters = call.kept_filters[row];
        source.logits = psm_gpu_row_base<Dtype>(call, p.logits_row);
        source.rule = psm_make_kept_rule(filters.cutoff, filters.min_weight, filters.row_max,
                                         psm_inverse_temperature_scale(p.temperature),
                                         call.weight_bits);
    }
    return true;
}

/* One block per row: the stage of kernels/psm_stage_top_logprobs.h over the
 * tile masses the row kernel left (tile_mass, tile_prefix), with the rank
 * of each drawn token begun. */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE void psm_gpu_top_body(const psm_gpu_call &call, const psm_gpu_top_call &top,
                                     psm_top_scratch &scratch)
{
    const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
    for (psm_i64 row = blockIdx.x; row < call.rows; row += gridDim.x) {
        psm_top_row source;
        psm_u64 *tile_key = nullptr;
        psm_top_outputs out;
        if (!psm_gpu_top_source<Dtype>(call, top, row, source, tile_key, out)) {
            psm_top_write_point(top.count, out.drawn[0], out);
            continue;
        }
        const psm_i64 tile_base = row * call.tiles_per_row;
        psm_top_masses masses;
        masses.tile_mass = call.tile_mass + tile_base;
        masses.tile_prefix = call.tile_prefix + tile_base;
        masses.total = call.tile_prefix[tile_base + call.tiles_per_row - 1];
        psm_stage_top_logprobs(team, source, top.raw_mode, tile_key, masses, &scratch, out);
        /* The next row reuses the scratch. */
        psm_gpu_block_barrier();
    }
}

template <int WarpSize, int Dtype>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_TOP_THREADS)
    psm_gpu_top_kernel(const psm_gpu_call call, const psm_gpu_top_call top)
{
    __shared__ psm_top_scratch scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_gpu_top_body<WarpSize, Dtype>(call, top, scratch);
}

/* After the top-N kernel, with sampled ranks: a block per PSM_GPU_RANK_TILES
 * tiles of a row (a grid-stride loop over rows x parts), adding the
 * candidates above each drawn token there (psm_top_count_ranks). */
template <int WarpSize, int Dtype>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_TOP_THREADS)
    psm_gpu_rank_kernel(const psm_gpu_call call, const psm_gpu_top_call top)
{
    __shared__ psm_group_scratch group;
    if constexpr (psm_gpu_wave_compiled<WarpSize>()) {
        const psm_team<WarpSize> team = psm_team_of_thread<WarpSize>();
        const psm_i64 parts = (call.tiles_per_row + PSM_GPU_RANK_TILES - 1) / PSM_GPU_RANK_TILES;
        for (psm_i64 unit = blockIdx.x; unit < call.rows * parts; unit += gridDim.x) {
            const psm_i64 row = unit / parts;
            const psm_i32 first = (psm_i32)((unit - row * parts) * PSM_GPU_RANK_TILES);
            const psm_i32 end = first + PSM_GPU_RANK_TILES < call.tiles_per_row
                                    ? first + PSM_GPU_RANK_TILES
                                    : (psm_i32)call.tiles_per_row;
            psm_top_row source;
            psm_u64 *tile_key = nullptr;
            psm_top_outputs out;
            if (psm_gpu_top_source<Dtype>(call, top, row, source, tile_key, out))
                psm_top_count_ranks(team, &source, first, end, tile_key, out, &group);
            /* The next unit reuses the group scratch. */
            psm_gpu_block_barrier();
        }
    }
}

#if PSM_GPU_HIP
/* ---- the wave size of the code the device runs (HIP) --------------------- */

/* One HIP build carries wave64 (CDNA) and wave32 (RDNA) code objects; the
 * host picks kernels by the device's reported warpSize, and checks with this
 * kernel that the code object it runs was compiled for that size. */
PSM_GPU_KERNEL void psm_gpu_wave_size_kernel(unsigned long long *out)
{
#if defined(PSM_GPU_DEVICE_WARP_SIZE)
    if (threadIdx.x == 0 && blockIdx.x == 0)
        *out = PSM_GPU_DEVICE_WARP_SIZE;
#endif
}
#endif

} /* namespace PSM_GPU_NAMESPACE */

#endif /* PSM_GPU_KERNELS_CUH */
