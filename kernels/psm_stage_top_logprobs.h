/*
 * psm_stage_top_logprobs.h: top-N logprobs and the ranks of drawn tokens
 * (docs/SAMPLING.md section 6), written once for CUDA, HIP and OpenCL over
 * kernels/psm_portable.h. A row is one group's work, run after its draw,
 * when the tile masses (m_t, S_t), the running sums of T_t and the total
 * are known:
 *   psm_top_raw_scan      raw mode only: each tile's best valid rank key, M
 *                         and Z (two reads of the row);
 *   psm_top_best_keys     the N tiles with the largest best keys, in
 *                         decreasing order: the N best candidates lie in
 *                         them (each of the N holds a candidate above every
 *                         token of the other tiles); then the N best
 *                         candidate keys, from those tiles only, most
 *                         probable tiles first, so that a tile whose best
 *                         key cannot enter the full list is not read;
 *   psm_top_write_list    the tokens and logprobs;
 *   psm_top_begin_ranks   each drawn token's rank as 1, or -1 for none.
 * The ranks are then finished by psm_top_count_ranks, run by many groups at
 * once over parts of the rows (one more launch): it adds the candidates
 * above each drawn token in the part's tiles whose best key is above it. A
 * drawn token is often far down the rank order (a quarter of the draws at
 * temperature 0.8 from a language model's logits lie below the 20th), and
 * one group counting over the whole row was the stage's cost (614 us at 256
 * x 151,936 on an H100, latency-bound).
 * A candidate is a token that passes the row's psm_kept_rule
 * (core/psm_row.h): the row's own rule in the processed mode, where the
 * kept set need not be a prefix of the rank order (min-p), and the rule
 * that keeps every valid token (cutoff 0, no min-p) in the raw mode.
 *
 * A tile's best key may be an upper bound with the tile's best logit and
 * its first token (CUDA's kept tile keys): that orders tiles as their true
 * best keys do, since tiles hold disjoint runs of tokens.
 *
 * The list is built in rounds of PSM_TOP_ROUND keys (the tokens of
 * PSM_TOP_ROUND_TILES tiles, or that many tiles' keys), PSM_TOP_ROUND /
 * group size per item (the group has at most PSM_TOP_ROUND items, a power
 * of two), read PSM_TOP_BATCH at a time so that their loads overlap: keys
 * above the list's last key (when the list is full), and for tokens at
 * least the least key the best tiles guarantee, are staged, and the group
 * merges them into the list by counting ranks (keys are unique, so a key's
 * rank is the number of larger ones). Two barriers per round; a round where
 * no item stages costs no merge. A round reads several tiles because each
 * round is a chain of waits (loads, barriers, the merge): with a tile a
 * round, N = 20 took 21 of them per row.
 */
#ifndef PSM_STAGE_TOP_LOGPROBS_H
#define PSM_STAGE_TOP_LOGPROBS_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif
#ifndef PSM_STAGE_DRAW_H /* psm_tile_share and a token's probability */
#include "psm_stage_draw.h"
#endif

/* The longest list (polysample.h's PSM_MAX_TOP_LOGPROBS; each backend
 * checks they agree). */
#define PSM_TOP_LIST_MAX 64
/* Tiles a round of the list reads, the keys it may stage, and the keys an
 * item loads before it stages them. */
#define PSM_TOP_ROUND_TILES 4
#define PSM_TOP_ROUND (PSM_TOP_ROUND_TILES * PSM_TILE)
#define PSM_TOP_BATCH 8
/* The loads an item of psm_top_count_ranks has in flight, and the most
 * tiles of its part (a bit each in a 32-bit word). */
#define PSM_TOP_RANK_BATCH 16
#define PSM_TOP_RANK_PART_MAX 32
#if PSM_TOP_BATCH > PSM_LOAD_BATCH_MAX || PSM_TOP_RANK_BATCH > PSM_LOAD_BATCH_MAX
#error "psm_load_logits_batch takes at most PSM_LOAD_BATCH_MAX loads"
#endif
/* Whether the list's rounds load a batch before testing it, as the rank
 * parts do (psm_top_load_batch): on CUDA and HIP. PoCL 5's vectorised
 * work-item loops write out of bounds on that shape of the list's loop, so
 * the OpenCL program keeps a load behind each place's test there. */
#define PSM_TOP_LIST_BATCH_LOADS PSM_PLATFORM_GPU_CXX

PSM_STAGE_BEGIN

/* The stage's group-shared memory (declared by the entry). */
typedef struct psm_top_scratch {
    /* The list and the merge's output, in turn: 0 and 1 for the best tiles,
     * 2 and 3 for the best candidates (psm_top_best_keys). */
    psm_u64 list[4][PSM_TOP_LIST_MAX];
    psm_u64 staged[PSM_TOP_ROUND]; /* a round's keys: all of them at most */
    psm_u32 staged_count[2];           /* by round parity */
    psm_group_scratch group;
} psm_top_scratch;

/* The list as every item holds it (the same values on every item). */
typedef struct psm_top_list {
    int size;    /* keys in list[current], decreasing */
    int current;
    int round;   /* rounds so far: which staged_count the next one uses */
} psm_top_list;

/* One row, as the stage reads it. */
typedef struct psm_top_row {
    PSM_GLOBAL const unsigned char *logits; /* the mode's logits row: its first element */
    int dtype;                              /* PSM_LOGITS_* */
    psm_i64 vocab;
    psm_i32 tiles;
    int count;                              /* N */
    psm_kept_rule rule;                     /* who is a candidate */
} psm_top_row;

/* Where the processed mode finds a token's probability (psm_tile_share's
 * parts): the row's S_t, running sums of T_t and total. */
typedef struct psm_top_masses {
    PSM_GLOBAL const psm_u64 *tile_mass;
    PSM_GLOBAL const psm_u64 *tile_prefix;
    psm_u64 total;
} psm_top_masses;

/* One row's outputs. */
typedef struct psm_top_outputs {
    PSM_GLOBAL psm_i32 *tokens;      /* N entries */
    PSM_GLOBAL float *logprobs;      /* N entries */
    PSM_GLOBAL psm_i32 *ranks;       /* num_samples entries; NULL: not asked for */
    PSM_GLOBAL const psm_i32 *drawn; /* the row's drawn tokens */
    psm_i32 samples;
} psm_top_outputs;

/* Entry i of the row as the stage reads it: its logit after psm_read_logit. */
PSM_DEVICE_FN float psm_top_logit(const psm_top_row *row, psm_i64 index)
{
    return psm_read_logit(psm_raw_logit(row->logits, row->dtype, index));
}

/* Entries at[0 .. n) of the row into x (psm_load_logits_batch). */
PSM_DEVICE_FN void psm_top_load_batch(const psm_top_row *row, const psm_i32 *at, float *x, int n)
{
    psm_load_logits_batch(row->logits, row->dtype, at, x, n);
}

/* Token `token` with logit x (after psm_read_logit): its rank key when it
 * is a candidate, else 0. */
PSM_DEVICE_FN psm_u64 psm_top_kept_key(const psm_top_row *row, float x, psm_u32 token)
{
    return psm_token_kept(row->rule, x, token) ? psm_rank_key(x, token) : 0;
}

/* Token `token`'s rank key when it is a candidate, else 0. */
PSM_DEVICE_FN psm_u64 psm_top_candidate_key(const psm_top_row *row, psm_i64 token)
{
    return psm_top_kept_key(row, psm_top_logit(row, token), (psm_u32)token);
}

/* The tokens of tile `tile` of the row. */
PSM_DEVICE_FN int psm_top_tile_count(const psm_top_row *row, psm_i64 tile)
{
    const psm_i64 left = row->vocab - tile * PSM_TILE;
    return left < PSM_TILE ? (int)left : PSM_TILE;
}

/* ---- the list ---------------------------------------------------------------- */

/* An empty list; every item calls it (one barrier). */
PSM_LOCAL_FN psm_top_list psm_top_begin(PSM_LOCAL psm_top_scratch *scratch)
{
    if (psm_group_item() == 0) {
        scratch->staged_count[0] = 0;
        scratch->staged_count[1] = 0;
    }
    psm_group_barrier();
    psm_top_list list;
    list.size = 0;
    list.current = 0;
    list.round = 0;
    return list;
}

/* What a key must exceed to enter the list: its last key once it holds
 * `count`, else 0 (no candidate has key 0). Read between rounds. */
PSM_LOCAL_FN psm_u64 psm_top_floor(const psm_top_list *list, int count,
                                   PSM_LOCAL const psm_top_scratch *scratch)
{
    return list->size == count ? scratch->list[list->current][count - 1] : 0;
}

/* Stages a key of this round when it is above `threshold` (the list's
 * floor, or more): no barrier. */
PSM_LOCAL_FN void psm_top_stage(const psm_top_list *list, psm_u64 key, psm_u64 threshold,
                                PSM_LOCAL psm_top_scratch *scratch)
{
    if (key > threshold) {
        const psm_u32 slot = psm_local_add_u32(&scratch->staged_count[list->round & 1], 1u);
        scratch->staged[slot] = key;
    }
}

/* Ends a round: the staged keys and the list are merged into the other list
 * array, each key written at its rank among them when that is below count.
 * The counter of the next round is cleared after this round's barrier, when
 * every item has read its previous use. */
PSM_LOCAL_FN void psm_top_merge(psm_top_list *list, int count, PSM_LOCAL psm_top_scratch *scratch)
{
    const int item = psm_group_item(), items = psm_group_size();
    const int parity = list->round & 1;
    psm_group_barrier();
    const int staged = (int)scratch->staged_count[parity];
    if (item == 0)
        scratch->staged_count[1 - parity] = 0;
    if (staged > 0) {
        PSM_LOCAL const psm_u64 *old = scratch->list[list->current];
        PSM_LOCAL psm_u64 *merged = scratch->list[list->current ^ 1];
        const int pooled = list->size + staged;
        for (int u = item; u < pooled; u += items) {
            const psm_u64 mine = u < list->size ? old[u] : scratch->staged[u - list->size];
            int rank = 0;
            for (int v = 0; v < list->size; ++v)
                rank += old[v] > mine ? 1 : 0;
            for (int v = 0; v < staged; ++v)
                rank += scratch->staged[v] > mine ? 1 : 0;
            if (rank < count)
                merged[rank] = mine;
        }
        list->size = pooled < count ? pooled : count;
        list->current ^= 1;
    }
    psm_group_barrier();
    list->round += 1;
}

/* ---- the raw mode's row statistics --------------------------------------------- */

/* What the raw mode needs besides the tiles' best keys. */
typedef struct psm_top_raw {
    float row_max;   /* M of the valid logits */
    psm_u64 total;   /* Z: their weights against M at temperature 1 */
} psm_top_raw;

/* With `scanning` (the raw mode): tile_key[t] = tile t's best valid rank key
 * (0: none), then M and Z over the row (row->rule: every valid token).
 * Every item calls it, scanning or not (the loops are then empty), so that
 * its barriers are in no branch; the group reads tile_key after it
 * returns. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_top_raw psm_top_raw_scan(PSM_TEAM_TYPE team, const psm_top_row *row,
                                          int scanning, PSM_GLOBAL psm_u64 *tile_key,
                                          PSM_LOCAL psm_group_scratch *group)
{
    const int item = psm_group_item(), items = psm_group_size();
    const psm_i32 tiles = scanning ? row->tiles : 0;
    const psm_i64 vocab = scanning ? row->vocab : 0;
    psm_u64 row_best = 0;
    for (psm_i32 tile = 0; tile < tiles; ++tile) {
        const psm_i64 first = (psm_i64)tile * PSM_TILE;
        const int count = psm_top_tile_count(row, tile);
        psm_u64 best = 0;
        for (int k = item; k < count; k += items) {
            const psm_u64 key = psm_top_candidate_key(row, first + k);
            best = key > best ? key : best;
        }
        best = psm_group_max_u64(team, best, group);
        if (item == 0)
            tile_key[tile] = best;
        row_best = best > row_best ? best : row_best;
    }
    psm_top_raw raw;
    raw.row_max = psm_rank_key_logit(row_best);
    psm_u64 mass = 0;
    for (psm_i64 i = item; i < vocab; i += items) {
        const float x = psm_top_logit(row, i);
        if (psm_logit_class(x) == PSM_LOGIT_VALID)
            mass += psm_weight_of_gap(psm_unclamped_gap(raw.row_max, x, row->rule.scale),
                                      row->rule.weight_bits);
    }
    raw.total = psm_group_sum_u64(team, mass, group);
    psm_group_barrier_global(); /* tile_key's writes, for every item */
    return raw;
}

/* ---- the list of a row --------------------------------------------------------- */

/* Where psm_top_best_keys' rounds are: the same on every item. */
typedef struct psm_top_walk {
    int reading_tiles; /* 1: the tiles' keys; 0: the best tiles' tokens */
    int next;          /* the tiles' rounds: the next round's first tile */
    int chosen;        /* the best tiles, once they are known */
    int tiles_array;   /* the list array that holds them */
    int tile;          /* the tokens' rounds: the next round's first best tile */
    psm_u64 least;     /* the tokens' rounds: a best-N key is at least this */
    int more;          /* a round is left */
} psm_top_walk;

/* Moves the walk to its next round: from the tiles to their tokens when the
 * tiles are done (the list then starts again in list[2]), and ends it when
 * the best tiles are read or the next one's key is at or below the full
 * list's last (the later ones' keys are lower still). With N best tiles,
 * each holds a candidate of at least its key's logit, so the N best
 * candidates' keys are at least the least key of the N-th tile's logit
 * (psm_rank_key_tie_floor: a tile's key may carry its first token instead
 * of its best token's). */
PSM_LOCAL_FN void psm_top_advance(psm_top_walk *walk, psm_top_list *list, const psm_top_row *row,
                                  PSM_LOCAL const psm_top_scratch *scratch)
{
    if (walk->reading_tiles && walk->next >= row->tiles) {
        walk->reading_tiles = 0;
        walk->chosen = list->size;
        walk->tiles_array = list->current;
        walk->least = list->size == row->count
                          ? psm_rank_key_tie_floor(scratch->list[list->current][row->count - 1])
                          : 0;
        list->size = 0;
        list->current = 2;
        walk->tile = 0;
    }
    walk->more = walk->reading_tiles ||
                 (walk->tile < walk->chosen && scratch->list[walk->tiles_array][walk->tile] >
                                                   psm_top_floor(list, row->count, scratch));
}

/* Place `offset` of the walk's round: a tile (the tiles' rounds) or a
 * token of the round's best tiles; -1 for none. */
PSM_LOCAL_FN psm_i32 psm_top_round_place(const psm_top_walk *walk, const psm_top_row *row,
                                         PSM_LOCAL const psm_top_scratch *scratch, int offset)
{
    if (walk->reading_tiles) {
        const int tile = walk->next + offset;
        return tile < row->tiles ? tile : -1;
    }
    const int place = walk->tile + offset / PSM_TILE;
    if (place >= walk->chosen)
        return -1;
    const psm_i64 tile = psm_rank_key_token(scratch->list[walk->tiles_array][place]) / PSM_TILE;
    const int within = offset % PSM_TILE;
    return within < psm_top_tile_count(row, tile) ? (psm_i32)(tile * PSM_TILE + within) : -1;
}

/* The row's best candidates, scratch->list[returned.current][0 ..
 * returned.size), decreasing, in one loop of rounds (so that the merge is
 * compiled once: PoCL's compile time grows with every copy of code between
 * barriers):
 * - first the tiles: a round offers PSM_TOP_ROUND tile keys, and the list
 *   that ends this phase (in list[0] or list[1]) holds the best tiles, in
 *   decreasing order;
 * - then their candidates, in list[2] and list[3]: a round per
 *   PSM_TOP_ROUND_TILES best tiles, in that order, until psm_top_advance
 *   ends the walk.
 * Every item takes the same decisions from the same values, so the loop
 * ends on all of them at once (by its condition: no early exit around the
 * barriers). */
PSM_LOCAL_FN psm_top_list psm_top_best_keys(const psm_top_row *row,
                                            PSM_GLOBAL const psm_u64 *tile_key,
                                            PSM_LOCAL psm_top_scratch *scratch)
{
    const int item = psm_group_item(), items = psm_group_size();
    const int per_item = PSM_TOP_ROUND / items;
    psm_top_list list = psm_top_begin(scratch);
    psm_top_walk walk;
    walk.reading_tiles = 1;
    walk.next = 0;
    walk.chosen = 0;
    walk.tiles_array = 0;
    walk.tile = 0;
    walk.least = 0;
    psm_top_advance(&walk, &list, row, scratch);
    while (walk.more) {
        const psm_u64 floor = psm_top_floor(&list, row->count, scratch);
        const psm_u64 threshold = !walk.reading_tiles && walk.least > 0 && walk.least - 1 > floor
                                      ? walk.least - 1
                                      : floor;
        for (int j = 0; j < per_item; j += PSM_TOP_BATCH) {
            psm_u64 keys[PSM_TOP_BATCH];
#if PSM_TOP_LIST_BATCH_LOADS
            /* (The tiles' round loads logits it does not use: one round.) */
            psm_i32 at[PSM_TOP_BATCH];
            for (int b = 0; b < PSM_TOP_BATCH; ++b)
                at[b] = j + b < per_item
                            ? psm_top_round_place(&walk, row, scratch, (j + b) * items + item)
                            : -1;
            float x[PSM_TOP_BATCH];
            psm_top_load_batch(row, at, x, PSM_TOP_BATCH);
            for (int b = 0; b < PSM_TOP_BATCH; ++b)
                keys[b] = at[b] < 0 ? 0
                          : walk.reading_tiles ? tile_key[at[b]]
                          : psm_top_kept_key(row, x[b], (psm_u32)at[b]);
#else
            for (int b = 0; b < PSM_TOP_BATCH; ++b) {
                const psm_i32 at = j + b < per_item ? psm_top_round_place(&walk, row, scratch,
                                                                          (j + b) * items + item)
                                                    : -1;
                keys[b] = at < 0 ? 0
                          : walk.reading_tiles ? tile_key[at]
                          : psm_top_candidate_key(row, at);
            }
#endif
            for (int b = 0; b < PSM_TOP_BATCH; ++b)
                psm_top_stage(&list, keys[b], threshold, scratch);
        }
        if (walk.reading_tiles)
            walk.next += PSM_TOP_ROUND;
        else
            walk.tile += PSM_TOP_ROUND_TILES;
        psm_top_merge(&list, row->count, scratch);
        psm_top_advance(&walk, &list, row, scratch);
    }
    return list;
}

/* ---- outputs ------------------------------------------------------------------- */

/* A list entry's logprob. Processed: the probability a draw of it has,
 * (w_i / S_t) (T_t / total), with m_t the logit of its tile's key; raw:
 * the log-softmax from M and Z. Float64 where the platform has it,
 * through core/psm_row.h's functions, which the CPU backend uses too. */
PSM_DEVICE_FN float psm_top_log_probability(const psm_top_row *row, psm_u64 key, int raw_mode,
                                            psm_top_raw raw, PSM_GLOBAL const psm_u64 *tile_key,
                                            psm_top_masses masses)
{
    const float x = psm_rank_key_logit(key);
    const psm_u32 token = psm_rank_key_token(key);
#if PSM_HAVE_FP64
    if (raw_mode)
        return psm_raw_log_probability(x, raw.row_max, raw.total, row->rule.weight_bits);
#else
    if (raw_mode)
        return (x - raw.row_max) -
               (log((float)raw.total) - (float)row->rule.weight_bits * log(2.0f));
#endif
    const psm_i32 tile = (psm_i32)(token / PSM_TILE);
    psm_tile_share share;
    share.reference = psm_rank_key_logit(tile_key[tile]);
    share.mass = masses.tile_mass[tile];
    share.rescaled = psm_tile_rescaled(masses.tile_prefix, tile);
    share.total = masses.total;
    const psm_u64 weight = psm_kept_weight(row->rule, share.reference, x, token);
#if PSM_HAVE_FP64
    return psm_log_probability(weight, share.mass, share.rescaled, share.total);
#else
    return log(psm_token_probability(weight, share));
#endif
}

/* The list's tokens and logprobs, then token -1 and logprob -inf up to N. */
PSM_LOCAL_FN void psm_top_write_list(const psm_top_row *row, psm_top_list list, int raw_mode,
                                     psm_top_raw raw, PSM_GLOBAL const psm_u64 *tile_key,
                                     psm_top_masses masses,
                                     PSM_LOCAL const psm_top_scratch *scratch,
                                     psm_top_outputs out)
{
    for (int e = psm_group_item(); e < row->count; e += psm_group_size()) {
        const psm_u64 key = e < list.size ? scratch->list[list.current][e] : 0;
        out.tokens[e] = key != 0 ? (psm_i32)psm_rank_key_token(key) : -1;
        out.logprobs[e] = key != 0 ? psm_top_log_probability(row, key, raw_mode, raw, tile_key,
                                                             masses)
                                   : -INFINITY;
    }
}

/* Each drawn token's rank as 1, or -1 for no token (when out.ranks is set);
 * psm_top_count_ranks then adds the candidates above it. */
PSM_DEVICE_FN void psm_top_begin_ranks(psm_top_outputs out)
{
    const psm_i32 samples = out.ranks ? out.samples : 0;
    for (psm_i32 sample = psm_group_item(); sample < samples; sample += psm_group_size())
        out.ranks[sample] = out.drawn[sample] >= 0 ? 1 : -1;
}

/* Drawn token `sample`'s rank key (0: no token). */
PSM_DEVICE_FN psm_u64 psm_top_drawn_key(const psm_top_row *row, psm_top_outputs out,
                                        psm_i32 sample)
{
    const psm_i32 token = out.drawn[sample];
    return token >= 0 ? psm_rank_key(psm_top_logit(row, token), (psm_u32)token) : 0;
}

/* Bits t - first of the tiles t of [first, end) whose best key is above
 * `key` (0: no token, no tile). */
PSM_DEVICE_FN psm_u32 psm_top_tiles_above(PSM_GLOBAL const psm_u64 *tile_key, psm_i32 first,
                                          psm_i32 end, psm_u64 key)
{
    psm_u32 above = 0u;
    for (psm_i32 tile = first; key != 0 && tile < end; ++tile)
        above |= (tile_key[tile] > key ? 1u : 0u) << (tile - first);
    return above;
}

/* Adds to each drawn token's rank (when out.ranks is set) the candidates
 * whose key is above its key (its logit in the mode's logits) among tiles
 * [first, end) of the row (at most PSM_TOP_RANK_PART_MAX), counting only in
 * the tiles whose best key is above it: a group's part of the count, after
 * psm_top_begin_ranks (and, in the raw mode, after psm_top_raw_scan wrote
 * tile_key). Every item calls it (one group sum per sample when any is
 * counted, taken by every item so that the barriers stay out of branches). */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_top_count_ranks(PSM_TEAM_TYPE team, const psm_top_row *row, psm_i32 first,
                                      psm_i32 end, PSM_GLOBAL const psm_u64 *tile_key,
                                      psm_top_outputs out, PSM_LOCAL psm_group_scratch *group)
{
    const int item = psm_group_item(), items = psm_group_size();
    const psm_i32 samples = out.ranks ? out.samples : 0;
    /* Most parts of a row hold no token above any drawn one: they return
     * here, the same on every item, before any barrier (a barrier skipped
     * by a branch inside the loop below would need every item to skip it,
     * which PoCL does not compile reliably). */
    psm_u32 reading = 0u;
    for (psm_i32 sample = 0; sample < samples; ++sample)
        reading |= psm_top_tiles_above(tile_key, first, end, psm_top_drawn_key(row, out, sample));
    if (reading == 0u)
        return;
    /* The part's tokens in one loop, PSM_TOP_RANK_BATCH loads in flight an
     * item across its tiles, the tiles not above the drawn token skipped:
     * their test is a bit of a word held in a register, read once a sample,
     * not a tile key loaded for every token. */
    const psm_i64 begin = (psm_i64)first * PSM_TILE;
    const psm_i64 stop = (psm_i64)end * PSM_TILE < row->vocab ? (psm_i64)end * PSM_TILE
                                                                : row->vocab;
    /* Without min-p a row keeps every valid token at or above a cutoff key,
     * so every token above a kept one (the drawn token) is kept, and a
     * token is counted when its logit is above the drawn one's, or equal
     * with a lower index (the rank key's order: psm_read_logit has made -0
     * +0, and a row with a NaN draws nothing). Min-p's rounded weights are
     * not monotone at their last bit (SAMPLING.md section 3): each token is
     * tested. */
    const int kept_above = row->rule.min_weight == 0;
    for (psm_i32 sample = 0; sample < samples; ++sample) {
        const psm_u64 key = psm_top_drawn_key(row, out, sample);
        const psm_u32 live = psm_top_tiles_above(tile_key, first, end, key);
        const float drawn_x = psm_rank_key_logit(key);
        const psm_i32 drawn_token = (psm_i32)psm_rank_key_token(key);
        psm_u32 above = 0u;
        for (psm_i64 i = begin + item; live != 0u && i < stop;
             i += (psm_i64)PSM_TOP_RANK_BATCH * items) {
            psm_i32 at[PSM_TOP_RANK_BATCH];
            for (int b = 0; b < PSM_TOP_RANK_BATCH; ++b) {
                const psm_i64 token = i + (psm_i64)b * items;
                const int bit = (int)((token - begin) >> PSM_TILE_LOG2);
                at[b] = token < stop && ((live >> bit) & 1u) != 0u ? (psm_i32)token : -1;
            }
            float x[PSM_TOP_RANK_BATCH];
            psm_top_load_batch(row, at, x, PSM_TOP_RANK_BATCH);
            if (kept_above) {
                for (int b = 0; b < PSM_TOP_RANK_BATCH; ++b)
                    above += at[b] >= 0 && (x[b] > drawn_x ||
                                            (x[b] == drawn_x && at[b] < drawn_token))
                                 ? 1u
                                 : 0u;
            } else {
                for (int b = 0; b < PSM_TOP_RANK_BATCH; ++b)
                    above += at[b] >= 0 && psm_top_kept_key(row, x[b], (psm_u32)at[b]) > key
                                 ? 1u
                                 : 0u;
            }
        }
        const psm_u64 counted = psm_group_sum_u64(team, (psm_u64)above, group);
        if (item == 0 && counted != 0)
            psm_global_add_u32((PSM_GLOBAL psm_u32 *)&out.ranks[sample], (psm_u32)counted);
    }
}

/* A row without a list: bad (token -1, logprob NaN, rank -1) or, in the
 * processed mode, greedy (its token with logprob 0, rank 1). */
PSM_DEVICE_FN void psm_top_write_point(int count, psm_i32 token, psm_top_outputs out)
{
    const int item = psm_group_item(), items = psm_group_size();
    for (int e = item; e < count; e += items) {
        out.tokens[e] = e == 0 ? token : -1;
        out.logprobs[e] = token < 0 ? psm_bits_float(0x7fc00000u) /* NaN */
                                    : (e == 0 ? 0.0f : -INFINITY);
    }
    if (out.ranks)
        for (psm_i32 sample = item; sample < out.samples; sample += items)
            out.ranks[sample] = token < 0 ? -1 : 1;
}

/* A sampled row's list, and its ranks begun, after its draw: every item of
 * the group calls it. tile_key: the row's tiles' best candidate keys (processed mode)
 * or where psm_top_raw_scan writes them (raw mode, whose row.rule keeps
 * every valid token at temperature 1; masses are unused there). */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_stage_top_logprobs(PSM_TEAM_TYPE team, psm_top_row row, int raw_mode,
                                         PSM_GLOBAL psm_u64 *tile_key, psm_top_masses masses,
                                         PSM_LOCAL psm_top_scratch *scratch, psm_top_outputs out)
{
    const psm_top_raw raw = psm_top_raw_scan(team, &row, raw_mode, tile_key, &scratch->group);
    if (raw_mode)
        row.rule.row_max = raw.row_max;
    const psm_top_list list = psm_top_best_keys(&row, tile_key, scratch);
    psm_top_write_list(&row, list, raw_mode, raw, tile_key, masses, scratch, out);
    psm_top_begin_ranks(out);
}

PSM_STAGE_END

#endif /* PSM_STAGE_TOP_LOGPROBS_H */
