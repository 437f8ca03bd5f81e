/*
 * cpu_weight.h: psm_scaled_gap and psm_weight written so that GCC vectorises
 * the CPU backend's hot loops well: no branches or selects (with the
 * contract's versions GCC threads the ternaries into jumps and the loop stays
 * scalar), and a weight computed in float lanes rather than 64-bit ones.
 *
 * The weight. psm_weight splits d = n + r and returns q << (B - 24 - n) or
 * q >> (n + 24 - B), with q = p x 2^24 read from the bits of the polynomial
 * p = 2^-r. Both are floor(p x 2^(B - n)): q is an integer, so a left shift
 * is an exact product and a right shift the floor of one. p x 2^(B - n) is a
 * float exactly (a power-of-two scaling of a normal float; B - n lies in
 * [B - 64, B], far from the exponent range's ends), and so is its floor (an
 * integer below 2^(B + 1) with no more significant bits than p). Hence
 * psm_cpu_weight_float returns the contract's weight exactly, as a float; its
 * integer value is below 2^41 and a tile's sum of them below 2^50, so sums
 * taken in double are exact in any order (every partial sum is an integer
 * below 2^53).
 *
 * The product p x 2^(B - n) is the contract's own psm_weight_product (the
 * rounding trick of psm_exp2_negative and the polynomial psm_exp2_fraction:
 * the same correctly rounded float operations, with contraction off); only
 * the clamp and the floor are written here, branch-free.
 *
 * Equalities (tests/test_cpu_weight.c tests both, exhaustively with --exhaustive):
 * - psm_cpu_scaled_gap(r, x, s) == psm_scaled_gap(r, x, s) for all inputs
 *   (bit for bit, NaN aside, which stays NaN);
 * - psm_cpu_weight_float(d, B) == psm_weight(d, B) for every d that
 *   psm_scaled_gap can return (+0, NaN, or at least PSM_TINY_GAP up to +inf)
 *   and every B in [32, 40], the values psm_weight_bits can return.
 */
#ifndef PSM_CPU_WEIGHT_H
#define PSM_CPU_WEIGHT_H

#include "psm_contract.h"

#include <math.h>

static inline float psm_cpu_scaled_gap(float reference, float x, float scale)
{
    float gap = psm_unclamped_gap(reference, x, scale);
    /* All ones when the gap is kept, zero when it is read as +0. */
    psm_u32 keep = (psm_u32)0 - (psm_u32)!(gap < PSM_TINY_GAP);
    return psm_bits_float(psm_float_bits(gap) & keep);
}

/* psm_weight(d, B), exactly, as a float (see above). */
static inline float psm_cpu_weight_float(float d, int weight_bits)
{
    /* Clamp d to 64 in the integer order of the float bits, where NaNs of
     * either sign and +inf lie above 64: psm_weight is 0 from 64 on, and so
     * is the formula below at 64 (n = 64 gives floor(2^(B - 64)) = 0), so no
     * final select is needed; the clamp also keeps the rounding trick inside
     * its domain. */
    psm_u32 bits = psm_float_bits(d);
    psm_u32 limit = 0x42800000u; /* 64.0f */
    d = psm_bits_float(bits < limit ? bits : limit);
    /* The contract's p x 2^(B - n), floored (truncation, as the conversion
     * in psm_weight_of_gap, since the product is >= 0). */
    return floorf(psm_weight_product(d, weight_bits));
}

/* The same weight as an integer: through double and the 2^52 trick (exact
 * for integers below 2^52), which vectorises where a float-to-64-bit
 * conversion does not. */
static inline psm_u64 psm_cpu_weight(float d, int weight_bits)
{
    double shifted = (double)psm_cpu_weight_float(d, weight_bits) + 0x1p52;
    psm_u64 bits;
    memcpy(&bits, &shifted, sizeof bits);
    return bits - (psm_u64)0x4330000000000000u;
}

#endif /* PSM_CPU_WEIGHT_H */
