/*
 * cpu_compact.h: the CPU backend's compaction steps, which copy the entries
 * of a tile that pass a test to the front of another array, in order. The
 * filtered passes use them to work on few tokens after a vector test on all
 * of them: top-p's bin pass bins only the tokens of the bins it needs, and
 * the kept passes weigh only the tokens that can be kept.
 *
 * GCC does not vectorise a compaction (the output position depends on every
 * earlier test), so each step has three forms: AVX-512F's compress
 * instructions, 16 entries at a time; AVX2, 8 at a time, whose lanes are
 * moved by a permutation looked up from the test's 8 bits (AVX2 has no
 * compress); and a portable branch-free loop (write every entry, advance by
 * the test's 0 or 1) that costs about a cycle an entry. All give the same
 * output; the choice is made per call from the CPU's features (a virtual
 * machine may hide AVX-512 from a CPU that has it, as the 2-core AMD EPYC
 * development machine's does). tests/test_cpu_compact.c compares each form
 * the CPU can run with the definition.
 *
 * Outputs need room for CPU_COMPACT_SLACK entries past the count: the vector
 * forms store 16 (AVX-512F) or 8 (AVX2) lanes at a time.
 */
#ifndef PSM_CPU_COMPACT_H
#define PSM_CPU_COMPACT_H

#include <stdint.h>

#define CPU_COMPACT_SLACK 16

#if defined(__x86_64__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define PSM_CPU_COMPACT_AVX512 1
#define PSM_CPU_COMPACT_AVX2 1
#include <immintrin.h>
#else
#define PSM_CPU_COMPACT_AVX512 0
#define PSM_CPU_COMPACT_AVX2 0
#endif

/* The portable loop over entries [first, n), after `count` outputs: the
 * portable form, and the vector forms' last entries. */
static inline int psm_cpu_select_from(const float *x, const float *paired, int first, int n,
                                      float floor, float *out, float *paired_out, int32_t *index,
                                      int count)
{
    for (int i = first; i < n; ++i) {
        out[count] = x[i];
        if (paired)
            paired_out[count] = paired[i];
        if (index)
            index[count] = i;
        count += x[i] >= floor;
    }
    return count;
}

/* Copies x[i] >= floor to out and, for those i, paired[i] to paired_out and
 * i to index when these are not NULL (all in index order); returns how
 * many. A NaN never passes. Every form below does the same. */
static inline int psm_cpu_select_at_least_portable(const float *x, const float *paired, int n,
                                                   float floor, float *out, float *paired_out,
                                                   int32_t *index)
{
    return psm_cpu_select_from(x, paired, 0, n, floor, out, paired_out, index, 0);
}

#if PSM_CPU_COMPACT_AVX512
__attribute__((target("avx512f"))) static inline int
psm_cpu_select_at_least_avx512(const float *x, const float *paired, int n, float floor,
                               float *out, float *paired_out, int32_t *index)
{
    const __m512 threshold = _mm512_set1_ps(floor);
    const __m512i step = _mm512_set1_epi32(16);
    __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int count = 0, i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 values = _mm512_loadu_ps(x + i);
        __mmask16 pass = _mm512_cmp_ps_mask(values, threshold, _CMP_GE_OQ);
        _mm512_storeu_ps(out + count, _mm512_maskz_compress_ps(pass, values));
        if (paired)
            _mm512_storeu_ps(paired_out + count,
                             _mm512_maskz_compress_ps(pass, _mm512_loadu_ps(paired + i)));
        if (index)
            _mm512_storeu_si512(index + count, _mm512_maskz_compress_epi32(pass, lanes));
        count += __builtin_popcount((unsigned)pass);
        lanes = _mm512_add_epi32(lanes, step);
    }
    return psm_cpu_select_from(x, paired, i, n, floor, out, paired_out, index, count);
}
#endif

#if PSM_CPU_COMPACT_AVX2
/* The AVX2 form's permutations (its table moves_of): entry m holds, byte by
 * byte from the lowest, the lanes whose bit m sets, in order (byte j: the
 * lane that moves to lane j; bytes past the count are 0). Built by the
 * preprocessor, so the table is constant data with nothing to initialise at
 * run time. */
#define PSM_COMPACT_BIT(m, b) (((m) >> (b)) & 1u)
#define PSM_COMPACT_BELOW(m, b) /* set bits of m below bit b */                                  \
    (PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 0) + PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 1) + \
     PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 2) + PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 3) + \
     PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 4) + PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 5) + \
     PSM_COMPACT_BIT((m) & ((1u << (b)) - 1u), 6))
#define PSM_COMPACT_LANE(m, b)                                                                   \
    (PSM_COMPACT_BIT(m, b) ? (uint64_t)(b) << (8u * PSM_COMPACT_BELOW(m, b)) : (uint64_t)0)
#define PSM_COMPACT_ENTRY(m)                                                                     \
    (PSM_COMPACT_LANE(m, 1) | PSM_COMPACT_LANE(m, 2) | PSM_COMPACT_LANE(m, 3) |                  \
     PSM_COMPACT_LANE(m, 4) | PSM_COMPACT_LANE(m, 5) | PSM_COMPACT_LANE(m, 6) |                  \
     PSM_COMPACT_LANE(m, 7)),
#define PSM_COMPACT_4(m) PSM_COMPACT_ENTRY(m) PSM_COMPACT_ENTRY(m + 1) PSM_COMPACT_ENTRY(m + 2) \
    PSM_COMPACT_ENTRY(m + 3)
#define PSM_COMPACT_16(m) PSM_COMPACT_4(m) PSM_COMPACT_4(m + 4) PSM_COMPACT_4(m + 8) \
    PSM_COMPACT_4(m + 12)
#define PSM_COMPACT_64(m) PSM_COMPACT_16(m) PSM_COMPACT_16(m + 16) PSM_COMPACT_16(m + 32) \
    PSM_COMPACT_16(m + 48)
__attribute__((target("avx2"))) static inline int
psm_cpu_select_at_least_avx2(const float *x, const float *paired, int n, float floor, float *out,
                             float *paired_out, int32_t *index)
{
    static const uint64_t moves_of[256] = {PSM_COMPACT_64(0u) PSM_COMPACT_64(64u)
                                               PSM_COMPACT_64(128u) PSM_COMPACT_64(192u)};
    const __m256 threshold = _mm256_set1_ps(floor);
    const __m256i step = _mm256_set1_epi32(8);
    __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    int count = 0, i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 values = _mm256_loadu_ps(x + i);
        unsigned pass =
            (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(values, threshold, _CMP_GE_OQ));
        __m256i moves = _mm256_cvtepu8_epi32(
            _mm_cvtsi64_si128((long long)moves_of[pass]));
        _mm256_storeu_ps(out + count, _mm256_permutevar8x32_ps(values, moves));
        if (paired)
            _mm256_storeu_ps(paired_out + count,
                             _mm256_permutevar8x32_ps(_mm256_loadu_ps(paired + i), moves));
        if (index)
            _mm256_storeu_si256((__m256i *)(index + count),
                                _mm256_permutevar8x32_epi32(lanes, moves));
        count += __builtin_popcount(pass);
        lanes = _mm256_add_epi32(lanes, step);
    }
    return psm_cpu_select_from(x, paired, i, n, floor, out, paired_out, index, count);
}
#endif

static inline int psm_cpu_select_at_least(const float *x, const float *paired, int n, float floor,
                                          float *out, float *paired_out, int32_t *index)
{
#if PSM_CPU_COMPACT_AVX512
    if (__builtin_cpu_supports("avx512f"))
        return psm_cpu_select_at_least_avx512(x, paired, n, floor, out, paired_out, index);
#endif
#if PSM_CPU_COMPACT_AVX2
    if (__builtin_cpu_supports("avx2"))
        return psm_cpu_select_at_least_avx2(x, paired, n, floor, out, paired_out, index);
#endif
    return psm_cpu_select_at_least_portable(x, paired, n, floor, out, paired_out, index);
}

#endif /* PSM_CPU_COMPACT_H */
