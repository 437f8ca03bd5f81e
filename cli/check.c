/* check.c: `polysample check`: the contract's promise, tested end to end.
 * The same random inputs go through every available backend, the CPU backend
 * at 1 and 2 threads, device-resident buffers where the tool can make them,
 * and different batch compositions; every pair must agree on every token.
 * Then a few settings are drawn 10^6 times on the CPU backend and compared
 * with a float64 softmax by a chi-square test. */
#define _POSIX_C_SOURCE 200809L
#include "bench_device.h"
#include "cli_commands.h"
#include "cli_util.h"
#include "polysample.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char check_usage[] =
    "usage: polysample check [options]\n"
    "\n"
    "Runs the same random logits (vocab 1, 1000, 1025, 32000, 151936; f32, f16,\n"
    "bf16; parameter sets plain, greedy, top_k, top_p, min_p, combined,\n"
    "per_row_params, per_row_seeds, num_samples_4) through every device of\n"
    "every available backend (e.g. opencl:0 and opencl:1 for a GPU driver and\n"
    "PoCL), the CPU backend at 1 and 2 threads, device-resident buffers\n"
    "(CUDA, OpenCL) and, with per-row seeds, rows alone, split and reversed\n"
    "batches; every other case has padded rows (row_stride > vocab) and offsets\n"
    "use both 32-bit words. Prints token agreement for every pair (it must be 100%), logprob\n"
    "differences, and chi-square tests of a few settings against a float64\n"
    "softmax (10^6 draws each on the CPU backend).\n"
    "Exit status 1 on any disagreement, failed call or failed test.\n"
    "\n"
    "options:\n"
    "  --rows N        total rows over all cases (default 20000)\n"
    "  --backend LIST  comma-separated backends (each optionally :N) to compare\n"
    "                  with the CPU backend, at most 5 (default: every device\n"
    "                  of every available backend)\n"
    "  --seed S        seed of the inputs and the draws (default 2026)\n"
    "  --draws N       draws per chi-square test (default 1000000; 0 skips them)\n"
    "\n"
    "Integers are decimal digits only: no sign, spaces or 0x prefix, and a leading\n"
    "zero is not octal (--seed 010 is ten).\n";

#define CHECK_MAX_PARTICIPANTS 12
#define CHECK_MAX_REPORTED 10
/* Logprobs agree "to float rounding": a log taken by another libm or device
 * may differ by a few ulps, so the bound is loose next to that and tight
 * next to any real difference in the distribution. */
#define CHECK_LOGPROB_ABSOLUTE 1e-4
#define CHECK_LOGPROB_RELATIVE 1e-5

typedef struct parameter_set {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    int32_t num_samples;
    int per_row_params;
    int per_row_seeds;
} parameter_set;

static const parameter_set parameter_sets[] = {
    {"plain", 1.0f, 0, 1.0f, 0.0f, 1, 0, 0},
    {"greedy", 0.0f, 0, 1.0f, 0.0f, 1, 0, 0},
    {"top_k", 0.8f, 50, 1.0f, 0.0f, 1, 0, 0},
    {"top_p", 1.0f, 0, 0.9f, 0.0f, 1, 0, 0},
    {"min_p", 1.0f, 0, 1.0f, 0.05f, 1, 0, 0},
    {"combined", 0.7f, 40, 0.95f, 0.02f, 1, 0, 0},
    {"per_row_params", 1.0f, 0, 1.0f, 0.0f, 1, 1, 0},
    {"per_row_seeds", 0.9f, 0, 1.0f, 0.0f, 1, 1, 1},
    {"num_samples_4", 1.2f, 0, 0.8f, 0.0f, 4, 0, 0},
};
#define PARAMETER_SET_COUNT ((int)(sizeof parameter_sets / sizeof parameter_sets[0]))

/* Vocabularies: a single token, less than one tile, one tile and a token,
 * and two real ones. The weight is each vocab's share of the row budget. */
static const struct {
    int64_t vocab;
    double row_share;
} check_vocabs[] = {{1, 0.1}, {1000, 0.3}, {1025, 0.3}, {32000, 0.2}, {151936, 0.1}};
#define CHECK_VOCAB_COUNT ((int)(sizeof check_vocabs / sizeof check_vocabs[0]))

static const psm_dtype check_dtypes[] = {PSM_DTYPE_F32, PSM_DTYPE_F16, PSM_DTYPE_BF16};
#define CHECK_DTYPE_COUNT 3

typedef struct participant {
    char name[48];
    psm_backend backend;
    psm_context *context;
    const bench_device_ops *device; /* non-NULL: buffers live on the device */
    void *session;
} participant;

/* One batch of inputs on the host. */
typedef struct check_batch {
    int64_t rows;
    int64_t vocab;
    int64_t row_stride; /* elements from one row to the next, >= vocab */
    psm_dtype dtype;
    const void *logits; /* rows rows of row_stride elements of dtype */
    psm_params params;  /* per-row pointers are host arrays (or NULL) */
} check_batch;

typedef struct pair_record {
    uint64_t compared;
    uint64_t agreed;
    double logprob_max_difference;
    uint64_t logprob_mismatches;
} pair_record;

typedef struct check_state {
    participant participants[CHECK_MAX_PARTICIPANTS];
    int participant_count;
    pair_record pairs[CHECK_MAX_PARTICIPANTS][CHECK_MAX_PARTICIPANTS];
    uint64_t composition_compared[CHECK_MAX_PARTICIPANTS];
    uint64_t composition_agreed[CHECK_MAX_PARTICIPANTS];
    uint64_t invalid_tokens[CHECK_MAX_PARTICIPANTS]; /* out of range, masked, not argmax... */
    uint64_t failed_calls;
    int reported;
    int show_progress;
} check_state;

static void report(check_state *state, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#include <stdarg.h>
static void report(check_state *state, const char *format, ...)
{
    va_list arguments;
    if (state->reported++ >= CHECK_MAX_REPORTED) {
        if (state->reported == CHECK_MAX_REPORTED + 1)
            printf("  (further problems are counted, not listed)\n");
        return;
    }
    fputs("  ", stdout);
    va_start(arguments, format);
    vprintf(format, arguments);
    va_end(arguments);
    fputc('\n', stdout);
}

/* ---- running one participant -------------------------------------------- */

static int open_participant(participant *opened, const char *name, psm_backend backend,
                           int device_index, int threads, int device_memory)
{
    psm_context_options options;
    psm_status status;
    char error[256];
    memset(opened, 0, sizeof *opened);
    snprintf(opened->name, sizeof opened->name, "%s", name);
    opened->backend = backend;
    cli_context_options_init(&options);
    options.backend = backend;
    options.device_index = device_index;
    options.cpu_threads = threads;
    if (device_memory) {
        opened->device = bench_device_find(backend);
        if (opened->device->open(device_index, &opened->session, error, sizeof error) != 0) {
            cli_error("check", "%s: %s", name, error);
            return -1;
        }
        options.native_stream = opened->device->native_stream(opened->session);
    }
    status = psm_context_create(&options, &opened->context);
    if (status != PSM_OK) {
        cli_library_error("check", name, status);
        if (opened->device)
            opened->device->close(opened->session);
        return -1;
    }
    return 0;
}

static void close_participant(participant *closing)
{
    psm_context_destroy(closing->context);
    if (closing->device)
        closing->device->close(closing->session);
}

/* A host array copied to the device (NULL stays NULL). */
static int device_copy(participant *who, const void *host, size_t bytes, void **buffer)
{
    *buffer = NULL;
    if (!host)
        return 0;
    if (who->device->allocate(who->session, bytes, buffer) != 0)
        return -1;
    return who->device->upload(who->session, *buffer, host, bytes);
}

/* Samples a batch; tokens and logprobs (host) get rows x num_samples. */
static int run_batch(participant *who, const check_batch *batch, int32_t *tokens, float *logprobs)
{
    psm_tensor logits;
    psm_params params = batch->params;
    psm_output token_output, logprob_output;
    psm_status status;
    size_t outputs = (size_t)batch->rows * (size_t)params.num_samples;
    size_t rows = (size_t)batch->rows;
    void *buffers[8] = {NULL};
    int failed = 0, i;

    memset(&logits, 0, sizeof logits);
    logits.dtype = batch->dtype;
    logits.rows = batch->rows;
    logits.vocab = batch->vocab;
    logits.row_stride = batch->row_stride;
    if (!who->device) {
        logits.data = (void *)batch->logits;
        logits.memory = PSM_MEMORY_HOST;
        token_output.data = tokens;
        token_output.memory = PSM_MEMORY_HOST;
        logprob_output.data = logprobs;
        logprob_output.memory = PSM_MEMORY_HOST;
        status = psm_sample(who->context, &logits, &params, token_output, logprob_output);
        if (status == PSM_OK)
            status = psm_synchronize(who->context);
        if (status != PSM_OK) {
            cli_library_error("check", who->name, status);
            return -1;
        }
        return 0;
    }

    /* Device memory: the logits, the per-row arrays and the outputs. */
    failed |= device_copy(who, batch->logits,
                          rows * (size_t)batch->row_stride * cli_dtype_size(batch->dtype),
                          &buffers[0]);
    failed |= device_copy(who, batch->params.temperature_per_row, rows * sizeof(float), &buffers[1]);
    failed |= device_copy(who, batch->params.top_k_per_row, rows * sizeof(int32_t), &buffers[2]);
    failed |= device_copy(who, batch->params.top_p_per_row, rows * sizeof(float), &buffers[3]);
    failed |= device_copy(who, batch->params.min_p_per_row, rows * sizeof(float), &buffers[4]);
    failed |= device_copy(who, batch->params.seed_per_row, rows * sizeof(uint64_t), &buffers[5]);
    failed |= who->device->allocate(who->session, outputs * sizeof(int32_t), &buffers[6]);
    failed |= who->device->allocate(who->session, outputs * sizeof(float), &buffers[7]);
    if (failed) {
        cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
    } else {
        logits.data = buffers[0];
        logits.memory = PSM_MEMORY_DEVICE;
        params.temperature_per_row = buffers[1];
        params.top_k_per_row = buffers[2];
        params.top_p_per_row = buffers[3];
        params.min_p_per_row = buffers[4];
        params.seed_per_row = buffers[5];
        token_output.data = buffers[6];
        token_output.memory = PSM_MEMORY_DEVICE;
        logprob_output.data = buffers[7];
        logprob_output.memory = PSM_MEMORY_DEVICE;
        status = psm_sample(who->context, &logits, &params, token_output, logprob_output);
        if (status == PSM_OK)
            status = psm_synchronize(who->context);
        if (status != PSM_OK) {
            cli_library_error("check", who->name, status);
            failed = 1;
        } else if (who->device->download(who->session, tokens, buffers[6],
                                         outputs * sizeof(int32_t)) != 0 ||
                   who->device->download(who->session, logprobs, buffers[7],
                                         outputs * sizeof(float)) != 0) {
            cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
            failed = 1;
        }
    }
    for (i = 0; i < 8; ++i)
        who->device->release(who->session, buffers[i]);
    return failed ? -1 : 0;
}

/* ---- inputs --------------------------------------------------------------- */

static float element_as_float(const void *data, psm_dtype dtype, size_t index)
{
    if (dtype == PSM_DTYPE_F32)
        return ((const float *)data)[index];
    if (dtype == PSM_DTYPE_F16)
        return cli_f16_to_float(((const uint16_t *)data)[index]);
    return cli_bf16_to_float(((const uint16_t *)data)[index]);
}

typedef struct case_inputs {
    float *values;        /* rows x vocab, f32, as the backends read them */
    void *logits;         /* the same in the case's dtype, rows of row_stride */
    float *temperature;
    int32_t *top_k;
    float *top_p;
    float *min_p;
    uint64_t *seeds;
} case_inputs;

static void free_inputs(case_inputs *inputs)
{
    free(inputs->values);
    free(inputs->logits);
    free(inputs->temperature);
    free(inputs->top_k);
    free(inputs->top_p);
    free(inputs->min_p);
    free(inputs->seeds);
    memset(inputs, 0, sizeof *inputs);
}

/* Random logits ~ N(0, 2^2), plus rows that exercise the edges: row 0 is
 * quantised to halves (ties everywhere), row 1 masks every 7th token with
 * -inf, and with 8 rows or more row 5 holds a NaN and row 6 is all -inf
 * (bad rows: token -1). With a row stride beyond vocab the padding holds
 * NaN, so a backend that read it would turn a good row bad. */
static int make_inputs(const check_batch *shape, const parameter_set *set, uint64_t seed,
                       case_inputs *inputs)
{
    size_t count = (size_t)shape->rows * (size_t)shape->vocab;
    size_t rows = (size_t)shape->rows, i;
    size_t vocab = (size_t)shape->vocab, stride = (size_t)shape->row_stride;
    size_t element = cli_dtype_size(shape->dtype);
    const float padding = NAN;
    memset(inputs, 0, sizeof *inputs);
    inputs->values = malloc(count * sizeof(float));
    inputs->logits = malloc(rows * stride * element);
    if (!inputs->values || !inputs->logits)
        return -1;
    cli_fill_normal(inputs->values, count, 2.0f, seed);
    if (shape->vocab > 1) {
        for (i = 0; i < (size_t)shape->vocab; ++i)
            inputs->values[i] = 0.5f * roundf(2.0f * inputs->values[i]);
        if (rows > 1)
            for (i = 0; i < (size_t)shape->vocab; i += 7)
                inputs->values[(size_t)shape->vocab + i] = -INFINITY;
    }
    if (rows >= 8) {
        inputs->values[5 * (size_t)shape->vocab + (size_t)shape->vocab / 2] = NAN;
        for (i = 0; i < (size_t)shape->vocab; ++i)
            inputs->values[6 * (size_t)shape->vocab + i] = -INFINITY;
    }
    for (i = 0; i < rows; ++i) {
        char *row = (char *)inputs->logits + i * stride * element;
        size_t pad;
        cli_convert_from_f32(inputs->values + i * vocab, vocab, shape->dtype, row);
        for (pad = vocab; pad < stride; ++pad)
            cli_convert_from_f32(&padding, 1, shape->dtype, row + pad * element);
        /* What the backends see, for the host-side checks below. */
        for (pad = 0; pad < vocab; ++pad)
            inputs->values[i * vocab + pad] = element_as_float(row, shape->dtype, pad);
    }

    if (set->per_row_params) {
        inputs->temperature = malloc(rows * sizeof(float));
        inputs->top_k = malloc(rows * sizeof(int32_t));
        inputs->top_p = malloc(rows * sizeof(float));
        inputs->min_p = malloc(rows * sizeof(float));
        if (!inputs->temperature || !inputs->top_k || !inputs->top_p || !inputs->min_p)
            return -1;
        for (i = 0; i < rows; ++i) {
            uint64_t word = cli_random_u64(seed ^ 0x5eedu, i);
            static const int32_t k_choices[] = {0, 1, 2, 5, 50, 1000, 2000000};
            inputs->temperature[i] =
                (word & 15u) == 0 ? 0.0f : 0.3f + 1.2f * (float)cli_random_unit(seed ^ 0x7u, i);
            inputs->top_k[i] = k_choices[(word >> 8) % 7u];
            inputs->top_p[i] = (word >> 16) % 3u == 0 ? 1.0f
                                                       : 0.5f + 0.49f * (float)cli_random_unit(seed ^ 0x9u, i);
            inputs->min_p[i] = (word >> 24) % 3u == 0 ? 0.2f * (float)cli_random_unit(seed ^ 0xbu, i)
                                                       : 0.0f;
        }
    }
    if (set->per_row_seeds) {
        inputs->seeds = malloc(rows * sizeof(uint64_t));
        if (!inputs->seeds)
            return -1;
        for (i = 0; i < rows; ++i)
            inputs->seeds[i] = cli_random_u64(seed ^ 0xabcdu, i);
    }
    return 0;
}

/* ---- host-side checks of one participant's tokens -------------------------- */

static int row_is_bad(const float *row, int64_t vocab)
{
    int64_t i;
    int any_finite = 0;
    for (i = 0; i < vocab; ++i) {
        if (isnan(row[i]) || row[i] == INFINITY)
            return 1;
        any_finite |= isfinite(row[i]);
    }
    return !any_finite;
}

static int64_t row_argmax(const float *row, int64_t vocab)
{
    int64_t i, best = -1;
    for (i = 0; i < vocab; ++i)
        if (isfinite(row[i]) && (best < 0 || row[i] > row[best]))
            best = i;
    return best;
}

/* Tokens must be in range, never a masked token, -1 exactly on bad rows, and
 * the argmax (lowest index on ties) when the row is greedy. */
static void validate_tokens(check_state *state, int who, const char *label,
                            const check_batch *batch, const case_inputs *inputs,
                            const int32_t *tokens)
{
    int64_t row, sample;
    int32_t samples = batch->params.num_samples;
    for (row = 0; row < batch->rows; ++row) {
        const float *values = inputs->values + row * batch->vocab;
        int bad = row_is_bad(values, batch->vocab);
        float temperature = inputs->temperature ? inputs->temperature[row]
                                                : batch->params.temperature;
        int64_t argmax = temperature < 1e-5f && !bad ? row_argmax(values, batch->vocab) : -1;
        for (sample = 0; sample < samples; ++sample) {
            int32_t token = tokens[row * samples + sample];
            const char *problem = NULL;
            if (bad && token != -1)
                problem = "a bad row did not get token -1";
            else if (!bad && (token < 0 || token >= batch->vocab))
                problem = "token out of range";
            else if (!bad && values[token] == -INFINITY)
                problem = "a masked (-inf) token was drawn";
            else if (argmax >= 0 && token != argmax)
                problem = "greedy token is not the argmax";
            if (problem) {
                state->invalid_tokens[who]++;
                report(state, "%s, %s: row %lld sample %lld: %s (token %d)",
                       state->participants[who].name, label, (long long)row, (long long)sample,
                       problem, (int)token);
            }
        }
    }
}

static int logprobs_agree(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    if (isinf(a) || isinf(b))
        return a == b;
    return fabs((double)a - (double)b) <=
           CHECK_LOGPROB_ABSOLUTE + CHECK_LOGPROB_RELATIVE * fabs((double)a);
}

static void compare_pair(check_state *state, int first, int second, const char *label,
                         size_t outputs, const int32_t *tokens_a, const float *logprobs_a,
                         const int32_t *tokens_b, const float *logprobs_b, int32_t samples)
{
    pair_record *record = &state->pairs[first][second];
    size_t i;
    for (i = 0; i < outputs; ++i) {
        record->compared++;
        if (tokens_a[i] == tokens_b[i]) {
            record->agreed++;
            if (!logprobs_agree(logprobs_a[i], logprobs_b[i]))
                record->logprob_mismatches++;
            if (isfinite(logprobs_a[i]) && isfinite(logprobs_b[i])) {
                double difference = fabs((double)logprobs_a[i] - (double)logprobs_b[i]);
                if (difference > record->logprob_max_difference)
                    record->logprob_max_difference = difference;
            }
        } else {
            report(state, "%s vs %s, %s: row %lld sample %lld: token %d vs %d",
                   state->participants[first].name, state->participants[second].name, label,
                   (long long)(i / (size_t)samples), (long long)(i % (size_t)samples),
                   (int)tokens_a[i], (int)tokens_b[i]);
        }
    }
}

/* ---- batch composition ----------------------------------------------------- */

/* The batch rows [first, first + count), as a batch of its own. */
static check_batch sub_batch(const check_batch *batch, int64_t first, int64_t count)
{
    check_batch part = *batch;
    size_t element = cli_dtype_size(batch->dtype);
    part.rows = count;
    part.logits = (const char *)batch->logits + (size_t)first * (size_t)batch->row_stride * element;
#define SHIFT(field) \
    if (part.params.field) part.params.field += first
    SHIFT(temperature_per_row);
    SHIFT(top_k_per_row);
    SHIFT(top_p_per_row);
    SHIFT(min_p_per_row);
    SHIFT(seed_per_row);
#undef SHIFT
    return part;
}

static int compare_composition(check_state *state, int who, const char *label,
                               const int32_t *expected, const int32_t *got, int64_t first_row,
                               int64_t rows, int32_t samples, const char *how)
{
    int64_t i;
    for (i = 0; i < rows * samples; ++i) {
        state->composition_compared[who]++;
        if (expected[first_row * samples + i] == got[i])
            state->composition_agreed[who]++;
        else
            report(state, "%s, %s: row %lld %s: token %d, in the whole batch %d",
                   state->participants[who].name, label, (long long)(first_row + i / samples), how,
                   (int)got[i], (int)expected[first_row * samples + i]);
    }
    return 0;
}

/* With per-row seeds a row's tokens may not depend on its batch: rows alone,
 * the batch split in two, and the batch in reverse order must all give the
 * tokens of the whole batch. */
static int check_composition(check_state *state, int who, const char *label,
                             const check_batch *batch, const int32_t *expected)
{
    participant *runner = &state->participants[who];
    int32_t samples = batch->params.num_samples;
    size_t rows = (size_t)batch->rows, element = cli_dtype_size(batch->dtype);
    size_t row_bytes = (size_t)batch->row_stride * element;
    int32_t *tokens = malloc(rows * (size_t)samples * sizeof *tokens);
    float *logprobs = malloc(rows * (size_t)samples * sizeof *logprobs);
    int64_t alone[3];
    int64_t split;
    int i, failed = 0;
    if (!tokens || !logprobs) {
        free(tokens);
        free(logprobs);
        return -1;
    }
    alone[0] = 0;
    alone[1] = batch->rows / 2;
    alone[2] = batch->rows - 1;
    for (i = 0; i < 3 && !failed; ++i) {
        check_batch part = sub_batch(batch, alone[i], 1);
        if (run_batch(runner, &part, tokens, logprobs) != 0)
            failed = 1;
        else
            compare_composition(state, who, label, expected, tokens, alone[i], 1, samples,
                                "alone");
    }
    split = batch->rows / 3 + 1;
    if (!failed && split < batch->rows) {
        check_batch head = sub_batch(batch, 0, split);
        check_batch tail = sub_batch(batch, split, batch->rows - split);
        if (run_batch(runner, &head, tokens, logprobs) != 0)
            failed = 1;
        else
            compare_composition(state, who, label, expected, tokens, 0, split, samples,
                                "in the first part of a split batch");
        if (!failed && run_batch(runner, &tail, tokens, logprobs) != 0)
            failed = 1;
        else if (!failed)
            compare_composition(state, who, label, expected, tokens, split, batch->rows - split,
                                samples, "in the second part of a split batch");
    }
    if (!failed && batch->rows > 1) {
        /* Reverse the rows and every per-row array. */
        check_batch reversed = *batch;
        char *logits = malloc(rows * row_bytes);
        float *temperature = NULL, *top_p = NULL, *min_p = NULL;
        int32_t *top_k = NULL;
        uint64_t *seeds = NULL;
        size_t r;
        if (batch->params.temperature_per_row) {
            temperature = malloc(rows * sizeof *temperature);
            top_k = malloc(rows * sizeof *top_k);
            top_p = malloc(rows * sizeof *top_p);
            min_p = malloc(rows * sizeof *min_p);
        }
        seeds = malloc(rows * sizeof *seeds);
        if (!logits || !seeds || (batch->params.temperature_per_row &&
                                  (!temperature || !top_k || !top_p || !min_p))) {
            failed = 1;
        } else {
            for (r = 0; r < rows; ++r) {
                size_t from = rows - 1 - r;
                memcpy(logits + r * row_bytes, (const char *)batch->logits + from * row_bytes,
                       row_bytes);
                seeds[r] = batch->params.seed_per_row[from];
                if (temperature) {
                    temperature[r] = batch->params.temperature_per_row[from];
                    top_k[r] = batch->params.top_k_per_row[from];
                    top_p[r] = batch->params.top_p_per_row[from];
                    min_p[r] = batch->params.min_p_per_row[from];
                }
            }
            reversed.logits = logits;
            reversed.params.seed_per_row = seeds;
            if (temperature) {
                reversed.params.temperature_per_row = temperature;
                reversed.params.top_k_per_row = top_k;
                reversed.params.top_p_per_row = top_p;
                reversed.params.min_p_per_row = min_p;
            }
            if (run_batch(runner, &reversed, tokens, logprobs) != 0) {
                failed = 1;
            } else {
                for (r = 0; r < rows; ++r)
                    compare_composition(state, who, label, expected,
                                        tokens + (rows - 1 - r) * (size_t)samples, (int64_t)r, 1,
                                        samples, "in the reversed batch");
            }
        }
        free(logits);
        free(temperature);
        free(top_k);
        free(top_p);
        free(min_p);
        free(seeds);
    }
    free(tokens);
    free(logprobs);
    return failed ? -1 : 0;
}

/* ---- one case ------------------------------------------------------------ */

static int run_case(check_state *state, int64_t rows, int64_t vocab, int64_t row_stride,
                    psm_dtype dtype, const parameter_set *set, uint64_t seed, uint64_t offset)
{
    check_batch batch;
    case_inputs inputs;
    int32_t *tokens[CHECK_MAX_PARTICIPANTS] = {NULL};
    float *logprobs[CHECK_MAX_PARTICIPANTS] = {NULL};
    int ran[CHECK_MAX_PARTICIPANTS] = {0};
    size_t outputs = (size_t)rows * (size_t)set->num_samples;
    char label[128];
    int p, q, status = 0;

    snprintf(label, sizeof label, "%lld x %lld%s %s %s", (long long)rows, (long long)vocab,
             row_stride > vocab ? " (strided)" : "", cli_dtype_name(dtype), set->name);
    memset(&batch, 0, sizeof batch);
    batch.rows = rows;
    batch.vocab = vocab;
    batch.row_stride = row_stride;
    batch.dtype = dtype;
    if (make_inputs(&batch, set, seed, &inputs) != 0) {
        cli_error("check", "out of memory for %s", label);
        free_inputs(&inputs);
        return -1;
    }
    batch.logits = inputs.logits;
    psm_params_init(&batch.params);
    batch.params.temperature = set->temperature;
    batch.params.top_k = set->top_k;
    batch.params.top_p = set->top_p;
    batch.params.min_p = set->min_p;
    batch.params.num_samples = set->num_samples;
    batch.params.seed = seed;
    batch.params.offset = offset;
    batch.params.temperature_per_row = inputs.temperature;
    batch.params.top_k_per_row = inputs.top_k;
    batch.params.top_p_per_row = inputs.top_p;
    batch.params.min_p_per_row = inputs.min_p;
    batch.params.seed_per_row = inputs.seeds;

    for (p = 0; p < state->participant_count; ++p) {
        tokens[p] = malloc(outputs * sizeof(int32_t));
        logprobs[p] = malloc(outputs * sizeof(float));
        if (!tokens[p] || !logprobs[p]) {
            cli_error("check", "out of memory for %s", label);
            status = -1;
            break;
        }
        if (run_batch(&state->participants[p], &batch, tokens[p], logprobs[p]) != 0) {
            state->failed_calls++;
            report(state, "%s, %s: the call failed (message above)", state->participants[p].name,
                   label);
            continue;
        }
        ran[p] = 1;
        validate_tokens(state, p, label, &batch, &inputs, tokens[p]);
        if (set->per_row_seeds && check_composition(state, p, label, &batch, tokens[p]) != 0) {
            state->failed_calls++;
            report(state, "%s, %s: a batch-composition call failed", state->participants[p].name,
                   label);
        }
    }
    for (p = 0; p < state->participant_count; ++p)
        for (q = p + 1; q < state->participant_count; ++q)
            if (ran[p] && ran[q])
                compare_pair(state, p, q, label, outputs, tokens[p], logprobs[p], tokens[q],
                             logprobs[q], set->num_samples);
    for (p = 0; p < state->participant_count; ++p) {
        free(tokens[p]);
        free(logprobs[p]);
    }
    free_inputs(&inputs);
    return status;
}

/* ---- chi-square against a float64 softmax -------------------------------- */

/* Upper 0.1% point of chi-square with df degrees of freedom, by the
 * Wilson-Hilferty cube approximation (accurate to well under 1% here). */
static double chi_square_critical(int df)
{
    const double z = 3.090232306167813; /* standard normal upper 0.1% point */
    double a = 2.0 / (9.0 * df);
    double cube = 1.0 - a + z * sqrt(a);
    return df * cube * cube * cube;
}

static int chi_square_test(psm_context *context, const parameter_set *set, int64_t vocab,
                           int64_t draws, uint64_t seed)
{
    float *logits = malloc((size_t)vocab * sizeof *logits);
    float *probs = malloc((size_t)vocab * sizeof *probs);
    double *expected = malloc((size_t)vocab * sizeof *expected);
    uint64_t *counts = calloc((size_t)vocab, sizeof *counts);
    int32_t *tokens = malloc((size_t)draws * sizeof *tokens);
    psm_tensor tensor, probs_tensor;
    psm_params params;
    psm_ref_params reference;
    psm_output token_output = {NULL, PSM_MEMORY_HOST}, no_logprobs = {NULL, PSM_MEMORY_HOST};
    psm_status status;
    double statistic = 0.0, pooled_expected = 0.0, pooled_observed = 0.0, distance = 0.0,
           critical;
    int64_t i;
    int bins = 0, passed = 0, failed_call = 0;

    if (!logits || !probs || !expected || !counts || !tokens) {
        cli_error("check", "out of memory for the chi-square test");
        failed_call = 1;
        goto done;
    }
    cli_fill_normal(logits, (size_t)vocab, 2.0f, seed);
    memset(&tensor, 0, sizeof tensor);
    tensor.data = logits;
    tensor.dtype = PSM_DTYPE_F32;
    tensor.memory = PSM_MEMORY_HOST;
    tensor.rows = 1;
    tensor.vocab = vocab;
    probs_tensor = tensor;
    probs_tensor.data = probs;
    psm_params_init(&params);
    params.temperature = set->temperature;
    params.top_k = set->top_k;
    params.top_p = set->top_p;
    params.min_p = set->min_p;
    params.seed = seed;
    params.num_samples = (int32_t)draws;
    token_output.data = tokens;
    status = psm_sample(context, &tensor, &params, token_output, no_logprobs);
    if (status == PSM_OK)
        status = psm_synchronize(context);
    if (status != PSM_OK) {
        cli_library_error("check", "psm_sample (chi-square)", status);
        failed_call = 1;
        goto done;
    }
    reference.temperature = set->temperature;
    reference.top_k = set->top_k;
    reference.top_p = set->top_p;
    reference.min_p = set->min_p;
    if (psm_ref_distribution(logits, vocab, &reference, expected) != 1) {
        cli_error("check", "out of memory for the float64 reference");
        failed_call = 1;
        goto done;
    }
    for (i = 0; i < draws; ++i) {
        if (tokens[i] < 0 || tokens[i] >= vocab) {
            printf("  %-28s token %d out of range\n", set->name, (int)tokens[i]);
            failed_call = 1;
            goto done;
        }
        counts[tokens[i]]++;
    }
    /* Bins with an expected count below 5 are pooled into one, as the
     * chi-square approximation needs. */
    for (i = 0; i < vocab; ++i) {
        double e = expected[i] * (double)draws;
        if (e >= 5.0) {
            double d = (double)counts[i] - e;
            statistic += d * d / e;
            ++bins;
        } else {
            pooled_expected += e;
            pooled_observed += (double)counts[i];
        }
    }
    if (pooled_expected > 0.0) {
        if (pooled_expected >= 5.0 || pooled_observed > 0.0) {
            double d = pooled_observed - pooled_expected;
            statistic += d * d / (pooled_expected > 1e-300 ? pooled_expected : 1e-300);
            ++bins;
        }
    }
    critical = chi_square_critical(bins > 1 ? bins - 1 : 1);
    passed = bins > 1 ? statistic <= critical : 1;

    status = psm_probs(context, &tensor, &params, &probs_tensor);
    if (status == PSM_OK)
        status = psm_synchronize(context);
    if (status != PSM_OK) {
        cli_library_error("check", "psm_probs (precision)", status);
        failed_call = 1;
        goto done;
    }
    for (i = 0; i < vocab; ++i)
        distance += fabs((double)probs[i] - expected[i]);
    distance *= 0.5;
    printf("  %-24s vocab %-6lld chi2 %10.2f  df %5d  critical(0.001) %9.2f  %s   "
           "TV(psm_probs, f64) %.2e\n",
           set->name, (long long)vocab, statistic, bins - 1, critical, passed ? "pass" : "FAIL",
           distance);

done:
    free(logits);
    free(probs);
    free(expected);
    free(counts);
    free(tokens);
    return failed_call ? -1 : (passed ? 0 : 1);
}

/* ---- the command ------------------------------------------------------------ */

static int parse_backend_list(const char *text, psm_backend *backends, int *device_indices,
                              int capacity)
{
    char buffer[256];
    char *item, *save = NULL;
    int count = 0;
    if (strlen(text) >= sizeof buffer)
        return -1;
    strcpy(buffer, text);
    for (item = strtok_r(buffer, ",", &save); item; item = strtok_r(NULL, ",", &save)) {
        if (count == capacity || cli_parse_backend(item, &backends[count], &device_indices[count]) != 0)
            return -1;
        ++count;
    }
    return count;
}

int cli_check(int argc, char **argv)
{
    static check_state state;
    int64_t row_budget = 20000, draws = 1000000;
    uint64_t seed = 2026;
    psm_backend requested[CHECK_MAX_PARTICIPANTS];
    int requested_devices[CHECK_MAX_PARTICIPANTS], requested_count = -1;
    int v, d, s, p, q, failures = 0, exit_status = CLI_EXIT_OK;
    int64_t total_rows = 0;
    int case_count = 0;
    psm_backend backend;

    memset(&state, 0, sizeof state);
    for (p = 0; p < argc; ++p) {
        const char *value = NULL;
        uint64_t integer = 0;
        int matched;
        if (!strcmp(argv[p], "--help") || !strcmp(argv[p], "-h")) {
            fputs(check_usage, stdout);
            return CLI_EXIT_OK;
        }
        if ((matched = cli_match_option("check", argc, argv, &p, "--rows", &value)) != 0) {
            if (matched < 0 ||
                cli_option_decimal("check", "--rows", value, 1, INT32_MAX, &integer) != 0)
                return CLI_EXIT_USAGE;
            row_budget = (int64_t)integer;
        } else if ((matched = cli_match_option("check", argc, argv, &p, "--draws", &value)) != 0) {
            if (matched < 0 ||
                cli_option_decimal("check", "--draws", value, 0, 100000000, &integer) != 0)
                return CLI_EXIT_USAGE;
            draws = (int64_t)integer;
        } else if ((matched = cli_match_option("check", argc, argv, &p, "--seed", &value)) != 0) {
            if (matched < 0 ||
                cli_option_decimal("check", "--seed", value, 0, UINT64_MAX, &seed) != 0)
                return CLI_EXIT_USAGE;
        } else if ((matched = cli_match_option("check", argc, argv, &p, "--backend", &value)) != 0) {
            if (matched < 0)
                return CLI_EXIT_USAGE;
            /* Each named backend adds up to two participants (host and
             * device memory) beside the two CPU ones. */
            requested_count = parse_backend_list(value, requested, requested_devices,
                                                 CHECK_MAX_PARTICIPANTS / 2 - 1);
            if (requested_count < 0) {
                cli_error("check", "bad --backend '%s'", value);
                return CLI_EXIT_USAGE;
            }
        } else {
            cli_error("check", "unknown argument '%s' (see polysample check --help)", argv[p]);
            return CLI_EXIT_USAGE;
        }
    }
    state.show_progress = isatty(STDERR_FILENO);

    /* The participants: the CPU backend at 1 and 2 threads, then every other
     * backend from host memory and, where the tool can, device memory. */
    if (open_participant(&state.participants[0], "cpu/1-thread", PSM_BACKEND_CPU, -1, 1, 0) != 0 ||
        open_participant(&state.participants[1], "cpu/2-threads", PSM_BACKEND_CPU, -1, 2, 0) != 0)
        return CLI_EXIT_FAILURE;
    state.participant_count = 2;
    if (requested_count < 0) {
        requested_count = 0;
        /* Every device of every available backend (OpenCL on a GPU driver
         * and on PoCL, say), as far as the participant table holds them. */
        for (backend = PSM_BACKEND_CUDA; backend < PSM_BACKEND_COUNT; ++backend) {
            int devices = psm_backend_available(backend, NULL) ? psm_backend_device_count(backend)
                                                               : 0;
            for (int device = 0; device < devices; ++device) {
                if (requested_count == CHECK_MAX_PARTICIPANTS / 2 - 1) {
                    fprintf(stderr, "polysample check: more devices than it compares at once; "
                                    "name them with --backend\n");
                    break;
                }
                requested[requested_count] = backend;
                requested_devices[requested_count++] = devices > 1 ? device : -1;
            }
        }
    }
    for (q = 0; q < requested_count; ++q) {
        char name[48];
        backend = requested[q];
        if (backend == PSM_BACKEND_AUTO) {
            participant probe;
            if (open_participant(&probe, "auto", PSM_BACKEND_AUTO, -1, 0, 0) != 0) {
                exit_status = CLI_EXIT_FAILURE;
                goto done;
            }
            backend = psm_context_backend(probe.context);
            close_participant(&probe);
        }
        if (backend == PSM_BACKEND_CPU)
            continue; /* already here, at 1 and 2 threads */
        if (requested_devices[q] >= 0)
            snprintf(name, sizeof name, "%s:%d", psm_backend_name(backend), requested_devices[q]);
        else
            snprintf(name, sizeof name, "%s", psm_backend_name(backend));
        if (open_participant(&state.participants[state.participant_count], name, backend,
                             requested_devices[q], 0, 0) != 0) {
            exit_status = CLI_EXIT_FAILURE;
            goto done;
        }
        state.participant_count++;
        if (bench_device_find(backend)) {
            size_t length = strlen(name);
            snprintf(name + length, sizeof name - length, "/device-memory");
            if (open_participant(&state.participants[state.participant_count], name, backend,
                                 requested_devices[q], 0, 1) != 0) {
                exit_status = CLI_EXIT_FAILURE;
                goto done;
            }
            state.participant_count++;
        }
    }
    printf("polysample %s check: participants:", psm_version_string());
    for (p = 0; p < state.participant_count; ++p)
        printf("%s %s", p ? "," : "", state.participants[p].name);
    printf("\n");
    for (p = 0; p < state.participant_count; ++p)
        printf("  %-24s %s\n", state.participants[p].name,
               psm_context_device_name(state.participants[p].context));
    printf("\nproblems (at most %d listed):\n", CHECK_MAX_REPORTED);
    fflush(stdout);

    for (v = 0; v < CHECK_VOCAB_COUNT; ++v)
        for (d = 0; d < CHECK_DTYPE_COUNT; ++d)
            for (s = 0; s < PARAMETER_SET_COUNT; ++s) {
                int64_t vocab = check_vocabs[v].vocab;
                double share = check_vocabs[v].row_share / (CHECK_DTYPE_COUNT * PARAMETER_SET_COUNT);
                int64_t rows = (int64_t)(share * (double)row_budget);
                uint64_t case_seed = cli_random_u64(seed, (uint64_t)case_count);
                if (rows < 8)
                    rows = 8;
                if (state.show_progress)
                    fprintf(stderr, "\rcase %d/%d: %lld x %lld %s %s            ", case_count + 1,
                            CHECK_VOCAB_COUNT * CHECK_DTYPE_COUNT * PARAMETER_SET_COUNT,
                            (long long)rows, (long long)vocab, cli_dtype_name(check_dtypes[d]),
                            parameter_sets[s].name);
                /* Every other case has padded rows; offsets use both words. */
                int64_t row_stride = case_count % 2 ? vocab + 5 : vocab;
                uint64_t offset = (uint64_t)case_count * 0x100000007ull;
                if (run_case(&state, rows, vocab, row_stride, check_dtypes[d], &parameter_sets[s],
                             case_seed, offset) != 0) {
                    exit_status = CLI_EXIT_FAILURE;
                    goto done;
                }
                total_rows += rows;
                ++case_count;
            }
    if (state.show_progress)
        fprintf(stderr, "\r%70s\r", "");
    if (state.reported == 0)
        printf("  none\n");

    printf("\n%d cases, %lld rows per participant\n", case_count, (long long)total_rows);
    printf("\ntoken agreement per pair (must be 100%%), logprob max |difference|:\n");
    for (p = 0; p < state.participant_count; ++p)
        for (q = p + 1; q < state.participant_count; ++q) {
            const pair_record *record = &state.pairs[p][q];
            int agree = record->compared > 0 && record->agreed == record->compared;
            printf("  %-24s vs %-24s %10llu / %-10llu %8.4f%%  logprob %.2e%s  %s\n",
                   state.participants[p].name, state.participants[q].name,
                   (unsigned long long)record->agreed, (unsigned long long)record->compared,
                   record->compared ? 100.0 * (double)record->agreed / (double)record->compared : 0.0,
                   record->logprob_max_difference,
                   record->logprob_mismatches ? " (out of tolerance)" : "",
                   agree && !record->logprob_mismatches ? "ok" : "FAIL");
            failures += !agree || record->logprob_mismatches;
        }
    printf("\nbatch composition, per-row seeds (row alone, split batch, reversed batch):\n");
    for (p = 0; p < state.participant_count; ++p) {
        int agree = state.composition_agreed[p] == state.composition_compared[p] &&
                    state.composition_compared[p] > 0;
        printf("  %-24s %10llu / %-10llu %s\n", state.participants[p].name,
               (unsigned long long)state.composition_agreed[p],
               (unsigned long long)state.composition_compared[p], agree ? "ok" : "FAIL");
        failures += !agree;
    }
    printf("\ntoken validity (range, masked tokens, bad rows give -1, greedy is the argmax):\n");
    for (p = 0; p < state.participant_count; ++p) {
        printf("  %-24s %llu invalid  %s\n", state.participants[p].name,
               (unsigned long long)state.invalid_tokens[p],
               state.invalid_tokens[p] ? "FAIL" : "ok");
        failures += state.invalid_tokens[p] != 0;
    }
    if (state.failed_calls) {
        printf("\n%llu calls failed\n", (unsigned long long)state.failed_calls);
        failures++;
    }

    if (draws > 0) {
        static const parameter_set chi_sets[] = {
            {"plain T=1", 1.0f, 0, 1.0f, 0.0f, 1, 0, 0},
            {"T=0.7 top-k 50", 0.7f, 50, 1.0f, 0.0f, 1, 0, 0},
            {"top-p 0.9", 1.0f, 0, 0.9f, 0.0f, 1, 0, 0},
            {"T=1.3 min-p 0.05", 1.3f, 0, 1.0f, 0.05f, 1, 0, 0},
            {"T=0.8 k100 p0.95 minp0.01", 0.8f, 100, 0.95f, 0.01f, 1, 0, 0},
        };
        static const int64_t chi_vocabs[] = {5000, 32000, 5000, 5000, 32000};
        int t;
        printf("\nchi-square vs float64 softmax, %lld draws each, CPU backend (alpha 0.001):\n",
               (long long)draws);
        for (t = 0; t < (int)(sizeof chi_sets / sizeof chi_sets[0]); ++t) {
            int outcome = chi_square_test(state.participants[1].context, &chi_sets[t],
                                          chi_vocabs[t], draws, cli_random_u64(seed ^ 0xc41u, (uint64_t)t));
            if (outcome != 0)
                failures++;
        }
    }

    printf("\n%s\n", failures ? "check FAILED" : "check passed");
    exit_status = failures ? CLI_EXIT_FAILURE : CLI_EXIT_OK;

done:
    for (p = 0; p < state.participant_count; ++p)
        close_participant(&state.participants[p]);
    return exit_status;
}
