/*
 * fuzz_differential.c: small random batches (1-4 rows, vocab 1-300, now and
 * then up to 3000 so that rows span tiles), logits with ties, masked and bad
 * entries, f32/f16/bf16, padded rows, parameters and (on about half the
 * inputs) valid logit processing decoded from the input: penalties and
 * per-row penalties in their ranges, bias, history and prompt lists over a
 * few repeated tokens (bias values up to +-3e38, which can overflow a
 * logit), allowed-token masks that may allow nothing, through the CPU
 * backend, then held against three others, which see the logits as
 * SAMPLING.md section 1 processes them, token by token (process_literally):
 *
 * 1. the contract model (contract_model.c: SAMPLING.md written out
 *    literally): the same tokens, bit for bit; the same support of psm_probs
 *    (the kept tokens whose weight is not 0); probabilities within 1e-6
 *    relative (docs/SAMPLING.md: "float rounding, about 1e-6 relative");
 * 2. the float64 reference (reference/psm_reference.c): greedy tokens and bad rows
 *    exactly; for rows whose kept set is defined by rank alone (top-k or no
 *    filter) psm_ref_distribution's kept set and a total-variation distance
 *    of at most 1e-6 (docs/SAMPLING.md, "Precision"); for rows with top-p
 *    or min-p the same bound against the float64 softmax over the contract's
 *    kept set (whose cutoffs the float64 sums may place differently);
 * 3. the OpenCL backend on PoCL, when it is available and FUZZ_OPENCL is not
 *    0: the same tokens, probabilities within 1e-6 relative; a batch with
 *    processing only while it runs processing (until then it must refuse
 *    it with PSM_ERR_UNSUPPORTED). Its context is made once per process
 *    (PoCL compiles the kernels at first use).
 *
 * Then the batch split by vocabulary (psm_sharded_*, 1-8 shards at cuts
 * hashed from the input): every rank's tokens and logprobs equal the CPU
 * backend's bit for bit (check_sharded).
 *
 * After the batch, on about half the inputs, a psm_verify call (1-3
 * requests, k 1-12, chains or trees, vocab 1-64, every draft kind) against
 * docs/SAMPLING.md section 7 written out in contract_model.c
 * (model_verify): the same status (INVALID_PARAMETER, writing nothing,
 * exactly when a drawn draft token has weight 0 or a draft logits row is
 * bad), then the same accepted counts, tokens and path nodes, logprobs
 * within 1e-6 relative; OpenCL must refuse it with PSM_ERR_UNSUPPORTED and
 * write nothing until it verifies, and then agree the same way.
 *
 * A disagreement aborts with the row and what differed.
 */
#include "contract_model.h"
#include "fuzz_input.h"
#include "half_truncate.h"
#include "polysample.h"
#include "psm_contract.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 4
#define MAX_VOCAB 3000
#define MAX_SAMPLES 4
#define MAX_PAD 3
/* Processing lists: at most MAX_LIST_ROW entries a row, after at most 3
 * unused ones before the first row's. */
#define MAX_LIST_ROW 24
#define MAX_LIST_ENTRIES (MAX_ROWS * MAX_LIST_ROW + 3)
#define MAX_MASK_PAD 2
#define PROBS_RELATIVE 1e-6
#define TV_BOUND 1e-6

#define FAIL(...)                                                                            \
    do {                                                                                     \
        fprintf(stderr, "differential: " __VA_ARGS__);                                       \
        fputc('\n', stderr);                                                                 \
        abort();                                                                             \
    } while (0)

static psm_context *cpu_context, *opencl_context;

static psm_context *open_backend(psm_backend backend, int threads)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.cpu_threads = threads;
    psm_context *context = NULL;
    psm_status status = psm_context_create(&options, &context);
    if (status != PSM_OK) {
        fprintf(stderr, "differential: no %s context: %s\n", psm_backend_name(backend),
                psm_last_error());
        return NULL;
    }
    return context;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    /* Two threads: batches with fewer rows than threads take the
     * tile-parallel path, the others the row-parallel one. */
    cpu_context = open_backend(PSM_BACKEND_CPU, 2);
    if (!cpu_context)
        abort();
    const char *want_opencl = getenv("FUZZ_OPENCL");
    if (!(want_opencl && strcmp(want_opencl, "0") == 0) &&
        psm_backend_available(PSM_BACKEND_OPENCL, NULL))
        opencl_context = open_backend(PSM_BACKEND_OPENCL, 0);
    fprintf(stderr, "differential: OpenCL comparison %s\n", opencl_context ? "on" : "off");
    return 0;
}

/* A logit from the input: mostly small values on a coarse grid (ties),
 * sometimes the edges of the float range, -inf, NaN, +inf or raw bits. */
static float decode_logit(fuzz_input *input)
{
    uint8_t kind = fuzz_u8(input);
    if (kind < 160)
        return (float)(int8_t)fuzz_u8(input) * 0.25f;
    if (kind < 200)
        return (float)(int16_t)fuzz_u16(input) * 0x1p-7f;
    if (kind < 215)
        return -INFINITY;
    if (kind < 225)
        return fuzz_raw_float(input);
    if (kind < 235)
        return ldexpf((float)(int8_t)fuzz_u8(input), (int)(int8_t)fuzz_u8(input));
    if (kind < 240)
        return (kind & 1 ? -1.0f : 1.0f) * 0x1p-70f * (float)fuzz_u8(input); /* below 2^-64 */
    if (kind < 246)
        return (kind & 1 ? -3.0e38f : 3.0e38f);
    if (kind < 250)
        return -0.0f;
    if (kind < 253)
        return NAN;
    return INFINITY;
}

static float decode_temperature(fuzz_input *input)
{
    static const float table[] = {1.0f,   0.0f,  1e-5f, 0x1.4f8b58p-17f /* just below 1e-5 */,
                                  0.5f,   0.7f,  2.0f,  10.0f,
                                  1e-3f,  1e6f,  100.0f, 0.05f};
    uint8_t choice = fuzz_u8(input);
    if (choice < 200)
        return table[choice % (sizeof table / sizeof table[0])];
    float raw = fabsf(fuzz_raw_float(input));
    return raw <= PSM_MAX_TEMPERATURE ? raw : 1.0f; /* NaN goes to 1 too */
}

static float decode_unit(fuzz_input *input, int open_at_zero)
{
    static const float table[] = {1.0f, 0.9f, 0.5f, 0.1f, 0.999999f, 1e-9f, 0.3f, 0.95f};
    uint8_t choice = fuzz_u8(input);
    if (choice < 128)
        return open_at_zero ? 1.0f : 0.0f; /* off */
    if (choice < 220)
        return table[choice % (sizeof table / sizeof table[0])];
    float raw = fabsf(fuzz_raw_float(input));
    if (!(raw <= 1.0f) || (open_at_zero && raw == 0.0f))
        return open_at_zero ? 1.0f : 0.0f;
    return raw;
}

typedef struct batch {
    int64_t rows, vocab, stride, samples;
    psm_dtype dtype;
    void *logits;           /* rows x stride of dtype */
    float widened[MAX_ROWS][MAX_VOCAB];
    psm_params params;
    float temperature[MAX_ROWS], top_p[MAX_ROWS], min_p[MAX_ROWS];
    int32_t top_k[MAX_ROWS];
    uint64_t seeds[MAX_ROWS];
    /* Logit processing (params.processing points here when it is on): valid
     * lists, masks and penalties, and the logits processed literally. */
    psm_logit_processing processing;
    int64_t bias_offsets[MAX_ROWS + 1], history_offsets[MAX_ROWS + 1],
        prompt_offsets[MAX_ROWS + 1];
    int32_t bias_tokens[MAX_LIST_ENTRIES], history_tokens[MAX_LIST_ENTRIES],
        prompt_tokens[MAX_LIST_ENTRIES];
    float bias_values[MAX_LIST_ENTRIES];
    uint32_t mask[MAX_ROWS * (MAX_VOCAB / 32 + 1 + MAX_MASK_PAD)];
    float repetition[MAX_ROWS], frequency[MAX_ROWS], presence[MAX_ROWS];
    float processed[MAX_ROWS][MAX_VOCAB];
} batch;

static batch current;

/* A penalty in its valid range, mostly off. */
static float decode_penalty(fuzz_input *input, float off, const float *table, size_t size)
{
    uint8_t how = fuzz_u8(input);
    if (how < 96)
        return off;
    return table[how % size];
}

static const float repetition_table[] = {1.5f, 0.5f, 1e-3f, 1e3f, 2.0f, 1.1f, 0.9f, 1.0f};
static const float additive_table[] = {0.25f, -0.5f, 1e3f, -1e3f, 1.0f, 0.1f, 2.0f, 0.0f};
#define TABLE(t) (t), (sizeof(t) / sizeof((t)[0]))

/* A token for a list: mostly from a few (so that lists repeat tokens and
 * overlap), sometimes any. */
static int32_t decode_list_token(fuzz_input *input, int64_t vocab)
{
    uint8_t how = fuzz_u8(input);
    if (how < 160)
        return (int32_t)(how % (vocab < 8 ? vocab : 8));
    return (int32_t)fuzz_range(input, 0, vocab - 1);
}

static float decode_bias_value(fuzz_input *input)
{
    uint8_t how = fuzz_u8(input);
    if (how < 200)
        return (float)(int8_t)fuzz_u8(input) * 0.25f;
    if (how < 225)
        return (how & 1 ? -1.0f : 1.0f) * 3.0e38f; /* finite, and may overflow a logit */
    /* Finite always (valid processing): ldexpf of a large exponent, like raw
     * bits, can be infinite, and such a value is 0 instead. */
    float value = how < 240 ? ldexpf((float)(int8_t)fuzz_u8(input), (int)(int8_t)fuzz_u8(input))
                            : fuzz_raw_float(input);
    return isfinite(value) ? value : 0.0f;
}

/* Valid CSR lists for rows, or none (NULL offsets). */
static void decode_lists(fuzz_input *input, int64_t rows, int64_t vocab, int64_t *offsets,
                         int32_t *tokens, float *values, int *present)
{
    *present = fuzz_u8(input) >= 96;
    if (!*present)
        return;
    uint8_t start = fuzz_u8(input);
    offsets[0] = start < 224 ? 0 : start % 4; /* entries before the first row's are allowed */
    for (int64_t e = 0; e < offsets[0]; ++e) {
        tokens[e] = -1; /* never read */
        if (values)
            values[e] = NAN;
    }
    for (int64_t r = 0; r < rows; ++r) {
        int64_t length = fuzz_u8(input) < 224 ? fuzz_range(input, 0, 6)
                                              : fuzz_range(input, 0, MAX_LIST_ROW);
        offsets[r + 1] = offsets[r] + length;
        for (int64_t e = offsets[r]; e < offsets[r + 1]; ++e) {
            tokens[e] = decode_list_token(input, vocab);
            if (values)
                values[e] = decode_bias_value(input);
        }
    }
}

/* Decodes valid processing into b (after its logits). */
static void decode_processing(fuzz_input *input, batch *b)
{
    psm_logit_processing *p = &b->processing;
    psm_logit_processing_init(p);
    p->repetition_penalty = decode_penalty(input, 1.0f, TABLE(repetition_table));
    p->frequency_penalty = decode_penalty(input, 0.0f, TABLE(additive_table));
    p->presence_penalty = decode_penalty(input, 0.0f, TABLE(additive_table));
    int present;
    decode_lists(input, b->rows, b->vocab, b->bias_offsets, b->bias_tokens, b->bias_values,
                 &present);
    if (present) {
        p->bias_offsets = b->bias_offsets;
        p->bias_tokens = b->bias_tokens;
        p->bias_values = b->bias_values;
    }
    decode_lists(input, b->rows, b->vocab, b->history_offsets, b->history_tokens, NULL,
                 &present);
    if (present) {
        p->history_offsets = b->history_offsets;
        p->history_tokens = b->history_tokens;
    }
    decode_lists(input, b->rows, b->vocab, b->prompt_offsets, b->prompt_tokens, NULL, &present);
    if (present) {
        p->prompt_offsets = b->prompt_offsets;
        p->prompt_tokens = b->prompt_tokens;
    }
    uint8_t mask_how = fuzz_u8(input);
    if (mask_how >= 96) {
        int64_t needed = (b->vocab + 31) / 32;
        int64_t words = needed + (mask_how < 200 ? 0 : fuzz_range(input, 0, MAX_MASK_PAD));
        p->allowed_mask = b->mask;
        p->allowed_mask_words = mask_how < 160 ? 0 : words;
        if (mask_how < 160)
            words = needed;
        /* Mostly dense; now and then a row that allows nothing or one token. */
        for (int64_t w = 0; w < b->rows * words; ++w) {
            uint8_t how = fuzz_u8(input);
            b->mask[w] = how < 48    ? 0u
                         : how < 160 ? 0xffffffffu
                         : how < 176 ? 1u << (fuzz_u8(input) % 32)
                                     : fuzz_u32(input);
        }
    }
    uint8_t per_row = fuzz_u8(input);
    for (int64_t r = 0; r < b->rows; ++r) {
        b->repetition[r] = decode_penalty(input, 1.0f, TABLE(repetition_table));
        b->frequency[r] = decode_penalty(input, 0.0f, TABLE(additive_table));
        b->presence[r] = decode_penalty(input, 0.0f, TABLE(additive_table));
    }
    p->repetition_penalty_per_row = per_row & 1 ? b->repetition : NULL;
    p->frequency_penalty_per_row = per_row & 2 ? b->frequency : NULL;
    p->presence_penalty_per_row = per_row & 4 ? b->presence : NULL;
}

/* SAMPLING.md section 1, one token at a time, from the widened logits, as
 * the rule reads: count the token in the row's history, look for it in the
 * prompt, penalise, add its bias entries in list order, mask (which leaves
 * NaN and +inf), read again. */
static void process_literally(batch *b)
{
    const psm_logit_processing *p = &b->processing;
    const int64_t words = p->allowed_mask_words ? p->allowed_mask_words : (b->vocab + 31) / 32;
    for (int64_t r = 0; r < b->rows; ++r) {
        float repetition = p->repetition_penalty_per_row ? p->repetition_penalty_per_row[r]
                                                         : p->repetition_penalty;
        float frequency = p->frequency_penalty_per_row ? p->frequency_penalty_per_row[r]
                                                       : p->frequency_penalty;
        float presence = p->presence_penalty_per_row ? p->presence_penalty_per_row[r]
                                                     : p->presence_penalty;
        for (int64_t i = 0; i < b->vocab; ++i) {
            float x = psm_read_logit(b->widened[r][i]);
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
                    x = x - frequency * (float)count;
                    x = x - presence;
                }
            }
            for (int64_t e = p->bias_offsets ? p->bias_offsets[r] : 0;
                 p->bias_offsets && e < p->bias_offsets[r + 1]; ++e)
                if (p->bias_tokens[e] == i)
                    x = x + p->bias_values[e];
            /* A mask never hides a NaN or +inf: the row stays bad. */
            if (p->allowed_mask && !((p->allowed_mask[r * words + i / 32] >> (i % 32)) & 1u) &&
                !isnan(x) && x != INFINITY)
                x = -INFINITY;
            b->processed[r][i] = psm_read_logit(x);
        }
    }
}

/* Stores x at element `at` of logits of dtype (bf16 and f16 truncated, NaN
 * kept) and returns the value the library reads there. */
static float store_logit(void *logits, psm_dtype dtype, size_t at, float x)
{
    if (dtype == PSM_DTYPE_F32) {
        ((float *)logits)[at] = x;
        return x;
    }
    if (dtype == PSM_DTYPE_BF16) {
        uint32_t bits;
        memcpy(&bits, &x, sizeof bits);
        uint16_t h = (uint16_t)(bits >> 16);
        if ((bits & 0x7fffffffu) > 0x7f800000u)
            h |= 0x40; /* a NaN stays a NaN after truncation */
        ((uint16_t *)logits)[at] = h;
        return psm_bf16_to_float(h);
    }
    uint16_t h = psm_test_truncate_to_f16(x);
    ((uint16_t *)logits)[at] = h;
    return psm_f16_to_float(h);
}

static void decode_batch(fuzz_input *input, batch *b)
{
    uint8_t flags = fuzz_u8(input);
    b->dtype = (psm_dtype)(flags % 3);
    int per_row = (flags >> 2) & 1;
    int long_rows = ((flags >> 3) & 7) == 0;
    b->rows = fuzz_range(input, 1, MAX_ROWS);
    b->vocab = fuzz_range(input, 1, long_rows ? MAX_VOCAB : 300);
    b->stride = b->vocab + fuzz_range(input, 0, MAX_PAD);
    b->samples = fuzz_range(input, 1, MAX_SAMPLES);

    psm_params_init(&b->params);
    b->params.temperature = decode_temperature(input);
    b->params.top_k = (int32_t)(fuzz_u8(input) < 128 ? 0 : fuzz_range(input, 0, b->vocab + 2));
    b->params.top_p = decode_unit(input, 1);
    b->params.min_p = decode_unit(input, 0);
    b->params.seed = fuzz_u64(input);
    b->params.offset = fuzz_u64(input);
    b->params.num_samples = (int32_t)b->samples;
    if (per_row) {
        uint8_t which = fuzz_u8(input);
        for (int64_t r = 0; r < b->rows; ++r) {
            b->temperature[r] = decode_temperature(input);
            b->top_k[r] = (int32_t)fuzz_range(input, 0, b->vocab + 2);
            b->top_p[r] = decode_unit(input, 1);
            b->min_p[r] = decode_unit(input, 0);
            b->seeds[r] = fuzz_u64(input);
        }
        b->params.temperature_per_row = which & 1 ? b->temperature : NULL;
        b->params.top_k_per_row = which & 2 ? b->top_k : NULL;
        b->params.top_p_per_row = which & 4 ? b->top_p : NULL;
        b->params.min_p_per_row = which & 8 ? b->min_p : NULL;
        b->params.seed_per_row = which & 16 ? b->seeds : NULL;
    }

    size_t element = b->dtype == PSM_DTYPE_F32 ? 4 : 2;
    size_t count = (size_t)((b->rows - 1) * b->stride + b->vocab);
    b->logits = malloc(count * element); /* exact: ASan sees any read past it */
    if (!b->logits)
        abort();
    for (int64_t r = 0; r < b->rows; ++r) {
        for (int64_t i = 0; i < b->stride; ++i) {
            /* Padding holds NaN: the library must never read it. */
            float x = i < b->vocab ? decode_logit(input) : NAN;
            size_t at = (size_t)(r * b->stride + i);
            if (at >= count)
                break;
            float widened = store_logit(b->logits, b->dtype, at, x);
            if (i < b->vocab)
                b->widened[r][i] = widened;
        }
    }
    /* Decoded last, so that an input that ends before it (every seed
     * written before it existed) is a batch without it. */
    b->params.processing = NULL;
    if (fuzz_u8(input) >= 128) {
        decode_processing(input, b);
        process_literally(b);
        b->params.processing = &b->processing;
    }
}

static model_params row_params(const batch *b, int64_t r)
{
    const psm_params *p = &b->params;
    model_params m;
    m.temperature = p->temperature_per_row ? p->temperature_per_row[r] : p->temperature;
    m.top_k = p->top_k_per_row ? p->top_k_per_row[r] : p->top_k;
    m.top_p = p->top_p_per_row ? p->top_p_per_row[r] : p->top_p;
    m.min_p = p->min_p_per_row ? p->min_p_per_row[r] : p->min_p;
    m.seed = p->seed_per_row ? p->seed_per_row[r] : p->seed;
    m.offset = p->offset;
    m.stream = p->seed_per_row ? 0u : (uint32_t)r;
    return m;
}

/* Runs the batch; 0, or -1 when the context's backend does not run logit
 * processing yet (it must then refuse it so, and that is all it can show). */
static int run(psm_context *context, const batch *b, int32_t *tokens, float *logprobs,
               float *probs)
{
    psm_tensor logits = {b->logits, b->dtype, PSM_MEMORY_HOST, b->rows, b->vocab, b->stride};
    psm_output token_out = {tokens, PSM_MEMORY_HOST}, logprob_out = {logprobs, PSM_MEMORY_HOST};
    psm_status status = psm_sample(context, &logits, &b->params, token_out, logprob_out);
    if (status == PSM_ERR_UNSUPPORTED && b->params.processing && context != cpu_context)
        return -1;
    if (status != PSM_OK)
        FAIL("%s psm_sample failed: %s", psm_backend_name(psm_context_backend(context)),
             psm_last_error());
    psm_tensor probs_tensor = {probs, PSM_DTYPE_F32, PSM_MEMORY_HOST, b->rows, b->vocab, 0};
    status = psm_probs(context, &logits, &b->params, &probs_tensor);
    if (status != PSM_OK)
        FAIL("%s psm_probs failed: %s", psm_backend_name(psm_context_backend(context)),
             psm_last_error());
    return 0;
}

static int close_enough(double a, double b, double relative)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs(a - b) <= relative * fmax(fabs(a), fabs(b)) + 1e-37;
}

/* The float64 softmax over the kept tokens of the model row, into q. */
static void restricted_softmax(const float *x, int64_t vocab, float temperature,
                               const model_row *model, double *q)
{
    double top = -INFINITY, total = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        if (model->kept[i] && psm_read_logit(x[i]) > top)
            top = psm_read_logit(x[i]);
    for (int64_t i = 0; i < vocab; ++i) {
        q[i] = model->kept[i] ? exp(((double)psm_read_logit(x[i]) - top) / temperature) : 0.0;
        total += q[i];
    }
    for (int64_t i = 0; i < vocab; ++i)
        q[i] /= total;
}

static double total_variation(const float *p, const double *q, int64_t vocab)
{
    double sum = 0.0;
    for (int64_t i = 0; i < vocab; ++i)
        sum += fabs((double)p[i] - q[i]);
    return sum / 2.0;
}

static uint8_t kept[MAX_VOCAB];
static uint64_t weights[MAX_VOCAB];
static double model_probs[MAX_VOCAB], reference_probs[MAX_VOCAB];

static void check_row(const batch *b, int64_t r, const int32_t *tokens, const float *probs)
{
    /* The model and the reference see what processing made of the row. */
    const float *x = b->params.processing ? b->processed[r] : b->widened[r];
    model_params params = row_params(b, r);
    model_row model = {0};
    model.kept = kept;
    model.weight = weights;
    model.prob = model_probs;
    model_evaluate(x, b->vocab, &params, &model);
    const float *row_probs = probs + r * b->vocab;

    for (int64_t j = 0; j < b->samples; ++j) {
        int64_t expected = model_draw(&model, b->vocab, &params, (uint32_t)j);
        if (tokens[r * b->samples + j] != expected)
            FAIL("row %lld sample %lld: cpu token %d, contract model %lld (T=%g k=%d p=%g "
                 "min_p=%g vocab=%lld dtype=%d)",
                 (long long)r, (long long)j, tokens[r * b->samples + j], (long long)expected,
                 (double)params.temperature, params.top_k, (double)params.top_p,
                 (double)params.min_p, (long long)b->vocab, (int)b->dtype);
    }
    for (int64_t i = 0; i < b->vocab; ++i) {
        double m = model.prob[i];
        float c = row_probs[i];
        if ((m == 0.0) != (c == 0.0) || !close_enough(c, m, PROBS_RELATIVE))
            FAIL("row %lld token %lld: cpu prob %.9g, contract model %.9g (kept %d, weight "
                 "%llu)",
                 (long long)r, (long long)i, (double)c, m, model.kept[i],
                 (unsigned long long)model.weight[i]);
    }

    /* Against the float64 reference. */
    psm_ref_params ref = {params.temperature, params.top_k, params.top_p, params.min_p};
    int good = psm_ref_distribution(x, b->vocab, &ref, reference_probs);
    if (good < 0)
        FAIL("row %lld: the reference could not allocate its working memory", (long long)r);
    if (good != (model.kind != MODEL_BAD))
        FAIL("row %lld: the reference calls the row %s, the contract model %s", (long long)r,
             good ? "good" : "bad", model.kind == MODEL_BAD ? "bad" : "good");
    if (!good)
        return;
    if (model.kind == MODEL_GREEDY) {
        int64_t argmax = psm_ref_argmax(x, b->vocab);
        if (argmax != model.greedy_token || tokens[r * b->samples] != argmax)
            FAIL("row %lld: greedy token %d, reference argmax %lld", (long long)r,
                 tokens[r * b->samples], (long long)argmax);
        return;
    }
    int rank_only = !(params.top_p < 1.0f) && !(params.min_p > 0.0f);
    if (rank_only) {
        for (int64_t i = 0; i < b->vocab; ++i)
            if ((reference_probs[i] > 0.0) && !model.kept[i])
                FAIL("row %lld token %lld: kept by the reference (%.9g), not by the contract",
                     (long long)r, (long long)i, reference_probs[i]);
    } else {
        restricted_softmax(x, b->vocab, params.temperature, &model, reference_probs);
    }
    double distance = total_variation(row_probs, reference_probs, b->vocab);
    if (!(distance <= TV_BOUND))
        FAIL("row %lld: total variation %.3g from the float64 reference (T=%g k=%d p=%g "
             "min_p=%g vocab=%lld)",
             (long long)r, distance, (double)params.temperature, params.top_k,
             (double)params.top_p, (double)params.min_p, (long long)b->vocab);
}

/* ---- psm_verify against section 7 written out (contract_model.c) ---------- */

#define VERIFY_MAX_REQUESTS 3
#define VERIFY_MAX_NODES 12
#define VERIFY_MAX_VOCAB 64
#define VERIFY_MAX_ROWS (VERIFY_MAX_REQUESTS * (VERIFY_MAX_NODES + 1))
#define VERIFY_SENTINEL 0x5a5a5a5a

/* A verification logit: decode_logit's values, with NaN and +inf only in
 * rows meant to be bad (most requests should reach the walk). */
static float decode_verify_logit(fuzz_input *input, int bad_row)
{
    float x = decode_logit(input);
    if (!bad_row && (isnan(x) || x == INFINITY))
        return 0.0f;
    return x;
}

/* Valid parameters for a verification row (the POLYSAMPLE order, the only
 * one the model has). */
static void decode_verify_row_params(fuzz_input *input, int64_t vocab, model_params *m)
{
    m->temperature = decode_temperature(input);
    m->top_k = (int32_t)(fuzz_u8(input) < 128 ? 0 : fuzz_range(input, 0, vocab + 1));
    m->top_p = decode_unit(input, 1);
    m->min_p = decode_unit(input, 0);
}

typedef struct verify_case {
    int64_t requests, vocab, stride;
    int32_t nodes;
    psm_dtype dtype, draft_dtype;
    model_draft_kind draft_kind;
    void *target;                                   /* rows x stride of dtype */
    float target_widened[VERIFY_MAX_ROWS * VERIFY_MAX_VOCAB]; /* rows of vocab, packed */
    void *draft;                                    /* requests x k rows of vocab */
    float draft_widened[VERIFY_MAX_ROWS * VERIFY_MAX_VOCAB];  /* rows of vocab, packed */
    int32_t tokens[VERIFY_MAX_ROWS], parents[VERIFY_MAX_ROWS];
    int tree;
    psm_params target_params, draft_params;
    float temperature[VERIFY_MAX_REQUESTS];
    int32_t top_k[VERIFY_MAX_REQUESTS];
    uint64_t seeds[VERIFY_MAX_REQUESTS];
} verify_case;

static verify_case verification;

static model_params verify_target_params(const verify_case *v, int64_t r)
{
    const psm_params *p = &v->target_params;
    model_params m = {p->temperature_per_row ? p->temperature_per_row[r] : p->temperature,
                      p->top_k_per_row ? p->top_k_per_row[r] : p->top_k,
                      p->top_p, p->min_p,
                      p->seed_per_row ? p->seed_per_row[r] : p->seed, p->offset,
                      p->seed_per_row ? 0u : (uint32_t)r};
    return m;
}

static model_params verify_draft_params(const verify_case *v)
{
    const psm_params *p = &v->draft_params;
    model_params m = {p->temperature, p->top_k, p->top_p, p->min_p, 0, 0, 0};
    return m;
}

static void decode_verification(fuzz_input *input, verify_case *v)
{
    uint8_t flags = fuzz_u8(input);
    v->dtype = (psm_dtype)(flags % 3);
    v->draft_dtype = (psm_dtype)(flags / 3 % 3);
    v->draft_kind = (model_draft_kind)(flags / 9 % 3);
    v->tree = flags / 27 % 2;
    v->requests = fuzz_range(input, 1, VERIFY_MAX_REQUESTS);
    v->nodes = (int32_t)(fuzz_u8(input) < 224 ? fuzz_range(input, 1, 4)
                                              : fuzz_range(input, 1, VERIFY_MAX_NODES));
    v->vocab = fuzz_range(input, 1, VERIFY_MAX_VOCAB);
    v->stride = v->vocab + fuzz_range(input, 0, MAX_PAD);
    const int64_t width = (int64_t)v->nodes + 1, rows = v->requests * width;

    psm_params_init(&v->target_params);
    model_params scalar;
    decode_verify_row_params(input, v->vocab, &scalar);
    v->target_params.temperature = scalar.temperature;
    v->target_params.top_k = scalar.top_k;
    v->target_params.top_p = scalar.top_p;
    v->target_params.min_p = scalar.min_p;
    v->target_params.seed = fuzz_u64(input);
    v->target_params.offset = fuzz_u64(input);
    uint8_t per_request = fuzz_u8(input);
    for (int64_t r = 0; r < v->requests; ++r) {
        v->temperature[r] = decode_temperature(input);
        v->top_k[r] = (int32_t)fuzz_range(input, 0, v->vocab + 1);
        v->seeds[r] = fuzz_u64(input);
    }
    v->target_params.temperature_per_row = per_request & 1 ? v->temperature : NULL;
    v->target_params.top_k_per_row = per_request & 2 ? v->top_k : NULL;
    v->target_params.seed_per_row = per_request & 4 ? v->seeds : NULL;

    size_t count = (size_t)((rows - 1) * v->stride + v->vocab);
    v->target = malloc(count * (v->dtype == PSM_DTYPE_F32 ? 4 : 2)); /* exact */
    if (!v->target)
        abort();
    for (int64_t row = 0; row < rows; ++row) {
        int bad_row = fuzz_u8(input) >= 244;
        for (int64_t i = 0; i < v->stride && (size_t)(row * v->stride + i) < count; ++i) {
            float x = i < v->vocab ? decode_verify_logit(input, bad_row) : NAN;
            float widened = store_logit(v->target, v->dtype, (size_t)(row * v->stride + i), x);
            if (i < v->vocab)
                v->target_widened[row * v->vocab + i] = widened;
        }
    }

    for (int64_t at = 0; at < v->requests * v->nodes; ++at)
        v->parents[at] = v->tree ? (int32_t)fuzz_range(input, 0, at % v->nodes) : (int32_t)(at % v->nodes);

    /* Draft rows, then each node's token: mostly drawn from its draft
     * distribution with the input's bits (a real draft's token), else any. */
    psm_params_init(&v->draft_params);
    decode_verify_row_params(input, v->vocab, &scalar);
    v->draft_params.temperature = scalar.temperature;
    v->draft_params.top_k = scalar.top_k;
    v->draft_params.top_p = scalar.top_p;
    v->draft_params.min_p = scalar.min_p;
    const int64_t draft_rows = v->requests * v->nodes;
    const psm_dtype draft_dtype = v->draft_kind == MODEL_DRAFT_PROBS ? PSM_DTYPE_F32 : v->draft_dtype;
    v->draft = malloc((size_t)(draft_rows * v->vocab) * (draft_dtype == PSM_DTYPE_F32 ? 4 : 2));
    if (!v->draft)
        abort();
    const model_params draft_model = verify_draft_params(v);
    uint64_t q[VERIFY_MAX_VOCAB], q_total;
    for (int64_t at = 0; at < draft_rows; ++at) {
        int bad_row = fuzz_u8(input) >= 250;
        for (int64_t i = 0; i < v->vocab && v->draft_kind != MODEL_DRAFT_POINT_MASS; ++i) {
            float x;
            if (v->draft_kind == MODEL_DRAFT_PROBS) {
                uint8_t how = fuzz_u8(input);
                x = how < 64 ? 0.0f : how < 250 ? (float)fuzz_u8(input) / 255.0f : 0x1p-41f;
            } else {
                x = decode_verify_logit(input, bad_row);
            }
            v->draft_widened[at * v->vocab + i] = store_logit(v->draft, draft_dtype, (size_t)(at * v->vocab + i), x);
        }
        int have_weights = 0;
        if (v->draft_kind == MODEL_DRAFT_LOGITS)
            have_weights = model_distribution(v->draft_widened + at * v->vocab, v->vocab, &draft_model, q, &q_total);
        else if (v->draft_kind == MODEL_DRAFT_PROBS) {
            q_total = 0;
            for (int64_t i = 0; i < v->vocab; ++i) {
                q[i] = (uint64_t)ldexp((double)v->draft_widened[at * v->vocab + i], psm_weight_bits(v->vocab));
                q_total += q[i];
            }
            have_weights = q_total > 0;
        }
        uint8_t how = fuzz_u8(input);
        if (have_weights && how < 224) {
            uint64_t pick = fuzz_u64(input) % q_total, running = 0;
            for (int64_t i = 0; i < v->vocab; ++i) {
                running += q[i];
                if (running > pick) {
                    v->tokens[at] = (int32_t)i;
                    break;
                }
            }
        } else {
            v->tokens[at] = (int32_t)fuzz_range(input, 0, v->vocab - 1);
        }
    }
}

static void check_verification(fuzz_input *input)
{
    verify_case *v = &verification;
    decode_verification(input, v);
    const int64_t width = (int64_t)v->nodes + 1, rows = v->requests * width;
    psm_tensor target = {v->target, v->dtype, PSM_MEMORY_HOST, rows, v->vocab, v->stride};
    const psm_dtype draft_dtype = v->draft_kind == MODEL_DRAFT_PROBS ? PSM_DTYPE_F32 : v->draft_dtype;
    psm_tensor draft = {v->draft, draft_dtype, PSM_MEMORY_HOST, v->requests * v->nodes, v->vocab, 0};
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = v->nodes;
    drafts.tokens = v->tokens;
    drafts.parents = v->tree ? v->parents : NULL;
    if (v->draft_kind == MODEL_DRAFT_LOGITS) {
        drafts.draft_logits = &draft;
        drafts.draft_params = &v->draft_params;
    } else if (v->draft_kind == MODEL_DRAFT_PROBS) {
        drafts.draft_probs = &draft;
    }
    static int32_t accepted[VERIFY_MAX_REQUESTS], tokens[VERIFY_MAX_ROWS], path[VERIFY_MAX_ROWS];
    static float logprobs[VERIFY_MAX_ROWS];
    psm_context *contexts_to_run[2] = {cpu_context, opencl_context};
    for (int c = 0; c < 2 && contexts_to_run[c]; ++c) {
        psm_context *context = contexts_to_run[c];
        const char *name = psm_backend_name(psm_context_backend(context));
        memset(accepted, 0x5a, sizeof accepted);
        memset(tokens, 0x5a, sizeof tokens);
        memset(path, 0x5a, sizeof path);
        memset(logprobs, 0x5a, sizeof logprobs);
        psm_verification outputs = {{accepted, PSM_MEMORY_HOST}, {tokens, PSM_MEMORY_HOST},
                                    {path, PSM_MEMORY_HOST}, {logprobs, PSM_MEMORY_HOST}};
        psm_status status = psm_verify(context, &target, &v->target_params, &drafts, &outputs);
        int untouched = 1;
        for (int64_t i = 0; i < rows; ++i) {
            uint32_t bits;
            memcpy(&bits, &logprobs[i], sizeof bits);
            untouched &= tokens[i] == VERIFY_SENTINEL && path[i] == VERIFY_SENTINEL &&
                         bits == VERIFY_SENTINEL && (i >= v->requests || accepted[i] == VERIFY_SENTINEL);
        }
        if (status == PSM_ERR_UNSUPPORTED && context != cpu_context) {
            if (!untouched)
                FAIL("%s refused psm_verify but wrote an output", name);
            continue;
        }
        model_verify_request request = {.vocab = v->vocab,
                                        .nodes = v->nodes,
                                        .draft_kind = v->draft_kind,
                                        .draft_params = verify_draft_params(v)};
        int drafts_invalid = 0;
        model_verify_result results[VERIFY_MAX_REQUESTS];
        for (int64_t r = 0; r < v->requests; ++r) {
            request.target = v->target_widened + r * width * v->vocab;
            request.target_params = verify_target_params(v, r);
            request.tokens = v->tokens + r * v->nodes;
            request.parents = v->tree ? v->parents + r * v->nodes : NULL;
            request.draft = v->draft_widened + r * v->nodes * v->vocab;
            model_verify(&request, &results[r]);
            drafts_invalid |= results[r].drafts_invalid;
        }
        if (drafts_invalid) {
            if (status != PSM_ERR_INVALID_PARAMETER || !untouched)
                FAIL("%s psm_verify: a draft node has draft weight 0 or a bad row, but the call "
                     "gave %s (outputs %s): %s", name, psm_status_string(status),
                     untouched ? "untouched" : "written", psm_last_error());
            continue;
        }
        if (status != PSM_OK)
            FAIL("%s psm_verify failed: %s", name, psm_last_error());
        for (int64_t r = 0; r < v->requests; ++r) {
            const model_verify_result *m = &results[r];
            if (!m->bad && m->tokens[m->accepted] < 0)
                FAIL("request %lld: the model's residual summed to 0 (SAMPLING.md section 7 "
                     "says it cannot)", (long long)r);
            if (accepted[r] != m->accepted)
                FAIL("%s request %lld: accepted %d, the section 7 model %d (k=%d tree=%d draft "
                     "kind %d vocab=%lld)", name, (long long)r, accepted[r], m->accepted,
                     (int)v->nodes, v->tree, (int)v->draft_kind, (long long)v->vocab);
            for (int64_t j = 0; j < width; ++j) {
                const int64_t at = r * width + j;
                if (tokens[at] != m->tokens[j] || path[at] != m->path[j])
                    FAIL("%s request %lld position %lld: token %d at node %d, the section 7 model "
                         "token %d at node %d", name, (long long)r, (long long)j, tokens[at],
                         path[at], m->tokens[j], m->path[j]);
                if (!close_enough(logprobs[at], m->logprobs[j], PROBS_RELATIVE))
                    FAIL("%s request %lld position %lld: logprob %.9g, the section 7 model %.9g",
                         name, (long long)r, (long long)j, (double)logprobs[at], m->logprobs[j]);
            }
        }
    }
    free(v->target);
    free(v->draft);
}

static int32_t cpu_tokens[MAX_ROWS * MAX_SAMPLES], gpu_tokens[MAX_ROWS * MAX_SAMPLES];
static float cpu_logprobs[MAX_ROWS * MAX_SAMPLES], gpu_logprobs[MAX_ROWS * MAX_SAMPLES];
static float cpu_probs[MAX_ROWS * MAX_VOCAB], gpu_probs[MAX_ROWS * MAX_VOCAB];

/* ---- sharded sampling (docs/SAMPLING.md section 8) ------------------------ */

#define MAX_SHARDS 8

/* The batch split by vocabulary into 1-8 shards at cuts drawn from a hash of
 * the whole input (so that the bytes the batch and the verification read
 * keep their meaning), shard indices in a random order; every rank's tokens
 * and logprobs must equal the unsharded CPU call's bit for bit. A batch with
 * logit processing must be refused (PSM_ERR_UNSUPPORTED) with nothing
 * written. */
static void check_sharded(const batch *b, const uint8_t *data, size_t size)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < size; ++i)
        h = (h ^ data[i]) * 1099511628211ull;
    const int wanted = 1 + (int)(h % MAX_SHARDS);
    int64_t cuts[MAX_SHARDS + 1];
    int count = 0;
    cuts[count++] = 0;
    for (int k = 1; k < wanted && b->vocab > 1; ++k) {
        h = h * 6364136223846793005ull + 1442695040888963407ull;
        const int64_t cut = 1 + (int64_t)((h >> 33) % (uint64_t)(b->vocab - 1));
        int seen = 0;
        for (int j = 0; j < count; ++j)
            seen |= cuts[j] == cut;
        if (!seen)
            cuts[count++] = cut;
    }
    for (int a = 1; a < count; ++a)
        for (int j = a; j > 0 && cuts[j] < cuts[j - 1]; --j) {
            const int64_t t = cuts[j];
            cuts[j] = cuts[j - 1];
            cuts[j - 1] = t;
        }
    cuts[count] = b->vocab;
    int index[MAX_SHARDS];
    for (int k = 0; k < count; ++k)
        index[k] = k;
    for (int k = count - 1; k > 0; --k) {
        h = h * 6364136223846793005ull + 1442695040888963407ull;
        const int j = (int)((h >> 33) % (uint64_t)(k + 1));
        const int t = index[k];
        index[k] = index[j];
        index[j] = t;
    }

    static int32_t tokens[MAX_SHARDS][MAX_ROWS * MAX_SAMPLES];
    static float logprobs[MAX_SHARDS][MAX_ROWS * MAX_SAMPLES];
    psm_sharded *calls[MAX_SHARDS] = {0};
    const size_t element = b->dtype == PSM_DTYPE_F32 ? 4 : 2;
    const size_t outputs = (size_t)(b->rows * b->samples);
    for (int k = 0; k < count; ++k) {
        const int rank = index[k];
        psm_tensor shard_logits = {(char *)b->logits + (size_t)cuts[k] * element, b->dtype,
                                   PSM_MEMORY_HOST, b->rows, cuts[k + 1] - cuts[k], b->stride};
        const psm_shard shard = {cuts[k], b->vocab, rank, count};
        for (size_t i = 0; i < outputs; ++i)
            tokens[rank][i] = -7;
        const psm_status status = psm_sharded_begin(
            cpu_context, &shard_logits, &shard, &b->params, (psm_output){tokens[rank], PSM_MEMORY_HOST},
            (psm_output){logprobs[rank], PSM_MEMORY_HOST}, &calls[rank]);
        /* Processing with something to do (penalties alone, without a
         * history or prompt, change nothing and run). */
        const psm_logit_processing *p = b->params.processing;
        if (p && (p->allowed_mask || p->bias_offsets || p->history_offsets || p->prompt_offsets)) {
            if (status != PSM_ERR_UNSUPPORTED || calls[rank] || tokens[rank][0] != -7)
                FAIL("sharded: a batch with processing gave %s (%s), not a refusal",
                     psm_status_string(status), psm_last_error());
            return;
        }
        if (status != PSM_OK)
            FAIL("sharded: begin on rank %d of %d failed: %s", rank, count, psm_last_error());
    }
    static unsigned char gathered[MAX_SHARDS * (32 + MAX_ROWS * 4096 + 64 * MAX_ROWS)];
    size_t gathered_bytes = 0;
    for (int round = 0;; ++round) {
        const void *send[MAX_SHARDS];
        size_t bytes[MAX_SHARDS];
        for (int rank = 0; rank < count; ++rank)
            if (psm_sharded_next(calls[rank], round ? gathered : NULL, gathered_bytes, &send[rank],
                                 &bytes[rank]) != PSM_OK)
                FAIL("sharded: round %d on rank %d failed: %s", round, rank, psm_last_error());
        for (int rank = 1; rank < count; ++rank)
            if (bytes[rank] != bytes[0])
                FAIL("sharded: round %d: rank %d sends %zu bytes, rank 0 %zu", round, rank,
                     bytes[rank], bytes[0]);
        if (bytes[0] == 0)
            break;
        if (round > 20 || (size_t)count * bytes[0] > sizeof gathered)
            FAIL("sharded: round %d of %zu bytes a rank", round, bytes[0]);
        for (int rank = 0; rank < count; ++rank)
            memcpy(gathered + (size_t)rank * bytes[0], send[rank], bytes[0]);
        gathered_bytes = (size_t)count * bytes[0];
    }
    for (int rank = 0; rank < count; ++rank) {
        psm_sharded_end(calls[rank]);
        for (size_t i = 0; i < outputs; ++i)
            if (tokens[rank][i] != cpu_tokens[i] ||
                memcmp(&logprobs[rank][i], &cpu_logprobs[i], sizeof(float)) != 0)
                FAIL("sharded (%d shards): rank %d, row %lld sample %lld: token %d logprob %.9g, "
                     "unsharded %d %.9g",
                     count, rank, (long long)(i / (size_t)b->samples),
                     (long long)(i % (size_t)b->samples), tokens[rank][i],
                     (double)logprobs[rank][i], cpu_tokens[i], (double)cpu_logprobs[i]);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input input = fuzz_input_make(data, size);
    batch *b = &current;
    decode_batch(&input, b);
    run(cpu_context, b, cpu_tokens, cpu_logprobs, cpu_probs);
    for (int64_t r = 0; r < b->rows; ++r)
        check_row(b, r, cpu_tokens, cpu_probs);
    if (opencl_context && run(opencl_context, b, gpu_tokens, gpu_logprobs, gpu_probs) == 0) {
        size_t outputs = (size_t)(b->rows * b->samples);
        for (size_t i = 0; i < outputs; ++i)
            if (gpu_tokens[i] != cpu_tokens[i])
                FAIL("row %lld sample %lld: opencl token %d, cpu %d",
                     (long long)(i / (size_t)b->samples), (long long)(i % (size_t)b->samples),
                     gpu_tokens[i], cpu_tokens[i]);
        for (int64_t i = 0; i < b->rows * b->vocab; ++i)
            if (!close_enough(gpu_probs[i], cpu_probs[i], PROBS_RELATIVE))
                FAIL("row %lld token %lld: opencl prob %.9g, cpu %.9g",
                     (long long)(i / b->vocab), (long long)(i % b->vocab), (double)gpu_probs[i],
                     (double)cpu_probs[i]);
    }
    check_sharded(b, data, size);
    free(b->logits);
    /* Decoded after the batch, so that an input that ends before it (every
     * seed written before it existed) makes no verification. */
    if (fuzz_u8(&input) >= 128)
        check_verification(&input);
    return 0;
}
