/*
 * psm_stage_bins.h: the searches of the gap-bin cutoff path
 * (docs/SAMPLING.md section 4), written once for CUDA, HIP and OpenCL over
 * kernels/psm_portable.h.
 *
 * The GPU cutoff searches tally a row's tokens (or, for top-k, launch 1's
 * lane maxima) by gap bin (core/psm_row.h's psm_gap_bin), find the bin where
 * the running count or g mass reaches what is needed, gather that bin's
 * tokens (for top-k, every token up to it) into a list, rank the list
 * (psm_rank_list, kernels/psm_stage_select.h) and, for top-p, walk the
 * ranked list to the rank where the running mass reaches the target. The
 * two searches over running amounts are here, each a team's work (CUDA and
 * HIP: one warp; OpenCL: a team of PSM_TEAM items):
 * - psm_team_choose_bin, the bin from the tallies: each item sums a run of
 *   consecutive bins, the team finds the item whose run holds the point
 *   where the running amount reaches the need (psm_team_find_holder), and
 *   that item walks its run;
 * - psm_team_walk_ranks, the rank from the ranked list's weights: PSM_TEAM
 *   ranks a round, until one reaches the target.
 * Every item of the team calls them; on OpenCL every item of the work-group
 * (they hold barriers). With top-k the ranked list holds every kept token,
 * and psm_group_list_masses, a whole group's work, makes the kept tiles'
 * (m_t, S_t) from it.
 *
 * Each token's (or lane maximum's) part in the passes that tally the bins
 * and gather the list is here too (psm_bins_tally, psm_bins_gather,
 * psm_lane_max_bin); the loops of those passes over the row are each
 * backend's, over its own loads and tile layout (docs/ARCHITECTURE.md,
 * "Still written per backend").
 */
#ifndef PSM_STAGE_BINS_H
#define PSM_STAGE_BINS_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif

/* The bins each item of a team sums. */
#define PSM_BINS_PER_ITEM (PSM_GAP_BINS / PSM_TEAM)

PSM_STAGE_BEGIN

/* A team search's answer. Every item gets `found` (the search reached its
 * need) and `need`; the item that `reports` (the one whose run holds the
 * answer, or lane 0 when none does) also gets `position` and `before`, the
 * running amount of the positions before it. */
typedef struct psm_team_found {
    int found;
    int reports;
    int position;
    psm_u64 before;
    psm_u64 need;
} psm_team_found;

/* The team's answer from each item's run total `own` (posted before the
 * barrier that precedes this call) and a need of at least 1: the holder of
 * need - 1 is the item whose run's running amount first reaches need. The
 * reporting item then walks its run. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_team_found psm_team_found_of(PSM_TEAM_TYPE team, psm_u64 own, psm_u64 need,
                                              int searching, PSM_POSTS(psm_u64) posts)
{
    const psm_team_holder holder = psm_team_find_holder(team, own, need - 1, posts);
    psm_team_found answer;
    answer.found = searching && holder.lane >= 0;
    answer.reports = searching && team.lane == (holder.lane >= 0 ? holder.lane : 0);
    answer.position = -1;
    answer.before = holder.begin;
    answer.need = need;
    return answer;
}

/* A token's part in tallying the gap bins, x its logit after
 * psm_read_logit (any class): a valid token adds 1 to its bin's count or,
 * by_mass, its weight g to its bin's mass. By mass the bins are told apart
 * by their masses alone (a bin without mass cannot be where the running
 * mass first reaches the target), and the list's size is checked as it is
 * gathered: no count. */
PSM_LOCAL_FN void psm_bins_tally(float x, float maximum, float scale, int by_mass, int bits,
                                 PSM_LOCAL psm_u32 *bin_count, PSM_LOCAL psm_u64 *bin_mass)
{
    if (psm_logit_class(x) != PSM_LOGIT_VALID)
        return;
    const float gap = psm_unclamped_gap(maximum, x, scale);
    const int bin = psm_gap_bin(gap);
    if (by_mass)
        psm_local_add_u64_by_words(&bin_mass[bin], psm_weight_of_gap(gap, bits));
    else
        psm_local_add_u32(&bin_count[bin], 1u);
}

/* Token `token`'s part in gathering a candidate list, x as for
 * psm_bins_tally: a valid token whose gap bin lies in [first_bin, last_bin]
 * takes the next slot of the list and writes its rank key there when the
 * slot is below capacity. The size counts on past capacity, which tells the
 * caller that the list did not fit. */
PSM_LOCAL_FN void psm_bins_gather(float x, psm_u32 token, float maximum, float scale,
                                  int first_bin, int last_bin, PSM_LOCAL psm_u32 *size,
                                  PSM_LOCAL psm_u64 *list, psm_u32 capacity)
{
    if (psm_logit_class(x) != PSM_LOGIT_VALID)
        return;
    const int bin = psm_gap_bin(psm_unclamped_gap(maximum, x, scale));
    if (bin < first_bin || bin > last_bin)
        return;
    const psm_u32 slot = psm_local_add_u32(size, 1u);
    if (slot < capacity)
        list[slot] = psm_rank_key(x, token);
}

/* The gap bin of a lane maximum that launch 1 keeps for top-k rows
 * (psm_stage_tile.h: the ordered bits of the best logit of the lane, the
 * tokens one item of a tile's team reads; 0 when the lane holds no
 * candidate), -1 for none. A token is at most its lane's maximum, so its bin
 * is at least that of the maximum: k lane maxima in the bins up to b prove
 * k candidates there, and every candidate of those bins lies in a lane whose
 * maximum's bin is at most b. Top-k tallies the lane maxima by bin and
 * gathers the tokens of those lanes (psm_bins_gather) instead of the row. */
PSM_DEVICE_FN int psm_lane_max_bin(psm_u32 high, float maximum, float scale)
{
    return high != 0 ? psm_gap_bin(psm_unclamped_gap(maximum, psm_ordered_logit(high), scale))
                     : -1;
}

/* The first gap bin at which the running amount in bin order (most probable
 * first) reaches need: the bins' counts, or with by_mass their g masses.
 * With need_from_total, need is psm_top_p_target(total, top_p) first, total
 * being the sum over the bins (top-p alone); answer.need is that need, and
 * the search is for at least 1 (a target of 0 keeps the top token, as 1
 * does). The bin found holds a positive amount. bin_mass is read only
 * by_mass. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_team_found psm_team_choose_bin(PSM_TEAM_TYPE team,
                                                PSM_LOCAL const psm_u32 *bin_count,
                                                PSM_LOCAL const psm_u64 *bin_mass, int by_mass,
                                                psm_u64 need, int need_from_total, float top_p,
                                                int searching, PSM_POSTS(psm_u64) posts)
{
    const int first_bin = team.lane * PSM_BINS_PER_ITEM;
    psm_u64 own = 0;
    if (searching)
        for (int b = first_bin; b < first_bin + PSM_BINS_PER_ITEM; ++b)
            own += by_mass ? bin_mass[b] : (psm_u64)bin_count[b];
    PSM_TEAM_POST(posts, own);
    psm_team_barrier();
    if (need_from_total)
        need = psm_top_p_target(psm_team_sum_u64(team, own, posts), top_p);
    const psm_u64 reach = need > 1 ? need : 1;
    psm_team_found answer = psm_team_found_of(team, own, reach, searching, posts);
    answer.need = need;
    if (answer.found && answer.reports) {
        psm_u64 running = answer.before;
        for (int b = first_bin; b < first_bin + PSM_BINS_PER_ITEM && answer.position < 0; ++b) {
            const psm_u64 amount = by_mass ? bin_mass[b] : (psm_u64)bin_count[b];
            if (running + amount >= reach) {
                answer.position = b;
                answer.before = running;
            }
            running += amount;
        }
    }
    return answer;
}

/* The first rank r < limit at which carry plus the running sum of the
 * ranked list's weights (weight[order[r]], psm_rank_list's arrays) reaches
 * target; limit - 1 when none does. With target_from_total, target is
 * psm_top_p_target(Z, top_p) first, Z the weight of ranks [0, limit), and
 * at least 1 (a target of 0 keeps the top token, as 1 does); otherwise the
 * caller's carry is below target. The team takes PSM_TEAM ranks a round,
 * one an item, and psm_team_reach finds the first that reaches the target:
 * the hit is usually in the first rounds, which a team that may leave the
 * loop (PSM_TEAM_MAY_EXIT) does not read past; elsewhere the rounds after
 * it pass their barriers. Each round's posts are read before the barrier
 * that ends it, so the next round may post again. Every item gets the
 * rank. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_u32 psm_team_walk_ranks(PSM_TEAM_TYPE team, PSM_LOCAL const psm_u64 *weight,
                                         PSM_LOCAL const psm_u16 *order, psm_u32 limit,
                                         psm_u64 carry, psm_u64 target, int target_from_total,
                                         float top_p, PSM_POSTS(psm_u64) posts)
{
    /* The barriers stay outside the branches (the PoCL rule). */
    psm_u64 partial = 0;
    if (target_from_total)
        for (psm_u32 r = (psm_u32)team.lane; r < limit; r += PSM_TEAM)
            partial += weight[order[r]];
    PSM_TEAM_POST(posts, partial);
    psm_team_barrier();
    if (target_from_total) {
        target = psm_top_p_target(psm_team_sum_u64(team, partial, posts), top_p);
        target = target > 1 ? target : 1;
    }
    psm_team_barrier();
    psm_u32 last_rank = limit - 1;
    int open = 1;
    for (psm_u32 base = 0; base < limit; base += PSM_TEAM) {
        const psm_u32 rank = base + (psm_u32)team.lane;
        const psm_u64 value = open && rank < limit ? weight[order[rank]] : 0;
        PSM_TEAM_POST(posts, value);
        psm_team_barrier();
        const psm_team_reached reached = psm_team_reach(team, value, target - carry, posts);
        psm_team_barrier();
        if (open && reached.lane >= 0) {
            last_rank = base + (psm_u32)reached.lane;
            open = 0;
        }
        carry += reached.total;
#if PSM_TEAM_MAY_EXIT
        if (!open)
            break;
#endif
    }
    return last_rank;
}

/* Completes the tile masses that psm_stage_gather_and_weigh began, once the
 * cutoff is known: each kept token of the list (key at least the cutoff)
 * adds its weight against its tile's maximum (tile_key, the tile pass's
 * rank keys) to that tile's mass. A tile whose mass is then 0 keeps
 * nothing: one that keeps a token keeps its maximum, whose own weight is
 * 2^bits. Each backend then marks those tiles in its own tile references.
 * A group's work: every item calls it (it ends with a barrier). */
PSM_LOCAL_FN void psm_group_add_list_masses(PSM_LOCAL const psm_u64 *list, psm_u32 size,
                                            psm_u64 cutoff, float scale, int bits,
                                            PSM_GLOBAL const psm_u64 *tile_key,
                                            PSM_GLOBAL psm_u64 *tile_mass)
{
    const psm_u32 item = (psm_u32)psm_group_item(), items = (psm_u32)psm_group_size();
    for (psm_u32 j = item; j < size; j += items) {
        const psm_u64 token_key = list[j];
        if (token_key < cutoff)
            continue;
        const psm_i64 tile = (psm_i32)psm_rank_key_token(token_key) / PSM_TILE;
        const float gap = psm_unclamped_gap(psm_rank_key_logit(tile_key[tile]),
                                            psm_rank_key_logit(token_key), scale);
        psm_global_add_u64(&tile_mass[tile], psm_weight_of_gap(gap, bits));
    }
    psm_group_barrier_global();
}

/* Each tile's (m_t, S_t) over the kept set from a ranked list that holds
 * every kept token (top-k's): ranks [0, kept) of the list (psm_rank_list's
 * keys, weights and order) whose weight meets min_weight (0: any; min-p
 * keeps a prefix of the ranks, since weights do not grow down them). Two
 * passes over the kept ranks with an atomic per rank: each tile's best kept
 * token (m_t, psm_tile_best), then each token's weight against it added to
 * S_t. Every tile of the row gets its entry, tile_best 0 and tile_mass 0
 * for a tile that keeps nothing. A group's work: every item calls it (it
 * holds barriers); a group that keeps nothing passes tiles 0. */
PSM_LOCAL_FN void psm_group_list_masses(PSM_LOCAL const psm_u64 *key,
                                        PSM_LOCAL const psm_u64 *weight,
                                        PSM_LOCAL const psm_u16 *order, psm_u32 kept,
                                        psm_u64 min_weight, float scale, int bits,
                                        PSM_GLOBAL psm_tile_best *tile_best,
                                        PSM_GLOBAL psm_u64 *tile_mass, psm_i64 tiles)
{
    const psm_u32 item = (psm_u32)psm_group_item(), items = (psm_u32)psm_group_size();
    for (psm_i64 tile = item; tile < tiles; tile += items) {
        tile_best[tile] = 0;
        tile_mass[tile] = 0;
    }
    psm_group_barrier_global();
    for (int pass = 0; pass < 2; ++pass) {
        for (psm_u32 rank = item; rank < kept; rank += items) {
            const psm_u32 j = order[rank];
            if (min_weight != 0 && weight[j] < min_weight)
                continue;
            const psm_u64 token_key = key[j];
            const psm_i64 tile = (psm_i32)psm_rank_key_token(token_key) / PSM_TILE;
            if (pass == 0) {
                psm_tile_best_raise(&tile_best[tile], token_key);
            } else {
                const float gap = psm_unclamped_gap(psm_tile_best_logit(&tile_best[tile]),
                                                    psm_rank_key_logit(token_key), scale);
                psm_global_add_u64(&tile_mass[tile], psm_weight_of_gap(gap, bits));
            }
        }
        psm_group_barrier_global();
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_BINS_H */
