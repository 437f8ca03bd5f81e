/*
 * half_truncate.h: a float as IEEE half, rounded toward zero through the
 * bits (subnormal halves kept, overflow to the largest finite half, NaN and
 * infinities kept). For test inputs: the library widens the stored half
 * exactly, so the decoded value is what every backend reads, whatever the
 * rounding rule. Used by the differential fuzzer and the GPU soak.
 */
#ifndef PSM_TEST_HALF_TRUNCATE_H
#define PSM_TEST_HALF_TRUNCATE_H

#include <stdint.h>
#include <string.h>

static inline uint16_t psm_test_truncate_to_f16(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u)
        return (uint16_t)(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    int exponent = (int)(magnitude >> 23) - 127;
    if (exponent > 15)
        return (uint16_t)(sign | 0x7bffu);
    if (exponent < -24)
        return sign;
    if (exponent < -14) {
        uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
        return (uint16_t)(sign | (mantissa >> (-1 - exponent)));
    }
    return (uint16_t)(sign | (uint32_t)(exponent + 15) << 10 | (magnitude & 0x7fffffu) >> 13);
}

#endif /* PSM_TEST_HALF_TRUNCATE_H */
