/* contract_model.c: see contract_model.h. Section numbers are SAMPLING.md's. */
#include "contract_model.h"

#include "psm_contract.h"
#include "wide_limbs.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct ranked {
    uint64_t key;
    int64_t index;
} ranked;

static int by_key_descending(const void *a, const void *b)
{
    uint64_t ka = ((const ranked *)a)->key, kb = ((const ranked *)b)->key;
    return ka < kb ? 1 : (ka > kb ? -1 : 0);
}

void model_evaluate(const float *x, int64_t vocab, const model_params *params, model_row *row)
{
    int64_t tiles = (vocab + PSM_TILE - 1) / PSM_TILE;
    memset(row->kept, 0, (size_t)vocab);
    memset(row->weight, 0, (size_t)vocab * sizeof *row->weight);
    memset(row->tile_sum, 0, sizeof row->tile_sum);
    memset(row->tile_mass, 0, sizeof row->tile_mass);
    row->total = 0;
    row->greedy_token = -1;
    for (int64_t i = 0; i < vocab; ++i)
        row->prob[i] = NAN;

    /* 1. Reading: a NaN or +inf, or no valid logit, makes the row bad. */
    int64_t valid = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        int cls = psm_logit_class(x[i]);
        if (cls == PSM_LOGIT_BAD || !psm_row_params_valid(params->temperature, params->top_k,
                                                          params->top_p, params->min_p)) {
            row->kind = MODEL_BAD;
            return;
        }
        valid += cls == PSM_LOGIT_VALID;
    }
    if (valid == 0) {
        row->kind = MODEL_BAD;
        return;
    }
    float *y = malloc((size_t)vocab * sizeof *y);
    ranked *order = malloc((size_t)valid * sizeof *order);
    if (!y || !order)
        abort();
    float top = -INFINITY;
    int64_t count = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        y[i] = psm_read_logit(x[i]);
        if (psm_logit_class(x[i]) != PSM_LOGIT_VALID)
            continue;
        order[count].key = psm_rank_key(y[i], (uint32_t)i);
        order[count].index = i;
        ++count;
        if (y[i] > top)
            top = y[i];
    }
    qsort(order, (size_t)valid, sizeof *order, by_key_descending);

    /* 2. Greedy: the first index holding the maximum (rank order's first). */
    if (psm_is_greedy(params->temperature)) {
        row->kind = MODEL_GREEDY;
        row->greedy_token = order[0].index;
        for (int64_t i = 0; i < vocab; ++i)
            row->prob[i] = i == row->greedy_token ? 1.0 : 0.0;
        free(y);
        free(order);
        return;
    }
    row->kind = MODEL_SAMPLED;

    /* 3. Global weights against the row maximum. */
    float scale = psm_inverse_temperature_scale(params->temperature);
    int bits = psm_weight_bits(vocab);

    /* 4. Filters, in rank order. */
    int64_t candidates = valid;
    if (params->top_k > 0 && params->top_k < valid)
        candidates = params->top_k;
    if (params->top_p < 1.0f) {
        uint64_t mass = 0;
        for (int64_t r = 0; r < candidates; ++r)
            mass += psm_weight(psm_scaled_gap(top, y[order[r].index], scale), bits);
        uint64_t target = psm_top_p_target(mass, params->top_p);
        uint64_t running = 0;
        int64_t prefix = 0;
        while (prefix < candidates) {
            running += psm_weight(psm_scaled_gap(top, y[order[prefix].index], scale), bits);
            ++prefix;
            if (running >= target)
                break;
        }
        candidates = prefix;
    }
    uint64_t threshold = psm_min_p_threshold(params->min_p, bits);
    for (int64_t r = 0; r < candidates; ++r) {
        int64_t i = order[r].index;
        if (psm_weight(psm_scaled_gap(top, y[i], scale), bits) >= threshold)
            row->kept[i] = 1;
    }

    /* 5. Tile masses. */
    for (int64_t t = 0; t < tiles; ++t) {
        int64_t start = t * PSM_TILE, end = start + PSM_TILE < vocab ? start + PSM_TILE : vocab;
        float tile_top = -INFINITY;
        for (int64_t i = start; i < end; ++i)
            if (row->kept[i] && y[i] > tile_top)
                tile_top = y[i];
        if (tile_top == -INFINITY)
            continue;
        uint64_t sum = 0;
        for (int64_t i = start; i < end; ++i) {
            if (!row->kept[i])
                continue;
            row->weight[i] = psm_weight(psm_scaled_gap(tile_top, y[i], scale), bits);
            sum += row->weight[i];
        }
        row->tile_sum[t] = sum;
        row->tile_mass[t] =
            sum ? psm_rescale_mass(sum, psm_scaled_gap(top, tile_top, scale)) : 0;
        row->total += row->tile_mass[t];
    }
    for (int64_t t = 0; t < tiles; ++t) {
        int64_t start = t * PSM_TILE, end = start + PSM_TILE < vocab ? start + PSM_TILE : vocab;
        for (int64_t i = start; i < end; ++i)
            row->prob[i] = (row->tile_sum[t] == 0 || row->tile_mass[t] == 0)
                               ? 0.0
                               : ((double)row->weight[i] / (double)row->tile_sum[t]) *
                                     ((double)row->tile_mass[t] / (double)row->total);
    }
    free(y);
    free(order);
}

int64_t model_draw(const model_row *row, int64_t vocab, const model_params *params, uint32_t j)
{
    if (row->kind == MODEL_BAD)
        return -1;
    if (row->kind == MODEL_GREEDY)
        return row->greedy_token;
    int64_t tiles = (vocab + PSM_TILE - 1) / PSM_TILE;
    psm_draw_bits draw = psm_sample_bits(params->seed, params->offset, params->stream, j);
    uint64_t a = psm_pick(draw.tile, row->total), running = 0;
    int64_t tile = 0;
    for (; tile < tiles; ++tile) {
        running += row->tile_mass[tile];
        if (running > a)
            break;
    }
    uint64_t b = psm_pick(draw.token, row->tile_sum[tile]);
    int64_t start = tile * PSM_TILE, end = start + PSM_TILE < vocab ? start + PSM_TILE : vocab;
    running = 0;
    for (int64_t i = start; i < end; ++i) {
        running += row->weight[i];
        if (running > b)
            return i;
    }
    return -2; /* unreachable: the tile's weights sum to tile_sum > b */
}

/* ---- section 7: speculative decoding verification ------------------------ */

int model_distribution(const float *x, int64_t vocab, const model_params *params,
                       uint64_t *weights, uint64_t *total)
{
    uint8_t *kept = malloc((size_t)vocab);
    uint64_t *tile_weight = malloc((size_t)vocab * sizeof *tile_weight);
    double *prob = malloc((size_t)vocab * sizeof *prob);
    if (!kept || !tile_weight || !prob)
        abort();
    model_row row = {.kept = kept, .weight = tile_weight, .prob = prob};
    model_evaluate(x, vocab, params, &row);
    int good = row.kind != MODEL_BAD;
    *total = 0;
    if (row.kind == MODEL_GREEDY) {
        for (int64_t i = 0; i < vocab; ++i)
            weights[i] = i == row.greedy_token;
        *total = 1;
    } else if (row.kind == MODEL_SAMPLED) {
        float top = -INFINITY;
        for (int64_t i = 0; i < vocab; ++i)
            if (psm_logit_class(x[i]) == PSM_LOGIT_VALID && psm_read_logit(x[i]) > top)
                top = psm_read_logit(x[i]);
        float scale = psm_inverse_temperature_scale(params->temperature);
        int bits = psm_weight_bits(vocab);
        for (int64_t i = 0; i < vocab; ++i) {
            weights[i] = kept[i] ? psm_weight(psm_scaled_gap(top, psm_read_logit(x[i]), scale), bits)
                                 : 0;
            *total += weights[i];
        }
    }
    free(kept);
    free(tile_weight);
    free(prob);
    return good;
}

/* Node `node`'s draft weights (k rows of the draft, node 1 at row 0). */
static int draft_weights(const model_verify_request *request, int32_t node, uint64_t *q,
                         uint64_t *q_total)
{
    const int64_t vocab = request->vocab;
    const float *row = request->draft + (int64_t)(node - 1) * vocab;
    switch (request->draft_kind) {
    case MODEL_DRAFT_LOGITS:
        return model_distribution(row, vocab, &request->draft_params, q, q_total);
    case MODEL_DRAFT_PROBS:
        *q_total = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            q[i] = (uint64_t)floor(ldexp((double)row[i], psm_weight_bits(vocab)));
            *q_total += q[i];
        }
        return 1;
    default:
        for (int64_t i = 0; i < vocab; ++i)
            q[i] = i == request->tokens[node - 1];
        *q_total = 1;
        return 1;
    }
}

void model_verify(const model_verify_request *request, model_verify_result *result)
{
    const int64_t vocab = request->vocab;
    const int32_t k = request->nodes;
    const int bits = psm_weight_bits(vocab);
    const model_params *target = &request->target_params;
    uint64_t *p = malloc((size_t)vocab * sizeof *p), *q = malloc((size_t)vocab * sizeof *q),
             *residual = malloc((size_t)vocab * sizeof *residual);
    limbs256 *excess = malloc((size_t)vocab * sizeof *excess);
    if (!p || !q || !residual || !excess)
        abort();
    memset(result, 0, sizeof *result);
    for (int32_t j = 0; j <= k; ++j) {
        result->tokens[j] = -1;
        result->path[j] = -1;
        result->logprobs[j] = NAN;
    }
    result->accepted = -1;
    uint64_t total;
    for (int32_t node = 1; node <= k; ++node)
        if (!draft_weights(request, node, q, &total) || q[request->tokens[node - 1]] == 0)
            result->drafts_invalid = 1;
    for (int32_t node = 0; node <= k; ++node)
        if (!model_distribution(request->target + node * vocab, vocab, target, p, &total))
            result->bad = 1;
    if (result->drafts_invalid || result->bad)
        goto done;

    int32_t node = 0, emitted = 0;
    for (;;) {
        uint64_t p_total;
        model_distribution(request->target + node * vocab, vocab, target, p, &p_total);
        memcpy(residual, p, (size_t)vocab * sizeof *residual);
        uint64_t r_total = p_total;
        int32_t next = 0;
        for (int32_t child = node + 1; child <= k && !next; ++child) {
            int32_t parent = request->parents ? request->parents[child - 1] : child - 1;
            if (parent != node)
                continue;
            int32_t x = request->tokens[child - 1];
            uint64_t q_total;
            draft_weights(request, child, q, &q_total);
            uint64_t u = psm_sample_bits(target->seed, target->offset, target->stream,
                                         (uint32_t)child).tile;
            limbs256 left = limbs256_times(limbs256_times(limbs256_of(u), q[x]), r_total);
            limbs256 right = limbs256_times_2_64(limbs256_times(limbs256_of(residual[x]), q_total));
            if (limbs256_compare(left, right) < 0) {
                result->tokens[emitted] = x;
                result->path[emitted] = node;
                result->logprobs[emitted] = log((double)p[x] / (double)p_total);
                ++emitted;
                next = child;
                break;
            }
            /* Rejected: R_i = max(0, R_i Q_tot - Q_i R_tot), shifted. */
            int longest = 0;
            for (int64_t i = 0; i < vocab; ++i) {
                limbs256 kept = limbs256_times(limbs256_of(residual[i]), q_total);
                limbs256 removed = limbs256_times(limbs256_of(q[i]), r_total);
                excess[i] = limbs256_compare(removed, kept) < 0 ? limbs256_minus(kept, removed) : limbs256_of(0);
                int length = limbs256_bit_length(excess[i]);
                longest = length > longest ? length : longest;
            }
            int shift = longest > bits + 1 ? longest - (bits + 1) : 0;
            r_total = 0;
            for (int64_t i = 0; i < vocab; ++i) {
                residual[i] = limbs256_shift_right(excess[i], shift);
                r_total += residual[i];
            }
        }
        if (next) {
            node = next;
            continue;
        }
        /* The correction or bonus token: floor(bits x R_tot / 2^64), then the
         * running sum in index order. */
        uint64_t draw = psm_sample_bits(target->seed, target->offset, target->stream,
                                        (uint32_t)node).token;
        limbs256 scaled = limbs256_times(limbs256_of(draw), r_total);
        uint64_t pick = limbs256_shift_right(scaled, 64), running = 0;
        int64_t token = -1;
        for (int64_t i = 0; i < vocab && token < 0; ++i) {
            running += residual[i];
            if (running > pick)
                token = i;
        }
        result->tokens[emitted] = (int32_t)token; /* -1 if the residual emptied: a model failure */
        result->path[emitted] = node;
        result->logprobs[emitted] = token >= 0 ? log((double)p[token] / (double)p_total) : NAN;
        result->accepted = emitted;
        break;
    }
done:
    free(p);
    free(q);
    free(residual);
    free(excess);
}
