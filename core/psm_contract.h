/*
 * psm_contract.h: the arithmetic that decides a token, defined once.
 *
 * This header compiles unchanged as C99/C11, CUDA, HIP and OpenCL C 1.2.
 * Every backend computes the quantities below with exactly these functions,
 * so that the same logits, parameters and seed give the same tokens on every
 * device. docs/SAMPLING.md explains the contract; this file is its code.
 *
 * What keeps it exact:
 * - floating-point operations are only +, -, x and conversions, each
 *   correctly rounded, written through PSM_FADD/PSM_FSUB/PSM_FMUL so that no
 *   compiler can fuse them into an FMA (CUDA and HIP use the _rn intrinsics,
 *   OpenCL turns FP_CONTRACT off, C builds use -ffp-contract=off);
 * - no intermediate is ever a denormal (tiny values are cleared on purpose,
 *   so flush-to-zero hardware computes the same thing);
 * - sums, prefix sums, thresholds and searches are unsigned 64-bit integers,
 *   which are associative, so any parallel order gives the same answer.
 */
#ifndef PSM_CONTRACT_H
#define PSM_CONTRACT_H

/* ---- platform layer: qualifiers, integer types, intrinsics -------------- */

#if defined(__OPENCL_VERSION__)
#define PSM_PLATFORM_OPENCL 1
#else
#define PSM_PLATFORM_OPENCL 0
#endif
#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSM_PLATFORM_GPU_CXX 1
#else
#define PSM_PLATFORM_GPU_CXX 0
#endif

#if PSM_PLATFORM_OPENCL
#pragma OPENCL FP_CONTRACT OFF
typedef uint psm_u32;
typedef int psm_i32;
typedef ulong psm_u64;
typedef long psm_i64;
typedef ushort psm_u16;
#define PSM_FN static inline
/* Per-row arrays and other device buffers that helpers read through a
 * pointer: __global in OpenCL, plain memory elsewhere. */
#define PSM_GLOBAL __global
#else
#define PSM_GLOBAL
#include <stdint.h>
typedef uint32_t psm_u32;
typedef int32_t psm_i32;
typedef uint64_t psm_u64;
typedef int64_t psm_i64;
typedef uint16_t psm_u16;
#if PSM_PLATFORM_GPU_CXX
#define PSM_FN static __host__ __device__ __forceinline__
#else
#include <string.h>
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF /* GCC ignores this pragma: it needs -ffp-contract=off */
#endif
#define PSM_FN static inline
#endif
#endif

/* Correctly rounded single operations, never contracted into an FMA. On the
 * host side of a CUDA/HIP translation unit the _rn intrinsics are not
 * available, so the host compiler's no-contraction flag applies there. */
#if PSM_PLATFORM_GPU_CXX && (defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__))
#define PSM_FADD(a, b) __fadd_rn((a), (b))
#define PSM_FSUB(a, b) __fsub_rn((a), (b))
#define PSM_FMUL(a, b) __fmul_rn((a), (b))
#else
#define PSM_FADD(a, b) ((a) + (b))
#define PSM_FSUB(a, b) ((a) - (b))
#define PSM_FMUL(a, b) ((a) * (b))
#endif

PSM_FN psm_u32 psm_float_bits(float x)
{
#if PSM_PLATFORM_OPENCL
    return as_uint(x);
#elif PSM_PLATFORM_GPU_CXX && (defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__))
    return __float_as_uint(x);
#else
    psm_u32 bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
#endif
}

PSM_FN float psm_bits_float(psm_u32 bits)
{
#if PSM_PLATFORM_OPENCL
    return as_float(bits);
#elif PSM_PLATFORM_GPU_CXX && (defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__))
    return __uint_as_float(bits);
#else
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
#endif
}

/* High 32 bits of a 32 x 32 product. */
PSM_FN psm_u32 psm_mulhi32(psm_u32 a, psm_u32 b)
{
#if PSM_PLATFORM_OPENCL
    return mul_hi(a, b);
#elif PSM_PLATFORM_GPU_CXX && (defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__))
    return __umulhi(a, b);
#else
    return (psm_u32)(((psm_u64)a * b) >> 32);
#endif
}

/* High 64 bits of a 64 x 64 product. */
PSM_FN psm_u64 psm_mulhi64(psm_u64 a, psm_u64 b)
{
#if PSM_PLATFORM_OPENCL
    return mul_hi(a, b);
#elif PSM_PLATFORM_GPU_CXX && (defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__))
    return __umul64hi(a, b);
#elif defined(__SIZEOF_INT128__)
    return (psm_u64)(((unsigned __int128)a * b) >> 64);
#else
    psm_u64 a_lo = a & 0xffffffffu, a_hi = a >> 32;
    psm_u64 b_lo = b & 0xffffffffu, b_hi = b >> 32;
    psm_u64 lo_lo = a_lo * b_lo, hi_lo = a_hi * b_lo;
    psm_u64 lo_hi = a_lo * b_hi, hi_hi = a_hi * b_hi;
    psm_u64 cross = (lo_lo >> 32) + (hi_lo & 0xffffffffu) + lo_hi;
    return hi_hi + (hi_lo >> 32) + (cross >> 32);
#endif
}

/* ---- contract constants ------------------------------------------------- */

/* Tokens per tile. Part of the contract (it shapes the draw), never a
 * device choice: every backend cuts a row into the same tiles. */
#define PSM_TILE 1024
#define PSM_TILE_LOG2 10

/* Temperatures below this are greedy (the convention vLLM uses). */
#define PSM_GREEDY_TEMPERATURE 1e-5f
#define PSM_MAX_TEMPERATURE 1e6f

/* Weight of the most probable token is 2^bits; see psm_weight_bits. */
#define PSM_MAX_WEIGHT_BITS 40

/* Magnitudes below 2^-64 are read as +0: keeps denormals out of all later
 * arithmetic and makes -0 and +0 one value. */
#define PSM_TINY 0x1p-64f
/* Scaled gaps below 2^-30 are read as 0 (their effect on a weight is below
 * the 2^-40 fixed-point resolution). */
#define PSM_TINY_GAP 0x1p-30f

/* ---- inputs ------------------------------------------------------------- */

/* A logit as the contract reads it: tiny magnitudes (and -0) become +0. */
PSM_FN float psm_read_logit(float x)
{
    return (x < PSM_TINY && x > -PSM_TINY) ? 0.0f : x;
}

/* bfloat16 -> float: exact (a bf16 is the top half of a float). */
PSM_FN float psm_bf16_to_float(psm_u16 h)
{
    return psm_bits_float((psm_u32)h << 16);
}

/* IEEE half -> float: exact, in integer arithmetic (hardware conversions
 * are exact too and give the same floats). */
PSM_FN float psm_f16_to_float(psm_u16 h)
{
    psm_u32 sign = ((psm_u32)h & 0x8000u) << 16;
    psm_u32 exponent = ((psm_u32)h >> 10) & 0x1fu;
    psm_u32 mantissa = (psm_u32)h & 0x3ffu;
    if (exponent == 0x1fu)
        return psm_bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0u) {
        if (mantissa == 0u)
            return psm_bits_float(sign);
        exponent = 113u; /* 127 - 15 + 1: renormalise the subnormal */
        while ((mantissa & 0x400u) == 0u) {
            mantissa <<= 1;
            exponent -= 1u;
        }
        return psm_bits_float(sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13));
    }
    return psm_bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/* What a logit means for its row. */
#define PSM_LOGIT_VALID 0   /* finite: a candidate token */
#define PSM_LOGIT_MASKED 1  /* -inf: never drawn */
#define PSM_LOGIT_BAD 2     /* NaN or +inf: the whole row is bad (token -1) */

PSM_FN int psm_logit_class(float x)
{
    psm_u32 magnitude = psm_float_bits(x) & 0x7fffffffu;
    if (magnitude < 0x7f800000u)
        return PSM_LOGIT_VALID;
    if (magnitude == 0x7f800000u && (psm_float_bits(x) >> 31))
        return PSM_LOGIT_MASKED;
    return PSM_LOGIT_BAD;
}

/* ---- logit processing (docs/SAMPLING.md, section 1) --------------------- */

/* Penalty ranges: finite values whose products with a logit and a count stay
 * far from float's limits in the common cases (an overflow makes the row
 * bad, as an infinite logit does). */
#define PSM_MIN_REPETITION_PENALTY 1e-3f
#define PSM_MAX_REPETITION_PENALTY 1e3f
#define PSM_MAX_ADDITIVE_PENALTY 1e3f
/* Tokens a row's history may hold: counts stay exact in a float. */
#define PSM_MAX_HISTORY_TOKENS (1 << 24)

/* 1/r by four Newton steps from a bit-level first guess, in correctly
 * rounded operations (an OpenCL division need not be correctly rounded, so
 * none is used): the temperature scale's reciprocal and the repetition
 * penalty's. For r in [1e-6, 1e6]. */
PSM_FN float psm_newton_reciprocal(float r)
{
    float reciprocal = psm_bits_float(0x7ef311c3u - psm_float_bits(r));
    int step;
    for (step = 0; step < 4; ++step) {
        float error = PSM_FSUB(1.0f, PSM_FMUL(r, reciprocal));
        reciprocal = PSM_FADD(reciprocal, PSM_FMUL(reciprocal, error));
    }
    return reciprocal;
}

/* 1/r for a repetition penalty r in the penalty range. */
PSM_FN float psm_penalty_reciprocal(float r)
{
    return psm_newton_reciprocal(r);
}

PSM_FN int psm_penalties_valid(float repetition, float frequency, float presence)
{
    return repetition >= PSM_MIN_REPETITION_PENALTY && repetition <= PSM_MAX_REPETITION_PENALTY &&
           frequency >= -PSM_MAX_ADDITIVE_PENALTY && frequency <= PSM_MAX_ADDITIVE_PENALTY &&
           presence >= -PSM_MAX_ADDITIVE_PENALTY && presence <= PSM_MAX_ADDITIVE_PENALTY;
}

/* A logit x (after psm_read_logit) of a token that the row's history holds
 * `count` times, or that its prompt list holds (repeated): the repetition
 * penalty (x > 0: x times 1/r, else x times r; the Hugging Face and vLLM
 * rule, with the reciprocal above), then the frequency and presence
 * penalties for a token counted at least once (the OpenAI rule), each a
 * correctly rounded operation. A token neither repeated nor counted keeps x. */
PSM_FN float psm_penalised_logit(float x, psm_u32 count, int repeated, float repetition,
                                 float repetition_reciprocal, float frequency, float presence)
{
    if (!repeated && count == 0)
        return x;
    if (repetition != 1.0f) /* off: the reciprocal of 1 need not be exactly 1 */
        x = x > 0.0f ? PSM_FMUL(x, repetition_reciprocal) : PSM_FMUL(x, repetition);
    if (count > 0) {
        x = PSM_FSUB(x, PSM_FMUL(frequency, (float)count));
        x = PSM_FSUB(x, presence);
    }
    return x;
}

/* ---- temperature -------------------------------------------------------- */

PSM_FN int psm_is_greedy(float temperature)
{
    return temperature < PSM_GREEDY_TEMPERATURE;
}

/* The per-row scale s = log2(e) / T, by Newton's method in correctly rounded
 * operations (an OpenCL division need not be correctly rounded, so none is
 * used). Defined for T in [PSM_GREEDY_TEMPERATURE, PSM_MAX_TEMPERATURE]. */
PSM_FN float psm_inverse_temperature_scale(float temperature)
{
    return PSM_FMUL(0x1.715476p+0f /* log2(e) */, psm_newton_reciprocal(temperature));
}

/* Are a row's parameters in range? Host arrays are checked by core before a
 * call; device backends check per-row arrays on the device with this. */
PSM_FN int psm_row_params_valid(float temperature, psm_i32 top_k, float top_p, float min_p)
{
    return temperature >= 0.0f && temperature <= PSM_MAX_TEMPERATURE && top_k >= 0 &&
           top_p > 0.0f && top_p <= 1.0f && min_p >= 0.0f && min_p <= 1.0f;
}

/* ---- weights ------------------------------------------------------------ */

/* Fixed-point bits of the top token's weight: 2^bits. Chosen from the vocab
 * alone so that a whole row's mass, at most vocab * 2^bits, fits in 63 bits:
 * 40 bits up to a vocab of 2^23, one bit fewer for each doubling beyond. */
PSM_FN int psm_weight_bits(psm_i64 vocab)
{
    int log2_ceiling = 0;
    while (((psm_i64)1 << log2_ceiling) < vocab)
        ++log2_ceiling;
    return log2_ceiling <= 23 ? PSM_MAX_WEIGHT_BITS : 63 - log2_ceiling;
}

/* The scaled gap between a reference logit and a logit, in log2 units:
 * d = (reference - x) * s, two correctly rounded operations. Subtracting
 * first keeps the error relative to the gap, not to the logit's size. */
PSM_FN float psm_scaled_gap(float reference, float x, float scale)
{
    float gap = PSM_FMUL(PSM_FSUB(reference, x), scale);
    return gap < PSM_TINY_GAP ? 0.0f : gap;
}

/* 2^-d as q * 2^-(24 + n): q an integer in [2^23.5, 2^24.5], n = round(d).
 * Valid for 0 <= d < 2^22. */
typedef struct psm_exp2_parts {
    psm_u32 q;
    psm_i32 n;
} psm_exp2_parts;

/* 2^-r for r in [-0.5, 0.5]: a Chebyshev fit of degree 6, evaluated by
 * Horner in float, in this order of operations. Its own function so that a
 * backend computing the weight another exact way (the CPU backend's vector
 * form) evaluates the same polynomial. */
PSM_FN float psm_exp2_fraction(float r)
{
    float p = 0x1.444p-13f;
    p = PSM_FADD(PSM_FMUL(p, r), -0x1.5f48cp-10f);
    p = PSM_FADD(PSM_FMUL(p, r), 0x1.3b2a1cp-7f);
    p = PSM_FADD(PSM_FMUL(p, r), -0x1.c6aeccp-5f);
    p = PSM_FADD(PSM_FMUL(p, r), 0x1.ebfbe0p-3f);
    p = PSM_FADD(PSM_FMUL(p, r), -0x1.62e430p-1f);
    return PSM_FADD(PSM_FMUL(p, r), 1.0f);
}

PSM_FN psm_exp2_parts psm_exp2_negative(float d)
{
    /* Round to nearest integer by the 1.5 * 2^23 trick: exact for d < 2^22,
     * and the integer is read from the bits, so no conversion instruction. */
    const float shifter = 12582912.0f;
    float shifted = PSM_FADD(d, shifter);
    float nearest = PSM_FSUB(shifted, shifter);
    float r = PSM_FSUB(d, nearest); /* exact, in [-0.5, 0.5] */
    float p = psm_exp2_fraction(r);
    /* p is in [0.70, 1.42]; p * 2^24 is an integer, read from the bits. */
    psm_u32 bits = psm_float_bits(p);
    psm_exp2_parts parts;
    parts.q = ((bits & 0x7fffffu) | 0x800000u) << ((bits >> 23) - 126u);
    parts.n = (psm_i32)(psm_float_bits(shifted) - psm_float_bits(shifter));
    return parts;
}

/* A token's weight 2^(bits - d), truncated to an integer; 0 when d >= 64. */
PSM_FN psm_u64 psm_weight(float d, int weight_bits)
{
    if (!(d < 64.0f))
        return 0;
    psm_exp2_parts parts = psm_exp2_negative(d);
    int shift = weight_bits - 24 - parts.n;
    if (shift >= 0)
        return (psm_u64)parts.q << shift;
    return -shift < 32 ? (psm_u64)(parts.q >> -shift) : 0;
}

/* The same weight, restated for devices where the integer shifts cost more
 * than a conversion: psm_weight_of_gap(fl(fl(ref - x) * s), bits) equals
 * psm_weight(psm_scaled_gap(ref, x, s), bits) whenever ref >= x (so the
 * product is >= 0, +inf or NaN-free); x = -inf gives +inf, weight 0.
 * Why it is the same function:
 * - no tiny-gap clamp: for 0 < d < 2^-30 every Horner step rounds back to
 *   its constant (each term c_k * r is below half an ulp of c_k), so p = 1
 *   exactly, as for d = 0; n = 0 for both;
 * - d is clamped to 128 instead of testing d < 64: every d >= 63.5 has
 *   n >= 64 and weighs 0 either way (bits - 24 - n <= -48), and NaN maps to
 *   128 as well;
 * - q = p * 2^24 exactly, so floor(q * 2^(bits - 24 - n)) =
 *   floor(p * 2^(bits - n)); that product is a float times a power of two,
 *   exact and normal for n in [0, 128], and the conversion to an integer
 *   truncates. The shift form (q << k, q >> -k, 0 past 32) is that floor.
 * tests/test_contract.c compares the two on every float d in [0, 128] when
 * PSM_TEST_EXHAUSTIVE is set (and on a stride of them otherwise). */
/* p * 2^(bits - n) for d = n + r in [0, 128]: the weight before truncation
 * (see psm_weight_of_gap); d must already be clamped. Also the core of the
 * CPU backend's vector weight (backends/cpu/cpu_weight.h), which clamps and
 * floors in its own branch-free way. */
PSM_FN float psm_weight_product(float d, int weight_bits)
{
    const float shifter = 12582912.0f;
    float shifted = PSM_FADD(d, shifter);
    float nearest = PSM_FSUB(shifted, shifter);
    float p = psm_exp2_fraction(PSM_FSUB(d, nearest));
    /* 2^(bits - n), n = round(d) read from the bits as in psm_exp2_negative */
    psm_u32 exponent = (psm_u32)(127 + weight_bits) + psm_float_bits(shifter) -
                       psm_float_bits(shifted);
    return PSM_FMUL(p, psm_bits_float(exponent << 23));
}

PSM_FN psm_u64 psm_weight_of_gap(float d, int weight_bits)
{
    return (psm_u64)psm_weight_product(d < 128.0f ? d : 128.0f, weight_bits);
}

/* fl(fl(reference - x) * s): psm_scaled_gap without its tiny-gap clamp, the
 * argument psm_weight_of_gap takes (see there why the clamp is not needed). */
PSM_FN float psm_unclamped_gap(float reference, float x, float scale)
{
    return PSM_FMUL(PSM_FSUB(reference, x), scale);
}

/* floor(mass * 2^-d): moves a tile's mass from its own reference to the
 * row's. mass < 2^63, so mass * q needs 128 bits, kept as two halves. */
PSM_FN psm_u64 psm_rescale_mass(psm_u64 mass, float d)
{
    if (mass == 0 || !(d < 4096.0f))
        return 0;
    psm_exp2_parts parts = psm_exp2_negative(d);
    psm_u64 high = psm_mulhi64(mass, parts.q);
    psm_u64 low = mass * parts.q;
    int shift = 24 + parts.n; /* >= 24 */
    if (shift >= 128)
        return 0;
    if (shift >= 64)
        return high >> (shift - 64);
    return (low >> shift) | (high << (64 - shift));
}

/* ---- ordering and filters ----------------------------------------------- */

/* The order "most probable first": a larger key is earlier. Higher logit
 * first, then lower token index. Logits must have gone through
 * psm_read_logit (so there is no -0). */
/* A logit's bits mapped so that unsigned order is the logit's order: the
 * high half of its rank key. */
PSM_FN psm_u32 psm_ordered_bits(float x)
{
    psm_u32 bits = psm_float_bits(x);
    return (bits >> 31) ? ~bits : (bits | 0x80000000u);
}

PSM_FN psm_u64 psm_rank_key(float x, psm_u32 token)
{
    return ((psm_u64)psm_ordered_bits(x) << 32) | (psm_u64)(0xffffffffu - token);
}

/* The inverses: the logit of ordered bits (a rank key's high half), and the
 * logit and token a rank key was made from. */
PSM_FN float psm_ordered_logit(psm_u32 ordered)
{
    return psm_bits_float((ordered >> 31) ? (ordered & 0x7fffffffu) : ~ordered);
}

PSM_FN float psm_rank_key_logit(psm_u64 key)
{
    return psm_ordered_logit((psm_u32)(key >> 32));
}

PSM_FN psm_u32 psm_rank_key_token(psm_u64 key)
{
    return 0xffffffffu - (psm_u32)key;
}

/* top-p: keep the shortest prefix (in rank order, at least one token) whose
 * weight sum reaches ceil(mass * p'), p' = p truncated to 32 fraction bits. */
PSM_FN psm_u64 psm_top_p_target(psm_u64 mass, float top_p)
{
    if (!(top_p < 1.0f))
        return mass;
    psm_u64 p_fixed = (psm_u64)(psm_u32)PSM_FMUL(top_p, 4294967296.0f);
    psm_u64 shifted_p = p_fixed << 32;
    psm_u64 high = psm_mulhi64(mass, shifted_p);
    return high + ((mass * shifted_p) != 0 ? 1u : 0u);
}

/* min-p: keep tokens whose weight (against the row's top token, whose weight
 * is 2^bits) is at least ceil(min_p * 2^bits). 0 keeps everything. */
PSM_FN psm_u64 psm_min_p_threshold(float min_p, int weight_bits)
{
    if (!(min_p > 0.0f))
        return 0;
    float scaled = PSM_FMUL(min_p, psm_bits_float((psm_u32)(127 + weight_bits) << 23));
    psm_u64 whole = (psm_u64)scaled; /* truncation; (float)whole is exact */
    return whole + (((float)whole != scaled) ? 1u : 0u);
}

/* ---- filter orders (docs/SAMPLING.md, section 4, "Filter orders") -------- */

/* top-p as SGLang keeps it: a token stays while the mass ranked before it is
 * at most mass * p' (psm_top_p_target's p'), so the kept prefix is the
 * shortest one whose sum exceeds mass * p': it reaches floor(mass * p') + 1,
 * which is at most mass. */
PSM_FN psm_u64 psm_top_p_target_exceeding(psm_u64 mass, float top_p)
{
    if (!(top_p < 1.0f))
        return mass;
    psm_u64 p_fixed = (psm_u64)(psm_u32)PSM_FMUL(top_p, 4294967296.0f);
    return psm_mulhi64(mass, p_fixed << 32) + 1u;
}

/* The least rank key with the same logit as `key`: a cutoff lowered to it
 * keeps every token tied with the one the cutoff was made from (the orders
 * whose thresholds are on values: FlashInfer's top-k and top-p, vLLM's
 * top-k). */
PSM_FN psm_u64 psm_rank_key_tie_floor(psm_u64 key)
{
    return key & ((psm_u64)0xffffffffu << 32);
}

/* ---- random bits: Philox4x32-10 ------------------------------------------ */

typedef struct psm_u32x4 {
    psm_u32 v[4];
} psm_u32x4;

PSM_FN psm_u32x4 psm_philox4x32_10(psm_u32x4 counter, psm_u32 key0, psm_u32 key1)
{
    int round;
    for (round = 0; round < 10; ++round) {
        psm_u32 hi0 = psm_mulhi32(0xD2511F53u, counter.v[0]);
        psm_u32 lo0 = 0xD2511F53u * counter.v[0];
        psm_u32 hi1 = psm_mulhi32(0xCD9E8D57u, counter.v[2]);
        psm_u32 lo1 = 0xCD9E8D57u * counter.v[2];
        psm_u32x4 next;
        next.v[0] = hi1 ^ counter.v[1] ^ key0;
        next.v[1] = lo1;
        next.v[2] = hi0 ^ counter.v[3] ^ key1;
        next.v[3] = lo0;
        counter = next;
        key0 += 0x9E3779B9u;
        key1 += 0xBB67AE85u;
    }
    return counter;
}

/* The 128 random bits of one sample: the first 64 choose a tile, the last 64
 * a token within it. key = seed; counter = (sample, stream, offset).
 * stream is the row index when one seed serves the batch, and 0 with
 * per-row seeds (so a request's tokens do not depend on its row). */
typedef struct psm_draw_bits {
    psm_u64 tile;
    psm_u64 token;
} psm_draw_bits;

PSM_FN psm_draw_bits psm_sample_bits(psm_u64 seed, psm_u64 offset, psm_u32 stream,
                                     psm_u32 sample)
{
    psm_u32x4 counter;
    counter.v[0] = sample;
    counter.v[1] = stream;
    counter.v[2] = (psm_u32)offset;
    counter.v[3] = (psm_u32)(offset >> 32);
    psm_u32x4 out = psm_philox4x32_10(counter, (psm_u32)seed, (psm_u32)(seed >> 32));
    psm_draw_bits bits;
    bits.tile = ((psm_u64)out.v[1] << 32) | out.v[0];
    bits.token = ((psm_u64)out.v[3] << 32) | out.v[2];
    return bits;
}

/* A uniform integer in [0, total): floor(bits * total / 2^64). */
PSM_FN psm_u64 psm_pick(psm_u64 bits, psm_u64 total)
{
    return psm_mulhi64(bits, total);
}

#endif /* PSM_CONTRACT_H */
