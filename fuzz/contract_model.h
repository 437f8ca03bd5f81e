/*
 * contract_model.h: docs/SAMPLING.md written out literally for one row:
 * sort by rank key, walk prefixes, add integers in index order. It uses the
 * contract's arithmetic primitives (core/psm_contract.h) and none of any
 * backend's search or reduction code, so that the differential fuzzer can
 * hold a backend's fast paths against the definitions.
 */
#ifndef PSM_CONTRACT_MODEL_H
#define PSM_CONTRACT_MODEL_H

#include <stdint.h>

typedef struct model_params {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    uint64_t seed;
    uint64_t offset;
    uint32_t stream;
} model_params;

typedef enum model_kind { MODEL_BAD, MODEL_GREEDY, MODEL_SAMPLED } model_kind;

typedef struct model_row {
    model_kind kind;
    int64_t greedy_token;
    /* per token (vocab entries each, caller-provided) */
    uint8_t *kept;     /* in the kept set */
    uint64_t *weight;  /* w_i (tile weight), 0 outside the kept set */
    double *prob;      /* p_i as the contract defines it, in double */
    /* per tile (ceil(vocab / PSM_TILE) entries, model-owned up to 4 tiles) */
    uint64_t tile_sum[4];
    uint64_t tile_mass[4];
    uint64_t total;
} model_row;

/* x: the row's logits as floats (already widened from f16/bf16), vocab <=
 * 4 x PSM_TILE. Fills row (whose kept/weight/prob arrays the caller gave). */
void model_evaluate(const float *x, int64_t vocab, const model_params *params, model_row *row);

/* Token of sample j. */
int64_t model_draw(const model_row *row, int64_t vocab, const model_params *params, uint32_t j);

#endif /* PSM_CONTRACT_MODEL_H */
