/*
 * test_determinism.c: the same inputs give the same tokens: call after call,
 * at any CPU thread count, at any position in a batch (per-row seeds), and
 * on every backend exactly as on the CPU; seeds, streams and offsets give
 * different draws where they should.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void normal_logits(float *logits, int64_t count, double sigma, uint64_t seed)
{
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < count; ++i)
        logits[i] = (float)(sigma * psm_test_rng_normal(&rng));
}

PSM_PROPERTY(same_call_twice)
{
    psm_context *context = psm_test_open(backend);
    const int64_t rows = 16, vocab = 5000;
    const int32_t samples = 32;
    float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
    normal_logits(logits, rows * vocab, 2.0, 1);
    int32_t *first = psm_test_alloc((size_t)(rows * samples), sizeof *first);
    int32_t *second = psm_test_alloc((size_t)(rows * samples), sizeof *second);
    float *first_logprobs = psm_test_alloc((size_t)(rows * samples), sizeof *first_logprobs);
    float *second_logprobs = psm_test_alloc((size_t)(rows * samples), sizeof *second_logprobs);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = samples;
    params.seed = 123456789;
    params.top_p = 0.95f;
    params.temperature = 0.8f;
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, rows, vocab, &params, first,
                                     first_logprobs));
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, rows, vocab, &params, second,
                                     second_logprobs));
    PSM_CHECK_OK(psm_synchronize(context));
    ck_assert_msg(memcmp(first, second, (size_t)(rows * samples) * sizeof *first) == 0,
                  "two identical calls drew different tokens");
    ck_assert_msg(memcmp(first_logprobs, second_logprobs,
                         (size_t)(rows * samples) * sizeof *first_logprobs) == 0,
                  "two identical calls gave different logprobs");
    /* A second context draws the same too. */
    psm_context *other = psm_test_open(backend);
    PSM_CHECK_OK(psm_test_sample_f32(other, logits, rows, vocab, &params, second, NULL));
    PSM_CHECK_OK(psm_synchronize(other));
    ck_assert_msg(memcmp(first, second, (size_t)(rows * samples) * sizeof *first) == 0,
                  "a second context drew different tokens");
    psm_context_destroy(other);
    free(second_logprobs);
    free(first_logprobs);
    free(second);
    free(first);
    free(logits);
    psm_context_destroy(context);
}
END_TEST

#define BATCH_ROWS 1000
#define BATCH_VOCAB 300
#define TARGET_ROW 517
#define BATCH_SAMPLES 24

/* A request keeps its tokens whatever its row: row 517 of 1000 (each row its
 * own seed and parameters) against the same row alone. */
PSM_PROPERTY(row_alone_equals_row_in_batch)
{
    psm_context *context = psm_test_open(backend);
    float *logits = psm_test_alloc(BATCH_ROWS * BATCH_VOCAB, sizeof *logits);
    normal_logits(logits, BATCH_ROWS * BATCH_VOCAB, 1.5, 2);
    uint64_t *seeds = psm_test_alloc(BATCH_ROWS, sizeof *seeds);
    float *temperatures = psm_test_alloc(BATCH_ROWS, sizeof *temperatures);
    int32_t *top_ks = psm_test_alloc(BATCH_ROWS, sizeof *top_ks);
    float *top_ps = psm_test_alloc(BATCH_ROWS, sizeof *top_ps);
    float *min_ps = psm_test_alloc(BATCH_ROWS, sizeof *min_ps);
    psm_test_rng rng = psm_test_rng_make(3);
    for (int r = 0; r < BATCH_ROWS; ++r) {
        seeds[r] = psm_test_rng_next(&rng);
        temperatures[r] = 0.3f + (float)(r % 17) * 0.1f;
        top_ks[r] = r % 5 == 0 ? 0 : 10 + r % 90;
        top_ps[r] = r % 3 == 0 ? 1.0f : 0.8f + (float)(r % 7) * 0.02f;
        min_ps[r] = r % 4 == 0 ? 0.0f : 0.01f * (float)(r % 6);
    }
    psm_params params;
    psm_params_init(&params);
    params.num_samples = BATCH_SAMPLES;
    params.seed = 999; /* ignored: per-row seeds */
    params.seed_per_row = seeds;
    params.temperature_per_row = temperatures;
    params.top_k_per_row = top_ks;
    params.top_p_per_row = top_ps;
    params.min_p_per_row = min_ps;
    int32_t *batch_tokens = psm_test_alloc(BATCH_ROWS * BATCH_SAMPLES, sizeof *batch_tokens);
    float *batch_logprobs = psm_test_alloc(BATCH_ROWS * BATCH_SAMPLES, sizeof *batch_logprobs);
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, BATCH_ROWS, BATCH_VOCAB, &params,
                                     batch_tokens, batch_logprobs));
    PSM_CHECK_OK(psm_synchronize(context));

    const float *row = logits + TARGET_ROW * BATCH_VOCAB;
    const int32_t *expected = batch_tokens + TARGET_ROW * BATCH_SAMPLES;
    int32_t alone[BATCH_SAMPLES];
    float alone_logprobs[BATCH_SAMPLES];

    /* Alone, with one-element per-row arrays. */
    psm_params single = params;
    single.seed_per_row = &seeds[TARGET_ROW];
    single.temperature_per_row = &temperatures[TARGET_ROW];
    single.top_k_per_row = &top_ks[TARGET_ROW];
    single.top_p_per_row = &top_ps[TARGET_ROW];
    single.min_p_per_row = &min_ps[TARGET_ROW];
    PSM_CHECK_OK(psm_test_sample_f32(context, row, 1, BATCH_VOCAB, &single, alone,
                                     alone_logprobs));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int s = 0; s < BATCH_SAMPLES; ++s) {
        ck_assert_msg(alone[s] == expected[s], "sample %d: alone %d, at row %d %d", s, alone[s],
                      TARGET_ROW, expected[s]);
        ck_assert_msg(alone_logprobs[s] == batch_logprobs[TARGET_ROW * BATCH_SAMPLES + s],
                      "sample %d: logprob differs alone", s);
    }

    /* Alone with scalars: a one-row batch seed is stream 0, as per-row seeds are. */
    psm_params scalars;
    psm_params_init(&scalars);
    scalars.num_samples = BATCH_SAMPLES;
    scalars.seed = seeds[TARGET_ROW];
    scalars.temperature = temperatures[TARGET_ROW];
    scalars.top_k = top_ks[TARGET_ROW];
    scalars.top_p = top_ps[TARGET_ROW];
    scalars.min_p = min_ps[TARGET_ROW];
    PSM_CHECK_OK(psm_test_sample_f32(context, row, 1, BATCH_VOCAB, &scalars, alone, NULL));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int s = 0; s < BATCH_SAMPLES; ++s)
        ck_assert_msg(alone[s] == expected[s], "scalar params, sample %d: alone %d, in batch %d",
                      s, alone[s], expected[s]);

    free(batch_logprobs);
    free(batch_tokens);
    free(min_ps);
    free(top_ps);
    free(top_ks);
    free(temperatures);
    free(seeds);
    free(logits);
    psm_context_destroy(context);
}
END_TEST

#define STREAM_ROWS 8
#define STREAM_VOCAB 1000
#define STREAM_SAMPLES 64

static void sample_identical_rows(psm_context *context, const psm_params *params,
                                  int32_t *tokens)
{
    float *logits = psm_test_alloc(STREAM_ROWS * STREAM_VOCAB, sizeof *logits);
    normal_logits(logits, STREAM_VOCAB, 0.5, 4);
    for (int r = 1; r < STREAM_ROWS; ++r)
        memcpy(logits + r * STREAM_VOCAB, logits, STREAM_VOCAB * sizeof *logits);
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, STREAM_ROWS, STREAM_VOCAB, params, tokens,
                                     NULL));
    PSM_CHECK_OK(psm_synchronize(context));
    free(logits);
}

/* Near-uniform rows of 1000 tokens, 64 samples: two independent streams
 * agree everywhere with probability about 1000^-64. */
PSM_PROPERTY(streams_seeds_and_offsets)
{
    psm_context *context = psm_test_open(backend);
    int32_t tokens[STREAM_ROWS * STREAM_SAMPLES], again[STREAM_ROWS * STREAM_SAMPLES];
    psm_params params;
    psm_params_init(&params);
    params.num_samples = STREAM_SAMPLES;
    params.seed = 31337;

    /* A batch seed: each row is its own stream. */
    sample_identical_rows(context, &params, tokens);
    for (int a = 0; a < STREAM_ROWS; ++a)
        for (int b = a + 1; b < STREAM_ROWS; ++b)
            ck_assert_msg(memcmp(tokens + a * STREAM_SAMPLES, tokens + b * STREAM_SAMPLES,
                                 STREAM_SAMPLES * sizeof *tokens) != 0,
                          "rows %d and %d share a batch seed and drew the same tokens", a, b);

    /* Equal per-row seeds: every row is stream 0, so equal rows draw alike. */
    uint64_t same_seeds[STREAM_ROWS];
    for (int r = 0; r < STREAM_ROWS; ++r)
        same_seeds[r] = 31337;
    psm_params per_row = params;
    per_row.seed_per_row = same_seeds;
    sample_identical_rows(context, &per_row, again);
    for (int r = 1; r < STREAM_ROWS; ++r)
        ck_assert_msg(memcmp(again, again + r * STREAM_SAMPLES, STREAM_SAMPLES * sizeof *again) ==
                          0,
                      "equal per-row seeds on equal rows drew different tokens (row %d)", r);
    /* ... and row 0 is stream 0 under the batch seed as well. */
    ck_assert_msg(memcmp(again, tokens, STREAM_SAMPLES * sizeof *again) == 0,
                  "row 0: a batch seed and the same per-row seed differ");

    /* Offsets and seeds: same gives same, different gives different,
     * including the high 32 bits of each. */
    const uint64_t offsets[] = {0, 1, 2, (uint64_t)1 << 32, ((uint64_t)1 << 32) + 1, UINT64_MAX};
    const uint64_t seeds[] = {31337, 31338, 31337 + ((uint64_t)1 << 32)};
    int32_t draws[3][6][STREAM_SAMPLES];
    for (int s = 0; s < 3; ++s) {
        for (int o = 0; o < 6; ++o) {
            params.seed = seeds[s];
            params.offset = offsets[o];
            sample_identical_rows(context, &params, tokens);
            memcpy(draws[s][o], tokens, sizeof draws[s][o]);
            sample_identical_rows(context, &params, again);
            ck_assert_msg(memcmp(tokens, again, sizeof tokens) == 0,
                          "seed %llu offset %llu: two calls differ", (unsigned long long)seeds[s],
                          (unsigned long long)offsets[o]);
        }
    }
    for (int a = 0; a < 18; ++a)
        for (int b = a + 1; b < 18; ++b)
            ck_assert_msg(memcmp(draws[a / 6][a % 6], draws[b / 6][b % 6], sizeof draws[0][0]) != 0,
                          "seed %llu offset %llu and seed %llu offset %llu drew the same tokens",
                          (unsigned long long)seeds[a / 6], (unsigned long long)offsets[a % 6],
                          (unsigned long long)seeds[b / 6], (unsigned long long)offsets[b % 6]);
    psm_context_destroy(context);
}
END_TEST

/* ---- CPU thread counts ---------------------------------------------------- */

static psm_context *cpu_context(int threads)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    options.cpu_threads = threads;
    return psm_test_open_with(&options);
}

START_TEST(cpu_thread_counts_agree)
{
    struct {
        int64_t rows, vocab;
        int32_t samples;
    } shapes[] = {{64, 5000, 8}, {1, 151936, 1000}, {3, 1025, 200}};
    const int thread_counts[] = {1, 2, 3, 0};
    for (size_t shape = 0; shape < 3; ++shape) {
        int64_t rows = shapes[shape].rows, vocab = shapes[shape].vocab;
        int32_t samples = shapes[shape].samples;
        float *logits = psm_test_alloc((size_t)(rows * vocab), sizeof *logits);
        normal_logits(logits, rows * vocab, 2.5, 5 + shape);
        int32_t *reference = psm_test_alloc((size_t)(rows * samples), sizeof *reference);
        int32_t *tokens = psm_test_alloc((size_t)(rows * samples), sizeof *tokens);
        float *reference_probs = psm_test_alloc((size_t)(rows * vocab), sizeof *reference_probs);
        float *probs = psm_test_alloc((size_t)(rows * vocab), sizeof *probs);
        psm_params params;
        psm_params_init(&params);
        params.num_samples = samples;
        params.seed = 77 + shape;
        params.top_k = shape == 1 ? 5000 : 0;
        params.top_p = 0.9f;
        for (size_t t = 0; t < 4; ++t) {
            psm_context *context = cpu_context(thread_counts[t]);
            int32_t *out = t == 0 ? reference : tokens;
            float *probs_out = t == 0 ? reference_probs : probs;
            PSM_CHECK_OK(psm_test_sample_f32(context, logits, rows, vocab, &params, out, NULL));
            PSM_CHECK_OK(psm_test_probs_f32(context, logits, rows, vocab, &params, probs_out));
            PSM_CHECK_OK(psm_synchronize(context));
            psm_context_destroy(context);
            if (t == 0)
                continue;
            for (int64_t i = 0; i < rows * samples; ++i)
                ck_assert_msg(tokens[i] == reference[i],
                              "shape %zu: %d threads drew %d at %lld, 1 thread %d", shape,
                              thread_counts[t], tokens[i], (long long)i, reference[i]);
            for (int64_t i = 0; i < rows * vocab; ++i)
                ck_assert_msg(fabsf(probs[i] - reference_probs[i]) <=
                                  1e-5f * fmaxf(probs[i], reference_probs[i]),
                              "shape %zu: %d threads give probs[%lld] %g, 1 thread %g", shape,
                              thread_counts[t], (long long)i, (double)probs[i],
                              (double)reference_probs[i]);
        }
        free(probs);
        free(reference_probs);
        free(tokens);
        free(reference);
        free(logits);
    }
}
END_TEST

/* ---- every backend against the CPU ------------------------------------- */

#define CROSS_ROWS 3
#define CROSS_SAMPLES 16

/* Random logits as bit patterns of the dtype, moderate magnitudes, with
 * ties and -inf masks so the rank order and masking paths are exercised. */
static void *make_cross_logits(psm_dtype dtype, int64_t vocab, uint64_t seed)
{
    size_t element = dtype == PSM_DTYPE_F32 ? 4 : 2;
    int64_t count = CROSS_ROWS * vocab;
    unsigned char *data = psm_test_alloc((size_t)count, element);
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < count; ++i) {
        uint64_t bits = psm_test_rng_next(&rng);
        if (dtype == PSM_DTYPE_F32) {
            float value = (float)(3.0 * psm_test_rng_normal(&rng));
            memcpy(data + 4 * i, &value, 4);
        } else if (dtype == PSM_DTYPE_F16) {
            /* sign, exponent 10 .. 19 (2^-5 .. 2^4), any mantissa */
            uint16_t half = (uint16_t)(((bits & 1) << 15) | ((10 + (bits >> 1) % 10) << 10) |
                                       ((bits >> 8) & 0x3ff));
            memcpy(data + 2 * i, &half, 2);
        } else {
            /* sign, exponent 122 .. 131 (2^-5 .. 2^4), any mantissa */
            uint16_t brain = (uint16_t)(((bits & 1) << 15) | ((122 + (bits >> 1) % 10) << 7) |
                                        ((bits >> 8) & 0x7f));
            memcpy(data + 2 * i, &brain, 2);
        }
    }
    if (vocab > 1) {
        for (int64_t m = 0; m < count / 16; ++m) {
            int64_t at = (int64_t)psm_test_rng_below(&rng, (uint64_t)count);
            int64_t from = (int64_t)psm_test_rng_below(&rng, (uint64_t)count);
            memcpy(data + element * at, data + element * from, element); /* a tie */
        }
        for (int64_t m = 0; m < count / 50; ++m) {
            int64_t at = (int64_t)psm_test_rng_below(&rng, (uint64_t)count);
            if (dtype == PSM_DTYPE_F32) {
                float minus_infinity = -INFINITY;
                memcpy(data + 4 * at, &minus_infinity, 4);
            } else {
                uint16_t minus_infinity = dtype == PSM_DTYPE_F16 ? 0xfc00u : 0xff80u;
                memcpy(data + 2 * at, &minus_infinity, 2);
            }
        }
    }
    return data;
}

static const float per_row_temperatures[CROSS_ROWS] = {0.0f, 0.9f, 2.5f};
static const int32_t per_row_top_ks[CROSS_ROWS] = {0, 3, 500};
static const float per_row_top_ps[CROSS_ROWS] = {1.0f, 0.7f, 0.99f};
static const float per_row_min_ps[CROSS_ROWS] = {0.0f, 0.2f, 0.001f};
static const uint64_t per_row_seeds[CROSS_ROWS] = {5, 0xffffffffffffffffu, 5};

static psm_params cross_params(int set)
{
    psm_params params;
    psm_params_init(&params);
    params.num_samples = CROSS_SAMPLES;
    params.seed = 0x0123456789abcdefu + (uint64_t)set;
    params.offset = (uint64_t)set * 1000003u;
    switch (set) {
    case 0:
        break;
    case 1:
        params.temperature = 0.6f;
        params.top_k = 50;
        break;
    case 2:
        params.top_p = 0.9f;
        break;
    case 3:
        params.temperature = 1.3f;
        params.min_p = 0.05f;
        break;
    case 4:
        params.temperature = 0.0f;
        break;
    case 5:
        params.temperature = 0.8f;
        params.top_k = 200;
        params.top_p = 0.95f;
        params.min_p = 0.01f;
        break;
    case 6:
        params.temperature_per_row = per_row_temperatures;
        params.top_k_per_row = per_row_top_ks;
        params.top_p_per_row = per_row_top_ps;
        params.min_p_per_row = per_row_min_ps;
        params.seed_per_row = per_row_seeds;
        break;
    default:
        ck_abort_msg("no parameter set %d", set);
    }
    return params;
}
#define CROSS_PARAM_SETS 7

static const char *dtype_name(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? "f32" : dtype == PSM_DTYPE_F16 ? "f16" : "bf16";
}

PSM_PROPERTY(every_backend_matches_cpu)
{
    psm_context *tested = psm_test_open(backend);
    psm_context *cpu = cpu_context(1);
    const int64_t vocabs[] = {1, 7, 1024, 1025, 32000, 151936};
    const psm_dtype dtypes[] = {PSM_DTYPE_F32, PSM_DTYPE_F16, PSM_DTYPE_BF16};
    int32_t expected[CROSS_ROWS * CROSS_SAMPLES], got[CROSS_ROWS * CROSS_SAMPLES];
    float expected_logprobs[CROSS_ROWS * CROSS_SAMPLES], got_logprobs[CROSS_ROWS * CROSS_SAMPLES];
    int compared = 0;
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; ++v) {
        int64_t vocab = vocabs[v];
        float *expected_probs = psm_test_alloc((size_t)(CROSS_ROWS * vocab), sizeof(float));
        float *got_probs = psm_test_alloc((size_t)(CROSS_ROWS * vocab), sizeof(float));
        for (size_t d = 0; d < 3; ++d) {
            void *logits = make_cross_logits(dtypes[d], vocab, 100 * v + d);
            psm_tensor tensor = psm_test_tensor(logits, dtypes[d], CROSS_ROWS, vocab, 0);
            psm_tensor expected_probs_tensor =
                psm_test_tensor(expected_probs, PSM_DTYPE_F32, CROSS_ROWS, vocab, 0);
            psm_tensor got_probs_tensor =
                psm_test_tensor(got_probs, PSM_DTYPE_F32, CROSS_ROWS, vocab, 0);
            for (int set = 0; set < CROSS_PARAM_SETS; ++set) {
                psm_params params = cross_params(set);
                PSM_CHECK_OK(psm_sample(cpu, &tensor, &params, psm_test_output(expected),
                                        psm_test_output(expected_logprobs)));
                PSM_CHECK_OK(psm_sample(tested, &tensor, &params, psm_test_output(got),
                                        psm_test_output(got_logprobs)));
                PSM_CHECK_OK(psm_probs(cpu, &tensor, &params, &expected_probs_tensor));
                PSM_CHECK_OK(psm_probs(tested, &tensor, &params, &got_probs_tensor));
                PSM_CHECK_OK(psm_synchronize(tested));
                for (int i = 0; i < CROSS_ROWS * CROSS_SAMPLES; ++i) {
                    ck_assert_msg(got[i] == expected[i],
                                  "%s vs cpu, vocab %lld %s set %d, row %d sample %d: token %d, "
                                  "cpu %d",
                                  psm_backend_name(backend), (long long)vocab,
                                  dtype_name(dtypes[d]), set, i / CROSS_SAMPLES,
                                  i % CROSS_SAMPLES, got[i], expected[i]);
                    int both_nan = isnan(got_logprobs[i]) && isnan(expected_logprobs[i]);
                    ck_assert_msg(both_nan || fabsf(got_logprobs[i] - expected_logprobs[i]) <= 1e-5f,
                                  "%s vs cpu, vocab %lld %s set %d: logprob %.9g, cpu %.9g",
                                  psm_backend_name(backend), (long long)vocab,
                                  dtype_name(dtypes[d]), set, (double)got_logprobs[i],
                                  (double)expected_logprobs[i]);
                }
                for (int64_t i = 0; i < CROSS_ROWS * vocab; ++i) {
                    float a = got_probs[i], b = expected_probs[i];
                    ck_assert_msg((isnan(a) && isnan(b)) || fabsf(a - b) <= 1e-5f * fmaxf(a, b),
                                  "%s vs cpu, vocab %lld %s set %d: probs[%lld] %.9g, cpu %.9g",
                                  psm_backend_name(backend), (long long)vocab,
                                  dtype_name(dtypes[d]), set, (long long)i, (double)a, (double)b);
                }
                ++compared;
            }
            free(logits);
        }
        free(got_probs);
        free(expected_probs);
    }
    ck_assert_int_eq(compared, 6 * 3 * CROSS_PARAM_SETS);
    psm_context_destroy(cpu);
    psm_context_destroy(tested);
}
END_TEST

int main(void)
{
    psm_test_register_property(same_call_twice);
    psm_test_register_property(row_alone_equals_row_in_batch);
    psm_test_register_property(streams_seeds_and_offsets);
    psm_test_register_property(every_backend_matches_cpu);
    if (psm_test_backend_selected(PSM_BACKEND_CPU))
        psm_test_register_common(cpu_thread_counts_agree);
    else
        psm_test_skip("cpu", "cpu_thread_counts_agree", "not listed in POLYSAMPLE_TEST_BACKENDS");
    return psm_test_run("test_determinism");
}
