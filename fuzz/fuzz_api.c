/*
 * fuzz_api.c: the public API's argument and parameter validation, on the
 * CPU backend, with whatever the input says: tensors of any shape, stride,
 * dtype and memory value (NULL data included), every float parameter from
 * raw bits (NaN, infinities, negatives, denormals), per-row arrays, outputs
 * (NULL, unknown memory values), NULL context, logits, params and probs,
 * reserve with any sizes, and context options; logit processing with any
 * penalties, mask word counts, CSR lists (offsets out of order or negative,
 * tokens outside the vocab, NaN and infinite bias values, pieces given
 * without their partners, a history longer than the API allows) and
 * per-row penalty arrays; filter orders, valid and not; psm_verify calls
 * (k of any value, tokens and parents in and out of range, chains and
 * trees, draft logits with parameters, draft probabilities from NaN to
 * above 1, point-mass drafts, target rows with NaN, +inf or nothing but
 * -inf, parameters refused or unsupported there, NULL outputs, checking
 * mode); sharded calls (fuzz_sharded: any shard, exchanges of any bytes).
 *
 * Every call must:
 * - succeed exactly when the arguments are valid by the rules of
 *   include/polysample.h (mirrored below, independently of core/validate.c);
 * - on failure, leave a message and write nothing (outputs hold a canary);
 * - on success, write tokens in [-1, vocab) and leave the padding of probs
 *   rows alone; with an allowed-token mask, draw no token and give no
 *   probability (other than a bad row's NaN) to a token it does not allow;
 * - psm_verify, on success (docs/SAMPLING.md section 7): a bad request is
 *   -1 everywhere (NaN logprobs); a good one accepts 0 .. the tree's depth
 *   drafts, which are its path's draft tokens (path_nodes: each node's
 *   parent is the one before), and every emitted token can be drawn at its
 *   node (a valid logit; a greedy row's first argmax; within top-k), with
 *   a finite logprob <= 0; -1, -1 and NaN after the last one;
 * - never read outside the buffers it is given: every buffer is allocated
 *   to its exact size (AddressSanitizer), and a tensor whose shape is
 *   invalid gets a one-element buffer, which the library must not read.
 */
#include "fuzz_input.h"
#include "half_truncate.h"
#include "polysample.h"
#include "psm_contract.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CANARY 0xa5
/* Inputs whose valid buffers would exceed this many elements are skipped
 * (they test nothing the small ones do not, and cost time). */
#define MAX_ELEMENTS (1 << 16)

#define FAIL(...)                                                                            \
    do {                                                                                     \
        fprintf(stderr, "api: " __VA_ARGS__);                                                \
        fputc('\n', stderr);                                                                 \
        abort();                                                                             \
    } while (0)

static psm_context *contexts[2]; /* check_rows 0 and 1 */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    for (int check = 0; check < 2; ++check) {
        psm_context_options options;
        psm_context_options_init(&options);
        options.backend = PSM_BACKEND_CPU;
        options.cpu_threads = 2;
        options.check_rows = check;
        if (psm_context_create(&options, &contexts[check]) != PSM_OK)
            FAIL("cannot create a CPU context: %s", psm_last_error());
    }
    return 0;
}

static int64_t decode_size(fuzz_input *input, int64_t small_high)
{
    uint8_t how = fuzz_u8(input);
    if (how < 200)
        return fuzz_range(input, -1, small_high);
    if (how < 230)
        return (int64_t)fuzz_u64(input);
    static const int64_t edges[] = {0,         -1,        INT32_MAX,          (int64_t)INT32_MAX + 1,
                                    INT64_MAX, INT64_MIN, INT64_MAX / 8,      ((int64_t)1 << 31) - 2,
                                    (int64_t)1 << 40,     (int64_t)1 << 60};
    return edges[how % (sizeof edges / sizeof edges[0])];
}

/* a + b with two's-complement wrap-around (sizes near the int64 edges are
 * part of what is fuzzed). */
static int64_t wrapping_add(int64_t a, int64_t b)
{
    return (int64_t)((uint64_t)a + (uint64_t)b);
}

static float decode_float(fuzz_input *input)
{
    uint8_t how = fuzz_u8(input);
    static const float table[] = {1.0f, 0.0f, -0.0f, 0.5f, 1e-5f, 1e6f, 1.0000001f, 0.9999999f,
                                  -1.0f, 2.0f, 1e-45f, 1e6f * 1.0000001f};
    if (how < 160)
        return table[how % (sizeof table / sizeof table[0])];
    if (how < 170)
        return NAN;
    if (how < 180)
        return how & 1 ? INFINITY : -INFINITY;
    return fuzz_raw_float(input);
}

static int valid_memory(int memory)
{
    return memory == PSM_MEMORY_HOST || memory == PSM_MEMORY_DEVICE;
}

static int valid_dtype(int dtype)
{
    return dtype >= PSM_DTYPE_F32 && dtype <= PSM_DTYPE_BF16;
}

static int row_params_valid(float temperature, int32_t top_k, float top_p, float min_p)
{
    return temperature >= 0.0f && temperature <= 1e6f && top_k >= 0 && top_p > 0.0f &&
           top_p <= 1.0f && min_p >= 0.0f && min_p <= 1.0f;
}

static int32_t decode_filter_order(fuzz_input *input)
{
    static const int32_t odd[] = {-1, PSM_FILTER_ORDER_COUNT, INT32_MIN, INT32_MAX};
    uint8_t how = fuzz_u8(input);
    if (how < 128)
        return PSM_FILTER_ORDER_POLYSAMPLE;
    if (how < 236)
        return (int32_t)fuzz_range(input, 1, PSM_FILTER_ORDER_COUNT - 1);
    if (how < 252)
        return odd[how % 4];
    return (int32_t)fuzz_u32(input);
}

static int filter_order_valid(int32_t order)
{
    return order >= 0 && order < PSM_FILTER_ORDER_COUNT;
}

/* A tensor's shape by the API's rules; *elements the span it covers. */
static int shape_valid(int64_t rows, int64_t vocab, int64_t stride, int64_t *elements)
{
    if (rows < 1 || vocab < 1 || vocab > INT32_MAX)
        return 0;
    int64_t effective = stride == 0 ? vocab : stride;
    if (effective < vocab || effective > INT64_MAX / 8 / rows)
        return 0;
    *elements = (rows - 1) * effective + vocab;
    return 1;
}

typedef struct buffer {
    void *data;
    size_t bytes;
} buffer;

static buffer make_buffer(size_t bytes, fuzz_input *input, int fill_from_input)
{
    buffer b = {malloc(bytes ? bytes : 1), bytes ? bytes : 1};
    if (!b.data)
        abort();
    if (fill_from_input)
        fuzz_read(input, b.data, b.bytes);
    else
        memset(b.data, CANARY, b.bytes);
    return b;
}

static int untouched(const buffer *b)
{
    const unsigned char *byte = b->data;
    for (size_t i = 0; i < b->bytes; ++i)
        if (byte[i] != CANARY)
            return 0;
    return 1;
}

/* ---- logit processing ----------------------------------------------------------- */

/* Lists hold at most this many entries, except a history made longer than
 * the API allows. */
#define MAX_LIST_ENTRIES 4096
/* The API's longest history a row (include/polysample.h's rule, restated
 * here rather than taken from the library's headers). A history one or two
 * tokens past it is decoded now and then: it must be refused. One at the
 * limit is not: the library then reads all 2^24 tokens, about 0.4 s a call,
 * which would take most of a run. */
#define HISTORY_LIMIT (1 << 24)

static float decode_penalty(fuzz_input *input, float off)
{
    static const float table[] = {1.5f, 0.5f, -0.5f, 1e-3f, 1e3f, -1e3f, 0.0f, 1.0f,
                                  0x1.0624dcp-10f /* just below 1e-3 */, 1000.0001f,
                                  -1000.0001f, 2.0f, -0.0f, 1e-45f};
    uint8_t how = fuzz_u8(input);
    if (how < 96)
        return off;
    if (how < 220)
        return table[how % (sizeof table / sizeof table[0])];
    if (how < 230)
        return NAN;
    if (how < 240)
        return how & 1 ? INFINITY : -INFINITY;
    return fuzz_raw_float(input);
}

static int penalties_valid(float repetition, float frequency, float presence)
{
    return repetition >= 1e-3f && repetition <= 1e3f && frequency >= -1e3f &&
           frequency <= 1e3f && presence >= -1e3f && presence <= 1e3f;
}

static float decode_bias_value(fuzz_input *input)
{
    uint8_t how = fuzz_u8(input);
    if (how < 200)
        return (float)(int8_t)fuzz_u8(input) * 0.5f;
    if (how < 210)
        return NAN;
    if (how < 220)
        return how & 1 ? INFINITY : -INFINITY;
    if (how < 235)
        return how & 1 ? 3.0e38f : -3.0e38f; /* finite: valid, and may overflow a logit */
    return fuzz_raw_float(input);
}

static int32_t decode_token(fuzz_input *input, int64_t vocab)
{
    static const int32_t edges[] = {-1, INT32_MIN, INT32_MAX, 0};
    uint8_t how = fuzz_u8(input);
    if (how < 240)
        return (int32_t)fuzz_range(input, 0, vocab - 1 < INT32_MAX ? vocab - 1 : INT32_MAX);
    if (how < 248)
        return (int32_t)(vocab <= INT32_MAX ? vocab : INT32_MAX); /* one past the end */
    return edges[how % 4];
}

/* One CSR list family (bias, history or prompt), as the input says, with
 * its pieces given or not (a pointer without its partners is a bad call). */
typedef struct row_lists {
    int64_t *offsets; /* rows + 1 */
    int32_t *tokens;
    float *values;
    int offsets_given, tokens_given, values_given;
    int contents_valid; /* offsets and entries by the API's rules */
} row_lists;

static int decode_lists(fuzz_input *input, int64_t rows, int64_t vocab, int with_values,
                        int64_t max_per_row, row_lists *lists)
{
    memset(lists, 0, sizeof *lists);
    uint8_t pieces = fuzz_u8(input);
    if (pieces < 112)
        return 0; /* absent */
    /* Mostly all pieces, sometimes one missing. */
    lists->offsets_given = !(pieces >= 240 && pieces % 3 == 0);
    lists->tokens_given = !(pieces >= 240 && pieces % 3 == 1);
    lists->values_given = with_values && !(pieces >= 240 && pieces % 3 == 2);
    lists->offsets = malloc((size_t)(rows + 1) * sizeof *lists->offsets);
    if (!lists->offsets)
        abort();
    int valid = 1;
    int64_t largest = 0;
    uint8_t start = fuzz_u8(input);
    lists->offsets[0] = start < 200 ? 0 : start < 240 ? fuzz_range(input, 1, 8) : -fuzz_range(input, 1, 3);
    valid &= lists->offsets[0] >= 0;
    int64_t long_row = -1;
    if (max_per_row && fuzz_u8(input) == 255)
        long_row = fuzz_range(input, 0, rows - 1);
    for (int64_t r = 0; r < rows; ++r) {
        int64_t length;
        uint8_t how = fuzz_u8(input);
        if (r == long_row)
            length = HISTORY_LIMIT + 1 + (how & 1);
        else if (how < 240)
            length = fuzz_range(input, 0, 6);
        else
            length = -fuzz_range(input, 1, 3); /* decreasing */
        lists->offsets[r + 1] = lists->offsets[r] + length;
        valid &= length >= 0 && (!max_per_row || length <= max_per_row);
    }
    for (int64_t r = 0; r <= rows; ++r)
        if (lists->offsets[r] > largest)
            largest = lists->offsets[r];
    /* Entries up to the largest offset exist, so that whatever range a row
     * names is memory the caller gave. */
    if (largest > MAX_LIST_ENTRIES && long_row < 0)
        return -1;
    lists->tokens = long_row >= 0 ? calloc((size_t)largest, sizeof *lists->tokens)
                                  : malloc((size_t)(largest ? largest : 1) * sizeof *lists->tokens);
    lists->values = with_values ? malloc((size_t)(largest ? largest : 1) * sizeof *lists->values)
                                : NULL;
    if (!lists->tokens || (with_values && !lists->values))
        abort();
    for (int64_t e = 0; e < largest && (long_row < 0 || e < MAX_LIST_ENTRIES); ++e) {
        lists->tokens[e] = decode_token(input, vocab);
        if (with_values)
            lists->values[e] = decode_bias_value(input);
    }
    /* Only the entries of rows whose offsets are in order count: the rest
     * are past a refusal. */
    for (int64_t r = 0; r < rows && valid; ++r)
        for (int64_t e = lists->offsets[r]; e < lists->offsets[r + 1]; ++e)
            valid &= lists->tokens[e] >= 0 && lists->tokens[e] < vocab &&
                     (!with_values || isfinite(lists->values[e]));
    lists->contents_valid = valid;
    return 0;
}

static void free_lists(row_lists *lists)
{
    free(lists->offsets);
    free(lists->tokens);
    free(lists->values);
}

typedef struct processing_case {
    psm_logit_processing processing;
    row_lists bias, history, prompt;
    uint32_t *mask;
    int64_t mask_words; /* effective words a row, when the mask is read */
    float *penalties_per_row[3];
    int valid; /* by the API's rules, for a call whose other arguments are valid */
} processing_case;

static void free_processing(processing_case *c)
{
    free_lists(&c->bias);
    free_lists(&c->history);
    free_lists(&c->prompt);
    free(c->mask);
    for (int k = 0; k < 3; ++k)
        free(c->penalties_per_row[k]);
}

/* Decodes a processing struct for rows x vocab (rows: those the arrays may be
 * read for). -1: too large to test (skip the input). */
static int decode_processing(fuzz_input *input, int64_t rows, int64_t vocab, processing_case *c)
{
    memset(c, 0, sizeof *c);
    psm_logit_processing *p = &c->processing;
    psm_logit_processing_init(p);
    p->repetition_penalty = decode_penalty(input, 1.0f);
    p->frequency_penalty = decode_penalty(input, 0.0f);
    p->presence_penalty = decode_penalty(input, 0.0f);
    int valid = penalties_valid(p->repetition_penalty, p->frequency_penalty, p->presence_penalty);

    const int64_t needed = (vocab + 31) / 32;
    uint8_t mask_how = fuzz_u8(input);
    if (mask_how >= 96) {
        static const int64_t odd_words[] = {-1, INT64_MAX, INT64_MIN, (int64_t)1 << 62};
        int64_t words = mask_how < 160   ? 0
                        : mask_how < 210 ? needed + fuzz_range(input, 0, 3)
                        : mask_how < 235 ? needed - fuzz_range(input, 1, 2)
                                         : odd_words[mask_how % 4];
        p->allowed_mask_words = words;
        int words_valid = words == 0 || (words >= needed && words <= INT64_MAX / 8 / rows);
        valid &= words_valid;
        c->mask_words = words == 0 ? needed : words;
        size_t count = words_valid ? (size_t)(rows * c->mask_words) : 1;
        if (words_valid && rows * c->mask_words > MAX_ELEMENTS)
            return -1;
        c->mask = malloc(count * sizeof *c->mask);
        if (!c->mask)
            abort();
        /* Mostly dense bits, sometimes a row allowing nothing. */
        for (size_t w = 0; w < count; ++w) {
            uint8_t how = fuzz_u8(input);
            c->mask[w] = how < 64 ? 0u : how < 128 ? 0xffffffffu : fuzz_u32(input);
        }
        p->allowed_mask = c->mask;
    }

    if (decode_lists(input, rows, vocab, 1, 0, &c->bias) != 0 ||
        decode_lists(input, rows, vocab, 0, HISTORY_LIMIT, &c->history) != 0 ||
        decode_lists(input, rows, vocab, 0, 0, &c->prompt) != 0)
        return -1;
    p->bias_offsets = c->bias.offsets_given ? c->bias.offsets : NULL;
    p->bias_tokens = c->bias.tokens_given ? c->bias.tokens : NULL;
    p->bias_values = c->bias.values_given ? c->bias.values : NULL;
    p->history_offsets = c->history.offsets_given ? c->history.offsets : NULL;
    p->history_tokens = c->history.tokens_given ? c->history.tokens : NULL;
    p->prompt_offsets = c->prompt.offsets_given ? c->prompt.offsets : NULL;
    p->prompt_tokens = c->prompt.tokens_given ? c->prompt.tokens : NULL;
    const row_lists *families[3] = {&c->bias, &c->history, &c->prompt};
    for (int k = 0; k < 3; ++k) {
        const row_lists *lists = families[k];
        int given = lists->offsets_given + lists->tokens_given + (k == 0 ? lists->values_given : 0);
        int all = k == 0 ? 3 : 2;
        /* The pieces go together; only given offsets bring contents. */
        valid &= given == 0 || given == all;
        if (given == all)
            valid &= lists->contents_valid;
    }

    uint8_t per_row = fuzz_u8(input);
    float offs[3] = {1.0f, 0.0f, 0.0f};
    for (int k = 0; k < 3; ++k) {
        if (!(per_row & (1 << k)))
            continue;
        c->penalties_per_row[k] = malloc((size_t)rows * sizeof(float));
        if (!c->penalties_per_row[k])
            abort();
        for (int64_t r = 0; r < rows; ++r)
            c->penalties_per_row[k][r] = decode_penalty(input, offs[k]);
    }
    p->repetition_penalty_per_row = c->penalties_per_row[0];
    p->frequency_penalty_per_row = c->penalties_per_row[1];
    p->presence_penalty_per_row = c->penalties_per_row[2];
    for (int64_t r = 0; r < rows; ++r)
        valid &= penalties_valid(
            c->penalties_per_row[0] ? c->penalties_per_row[0][r] : p->repetition_penalty,
            c->penalties_per_row[1] ? c->penalties_per_row[1][r] : p->frequency_penalty,
            c->penalties_per_row[2] ? c->penalties_per_row[2][r] : p->presence_penalty);
    c->valid = valid;
    return 0;
}

/* A mask's bit for a token of a row (the mask is known to be read). */
static int mask_allows(const processing_case *c, int64_t row, int64_t token)
{
    return (c->mask[row * c->mask_words + token / 32] >> (token % 32)) & 1u;
}

/* Decodes and makes one psm_sample or psm_probs call. */
static void fuzz_call(fuzz_input *input, int probs_mode)
{
    uint8_t flags = fuzz_u8(input);
    psm_context *context = contexts[flags & 1];
    int null_context = (flags >> 1 & 7) == 0;
    int null_logits = (flags >> 4 & 7) == 0;
    int null_params = fuzz_u8(input) < 8;
    processing_case processing;
    memset(&processing, 0, sizeof processing);

    psm_tensor logits;
    logits.rows = decode_size(input, 6);
    logits.vocab = decode_size(input, 200);
    uint8_t stride_kind = fuzz_u8(input);
    logits.row_stride = stride_kind < 128 ? 0
                        : stride_kind < 230 ? wrapping_add(logits.vocab, fuzz_range(input, -2, 3))
                                            : decode_size(input, 400);
    int dtype_raw = fuzz_u8(input) < 240 ? (int)fuzz_range(input, 0, 2) : (int)fuzz_u32(input);
    int memory_raw = fuzz_u8(input) < 240 ? (int)fuzz_range(input, 0, 1) : (int)fuzz_u32(input);
    logits.dtype = (psm_dtype)dtype_raw;
    logits.memory = (psm_memory)memory_raw;
    int64_t logit_elements = 0;
    int logits_valid = shape_valid(logits.rows, logits.vocab, logits.row_stride, &logit_elements) &&
                       valid_dtype(dtype_raw) && valid_memory(memory_raw);
    if (logits_valid && logit_elements > MAX_ELEMENTS)
        return;
    size_t element_bytes = dtype_raw == PSM_DTYPE_F32 ? 4 : 2;
    buffer logit_buffer =
        make_buffer(logits_valid ? (size_t)logit_elements * element_bytes : element_bytes, input, 1);
    int null_data = fuzz_u8(input) < 8;
    logits.data = null_data ? NULL : logit_buffer.data;
    logits_valid = logits_valid && !null_data;
    int64_t rows = logits_valid ? logits.rows : 1; /* rows the arrays may be read for */

    psm_params params;
    psm_params_init(&params);
    uint8_t which = fuzz_u8(input);
    if (which & 1)
        params.temperature = decode_float(input);
    if (which & 2)
        params.top_k = fuzz_u8(input) < 200 ? (int32_t)fuzz_range(input, -2, 300)
                                            : (int32_t)fuzz_u32(input);
    if (which & 4)
        params.top_p = decode_float(input);
    if (which & 8)
        params.min_p = decode_float(input);
    params.seed = fuzz_u64(input);
    params.offset = fuzz_u64(input);
    params.num_samples = fuzz_u8(input) < 220 ? (int32_t)fuzz_range(input, -1, 4)
                                              : (int32_t)fuzz_u32(input);
    int params_valid = row_params_valid(params.temperature, params.top_k, params.top_p,
                                        params.min_p);
    int samples_valid = params.num_samples >= 1 &&
                        (!logits_valid || params.num_samples <= INT64_MAX / 8 / logits.rows);

    uint8_t arrays = fuzz_u8(input);
    float *temperature_row = NULL, *top_p_row = NULL, *min_p_row = NULL;
    int32_t *top_k_row = NULL;
    uint64_t *seed_row = NULL;
    if (arrays & 1) {
        temperature_row = malloc((size_t)rows * sizeof *temperature_row);
        for (int64_t r = 0; r < rows; ++r)
            temperature_row[r] = decode_float(input);
    }
    if (arrays & 2) {
        top_k_row = malloc((size_t)rows * sizeof *top_k_row);
        for (int64_t r = 0; r < rows; ++r)
            top_k_row[r] = (int32_t)fuzz_range(input, -1, 300);
    }
    if (arrays & 4) {
        top_p_row = malloc((size_t)rows * sizeof *top_p_row);
        for (int64_t r = 0; r < rows; ++r)
            top_p_row[r] = decode_float(input);
    }
    if (arrays & 8) {
        min_p_row = malloc((size_t)rows * sizeof *min_p_row);
        for (int64_t r = 0; r < rows; ++r)
            min_p_row[r] = decode_float(input);
    }
    if (arrays & 16) {
        seed_row = malloc((size_t)rows * sizeof *seed_row);
        for (int64_t r = 0; r < rows; ++r)
            seed_row[r] = fuzz_u64(input);
    }
    params.temperature_per_row = temperature_row;
    params.top_k_per_row = top_k_row;
    params.top_p_per_row = top_p_row;
    params.min_p_per_row = min_p_row;
    params.seed_per_row = seed_row;
    int arrays_valid = 1;
    for (int64_t r = 0; r < rows && logits_valid; ++r)
        arrays_valid &= row_params_valid(temperature_row ? temperature_row[r] : params.temperature,
                                         top_k_row ? top_k_row[r] : params.top_k,
                                         top_p_row ? top_p_row[r] : params.top_p,
                                         min_p_row ? min_p_row[r] : params.min_p);

    int call_valid = !null_context && !null_logits && !null_params && logits_valid &&
                     params_valid && samples_valid && arrays_valid;
    buffer tokens = {0}, logprobs = {0}, probs = {0};
    psm_output token_out = {NULL, PSM_MEMORY_HOST}, logprob_out = {NULL, PSM_MEMORY_HOST};
    psm_tensor probs_tensor = {0};
    int null_probs = 0;
    int64_t probs_stride = 0;
    if (!probs_mode) {
        int64_t outputs = call_valid ? logits.rows * params.num_samples : 1;
        if (outputs > MAX_ELEMENTS)
            goto done;
        tokens = make_buffer((size_t)outputs * sizeof(int32_t), input, 0);
        logprobs = make_buffer((size_t)outputs * sizeof(float), input, 0);
        uint8_t out_flags = fuzz_u8(input);
        token_out.data = (out_flags & 7) == 0 ? NULL : tokens.data;
        token_out.memory = (psm_memory)((out_flags >> 3 & 7) == 0 ? (int)fuzz_u32(input)
                                                                 : (out_flags >> 6 & 1));
        logprob_out.data = (out_flags & 0x80) ? NULL : logprobs.data;
        logprob_out.memory =
            (psm_memory)(fuzz_u8(input) < 16 ? (int)fuzz_u32(input) : (int)fuzz_range(input, 0, 1));
        call_valid = call_valid && token_out.data && valid_memory((int)token_out.memory) &&
                     (!logprob_out.data || valid_memory((int)logprob_out.memory));
    } else {
        uint8_t probs_flags = fuzz_u8(input);
        null_probs = (probs_flags & 15) == 0;
        probs_tensor.rows = (probs_flags & 0x10) ? decode_size(input, 6) : logits.rows;
        probs_tensor.vocab = (probs_flags & 0x20) ? decode_size(input, 200) : logits.vocab;
        probs_tensor.row_stride = (probs_flags & 0x40)
                                      ? wrapping_add(probs_tensor.vocab, fuzz_range(input, -1, 3))
                                      : 0;
        probs_tensor.dtype = (psm_dtype)((probs_flags & 0x80) ? (int)fuzz_range(input, 0, 4) : 0);
        probs_tensor.memory = (psm_memory)(fuzz_u8(input) < 16 ? (int)fuzz_u32(input)
                                                               : (int)fuzz_range(input, 0, 1));
        int64_t probs_elements = 0;
        int probs_valid = shape_valid(probs_tensor.rows, probs_tensor.vocab,
                                      probs_tensor.row_stride, &probs_elements) &&
                          probs_tensor.dtype == PSM_DTYPE_F32 &&
                          valid_memory((int)probs_tensor.memory) && logits_valid &&
                          probs_tensor.rows == logits.rows && probs_tensor.vocab == logits.vocab;
        if (probs_valid && probs_elements > MAX_ELEMENTS)
            goto done;
        probs = make_buffer(probs_valid ? (size_t)probs_elements * sizeof(float) : sizeof(float),
                            input, 0);
        probs_tensor.data = fuzz_u8(input) < 8 ? NULL : probs.data;
        probs_valid = probs_valid && probs_tensor.data;
        probs_stride = probs_tensor.row_stride ? probs_tensor.row_stride : probs_tensor.vocab;
        call_valid = call_valid && !null_probs && probs_valid;
    }

    /* Processing is decoded last, so that an input that ends before it (every
     * seed written before it existed) makes a call without it. */
    if (fuzz_u8(input) >= 128) {
        if (decode_processing(input, rows, logits_valid ? logits.vocab : 1, &processing) != 0)
            goto done;
        params.processing = &processing.processing;
        call_valid = call_valid && processing.valid;
    }
    /* The filter order, last for the same reason. */
    params.filter_order = decode_filter_order(input);
    call_valid = call_valid && filter_order_valid(params.filter_order);

    psm_status status;
    if (probs_mode)
        status = psm_probs(null_context ? NULL : context, null_logits ? NULL : &logits,
                           null_params ? NULL : &params, null_probs ? NULL : &probs_tensor);
    else
        status = psm_sample(null_context ? NULL : context, null_logits ? NULL : &logits,
                            null_params ? NULL : &params, token_out, logprob_out);
    const char *message = psm_last_error();
    int checking = context == contexts[1];
    if (status == PSM_OK) {
        if (!call_valid)
            FAIL("%s accepted arguments that are not valid", probs_mode ? "psm_probs" : "psm_sample");
        if (message[0] != '\0')
            FAIL("success left a message: %s", message);
        if (!probs_mode) {
            const int32_t *drawn = tokens.data;
            for (int64_t i = 0; i < logits.rows * params.num_samples; ++i)
                if (drawn[i] < -1 || drawn[i] >= logits.vocab)
                    FAIL("token %d out of [-1, %lld)", drawn[i], (long long)logits.vocab);
            if (checking)
                for (int64_t i = 0; i < logits.rows * params.num_samples; ++i)
                    if (drawn[i] == -1)
                        FAIL("checking mode gave a row token -1 instead of failing");
            if (params.processing && processing.mask)
                for (int64_t i = 0; i < logits.rows * params.num_samples; ++i)
                    if (drawn[i] >= 0 && !mask_allows(&processing, i / params.num_samples, drawn[i]))
                        FAIL("row %lld drew token %d, which its mask does not allow",
                             (long long)(i / params.num_samples), drawn[i]);
        } else {
            const unsigned char *bytes = probs.data;
            for (int64_t r = 0; r + 1 < probs_tensor.rows; ++r)
                for (int64_t i = probs_tensor.vocab; i < probs_stride; ++i)
                    for (size_t k = 0; k < sizeof(float); ++k)
                        if (bytes[(size_t)(r * probs_stride + i) * sizeof(float) + k] != CANARY)
                            FAIL("psm_probs wrote the padding of row %lld", (long long)r);
            const float *values = probs.data;
            for (int64_t r = 0; params.processing && processing.mask && r < probs_tensor.rows; ++r)
                for (int64_t i = 0; i < probs_tensor.vocab; ++i)
                    if (!mask_allows(&processing, r, i) && values[r * probs_stride + i] != 0.0f &&
                        !isnan(values[r * probs_stride + i]))
                        FAIL("row %lld: token %lld, which its mask does not allow, has "
                             "probability %g", (long long)r, (long long)i,
                             (double)values[r * probs_stride + i]);
        }
    } else {
        if (message[0] == '\0')
            FAIL("%s failed (%s) without a message", probs_mode ? "psm_probs" : "psm_sample",
                 psm_status_string(status));
        if (call_valid && !(checking && status == PSM_ERR_BAD_ROW))
            FAIL("valid arguments refused with %s: %s", psm_status_string(status), message);
        if ((tokens.data && !untouched(&tokens)) || (logprobs.data && !untouched(&logprobs)) ||
            (probs.data && !untouched(&probs)))
            FAIL("a failing call (%s: %s) wrote an output", psm_status_string(status), message);
    }
done:
    free(tokens.data);
    free(logprobs.data);
    free(probs.data);
    free(temperature_row);
    free(top_k_row);
    free(top_p_row);
    free(min_p_row);
    free(seed_row);
    free(logit_buffer.data);
    free_processing(&processing);
}

static void fuzz_reserve(fuzz_input *input)
{
    int null_context = fuzz_u8(input) < 16;
    int64_t rows = decode_size(input, 8), vocab = decode_size(input, 5000),
            samples = decode_size(input, 8);
    psm_status status = psm_context_reserve(null_context ? NULL : contexts[0], rows, vocab, samples);
    int valid = !null_context && rows >= 1 && vocab >= 1 && vocab <= INT32_MAX && samples >= 1 &&
                vocab <= INT64_MAX / 8 / rows && samples <= INT64_MAX / 8 / rows;
    if (status != PSM_OK && psm_last_error()[0] == '\0')
        FAIL("reserve failed without a message");
    /* The CPU backend's workspace depends on the vocabulary alone (at most
     * ~52 MB a thread), so a valid reserve succeeds. */
    if ((status == PSM_OK) != valid)
        FAIL("reserve(%lld, %lld, %lld) returned %s: %s", (long long)rows, (long long)vocab,
             (long long)samples, psm_status_string(status), psm_last_error());
}

static void fuzz_create(fuzz_input *input)
{
    psm_context_options options;
    psm_context_options_init(&options);
    uint8_t backend = fuzz_u8(input);
    options.backend = (psm_backend)(backend < 200 ? (int)(backend % 4) : (int)fuzz_u32(input));
    if (options.backend == PSM_BACKEND_OPENCL || options.backend == PSM_BACKEND_AUTO)
        options.backend = PSM_BACKEND_CPU; /* kernel compilation is not what this target tests */
    options.device_index = fuzz_u8(input) < 200 ? (int)fuzz_range(input, -2, 2) : (int)fuzz_u32(input);
    options.cpu_threads = fuzz_u8(input) < 200 ? (int)fuzz_range(input, -2, 8) : (int)fuzz_u32(input);
    options.check_rows = (int)fuzz_u32(input);
    int null_out = fuzz_u8(input) < 16;
    psm_context *const canary = (psm_context *)&contexts;
    psm_context *context = canary;
    psm_status status = psm_context_create(&options, null_out ? NULL : &context);
    if (status != PSM_OK) {
        if (psm_last_error()[0] == '\0')
            FAIL("psm_context_create failed without a message");
        if (context != canary)
            FAIL("a failing psm_context_create wrote context_out");
        return;
    }
    if (null_out || options.backend != PSM_BACKEND_CPU || options.cpu_threads < 0 ||
        options.cpu_threads > PSM_MAX_CPU_THREADS)
        FAIL("psm_context_create accepted backend %d, cpu_threads %d, out %s",
             (int)options.backend, options.cpu_threads, null_out ? "NULL" : "set");
    psm_context_destroy(context);
}

/* ---- speculative verification (psm_verify) ----------------------------------- */

/* Draft probabilities are read as floor(q x 2^B); B is 40 for every
 * vocabulary up to 2^23 (docs/SAMPLING.md, sections 3 and 7), which covers
 * every tensor this target makes (MAX_ELEMENTS). */
#define VERIFY_WEIGHT_BITS 40

/* A logit of a verification tensor. Each row has a kind, so that whole rows
 * are bad or masked: mostly small values on a coarse grid (ties), some rows
 * with -inf entries, a NaN, a +inf, nothing but -inf, or raw float bits. */
static float decode_verify_logit(fuzz_input *input, uint8_t row_kind)
{
    uint8_t how = fuzz_u8(input);
    if (row_kind < 150)
        return how < 8 ? -INFINITY : (float)(int8_t)fuzz_u8(input) * 0.25f;
    if (row_kind < 190)
        return how < 96 ? -INFINITY : (float)(int8_t)fuzz_u8(input) * 0.25f;
    if (row_kind < 205)
        return how < 32 ? NAN : (float)(int8_t)fuzz_u8(input) * 0.25f;
    if (row_kind < 220)
        return how < 32 ? INFINITY : (float)(int8_t)fuzz_u8(input) * 0.25f;
    if (row_kind < 235)
        return -INFINITY;
    return fuzz_raw_float(input);
}

/* A draft probability: mostly a multiple of 1/255 (0 included), sometimes
 * an edge: 1, -0, a value read as weight 0 (below 2^-40), the smallest one
 * read as 1, values outside [0, 1], NaN, infinities, raw bits. */
static float decode_draft_prob(fuzz_input *input)
{
    static const float edges[] = {1.0f,        -0.0f,  0x1p-41f, 0x1p-40f, -1e-30f,
                                  1.0000001f,  2.0f,   NAN,      INFINITY, -INFINITY};
    uint8_t how = fuzz_u8(input);
    if (how < 216)
        return (float)fuzz_u8(input) / 255.0f;
    if (how < 246)
        return edges[how % (sizeof edges / sizeof edges[0])];
    return fuzz_raw_float(input);
}

/* A tensor of a verification call, its storage exact (padding NaN), and
 * its rows widened to float for the checks (NULL when the shape is not
 * valid, so that nothing was made for it). */
typedef struct verify_tensor {
    psm_tensor tensor;
    buffer storage;
    float *widened; /* rows x vocab */
    int valid;      /* shape, dtype, memory and data by the API's rules */
} verify_tensor;

static void store_element(verify_tensor *t, size_t at, float x, float *widened)
{
    if (t->tensor.dtype == PSM_DTYPE_F32) {
        ((float *)t->storage.data)[at] = x;
        *widened = x;
    } else if (t->tensor.dtype == PSM_DTYPE_BF16) {
        uint32_t bits;
        memcpy(&bits, &x, sizeof bits);
        uint16_t h = (uint16_t)(bits >> 16);
        if ((bits & 0x7fffffffu) > 0x7f800000u)
            h |= 0x40; /* a NaN stays a NaN after truncation */
        ((uint16_t *)t->storage.data)[at] = h;
        *widened = psm_bf16_to_float(h);
    } else {
        uint16_t h = psm_test_truncate_to_f16(x);
        ((uint16_t *)t->storage.data)[at] = h;
        *widened = psm_f16_to_float(h);
    }
}

/* Decodes a tensor's layout (rows and vocab as proposed, or odd ones now and
 * then) and, when it is valid, its values: logits by row kind, or draft
 * probabilities. Returns -1 when it is too large to test. */
static int decode_verify_tensor(fuzz_input *input, int64_t rows, int64_t vocab, int probabilities,
                                psm_memory memory, verify_tensor *t)
{
    memset(t, 0, sizeof *t);
    psm_tensor *tensor = &t->tensor;
    uint8_t shape_how = fuzz_u8(input);
    tensor->rows = shape_how < 232 ? rows : shape_how < 244 ? rows + fuzz_range(input, -1, 1)
                                                             : decode_size(input, 12);
    tensor->vocab = shape_how < 224 || shape_how >= 244 ? vocab : decode_size(input, 60);
    uint8_t stride_how = fuzz_u8(input);
    tensor->row_stride = stride_how < 176   ? 0
                         : stride_how < 244 ? wrapping_add(tensor->vocab, fuzz_range(input, -1, 3))
                                            : decode_size(input, 100);
    uint8_t dtype_how = fuzz_u8(input);
    int dtype_raw = probabilities ? (dtype_how < 240 ? PSM_DTYPE_F32 : (int)fuzz_range(input, 0, 3))
                                  : (dtype_how < 244 ? (int)fuzz_range(input, 0, 2)
                                                     : (int)fuzz_u32(input));
    tensor->dtype = (psm_dtype)dtype_raw;
    uint8_t memory_how = fuzz_u8(input);
    tensor->memory = memory_how < 236   ? memory
                     : memory_how < 248 ? (psm_memory)(1 - (int)memory)
                                        : (psm_memory)(int)fuzz_u32(input);
    int64_t elements = 0;
    t->valid = shape_valid(tensor->rows, tensor->vocab, tensor->row_stride, &elements) &&
               valid_dtype(dtype_raw) && valid_memory((int)tensor->memory);
    if (t->valid && elements > MAX_ELEMENTS)
        return -1;
    size_t element_bytes = dtype_raw == PSM_DTYPE_F32 || !t->valid ? 4 : 2;
    t->storage = make_buffer(t->valid ? (size_t)elements * element_bytes : element_bytes, input, 0);
    if (t->valid) {
        t->widened = malloc((size_t)(tensor->rows * tensor->vocab) * sizeof *t->widened);
        if (!t->widened)
            abort();
        const int64_t stride = tensor->row_stride ? tensor->row_stride : tensor->vocab;
        for (int64_t r = 0; r < tensor->rows; ++r) {
            uint8_t row_kind = fuzz_u8(input);
            for (int64_t i = 0; i < stride && r * stride + i < elements; ++i) {
                float unused;
                float x = i >= tensor->vocab ? NAN /* padding: never read */
                          : probabilities    ? decode_draft_prob(input)
                                             : decode_verify_logit(input, row_kind);
                store_element(t, (size_t)(r * stride + i), x,
                              i < tensor->vocab ? &t->widened[r * tensor->vocab + i] : &unused);
            }
        }
    }
    int null_data = fuzz_u8(input) < 6;
    tensor->data = null_data ? NULL : t->storage.data;
    t->valid &= !null_data;
    return 0;
}

static void free_verify_tensor(verify_tensor *t)
{
    free(t->storage.data);
    free(t->widened);
}

/* A verification's parameters (target or draft), with their per-request
 * arrays. */
typedef struct verify_params {
    psm_params params;
    float *temperature, *top_p, *min_p;
    int32_t *top_k;
    uint64_t *seed;
    int valid; /* by the API's rules for psm_verify */
} verify_params;

/* What psm_verify takes in no psm_params yet, pointed at by a params
 * decoded to carry one of them (never read: the call must refuse it). */
static const int64_t unsupported_row_indices[1] = {0};
static psm_logit_processing unsupported_processing;
static psm_top_logprobs unsupported_top_logprobs;
static uint64_t unsupported_workspace[1];
static const uint64_t seed_cell = 12345, offset_cell = 7;

static float *decode_float_array(fuzz_input *input, int64_t count)
{
    float *values = malloc((size_t)count * sizeof *values);
    if (!values)
        abort();
    for (int64_t i = 0; i < count; ++i)
        values[i] = decode_float(input);
    return values;
}

/* Decodes parameters for `requests` requests (the count the arrays get). The
 * target's own rules (num_samples 1, output_rows 0 or the requests) are the
 * caller's. */
static void decode_verify_params(fuzz_input *input, int64_t requests, verify_params *v)
{
    memset(v, 0, sizeof *v);
    psm_params *p = &v->params;
    psm_params_init(p);
    uint8_t which = fuzz_u8(input);
    if (which & 1)
        p->temperature = decode_float(input);
    if (which & 2)
        p->top_k = fuzz_u8(input) < 224 ? (int32_t)fuzz_range(input, -1, 45) : (int32_t)fuzz_u32(input);
    if (which & 4)
        p->top_p = decode_float(input);
    if (which & 8)
        p->min_p = decode_float(input);
    p->seed = fuzz_u64(input);
    p->offset = fuzz_u64(input);
    p->filter_order = decode_filter_order(input);
    int valid = row_params_valid(p->temperature, p->top_k, p->top_p, p->min_p) &&
                filter_order_valid(p->filter_order);

    uint8_t arrays = fuzz_u8(input);
    if (arrays & 1)
        v->temperature = decode_float_array(input, requests);
    if (arrays & 2) {
        v->top_k = malloc((size_t)requests * sizeof *v->top_k);
        if (!v->top_k)
            abort();
        for (int64_t r = 0; r < requests; ++r)
            v->top_k[r] = (int32_t)fuzz_range(input, -1, 45);
    }
    if (arrays & 4)
        v->top_p = decode_float_array(input, requests);
    if (arrays & 8)
        v->min_p = decode_float_array(input, requests);
    if (arrays & 16) {
        v->seed = malloc((size_t)requests * sizeof *v->seed);
        if (!v->seed)
            abort();
        for (int64_t r = 0; r < requests; ++r)
            v->seed[r] = fuzz_u64(input);
    }
    p->temperature_per_row = v->temperature;
    p->top_k_per_row = v->top_k;
    p->top_p_per_row = v->top_p;
    p->min_p_per_row = v->min_p;
    p->seed_per_row = v->seed;
    for (int64_t r = 0; r < requests; ++r)
        valid &= row_params_valid(v->temperature ? v->temperature[r] : p->temperature,
                                  v->top_k ? v->top_k[r] : p->top_k,
                                  v->top_p ? v->top_p[r] : p->top_p,
                                  v->min_p ? v->min_p[r] : p->min_p);

    /* Now and then one member that psm_verify refuses, or a pointer form of
     * the request state (valid unless its per-row partner is set too). */
    uint8_t extra = fuzz_u8(input);
    switch (extra < 232 ? -1 : extra % 8) {
    case 0: p->row_indices = unsupported_row_indices; p->output_rows = 1; valid = 0; break;
    case 1: p->processing = &unsupported_processing; valid = 0; break;
    case 2: p->top_logprobs = &unsupported_top_logprobs; valid = 0; break;
    case 3: p->workspace = unsupported_workspace; p->workspace_bytes = sizeof unsupported_workspace;
            valid = 0; break;
    case 4: p->workspace_bytes = 64; valid = 0; break;
    case 5: p->seed_pointer = &seed_cell; valid &= !v->seed; break;
    case 6: p->offset_pointer = &offset_cell; break;
    case 7: p->offset_pointer = &offset_cell; p->offset_per_row = &p->offset; valid = 0; break;
    default: break;
    }
    v->valid = valid;
}

static void free_verify_params(verify_params *v)
{
    free(v->temperature);
    free(v->top_k);
    free(v->top_p);
    free(v->min_p);
    free(v->seed);
}

static float request_temperature(const verify_params *v, int64_t r)
{
    return v->temperature ? v->temperature[r] : v->params.temperature;
}

static int is_greedy_temperature(float temperature)
{
    return temperature < 1e-5f; /* include/polysample.h: below 1e-5 is greedy */
}

/* A logit as the contract reads it (SAMPLING.md section 1): magnitudes
 * below 2^-64, -0 included, are +0. */
static float read_logit(float x)
{
    return fabsf(x) < 0x1p-64f ? 0.0f : x;
}

/* A row (widened) is bad when it holds a NaN or +inf, or no finite logit. */
static int row_bad(const float *x, int64_t vocab)
{
    int any_valid = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        if (isnan(x[i]) || x[i] == INFINITY)
            return 1;
        any_valid |= isfinite(x[i]);
    }
    return !any_valid;
}

/* The first index of the largest valid logit, as read (-1 if none). */
static int64_t first_argmax(const float *x, int64_t vocab)
{
    int64_t best = -1;
    for (int64_t i = 0; i < vocab; ++i)
        if (isfinite(x[i]) && (best < 0 || read_logit(x[i]) > read_logit(x[best])))
            best = i;
    return best;
}

/* Can token t be drawn from row x under these parameters? Checked: a valid
 * logit; a greedy row's first argmax; with top-k on, fewer than k valid
 * tokens above it (every order keeps only such tokens, ties or not, except
 * vLLM's, whose top-k counts after min-p). */
static int emittable(const float *x, int64_t vocab, int64_t t, float temperature, int32_t top_k,
                     int32_t filter_order)
{
    if (t < 0 || t >= vocab || !isfinite(x[t]))
        return 0;
    if (is_greedy_temperature(temperature))
        return t == first_argmax(x, vocab);
    if (top_k > 0 && filter_order != PSM_FILTER_ORDER_VLLM) {
        int64_t above = 0;
        for (int64_t i = 0; i < vocab; ++i)
            above += isfinite(x[i]) && read_logit(x[i]) > read_logit(x[t]);
        return above < top_k;
    }
    return 1;
}

/* What a draft node's drawn token is known to weigh under its distribution. */
typedef enum draft_weight { DRAFT_POSITIVE, DRAFT_ZERO, DRAFT_UNKNOWN } draft_weight;

/* Decodes a psm_verify call and checks what the library promises. */
static void fuzz_verify(fuzz_input *input)
{
    uint8_t flags = fuzz_u8(input);
    const int checking = flags & 1;
    psm_context *context = contexts[checking];
    const int null_context = (flags >> 1 & 15) == 0;
    const uint8_t nulls = fuzz_u8(input);
    const int null_target = nulls % 32 == 1, null_params = nulls % 32 == 2,
              null_drafts = nulls % 32 == 3, null_outputs = nulls % 32 == 4;

    static const int32_t odd_k[] = {0, -1, PSM_MAX_DRAFT_NODES + 1, INT32_MIN, INT32_MAX,
                                    PSM_MAX_DRAFT_NODES};
    uint8_t k_how = fuzz_u8(input);
    const int32_t k = k_how < 224 ? (int32_t)fuzz_range(input, 1, 6)
                      : k_how < 248 ? odd_k[k_how % 6]
                                    : (int32_t)fuzz_u32(input);
    const int k_valid = k >= 1 && k <= PSM_MAX_DRAFT_NODES;
    const int64_t proposed_requests = fuzz_range(input, 1, 3);
    const int64_t proposed_vocab = fuzz_u8(input) < 232 ? fuzz_range(input, 1, 40)
                                                          : decode_size(input, 300);

    verify_tensor target, draft = {0};
    verify_params target_params, draft_params;
    memset(&target_params, 0, sizeof target_params);
    memset(&draft_params, 0, sizeof draft_params);
    buffer tokens = {0}, parents = {0}, accepted = {0}, emitted = {0}, path = {0}, logprobs = {0};
    draft_weight *weights = NULL;
    if (decode_verify_tensor(input, k_valid ? proposed_requests * ((int64_t)k + 1) : 2,
                             proposed_vocab, 0, PSM_MEMORY_HOST, &target) != 0)
        goto done;
    const psm_tensor *logits = &target.tensor;
    /* The call's layout, when it has one: requests x (k + 1) rows. */
    const int layout = target.valid && k_valid && logits->rows % ((int64_t)k + 1) == 0;
    const int64_t requests = layout ? logits->rows / ((int64_t)k + 1) : 1;
    const int64_t vocab = layout ? logits->vocab : 1;
    const int64_t nodes = layout ? k : 1;
    const int64_t width = nodes + 1;
    int valid = !null_context && !null_target && !null_params && !null_drafts && !null_outputs &&
                layout;

    decode_verify_params(input, requests, &target_params);
    psm_params *tp = &target_params.params;
    uint8_t shape_how = fuzz_u8(input);
    if (shape_how >= 240)
        tp->num_samples = fuzz_u8(input) < 200 ? (int32_t)fuzz_range(input, -1, 3) : (int32_t)fuzz_u32(input);
    if ((shape_how & 15) == 15 && !tp->row_indices)
        tp->output_rows = fuzz_u8(input) < 128 ? requests : fuzz_range(input, -1, 5);
    valid &= target_params.valid && tp->num_samples == 1 &&
             (tp->output_rows == 0 || tp->output_rows == requests || tp->row_indices);

    /* Parents: a chain (NULL), a tree, or a tree with one parent out of [0, i). */
    uint8_t tree_how = fuzz_u8(input);
    int32_t *parent_of = NULL;
    if (tree_how >= 96) {
        parents = make_buffer((size_t)(requests * nodes) * sizeof(int32_t), input, 0);
        parent_of = parents.data;
        for (int64_t at = 0; at < requests * nodes; ++at)
            parent_of[at] = (int32_t)fuzz_range(input, 0, at % nodes);
        if (tree_how >= 232) {
            static const int32_t odd[] = {-1, INT32_MIN, INT32_MAX, 0 /* replaced by i */};
            int64_t at = fuzz_range(input, 0, requests * nodes - 1);
            int32_t bad = odd[tree_how % 4];
            parent_of[at] = bad ? bad : (int32_t)(at % nodes + 1) + (int32_t)fuzz_range(input, 0, 2);
            valid = 0;
        }
    }

    /* The drafts' distributions: point masses, draft logits (with or without
     * parameters), draft probabilities, or pieces that do not go together. */
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = k;
    drafts.parents = parent_of;
    uint8_t draft_how = fuzz_u8(input);
    enum { POINT_MASS, DRAFT_LOGITS, DRAFT_PROBS } kind =
        draft_how < 72 ? POINT_MASS : draft_how < 156 ? DRAFT_LOGITS : DRAFT_PROBS;
    if (kind != POINT_MASS) {
        if (decode_verify_tensor(input, requests * nodes, vocab, kind == DRAFT_PROBS,
                                 logits->memory, &draft) != 0)
            goto done;
        valid &= draft.valid && draft.tensor.rows == requests * nodes &&
                 draft.tensor.vocab == vocab && draft.tensor.memory == logits->memory;
        if (kind == DRAFT_PROBS) {
            drafts.draft_probs = &draft.tensor;
            valid &= draft.tensor.dtype == PSM_DTYPE_F32;
        } else {
            drafts.draft_logits = &draft.tensor;
        }
    }
    if (kind == DRAFT_LOGITS ? draft_how & 1 : draft_how >= 248) {
        decode_verify_params(input, requests, &draft_params);
        drafts.draft_params = &draft_params.params;
        valid &= draft_params.valid && kind == DRAFT_LOGITS;
    }
    if (draft_how >= 252 && kind != POINT_MASS) { /* both kinds at once */
        drafts.draft_logits = drafts.draft_probs = &draft.tensor;
        valid = 0;
    }
    /* Draft rows can be read (and their checks made) when the call is
     * otherwise valid. */
    const int drafts_readable = valid && (kind == POINT_MASS || draft.valid);
    const float *draft_rows = drafts_readable && kind != POINT_MASS ? draft.widened : NULL;

    /* Tokens: mostly one a node is likely to have drawn (the first argmax of
     * its parent's target row, or of its own draft row), else any. */
    tokens = make_buffer((size_t)(requests * nodes) * sizeof(int32_t), input, 0);
    int32_t *token_of = tokens.data;
    weights = malloc((size_t)(requests * nodes) * sizeof *weights);
    if (!weights)
        abort();
    for (int64_t at = 0; at < requests * nodes; ++at) {
        int64_t r = at / nodes, node = at % nodes + 1;
        int64_t parent = parent_of ? parent_of[at] : node - 1;
        uint8_t how = fuzz_u8(input);
        int64_t choice = -1;
        if (how < 96 && layout && parent >= 0 && parent < node)
            choice = first_argmax(target.widened + (r * width + parent) * vocab, vocab);
        else if (how < 160 && draft_rows)
            choice = first_argmax(draft_rows + at * vocab, vocab);
        token_of[at] = choice >= 0 ? (int32_t)choice : decode_token(input, vocab);
        valid &= token_of[at] >= 0 && token_of[at] < vocab;
    }
    drafts.tokens = fuzz_u8(input) < 6 ? NULL : token_of;
    valid &= drafts.tokens != NULL;

    /* Outputs, each exactly its size; the optional ones now and then absent. */
    accepted = make_buffer((size_t)requests * sizeof(int32_t), input, 0);
    emitted = make_buffer((size_t)(requests * width) * sizeof(int32_t), input, 0);
    path = make_buffer((size_t)(requests * width) * sizeof(int32_t), input, 0);
    logprobs = make_buffer((size_t)(requests * width) * sizeof(float), input, 0);
    psm_verification outputs;
    psm_output *each[4] = {&outputs.accepted, &outputs.tokens, &outputs.path_nodes,
                           &outputs.logprobs};
    const buffer *storage[4] = {&accepted, &emitted, &path, &logprobs};
    for (int o = 0; o < 4; ++o) {
        uint8_t how = fuzz_u8(input);
        int absent = o < 2 ? how < 6 : how < 64;
        each[o]->data = absent ? NULL : storage[o]->data;
        each[o]->memory = how >= 250 ? (psm_memory)(int)fuzz_u32(input) : (psm_memory)(how & 1);
        if (o < 2)
            valid &= !absent;
        if (!absent)
            valid &= valid_memory((int)each[o]->memory);
    }

    /* What the drafts' values make of a call that is otherwise valid: a value
     * out of range fails it; a drawn token of draft weight 0 fails it; one
     * whose weight the checks here do not compute leaves either outcome. */
    int unknown_weight = 0, zero_weight = 0;
    if (valid && kind == DRAFT_PROBS)
        for (int64_t i = 0; i < requests * nodes * vocab; ++i)
            valid &= draft.widened[i] >= 0.0f && draft.widened[i] <= 1.0f;
    for (int64_t at = 0; valid && at < requests * nodes; ++at) {
        int64_t t = token_of[at];
        weights[at] = DRAFT_POSITIVE; /* a point mass on the node's token */
        if (kind == DRAFT_PROBS) {
            weights[at] = ldexp(draft.widened[at * vocab + t], VERIFY_WEIGHT_BITS) >= 1.0
                              ? DRAFT_POSITIVE
                              : DRAFT_ZERO;
        } else if (kind == DRAFT_LOGITS) {
            const float *x = draft.widened + at * vocab;
            float temperature = drafts.draft_params ? request_temperature(&draft_params, at / nodes)
                                                    : 1.0f;
            if (row_bad(x, vocab) || !isfinite(x[t]) ||
                (is_greedy_temperature(temperature) && t != first_argmax(x, vocab)))
                weights[at] = DRAFT_ZERO;
            else if (t != first_argmax(x, vocab))
                weights[at] = DRAFT_UNKNOWN; /* filters and the weights' underflow decide */
        }
        zero_weight |= weights[at] == DRAFT_ZERO;
        unknown_weight |= weights[at] == DRAFT_UNKNOWN;
    }
    int any_bad_request = 0;
    for (int64_t r = 0; valid && r < requests; ++r)
        for (int64_t v = 0; v <= nodes; ++v)
            any_bad_request |= row_bad(target.widened + (r * width + v) * vocab, vocab);

    psm_status status =
        psm_verify(null_context ? NULL : context, null_target ? NULL : logits,
                   null_params ? NULL : tp, null_drafts ? NULL : &drafts,
                   null_outputs ? NULL : &outputs);
    const char *message = psm_last_error();
    const int must_succeed = valid && !zero_weight && !unknown_weight && !(checking && any_bad_request);
    if (status != PSM_OK) {
        if (message[0] == '\0')
            FAIL("psm_verify failed (%s) without a message", psm_status_string(status));
        if (must_succeed)
            FAIL("psm_verify refused valid arguments with %s: %s", psm_status_string(status),
                 message);
        if (valid && !zero_weight && !unknown_weight && status != PSM_ERR_BAD_ROW)
            FAIL("psm_verify in checking mode: a bad request gave %s, not BAD_ROW: %s",
                 psm_status_string(status), message);
        /* Draft weights are checked before bad requests: a zero one decides. */
        if (valid && zero_weight && status != PSM_ERR_INVALID_PARAMETER)
            FAIL("psm_verify: a draft token of weight 0 gave %s, not INVALID_PARAMETER: %s",
                 psm_status_string(status), message);
        if (valid && unknown_weight && status != PSM_ERR_INVALID_PARAMETER &&
            !(checking && any_bad_request && status == PSM_ERR_BAD_ROW))
            FAIL("psm_verify: drafts that are valid but for their weights gave %s: %s",
                 psm_status_string(status), message);
        for (int o = 0; o < 4; ++o)
            if (!untouched(storage[o]))
                FAIL("a failing psm_verify (%s: %s) wrote output %d", psm_status_string(status),
                     message, o);
        goto done;
    }
    if (!valid || zero_weight)
        FAIL("psm_verify accepted arguments that are not valid (k %d, layout %d, draft kind %d, "
             "a draft of weight 0: %d)", (int)k, layout, (int)kind, zero_weight);
    if (message[0] != '\0')
        FAIL("psm_verify succeeded but left a message: %s", message);
    if (checking && any_bad_request)
        FAIL("psm_verify in checking mode accepted a bad request");

    const int32_t *accepted_out = accepted.data, *emitted_out = emitted.data;
    const int32_t *path_out = outputs.path_nodes.data ? (const int32_t *)path.data : NULL;
    const float *logprob_out = outputs.logprobs.data ? (const float *)logprobs.data : NULL;
    if (!path_out && !untouched(&path))
        FAIL("psm_verify wrote path_nodes, which were not asked for");
    if (!logprob_out && !untouched(&logprobs))
        FAIL("psm_verify wrote logprobs, which were not asked for");
    for (int64_t r = 0; r < requests; ++r) {
        const int32_t *row_tokens = emitted_out + r * width;
        const int32_t *row_path = path_out ? path_out + r * width : NULL;
        const float *row_logprobs = logprob_out ? logprob_out + r * width : NULL;
        const float *rows_of_request = target.widened + r * width * vocab;
        int bad = 0;
        for (int64_t v = 0; v <= nodes; ++v)
            bad |= row_bad(rows_of_request + v * vocab, vocab);
        const int32_t a = accepted_out[r];
        if (bad) {
            if (a != -1)
                FAIL("request %lld has a bad target row but accepted %d", (long long)r, a);
            for (int64_t j = 0; j < width; ++j)
                if (row_tokens[j] != -1 || (row_path && row_path[j] != -1) ||
                    (row_logprobs && !isnan(row_logprobs[j])))
                    FAIL("bad request %lld: position %lld holds token %d (expected -1 / NaN)",
                         (long long)r, (long long)j, row_tokens[j]);
            continue;
        }
        const int32_t *request_parents = parent_of ? parent_of + r * nodes : NULL;
        const int32_t *request_tokens = token_of + r * nodes;
        int depth[PSM_MAX_DRAFT_NODES + 1] = {0};
        int deepest = 0;
        for (int64_t node = 1; node <= nodes; ++node) {
            depth[node] = depth[request_parents ? request_parents[node - 1] : node - 1] + 1;
            deepest = depth[node] > deepest ? depth[node] : deepest;
        }
        if (a < 0 || a > deepest)
            FAIL("request %lld accepted %d drafts; the tree's depth is %d", (long long)r, a, deepest);
        const float temperature = request_temperature(&target_params, r);
        const int32_t top_k = target_params.top_k ? target_params.top_k[r] : tp->top_k;
        /* The nodes that position j's token may have been drawn at: the
         * accepted path's (path_nodes), or without it every node whose
         * path carries the emitted tokens so far. */
        uint8_t at_node[PSM_MAX_DRAFT_NODES + 1] = {1}, next[PSM_MAX_DRAFT_NODES + 1];
        for (int64_t j = 0; j <= a; ++j) {
            if (row_path) {
                if (row_path[j] < 0 || row_path[j] > nodes || !at_node[row_path[j]])
                    FAIL("request %lld position %lld: path node %d does not continue the path",
                         (long long)r, (long long)j, row_path[j]);
                memset(at_node, 0, sizeof at_node);
                at_node[row_path[j]] = 1;
            }
            int possible = 0;
            for (int64_t v = 0; v <= nodes; ++v) {
                at_node[v] = at_node[v] &&
                             emittable(rows_of_request + v * vocab, vocab, row_tokens[j],
                                       temperature, top_k, tp->filter_order);
                possible |= at_node[v];
            }
            if (!possible)
                FAIL("request %lld position %lld: token %d cannot be drawn at %s (T=%g top_k=%d "
                     "order=%d)", (long long)r, (long long)j, row_tokens[j],
                     row_path ? "its path node" : "any node of its path", (double)temperature,
                     top_k, tp->filter_order);
            if (row_logprobs && !(isfinite(row_logprobs[j]) && row_logprobs[j] <= 0.0f))
                FAIL("request %lld position %lld: logprob %g", (long long)r, (long long)j,
                     (double)row_logprobs[j]);
            if (j == a)
                break;
            /* An accepted token is a child's draft token on the path. */
            memset(next, 0, sizeof next);
            int children = 0;
            for (int64_t c = 1; c <= nodes; ++c) {
                int32_t parent = request_parents ? request_parents[c - 1] : (int32_t)c - 1;
                if (at_node[parent] && request_tokens[c - 1] == row_tokens[j]) {
                    next[c] = 1;
                    children = 1;
                }
            }
            if (!children)
                FAIL("request %lld position %lld: accepted token %d is no child's draft on the "
                     "path", (long long)r, (long long)j, row_tokens[j]);
            memcpy(at_node, next, sizeof at_node);
        }
        for (int64_t j = (int64_t)a + 1; j < width; ++j)
            if (row_tokens[j] != -1 || (row_path && row_path[j] != -1) ||
                (row_logprobs && !isnan(row_logprobs[j])))
                FAIL("request %lld: position %lld after the last token holds %d (expected -1 / "
                     "NaN)", (long long)r, (long long)j, row_tokens[j]);
    }
done:
    free(tokens.data);
    free(parents.data);
    free(accepted.data);
    free(emitted.data);
    free(path.data);
    free(logprobs.data);
    free(weights);
    free_verify_tensor(&target);
    free_verify_tensor(&draft);
    free_verify_params(&target_params);
    free_verify_params(&draft_params);
}

/* Sharded calls (docs/SAMPLING.md section 8): shards of any first token,
 * full vocabulary, index and count; then rounds whose gathered bytes are
 * this rank's own record repeated, with the input's bytes laid over the
 * payloads (the headers kept or not), or of the wrong size. The call must
 * refuse a bad shard at begin and a bad exchange in next, writing nothing
 * either time; whatever it combines, it must not fault (ASan, UBSan), and
 * tokens it writes lie in [-1, full_vocab). */
static void fuzz_sharded(fuzz_input *input)
{
    enum { MAX_SHARD_COUNT = 4, SHARD_ROWS = 3, SHARD_VOCAB = 40, SAMPLES = 2 };
    const int64_t rows = fuzz_range(input, 1, SHARD_ROWS);
    const int64_t vocab = fuzz_range(input, 1, SHARD_VOCAB);
    psm_shard shard;
    shard.shard_count = (int32_t)(fuzz_u8(input) < 240 ? fuzz_range(input, 1, MAX_SHARD_COUNT)
                                                        : (int64_t)(int32_t)fuzz_u32(input));
    shard.shard_index = (int32_t)(fuzz_u8(input) < 240 ? fuzz_range(input, 0, MAX_SHARD_COUNT)
                                                        : (int64_t)(int32_t)fuzz_u32(input));
    shard.full_vocab = fuzz_u8(input) < 240 ? vocab + fuzz_range(input, 0, 3000)
                                            : (int64_t)fuzz_u64(input);
    shard.first_token = fuzz_u8(input) < 240 ? fuzz_range(input, 0, 3000)
                                             : (int64_t)fuzz_u64(input);
    const int valid = shard.shard_count >= 1 && shard.shard_count <= PSM_MAX_SHARDS &&
                      shard.shard_index >= 0 && shard.shard_index < shard.shard_count &&
                      shard.full_vocab >= 1 && shard.full_vocab <= INT32_MAX &&
                      shard.first_token >= 0 && vocab <= shard.full_vocab - shard.first_token;
    float *logits = malloc((size_t)(rows * vocab) * sizeof(float));
    if (!logits)
        abort();
    for (int64_t i = 0; i < rows * vocab; ++i)
        logits[i] = fuzz_u8(input) < 250 ? (float)fuzz_range(input, -40, 40) / 4.0f
                                         : fuzz_raw_float(input);
    psm_params params;
    psm_params_init(&params);
    params.temperature = (float)fuzz_range(input, 0, 20) / 10.0f;
    params.top_k = (int32_t)fuzz_range(input, 0, 50);
    params.top_p = (float)fuzz_range(input, 1, 10) / 10.0f;
    params.min_p = (float)fuzz_range(input, 0, 5) / 10.0f;
    params.seed = fuzz_u64(input);
    params.num_samples = SAMPLES;
    int32_t tokens[SHARD_ROWS * SAMPLES];
    memset(tokens, CANARY, sizeof tokens);
    psm_tensor tensor = {logits, PSM_DTYPE_F32, PSM_MEMORY_HOST, rows, vocab, 0};
    psm_sharded *call = NULL;
    psm_status status = psm_sharded_begin(contexts[fuzz_u8(input) & 1], &tensor, &shard, &params,
                                          (psm_output){tokens, PSM_MEMORY_HOST},
                                          (psm_output){NULL, PSM_MEMORY_HOST}, &call);
    if ((status == PSM_OK) != valid)
        FAIL("sharded begin: %s for a shard that is %s (%s)", psm_status_string(status),
             valid ? "valid" : "invalid", psm_last_error());
    if (status != PSM_OK) {
        if (call || !psm_last_error()[0])
            FAIL("sharded begin failed without a message, or gave a call");
        free(logits);
        return;
    }
    const void *send = NULL;
    size_t bytes = 0;
    status = psm_sharded_next(call, NULL, 0, &send, &bytes);
    unsigned char *gathered = NULL;
    for (int round = 0; status == PSM_OK && bytes > 0 && round < 24; ++round) {
        const size_t count = (size_t)shard.shard_count;
        const uint8_t shape = fuzz_u8(input);
        const size_t size = shape < 240 ? count * bytes : (size_t)fuzz_range(input, 0, 4096);
        gathered = realloc(gathered, size ? size : 1);
        if (!gathered)
            abort();
        for (size_t k = 0; k + bytes <= size; k += bytes)
            memcpy(gathered + k, send, bytes);
        /* Each record's header: shard index k (the order check), columns
         * as this rank's unless the input says otherwise. */
        for (size_t k = 0; shape < 240 && k < count; ++k)
            memcpy(gathered + k * bytes + 8, &k, sizeof k);
        const size_t overlay = (size_t)fuzz_range(input, 0, 64);
        for (size_t j = 0; j < overlay && size > 0; ++j)
            gathered[fuzz_range(input, 0, (int64_t)size - 1)] = fuzz_u8(input);
        status = psm_sharded_next(call, gathered, size, &send, &bytes);
    }
    psm_sharded_end(call);
    free(gathered);
    for (int64_t i = 0; i < rows * SAMPLES; ++i) {
        int32_t canary;
        memset(&canary, CANARY, sizeof canary);
        if (status != PSM_OK && tokens[i] != canary)
            FAIL("sharded: a failed call wrote token %lld", (long long)i);
        if (status == PSM_OK && bytes == 0 &&
            (tokens[i] < -1 || tokens[i] >= shard.full_vocab))
            FAIL("sharded: token %d outside [-1, %lld)", tokens[i], (long long)shard.full_vocab);
    }
    if (status != PSM_OK && !psm_last_error()[0])
        FAIL("sharded: a failure without a message");
    free(logits);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fuzz_input input = fuzz_input_make(data, size);
    uint8_t mode = fuzz_u8(&input);
    switch (mode % 8) {
    case 0: case 1:
        fuzz_call(&input, 0);
        break;
    case 2:
        fuzz_verify(&input);
        break;
    case 3: case 4: case 5:
        fuzz_call(&input, 1);
        break;
    case 6:
        fuzz_reserve(&input);
        break;
    default:
        if (mode >= 248)
            fuzz_sharded(&input);
        else
            fuzz_create(&input);
        break;
    }
    return 0;
}
