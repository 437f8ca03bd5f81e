/* cpu_sharded.c: the CPU backend's passes of a sharded call over its shard
 * (core/psm_shard_pass.h says what each computes; core/sharded.c drives the
 * rounds). Items are independent, so the threads take them one at a time;
 * within an item the loops run in token order, which the pick needs and
 * which makes the integer sums the same as any other order's. */
#include "cpu_backend.h"
#include "psm_shard_pass.h"

/* The row's logit of shard column `column`. */
static float shard_logit(const psm_tensor *logits, const psm_shard_item *item, int64_t column)
{
    return cpu_logit_at((const unsigned char *)logits->data, logits->dtype,
                        item->logits_row * logits->row_stride + column);
}

static void summary(const psm_tensor *logits, const psm_shard_geometry *g,
                    const psm_shard_item *item, psm_u64 *out)
{
    psm_u64 best = 0, valid = 0, bad = 0;
    for (int64_t i = 0; i < g->shard_vocab; ++i) {
        const float x = shard_logit(logits, item, i);
        const int kind = psm_logit_class(x);
        bad |= kind == PSM_LOGIT_BAD;
        if (kind != PSM_LOGIT_VALID)
            continue;
        const psm_u64 key = psm_rank_key(x, (psm_u32)(g->first_token + i));
        best = key > best ? key : best;
        ++valid;
    }
    out[0] = best;
    out[1] = valid;
    out[2] = bad;
}

static void tally(const psm_tensor *logits, const psm_shard_geometry *g,
                  const psm_shard_item *item, psm_u64 *buckets)
{
    const int shift = 64 - 8 * (item->level + 1);
    memset(buckets, 0, PSM_SHARD_TALLY_WORDS * sizeof *buckets);
    for (int64_t i = 0; i < g->shard_vocab; ++i) {
        const float x = shard_logit(logits, item, i);
        if (psm_logit_class(x) != PSM_LOGIT_VALID)
            continue;
        const psm_u64 key = psm_rank_key(x, (psm_u32)(g->first_token + i));
        /* Level 0 has no digits above it (and a shift by 64 is undefined). */
        if (key < item->lower_bound ||
            (item->level > 0 && (key >> (shift + 8)) != item->prefix))
            continue;
        const int b = (int)((key >> shift) & 255u);
        buckets[2 * b] += 1;
        if (item->by_mass)
            buckets[2 * b + 1] += psm_weight_of_gap(
                psm_unclamped_gap(item->row_max, x, item->scale), g->weight_bits);
    }
}

static void tile_maxima(const psm_tensor *logits, const psm_shard_geometry *g,
                        const psm_shard_item *item, psm_u64 *keys)
{
    const psm_kept_rule rule = psm_shard_item_rule(item, g->weight_bits);
    for (int64_t t = 0; t < g->local_tiles; ++t) {
        int64_t begin, end;
        psm_shard_tile_part(g, t, &begin, &end);
        psm_u64 best = 0;
        for (int64_t i = begin; i < end; ++i) {
            const float x = shard_logit(logits, item, i);
            const psm_u32 token = (psm_u32)(g->first_token + i);
            if (psm_token_kept(rule, x, token)) {
                const psm_u64 key = psm_rank_key(x, token);
                best = key > best ? key : best;
            }
        }
        keys[t] = best;
    }
}

static void tile_masses(const psm_tensor *logits, const psm_shard_geometry *g,
                        const psm_shard_item *item, const psm_u64 *tile_keys, psm_u64 *masses)
{
    const psm_kept_rule rule = psm_shard_item_rule(item, g->weight_bits);
    for (int64_t t = 0; t < g->local_tiles; ++t) {
        psm_u64 mass = 0;
        if (tile_keys[t] != 0) {
            const float reference = psm_rank_key_logit(tile_keys[t]);
            int64_t begin, end;
            psm_shard_tile_part(g, t, &begin, &end);
            for (int64_t i = begin; i < end; ++i)
                mass += psm_kept_weight(rule, reference, shard_logit(logits, item, i),
                                        (psm_u32)(g->first_token + i));
        }
        masses[t] = mass;
    }
}

static void pick(const psm_tensor *logits, const psm_shard_geometry *g,
                 const psm_shard_item *item, psm_u64 *out)
{
    const psm_kept_rule rule = psm_shard_item_rule(item, g->weight_bits);
    const float reference = psm_rank_key_logit(item->reference);
    int64_t begin, end;
    psm_shard_tile_part(g, item->tile, &begin, &end);
    out[0] = ~(psm_u64)0;
    out[1] = 0;
    psm_u64 running = 0;
    for (int64_t i = begin; i < end; ++i) {
        const psm_u32 token = (psm_u32)(g->first_token + i);
        const psm_u64 w = psm_kept_weight(rule, reference, shard_logit(logits, item, i), token);
        if (item->pick < running + w) {
            out[0] = token;
            out[1] = w;
            return;
        }
        running += w;
    }
}

psm_status cpu_shard_pass(void *opaque, const psm_tensor *logits,
                          const psm_shard_geometry *geometry, const psm_shard_item *items,
                          int64_t item_count, const psm_u64 *tile_keys, psm_u64 *out)
{
    const cpu_state *state = opaque;
    const int64_t words = psm_shard_pass_words(geometry->kind, geometry->local_tiles);
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 1)
    for (int64_t i = 0; i < item_count; ++i) {
        const psm_shard_item *item = &items[i];
        psm_u64 *answer = out + i * words;
        if (item->logits_row < 0) {
            memset(answer, 0, (size_t)words * sizeof *answer);
            continue;
        }
        switch (geometry->kind) {
        case PSM_SHARD_PASS_SUMMARY: summary(logits, geometry, item, answer); break;
        case PSM_SHARD_PASS_TALLY: tally(logits, geometry, item, answer); break;
        case PSM_SHARD_PASS_TILE_MAXIMA: tile_maxima(logits, geometry, item, answer); break;
        case PSM_SHARD_PASS_TILE_MASSES:
            tile_masses(logits, geometry, item, tile_keys + i * geometry->local_tiles, answer);
            break;
        case PSM_SHARD_PASS_PICK: pick(logits, geometry, item, answer); break;
        }
    }
    return PSM_OK;
}
