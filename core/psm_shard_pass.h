/*
 * psm_shard_pass.h: what a sharded call (core/sharded.c, docs/SAMPLING.md
 * section 8) asks a backend to compute over this rank's shard of the logits.
 *
 * The rounds, their records and every decision taken from the combined
 * records stay in core; the backend runs only the passes that read the
 * shard's logits, each over a list of items (a row, or a draw), and returns
 * a few words per item in host memory. Compiles as C, CUDA, HIP and OpenCL
 * C 1.2: the GPU stage (kernels/psm_stage_sharded.h) reads the same item
 * and geometry structs that the host fills, so both are laid out without
 * padding (8-byte members first) and their sizes are checked on each side.
 */
#ifndef PSM_SHARD_PASS_H
#define PSM_SHARD_PASS_H

#ifndef PSM_ROW_H /* the OpenCL program has it already */
#include "psm_row.h"
#endif

/* The passes. Words each item's output holds, in order: */
#define PSM_SHARD_PASS_SUMMARY 1     /* 3: the best rank key of a valid logit (0: none), the
                                        valid logits' count, 1 if a NaN or +inf logit was read */
#define PSM_SHARD_PASS_TALLY 2       /* 512: (count, mass) of each of the 256 buckets of one radix
                                        level, over the valid logits with key >= lower_bound
                                        whose key's digits above the level equal prefix; mass:
                                        the sum of g_i against row_max (by_mass only, else 0) */
#define PSM_SHARD_PASS_TILE_MAXIMA 3 /* local_tiles: the best kept key of this shard's part of
                                        each tile it touches (0: none kept) */
#define PSM_SHARD_PASS_TILE_MASSES 4 /* local_tiles: the kept mass of this shard's part of each
                                        tile, against the tile's key in tile_keys (0: mass 0) */
#define PSM_SHARD_PASS_PICK 5        /* 2: the token (full-row index) where the running kept
                                        weight of this shard's part of tile `tile` first exceeds
                                        pick, in token order, and that token's weight; token
                                        ~0 if the part's mass is not above pick */

#define PSM_SHARD_SUMMARY_WORDS 3
#define PSM_SHARD_TALLY_WORDS 512
#define PSM_SHARD_PICK_WORDS 2

/* One item of a pass, in host memory (the GPU backends copy the list). */
typedef struct psm_shard_item {
    psm_i64 logits_row;  /* the shard's row to read; -1: skip (its output words are 0) */
    psm_u64 lower_bound; /* TALLY */
    psm_u64 prefix;      /* TALLY: the digits chosen at the levels above */
    psm_u64 cutoff;      /* TILE_*, PICK: the kept rule's (psm_make_kept_rule) */
    psm_u64 min_weight;
    psm_u64 pick;        /* PICK: below the part's kept mass */
    psm_u64 reference;   /* PICK: the tile's m_t key (its weights' reference) */
    float row_max;       /* M and s of the row (TALLY by mass, TILE_*, PICK) */
    float scale;
    psm_i32 level;       /* TALLY: 0 .. 7 */
    psm_i32 by_mass;     /* TALLY: tally g_i masses too */
    psm_i32 tile;        /* PICK: the local tile (0: the shard's first) */
    psm_i32 unused;
} psm_shard_item;
#define PSM_SHARD_ITEM_BYTES 80

/* The shard and the pass, the same for every item. */
typedef struct psm_shard_geometry {
    psm_i64 row_stride;  /* of the shard's logits, in elements */
    psm_i64 shard_vocab; /* columns of the shard */
    psm_i64 first_token; /* the full-row token of column 0 */
    psm_i64 full_vocab;
    psm_i64 first_tile;  /* first_token / PSM_TILE */
    psm_i64 local_tiles; /* tiles the shard touches */
    psm_i32 kind;        /* PSM_SHARD_PASS_* */
    psm_i32 dtype;       /* PSM_LOGITS_* */
    psm_i32 weight_bits; /* psm_weight_bits(full_vocab) */
    psm_i32 unused;
} psm_shard_geometry;
#define PSM_SHARD_GEOMETRY_BYTES 64

/* Output words per item of a pass. */
PSM_FN psm_i64 psm_shard_pass_words(psm_i32 kind, psm_i64 local_tiles)
{
    if (kind == PSM_SHARD_PASS_SUMMARY)
        return PSM_SHARD_SUMMARY_WORDS;
    if (kind == PSM_SHARD_PASS_TALLY)
        return PSM_SHARD_TALLY_WORDS;
    if (kind == PSM_SHARD_PASS_PICK)
        return PSM_SHARD_PICK_WORDS;
    return local_tiles;
}

/* This shard's columns of local tile t: [*begin, *end), as columns of the
 * shard (the token is first_token + column). */
PSM_FN void psm_shard_tile_part(const psm_shard_geometry *g, psm_i64 t, psm_i64 *begin,
                                psm_i64 *end)
{
    const psm_i64 tile = g->first_tile + t;
    psm_i64 tile_begin = tile * PSM_TILE, tile_end = tile_begin + PSM_TILE;
    if (tile_end > g->full_vocab)
        tile_end = g->full_vocab;
    const psm_i64 last = g->first_token + g->shard_vocab;
    *begin = (tile_begin > g->first_token ? tile_begin : g->first_token) - g->first_token;
    *end = (tile_end < last ? tile_end : last) - g->first_token;
}

/* The item's kept rule (the same on every backend: psm_make_kept_rule). */
PSM_FN psm_kept_rule psm_shard_item_rule(const psm_shard_item *item, int weight_bits)
{
    return psm_make_kept_rule(item->cutoff, item->min_weight, item->row_max, item->scale,
                              weight_bits);
}

#endif /* PSM_SHARD_PASS_H */
