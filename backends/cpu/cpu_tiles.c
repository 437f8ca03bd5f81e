/* cpu_tiles.c: reading tiles, the per-token weight loops and the per-tile
 * passes over a row (cpu_backend.h describes the backend). */
#include "cpu_backend.h"

/* ---- reading tiles --------------------------------------------------------- */

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
static void widen_bf16(const unsigned char *in, float *out, int n)
{
#pragma omp simd
    for (int i = 0; i < n; ++i)
        out[i] = cpu_element(in, PSM_DTYPE_BF16, i);
}

static void widen_f16(const unsigned char *in, float *out, int n)
{
    for (int i = 0; i < n; ++i)
        out[i] = cpu_element(in, PSM_DTYPE_F16, i);
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
        widen_bf16(row->data + start * 2, x, n);
        break;
    case PSM_DTYPE_F16:
    default:
        widen_f16(row->data + start * 2, x, n);
        break;
    }
    if (raw_out)
        *raw_out = 0;
    return classify_tile(x, x, n, max_out, bad_out, &changed);
}

/* A tile of a row whose summary pass has run, as the contract reads it: the
 * row's own memory when it holds the tile as read (owner->tile_raw), else a
 * copy read into buffer. */
const float *cpu_read_tile(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
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

/* The clones above are called through a plain function: clang 14 gives a
 * target_clones function that other files declare without the attribute no
 * symbol they can link to, and fuzz/run.sh builds with clang 14. */
void cpu_global_weights(const cpu_row *row, const float *x, int n, uint64_t *g)
{
    global_weights(row, x, n, g);
}

/* The sum of the g_i of n logits (masked ones weigh 0). */
uint64_t cpu_global_mass(const cpu_row *row, const float *x, int n)
{
    cpu_ahead none = {NULL, 0};
    return plain_weight_sum(x, n, row->row_max, row->scale, row->weight_bits, none);
}

/* Tile weights of a filtered row: w_i against the largest kept logit of the
 * tile for kept tokens, 0 for the rest. Returns S_t, and m_t in *reference. */
static uint64_t kept_weights(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                             float *buffer, uint64_t *weights, float *reference)
{
    int n;
    const float *x = cpu_read_tile(row, owner, tile, buffer, &n);
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
 * maximum is m_t, and their weights are summed in one vector pass. A
 * kept_floor without min-p (llama.cpp's order: its min-p prefix's last
 * logit) gathers the same way, so that the few kept tokens alone are
 * weighed. */
static uint64_t kept_mass(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                          cpu_scratch *worker, float *reference)
{
    int n;
    uint32_t start = (uint32_t)(tile * PSM_TILE);
    const float *x = cpu_read_tile(row, owner, tile, worker->logits, &n);
    uint64_t cutoff = row->key_cutoff;
    cpu_ahead ahead = next_row_tile(row, tile, PREFETCH_IN_KEPT);
    if (row->min_weight == 0 && row->kept_floor == -FLT_MAX) {
        float tile_max = owner->tile_max[tile];
        uint64_t sum = cut_weight_sum(x, n, start, tile_max, row->scale, row->weight_bits, cutoff,
                                      ahead);
        *reference = sum != 0 ? tile_max : -INFINITY;
        return sum;
    }
    prefetch_share(ahead, 0, n, n);
    float *kept = worker->compact;
    int count = select_candidates(x, n, start, row->kept_floor, cutoff, 0, worker);
    if (row->min_weight != 0)
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
uint64_t cpu_tile_weights(const cpu_row *row, const cpu_scratch *owner, int64_t tile,
                          float *buffer, uint64_t *weights)
{
    if (row->filtered) {
        float reference;
        return kept_weights(row, owner, tile, buffer, weights, &reference);
    }
    int n;
    const float *x = cpu_read_tile(row, owner, tile, buffer, &n);
    return plain_weights(x, n, owner->tile_max[tile], row->scale, row->weight_bits, weights);
}

/* ---- per-tile passes ------------------------------------------------------- */

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

/* A band token's measure in top-p's walk: g_i, or 0 for a token that is not
 * one of min-p's survivors (PASS_BINS weighs it 0 too). */
static uint64_t band_measure(const cpu_pass_args *args, float x)
{
    uint64_t g = global_weight(args->row, x);
    return g < args->survivor_weight ? 0 : g;
}

/* PASS_BAND without masses: the tile's band tokens, found chunk by chunk
 * after a vector test. */
static void gather_band(const cpu_pass_args *args, int64_t tile, cpu_scratch *worker)
{
    const cpu_row *row = args->row;
    int n;
    uint32_t start = (uint32_t)(tile * PSM_TILE);
    const float *logits = cpu_read_tile(row, args->owner, tile, worker->logits, &n);
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
                gather_one(worker, key, band_measure(args, x[i]), 0.0f, tile);
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
    const float *x = cpu_read_tile(row, args->owner, tile, worker->logits, &n);
    float *candidates = worker->compact, *weights = worker->masses;
    int count = select_candidates(x, n, start, args->band_low, args->lower, 1, worker);
    uint64_t sum = weights_at_least(candidates, count, args->owner->tile_max[tile],
                                    args->mass_scale, row->weight_bits, args->band_high, weights);
    for (int j = 0; j < count; ++j)
        if (candidates[j] < args->band_high)
            gather_one(worker,
                       psm_rank_key(candidates[j], start + (uint32_t)worker->compact_index[j]),
                       band_measure(args, candidates[j]), weights[j], tile);
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
        if (args->survivor_weight != 0 && owner->tile_max[tile] < row->kept_floor)
            break;
        uint32_t start = (uint32_t)(tile * PSM_TILE);
        const float *x = cpu_read_tile(row, owner, tile, worker->logits, &n);
        cpu_ahead ahead = next_row_tile(row, tile, PREFETCH_IN_BINS);
        if (args->survivor_weight != 0) {
            /* min-p's survivors lie at or above its floor: those tokens
             * alone are weighed, and binned with their g_i or 0. The
             * caller asks for every bin (bin_limit is the last). */
            prefetch_share(ahead, 0, n, n);
            int count = select_candidates(x, n, start, row->kept_floor, args->lower, 0, worker);
            cpu_ahead none = {NULL, 0};
            global_weights_of(row, worker->compact, count, none, worker->masses);
            double survivor = (double)args->survivor_weight; /* exact: at most 2^40 */
            for (int j = 0; j < count; ++j)
                worker->masses[j] = (double)worker->masses[j] >= survivor ? worker->masses[j] : 0.0f;
            bins_of(row, worker->compact, count, worker->bins);
            add_to_bins(worker->bins, worker->masses, count, worker->bin_mass);
            break;
        }
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
    case PASS_MASS: {
        if (owner->tile_valid[tile] == 0)
            break;
        const float *x = cpu_read_tile(row, owner, tile, worker->logits, &n);
        worker->bin_tail += cpu_global_mass(row, x, n);
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
        cpu_tile_weights(row, owner, tile, worker->logits, worker->weights);
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
    if (args->pass == PASS_MASS)
        worker->bin_tail = 0;
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
    if (args->pass == PASS_MASS)
        owner->bin_tail += worker->bin_tail;
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

void cpu_run_pass(const cpu_state *state, const cpu_pass_args *args, int parallel)
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
int cpu_row_is_good(const cpu_row *row, const cpu_scratch *owner, int64_t *valid_out,
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
uint64_t cpu_tile_masses(const cpu_row *row, cpu_scratch *owner)
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
