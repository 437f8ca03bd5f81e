/*
 * cpu_backend.c: the OpenMP CPU backend, the reference implementation of
 * docs/SAMPLING.md. Every quantity that decides a token comes from
 * core/psm_contract.h (cpu_weight.h holds a branch-free psm_weight that is
 * equal to it for every input).
 *
 * Shape of the work:
 * - batches with at least as many rows as threads: each thread takes runs of
 *   consecutive rows (CPU_ROW_RUN at most), a row at a time, so that a
 *   filtered row can prefetch the next; batches with fewer rows: rows one
 *   after another, the per-tile passes of a row spread over the threads.
 *   Tile results are integers and float maxima, so any split gives the same
 *   answer.
 * - plain rows (no filter): one pass reads each tile once and reduces it to
 *   (m_t, S_t), prefetching the next tile while it computes; the row maximum
 *   comes from the tile maxima. A draw reads again only the tile it lands in.
 * - filtered rows: a summary pass (tile maxima, valid counts, which f32
 *   tiles later passes may read in place), then:
 *   top-k by a bounded heap (small k; once it is full, only the logits at or
 *   above its least one are looked at) or a radix select on rank keys
 *   (large k);
 *   top-p on the heap's candidates, or else from g-mass per gap bin: one
 *   pass sums Z and bins the tokens near the previous row's cutoff, the
 *   cutoff's bin is found from the bin masses and its tokens are gathered
 *   and resolved in a second pass, which (without min-p) also makes the kept
 *   tile masses (top_p_filter);
 *   min-p as a per-token test on the tokens above a drop-gap floor;
 *   then the tile masses of the kept set, from the heap when the kept set
 *   lies in it, else by a pass over the tiles that can hold kept tokens,
 *   unless top-p made them.
 * - the per-token loops are written to vectorise (GCC -O3, per-function
 *   AVX-512F/AVX2 clones below); the weight is computed in float lanes and
 *   summed in double, exactly (cpu_weight.h says why). The passes that need
 *   few tokens of a tile select them first (cpu_compact.h).
 * Scratch lives in the state, per thread, and grows only when a larger vocab
 * is seen.
 */
/* Vector floor (cpu_weight.h) needs GCC told that floating-point operations
 * do not trap: the flag changes no value (rounding, NaNs, infinities and
 * signed zeros stay IEEE's; contraction stays off), only what may be
 * reordered or vectorised. It must cover the whole file so that the inline
 * helpers share the hot loops' options and inline into them. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "alloc.h"
#include "backend.h"
#include "cpu_compact.h"
#include "cpu_weight.h"
#include "error.h"
#include "psm_contract.h"
#include "psm_row.h"

#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The hot tile loops are compiled three times, for AVX-512F, AVX2 and the
 * baseline, and picked at load time (GCC function multiversioning): the
 * baseline lacks the vector floor, float-to-double conversions and variable
 * shifts of the weight, so without a clone those loops run at SSE2's width
 * or not vectorised. Every clone computes the same integers: only correctly
 * rounded +, -, x, exact conversions and floor are involved, and contraction
 * is off (-ffp-contract=off; the clones contain no FMA instruction, although
 * the AVX2 and AVX-512 targets would allow one). */
/* Not under ThreadSanitizer: the clones' resolvers run while the dynamic
 * loader relocates, before the sanitizer's runtime is set up, and clang
 * instruments them (the TSan build, fuzz/tsan.sh, crashed there). */
#if defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define PSM_CPU_UNDER_TSAN 1
#endif
#endif
#if defined(__SANITIZE_THREAD__)
#define PSM_CPU_UNDER_TSAN 1
#endif
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    (!defined(__clang__) || __clang_major__ >= 14) && !defined(PSM_CPU_UNDER_TSAN)
#define PSM_CPU_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PSM_CPU_HOT
#endif

/* Radix select: 11-bit digits keep a histogram of counts and masses in
 * 32 KiB; a bucket of at most CPU_GATHER_LIMIT tokens is gathered, ... */
#define CPU_RADIX_BITS 11
#define CPU_RADIX_BINS (1 << CPU_RADIX_BITS)
#define CPU_GATHER_LIMIT 4096
/* ... and further rounds over the gathered tokens leave at most this many to
 * sort. */
#define CPU_SORT_LIMIT 64
/* Rows a thread takes at a time in a batch (at most). */
#define CPU_ROW_RUN 16
/* top-k up to this k uses a bounded min-heap of rank keys. */
#define CPU_HEAP_LIMIT 4096
/* Passes that look for few tokens test a chunk of this many with a vector
 * test before looking at its tokens one by one. */
#define CPU_CHUNK 64
/* Draws keep the running weight sums of this many tiles: a row's mass sits in
 * few tiles, so most draws of a row find their tile ready. */
#define CPU_CACHED_TILES 8
/* top-p's gap bins: a token's bin is its unclamped gap to the row maximum in
 * 1/64 of a log2 unit; gaps of CPU_BIN_GAP_LIMIT and more (whose weight is 0:
 * a weight is 0 from a gap of 40.5 on) share the last bin. As with
 * psm_gap_bin, the bin is a non-decreasing function of the gap and the gap a
 * non-increasing function of the logit, so the bins cut the rank order into
 * consecutive runs; bins this fine leave few tokens in the bin that holds the
 * cutoff. */
#define CPU_BIN_SCALE 64.0f
#define CPU_BIN_GAP_LIMIT 42.0f
#define CPU_GAP_BINS (42 * 64 + 1)

/* A token gathered by a selection: its rank key and the measure walked in
 * rank order (1 or g_i); top-p's band also keeps its tile and its weight
 * against the tile maximum. */
typedef struct cpu_ranked {
    uint64_t key;
    uint64_t measure;
    float weight;
    int32_t tile;
} cpu_ranked;
/* top-p's bin pass first adds up, per bin, only the tokens of the bins up to
 * this many past the previous row's cutoff bin (the rest as one sum), and
 * adds up every bin only when the cutoff lies beyond those. */
#define CPU_BIN_MARGIN 128

/* One thread's workspace. The tile arrays hold one row's per-tile results;
 * the fixed buffers are sized by the contract (PSM_TILE) or by the limits
 * above, never by the request. */
/* The tile arrays of one thread, sized by the vocab: the context's own
 * (grown on demand) or carved from a caller's workspace for one call. */
typedef struct cpu_tile_arrays {
    uint64_t *tile_sum;
    uint64_t *tile_prefix;
    float *tile_max;
    int32_t *tile_valid;
    uint8_t *tile_bad;
    uint8_t *tile_raw;
} cpu_tile_arrays;

typedef struct cpu_scratch {
    cpu_tile_arrays owned;  /* the context's, for owned_tiles tiles */
    int64_t owned_tiles;
    /* The arrays of the running call (owned, or in the caller's workspace). */
    float *tile_max;        /* plain: largest valid logit; filtered: first valid, then kept */
    int32_t *tile_valid;    /* valid logits in the tile */
    uint8_t *tile_bad;      /* a NaN or +inf in the tile */
    uint8_t *tile_raw;      /* the row's memory holds the tile as read (load_tile) */
    uint64_t *tile_sum;     /* S_t (or a g-mass while top-p looks for Z) */
    uint64_t *tile_prefix;  /* running sums of T_t, in tile order */
    int64_t cached_tile[CPU_CACHED_TILES]; /* -1: empty slot */
    int next_slot;                         /* round-robin replacement */
    uint64_t cached_running[CPU_CACHED_TILES][PSM_TILE];
    float logits[PSM_TILE];
    uint64_t weights[PSM_TILE];
    uint64_t heap[CPU_HEAP_LIMIT];
    uint64_t radix_count[CPU_RADIX_BINS];
    uint64_t radix_measure[CPU_RADIX_BINS];
    cpu_ranked gathered[CPU_GATHER_LIMIT];
    int64_t gathered_count; /* entries of `gathered` in use (band pass) */
    int gather_overflow;    /* the band held more than CPU_GATHER_LIMIT tokens */
    uint64_t bin_mass[CPU_GAP_BINS]; /* g-mass of the candidates per gap bin ... */
    uint64_t bin_tail;               /* ... and of those beyond the bin limit */
    int last_cutoff_bin;             /* top-p's cutoff bin in the last row, -1: none */
    /* Per token of a tile: top-p's gap bins and g_i, and the entries that
     * cpu_compact.h selects from them or from the logits (candidates). */
    int32_t bins[PSM_TILE];
    float masses[PSM_TILE + CPU_COMPACT_SLACK];
    float compact[PSM_TILE + CPU_COMPACT_SLACK];
    float compact_masses[PSM_TILE + CPU_COMPACT_SLACK];
    int32_t compact_index[PSM_TILE + CPU_COMPACT_SLACK];
} cpu_scratch;

typedef struct cpu_state {
    int threads;
    cpu_scratch **scratch; /* one per thread */
} cpu_state;

/* Where a filtered row prefetches the next row (cpu_row.next_data). */
typedef enum cpu_prefetch_step {
    PREFETCH_IN_BINS,   /* top-p's bin pass */
    PREFETCH_IN_HEAP,   /* the top-k heap's scan */
    PREFETCH_IN_KEPT    /* the kept pass */
} cpu_prefetch_step;

/* Everything a row's passes need to know about it. */
typedef struct cpu_row {
    const unsigned char *data; /* the row's first logit */
    psm_dtype dtype;
    int64_t vocab;
    int64_t tiles;
    float scale;        /* psm_inverse_temperature_scale(T) */
    int weight_bits;    /* psm_weight_bits(vocab) */
    float row_max;      /* M */
    int filtered;       /* use the kept-set rule below instead of "every valid token" */
    uint64_t key_cutoff; /* kept: rank key >= key_cutoff (0 keeps every valid token) */
    uint64_t min_weight; /* kept: g_i >= min_weight (0: no min-p) */
    float kept_floor;    /* with min-p: logits below it fail min-p (psm_min_p_drop_gap) */
    /* The next row this thread will process (NULL: none known), and the
     * step of a filtered row that prefetches it, tile by tile, while it
     * computes from cache: the first one after the summary pass that reads
     * every tile. */
    const unsigned char *next_data;
    cpu_prefetch_step prefetch_step;
} cpu_row;

/* ---- reading tiles --------------------------------------------------------- */

static size_t dtype_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

static int64_t tile_length(const cpu_row *row, int64_t tile)
{
    int64_t start = tile * PSM_TILE;
    int64_t left = row->vocab - start;
    return left < PSM_TILE ? left : PSM_TILE;
}

/* Reads logits as the contract does (psm_read_logit) into out, which may be
 * in itself. Returns the number of valid logits; *max_out is the largest
 * value read (meaningful when some logit is valid), *bad_out whether a NaN or
 * +inf was seen, *changed_out whether reading changed some value (-0, or a
 * magnitude below PSM_TINY). Written on the float bits so that it vectorises
 * into a few integer operations: valid is a magnitude below infinity's,
 * masked is exactly -inf, and what is neither is bad; psm_read_logit clears
 * magnitudes below PSM_TINY (2^-64), which a NaN never has. */
PSM_CPU_HOT
static int32_t classify_tile(const float *in, float *out, int n, float *max_out, int *bad_out,
                             int *changed_out)
{
    int32_t valid = 0, masked = 0, changed = 0;
    float largest = -INFINITY;
#pragma omp simd reduction(max : largest) reduction(+ : valid, masked, changed)
    for (int i = 0; i < n; ++i) {
        uint32_t bits = psm_float_bits(in[i]);
        int32_t magnitude = (int32_t)(bits & 0x7fffffffu);
        valid += magnitude < 0x7f800000;
        masked += bits == 0xff800000u;
        int32_t tiny = magnitude < 0x1f800000; /* 2^-64 */
        changed += tiny & (bits != 0u);
        float x = psm_bits_float(bits & ((uint32_t)tiny - 1u));
        out[i] = x;
        largest = largest > x ? largest : x;
    }
    *max_out = largest;
    *bad_out = valid + masked < n;
    *changed_out = changed != 0;
    return valid;
}

PSM_CPU_HOT
static void widen_bf16(const uint16_t *in, float *out, int n)
{
#pragma omp simd
    for (int i = 0; i < n; ++i)
        out[i] = psm_bf16_to_float(in[i]);
}

static void widen_f16(const uint16_t *in, float *out, int n)
{
    for (int i = 0; i < n; ++i)
        out[i] = psm_f16_to_float(in[i]);
}

/* Loads a tile into x (as read by the contract) and summarises it; *raw_out
 * (when not NULL) says whether the row's own memory holds the tile exactly
 * as read: f32 logits that reading leaves unchanged. */
static int32_t load_tile(const cpu_row *row, int64_t tile, float *x, int *n_out, float *max_out,
                         int *bad_out, int *raw_out)
{
    int n = (int)tile_length(row, tile);
    int64_t start = tile * PSM_TILE;
    int changed;
    *n_out = n;
    int32_t valid;
    switch (row->dtype) {
    case PSM_DTYPE_F32:
        valid = classify_tile((const float *)row->data + start, x, n, max_out, bad_out, &changed);
        if (raw_out)
            *raw_out = !changed;
        return valid;
    case PSM_DTYPE_BF16:
        widen_bf16((const uint16_t *)row->data + start, x, n);
        break;
    case PSM_DTYPE_F16:
    default:
        widen_f16((const uint16_t *)row->data + start, x, n);
        break;
    }
    if (raw_out)
        *raw_out = 0;
    return classify_tile(x, x, n, max_out, bad_out, &changed);
}

/* A tile of a row whose summary pass has run, as the contract reads it: the
 * row's own memory when it holds the tile as read (owner->tile_raw), else a
 * copy read into buffer. */
static const float *read_tile(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                              float *buffer, int *n_out)
{
    if (owner->tile_raw[tile]) {
        *n_out = (int)tile_length(row, tile);
        return (const float *)row->data + tile * PSM_TILE;
    }
    int bad;
    float max;
    load_tile(row, tile, buffer, n_out, &max, &bad, NULL);
    return buffer;
}

/* ---- weights --------------------------------------------------------------- */

/* Memory that a loop over a tile brings into the cache while it computes:
 * the next tile of the row, or the next row's tile. A loop works through
 * its tile in steps of CPU_PACE tokens and, before each, prefetches the same
 * share of `ahead`, so that the reads are spread over the arithmetic (issued
 * all at once, they fill the core's line-fill buffers and stall it, and a
 * prefetch inside a vector loop keeps GCC from vectorising it). */
#define CPU_PACE 256
typedef struct cpu_ahead {
    const char *data; /* NULL: nothing to prefetch */
    size_t bytes;
} cpu_ahead;

static inline void prefetch_share(cpu_ahead ahead, int from, int to, int n)
{
    if (!ahead.data)
        return;
    /* 32-bit arithmetic: a tile's bytes (at most 4096) times a token count
     * (at most 1024). */
    uint32_t bytes = (uint32_t)ahead.bytes;
    uint32_t end = bytes * (uint32_t)to / (uint32_t)n;
    for (uint32_t b = (bytes * (uint32_t)from / (uint32_t)n) & ~63u; b < end; b += 64)
        __builtin_prefetch(ahead.data + b, 0, 2);
}

/* The next row's tile `tile`, when `step` is the one that prefetches it. */
static cpu_ahead next_row_tile(const cpu_row *row, int64_t tile, cpu_prefetch_step step)
{
    cpu_ahead ahead = {NULL, 0};
    if (row->next_data && row->prefetch_step == step) {
        size_t size = row->dtype == PSM_DTYPE_F32 ? 4 : 2;
        int64_t start = tile * PSM_TILE, left = row->vocab - start;
        ahead.data = (const char *)row->next_data + (size_t)start * size;
        ahead.bytes = (size_t)(left < PSM_TILE ? left : PSM_TILE) * size;
    }
    return ahead;
}

/* S_t of a plain tile: every valid token weighs psm_weight(gap(m_t, x), B);
 * masked tokens have an infinite gap and weigh 0. */
PSM_CPU_HOT
static uint64_t plain_weight_sum(const float *x, int n, float reference, float scale, int bits,
                                 cpu_ahead ahead)
{
    /* Exact: integer weights below 2^41, partial sums below 2^53 (see
     * cpu_weight.h), so the lanes and steps may add in any order. */
    double sum = 0.0;
    for (int step = 0; step < n; step += CPU_PACE) {
        int end = n - step < CPU_PACE ? n : step + CPU_PACE;
        prefetch_share(ahead, step, end, n);
        double part = 0.0;
#pragma omp simd reduction(+ : part)
        for (int i = step; i < end; ++i)
            part += (double)psm_cpu_weight_float(psm_cpu_scaled_gap(reference, x[i], scale), bits);
        sum += part;
    }
    return (uint64_t)sum;
}

/* Every token's weight against reference into weights; returns their sum.
 * With `masked` (a constant in each caller), weights[i] holds 0 or 1 on entry
 * (kept or not) and a token that is not kept weighs 0. */
static inline uint64_t tile_weight_array(const float *x, int n, float reference, float scale,
                                         int bits, uint64_t *weights, int masked)
{
    uint64_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; ++i) {
        uint64_t w = psm_cpu_weight(psm_cpu_scaled_gap(reference, x[i], scale), bits);
        if (masked)
            w &= (uint64_t)0 - weights[i];
        weights[i] = w;
        sum += w;
    }
    return sum;
}

PSM_CPU_HOT
static uint64_t plain_weights(const float *x, int n, float reference, float scale, int bits,
                              uint64_t *weights)
{
    return tile_weight_array(x, n, reference, scale, bits, weights, 0);
}

/* g_i: a token's weight against the row maximum. */
static uint64_t global_weight(const cpu_row *row, float x)
{
    return psm_weight(psm_scaled_gap(row->row_max, x, row->scale), row->weight_bits);
}

/* The largest rank key a tile can hold: its largest valid logit at its first
 * index. Tiles below a cutoff are skipped by it. */
static uint64_t tile_key_bound(const cpu_row *row, const cpu_scratch *owner, int64_t tile)
{
    (void)row;
    return psm_rank_key(owner->tile_max[tile], (uint32_t)(tile * PSM_TILE));
}

/* psm_rank_key(x, token) >= cutoff, on 32-bit halves so that it vectorises
 * in 32-bit lanes. x must be valid (finite, read by psm_read_logit). */
static inline int key_at_least(float x, uint32_t token, uint64_t cutoff)
{
    uint32_t ordered = psm_ordered_bits(x);
    uint32_t high = (uint32_t)(cutoff >> 32), low = (uint32_t)cutoff;
    /* Bitwise, not short-circuit: GCC turns || and && here into per-lane
     * scalar mask arithmetic. */
    return (ordered > high) | ((ordered == high) & (0xffffffffu - token >= low));
}

static inline int is_valid_logit(float x)
{
    return (int32_t)(psm_float_bits(x) & 0x7fffffffu) < 0x7f800000;
}

/* The kept rule of a filtered tile: kept[i] = 1 for a valid token with key
 * >= cutoff (and, with min-p, g_i >= min_weight), else 0; returns the largest
 * kept logit, -inf when none is kept. g_i is computed only with min-p on
 * (use_min_p is a constant in each caller, so each gets its own loop). */
static inline float mark_kept(const cpu_row *row, const float *x, int n, uint32_t start,
                              uint64_t *kept, int use_min_p)
{
    float kept_max = -INFINITY;
    uint64_t cutoff = row->key_cutoff;
    double min_weight = (double)row->min_weight; /* exact: at most 2^40 */
    float row_max = row->row_max, scale = row->scale;
    int bits = row->weight_bits;
#pragma omp simd reduction(max : kept_max)
    for (int i = 0; i < n; ++i) {
        int keep = is_valid_logit(x[i]) & key_at_least(x[i], start + (uint32_t)i, cutoff);
        if (use_min_p)
            keep &= (double)psm_cpu_weight_float(psm_cpu_scaled_gap(row_max, x[i], scale), bits) >=
                    min_weight;
        kept[i] = (uint64_t)keep;
        float candidate = keep ? x[i] : -INFINITY;
        kept_max = kept_max > candidate ? kept_max : candidate;
    }
    return kept_max;
}

PSM_CPU_HOT
static float mark_kept_top(const cpu_row *row, const float *x, int n, uint32_t start, uint64_t *kept)
{
    return mark_kept(row, x, n, start, kept, 0);
}

PSM_CPU_HOT
static float mark_kept_min_p(const cpu_row *row, const float *x, int n, uint32_t start,
                             uint64_t *kept)
{
    return mark_kept(row, x, n, start, kept, 1);
}

/* weights[i] (0 or 1 on entry: kept) becomes w_i against reference, or 0. */
PSM_CPU_HOT
static uint64_t masked_weights(const float *x, int n, float reference, float scale, int bits,
                               uint64_t *weights)
{
    return tile_weight_array(x, n, reference, scale, bits, weights, 1);
}

/* top-p's bins: every token's gap bin into bins and its g_i into g (0 for
 * masked tokens and, with use_lower, for keys below lower); returns the sum
 * of the g_i. The bin comes from the unclamped gap, clamped to
 * CPU_BIN_GAP_LIMIT on its float bits (gaps are >= 0 or +inf here, so their
 * bits order as their values), so the conversion never sees an out-of-range
 * value. Each g_i is an integer below 2^41, exact in the float and in the
 * double sum. */
static inline uint64_t bins_and_weights(const cpu_row *row, const float *x, int n, uint32_t start,
                                        uint64_t lower, cpu_ahead ahead, int32_t *bins, float *g,
                                        int use_lower)
{
    float row_max = row->row_max, scale = row->scale;
    int bits = row->weight_bits;
    const psm_u32 limit = psm_float_bits(CPU_BIN_GAP_LIMIT);
    double sum = 0.0;
    for (int step = 0; step < n; step += CPU_PACE) {
        int end = n - step < CPU_PACE ? n : step + CPU_PACE;
        prefetch_share(ahead, step, end, n);
#pragma omp simd reduction(+ : sum)
        for (int i = step; i < end; ++i) {
            float gap = psm_unclamped_gap(row_max, x[i], scale);
            psm_u32 gap_bits = psm_float_bits(gap);
            float clamped = psm_bits_float(gap_bits < limit ? gap_bits : limit);
            float weight = psm_cpu_weight_float(psm_cpu_scaled_gap(row_max, x[i], scale), bits);
            if (use_lower)
                weight = key_at_least(x[i], start + (uint32_t)i, lower) ? weight : 0.0f;
            bins[i] = (int32_t)(clamped * CPU_BIN_SCALE);
            g[i] = weight;
            sum += (double)weight;
        }
    }
    return (uint64_t)sum;
}

PSM_CPU_HOT
static uint64_t bins_all(const cpu_row *row, const float *x, int n, cpu_ahead ahead,
                         int32_t *bins, float *g)
{
    return bins_and_weights(row, x, n, 0, 0, ahead, bins, g, 0);
}

PSM_CPU_HOT
static uint64_t bins_above(const cpu_row *row, const float *x, int n, uint32_t start,
                           uint64_t lower, cpu_ahead ahead, int32_t *bins, float *g)
{
    return bins_and_weights(row, x, n, start, lower, ahead, bins, g, 1);
}

/* Every token's g_i into g; returns their sum (exact, as in bins_and_weights). */
PSM_CPU_HOT
static uint64_t global_weights_of(const cpu_row *row, const float *x, int n, cpu_ahead ahead,
                                  float *g)
{
    float row_max = row->row_max, scale = row->scale;
    int bits = row->weight_bits;
    double sum = 0.0;
    for (int step = 0; step < n; step += CPU_PACE) {
        int end = n - step < CPU_PACE ? n : step + CPU_PACE;
        prefetch_share(ahead, step, end, n);
#pragma omp simd reduction(+ : sum)
        for (int i = step; i < end; ++i) {
            float weight = psm_cpu_weight_float(psm_cpu_scaled_gap(row_max, x[i], scale), bits);
            g[i] = weight;
            sum += (double)weight;
        }
    }
    return (uint64_t)sum;
}

/* Every token's gap bin (as in bins_and_weights) into bins. */
PSM_CPU_HOT
static void bins_of(const cpu_row *row, const float *x, int n, int32_t *bins)
{
    float row_max = row->row_max, scale = row->scale;
    const psm_u32 limit = psm_float_bits(CPU_BIN_GAP_LIMIT);
#pragma omp simd
    for (int i = 0; i < n; ++i) {
        psm_u32 gap_bits = psm_float_bits(psm_unclamped_gap(row_max, x[i], scale));
        bins[i] = (int32_t)(psm_bits_float(gap_bits < limit ? gap_bits : limit) * CPU_BIN_SCALE);
    }
}

/* Adds each g_i to its bin's mass; returns their sum. Scalar: tokens of one
 * bin would collide in a vector. The conversion goes through a signed
 * integer, which every x86-64 clone does in one instruction. */
static uint64_t add_to_bins(const int32_t *bins, const float *g, int n, uint64_t *bin_mass)
{
    uint64_t sum = 0;
    for (int i = 0; i < n; ++i) {
        uint64_t weight = (uint64_t)(int64_t)g[i];
        bin_mass[bins[i]] += weight;
        sum += weight;
    }
    return sum;
}

/* Is some logit of x in [low, high)? (Masked logits never are: low is finite.) */
PSM_CPU_HOT
static int any_in_band(const float *x, int n, float low, float high)
{
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int i = 0; i < n; ++i)
        any |= (x[i] >= low) & (x[i] < high);
    return any;
}

/* g_i of every token of a tile (0 for masked ones). */
PSM_CPU_HOT
static void global_weights(const cpu_row *row, const float *x, int n, uint64_t *g)
{
    float row_max = row->row_max, scale = row->scale;
    int bits = row->weight_bits;
#pragma omp simd
    for (int i = 0; i < n; ++i)
        g[i] = psm_cpu_weight(psm_cpu_scaled_gap(row_max, x[i], scale), bits);
}

/* Tile weights of a filtered row: w_i against the largest kept logit of the
 * tile for kept tokens, 0 for the rest. Returns S_t, and m_t in *reference. */
static uint64_t kept_weights(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                             float *buffer, uint64_t *weights, float *reference)
{
    int n;
    const float *x = read_tile(row, owner, tile, buffer, &n);
    uint32_t start = (uint32_t)(tile * PSM_TILE);
    float kept_max = row->min_weight != 0 ? mark_kept_min_p(row, x, n, start, weights)
                                          : mark_kept_top(row, x, n, start, weights);
    *reference = kept_max;
    if (kept_max == -INFINITY) {
        memset(weights, 0, (size_t)n * sizeof *weights);
        return 0;
    }
    return masked_weights(x, n, kept_max, row->scale, row->weight_bits, weights);
}

/* Sum of the weights against reference of the tokens with key >= cutoff
 * (masked tokens weigh 0 whatever the cutoff), chunk by chunk: a chunk with
 * no such token (a vector test) is skipped. */
PSM_CPU_HOT
static uint64_t cut_weight_sum(const float *x, int n, uint32_t start, float reference,
                               float scale, int bits, uint64_t cutoff, cpu_ahead ahead)
{
    double sum = 0.0; /* exact: integers, partial sums below 2^53 */
    for (int step = 0; step < n; step += CPU_CHUNK) {
        int length = n - step < CPU_CHUNK ? n - step : CPU_CHUNK;
        prefetch_share(ahead, step, step + length, n);
        const float *chunk = x + step;
        uint32_t first = start + (uint32_t)step;
        int any = 0;
#pragma omp simd reduction(| : any)
        for (int i = 0; i < length; ++i)
            any |= key_at_least(chunk[i], first + (uint32_t)i, cutoff);
        if (!any)
            continue;
        double part = 0.0;
#pragma omp simd reduction(+ : part)
        for (int i = 0; i < length; ++i) {
            int keep = key_at_least(chunk[i], first + (uint32_t)i, cutoff);
            float w = psm_cpu_weight_float(psm_cpu_scaled_gap(reference, chunk[i], scale), bits);
            part += keep ? (double)w : 0.0;
        }
        sum += part;
    }
    return (uint64_t)sum;
}

/* The candidates of a tile into the worker's compact (and, with want_index,
 * their indices into compact_index): the tokens with logit >= floor and key
 * >= cutoff, in index order; returns how many. Those with logit >= floor are
 * selected first (cpu_compact.h); the key test, when there is a cutoff, then
 * runs on them alone. */
static int select_candidates(const float *x, int n, uint32_t start, float floor, uint64_t cutoff,
                             int want_index, cpu_scratch *worker)
{
    float *out = worker->compact;
    int32_t *index = worker->compact_index;
    int count = psm_cpu_select_at_least(x, NULL, n, floor, out, NULL,
                                        want_index || cutoff != 0 ? index : NULL);
    if (cutoff == 0)
        return count;
    int kept = 0;
    for (int j = 0; j < count; ++j) {
        out[kept] = out[j];
        index[kept] = index[j];
        kept += key_at_least(out[j], start + (uint32_t)index[j], cutoff);
    }
    return kept;
}

/* Keeps, in place, the logits of x whose g_i reaches min_weight; returns how
 * many. The weights are computed in a vector pass into `passes` first. */
PSM_CPU_HOT
static int keep_min_p(const cpu_row *row, float *x, int n, float *passes)
{
    float row_max = row->row_max, scale = row->scale;
    int bits = row->weight_bits;
    double min_weight = (double)row->min_weight; /* exact: at most 2^40 */
#pragma omp simd
    for (int i = 0; i < n; ++i)
        passes[i] = (double)psm_cpu_weight_float(psm_cpu_scaled_gap(row_max, x[i], scale), bits) >=
                            min_weight
                        ? 1.0f
                        : 0.0f;
    int kept = 0;
    for (int i = 0; i < n; ++i) {
        x[kept] = x[i];
        kept += passes[i] != 0.0f;
    }
    return kept;
}

/* Each logit's weight against reference into w; returns the sum of those of
 * the logits at or above high. */
PSM_CPU_HOT
static uint64_t weights_at_least(const float *x, int n, float reference, float scale, int bits,
                                 float high, float *w)
{
    double sum = 0.0; /* exact: integers, partial sums below 2^53 */
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; ++i) {
        float weight = psm_cpu_weight_float(psm_cpu_scaled_gap(reference, x[i], scale), bits);
        w[i] = weight;
        sum += x[i] >= high ? (double)weight : 0.0;
    }
    return (uint64_t)sum;
}

/* S_t of the kept set, with m_t in *reference (-inf, and 0 returned, when the
 * tile keeps nothing), for a tile that may keep tokens (see PASS_KEPT).
 * Without min-p the kept tokens are those with key >= cutoff, so a tile that
 * keeps any keeps its first token in rank order, whose logit is the tile's
 * largest: m_t is the tile maximum, and the weights are summed chunk by
 * chunk, skipping chunks with no kept token. With min-p, g_i is not a
 * monotone function of the logit at its last unit, so the kept tokens are
 * collected first: only logits at or above row->kept_floor can pass (gaps
 * below psm_min_p_drop_gap); those of them that pass are gathered, their
 * maximum is m_t, and their weights are summed in one vector pass. */
static uint64_t kept_mass(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                          cpu_scratch *worker, float *reference)
{
    int n;
    uint32_t start = (uint32_t)(tile * PSM_TILE);
    const float *x = read_tile(row, owner, tile, worker->logits, &n);
    uint64_t cutoff = row->key_cutoff;
    cpu_ahead ahead = next_row_tile(row, tile, PREFETCH_IN_KEPT);
    if (row->min_weight == 0) {
        float tile_max = owner->tile_max[tile];
        uint64_t sum = cut_weight_sum(x, n, start, tile_max, row->scale, row->weight_bits, cutoff,
                                      ahead);
        *reference = sum != 0 ? tile_max : -INFINITY;
        return sum;
    }
    prefetch_share(ahead, 0, n, n);
    float *kept = worker->compact;
    int count = select_candidates(x, n, start, row->kept_floor, cutoff, 0, worker);
    count = keep_min_p(row, kept, count, worker->masses);
    float kept_max = -INFINITY;
    for (int i = 0; i < count; ++i)
        kept_max = kept[i] > kept_max ? kept[i] : kept_max;
    *reference = kept_max;
    if (count == 0)
        return 0;
    cpu_ahead none = {NULL, 0};
    return plain_weight_sum(kept, count, kept_max, row->scale, row->weight_bits, none);
}

/* A tile's weights into `weights` (plain or kept rule); returns S_t. */
static uint64_t tile_weights(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                             float *buffer, uint64_t *weights)
{
    if (row->filtered) {
        float reference;
        return kept_weights(row, owner, tile, buffer, weights, &reference);
    }
    int n;
    const float *x = read_tile(row, owner, tile, buffer, &n);
    return plain_weights(x, n, owner->tile_max[tile], row->scale, row->weight_bits, weights);
}

/* ---- per-tile passes ------------------------------------------------------- */

/* The passes run over a row's tiles either on one thread (its own scratch
 * serves as tile buffer) or on all threads (each uses its own buffer; results
 * go to the row owner's per-tile arrays, one slot per tile). */
typedef enum cpu_pass {
    PASS_PLAIN,     /* m_t, valid, bad, S_t of a plain row */
    PASS_SUMMARY,   /* m_t, valid, bad */
    PASS_BINS,      /* top-p: g-mass of the candidates (key >= lower) per gap bin */
    PASS_BAND,      /* top-p: gather the candidates whose logit is in [band_low, band_high);
                       with band_masses, also S_t of the candidates at or above band_high */
    PASS_KEPT,      /* m_t, S_t of the kept set */
    PASS_PROBS      /* write the row's probabilities */
} cpu_pass;

typedef struct cpu_pass_args {
    cpu_pass pass;
    const cpu_row *row;
    cpu_scratch *owner;
    uint64_t lower;      /* PASS_BINS, PASS_BAND: candidates have keys >= lower */
    int bin_limit;       /* PASS_BINS: bins past it are added up as one ... */
    float bin_edge;      /* ... the bins of the logits below this */
    float band_low;      /* PASS_BAND */
    float band_high;     /* PASS_BAND */
    int band_masses;     /* PASS_BAND */
    uint64_t total;      /* PASS_PROBS */
    float *probs_row;    /* PASS_PROBS */
} cpu_pass_args;

/* Adds a band token to the worker's gathered ones (or marks the overflow). */
static void gather_one(cpu_scratch *worker, uint64_t key, uint64_t measure, float weight,
                       int64_t tile)
{
    if (worker->gathered_count == CPU_GATHER_LIMIT) {
        worker->gather_overflow = 1;
        return;
    }
    cpu_ranked *item = &worker->gathered[worker->gathered_count++];
    item->key = key;
    item->measure = measure;
    item->weight = weight;
    item->tile = (int32_t)tile;
}

/* PASS_BAND without masses: the tile's band tokens, found chunk by chunk
 * after a vector test. */
static void gather_band(const cpu_pass_args *args, int64_t tile, cpu_scratch *worker)
{
    const cpu_row *row = args->row;
    int n;
    uint32_t start = (uint32_t)(tile * PSM_TILE);
    const float *logits = read_tile(row, args->owner, tile, worker->logits, &n);
    for (int chunk = 0; chunk < n; chunk += CPU_CHUNK) {
        int length = n - chunk < CPU_CHUNK ? n - chunk : CPU_CHUNK;
        const float *x = logits + chunk;
        if (!any_in_band(x, length, args->band_low, args->band_high))
            continue;
        for (int i = 0; i < length; ++i) {
            if (!(x[i] >= args->band_low && x[i] < args->band_high))
                continue;
            uint64_t key = psm_rank_key(x[i], start + (uint32_t)(chunk + i));
            if (key >= args->lower)
                gather_one(worker, key, global_weight(row, x[i]), 0.0f, tile);
        }
    }
}

/* PASS_BAND with masses (top-p without min-p): the kept tokens are the
 * candidates at or above band_high and the band's tokens up to the cutoff.
 * A tile that keeps any keeps its first token in rank order, whose logit is
 * its largest, so m_t is the tile maximum either way, and each candidate's
 * weight against it is known now: this returns the sum for the tokens at or
 * above band_high and gathers the band's tokens with their weights, which
 * top_p_filter adds to their tiles once the cutoff is known. */
static uint64_t band_tile_masses(const cpu_pass_args *args, int64_t tile, cpu_scratch *worker)
{
    const cpu_row *row = args->row;
    int n;
    uint32_t start = (uint32_t)(tile * PSM_TILE);
    const float *x = read_tile(row, args->owner, tile, worker->logits, &n);
    float *candidates = worker->compact, *weights = worker->masses;
    int count = select_candidates(x, n, start, args->band_low, args->lower, 1, worker);
    uint64_t sum = weights_at_least(candidates, count, args->owner->tile_max[tile], row->scale,
                                    row->weight_bits, args->band_high, weights);
    for (int j = 0; j < count; ++j)
        if (candidates[j] < args->band_high)
            gather_one(worker,
                       psm_rank_key(candidates[j], start + (uint32_t)worker->compact_index[j]),
                       global_weight(row, candidates[j]), weights[j], tile);
    return sum;
}

static void run_tile(const cpu_pass_args *args, int64_t tile, cpu_scratch *worker)
{
    const cpu_row *row = args->row;
    cpu_scratch *owner = args->owner;
    int n, bad;
    float max;
    switch (args->pass) {
    case PASS_PLAIN: {
        int raw;
        int32_t valid = load_tile(row, tile, worker->logits, &n, &max, &bad, &raw);
        owner->tile_max[tile] = max;
        owner->tile_valid[tile] = valid;
        owner->tile_bad[tile] = (uint8_t)bad;
        owner->tile_raw[tile] = (uint8_t)raw;
        /* The row is read once, tile by tile: the next tile's read overlaps
         * this tile's arithmetic. */
        cpu_ahead ahead = {NULL, 0};
        if (tile + 1 < row->tiles) {
            size_t size = dtype_size(row->dtype);
            ahead.data = (const char *)row->data + (size_t)(tile + 1) * PSM_TILE * size;
            ahead.bytes = (size_t)tile_length(row, tile + 1) * size;
        }
        owner->tile_sum[tile] = (valid > 0 && !bad) ? plain_weight_sum(worker->logits, n, max,
                                                                      row->scale, row->weight_bits,
                                                                      ahead)
                                                    : 0;
        break;
    }
    case PASS_SUMMARY: {
        int raw;
        int32_t valid = load_tile(row, tile, worker->logits, &n, &max, &bad, &raw);
        owner->tile_max[tile] = max;
        owner->tile_valid[tile] = valid;
        owner->tile_bad[tile] = (uint8_t)bad;
        owner->tile_raw[tile] = (uint8_t)raw;
        break;
    }
    case PASS_BINS: {
        if (owner->tile_valid[tile] == 0 || tile_key_bound(row, owner, tile) < args->lower)
            break;
        uint32_t start = (uint32_t)(tile * PSM_TILE);
        const float *x = read_tile(row, owner, tile, worker->logits, &n);
        cpu_ahead ahead = next_row_tile(row, tile, PREFETCH_IN_BINS);
        if (args->bin_limit == CPU_GAP_BINS - 1) {
            if (args->lower != 0)
                bins_above(row, x, n, start, args->lower, ahead, worker->bins, worker->masses);
            else
                bins_all(row, x, n, ahead, worker->bins, worker->masses);
            add_to_bins(worker->bins, worker->masses, n, worker->bin_mass);
            break;
        }
        /* Z's share of the tile (every candidate's g_i), then the bins of
         * the tokens within the limit: those whose logit is at least
         * bin_edge. */
        if (args->lower == 0) {
            uint64_t mass = global_weights_of(row, x, n, ahead, worker->masses);
            int count = psm_cpu_select_at_least(x, worker->masses, n, args->bin_edge,
                                                worker->compact, worker->compact_masses, NULL);
            bins_of(row, worker->compact, count, worker->bins);
            mass -= add_to_bins(worker->bins, worker->compact_masses, count, worker->bin_mass);
            worker->bin_tail += mass;
            break;
        }
        uint64_t mass = cut_weight_sum(x, n, start, row->row_max, row->scale, row->weight_bits,
                                       args->lower, ahead);
        int count = select_candidates(x, n, start, args->bin_edge, args->lower, 0, worker);
        cpu_ahead none = {NULL, 0};
        mass -= bins_all(row, worker->compact, count, none, worker->bins, worker->masses);
        add_to_bins(worker->bins, worker->masses, count, worker->bin_mass);
        worker->bin_tail += mass;
        break;
    }
    case PASS_BAND: {
        if (owner->tile_valid[tile] == 0 || owner->tile_max[tile] < args->band_low ||
            tile_key_bound(row, owner, tile) < args->lower) {
            if (args->band_masses)
                owner->tile_sum[tile] = 0;
            break;
        }
        if (args->band_masses)
            owner->tile_sum[tile] = band_tile_masses(args, tile, worker);
        else
            gather_band(args, tile, worker);
        break;
    }
    case PASS_KEPT: {
        /* tile_max holds the largest valid logit here; it becomes m_t. */
        if (owner->tile_valid[tile] == 0 || tile_key_bound(row, owner, tile) < row->key_cutoff ||
            owner->tile_max[tile] < row->kept_floor) {
            owner->tile_sum[tile] = 0;
            owner->tile_max[tile] = -INFINITY;
            break;
        }
        float reference;
        owner->tile_sum[tile] = kept_mass(row, owner, tile, worker, &reference);
        owner->tile_max[tile] = reference;
        break;
    }
    case PASS_PROBS: {
        float *out = args->probs_row + tile * PSM_TILE;
        int64_t length = tile_length(row, tile);
        uint64_t mass_sum = owner->tile_sum[tile];
        uint64_t mass = owner->tile_prefix[tile] - (tile > 0 ? owner->tile_prefix[tile - 1] : 0);
        if (mass_sum == 0 || mass == 0) {
            for (int64_t i = 0; i < length; ++i)
                out[i] = 0.0f;
            break;
        }
        tile_weights(row, owner, tile, worker->logits, worker->weights);
        double tile_share = (double)mass / (double)args->total;
        for (int64_t i = 0; i < length; ++i)
            out[i] = (float)(((double)worker->weights[i] / (double)mass_sum) * tile_share);
        break;
    }
    }
}

/* Passes that gather into the worker's scratch (bins, band) start from empty
 * accumulators ... */
static void begin_pass(const cpu_pass_args *args, cpu_scratch *worker)
{
    if (args->pass == PASS_BINS) {
        memset(worker->bin_mass, 0, sizeof worker->bin_mass);
        worker->bin_tail = 0;
    }
    if (args->pass == PASS_BAND) {
        worker->gathered_count = 0;
        worker->gather_overflow = 0;
    }
}

/* ... and, when the tiles were spread over threads, the other workers'
 * accumulators are added to the row owner's. Sums are integers and the
 * gathered tokens are sorted later, so the order of the workers is free. */
static void merge_pass(const cpu_pass_args *args, cpu_scratch *owner, const cpu_scratch *worker)
{
    if (args->pass == PASS_BINS) {
        for (int b = 0; b < CPU_GAP_BINS; ++b)
            owner->bin_mass[b] += worker->bin_mass[b];
        owner->bin_tail += worker->bin_tail;
    }
    if (args->pass == PASS_BAND) {
        owner->gather_overflow |= worker->gather_overflow;
        for (int64_t i = 0; i < worker->gathered_count; ++i) {
            if (owner->gathered_count == CPU_GATHER_LIMIT) {
                owner->gather_overflow = 1;
                break;
            }
            owner->gathered[owner->gathered_count++] = worker->gathered[i];
        }
    }
}

static void run_pass(const cpu_state *state, const cpu_pass_args *args, int parallel)
{
    int64_t tiles = args->row->tiles;
    if (parallel && tiles > 1) {
        int team = 1;
#pragma omp parallel num_threads(state->threads)
        {
            cpu_scratch *worker = state->scratch[omp_get_thread_num()];
#pragma omp single
            team = omp_get_num_threads();
            begin_pass(args, worker);
#pragma omp for schedule(static)
            for (int64_t tile = 0; tile < tiles; ++tile)
                run_tile(args, tile, worker);
        }
        for (int t = 0; t < team; ++t)
            if (state->scratch[t] != args->owner)
                merge_pass(args, args->owner, state->scratch[t]);
    } else {
        begin_pass(args, args->owner);
        for (int64_t tile = 0; tile < tiles; ++tile)
            run_tile(args, tile, args->owner);
    }
}

/* Reduces the summary arrays: returns 1 for a good row (no NaN/+inf, some
 * valid logit) and sets *valid_out and *max_out (M). */
static int row_is_good(const cpu_row *row, const cpu_scratch *owner, int64_t *valid_out,
                       float *max_out)
{
    int64_t valid = 0;
    float max = -INFINITY;
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        if (owner->tile_bad[tile])
            return 0;
        if (owner->tile_valid[tile] > 0) {
            valid += owner->tile_valid[tile];
            max = owner->tile_max[tile] > max ? owner->tile_max[tile] : max;
        }
    }
    *valid_out = valid;
    *max_out = max;
    return valid > 0;
}

/* T_t for every tile as running sums; returns total. */
static uint64_t tile_masses(const cpu_row *row, cpu_scratch *owner)
{
    uint64_t running = 0;
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        uint64_t sum = owner->tile_sum[tile];
        if (sum != 0)
            running += psm_rescale_mass(
                sum, psm_scaled_gap(row->row_max, owner->tile_max[tile], row->scale));
        owner->tile_prefix[tile] = running;
    }
    return running;
}

/* ---- filters --------------------------------------------------------------- */

static void heap_sift_down(uint64_t *heap, int64_t size, int64_t at)
{
    for (;;) {
        int64_t smallest = at, left = 2 * at + 1, right = left + 1;
        if (left < size && heap[left] < heap[smallest])
            smallest = left;
        if (right < size && heap[right] < heap[smallest])
            smallest = right;
        if (smallest == at)
            return;
        uint64_t held = heap[at];
        heap[at] = heap[smallest];
        heap[smallest] = held;
        at = smallest;
    }
}

static int compare_keys_descending(const void *a, const void *b)
{
    uint64_t ka = *(const uint64_t *)a, kb = *(const uint64_t *)b;
    return ka < kb ? 1 : (ka > kb ? -1 : 0);
}

static int compare_ranked_descending(const void *a, const void *b)
{
    return compare_keys_descending(&((const cpu_ranked *)a)->key, &((const cpu_ranked *)b)->key);
}

/* The k largest rank keys among valid tokens (k <= CPU_HEAP_LIMIT, k smaller
 * than the valid count), left in owner->heap sorted descending. */
static void top_k_heap(const cpu_row *row, cpu_scratch *owner, int64_t k)
{
    uint64_t *heap = owner->heap;
    int64_t size = 0;
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        if (owner->tile_valid[tile] == 0)
            continue;
        if (size == k && tile_key_bound(row, owner, tile) <= heap[0])
            continue;
        int n;
        uint32_t start = (uint32_t)(tile * PSM_TILE);
        const float *logits = read_tile(row, owner, tile, owner->logits, &n);
        prefetch_share(next_row_tile(row, tile, PREFETCH_IN_HEAP), 0, n, n);
        int i = 0;
        /* Until the heap is full, every valid token goes in. */
        for (; i < n && size < k; ++i) {
            if (psm_logit_class(logits[i]) != PSM_LOGIT_VALID)
                continue;
            int64_t at = size++;
            heap[at] = psm_rank_key(logits[i], start + (uint32_t)i);
            while (at > 0 && heap[(at - 1) / 2] > heap[at]) {
                uint64_t held = heap[at];
                heap[at] = heap[(at - 1) / 2];
                heap[(at - 1) / 2] = held;
                at = (at - 1) / 2;
            }
        }
        if (i == n)
            continue;
        /* Then only the logits at or above the heap's least one can have a
         * larger key: they are selected (cpu_compact.h), and each is tested
         * against the heap's least key as it is when its turn comes. */
        int count = psm_cpu_select_at_least(logits + i, NULL, n - i, psm_rank_key_logit(heap[0]),
                                            owner->compact, NULL, owner->compact_index);
        for (int j = 0; j < count; ++j) {
            uint64_t key =
                psm_rank_key(owner->compact[j], start + (uint32_t)(i + owner->compact_index[j]));
            if (key > heap[0]) {
                heap[0] = key;
                heap_sift_down(heap, size, 0);
            }
        }
    }
    qsort(heap, (size_t)size, sizeof *heap, compare_keys_descending);
}

/* Highest digit whose bucket holds the token at which the running measure
 * (from *above, in rank order) reaches target; *above gains the measure of
 * the buckets above it. */
static int64_t radix_digit(const cpu_scratch *owner, int digit_bits, uint64_t *above,
                           uint64_t target)
{
    int64_t digit = ((int64_t)1 << digit_bits) - 1;
    for (; digit > 0; --digit) {
        if (owner->radix_count[digit] != 0 && *above + owner->radix_measure[digit] >= target)
            break;
        *above += owner->radix_measure[digit];
    }
    return digit;
}

/* The end of radix_cutoff once the tokens left (all sharing the first
 * `consumed` key bits) are gathered: further rounds over the array itself,
 * which is small, until few enough are left to sort. */
static uint64_t gathered_cutoff(cpu_scratch *owner, int64_t count, int consumed, uint64_t above,
                                uint64_t target, uint64_t fallback)
{
    cpu_ranked *items = owner->gathered;
    while (count > CPU_SORT_LIMIT && consumed < 64) {
        int digit_bits = 64 - consumed < CPU_RADIX_BITS ? 64 - consumed : CPU_RADIX_BITS;
        int shift = 64 - consumed - digit_bits;
        uint64_t mask = ((uint64_t)1 << digit_bits) - 1;
        memset(owner->radix_count, 0, sizeof owner->radix_count);
        memset(owner->radix_measure, 0, sizeof owner->radix_measure);
        for (int64_t i = 0; i < count; ++i) {
            uint64_t digit = (items[i].key >> shift) & mask;
            owner->radix_count[digit] += 1;
            owner->radix_measure[digit] += items[i].measure;
        }
        uint64_t digit = (uint64_t)radix_digit(owner, digit_bits, &above, target);
        int64_t kept = 0;
        for (int64_t i = 0; i < count; ++i)
            if (((items[i].key >> shift) & mask) == digit)
                items[kept++] = items[i];
        count = kept;
        consumed += digit_bits;
    }
    qsort(items, (size_t)count, sizeof items[0], compare_ranked_descending);
    for (int64_t i = 0; i < count; ++i) {
        above += items[i].measure;
        if (above >= target)
            return items[i].key;
    }
    /* Unreachable when the caller's guarantee holds. */
    return count > 0 ? items[count - 1].key : fallback;
}

/* Walks the valid tokens with lower <= key < upper in rank order, adding up
 * a measure (1 per token, or g_i) to `above` (the measure of the tokens
 * ranked before them), and returns the key of the token at which the sum
 * first reaches target (the first token when target is 0). The caller
 * guarantees that the sum reaches target within those tokens.
 * Radix select: each round histograms the next 11 bits of the keys that
 * share the prefix found so far; once the bucket holding the answer is
 * small enough it is gathered and sorted. Keys are unique (they hold the
 * token index), so the buckets always shrink. */
static uint64_t radix_cutoff(const cpu_row *row, cpu_scratch *owner, uint64_t lower,
                             uint64_t upper, int by_mass, uint64_t above, uint64_t target)
{
    uint64_t prefix = 0;
    int consumed = 0;
    int gather = 0;
    for (;;) {
        int digit_bits = 64 - consumed < CPU_RADIX_BITS ? 64 - consumed : CPU_RADIX_BITS;
        int shift = 64 - consumed - digit_bits;
        uint64_t range_low = consumed ? prefix << (64 - consumed) : 0;
        uint64_t floor_key = range_low > lower ? range_low : lower;
        int64_t gathered = 0;
        if (!gather) {
            memset(owner->radix_count, 0, sizeof owner->radix_count);
            memset(owner->radix_measure, 0, sizeof owner->radix_measure);
        }
        for (int64_t tile = 0; tile < row->tiles; ++tile) {
            if (owner->tile_valid[tile] == 0 || tile_key_bound(row, owner, tile) < floor_key)
                continue;
            int n;
            uint32_t start = (uint32_t)(tile * PSM_TILE);
            const float *logits = read_tile(row, owner, tile, owner->logits, &n);
            /* The first round measures every valid token: their g_i in one
             * vector pass; later rounds measure few, one by one. */
            int all_global = by_mass && consumed == 0;
            if (all_global)
                global_weights(row, logits, n, owner->weights);
            for (int i = 0; i < n; ++i) {
                float x = logits[i];
                if (psm_logit_class(x) != PSM_LOGIT_VALID)
                    continue;
                uint64_t key = psm_rank_key(x, start + (uint32_t)i);
                if (key < lower || key >= upper ||
                    (consumed && (key >> (64 - consumed)) != prefix))
                    continue;
                uint64_t measure = !by_mass ? 1 : all_global ? owner->weights[i] : global_weight(row, x);
                if (gather) {
                    owner->gathered[gathered].key = key;
                    owner->gathered[gathered].measure = measure;
                    ++gathered;
                } else {
                    uint64_t digit = (key >> shift) & (((uint64_t)1 << digit_bits) - 1);
                    owner->radix_count[digit] += 1;
                    owner->radix_measure[digit] += measure;
                }
            }
        }
        if (gather)
            return gathered_cutoff(owner, gathered, consumed, above, target, lower);
        int64_t digit = radix_digit(owner, digit_bits, &above, target);
        prefix = (prefix << digit_bits) | (uint64_t)digit;
        consumed += digit_bits;
        gather = owner->radix_count[digit] <= CPU_GATHER_LIMIT;
    }
}

/* The smallest logit x (at least -FLT_MAX) whose unclamped gap to the row
 * maximum is below limit (limit > 0, so the maximum itself qualifies). The
 * gap is a non-increasing function of the logit, so the logits that qualify
 * are those >= the answer, found by bisection on the ordered float bits. */
static float lowest_logit_within(const cpu_row *row, float limit)
{
    uint32_t low = psm_ordered_bits(-FLT_MAX), high = psm_ordered_bits(row->row_max);
    while (low < high) {
        uint32_t middle = low + (high - low) / 2;
        if (psm_unclamped_gap(row->row_max, psm_ordered_logit(middle), row->scale) < limit)
            high = middle;
        else
            low = middle + 1;
    }
    return psm_ordered_logit(low);
}

/* The key of the token at which the measure of `items` (rank keys with their
 * g_i), walked in rank order, first reaches need (>= 1, at most their sum):
 * a max-heap on the keys, popped until the sum reaches it. A popped item
 * goes to the end of the array (as in heapsort), so that the items stay. */
static void ranked_sift_down(cpu_ranked *heap, int64_t size, int64_t at)
{
    for (;;) {
        int64_t largest = at, left = 2 * at + 1, right = left + 1;
        if (left < size && heap[left].key > heap[largest].key)
            largest = left;
        if (right < size && heap[right].key > heap[largest].key)
            largest = right;
        if (largest == at)
            return;
        cpu_ranked held = heap[at];
        heap[at] = heap[largest];
        heap[largest] = held;
        at = largest;
    }
}

static uint64_t ranked_select(cpu_ranked *items, int64_t count, uint64_t need)
{
    for (int64_t at = count / 2 - 1; at >= 0; --at)
        ranked_sift_down(items, count, at);
    uint64_t sum = 0;
    while (count > 1) {
        sum += items[0].measure;
        if (sum >= need)
            return items[0].key;
        cpu_ranked held = items[0];
        items[0] = items[--count];
        items[count] = held;
        ranked_sift_down(items, count, 0);
    }
    return items[0].key; /* the last one reaches need when the caller's guarantee holds */
}

/* top-p's cutoff among the candidates (valid tokens with key >= lower).
 * One pass adds up the candidates' g-mass per gap bin (and so Z and the
 * target); the cutoff lies in the first bin where the running mass, in bin
 * order, reaches the target, since the bins follow the rank order. The pass
 * scatters only the tokens of the bins up to CPU_BIN_MARGIN past the
 * previous row's cutoff bin and sums the rest, and runs again over every bin
 * when the cutoff lies beyond. A second pass gathers the tokens of the
 * cutoff's bin, found by the range of logits that the bin covers, and the
 * cutoff is resolved among them. With want_masses (no min-p) that pass also
 * makes the kept tile masses (band_tile_masses), finished here, and
 * *masses_done says so; a bin with more tokens than the gather buffer holds
 * (many equal logits) is resolved by the radix select, restricted to the
 * bin's keys, and leaves the masses to the kept pass. */
static uint64_t top_p_filter(const cpu_state *state, const cpu_row *row, cpu_scratch *owner,
                             int parallel, uint64_t lower, float top_p, int want_masses,
                             int *masses_done)
{
    const int last_bin = CPU_GAP_BINS - 1;
    int estimate = owner->last_cutoff_bin;
    cpu_pass_args args = {.pass = PASS_BINS, .row = row, .owner = owner, .lower = lower};
    args.bin_limit = estimate >= 0 && estimate < last_bin - CPU_BIN_MARGIN
                         ? estimate + CPU_BIN_MARGIN
                         : last_bin;
    args.bin_edge = lowest_logit_within(row, (float)(args.bin_limit + 1) / CPU_BIN_SCALE);
    uint64_t target, above;
    int bin;
    for (;;) {
        run_pass(state, &args, parallel);
        uint64_t mass = owner->bin_tail;
        for (int b = 0; b <= args.bin_limit; ++b)
            mass += owner->bin_mass[b];
        target = psm_top_p_target(mass, top_p);
        /* target >= 1 (the top token alone weighs 2^B), so the bin found has
         * mass and tokens. */
        above = 0;
        bin = 0;
        while (bin < args.bin_limit && above + owner->bin_mass[bin] < target)
            above += owner->bin_mass[bin++];
        if (args.bin_limit == last_bin || above + owner->bin_mass[bin] >= target)
            break;
        args.bin_limit = last_bin;
    }
    owner->last_cutoff_bin = bin;
    /* Bins up to b hold the logits whose gap is below (b + 1) / CPU_BIN_SCALE
     * (the product gap x CPU_BIN_SCALE is exact). */
    args.pass = PASS_BAND;
    args.band_low =
        bin < last_bin ? lowest_logit_within(row, (float)(bin + 1) / CPU_BIN_SCALE) : -FLT_MAX;
    args.band_high = bin > 0 ? lowest_logit_within(row, (float)bin / CPU_BIN_SCALE) : INFINITY;
    args.band_masses = want_masses;
    run_pass(state, &args, parallel);
    *masses_done = 0;
    if (owner->gather_overflow) {
        uint64_t band_lower = (uint64_t)psm_ordered_bits(args.band_low) << 32;
        return radix_cutoff(row, owner, band_lower > lower ? band_lower : lower,
                            (uint64_t)psm_ordered_bits(args.band_high) << 32, 1, above, target);
    }
    uint64_t cutoff = ranked_select(owner->gathered, owner->gathered_count, target - above);
    if (want_masses) {
        for (int64_t i = 0; i < owner->gathered_count; ++i)
            if (owner->gathered[i].key >= cutoff)
                owner->tile_sum[owner->gathered[i].tile] += (uint64_t)owner->gathered[i].weight;
        for (int64_t tile = 0; tile < row->tiles; ++tile)
            if (owner->tile_sum[tile] == 0)
                owner->tile_max[tile] = -INFINITY;
        *masses_done = 1;
    }
    return cutoff;
}

/* How a filtered row's kept tile masses are made once its filters are set. */
typedef enum cpu_kept_source {
    KEPT_FROM_HEAP, /* the kept tokens are among owner->heap's: kept_masses_from_heap */
    KEPT_DONE,      /* top_p_filter made them */
    KEPT_BY_PASS    /* PASS_KEPT */
} cpu_kept_source;

/* Sets row->key_cutoff, row->min_weight and row->kept_floor from top-k,
 * top-p and min-p; says how the kept tile masses are to be made. */
static cpu_kept_source apply_filters(const cpu_state *state, cpu_row *row, cpu_scratch *owner,
                                     int parallel, int64_t valid, int32_t top_k, float top_p,
                                     float min_p)
{
    row->min_weight = psm_min_p_threshold(min_p, row->weight_bits);
    if (row->min_weight != 0)
        row->kept_floor =
            lowest_logit_within(row, psm_min_p_drop_gap(row->min_weight, row->weight_bits));
    uint64_t cutoff = 0;
    cpu_kept_source source = KEPT_BY_PASS;
    int top_k_by_heap = top_k > 0 && top_k < valid && top_k <= CPU_HEAP_LIMIT;
    row->prefetch_step = top_k_by_heap    ? PREFETCH_IN_HEAP
                         : top_p < 1.0f ? PREFETCH_IN_BINS
                                        : PREFETCH_IN_KEPT;
    if (top_k > 0 && top_k < valid) {
        if (top_k_by_heap) {
            top_k_heap(row, owner, top_k);
            cutoff = owner->heap[top_k - 1];
            source = KEPT_FROM_HEAP;
        } else {
            cutoff = radix_cutoff(row, owner, 0, UINT64_MAX, 0, 0, (uint64_t)top_k);
        }
    }
    if (top_p < 1.0f) {
        if (source == KEPT_FROM_HEAP) {
            uint64_t mass = 0;
            for (int32_t i = 0; i < top_k; ++i)
                mass += global_weight(row, psm_rank_key_logit(owner->heap[i]));
            uint64_t target = psm_top_p_target(mass, top_p);
            uint64_t running = 0;
            for (int32_t i = 0; i < top_k; ++i) {
                running += global_weight(row, psm_rank_key_logit(owner->heap[i]));
                if (running >= target) {
                    cutoff = owner->heap[i];
                    break;
                }
            }
        } else {
            int masses_done;
            cutoff = top_p_filter(state, row, owner, parallel, cutoff, top_p,
                                  row->min_weight == 0, &masses_done);
            if (masses_done)
                source = KEPT_DONE;
        }
    }
    row->key_cutoff = cutoff;
    return source;
}

/* m_t and S_t of the kept set when it lies in owner->heap (sorted by
 * descending key): the first kept token met in a tile is its largest, m_t.
 * Equal to PASS_KEPT's result, without reading the row again. */
static void kept_masses_from_heap(const cpu_row *row, cpu_scratch *owner, int64_t count)
{
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        owner->tile_sum[tile] = 0;
        owner->tile_max[tile] = -INFINITY;
    }
    for (int64_t i = 0; i < count && owner->heap[i] >= row->key_cutoff; ++i) {
        float x = psm_rank_key_logit(owner->heap[i]);
        if (row->min_weight != 0 && global_weight(row, x) < row->min_weight)
            continue;
        int64_t tile = (int64_t)psm_rank_key_token(owner->heap[i]) / PSM_TILE;
        if (owner->tile_max[tile] == -INFINITY)
            owner->tile_max[tile] = x;
        owner->tile_sum[tile] += psm_weight(psm_scaled_gap(owner->tile_max[tile], x, row->scale),
                                            row->weight_bits);
    }
}

/* ---- rows ------------------------------------------------------------------ */

/* Output row r's parameters (psm_resolve_row over the caller's host arrays). */
static psm_row_params resolve_params(const psm_request *request, int64_t r)
{
    return psm_resolve_row(r, psm_request_per_row(&request->params),
                           psm_request_row_scalars(request),
                           psm_request_row_arrays(&request->params));
}

static const unsigned char *row_data(const psm_tensor *logits, int64_t logits_row)
{
    return (const unsigned char *)logits->data +
           (size_t)logits_row * (size_t)logits->row_stride * dtype_size(logits->dtype);
}

static void init_row(cpu_row *row, const psm_tensor *logits, int64_t r)
{
    row->data = row_data(logits, r);
    row->dtype = logits->dtype;
    row->vocab = logits->vocab;
    row->tiles = (logits->vocab + PSM_TILE - 1) / PSM_TILE;
    row->weight_bits = psm_weight_bits(logits->vocab);
    row->scale = 0.0f;
    row->row_max = -INFINITY;
    row->filtered = 0;
    row->key_cutoff = 0;
    row->min_weight = 0;
    row->kept_floor = -FLT_MAX;
    row->next_data = NULL;
    row->prefetch_step = PREFETCH_IN_KEPT;
}

/* Is row r bad (checking mode)? Out-of-range parameters, a NaN/+inf, or no
 * valid logit. */
static int row_check_fails(const cpu_state *state, const psm_request *request, int64_t r,
                           cpu_scratch *owner, int parallel)
{
    psm_row_params params = resolve_params(request, r);
    if (!params.valid)
        return 1;
    cpu_row row;
    init_row(&row, &request->logits, params.logits_row);
    cpu_pass_args args = {.pass = PASS_SUMMARY, .row = &row, .owner = owner};
    run_pass(state, &args, parallel);
    int64_t valid;
    float max;
    return !row_is_good(&row, owner, &valid, &max);
}

static void write_bad_row(const psm_request *request, int64_t r, int want_probs)
{
    if (want_probs) {
        float *out = (float *)request->probs.data + r * request->probs.row_stride;
        for (int64_t i = 0; i < request->logits.vocab; ++i)
            out[i] = NAN;
        return;
    }
    int64_t samples = request->params.num_samples;
    int32_t *tokens = (int32_t *)request->tokens.data + r * samples;
    float *logprobs = request->logprobs.data ? (float *)request->logprobs.data + r * samples : NULL;
    for (int64_t j = 0; j < samples; ++j) {
        tokens[j] = -1;
        if (logprobs)
            logprobs[j] = NAN;
    }
}

/* The greedy token: the first index holding M. */
static int64_t greedy_token(const cpu_row *row, cpu_scratch *owner)
{
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        if (owner->tile_valid[tile] == 0 || owner->tile_max[tile] != row->row_max)
            continue;
        int n;
        const float *logits = read_tile(row, owner, tile, owner->logits, &n);
        for (int i = 0; i < n; ++i)
            if (logits[i] == row->row_max)
                return tile * PSM_TILE + i;
    }
    return -1; /* unreachable for a good row: M is some valid logit */
}

static void write_greedy_row(const psm_request *request, int64_t r, int64_t token, int want_probs)
{
    if (want_probs) {
        float *out = (float *)request->probs.data + r * request->probs.row_stride;
        for (int64_t i = 0; i < request->logits.vocab; ++i)
            out[i] = 0.0f;
        out[token] = 1.0f;
        return;
    }
    int64_t samples = request->params.num_samples;
    int32_t *tokens = (int32_t *)request->tokens.data + r * samples;
    float *logprobs = request->logprobs.data ? (float *)request->logprobs.data + r * samples : NULL;
    for (int64_t j = 0; j < samples; ++j) {
        tokens[j] = (int32_t)token;
        if (logprobs)
            logprobs[j] = 0.0f;
    }
}

/* The running weight sums of a tile (w_0, w_0 + w_1, ...), from the row
 * owner's cache or computed into it. */
static const uint64_t *tile_running_sums(const cpu_row *row, cpu_scratch *owner, int64_t tile)
{
    for (int slot = 0; slot < CPU_CACHED_TILES; ++slot)
        if (owner->cached_tile[slot] == tile)
            return owner->cached_running[slot];
    int slot = owner->next_slot;
    owner->next_slot = (slot + 1) % CPU_CACHED_TILES;
    uint64_t *running = owner->cached_running[slot];
    tile_weights(row, owner, tile, owner->logits, running);
    int n = (int)tile_length(row, tile);
    for (int i = 1; i < n; ++i)
        running[i] += running[i - 1];
    owner->cached_tile[slot] = tile;
    return running;
}

static void draw_row(const psm_request *request, const cpu_row *row, cpu_scratch *owner, int64_t r,
                     const psm_row_params *params, uint64_t total)
{
    int64_t samples = request->params.num_samples;
    int32_t *tokens = (int32_t *)request->tokens.data + r * samples;
    float *logprobs = request->logprobs.data ? (float *)request->logprobs.data + r * samples : NULL;
    for (int slot = 0; slot < CPU_CACHED_TILES; ++slot)
        owner->cached_tile[slot] = -1;
    for (int64_t j = 0; j < samples; ++j) {
        psm_draw_bits bits =
            psm_sample_bits(params->seed, params->offset, params->stream, (uint32_t)j);
        int64_t tile =
            psm_first_above(owner->tile_prefix, (int32_t)row->tiles, psm_pick(bits.tile, total));
        uint64_t mass = owner->tile_prefix[tile] - (tile > 0 ? owner->tile_prefix[tile - 1] : 0);
        const uint64_t *running = tile_running_sums(row, owner, tile);
        int64_t n = tile_length(row, tile);
        uint64_t tile_sum = running[n - 1];
        /* The token is the first whose running sum exceeds b. */
        int64_t chosen = psm_first_above(running, (int32_t)n, psm_pick(bits.token, tile_sum));
        uint64_t weight = running[chosen] - (chosen > 0 ? running[chosen - 1] : 0);
        tokens[j] = (int32_t)(tile * PSM_TILE + chosen);
        if (logprobs)
            logprobs[j] = (float)(log((double)weight) - log((double)tile_sum) + log((double)mass) -
                                  log((double)total));
    }
}

/* One row, sampled (want_probs 0) or written out as probabilities. */
static void process_row(const cpu_state *state, const psm_request *request, int64_t r,
                        cpu_scratch *owner, int parallel, int want_probs, int64_t next_row)
{
    psm_row_params params = resolve_params(request, r);
    if (!params.valid) {
        write_bad_row(request, r, want_probs);
        return;
    }
    cpu_row row;
    init_row(&row, &request->logits, params.logits_row);
    if (next_row >= 0) {
        psm_row_params next = resolve_params(request, next_row);
        if (next.valid)
            row.next_data = row_data(&request->logits, next.logits_row);
    }
    int greedy = psm_is_greedy(params.temperature);
    int top_k_on = params.top_k > 0 && params.top_k < row.vocab;
    int plain = !greedy && !top_k_on && !(params.top_p < 1.0f) && !(params.min_p > 0.0f);
    if (!greedy)
        row.scale = psm_inverse_temperature_scale(params.temperature);

    cpu_pass_args args = {.pass = plain ? PASS_PLAIN : PASS_SUMMARY, .row = &row, .owner = owner};
    run_pass(state, &args, parallel);
    int64_t valid;
    if (!row_is_good(&row, owner, &valid, &row.row_max)) {
        write_bad_row(request, r, want_probs);
        return;
    }
    if (greedy) {
        write_greedy_row(request, r, greedy_token(&row, owner), want_probs);
        return;
    }
    if (!plain) {
        row.filtered = 1;
        switch (apply_filters(state, &row, owner, parallel, valid, params.top_k, params.top_p,
                              params.min_p)) {
        case KEPT_FROM_HEAP:
            kept_masses_from_heap(&row, owner, params.top_k);
            break;
        case KEPT_DONE:
            break;
        case KEPT_BY_PASS:
            args.pass = PASS_KEPT;
            run_pass(state, &args, parallel);
            break;
        }
    }
    uint64_t total = tile_masses(&row, owner);
    if (want_probs) {
        args.pass = PASS_PROBS;
        args.total = total;
        args.probs_row = (float *)request->probs.data + r * request->probs.row_stride;
        run_pass(state, &args, parallel);
        return;
    }
    draw_row(request, &row, owner, r, &params, total);
}

/* ---- scratch --------------------------------------------------------------- */

static void free_tile_arrays(cpu_tile_arrays *arrays)
{
    psm_free(arrays->tile_sum);
    psm_free(arrays->tile_prefix);
    psm_free(arrays->tile_max);
    psm_free(arrays->tile_valid);
    psm_free(arrays->tile_bad);
    psm_free(arrays->tile_raw);
    memset(arrays, 0, sizeof *arrays);
}

static void free_scratch(cpu_scratch *scratch)
{
    if (!scratch)
        return;
    free_tile_arrays(&scratch->owned);
    psm_free(scratch);
}

static void use_tile_arrays(cpu_scratch *scratch, const cpu_tile_arrays *arrays)
{
    scratch->tile_sum = arrays->tile_sum;
    scratch->tile_prefix = arrays->tile_prefix;
    scratch->tile_max = arrays->tile_max;
    scratch->tile_valid = arrays->tile_valid;
    scratch->tile_bad = arrays->tile_bad;
    scratch->tile_raw = arrays->tile_raw;
}

/* Grows every thread's own tile arrays to hold a row of `vocab` tokens. */
static psm_status ensure_capacity(cpu_state *state, int64_t vocab)
{
    int64_t tiles = (vocab + PSM_TILE - 1) / PSM_TILE;
    for (int t = 0; t < state->threads; ++t) {
        cpu_scratch *scratch = state->scratch[t];
        if (scratch->owned_tiles >= tiles)
            continue;
        size_t count = (size_t)tiles;
        cpu_tile_arrays grown = {
            .tile_sum = psm_alloc(count * sizeof(uint64_t)),
            .tile_prefix = psm_alloc(count * sizeof(uint64_t)),
            .tile_max = psm_alloc(count * sizeof(float)),
            .tile_valid = psm_alloc(count * sizeof(int32_t)),
            .tile_bad = psm_alloc(count * sizeof(uint8_t)),
            .tile_raw = psm_alloc(count * sizeof(uint8_t)),
        };
        if (!grown.tile_sum || !grown.tile_prefix || !grown.tile_max || !grown.tile_valid ||
            !grown.tile_bad || !grown.tile_raw) {
            free_tile_arrays(&grown);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate tile workspace for vocab %lld",
                                 (long long)vocab);
        }
        free_tile_arrays(&scratch->owned);
        scratch->owned = grown;
        scratch->owned_tiles = tiles;
    }
    return PSM_OK;
}

/* A caller's workspace holds every thread's tile arrays, each array starting
 * on a cache line (so that threads never share one), after up to 63 bytes
 * that align the first. */
#define CPU_LINE 64

static size_t line_round(size_t bytes)
{
    return (bytes + CPU_LINE - 1) / CPU_LINE * CPU_LINE;
}

static size_t thread_workspace_bytes(int64_t vocab)
{
    size_t tiles = (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
    return 2 * line_round(tiles * sizeof(uint64_t)) + line_round(tiles * sizeof(float)) +
           line_round(tiles * sizeof(int32_t)) + 2 * line_round(tiles * sizeof(uint8_t));
}

static size_t workspace_bytes(const cpu_state *state, int64_t vocab)
{
    return (CPU_LINE - 1) + (size_t)state->threads * thread_workspace_bytes(vocab);
}

static void carve_workspace(cpu_state *state, void *workspace, int64_t vocab)
{
    size_t tiles = (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
    unsigned char *next =
        (unsigned char *)(((uintptr_t)workspace + CPU_LINE - 1) / CPU_LINE * CPU_LINE);
    for (int t = 0; t < state->threads; ++t) {
        cpu_tile_arrays arrays;
        arrays.tile_sum = (uint64_t *)next;
        next += line_round(tiles * sizeof(uint64_t));
        arrays.tile_prefix = (uint64_t *)next;
        next += line_round(tiles * sizeof(uint64_t));
        arrays.tile_max = (float *)next;
        next += line_round(tiles * sizeof(float));
        arrays.tile_valid = (int32_t *)next;
        next += line_round(tiles * sizeof(int32_t));
        arrays.tile_bad = next;
        next += line_round(tiles * sizeof(uint8_t));
        arrays.tile_raw = next;
        next += line_round(tiles * sizeof(uint8_t));
        use_tile_arrays(state->scratch[t], &arrays);
    }
}

/* The running call's tile arrays: the caller's workspace (which core checked
 * is large enough), or the context's own, grown if needed. */
static psm_status prepare_tile_arrays(cpu_state *state, const psm_request *request)
{
    if (request->params.workspace) {
        carve_workspace(state, request->params.workspace, request->logits.vocab);
        return PSM_OK;
    }
    psm_status status = ensure_capacity(state, request->logits.vocab);
    if (status != PSM_OK)
        return status;
    for (int t = 0; t < state->threads; ++t)
        use_tile_arrays(state->scratch[t], &state->scratch[t]->owned);
    return PSM_OK;
}

/* ---- the backend table ----------------------------------------------------- */

static int cpu_probe(int *device_count, int *auto_device_count, char *reason,
                     size_t reason_size)
{
    *device_count = 1;
    *auto_device_count = 1;
    if (reason && reason_size > 0)
        snprintf(reason, reason_size, "CPU (%d threads available)", omp_get_max_threads());
    return 1;
}

static void cpu_destroy(void *opaque)
{
    cpu_state *state = opaque;
    if (!state)
        return;
    if (state->scratch) {
        for (int t = 0; t < state->threads; ++t)
            free_scratch(state->scratch[t]);
        psm_free(state->scratch);
    }
    psm_free(state);
}

static psm_status cpu_create(const psm_context_options *options, int device_index,
                             void **state_out, char *device_name, size_t device_name_size)
{
    if (device_index != 0)
        return psm_set_error(PSM_ERR_NO_DEVICE,
                             "cpu backend: device %d asked for, the CPU is device 0 only",
                             device_index);
    cpu_state *state = psm_alloc_zeroed(1, sizeof *state);
    if (!state)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cpu backend: cannot allocate its state");
    state->threads = options->cpu_threads > 0 ? options->cpu_threads : omp_get_max_threads();
    if (state->threads < 1)
        state->threads = 1;
    state->scratch = psm_alloc_zeroed((size_t)state->threads, sizeof *state->scratch);
    if (!state->scratch) {
        cpu_destroy(state);
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cpu backend: cannot allocate its state");
    }
    for (int t = 0; t < state->threads; ++t) {
        /* Cache-line aligned so that threads never share a line. */
        size_t size = (sizeof(cpu_scratch) + 63) / 64 * 64;
        state->scratch[t] = psm_alloc_aligned(64, size);
        if (!state->scratch[t]) {
            cpu_destroy(state);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate per-thread workspace");
        }
        memset(state->scratch[t], 0, sizeof(cpu_scratch));
        state->scratch[t]->last_cutoff_bin = -1;
    }
    if (device_name && device_name_size > 0)
        snprintf(device_name, device_name_size, "CPU (%d thread%s)", state->threads,
                 state->threads == 1 ? "" : "s");
    *state_out = state;
    return PSM_OK;
}

static psm_status cpu_reserve(void *opaque, int64_t rows, int64_t vocab, int64_t num_samples)
{
    /* Only the vocab shapes the workspace: rows go one per thread at a time,
     * and outputs are the caller's. */
    (void)rows;
    (void)num_samples;
    return ensure_capacity(opaque, vocab);
}

/* Checking mode: finds the first bad row without writing anything. */
static psm_status check_rows(const cpu_state *state, psm_request *request)
{
    int64_t rows = request->rows;
    int64_t first_bad = rows;
    if (rows >= state->threads) {
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 8) reduction(min : first_bad)
        for (int64_t r = 0; r < rows; ++r)
            if (r < first_bad &&
                row_check_fails(state, request, r, state->scratch[omp_get_thread_num()], 0))
                first_bad = r;
    } else {
        for (int64_t r = 0; r < rows && first_bad == rows; ++r)
            if (row_check_fails(state, request, r, state->scratch[0], 1))
                first_bad = r;
    }
    if (first_bad == rows)
        return PSM_OK;
    request->first_bad_row = first_bad;
    psm_row_params params = resolve_params(request, first_bad);
    return psm_set_error(PSM_ERR_BAD_ROW,
                         params.valid ? "row %lld has a NaN or +inf logit, or no finite logit"
                                      : "row %lld has a sampling parameter or row index out "
                                        "of range",
                         (long long)first_bad);
}

static psm_status cpu_run(void *opaque, psm_request *request, int want_probs)
{
    cpu_state *state = opaque;
    psm_status status = prepare_tile_arrays(state, request);
    if (status != PSM_OK)
        return status;
    if (request->check_rows) {
        status = check_rows(state, request);
        if (status != PSM_OK)
            return status;
    }
    int64_t rows = request->rows;
    if (rows >= state->threads) {
        /* Threads take runs of consecutive rows, so that each knows its next
         * row and a filtered row can prefetch it; runs are short enough to
         * leave a few per thread for balance. */
        int64_t run = rows / ((int64_t)state->threads * 8);
        run = run < 1 ? 1 : run > CPU_ROW_RUN ? CPU_ROW_RUN : run;
        int64_t runs = (rows + run - 1) / run;
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 1)
        for (int64_t k = 0; k < runs; ++k) {
            int64_t end = (k + 1) * run < rows ? (k + 1) * run : rows;
            for (int64_t r = k * run; r < end; ++r)
                process_row(state, request, r, state->scratch[omp_get_thread_num()], 0,
                            want_probs, r + 1 < end ? r + 1 : -1);
        }
    } else {
        for (int64_t r = 0; r < rows; ++r)
            process_row(state, request, r, state->scratch[0], 1, want_probs, -1);
    }
    return PSM_OK;
}

static psm_status cpu_workspace_size(void *opaque, const psm_request *request, int probs_mode,
                                     size_t *bytes)
{
    (void)probs_mode; /* both write their outputs directly */
    *bytes = workspace_bytes(opaque, request->logits.vocab);
    return PSM_OK;
}

static psm_status cpu_sample(void *state, psm_request *request)
{
    return cpu_run(state, request, 0);
}

static psm_status cpu_probs(void *state, psm_request *request)
{
    return cpu_run(state, request, 1);
}

static psm_status cpu_synchronize(void *state)
{
    (void)state; /* every call has finished when it returns */
    return PSM_OK;
}

const psm_backend_ops psm_cpu_ops = {
    .api_version = PSM_BACKEND_API_VERSION,
    .id = PSM_BACKEND_CPU,
    .probe = cpu_probe,
    .create = cpu_create,
    .destroy = cpu_destroy,
    .reserve = cpu_reserve,
    .workspace_size = cpu_workspace_size,
    .sample = cpu_sample,
    .probs = cpu_probs,
    .synchronize = cpu_synchronize,
};
