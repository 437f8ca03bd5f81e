/*
 * test_cpu_weight.c: checks backends/cpu/cpu_weight.h (the CPU backend's
 * vectorised weight and gap) against core/psm_contract.h, compiled as
 * the CPU backend compiles them (the same pragma, the same target clones, an
 * omp simd loop). Registered with ctest in its quick form; after any change
 * to cpu_weight.h or to the CPU backend's flags, run it exhaustively:
 *
 *   build/tests/test_cpu_weight --exhaustive     (minutes on 2 cores)
 *
 * Exhaustive: for every B in [32, 40], psm_cpu_weight_float(d, B) and
 * psm_cpu_weight(d, B) against psm_weight(d, B) for every float bit pattern d
 * with the sign bit clear (+0 up to +inf and every positive NaN) and every
 * negative NaN; psm_cpu_scaled_gap against psm_scaled_gap on 2e8 random and
 * edge inputs.
 * Quick (default): every pattern with d in [0.25, 64.5] (where n and the
 * shift vary; below 0.25 the rounding gives n = 0) for B = 32, 36 and 40, the
 * rest of the patterns with a stride of 4099, and 2e6 gap inputs.
 * Exits 0 when every value agrees.
 */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math") /* as in backends/cpu/cpu_backend.h */
#endif
#include "cpu_weight.h"
#include "psm_contract.h"

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    (!defined(__clang__) || __clang_major__ >= 14)
#define CHECK_HOT __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CHECK_HOT
#endif

#define CHUNK 4096

/* The vectorised weights of CHUNK consecutive bit patterns. */
CHECK_HOT
static void vector_weights(uint32_t first, int weight_bits, float *as_float, uint64_t *as_integer)
{
#pragma omp simd
    for (int i = 0; i < CHUNK; ++i) {
        float d = psm_bits_float(first + (uint32_t)i);
        as_float[i] = psm_cpu_weight_float(d, weight_bits);
        as_integer[i] = psm_cpu_weight(d, weight_bits);
    }
}

/* Bit patterns first, first + stride, ... up to last, in chunks of CHUNK
 * consecutive patterns (stride 1: every pattern); returns the number of
 * mismatches. */
static uint64_t check_range(uint64_t first, uint64_t last, int weight_bits, uint64_t stride)
{
    uint64_t mismatches = 0;
    /* With a stride, each chunk starts stride * CHUNK patterns after the last. */
    uint64_t step = stride == 1 ? CHUNK : stride * CHUNK;
    int64_t chunks = (int64_t)((last - first) / step + 1);
#pragma omp parallel for schedule(dynamic, 256) reduction(+ : mismatches)
    for (int64_t c = 0; c < chunks; ++c) {
        float as_float[CHUNK];
        uint64_t as_integer[CHUNK];
        uint32_t start = (uint32_t)(first + (uint64_t)c * step);
        vector_weights(start, weight_bits, as_float, as_integer);
        for (int i = 0; i < CHUNK; ++i) {
            uint64_t bits = (uint64_t)start + (uint64_t)i;
            if (bits > last)
                break;
            float d = psm_bits_float((uint32_t)bits);
            uint64_t expected = psm_weight(d, weight_bits);
            if ((uint64_t)as_float[i] != expected || as_integer[i] != expected ||
                as_float[i] != (float)expected) {
                if (mismatches < 5)
                    fprintf(stderr, "B %d d bits %08" PRIx64 ": %" PRIu64 " (float %.9g) vs %" PRIu64 "\n",
                            weight_bits, bits, as_integer[i], (double)as_float[i], expected);
                ++mismatches;
            }
        }
    }
    return mismatches;
}

static uint64_t next_random(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

static uint64_t check_gaps(int64_t count)
{
    static const float edges[] = {0.0f, -0.0f, 1.0f, -1.0f, 0x1p-30f, 0x1p-31f, 0x1.fffffep-31f,
                                  0x1p-64f, 3.0e38f, -3.0e38f, 1.0f / 0.0f, -1.0f / 0.0f};
    int edge_count = (int)(sizeof edges / sizeof edges[0]);
    uint64_t mismatches = 0, state = 1;
    for (int64_t k = 0; k < count; ++k) {
        float in[3];
        for (int j = 0; j < 3; ++j) {
            uint64_t draw = next_random(&state);
            if ((draw & 7) == 0)
                in[j] = edges[(draw >> 3) % (uint64_t)edge_count];
            else if ((draw & 7) < 4)
                in[j] = (float)((int64_t)(draw >> 40) - (1 << 23)) * 0x1p-18f; /* near each other */
            else
                in[j] = psm_bits_float((uint32_t)(draw >> 32));
        }
        float a = psm_cpu_scaled_gap(in[0], in[1], in[2]);
        float b = psm_scaled_gap(in[0], in[1], in[2]);
        if (psm_float_bits(a) != psm_float_bits(b) && !(a != a && b != b)) {
            if (mismatches < 5)
                fprintf(stderr, "gap(%a, %a, %a): %a vs %a\n", (double)in[0], (double)in[1],
                        (double)in[2], (double)a, (double)b);
            ++mismatches;
        }
    }
    return mismatches;
}

int main(int argc, char **argv)
{
    int exhaustive = argc > 1 && strcmp(argv[1], "--exhaustive") == 0;
    if (argc > 1 && !exhaustive) {
        fprintf(stderr, "usage: %s [--exhaustive]\n", argv[0]);
        return 2;
    }
    uint64_t total = 0;
    for (int weight_bits = 32; weight_bits <= 40; ++weight_bits) {
        uint64_t bad;
        if (exhaustive) {
            bad = check_range(0, 0x7fffffffu, weight_bits, 1);
            bad += check_range(0xff800001u, 0xffffffffu, weight_bits, 1);
            printf("B = %d: %" PRIu64 " mismatches over every non-negative float and negative NaN\n",
                   weight_bits, bad);
        } else {
            if (weight_bits % 4 != 0)
                continue;
            bad = check_range(0x3e800000u, 0x42810000u, weight_bits, 1); /* d in [0.25, 64.5] */
            bad += check_range(0, 0x7fffffffu, weight_bits, 4099);
            bad += check_range(0xff800001u, 0xffffffffu, weight_bits, 4099);
            printf("B = %d: %" PRIu64 " mismatches over d in [0.25, 64.5] and a 1/4099 sample "
                   "of the other patterns\n", weight_bits, bad);
        }
        fflush(stdout);
        total += bad;
    }
    int64_t gap_inputs = exhaustive ? 200000000 : 2000000;
    uint64_t gap_bad = check_gaps(gap_inputs);
    printf("scaled gap: %" PRIu64 " mismatches over %" PRId64 " random and edge inputs\n", gap_bad,
           gap_inputs);
    total += gap_bad;
    printf("%s\n", total == 0 ? "all equal" : "MISMATCHES");
    return total == 0 ? 0 : 1;
}
