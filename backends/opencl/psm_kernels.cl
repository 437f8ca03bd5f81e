/*
 * psm_kernels.cl: the OpenCL backend's kernels, OpenCL C 1.2.
 *
 * The host builds this file with core/psm_contract.h prepended (as the first
 * source string of the same program), so every quantity that decides a token
 * (weights, gaps, thresholds, Philox, the picks) comes from the contract and
 * the FP_CONTRACT OFF pragma there covers this file too.
 *
 * Build options give PSM_WG, the work-group size of every kernel (a power of
 * two between 16 and 1024, chosen by the host from device queries).
 *
 * Pipeline for one psm_sample call (docs/SAMPLING.md):
 *   psm_tile_reduce  one group per (tile, row): reads the tile once; writes the
 *                    tile's valid maximum, best rank key, valid count, bad flag
 *                    and, for unfiltered rows, (m_t, S_t).
 *   psm_row_filter   one group per row, only when a filter may be active:
 *                    finds the top-k / top-p cutoff key by radix descent over
 *                    psm_rank_key (counts for top-k, exact 64-bit masses per
 *                    bucket for top-p) and the min-p weight threshold. A row
 *                    that fits in local memory is read once; a longer one is
 *                    read once per radix level until the tokens still needed
 *                    fit, once more to collect their keys, and the search
 *                    ends on that list (psm_radix_collect).
 *   psm_tile_filter  one group per (tile, row) of filtered rows: (m_t, S_t)
 *                    over the kept tokens.
 *   psm_row_combine  one group per row: status, M, T_t, the inclusive prefix of
 *                    T_t over tiles and the row total.
 *   psm_draw         one group per (sample, row): picks the tile by binary
 *                    search of the prefix, then the token within the tile.
 *   psm_probs        one group per (tile, row): the final distribution.
 * No kernel needs 64-bit atomics: 64-bit sums are tree reductions, and the
 * per-bucket masses of top-p are kept as two 32-bit words with exact carries.
 */

#ifdef cl_khr_fp64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define PSM_HAVE_FP64 1
#else
#define PSM_HAVE_FP64 0
#endif

#ifndef PSM_WG
#error "PSM_WG (work-group size) must be given as a build option"
#endif
#define PSM_PER_ITEM (PSM_TILE / PSM_WG)
#define PSM_BUCKETS 256

/* Every helper that is handed a __local pointer is PSM_LOCAL_FN, forced
 * inline, so that every use of a kernel's __local variables stays inside the
 * kernel function.
 *
 * Why: clang's interprocedural optimisation removes a static helper's
 * pointer parameter when every call passes the same kernel-scope __local
 * array (psm_radix_descend and psm_nth_with_value, each called twice from
 * psm_row_filter), and the helper then names the array directly. PoCL 3.1
 * gives each work-group its own copy of a kernel's __local variables by
 * rewriting their uses in the kernel function only, so those left in a
 * helper address one module-wide copy that all the work-groups PoCL's
 * threads run at once share. Rows then overwrote each other's radix buckets
 * and shared scalars: wrong top-k/top-p cutoffs and different tokens from
 * identical calls, with more than one row and more than one thread only
 * (POCL_MAX_PTHREAD_COUNT=1 hides it; POCL_LEAVE_KERNEL_COMPILER_TEMP_FILES=1
 * keeps the IR that shows it). Within a group the kernels have no race. GPU
 * drivers give each group its own __local memory wherever it is named; the
 * attribute is for clang (PoCL's front end), other compilers get inline. */
#ifdef __clang__
#define PSM_LOCAL_FN static inline __attribute__((always_inline))
#else
#define PSM_LOCAL_FN static inline
#endif

#define PSM_DTYPE_F32 0
#define PSM_DTYPE_F16 1
#define PSM_DTYPE_BF16 2

/* Which per-row arrays a request has (bit mask, host and device agree). */
#define PSM_PER_ROW_TEMPERATURE 1u
#define PSM_PER_ROW_TOP_K 2u
#define PSM_PER_ROW_TOP_P 4u
#define PSM_PER_ROW_MIN_P 8u
#define PSM_PER_ROW_SEED 16u

#define PSM_ROW_SAMPLE 0
#define PSM_ROW_GREEDY 1
#define PSM_ROW_BAD 2

/* Per-row results shared between kernels; lives only in device memory. */
typedef struct psm_row_state {
    ulong cutoff;      /* smallest kept rank key; 0 keeps every valid token */
    ulong min_weight;  /* min-p threshold on global weights; 0 when off */
    ulong total;       /* sum of T_t */
    float maximum;     /* M */
    int status;        /* PSM_ROW_* */
    int filtered;      /* set by psm_row_filter when a filter is active */
    uint greedy_token;
} psm_row_state;
/* The host reserves PSM_ROW_STATE_BYTES per row; fail the build if that is short. */
typedef char psm_row_state_fits[(sizeof(psm_row_state) <= PSM_ROW_STATE_BYTES) ? 1 : -1];

/* Every kernel that reads a row takes the request in this order. */
#define PSM_REQUEST_PARAMS                                                                  \
    __global const uchar *logits, int dtype, int vocab, long row_stride, int tiles,           \
        float temperature, int top_k, float top_p, float min_p, ulong seed, ulong offset,     \
        uint per_row, __global const float *temperature_per_row,                              \
        __global const int *top_k_per_row, __global const float *top_p_per_row,              \
        __global const float *min_p_per_row, __global const ulong *seed_per_row

typedef struct psm_row_params {
    float temperature;
    int top_k;
    float top_p;
    float min_p;
    ulong seed;
    uint stream;
    int valid;
} psm_row_params;

#define PSM_RESOLVE_ROW(row)                                                                 \
    psm_resolve_row((row), temperature, top_k, top_p, min_p, seed, per_row,                 \
                    temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,       \
                    seed_per_row)

static psm_row_params psm_resolve_row(uint row, float temperature, int top_k, float top_p,
                                      float min_p, ulong seed, uint per_row,
                                      __global const float *temperature_per_row,
                                      __global const int *top_k_per_row,
                                      __global const float *top_p_per_row,
                                      __global const float *min_p_per_row,
                                      __global const ulong *seed_per_row)
{
    psm_row_params p;
    p.temperature = (per_row & PSM_PER_ROW_TEMPERATURE) ? temperature_per_row[row] : temperature;
    p.top_k = (per_row & PSM_PER_ROW_TOP_K) ? top_k_per_row[row] : top_k;
    p.top_p = (per_row & PSM_PER_ROW_TOP_P) ? top_p_per_row[row] : top_p;
    p.min_p = (per_row & PSM_PER_ROW_MIN_P) ? min_p_per_row[row] : min_p;
    p.seed = (per_row & PSM_PER_ROW_SEED) ? seed_per_row[row] : seed;
    p.stream = (per_row & PSM_PER_ROW_SEED) ? 0u : row;
    p.valid = psm_row_params_valid(p.temperature, p.top_k, p.top_p, p.min_p);
    return p;
}

/* A logit as the contract reads it, with anything that is not a candidate
 * (masked, NaN, +inf) folded to -inf: callers that care about bad logits
 * classify before folding. */
static float psm_load(__global const uchar *logits, int dtype, long index)
{
    if (dtype == PSM_DTYPE_F32)
        return psm_read_logit(((__global const float *)logits)[index]);
    ushort h = ((__global const ushort *)logits)[index];
    return psm_read_logit(dtype == PSM_DTYPE_F16 ? psm_f16_to_float(h) : psm_bf16_to_float(h));
}

static float psm_candidate_value(float x)
{
    return psm_logit_class(x) == PSM_LOGIT_VALID ? x : -INFINITY;
}

static int psm_is_valid(float folded)
{
    return folded > -INFINITY;
}

/* Inverse of the ordered bits inside psm_rank_key. */
static float psm_ordered_to_float(uint ordered)
{
    return as_float((ordered >> 31) ? (ordered & 0x7fffffffu) : ~ordered);
}

/* ---- work-group collectives (every item must call them) ------------------ */

PSM_LOCAL_FN float psm_group_max_float(float value, __local float *scratch)
{
    uint lid = get_local_id(0);
    scratch[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint width = PSM_WG / 2; width > 0; width >>= 1) {
        if (lid < width && scratch[lid + width] > scratch[lid])
            scratch[lid] = scratch[lid + width];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float result = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return result;
}

PSM_LOCAL_FN ulong psm_group_max_u64(ulong value, __local ulong *scratch)
{
    uint lid = get_local_id(0);
    scratch[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint width = PSM_WG / 2; width > 0; width >>= 1) {
        if (lid < width && scratch[lid + width] > scratch[lid])
            scratch[lid] = scratch[lid + width];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    ulong result = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return result;
}

PSM_LOCAL_FN ulong psm_group_sum_u64(ulong value, __local ulong *scratch)
{
    uint lid = get_local_id(0);
    scratch[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint width = PSM_WG / 2; width > 0; width >>= 1) {
        if (lid < width)
            scratch[lid] += scratch[lid + width];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    ulong result = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return result;
}

/* Inclusive prefix sum over the group (Hillis-Steele); *total gets the sum. */
PSM_LOCAL_FN ulong psm_group_inclusive_scan_u64(ulong value, __local ulong *scratch, ulong *total)
{
    uint lid = get_local_id(0);
    scratch[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint distance = 1; distance < PSM_WG; distance <<= 1) {
        ulong addend = lid >= distance ? scratch[lid - distance] : 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        scratch[lid] += addend;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    ulong result = scratch[lid];
    *total = scratch[PSM_WG - 1];
    barrier(CLK_LOCAL_MEM_FENCE);
    return result;
}

/* ---- row summary from the tile summaries of psm_tile_reduce -------------- */

#define PSM_TILE_BAD 0x80000000u

typedef struct psm_row_summary {
    float maximum;   /* M: the largest valid logit (-inf when none) */
    ulong top_key;   /* largest rank key: the greedy token */
    uint valid;      /* number of valid tokens */
    int bad;         /* a NaN or +inf somewhere */
} psm_row_summary;

PSM_LOCAL_FN psm_row_summary psm_summarise_row(__global const float *tile_max,
                                               __global const ulong *tile_key,
                                               __global const uint *tile_info, long row_tiles,
                                               int tiles, __local float *scratch_float,
                                               __local ulong *scratch_u64)
{
    float maximum = -INFINITY;
    ulong key = 0, valid = 0, bad = 0;
    for (int t = get_local_id(0); t < tiles; t += PSM_WG) {
        float m = tile_max[row_tiles + t];
        maximum = m > maximum ? m : maximum;
        ulong k = tile_key[row_tiles + t];
        key = k > key ? k : key;
        uint info = tile_info[row_tiles + t];
        valid += info & ~PSM_TILE_BAD;
        bad |= (info & PSM_TILE_BAD) ? 1u : 0u;
    }
    psm_row_summary summary;
    summary.maximum = psm_group_max_float(maximum, scratch_float);
    summary.top_key = psm_group_max_u64(key, scratch_u64);
    summary.valid = (uint)psm_group_sum_u64(valid, scratch_u64);
    summary.bad = psm_group_max_u64(bad, scratch_u64) != 0;
    return summary;
}

static int psm_row_status(const psm_row_params *p, const psm_row_summary *summary)
{
    if (!p->valid || summary->bad || summary->valid == 0)
        return PSM_ROW_BAD;
    return psm_is_greedy(p->temperature) ? PSM_ROW_GREEDY : PSM_ROW_SAMPLE;
}

static int psm_top_k_active(const psm_row_params *p, uint valid)
{
    return p->top_k > 0 && (uint)p->top_k < valid;
}

static int psm_filter_possible(const psm_row_params *p, uint valid)
{
    return psm_top_k_active(p, valid) || p->top_p < 1.0f || p->min_p > 0.0f;
}

/* ---- kernel 1: per-tile reduction ----------------------------------------- */

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_tile_reduce(PSM_REQUEST_PARAMS, __global float *tile_max, __global ulong *tile_key,
                __global uint *tile_info, __global float *tile_ref, __global ulong *tile_mass)
{
    __local float scratch_float[PSM_WG];
    __local ulong scratch_u64[PSM_WG];
    const uint lid = get_local_id(0);
    const int tile = get_group_id(0);
    const uint row = get_global_id(1);
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const long base = (long)row * row_stride;
    const int first = tile * PSM_TILE;
    const int count = min(PSM_TILE, vocab - first);

    float values[PSM_PER_ITEM];
    float maximum = -INFINITY;
    ulong key = 0, valid = 0, bad = 0;
    for (int j = 0; j < PSM_PER_ITEM; ++j) {
        int i = lid + j * PSM_WG;
        float x = -INFINITY;
        if (i < count) {
            float read = psm_load(logits, dtype, base + first + i);
            int cls = psm_logit_class(read);
            if (cls == PSM_LOGIT_VALID) {
                x = read;
                valid += 1;
                maximum = x > maximum ? x : maximum;
                ulong k = psm_rank_key(x, (uint)(first + i));
                key = k > key ? k : key;
            } else if (cls == PSM_LOGIT_BAD) {
                bad = 1;
            }
        }
        values[j] = x;
    }
    maximum = psm_group_max_float(maximum, scratch_float);
    key = psm_group_max_u64(key, scratch_u64);
    valid = psm_group_sum_u64(valid, scratch_u64);
    bad = psm_group_max_u64(bad, scratch_u64);
    const long slot = (long)row * tiles + tile;
    if (lid == 0) {
        tile_max[slot] = maximum;
        tile_key[slot] = key;
        tile_info[slot] = (uint)valid | (bad ? PSM_TILE_BAD : 0u);
    }
    /* S_t against the tile's own maximum: final for unfiltered rows,
     * recomputed by psm_tile_filter for filtered ones. */
    if (!p.valid || bad || valid == 0 || psm_is_greedy(p.temperature)) {
        if (lid == 0) {
            tile_ref[slot] = maximum;
            tile_mass[slot] = 0;
        }
        return;
    }
    const float scale = psm_inverse_temperature_scale(p.temperature);
    const int bits = psm_weight_bits(vocab);
    /* maximum >= every valid value, so psm_weight_of_gap on the unclamped
     * product is psm_weight of psm_scaled_gap (core/psm_contract.h), with a
     * conversion in place of the shifts. */
    ulong mass = 0;
    for (int j = 0; j < PSM_PER_ITEM; ++j)
        if (psm_is_valid(values[j]))
            mass += psm_weight_of_gap(PSM_FMUL(PSM_FSUB(maximum, values[j]), scale), bits);
    mass = psm_group_sum_u64(mass, scratch_u64);
    if (lid == 0) {
        tile_ref[slot] = maximum;
        tile_mass[slot] = mass;
    }
}

/* ---- kernel 2: filter cutoffs per row ------------------------------------- */

/* A row's token as a candidate value (-inf when not valid), from the on-chip
 * copy when the row fits in local memory, else from global memory. */
typedef struct psm_row_source {
    __global const uchar *logits;
    __local const float *cache;
    long base;
    int dtype;
    int cached;
} psm_row_source;

PSM_LOCAL_FN float psm_row_value(const psm_row_source *source, int i)
{
    if (source->cached)
        return source->cache[i];
    return psm_candidate_value(psm_load(source->logits, source->dtype, source->base + i));
}

/* Adds a 64-bit mass to a bucket kept as two 32-bit words: a wrapped low
 * word carries exactly one into the high word. */
PSM_LOCAL_FN void psm_bucket_add(__local uint *bucket_low, __local uint *bucket_high, uint digit,
                                 ulong g)
{
    uint low = (uint)g;
    uint old = atomic_add(&bucket_low[digit], low);
    uint carry = (old + low < old) ? 1u : 0u;
    uint high = (uint)(g >> 32) + carry;
    if (high)
        atomic_add(&bucket_high[digit], high);
}

/* The highest bucket at which the running amount from the top reaches want;
 * *above grows by the amount of the buckets above it. */
PSM_LOCAL_FN uint psm_choose_bucket(__local const uint *bucket_low,
                                    __local const uint *bucket_high, ulong want, ulong *above)
{
    for (int digit = PSM_BUCKETS - 1; digit >= 0; --digit) {
        ulong amount = ((ulong)bucket_high[digit] << 32) | bucket_low[digit];
        if (*above + amount >= want)
            return (uint)digit;
        *above += amount;
    }
    return 0;
}

/* Radix descent over the ordered logit bits (8 bits per level) among the
 * candidates (valid tokens with rank key >= floor_key). Counting mode finds
 * the value of the want-th candidate in rank order; mass mode finds the value
 * at which the running sum of global weights first reaches want. Returns the
 * ordered bits of that value; *above gets the count or mass of candidates
 * with a strictly larger value. */
PSM_LOCAL_FN uint psm_radix_descend(const psm_row_source *source, int vocab, ulong floor_key,
                                    int mass_mode, ulong want, float maximum, float scale,
                                    int bits, ulong *above_out, __local uint *bucket_low,
                                    __local uint *bucket_high, __local uint *shared_choice,
                                    __local ulong *shared_above)
{
    const uint lid = get_local_id(0);
    uint prefix = 0, prefix_mask = 0;
    ulong above = 0;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = lid; b < PSM_BUCKETS; b += PSM_WG) {
            bucket_low[b] = 0;
            bucket_high[b] = 0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = lid; i < vocab; i += PSM_WG) {
            float x = psm_row_value(source, i);
            if (!psm_is_valid(x))
                continue;
            ulong key = psm_rank_key(x, (uint)i);
            uint ordered = (uint)(key >> 32);
            if (key < floor_key || (ordered & prefix_mask) != prefix)
                continue;
            uint digit = (ordered >> shift) & 0xffu;
            if (mass_mode) {
                ulong g = psm_weight(psm_scaled_gap(maximum, x, scale), bits);
                if (g == 0)
                    continue;
                psm_bucket_add(bucket_low, bucket_high, digit, g);
            } else {
                atomic_inc(&bucket_low[digit]);
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid == 0) {
            *shared_choice = psm_choose_bucket(bucket_low, bucket_high, want, &above);
            *shared_above = above;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        prefix |= *shared_choice << shift;
        prefix_mask |= 0xffu << shift;
        above = *shared_above;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    *above_out = above;
    return prefix;
}

/* The index of the nth (1-based) valid token, in index order, whose value is
 * exactly `value`. Each item scans a contiguous chunk so index order is the
 * item order. */
PSM_LOCAL_FN int psm_nth_with_value(const psm_row_source *source, int vocab, float value, uint nth,
                                    __local ulong *scratch, __local int *shared_index)
{
    const uint lid = get_local_id(0);
    const int chunk = (vocab + PSM_WG - 1) / PSM_WG;
    const int begin = min((int)lid * chunk, vocab);
    const int end = min(begin + chunk, vocab);
    uint count = 0;
    for (int i = begin; i < end; ++i)
        count += psm_row_value(source, i) == value ? 1u : 0u;
    if (lid == 0)
        *shared_index = 0; /* kept only if fewer than nth match: unreachable */
    ulong total;
    ulong inclusive = psm_group_inclusive_scan_u64(count, scratch, &total);
    ulong before = inclusive - count;
    if (before < nth && nth <= inclusive) {
        ulong seen = before;
        for (int i = begin; i < end; ++i) {
            if (psm_row_value(source, i) == value && ++seen == nth) {
                *shared_index = i;
                break;
            }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    int index = *shared_index;
    barrier(CLK_LOCAL_MEM_FENCE);
    return index;
}

/* ---- the global path's candidate list ------------------------------------
 * A row too long for local memory is not read once per radix level. Each
 * level over global memory also counts its bucket's tokens; as soon as the
 * tokens the remaining search needs fit in local memory, one more pass
 * appends their rank keys there (in any order: a key holds its value and its
 * token) and the rest of the search, top-p after top-k included, runs on that
 * list. The keys found are those of the definitions; only where the search
 * looks changes. */

/* Radix descent over global memory with the escape to a list. Counting mode
 * (top-k, want = k) collects every candidate at or above the chosen bucket;
 * mass mode (top-p) collects the chosen bucket's candidates of nonzero
 * weight, and with want = 0 takes its target from the first level's total
 * (the mass of every candidate, as top-p alone needs). Returns the list's
 * length, or -1 when even the last level's bucket does not fit;
 * *above_out gets the mass above the collected bucket (mass mode) and
 * *want_out the target. */
PSM_LOCAL_FN int psm_radix_collect(__global const uchar *logits, int dtype, long base, int vocab,
                                   int mass_mode, ulong want, float top_p, float maximum,
                                   float scale, int bits, __local ulong *list, uint capacity,
                                   __local uint *bucket_low, __local uint *bucket_high,
                                   __local uint *bucket_count, __local uint *shared_choice,
                                   __local ulong *shared_above, __local ulong *shared_want,
                                   __local uint *shared_size, ulong *above_out,
                                   ulong *want_out)
{
    const uint lid = get_local_id(0);
    uint prefix = 0, prefix_mask = 0;
    ulong above = 0, target = want;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int b = lid; b < PSM_BUCKETS; b += PSM_WG) {
            bucket_low[b] = 0;
            bucket_high[b] = 0;
            bucket_count[b] = 0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = lid; i < vocab; i += PSM_WG) {
            float x = psm_candidate_value(psm_load(logits, dtype, base + i));
            if (!psm_is_valid(x))
                continue;
            uint ordered = (uint)(psm_rank_key(x, (uint)i) >> 32);
            if ((ordered & prefix_mask) != prefix)
                continue;
            uint digit = (ordered >> shift) & 0xffu;
            if (mass_mode) {
                ulong g = psm_weight(psm_scaled_gap(maximum, x, scale), bits);
                if (g == 0)
                    continue;
                psm_bucket_add(bucket_low, bucket_high, digit, g);
            }
            atomic_inc(&bucket_count[digit]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid == 0) {
            /* above and target are lid 0's own across the levels. */
            if (shift == 24 && mass_mode && want == 0) {
                ulong total = 0;
                for (int digit = 0; digit < PSM_BUCKETS; ++digit)
                    total += ((ulong)bucket_high[digit] << 32) | bucket_low[digit];
                /* A target of 0 keeps one token, as a target of 1 does. */
                target = max(psm_top_p_target(total, top_p), (ulong)1);
            }
            uint chosen = 0;
            for (int digit = PSM_BUCKETS - 1; digit >= 0; --digit) {
                ulong amount = mass_mode ? (((ulong)bucket_high[digit] << 32) | bucket_low[digit])
                                         : bucket_count[digit];
                if (above + amount >= target) {
                    chosen = (uint)digit;
                    break;
                }
                above += amount;
            }
            /* Counting mode keeps the candidates above the bucket too. */
            ulong size = (mass_mode ? 0 : above) + bucket_count[chosen];
            *shared_choice = chosen;
            *shared_above = above;
            *shared_want = target;
            *shared_size = size <= capacity ? 0u : 0xffffffffu;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        prefix |= *shared_choice << shift;
        prefix_mask |= 0xffu << shift;
        const int fits = *shared_size == 0;
        barrier(CLK_LOCAL_MEM_FENCE);
        if (!fits)
            continue;
        for (int i = lid; i < vocab; i += PSM_WG) {
            float x = psm_candidate_value(psm_load(logits, dtype, base + i));
            if (!psm_is_valid(x))
                continue;
            ulong key = psm_rank_key(x, (uint)i);
            uint masked = (uint)(key >> 32) & prefix_mask;
            if (mass_mode) {
                if (masked != prefix || psm_weight(psm_scaled_gap(maximum, x, scale), bits) == 0)
                    continue;
            } else if (masked < prefix) {
                continue;
            }
            list[atomic_inc(shared_size)] = key;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        const int size = (int)*shared_size;
        *above_out = *shared_above;
        *want_out = *shared_want;
        barrier(CLK_LOCAL_MEM_FENCE);
        return size;
    }
    return -1;
}

/* Radix descent over the full 64-bit rank keys of a list in local memory,
 * among the keys >= floor_key: the key of the want-th candidate in rank order
 * (counting mode), or the key at which the running sum of global weights
 * first reaches want (mass mode). */
PSM_LOCAL_FN ulong psm_list_descend(__local const ulong *list, int size, ulong floor_key,
                                    int mass_mode, ulong want, float maximum, float scale,
                                    int bits, __local uint *bucket_low,
                                    __local uint *bucket_high, __local uint *shared_choice,
                                    __local ulong *shared_above)
{
    const uint lid = get_local_id(0);
    ulong prefix = 0, prefix_mask = 0, above = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        for (int b = lid; b < PSM_BUCKETS; b += PSM_WG) {
            bucket_low[b] = 0;
            bucket_high[b] = 0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int i = lid; i < size; i += PSM_WG) {
            ulong key = list[i];
            if (key < floor_key || (key & prefix_mask) != prefix)
                continue;
            uint digit = (uint)(key >> shift) & 0xffu;
            if (mass_mode) {
                float x = psm_ordered_to_float((uint)(key >> 32));
                ulong g = psm_weight(psm_scaled_gap(maximum, x, scale), bits);
                if (g == 0)
                    continue;
                psm_bucket_add(bucket_low, bucket_high, digit, g);
            } else {
                atomic_inc(&bucket_low[digit]);
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid == 0) {
            *shared_choice = psm_choose_bucket(bucket_low, bucket_high, want, &above);
            *shared_above = above;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        prefix |= (ulong)*shared_choice << shift;
        prefix_mask |= (ulong)0xffu << shift;
        above = *shared_above;
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return prefix;
}

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_row_filter(PSM_REQUEST_PARAMS, __global const float *tile_max,
               __global const ulong *tile_key, __global const uint *tile_info,
               __global psm_row_state *state, __local ulong *local_store, int use_row_cache,
               int list_capacity)
{
    __local float scratch_float[PSM_WG];
    __local ulong scratch_u64[PSM_WG];
    __local uint bucket_low[PSM_BUCKETS];
    __local uint bucket_high[PSM_BUCKETS];
    __local uint bucket_count[PSM_BUCKETS];
    __local uint shared_choice;
    __local ulong shared_above;
    __local ulong shared_want;
    __local uint shared_size;
    __local int shared_index;
    /* The row's values when the row fits (use_row_cache), else the list of
     * candidate keys (list_capacity entries). */
    __local float *row_cache = (__local float *)local_store;
    const uint lid = get_local_id(0);
    const uint row = get_group_id(1);
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_row_summary summary =
        psm_summarise_row(tile_max, tile_key, tile_info, (long)row * tiles, tiles,
                          scratch_float, scratch_u64);
    const int filtered = psm_row_status(&p, &summary) == PSM_ROW_SAMPLE &&
                         psm_filter_possible(&p, summary.valid);
    if (!filtered) {
        if (lid == 0) {
            state[row].filtered = 0;
            state[row].cutoff = 0;
            state[row].min_weight = 0;
        }
        return;
    }

    psm_row_source source;
    source.logits = logits;
    source.cache = row_cache;
    source.base = (long)row * row_stride;
    source.dtype = dtype;
    source.cached = 0;
    if (use_row_cache) {
        for (int i = lid; i < vocab; i += PSM_WG)
            row_cache[i] = psm_candidate_value(psm_load(logits, dtype, source.base + i));
        barrier(CLK_LOCAL_MEM_FENCE);
        source.cached = 1;
    }

    const float scale = psm_inverse_temperature_scale(p.temperature);
    const int bits = psm_weight_bits(vocab);
    ulong cutoff = 0;
    int found = 0;
    if (!use_row_cache && list_capacity > 0 && (psm_top_k_active(&p, summary.valid) ||
                                                p.top_p < 1.0f)) {
        const int top_k_on = psm_top_k_active(&p, summary.valid);
        ulong above = 0, target = 0;
        int size = psm_radix_collect(logits, dtype, source.base, vocab, !top_k_on,
                                     top_k_on ? (ulong)p.top_k : 0, p.top_p, summary.maximum,
                                     scale, bits, local_store, (uint)list_capacity, bucket_low,
                                     bucket_high, bucket_count, &shared_choice, &shared_above,
                                     &shared_want, &shared_size, &above, &target);
        if (size >= 0) {
            found = 1;
            if (top_k_on) {
                /* Every candidate at or above the k-th is on the list. */
                cutoff = psm_list_descend(local_store, size, 0, 0, (ulong)p.top_k,
                                          summary.maximum, scale, bits, bucket_low,
                                          bucket_high, &shared_choice, &shared_above);
                if (p.top_p < 1.0f) {
                    ulong mass = 0;
                    for (int i = lid; i < size; i += PSM_WG) {
                        ulong key = local_store[i];
                        if (key >= cutoff)
                            mass += psm_weight(psm_scaled_gap(summary.maximum,
                                                              psm_ordered_to_float(
                                                                  (uint)(key >> 32)),
                                                              scale),
                                               bits);
                    }
                    mass = psm_group_sum_u64(mass, scratch_u64);
                    target = max(psm_top_p_target(mass, p.top_p), (ulong)1);
                    cutoff = psm_list_descend(local_store, size, cutoff, 1, target,
                                              summary.maximum, scale, bits, bucket_low,
                                              bucket_high, &shared_choice, &shared_above);
                }
            } else {
                /* The list is the bucket where the target is reached. */
                cutoff = psm_list_descend(local_store, size, 0, 1, target - above,
                                          summary.maximum, scale, bits, bucket_low,
                                          bucket_high, &shared_choice, &shared_above);
            }
        }
    }
    if (!found && psm_top_k_active(&p, summary.valid)) {
        ulong above;
        uint ordered = psm_radix_descend(&source, vocab, 0, 0, (ulong)p.top_k, summary.maximum,
                                         scale, bits, &above, bucket_low, bucket_high,
                                         &shared_choice, &shared_above);
        float value = psm_ordered_to_float(ordered);
        int index = psm_nth_with_value(&source, vocab, value, (uint)(p.top_k - above),
                                       scratch_u64, &shared_index);
        cutoff = psm_rank_key(value, (uint)index);
    }
    if (!found && p.top_p < 1.0f) {
        ulong mass = 0;
        for (int i = lid; i < vocab; i += PSM_WG) {
            float x = psm_row_value(&source, i);
            if (psm_is_valid(x) && psm_rank_key(x, (uint)i) >= cutoff)
                mass += psm_weight(psm_scaled_gap(summary.maximum, x, scale), bits);
        }
        mass = psm_group_sum_u64(mass, scratch_u64);
        /* A target of 0 keeps one token, as a target of 1 does (the top
         * token alone weighs 2^bits). */
        ulong target = max(psm_top_p_target(mass, p.top_p), (ulong)1);
        ulong above;
        uint ordered = psm_radix_descend(&source, vocab, cutoff, 1, target, summary.maximum,
                                         scale, bits, &above, bucket_low, bucket_high,
                                         &shared_choice, &shared_above);
        float value = psm_ordered_to_float(ordered);
        ulong weight = psm_weight(psm_scaled_gap(summary.maximum, value, scale), bits);
        ulong needed = (target - above + weight - 1) / weight;
        int index = psm_nth_with_value(&source, vocab, value, (uint)needed, scratch_u64,
                                       &shared_index);
        cutoff = psm_rank_key(value, (uint)index);
    }
    if (lid == 0) {
        state[row].maximum = summary.maximum;
        state[row].filtered = 1;
        state[row].cutoff = cutoff;
        state[row].min_weight = psm_min_p_threshold(p.min_p, bits);
    }
}

/* ---- kernel 3: tile masses over the kept tokens --------------------------- */

static int psm_kept(float x, uint token, ulong cutoff, ulong min_weight, float maximum,
                    float scale, int bits)
{
    if (!psm_is_valid(x) || psm_rank_key(x, token) < cutoff)
        return 0;
    return min_weight == 0 ||
           psm_weight(psm_scaled_gap(maximum, x, scale), bits) >= min_weight;
}

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_tile_filter(PSM_REQUEST_PARAMS, __global const ulong *tile_key,
                __global const psm_row_state *state, __global float *tile_ref,
                __global ulong *tile_mass)
{
    __local float scratch_float[PSM_WG];
    __local ulong scratch_u64[PSM_WG];
    const uint lid = get_local_id(0);
    const int tile = get_group_id(0);
    const uint row = get_global_id(1);
    const long slot = (long)row * tiles + tile;
    /* Uniform over the group, so returning skips no barrier for anyone. */
    if (!state[row].filtered)
        return;
    const ulong cutoff = state[row].cutoff;
    const ulong min_weight = state[row].min_weight;
    if (tile_key[slot] < cutoff) {
        /* Every token of the tile ranks below the cutoff. */
        if (lid == 0)
            tile_mass[slot] = 0;
        return;
    }
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const float row_maximum = state[row].maximum;
    const float scale = psm_inverse_temperature_scale(p.temperature);
    const int bits = psm_weight_bits(vocab);
    const long base = (long)row * row_stride;
    const int first = tile * PSM_TILE;
    const int count = min(PSM_TILE, vocab - first);

    float values[PSM_PER_ITEM];
    float maximum = -INFINITY;
    for (int j = 0; j < PSM_PER_ITEM; ++j) {
        int i = lid + j * PSM_WG;
        float x = -INFINITY;
        if (i < count) {
            x = psm_candidate_value(psm_load(logits, dtype, base + first + i));
            if (!psm_kept(x, (uint)(first + i), cutoff, min_weight, row_maximum, scale, bits))
                x = -INFINITY;
        }
        values[j] = x;
        maximum = x > maximum ? x : maximum;
    }
    maximum = psm_group_max_float(maximum, scratch_float);
    ulong mass = 0;
    if (psm_is_valid(maximum))
        for (int j = 0; j < PSM_PER_ITEM; ++j)
            if (psm_is_valid(values[j])) /* <= maximum: as in psm_tile_reduce */
                mass += psm_weight_of_gap(PSM_FMUL(PSM_FSUB(maximum, values[j]), scale), bits);
    mass = psm_group_sum_u64(mass, scratch_u64);
    if (lid == 0) {
        tile_ref[slot] = maximum;
        tile_mass[slot] = mass;
    }
}

/* ---- kernel 4: per-row combination ---------------------------------------- */

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_row_combine(PSM_REQUEST_PARAMS, __global const float *tile_max,
                __global const ulong *tile_key, __global const uint *tile_info,
                __global const float *tile_ref, __global const ulong *tile_mass,
                __global ulong *tile_prefix, __global psm_row_state *state,
                int filters_ran, int check_rows, __global int *first_bad_row)
{
    __local float scratch_float[PSM_WG];
    __local ulong scratch_u64[PSM_WG];
    const uint lid = get_local_id(0);
    const uint row = get_group_id(1);
    const long row_tiles = (long)row * tiles;
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_row_summary summary = psm_summarise_row(tile_max, tile_key, tile_info, row_tiles,
                                                      tiles, scratch_float, scratch_u64);
    const int status = psm_row_status(&p, &summary);
    if (lid == 0) {
        state[row].status = status;
        state[row].maximum = summary.maximum;
        state[row].greedy_token = 0xffffffffu - (uint)summary.top_key;
        if (!filters_ran) {
            state[row].filtered = 0;
            state[row].cutoff = 0;
            state[row].min_weight = 0;
        }
        if (status == PSM_ROW_BAD && check_rows)
            atomic_min(first_bad_row, (int)row);
    }
    if (status != PSM_ROW_SAMPLE)
        return;
    const float scale = psm_inverse_temperature_scale(p.temperature);
    ulong running = 0;
    for (int start = 0; start < tiles; start += PSM_WG) {
        int t = start + lid;
        ulong rescaled = 0;
        if (t < tiles)
            rescaled = psm_rescale_mass(tile_mass[row_tiles + t],
                                        psm_scaled_gap(summary.maximum, tile_ref[row_tiles + t],
                                                       scale));
        ulong chunk_total;
        ulong inclusive = psm_group_inclusive_scan_u64(rescaled, scratch_u64, &chunk_total);
        if (t < tiles)
            tile_prefix[row_tiles + t] = running + inclusive;
        running += chunk_total;
    }
    if (lid == 0)
        state[row].total = running;
}

/* ---- the kept tile weight of one token, shared by the draw and probs ------- */

typedef struct psm_tile_view {
    ulong cutoff;
    ulong min_weight;
    float row_maximum;
    float reference;   /* m_t */
    float scale;
    int bits;
} psm_tile_view;

static ulong psm_tile_weight(const psm_tile_view *view, float x, uint token)
{
    if (!psm_kept(x, token, view->cutoff, view->min_weight, view->row_maximum, view->scale,
                  view->bits))
        return 0;
    return psm_weight(psm_scaled_gap(view->reference, x, view->scale), view->bits);
}

/* (w / S) x (T / total), in double where the device has it. */
static float psm_probability(ulong weight, ulong mass, ulong rescaled, ulong total)
{
#if PSM_HAVE_FP64
    return (float)(((double)weight / (double)mass) * ((double)rescaled / (double)total));
#else
    return ((float)weight / (float)mass) * ((float)rescaled / (float)total);
#endif
}

static float psm_log_probability(ulong weight, ulong mass, ulong rescaled, ulong total)
{
#if PSM_HAVE_FP64
    return (float)log(((double)weight / (double)mass) * ((double)rescaled / (double)total));
#else
    return log(psm_probability(weight, mass, rescaled, total));
#endif
}

/* ---- kernel 5: the draw --------------------------------------------------- */

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_draw(PSM_REQUEST_PARAMS, __global const float *tile_ref, __global const ulong *tile_mass,
         __global const ulong *tile_prefix, __global const psm_row_state *state,
         int num_samples, __global int *tokens, __global float *logprobs, int want_logprobs)
{
    __local ulong scratch_u64[PSM_WG];
    __local int shared_token;
    __local float shared_logprob;
    const uint lid = get_local_id(0);
    const uint sample = get_group_id(0);
    const uint row = get_global_id(1);
    const long out = (long)row * num_samples + sample;
    const int status = state[row].status;
    if (status != PSM_ROW_SAMPLE) {
        if (lid == 0) {
            tokens[out] = status == PSM_ROW_GREEDY ? (int)state[row].greedy_token : -1;
            if (want_logprobs)
                logprobs[out] = status == PSM_ROW_GREEDY ? 0.0f : NAN;
        }
        return;
    }
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const long row_tiles = (long)row * tiles;
    const ulong total = state[row].total;
    const psm_draw_bits random = psm_sample_bits(p.seed, offset, p.stream, sample);
    /* The tile: the first whose inclusive prefix exceeds a. */
    const ulong a = psm_pick(random.tile, total);
    int low = 0, high = tiles - 1;
    while (low < high) {
        int middle = low + (high - low) / 2;
        if (tile_prefix[row_tiles + middle] > a)
            high = middle;
        else
            low = middle + 1;
    }
    const int tile = low;
    const ulong mass = tile_mass[row_tiles + tile];
    const ulong rescaled =
        tile_prefix[row_tiles + tile] - (tile > 0 ? tile_prefix[row_tiles + tile - 1] : 0);
    const ulong b = psm_pick(random.token, mass);

    psm_tile_view view;
    view.cutoff = state[row].cutoff;
    view.min_weight = state[row].min_weight;
    view.row_maximum = state[row].maximum;
    view.reference = tile_ref[row_tiles + tile];
    view.scale = psm_inverse_temperature_scale(p.temperature);
    view.bits = psm_weight_bits(vocab);

    /* Each item owns a contiguous run of the tile, so item order is index
     * order and an exclusive scan of the items' sums places every token. */
    const long base = (long)row * row_stride;
    const int first = tile * PSM_TILE;
    const int count = min(PSM_TILE, vocab - first);
    const int begin = min((int)lid * PSM_PER_ITEM, count);
    const int end = min(begin + PSM_PER_ITEM, count);
    ulong weights[PSM_PER_ITEM];
    ulong own = 0;
    for (int i = begin; i < end; ++i) {
        float x = psm_candidate_value(psm_load(logits, dtype, base + first + i));
        weights[i - begin] = psm_tile_weight(&view, x, (uint)(first + i));
        own += weights[i - begin];
    }
    if (lid == 0) {
        /* Kept only if no item finds the token: unreachable when the masses
         * are consistent (the scan's barriers order these writes). */
        shared_token = -1;
        shared_logprob = NAN;
    }
    ulong group_total;
    ulong inclusive = psm_group_inclusive_scan_u64(own, scratch_u64, &group_total);
    ulong running = inclusive - own;
    if (running <= b && b < inclusive) {
        for (int i = begin; i < end; ++i) {
            running += weights[i - begin];
            if (running > b) {
                shared_token = first + i;
                shared_logprob = psm_log_probability(weights[i - begin], mass, rescaled, total);
                break;
            }
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid == 0) {
        tokens[out] = shared_token;
        if (want_logprobs)
            logprobs[out] = shared_logprob;
    }
}

/* ---- kernel 6: the final distribution ------------------------------------- */

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_probs(PSM_REQUEST_PARAMS, __global const float *tile_ref, __global const ulong *tile_mass,
          __global const ulong *tile_prefix, __global const psm_row_state *state,
          __global float *probs, long probs_stride)
{
    const uint lid = get_local_id(0);
    const int tile = get_group_id(0);
    const uint row = get_global_id(1);
    const long row_tiles = (long)row * tiles;
    const long slot = row_tiles + tile;
    const int first = tile * PSM_TILE;
    const int count = min(PSM_TILE, vocab - first);
    const long out = (long)row * probs_stride + first;
    const int status = state[row].status;
    if (status != PSM_ROW_SAMPLE) {
        const uint greedy = state[row].greedy_token;
        for (int i = lid; i < count; i += PSM_WG)
            probs[out + i] = status == PSM_ROW_BAD ? NAN
                             : (uint)(first + i) == greedy ? 1.0f
                                                           : 0.0f;
        return;
    }
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const ulong mass = tile_mass[slot];
    const ulong rescaled = tile_prefix[slot] - (tile > 0 ? tile_prefix[slot - 1] : 0);
    const ulong total = state[row].total;
    if (mass == 0 || rescaled == 0) {
        for (int i = lid; i < count; i += PSM_WG)
            probs[out + i] = 0.0f;
        return;
    }
    psm_tile_view view;
    view.cutoff = state[row].cutoff;
    view.min_weight = state[row].min_weight;
    view.row_maximum = state[row].maximum;
    view.reference = tile_ref[slot];
    view.scale = psm_inverse_temperature_scale(p.temperature);
    view.bits = psm_weight_bits(vocab);
    const long base = (long)row * row_stride;
    for (int i = lid; i < count; i += PSM_WG) {
        float x = psm_candidate_value(psm_load(logits, dtype, base + first + i));
        ulong weight = psm_tile_weight(&view, x, (uint)(first + i));
        probs[out + i] = weight ? psm_probability(weight, mass, rescaled, total) : 0.0f;
    }
}
