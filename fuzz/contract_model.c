/* contract_model.c: see contract_model.h. Section numbers are SAMPLING.md's. */
#include "contract_model.h"

#include "psm_contract.h"

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
