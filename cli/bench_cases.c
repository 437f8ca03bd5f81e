/* bench_cases.c: what `polysample bench` runs: the sampling settings, the two
 * logits distributions and how their values are made, and the case list
 * (the default one, or the cross product of the options). */
#include "bench.h"
#include "cli_util.h"

#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

const bench_setting bench_settings[BENCH_SETTING_COUNT] = {
    {"plain", 0.8f, 0, 1.0f, 0.0f},
    {"topk_topp", 0.8f, 50, 0.9f, 0.0f},
    {"top_p", 0.8f, 0, 0.9f, 0.0f},
    {"min_p", 0.8f, 0, 1.0f, 0.05f},
    {"greedy", 0.0f, 0, 1.0f, 0.0f},
};

/* The shapes: three large batches (two vocabularies of today's models at
 * 151,936 and 128,256 tokens), a small batch and one long row, where latency
 * rather than bandwidth decides. */
static const int64_t bench_shapes[][2] = {
    {10000, 32000}, {2048, 151936}, {256, 151936}, {64, 128256}, {1, 151936}};
#define BENCH_SHAPE_COUNT ((int)(sizeof bench_shapes / sizeof bench_shapes[0]))

/* The language-model-like logits: logit = LM_SLOPE * ln(rank) + noise, the
 * noise uniform in [-LM_NOISE, LM_NOISE). A slope of -1.1 makes the
 * probabilities fall as rank^-1.1 (rank^-1.375 at T = 0.8): a few tokens
 * hold most of the mass and a long tail the rest, as in a model's output. */
#define LM_SLOPE (-1.1)
#define LM_NOISE 0.1
/* Streams of the random source, apart from the normal logits' (the seed). */
#define LM_SHUFFLE_STREAM 0x53485546464c45ull /* "SHUFFLE" */
#define LM_NOISE_STREAM 0x4e4f495345ull       /* "NOISE" */

const char *bench_distribution_name(int distribution)
{
    return distribution == DISTRIBUTION_LM ? "lm" : "normal";
}

const char *bench_distribution_formula(int distribution)
{
    return distribution == DISTRIBUTION_LM
               ? "-1.1 ln(rank) + U(-0.1, 0.1), ranks shuffled per row"
               : "~ N(0, 2^2)";
}

int bench_parse_distribution_item(const char *item, int *value)
{
    if (!strcmp(item, "normal"))
        *value = 1 << DISTRIBUTION_NORMAL;
    else if (!strcmp(item, "lm"))
        *value = 1 << DISTRIBUTION_LM;
    else if (!strcmp(item, "both"))
        *value = (1 << DISTRIBUTION_NORMAL) | (1 << DISTRIBUTION_LM);
    else
        return -1;
    return 0;
}

int bench_parse_setting_item(const char *item, int *value)
{
    int i;
    for (i = 0; i < BENCH_SETTING_COUNT; ++i)
        if (!strcmp(item, bench_settings[i].name)) {
            *value = i;
            return 0;
        }
    return -1;
}

int bench_parse_dtype_item(const char *item, int *value)
{
    psm_dtype dtype;
    if (cli_parse_dtype(item, &dtype) != 0)
        return -1;
    *value = (int)dtype;
    return 0;
}

int bench_same_case(const bench_case *a, const bench_case *b)
{
    return a->rows == b->rows && a->vocab == b->vocab && a->distribution == b->distribution &&
           a->dtype == b->dtype && a->setting == b->setting;
}

/* --quick: a tenth of the rows of a batch of 100 rows or more. */
static int64_t case_rows(int64_t rows, int quick)
{
    return quick && rows >= 100 ? rows / 10 : rows;
}

/* The cross product is the longest list: every shape, distribution, dtype
 * and setting (the option lists hold at most 3 dtypes and 5 settings). */
_Static_assert(BENCH_SHAPE_COUNT * BENCH_DISTRIBUTION_COUNT * 3 * BENCH_SETTING_COUNT <=
                   BENCH_MAX_CASES,
               "BENCH_MAX_CASES cannot hold every case");

static int add_case(bench_case *cases, int count, int64_t rows, int64_t vocab, int distribution,
                    psm_dtype dtype, int setting)
{
    bench_case one = {rows, vocab, distribution, dtype, setting};
    cases[count] = one;
    return count + 1;
}

/* The default list: each batch shape in f32 and bf16 with plain and
 * topk_topp and in f32 with top_p and min_p; the one row in f32, plain and
 * topk_topp; each with every selected distribution. */
static int default_cases(const bench_selection *selection, bench_case *cases)
{
    static const psm_dtype dtypes[2] = {PSM_DTYPE_F32, PSM_DTYPE_BF16};
    int count = 0, shape, distribution, dtype, setting;
    for (shape = 0; shape < BENCH_SHAPE_COUNT; ++shape) {
        int64_t rows = case_rows(bench_shapes[shape][0], selection->quick);
        for (distribution = 0; distribution < BENCH_DISTRIBUTION_COUNT; ++distribution) {
            if (!(selection->distributions & (1 << distribution)))
                continue;
            for (dtype = 0; dtype < 2; ++dtype)
                for (setting = SETTING_PLAIN; setting <= SETTING_MIN_P; ++setting) {
                    int one_row = bench_shapes[shape][0] == 1;
                    if (one_row && dtypes[dtype] != PSM_DTYPE_F32)
                        continue;
                    if ((one_row || dtypes[dtype] != PSM_DTYPE_F32) &&
                        setting > SETTING_TOPK_TOPP)
                        continue;
                    count = add_case(cases, count, rows, bench_shapes[shape][1], distribution,
                                     dtypes[dtype], setting);
                }
        }
    }
    return count;
}

int bench_make_cases(const bench_selection *selection, bench_case *cases)
{
    static const int default_dtypes[2] = {PSM_DTYPE_F32, PSM_DTYPE_BF16};
    static const int default_settings[2] = {SETTING_PLAIN, SETTING_TOPK_TOPP};
    const int *dtypes = selection->dtype_count ? selection->dtypes : default_dtypes;
    const int *settings = selection->setting_count ? selection->settings : default_settings;
    int dtype_count = selection->dtype_count ? selection->dtype_count : 2;
    int setting_count = selection->setting_count ? selection->setting_count : 2;
    int one_shape = selection->rows || selection->vocab;
    int shape_count = one_shape ? 1 : BENCH_SHAPE_COUNT;
    int count = 0, s, distribution, d, t;
    if (!one_shape && selection->dtype_count == 0 && selection->setting_count == 0)
        return default_cases(selection, cases);
    for (s = 0; s < shape_count; ++s) {
        int64_t rows = one_shape ? (selection->rows ? selection->rows : 2048) : bench_shapes[s][0];
        int64_t vocab =
            one_shape ? (selection->vocab ? selection->vocab : 32000) : bench_shapes[s][1];
        rows = case_rows(rows, selection->quick);
        for (distribution = 0; distribution < BENCH_DISTRIBUTION_COUNT; ++distribution) {
            if (!(selection->distributions & (1 << distribution)))
                continue;
            for (d = 0; d < dtype_count; ++d)
                for (t = 0; t < setting_count; ++t)
                    count = add_case(cases, count, rows, vocab, distribution,
                                     (psm_dtype)dtypes[d], settings[t]);
        }
    }
    return count;
}

/* A uniform index in [0, bound) from a random word (the bias, bound / 2^64,
 * is far below anything a benchmark could see). */
static uint32_t below(uint64_t word, uint32_t bound)
{
    return (uint32_t)(((unsigned __int128)word * bound) >> 64);
}

/* Each row: the ranks 1..vocab shuffled (Fisher-Yates, from the row's own
 * counters), then logit = LM_SLOPE * ln(rank) + uniform noise. */
static int fill_language_model(float *values, int64_t rows, int64_t vocab, uint64_t seed)
{
    int threads = omp_get_max_threads();
    uint32_t *ranks = malloc((size_t)threads * (size_t)vocab * sizeof *ranks);
    float *rank_logit = malloc((size_t)vocab * sizeof *rank_logit);
    int64_t row, i;
    if (!ranks || !rank_logit) {
        free(ranks);
        free(rank_logit);
        return -1;
    }
    for (i = 0; i < vocab; ++i)
        rank_logit[i] = (float)(LM_SLOPE * log((double)(i + 1)));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (row = 0; row < rows; ++row) {
        uint32_t *order = ranks + (size_t)omp_get_thread_num() * (size_t)vocab;
        uint64_t first = (uint64_t)row * (uint64_t)vocab;
        float *out = values + first;
        int64_t token;
        for (token = 0; token < vocab; ++token)
            order[token] = (uint32_t)token;
        for (token = vocab - 1; token > 0; --token) {
            uint32_t other =
                below(cli_random_u64(seed ^ LM_SHUFFLE_STREAM, first + (uint64_t)token),
                      (uint32_t)token + 1);
            uint32_t kept = order[token];
            order[token] = order[other];
            order[other] = kept;
        }
        for (token = 0; token < vocab; ++token) {
            double noise = LM_NOISE * (2.0 * cli_random_unit(seed ^ LM_NOISE_STREAM,
                                                             first + (uint64_t)token) -
                                       1.0);
            out[token] = rank_logit[order[token]] + (float)noise;
        }
    }
    free(ranks);
    free(rank_logit);
    return 0;
}

int bench_fill_logits(float *values, int64_t rows, int64_t vocab, int distribution,
                      uint64_t seed)
{
    if (distribution == DISTRIBUTION_LM)
        return fill_language_model(values, rows, vocab, seed);
    cli_fill_normal(values, (size_t)rows * (size_t)vocab, 2.0f, seed);
    return 0;
}
