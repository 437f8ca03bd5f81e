/*
 * psm_stage_select.h: the cutoff selection (docs/SAMPLING.md section 4),
 * written once for CUDA, HIP and OpenCL over kernels/psm_portable.h.
 *
 * psm_radix_select finds a top-k or top-p cutoff key exactly by a radix
 * search over the 64-bit rank keys, 8 bits a level: each level tallies the
 * candidates whose key starts with the digits chosen so far into 256
 * buckets (by count, or by their global weights g_i), and the group picks
 * the bucket where the running total from the top reaches what is needed.
 * A key holds its token, so keys are unique and the last level leaves one
 * candidate; most searches stop earlier, as soon as the chosen bucket holds
 * a single candidate or (by count) ends exactly at k.
 *
 * The stage reads its candidates through a reader (psm_portable.h,
 * PSM_TEAM_READER_TEMPLATE): psm_reader_count(reader) entries, entry i's
 * rank key from psm_reader_key(reader, i, &x) (0: not a candidate; x gets
 * its logit after psm_read_logit). The CUDA/HIP row kernel reads the logits
 * row; the OpenCL row filter reads the row, its copy of the row in local
 * memory, or a list of candidate keys.
 */
#ifndef PSM_STAGE_SELECT_H
#define PSM_STAGE_SELECT_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif

#define PSM_RADIX_BITS 8
#define PSM_RADIX_BUCKETS 256
#define PSM_RADIX_LEVELS 8

PSM_STAGE_BEGIN

/* The radix search's group-shared memory (declared by the entry). */
typedef struct psm_radix_scratch {
    psm_u32 bucket_count[PSM_RADIX_BUCKETS];
    psm_u64 bucket_mass[PSM_RADIX_BUCKETS]; /* by mass: the sum of g_i */
    psm_u64 chosen;                         /* the level's bucket; PSM_RADIX_BUCKETS: none */
    psm_u64 above;                          /* the total of the buckets above it */
} psm_radix_scratch;

/* The cutoff over the candidates with rank key >= lower_bound, in decreasing
 * key order. By count: the cutoff that keeps exactly `need` (k) of them. By
 * mass (g_i against row_max): the shortest prefix whose mass reaches `need`,
 * or, for need 0, psm_top_p_target(Z, top_p) with Z the candidates' mass; a
 * target of 0 keeps one token, as a target of 1 does (the top candidate
 * weighs 2^weight_bits). Returns a key c: the selected candidates are
 * exactly those with key >= c among the reader's entries: c may be the
 * start of the last bucket chosen, below the smallest selected key.
 *
 * Called by every item of the group. Every item passes every barrier: once
 * the search has ended, the remaining levels only pass them (a flag, never
 * an early exit; see psm_portable.h). The choice of a level is a group scan:
 * each item owns a run of buckets, from the top, and the item whose run
 * holds the point where the running total reaches need reports its bucket. */
PSM_TEAM_READER_TEMPLATE
PSM_LOCAL_FN psm_u64 psm_radix_select(PSM_TEAM_TYPE team, const psm_reader *reader,
                                      psm_u64 lower_bound, int by_mass, psm_u64 need,
                                      float top_p, float row_max, float scale, int weight_bits,
                                      PSM_LOCAL psm_radix_scratch *radix,
                                      PSM_LOCAL psm_group_scratch *group)
{
    const int item = psm_group_item(), items = psm_group_size();
    psm_u64 prefix = 0; /* the digits chosen so far */
    psm_u64 cutoff = lower_bound;
    int searching = 1;

    for (int level = 0; level < PSM_RADIX_LEVELS; ++level) {
        const int shift = 64 - PSM_RADIX_BITS * (level + 1);
        if (searching) {
            for (int b = item; b < PSM_RADIX_BUCKETS; b += items) {
                radix->bucket_count[b] = 0;
                radix->bucket_mass[b] = 0;
            }
            if (item == 0)
                radix->chosen = PSM_RADIX_BUCKETS;
        }
        psm_group_barrier();
        const psm_i64 tallied = searching ? psm_reader_count(reader) : 0;
        for (psm_i64 i = item; i < tallied; i += items) {
            float x;
            const psm_u64 key = psm_reader_key(reader, i, &x);
            if (key == 0 || key < lower_bound)
                continue;
            if (level > 0 && (key >> (shift + PSM_RADIX_BITS)) != prefix)
                continue;
            const int bucket = (int)((key >> shift) & (PSM_RADIX_BUCKETS - 1));
            psm_local_add_u32(&radix->bucket_count[bucket], 1u);
            if (by_mass)
                psm_local_add_u64(&radix->bucket_mass[bucket],
                                  psm_weight_of_gap(psm_unclamped_gap(row_max, x, scale),
                                                    weight_bits));
        }
        psm_group_barrier();

        /* Position p is bucket 255 - p: keys in decreasing order. */
        const int run = (PSM_RADIX_BUCKETS + items - 1) / items;
        const int run_begin = item * run < PSM_RADIX_BUCKETS ? item * run : PSM_RADIX_BUCKETS;
        const int run_end =
            run_begin + run < PSM_RADIX_BUCKETS ? run_begin + run : PSM_RADIX_BUCKETS;
        psm_u64 own = 0;
        if (searching)
            for (int p = run_begin; p < run_end; ++p) {
                const int b = PSM_RADIX_BUCKETS - 1 - p;
                own += by_mass ? radix->bucket_mass[b] : (psm_u64)radix->bucket_count[b];
            }
        psm_u64 total;
        const psm_u64 through = psm_group_inclusive_scan_u64(team, own, &total, group);
        if (searching && level == 0 && by_mass && need == 0) {
            const psm_u64 target = psm_top_p_target(total, top_p);
            need = target > 1 ? target : 1;
        }
        /* The first position whose running total reaches need has a
         * positive amount, so it holds a candidate. */
        psm_u64 running = through - own;
        if (searching && running < need && need <= through)
            for (int p = run_begin; p < run_end; ++p) {
                const int b = PSM_RADIX_BUCKETS - 1 - p;
                const psm_u64 amount =
                    by_mass ? radix->bucket_mass[b] : (psm_u64)radix->bucket_count[b];
                if (running + amount >= need) {
                    radix->chosen = (psm_u64)b;
                    radix->above = running;
                    break;
                }
                running += amount;
            }
        psm_group_barrier();
        const int chosen = (int)radix->chosen;
        const psm_u64 above = radix->above;
        const psm_u32 chosen_count = chosen < PSM_RADIX_BUCKETS ? radix->bucket_count[chosen] : 0u;
        /* Every item has read the choice before the next level clears it. */
        psm_group_barrier();

        if (searching) {
            searching = 0;
            if (chosen == PSM_RADIX_BUCKETS) {
                /* Cannot happen (need never exceeds the total at its
                 * level); the digits chosen so far make a safe cutoff. */
                cutoff = level == 0 ? 0 : prefix << (shift + PSM_RADIX_BITS);
            } else if (chosen_count == 1 || (!by_mass && above + chosen_count == need) ||
                       level == PSM_RADIX_LEVELS - 1) {
                /* The whole bucket is selected: every key at or above its
                 * start, and nothing below. */
                cutoff = ((prefix << PSM_RADIX_BITS) | (psm_u64)chosen) << shift;
            } else {
                prefix = (prefix << PSM_RADIX_BITS) | (psm_u64)chosen;
                need -= above;
                searching = 1;
            }
        }
    }
    return cutoff > lower_bound ? cutoff : lower_bound;
}

/* Ranks a candidate list (the keys of a gap-bin or lane-maxima gathering,
 * `size` of them, at most 65536) by counting, which needs no sort because
 * keys are unique: order[rank] = the index of the key of that rank (rank 0
 * the largest key), weight[index] = the key's g_i against row_max. Every
 * item of the group calls it; the caller's barrier must follow before order
 * or weight is read. */
PSM_LOCAL_FN void psm_rank_list(PSM_LOCAL const psm_u64 *keys, psm_u32 size,
                                PSM_LOCAL psm_u16 *order, PSM_LOCAL psm_u64 *weight,
                                float row_max, float scale, int weight_bits)
{
    for (psm_u32 j = (psm_u32)psm_group_item(); j < size; j += (psm_u32)psm_group_size()) {
        const psm_u64 key = keys[j];
        psm_u32 rank = 0;
        for (psm_u32 m = 0; m < size; ++m)
            rank += keys[m] > key ? 1u : 0u;
        order[rank] = (psm_u16)j;
        weight[j] = psm_weight_of_gap(
            psm_unclamped_gap(row_max, psm_rank_key_logit(key), scale), weight_bits);
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_SELECT_H */
