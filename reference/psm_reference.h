/*
 * psm_reference.h: the final sampling distribution of a row in float64,
 * written from docs/SAMPLING.md's definitions (softmax, rank order, top-k,
 * top-p, min-p, greedy) without the contract's fixed-point arithmetic. The
 * test suite and `polysample check` compare the library against it; it
 * never calls the library.
 */
#ifndef PSM_REFERENCE_H
#define PSM_REFERENCE_H

#include <stdint.h>

/* The filter orders, with psm_filter_order's values (include/polysample.h;
 * docs/SAMPLING.md, section 4, "Filter orders"). */
typedef enum psm_ref_order {
    PSM_REF_ORDER_POLYSAMPLE = 0,
    PSM_REF_ORDER_VLLM = 1,
    PSM_REF_ORDER_SGLANG = 2,
    PSM_REF_ORDER_LLAMA_CPP = 3,
    PSM_REF_ORDER_FLASHINFER_TOP_K_FIRST = 4,
    PSM_REF_ORDER_FLASHINFER_JOINT = 5
} psm_ref_order;

typedef struct psm_ref_params {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
} psm_ref_params;

/* Temperature 1, filters off. */
psm_ref_params psm_ref_params_plain(void);

/* Fills probs[0..vocab) with the final distribution: 0 outside the kept set,
 * summing to 1. Returns 1 for a good row; 0 for a bad row (a NaN or +inf
 * logit, or no finite logit), leaving probs all NaN; -1 when its working
 * memory cannot be allocated, leaving probs unspecified. */
int psm_ref_distribution(const float *logits, int64_t vocab, const psm_ref_params *params,
                         double *probs);

/* The same in a filter order: PSM_REF_ORDER_POLYSAMPLE gives
 * psm_ref_distribution's result. */
int psm_ref_distribution_ordered(const float *logits, int64_t vocab, const psm_ref_params *params,
                                 psm_ref_order order, double *probs);

/* The greedy token: the largest finite logit, lowest index on ties; -1 for a
 * bad row. */
int64_t psm_ref_argmax(const float *logits, int64_t vocab);

/* Logit processing of one row (docs/SAMPLING.md section 1): the penalties
 * for tokens of the history (counted) and the prompt, then the bias entries
 * in list order, then the allowed-token mask. */
typedef struct psm_ref_processing {
    const uint32_t *allowed_mask; /* the row's words (bit i % 32 of word i / 32);
                                     NULL: every token allowed */
    const int32_t *history;
    int64_t history_count;
    const int32_t *prompt;
    int64_t prompt_count;
    const int32_t *bias_tokens;
    const float *bias_values;
    int64_t bias_count;
    float repetition; /* 1: off */
    float frequency;  /* 0: off */
    float presence;   /* 0: off */
} psm_ref_processing;

/* out[0..vocab) = the processed logits, computed in float64 by the rule's
 * definitions (x / r for the repetition penalty) and rounded to float once,
 * then read as the contract reads a logit (tiny magnitudes and -0 become
 * +0). The contract rounds after each float operation instead, so the two
 * differ by a few float ulps of the operands. Token ids must be in
 * [0, vocab). Returns 1, or -1 when its working memory cannot be
 * allocated. */
int psm_ref_process_row(const float *logits, int64_t vocab, const psm_ref_processing *processing,
                        float *out);

#endif /* PSM_REFERENCE_H */
