/*
 * test_processing.c: logit processing (psm_params.processing: penalties,
 * logit bias, allowed-token mask; docs/SAMPLING.md section 1).
 *
 * The rules are applied here literally, token by token, to make processed
 * f32 logits; a call with processing must give exactly the tokens, logprobs
 * and probabilities of a plain call on those logits, on every backend that
 * runs processing. The penalty arithmetic itself (psm_penalised_logit) is
 * checked by hand-computed values below. A backend that does not run
 * processing yet must refuse it with PSM_ERR_UNSUPPORTED, writing nothing,
 * and its remaining checks are skipped (visibly).
 */
#include "device_memory.h"
#include "harness.h"

#include "psm_contract.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SENTINEL_TOKEN (-7)

/* One batch with every kind of processing, from a seed. */
typedef struct batch {
    int64_t rows, vocab;
    float *logits; /* raw, rows x vocab */
    psm_logit_processing processing;
    int64_t *history_offsets, *prompt_offsets, *bias_offsets;
    int32_t *history_tokens, *prompt_tokens, *bias_tokens;
    float *bias_values;
    uint32_t *mask;
    float *repetition, *frequency, *presence;
} batch;

static void make_batch(batch *b, int64_t rows, int64_t vocab, uint64_t seed)
{
    memset(b, 0, sizeof *b);
    psm_test_rng rng = psm_test_rng_make(seed);
    b->rows = rows;
    b->vocab = vocab;
    b->logits = psm_test_alloc((size_t)(rows * vocab), sizeof *b->logits);
    for (int64_t i = 0; i < rows * vocab; ++i)
        b->logits[i] = (float)(2.0 * psm_test_rng_normal(&rng));
    /* A masked logit in every row, and small and negative ones, so that every
     * branch of the rules is met. */
    for (int64_t r = 0; r < rows; ++r) {
        b->logits[r * vocab + 5] = -INFINITY;
        b->logits[r * vocab + 6] = 0.0f;
    }

    const int64_t max_list = 48;
    /* The GPU backends count a row's tokens in a group-shared table when its
     * entries fit (kernels/psm_stage_lists.h, up to 3,072), else in global
     * memory: the last two rows' histories take each way, the second last
     * with tokens from the whole vocab, which fills the table unevenly. */
    const int64_t wide_history = 3000, long_history = 4000;
    b->history_offsets = psm_test_alloc((size_t)rows + 1, sizeof(int64_t));
    b->prompt_offsets = psm_test_alloc((size_t)rows + 1, sizeof(int64_t));
    b->bias_offsets = psm_test_alloc((size_t)rows + 1, sizeof(int64_t));
    b->history_tokens = psm_test_alloc((size_t)(rows * max_list + wide_history + long_history),
                                       sizeof(int32_t));
    b->prompt_tokens = psm_test_alloc((size_t)(rows * max_list), sizeof(int32_t));
    b->bias_tokens = psm_test_alloc((size_t)(rows * max_list), sizeof(int32_t));
    b->bias_values = psm_test_alloc((size_t)(rows * max_list), sizeof(float));
    for (int64_t r = 0; r < rows; ++r) {
        /* Tokens from a pool of 64 (plus the masked and zero ones), so that
         * histories repeat tokens and the lists overlap. */
        int64_t n = (int64_t)psm_test_rng_below(&rng, (uint64_t)max_list + 1);
        const int wide = rows >= 4 && r == rows - 2;
        if (rows >= 4 && r >= rows - 2)
            n = wide ? wide_history : long_history;
        b->history_offsets[r + 1] = b->history_offsets[r] + n;
        for (int64_t e = b->history_offsets[r]; e < b->history_offsets[r + 1]; ++e)
            b->history_tokens[e] =
                wide ? (int32_t)psm_test_rng_below(&rng, (uint64_t)vocab)
                     : (int32_t)psm_test_rng_below(&rng, 64) * 37 % (int32_t)vocab;
        n = (int64_t)psm_test_rng_below(&rng, 24);
        b->prompt_offsets[r + 1] = b->prompt_offsets[r] + n;
        for (int64_t e = b->prompt_offsets[r]; e < b->prompt_offsets[r + 1]; ++e)
            b->prompt_tokens[e] = (int32_t)psm_test_rng_below(&rng, 64) * 37 % (int32_t)vocab;
        n = (int64_t)psm_test_rng_below(&rng, 32);
        b->bias_offsets[r + 1] = b->bias_offsets[r] + n;
        for (int64_t e = b->bias_offsets[r]; e < b->bias_offsets[r + 1]; ++e) {
            b->bias_tokens[e] = (int32_t)psm_test_rng_below(&rng, 64) * 37 % (int32_t)vocab;
            b->bias_values[e] = (float)(8.0 * psm_test_rng_uniform(&rng) - 4.0);
        }
    }
    /* The first row's first entries hit the masked and the zero logit. */
    if (b->history_offsets[1] >= 2) {
        b->history_tokens[0] = 5;
        b->history_tokens[1] = 6;
    }

    const int64_t words = (vocab + 31) / 32;
    b->mask = psm_test_alloc((size_t)(rows * words), sizeof(uint32_t));
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t w = 0; w < words; ++w)
            /* About 3 in 4 allowed; row 1 allows everything. */
            b->mask[r * words + w] = r == 1 ? 0xffffffffu
                                            : (uint32_t)(psm_test_rng_next(&rng) |
                                                         psm_test_rng_next(&rng));

    b->repetition = psm_test_alloc((size_t)rows, sizeof(float));
    b->frequency = psm_test_alloc((size_t)rows, sizeof(float));
    b->presence = psm_test_alloc((size_t)rows, sizeof(float));
    for (int64_t r = 0; r < rows; ++r) {
        b->repetition[r] = r % 3 == 0 ? 1.0f : (float)(0.5 + 1.5 * psm_test_rng_uniform(&rng));
        b->frequency[r] = r % 4 == 1 ? 0.0f : (float)(psm_test_rng_uniform(&rng) - 0.25);
        b->presence[r] = r % 4 == 2 ? 0.0f : (float)(2.0 * psm_test_rng_uniform(&rng) - 0.5);
    }

    psm_logit_processing_init(&b->processing);
    b->processing.allowed_mask = b->mask;
    b->processing.bias_offsets = b->bias_offsets;
    b->processing.bias_tokens = b->bias_tokens;
    b->processing.bias_values = b->bias_values;
    b->processing.history_offsets = b->history_offsets;
    b->processing.history_tokens = b->history_tokens;
    b->processing.prompt_offsets = b->prompt_offsets;
    b->processing.prompt_tokens = b->prompt_tokens;
    b->processing.repetition_penalty_per_row = b->repetition;
    b->processing.frequency_penalty_per_row = b->frequency;
    b->processing.presence_penalty_per_row = b->presence;
}

static void free_batch(batch *b)
{
    free(b->logits);
    free(b->history_offsets);
    free(b->prompt_offsets);
    free(b->bias_offsets);
    free(b->history_tokens);
    free(b->prompt_tokens);
    free(b->bias_tokens);
    free(b->bias_values);
    free(b->mask);
    free(b->repetition);
    free(b->frequency);
    free(b->presence);
}

/* The rules of SAMPLING.md section 1, one token at a time, from the raw
 * logits (already floats: f32 input, or 16-bit input widened). */
static void process_literally(const batch *b, const psm_logit_processing *p, const float *raw,
                              float *out)
{
    const int64_t words = (b->vocab + 31) / 32;
    for (int64_t r = 0; r < b->rows; ++r) {
        const float repetition = p->repetition_penalty_per_row[r];
        for (int64_t i = 0; i < b->vocab; ++i) {
            float x = psm_read_logit(raw[r * b->vocab + i]);
            uint32_t count = 0;
            int in_prompt = 0;
            for (int64_t e = p->history_offsets ? p->history_offsets[r] : 0;
                 p->history_offsets && e < p->history_offsets[r + 1]; ++e)
                count += p->history_tokens[e] == i;
            for (int64_t e = p->prompt_offsets ? p->prompt_offsets[r] : 0;
                 p->prompt_offsets && e < p->prompt_offsets[r + 1]; ++e)
                in_prompt |= p->prompt_tokens[e] == i;
            if (count > 0 || in_prompt) {
                if (repetition != 1.0f)
                    x = x > 0.0f ? x * psm_penalty_reciprocal(repetition) : x * repetition;
                if (count > 0) {
                    x = x - p->frequency_penalty_per_row[r] * (float)count;
                    x = x - p->presence_penalty_per_row[r];
                }
            }
            for (int64_t e = p->bias_offsets ? p->bias_offsets[r] : 0;
                 p->bias_offsets && e < p->bias_offsets[r + 1]; ++e)
                if (p->bias_tokens[e] == i)
                    x = x + p->bias_values[e];
            if (!((p->allowed_mask[r * words + i / 32] >> (i % 32)) & 1u) && !isnan(x) &&
                x != INFINITY)
                x = -INFINITY;
            out[r * b->vocab + i] = psm_read_logit(x);
        }
    }
}

/* Runs psm_sample with processing; on a backend without it, checks the
 * refusal (nothing written) and skips visibly. Returns whether the backend
 * ran it. */
static int sample_processed(psm_context *context, psm_backend backend, const char *test,
                            psm_tensor logits, const psm_params *params, int32_t *tokens,
                            float *logprobs)
{
    size_t outputs = (size_t)(logits.rows * params->num_samples);
    for (size_t k = 0; k < outputs; ++k)
        tokens[k] = SENTINEL_TOKEN;
    psm_status status = psm_sample(context, &logits, params, psm_test_output(tokens),
                                   psm_test_output(logprobs));
    return psm_test_feature_ran(context, backend, status, test, "logit processing", tokens,
                                outputs, SENTINEL_TOKEN);
}

/* Processing equals a plain call on the literally processed logits: tokens,
 * logprobs and psm_probs, for each filter setting, for f32 and bf16 with
 * every kind of processing, and for f32 with the mask alone (the GPU
 * backends' call without lists: one dense step). */
PSM_PROPERTY(processing_equals_plain_call_on_processed_logits)
{
    psm_context *context = psm_test_open(backend);
    batch b;
    make_batch(&b, 7, 3000, 0x5eed0001u);
    const int64_t cells = b.rows * b.vocab;
    float *processed = psm_test_alloc((size_t)cells, sizeof(float));
    float *widened = psm_test_alloc((size_t)cells, sizeof(float));
    uint16_t *bf16 = psm_test_alloc((size_t)cells, sizeof(uint16_t));
    /* bf16 input: the logits rounded to bf16 by truncation (exact widening). */
    for (int64_t i = 0; i < cells; ++i) {
        uint32_t bits = psm_float_bits(b.logits[i]) & 0xffff0000u;
        bf16[i] = (uint16_t)(bits >> 16);
        widened[i] = psm_bits_float(bits);
    }

    const int32_t samples = 24;
    int32_t *tokens = psm_test_alloc((size_t)(b.rows * samples), sizeof(int32_t));
    int32_t *expected_tokens = psm_test_alloc((size_t)(b.rows * samples), sizeof(int32_t));
    float *logprobs = psm_test_alloc((size_t)(b.rows * samples), sizeof(float));
    float *expected_logprobs = psm_test_alloc((size_t)(b.rows * samples), sizeof(float));
    float *probs = psm_test_alloc((size_t)cells, sizeof(float));
    float *expected_probs = psm_test_alloc((size_t)cells, sizeof(float));

    struct {
        float temperature;
        int32_t top_k;
        float top_p, min_p;
    } settings[] = {{0.9f, 0, 1.0f, 0.0f}, {0.8f, 50, 0.9f, 0.0f}, {1.1f, 0, 0.8f, 0.0f},
                    {0.7f, 0, 1.0f, 0.05f}, {0.0f, 0, 1.0f, 0.0f}};
    psm_logit_processing mask_only = b.processing;
    mask_only.history_offsets = mask_only.prompt_offsets = mask_only.bias_offsets = NULL;
    mask_only.history_tokens = mask_only.prompt_tokens = mask_only.bias_tokens = NULL;
    mask_only.bias_values = NULL;
    for (int variant = 0; variant < 3; ++variant) {
        const int dtype = variant == 1; /* 0: f32, 1: bf16 */
        const psm_logit_processing *processing = variant == 2 ? &mask_only : &b.processing;
        process_literally(&b, processing, dtype == 0 ? b.logits : widened, processed);
        psm_tensor input = dtype == 0 ? psm_test_tensor(b.logits, PSM_DTYPE_F32, b.rows, b.vocab, 0)
                                      : psm_test_tensor(bf16, PSM_DTYPE_BF16, b.rows, b.vocab, 0);
        for (size_t s = 0; s < sizeof settings / sizeof settings[0]; ++s) {
            psm_params params;
            psm_params_init(&params);
            params.temperature = settings[s].temperature;
            params.top_k = settings[s].top_k;
            params.top_p = settings[s].top_p;
            params.min_p = settings[s].min_p;
            params.num_samples = samples;
            params.seed = 1000 + s;
            PSM_CHECK_OK(psm_test_sample_f32(context, processed, b.rows, b.vocab, &params,
                                             expected_tokens, expected_logprobs));
            PSM_CHECK_OK(psm_synchronize(context));
            params.processing = processing;
            if (!sample_processed(context, backend, "processing_equals_plain_call_on_processed_logits",
                                  input, &params, tokens, logprobs))
                goto done;
            for (int64_t k = 0; k < b.rows * samples; ++k) {
                ck_assert_msg(tokens[k] == expected_tokens[k],
                              "variant %d setting %zu row %lld sample %lld: token %d, expected %d",
                              variant, s, (long long)(k / samples), (long long)(k % samples),
                              tokens[k], expected_tokens[k]);
                ck_assert_msg(memcmp(&logprobs[k], &expected_logprobs[k], sizeof(float)) == 0,
                              "variant %d setting %zu: logprob %.9g, expected %.9g", variant, s,
                              (double)logprobs[k], (double)expected_logprobs[k]);
            }

            psm_tensor probs_tensor = psm_test_tensor(probs, PSM_DTYPE_F32, b.rows, b.vocab, 0);
            PSM_CHECK_OK(psm_probs(context, &input, &params, &probs_tensor));
            params.processing = NULL;
            PSM_CHECK_OK(psm_test_probs_f32(context, processed, b.rows, b.vocab, &params,
                                            expected_probs));
            PSM_CHECK_OK(psm_synchronize(context));
            ck_assert_msg(memcmp(probs, expected_probs, (size_t)cells * sizeof(float)) == 0,
                          "variant %d setting %zu: psm_probs differ from the processed logits'",
                          variant, s);
        }
    }
done:
    free(processed);
    free(widened);
    free(bf16);
    free(tokens);
    free(expected_tokens);
    free(logprobs);
    free(expected_logprobs);
    free(probs);
    free(expected_probs);
    free_batch(&b);
    psm_context_destroy(context);
}

/* The processing arrays in the backend's device memory (read when the
 * kernels run) give the host arrays' tokens; a device list that names a
 * token outside the vocab, or starts below 0, makes only its row bad (where
 * core reads the arrays on the host, the call is refused instead). */
PSM_PROPERTY(processing_arrays_in_device_memory)
{
    const char *why = psm_test_memory_unavailable(backend, PSM_MEMORY_DEVICE);
    if (why) {
        psm_test_skip(psm_backend_name(backend), "processing_arrays_in_device_memory", why);
        return;
    }
    batch b;
    make_batch(&b, 5, 1100, 0x5eed0002u);
    const int64_t rows = b.rows, vocab = b.vocab, words = (vocab + 31) / 32;
    const int32_t samples = 8;
    psm_context *host_context = psm_test_open(backend);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = samples;
    params.seed = 31;
    params.top_p = 0.95f;
    params.processing = &b.processing;
    int32_t *expected = psm_test_alloc((size_t)(rows * samples), sizeof(int32_t));
    int32_t *tokens = psm_test_alloc((size_t)(rows * samples), sizeof(int32_t));
    psm_tensor host_tensor = psm_test_tensor(b.logits, PSM_DTYPE_F32, rows, vocab, 0);
    psm_status status = psm_sample(host_context, &host_tensor, &params,
                                   psm_test_output(expected), psm_test_output(NULL));
    psm_context_destroy(host_context);
    if (status == PSM_ERR_UNSUPPORTED && backend != PSM_BACKEND_CPU) {
        psm_test_skip(psm_backend_name(backend), "processing_arrays_in_device_memory",
                      "the backend does not run logit processing");
        goto done;
    }
    ck_assert_msg(status == PSM_OK, "%s", psm_last_error());

    for (int broken = 0; broken < 3; ++broken) {
        psm_test_memory *memory = psm_test_memory_open(backend, PSM_MEMORY_DEVICE, 0);
        /* broken 1: row 3's history names token `vocab`; broken 2: a bias
         * offset of -1. */
        int64_t *bias_offsets = psm_test_alloc((size_t)rows + 1, sizeof(int64_t));
        memcpy(bias_offsets, b.bias_offsets, ((size_t)rows + 1) * sizeof(int64_t));
        int32_t history_total = (int32_t)b.history_offsets[rows];
        int32_t *history = psm_test_alloc((size_t)history_total + 1, sizeof(int32_t));
        memcpy(history, b.history_tokens, (size_t)history_total * sizeof(int32_t));
        if (broken == 1 && b.history_offsets[4] > b.history_offsets[3])
            history[b.history_offsets[3]] = (int32_t)vocab;
        if (broken == 2)
            bias_offsets[3] = -1;
        psm_logit_processing device = b.processing;
        device.allowed_mask = psm_test_memory_copy_in(memory, b.mask,
                                                      (size_t)(rows * words) * sizeof(uint32_t));
        device.bias_offsets =
            psm_test_memory_copy_in(memory, bias_offsets, ((size_t)rows + 1) * sizeof(int64_t));
        device.bias_tokens = psm_test_memory_copy_in(
            memory, b.bias_tokens, ((size_t)b.bias_offsets[rows] + 1) * sizeof(int32_t));
        device.bias_values = psm_test_memory_copy_in(
            memory, b.bias_values, ((size_t)b.bias_offsets[rows] + 1) * sizeof(float));
        device.history_offsets = psm_test_memory_copy_in(memory, b.history_offsets,
                                                         ((size_t)rows + 1) * sizeof(int64_t));
        device.history_tokens =
            psm_test_memory_copy_in(memory, history, ((size_t)history_total + 1) * sizeof(int32_t));
        device.prompt_offsets = psm_test_memory_copy_in(memory, b.prompt_offsets,
                                                        ((size_t)rows + 1) * sizeof(int64_t));
        device.prompt_tokens = psm_test_memory_copy_in(
            memory, b.prompt_tokens, ((size_t)b.prompt_offsets[rows] + 1) * sizeof(int32_t));
        device.repetition_penalty_per_row =
            psm_test_memory_copy_in(memory, b.repetition, (size_t)rows * sizeof(float));
        device.frequency_penalty_per_row =
            psm_test_memory_copy_in(memory, b.frequency, (size_t)rows * sizeof(float));
        device.presence_penalty_per_row =
            psm_test_memory_copy_in(memory, b.presence, (size_t)rows * sizeof(float));
        void *logits = psm_test_memory_copy_in(memory, b.logits,
                                               (size_t)(rows * vocab) * sizeof(float));
        void *device_tokens =
            psm_test_memory_filled(memory, (size_t)(rows * samples) * sizeof(int32_t), 0xa5);
        psm_tensor tensor = psm_test_tensor(logits, PSM_DTYPE_F32, rows, vocab, 0);
        tensor.memory = PSM_MEMORY_DEVICE;
        psm_params device_params = params;
        device_params.processing = &device;
        status = psm_sample(psm_test_memory_context(memory), &tensor, &device_params,
                            (psm_output){device_tokens, PSM_MEMORY_DEVICE},
                            (psm_output){NULL, PSM_MEMORY_DEVICE});
        /* The rows the breakage makes bad: row 3 for a history token outside
         * the vocab (when row 3 has a history); rows 2 and 3 for the offset
         * -1, which ends row 2's entries before they begin and starts row 3's
         * below 0. */
        const int history_broken = broken == 1 && b.history_offsets[4] > b.history_offsets[3];
        const int any_broken = history_broken || broken == 2;
        if (any_broken && psm_test_memory_checked_on_host(memory)) {
            ck_assert_msg(status == PSM_ERR_INVALID_PARAMETER ||
                              status == PSM_ERR_INVALID_ARGUMENT,
                          "broken %d on the host: %s", broken, psm_status_string(status));
        } else {
            ck_assert_msg(status == PSM_OK, "broken %d: %s: %s", broken,
                          psm_status_string(status), psm_last_error());
            psm_test_memory_read(memory, tokens, device_tokens,
                                 (size_t)(rows * samples) * sizeof(int32_t));
            for (int64_t k = 0; k < rows * samples; ++k) {
                const int64_t row = k / samples;
                const int bad_row = (history_broken && row == 3) ||
                                    (broken == 2 && (row == 2 || row == 3));
                if (bad_row)
                    ck_assert_msg(tokens[k] == -1, "broken %d row %lld: token %d, expected -1",
                                  broken, (long long)row, tokens[k]);
                else
                    ck_assert_msg(tokens[k] == expected[k],
                                  "broken %d row %lld sample %lld: token %d, host arrays %d",
                                  broken, (long long)row, (long long)(k % samples),
                                  tokens[k], expected[k]);
            }
        }
        free(bias_offsets);
        free(history);
        psm_test_memory_close(memory);
    }
done:
    free(expected);
    free(tokens);
    free_batch(&b);
}

/* A struct with nothing to do is no processing: every backend runs it, and
 * the tokens are the plain call's. */
PSM_PROPERTY(empty_processing_is_plain_sampling)
{
    psm_context *context = psm_test_open(backend);
    float logits[2 * 40];
    psm_test_rng rng = psm_test_rng_make(11);
    for (int i = 0; i < 80; ++i)
        logits[i] = (float)psm_test_rng_normal(&rng);
    psm_logit_processing nothing;
    psm_logit_processing_init(&nothing);
    nothing.repetition_penalty = 1.5f; /* no history: changes nothing */
    psm_params params;
    psm_params_init(&params);
    params.num_samples = 16;
    int32_t plain[32], with[32];
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, 2, 40, &params, plain, NULL));
    params.processing = &nothing;
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, 2, 40, &params, with, NULL));
    PSM_CHECK_OK(psm_synchronize(context));
    ck_assert(memcmp(plain, with, sizeof plain) == 0);
    psm_context_destroy(context);
}

/* A mask that allows nothing valid, a bias that overflows to +inf (masked
 * or not: the mask comes after the bias), or a NaN (masked or not) makes the
 * row bad: token -1 and logprob NaN, other rows unaffected; in checking
 * mode PSM_ERR_BAD_ROW names it and nothing is written. */
PSM_PROPERTY(processing_can_make_a_row_bad)
{
    const int64_t rows = 4, vocab = 64;
    float logits[4 * 64];
    for (int i = 0; i < rows * vocab; ++i)
        logits[i] = (float)(i % 7);
    logits[2 * vocab + 9] = 3e38f;
    logits[3 * vocab + 40] = NAN; /* row 3: a NaN the mask disallows */
    uint32_t mask[4 * 2];
    for (int i = 0; i < 8; ++i)
        mask[i] = 0xffffffffu;
    mask[2] = mask[3] = 0;     /* row 1 allows nothing */
    mask[4] = ~(1u << 9);      /* row 2 disallows its token 9, whose bias overflows */
    mask[7] = 0;               /* row 3 disallows tokens 32 .. 63 */
    int64_t bias_offsets[5] = {0, 0, 0, 1, 1};
    int32_t bias_tokens[1] = {9};
    float bias_values[1] = {3e38f}; /* row 2: 3e38 + 3e38 = +inf */
    psm_logit_processing processing;
    psm_logit_processing_init(&processing);
    processing.allowed_mask = mask;
    processing.bias_offsets = bias_offsets;
    processing.bias_tokens = bias_tokens;
    processing.bias_values = bias_values;

    psm_context *context = psm_test_open(backend);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = 2;
    params.processing = &processing;
    int32_t tokens[8];
    float logprobs[8];
    psm_tensor tensor = psm_test_tensor(logits, PSM_DTYPE_F32, rows, vocab, 0);
    if (!sample_processed(context, backend, "processing_can_make_a_row_bad", tensor, &params,
                          tokens, logprobs)) {
        psm_context_destroy(context);
        return;
    }
    ck_assert(tokens[0] >= 0 && tokens[1] >= 0);
    for (int k = 2; k < 8; ++k) {
        ck_assert_int_eq(tokens[k], -1);
        ck_assert(isnan(logprobs[k]));
    }
    psm_context_destroy(context);

    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.check_rows = 1;
    context = psm_test_open_with(&options);
    for (int k = 0; k < 8; ++k)
        tokens[k] = SENTINEL_TOKEN;
    psm_status status = psm_sample(context, &tensor, &params, psm_test_output(tokens),
                                   psm_test_output(NULL));
    ck_assert_msg(status == PSM_ERR_BAD_ROW, "%s", psm_status_string(status));
    ck_assert_msg(strstr(psm_last_error(), "row 1") != NULL, "%s", psm_last_error());
    for (int k = 0; k < 8; ++k)
        ck_assert_int_eq(tokens[k], SENTINEL_TOKEN);
    psm_context_destroy(context);
}

/* The penalty rules on hand-computed values: logits {1, 2, -1, 0}, history
 * {1, 1, 2}, prompt {0}, repetition 2, frequency 0.5, presence 0.25:
 *   token 0 (prompt only): 1 > 0, 1 x (1/2) = 0.5
 *   token 1 (twice): 2 x (1/2) = 1, 1 - 0.5 x 2 = 0, 0 - 0.25 = -0.25
 *   token 2 (once): -1 x 2 = -2, -2 - 0.5 = -2.5, -2.5 - 0.25 = -2.75
 *   token 3: unchanged, 0
 * all exact in float. */
START_TEST(penalty_rules_by_hand)
{
    const float reciprocal = psm_penalty_reciprocal(2.0f);
    ck_assert(reciprocal == 0.5f);
    ck_assert(psm_penalised_logit(1.0f, 0, 1, 2.0f, reciprocal, 0.5f, 0.25f) == 0.5f);
    ck_assert(psm_penalised_logit(2.0f, 2, 0, 2.0f, reciprocal, 0.5f, 0.25f) == -0.25f);
    ck_assert(psm_penalised_logit(-1.0f, 1, 0, 2.0f, reciprocal, 0.5f, 0.25f) == -2.75f);
    ck_assert(psm_penalised_logit(0.0f, 0, 0, 2.0f, reciprocal, 0.5f, 0.25f) == 0.0f);
    /* Repetition off: 1/1 is not used (x stays x even where it would round). */
    ck_assert(psm_penalised_logit(0x1.fffffep+0f, 1, 0, 1.0f, psm_penalty_reciprocal(1.0f),
                                  0.0f, 0.0f) == 0x1.fffffep+0f);
    /* The reciprocal is within 2 ulp of 1/r over the whole penalty range. */
    for (float r = PSM_MIN_REPETITION_PENALTY; r <= PSM_MAX_REPETITION_PENALTY; r *= 1.0001f) {
        double q = psm_penalty_reciprocal(r);
        ck_assert_msg(fabs(q * r - 1.0) <= 2.5e-7, "r = %.9g: 1/r = %.9g", (double)r, q);
    }
}
END_TEST

/* Every bad input is refused with its status and a message naming it, and
 * nothing is written. Host arrays are checked on the host, so the CPU
 * backend serves for all backends here. */
static void expect_refused(const psm_params *params, const float *logits, int64_t rows,
                           int64_t vocab, psm_status status, const char *needle)
{
    psm_context *context = psm_test_open(PSM_BACKEND_CPU);
    int32_t tokens[4] = {SENTINEL_TOKEN, SENTINEL_TOKEN, SENTINEL_TOKEN, SENTINEL_TOKEN};
    psm_status got = psm_test_sample_f32(context, logits, rows, vocab, params, tokens, NULL);
    ck_assert_msg(got == status, "expected %s, got %s (%s)", psm_status_string(status),
                  psm_status_string(got), psm_last_error());
    ck_assert_msg(strstr(psm_last_error(), needle) != NULL, "message '%s' lacks '%s'",
                  psm_last_error(), needle);
    for (int k = 0; k < 4; ++k)
        ck_assert_int_eq(tokens[k], SENTINEL_TOKEN);
    psm_context_destroy(context);
}

START_TEST(bad_processing_inputs_are_refused)
{
    float logits[2 * 40] = {0};
    int64_t offsets[3] = {0, 1, 2};
    int32_t tokens[2] = {3, 4};
    float values[2] = {1.0f, 2.0f};
    uint32_t mask[4] = {~0u, ~0u, ~0u, ~0u};
    psm_logit_processing p;
    psm_params params;
    psm_params_init(&params);
    params.processing = &p;

#define REFUSED(setup, status, needle)                                                     \
    do {                                                                                   \
        psm_logit_processing_init(&p);                                                     \
        setup;                                                                             \
        expect_refused(&params, logits, 2, 40, status, needle);                            \
    } while (0)

    REFUSED((p.bias_offsets = offsets, p.bias_tokens = tokens), PSM_ERR_INVALID_ARGUMENT,
            "go together");
    REFUSED((p.history_offsets = offsets), PSM_ERR_INVALID_ARGUMENT, "go together");
    REFUSED((p.prompt_tokens = tokens), PSM_ERR_INVALID_ARGUMENT, "go together");
    int32_t out_of_range[2] = {3, 40};
    REFUSED((p.bias_offsets = offsets, p.bias_tokens = out_of_range, p.bias_values = values),
            PSM_ERR_INVALID_PARAMETER, "row 1: bias_tokens[1] is 40");
    int32_t negative[2] = {-1, 2};
    REFUSED((p.history_offsets = offsets, p.history_tokens = negative), PSM_ERR_INVALID_PARAMETER,
            "history_tokens[0] is -1");
    REFUSED((p.prompt_offsets = offsets, p.prompt_tokens = out_of_range),
            PSM_ERR_INVALID_PARAMETER, "prompt_tokens[1] is 40");
    float not_finite[2] = {1.0f, NAN};
    REFUSED((p.bias_offsets = offsets, p.bias_tokens = tokens, p.bias_values = not_finite),
            PSM_ERR_INVALID_PARAMETER, "bias_values[1] is nan");
    int64_t decreasing[3] = {0, 2, 1};
    REFUSED((p.history_offsets = decreasing, p.history_tokens = tokens), PSM_ERR_INVALID_ARGUMENT,
            "history_offsets[2] = 1 is below");
    int64_t negative_start[3] = {-1, 0, 1};
    REFUSED((p.bias_offsets = negative_start, p.bias_tokens = tokens, p.bias_values = values),
            PSM_ERR_INVALID_ARGUMENT, "bias_offsets[0] is -1");
    REFUSED((p.repetition_penalty = 0.0f), PSM_ERR_INVALID_PARAMETER, "repetition_penalty is 0");
    REFUSED((p.repetition_penalty = NAN), PSM_ERR_INVALID_PARAMETER, "repetition_penalty");
    REFUSED((p.frequency_penalty = 2e3f), PSM_ERR_INVALID_PARAMETER, "frequency_penalty");
    REFUSED((p.presence_penalty = -INFINITY), PSM_ERR_INVALID_PARAMETER, "presence_penalty");
    float per_row[2] = {1.0f, 5e3f};
    REFUSED((p.history_offsets = offsets, p.history_tokens = tokens,
             p.repetition_penalty_per_row = per_row),
            PSM_ERR_INVALID_PARAMETER, "row 1: repetition_penalty is 5000");
    REFUSED((p.allowed_mask = mask, p.allowed_mask_words = 1), PSM_ERR_INVALID_ARGUMENT,
            "allowed_mask_words is 1");
#undef REFUSED
}
END_TEST

int main(void)
{
    psm_test_register_common(penalty_rules_by_hand);
    psm_test_register_common(bad_processing_inputs_are_refused);
    psm_test_register_property(processing_equals_plain_call_on_processed_logits);
    psm_test_register_property(empty_processing_is_plain_sampling);
    psm_test_register_property(processing_arrays_in_device_memory);
    psm_test_register_property(processing_can_make_a_row_bad);
    return psm_test_run("test_processing");
}
