/*
 * cpu_weight.h: psm_weight written without branches, so that GCC can
 * vectorise the CPU backend's hot loops (psm_weight's early return and its
 * two shift directions stop the vectoriser).
 *
 * psm_cpu_weight(d, bits) == psm_weight(d, bits) for every float d and every
 * weight_bits in [32, 40] (the values psm_weight_bits can return); the check
 * driver compares the two over every float in [0, 64] and the specials.
 */
#ifndef PSM_CPU_WEIGHT_H
#define PSM_CPU_WEIGHT_H

#include "psm_contract.h"

static inline psm_u64 psm_cpu_weight(float d, int weight_bits)
{
    /* psm_weight returns 0 unless d < 64 (NaN and +inf included). The
     * polynomial still runs on those lanes, so it gets d = 0 there: that keeps
     * every shift below in range, and the result is masked away at the end. */
    int in_range = d < 64.0f;
    psm_exp2_parts parts = psm_exp2_negative(in_range ? d : 0.0f);
    /* psm_weight computes q << (B - 24 - n) or q >> (n + 24 - B). As q < 2^25,
     * q * 2^32 fits in 64 bits, and both cases are (q * 2^32) >> (56 - B + n).
     * When psm_weight returns 0 for a right shift of 32 or more, the amount
     * here is 64 or more; clamping it to 63 also gives 0, because bit 63 of
     * q * 2^32 is bit 31 of q, which is 0. */
    int amount = 56 - weight_bits + parts.n;
    amount = amount < 63 ? amount : 63;
    psm_u64 weight = ((psm_u64)parts.q << 32) >> amount;
    return in_range ? weight : 0;
}

#endif /* PSM_CPU_WEIGHT_H */
