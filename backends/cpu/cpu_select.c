/* cpu_select.c: the filters, top-k, top-p and min-p, and how a filtered row's
 * kept tile masses are made (cpu_backend.h describes the backend). */
#include "cpu_backend.h"

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
        const float *logits = cpu_read_tile(row, owner, tile, owner->logits, &n);
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
 * first reaches target (the first token when target is 0). With
 * survivor_weight, a token whose g_i is below it measures 0 (vLLM's order
 * counts and weighs only min-p's survivors), so the token returned is a
 * survivor. The caller guarantees that the sum reaches target within those
 * tokens.
 * Radix select: each round histograms the next 11 bits of the keys that
 * share the prefix found so far; once the bucket holding the answer is
 * small enough it is gathered and sorted. Keys are unique (they hold the
 * token index), so the buckets always shrink. */
static uint64_t radix_cutoff(const cpu_row *row, cpu_scratch *owner, uint64_t lower,
                             uint64_t upper, int by_mass, uint64_t survivor_weight,
                             uint64_t above, uint64_t target)
{
    const int needs_weight = by_mass || survivor_weight != 0;
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
            const float *logits = cpu_read_tile(row, owner, tile, owner->logits, &n);
            /* The first round measures every valid token: their g_i in one
             * vector pass; later rounds measure few, one by one. */
            int all_global = needs_weight && consumed == 0;
            if (all_global)
                cpu_global_weights(row, logits, n, owner->weights);
            for (int i = 0; i < n; ++i) {
                float x = logits[i];
                if (psm_logit_class(x) != PSM_LOGIT_VALID)
                    continue;
                uint64_t key = psm_rank_key(x, start + (uint32_t)i);
                if (key < lower || key >= upper ||
                    (consumed && (key >> (64 - consumed)) != prefix))
                    continue;
                uint64_t g = !needs_weight ? 0
                             : all_global  ? owner->weights[i]
                                           : global_weight(row, x);
                uint64_t measure = g < survivor_weight ? 0 : by_mass ? g : 1;
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

/* Which tokens top-p walks and how it ends (docs/SAMPLING.md, section 4):
 * the default order's rule is {lower, 0, 0, 0}; the engines' orders set the
 * rest. */
typedef struct cpu_top_p_rule {
    uint64_t lower;           /* the candidates: valid tokens with key >= lower ... */
    uint64_t survivor_weight; /* ... and, when not 0, g_i >= it (vLLM: min-p's survivors) */
    int exceeding;            /* the target is psm_top_p_target_exceeding's (SGLang) */
    int ties_kept;            /* the cutoff is lowered to psm_rank_key_tie_floor (FlashInfer) */
} cpu_top_p_rule;

static uint64_t top_p_target_of(const cpu_top_p_rule *rule, uint64_t mass, float top_p)
{
    return rule->exceeding ? psm_top_p_target_exceeding(mass, top_p)
                           : psm_top_p_target(mass, top_p);
}

static uint64_t top_p_cutoff_of(const cpu_top_p_rule *rule, uint64_t key)
{
    return rule->ties_kept ? psm_rank_key_tie_floor(key) : key;
}

/* top-p's cutoff among the rule's candidates, at row->scale.
 * One pass adds up the candidates' g-mass per gap bin (and so Z and the
 * target); the cutoff lies in the first bin where the running mass, in bin
 * order, reaches the target, since the bins follow the rank order. The pass
 * scatters only the tokens of the bins up to CPU_BIN_MARGIN past the
 * previous row's cutoff bin and sums the rest, and runs again over every bin
 * when the cutoff lies beyond (with survivors it scatters every bin at
 * once, weighing only the tokens above min-p's floor). A second pass gathers
 * the tokens of the cutoff's bin, found by the range of logits that the bin
 * covers, and the cutoff is resolved among them; tokens tied with it share
 * its bin, so a cutoff lowered to its ties stays in the band. With
 * want_masses (the kept set is the tokens at or above the cutoff) that pass
 * also makes the kept tile masses at mass_scale (band_tile_masses), finished
 * here, and *masses_done says so; a bin with more tokens than the gather
 * buffer holds (many equal logits) is resolved by the radix select,
 * restricted to the bin's keys, and leaves the masses to the kept pass. */
static uint64_t top_p_filter(const cpu_state *state, const cpu_row *row, cpu_scratch *owner,
                             int parallel, const cpu_top_p_rule *rule, float top_p,
                             float mass_scale, int want_masses, int *masses_done)
{
    const int last_bin = CPU_GAP_BINS - 1;
    int estimate = owner->last_cutoff_bin;
    cpu_pass_args args = {.pass = PASS_BINS,
                          .row = row,
                          .owner = owner,
                          .lower = rule->lower,
                          .survivor_weight = rule->survivor_weight,
                          .mass_scale = mass_scale};
    args.bin_limit = estimate >= 0 && estimate < last_bin - CPU_BIN_MARGIN &&
                             rule->survivor_weight == 0
                         ? estimate + CPU_BIN_MARGIN
                         : last_bin;
    args.bin_edge = lowest_logit_within(row, (float)(args.bin_limit + 1) / CPU_BIN_SCALE);
    uint64_t target, above;
    int bin;
    for (;;) {
        cpu_run_pass(state, &args, parallel);
        uint64_t mass = owner->bin_tail;
        for (int b = 0; b <= args.bin_limit; ++b)
            mass += owner->bin_mass[b];
        target = top_p_target_of(rule, mass, top_p);
        /* target >= 1 (the top token alone weighs 2^B, and it survives
         * min-p), so the bin found has mass and tokens. */
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
    cpu_run_pass(state, &args, parallel);
    *masses_done = 0;
    if (owner->gather_overflow) {
        uint64_t band_lower = (uint64_t)psm_ordered_bits(args.band_low) << 32;
        return top_p_cutoff_of(
            rule, radix_cutoff(row, owner, band_lower > rule->lower ? band_lower : rule->lower,
                               (uint64_t)psm_ordered_bits(args.band_high) << 32, 1,
                               rule->survivor_weight, above, target));
    }
    uint64_t cutoff = top_p_cutoff_of(
        rule, ranked_select(owner->gathered, owner->gathered_count, target - above));
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

/* ---- the engines' filter orders ---------------------------------------------- */

/* What scan_survivors finds among the valid tokens with key >= lower and
 * g_i >= min_weight: how many, and the least key (UINT64_MAX when none). */
typedef struct cpu_survivors {
    int64_t count;
    uint64_t lowest_key;
} cpu_survivors;

/* A tile's logits at or above row->kept_floor into owner->compact (their
 * indices into owner->compact_index) and their g_i into owner->weights;
 * returns how many, 0 for a tile that holds no valid token with key >=
 * lower at or above the floor. */
static int tile_above_floor(const cpu_row *row, cpu_scratch *owner, int64_t tile, uint64_t lower)
{
    if (owner->tile_valid[tile] == 0 || tile_key_bound(row, owner, tile) < lower ||
        owner->tile_max[tile] < row->kept_floor)
        return 0;
    int n;
    const float *x = cpu_read_tile(row, owner, tile, owner->logits, &n);
    int count = psm_cpu_select_at_least(x, NULL, n, row->kept_floor, owner->compact, NULL,
                                        owner->compact_index);
    cpu_global_weights(row, owner->compact, count, owner->weights);
    return count;
}

/* The key of the j-th logit that tile_above_floor selected from a tile. */
static uint64_t selected_key(const cpu_scratch *owner, int64_t tile, int j)
{
    return psm_rank_key(owner->compact[j],
                        (uint32_t)(tile * PSM_TILE) + (uint32_t)owner->compact_index[j]);
}

/* One pass over the tiles that can hold such tokens; row->kept_floor must be
 * min_weight's floor (min_weight > 0), so only the logits at or above it
 * are weighed. */
static cpu_survivors scan_survivors(const cpu_row *row, cpu_scratch *owner, uint64_t lower,
                                    uint64_t min_weight)
{
    cpu_survivors found = {0, UINT64_MAX};
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        int count = tile_above_floor(row, owner, tile, lower);
        for (int j = 0; j < count; ++j) {
            if (owner->weights[j] < min_weight)
                continue;
            uint64_t key = selected_key(owner, tile, j);
            if (key < lower)
                continue;
            found.count += 1;
            found.lowest_key = key < found.lowest_key ? key : found.lowest_key;
        }
    }
    return found;
}

/* How far below the heap's last token (in log2 units of gap: weights 2^10
 * times smaller) whole_row_mass's second lower bound weighs tokens: in a
 * language model's row, the few tokens there hold most of the mass outside
 * the heap. */
#define CPU_MASS_FLOOR_GAP 10.0f

/* llama.cpp's min-p prefix among the candidates (valid tokens with key >=
 * lower; row->scale and row->kept_floor are the filters'), and the kept
 * tile masses at draw_scale, from one pass that gathers the candidates at
 * or above the floor: the prefix ends at the least key of those that pass
 * (*cutoff), and the kept tokens, all among them, are weighed against
 * their tile's maximum, which a tile that keeps any keeps. Returns 0, with
 * nothing made, when the gather buffer cannot hold them. */
static int llama_min_p_masses(const cpu_row *row, cpu_scratch *owner, uint64_t lower,
                              uint64_t min_weight, float draw_scale, uint64_t *cutoff)
{
    cpu_ranked *items = owner->gathered;
    int64_t count = 0;
    uint64_t lowest = UINT64_MAX;
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        prefetch_share(next_row_tile(row, tile, PREFETCH_IN_KEPT), 0, 1, 1);
        int selected = tile_above_floor(row, owner, tile, lower);
        for (int j = 0; j < selected; ++j) {
            uint64_t key = selected_key(owner, tile, j);
            if (key < lower)
                continue;
            if (count == CPU_GATHER_LIMIT)
                return 0;
            items[count].key = key;
            items[count].tile = (int32_t)tile;
            ++count;
            if (owner->weights[j] >= min_weight && key < lowest)
                lowest = key;
        }
    }
    for (int64_t tile = 0; tile < row->tiles; ++tile)
        owner->tile_sum[tile] = 0;
    for (int64_t i = 0; i < count; ++i)
        if (items[i].key >= lowest)
            owner->tile_sum[items[i].tile] +=
                psm_weight(psm_scaled_gap(owner->tile_max[items[i].tile],
                                          psm_rank_key_logit(items[i].key), draw_scale),
                           row->weight_bits);
    for (int64_t tile = 0; tile < row->tiles; ++tile)
        if (owner->tile_sum[tile] == 0)
            owner->tile_max[tile] = -INFINITY;
    *cutoff = lowest;
    return 1;
}

/* whole_row_mass's second lower bound, from its first (bound, made of the
 * tile shares in tile_sum, to which this adds the heap's tokens): says
 * whether it shows that top-p's target exceeds heap_mass. */
static int floor_bound_decides(const cpu_row *row, cpu_scratch *owner, int32_t top_k,
                               const cpu_top_p_rule *rule, float top_p, uint64_t heap_mass,
                               uint64_t bound)
{
    uint64_t *share = owner->tile_sum;
    const float kth_logit = psm_rank_key_logit(owner->heap[top_k - 1]);
    for (int32_t i = 0; i < top_k; ++i)
        share[psm_rank_key_token(owner->heap[i]) / PSM_TILE] +=
            global_weight(row, psm_rank_key_logit(owner->heap[i]));
    /* The floor is at most the heap's last logit, so a tile's tokens at or
     * above it include its heap tokens; its maximum counts when below. */
    const float floor = lowest_logit_within(
        row, psm_unclamped_gap(row->row_max, kth_logit, row->scale) + CPU_MASS_FLOOR_GAP);
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        if (owner->tile_max[tile] < floor || owner->tile_valid[tile] == 0)
            continue;
        int n;
        const float *x = cpu_read_tile(row, owner, tile, owner->logits, &n);
        int count = psm_cpu_select_at_least(x, NULL, n, floor, owner->compact, NULL, NULL);
        bound += cpu_global_mass(row, owner->compact, count) - share[tile];
        if (top_p_target_of(rule, bound, top_p) > heap_mass)
            return 1;
    }
    return 0;
}

/* An upper bound of the weight of any token whose gap is at least that of a
 * token weighing `weight`: the weight follows 2^(B - d) to a relative 1.1e-7
 * (docs/SAMPLING.md, section 3) and is truncated, so a larger gap can give a
 * weight larger by its last float units, never by 2^-16 of it plus 2. */
static uint64_t weight_ceiling(uint64_t weight)
{
    return weight + (weight >> 16) + 2;
}

/* Z for top-p over every valid token after a heap of top_k, or 0 when a
 * lower bound of Z already shows that top-p's target exceeds heap_mass (the
 * g-mass of the heap's first top_k): the walk then ends below the heap.
 * Rows spread over the threads take the exact sum (PASS_MASS). A row on one
 * thread tries two lower bounds first, each a sum of tile shares (tile_sum
 * holds them, until the kept masses are made): the heap's tokens and each
 * tile's maximum when it is not one of them, which costs no reading; then,
 * tile by tile until it decides, each tile's tokens within
 * CPU_MASS_FLOOR_GAP of the heap's last (selected first, so that few are
 * weighed) and its maximum. The second is skipped when an upper bound shows
 * that the walk ends in the heap (a peaked row): the tokens outside the heap
 * have logits at most the heap's last and their tile's maximum. Every token
 * is weighed only when neither bound decides. */
static uint64_t whole_row_mass(const cpu_state *state, const cpu_row *row, cpu_scratch *owner,
                               int parallel, int32_t top_k, const cpu_top_p_rule *rule,
                               float top_p, uint64_t heap_mass)
{
    if (!parallel) {
        uint64_t *share = owner->tile_sum;
        const float kth_logit = psm_rank_key_logit(owner->heap[top_k - 1]);
        const uint64_t kth_ceiling = weight_ceiling(global_weight(row, kth_logit));
        uint64_t bound = heap_mass, upper = heap_mass;
        for (int64_t tile = 0; tile < row->tiles; ++tile) {
            int below = owner->tile_valid[tile] != 0 && owner->tile_max[tile] < kth_logit;
            share[tile] = below ? global_weight(row, owner->tile_max[tile]) : 0;
            bound += share[tile];
            upper += (uint64_t)owner->tile_valid[tile] *
                     (below ? weight_ceiling(share[tile]) : kth_ceiling);
        }
        if (top_p_target_of(rule, bound, top_p) > heap_mass)
            return 0;
        if (top_p_target_of(rule, upper, top_p) > heap_mass &&
            floor_bound_decides(row, owner, top_k, rule, top_p, heap_mass, bound))
            return 0;
    }
    cpu_pass_args args = {.pass = PASS_MASS, .row = row, .owner = owner};
    cpu_run_pass(state, &args, parallel);
    return owner->bin_tail;
}

/* top-p's cutoff when the tokens it walks begin with the heap's first
 * top_k (owner->heap, sorted descending): Z is their g-mass or, for the
 * orders that take top-p over every valid token (whole_row), the row's,
 * whose rank order begins with the heap's tokens. Returns 0 when the walk
 * does not reach the target within the heap: the cutoff then lies below
 * the heap's last token, so the top-k cutoff, at or above it, decides the
 * intersection. */
static uint64_t heap_top_p(const cpu_state *state, const cpu_row *row, cpu_scratch *owner,
                           int parallel, int32_t top_k, const cpu_top_p_rule *rule, float top_p,
                           int whole_row)
{
    uint64_t heap_mass = 0;
    for (int32_t i = 0; i < top_k; ++i)
        heap_mass += global_weight(row, psm_rank_key_logit(owner->heap[i]));
    uint64_t mass = heap_mass;
    if (whole_row) {
        mass = whole_row_mass(state, row, owner, parallel, top_k, rule, top_p, heap_mass);
        if (mass == 0)
            return 0;
    }
    uint64_t target = top_p_target_of(rule, mass, top_p);
    uint64_t running = 0;
    for (int32_t i = 0; i < top_k; ++i) {
        running += global_weight(row, psm_rank_key_logit(owner->heap[i]));
        if (running >= target)
            return top_p_cutoff_of(rule, owner->heap[i]);
    }
    return 0;
}

/* The kept-set rule of an engine's order (docs/SAMPLING.md, section 4,
 * "Filter orders"), as a cutoff key and a min-p weight for the kept test,
 * found with the default order's machinery: a small top-k by the bounded
 * heap (one token more where the order keeps the k-th token's ties: when
 * that one does not tie, the set with ties is the heap's first k), top-p
 * by a walk over the heap when the set it walks starts there, else by the
 * gap bins; the radix select only for vLLM's top-k over min-p's survivors.
 * Says how the kept tile masses are to be made. */
static cpu_kept_source apply_engine_order(const cpu_state *state, cpu_row *row,
                                          cpu_scratch *owner, int parallel, int64_t valid,
                                          int32_t top_k, float top_p, float min_p,
                                          int32_t order)
{
    const float draw_scale = row->scale;
    const int llama = order == PSM_FILTER_ORDER_LLAMA_CPP;
    const int joint = order == PSM_FILTER_ORDER_SGLANG || order == PSM_FILTER_ORDER_FLASHINFER_JOINT;
    /* FlashInfer's thresholds are values, so its top-k and top-p keep the
     * boundary's ties; vLLM's top-k does too. */
    const int top_p_ties = order == PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST ||
                           order == PSM_FILTER_ORDER_FLASHINFER_JOINT;
    const int top_k_ties = top_p_ties || order == PSM_FILTER_ORDER_VLLM;
    const int top_p_on = top_p < 1.0f;
    /* llama.cpp's chain filters before its temperature: at scale 1. */
    if (llama)
        row->scale = psm_inverse_temperature_scale(1.0f);
    uint64_t min_weight = psm_min_p_threshold(min_p, row->weight_bits);
    row->min_weight = min_weight;
    if (min_weight != 0)
        row->kept_floor =
            lowest_logit_within(row, psm_min_p_drop_gap(min_weight, row->weight_bits));
    /* vLLM runs min-p first: top-k and top-p see only its survivors. */
    const uint64_t survivor_weight = order == PSM_FILTER_ORDER_VLLM ? min_weight : 0;
    int top_k_on = top_k > 0 && top_k < valid;
    if (top_k_on && survivor_weight != 0)
        top_k_on = top_k < scan_survivors(row, owner, 0, survivor_weight).count;
    const int by_heap =
        top_k_on && survivor_weight == 0 && top_k + top_k_ties <= CPU_HEAP_LIMIT;
    row->prefetch_step = by_heap    ? PREFETCH_IN_HEAP
                         : top_p_on ? PREFETCH_IN_BINS
                                    : PREFETCH_IN_KEPT;

    uint64_t cutoff = 0;
    int set_in_heap = 0; /* every token at or above the top-k cutoff is among the heap's first k */
    if (by_heap) {
        top_k_heap(row, owner, top_k + top_k_ties);
        cutoff = owner->heap[top_k - 1];
        if (top_k_ties)
            cutoff = psm_rank_key_tie_floor(cutoff);
        set_in_heap = !top_k_ties || owner->heap[top_k] < cutoff;
    } else if (top_k_on) {
        cutoff = radix_cutoff(row, owner, 0, UINT64_MAX, 0, survivor_weight, 0, (uint64_t)top_k);
        if (top_k_ties)
            cutoff = psm_rank_key_tie_floor(cutoff);
    }
    cpu_kept_source source = set_in_heap ? KEPT_FROM_HEAP : KEPT_BY_PASS;
    if (top_p_on) {
        const cpu_top_p_rule rule = {joint ? 0 : cutoff, survivor_weight,
                                     order == PSM_FILTER_ORDER_SGLANG, top_p_ties};
        uint64_t top_p_cutoff;
        if (set_in_heap) {
            top_p_cutoff = heap_top_p(state, row, owner, parallel, top_k, &rule, top_p, joint);
        } else {
            /* The bin pass makes the masses when the kept set is the
             * tokens at or above its cutoff: no min-p (per token, or
             * llama.cpp's prefix still to come) and no top-k cutoff that
             * a joint order's top-p could fall below. */
            int masses_done;
            top_p_cutoff = top_p_filter(state, row, owner, parallel, &rule, top_p, draw_scale,
                                        min_weight == 0 && !(joint && cutoff != 0), &masses_done);
            if (masses_done)
                source = KEPT_DONE;
        }
        cutoff = top_p_cutoff > cutoff ? top_p_cutoff : cutoff;
    }
    if (llama) {
        /* min-p last, as a prefix: the candidates down to the last one that
         * passes (llama.cpp compares logits, a monotone test). */
        if (min_weight != 0 && source == KEPT_FROM_HEAP) {
            uint64_t last = owner->heap[0]; /* the top token always passes */
            for (int32_t i = 0; i < top_k && owner->heap[i] >= cutoff; ++i)
                if (global_weight(row, psm_rank_key_logit(owner->heap[i])) >= min_weight)
                    last = owner->heap[i];
            cutoff = last;
        } else if (min_weight != 0) {
            if (llama_min_p_masses(row, owner, cutoff, min_weight, draw_scale, &cutoff))
                source = KEPT_DONE;
            else
                cutoff = scan_survivors(row, owner, cutoff, min_weight).lowest_key;
        }
        row->min_weight = 0;
        /* The kept pass then weighs only the logits at or above the
         * cutoff's. */
        row->kept_floor = min_weight != 0 ? psm_rank_key_logit(cutoff) : -FLT_MAX;
        row->scale = draw_scale;
    }
    row->key_cutoff = cutoff;
    return source;
}

/* Sets row->key_cutoff, row->min_weight and row->kept_floor from top-k,
 * top-p and min-p in the call's filter order; says how the kept tile masses
 * are to be made. */
cpu_kept_source cpu_apply_filters(const cpu_state *state, cpu_row *row, cpu_scratch *owner,
                                  int parallel, int64_t valid, int32_t top_k, float top_p,
                                  float min_p, int32_t filter_order)
{
    if (filter_order != PSM_FILTER_ORDER_POLYSAMPLE)
        return apply_engine_order(state, row, owner, parallel, valid, top_k, top_p, min_p,
                                  filter_order);
    row->min_weight = psm_min_p_threshold(min_p, row->weight_bits);
    if (row->min_weight != 0)
        row->kept_floor =
            lowest_logit_within(row, psm_min_p_drop_gap(row->min_weight, row->weight_bits));
    uint64_t cutoff = 0;
    cpu_kept_source source = KEPT_BY_PASS;
    int top_k_by_heap = psm_top_k_active(top_k, valid) && top_k <= CPU_HEAP_LIMIT;
    row->prefetch_step = top_k_by_heap    ? PREFETCH_IN_HEAP
                         : top_p < 1.0f ? PREFETCH_IN_BINS
                                        : PREFETCH_IN_KEPT;
    if (psm_top_k_active(top_k, valid)) {
        if (top_k_by_heap) {
            top_k_heap(row, owner, top_k);
            cutoff = owner->heap[top_k - 1];
            source = KEPT_FROM_HEAP;
        } else {
            cutoff = radix_cutoff(row, owner, 0, UINT64_MAX, 0, 0, 0, (uint64_t)top_k);
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
            const cpu_top_p_rule rule = {cutoff, 0, 0, 0};
            int masses_done;
            cutoff = top_p_filter(state, row, owner, parallel, &rule, top_p, row->scale,
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
void cpu_kept_masses_from_heap(const cpu_row *row, cpu_scratch *owner, int64_t count)
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
