/*
 * psm_stage_draw.h: the stages over a row's kept set (docs/SAMPLING.md
 * sections 4 and 5), written once for CUDA, HIP and OpenCL over
 * kernels/psm_portable.h. Each is one team's work on one tile:
 *   psm_stage_kept_masses  (m_t, S_t) over the tile's kept tokens, for rows
 *                          whose cutoff is known (the tile pass made the
 *                          masses of the rows that keep every valid token);
 *   psm_stage_gather_and_weigh  top-p alone: the cutoff bin's tokens into
 *                          the list and the part of S_t that the cutoff
 *                          does not decide, before the cutoff is known;
 *   psm_stage_draw         one sample's token within the tile its tile bits
 *                          chose (psm_draw_tile), its log-probability;
 *   psm_stage_probs        psm_probs' values of the tile's tokens.
 * Which token is kept is core/psm_row.h's psm_kept_rule, the same test in
 * the other three. The row around them (M, the cutoff, T_t and their running
 * sums, m_t) is the backends' kernels' to find and pass in; each takes m_t
 * as a float (CUDA derives it from the tile's key, OpenCL keeps it).
 */
#ifndef PSM_STAGE_DRAW_H
#define PSM_STAGE_DRAW_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif
#ifndef PSM_STAGE_BINS_H /* psm_bins_gather */
#include "psm_stage_bins.h"
#endif

PSM_STAGE_BEGIN

/* Where one tile's logits are. */
typedef struct psm_tile_place {
    PSM_GLOBAL const unsigned char *logits; /* the tile's first element */
    psm_i64 first;                          /* its first token's index in the row */
    int count;                              /* its tokens: PSM_TILE, fewer at the row's end */
    int dtype;                              /* PSM_LOGITS_* */
    int aligned;                            /* the tile's address allows 16-byte loads */
    psm_read_processing processing;         /* the row's, applied as it is read */
} psm_tile_place;

/* Slot offset of a tile as read, before psm_read_logit (the tile's count
 * bounds it). */
PSM_DEVICE_FN float psm_tile_raw(psm_tile_place tile, int offset)
{
    return psm_processed_raw(tile.processing, tile.first + offset,
                             psm_raw_logit(tile.logits, tile.dtype, offset));
}

/* x[slot] = the tile's logits in a team's layout, processed, before
 * psm_read_logit: psm_team_load_tile, then psm_team_process_tile. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN void psm_team_read_tile(PSM_TEAM_TYPE team, psm_tile_place tile, int layout, float *x)
{
    psm_team_load_tile(team, tile.logits, tile.dtype, tile.count, tile.aligned, layout, x);
    psm_team_process_tile(team, tile.processing, tile.first, tile.count, tile.dtype, layout, x);
}

/* The masses that place a tile's tokens in the row's distribution. */
typedef struct psm_tile_share {
    float reference;  /* m_t: the tile's largest kept logit */
    psm_u64 mass;     /* S_t: its kept weights against m_t */
    psm_u64 rescaled; /* T_t: S_t rescaled to M */
    psm_u64 total;    /* the row's sum of T_t */
} psm_tile_share;

/* T_t of tile `tile` from the running sums of T_t in tile order. */
PSM_DEVICE_FN psm_u64 psm_tile_rescaled(PSM_GLOBAL const psm_u64 *running, psm_i32 tile)
{
    return running[tile] - (tile > 0 ? running[tile - 1] : 0);
}

/* A token's probability (w / S_t) x (T_t / total), in float64 where the
 * platform has it (CUDA, HIP, OpenCL with cl_khr_fp64), else in float. */
PSM_DEVICE_FN float psm_token_probability(psm_u64 weight, psm_tile_share share)
{
#if PSM_HAVE_FP64
    return (float)(((double)weight / (double)share.mass) *
                   ((double)share.rescaled / (double)share.total));
#else
    return ((float)weight / (float)share.mass) * ((float)share.rescaled / (float)share.total);
#endif
}

/* Its natural logarithm: of the float64 product where there is one, so that
 * a small probability keeps its digits. */
PSM_DEVICE_FN float psm_token_log_probability(psm_u64 weight, psm_tile_share share)
{
#if PSM_HAVE_FP64
    return (float)log(((double)weight / (double)share.mass) *
                      ((double)share.rescaled / (double)share.total));
#else
    return log(psm_token_probability(weight, share));
#endif
}

/* ---- kept tile masses ------------------------------------------------------ */

/* m_t (-inf: nothing kept) and S_t of a tile's kept tokens. */
typedef struct psm_kept_tile {
    float maximum;
    psm_u64 mass;
} psm_kept_tile;

/* OpenCL: __local arrays of the work-group size; CUDA/HIP: empty. */
typedef struct psm_kept_posts {
    PSM_POSTS(float) maximum;
    PSM_POSTS(psm_u64) mass;
} psm_kept_posts;

/* tile_key: the tile's largest rank key from the tile pass (0: no valid
 * logit, or a spare team with no tile); a tile that psm_tile_may_keep rules
 * out is not read. Read in the interleaved layout (order does not matter to
 * a maximum or a sum); two rounds of team reductions. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_kept_tile psm_stage_kept_masses(PSM_TEAM_TYPE team, psm_tile_place tile,
                                                 psm_kept_rule rule, psm_u64 tile_key,
                                                 psm_kept_posts posts)
{
    /* The reductions only where the tile is read (reachable is the same for
     * the whole team): most tiles of a min-p or top-p row are not, and cost
     * no exchange on CUDA. */
    const int reachable = psm_tile_may_keep(rule, tile_key);
    psm_kept_tile kept;
    kept.maximum = -INFINITY;
    kept.mass = 0;
    float x[PSM_TEAM_SLOTS];
    float lane_max = -INFINITY;
    if (reachable) {
        const int vector_shift = psm_vector_shift(tile.dtype);
        psm_team_read_tile(team, tile, PSM_INTERLEAVED, x);
#pragma unroll
        for (int s = 0; s < PSM_TEAM_SLOTS; ++s) {
            const float value = psm_read_logit(x[s]);
            const psm_u32 token = (psm_u32)(tile.first + psm_slot_offset(s, team.lane, PSM_TEAM,
                                                                         vector_shift,
                                                                         PSM_INTERLEAVED));
            x[s] = psm_token_kept(rule, value, token) ? value : -INFINITY;
            lane_max = x[s] > lane_max ? x[s] : lane_max;
        }
    }
    PSM_TEAM_POST(posts.maximum, lane_max);
    psm_team_barrier();
    psm_u64 lane_mass = 0;
    if (reachable) {
        kept.maximum = psm_team_max_f32(team, lane_max, posts.maximum);
        if (kept.maximum != -INFINITY) {
            /* A dropped token weighs 0: skip its weight, which for min-p and
             * top-p is most tokens of most tiles, so whole teams mostly skip
             * it. */
#pragma unroll
            for (int s = 0; s < PSM_TEAM_SLOTS; ++s)
                if (x[s] != -INFINITY)
                    lane_mass += psm_weight_of_gap(
                        psm_unclamped_gap(kept.maximum, x[s], rule.scale), rule.weight_bits);
        }
    }
    PSM_TEAM_POST(posts.mass, lane_mass);
    psm_team_barrier();
    if (kept.maximum != -INFINITY)
        kept.mass = psm_team_sum_u64(team, lane_mass, posts.mass);
    return kept;
}

/* Top-p alone (no min-p), once the tally has chosen the cutoff's gap bin:
 * one tile's part (a team's work) in the pass that gathers that bin's tokens
 * into the list (psm_bins_gather), and weighs the tile's tokens of the
 * bins before it against the tile's maximum (tile_max, the tile pass's;
 * -inf: no valid token). Every token of an earlier bin is kept (its logit
 * exceeds every logit of the cutoff bin), so a tile whose maximum lies in
 * such a bin keeps its maximum: m_t is known before the cutoff is, and this
 * pass makes the part of S_t that does not depend on it. The list's kept
 * tokens are added once the cutoff is known (psm_group_add_list_masses),
 * which saves the pass over the kept tiles that psm_stage_kept_masses
 * makes. A tile whose maximum lies beyond the cutoff bin keeps nothing and
 * is not read. Returns the partial S_t (at least 2^bits, the maximum's own
 * weight, when the maximum lies before the cutoff bin; else 0) on every
 * item. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_u64 psm_stage_gather_and_weigh(PSM_TEAM_TYPE team, psm_tile_place tile,
                                                float tile_max, float maximum, float scale,
                                                int bits, int cutoff_bin, PSM_LOCAL psm_u32 *size,
                                                PSM_LOCAL psm_u64 *list, psm_u32 capacity,
                                                PSM_POSTS(psm_u64) posts)
{
    /* The same for the whole team. */
    const int reachable = tile_max != -INFINITY &&
                          psm_gap_bin(psm_unclamped_gap(maximum, tile_max, scale)) <= cutoff_bin;
    psm_u64 lane_mass = 0;
    if (reachable) {
        const int vector_shift = psm_vector_shift(tile.dtype);
        float x[PSM_TEAM_SLOTS];
        psm_team_read_tile(team, tile, PSM_INTERLEAVED, x);
#pragma unroll
        for (int s = 0; s < PSM_TEAM_SLOTS; ++s) {
            const float value = psm_read_logit(x[s]);
            if (psm_logit_class(value) != PSM_LOGIT_VALID)
                continue;
            const int bin = psm_gap_bin(psm_unclamped_gap(maximum, value, scale));
            if (bin < cutoff_bin)
                lane_mass += psm_weight_of_gap(psm_unclamped_gap(tile_max, value, scale), bits);
            else if (bin == cutoff_bin)
                psm_bins_gather(value,
                                (psm_u32)(tile.first + psm_slot_offset(s, team.lane, PSM_TEAM,
                                                                       vector_shift,
                                                                       PSM_INTERLEAVED)),
                                maximum, scale, cutoff_bin, cutoff_bin, size, list, capacity);
        }
    }
    PSM_TEAM_POST(posts, lane_mass);
    psm_team_barrier();
    return reachable ? psm_team_sum_u64(team, lane_mass, posts) : 0;
}

/* ---- the draw ------------------------------------------------------------------- */

/* The tile of a draw: the first whose running T_t exceeds the pick of the
 * sample's tile bits from the row's total. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN psm_i32 psm_draw_tile(PSM_TEAM_TYPE team, PSM_GLOBAL const psm_u64 *running,
                                    psm_i32 tiles, psm_u64 tile_bits, psm_u64 total)
{
    return psm_team_first_above(team, running, tiles, psm_pick(tile_bits, total));
}

/* How the first round of a draw reads an item's run: on OpenCL in 16-byte
 * vectors, PSM_DRAW_VECTOR_RUN tokens at a time; on CUDA and HIP one logit
 * at a time, because the filtered row kernel, which draws too, is at its
 * register limit and the vectors' registers spill there (docs/ARCHITECTURE.md,
 * "The GPU stages"). The same tokens in the same order either way. */
#if PSM_PLATFORM_OPENCL
#define PSM_DRAW_VECTOR_LOADS 1
#else
#define PSM_DRAW_VECTOR_LOADS 0
#endif
#define PSM_DRAW_VECTOR_RUN 8

/* x[0 .. PSM_DRAW_VECTOR_RUN - 1] = the raw logits at offsets offset ..
 * offset + 7 of a tile (offset a multiple of 8), -inf past its count
 * tokens: 32 bytes of f32 or 16 of a 16-bit type, as vectors where the tile
 * is aligned and they lie inside it. */
PSM_DEVICE_FN void psm_load_draw_run(psm_tile_place tile, int offset, float *x)
{
    if (tile.aligned && offset + PSM_DRAW_VECTOR_RUN <= tile.count) {
        PSM_GLOBAL const uint4 *vectors =
            (PSM_GLOBAL const uint4 *)(tile.logits + offset * psm_element_bytes(tile.dtype));
        psm_unpack_vector(vectors[0], tile.dtype, x);
        if (tile.dtype == PSM_LOGITS_F32)
            psm_unpack_vector(vectors[1], tile.dtype, x + 4);
#pragma unroll
        for (int k = 0; k < PSM_DRAW_VECTOR_RUN; ++k)
            x[k] = psm_processed_raw(tile.processing, tile.first + offset + k, x[k]);
        return;
    }
#pragma unroll
    for (int k = 0; k < PSM_DRAW_VECTOR_RUN; ++k)
        x[k] = offset + k < tile.count ? psm_tile_raw(tile, offset + k) : -INFINITY;
}

/* The second round of a draw: the slots of the holder's run that each item
 * weighs. One on a team at least as large as the run (CUDA, HIP, OpenCL
 * groups of 32 and more); PSM_TEAM_SLOTS / PSM_TEAM consecutive ones where
 * the team is smaller (OpenCL groups of 16). */
#define PSM_DRAW_PART (PSM_TEAM_SLOTS > PSM_TEAM ? PSM_TEAM_SLOTS / PSM_TEAM : 1)

/* OpenCL: __local arrays of the work-group size, one per round; CUDA/HIP:
 * empty. */
typedef struct psm_draw_posts {
    PSM_POSTS(psm_u64) run;
    PSM_POSTS(psm_u64) part;
} psm_draw_posts;

/* Slot offset of a tile as a logit after psm_read_logit, -inf past the
 * tile's tokens. */
PSM_DEVICE_FN float psm_tile_logit(psm_tile_place tile, int offset)
{
    return offset < tile.count ? psm_read_logit(psm_tile_raw(tile, offset)) : -INFINITY;
}

/* What a draw gives the item that writes it. */
typedef struct psm_drawn {
    int writes;            /* 1 on the one item of the team that writes the draw */
    psm_i32 token;         /* -1: none (see psm_stage_draw) */
    float log_probability; /* when asked for; NaN without a token */
} psm_drawn;

/* One sample's token within its tile: the first token, in index order,
 * whose running kept weight exceeds the pick of token_bits from S_t.
 * Round 1: each item sums the kept weights of a run of PSM_TEAM_SLOTS
 * consecutive tokens (the contiguous layout), and the team finds the run
 * that holds the pick. Round 2: the items share that run's tokens,
 * PSM_DRAW_PART each, and find the token. The item that finds it writes
 * the draw, with its log-probability when want_log_probability is set;
 * lane 0 writes token -1 and NaN when the pick lies past the tile's kept
 * weights, which consistent masses never allow. drawing 0: the team only
 * passes the barriers (two on OpenCL) and no item writes. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_drawn psm_stage_draw(PSM_TEAM_TYPE team, psm_tile_place tile, psm_kept_rule rule,
                                      psm_tile_share share, psm_u64 token_bits, int drawing,
                                      int want_log_probability, psm_draw_posts posts)
{
    const int run_offset = team.lane * PSM_TEAM_SLOTS;
    psm_u64 run_weight = 0;
    if (drawing && PSM_DRAW_VECTOR_LOADS) {
        for (int s = 0; s < PSM_TEAM_SLOTS; s += PSM_DRAW_VECTOR_RUN) {
            float x[PSM_DRAW_VECTOR_RUN];
            psm_load_draw_run(tile, run_offset + s, x);
#pragma unroll
            for (int k = 0; k < PSM_DRAW_VECTOR_RUN; ++k)
                run_weight += psm_kept_weight(rule, share.reference, psm_read_logit(x[k]),
                                              (psm_u32)(tile.first + run_offset + s + k));
        }
    } else if (drawing) {
        /* Past the tile's end every slot is; stop there. */
        for (int s = 0; s < PSM_TEAM_SLOTS && run_offset + s < tile.count; ++s)
            run_weight += psm_kept_weight(
                rule, share.reference,
                psm_read_logit(psm_tile_raw(tile, run_offset + s)),
                (psm_u32)(tile.first + run_offset + s));
    }
    const psm_u64 target = psm_pick(token_bits, share.mass);
    PSM_TEAM_POST(posts.run, run_weight);
    psm_team_barrier();
    const psm_team_holder run = psm_team_find_holder(team, run_weight, target, posts.run);

    const int part_offset = run.lane * PSM_TEAM_SLOTS + team.lane * PSM_DRAW_PART;
    const int has_part = drawing && run.lane >= 0 && team.lane * PSM_DRAW_PART < PSM_TEAM_SLOTS;
    psm_u64 slot_weight[PSM_DRAW_PART];
    psm_u64 part_weight = 0;
#pragma unroll
    for (int k = 0; k < PSM_DRAW_PART; ++k) {
        slot_weight[k] = has_part ? psm_kept_weight(rule, share.reference,
                                                    psm_tile_logit(tile, part_offset + k),
                                                    (psm_u32)(tile.first + part_offset + k))
                                  : 0;
        part_weight += slot_weight[k];
    }
    PSM_TEAM_POST(posts.part, part_weight);
    psm_team_barrier();
    const psm_team_holder part =
        psm_team_find_holder(team, part_weight, target - run.begin, posts.part);

    const int found = run.lane >= 0 && part.lane >= 0;
    psm_drawn drawn;
    drawn.writes = drawing && team.lane == (found ? part.lane : 0);
    drawn.token = -1;
    psm_u64 weight = 0;
    if (drawn.writes && found) {
        psm_u64 running = run.begin + part.begin;
#pragma unroll
        for (int k = 0; k < PSM_DRAW_PART; ++k) {
            if (drawn.token < 0) {
                weight = slot_weight[k];
                running += weight;
                if (running > target)
                    drawn.token = (psm_i32)(tile.first + part_offset + k);
            }
        }
    }
    drawn.log_probability = psm_bits_float(0x7fc00000u); /* NaN */
    if (drawn.writes && want_log_probability && drawn.token >= 0)
        drawn.log_probability = psm_token_log_probability(weight, share);
    return drawn;
}

/* ---- psm_probs ------------------------------------------------------------------ */

/* The probabilities of a tile's tokens, at out[0 .. count - 1] (the tile's
 * place in the row's output): 0 for a token not kept, and for every token
 * of a tile without kept mass (whose logits are not read). Slot s of an
 * item is offset s * PSM_TEAM + lane, so that a team's loads and stores of
 * a slot are consecutive; no team operation. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN void psm_stage_probs(PSM_TEAM_TYPE team, psm_tile_place tile, psm_kept_rule rule,
                                   psm_tile_share share, PSM_GLOBAL float *out)
{
    const int any_kept = share.mass != 0 && share.rescaled != 0;
    for (int s = 0; s < PSM_TEAM_SLOTS; ++s) {
        const int offset = s * PSM_TEAM + team.lane;
        if (offset >= tile.count)
            break;
        psm_u64 weight = 0;
        if (any_kept)
            weight = psm_kept_weight(rule, share.reference,
                                     psm_read_logit(psm_tile_raw(tile, offset)),
                                     (psm_u32)(tile.first + offset));
        out[offset] = weight ? psm_token_probability(weight, share) : 0.0f;
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_DRAW_H */
