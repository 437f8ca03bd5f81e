/* cpu_logprobs.c: top-N logprobs and the ranks of drawn tokens
 * (docs/SAMPLING.md, section 6; cpu_backend.h describes the backend). */
#include "cpu_backend.h"

/* The highest rank keys offered so far, highest first. */
typedef struct top_keys {
    uint64_t key[PSM_MAX_TOP_LOGPROBS];
    int count, capacity;
} top_keys;

static void offer_key(top_keys *top, uint64_t key)
{
    if (top->count == top->capacity) {
        if (key <= top->key[top->count - 1])
            return;
        --top->count;
    }
    int at = top->count++;
    while (at > 0 && top->key[at - 1] < key) {
        top->key[at] = top->key[at - 1];
        --at;
    }
    top->key[at] = key;
}

/* Has a full list no room for keys up to `bound`? */
static int top_full_above(const top_keys *top, uint64_t bound)
{
    return top->count == top->capacity && bound <= top->key[top->count - 1];
}

/* The drawn tokens' ranks: 1 + the candidates whose key is above theirs.
 * Each candidate key adds one to every drawn key below it, through a
 * difference array over the drawn keys in ascending order. */
typedef struct rank_counter {
    int64_t samples;
    uint64_t *sorted;   /* the drawn keys, ascending */
    int64_t *above;     /* difference array, then counts, per sorted slot */
} rank_counter;

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void count_candidate(rank_counter *ranks, uint64_t key)
{
    /* The drawn keys below `key`: sorted[0 .. below). */
    int64_t low = 0, high = ranks->samples;
    while (low < high) {
        int64_t middle = low + (high - low) / 2;
        if (ranks->sorted[middle] < key)
            low = middle + 1;
        else
            high = middle;
    }
    if (low > 0) {
        ranks->above[0] += 1;
        /* Above every drawn key, the count reaches the last slot: the
         * difference array has no entry past it to end on. */
        if (low < ranks->samples)
            ranks->above[low] -= 1;
    }
}

/* Writes rank[j] for drawn key keys[j]. */
static void write_ranks(rank_counter *ranks, const uint64_t *keys, int32_t *out)
{
    for (int64_t k = 1; k < ranks->samples; ++k)
        ranks->above[k] += ranks->above[k - 1];
    for (int64_t j = 0; j < ranks->samples; ++j) {
        uint64_t *slot = bsearch(&keys[j], ranks->sorted, (size_t)ranks->samples,
                                 sizeof(uint64_t), compare_u64);
        out[j] = (int32_t)(1 + ranks->above[slot - ranks->sorted]);
    }
}

static void write_empty_entries(int32_t *tokens, float *logprobs, int from, int count)
{
    for (int e = from; e < count; ++e) {
        tokens[e] = -1;
        logprobs[e] = -INFINITY;
    }
}

void cpu_write_bad_top_logprobs(const psm_request *request, int64_t r)
{
    const psm_top_logprobs *top = request->params.top_logprobs;
    int32_t *tokens = (int32_t *)top->tokens.data + r * top->count;
    float *logprobs = (float *)top->logprobs.data + r * top->count;
    for (int e = 0; e < top->count; ++e) {
        tokens[e] = -1;
        logprobs[e] = NAN;
    }
    if (top->sampled_ranks.data) {
        int64_t samples = request->params.num_samples;
        int32_t *ranks = (int32_t *)top->sampled_ranks.data + r * samples;
        for (int64_t j = 0; j < samples; ++j)
            ranks[j] = -1;
    }
}

/* The raw mode: log-softmax of the logits as given (temperature 1, no
 * filters), with the contract's weights: psm_raw_log_probability, with Z
 * the row's total weight against M at temperature 1. */
static void raw_top_logprobs(const psm_request *request, int64_t r, int64_t logits_row,
                                   const uint64_t *drawn_keys_raw, rank_counter *ranks)
{
    const psm_top_logprobs *top = request->params.top_logprobs;
    const psm_tensor *logits = &request->logits;
    const unsigned char *data = (const unsigned char *)logits->data +
                                (size_t)logits_row * (size_t)logits->row_stride *
                                    dtype_size(logits->dtype);
    const int64_t vocab = logits->vocab;
    float max = -INFINITY;
    for (int64_t i = 0; i < vocab; ++i) {
        float x = cpu_logit_at(data, logits->dtype, i);
        if (is_valid_logit(x) && x > max)
            max = x;
    }
    const float scale = psm_inverse_temperature_scale(1.0f);
    const int bits = psm_weight_bits(vocab);
    uint64_t total = 0;
    top_keys best = {.count = 0, .capacity = top->count};
    for (int64_t i = 0; i < vocab; ++i) {
        float x = cpu_logit_at(data, logits->dtype, i);
        if (!is_valid_logit(x))
            continue;
        total += psm_weight(psm_scaled_gap(max, x, scale), bits);
        uint64_t key = psm_rank_key(x, (uint32_t)i);
        offer_key(&best, key);
        if (ranks)
            count_candidate(ranks, key);
    }
    int32_t *tokens = (int32_t *)top->tokens.data + r * top->count;
    float *logprobs = (float *)top->logprobs.data + r * top->count;
    for (int e = 0; e < best.count; ++e) {
        tokens[e] = (int32_t)psm_rank_key_token(best.key[e]);
        logprobs[e] = psm_raw_log_probability(psm_rank_key_logit(best.key[e]), max, total, bits);
    }
    write_empty_entries(tokens, logprobs, best.count, top->count);
    if (ranks)
        write_ranks(ranks, drawn_keys_raw,
                    (int32_t *)top->sampled_ranks.data + r * request->params.num_samples);
}

/* The processed mode: the kept tokens, with the probability psm_sample
 * draws them with, (w_i / S_t) (T_t / total). The tiles are searched from
 * the owner's per-tile results: a tile whose best key cannot enter the list
 * (or, for ranks, is below every drawn key) is not read. */
static void processed_top_logprobs(const psm_request *request, const cpu_row *row,
                                   const cpu_scratch *owner, int64_t r, uint64_t total,
                                   const uint64_t *drawn_keys, rank_counter *ranks)
{
    const psm_top_logprobs *top = request->params.top_logprobs;
    top_keys best = {.count = 0, .capacity = top->count};
    const uint64_t lowest_drawn = ranks ? ranks->sorted[0] : UINT64_MAX;
    /* The candidates are the kept tokens: core/psm_row.h's test, which the
     * GPU stages run too (an unfiltered row keeps every valid token). */
    const psm_kept_rule rule =
        psm_make_kept_rule(row->filtered ? row->key_cutoff : 0,
                           row->filtered ? row->min_weight : 0, row->row_max, row->scale,
                           row->weight_bits);
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        if (owner->tile_valid[tile] == 0 || owner->tile_max[tile] == -INFINITY)
            continue;
        uint64_t bound = tile_key_bound(row, owner, tile);
        if (top_full_above(&best, bound) && bound <= lowest_drawn)
            continue;
        int64_t start = tile * PSM_TILE, n = tile_length(row, tile);
        for (int64_t k = 0; k < n; ++k) {
            float x = cpu_logit_at(row->data, row->dtype, start + k);
            if (!psm_token_kept(rule, x, (uint32_t)(start + k)))
                continue;
            uint64_t key = psm_rank_key(x, (uint32_t)(start + k));
            offer_key(&best, key);
            if (ranks && key > lowest_drawn)
                count_candidate(ranks, key);
        }
    }
    int32_t *tokens = (int32_t *)top->tokens.data + r * top->count;
    float *logprobs = (float *)top->logprobs.data + r * top->count;
    for (int e = 0; e < best.count; ++e) {
        const uint32_t token = psm_rank_key_token(best.key[e]);
        const int64_t tile = token / PSM_TILE;
        const uint64_t weight =
            psm_weight(psm_scaled_gap(owner->tile_max[tile], psm_rank_key_logit(best.key[e]),
                                      row->scale),
                       row->weight_bits);
        const uint64_t mass =
            owner->tile_prefix[tile] - (tile > 0 ? owner->tile_prefix[tile - 1] : 0);
        tokens[e] = (int32_t)token;
        logprobs[e] = psm_log_probability(weight, owner->tile_sum[tile], mass, total);
    }
    write_empty_entries(tokens, logprobs, best.count, top->count);
    if (ranks)
        write_ranks(ranks, drawn_keys,
                    (int32_t *)top->sampled_ranks.data + r * request->params.num_samples);
}

/* Row r's top-N logprobs (and the ranks of its drawn tokens, already in the
 * tokens output), after its draw; greedy: the point mass on its token in the
 * processed mode. */
void cpu_top_logprobs(const psm_request *request, const cpu_row *row, const cpu_scratch *owner,
                      int64_t r, int64_t logits_row, uint64_t total, int greedy)
{
    const psm_top_logprobs *top = request->params.top_logprobs;
    const int64_t samples = request->params.num_samples;
    const int32_t *drawn = (const int32_t *)request->tokens.data + r * samples;
    const int processed = top->mode == PSM_LOGPROBS_PROCESSED;

    if (greedy && processed) {
        int32_t *tokens = (int32_t *)top->tokens.data + r * top->count;
        float *logprobs = (float *)top->logprobs.data + r * top->count;
        tokens[0] = drawn[0];
        logprobs[0] = 0.0f;
        write_empty_entries(tokens, logprobs, 1, top->count);
        if (top->sampled_ranks.data)
            for (int64_t j = 0; j < samples; ++j)
                ((int32_t *)top->sampled_ranks.data)[r * samples + j] = 1;
        return;
    }

    /* The rank buffers come with the row's scratch (cpu_backend.c), so that
     * nothing is allocated here and nothing can fail half-way. */
    rank_counter ranks = {.samples = samples,
                          .sorted = owner->ranks.sorted,
                          .above = owner->ranks.above};
    uint64_t *keys = owner->ranks.keys;
    if (top->sampled_ranks.data) {
        memset(ranks.above, 0, (size_t)samples * sizeof *ranks.above);
        /* The drawn tokens' keys in the mode's logits. */
        const unsigned char *data = row->data;
        psm_dtype dtype = row->dtype;
        if (!processed) {
            data = (const unsigned char *)request->logits.data +
                   (size_t)logits_row * (size_t)request->logits.row_stride *
                       dtype_size(request->logits.dtype);
            dtype = request->logits.dtype;
        }
        for (int64_t j = 0; j < samples; ++j)
            keys[j] = psm_rank_key(cpu_logit_at(data, dtype, drawn[j]), (uint32_t)drawn[j]);
        memcpy(ranks.sorted, keys, (size_t)samples * sizeof *keys);
        qsort(ranks.sorted, (size_t)samples, sizeof *ranks.sorted, compare_u64);
    }
    rank_counter *counter = top->sampled_ranks.data ? &ranks : NULL;
    if (processed)
        processed_top_logprobs(request, row, owner, r, total, keys, counter);
    else
        raw_top_logprobs(request, r, logits_row, keys, counter);
}
