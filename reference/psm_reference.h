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

#endif /* PSM_REFERENCE_H */
