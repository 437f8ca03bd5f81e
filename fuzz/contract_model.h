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

/* Section 7 (speculative decoding verification), for one request. */

/* A row's integer distribution as section 7 reads it: the global weights
 * g_i of the kept tokens (a greedy row: 1 at its token), into weights
 * (vocab entries); returns 0 for a bad row, else 1 with their sum in
 * *total. The filter order is POLYSAMPLE's (the only one this model has). */
int model_distribution(const float *x, int64_t vocab, const model_params *params,
                       uint64_t *weights, uint64_t *total);

typedef enum model_draft_kind {
    MODEL_DRAFT_POINT_MASS,
    MODEL_DRAFT_LOGITS,
    MODEL_DRAFT_PROBS
} model_draft_kind;

#define MODEL_MAX_NODES 64

typedef struct model_verify_request {
    int64_t vocab;
    int32_t nodes;                /* k */
    const float *target;          /* k + 1 rows of vocab logits, widened */
    model_params target_params;   /* seed, offset and stream: the request's */
    const int32_t *tokens;        /* k: node i's token at i - 1 */
    const int32_t *parents;       /* k, or NULL: a chain */
    model_draft_kind draft_kind;
    const float *draft;           /* k rows of vocab: logits (widened) or probabilities */
    model_params draft_params;    /* draft logits' temperature and filters */
} model_verify_request;

typedef struct model_verify_result {
    int drafts_invalid; /* a bad draft logits row, or a drawn token of draft weight 0 */
    int bad;            /* a bad target row: -1 everywhere */
    int32_t accepted;
    int32_t tokens[MODEL_MAX_NODES + 1];
    int32_t path[MODEL_MAX_NODES + 1];
    double logprobs[MODEL_MAX_NODES + 1];
} model_verify_result;

/* The walk of section 7 with the wide products in 32-bit limbs. */
void model_verify(const model_verify_request *request, model_verify_result *result);

#endif /* PSM_CONTRACT_MODEL_H */
