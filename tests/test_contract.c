/*
 * test_contract.c: the contract's arithmetic (core/psm_contract.h) checked
 * directly: Philox known answers, weights, mass rescaling, f16 decoding,
 * the top-p and min-p thresholds and the temperature scale.
 */
#include "harness.h"
#include "psm_contract.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The published Random123 kat_vectors for philox4x32_10:
 * counter (4 words), key (2 words) -> output (4 words). */
START_TEST(philox_known_answers)
{
    static const struct {
        psm_u32 counter[4];
        psm_u32 key[2];
        psm_u32 expected[4];
    } vectors[] = {
        {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
         {0x00000000u, 0x00000000u},
         {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
        {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
         {0xffffffffu, 0xffffffffu},
         {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
        {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
         {0xa4093822u, 0x299f31d0u},
         {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
    };
    for (size_t v = 0; v < sizeof vectors / sizeof vectors[0]; ++v) {
        psm_u32x4 counter;
        memcpy(counter.v, vectors[v].counter, sizeof counter.v);
        psm_u32x4 out = psm_philox4x32_10(counter, vectors[v].key[0], vectors[v].key[1]);
        for (int word = 0; word < 4; ++word)
            ck_assert_msg(out.v[word] == vectors[v].expected[word],
                          "vector %zu word %d: got %08x, expected %08x", v, word, out.v[word],
                          vectors[v].expected[word]);
    }
}
END_TEST

/* psm_sample_bits is Philox with key = seed and counter = (sample, stream,
 * offset low, offset high), words 0-1 and 2-3 little end first. */
START_TEST(sample_bits_layout)
{
    psm_u64 seed = 0x299f31d0a4093822u;
    psm_u64 offset = 0x0370734413198a2eu;
    psm_draw_bits bits = psm_sample_bits(seed, offset, 0x85a308d3u, 0x243f6a88u);
    ck_assert_uint_eq(bits.tile, 0x94fdccebd16cfe09u);
    ck_assert_uint_eq(bits.token, 0x24126ea15001e420u);
}
END_TEST

START_TEST(weight_bits_by_vocab)
{
    ck_assert_int_eq(psm_weight_bits(1), 40);
    ck_assert_int_eq(psm_weight_bits(151936), 40);
    ck_assert_int_eq(psm_weight_bits((psm_i64)1 << 23), 40);
    ck_assert_int_eq(psm_weight_bits(((psm_i64)1 << 23) + 1), 39);
    ck_assert_int_eq(psm_weight_bits((psm_i64)1 << 24), 39);
    ck_assert_int_eq(psm_weight_bits(((psm_i64)1 << 31) - 1), 32);
}
END_TEST

START_TEST(weight_of_top_token_is_exact)
{
    for (int bits = 24; bits <= PSM_MAX_WEIGHT_BITS; ++bits)
        ck_assert_msg(psm_weight(0.0f, bits) == (psm_u64)1 << bits, "psm_weight(0, %d) = %llu",
                      bits, (unsigned long long)psm_weight(0.0f, bits));
}
END_TEST

START_TEST(weight_vanishes_from_64)
{
    const float beyond[] = {64.0f, nextafterf(64.0f, INFINITY), 64.5f, 100.0f, 4096.0f,
                            1e30f, INFINITY, NAN};
    for (size_t i = 0; i < sizeof beyond / sizeof beyond[0]; ++i)
        for (int bits = 32; bits <= 40; ++bits)
            ck_assert_msg(psm_weight(beyond[i], bits) == 0, "psm_weight(%a, %d) = %llu",
                          (double)beyond[i], bits,
                          (unsigned long long)psm_weight(beyond[i], bits));
}
END_TEST

/* Non-increasing in d on a dense grid, and at both float neighbours of every
 * half-integer, where round(d) changes and the polynomial's argument jumps
 * from +0.5 to -0.5. Also within the documented relative error of 2^(B-d). */
START_TEST(weight_monotone_and_accurate)
{
    const int bits = PSM_MAX_WEIGHT_BITS;
    const double polynomial_error = 1.1e-7; /* docs/SAMPLING.md, section 3 */
    psm_u64 previous = psm_weight(0.0f, bits);
    float previous_d = 0.0f;
    int checked = 0;
    for (int step = 1; step <= 64 * 4096; ++step) {
        float d = (float)step / 4096.0f;
        float probes[3] = {d, d, d};
        int probe_count = 1;
        if (step % 2048 == 0 && step % 4096 != 0) {
            probes[0] = nextafterf(d, 0.0f);
            probes[1] = d;
            probes[2] = nextafterf(d, INFINITY);
            probe_count = 3;
        }
        for (int p = 0; p < probe_count; ++p) {
            psm_u64 weight = psm_weight(probes[p], bits);
            ck_assert_msg(weight <= previous,
                          "psm_weight not monotone: w(%a) = %llu > w(%a) = %llu",
                          (double)probes[p], (unsigned long long)weight, (double)previous_d,
                          (unsigned long long)previous);
            double exact = ldexp(1.0, bits) * exp2(-(double)probes[p]);
            double bound = exact * polynomial_error + 1.0; /* + 1: truncation */
            ck_assert_msg(fabs((double)weight - exact) <= bound,
                          "psm_weight(%a) = %llu, exact %.17g, error %.3g > %.3g",
                          (double)probes[p], (unsigned long long)weight, exact,
                          fabs((double)weight - exact), bound);
            previous = weight;
            previous_d = probes[p];
            ++checked;
        }
    }
    ck_assert_int_gt(checked, 64 * 4096);
}
END_TEST

/* psm_weight_of_gap (the form the GPU kernels use) is psm_weight after the
 * contract's gap clamp, for every gap d >= 0 a kernel can produce. With
 * PSM_TEST_EXHAUSTIVE set, every float in [0, 128] (about 1.1e9; done once
 * on 2026-11-25: no difference); otherwise a stride of 997 through them, a
 * stride of 71 in [2^-32, 2^-20) around the dropped clamp, and the edges. */
START_TEST(weight_of_gap_equals_weight)
{
    const int exhaustive = getenv("PSM_TEST_EXHAUSTIVE") != NULL;
    const psm_u32 last = psm_float_bits(128.0f);
    const psm_u32 near_clamp = psm_float_bits(0x1p-32f), small = psm_float_bits(0x1p-20f);
    const int bits_cases[] = {32, 36, 39, 40};
    psm_u32 b = 0;
    while (b <= last) {
        const float d = psm_bits_float(b);
        const float clamped = psm_scaled_gap(0.0f, -d, 1.0f); /* the contract's clamp */
        for (size_t k = 0; k < sizeof bits_cases / sizeof bits_cases[0]; ++k) {
            const int bits = bits_cases[k];
            const psm_u64 expected = psm_weight(clamped, bits);
            const psm_u64 got = psm_weight_of_gap(d, bits);
            ck_assert_msg(got == expected, "psm_weight_of_gap(%a, %d) = %llu, psm_weight %llu",
                          (double)d, bits, (unsigned long long)got,
                          (unsigned long long)expected);
        }
        b += exhaustive ? 1u : (b >= near_clamp && b < small ? 71u : 997u);
    }
    const float edges[] = {0.0f, 0x1p-30f, nextafterf(0x1p-30f, 0.0f), 0.5f, 63.5f,
                           nextafterf(63.5f, 0.0f), 64.0f, 1e30f, INFINITY};
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; ++i)
        for (int bits = 32; bits <= 40; ++bits)
            ck_assert_msg(psm_weight_of_gap(edges[i], bits) ==
                              psm_weight(psm_scaled_gap(0.0f, -edges[i], 1.0f), bits),
                          "psm_weight_of_gap(%a, %d)", (double)edges[i], bits);
}
END_TEST

static unsigned long long long_double_rescale(psm_u64 mass, float d)
{
    return (unsigned long long)floorl((long double)mass * exp2l(-(long double)d));
}

START_TEST(rescale_mass_matches_long_double)
{
    const psm_u64 masses[] = {1u,
                              1023u,
                              (psm_u64)1 << 40,
                              ((psm_u64)1 << 50) + 12345u,
                              0x123456789abcdefu,
                              ((psm_u64)1 << 62) + 987654321u,
                              0x7fffffffffffffffu};
    const double polynomial_error = 1.1e-7;
    for (size_t m = 0; m < sizeof masses / sizeof masses[0]; ++m) {
        psm_u64 mass = masses[m];
        ck_assert_uint_eq(psm_rescale_mass(mass, 0.0f), mass);
        /* Integer gaps are exact powers of two: a plain shift. */
        for (int n = 1; n < 64; ++n)
            ck_assert_msg(psm_rescale_mass(mass, (float)n) == mass >> n,
                          "rescale(%llu, %d) = %llu, expected %llu", (unsigned long long)mass,
                          n, (unsigned long long)psm_rescale_mass(mass, (float)n),
                          (unsigned long long)(mass >> n));
        for (int step = 1; step < 80 * 64; ++step) {
            float d = (float)step / 64.0f + 0x1p-10f;
            unsigned long long expected = long_double_rescale(mass, d);
            unsigned long long got = psm_rescale_mass(mass, d);
            long double bound = (long double)expected * polynomial_error + 1.0L;
            long double error = fabsl((long double)got - (long double)expected);
            ck_assert_msg(error <= bound, "rescale(%llu, %a) = %llu, long double %llu",
                          (unsigned long long)mass, (double)d, got, expected);
        }
    }
    ck_assert_uint_eq(psm_rescale_mass(0u, 1.5f), 0u);
    ck_assert_uint_eq(psm_rescale_mass(12345u, 4096.0f), 0u);
    ck_assert_uint_eq(psm_rescale_mass(12345u, INFINITY), 0u);
}
END_TEST

/* Half-precision decoding written from the IEEE 754 definition, in double. */
static double decode_half_reference(uint16_t h)
{
    int sign = h >> 15;
    int exponent = (h >> 10) & 0x1f;
    int mantissa = h & 0x3ff;
    double magnitude;
    if (exponent == 0x1f)
        magnitude = mantissa ? NAN : INFINITY;
    else if (exponent == 0)
        magnitude = ldexp((double)mantissa, -24);
    else
        magnitude = ldexp(1.0 + mantissa / 1024.0, exponent - 15);
    return sign ? -magnitude : magnitude;
}

START_TEST(f16_known_values)
{
    static const struct {
        uint16_t half;
        double value;
    } table[] = {
        {0x0000u, 0.0},
        {0x3c00u, 1.0},
        {0xc000u, -2.0},
        {0x3800u, 0.5},
        {0x3555u, 0.333251953125},
        {0x7bffu, 65504.0},
        {0xfbffu, -65504.0},
        {0x0400u, 0x1p-14},          /* smallest normal */
        {0x03ffu, 1023.0 * 0x1p-24}, /* largest subnormal */
        {0x0200u, 0x1p-15},
        {0x0001u, 0x1p-24}, /* smallest subnormal */
        {0x8001u, -0x1p-24},
        {0x7c00u, INFINITY},
        {0xfc00u, -INFINITY},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; ++i) {
        float got = psm_f16_to_float(table[i].half);
        ck_assert_msg((double)got == table[i].value, "f16 %04x -> %a, expected %a",
                      table[i].half, (double)got, table[i].value);
    }
    ck_assert(signbit(psm_f16_to_float(0x8000u)) && psm_f16_to_float(0x8000u) == 0.0f);
    ck_assert(!signbit(psm_f16_to_float(0x0000u)));
    ck_assert(isnan(psm_f16_to_float(0x7e00u)));
    ck_assert(isnan(psm_f16_to_float(0x7c01u)));
    ck_assert(isnan(psm_f16_to_float(0xfe00u)));
}
END_TEST

START_TEST(f16_all_values)
{
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
        float got = psm_f16_to_float((psm_u16)h);
        double expected = decode_half_reference((uint16_t)h);
        if (isnan(expected)) {
            ck_assert_msg(isnan(got), "f16 %04x should be NaN, got %a", h, (double)got);
            continue;
        }
        ck_assert_msg((double)got == expected && !signbit(got) == !signbit(expected),
                      "f16 %04x -> %a, expected %a", h, (double)got, expected);
    }
}
END_TEST

START_TEST(bf16_all_values)
{
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
        float got = psm_bf16_to_float((psm_u16)h);
        uint32_t bits;
        memcpy(&bits, &got, sizeof bits);
        ck_assert_uint_eq(bits, h << 16);
    }
}
END_TEST

START_TEST(logit_reading_and_classes)
{
    ck_assert(psm_read_logit(0x1p-65f) == 0.0f && !signbit(psm_read_logit(0x1p-65f)));
    ck_assert(psm_read_logit(-0.0f) == 0.0f && !signbit(psm_read_logit(-0.0f)));
    ck_assert(psm_read_logit(-0x1p-100f) == 0.0f && !signbit(psm_read_logit(-0x1p-100f)));
    ck_assert(psm_read_logit(0x1p-64f) == 0x1p-64f);
    ck_assert(psm_read_logit(-3.5f) == -3.5f);
    ck_assert_int_eq(psm_logit_class(1.0f), PSM_LOGIT_VALID);
    ck_assert_int_eq(psm_logit_class(-3.4e38f), PSM_LOGIT_VALID);
    ck_assert_int_eq(psm_logit_class(-INFINITY), PSM_LOGIT_MASKED);
    ck_assert_int_eq(psm_logit_class(INFINITY), PSM_LOGIT_BAD);
    ck_assert_int_eq(psm_logit_class(NAN), PSM_LOGIT_BAD);
    ck_assert_int_eq(psm_logit_class(-NAN), PSM_LOGIT_BAD);
    /* Rank order: higher logit first, then lower index. */
    ck_assert(psm_rank_key(2.0f, 9) > psm_rank_key(1.0f, 0));
    ck_assert(psm_rank_key(1.0f, 3) > psm_rank_key(1.0f, 4));
    ck_assert(psm_rank_key(-1.0f, 0) > psm_rank_key(-2.0f, 0));
    ck_assert(psm_rank_key(0.0f, 7) > psm_rank_key(-0x1p-60f, 0));
}
END_TEST

/* Hand values: ceil(mass * p') with p' = p truncated to 32 fraction bits
 * (0.3f is slightly above 0.3, so 10 * 0.3f rounds up to 4). */
START_TEST(top_p_target_hand_values)
{
    ck_assert_uint_eq(psm_top_p_target(1000u, 0.5f), 500u);
    ck_assert_uint_eq(psm_top_p_target((psm_u64)4 << 40, 0.5f), (psm_u64)2 << 40);
    ck_assert_uint_eq(psm_top_p_target(10u, 0.3f), 4u);
    ck_assert_uint_eq(psm_top_p_target(((psm_u64)1 << 62) + 12345u, 0.9f),
                      4150517306633497447u);
    ck_assert_uint_eq(psm_top_p_target(123456789012345u, 0.95f), 117283948090009u);
    ck_assert_uint_eq(psm_top_p_target(1u, 1e-9f), 1u);
    ck_assert_uint_eq(psm_top_p_target(7u, 1.0f), 7u);
    ck_assert_uint_eq(psm_top_p_target(0u, 0.5f), 0u);
}
END_TEST

START_TEST(min_p_threshold_hand_values)
{
    ck_assert_uint_eq(psm_min_p_threshold(0.0f, 40), 0u);
    ck_assert_uint_eq(psm_min_p_threshold(0.5f, 40), (psm_u64)1 << 39);
    ck_assert_uint_eq(psm_min_p_threshold(1.0f, 40), (psm_u64)1 << 40);
    ck_assert_uint_eq(psm_min_p_threshold(0.1f, 40), 109951164416u);
    ck_assert_uint_eq(psm_min_p_threshold(0.05f, 40), 54975582208u);
    ck_assert_uint_eq(psm_min_p_threshold(0.3333333f, 40), 366503854080u);
    ck_assert_uint_eq(psm_min_p_threshold(0.1f, 32), 429496736u);
    ck_assert_uint_eq(psm_min_p_threshold(1e-20f, 40), 1u);
}
END_TEST

static double ulp_of(float x)
{
    float magnitude = fabsf(x);
    return (double)nextafterf(magnitude, INFINITY) - (double)magnitude;
}

START_TEST(inverse_temperature_scale_within_2_ulp)
{
    const double log2e = 1.44269504088896340735992468100189;
    double worst = 0.0;
    float worst_temperature = 0.0f;
    /* A logarithmic grid over the whole defined range, plus its ends. */
    const int points = 200000;
    for (int i = 0; i <= points + 1; ++i) {
        float temperature;
        if (i == points + 1)
            temperature = PSM_MAX_TEMPERATURE;
        else
            temperature = (float)(1e-5 * pow(1e11, (double)i / points));
        if (temperature < PSM_GREEDY_TEMPERATURE)
            temperature = PSM_GREEDY_TEMPERATURE;
        if (temperature > PSM_MAX_TEMPERATURE)
            temperature = PSM_MAX_TEMPERATURE;
        float scale = psm_inverse_temperature_scale(temperature);
        double expected = log2e / (double)temperature;
        double ulps = fabs((double)scale - expected) / ulp_of((float)expected);
        if (ulps > worst) {
            worst = ulps;
            worst_temperature = temperature;
        }
    }
    const float exact_cases[] = {1.0f, 0.7f, 2.0f, 0.5f, 1.5f, 3.0f, 0.1f};
    for (size_t i = 0; i < sizeof exact_cases / sizeof exact_cases[0]; ++i) {
        double expected = log2e / (double)exact_cases[i];
        double ulps =
            fabs((double)psm_inverse_temperature_scale(exact_cases[i]) - expected) /
            ulp_of((float)expected);
        if (ulps > worst) {
            worst = ulps;
            worst_temperature = exact_cases[i];
        }
    }
    ck_assert_msg(worst <= 2.0, "psm_inverse_temperature_scale(%a) is %.3f ulp from log2(e)/T",
                  (double)worst_temperature, worst);
}
END_TEST

int main(void)
{
    psm_test_register_common(philox_known_answers);
    psm_test_register_common(sample_bits_layout);
    psm_test_register_common(weight_bits_by_vocab);
    psm_test_register_common(weight_of_top_token_is_exact);
    psm_test_register_common(weight_vanishes_from_64);
    psm_test_register_common(weight_monotone_and_accurate);
    psm_test_register_common(weight_of_gap_equals_weight);
    psm_test_register_common(rescale_mass_matches_long_double);
    psm_test_register_common(f16_known_values);
    psm_test_register_common(f16_all_values);
    psm_test_register_common(bf16_all_values);
    psm_test_register_common(logit_reading_and_classes);
    psm_test_register_common(top_p_target_hand_values);
    psm_test_register_common(min_p_threshold_hand_values);
    psm_test_register_common(inverse_temperature_scale_within_2_ulp);
    return psm_test_run("test_contract");
}
