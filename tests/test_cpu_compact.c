/*
 * test_cpu_compact.c: checks backends/cpu/cpu_compact.h. Every form of the
 * compaction step (the portable loop and, where the CPU has them, AVX-512F's
 * compress instructions and AVX2's permutations) against the definition written as a plain filter,
 * on random inputs of every length from 0 to 100 and of 1024 (a tile):
 * logits with NaNs, infinities, -0, equal values and floors on and between
 * them; with and without the indices and a paired array. Outputs are compared over the count,
 * and the count itself. Exits 0 when every output agrees; says which vector
 * forms could not run here.
 */
#include "cpu_compact.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define MAX_N 1024

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t next_random(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

static float random_logit(void)
{
    switch (next_random() % 16) {
    case 0:
        return NAN;
    case 1:
        return -INFINITY;
    case 2:
        return INFINITY;
    case 3:
        return -0.0f;
    case 4:
        return 0.0f;
    case 5:
        return 1.5f;
    default:
        return (float)((int64_t)(next_random() % 2001) - 1000) / 250.0f;
    }
}

typedef int (*select_logits_fn)(const float *, const float *, int, float, float *, float *,
                                int32_t *);

static int failures;

/* with: bit 0 the indices, bit 1 the paired values (x + 1, bit for bit). */
static void check_logits(const char *form, select_logits_fn select, const float *x,
                         const float *paired, int n, float floor, int with)
{
    float out[MAX_N + CPU_COMPACT_SLACK], paired_out[MAX_N + CPU_COMPACT_SLACK];
    int32_t index[MAX_N + CPU_COMPACT_SLACK];
    int count = select(x, with & 2 ? paired : NULL, n, floor, out, with & 2 ? paired_out : NULL,
                       with & 1 ? index : NULL);
    int expected = 0;
    for (int i = 0; i < n; ++i) {
        if (!(x[i] >= floor))
            continue;
        if (expected >= count || ((with & 1) && index[expected] != i) ||
            ((with & 2) && memcmp(&paired_out[expected], &paired[i], sizeof paired[i]) != 0) ||
            memcmp(&out[expected], &x[i], sizeof x[i]) != 0) {
            if (failures++ < 10)
                fprintf(stderr, "%s: n %d floor %g: entry %d should be x[%d] = %g\n", form, n,
                        (double)floor, expected, i, (double)x[i]);
            return;
        }
        ++expected;
    }
    if (count != expected && failures++ < 10)
        fprintf(stderr, "%s: n %d floor %g: count %d, expected %d\n", form, n, (double)floor, count,
                expected);
}

int main(void)
{
    int vector_form = 0, avx2_form = 0;
#if PSM_CPU_COMPACT_AVX512
    vector_form = __builtin_cpu_supports("avx512f");
#endif
#if PSM_CPU_COMPACT_AVX2
    avx2_form = __builtin_cpu_supports("avx2");
#endif
    float x[MAX_N], paired[MAX_N];
    const float floors[] = {-INFINITY, -1000.0f, -0.0f, 0.0f, 1.5f, 0.1f, 3.9f, INFINITY};
    for (int round = 0; round < 200; ++round) {
        for (int n = 0; n <= 101; ++n) {
            int length = n == 101 ? MAX_N : n;
            for (int i = 0; i < length; ++i) {
                x[i] = random_logit();
                paired[i] = x[i] + 1.0f;
            }
            for (size_t f = 0; f < sizeof floors / sizeof floors[0]; ++f)
                for (int with = 0; with < 4; ++with) {
                    check_logits("portable", psm_cpu_select_at_least_portable, x, paired, length,
                                 floors[f], with);
#if PSM_CPU_COMPACT_AVX512
                    if (vector_form)
                        check_logits("avx512", psm_cpu_select_at_least_avx512, x, paired, length,
                                     floors[f], with);
#endif
#if PSM_CPU_COMPACT_AVX2
                    if (avx2_form)
                        check_logits("avx2", psm_cpu_select_at_least_avx2, x, paired, length,
                                     floors[f], with);
#endif
                }
        }
    }
    if (!vector_form)
        printf("test_cpu_compact: this CPU has no AVX-512F: its form was not checked\n");
    if (!avx2_form)
        printf("test_cpu_compact: this CPU has no AVX2: its form was not checked\n");
    printf("test_cpu_compact: %s\n", failures ? "FAILED" : "every output agrees");
    return failures ? 1 : 0;
}
