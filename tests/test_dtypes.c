/*
 * test_dtypes.c: f16 and bf16 logits are read exactly: logits representable
 * in both formats draw the same tokens as f32; and row_stride > vocab reads
 * only the first vocab elements of each row, for every dtype.
 */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4
#define SAMPLES 32
#define PADDING 13

/* k/16 with |k| < 256 has at most 8 significant bits and lies well inside
 * the normal range of both f16 and bf16, so all three dtypes hold it
 * exactly. Some -inf masks, and ties, come along. */
static float *exact_logits(int64_t vocab, uint64_t seed)
{
    float *logits = psm_test_alloc((size_t)(ROWS * vocab), sizeof *logits);
    psm_test_rng rng = psm_test_rng_make(seed);
    for (int64_t i = 0; i < ROWS * vocab; ++i) {
        int64_t k = (int64_t)psm_test_rng_below(&rng, 511) - 255;
        logits[i] = (float)k / 16.0f;
        if (vocab > 2 && psm_test_rng_below(&rng, 40) == 0)
            logits[i] = -INFINITY;
    }
    return logits;
}

static size_t dtype_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? sizeof(float) : sizeof(uint16_t);
}

/* The logits in a dtype, each row padded to row_stride elements with
 * values that would break the row if read (NaN, +inf, a huge logit). */
static void *encode(const float *logits, int64_t vocab, psm_dtype dtype, int64_t row_stride)
{
    size_t size = dtype_size(dtype);
    unsigned char *data = psm_test_alloc((size_t)(ROWS * row_stride), size);
    for (int64_t r = 0; r < ROWS; ++r) {
        for (int64_t i = 0; i < row_stride; ++i) {
            unsigned char *at = data + size * (size_t)(r * row_stride + i);
            float value;
            if (i < vocab)
                value = logits[r * vocab + i];
            else
                value = (i - vocab) % 3 == 0 ? NAN : (i - vocab) % 3 == 1 ? INFINITY : 30000.0f;
            if (dtype == PSM_DTYPE_F32) {
                memcpy(at, &value, sizeof value);
            } else {
                uint16_t bits;
                if (isnan(value))
                    bits = dtype == PSM_DTYPE_F16 ? 0x7e00u : 0x7fc0u;
                else if (dtype == PSM_DTYPE_F16)
                    bits = psm_test_f16_exact(value);
                else
                    bits = psm_test_bf16_exact(i < vocab ? value : 29952.0f /* exact in bf16 */);
                memcpy(at, &bits, sizeof bits);
            }
        }
    }
    return data;
}

static psm_params dtype_params(int set)
{
    psm_params params;
    psm_params_init(&params);
    params.num_samples = SAMPLES;
    params.seed = 4000 + (uint64_t)set;
    switch (set) {
    case 0:
        break;
    case 1:
        params.temperature = 0.7f;
        params.top_k = 20;
        break;
    case 2:
        params.top_p = 0.9f;
        break;
    case 3:
        params.temperature = 1.5f;
        params.min_p = 0.1f;
        break;
    case 4:
        params.temperature = 0.0f;
        break;
    default:
        ck_abort_msg("no parameter set %d", set);
    }
    return params;
}
#define PARAM_SETS 5

static const char *dtype_name(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? "f32" : dtype == PSM_DTYPE_F16 ? "f16" : "bf16";
}

PSM_PROPERTY(half_formats_match_f32)
{
    psm_context *context = psm_test_open(backend);
    const int64_t vocabs[] = {1, 7, 1025, 5000};
    const psm_dtype dtypes[] = {PSM_DTYPE_F32, PSM_DTYPE_F16, PSM_DTYPE_BF16};
    const int64_t strides[] = {0, 1, PADDING}; /* 0: row_stride 0 (= vocab); else vocab + n */
    for (size_t v = 0; v < sizeof vocabs / sizeof vocabs[0]; ++v) {
        int64_t vocab = vocabs[v];
        float *logits = exact_logits(vocab, 50 + v);
        float *probs = psm_test_alloc((size_t)(ROWS * vocab), sizeof *probs);
        float *reference_probs = psm_test_alloc((size_t)(ROWS * vocab), sizeof *reference_probs);
        for (int set = 0; set < PARAM_SETS; ++set) {
            psm_params params = dtype_params(set);
            int32_t reference[ROWS * SAMPLES], tokens[ROWS * SAMPLES];
            float reference_logprobs[ROWS * SAMPLES], logprobs[ROWS * SAMPLES];
            int have_reference = 0;
            for (size_t d = 0; d < 3; ++d) {
                for (size_t s = 0; s < 3; ++s) {
                    int64_t row_stride = s == 0 ? vocab : vocab + strides[s];
                    void *data = encode(logits, vocab, dtypes[d], row_stride);
                    psm_tensor tensor =
                        psm_test_tensor(data, dtypes[d], ROWS, vocab, s == 0 ? 0 : row_stride);
                    psm_tensor probs_tensor = psm_test_tensor(probs, PSM_DTYPE_F32, ROWS, vocab, 0);
                    PSM_CHECK_OK(psm_sample(context, &tensor, &params, psm_test_output(tokens),
                                            psm_test_output(logprobs)));
                    PSM_CHECK_OK(psm_probs(context, &tensor, &params, &probs_tensor));
                    PSM_CHECK_OK(psm_synchronize(context));
                    free(data);
                    if (!have_reference) {
                        memcpy(reference, tokens, sizeof reference);
                        memcpy(reference_logprobs, logprobs, sizeof reference_logprobs);
                        memcpy(reference_probs, probs, (size_t)(ROWS * vocab) * sizeof *probs);
                        have_reference = 1;
                        continue;
                    }
                    for (int i = 0; i < ROWS * SAMPLES; ++i) {
                        ck_assert_msg(tokens[i] == reference[i],
                                      "vocab %lld set %d: %s with row_stride %lld drew %d at %d, "
                                      "f32 contiguous %d",
                                      (long long)vocab, set, dtype_name(dtypes[d]),
                                      (long long)row_stride, tokens[i], i, reference[i]);
                        ck_assert_msg(fabsf(logprobs[i] - reference_logprobs[i]) <= 1e-6f,
                                      "vocab %lld set %d %s: logprob %.9g vs f32 %.9g",
                                      (long long)vocab, set, dtype_name(dtypes[d]),
                                      (double)logprobs[i], (double)reference_logprobs[i]);
                    }
                    for (int64_t i = 0; i < ROWS * vocab; ++i)
                        ck_assert_msg(fabsf(probs[i] - reference_probs[i]) <=
                                          1e-6f * fmaxf(probs[i], reference_probs[i]),
                                      "vocab %lld set %d %s stride %lld: probs[%lld] %.9g vs f32 "
                                      "%.9g",
                                      (long long)vocab, set, dtype_name(dtypes[d]),
                                      (long long)row_stride, (long long)i, (double)probs[i],
                                      (double)reference_probs[i]);
                }
            }
        }
        free(reference_probs);
        free(probs);
        free(logits);
    }
    psm_context_destroy(context);
}
END_TEST

/* psm_probs with a padded output: each row's padding is left untouched. */
PSM_PROPERTY(padded_probs_output)
{
    psm_context *context = psm_test_open(backend);
    const int64_t vocab = 1500, stride = vocab + PADDING;
    float *logits = exact_logits(vocab, 9);
    float *dense = psm_test_alloc((size_t)(ROWS * vocab), sizeof *dense);
    float *padded = psm_test_alloc((size_t)(ROWS * stride), sizeof *padded);
    memset(padded, 0xa5, (size_t)(ROWS * stride) * sizeof *padded);
    psm_params params;
    psm_params_init(&params);
    params.top_p = 0.8f;
    psm_tensor input = psm_test_tensor(logits, PSM_DTYPE_F32, ROWS, vocab, 0);
    psm_tensor dense_out = psm_test_tensor(dense, PSM_DTYPE_F32, ROWS, vocab, 0);
    psm_tensor padded_out = psm_test_tensor(padded, PSM_DTYPE_F32, ROWS, vocab, stride);
    PSM_CHECK_OK(psm_probs(context, &input, &params, &dense_out));
    PSM_CHECK_OK(psm_probs(context, &input, &params, &padded_out));
    PSM_CHECK_OK(psm_synchronize(context));
    for (int64_t r = 0; r < ROWS; ++r) {
        ck_assert_msg(memcmp(padded + r * stride, dense + r * vocab, (size_t)vocab * sizeof(float)) ==
                          0,
                      "row %lld: padded probs differ from dense ones", (long long)r);
        const unsigned char *padding = (const unsigned char *)(padded + r * stride + vocab);
        for (size_t b = 0; b < PADDING * sizeof(float); ++b)
            ck_assert_msg(padding[b] == 0xa5, "row %lld: psm_probs wrote into the row padding",
                          (long long)r);
    }
    free(padded);
    free(dense);
    free(logits);
    psm_context_destroy(context);
}
END_TEST

int main(void)
{
    psm_test_register_property(half_formats_match_f32);
    psm_test_register_property(padded_probs_output);
    return psm_test_run("test_dtypes");
}
