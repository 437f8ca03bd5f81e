/*
 * psm_row.h: how every backend reads one row of a request, written once.
 *
 * Compiles as C, CUDA, HIP and OpenCL C 1.2, on psm_contract.h's platform
 * layer. psm_contract.h defines the arithmetic that decides a token; this
 * header holds the row-level steps around it that the backends share: which
 * parameters apply to a row (the scalars or its entries in per-row arrays),
 * the gap bins of the cutoff searches, min-p's drop gap, the search that
 * turns a draw's random integer into a tile or a token, and the kept test
 * of the GPU stages.
 */
#ifndef PSM_ROW_H
#define PSM_ROW_H

/* The OpenCL program receives psm_contract.h as an earlier source string
 * (backends/opencl/psm_kernels.cl says why), so it is included only where
 * it has not been read yet. */
#ifndef PSM_CONTRACT_H
#include "psm_contract.h"
#endif

/* ---- a row's parameters ------------------------------------------------- */

/* Which per-row arrays a request has, a bit each: the same values on the
 * host and on every device. The last two are single values in memory (the
 * scalar seed or offset given by pointer), read with the arrays because
 * they are read when the kernels run, like them. */
#define PSM_PER_ROW_TEMPERATURE 1u
#define PSM_PER_ROW_TOP_K 2u
#define PSM_PER_ROW_TOP_P 4u
#define PSM_PER_ROW_MIN_P 8u
#define PSM_PER_ROW_SEED 16u
#define PSM_PER_ROW_OFFSET 32u
#define PSM_PER_ROW_SUBSEQUENCE 64u
#define PSM_PER_ROW_LOGITS_ROW 128u /* psm_params.row_indices */
#define PSM_SEED_AT_POINTER 256u
#define PSM_OFFSET_AT_POINTER 512u

/* The request's scalar parameters: what a row without per-row arrays uses.
 * Fixed-size members, largest first, so that the OpenCL host and kernels
 * lay it out alike inside their request struct. */
typedef struct psm_row_scalars {
    psm_u64 seed;
    psm_u64 offset;
    psm_i64 logits_rows; /* rows of the logits: row_indices must lie below */
    float temperature;
    psm_i32 top_k;
    float top_p;
    float min_p;
} psm_row_scalars;

/* The per-row arrays (in the memory the backend's kernels read); an array
 * whose bit is clear is never read and may be NULL. */
typedef struct psm_row_arrays {
    PSM_GLOBAL const float *temperature;
    PSM_GLOBAL const psm_i32 *top_k;
    PSM_GLOBAL const float *top_p;
    PSM_GLOBAL const float *min_p;
    PSM_GLOBAL const psm_u64 *seed;
    PSM_GLOBAL const psm_u64 *offset;
    PSM_GLOBAL const psm_u32 *subsequence;
    PSM_GLOBAL const psm_i64 *logits_row;
    PSM_GLOBAL const psm_u64 *seed_pointer;   /* one value */
    PSM_GLOBAL const psm_u64 *offset_pointer; /* one value */
} psm_row_arrays;

/* One row's parameters, resolved. */
typedef struct psm_row_params {
    float temperature;
    psm_i32 top_k;
    float top_p;
    float min_p;
    psm_u64 seed;
    psm_u64 offset;
    psm_i64 logits_row; /* the logits row this output row samples */
    psm_u32 stream;     /* Philox stream (docs/SAMPLING.md, the draw) */
    int valid; /* parameters in range (psm_row_params_valid) and logits_row inside the
                  logits: otherwise the row gets token -1 and its logits are not read */
} psm_row_params;

/* Output row `row`'s parameters: per_row (the bits above) says which come
 * from memory. The stream is the row's subsequence when given, else 0 with
 * per-row seeds, so that a request's tokens do not depend on its place in
 * the batch, else the row index. */
PSM_FN psm_row_params psm_resolve_row(psm_i64 row, psm_u32 per_row, psm_row_scalars scalars,
                                      psm_row_arrays arrays)
{
    psm_row_params p;
    p.temperature = (per_row & PSM_PER_ROW_TEMPERATURE) ? arrays.temperature[row]
                                                         : scalars.temperature;
    p.top_k = (per_row & PSM_PER_ROW_TOP_K) ? arrays.top_k[row] : scalars.top_k;
    p.top_p = (per_row & PSM_PER_ROW_TOP_P) ? arrays.top_p[row] : scalars.top_p;
    p.min_p = (per_row & PSM_PER_ROW_MIN_P) ? arrays.min_p[row] : scalars.min_p;
    p.seed = (per_row & PSM_PER_ROW_SEED)      ? arrays.seed[row]
             : (per_row & PSM_SEED_AT_POINTER) ? arrays.seed_pointer[0]
                                               : scalars.seed;
    p.offset = (per_row & PSM_PER_ROW_OFFSET)      ? arrays.offset[row]
               : (per_row & PSM_OFFSET_AT_POINTER) ? arrays.offset_pointer[0]
                                                   : scalars.offset;
    p.stream = (per_row & PSM_PER_ROW_SUBSEQUENCE) ? arrays.subsequence[row]
               : (per_row & PSM_PER_ROW_SEED)      ? 0u
                                                   : (psm_u32)row;
    p.logits_row = (per_row & PSM_PER_ROW_LOGITS_ROW) ? arrays.logits_row[row] : row;
    p.valid = psm_row_params_valid(p.temperature, p.top_k, p.top_p, p.min_p) &&
              p.logits_row >= 0 && p.logits_row < scalars.logits_rows;
    return p;
}

/* ---- gap bins ------------------------------------------------------------ */

/* The GPU backends' cutoff searches first tally a row's valid tokens by
 * their gap to the row maximum M, in 1/16 of a log2 unit (gaps of 64 and
 * more share the last bin). The bin is a non-decreasing function of the gap,
 * and the gap a non-increasing function of the logit, so the bins cut the
 * rank order into consecutive runs: every token of a lower bin ranks before
 * every token of a higher one, and the bin that holds a cutoff is found from
 * the tallies alone. */
#define PSM_GAP_BINS 1024
#define PSM_GAP_BIN_SCALE 16.0f

/* The bin of an unclamped gap (psm_unclamped_gap(M, x, s), x valid). */
PSM_FN int psm_gap_bin(float gap)
{
    return gap < 64.0f ? (int)PSM_FMUL(gap, PSM_GAP_BIN_SCALE) : PSM_GAP_BINS - 1;
}

/* ---- min-p's drop gap ---------------------------------------------------- */

/* A gap beyond which no token passes min-p: with d = n + r (exactly),
 * g = floor(2^-r (1 + e) 2^(bits - n)) < 2^(bits - d + 1) since |e| <= 1.1e-7,
 * so g >= threshold >= 2^L needs d < bits + 1 - L, L = floor(log2(threshold)).
 * threshold is psm_min_p_threshold's, >= 1. A token whose unclamped gap to the
 * row maximum is at least this fails min-p; one below it must still be tested
 * with its weight. */
PSM_FN float psm_min_p_drop_gap(psm_u64 threshold, int weight_bits)
{
    /* floor(log2(threshold)) by halving steps, not a bit-by-bit loop: every
     * GPU thread builds the kept rule, about 36 dependent steps of latency
     * for a typical threshold otherwise. */
    int log2_floor = 0;
    for (int step = 32; step > 0; step /= 2)
        if ((threshold >> step) != 0) {
            threshold >>= step;
            log2_floor += step;
        }
    return (float)(weight_bits + 1 - log2_floor);
}

/* ---- the draw's search ---------------------------------------------------- */

/* The first index whose running sum exceeds target, for running sums in
 * index order (target below the last): the tile of a draw from the tiles'
 * running T_t, or the token within a tile from its running w_i. */
PSM_FN psm_i32 psm_first_above(PSM_GLOBAL const psm_u64 *running, psm_i32 count,
                               psm_u64 target)
{
    psm_i32 low = 0, high = count - 1;
    while (low < high) {
        psm_i32 middle = low + (high - low) / 2;
        if (running[middle] > target)
            high = middle;
        else
            low = middle + 1;
    }
    return low;
}

/* ---- which rows filter -------------------------------------------------- */

/* Does top-k keep fewer tokens than the row has candidates? candidates is the
 * row's count of valid tokens once known, or its vocab before (an upper
 * bound of that count, so "may" below). */
PSM_FN int psm_top_k_active(psm_i32 top_k, psm_i64 candidates)
{
    return top_k > 0 && (psm_i64)top_k < candidates;
}

/* top-p or min-p is on: the row's kept set is a filtered one whatever its
 * count of valid tokens. */
PSM_FN int psm_filter_certain(float top_p, float min_p)
{
    return top_p < 1.0f || min_p > 0.0f;
}

/* May a filter remove some of the row's candidates? A row for which this is
 * 0 keeps every valid token: its tile masses are final after the tile pass. */
PSM_FN int psm_may_filter(psm_i32 top_k, float top_p, float min_p, psm_i64 candidates)
{
    return psm_top_k_active(top_k, candidates) || psm_filter_certain(top_p, min_p);
}

/* ---- tile summaries -------------------------------------------------------- */

/* The largest valid logit of a tile or row from its largest rank key; key 0
 * means no valid logit. */
PSM_FN float psm_key_maximum(psm_u64 key)
{
    return key ? psm_rank_key_logit(key) : psm_bits_float(0xff800000u); /* -inf */
}

/* Does psm_read_logit change a tile's gaps, weights or maximum? Only when the
 * tile's maximum (read) lies in [0, 2^-39): from 2^-39 up, fl(m - x) = m for
 * every |x| < 2^-64 (half an ulp of m is at least 2^-64) and no such x equals
 * m; below 0 no tiny x exists (it would be the maximum). Elsewhere a tile's
 * raw values give the same results as its read ones, so a pass over raw
 * values reads them again only when this says so. */
PSM_FN int psm_tile_needs_read(float maximum)
{
    return maximum >= 0.0f && maximum < 0x1p-39f;
}

/* ---- the logits' element types -------------------------------------------- */

/* The values of psm_dtype (include/polysample.h, which device code cannot
 * include), as kernels test them; the GPU backends check that they agree. */
#define PSM_LOGITS_F32 0
#define PSM_LOGITS_F16 1
#define PSM_LOGITS_BF16 2

/* ---- the kept test ---------------------------------------------------------- */

/* A filtered row's kept set (docs/SAMPLING.md section 4), as every GPU stage
 * tests it: a valid token with rank key >= cutoff whose global weight g_i
 * (against the row maximum M) is at least min_weight. Top-k's and top-p's
 * kept set is a prefix of the rank order, hence one key; min-p's test is on
 * g_i itself, because the weight is not monotone at its last bit. A row
 * without filters has cutoff 0 and min_weight 0: every valid token. */
typedef struct psm_kept_rule {
    psm_u64 cutoff;     /* kept: rank key >= cutoff (0: any) */
    psm_u64 min_weight; /* kept: g_i >= min_weight (0: no min-p) */
    float row_max;      /* M */
    float scale;        /* s */
    float drop_gap;     /* with min-p: a gap to M at or above this weighs below min_weight */
    int weight_bits;
} psm_kept_rule;

PSM_FN psm_kept_rule psm_make_kept_rule(psm_u64 cutoff, psm_u64 min_weight, float row_max,
                                        float scale, int weight_bits)
{
    psm_kept_rule rule;
    rule.cutoff = cutoff;
    rule.min_weight = min_weight;
    rule.row_max = row_max;
    rule.scale = scale;
    rule.drop_gap = min_weight != 0 ? psm_min_p_drop_gap(min_weight, weight_bits)
                                    : psm_bits_float(0x7f800000u); /* +inf */
    rule.weight_bits = weight_bits;
    return rule;
}

/* Is the token kept? x after psm_read_logit (any class). The drop gap
 * decides most of min-p's tokens without their weight; g_i is
 * psm_weight_of_gap of the unclamped gap, equal to psm_weight of
 * psm_scaled_gap since M >= x (psm_contract.h). */
PSM_FN int psm_token_kept(psm_kept_rule rule, float x, psm_u32 token)
{
    if (psm_logit_class(x) != PSM_LOGIT_VALID)
        return 0;
    if (rule.cutoff != 0 && psm_rank_key(x, token) < rule.cutoff)
        return 0;
    if (rule.min_weight != 0) {
        const float gap = psm_unclamped_gap(rule.row_max, x, rule.scale);
        if (!(gap < rule.drop_gap) || psm_weight_of_gap(gap, rule.weight_bits) < rule.min_weight)
            return 0;
    }
    return 1;
}

/* A token's weight within its tile: w_i against the tile's reference m_t
 * (its largest kept logit, so m_t >= x) when the token is kept, else 0. */
PSM_FN psm_u64 psm_kept_weight(psm_kept_rule rule, float reference, float x, psm_u32 token)
{
    return psm_token_kept(rule, x, token)
               ? psm_weight_of_gap(psm_unclamped_gap(reference, x, rule.scale), rule.weight_bits)
               : 0;
}

/* Can a tile whose largest rank key is tile_key (0: no valid logit) keep a
 * token? Not when that key is below the cutoff, nor (min-p) when its logit
 * is at or beyond the drop gap: every token of the tile then fails too. */
PSM_FN int psm_tile_may_keep(psm_kept_rule rule, psm_u64 tile_key)
{
    if (tile_key == 0 || tile_key < rule.cutoff)
        return 0;
    return rule.min_weight == 0 ||
           psm_unclamped_gap(rule.row_max, psm_rank_key_logit(tile_key), rule.scale) < rule.drop_gap;
}

/* ---- log-probabilities (SAMPLING.md sections 5 and 6) ---------------------
 * Every backend writes a token's logprob with these, in float64, so that the
 * CPU backend and the GPUs round the same double (their log functions may
 * still differ in the last bit of the double, which the float hides but
 * rarely). OpenCL devices without cl_khr_fp64 have neither; the GPU stages
 * compute in float there (kernels/psm_portable.h's PSM_HAVE_FP64). */
#if PSM_PLATFORM_OPENCL && defined(cl_khr_fp64)
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif
#if !PSM_PLATFORM_OPENCL || defined(cl_khr_fp64)
#if !PSM_PLATFORM_OPENCL && !PSM_PLATFORM_GPU_CXX
#include <math.h>
#endif

/* ln((w / S_t) x (T_t / total)), a kept token's probability, as a sum of
 * logs: a small probability keeps its digits. */
PSM_FN float psm_log_probability(psm_u64 weight, psm_u64 tile_mass, psm_u64 tile_rescaled,
                                 psm_u64 total)
{
    return (float)(log((double)weight) - log((double)tile_mass) + log((double)tile_rescaled) -
                   log((double)total));
}

/* ln(weight / total), psm_verify's logprob of an emitted token under the
 * target's integer distribution at its node (docs/SAMPLING.md, section 7). */
PSM_FN float psm_weight_log_probability(psm_u64 weight, psm_u64 total)
{
    return (float)(log((double)weight) - log((double)total));
}

/* The raw mode's log-softmax of logit x: (x - M) - (ln Z - B ln 2), with Z
 * the row's total weight against M at temperature 1 and B its weight bits. */
PSM_FN float psm_raw_log_probability(float x, float row_max, psm_u64 total, int weight_bits)
{
    const double log_total = log((double)total) - (double)weight_bits * log(2.0);
    return (float)(((double)x - (double)row_max) - log_total);
}
#endif

#endif /* PSM_ROW_H */
