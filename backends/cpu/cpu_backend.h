/*
 * cpu_backend.h: the OpenMP CPU backend's private header: its state, a
 * row's description, the passes, and what its files share. The backend is
 * the reference implementation of docs/SAMPLING.md, in four files by job:
 *   cpu_tiles.c    reading tiles, the per-token weight loops, the per-tile
 *                  passes over a row (on one thread or all), tile masses
 *   cpu_select.c   the filters: top-k (heap, radix select), top-p (gap
 *                  bins, band), min-p, and how the kept masses are made
 *   cpu_rows.c     one row from its parameters to its outputs: greedy,
 *                  filters, the draw, psm_probs, checking mode
 *   cpu_backend.c  the state, the workspace (own or the caller's), the
 *                  batch loop and the operations table
 * Every quantity that decides a token comes from
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
 * is seen (or comes from the caller's workspace for one call).
 */
#ifndef PSM_CPU_BACKEND_H
#define PSM_CPU_BACKEND_H

/* Vector floor (cpu_weight.h) needs GCC told that floating-point operations
 * do not trap: the flag changes no value (rounding, NaNs, infinities and
 * signed zeros stay IEEE's; contraction stays off), only what may be
 * reordered or vectorised. It must cover every file of the backend (each
 * includes this header first) so that the inline helpers share the hot
 * loops' options and inline into them. */
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
#include <stdint.h>
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

/* A row's processed logits and its token counts (logit processing only),
 * vocab entries each; counts are all zero between rows. */
typedef struct cpu_processing_arrays {
    float *logits;
    uint32_t *counts;
} cpu_processing_arrays;

/* Buffers for the ranks of a row's drawn tokens (top-N logprobs with
 * sampled_ranks), num_samples entries each. */
typedef struct cpu_rank_arrays {
    uint64_t *keys;
    uint64_t *sorted;
    int64_t *above;
} cpu_rank_arrays;

typedef struct cpu_scratch {
    cpu_tile_arrays owned;  /* the context's, for owned_tiles tiles */
    int64_t owned_tiles;
    cpu_processing_arrays owned_processing; /* the context's, for owned_processing_vocab */
    int64_t owned_processing_vocab;
    cpu_processing_arrays processing;       /* the running call's */
    cpu_rank_arrays owned_ranks;            /* the context's, for owned_rank_samples */
    int64_t owned_rank_samples;
    cpu_rank_arrays ranks;                  /* the running call's */
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
    /* psm_verify (cpu_verify.c): a node's target weights, the residual and a
     * draft node's weights, vocab entries each, for owned_verify_vocab. */
    uint64_t *verify_target;
    uint64_t *verify_residual;
    uint64_t *verify_draft;
    int64_t owned_verify_vocab;
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
    float kept_floor;    /* logits below it are not kept: with min-p, they fail it
                          * (psm_min_p_drop_gap); llama.cpp's order sets it to
                          * the last logit of its min-p prefix */
    /* The next row this thread will process (NULL: none known), and the
     * step of a filtered row that prefetches it, tile by tile, while it
     * computes from cache: the first one after the summary pass that reads
     * every tile. */
    const unsigned char *next_data;
    cpu_prefetch_step prefetch_step;
} cpu_row;

/* ---- small helpers of every file ------------------------------------------ */

static inline size_t dtype_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

/* Element i of a row of logits of this dtype, widened to float (exactly:
 * every f16 and bf16 is a float), before psm_read_logit: the backend's one
 * reader of its input. Called with a constant dtype it inlines to the
 * conversion alone, so that the tile loops that widen with it vectorise. */
static inline float cpu_element(const unsigned char *data, psm_dtype dtype, int64_t i)
{
    if (dtype == PSM_DTYPE_F32)
        return ((const float *)data)[i];
    const uint16_t bits = ((const uint16_t *)data)[i];
    return dtype == PSM_DTYPE_BF16 ? psm_bf16_to_float(bits) : psm_f16_to_float(bits);
}

/* Element i as the contract reads it (psm_read_logit). */
static inline float cpu_logit_at(const unsigned char *data, psm_dtype dtype, int64_t i)
{
    return psm_read_logit(cpu_element(data, dtype, i));
}

static inline int64_t tile_length(const cpu_row *row, int64_t tile)
{
    int64_t start = tile * PSM_TILE;
    int64_t left = row->vocab - start;
    return left < PSM_TILE ? left : PSM_TILE;
}

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
static inline cpu_ahead next_row_tile(const cpu_row *row, int64_t tile, cpu_prefetch_step step)
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

/* g_i: a token's weight against the row maximum. */
static inline uint64_t global_weight(const cpu_row *row, float x)
{
    return psm_weight(psm_scaled_gap(row->row_max, x, row->scale), row->weight_bits);
}

/* The largest rank key a tile can hold: its largest valid logit at its first
 * index. Tiles below a cutoff are skipped by it. */
static inline uint64_t tile_key_bound(const cpu_row *row, const cpu_scratch *owner, int64_t tile)
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

/* ---- passes ---------------------------------------------------------------- */

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
    PASS_MASS,      /* Z: the g-mass of every valid token, into bin_tail */
    PASS_PROBS      /* write the row's probabilities */
} cpu_pass;

typedef struct cpu_pass_args {
    cpu_pass pass;
    const cpu_row *row;
    cpu_scratch *owner;
    uint64_t lower;      /* PASS_BINS, PASS_BAND: candidates have keys >= lower ... */
    /* ... and, when not 0, g_i >= survivor_weight (vLLM's order: min-p's
     * survivors; then row->kept_floor is min-p's floor); the others weigh 0
     * in the bins and in the band's walk. */
    uint64_t survivor_weight;
    int bin_limit;       /* PASS_BINS: bins past it are added up as one ... */
    float bin_edge;      /* ... the bins of the logits below this */
    float band_low;      /* PASS_BAND */
    float band_high;     /* PASS_BAND */
    int band_masses;     /* PASS_BAND */
    /* PASS_BAND with band_masses: the scale of the tile weights, the row's
     * temperature's (row->scale is the filters' scale, which llama.cpp's
     * order sets to temperature 1 while it filters). */
    float mass_scale;
    uint64_t total;      /* PASS_PROBS */
    float *probs_row;    /* PASS_PROBS */
} cpu_pass_args;

/* How a filtered row's kept tile masses are made once its filters are set. */
typedef enum cpu_kept_source {
    KEPT_FROM_HEAP, /* the kept tokens are among owner->heap's: cpu_kept_masses_from_heap */
    KEPT_DONE,      /* top_p_filter made them */
    KEPT_BY_PASS    /* PASS_KEPT */
} cpu_kept_source;

/* ---- cpu_tiles.c ------------------------------------------------------------ */

const float *cpu_read_tile(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                           float *buffer, int *n_out);
void cpu_global_weights(const cpu_row *row, const float *x, int n, uint64_t *g);
uint64_t cpu_global_mass(const cpu_row *row, const float *x, int n);
uint64_t cpu_tile_weights(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                          float *buffer, uint64_t *weights);
void cpu_run_pass(const cpu_state *state, const cpu_pass_args *args, int parallel);
int cpu_row_is_good(const cpu_row *row, const cpu_scratch *owner, int64_t *valid_out,
                    float *max_out);
uint64_t cpu_tile_masses(const cpu_row *row, cpu_scratch *owner);

/* ---- cpu_select.c ----------------------------------------------------------- */

cpu_kept_source cpu_apply_filters(const cpu_state *state, cpu_row *row, cpu_scratch *owner,
                                  int parallel, int64_t valid, int32_t top_k, float top_p,
                                  float min_p, int32_t filter_order);
void cpu_kept_masses_from_heap(const cpu_row *row, cpu_scratch *owner, int64_t count);

/* ---- cpu_logprobs.c --------------------------------------------------------- */

void cpu_write_bad_top_logprobs(const psm_request *request, int64_t r);
void cpu_top_logprobs(const psm_request *request, const cpu_row *row, const cpu_scratch *owner,
                      int64_t r, int64_t logits_row, uint64_t total, int greedy);

/* ---- cpu_rows.c ------------------------------------------------------------- */

psm_row_params cpu_resolve_params(const psm_request *request, int64_t r);
int cpu_row_check_fails(const cpu_state *state, const psm_request *request, int64_t r,
                        cpu_scratch *owner, int parallel);
void cpu_process_row(const cpu_state *state, const psm_request *request, int64_t r,
                     cpu_scratch *owner, int parallel, int want_probs, int64_t next_row);

/* ---- speculative verification ---------------------------------------------- */

/* cpu_rows.c: a row of a tensor as the passes read it, and a good row's
 * greedy token (after its summary pass). */
void cpu_init_tensor_row(cpu_row *row, const psm_tensor *tensor, int64_t tensor_row);
int64_t cpu_greedy_token(const cpu_row *row, cpu_scratch *owner);
/* cpu_backend.c: every thread's own tile arrays and verification arrays,
 * grown to rows of `vocab` tokens. */
psm_status cpu_prepare_verify(cpu_state *state, int64_t vocab);
/* cpu_verify.c: the backend's psm_verify. */
psm_status cpu_verify(void *state, psm_verify_request *request);

/* ---- sharded sampling ------------------------------------------------------ */

/* cpu_sharded.c: the passes of a sharded call over its shard. */
psm_status cpu_shard_pass(void *state, const psm_tensor *logits,
                          const psm_shard_geometry *geometry, const psm_shard_item *items,
                          int64_t item_count, const psm_u64 *tile_keys, psm_u64 *out);

#endif /* PSM_CPU_BACKEND_H */
