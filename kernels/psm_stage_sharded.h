/*
 * psm_stage_sharded.h: the passes of a sharded call over this rank's shard
 * of the logits (docs/SAMPLING.md section 8), written once for CUDA, HIP
 * and OpenCL over kernels/psm_portable.h. core/psm_shard_pass.h says what
 * each pass computes per item; core/sharded.c drives the rounds and keeps
 * every decision, so the stage only reads the shard and returns words.
 *
 * A group per item. Every quantity is an integer (keys, counts, g_i sums)
 * or one of the contract's float sequences of a single logit, so the
 * group's partial sums and maxima combine to the host loops' values in any
 * order. Tokens given to the contract are full-row indices (first_token +
 * column), as the CPU reads them.
 *
 * An item with logits_row < 0 is skipped by the whole group: its loops run
 * over nothing and its words are zeroed, but every item still passes every
 * barrier (the layer's rule: a flag, never an early exit).
 */
#ifndef PSM_STAGE_SHARDED_H
#define PSM_STAGE_SHARDED_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif
#ifndef PSM_SHARD_PASS_H
#include "psm_shard_pass.h"
#endif

/* TALLY's buckets: one radix level of the rank keys, a (count, mass) pair
 * of output words each. */
#define PSM_SHARD_BUCKETS (PSM_SHARD_TALLY_WORDS / 2)

/* TALLY keeps copies of the buckets in local memory and item i adds to copy
 * i % PSM_SHARD_TALLY_COPIES: the keys of typical logits fall in a few
 * buckets of a level (at level 0, a few exponents), and the local atomics of
 * a warp's lanes on one address serialize; the copies spread them over as
 * many addresses. A copy is a bucket longer than the buckets, so that one
 * bucket's copies lie in different banks. 8 copies take 24 KiB, within
 * CUDA's 48 KiB of static shared memory and OpenCL's 32 KiB minimum with
 * the group scratch. */
#define PSM_SHARD_TALLY_COPIES 8
#define PSM_SHARD_COPY_STRIDE (PSM_SHARD_BUCKETS + 1)
#define PSM_SHARD_COPY_ENTRIES (PSM_SHARD_TALLY_COPIES * PSM_SHARD_COPY_STRIDE)

/* The team reductions' posts (TILE_*): on OpenCL the group scratch's posts
 * array, free while no group operation runs; CUDA and HIP need none. */
#if PSM_PLATFORM_OPENCL
#define PSM_SHARD_POSTS(scratch) ((scratch)->group.posts)
#else
#define PSM_SHARD_POSTS(scratch) psm_no_posts()
#endif

PSM_STAGE_BEGIN

/* The call's arrays (device memory). */
typedef struct psm_shard_arrays {
    PSM_GLOBAL const unsigned char *logits;   /* the shard, rows of geometry.row_stride */
    PSM_GLOBAL const psm_shard_item *items;
    PSM_GLOBAL const psm_u64 *tile_keys;      /* TILE_MASSES: items x local_tiles; else unread */
    PSM_GLOBAL psm_u64 *out;                  /* items x psm_shard_pass_words */
} psm_shard_arrays;

/* The group-shared memory (declared by the entry). */
typedef struct psm_shard_scratch {
    psm_group_scratch group;
    psm_u64 bucket_mass[PSM_SHARD_COPY_ENTRIES]; /* TALLY: copy c's bucket b at c * stride + b */
    psm_u32 bucket_count[PSM_SHARD_COPY_ENTRIES];
    psm_u64 found_token;                         /* PICK: from the item whose run holds it */
    psm_u64 found_weight;
} psm_shard_scratch;

/* Column `column` of a shard row as the CPU reads it. */
PSM_DEVICE_FN float psm_shard_logit(PSM_GLOBAL const unsigned char *row, int dtype,
                                    psm_i64 column)
{
    return psm_read_logit(psm_raw_logit(row, dtype, column));
}

/* SUMMARY: the best rank key of a valid logit, the valid count, the bad
 * flag. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_shard_summary(PSM_TEAM_TYPE team, const psm_shard_geometry geometry,
                                    PSM_GLOBAL const unsigned char *row, int active,
                                    PSM_GLOBAL psm_u64 *out, PSM_LOCAL psm_group_scratch *group)
{
    const psm_i64 columns = active ? geometry.shard_vocab : 0;
    psm_u64 best = 0, valid = 0, bad = 0;
    for (psm_i64 i = psm_group_item(); i < columns; i += psm_group_size()) {
        const float x = psm_shard_logit(row, geometry.dtype, i);
        const int kind = psm_logit_class(x);
        if (kind == PSM_LOGIT_BAD)
            bad = 1;
        if (kind != PSM_LOGIT_VALID)
            continue;
        const psm_u64 key = psm_rank_key(x, (psm_u32)(geometry.first_token + i));
        best = key > best ? key : best;
        ++valid;
    }
    best = psm_group_max_u64(team, best, group);
    valid = psm_group_sum_u64(team, valid, group);
    bad = psm_group_max_u64(team, bad, group);
    if (active && psm_group_item() == 0) {
        out[0] = best;
        out[1] = valid;
        out[2] = bad;
    }
}

/* TALLY: one radix level's (count, mass) per bucket, tallied with local
 * atomics into the item's copy of the buckets (counts fit 32 bits: a shard
 * has fewer than 2^32 columns). Each item adds a run of its tokens in one
 * bucket at once, when the bucket changes: where the keys cluster, most
 * tokens cost no atomic. Integer sums, so neither the runs nor the copies
 * change the totals. */
PSM_LOCAL_FN void psm_shard_tally(const psm_shard_geometry geometry, const psm_shard_item item,
                                  PSM_GLOBAL const unsigned char *row, int active,
                                  PSM_GLOBAL psm_u64 *out, PSM_LOCAL psm_shard_scratch *scratch)
{
    const int first = psm_group_item(), step = psm_group_size();
    for (int e = first; e < PSM_SHARD_COPY_ENTRIES; e += step) {
        scratch->bucket_count[e] = 0;
        scratch->bucket_mass[e] = 0;
    }
    psm_group_barrier();
    const int copy = (first % PSM_SHARD_TALLY_COPIES) * PSM_SHARD_COPY_STRIDE;
    PSM_LOCAL psm_u32 *count = scratch->bucket_count + copy;
    PSM_LOCAL psm_u64 *mass = scratch->bucket_mass + copy;
    const psm_i64 columns = active ? geometry.shard_vocab : 0;
    const int shift = 64 - 8 * (item.level + 1);
    int run_bucket = 0;
    psm_u32 run_count = 0;
    psm_u64 run_mass = 0;
    for (psm_i64 i = first; i < columns; i += step) {
        const float x = psm_shard_logit(row, geometry.dtype, i);
        if (psm_logit_class(x) != PSM_LOGIT_VALID)
            continue;
        const psm_u64 key = psm_rank_key(x, (psm_u32)(geometry.first_token + i));
        if (key < item.lower_bound)
            continue;
        /* Level 0 has no digits above it (and a shift by 64 is undefined). */
        if (item.level > 0 && (key >> (shift + 8)) != item.prefix)
            continue;
        const int b = (int)((key >> shift) & (PSM_SHARD_BUCKETS - 1));
        if (b != run_bucket && run_count != 0) {
            psm_local_add_u32(&count[run_bucket], run_count);
            psm_local_add_u64_by_words(&mass[run_bucket], run_mass);
            run_count = 0;
            run_mass = 0;
        }
        run_bucket = b;
        ++run_count;
        if (item.by_mass)
            run_mass += psm_weight_of_gap(psm_unclamped_gap(item.row_max, x, item.scale),
                                          geometry.weight_bits);
    }
    if (run_count != 0) {
        psm_local_add_u32(&count[run_bucket], run_count);
        psm_local_add_u64_by_words(&mass[run_bucket], run_mass);
    }
    psm_group_barrier();
    if (active)
        for (int b = first; b < PSM_SHARD_BUCKETS; b += step) {
            psm_u64 total_count = 0, total_mass = 0;
            for (int c = 0; c < PSM_SHARD_TALLY_COPIES; ++c) {
                total_count += scratch->bucket_count[c * PSM_SHARD_COPY_STRIDE + b];
                total_mass += scratch->bucket_mass[c * PSM_SHARD_COPY_STRIDE + b];
            }
            out[2 * b] = total_count;
            out[2 * b + 1] = total_mass;
        }
}

/* TILE_MAXIMA and TILE_MASSES: a value per local tile, over this shard's
 * part of it. Maxima: the best kept key. Masses: the kept g_i against the
 * tile's key in tile_keys (its m_t), 0 where that key is 0. A team per
 * tile: the group's teams take tiles team, team + teams, ... in rounds that
 * every item runs (tiles is the same for the whole group), each a team
 * reduction, where a group reduction per tile would serialize the tiles
 * behind two group barriers each. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_shard_tiles(PSM_TEAM_TYPE team, const psm_shard_geometry geometry,
                                  const psm_shard_item item, PSM_GLOBAL const unsigned char *row,
                                  int active, PSM_GLOBAL const psm_u64 *tile_keys,
                                  psm_i64 index, PSM_GLOBAL psm_u64 *out,
                                  PSM_POSTS(psm_u64) posts)
{
    const psm_kept_rule rule = psm_shard_item_rule(&item, geometry.weight_bits);
    const int masses = geometry.kind == PSM_SHARD_PASS_TILE_MASSES;
    const psm_i64 tiles = active ? geometry.local_tiles : 0;
    const int teams = psm_group_size() / PSM_TEAM, team_index = psm_group_item() / PSM_TEAM;
    for (psm_i64 round = 0; round < tiles; round += teams) {
        const psm_i64 t = round + team_index;
        const int has_tile = t < tiles;
        psm_i64 begin = 0, end = 0;
        psm_u64 tile_key = 0;
        if (has_tile) {
            psm_shard_tile_part(&geometry, t, &begin, &end);
            if (masses) {
                tile_key = tile_keys[index * geometry.local_tiles + t];
                if (tile_key == 0)
                    end = begin;
            }
        }
        const float reference = psm_rank_key_logit(tile_key);
        psm_u64 value = 0;
        for (psm_i64 i = begin + team.lane; i < end; i += PSM_TEAM) {
            const float x = psm_shard_logit(row, geometry.dtype, i);
            const psm_u32 token = (psm_u32)(geometry.first_token + i);
            if (masses) {
                value += psm_kept_weight(rule, reference, x, token);
            } else if (psm_token_kept(rule, x, token)) {
                const psm_u64 key = psm_rank_key(x, token);
                value = key > value ? key : value;
            }
        }
        PSM_TEAM_POST(posts, value);
        psm_team_barrier();
        value = masses ? psm_team_sum_u64(team, value, posts)
                       : psm_team_max_u64(team, value, posts);
        if (has_tile && team.lane == 0)
            out[t] = value;
        psm_team_barrier(); /* every read of this round's posts before the next round's */
    }
}

/* PICK: the token of local tile item.tile where the running kept weight
 * (against item.reference's logit) first exceeds item.pick, in token
 * order. Each item sums a contiguous run of the part; a group scan of the
 * run sums tells which run holds the pick, and that item walks it. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_shard_pick(PSM_TEAM_TYPE team, const psm_shard_geometry geometry,
                                 const psm_shard_item item, PSM_GLOBAL const unsigned char *row,
                                 int active, PSM_GLOBAL psm_u64 *out,
                                 PSM_LOCAL psm_shard_scratch *scratch)
{
    const psm_kept_rule rule = psm_shard_item_rule(&item, geometry.weight_bits);
    const float reference = psm_rank_key_logit(item.reference);
    psm_i64 begin = 0, end = 0;
    if (active)
        psm_shard_tile_part(&geometry, item.tile, &begin, &end);
    const psm_i64 count = end > begin ? end - begin : 0;
    const psm_i64 items = psm_group_size(), run = (count + items - 1) / items;
    const psm_i64 offset = psm_group_item() * run < count ? psm_group_item() * run : count;
    const psm_i64 run_begin = begin + offset;
    const psm_i64 run_end = offset + run < count ? run_begin + run : begin + count;
    psm_u64 own = 0;
    for (psm_i64 i = run_begin; i < run_end; ++i)
        own += psm_kept_weight(rule, reference, psm_shard_logit(row, geometry.dtype, i),
                               (psm_u32)(geometry.first_token + i));
    if (psm_group_item() == 0) {
        scratch->found_token = ~(psm_u64)0; /* none: the part's mass is not above pick */
        scratch->found_weight = 0;
    }
    psm_u64 total;
    const psm_u64 through = psm_group_inclusive_scan_u64(team, own, &total, &scratch->group);
    psm_u64 running = through - own;
    if (running <= item.pick && item.pick < through)
        for (psm_i64 i = run_begin; i < run_end; ++i) {
            const psm_u32 token = (psm_u32)(geometry.first_token + i);
            const psm_u64 weight =
                psm_kept_weight(rule, reference, psm_shard_logit(row, geometry.dtype, i), token);
            if (item.pick < running + weight) {
                scratch->found_token = token;
                scratch->found_weight = weight;
                break;
            }
            running += weight;
        }
    psm_group_barrier();
    if (active && psm_group_item() == 0) {
        out[0] = scratch->found_token;
        out[1] = scratch->found_weight;
    }
}

/* Item `index` of the pass; called by every item of its group. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_stage_shard_pass(PSM_TEAM_TYPE team, const psm_shard_geometry geometry,
                                       const psm_shard_arrays arrays, psm_i64 index,
                                       PSM_LOCAL psm_shard_scratch *scratch)
{
    const psm_shard_item item = arrays.items[index];
    const int active = item.logits_row >= 0;
    PSM_GLOBAL const unsigned char *row =
        arrays.logits + (active ? item.logits_row : 0) * geometry.row_stride *
                            psm_element_bytes(geometry.dtype);
    PSM_GLOBAL psm_u64 *out =
        arrays.out + index * psm_shard_pass_words(geometry.kind, geometry.local_tiles);
    if (geometry.kind == PSM_SHARD_PASS_SUMMARY)
        psm_shard_summary(team, geometry, row, active, out, &scratch->group);
    else if (geometry.kind == PSM_SHARD_PASS_TALLY)
        psm_shard_tally(geometry, item, row, active, out, scratch);
    else if (geometry.kind == PSM_SHARD_PASS_PICK)
        psm_shard_pick(team, geometry, item, row, active, out, scratch);
    else
        psm_shard_tiles(team, geometry, item, row, active, arrays.tile_keys, index, out,
                        PSM_SHARD_POSTS(scratch));
    if (!active) {
        const psm_i64 words = psm_shard_pass_words(geometry.kind, geometry.local_tiles);
        for (psm_i64 w = psm_group_item(); w < words; w += psm_group_size())
            out[w] = 0;
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_SHARDED_H */
