/* wide_limbs.h: unsigned integers of 256 bits in 32-bit limbs, little end
 * first, done digit by digit: the slow, obviously right arithmetic that the
 * tests and the fuzzers' model check core/psm_verify.h's wide arithmetic
 * against (docs/SAMPLING.md, section 7: every product there is below
 * 2^192). Test code: a result beyond 256 bits means the sizes the contract
 * relies on do not hold, and aborts. */
#ifndef PSM_TESTS_WIDE_LIMBS_H
#define PSM_TESTS_WIDE_LIMBS_H

#include <stdint.h>
#include <stdlib.h>

typedef struct limbs256 {
    uint32_t limb[8];
} limbs256;

static inline limbs256 limbs256_of(uint64_t value)
{
    limbs256 result = {{(uint32_t)value, (uint32_t)(value >> 32)}};
    return result;
}

/* a x b, schoolbook over the limbs. */
static inline limbs256 limbs256_times(limbs256 a, uint64_t b)
{
    const uint32_t b_limb[2] = {(uint32_t)b, (uint32_t)(b >> 32)};
    limbs256 product = {{0}};
    for (int j = 0; j < 2; ++j) {
        uint64_t carry = 0;
        for (int i = 0; i + j < 8; ++i) {
            uint64_t sum = (uint64_t)a.limb[i] * b_limb[j] + product.limb[i + j] + carry;
            product.limb[i + j] = (uint32_t)sum;
            carry = sum >> 32;
        }
        if (carry)
            abort();
    }
    return product;
}

/* a x 2^64 */
static inline limbs256 limbs256_times_2_64(limbs256 a)
{
    limbs256 shifted = {{0}};
    if (a.limb[6] || a.limb[7])
        abort();
    for (int i = 0; i < 6; ++i)
        shifted.limb[i + 2] = a.limb[i];
    return shifted;
}

/* -1, 0 or 1 as a <, = or > b. */
static inline int limbs256_compare(limbs256 a, limbs256 b)
{
    for (int i = 7; i >= 0; --i)
        if (a.limb[i] != b.limb[i])
            return a.limb[i] < b.limb[i] ? -1 : 1;
    return 0;
}

/* a - b for a >= b */
static inline limbs256 limbs256_minus(limbs256 a, limbs256 b)
{
    limbs256 difference;
    int64_t borrow = 0;
    for (int i = 0; i < 8; ++i) {
        int64_t digit = (int64_t)a.limb[i] - b.limb[i] - borrow;
        borrow = digit < 0;
        difference.limb[i] = (uint32_t)(digit + (borrow ? ((int64_t)1 << 32) : 0));
    }
    return difference;
}

static inline int limbs256_bit_length(limbs256 a)
{
    for (int i = 7; i >= 0; --i)
        for (int bit = 31; bit >= 0; --bit)
            if (a.limb[i] >> bit & 1u)
                return i * 32 + bit + 1;
    return 0;
}

/* a >> shift, which must fit in 64 bits. */
static inline uint64_t limbs256_shift_right(limbs256 a, int shift)
{
    uint64_t value = 0;
    for (int bit = 0; bit < 64; ++bit) {
        int from = bit + shift;
        if (from < 256 && (a.limb[from / 32] >> (from % 32) & 1u))
            value |= (uint64_t)1 << bit;
    }
    if (limbs256_bit_length(a) > shift + 64)
        abort();
    return value;
}

#endif
