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
    psm_u64 bucket_mass[PSM_SHARD_BUCKETS];   /* TALLY */
    psm_u32 bucket_count[PSM_SHARD_BUCKETS];
    psm_u64 found_token;                      /* PICK: from the item whose run holds it */
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
 * atomics (counts fit 32 bits: a shard has fewer than 2^32 columns). */
PSM_LOCAL_FN void psm_shard_tally(const psm_shard_geometry geometry, const psm_shard_item item,
                                  PSM_GLOBAL const unsigned char *row, int active,
                                  PSM_GLOBAL psm_u64 *out, PSM_LOCAL psm_shard_scratch *scratch)
{
    const int first = psm_group_item(), step = psm_group_size();
    for (int b = first; b < PSM_SHARD_BUCKETS; b += step) {
        scratch->bucket_count[b] = 0;
        scratch->bucket_mass[b] = 0;
    }
    psm_group_barrier();
    const psm_i64 columns = active ? geometry.shard_vocab : 0;
    const int shift = 64 - 8 * (item.level + 1);
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
        psm_local_add_u32(&scratch->bucket_count[b], 1u);
        if (item.by_mass)
            psm_local_add_u64(&scratch->bucket_mass[b],
                              psm_weight_of_gap(psm_unclamped_gap(item.row_max, x, item.scale),
                                                geometry.weight_bits));
    }
    psm_group_barrier();
    if (active)
        for (int b = first; b < PSM_SHARD_BUCKETS; b += step) {
            out[2 * b] = scratch->bucket_count[b];
            out[2 * b + 1] = scratch->bucket_mass[b];
        }
}

/* TILE_MAXIMA and TILE_MASSES: a value per local tile, over this shard's
 * part of it; the group takes the tiles in turn. Maxima: the best kept
 * key. Masses: the kept g_i against the tile's key in tile_keys (its m_t),
 * 0 where that key is 0. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_shard_tiles(PSM_TEAM_TYPE team, const psm_shard_geometry geometry,
                                  const psm_shard_item item, PSM_GLOBAL const unsigned char *row,
                                  int active, PSM_GLOBAL const psm_u64 *tile_keys,
                                  psm_i64 index, PSM_GLOBAL psm_u64 *out,
                                  PSM_LOCAL psm_group_scratch *group)
{
    const psm_kept_rule rule = psm_shard_item_rule(&item, geometry.weight_bits);
    const int masses = geometry.kind == PSM_SHARD_PASS_TILE_MASSES;
    const psm_i64 tiles = active ? geometry.local_tiles : 0;
    for (psm_i64 t = 0; t < tiles; ++t) {
        psm_i64 begin, end;
        psm_shard_tile_part(&geometry, t, &begin, &end);
        const psm_u64 tile_key = masses ? tile_keys[index * geometry.local_tiles + t] : 0;
        if (masses && tile_key == 0)
            end = begin;
        const float reference = psm_rank_key_logit(tile_key);
        psm_u64 value = 0;
        for (psm_i64 i = begin + psm_group_item(); i < end; i += psm_group_size()) {
            const float x = psm_shard_logit(row, geometry.dtype, i);
            const psm_u32 token = (psm_u32)(geometry.first_token + i);
            if (masses) {
                value += psm_kept_weight(rule, reference, x, token);
            } else if (psm_token_kept(rule, x, token)) {
                const psm_u64 key = psm_rank_key(x, token);
                value = key > value ? key : value;
            }
        }
        value = masses ? psm_group_sum_u64(team, value, group)
                       : psm_group_max_u64(team, value, group);
        if (psm_group_item() == 0)
            out[t] = value;
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
                        &scratch->group);
    if (!active) {
        const psm_i64 words = psm_shard_pass_words(geometry.kind, geometry.local_tiles);
        for (psm_i64 w = psm_group_item(); w < words; w += psm_group_size())
            out[w] = 0;
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_SHARDED_H */
