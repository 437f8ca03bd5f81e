/*
 * cpu_weight.h: psm_scaled_gap and psm_weight written without branches or
 * selects, so that GCC vectorises the CPU backend's hot loops. With the
 * contract's versions, GCC threads the ternaries into jumps (it knows the
 * weight of a zero gap is the constant 2^B) and the loop stays scalar.
 *
 * Equalities (the check driver tests both):
 * - psm_cpu_scaled_gap(r, x, s) == psm_scaled_gap(r, x, s) for all inputs
 *   (bit for bit, NaN aside, which stays NaN);
 * - psm_cpu_weight(d, B) == psm_weight(d, B) for every d that psm_scaled_gap
 *   can return (+0, NaN, or at least PSM_TINY_GAP up to +inf) and every B
 *   in [32, 40], the values psm_weight_bits can return. The driver checks
 *   every non-negative float and NaNs of both signs, for each B.
 */
#ifndef PSM_CPU_WEIGHT_H
#define PSM_CPU_WEIGHT_H

#include "psm_contract.h"

static inline float psm_cpu_scaled_gap(float reference, float x, float scale)
{
    float gap = PSM_FMUL(PSM_FSUB(reference, x), scale);
    /* All ones when the gap is kept, zero when it is read as +0. */
    psm_u32 keep = (psm_u32)0 - (psm_u32)!(gap < PSM_TINY_GAP);
    return psm_bits_float(psm_float_bits(gap) & keep);
}

static inline psm_u64 psm_cpu_weight(float d, int weight_bits)
{
    /* Clamp d to 64 in the integer order of the float bits, where NaNs of
     * either sign and +inf lie above 64. psm_weight is 0 from 64 on, and so is
     * the formula below at 64 (see the shift), so no final select is needed;
     * the clamp also keeps psm_exp2_negative inside its domain. */
    psm_u32 bits = psm_float_bits(d);
    psm_u32 limit = 0x42800000u; /* 64.0f */
    psm_exp2_parts parts = psm_exp2_negative(psm_bits_float(bits < limit ? bits : limit));
    /* psm_weight computes q << (B - 24 - n) or q >> (n + 24 - B). As q < 2^25,
     * q * 2^32 fits in 64 bits, and both cases are (q * 2^32) >> (56 - B + n).
     * When psm_weight returns 0 for a right shift of 32 or more (n = 64 always
     * gives one), the amount here is 64 or more; clamping it to 63 also gives
     * 0, because bit 63 of q * 2^32 is bit 31 of q, which is 0. */
    int amount = 56 - weight_bits + parts.n;
    amount = amount < 63 ? amount : 63;
    return ((psm_u64)parts.q << 32) >> amount;
}

#endif /* PSM_CPU_WEIGHT_H */
