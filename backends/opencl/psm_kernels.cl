/*
 * psm_kernels.cl: the OpenCL backend's kernels, OpenCL C 1.2.
 *
 * Every quantity that decides a token (weights, gaps, thresholds, Philox,
 * the picks) comes from core/psm_contract.h, whose FP_CONTRACT OFF pragma
 * covers this file too; a row's parameters and the gap bins from
 * core/psm_row.h; logit processing's rules from core/psm_processing.h; the
 * call's description and the per-row state from psm_opencl_request.h, which
 * the host compiles too.
 *
 * Build options give PSM_WG, the work-group size of every kernel (a power of
 * two between 16 and 1024, chosen by the host from device queries), and
 * PSM_PROGRAM, which of this file's programs to build (the PSM_PROGRAM_*
 * names below). The sampling program holds the kernels of a psm_sample or
 * psm_probs call without logit processing, top-N logprobs or an engine's
 * filter order (psm_tile_reduce to psm_probs) and is built with the
 * context; each other program holds the kernels of one feature and is
 * built by the first call that needs it (opencl_programs.c), so that a
 * call's first-use compile (PoCL compiles at run time) is only of kernels
 * it may run. Each kernel is in one program; the helpers are static, so a
 * program emits only those its kernels call.
 *
 * Pipeline for one psm_sample call (docs/SAMPLING.md). The per-tile, per-row
 * and per-draw kernels give each unit of work a team of 32 items (one warp
 * on NVIDIA; fewer on a device that runs groups of 16), several teams per
 * group, and combine the items' partials with one barrier per round (see
 * "teams" below); psm_row_filter gives each row a whole group.
 *   psm_tile_reduce  a team per tile, the tile pass of
 *                    kernels/psm_stage_tile.h (shared with CUDA and HIP):
 *                    reads the tile once (16-byte vector loads where
 *                    aligned); writes the tile's best rank key (its maximum
 *                    and the lowest index holding it), valid count, bad
 *                    flag, for rows with no top-p or min-p (m_t, S_t), and
 *                    for rows with top-k each item's maximum (its lane of
 *                    32 tokens).
 *   psm_row_top_k    a group per row, when some row may have top-k: for
 *                    top-k rows, the candidates from the lanes whose maximum
 *                    reaches the k-th lane maximum's gap bin, ranked on
 *                    chip; cutoff and the kept tiles' (m_t, S_t) from that
 *                    list. The row is not read again (the next two skip
 *                    it); rows it cannot finish go on to psm_row_filter.
 *   psm_row_filter   a group per row, only when a filter may be active:
 *                    finds the top-k / top-p cutoff key by the radix select
 *                    of kernels/psm_stage_select.h (shared with CUDA and
 *                    HIP: counts for top-k, exact 64-bit masses per bucket
 *                    for top-p) and the min-p weight threshold. A row
 *                    that fits in local memory is read once. A longer one is
 *                    read once to tally its tokens by gap to M and once to
 *                    collect the keys of the bin holding the cutoff
 *                    (psm_bin_collect); where that bin does not fit, once per
 *                    radix level until the tokens still needed fit and once
 *                    more to collect them (psm_radix_collect). The search
 *                    ends on that list.
 *   psm_row_orders   a group per row, instead of the two kernels above when
 *                    the call's filter order is an engine's: the cutoff and
 *                    min-p weight of kernels/psm_stage_orders.h (shared with
 *                    CUDA and HIP) over the row in global memory.
 *   psm_tile_filter  a team per tile of rows psm_row_filter or
 *                    psm_row_orders filtered:
 *                    (m_t, S_t) over the kept tokens.
 *   psm_row_combine  a team per row: status, M, T_t, the inclusive prefix of
 *                    T_t over tiles and the row total.
 *   psm_draw         a team per (sample, row): picks the tile by binary
 *                    search of the prefix, then the token within the tile.
 *   psm_probs        a team per tile: the final distribution.
 *   psm_top_logprobs a group per row, after psm_draw, only for calls with
 *                    top_logprobs: kernels/psm_stage_top_logprobs.h.
 * psm_tile_filter, psm_draw and psm_probs are the stages of
 * kernels/psm_stage_draw.h (shared with CUDA and HIP), with the kept test
 * of core/psm_row.h.
 * With logit processing, the processing kernels run first ("logit
 * processing" below) and the pipeline reads their output; or, for calls
 * whose rows only the tile pass and the draw read (opencl_processing_on_read),
 * the lists step alone runs first and psm_tile_reduce_on_read and
 * psm_draw_on_read apply the processing as they read the rows.
 * No kernel needs 64-bit atomics: 64-bit sums add posted partials, and the
 * per-bucket masses of top-p and top-k's tile masses from its list are kept
 * as two 32-bit words with exact carries.
 */

/* The shared headers. The host hands them to the OpenCL compiler as the
 * program's first source strings, in this order (embedded at build time by
 * backends/opencl/CMakeLists.txt, so the program needs no include path at run
 * time): each guard below is then already defined and the #include names the
 * file only. Compiled alone, with -I core -I kernels -I backends/opencl, this
 * file reads the same headers through these lines. */
#ifndef PSM_CONTRACT_H
#include "psm_contract.h"
#endif
#ifndef PSM_ROW_H
#include "psm_row.h"
#endif
#ifndef PSM_PROCESSING_H
#include "psm_processing.h"
#endif
#ifndef PSM_OPENCL_REQUEST_H
#include "psm_opencl_request.h"
#endif
#ifndef PSM_PORTABLE_H
#include "psm_portable.h"
#endif
#ifndef PSM_STAGE_TILE_H
#include "psm_stage_tile.h"
#endif
#ifndef PSM_STAGE_SELECT_H
#include "psm_stage_select.h"
#endif
#ifndef PSM_STAGE_BINS_H
#include "psm_stage_bins.h"
#endif
#ifndef PSM_STAGE_DRAW_H
#include "psm_stage_draw.h"
#endif
#ifndef PSM_STAGE_LISTS_H
#include "psm_stage_lists.h"
#endif
#ifndef PSM_STAGE_ORDERS_H
#include "psm_stage_orders.h"
#endif
#ifndef PSM_STAGE_TOP_LOGPROBS_H
#include "psm_stage_top_logprobs.h"
#endif
#if PSM_RANK_TILES > PSM_TOP_RANK_PART_MAX
#error "a rank part's tiles are bits of a 32-bit word (psm_top_count_ranks)"
#endif
#ifndef PSM_VERIFY_H
#include "psm_verify.h"
#endif
#ifndef PSM_STAGE_VERIFY_H
#include "psm_stage_verify.h"
#endif
#ifndef PSM_SHARD_PASS_H
#include "psm_shard_pass.h"
#endif
#ifndef PSM_STAGE_SHARDED_H
#include "psm_stage_sharded.h"
#endif

/* This compiler lays the host's structs out as the host does (see
 * psm_opencl_request.h); the build fails otherwise. */
typedef char psm_request_layout_check[
    sizeof(psm_opencl_request) == PSM_OPENCL_REQUEST_BYTES ? 1 : -1];
typedef char psm_row_state_layout_check[sizeof(psm_row_state) == PSM_ROW_STATE_BYTES ? 1 : -1];
typedef char psm_verify_call_layout_check[sizeof(psm_verify_call) == PSM_VERIFY_CALL_BYTES ? 1 : -1];
typedef char psm_verify_row_layout_check[sizeof(psm_verify_row) == PSM_VERIFY_ROW_BYTES ? 1 : -1];
typedef char psm_shard_item_layout_check[sizeof(psm_shard_item) == PSM_SHARD_ITEM_BYTES ? 1 : -1];
typedef char psm_shard_geometry_layout_check[
    sizeof(psm_shard_geometry) == PSM_SHARD_GEOMETRY_BYTES ? 1 : -1];

/* The programs, in the order of the host's PROGRAM_* (opencl_backend.h). */
#define PSM_PROGRAM_SAMPLING 1
#define PSM_PROGRAM_PROCESSING 2
#define PSM_PROGRAM_ORDERS 3
#define PSM_PROGRAM_TOP_LOGPROBS 4
#define PSM_PROGRAM_VERIFY 5
#define PSM_PROGRAM_SHARDED 6
#if !defined(PSM_PROGRAM) || PSM_PROGRAM < PSM_PROGRAM_SAMPLING || PSM_PROGRAM > PSM_PROGRAM_SHARDED
#error "PSM_PROGRAM (a PSM_PROGRAM_* name) must be given as a build option"
#endif

/* Every kernel's first arguments: the call's description, then the buffers
 * every row reads, the logits and the per-row arrays in psm_row_arrays'
 * order (psm_opencl_request.h says why these are apart). */
#define PSM_REQUEST_PARAMS                                                                  \
    const psm_opencl_request request, __global const uchar *logits,                         \
        __global const float *temperature_per_row, __global const int *top_k_per_row,       \
        __global const float *top_p_per_row, __global const float *min_p_per_row,           \
        __global const ulong *seed_per_row, __global const ulong *offset_per_row,           \
        __global const uint *subsequence_per_row, __global const long *row_indices,         \
        __global const ulong *seed_pointer, __global const ulong *offset_pointer

/* The same names, passed on to a function that takes PSM_REQUEST_PARAMS. */
#define PSM_REQUEST_ARGS                                                                     \
    request, logits, temperature_per_row, top_k_per_row, top_p_per_row, min_p_per_row,     \
        seed_per_row, offset_per_row, subsequence_per_row, row_indices, seed_pointer,      \
        offset_pointer

/* The on-read kernels' last arguments: logit processing applied as the tile
 * pass and the draw read the rows (opencl_processing_on_read). The output
 * rows' allowed-token words (NULL: every token allowed), mask_words a row;
 * with lists, their listed-token bits and the lists step's overlay rows
 * (NULL without). */
#define PSM_READ_PROCESSING_PARAMS                                                           \
    __global const uint *read_mask, const long read_mask_words,                             \
        __global const uint *read_listed, __global const float *read_overlay

/* Output row `row`'s psm_read_processing from those arguments. */
#define PSM_READ_PROCESSING_OF(row)                                                          \
    psm_row_read_processing(read_mask, read_mask_words, read_listed, read_overlay, (row),   \
                            request.vocab)

static psm_row_arrays psm_make_row_arrays(
    __global const float *temperature, __global const int *top_k, __global const float *top_p,
    __global const float *min_p, __global const ulong *seed, __global const ulong *offset,
    __global const uint *subsequence, __global const long *logits_row,
    __global const ulong *seed_pointer, __global const ulong *offset_pointer)
{
    psm_row_arrays arrays;
    arrays.temperature = temperature;
    arrays.top_k = top_k;
    arrays.top_p = top_p;
    arrays.min_p = min_p;
    arrays.seed = seed;
    arrays.offset = offset;
    arrays.subsequence = subsequence;
    arrays.logits_row = logits_row;
    arrays.seed_pointer = seed_pointer;
    arrays.offset_pointer = offset_pointer;
    return arrays;
}

/* A row's parameters (core/psm_row.h), in a kernel. */
#define PSM_RESOLVE_ROW(row)                                                                 \
    psm_resolve_row((row), request.per_row, request.scalars,                                 \
                    psm_make_row_arrays(temperature_per_row, top_k_per_row, top_p_per_row,   \
                                        min_p_per_row, seed_per_row, offset_per_row,         \
                                        subsequence_per_row, row_indices, seed_pointer,      \
                                        offset_pointer))

/* Where output row p's logits start, in elements. */
#define PSM_ROW_BASE(p) ((long)(p).logits_row * request.row_stride)

static float psm_candidate_value(float x)
{
    return psm_logit_class(x) == PSM_LOGIT_VALID ? x : -INFINITY;
}

/* A raw logit as the contract reads it, with anything that is not a
 * candidate (masked, NaN, +inf) folded to -inf: callers that care about bad
 * logits classify before folding. */
static float psm_candidate_logit(float raw)
{
    return psm_candidate_value(psm_read_logit(raw));
}

static float psm_load_candidate(__global const uchar *logits, int dtype, long index)
{
    return psm_candidate_logit(psm_raw_logit(logits, dtype, index));
}

static int psm_is_valid(float folded)
{
    return folded > -INFINITY;
}

/* ---- teams: several units of work per work-group ---------------------------
 * A team of PSM_TEAM consecutive items does one unit of work: a tile in
 * psm_tile_reduce, psm_tile_filter and psm_probs, a row in psm_row_combine,
 * a (sample, row) pair in psm_draw. A group of PSM_WG items runs
 * PSM_GROUP_TEAMS units side by side, the units numbered across the whole
 * launch (dimension 0 only; the host enqueues enough groups for every unit).
 * PSM_TEAM, the team reductions and the tile's layout in an item's slots
 * (PSM_TEAM_SLOTS of them: 32, or 64 on a device that runs groups of 16)
 * are kernels/psm_portable.h's, which says why teams post to local memory. */
#define PSM_GROUP_TEAMS (PSM_WG / PSM_TEAM)

/* The unit of work of the calling item's team. */
static long psm_team_unit(void)
{
    return (long)get_group_id(0) * PSM_GROUP_TEAMS + get_local_id(0) / PSM_TEAM;
}

/* The tile of a team of the per-tile kernels. Teams past the last tile (the
 * last group's spare ones) get in_range 0 and row 0, a row that exists. */
typedef struct psm_team_tile {
    long slot;    /* row * tiles + tile: its place in the per-tile arrays */
    uint row;
    int tile;
    int first;    /* its first token */
    int count;    /* its tokens: PSM_TILE, fewer at the end of a row */
    int in_range;
} psm_team_tile;

static psm_team_tile psm_locate_tile(int rows, int vocab, int tiles)
{
    psm_team_tile where;
    where.slot = psm_team_unit();
    where.in_range = where.slot < (long)rows * tiles;
    where.row = where.in_range ? (uint)(where.slot / tiles) : 0u;
    where.tile = where.in_range ? (int)(where.slot - (long)where.row * tiles) : 0;
    where.first = where.tile * PSM_TILE;
    where.count = min(PSM_TILE, vocab - where.first);
    return where;
}

/* ---- combining posted partials --------------------------------------------
 * Every item of the group calls these (they contain a barrier), posting its
 * value at posts[get_local_id(0)]; each then reads the posts of its
 * `members` items (its team with PSM_TEAM, the whole group with PSM_WG),
 * member being its own place among them. A posts array is written again only
 * after another barrier has followed every read of it: the tile kernels give
 * each round its own array; psm_row_filter's group rounds use the layer's
 * group operations, which end with a barrier. */

PSM_LOCAL_FN ulong psm_posted_max_u64(ulong value, uint member, uint members,
                                      __local ulong *posts)
{
    const uint lid = get_local_id(0);
    posts[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    __local const ulong *mine = posts + (lid - member);
    ulong result = 0;
    for (uint j = 0; j < members; ++j)
        result = max(result, mine[j]);
    return result;
}

/* The sum of the members' values; *before gets the sum over the members
 * placed before this one (an exclusive scan in member order). */
PSM_LOCAL_FN ulong psm_posted_sum_u64(ulong value, uint member, uint members,
                                      __local ulong *posts, ulong *before)
{
    const uint lid = get_local_id(0);
    posts[lid] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    __local const ulong *mine = posts + (lid - member);
    ulong total = 0, earlier = 0;
    for (uint j = 0; j < members; ++j) {
        ulong posted = mine[j];
        earlier += j < member ? posted : 0;
        total += posted;
    }
    *before = earlier;
    return total;
}

/* ---- a tile and a row's kept test, for the stages of psm_stage_draw.h ---- */

/* The tile whose first token is `first` (count tokens) of the row whose
 * first element is row_base. It is read in 16-byte vectors where its
 * address allows (a cl_mem is aligned far more than that, so only the row
 * stride decides). */
static psm_tile_place psm_tile_place_of(__global const uchar *logits, int dtype, long row_base,
                                        int first, int count)
{
    psm_tile_place place;
    place.logits = logits + (row_base + first) * psm_element_bytes(dtype);
    place.first = first;
    place.count = count;
    place.dtype = dtype;
    place.aligned = ((uintptr_t)place.logits & 15) == 0;
    place.processing = psm_no_read_processing();
    return place;
}

/* A row's kept test from the state the filter kernels left (cutoff 0 and
 * min_weight 0 for rows without filters). */
static psm_kept_rule psm_row_kept_rule(__global const psm_row_state *state,
                                       const psm_row_params *p, int vocab)
{
    return psm_make_kept_rule(state->cutoff, state->min_weight, state->maximum,
                              psm_inverse_temperature_scale(p->temperature),
                              psm_weight_bits(vocab));
}

/* The masses that place tile `tile` of a row in its distribution. */
static psm_tile_share psm_row_tile_share(__global const float *tile_ref,
                                         __global const ulong *tile_mass,
                                         __global const ulong *tile_prefix, long row_tiles,
                                         int tile, ulong total)
{
    psm_tile_share share;
    share.reference = tile_ref[row_tiles + tile];
    share.mass = tile_mass[row_tiles + tile];
    share.rescaled = psm_tile_rescaled(tile_prefix + row_tiles, tile);
    share.total = total;
    return share;
}

/* ---- row summary from the tile summaries of psm_tile_reduce -------------- */

typedef struct psm_row_summary {
    float maximum;   /* M: the largest valid logit (-inf when none) */
    ulong top_key;   /* largest rank key: the greedy token */
    uint valid;      /* number of valid tokens */
    int bad;         /* a NaN or +inf somewhere */
} psm_row_summary;

/* The row's summary, by `members` items (a team or the group; see the posted
 * partials above) reading the row's tiles in turn. One round: a valid count
 * and a bad count share one 64-bit post (counts below 2^31, so no carry). */
PSM_LOCAL_FN psm_row_summary psm_summarise_row(__global const ulong *tile_key,
                                               __global const uint *tile_info, long row_tiles,
                                               int tiles, uint member, uint members,
                                               __local ulong *posted_key,
                                               __local ulong *posted_counts)
{
    ulong key = 0, counts = 0;
    for (int t = member; t < tiles; t += members) {
        key = max(key, tile_key[row_tiles + t]);
        uint info = tile_info[row_tiles + t];
        counts += (info & PSM_TILE_COUNT_MASK) | ((info & PSM_TILE_BAD_FLAG) ? (1ul << 32) : 0ul);
    }
    psm_row_summary summary;
    summary.top_key = psm_posted_max_u64(key, member, members, posted_key);
    ulong before;
    counts = psm_posted_sum_u64(counts, member, members, posted_counts, &before);
    summary.maximum = psm_key_maximum(summary.top_key);
    summary.valid = (uint)counts;
    summary.bad = (counts >> 32) != 0;
    return summary;
}

static int psm_row_status(const psm_row_params *p, const psm_row_summary *summary)
{
    if (!p->valid || summary->bad || summary->valid == 0)
        return PSM_ROW_BAD;
    return psm_is_greedy(p->temperature) ? PSM_ROW_GREEDY : PSM_ROW_SAMPLE;
}

#if PSM_PROGRAM == PSM_PROGRAM_SAMPLING || PSM_PROGRAM == PSM_PROGRAM_PROCESSING
/* ---- kernel 1: per-tile reduction ----------------------------------------- */

/* One team per tile (psm_team_unit: row * tiles + tile): the tile pass of
 * kernels/psm_stage_tile.h, two barriers per group. The filter kernels
 * remake the tile masses of rows with top-p or min-p; a row with top-k
 * alone keeps the masses made here when k turns out to keep every valid
 * token. tile_ref gets m_t (the later kernels' reference for T_t and the
 * draw). psm_row_top_k and psm_row_filter find top-k's candidates from
 * lane_max (psm_lane_collect). The sampling program's psm_tile_reduce reads
 * the rows as given; the processing program's psm_tile_reduce_on_read
 * applies each row's processing as it reads them. */
static void psm_tile_reduce_with(PSM_REQUEST_PARAMS, __global ulong *tile_key,
                                 __global uint *tile_info, __global float *tile_ref,
                                 __global ulong *tile_mass, __global uint *lane_max,
                                 const int on_read, PSM_READ_PROCESSING_PARAMS,
                                 const psm_tile_posts posts)
{
    const psm_team_tile where = psm_locate_tile(request.rows, request.vocab, request.tiles);

    const psm_tile_call call = {
        .logits = logits,
        .row_stride = request.row_stride,
        .vocab = request.vocab,
        .dtype = request.dtype,
        .aligned = (((uintptr_t)logits |
                     (uintptr_t)(request.row_stride * psm_element_bytes(request.dtype))) &
                    15) == 0,
        .weight_bits = psm_weight_bits(request.vocab),
        .mass_rule = PSM_TILE_MASS_UNLESS_FILTER_CERTAIN};
    const psm_tile_outputs out = {.tile_key = tile_key,
                                  .tile_info = tile_info,
                                  .tile_mass = tile_mass,
                                  .lane_max = lane_max,
                                  .tile_reference = tile_ref};
    psm_stage_tile(psm_team_of_item(), call, PSM_RESOLVE_ROW(where.row),
                   on_read ? PSM_READ_PROCESSING_OF(where.row) : psm_no_read_processing(),
                   where.slot, where.first, where.in_range, posts, out);
}

/* The group-shared posts of psm_tile_reduce_with, declared by a kernel. */
#define PSM_TILE_REDUCE_POSTS                                                                \
    __local float posted_maximum[PSM_WG];                                                    \
    __local uint posted_nan[PSM_WG];                                                         \
    __local uint posted_count[PSM_WG];                                                       \
    __local uint posted_first[PSM_WG];                                                       \
    __local ulong posted_mass[PSM_WG];                                                       \
    const psm_tile_posts posts = {.maximum = posted_maximum,                                 \
                                  .nan = posted_nan,                                         \
                                  .count = posted_count,                                     \
                                  .first = posted_first,                                     \
                                  .mass = posted_mass}
#endif /* PSM_PROGRAM_SAMPLING || PSM_PROGRAM_PROCESSING */

#if PSM_PROGRAM == PSM_PROGRAM_SAMPLING
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_tile_reduce(PSM_REQUEST_PARAMS, __global ulong *tile_key, __global uint *tile_info,
                __global float *tile_ref, __global ulong *tile_mass, __global uint *lane_max)
{
    PSM_TILE_REDUCE_POSTS;
    psm_tile_reduce_with(PSM_REQUEST_ARGS, tile_key, tile_info, tile_ref, tile_mass, lane_max, 0,
                         (__global const uint *)0, 0, (__global const uint *)0,
                         (__global const float *)0, posts);
}
#endif /* PSM_PROGRAM_SAMPLING */

/* ---- kernel 2: filter cutoffs per row ------------------------------------- */

/* Where psm_row_filter's searches read the candidates' rank keys: the row
 * itself (from its on-chip copy when it fits in local memory, else from
 * global memory), or the list of keys psm_radix_collect gathered. This is
 * the reader of kernels/psm_stage_select.h. */
#define PSM_SOURCE_GLOBAL 0
#define PSM_SOURCE_CACHE 1
#define PSM_SOURCE_LIST 2

struct psm_reader {
    __global const uchar *logits;
    __local const float *cache;  /* the row's candidate values (PSM_SOURCE_CACHE) */
    __local const ulong *list;   /* candidate keys (PSM_SOURCE_LIST) */
    long base;
    int dtype;
    int kind;
    int count;                   /* the row's tokens, or the list's keys */
    int survivors_only;          /* psm_survivors_of's reader: a token that fails */
    psm_kept_rule survivors;     /* this test reads as no candidate */
};

PSM_LOCAL_FN long psm_reader_count(const psm_reader *reader)
{
    return reader->count;
}

/* Entry i's rank key, 0 when it is no candidate (not a valid token); *x
 * gets its value. */
PSM_LOCAL_FN ulong psm_reader_key(const psm_reader *reader, long i, float *x)
{
    if (reader->kind == PSM_SOURCE_LIST) {
        const ulong key = reader->list[i];
        *x = psm_rank_key_logit(key);
        return key;
    }
    *x = reader->kind == PSM_SOURCE_CACHE
             ? reader->cache[i]
             : psm_load_candidate(reader->logits, reader->dtype, reader->base + i);
    if (!psm_is_valid(*x) ||
        (reader->survivors_only && !psm_token_kept(reader->survivors, *x, (uint)i)))
        return 0;
    return psm_rank_key(*x, (uint)i);
}

/* The reader of the same tokens that pass `test`, or with active 0 of none
 * (kernels/psm_portable.h). */
PSM_LOCAL_FN psm_reader psm_survivors_of(const psm_reader *row, psm_kept_rule test, int active)
{
    psm_reader survivors = *row;
    survivors.count = active ? row->count : 0;
    survivors.survivors_only = 1;
    survivors.survivors = test;
    return survivors;
}

/* A cutoff of psm_radix_select over this reader as a cutoff over the row.
 * Over the row or its copy it is one already. A list leaves out some of the
 * row's tokens (those below the bin or bucket it gathered; psm_radix_collect
 * leaves out those of weight 0 too), which may lie between the cutoff (a
 * bucket's start) and the smallest selected key: over a list the cutoff is
 * that key. Every item
 * calls it, whatever the reader (the group operation holds barriers, which
 * PoCL compiles slowly inside a branch). */
PSM_LOCAL_FN ulong psm_cutoff_over_row(psm_team team, const psm_reader *reader, ulong cutoff,
                                       __local psm_group_scratch *group)
{
    const int listed = reader->kind == PSM_SOURCE_LIST ? reader->count : 0;
    ulong lowest = ~0ul;
    for (int i = get_local_id(0); i < listed; i += PSM_WG) {
        const ulong key = reader->list[i];
        if (key >= cutoff && key < lowest)
            lowest = key;
    }
    const ulong lowest_selected = ~psm_group_max_u64(team, ~lowest, group);
    return listed > 0 ? lowest_selected : cutoff;
}

/* ---- the global path's candidate list ------------------------------------
 * A row too long for local memory is not read once per radix level. Each
 * level over global memory also counts its bucket's tokens; as soon as the
 * tokens the remaining search needs fit in local memory, one more pass
 * appends their rank keys there (in any order: a key holds its value and its
 * token) and the rest of the search (psm_radix_select), top-p after top-k
 * included, runs on that list. The keys found are those of the definitions;
 * only where the search looks changes. */

/* Radix descent over global memory with the escape to a list. Counting mode
 * (top-k, want = k) collects every candidate at or above the chosen bucket;
 * mass mode (top-p) collects the chosen bucket's candidates of nonzero
 * weight, and with want = 0 takes its target from the first level's total
 * (the mass of every candidate, as top-p alone needs). Returns the list's
 * length, or -1 when even the last level's bucket does not fit (or !active);
 * *above_out gets the mass above the collected bucket (mass mode) and
 * *want_out the target, when a list is made.
 *
 * Every item calls it (active or not) and passes every barrier; the steps
 * are guarded by flags, never skipped by continue or return: PoCL's
 * compiler replicates the code after each barrier-holding branch, so early
 * exits multiply the code it compiles (docs/ARCHITECTURE.md, "PoCL"). */
PSM_LOCAL_FN int psm_radix_collect(int active, __global const uchar *logits, int dtype, long base,
                                   int vocab, int mass_mode, ulong want, float top_p,
                                   float maximum, float scale, int bits, __local ulong *list,
                                   uint capacity, __local ulong *bucket_mass,
                                   __local uint *bucket_count,
                                   __local uint *shared_choice, __local ulong *shared_above,
                                   __local ulong *shared_want, __local uint *shared_size,
                                   ulong *above_out, ulong *want_out)
{
    const uint lid = get_local_id(0);
    uint prefix = 0, prefix_mask = 0;
    ulong above = 0, target = want;
    int found = 0, size = -1;
    for (int shift = 24; shift >= 0; shift -= 8) {
        const int searching = active && !found;
        if (searching)
            for (int b = lid; b < PSM_RADIX_BUCKETS; b += PSM_WG) {
                bucket_mass[b] = 0;
                bucket_count[b] = 0;
            }
        barrier(CLK_LOCAL_MEM_FENCE);
        const int count = searching ? vocab : 0;
        for (int i = lid; i < count; i += PSM_WG) {
            float x = psm_load_candidate(logits, dtype, base + i);
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
                psm_local_add_u64(&bucket_mass[digit], g);
            }
            atomic_inc(&bucket_count[digit]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (searching && lid == 0) {
            /* above and target are lid 0's own across the levels. */
            if (shift == 24 && mass_mode && want == 0) {
                ulong total = 0;
                for (int digit = 0; digit < PSM_RADIX_BUCKETS; ++digit)
                    total += bucket_mass[digit];
                /* A target of 0 keeps one token, as a target of 1 does. */
                target = max(psm_top_p_target(total, top_p), (ulong)1);
            }
            uint chosen = 0;
            for (int digit = PSM_RADIX_BUCKETS - 1; digit >= 0; --digit) {
                ulong amount = mass_mode ? bucket_mass[digit] : bucket_count[digit];
                if (above + amount >= target) {
                    chosen = (uint)digit;
                    break;
                }
                above += amount;
            }
            /* Counting mode keeps the candidates above the bucket too. */
            ulong kept = (mass_mode ? 0 : above) + bucket_count[chosen];
            *shared_choice = chosen;
            *shared_above = above;
            *shared_want = target;
            *shared_size = kept <= capacity ? 0u : 0xffffffffu;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        int fits = 0;
        if (searching) {
            prefix |= *shared_choice << shift;
            prefix_mask |= 0xffu << shift;
            fits = *shared_size == 0;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        const int collect_count = fits ? vocab : 0;
        for (int i = lid; i < collect_count; i += PSM_WG) {
            float x = psm_load_candidate(logits, dtype, base + i);
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
        if (fits) {
            size = (int)*shared_size;
            *above_out = *shared_above;
            *want_out = *shared_want;
            found = 1;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    return size;
}

/* ---- gap bins: the global path's first look --------------------------------
 * A valid token's bin is its scaled gap to M in 1/16 of a log2 unit (gaps
 * of 64 and more share the last bin): a non-decreasing function of the gap,
 * itself a non-increasing function of the logit, so the bins cut the rank
 * order into consecutive runs. The first radix level (sign and top exponent
 * bits) puts nearly all of a row into a handful of buckets, whose local
 * atomics then collide on every step; the bins spread the row thinly, and
 * the bin that holds the cutoff is usually small enough to collect at once:
 * one pass to tally, one to collect. Each token's part in both passes is
 * psm_stage_bins.h's (psm_bins_tally, psm_bins_gather), as in the CUDA
 * backend's psm_gpu_select_cutoff. The bins live where the list will go. */
/* A count and a two-word mass per bin, in 32-bit words. */
#define PSM_GAP_BIN_WORDS (3 * PSM_GAP_BINS)

/* psm_radix_collect's list and results from the gap bins
 * (psm_stage_bins.h): counting mode collects every candidate of the bins up
 * to the one where the k-th lies, mass mode that bin's candidates. Returns
 * -1 when they do not fit (the caller then runs psm_radix_collect) or
 * !active. The list must hold at least PSM_GAP_BIN_WORDS / 2 keys. Every
 * item calls it and passes every barrier (see psm_radix_collect). */
PSM_LOCAL_FN int psm_bin_collect(int active, __global const uchar *logits, int dtype, long base,
                                 int vocab, int mass_mode, ulong want, float top_p,
                                 float maximum, float scale, int bits, __local ulong *list,
                                 uint capacity, __local ulong *posts,
                                 __local uint *shared_choice, __local ulong *shared_above,
                                 __local ulong *shared_want, __local uint *shared_size,
                                 ulong *above_out, ulong *want_out, int weigh_tiles,
                                 __global const ulong *tile_key, __global ulong *tile_mass,
                                 int tiles)
{
    const uint lid = get_local_id(0);
    __local uint *bin_count = (__local uint *)list;
    __local ulong *bin_mass = list + PSM_GAP_BINS / 2;
    if (active)
        for (int b = lid; b < PSM_GAP_BIN_WORDS; b += PSM_WG)
            bin_count[b] = 0;
    if (lid == 0)
        *shared_size = 0xffffffffu; /* kept only if no bin reaches want: unreachable */
    barrier(CLK_LOCAL_MEM_FENCE);
    const int count = active ? vocab : 0;
    for (int i = lid; i < count; i += PSM_WG)
        psm_bins_tally(psm_load_candidate(logits, dtype, base + i), maximum, scale, mass_mode,
                       bits, bin_count, bin_mass);
    barrier(CLK_LOCAL_MEM_FENCE);

    /* The bin where the running amount reaches the target: the same choice
     * as psm_stage_bins.h's psm_team_choose_bin, made by the whole group
     * (each item sums a run of PSM_GAP_BINS / PSM_WG bins, the posted sums
     * place the runs, the item whose run reaches the target walks it). Here
     * the shared team search made top-p on NVIDIA's OpenCL 1.6x slower at
     * 2,048 x 151,936 (6.58 against 4.18 ms on an H100, not a bank-conflict
     * effect: rotating each item's reads did not change it), so this search
     * stays OpenCL's until the shared one is as fast. Top-p alone takes its
     * target from the mass of every candidate; a target of 0 keeps one
     * token, as a target of 1 does. Counting mode knows the list's size from
     * the counts (the bins before too); mass mode learns it as it gathers. */
    const int run = PSM_GAP_BINS / PSM_WG;
    const int first_bin = (int)lid * run;
    ulong own = 0;
    if (active)
        for (int b = first_bin; b < first_bin + run; ++b)
            own += mass_mode ? bin_mass[b] : bin_count[b];
    ulong before;
    const ulong total = psm_posted_sum_u64(own, lid, PSM_WG, posts, &before);
    const ulong target = max(mass_mode && want == 0 ? psm_top_p_target(total, top_p) : want,
                             (ulong)1);
    if (active && before < target && target <= before + own) {
        ulong above = before;
        for (int b = first_bin; b < first_bin + run; ++b) {
            ulong amount = mass_mode ? bin_mass[b] : bin_count[b];
            if (above + amount >= target) {
                const ulong size = mass_mode ? 0 : above + bin_count[b];
                *shared_choice = (uint)b;
                *shared_above = above;
                *shared_want = target;
                *shared_size = size <= capacity ? 0u : 0xffffffffu;
                break;
            }
            above += amount;
        }
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const int chosen = (int)*shared_choice;
    int fits = active && *shared_size == 0;
    /* Every item has read the bins and the choice before the list (over the
     * bins) grows. */
    barrier(CLK_LOCAL_MEM_FENCE);
    const int collect_count = fits && !weigh_tiles ? vocab : 0;
    for (int i = lid; i < collect_count; i += PSM_WG)
        psm_bins_gather(psm_load_candidate(logits, dtype, base + i), (uint)i, maximum, scale,
                        mass_mode ? chosen : 0, chosen, shared_size, list, capacity);
    /* Top-p alone without min-p: a team per tile gathers the same list and
     * leaves each tile's partial mass (psm_stage_gather_and_weigh), for
     * psm_group_add_list_masses once the cutoff is known. A barrier after
     * each round: the next round's posts, and the masses' global writes
     * before that function's atomics. */
    const int teams = PSM_WG / PSM_TEAM;
    const int rounds = fits && weigh_tiles ? (tiles + teams - 1) / teams : 0;
    for (int round = 0; round < rounds; ++round) {
        const int tile = round * teams + (int)lid / PSM_TEAM;
        const int here = tile < tiles;
        const ulong key = here ? tile_key[tile] : 0ul;
        const int first = here ? tile * PSM_TILE : 0;
        const ulong mass = psm_stage_gather_and_weigh(
            psm_team_of_item(),
            psm_tile_place_of(logits, dtype, base, first, here ? min(PSM_TILE, vocab - first) : 0),
            key != 0 ? psm_rank_key_logit(key) : -INFINITY, maximum, scale, bits, chosen,
            shared_size, list, capacity, posts);
        if (here && lid % PSM_TEAM == 0)
            tile_mass[tile] = mass;
        barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    const uint size = *shared_size;
    fits = fits && size <= capacity;
    if (fits) {
        *above_out = *shared_above;
        *want_out = *shared_want;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    return fits ? (int)size : -1;
}

/* ---- kernel 2a: top-k from the lane maxima --------------------------------
 * For rows with top-k, psm_tile_reduce keeps each lane's maximum (a lane:
 * the PSM_TEAM_SLOTS tokens one item of a tile's team reads). k lane maxima
 * in the gap bins up to b prove k candidates there, so the k-th candidate of
 * the row lies in a bin up to b; and a candidate is at most its lane's
 * maximum, so every candidate in those bins lies in a lane whose maximum
 * does. The smallest such b comes from the lane maxima alone (1/32 of the
 * row), and the list of every candidate up to it from those lanes alone
 * (about k of them). The list is ranked by counting (keys are unique), the
 * top k walked for top-p, min-p cuts a prefix of the ranks, and the kept
 * tiles' (m_t, S_t) come from the kept keys, all on the list: the same
 * values psm_tile_filter would compute, so neither that kernel nor
 * psm_row_filter reads the row (state filtered = PSM_FILTER_DONE). Rows it
 * cannot finish (no top-k, fewer than k lanes with a candidate, a list too
 * long) get PSM_FILTER_NONE and are psm_row_filter's.
 *
 * The host launches it when some row may have top-k, with a list of
 * list_capacity >= PSM_GAP_BINS / 2 keys (the bin counts live there first),
 * kept small so that several groups fit on a compute unit.
 * Every barrier is unconditional and every step is guarded by flags instead
 * of early returns, for PoCL's compiler (see psm_radix_collect). */

/* Local memory for ranking a list of n keys (psm_rank_list): the keys, a
 * weight per key and a 16-bit rank order, 18 bytes a key. */
#define PSM_RANKED_LIST_FITS(n, capacity) (9 * (long)(n) <= 4 * (long)(capacity))
/* The lanes psm_row_top_k gathers from, at most (about k of them; more, and
 * the list would not fit either). */
#define PSM_TOP_K_LANES 512

#if PSM_PROGRAM == PSM_PROGRAM_SAMPLING
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_row_top_k(PSM_REQUEST_PARAMS, __global const ulong *tile_key, __global const uint *tile_info,
              __global const uint *lane_max, __global float *tile_ref,
              __global ulong *tile_mass, __global psm_row_state *state, __local ulong *list)
{
    __local ulong scratch_u64[PSM_WG];
    __local ulong scratch_counts[PSM_WG];
    __local uint lane_list[PSM_TOP_K_LANES];
    __local uint shared_choice;
    __local uint shared_size;
    __local uint shared_lanes;
    const uint lid = get_local_id(0);
    const uint row = get_group_id(1);
    const long row_tiles = (long)row * request.tiles;
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_row_summary summary =
        psm_summarise_row(tile_key, tile_info, row_tiles, request.tiles, lid, PSM_WG, scratch_u64,
                          scratch_counts);
    const float scale = psm_inverse_temperature_scale(p.temperature);
    const int bits = psm_weight_bits(request.vocab);
    const int mine = psm_row_status(&p, &summary) == PSM_ROW_SAMPLE &&
                     psm_top_k_active(p.top_k, summary.valid) &&
                     request.top_k_list_capacity >= PSM_GAP_BINS / 2;
    const uint k = mine ? (uint)p.top_k : 0u;
    __global const uint *row_lanes = lane_max + row_tiles * PSM_TEAM;
    const int lanes = request.tiles * PSM_TEAM;
    const uint none = 0xffffffffu;

    /* 1. The lane maxima tallied by gap bin (the barrier also ends every
     * read of the summary's posts). */
    __local uint *bin_count = (__local uint *)list;
    if (mine)
        for (int b = lid; b < PSM_GAP_BINS; b += PSM_WG)
            bin_count[b] = 0;
    if (lid == 0) {
        shared_choice = none;
        shared_size = 0;
        shared_lanes = 0;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    if (mine)
        for (int j = lid; j < lanes; j += PSM_WG) {
            const int bin = psm_lane_max_bin(row_lanes[j], summary.maximum, scale);
            if (bin >= 0)
                psm_local_add_u32(&bin_count[bin], 1u);
        }
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 2. The first bin at which the running count reaches k, found by the
     * first team (psm_stage_bins.h). */
    const psm_team team = psm_team_of_item();
    const int lead_team = lid < PSM_TEAM;
    const psm_team_found reached = psm_team_choose_bin(
        team, bin_count, (__local const ulong *)0, 0, k, 0, 1.0f, mine && lead_team, scratch_u64);
    if (reached.found && reached.reports)
        shared_choice = (uint)reached.position;
    /* Every item has read the bins before the list (over them) grows. */
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 3. Every candidate up to that bin, from the lanes whose maximum is in
     * it or before it: first those lanes, then their tokens, a token per
     * item at a time (the loads of a lane spread over the group instead of
     * 32 in a row by one item). */
    const uint last_bin = shared_choice;
    int gathering = mine && last_bin != none;
    if (gathering)
        for (int j = lid; j < lanes; j += PSM_WG) {
            const int bin = psm_lane_max_bin(row_lanes[j], summary.maximum, scale);
            if (bin >= 0 && bin <= (int)last_bin) {
                const uint at = atomic_inc(&shared_lanes);
                if (at < PSM_TOP_K_LANES)
                    lane_list[at] = (uint)j;
            }
        }
    barrier(CLK_LOCAL_MEM_FENCE);
    gathering = gathering && shared_lanes <= PSM_TOP_K_LANES;
    const int gathered_lanes = gathering ? (int)shared_lanes : 0;
    const int vector_shift = psm_vector_shift(request.dtype);
    const long base = PSM_ROW_BASE(p);
    for (int w = lid; w < gathered_lanes * PSM_TEAM_SLOTS; w += PSM_WG) {
        const uint j = lane_list[w / PSM_TEAM_SLOTS];
        const int first = (int)(j / PSM_TEAM) * PSM_TILE;
        const int offset =
            psm_slot_offset(w % PSM_TEAM_SLOTS, (int)(j % PSM_TEAM), PSM_TEAM, vector_shift,
                            PSM_INTERLEAVED);
        if (offset < request.vocab - first)
            psm_bins_gather(psm_load_candidate(logits, request.dtype, base + first + offset),
                            (uint)(first + offset), summary.maximum, scale, 0, (int)last_bin,
                            &shared_size, list, (uint)request.top_k_list_capacity);
    }
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 4. Rank by counting; g_i of each key. (n >= k: each counted lane's
     * maximum is on the list.) */
    const int ranked = gathering && PSM_RANKED_LIST_FITS(shared_size, request.top_k_list_capacity);
    const uint n = ranked ? shared_size : 0u;
    __local ulong *weight = list + n;
    __local ushort *order = (__local ushort *)(list + 2 * n);
    psm_rank_list(list, n, order, weight, summary.maximum, scale, bits);
    barrier(CLK_LOCAL_MEM_FENCE);

    /* 5. Top-p on the top k: the first rank at which their running weight
     * reaches the target (psm_stage_bins.h; every team walks alike). */
    const int walking = ranked && p.top_p < 1.0f;
    const uint walked = psm_team_walk_ranks(team, weight, order, walking ? k : 0u, 0, 0, 1,
                                            p.top_p, scratch_counts);

    /* 6. The kept ranks, then each tile's (m_t, S_t) from them
     * (psm_stage_bins.h), m_t first as a psm_tile_best in tile_ref's word. */
    const uint kept = walking ? walked + 1 : k;
    const ulong cutoff = ranked ? list[order[kept - 1]] : 0;
    const ulong min_weight = psm_min_p_threshold(p.min_p, bits);
    const int tiles = ranked ? request.tiles : 0;
    __global psm_tile_best *tile_best = (__global psm_tile_best *)(tile_ref + row_tiles);
    psm_group_list_masses(list, weight, order, ranked ? kept : 0u, min_weight, scale, bits,
                          tile_best, tile_mass + row_tiles, tiles);
    for (int t = lid; t < tiles; t += PSM_WG)
        tile_ref[row_tiles + t] = tile_best[t] != 0 ? psm_tile_best_logit(&tile_best[t]) : -INFINITY;
    if (lid == 0) {
        state[row].filtered = ranked ? PSM_FILTER_DONE : PSM_FILTER_NONE;
        if (ranked) {
            state[row].maximum = summary.maximum;
            state[row].cutoff = cutoff;
            state[row].min_weight = min_weight;
        }
    }
}

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_row_filter(PSM_REQUEST_PARAMS, __global const ulong *tile_key, __global const uint *tile_info,
               __global psm_row_state *state, __global float *tile_ref,
               __global ulong *tile_mass, __local ulong *local_store)
{
    __local psm_group_scratch group;
    __local ulong scratch_counts[PSM_WG];
    __local psm_radix_scratch radix;
    __local uint shared_choice;
    __local ulong shared_above;
    __local ulong shared_want;
    __local uint shared_size;
    /* The row's values when the row fits (request.use_row_cache), else the list of
     * candidate keys (request.list_capacity entries). */
    __local float *row_cache = (__local float *)local_store;
    const uint lid = get_local_id(0);
    const uint row = get_group_id(1);
    /* Rows psm_row_top_k finished (the same value for every item, and
     * before any barrier). */
    if (request.top_k_ran && state[row].filtered == PSM_FILTER_DONE)
        return;
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_row_summary summary =
        psm_summarise_row(tile_key, tile_info, (long)row * request.tiles, request.tiles, lid,
                          PSM_WG, group.posts, scratch_counts);
    /* Every item has read the summary's posts: group is free again. */
    barrier(CLK_LOCAL_MEM_FENCE);
    const int filtered = psm_row_status(&p, &summary) == PSM_ROW_SAMPLE &&
                         psm_may_filter(p.top_k, p.top_p, p.min_p, summary.valid);
    if (!filtered) {
        if (lid == 0) {
            state[row].filtered = PSM_FILTER_NONE;
            state[row].cutoff = 0;
            state[row].min_weight = 0;
        }
        return;
    }

    psm_reader source;
    source.logits = logits;
    source.cache = row_cache;
    source.list = local_store;
    source.base = PSM_ROW_BASE(p);
    source.dtype = request.dtype;
    source.kind = PSM_SOURCE_GLOBAL;
    source.count = request.vocab;
    source.survivors_only = 0;
    if (request.use_row_cache) {
        for (int i = lid; i < request.vocab; i += PSM_WG)
            row_cache[i] = psm_load_candidate(logits, request.dtype, source.base + i);
        barrier(CLK_LOCAL_MEM_FENCE);
        source.kind = PSM_SOURCE_CACHE;
    }

    const float scale = psm_inverse_temperature_scale(p.temperature);
    const int bits = psm_weight_bits(request.vocab);
    const int top_k_on = psm_top_k_active(p.top_k, summary.valid);
    const int top_p_on = p.top_p < 1.0f;
    ulong cutoff = 0;
    /* Top-p alone on the list: the list is the bucket where the target is
     * reached, and its search wants what is left of the target. */
    ulong list_want = 0;
    /* Top-p alone without min-p on the gap bins' list: the tile masses are
     * made here (psm_bin_collect, psm_group_add_list_masses), and
     * psm_tile_filter skips the row. */
    const long row_tiles = (long)row * request.tiles;
    const int weigh_tiles = top_p_on && !top_k_on && !(p.min_p > 0.0f);
    int weighed = 0;
    /* Inside, both collections are called by every item, active or not (see
     * psm_radix_collect); rows that make no list (min-p alone, the on-chip
     * path) skip their barriers. */
    if (!request.use_row_cache && request.list_capacity > 0 && (top_k_on || top_p_on)) {
        ulong above = 0, target = 0;
        const ulong want = top_k_on ? (ulong)p.top_k : 0;
        const int from_bins = psm_bin_collect(
            request.list_capacity >= PSM_GAP_BIN_WORDS / 2, logits, request.dtype, source.base,
            request.vocab, !top_k_on, want, p.top_p, summary.maximum, scale, bits, local_store,
            (uint)request.list_capacity, group.posts, &shared_choice, &shared_above, &shared_want,
            &shared_size, &above, &target, weigh_tiles, tile_key + row_tiles,
            tile_mass + row_tiles, request.tiles);
        weighed = weigh_tiles && from_bins >= 0;
        const int from_radix = psm_radix_collect(
            from_bins < 0, logits, request.dtype, source.base, request.vocab, !top_k_on, want,
            p.top_p, summary.maximum, scale, bits, local_store, (uint)request.list_capacity,
            radix.bucket_mass, radix.bucket_count, &shared_choice, &shared_above, &shared_want,
            &shared_size, &above, &target);
        const int size = from_bins >= 0 ? from_bins : from_radix;
        if (size >= 0) {
            source.kind = PSM_SOURCE_LIST;
            source.count = size;
            list_want = target - above;
        }
    }
    /* With top-k, every candidate at or above the k-th is on a list. Top-p
     * takes its target from the mass of its candidates (need 0), except on
     * top-p alone's list, which holds only the bin or bucket that reaches it. */
    const psm_team team = psm_team_of_item();
    if (top_k_on)
        cutoff = psm_cutoff_over_row(
            team, &source,
            psm_radix_select(team, &source, 0, 0, (ulong)p.top_k, 1.0f, summary.maximum, scale,
                             bits, &radix, &group),
            &group);
    if (top_p_on)
        cutoff = psm_cutoff_over_row(
            team, &source,
            psm_radix_select(team, &source, cutoff, 1,
                             source.kind == PSM_SOURCE_LIST && !top_k_on ? list_want : 0,
                             p.top_p, summary.maximum, scale, bits, &radix, &group),
            &group);
    /* Unconditional (its barrier), with nothing to add for other rows. */
    psm_group_add_list_masses(local_store, weighed ? (uint)source.count : 0u, cutoff, scale,
                              bits, tile_key + row_tiles, tile_mass + row_tiles);
    for (int t = lid; t < (weighed ? request.tiles : 0); t += PSM_WG)
        tile_ref[row_tiles + t] = tile_mass[row_tiles + t] != 0
                                      ? psm_rank_key_logit(tile_key[row_tiles + t])
                                      : -INFINITY;
    if (lid == 0) {
        state[row].maximum = summary.maximum;
        state[row].filtered = weighed ? PSM_FILTER_DONE : PSM_FILTER_SCAN;
        state[row].cutoff = cutoff;
        state[row].min_weight = psm_min_p_threshold(p.min_p, bits);
    }
}
#endif /* PSM_PROGRAM_SAMPLING */

#if PSM_PROGRAM == PSM_PROGRAM_ORDERS
/* ---- kernel 2b: an engine's filter order ---------------------------------- */

/* A group per row, instead of psm_row_top_k and psm_row_filter when the
 * call's filter order is an engine's (psm_params.filter_order): the cutoff
 * key and min-p weight of psm_stage_orders (kernels/psm_stage_orders.h,
 * shared with CUDA and HIP), searched over the row in global memory, for
 * psm_tile_filter. A kernel of its own, so that the row filter's code and
 * its compile time stay as they were. A row that does not filter passes
 * the barriers with every filter off, reading nothing. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_row_orders(PSM_REQUEST_PARAMS, __global const ulong *tile_key, __global const uint *tile_info,
               __global psm_row_state *state)
{
    __local psm_group_scratch group;
    __local ulong scratch_counts[PSM_WG];
    __local psm_radix_scratch radix;
    const uint row = get_group_id(1);
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_row_summary summary =
        psm_summarise_row(tile_key, tile_info, (long)row * request.tiles, request.tiles,
                          get_local_id(0), PSM_WG, group.posts, scratch_counts);
    /* Every item has read the summary's posts: group is free again. */
    barrier(CLK_LOCAL_MEM_FENCE);
    const int filtered = psm_row_status(&p, &summary) == PSM_ROW_SAMPLE &&
                         psm_may_filter(p.top_k, p.top_p, p.min_p, summary.valid);

    psm_reader source;
    source.logits = logits;
    source.cache = 0;
    source.list = 0;
    source.base = PSM_ROW_BASE(p);
    source.dtype = request.dtype;
    source.kind = PSM_SOURCE_GLOBAL;
    source.count = filtered ? request.vocab : 0;
    source.survivors_only = 0;
    const psm_order_row filters = {.row_max = summary.maximum,
                                   .scale = psm_inverse_temperature_scale(p.temperature),
                                   .weight_bits = psm_weight_bits(request.vocab),
                                   .valid = summary.valid,
                                   .top_k = filtered ? p.top_k : 0,
                                   .top_p = filtered ? p.top_p : 1.0f,
                                   .min_p = filtered ? p.min_p : 0.0f};
    const psm_kept_rule test = psm_order_candidates(request.filter_order, filters);
    const psm_reader candidates = psm_survivors_of(&source, test, 1);
    const psm_reader no_candidates = psm_survivors_of(&source, test, 0);
    const psm_kept_rule kept =
        psm_stage_orders(psm_team_of_item(), &source, &candidates, &no_candidates,
                         request.filter_order, filters, &radix, &group);
    if (get_local_id(0) == 0) {
        state[row].maximum = summary.maximum;
        state[row].filtered = filtered ? PSM_FILTER_SCAN : PSM_FILTER_NONE;
        state[row].cutoff = kept.cutoff;
        state[row].min_weight = kept.min_weight;
    }
}
#endif /* PSM_PROGRAM_ORDERS */

#if PSM_PROGRAM == PSM_PROGRAM_SAMPLING
/* ---- kernel 3: tile masses over the kept tokens --------------------------- */

/* One team per tile of the rows psm_row_filter (or psm_row_orders)
 * filtered: (m_t, S_t) over the kept tokens, the stage of
 * kernels/psm_stage_draw.h; two barriers per group. A tile that keeps
 * nothing gets m_t -inf and S_t 0. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_tile_filter(PSM_REQUEST_PARAMS, __global const ulong *tile_key,
                __global const psm_row_state *state, __global float *tile_ref,
                __global ulong *tile_mass)
{
    __local float posted_max[PSM_WG];
    __local ulong posted_mass[PSM_WG];
    const psm_team team = psm_team_of_item();
    const psm_team_tile where = psm_locate_tile(request.rows, request.vocab, request.tiles);
    /* Teams past the last tile or in unfiltered rows read nothing (key 0)
     * and only pass the barriers. */
    const int active = where.in_range && state[where.row].filtered == PSM_FILTER_SCAN;
    const psm_row_params p = PSM_RESOLVE_ROW(where.row);
    const psm_kept_posts posts = {.maximum = posted_max, .mass = posted_mass};
    const psm_kept_tile kept = psm_stage_kept_masses(
        team, psm_tile_place_of(logits, request.dtype, PSM_ROW_BASE(p), where.first, where.count),
        psm_row_kept_rule(&state[where.row], &p, request.vocab),
        active ? tile_key[where.slot] : 0ul, posts);
    if (active && team.lane == 0) {
        tile_ref[where.slot] = kept.maximum;
        tile_mass[where.slot] = kept.mass;
    }
}

/* ---- kernel 4: per-row combination ---------------------------------------- */

/* One team per row: status, M, T_t, the inclusive prefix of T_t over tiles
 * and the row total; three barriers per group. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_row_combine(PSM_REQUEST_PARAMS, __global const ulong *tile_key,
                __global const uint *tile_info, __global const float *tile_ref,
                __global const ulong *tile_mass, __global ulong *tile_prefix,
                __global psm_row_state *state, __global int *first_bad_row)
{
    __local ulong posted_key[PSM_WG];
    __local ulong posted_counts[PSM_WG];
    __local ulong posted_mass[PSM_WG];
    const uint lane = get_local_id(0) % PSM_TEAM;
    const long unit = psm_team_unit();
    const int active = unit < request.rows;
    const uint row = active ? (uint)unit : 0u;
    const long row_tiles = (long)row * request.tiles;
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_row_summary summary =
        psm_summarise_row(tile_key, tile_info, row_tiles, active ? request.tiles : 0, lane,
                          PSM_TEAM, posted_key, posted_counts);
    const int status = psm_row_status(&p, &summary);
    if (active && lane == 0) {
        state[row].status = status;
        state[row].maximum = summary.maximum;
        state[row].greedy_token = psm_rank_key_token(summary.top_key);
        if (!request.filters_ran) {
            state[row].filtered = PSM_FILTER_NONE;
            state[row].cutoff = 0;
            state[row].min_weight = 0;
        }
        if (status == PSM_ROW_BAD && request.check_rows)
            atomic_min(first_bad_row, (int)row);
    }
    /* Each item owns a contiguous run of tiles, so item order is tile order:
     * T_t goes to tile_prefix first, then the item's exclusive prefix is
     * added along its run. */
    const int sampled = active && status == PSM_ROW_SAMPLE;
    const int run = (request.tiles + PSM_TEAM - 1) / PSM_TEAM;
    const int begin = min((int)lane * run, request.tiles);
    const int end = min(begin + run, request.tiles);
    const float scale = psm_inverse_temperature_scale(p.temperature);
    ulong own = 0;
    if (sampled) {
        for (int t = begin; t < end; ++t) {
            ulong rescaled = psm_rescale_mass(
                tile_mass[row_tiles + t],
                psm_scaled_gap(summary.maximum, tile_ref[row_tiles + t], scale));
            tile_prefix[row_tiles + t] = rescaled;
            own += rescaled;
        }
    }
    ulong running;
    const ulong total = psm_posted_sum_u64(own, lane, PSM_TEAM, posted_mass, &running);
    if (sampled) {
        for (int t = begin; t < end; ++t) {
            running += tile_prefix[row_tiles + t];
            tile_prefix[row_tiles + t] = running;
        }
        if (lane == 0)
            state[row].total = total;
    }
}

#endif /* PSM_PROGRAM_SAMPLING */

#if PSM_PROGRAM == PSM_PROGRAM_SAMPLING || PSM_PROGRAM == PSM_PROGRAM_PROCESSING
/* ---- kernel 5: the draw --------------------------------------------------- */

/* One team per (sample, row) pair, numbered row * num_samples + sample (the
 * output's place): the tile by binary search of the prefix (each item
 * alike), then the token by the stage of kernels/psm_stage_draw.h; two
 * barriers per group. psm_draw reads the rows as given, psm_draw_on_read
 * applies their processing as psm_tile_reduce_on_read did. */
static void psm_draw_with(PSM_REQUEST_PARAMS, __global const float *tile_ref,
                          __global const ulong *tile_mass, __global const ulong *tile_prefix,
                          __global const psm_row_state *state, __global int *tokens,
                          __global float *logprobs, const int on_read, PSM_READ_PROCESSING_PARAMS,
                          const psm_draw_posts posts)
{
    const psm_team team = psm_team_of_item();
    const long out = psm_team_unit();
    const int active = out < (long)request.rows * request.num_samples;
    const uint row = active ? (uint)(out / request.num_samples) : 0u;
    const uint sample = (uint)(out - (long)row * request.num_samples);
    const int status = state[row].status;
    if (active && status != PSM_ROW_SAMPLE && team.lane == 0) {
        tokens[out] = status == PSM_ROW_GREEDY ? (int)state[row].greedy_token : -1;
        if (request.want_logprobs)
            logprobs[out] = status == PSM_ROW_GREEDY ? 0.0f : NAN;
    }
    const int drawing = active && status == PSM_ROW_SAMPLE;
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const long row_tiles = (long)row * request.tiles;
    const ulong total = state[row].total;
    const psm_draw_bits bits = psm_sample_bits(p.seed, p.offset, p.stream, sample);
    const int tile =
        drawing ? psm_draw_tile(team, tile_prefix + row_tiles, request.tiles, bits.tile, total) : 0;
    const int first = tile * PSM_TILE;
    psm_tile_place place = psm_tile_place_of(logits, request.dtype, PSM_ROW_BASE(p), first,
                                             min(PSM_TILE, request.vocab - first));
    if (on_read)
        place.processing = PSM_READ_PROCESSING_OF(row);
    const psm_drawn drawn = psm_stage_draw(
        team, place, psm_row_kept_rule(&state[row], &p, request.vocab),
        psm_row_tile_share(tile_ref, tile_mass, tile_prefix, row_tiles, tile, total), bits.token,
        drawing, request.want_logprobs, posts);
    if (drawn.writes) {
        tokens[out] = drawn.token;
        if (request.want_logprobs)
            logprobs[out] = drawn.log_probability;
    }
}

/* The group-shared posts of psm_draw_with, declared by a kernel. */
#define PSM_DRAW_POSTS                                                                       \
    __local ulong posted_run[PSM_WG];                                                        \
    __local ulong posted_part[PSM_WG];                                                       \
    const psm_draw_posts posts = {.run = posted_run, .part = posted_part}
#endif /* PSM_PROGRAM_SAMPLING || PSM_PROGRAM_PROCESSING */

#if PSM_PROGRAM == PSM_PROGRAM_SAMPLING
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_draw(PSM_REQUEST_PARAMS, __global const float *tile_ref, __global const ulong *tile_mass,
         __global const ulong *tile_prefix, __global const psm_row_state *state,
         __global int *tokens, __global float *logprobs)
{
    PSM_DRAW_POSTS;
    psm_draw_with(PSM_REQUEST_ARGS, tile_ref, tile_mass, tile_prefix, state, tokens, logprobs, 0,
                  (__global const uint *)0, 0, (__global const uint *)0,
                  (__global const float *)0, posts);
}

/* ---- kernel 6: the final distribution ------------------------------------- */

/* One team per tile: the stage of kernels/psm_stage_draw.h for sampled rows,
 * a point mass or NaN for the others. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_probs(PSM_REQUEST_PARAMS, __global const float *tile_ref, __global const ulong *tile_mass,
          __global const ulong *tile_prefix, __global const psm_row_state *state,
          __global float *probs)
{
    const psm_team team = psm_team_of_item();
    const psm_team_tile where = psm_locate_tile(request.rows, request.vocab, request.tiles);
    if (!where.in_range)
        return; /* no barrier below */
    const uint row = where.row;
    __global float *out = probs + (long)row * request.probs_stride + where.first;
    const int status = state[row].status;
    if (status != PSM_ROW_SAMPLE) {
        const uint greedy = state[row].greedy_token;
        for (int offset = team.lane; offset < where.count; offset += PSM_TEAM)
            out[offset] = status == PSM_ROW_BAD                                ? NAN
                          : (uint)(where.first + offset) == greedy ? 1.0f
                                                                   : 0.0f;
        return;
    }
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    psm_stage_probs(
        team, psm_tile_place_of(logits, request.dtype, PSM_ROW_BASE(p), where.first, where.count),
        psm_row_kept_rule(&state[row], &p, request.vocab),
        psm_row_tile_share(tile_ref, tile_mass, tile_prefix, (long)row * request.tiles, where.tile,
                           state[row].total),
        out);
}
#endif /* PSM_PROGRAM_SAMPLING */

#if PSM_PROGRAM == PSM_PROGRAM_TOP_LOGPROBS
/* ---- kernel 7: top-N logprobs ---------------------------------------------- */

/* Row `row` as the top-N stage reads it (psm_top_logprobs and psm_top_ranks
 * alike). raw_request and raw_logits are the call before logit processing
 * (the same as request and logits without it): the raw mode reads the
 * logits as given. */
#define PSM_TOP_ROW_OF(row, p, raw_mode)                                                      \
    psm_top_row_of(row, &(p), raw_mode, request, logits, raw_request, raw_logits, state,      \
                   psm_make_row_arrays(temperature_per_row, top_k_per_row, top_p_per_row,       \
                                       min_p_per_row, seed_per_row, offset_per_row,             \
                                       subsequence_per_row, row_indices, seed_pointer,          \
                                       offset_pointer))
static psm_top_row psm_top_row_of(uint row, const psm_row_params *p, int raw_mode,
                                  const psm_opencl_request request, __global const uchar *logits,
                                  const psm_opencl_request raw_request,
                                  __global const uchar *raw_logits,
                                  __global const psm_row_state *state, const psm_row_arrays arrays)
{
    psm_top_row top;
    top.vocab = request.vocab;
    top.tiles = request.tiles;
    if (raw_mode) {
        const psm_row_params source =
            psm_resolve_row(row, raw_request.per_row, raw_request.scalars, arrays);
        top.dtype = raw_request.dtype;
        top.logits = raw_logits + (long)source.logits_row * raw_request.row_stride *
                                      psm_element_bytes(raw_request.dtype);
        top.rule = psm_make_kept_rule(0, 0, 0.0f, psm_inverse_temperature_scale(1.0f),
                                      psm_weight_bits(request.vocab));
    } else {
        top.dtype = request.dtype;
        top.logits = logits + PSM_ROW_BASE(*p) * psm_element_bytes(request.dtype);
        top.rule = psm_row_kept_rule(&state[row], p, request.vocab);
    }
    return top;
}

/* Does row `row` have a list (psm_top_write_point writes the others: bad
 * rows and, in the processed mode, greedy ones)? */
static int psm_top_row_listed(__global const psm_row_state *state, uint row, int raw_mode)
{
    const int status = state[row].status;
    return !(status == PSM_ROW_BAD || (status == PSM_ROW_GREEDY && !raw_mode));
}

/* The outputs of row `row`. */
static psm_top_outputs psm_top_outputs_of(uint row, int count, int samples,
                                          __global const int *tokens, __global int *top_tokens,
                                          __global float *top_logprobs, __global int *top_ranks)
{
    psm_top_outputs out;
    out.tokens = top_tokens + (long)row * count;
    out.logprobs = top_logprobs + (long)row * count;
    out.ranks = top_ranks ? top_ranks + (long)row * samples : 0;
    out.drawn = tokens + (long)row * samples;
    out.samples = samples;
    return out;
}

/* A group per row, after psm_draw (psm_sample with top_logprobs only): the
 * stage of kernels/psm_stage_top_logprobs.h, with the ranks begun (when
 * top_ranks is set: psm_top_ranks finishes them). top_key: per tile of
 * each row, the stage's tile keys: in the processed mode the kept tiles'
 * m_t as a key with the tile's first token (an upper bound of the tile's
 * best kept key with its logit), in the raw mode psm_top_raw_scan's. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_top_logprobs(PSM_REQUEST_PARAMS, const psm_opencl_request raw_request,
                 __global const uchar *raw_logits, __global const float *tile_ref,
                 __global const ulong *tile_mass, __global const ulong *tile_prefix,
                 __global const psm_row_state *state, __global const int *tokens,
                 __global ulong *top_key, const int count, const int raw_mode,
                 __global int *top_tokens, __global float *top_logprobs, __global int *top_ranks)
{
    __local psm_top_scratch scratch;
    const psm_team team = psm_team_of_item();
    const uint row = get_group_id(1);
    const long row_tiles = (long)row * request.tiles;
    const psm_top_outputs out = psm_top_outputs_of(row, count, request.num_samples, tokens,
                                                   top_tokens, top_logprobs, top_ranks);
    if (!psm_top_row_listed(state, row, raw_mode)) {
        psm_top_write_point(
            count, state[row].status == PSM_ROW_BAD ? -1 : (int)state[row].greedy_token, out);
        return; /* the same for the whole group, before any barrier */
    }
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    __global ulong *row_key = top_key + row_tiles;
    psm_top_row top = PSM_TOP_ROW_OF(row, p, raw_mode);
    top.count = count;
    if (!raw_mode)
        for (int tile = get_local_id(0); tile < request.tiles; tile += PSM_WG) {
            const float reference = tile_ref[row_tiles + tile];
            row_key[tile] = tile_mass[row_tiles + tile] != 0 &&
                                    psm_logit_class(reference) == PSM_LOGIT_VALID
                                ? psm_rank_key(reference, (uint)(tile * PSM_TILE))
                                : 0;
        }
    psm_group_barrier_global(); /* row_key's writes, for every item */
    psm_top_masses masses;
    masses.tile_mass = tile_mass + row_tiles;
    masses.tile_prefix = tile_prefix + row_tiles;
    masses.total = state[row].total;
    psm_stage_top_logprobs(team, top, raw_mode, row_key, masses, &scratch, out);
}

/* After psm_top_logprobs, with sampled ranks: a group per PSM_RANK_TILES
 * tiles of a row (groups x parts, rows), adding the candidates above each
 * drawn token there (psm_top_count_ranks) over the tile keys
 * psm_top_logprobs left in top_key. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_top_ranks(PSM_REQUEST_PARAMS, const psm_opencl_request raw_request,
              __global const uchar *raw_logits, __global const psm_row_state *state,
              __global const int *tokens, __global const ulong *top_key, const int raw_mode,
              __global int *top_ranks)
{
    __local psm_group_scratch group;
    const psm_team team = psm_team_of_item();
    const uint row = get_group_id(1);
    if (!psm_top_row_listed(state, row, raw_mode))
        return; /* the same for the whole group, before any barrier */
    const psm_top_outputs out =
        psm_top_outputs_of(row, 0, request.num_samples, tokens, 0, 0, top_ranks);
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const psm_top_row top = PSM_TOP_ROW_OF(row, p, raw_mode);
    const int first = (int)get_group_id(0) * PSM_RANK_TILES;
    const int end = min(first + PSM_RANK_TILES, request.tiles);
    psm_top_count_ranks(team, &top, first, end, top_key + (long)row * request.tiles, out, &group);
}
#endif /* PSM_PROGRAM_TOP_LOGPROBS */

#if PSM_PROGRAM == PSM_PROGRAM_PROCESSING
/* ---- logit processing (docs/SAMPLING.md section 1) ---------------------------
 * Before the pipeline, when the call has psm_params.processing: the rules
 * are core/psm_processing.h's, the code the CPU, CUDA and HIP backends run;
 * these kernels only spread them over the device.
 *   psm_process_read   an item per PSM_PROCESS_SPAN tokens of an output
 *                      row (a group's items take them in turn, so that
 *                      the loads stay consecutive): each logit
 *                      read, masked and read again (step 3 made early:
 *                      kernels/psm_stage_lists.h says why that is exact)
 *                      into `processed` (rows x vocab f32); a row whose
 *                      parameters or row index are out of range is written
 *                      as NaN, so the pipeline finds it bad and its logits
 *                      are never read;
 *   psm_process_lists  a group per row, kernels/psm_stage_lists.h: the
 *                      listed tokens read again from the row as given, its
 *                      penalties over the group, its bias in list order (the
 *                      order is part of the rule), then step 3 for them;
 *                      lists out of range make the row bad the same way.
 *                      Calls without lists skip it.
 * The pipeline then samples `processed` as f32 logits, one row per output
 * row (the host rewrites the description accordingly). Where the call's
 * processing is applied as its rows are read (opencl_processing_on_read),
 * psm_process_read does not run, psm_process_lists writes its listed
 * tokens' values into `processed` as an overlay and sets their bits in
 * `listed`, and the on-read kernels below take the tile pass and the draw. */

/* The processing arrays (psm_processing_arrays; NULL where absent) and the
 * scalars: present holds the PSM_LISTS_* bits of those given. */
#define PSM_PROCESSING_PARAMS                                                               \
    const uint present, const float repetition, const float frequency, const float presence, \
        __global const long *history_offsets, __global const int *history_tokens,           \
        __global const long *prompt_offsets, __global const int *prompt_tokens,             \
        __global const long *bias_offsets, __global const int *bias_tokens,                 \
        __global const float *bias_values, __global const float *repetition_per_row,        \
        __global const float *frequency_per_row, __global const float *presence_per_row

/* The output row of an item of the processing kernels. */
#define PSM_PROCESS_ROW ((long)get_global_id(1))

/* allowed_mask: NULL when every token is allowed; mask_words per row. The
 * row's parameters are resolved once per item, for its PSM_PROCESS_SPAN
 * tokens (opencl_launch.c sizes the launch by it): per token they made
 * the CUDA backend's same step compute-bound. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_process_read(PSM_REQUEST_PARAMS, __global const uint *allowed_mask, const long mask_words,
                 __global float *processed)
{
    const long row = PSM_PROCESS_ROW;
    const long first = (long)get_group_id(0) * PSM_WG * PSM_PROCESS_SPAN + get_local_id(0);
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    const long base = PSM_ROW_BASE(p);
    __global float *out = processed + row * request.vocab;
    __global const uint *row_mask = allowed_mask ? allowed_mask + row * mask_words : 0;
    for (int k = 0; k < PSM_PROCESS_SPAN; ++k) {
        const long token = first + (long)k * PSM_WG;
        if (token >= request.vocab)
            break;
        if (!p.valid) {
            out[token] = NAN;
            continue;
        }
        const float x = psm_read_logit(psm_raw_logit(logits, request.dtype, base + token));
        out[token] = psm_processed_logit(x, row_mask ? psm_token_allowed(row_mask, token) : 1);
    }
}

/* Entries a device list may name: its buffer's, so that offsets out of
 * range make the row bad instead of reading past the buffer. */
static int psm_lists_within(const psm_row_lists *lists, long history_capacity,
                            long prompt_capacity, long bias_capacity)
{
    return lists->history_begin >= 0 && lists->history_end <= history_capacity &&
           lists->prompt_begin >= 0 && lists->prompt_end <= prompt_capacity &&
           lists->bias_begin >= 0 && lists->bias_end <= bias_capacity;
}

/* A group per output row (kernels/psm_stage_lists.h).
 * history/prompt/bias_capacity: the entries each token array holds (bias:
 * its tokens' and values' fewer). */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_process_lists(PSM_REQUEST_PARAMS, PSM_PROCESSING_PARAMS, const long history_capacity,
                  const long prompt_capacity, const long bias_capacity,
                  __global const uint *allowed_mask, const long mask_words,
                  __global float *processed, __global uint *listed, __global uint *counts)
{
    __local uint bad;
    __local uint table_tokens[PSM_LISTS_TABLE_SLOTS], table_words[PSM_LISTS_TABLE_SLOTS];
    const psm_lists_table table = {table_tokens, table_words};
    const long row = PSM_PROCESS_ROW;
    psm_processing_arrays arrays;
    arrays.present = present;
    arrays.history_offsets = history_offsets;
    arrays.history_tokens = history_tokens;
    arrays.prompt_offsets = prompt_offsets;
    arrays.prompt_tokens = prompt_tokens;
    arrays.bias_offsets = bias_offsets;
    arrays.bias_tokens = bias_tokens;
    arrays.bias_values = bias_values;
    arrays.repetition_per_row = repetition_per_row;
    arrays.frequency_per_row = frequency_per_row;
    arrays.presence_per_row = presence_per_row;
    arrays.repetition = repetition;
    arrays.frequency = frequency;
    arrays.presence = presence;
    const psm_row_lists lists = psm_row_lists_of(&arrays, row);
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    __global float *x = processed + row * request.vocab;
    /* Within the buffers first: the stage then reads the entries. */
    psm_stage_row_lists(x, listed ? listed + row * psm_listed_words(request.vocab) : 0,
                        p.valid ? logits + PSM_ROW_BASE(p) * psm_element_bytes(request.dtype)
                                : (__global const uchar *)0,
                        request.dtype, allowed_mask ? allowed_mask + row * mask_words : 0,
                        counts + row * request.vocab, &lists, request.vocab,
                        psm_lists_within(&lists, history_capacity, prompt_capacity,
                                         bias_capacity),
                        &bad, table);
}

/* The sampling program's psm_tile_reduce and psm_draw, applying each row's
 * processing as they read it: where only they read the rows (see
 * opencl_processing_on_read), no processed copy is written and read. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_tile_reduce_on_read(PSM_REQUEST_PARAMS, __global ulong *tile_key, __global uint *tile_info,
                        __global float *tile_ref, __global ulong *tile_mass,
                        __global uint *lane_max, PSM_READ_PROCESSING_PARAMS)
{
    PSM_TILE_REDUCE_POSTS;
    psm_tile_reduce_with(PSM_REQUEST_ARGS, tile_key, tile_info, tile_ref, tile_mass, lane_max, 1,
                         read_mask, read_mask_words, read_listed, read_overlay, posts);
}

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_draw_on_read(PSM_REQUEST_PARAMS, __global const float *tile_ref,
                 __global const ulong *tile_mass, __global const ulong *tile_prefix,
                 __global const psm_row_state *state, __global int *tokens,
                 __global float *logprobs, PSM_READ_PROCESSING_PARAMS)
{
    PSM_DRAW_POSTS;
    psm_draw_with(PSM_REQUEST_ARGS, tile_ref, tile_mass, tile_prefix, state, tokens, logprobs, 1,
                  read_mask, read_mask_words, read_listed, read_overlay, posts);
}
#endif /* PSM_PROGRAM_PROCESSING */

#if PSM_PROGRAM == PSM_PROGRAM_VERIFY
/* ---- speculative verification (psm_verify) --------------------------------
 * The host runs the pipeline up to psm_row_combine over the target rows (and
 * the draft logits rows), each row with its request's filters, which
 * psm_verify_expand spreads from the per-request values; psm_verify_rows
 * keeps each row's kept rule; then the stages of kernels/psm_stage_verify.h,
 * a group per request. The request description of the last two is the
 * per-request one: rows = requests, the caller's per-request arrays. */

/* One item per pipeline row: the filters of its request (row / per). */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_verify_expand(PSM_REQUEST_PARAMS, const int per, const int pipeline_rows,
                  __global float *temperature, __global int *top_k, __global float *top_p,
                  __global float *min_p)
{
    const long row = get_global_id(0);
    if (row >= pipeline_rows)
        return;
    const psm_row_params p = PSM_RESOLVE_ROW(row / per);
    temperature[row] = p.temperature;
    top_k[row] = p.top_k;
    top_p[row] = p.top_p;
    min_p[row] = p.min_p;
}

/* One item per pipeline row: its kept rule, from the state the row kernels
 * left (the pipeline's description: rows = its rows). */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_verify_rows(PSM_REQUEST_PARAMS, __global const psm_row_state *state,
                __global psm_verify_row *rows)
{
    const long row = get_global_id(0);
    if (row >= request.rows)
        return;
    const psm_row_params p = PSM_RESOLVE_ROW(row);
    psm_verify_row out;
    out.cutoff = state[row].cutoff;
    out.min_weight = state[row].min_weight;
    out.mass = state[row].status == PSM_ROW_SAMPLE ? state[row].total : 0ul;
    out.maximum = state[row].maximum;
    out.scale = psm_inverse_temperature_scale(p.temperature);
    out.status = state[row].status == PSM_ROW_BAD      ? PSM_VERIFY_ROW_BAD
                 : state[row].status == PSM_ROW_GREEDY ? PSM_VERIFY_ROW_GREEDY
                                                       : PSM_VERIFY_ROW_SAMPLE;
    out.greedy_token = state[row].greedy_token;
    rows[row] = out;
}

#define PSM_VERIFY_PARAMS                                                                    \
    const psm_verify_call call, __global const uchar *draft, __global const int *tokens,     \
        __global const int *parents, __global const psm_verify_row *target_rows,             \
        __global const psm_verify_row *draft_rows, __global ulong *node_drawn,               \
        __global ulong *partials, __global uint *needed_rows, __global uint *needed_count,   \
        __global int *node_status, __global int *node_decided, __global int *request_bad

#define PSM_VERIFY_ARRAYS(arrays)                                                            \
    psm_verify_arrays arrays;                                                                \
    arrays.target = logits;                                                                  \
    arrays.draft = draft;                                                                    \
    arrays.tokens = tokens;                                                                  \
    arrays.parents = parents;                                                                \
    arrays.target_rows = target_rows;                                                        \
    arrays.draft_rows = draft_rows;                                                          \
    arrays.node_drawn = node_drawn;                                                          \
    arrays.partials = partials;                                                              \
    arrays.needed_rows = needed_rows;                                                        \
    arrays.needed_count = needed_count;                                                      \
    arrays.node_status = node_status;                                                        \
    arrays.node_decided = node_decided;                                                      \
    arrays.request_bad = request_bad

/* A group per request (dimension 1). */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_verify_check(PSM_REQUEST_PARAMS, PSM_VERIFY_PARAMS)
{
    __local psm_verify_scratch scratch;
    const long r = get_group_id(1);
    PSM_VERIFY_ARRAYS(arrays);
    const psm_row_params p = PSM_RESOLVE_ROW(r);
    psm_stage_verify_check(psm_team_of_item(), call, arrays, r, p.valid, p.seed, p.offset,
                           p.stream, &scratch);
}

/* A grid sized for the device (dimension 0); the groups take the listed
 * rows' parts in turn. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_verify_totals(PSM_REQUEST_PARAMS, PSM_VERIFY_PARAMS)
{
    __local psm_group_scratch scratch;
    PSM_VERIFY_ARRAYS(arrays);
    psm_stage_verify_totals(psm_team_of_item(), call, arrays, (long)get_group_id(0),
                            (long)get_num_groups(0), &scratch);
}

__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_verify_walk(PSM_REQUEST_PARAMS, PSM_VERIFY_PARAMS, __global int *accepted,
                __global int *out_tokens, __global int *path_nodes, __global float *logprobs)
{
    __local psm_verify_scratch scratch;
    const long r = get_group_id(1);
    PSM_VERIFY_ARRAYS(arrays);
    psm_verify_outputs outputs;
    outputs.accepted = accepted;
    outputs.tokens = out_tokens;
    outputs.path_nodes = path_nodes;
    outputs.logprobs = logprobs;
    const psm_row_params p = PSM_RESOLVE_ROW(r);
    psm_stage_verify_walk(psm_team_of_item(), call, arrays, outputs, r, p.seed, p.offset,
                          p.stream, &scratch);
}
#endif /* PSM_PROGRAM_VERIFY */

#if PSM_PROGRAM == PSM_PROGRAM_SHARDED
/* ---- sharded sampling (core/sharded.c) ------------------------------------
 * One pass of a sharded call over this rank's shard: a group per item
 * (dimension 1), the stage of kernels/psm_stage_sharded.h (shared with CUDA
 * and HIP). tile_keys is NULL but for TILE_MASSES. */
__kernel __attribute__((reqd_work_group_size(PSM_WG, 1, 1))) void
psm_shard_pass(const psm_shard_geometry geometry, __global const uchar *logits,
               __global const psm_shard_item *items, __global const ulong *tile_keys,
               __global ulong *out)
{
    __local psm_shard_scratch scratch;
    psm_shard_arrays arrays;
    arrays.logits = logits;
    arrays.items = items;
    arrays.tile_keys = tile_keys;
    arrays.out = out;
    psm_stage_shard_pass(psm_team_of_item(), geometry, arrays, (long)get_group_id(1), &scratch);
}
#endif /* PSM_PROGRAM_SHARDED */
