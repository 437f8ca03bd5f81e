/*
 * psm_gpu_kernels.cuh: the sampling kernels, shared by the CUDA and HIP
 * backends (vendor names come from psm_gpu.h only).
 *
 * Every quantity that decides a token is computed with core/psm_contract.h;
 * this file only decides how the work is spread over the GPU. The row
 * algorithm is docs/SAMPLING.md:
 *
 *   launch 1, tile kernel (one warp per 1024-token tile, all rows at once):
 *     reads the tile once, from registers: best rank key of its valid logits
 *     (which carries the tile max m_t and its lowest index), count of valid
 *     logits, a bad flag, and the unfiltered tile mass S_t against m_t.
 *   launch 1b, check kernel (checking mode only): first bad row.
 *   launch 2, row kernel (one block per row):
 *     combines the tiles (row max M, greedy token, bad rows); with filters,
 *     finds the top-k / top-p cutoff by radix select on psm_rank_key and
 *     recomputes the tile masses over the kept set; then rescales the tile
 *     masses to the row (T_t), scans them, and draws each sample: the tile by
 *     a binary search over the scan, the token by a warp scan of w_i over
 *     that tile only. psm_probs runs the same kernel and writes the final
 *     distribution instead of drawing.
 *
 * Rows that need a filter and fit in shared memory are copied there once, so
 * the selection passes do not read global memory again.
 */
#ifndef PSM_GPU_KERNELS_CUH
#define PSM_GPU_KERNELS_CUH

#include "psm_gpu.h"
#include "psm_gpu_warp.h"
#include "psm_contract.h"
#include "polysample.h"

namespace PSM_GPU_NAMESPACE {

/* Threads of the tile kernel's blocks: several warps, one tile each. */
#define PSM_GPU_TILE_THREADS 256
/* Threads of the row kernel's blocks (one row per block): the most (rows
 * with filters, whose selection passes read the whole row) and the fewest
 * (plain rows, whose work is per tile and per sample). */
#define PSM_GPU_ROW_THREADS 512
#define PSM_GPU_ROW_THREADS_PLAIN 128
/* Radix select digits: 8 bits, 256 buckets per level, 8 levels for 64 bits. */
#define PSM_GPU_RADIX_BITS 8
#define PSM_GPU_RADIX_BUCKETS 256
#define PSM_GPU_RADIX_LEVELS 8

/* The block algorithms combine one value per warp in a single warp. */
static_assert(PSM_GPU_ROW_THREADS <= 32 * 32,
              "psm_block_reduce needs at most WarpSize warps a block, for WarpSize 32 too");

/* Tile info word: count of valid logits in the low bits, bad flag on top. */
#define PSM_GPU_TILE_BAD_FLAG 0x80000000u
#define PSM_GPU_TILE_COUNT_MASK 0x7fffffffu

/* Everything one call needs on the device, passed by value to each kernel.
 * Per-row pointers are device pointers or NULL (use the scalar). */
struct psm_gpu_call {
    const void *logits;
    psm_i64 rows;
    psm_i64 vocab;
    psm_i64 row_stride;
    int logits_aligned; /* base and row stride allow 16-byte loads */
    int weight_bits;

    float temperature;
    psm_i32 top_k;
    float top_p;
    float min_p;
    psm_u64 seed;
    psm_u64 offset;
    psm_i32 num_samples;
    const float *temperature_per_row;
    const psm_i32 *top_k_per_row;
    const float *top_p_per_row;
    const float *min_p_per_row;
    const psm_u64 *seed_per_row;

    /* workspace: one entry per tile of every row */
    psm_i64 tiles_per_row;
    psm_u64 *tile_key;    /* best rank key of the tile's (kept) logits, 0: none */
    psm_u64 *tile_mass;   /* S_t */
    psm_u32 *tile_info;   /* valid count | bad flag (launch 1) */
    psm_u64 *tile_prefix; /* inclusive running sum of T_t over the row */
    unsigned long long *first_bad_row;

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

/* One element as a float, before psm_read_logit (conversions are exact). */
template <int Dtype>
PSM_GPU_DEVICE float psm_gpu_load_raw(const unsigned char *row_base, psm_i64 index)
{
    if (Dtype == PSM_DTYPE_F32)
        return ((const float *)row_base)[index];
    psm_u16 bits = ((const psm_u16 *)row_base)[index];
    if (Dtype == PSM_DTYPE_F16)
        return psm_gpu_half_bits_to_float(bits);
    return psm_bf16_to_float(bits);
}

/* 16 bytes of elements starting at index (a multiple of per_vector, with the
 * row base 16-byte aligned). */
template <int Dtype>
PSM_GPU_DEVICE void psm_gpu_load_vector(const unsigned char *row_base, psm_i64 index,
                                        float *out)
{
    const uint4 raw = *(const uint4 *)(row_base + index * psm_gpu_dtype_traits<Dtype>::element_bytes);
    const psm_u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
    if constexpr (Dtype == PSM_DTYPE_F32) {
        for (int k = 0; k < 4; ++k)
            out[k] = psm_bits_float(words[k]);
    } else {
        for (int k = 0; k < 4; ++k) {
            psm_u16 low = (psm_u16)(words[k] & 0xffffu);
            psm_u16 high = (psm_u16)(words[k] >> 16);
            if (Dtype == PSM_DTYPE_F16) {
                out[2 * k] = psm_gpu_half_bits_to_float(low);
                out[2 * k + 1] = psm_gpu_half_bits_to_float(high);
            } else {
                out[2 * k] = psm_bf16_to_float(low);
                out[2 * k + 1] = psm_bf16_to_float(high);
            }
        }
    }
}

template <int Dtype>
PSM_GPU_DEVICE const unsigned char *psm_gpu_row_base(const psm_gpu_call &call, psm_i64 row)
{
    return (const unsigned char *)call.logits +
           row * call.row_stride * (psm_i64)psm_gpu_dtype_traits<Dtype>::element_bytes;
}

/* A row as the selection and draw code reads it: value(i) is the logit after
 * psm_read_logit. */
template <int Dtype>
struct psm_gpu_global_row {
    const unsigned char *base;
    PSM_GPU_DEVICE float value(psm_i64 index) const
    {
        return psm_read_logit(psm_gpu_load_raw<Dtype>(base, index));
    }
};
struct psm_gpu_shared_row {
    const float *values; /* already through psm_read_logit */
    PSM_GPU_DEVICE float value(psm_i64 index) const { return values[index]; }
};

/* The logit a rank key was made from (inverse of psm_rank_key's high half). */
PSM_GPU_DEVICE float psm_gpu_key_logit(psm_u64 key)
{
    psm_u32 ordered = (psm_u32)(key >> 32);
    psm_u32 bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
    return psm_bits_float(bits);
}
PSM_GPU_DEVICE psm_i32 psm_gpu_key_token(psm_u64 key)
{
    return (psm_i32)(0xffffffffu - (psm_u32)key);
}

/* ---- per-row parameters ------------------------------------------------- */

struct psm_gpu_row_params {
    float temperature;
    psm_i32 top_k;
    float top_p;
    float min_p;
    psm_u64 seed;
    psm_u32 stream;
    int valid;
};

PSM_GPU_DEVICE psm_gpu_row_params psm_gpu_resolve_row(const psm_gpu_call &call, psm_i64 row)
{
    psm_gpu_row_params p;
    p.temperature = call.temperature_per_row ? call.temperature_per_row[row] : call.temperature;
    p.top_k = call.top_k_per_row ? call.top_k_per_row[row] : call.top_k;
    p.top_p = call.top_p_per_row ? call.top_p_per_row[row] : call.top_p;
    p.min_p = call.min_p_per_row ? call.min_p_per_row[row] : call.min_p;
    if (call.seed_per_row) {
        p.seed = call.seed_per_row[row];
        p.stream = 0;
    } else {
        p.seed = call.seed;
        p.stream = (psm_u32)row;
    }
    p.valid = psm_row_params_valid(p.temperature, p.top_k, p.top_p, p.min_p);
    return p;
}

/* ---- block-level helpers (row kernel) ------------------------------------ */

template <int WarpSize>
PSM_GPU_DEVICE int psm_gpu_block_warps(void)
{
    return (int)(blockDim.x / WarpSize);
}

template <int WarpSize>
struct psm_gpu_row_scratch {
    psm_u32 bucket_count[PSM_GPU_RADIX_BUCKETS];
    unsigned long long bucket_mass[PSM_GPU_RADIX_BUCKETS];
    psm_u64 warp_values[PSM_GPU_ROW_THREADS / WarpSize];
    psm_u64 broadcast[4];
};

/* The block algorithms of psm_gpu_warp.h on the hardware. */
template <int WarpSize>
PSM_GPU_DEVICE psm_u64 psm_gpu_block_max_u64(psm_u64 value, psm_gpu_row_scratch<WarpSize> &scratch)
{
    return psm_block_reduce<WarpSize>(value, psm_warp_op_max(), (int)threadIdx.x, (int)blockDim.x,
                                      scratch.warp_values, &scratch.broadcast[0],
                                      psm_gpu_hardware_lanes<WarpSize>(), psm_gpu_hardware_block());
}

template <int WarpSize>
PSM_GPU_DEVICE psm_u64 psm_gpu_block_sum_u64(psm_u64 value, psm_gpu_row_scratch<WarpSize> &scratch)
{
    return psm_block_reduce<WarpSize>(value, psm_warp_op_sum(), (int)threadIdx.x, (int)blockDim.x,
                                      scratch.warp_values, &scratch.broadcast[0],
                                      psm_gpu_hardware_lanes<WarpSize>(), psm_gpu_hardware_block());
}

/* Inclusive scan over the block in thread order; *block_total gets the sum. */
template <int WarpSize>
PSM_GPU_DEVICE psm_u64 psm_gpu_block_inclusive_scan_u64(psm_u64 value, psm_u64 *block_total,
                                                        psm_gpu_row_scratch<WarpSize> &scratch)
{
    return psm_block_inclusive_scan<WarpSize>(value, block_total, (int)threadIdx.x,
                                              (int)blockDim.x, scratch.warp_values,
                                              &scratch.broadcast[0],
                                              psm_gpu_hardware_lanes<WarpSize>(),
                                              psm_gpu_hardware_block());
}

/* ---- launch 1: tile statistics ------------------------------------------ */

/* One warp reduces one tile from registers: the best rank key of its valid
 * logits (carries m_t and the lowest index of the maximum), the count of
 * valid logits, the bad flag, and S_t, the sum of w_i against m_t. */
template <int WarpSize, int Dtype>
PSM_GPU_DEVICE void psm_gpu_tile_body(const psm_gpu_call &call)
{
    const psm_gpu_hardware_lanes<WarpSize> lanes;
    const int per_vector = psm_gpu_dtype_traits<Dtype>::per_vector;
    const int vectors_per_lane = PSM_TILE / per_vector / WarpSize;
    const int lane = threadIdx.x % WarpSize;
    const psm_i64 warps_per_block = PSM_GPU_TILE_THREADS / WarpSize;
    const psm_i64 total_tiles = call.rows * call.tiles_per_row;

    for (psm_i64 tile_id = (psm_i64)blockIdx.x * warps_per_block + threadIdx.x / WarpSize;
         tile_id < total_tiles; tile_id += (psm_i64)gridDim.x * warps_per_block) {
        const psm_i64 row = tile_id / call.tiles_per_row;
        const psm_i64 tile_start = (tile_id - row * call.tiles_per_row) * PSM_TILE;
        const psm_i64 tile_length =
            call.vocab - tile_start < PSM_TILE ? call.vocab - tile_start : PSM_TILE;
        const unsigned char *row_base = psm_gpu_row_base<Dtype>(call, row);

        /* Element e of the tile sits at x[r * per_vector + k] of lane
         * (e / per_vector) % warp, r = e / (per_vector * warp): 16-byte
         * vectors, consecutive lanes on consecutive vectors (coalesced). */
        float x[(PSM_TILE / WarpSize)];
        if (call.logits_aligned && tile_length == PSM_TILE) {
#pragma unroll
            for (int r = 0; r < vectors_per_lane; ++r)
                psm_gpu_load_vector<Dtype>(
                    row_base, tile_start + (psm_i64)(r * WarpSize + lane) * per_vector,
                    &x[r * per_vector]);
        } else {
#pragma unroll
            for (int r = 0; r < vectors_per_lane; ++r)
#pragma unroll
                for (int k = 0; k < per_vector; ++k) {
                    psm_i64 e = (psm_i64)(r * WarpSize + lane) * per_vector + k;
                    /* Past the end of the row reads as masked (-inf). */
                    x[r * per_vector + k] = e < tile_length
                                                ? psm_gpu_load_raw<Dtype>(row_base, tile_start + e)
                                                : -INFINITY;
                }
        }

        psm_u64 best_key = 0;
        psm_u32 valid_count = 0, bad = 0;
#pragma unroll
        for (int r = 0; r < vectors_per_lane; ++r)
#pragma unroll
            for (int k = 0; k < per_vector; ++k) {
                const int slot = r * per_vector + k;
                x[slot] = psm_read_logit(x[slot]);
                const int logit_class = psm_logit_class(x[slot]);
                if (logit_class == PSM_LOGIT_VALID) {
                    psm_u32 token = (psm_u32)(tile_start + (psm_i64)(r * WarpSize + lane) * per_vector + k);
                    psm_u64 key = psm_rank_key(x[slot], token);
                    best_key = key > best_key ? key : best_key;
                    ++valid_count;
                } else if (logit_class == PSM_LOGIT_BAD) {
                    bad = 1;
                }
            }
        best_key = psm_warp_max<WarpSize>(best_key, lanes);
        valid_count = psm_warp_sum<WarpSize>(valid_count, lanes);
        bad = psm_warp_any<WarpSize>(bad, lanes);

        const float temperature =
            call.temperature_per_row ? call.temperature_per_row[row] : call.temperature;
        psm_u64 mass = 0;
        if (best_key != 0 && !bad && temperature <= PSM_MAX_TEMPERATURE &&
            !psm_is_greedy(temperature)) {
            const float tile_max = psm_gpu_key_logit(best_key);
            const float scale = psm_inverse_temperature_scale(temperature);
#pragma unroll
            for (int slot = 0; slot < (PSM_TILE / WarpSize); ++slot)
                if (psm_logit_class(x[slot]) == PSM_LOGIT_VALID)
                    mass += psm_weight(psm_scaled_gap(tile_max, x[slot], scale), call.weight_bits);
            mass = psm_warp_sum<WarpSize>(mass, lanes);
        }
        if (lane == 0) {
            call.tile_key[tile_id] = best_key;
            call.tile_mass[tile_id] = mass;
            call.tile_info[tile_id] = valid_count | (bad ? PSM_GPU_TILE_BAD_FLAG : 0u);
        }
    }
}

template <int WarpSize, int Dtype>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_TILE_THREADS)
    psm_gpu_tile_kernel(const psm_gpu_call call)
{
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_gpu_tile_body<WarpSize, Dtype>(call);
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
            bad |= (info & PSM_GPU_TILE_BAD_FLAG) ? 1u : 0u;
            valid_count += info & PSM_GPU_TILE_COUNT_MASK;
        }
        bad = psm_warp_any<WarpSize>(bad, lanes);
        valid_count = psm_warp_sum<WarpSize>(valid_count, lanes);
        if (lane == 0) {
            psm_gpu_row_params p = psm_gpu_resolve_row(call, row);
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
    int filtered;
};

/* The contract's kept set (docs/SAMPLING.md section 4) for one logit. */
PSM_GPU_DEVICE int psm_gpu_is_kept(const psm_gpu_row_state &state, int weight_bits, float x,
                                   psm_i64 token)
{
    if (psm_logit_class(x) != PSM_LOGIT_VALID)
        return 0;
    if (state.cutoff != 0 && psm_rank_key(x, (psm_u32)token) < state.cutoff)
        return 0;
    if (state.min_weight != 0 &&
        psm_weight(psm_scaled_gap(state.row_max, x, state.scale), weight_bits) < state.min_weight)
        return 0;
    return 1;
}

/* The radix histogram as psm_warp_search_running reads it: position p is
 * bucket 255 - p (keys in decreasing order); its amount is the bucket's
 * count or mass, and only non-empty buckets can be chosen. */
template <int WarpSize>
struct psm_gpu_bucket_totals {
    const psm_gpu_row_scratch<WarpSize> *scratch;
    int by_mass;
    PSM_GPU_DEVICE psm_u64 amount(int position) const
    {
        const int b = PSM_GPU_RADIX_BUCKETS - 1 - position;
        return by_mass ? (psm_u64)scratch->bucket_mass[b] : (psm_u64)scratch->bucket_count[b];
    }
    PSM_GPU_DEVICE bool eligible(int position) const
    {
        return scratch->bucket_count[PSM_GPU_RADIX_BUCKETS - 1 - position] > 0;
    }
};
/* The top-p target from Z, the mass of the candidates. */
struct psm_gpu_top_p_need {
    float top_p;
    PSM_GPU_DEVICE psm_u64 operator()(psm_u64 row_mass) const
    {
        return psm_top_p_target(row_mass, top_p);
    }
};

/* Radix select over the row's valid logits with rank key >= lower_bound, in
 * decreasing key order. By count: the cutoff that keeps exactly `need`
 * tokens. By mass (g_i against M): `need` is ignored; the target is
 * psm_top_p_target(Z, top_p) with Z the mass above lower_bound, and the
 * cutoff keeps the shortest prefix reaching it (at least one token).
 * Returns a key c such that the selected tokens are exactly those with
 * key >= c. Keys are unique (they carry the token), so the last level always
 * isolates one token. Called by the whole block. */
template <int WarpSize, class Row>
PSM_GPU_DEVICE psm_u64 psm_gpu_radix_select(const Row &source, const psm_gpu_call &call,
                                            const psm_gpu_row_state &state,
                                            psm_u64 lower_bound, int by_mass, psm_u64 need,
                                            float top_p, psm_gpu_row_scratch<WarpSize> &scratch)
{
    const psm_gpu_hardware_lanes<WarpSize> lanes;
    const int lane = threadIdx.x % WarpSize, warp = threadIdx.x / WarpSize;
    psm_u64 prefix = 0; /* the digits chosen so far */
    psm_u64 cutoff = lower_bound;

    for (int level = 0; level < PSM_GPU_RADIX_LEVELS; ++level) {
        const int shift = 64 - PSM_GPU_RADIX_BITS * (level + 1);
        for (int b = threadIdx.x; b < PSM_GPU_RADIX_BUCKETS; b += blockDim.x) {
            scratch.bucket_count[b] = 0;
            scratch.bucket_mass[b] = 0;
        }
        psm_gpu_block_barrier();
        for (psm_i64 i = threadIdx.x; i < call.vocab; i += blockDim.x) {
            const float x = source.value(i);
            if (psm_logit_class(x) != PSM_LOGIT_VALID)
                continue;
            const psm_u64 key = psm_rank_key(x, (psm_u32)i);
            if (key < lower_bound)
                continue;
            if (level > 0 && (key >> (shift + PSM_GPU_RADIX_BITS)) != prefix)
                continue;
            const int bucket = (int)((key >> shift) & (PSM_GPU_RADIX_BUCKETS - 1));
            psm_gpu_atomic_add_u32(&scratch.bucket_count[bucket], 1u);
            if (by_mass)
                psm_gpu_atomic_add_u64(
                    &scratch.bucket_mass[bucket],
                    psm_weight(psm_scaled_gap(state.row_max, x, state.scale), call.weight_bits));
        }
        psm_gpu_block_barrier();

        /* Warp 0 finds the first bucket, from the top, that is non-empty and
         * whose running total reaches need (psm_warp_search_running: lane l
         * owns buckets 255 - l*buckets_per_lane downwards). By mass, at the
         * first level, need comes from Z, the mass of the candidates. */
        if (warp == 0) {
            const psm_gpu_bucket_totals<WarpSize> totals = {&scratch, by_mass};
            const psm_gpu_top_p_need top_p_need = {top_p};
            const psm_warp_search<psm_u64> hit =
                psm_warp_search_running<WarpSize, PSM_GPU_RADIX_BUCKETS / WarpSize>(
                    totals, need, by_mass && level == 0, top_p_need, lane, lanes);
            if (lane == (hit.winner < 0 ? 0 : hit.winner)) {
                /* winner < 0 cannot happen (need never exceeds the total at
                 * its level); stop with the whole prefix as a safe cutoff. */
                scratch.broadcast[0] =
                    (psm_u64)(hit.winner < 0 ? 0 : PSM_GPU_RADIX_BUCKETS - 1 - hit.position);
                scratch.broadcast[1] = hit.before;
                scratch.broadcast[2] = hit.need;
                scratch.broadcast[3] = hit.winner < 0 ? 1u : 0u;
            }
        }
        psm_gpu_block_barrier();
        const psm_u64 bucket = scratch.broadcast[0];
        const psm_u64 above = scratch.broadcast[1];
        need = scratch.broadcast[2];
        const int failed = (int)scratch.broadcast[3];
        const psm_u32 bucket_count = scratch.bucket_count[bucket];
        const psm_u64 bucket_value = by_mass ? (psm_u64)scratch.bucket_mass[bucket] : bucket_count;
        psm_gpu_block_barrier();

        const psm_u64 bucket_prefix = (prefix << PSM_GPU_RADIX_BITS) | bucket;
        if (failed) {
            cutoff = prefix << (shift + PSM_GPU_RADIX_BITS);
            break;
        }
        /* The whole bucket is selected when it holds one token, or (by
         * count) when it ends exactly at need. Then every key at or above
         * bucket_prefix << shift is selected and nothing below. */
        if (bucket_count == 1 || (!by_mass && above + bucket_value == need) ||
            level == PSM_GPU_RADIX_LEVELS - 1) {
            cutoff = bucket_prefix << shift;
            break;
        }
        prefix = bucket_prefix;
        need -= above;
    }
    return cutoff > lower_bound ? cutoff : lower_bound;
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

/* From the kept set to the outputs: tile masses over the kept set (when
 * filtered), T_t and their scan, then the draws or the probabilities. */
template <int WarpSize, class Row>
PSM_GPU_DEVICE void psm_gpu_finish_row(const Row &source, const psm_gpu_call &call,
                                       const psm_gpu_row_state &state, const psm_gpu_row_params &p,
                                       int probs_mode, psm_gpu_row_scratch<WarpSize> &scratch)
{
    const psm_gpu_hardware_lanes<WarpSize> lanes;
    const int lane = threadIdx.x % WarpSize, warp = threadIdx.x / WarpSize;
    const psm_i64 tiles = call.tiles_per_row;
    psm_u64 *tile_key = call.tile_key + state.tile_base;
    psm_u64 *tile_mass = call.tile_mass + state.tile_base;
    psm_u64 *tile_prefix = call.tile_prefix + state.tile_base;

    if (state.filtered) {
        /* One warp per tile: m_t over kept tokens, then S_t against it. */
        for (psm_i64 tile = warp; tile < tiles; tile += psm_gpu_block_warps<WarpSize>()) {
            const psm_i64 start = tile * PSM_TILE;
            float x[(PSM_TILE / WarpSize)];
            psm_u64 best_key = 0;
#pragma unroll
            for (int r = 0; r < (PSM_TILE / WarpSize); ++r) {
                const psm_i64 i = start + r * WarpSize + lane;
                x[r] = -INFINITY;
                if (i < call.vocab) {
                    const float value = source.value(i);
                    if (psm_gpu_is_kept(state, call.weight_bits, value, i)) {
                        x[r] = value;
                        const psm_u64 key = psm_rank_key(value, (psm_u32)i);
                        best_key = key > best_key ? key : best_key;
                    }
                }
            }
            best_key = psm_warp_max<WarpSize>(best_key, lanes);
            psm_u64 mass = 0;
            if (best_key != 0) {
                const float tile_max = psm_gpu_key_logit(best_key);
#pragma unroll
                for (int r = 0; r < (PSM_TILE / WarpSize); ++r)
                    if (x[r] != -INFINITY)
                        mass += psm_weight(psm_scaled_gap(tile_max, x[r], state.scale),
                                           call.weight_bits);
                mass = psm_warp_sum<WarpSize>(mass, lanes);
            }
            if (lane == 0) {
                tile_key[tile] = best_key;
                tile_mass[tile] = mass;
            }
        }
        psm_gpu_block_barrier();
    }

    /* T_t = S_t rescaled to the row maximum, and their running sum. */
    psm_u64 carry = 0;
    for (psm_i64 chunk = 0; chunk < tiles; chunk += blockDim.x) {
        const psm_i64 tile = chunk + threadIdx.x;
        psm_u64 rescaled = 0;
        if (tile < tiles && tile_key[tile] != 0)
            rescaled = psm_rescale_mass(
                tile_mass[tile],
                psm_scaled_gap(state.row_max, psm_gpu_key_logit(tile_key[tile]), state.scale));
        psm_u64 chunk_total;
        psm_u64 inclusive = psm_gpu_block_inclusive_scan_u64(rescaled, &chunk_total, scratch);
        if (tile < tiles)
            tile_prefix[tile] = carry + inclusive;
        carry += chunk_total;
    }
    const psm_u64 total = carry;
    psm_gpu_block_barrier();

    if (probs_mode) {
        float *out = call.probs + state.row * call.probs_stride;
        for (psm_i64 tile = warp; tile < tiles; tile += psm_gpu_block_warps<WarpSize>()) {
            const psm_u64 key = tile_key[tile];
            const psm_u64 tile_total = tile_mass[tile];
            const psm_u64 rescaled = tile_prefix[tile] - (tile > 0 ? tile_prefix[tile - 1] : 0);
            const float tile_max = psm_gpu_key_logit(key);
            const double tile_share = (double)rescaled / (double)total;
            for (int r = 0; r < (PSM_TILE / WarpSize); ++r) {
                const psm_i64 i = tile * PSM_TILE + r * WarpSize + lane;
                if (i >= call.vocab)
                    break;
                float probability = 0.0f;
                const float x = source.value(i);
                if (key != 0 && tile_total != 0 && psm_gpu_is_kept(state, call.weight_bits, x, i)) {
                    psm_u64 w = psm_weight(psm_scaled_gap(tile_max, x, state.scale), call.weight_bits);
                    probability = (float)(((double)w / (double)tile_total) * tile_share);
                }
                out[i] = probability;
            }
        }
        return;
    }

    /* One warp per sample. Lane l owns the tile's tokens
     * [l * per_lane, (l + 1) * per_lane), so that a scan of the lanes' sums
     * gives running sums in index order. */
    for (psm_i64 sample = warp; sample < call.num_samples; sample += psm_gpu_block_warps<WarpSize>()) {
        const psm_draw_bits bits = psm_sample_bits(p.seed, call.offset, p.stream, (psm_u32)sample);
        const psm_u64 tile_target = psm_pick(bits.tile, total);
        psm_i64 low = 0, high = tiles - 1; /* first tile whose prefix exceeds the target */
        while (low < high) {
            psm_i64 middle = low + (high - low) / 2;
            if (tile_prefix[middle] > tile_target)
                high = middle;
            else
                low = middle + 1;
        }
        const psm_i64 tile = low;
        const psm_u64 tile_total = tile_mass[tile];
        const psm_u64 rescaled = tile_prefix[tile] - (tile > 0 ? tile_prefix[tile - 1] : 0);
        const float tile_max = psm_gpu_key_logit(tile_key[tile]);
        const psm_u64 token_target = psm_pick(bits.token, tile_total);

        const psm_i64 lane_start = tile * PSM_TILE + (psm_i64)lane * (PSM_TILE / WarpSize);
        psm_u64 lane_mass = 0;
        for (int r = 0; r < (PSM_TILE / WarpSize); ++r) {
            const psm_i64 i = lane_start + r;
            if (i >= call.vocab)
                break;
            const float x = source.value(i);
            if (psm_gpu_is_kept(state, call.weight_bits, x, i))
                lane_mass += psm_weight(psm_scaled_gap(tile_max, x, state.scale), call.weight_bits);
        }
        const psm_warp_owner<psm_u64> owner =
            psm_warp_find_owner<WarpSize>(lane_mass, token_target, lane, lanes);
        const psm_u64 lane_begin = owner.begin;
        const int owner_lane = owner.lane;
        psm_i32 token = -1;
        psm_u64 token_weight = 0;
        if (lane == owner_lane) {
            psm_u64 running = lane_begin;
            for (int r = 0; r < (PSM_TILE / WarpSize); ++r) {
                const psm_i64 i = lane_start + r;
                if (i >= call.vocab)
                    break;
                const float x = source.value(i);
                if (!psm_gpu_is_kept(state, call.weight_bits, x, i))
                    continue;
                psm_u64 w = psm_weight(psm_scaled_gap(tile_max, x, state.scale), call.weight_bits);
                if (token_target < running + w) {
                    token = (psm_i32)i;
                    token_weight = w;
                    break;
                }
                running += w;
            }
            call.tokens[state.row * call.num_samples + sample] = token;
            if (call.logprobs)
                call.logprobs[state.row * call.num_samples + sample] =
                    (float)log(((double)token_weight / (double)tile_total) *
                               ((double)rescaled / (double)total));
        }
    }
}

/* Copies a row, through psm_read_logit, into shared memory. */
template <int Dtype>
PSM_GPU_DEVICE void psm_gpu_stage_row(const psm_gpu_call &call, const unsigned char *row_base,
                                      float *shared_values)
{
    const int per_vector = psm_gpu_dtype_traits<Dtype>::per_vector;
    psm_i64 vector_end = 0;
    if (call.logits_aligned) {
        vector_end = call.vocab / per_vector * per_vector;
        for (psm_i64 v = threadIdx.x; v < vector_end / per_vector; v += blockDim.x) {
            float values[8];
            psm_gpu_load_vector<Dtype>(row_base, v * per_vector, values);
            for (int k = 0; k < per_vector; ++k)
                shared_values[v * per_vector + k] = psm_read_logit(values[k]);
        }
    }
    for (psm_i64 i = vector_end + threadIdx.x; i < call.vocab; i += blockDim.x)
        shared_values[i] = psm_read_logit(psm_gpu_load_raw<Dtype>(row_base, i));
    psm_gpu_block_barrier();
}

/* One block per row. SharedRow: rows that need a filter are first copied to
 * dynamic shared memory (the host launches this variant only when the row
 * fits). ProbsMode: write psm_probs' distribution instead of drawing. */
template <int WarpSize, int Dtype, bool SharedRow, bool ProbsMode>
PSM_GPU_DEVICE void psm_gpu_row_body(const psm_gpu_call &call, float *psm_gpu_shared_values,
                                     psm_gpu_row_scratch<WarpSize> &scratch)
{
    for (psm_i64 row = blockIdx.x; row < call.rows; row += gridDim.x) {
        const psm_gpu_row_params p = psm_gpu_resolve_row(call, row);
        const psm_i64 tile_base = row * call.tiles_per_row;

        psm_u64 best_key = 0, valid_count = 0;
        psm_u32 bad = 0;
        for (psm_i64 tile = threadIdx.x; tile < call.tiles_per_row; tile += blockDim.x) {
            const psm_u64 key = call.tile_key[tile_base + tile];
            const psm_u32 info = call.tile_info[tile_base + tile];
            best_key = key > best_key ? key : best_key;
            valid_count += info & PSM_GPU_TILE_COUNT_MASK;
            bad |= (info & PSM_GPU_TILE_BAD_FLAG) ? 1u : 0u;
        }
        best_key = psm_gpu_block_max_u64(best_key, scratch);
        valid_count = psm_gpu_block_sum_u64(valid_count, scratch);
        bad = (psm_u32)psm_gpu_block_max_u64(bad, scratch);

        if (bad || valid_count == 0 || !p.valid) {
            psm_gpu_write_point_row(call, row, ProbsMode, -1);
            continue;
        }
        if (psm_is_greedy(p.temperature)) {
            psm_gpu_write_point_row(call, row, ProbsMode, psm_gpu_key_token(best_key));
            continue;
        }

        psm_gpu_row_state state;
        state.row = row;
        state.tile_base = tile_base;
        state.row_max = psm_gpu_key_logit(best_key);
        state.scale = psm_inverse_temperature_scale(p.temperature);
        state.cutoff = 0;
        state.min_weight = 0;
        const int top_k_on = p.top_k > 0 && (psm_u64)p.top_k < valid_count;
        const int top_p_on = p.top_p < 1.0f;
        const int min_p_on = p.min_p > 0.0f;
        state.filtered = top_k_on || top_p_on || min_p_on;

        if (!state.filtered) {
            psm_gpu_global_row<Dtype> source = {psm_gpu_row_base<Dtype>(call, row)};
            psm_gpu_finish_row(source, call, state, p, ProbsMode, scratch);
            psm_gpu_block_barrier();
            continue;
        }
        if (min_p_on)
            state.min_weight = psm_min_p_threshold(p.min_p, call.weight_bits);

        if (SharedRow) {
            psm_gpu_stage_row<Dtype>(call, psm_gpu_row_base<Dtype>(call, row), psm_gpu_shared_values);
            psm_gpu_shared_row source = {psm_gpu_shared_values};
            if (top_k_on)
                state.cutoff = psm_gpu_radix_select(source, call, state, 0, 0, (psm_u64)p.top_k,
                                                    1.0f, scratch);
            if (top_p_on)
                state.cutoff = psm_gpu_radix_select(source, call, state, state.cutoff, 1, 0,
                                                    p.top_p, scratch);
            psm_gpu_finish_row(source, call, state, p, ProbsMode, scratch);
        } else {
            psm_gpu_global_row<Dtype> source = {psm_gpu_row_base<Dtype>(call, row)};
            if (top_k_on)
                state.cutoff = psm_gpu_radix_select(source, call, state, 0, 0, (psm_u64)p.top_k,
                                                    1.0f, scratch);
            if (top_p_on)
                state.cutoff = psm_gpu_radix_select(source, call, state, state.cutoff, 1, 0,
                                                    p.top_p, scratch);
            psm_gpu_finish_row(source, call, state, p, ProbsMode, scratch);
        }
        /* The next row reuses the shared row and the scratch. */
        psm_gpu_block_barrier();
    }
}

template <int WarpSize, int Dtype, bool SharedRow, bool ProbsMode>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_ROW_THREADS)
    psm_gpu_row_kernel(const psm_gpu_call call)
{
    extern __shared__ float psm_gpu_shared_values[];
    __shared__ psm_gpu_row_scratch<WarpSize> scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_gpu_row_body<WarpSize, Dtype, SharedRow, ProbsMode>(call, psm_gpu_shared_values, scratch);
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
