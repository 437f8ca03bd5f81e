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
    {"plain", 0.8f, 0, 1.0f, 0.0f, EXTRA_NONE},
    {"topk_topp", 0.8f, 50, 0.9f, 0.0f, EXTRA_NONE},
    {"top_p", 0.8f, 0, 0.9f, 0.0f, EXTRA_NONE},
    {"min_p", 0.8f, 0, 1.0f, 0.05f, EXTRA_NONE},
    {"greedy", 0.0f, 0, 1.0f, 0.0f, EXTRA_NONE},
    /* Plain sampling with what a runtime does around it; each is reported
     * as a ratio to plain. */
    {"mask+bias", 0.8f, 0, 1.0f, 0.0f, EXTRA_MASK_BIAS},
    {"penalties", 0.8f, 0, 1.0f, 0.0f, EXTRA_PENALTIES},
    {"top-20", 0.8f, 0, 1.0f, 0.0f, EXTRA_TOP_20},
    /* Speculative decoding: a chain of 4 drafts, target and draft at T 0.8. */
    {"verify", 0.8f, 0, 1.0f, 0.0f, EXTRA_VERIFY},
};

/* The shapes: three large batches (two vocabularies of today's models at
 * 151,936 and 128,256 tokens), a small batch and one long row, where latency
 * rather than bandwidth decides. */
static const int64_t bench_shapes[][2] = {
    {10000, 32000}, {2048, 151936}, {256, 151936}, {64, 128256}, {1, 151936}};
#define BENCH_SHAPE_COUNT ((int)(sizeof bench_shapes / sizeof bench_shapes[0]))

/* The verify setting's shapes (rows are requests): two batches, and one
 * request, where the latency of a decoding step decides. */
static const int64_t verify_shapes[][2] = {{64, 128256}, {256, 151936}, {1, 128256}};
#define VERIFY_SHAPE_COUNT ((int)(sizeof verify_shapes / sizeof verify_shapes[0]))

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

int64_t bench_logit_rows(const bench_case *one)
{
    return one->setting == SETTING_VERIFY ? one->rows * (2 * BENCH_VERIFY_DRAFTS + 1)
                                          : one->rows;
}

int bench_same_logits(const bench_case *a, const bench_case *b)
{
    return bench_logit_rows(a) == bench_logit_rows(b) && a->vocab == b->vocab &&
           a->distribution == b->distribution &&
           (a->setting == SETTING_VERIFY) == (b->setting == SETTING_VERIFY);
}

/* --quick: a tenth of the rows of a batch of 100 rows or more. */
static int64_t case_rows(int64_t rows, int quick)
{
    return quick && rows >= 100 ? rows / 10 : rows;
}

/* The cross product is the longest list: every shape, distribution, dtype
 * and setting (the option lists hold at most 3 dtypes and BENCH_SETTING_COUNT
 * settings, and plain may be added to them). */
_Static_assert(BENCH_SHAPE_COUNT * BENCH_DISTRIBUTION_COUNT * 3 * (BENCH_SETTING_COUNT + 1) <=
                   BENCH_MAX_CASES,
               "BENCH_MAX_CASES cannot hold every case");

static int add_case(bench_case *cases, int count, int64_t rows, int64_t vocab, int distribution,
                    psm_dtype dtype, int setting)
{
    bench_case one = {rows, vocab, distribution, dtype, setting};
    cases[count] = one;
    return count + 1;
}

/* The verify setting on its shapes, in each listed dtype and every
 * selected distribution. */
static int verify_cases(const bench_selection *selection, const psm_dtype *dtypes,
                        int dtype_count, bench_case *cases, int count)
{
    int shape, distribution, dtype;
    for (shape = 0; shape < VERIFY_SHAPE_COUNT; ++shape)
        for (distribution = 0; distribution < BENCH_DISTRIBUTION_COUNT; ++distribution) {
            if (!(selection->distributions & (1 << distribution)))
                continue;
            for (dtype = 0; dtype < dtype_count; ++dtype)
                count = add_case(cases, count, case_rows(verify_shapes[shape][0], selection->quick),
                                 verify_shapes[shape][1], distribution, dtypes[dtype],
                                 SETTING_VERIFY);
        }
    return count;
}

/* The default list: each batch shape in f32 and bf16 with plain and
 * topk_topp and in f32 with top_p and min_p; the one row in f32, plain and
 * topk_topp; every shape in f32 with mask+bias, penalties and top-20; each
 * with every selected distribution; then verify on its shapes in f32. */
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
                for (setting = SETTING_PLAIN; setting < BENCH_SETTING_COUNT; ++setting) {
                    int one_row = bench_shapes[shape][0] == 1;
                    int f32 = dtypes[dtype] == PSM_DTYPE_F32;
                    int wanted;
                    if (setting == SETTING_GREEDY || setting == SETTING_VERIFY)
                        wanted = 0;
                    else if (setting <= SETTING_TOPK_TOPP)
                        wanted = f32 || !one_row;
                    else if (bench_settings[setting].extra != EXTRA_NONE)
                        wanted = f32;
                    else
                        wanted = f32 && !one_row;
                    if (!wanted)
                        continue;
                    count = add_case(cases, count, rows, bench_shapes[shape][1], distribution,
                                     dtypes[dtype], setting);
                }
        }
    }
    return verify_cases(selection, dtypes, 1, cases, count);
}

int bench_make_cases(const bench_selection *selection, bench_case *cases)
{
    static const int default_dtypes[2] = {PSM_DTYPE_F32, PSM_DTYPE_BF16};
    static const int default_settings[2] = {SETTING_PLAIN, SETTING_TOPK_TOPP};
    const int *dtypes = selection->dtype_count ? selection->dtypes : default_dtypes;
    int settings[BENCH_SETTING_COUNT + 1];
    int t;
    int dtype_count = selection->dtype_count ? selection->dtype_count : 2;
    int setting_count = 0, plain_listed = 0, around_draw = 0, verify_listed = 0;
    for (t = 0; t < (selection->setting_count ? selection->setting_count : 2); ++t) {
        settings[setting_count] =
            selection->setting_count ? selection->settings[t] : default_settings[t];
        plain_listed |= settings[setting_count] == SETTING_PLAIN;
        verify_listed |= settings[setting_count] == SETTING_VERIFY;
        around_draw |= bench_settings[settings[setting_count]].extra != EXTRA_NONE &&
                       settings[setting_count] != SETTING_VERIFY;
        ++setting_count;
    }
    /* The settings around the draw are reported as ratios to plain. */
    if (around_draw && !plain_listed)
        settings[setting_count++] = SETTING_PLAIN;
    int one_shape = selection->rows || selection->vocab;
    int shape_count = one_shape ? 1 : BENCH_SHAPE_COUNT;
    int count = 0, s, distribution, d;
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
                    /* Without a shape, verify runs on its own shapes (below). */
                    if (one_shape || settings[t] != SETTING_VERIFY)
                        count = add_case(cases, count, rows, vocab, distribution,
                                         (psm_dtype)dtypes[d], settings[t]);
        }
    }
    if (verify_listed && !one_shape) {
        psm_dtype verify_dtypes[3];
        for (d = 0; d < dtype_count; ++d)
            verify_dtypes[d] = (psm_dtype)dtypes[d];
        count = verify_cases(selection, verify_dtypes, dtype_count, cases, count);
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

int bench_fill_case_logits(float *values, const bench_case *shape, uint64_t seed)
{
    const int64_t k = BENCH_VERIFY_DRAFTS, vocab = shape->vocab;
    int64_t node;
    if (shape->setting != SETTING_VERIFY)
        return bench_fill_logits(values, shape->rows, vocab, shape->distribution, seed);
    if (bench_fill_logits(values, shape->rows * (k + 1), vocab, shape->distribution, seed) != 0)
        return -1;
    /* Draft row r k + i - 1 (node i) is target row r (k + 1) + i - 1, the
     * distribution node i's token is proposed for. */
    float *draft = values + shape->rows * (k + 1) * vocab;
#pragma omp parallel for schedule(static)
    for (node = 0; node < shape->rows * k; ++node) {
        int64_t request = node / k, i = node % k + 1;
        memcpy(draft + node * vocab, values + (request * (k + 1) + i - 1) * vocab,
               (size_t)vocab * sizeof(float));
    }
    return 0;
}

int bench_needs_processing(const bench_case *cases, int case_count)
{
    int i;
    for (i = 0; i < case_count; ++i) {
        bench_extra extra = bench_settings[cases[i].setting].extra;
        if (extra == EXTRA_MASK_BIAS || extra == EXTRA_PENALTIES)
            return 1;
    }
    return 0;
}

void bench_free_processing(bench_processing *inputs)
{
    free(inputs->mask);
    free(inputs->bias_offsets);
    free(inputs->bias_tokens);
    free(inputs->bias_values);
    free(inputs->history_offsets);
    free(inputs->history_tokens);
    memset(inputs, 0, sizeof *inputs);
}

/* Streams of the random source for the processing inputs. */
#define MASK_STREAM 0x4d41534bull       /* "MASK" */
#define BIAS_STREAM 0x42494153ull       /* "BIAS" */
#define HISTORY_STREAM 0x48495354ull    /* "HIST" */

/* A history repeats tokens as generated text does: three in four come
 * from a pool of this many tokens of the row. */
#define HISTORY_POOL 256

int bench_make_processing(bench_processing *inputs, int64_t rows, int64_t vocab, uint64_t seed)
{
    const int64_t words = (vocab + 31) / 32;
    int64_t row;
    memset(inputs, 0, sizeof *inputs);
    inputs->rows = rows;
    inputs->vocab = vocab;
    inputs->mask_words = words;
    inputs->mask = malloc((size_t)(rows * words) * sizeof(uint32_t));
    inputs->bias_offsets = malloc((size_t)(rows + 1) * sizeof(int64_t));
    inputs->bias_tokens = malloc((size_t)(rows * BENCH_BIAS_ENTRIES) * sizeof(int32_t));
    inputs->bias_values = malloc((size_t)(rows * BENCH_BIAS_ENTRIES) * sizeof(float));
    inputs->history_offsets = malloc((size_t)(rows + 1) * sizeof(int64_t));
    inputs->history_tokens = malloc((size_t)(rows * BENCH_HISTORY_TOKENS) * sizeof(int32_t));
    if (!inputs->mask || !inputs->bias_offsets || !inputs->bias_tokens || !inputs->bias_values ||
        !inputs->history_offsets || !inputs->history_tokens)
        return -1;
#pragma omp parallel for schedule(static)
    for (row = 0; row < rows; ++row) {
        const uint64_t first = (uint64_t)row << 24; /* each row's own counters */
        int64_t k;
        for (k = 0; k < words; ++k)
            inputs->mask[row * words + k] = (uint32_t)cli_random_u64(seed ^ MASK_STREAM, first + (uint64_t)k);
        for (k = 0; k < BENCH_BIAS_ENTRIES; ++k) {
            const int64_t at = row * BENCH_BIAS_ENTRIES + k;
            inputs->bias_tokens[at] =
                (int32_t)below(cli_random_u64(seed ^ BIAS_STREAM, first + (uint64_t)k), (uint32_t)vocab);
            inputs->bias_values[at] =
                (float)(6.0 * cli_random_unit(seed ^ BIAS_STREAM, first + (uint64_t)k + (1u << 20)) - 3.0);
        }
        for (k = 0; k < BENCH_HISTORY_TOKENS; ++k) {
            uint64_t word = cli_random_u64(seed ^ HISTORY_STREAM, first + (uint64_t)k);
            uint32_t token = below(word, (uint32_t)vocab);
            if (word & 3u)
                /* The pool: the row's tokens at HISTORY_POOL fixed counters. */
                token = below(cli_random_u64(seed ^ HISTORY_STREAM,
                                             first + (1u << 20) + (word >> 2) % HISTORY_POOL),
                              (uint32_t)vocab);
            inputs->history_tokens[row * BENCH_HISTORY_TOKENS + k] = (int32_t)token;
        }
    }
    for (row = 0; row <= rows; ++row) {
        inputs->bias_offsets[row] = row * BENCH_BIAS_ENTRIES;
        inputs->history_offsets[row] = row * BENCH_HISTORY_TOKENS;
    }
    return 0;
}
