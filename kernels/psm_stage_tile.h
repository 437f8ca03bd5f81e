/*
 * psm_stage_tile.h: the tile pass (docs/SAMPLING.md), written once for CUDA,
 * HIP and OpenCL over kernels/psm_portable.h.
 *
 * A team reads one 1024-token tile of one output row once, into registers
 * (the interleaved layout), and writes its summary:
 *   tile_key   the rank key of the tile's maximum m_t (0: no valid logit);
 *              its token part is the lowest index holding m_t where a later
 *              stage needs it (greedy rows: the greedy token; rows that may
 *              filter: the filters' tie-break), else the tile's first token;
 *   tile_info  the count of valid logits (exact for rows with top-k, the
 *              only ones that compare it with anything but 0; else 0 or 1)
 *              | PSM_TILE_BAD_FLAG when the tile holds a NaN or +inf;
 *   tile_mass  S_t, the sum of the weights w_i against m_t, for the rows
 *              whose masses are final here (see psm_tile_call.mass_rule);
 *              0 elsewhere;
 *   lane_max   for rows with top-k that may filter: each item's maximum as
 *              the high half of its rank key (0: no valid logit), at
 *              lane_max[tile slot * PSM_TEAM + lane]. k of them at or above
 *              a logit prove that k tokens are, which bounds the top-k
 *              cutoff from below; the cutoff searches gather top-k's
 *              candidates from the few lanes that can hold one.
 *   tile_reference  (when the backend keeps one) m_t as a float, -inf for
 *              no valid logit.
 *
 * Two rounds of team reductions (two barriers per work-group on OpenCL):
 * the maximum and the bad flag, then the valid count, the lowest index of
 * the maximum and S_t, each only where the row needs it. Per element the
 * first pass is a NaN-keeping max on the raw values (+inf shows as the
 * maximum); psm_read_logit (monotone, so it commutes with the max) runs on
 * the elements only in the rare tiles that need it (psm_tile_needs_read).
 * The mass pass is psm_weight_of_gap on the unclamped gap: the tile maximum
 * is at least every valid value, so that is psm_weight of psm_scaled_gap
 * (core/psm_contract.h), and x = -inf gives an infinite gap and weight 0,
 * so masked logits need no test.
 */
#ifndef PSM_STAGE_TILE_H
#define PSM_STAGE_TILE_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif

/* Tile info word: count of valid logits in the low bits, bad flag on top. */
#define PSM_TILE_BAD_FLAG 0x80000000u
#define PSM_TILE_COUNT_MASK 0x7fffffffu

/* Which rows' tile masses are made here: the other rows' are remade over
 * their kept set by a later stage, so the tile pass leaves them at 0. The
 * backends' row stages differ in which rows they remake:
 * - CUDA/HIP: the row kernel remakes every row that may filter (top-k below
 *   the vocab, top-p or min-p);
 * - OpenCL: the filter kernels remake rows with top-p or min-p; a row with
 *   top-k alone may turn out unfiltered (k at least its valid tokens, known
 *   only after this pass) and then keeps the masses made here. */
#define PSM_TILE_MASS_UNLESS_MAY_FILTER 0
#define PSM_TILE_MASS_UNLESS_FILTER_CERTAIN 1

PSM_STAGE_BEGIN

/* What every tile of a call shares. */
typedef struct psm_tile_call {
    PSM_GLOBAL const unsigned char *logits;
    psm_i64 row_stride; /* elements from one logits row to the next */
    psm_i64 vocab;
    int dtype;          /* PSM_LOGITS_* */
    int aligned;        /* logits and row stride allow 16-byte loads */
    int weight_bits;    /* psm_weight_bits(vocab) */
    int mass_rule;      /* PSM_TILE_MASS_* */
} psm_tile_call;

/* The summary's arrays, one entry per tile of every output row. */
typedef struct psm_tile_outputs {
    PSM_GLOBAL psm_u64 *tile_key;
    PSM_GLOBAL psm_u32 *tile_info;
    PSM_GLOBAL psm_u64 *tile_mass;
    PSM_GLOBAL psm_u32 *lane_max;     /* PSM_TEAM entries per tile */
    PSM_GLOBAL float *tile_reference; /* NULL: not kept */
} psm_tile_outputs;

/* The team reductions' posts (OpenCL: __local arrays of the work-group
 * size, one per reduction, as the rounds need; CUDA/HIP: empty). */
typedef struct psm_tile_posts {
    PSM_POSTS(float) maximum;
    PSM_POSTS(psm_u32) nan;
    PSM_POSTS(psm_u32) count;
    PSM_POSTS(psm_u32) first;
    PSM_POSTS(psm_u64) mass;
} psm_tile_posts;

/* Tile `slot` (row * tiles per row + tile) of an output row whose
 * parameters are `params` and whose logits are processed as `processing`
 * says as they are read; its first token is `first`. in_range 0: a spare
 * team with no tile, which only passes the barriers. A row whose parameters
 * or row index are out of range is never read: its tile reads as holding no
 * valid logit, and the row stages give it token -1. Every item of the team
 * calls this (on OpenCL every item of the work-group). */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_stage_tile(PSM_TEAM_TYPE team, psm_tile_call call, psm_row_params params,
                                 psm_read_processing processing, psm_i64 slot, psm_i64 first,
                                 int in_range, psm_tile_posts posts, psm_tile_outputs out)
{
    float x[PSM_TEAM_SLOTS];
    if (in_range && params.valid) {
        const psm_i64 remaining = call.vocab - first;
        const int count = remaining < PSM_TILE ? (int)remaining : PSM_TILE;
        psm_team_load_tile(team,
                           call.logits + (params.logits_row * call.row_stride + first) *
                                             psm_element_bytes(call.dtype),
                           call.dtype, count, call.aligned, PSM_INTERLEAVED, x);
        psm_team_process_tile(team, processing, first, count, call.dtype, PSM_INTERLEAVED, x);
    } else {
#pragma unroll
        for (int s = 0; s < PSM_TEAM_SLOTS; ++s)
            x[s] = -INFINITY;
    }
    const int greedy = psm_is_greedy(params.temperature);
    const int may_filter = psm_may_filter(params.top_k, params.top_p, params.min_p, call.vocab);

    /* Round 1: the maximum and the bad flag. */
    float lane_max = -INFINITY;
#pragma unroll
    for (int s = 0; s < PSM_TEAM_SLOTS; ++s)
        lane_max = psm_max_keep_nan(lane_max, x[s]);
    const psm_u32 lane_nan = lane_max != lane_max ? 1u : 0u;
    PSM_TEAM_POST(posts.maximum, lane_max);
    PSM_TEAM_POST(posts.nan, lane_nan);
    psm_team_barrier();
    const float raw_max = psm_team_max_f32(team, lane_max, posts.maximum);
    const int bad = psm_team_any(team, lane_nan, posts.nan) || raw_max == INFINITY;
    const float tile_max = psm_read_logit(raw_max);
    if (psm_tile_needs_read(tile_max)) {
#pragma unroll
        for (int s = 0; s < PSM_TEAM_SLOTS; ++s)
            x[s] = psm_read_logit(x[s]);
    }
    const int any_valid = raw_max != -INFINITY && !bad;

    /* Round 2: each item's part of what the row needs. */
    const int count_all = any_valid && params.top_k > 0;
    psm_u32 lane_count = 0;
    if (count_all) {
#pragma unroll
        for (int s = 0; s < PSM_TEAM_SLOTS; ++s)
            lane_count += x[s] != -INFINITY ? 1u : 0u;
    }
    const int find_first = any_valid && (greedy || may_filter);
    psm_u32 lane_first = 0xffffffffu;
    if (find_first) {
        /* Slots run in token order within an item: the first slot holding
         * the maximum is the item's lowest index of it. */
        const int vector_shift = psm_vector_shift(call.dtype);
#pragma unroll
        for (int s = PSM_TEAM_SLOTS - 1; s >= 0; --s)
            if (x[s] == tile_max)
                lane_first = (psm_u32)(first + psm_slot_offset(s, team.lane, PSM_TEAM, vector_shift,
                                                               PSM_INTERLEAVED));
    }
    const int remade = call.mass_rule == PSM_TILE_MASS_UNLESS_MAY_FILTER
                           ? may_filter
                           : psm_filter_certain(params.top_p, params.min_p);
    const int make_mass = any_valid && !greedy && !remade;
    psm_u64 lane_mass = 0;
    if (make_mass) {
        const float scale = psm_inverse_temperature_scale(params.temperature);
#pragma unroll
        for (int s = 0; s < PSM_TEAM_SLOTS; ++s)
            lane_mass +=
                psm_weight_of_gap(psm_unclamped_gap(tile_max, x[s], scale), call.weight_bits);
    }
    PSM_TEAM_POST(posts.count, lane_count);
    PSM_TEAM_POST(posts.first, ~lane_first);
    PSM_TEAM_POST(posts.mass, lane_mass);
    psm_team_barrier();
    const psm_u32 valid_count =
        count_all ? psm_team_sum_u32(team, lane_count, posts.count) : (any_valid ? 1u : 0u);
    const psm_u32 token =
        find_first ? ~psm_team_max_u32(team, ~lane_first, posts.first) : (psm_u32)first;
    const psm_u64 mass = make_mass ? psm_team_sum_u64(team, lane_mass, posts.mass) : 0;
    const psm_u64 key = any_valid ? psm_rank_key(tile_max, token) : 0;

    if (in_range && params.top_k > 0 && may_filter) {
        const float lane_value = psm_read_logit(lane_max);
        out.lane_max[slot * PSM_TEAM + team.lane] =
            any_valid && lane_value != -INFINITY ? psm_ordered_bits(lane_value) : 0u;
    }
    if (in_range && team.lane == 0) {
        out.tile_key[slot] = key;
        out.tile_mass[slot] = mass;
        out.tile_info[slot] = valid_count | (bad ? PSM_TILE_BAD_FLAG : 0u);
        if (out.tile_reference)
            out.tile_reference[slot] = psm_key_maximum(key);
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_TILE_H */
