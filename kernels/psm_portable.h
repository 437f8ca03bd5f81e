/*
 * psm_portable.h: the platform layer under the GPU stages (kernels/psm_stage_*.h).
 *
 * A stage is written once, over this header, core/psm_contract.h and
 * core/psm_row.h, and compiles as CUDA, HIP and OpenCL C 1.2. What differs
 * between the platforms is here, chosen by psm_contract.h's PSM_PLATFORM_*
 * flags:
 * - qualifiers: PSM_DEVICE_FN for device helpers, PSM_LOCAL_FN for those that
 *   take posts (below), PSM_STAGE_BEGIN/END around shared code (the CUDA and
 *   HIP objects put it in their vendor namespace, as psm_gpu.h does);
 * - the team: the items that share one unit of work (a tile). On CUDA and
 *   HIP a team is a warp of WarpSize lanes and a stage is a template over it
 *   (PSM_TEAM_TEMPLATE: both wave sizes are compiled into one HIP binary);
 *   on OpenCL it is PSM_TEAM consecutive work-items, a macro of the build
 *   option PSM_WG;
 * - team reductions and searches over running sums: CUDA/HIP shuffles (the
 *   warp algorithms of backends/cuda/psm_gpu_warp.h on the hardware lanes
 *   of psm_gpu.h), OpenCL posts to local memory;
 * - float64 (PSM_HAVE_FP64): everywhere but OpenCL devices without
 *   cl_khr_fp64;
 * - the per-element instructions where a platform has a faster exact one
 *   (NaN-keeping max, half to float).
 * The tile's element layout and the loads that fill it are written once,
 * at the end, on top of those.
 *
 * Reductions in two steps. A team reduction is written
 *     PSM_TEAM_POST(posts, value);   (every item)
 *     psm_team_barrier();            (every item of the work-group)
 *     result = psm_team_sum_u64(team, value, posts);
 * On OpenCL the post stores the item's value at its place in a __local
 * array, the barrier makes the posts visible, and the reduction reads the
 * team's posts; several reductions post before one barrier. On CUDA and HIP
 * posts are empty objects, the post and the barrier are nothing, and the
 * reduction is the warp's shuffles, so a stage costs the same registers and
 * instructions as a CUDA-only one. Rules that make one source correct on
 * both (OpenCL's, which CUDA's shuffles satisfy too):
 * - every work-item passes every barrier: a step only some items or teams
 *   take is guarded by a flag, never by an early exit around a barrier
 *   (PoCL also compiles code with barriers inside branches very slowly);
 * - a reduction is read only after a barrier that follows its post, and a
 *   posts array is posted to again only after another barrier has followed
 *   every read of it (so each round of a stage has its own arrays);
 * - the branches around a reduction are uniform over the team (the
 *   shuffles need every lane of the warp).
 */
#ifndef PSM_PORTABLE_H
#define PSM_PORTABLE_H

/* The OpenCL program receives the headers as earlier source strings
 * (backends/opencl/psm_kernels.cl says why), so each is included only
 * where it has not been read yet. */
#ifndef PSM_ROW_H
#include "psm_row.h"
#endif
#ifndef PSM_PROCESSING_H /* psm_processed_raw, for the loads at the end */
#include "psm_processing.h"
#endif

#if PSM_PLATFORM_GPU_CXX
/* ---------------------------------------------------------- CUDA, HIP --- */
#include "psm_gpu.h"
#include "psm_gpu_warp.h"

#define PSM_DEVICE_FN PSM_GPU_DEVICE
#define PSM_LOCAL_FN PSM_GPU_DEVICE
#define PSM_STAGE_BEGIN namespace PSM_GPU_NAMESPACE {
#define PSM_STAGE_END }
/* Team-sized code is a template over the warp size, named PSM_TEAM inside
 * it as the OpenCL macro is named outside. */
#define PSM_TEAM_TEMPLATE template <int PSM_TEAM>
#define PSM_TEAM_TYPE psm_team<PSM_TEAM>

PSM_STAGE_BEGIN

/* The calling lane's place in its team; the type carries the team size. */
template <int TeamSize>
struct psm_team {
    int lane;
};

/* Posts are not needed: the lanes exchange values through registers. */
struct psm_no_posts {
};
#define PSM_POSTS(type) psm_no_posts
#define PSM_TEAM_POST(posts, value) ((void)0)

template <int WarpSize>
PSM_DEVICE_FN psm_team<WarpSize> psm_team_of_thread(void)
{
    return psm_team<WarpSize>{(int)(threadIdx.x % WarpSize)};
}

PSM_DEVICE_FN void psm_team_barrier(void)
{
}

/* A team reduction: a warp algorithm of psm_gpu_warp.h on the hardware
 * lanes. */
#define PSM_TEAM_REDUCTION(name, type, warp_algorithm)                                    \
    PSM_TEAM_TEMPLATE                                                                   \
    PSM_LOCAL_FN type name(PSM_TEAM_TYPE, type value, psm_no_posts)                     \
    {                                                                                   \
        return warp_algorithm<PSM_TEAM>(value, psm_gpu_hardware_lanes<PSM_TEAM>());     \
    }
PSM_TEAM_REDUCTION(psm_team_max_f32, float, psm_warp_max)
PSM_TEAM_REDUCTION(psm_team_max_u32, psm_u32, psm_warp_max)
PSM_TEAM_REDUCTION(psm_team_max_u64, psm_u64, psm_warp_max)
PSM_TEAM_REDUCTION(psm_team_sum_u32, psm_u32, psm_warp_sum)
PSM_TEAM_REDUCTION(psm_team_sum_u64, psm_u64, psm_warp_sum)
/* Is flag (0 or 1) set on some item of the team? */
PSM_TEAM_REDUCTION(psm_team_any, psm_u32, psm_warp_any)

/* A tile's words of a bit array (the tile's token t is bit t % 32 of word
 * t / 32), shared by the team that reads the tile: lane i holds word i and
 * hands it to the lanes that need it through a shuffle, so that the team
 * loads the words once, in one instruction. */
typedef psm_u32 psm_team_words;

/* `words`: the tile's first word, NULL for none; a word past the tile's
 * `count` tokens, or of no array, reads as `absent`. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN psm_team_words psm_team_share_words(PSM_TEAM_TYPE team,
                                                  PSM_GLOBAL const psm_u32 *words, int count,
                                                  psm_u32 absent)
{
    return words && team.lane < ((count + 31) >> 5) ? words[team.lane] : absent;
}

/* Word `index` of the shared words; every lane of the team calls it. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN psm_u32 psm_team_word(PSM_TEAM_TYPE, psm_team_words shared, int index)
{
    return psm_gpu_shfl<PSM_TEAM>(shared, index);
}

/* max(a, b), NaN when either is NaN. */
PSM_DEVICE_FN float psm_max_keep_nan(float a, float b)
{
    return psm_gpu_max_keep_nan(a, b);
}

/* An IEEE half's bits as a float (exact): the hardware conversion. */
PSM_DEVICE_FN float psm_half_bits_float(psm_u16 bits)
{
    return psm_gpu_half_bits_to_float(bits);
}

PSM_STAGE_END

#elif PSM_PLATFORM_OPENCL
/* ------------------------------------------------------------- OpenCL --- */

#ifndef PSM_WG
#error "PSM_WG (work-group size) must be given as a build option"
#endif

#define PSM_DEVICE_FN static
/* Every helper that is handed a __local pointer is PSM_LOCAL_FN, forced
 * inline, so that every use of a kernel's __local variables stays inside the
 * kernel function.
 *
 * Why: clang's interprocedural optimisation removes a static helper's
 * pointer parameter when every call passes the same kernel-scope __local
 * array (a helper a kernel calls twice on its buckets), and the helper
 * then names the array directly. PoCL gives each work-group its own copy
 * of a kernel's __local variables by rewriting their uses in the kernel
 * function only, so uses left in a helper address one copy that all the
 * work-groups its threads run at once share, and rows overwrite each other's
 * buckets (docs/ARCHITECTURE.md, "PoCL", tells how this shows). GPU drivers
 * give each group its own __local memory wherever it is named; the
 * attribute is for clang (PoCL's front end), other compilers get inline. */
#ifdef __clang__
#define PSM_LOCAL_FN static inline __attribute__((always_inline))
#else
#define PSM_LOCAL_FN static inline
#endif
#define PSM_STAGE_BEGIN
#define PSM_STAGE_END
#define PSM_TEAM_TEMPLATE
#define PSM_TEAM_TYPE psm_team

/* A team of 32 items, one warp on NVIDIA, so that its posts are read as
 * broadcasts and its branches stay uniform; a whole group on a device that
 * runs groups of 16. Every item reads its team's posts itself: redundant
 * work, but one barrier per round where a work-group tree takes eight, and
 * one barrier serves every team of the group. */
#if PSM_WG >= 32
#define PSM_TEAM 32
#else
#define PSM_TEAM PSM_WG
#endif

typedef struct psm_team {
    int lane;
} psm_team;

#define PSM_POSTS(type) __local type *
#define PSM_TEAM_POST(posts, value) ((posts)[get_local_id(0)] = (value))

PSM_DEVICE_FN psm_team psm_team_of_item(void)
{
    psm_team team;
    team.lane = (int)(get_local_id(0) % PSM_TEAM);
    return team;
}

PSM_DEVICE_FN void psm_team_barrier(void)
{
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* A team reduction: `combine` folds each of the team's PSM_TEAM posts
 * (`posted`) into `result`, which starts at `start`. The item's own value
 * is among the posts. */
#define PSM_TEAM_REDUCTION(name, type, start, combine)                                    \
    PSM_LOCAL_FN type name(psm_team team, type value, __local type *posts)               \
    {                                                                                   \
        __local const type *mine = posts + (get_local_id(0) - (uint)team.lane);         \
        type result = start;                                                            \
        for (int j = 0; j < PSM_TEAM; ++j) {                                            \
            const type posted = mine[j];                                                \
            result = combine;                                                           \
        }                                                                               \
        return result;                                                                  \
    }
PSM_TEAM_REDUCTION(psm_team_max_f32, float, -INFINITY, posted > result ? posted : result)
PSM_TEAM_REDUCTION(psm_team_max_u32, uint, 0u, max(result, posted))
PSM_TEAM_REDUCTION(psm_team_max_u64, ulong, 0ul, max(result, posted))
PSM_TEAM_REDUCTION(psm_team_sum_u32, uint, 0u, result + posted)
PSM_TEAM_REDUCTION(psm_team_sum_u64, ulong, 0ul, result + posted)
PSM_TEAM_REDUCTION(psm_team_or_u32, uint, 0u, result | posted)

PSM_LOCAL_FN uint psm_team_any(psm_team team, uint flag, __local uint *posts)
{
    return psm_team_or_u32(team, flag, posts) != 0;
}

/* A tile's words of a bit array (as the CUDA section's): each item loads
 * the words it needs, since an exchange between items would take local
 * memory and a barrier. */
typedef struct psm_team_words {
    __global const uint *words;
    int word_count; /* the tile's words: ceil(count / 32) */
    uint absent;
} psm_team_words;

PSM_DEVICE_FN psm_team_words psm_team_share_words(psm_team team, __global const uint *words,
                                                  int count, uint absent)
{
    psm_team_words shared;
    (void)team;
    shared.words = words;
    shared.word_count = (count + 31) >> 5;
    shared.absent = absent;
    return shared;
}

PSM_DEVICE_FN uint psm_team_word(psm_team team, psm_team_words shared, int index)
{
    (void)team;
    return shared.words && index < shared.word_count ? shared.words[index] : shared.absent;
}

/* max(a, b), NaN when either is NaN. */
PSM_DEVICE_FN float psm_max_keep_nan(float a, float b)
{
    return (b > a || b != b) ? b : a;
}

/* An IEEE half's bits as a float (exact), in integer arithmetic. */
PSM_DEVICE_FN float psm_half_bits_float(psm_u16 bits)
{
    return psm_f16_to_float(bits);
}

#else
#error "psm_portable.h compiles as CUDA, HIP or OpenCL C only"
#endif

/* ---- team searches over running sums, float64 (the draw's) ----------------- */

/* The item whose interval holds target, when the items' values laid end to
 * end in lane order cover [0, total): its lane (-1 when target >= total)
 * and its interval's begin, the exclusive scan of the values at it. Every
 * item gets both. */
typedef struct psm_team_holder {
    int lane;
    psm_u64 begin;
} psm_team_holder;

#if PSM_PLATFORM_GPU_CXX
PSM_STAGE_BEGIN

/* The warp's inclusive scan and a ballot (psm_gpu_warp.h's
 * psm_warp_find_owner), then the holder's begin from its lane. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_team_holder psm_team_find_holder(PSM_TEAM_TYPE team, psm_u64 value,
                                                  psm_u64 target, psm_no_posts)
{
    const psm_gpu_hardware_lanes<PSM_TEAM> lanes;
    const psm_warp_owner<psm_u64> owner =
        psm_warp_find_owner<PSM_TEAM>(value, target, team.lane, lanes);
    psm_team_holder holder;
    holder.lane = owner.lane;
    holder.begin = lanes.exchange_from(owner.begin, owner.lane < 0 ? 0 : owner.lane);
    return holder;
}

/* Running sums as psm_warp_upper_bound reads them. */
struct psm_running_reader {
    const psm_u64 *running;
    PSM_DEVICE_FN psm_u64 operator()(long long index) const { return running[index]; }
};

/* The first index whose running sum exceeds target, for running sums in
 * index order and target below the last (psm_first_above's answer); every
 * item gets it. The warp reads WarpSize sums a round, about
 * log_WarpSize(count) rounds where a binary search takes log2(count). */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN psm_i32 psm_team_first_above(PSM_TEAM_TYPE team, const psm_u64 *running,
                                           psm_i32 count, psm_u64 target)
{
    const psm_running_reader reader = {running};
    return (psm_i32)psm_warp_upper_bound<PSM_TEAM>(reader, (long long)count, target, team.lane,
                                                   psm_gpu_hardware_lanes<PSM_TEAM>());
}

PSM_STAGE_END

#define PSM_HAVE_FP64 1

#else /* OpenCL */

/* Each item walks its team's posts (a barrier after the posts): the scan
 * and the search in one read. */
PSM_LOCAL_FN psm_team_holder psm_team_find_holder(psm_team team, ulong value, ulong target,
                                                  __local ulong *posts)
{
    __local const ulong *mine = posts + (get_local_id(0) - (uint)team.lane);
    psm_team_holder holder;
    holder.lane = -1;
    holder.begin = 0;
    ulong running = 0;
    for (int j = 0; j < PSM_TEAM; ++j) {
        const ulong posted = mine[j];
        if (holder.lane < 0 && target < running + posted) {
            holder.lane = j;
            holder.begin = running;
        }
        running += posted;
    }
    (void)value; /* among the posts */
    return holder;
}

/* Each item alike: a binary search needs no exchange, so no barrier. */
PSM_DEVICE_FN int psm_team_first_above(psm_team team, __global const ulong *running, int count,
                                       ulong target)
{
    (void)team;
    return psm_first_above(running, count, target);
}

/* Float64 where the device has it (the draw's log-probabilities). */
#ifdef cl_khr_fp64
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#define PSM_HAVE_FP64 1
#else
#define PSM_HAVE_FP64 0
#endif

#endif

/* ---- a tile in a team's registers (both platforms) ----------------------- */

/* Each item of a team holds PSM_TEAM_SLOTS of its tile's tokens in slots
 * x[0 .. PSM_TEAM_SLOTS - 1], loaded as 16-byte vectors (4 f32 or 8 f16 or
 * bf16 values) where the tile is whole and aligned, else element by element
 * in the same layout. Two layouts:
 * - interleaved: vector v of an item is vector v * PSM_TEAM + lane of the
 *   tile, so that each load instruction of a team reads 16 x PSM_TEAM
 *   contiguous bytes (coalesced); for reductions, where order does not
 *   matter. Slots run in token order within an item.
 * - contiguous: an item's slots are a run of the tile in token order, lane
 *   after lane; for the draw, which needs token order across the team. */
#define PSM_TEAM_SLOTS (PSM_TILE / PSM_TEAM)
#define PSM_INTERLEAVED 0
#define PSM_CONTIGUOUS 1

PSM_STAGE_BEGIN

/* log2 of the elements of a dtype (PSM_LOGITS_*) in a 16-byte vector. */
PSM_DEVICE_FN int psm_vector_shift(int dtype)
{
    return dtype == PSM_LOGITS_F32 ? 2 : 3;
}

PSM_DEVICE_FN int psm_element_bytes(int dtype)
{
    return dtype == PSM_LOGITS_F32 ? 4 : 2;
}

/* The offset within its tile of slot `slot` of lane `lane` of a team of
 * team_size items. */
PSM_DEVICE_FN int psm_slot_offset(int slot, int lane, int team_size, int vector_shift, int layout)
{
    const int vectors_per_item = (PSM_TILE / team_size) >> vector_shift;
    const int vector = slot >> vector_shift;
    const int tile_vector = layout == PSM_CONTIGUOUS ? lane * vectors_per_item + vector
                                                     : vector * team_size + lane;
    return (tile_vector << vector_shift) + (slot & ((1 << vector_shift) - 1));
}

/* Element `index` of logits as a float, before psm_read_logit (the
 * conversions are exact). */
PSM_DEVICE_FN float psm_raw_logit(PSM_GLOBAL const unsigned char *logits, int dtype,
                                  psm_i64 index)
{
    if (dtype == PSM_LOGITS_F32)
        return ((PSM_GLOBAL const float *)logits)[index];
    const psm_u16 bits = ((PSM_GLOBAL const psm_u16 *)logits)[index];
    return dtype == PSM_LOGITS_F16 ? psm_half_bits_float(bits) : psm_bf16_to_float(bits);
}

/* The largest batch psm_load_logits_batch takes. */
#define PSM_LOAD_BATCH_MAX 16

/* Elements at[0 .. n) of logits (n at most PSM_LOAD_BATCH_MAX) into x after
 * psm_read_logit, every load issued before any value is used; an entry -1
 * loads element 0, which the caller ignores. A load behind its own condition
 * compiles to a branch that waits for it before the next one starts: the
 * top-N rank parts' sixteen such loads had been one in flight. */
PSM_DEVICE_FN void psm_load_logits_batch(PSM_GLOBAL const unsigned char *logits, int dtype,
                                         const psm_i32 *at, float *x, int n)
{
    if (dtype == PSM_LOGITS_F32) {
        PSM_GLOBAL const float *values = (PSM_GLOBAL const float *)logits;
        for (int b = 0; b < n; ++b)
            x[b] = values[at[b] >= 0 ? at[b] : 0];
    } else {
        PSM_GLOBAL const psm_u16 *halves = (PSM_GLOBAL const psm_u16 *)logits;
        psm_u16 bits[PSM_LOAD_BATCH_MAX];
        for (int b = 0; b < n; ++b)
            bits[b] = halves[at[b] >= 0 ? at[b] : 0];
        for (int b = 0; b < n; ++b)
            x[b] = dtype == PSM_LOGITS_F16 ? psm_half_bits_float(bits[b])
                                           : psm_bf16_to_float(bits[b]);
    }
    for (int b = 0; b < n; ++b)
        x[b] = psm_read_logit(x[b]);
}

/* The elements of 16 loaded bytes as floats, out[0 .. 3] for f32 and
 * out[0 .. 7] for the 16-bit types. A bf16 is the top half of a float: two
 * instructions a pair. Each dtype is its own loop, so that the choice is
 * made once per vector, not per element. */
PSM_DEVICE_FN void psm_unpack_vector(uint4 raw, int dtype, float *out)
{
    const psm_u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
    if (dtype == PSM_LOGITS_F32) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
            out[k] = psm_bits_float(words[k]);
    } else if (dtype == PSM_LOGITS_BF16) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            out[2 * k] = psm_bits_float(words[k] << 16);
            out[2 * k + 1] = psm_bits_float(words[k] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            out[2 * k] = psm_half_bits_float((psm_u16)(words[k] & 0xffffu));
            out[2 * k + 1] = psm_half_bits_float((psm_u16)(words[k] >> 16));
        }
    }
}

/* x[slot] = the raw logit at psm_slot_offset(slot) of the tile that starts at
 * `tile`, -inf past its `count` tokens. aligned: the tile's address allows
 * 16-byte loads. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN void psm_team_load_tile(PSM_TEAM_TYPE team, PSM_GLOBAL const unsigned char *tile,
                                      int dtype, int count, int aligned, int layout, float *x)
{
    if (aligned && count == PSM_TILE) {
        /* A loop per dtype, each with constant steps, so that every loop
         * unrolls fully and x stays in registers. */
        PSM_GLOBAL const uint4 *vectors = (PSM_GLOBAL const uint4 *)tile;
        if (dtype == PSM_LOGITS_F32) {
#pragma unroll
            for (int slot = 0; slot < PSM_TEAM_SLOTS; slot += 4)
                psm_unpack_vector(
                    vectors[psm_slot_offset(slot, team.lane, PSM_TEAM, 2, layout) >> 2],
                    PSM_LOGITS_F32, &x[slot]);
        } else if (dtype == PSM_LOGITS_BF16) {
#pragma unroll
            for (int slot = 0; slot < PSM_TEAM_SLOTS; slot += 8)
                psm_unpack_vector(
                    vectors[psm_slot_offset(slot, team.lane, PSM_TEAM, 3, layout) >> 3],
                    PSM_LOGITS_BF16, &x[slot]);
        } else {
#pragma unroll
            for (int slot = 0; slot < PSM_TEAM_SLOTS; slot += 8)
                psm_unpack_vector(
                    vectors[psm_slot_offset(slot, team.lane, PSM_TEAM, 3, layout) >> 3],
                    PSM_LOGITS_F16, &x[slot]);
        }
        return;
    }
    const int vector_shift = psm_vector_shift(dtype);
#pragma unroll
    for (int slot = 0; slot < PSM_TEAM_SLOTS; ++slot) {
        const int offset = psm_slot_offset(slot, team.lane, PSM_TEAM, vector_shift, layout);
        x[slot] = offset < count ? psm_raw_logit(tile, dtype, offset) : -INFINITY;
    }
}

/* Logit processing (core/psm_processing.h's psm_processed_raw) applied to x
 * as psm_team_load_tile filled it, for a tile whose first token in its row
 * is `first`, a multiple of 32, and which holds `count` tokens. Nothing to
 * do without a mask or listed tokens (the same for every item). A vector's
 * elements share their words of the bit arrays, which the team shares
 * (psm_team_share_words): the mask is a select, and the overlay is read only
 * for the slots that hold a listed token, which few do. */
PSM_TEAM_TEMPLATE
PSM_DEVICE_FN void psm_team_process_tile(PSM_TEAM_TYPE team, psm_read_processing processing,
                                         psm_i64 first, int count, int dtype, int layout,
                                         float *x)
{
    if (!processing.mask && !processing.listed)
        return;
    const psm_i64 first_word = first >> 5;
    const psm_team_words mask = psm_team_share_words(
        team, processing.mask ? processing.mask + first_word : 0, count, 0xffffffffu);
    const psm_team_words listed = psm_team_share_words(
        team, processing.listed ? processing.listed + first_word : 0, count, 0u);
    const int vector_shift = psm_vector_shift(dtype);
    psm_u32 allowed = 0xffffffffu, listed_word = 0u;
#pragma unroll
    for (int slot = 0; slot < PSM_TEAM_SLOTS; ++slot) {
        const int offset = psm_slot_offset(slot, team.lane, PSM_TEAM, vector_shift, layout);
        if ((slot & ((1 << vector_shift) - 1)) == 0) {
            allowed = psm_team_word(team, mask, offset >> 5);
            listed_word = psm_team_word(team, listed, offset >> 5);
        }
        const psm_u32 bit = 1u << (offset & 31);
        if (listed_word & bit)
            x[slot] = processing.overlay[first + offset];
        else
            x[slot] = psm_masked_logit(x[slot], (allowed & bit) != 0u);
    }
}

PSM_STAGE_END

/* ---- group operations: the whole work-group (CUDA/HIP: the block) -------
 * Row stages give a unit of work (a row) a whole group and combine its
 * items' values over the group. Like the team reductions these are
 * collective: every item of the group calls each one, under branches that
 * are uniform over the group, and each ends with a barrier, so its scratch
 * may be used again as soon as it returns. CUDA and HIP combine in two
 * steps (the warp's shuffles, then one warp over the warps' values:
 * psm_gpu_warp.h's block algorithms); OpenCL posts every item's value to
 * local memory and each item reads all the group's posts (one barrier where
 * a tree takes log2(PSM_WG)).
 * PSM_LOCAL qualifies pointers to group-shared memory (a stage's scratch
 * structs, declared by the entry: __shared__ on CUDA, __local on OpenCL).
 * Local atomics add to group-shared counters; psm_local_add_u64 is exact on
 * both (OpenCL C 1.2 has no 64-bit atomics: two 32-bit words with carry). */
#if PSM_PLATFORM_GPU_CXX

#define PSM_LOCAL
/* Stages generic over where they read their entries (a "reader": a logits
 * row in global memory, a list in local memory, ...) are templates over it
 * here; on OpenCL the program defines one reader type, psm_reader. */
#define PSM_TEAM_READER_TEMPLATE template <int PSM_TEAM, class psm_reader>

PSM_STAGE_BEGIN

/* A group of at most 32 warps (1024 threads), so that one warp combines the
 * warps' values. */
struct psm_group_scratch {
    psm_u64 warp_values[32];
    psm_u64 broadcast;
};

PSM_DEVICE_FN int psm_group_item(void)
{
    return (int)threadIdx.x;
}

PSM_DEVICE_FN int psm_group_size(void)
{
    return (int)blockDim.x;
}

PSM_DEVICE_FN void psm_group_barrier(void)
{
    psm_gpu_block_barrier();
}

#define PSM_GROUP_REDUCTION(name, warp_op)                                                      \
    PSM_TEAM_TEMPLATE                                                                         \
    PSM_LOCAL_FN psm_u64 name(PSM_TEAM_TYPE, psm_u64 value, psm_group_scratch *scratch)       \
    {                                                                                         \
        return psm_block_reduce<PSM_TEAM>(value, warp_op(), (int)threadIdx.x, (int)blockDim.x, \
                                          scratch->warp_values, &scratch->broadcast,          \
                                          psm_gpu_hardware_lanes<PSM_TEAM>(),                 \
                                          psm_gpu_hardware_block());                          \
    }
PSM_GROUP_REDUCTION(psm_group_max_u64, psm_warp_op_max)
PSM_GROUP_REDUCTION(psm_group_sum_u64, psm_warp_op_sum)

/* Inclusive scan over the group in item order; *total gets the sum. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_u64 psm_group_inclusive_scan_u64(PSM_TEAM_TYPE, psm_u64 value, psm_u64 *total,
                                                  psm_group_scratch *scratch)
{
    return psm_block_inclusive_scan<PSM_TEAM>(value, total, (int)threadIdx.x, (int)blockDim.x,
                                              scratch->warp_values, &scratch->broadcast,
                                              psm_gpu_hardware_lanes<PSM_TEAM>(),
                                              psm_gpu_hardware_block());
}

/* Atomics on group-shared memory; each returns the value before. */
PSM_DEVICE_FN psm_u32 psm_local_add_u32(psm_u32 *address, psm_u32 value)
{
    return psm_gpu_atomic_add_u32(address, value);
}

PSM_DEVICE_FN psm_u32 psm_local_or_u32(psm_u32 *address, psm_u32 value)
{
    return psm_gpu_atomic_or_u32(address, value);
}

/* Stores value where *address is expected. */
PSM_DEVICE_FN psm_u32 psm_local_cas_u32(psm_u32 *address, psm_u32 expected, psm_u32 value)
{
    return psm_gpu_atomic_cas_u32(address, expected, value);
}

PSM_DEVICE_FN void psm_local_add_u64(psm_u64 *address, psm_u64 value)
{
    psm_gpu_atomic_add_u64((unsigned long long *)address, value);
}

/* Atomics on global memory (a row's token counts, shared by the group), and
 * a group barrier after which the group's global writes are seen by all its
 * items (__syncthreads orders global memory within the block). Each returns
 * the value before. */
PSM_DEVICE_FN psm_u32 psm_global_add_u32(psm_u32 *address, psm_u32 value)
{
    return psm_gpu_atomic_add_u32(address, value);
}

PSM_DEVICE_FN psm_u32 psm_global_or_u32(psm_u32 *address, psm_u32 value)
{
    return psm_gpu_atomic_or_u32(address, value);
}

PSM_DEVICE_FN psm_u32 psm_global_exchange_u32(psm_u32 *address, psm_u32 value)
{
    return psm_gpu_atomic_exchange_u32(address, value);
}

PSM_DEVICE_FN void psm_group_barrier_global(void)
{
    psm_gpu_block_barrier();
}

PSM_STAGE_END

#else /* OpenCL */

#define PSM_LOCAL __local
/* The program defines struct psm_reader and these functions after the
 * stages that call them. */
#define PSM_TEAM_READER_TEMPLATE
typedef struct psm_reader psm_reader;
PSM_LOCAL_FN long psm_reader_count(const psm_reader *reader);
PSM_LOCAL_FN ulong psm_reader_key(const psm_reader *reader, long index, float *x);

/* A group operation reads the group's posts in chunks: PSM_GROUP_CHUNKS
 * items each combine PSM_GROUP_CHUNK posts, then every item reads the chunk
 * results and at most one chunk of posts, about 2 x sqrt(PSM_WG) reads. Every
 * item reading all PSM_WG posts (PSM_WG broadcast reads per warp) is local
 * memory traffic that the radix select's eight levels pay per row: on
 * NVIDIA's OpenCL it made the row filter 1.4x slower at 10,000 x 32,000
 * top-p (bench/RESULTS.md, fourteenth session). */
#define PSM_GROUP_CHUNK 16
#define PSM_GROUP_CHUNKS ((PSM_WG + PSM_GROUP_CHUNK - 1) / PSM_GROUP_CHUNK)

typedef struct psm_group_scratch {
    ulong posts[PSM_WG];
    ulong chunks[PSM_GROUP_CHUNKS];
} psm_group_scratch;

PSM_DEVICE_FN int psm_group_item(void)
{
    return (int)get_local_id(0);
}

PSM_DEVICE_FN int psm_group_size(void)
{
    return PSM_WG;
}

PSM_DEVICE_FN void psm_group_barrier(void)
{
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* Item `item` < PSM_GROUP_CHUNKS combines its chunk of the posts; the
 * caller's barrier must follow before the chunks are read. */
#define PSM_GROUP_COMBINE_CHUNK(scratch, item, combine)                                         \
    if ((item) < PSM_GROUP_CHUNKS) {                                                          \
        const int chunk_end = min(((item) + 1) * PSM_GROUP_CHUNK, PSM_WG);                   \
        ulong result = 0;                                                                     \
        for (int j = (item) * PSM_GROUP_CHUNK; j < chunk_end; ++j) {                          \
            const ulong posted = (scratch)->posts[j];                                         \
            result = combine;                                                                 \
        }                                                                                     \
        (scratch)->chunks[item] = result;                                                     \
    }

/* Max and sum over the group (0 is the identity of both on ulong). */
#define PSM_GROUP_REDUCTION(name, combine)                                                      \
    PSM_LOCAL_FN ulong name(psm_team team, ulong value, __local psm_group_scratch *scratch)   \
    {                                                                                         \
        const int item = (int)get_local_id(0);                                                \
        scratch->posts[item] = value;                                                         \
        barrier(CLK_LOCAL_MEM_FENCE);                                                         \
        PSM_GROUP_COMBINE_CHUNK(scratch, item, combine)                                       \
        barrier(CLK_LOCAL_MEM_FENCE);                                                         \
        ulong result = 0;                                                                     \
        for (int j = 0; j < PSM_GROUP_CHUNKS; ++j) {                                          \
            const ulong posted = scratch->chunks[j];                                          \
            result = combine;                                                                 \
        }                                                                                     \
        barrier(CLK_LOCAL_MEM_FENCE);                                                         \
        return result;                                                                        \
    }
PSM_GROUP_REDUCTION(psm_group_max_u64, max(result, posted))
PSM_GROUP_REDUCTION(psm_group_sum_u64, result + posted)

/* Inclusive scan in item order: the chunks before the item's own, then its
 * chunk's posts up to its own (sums wrap mod 2^64, so any grouping gives the
 * same value). */
PSM_LOCAL_FN ulong psm_group_inclusive_scan_u64(psm_team team, ulong value, ulong *total,
                                                __local psm_group_scratch *scratch)
{
    const int item = (int)get_local_id(0);
    scratch->posts[item] = value;
    barrier(CLK_LOCAL_MEM_FENCE);
    PSM_GROUP_COMBINE_CHUNK(scratch, item, result + posted)
    barrier(CLK_LOCAL_MEM_FENCE);
    const int own_chunk = item / PSM_GROUP_CHUNK;
    ulong sum = 0, inclusive = 0;
    for (int j = 0; j < PSM_GROUP_CHUNKS; ++j) {
        const ulong chunk = scratch->chunks[j];
        sum += chunk;
        inclusive += j < own_chunk ? chunk : 0;
    }
    for (int j = own_chunk * PSM_GROUP_CHUNK; j <= item; ++j)
        inclusive += scratch->posts[j];
    *total = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    return inclusive;
}

PSM_LOCAL_FN uint psm_local_add_u32(__local uint *address, uint value)
{
    return atomic_add(address, value);
}

PSM_LOCAL_FN uint psm_local_or_u32(__local uint *address, uint value)
{
    return atomic_or(address, value);
}

PSM_LOCAL_FN uint psm_local_cas_u32(__local uint *address, uint expected, uint value)
{
    return atomic_cmpxchg(address, expected, value);
}


PSM_DEVICE_FN uint psm_global_add_u32(__global uint *address, uint value)
{
    return atomic_add(address, value);
}

PSM_DEVICE_FN uint psm_global_or_u32(__global uint *address, uint value)
{
    return atomic_or(address, value);
}

PSM_DEVICE_FN uint psm_global_exchange_u32(__global uint *address, uint value)
{
    return atomic_xchg(address, value);
}

PSM_DEVICE_FN void psm_group_barrier_global(void)
{
    barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE);
}

#endif

/* ---- the cutoff searches' team operations (kernels/psm_stage_bins.h) -----
 * psm_team_reach: the first item (lane) at which the running sum of the
 * team's values in lane order reaches need (-1 when none), and the team's
 * total; every item gets both. CUDA and HIP: the warp's inclusive scan, a
 * ballot and one shuffle; OpenCL: each item walks its team's posts (after
 * the barrier that follows the posts).
 * PSM_TEAM_MAY_EXIT: whether a team may leave a loop on its own decision
 * (uniform over the team) while other teams go on. On CUDA and HIP a team's
 * exchanges are its warp's own; on OpenCL every item of the group must pass
 * every barrier, so a team loop there runs to its end, its steps guarded
 * by a flag. */
typedef struct psm_team_reached {
    int lane;
    psm_u64 total;
} psm_team_reached;

#if PSM_PLATFORM_GPU_CXX
#define PSM_TEAM_MAY_EXIT 1

PSM_STAGE_BEGIN

PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_team_reached psm_team_reach(PSM_TEAM_TYPE team, psm_u64 value, psm_u64 need,
                                             psm_no_posts)
{
    const psm_gpu_hardware_lanes<PSM_TEAM> lanes;
    const psm_u64 inclusive = psm_warp_inclusive_scan<PSM_TEAM>(value, team.lane, lanes);
    psm_team_reached reached;
    reached.lane = lanes.first_lane_where(inclusive >= need);
    reached.total = lanes.exchange_from(inclusive, PSM_TEAM - 1);
    return reached;
}

PSM_STAGE_END

#else /* OpenCL */
#define PSM_TEAM_MAY_EXIT 0

PSM_LOCAL_FN psm_team_reached psm_team_reach(psm_team team, ulong value, ulong need,
                                             __local ulong *posts)
{
    __local const ulong *mine = posts + (get_local_id(0) - (uint)team.lane);
    psm_team_reached reached;
    reached.lane = -1;
    ulong running = 0;
    for (int j = 0; j < PSM_TEAM; ++j) {
        running += mine[j];
        if (reached.lane < 0 && running >= need)
            reached.lane = j;
    }
    reached.total = running;
    (void)value; /* among the posts */
    return reached;
}

#endif

/* ---- tile entries of the cutoff searches' stage (kernels/psm_stage_bins.h)
 * A tile's best kept token, raised by atomics from a group's items:
 * psm_tile_best holds it (0: none yet), psm_tile_best_raise raises it to a
 * rank key's, psm_tile_best_logit reads its logit. CUDA and HIP keep the
 * rank key, the row's tile_key entry; OpenCL the key's high half (the
 * ordered bits of its logit), since OpenCL C 1.2 has no 64-bit atomics. Ties
 * between tokens of one logit do not matter: only the logit is read.
 * psm_global_add_u64 adds to a row's tile masses in global memory (OpenCL:
 * two 32-bit words with carry, as psm_local_add_u64). */
#if PSM_PLATFORM_GPU_CXX

PSM_STAGE_BEGIN

typedef psm_u64 psm_tile_best;

PSM_DEVICE_FN void psm_tile_best_raise(psm_tile_best *best, psm_u64 key)
{
    psm_gpu_atomic_max_u64((unsigned long long *)best, key);
}

PSM_DEVICE_FN float psm_tile_best_logit(const psm_tile_best *best)
{
    return psm_rank_key_logit(*best);
}

PSM_DEVICE_FN void psm_global_add_u64(psm_u64 *address, psm_u64 value)
{
    psm_gpu_atomic_add_u64((unsigned long long *)address, value);
}

PSM_STAGE_END

#else /* OpenCL */

typedef uint psm_tile_best;

PSM_DEVICE_FN void psm_tile_best_raise(__global psm_tile_best *best, ulong key)
{
    atomic_max(best, (uint)(key >> 32));
}

PSM_DEVICE_FN float psm_tile_best_logit(__global const psm_tile_best *best)
{
    return psm_ordered_logit(*best);
}

#endif

/* An exact 64-bit add made of 32-bit atomics on the value's two words, for
 * OpenCL C 1.2 (no 64-bit atomics) and for sums that many items of a group
 * add to a few addresses at once (the gap bins' masses), where CUDA's 64-bit
 * shared atomic add is a compare-and-swap loop that the items retry. The low
 * word's add returns the word before it, which tells whether it wrapped and
 * so carried into the high word (exact once every add has finished); a zero
 * word is not added. One body for each address space that needs it (OpenCL
 * C 1.2 has no generic one): add_u32 is that space's 32-bit atomic add. */
#if PSM_PLATFORM_OPENCL && !defined(__ENDIAN_LITTLE__)
#define PSM_LOW_WORD 1
#else
#define PSM_LOW_WORD 0 /* NVIDIA and AMD GPUs, and little-endian OpenCL devices */
#endif
#define PSM_ADD_U64_BY_WORDS(name, space, add_u32)                          \
    PSM_LOCAL_FN void name(space psm_u64 *address, psm_u64 value)           \
    {                                                                       \
        space psm_u32 *words = (space psm_u32 *)address;                    \
        const psm_u32 low = (psm_u32)value;                                 \
        psm_u32 high = (psm_u32)(value >> 32);                              \
        if (low != 0) {                                                     \
            const psm_u32 before = add_u32(&words[PSM_LOW_WORD], low);      \
            high += before + low < before ? 1u : 0u;                        \
        }                                                                   \
        if (high != 0)                                                      \
            add_u32(&words[1 - PSM_LOW_WORD], high);                        \
    }

PSM_STAGE_BEGIN
PSM_ADD_U64_BY_WORDS(psm_local_add_u64_by_words, PSM_LOCAL, psm_local_add_u32)
PSM_STAGE_END

#if PSM_PLATFORM_OPENCL
/* Every 64-bit sum, by words; psm_local_add_u64 is CUDA's native atomic. */
PSM_ADD_U64_BY_WORDS(psm_global_add_u64, __global, psm_global_add_u32)
PSM_LOCAL_FN void psm_local_add_u64(__local ulong *address, ulong value)
{
    psm_local_add_u64_by_words(address, value);
}
#endif

/* ---- a reader of min-p's survivors (the engines' filter orders) ---------
 * vLLM's order takes top-k and top-p over the tokens that pass min-p
 * (docs/SAMPLING.md section 4, "Filter orders"), so the selection stage
 * reads the row through psm_survivors_of(row, test, 1): the same entries as
 * the reader `row`, an entry whose token fails `test` (psm_token_kept of
 * core/psm_row.h with cutoff 0: valid, g_i at least test.min_weight) reading
 * as key 0, no candidate. With active 0 it has no entries: a search over it
 * reads nothing and only passes its barriers, so that a stage calls its
 * searches unconditionally (a search inside a branch multiplies the code
 * PoCL compiles). Its type is PSM_SURVIVOR_READER: on CUDA and HIP a
 * template over the row's reader, so the default order's readers are not
 * touched; on OpenCL, which has one reader type, the program's psm_reader
 * holds the test and the program defines psm_survivors_of. An entry's index
 * is its token (row readers only, never a list). */
#if PSM_PLATFORM_GPU_CXX

PSM_STAGE_BEGIN

template <class Row>
struct psm_survivor_reader {
    const Row *row;
    psm_kept_rule test;
    psm_i64 count;
};

/* Inside a stage templated by PSM_TEAM_READER_TEMPLATE. */
#define PSM_SURVIVOR_READER psm_survivor_reader<psm_reader>

template <class Row>
PSM_DEVICE_FN psm_survivor_reader<Row> psm_survivors_of(const Row *row, psm_kept_rule test,
                                                        int active)
{
    return psm_survivor_reader<Row>{row, test, active ? psm_reader_count(row) : 0};
}

template <class Row>
PSM_DEVICE_FN psm_i64 psm_reader_count(const psm_survivor_reader<Row> *reader)
{
    return reader->count;
}

template <class Row>
PSM_DEVICE_FN psm_u64 psm_reader_key(const psm_survivor_reader<Row> *reader, psm_i64 index,
                                     float *x)
{
    const psm_u64 key = psm_reader_key(reader->row, index, x);
    return key != 0 && psm_token_kept(reader->test, *x, (psm_u32)index) ? key : 0;
}

PSM_STAGE_END

#else /* OpenCL */

#define PSM_SURVIVOR_READER psm_reader
PSM_LOCAL_FN psm_reader psm_survivors_of(const psm_reader *row, psm_kept_rule test, int active);

#endif

#endif /* PSM_PORTABLE_H */
