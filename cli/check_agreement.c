/* check_agreement.c: one `polysample check` case on every participant, and
 * what is checked of the tokens: validity on the host (range, masked tokens,
 * bad rows, greedy argmax), agreement of tokens and logprobs between every
 * pair of participants, and, with per-row seeds, that a row's tokens do not
 * depend on its batch. */
#include "check.h"
#include "cli_util.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Logprobs agree "to float rounding": a log taken by another libm or device
 * may differ by a few ulps, so the bound is loose next to that and tight
 * next to any real difference in the distribution. */
#define CHECK_LOGPROB_ABSOLUTE 1e-4
#define CHECK_LOGPROB_RELATIVE 1e-5

void check_report(check_state *state, const char *format, ...)
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
    for (row = 0; row < check_output_rows(batch); ++row) {
        int64_t logits_row = batch->params.row_indices ? batch->params.row_indices[row] : row;
        const float *values = inputs->values + logits_row * batch->vocab;
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
                check_report(state, "%s, %s: row %lld sample %lld: %s (token %d)",
                             state->participants[who].name, label, (long long)row,
                             (long long)sample, problem, (int)token);
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
            check_report(state, "%s vs %s, %s: row %lld sample %lld: token %d vs %d",
                         state->participants[first].name, state->participants[second].name, label,
                         (long long)(i / (size_t)samples), (long long)(i % (size_t)samples),
                         (int)tokens_a[i], (int)tokens_b[i]);
        }
    }
}

/* ---- batch composition ----------------------------------------------------- */

/* The batch rows [first, first + count), as a batch of its own (a batch
 * without row indices: logits rows are output rows). */
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
    SHIFT(offset_per_row);
    SHIFT(subsequence_per_row);
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
            check_report(state, "%s, %s: row %lld %s: token %d, in the whole batch %d",
                         state->participants[who].name, label, (long long)(first_row + i / samples),
                         how, (int)got[i], (int)expected[first_row * samples + i]);
    }
    return 0;
}

/* With per-row seeds a row's tokens may not depend on its batch: rows alone,
 * the batch split in two, and the batch in reverse order must all give the
 * tokens of the whole batch (with per-row offsets and subsequences, when
 * the case has them, moving with their rows). */
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
        if (check_run_batch(runner, &part, tokens, logprobs) != 0)
            failed = 1;
        else
            compare_composition(state, who, label, expected, tokens, alone[i], 1, samples,
                                "alone");
    }
    split = batch->rows / 3 + 1;
    if (!failed && split < batch->rows) {
        check_batch head = sub_batch(batch, 0, split);
        check_batch tail = sub_batch(batch, split, batch->rows - split);
        if (check_run_batch(runner, &head, tokens, logprobs) != 0)
            failed = 1;
        else
            compare_composition(state, who, label, expected, tokens, 0, split, samples,
                                "in the first part of a split batch");
        if (!failed && check_run_batch(runner, &tail, tokens, logprobs) != 0)
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
        uint64_t *seeds = NULL, *offsets = NULL;
        uint32_t *subsequences = NULL;
        size_t r;
        if (batch->params.temperature_per_row) {
            temperature = malloc(rows * sizeof *temperature);
            top_k = malloc(rows * sizeof *top_k);
            top_p = malloc(rows * sizeof *top_p);
            min_p = malloc(rows * sizeof *min_p);
        }
        seeds = malloc(rows * sizeof *seeds);
        if (batch->params.offset_per_row)
            offsets = malloc(rows * sizeof *offsets);
        if (batch->params.subsequence_per_row)
            subsequences = malloc(rows * sizeof *subsequences);
        if (!logits || !seeds || (batch->params.temperature_per_row &&
                                  (!temperature || !top_k || !top_p || !min_p)) ||
            (batch->params.offset_per_row && !offsets) ||
            (batch->params.subsequence_per_row && !subsequences)) {
            failed = 1;
        } else {
            for (r = 0; r < rows; ++r) {
                size_t from = rows - 1 - r;
                memcpy(logits + r * row_bytes, (const char *)batch->logits + from * row_bytes,
                       row_bytes);
                seeds[r] = batch->params.seed_per_row[from];
                if (offsets)
                    offsets[r] = batch->params.offset_per_row[from];
                if (subsequences)
                    subsequences[r] = batch->params.subsequence_per_row[from];
                if (temperature) {
                    temperature[r] = batch->params.temperature_per_row[from];
                    top_k[r] = batch->params.top_k_per_row[from];
                    top_p[r] = batch->params.top_p_per_row[from];
                    min_p[r] = batch->params.min_p_per_row[from];
                }
            }
            reversed.logits = logits;
            reversed.params.seed_per_row = seeds;
            if (offsets)
                reversed.params.offset_per_row = offsets;
            if (subsequences)
                reversed.params.subsequence_per_row = subsequences;
            if (temperature) {
                reversed.params.temperature_per_row = temperature;
                reversed.params.top_k_per_row = top_k;
                reversed.params.top_p_per_row = top_p;
                reversed.params.min_p_per_row = min_p;
            }
            if (check_run_batch(runner, &reversed, tokens, logprobs) != 0) {
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
        free(offsets);
        free(subsequences);
    }
    free(tokens);
    free(logprobs);
    return failed ? -1 : 0;
}

/* ---- one case ------------------------------------------------------------ */

int check_run_case(check_state *state, int64_t rows, int64_t vocab, int64_t row_stride,
                   psm_dtype dtype, const parameter_set *set, uint64_t seed, uint64_t offset)
{
    check_batch batch;
    case_inputs inputs;
    int32_t *tokens[CHECK_MAX_PARTICIPANTS] = {NULL};
    float *logprobs[CHECK_MAX_PARTICIPANTS] = {NULL};
    int ran[CHECK_MAX_PARTICIPANTS] = {0};
    size_t outputs;
    char label[128];
    int p, q, status = 0;

    snprintf(label, sizeof label, "%lld x %lld%s %s %s", (long long)rows, (long long)vocab,
             row_stride > vocab ? " (strided)" : "", cli_dtype_name(dtype), set->name);
    memset(&batch, 0, sizeof batch);
    batch.rows = rows;
    batch.vocab = vocab;
    batch.row_stride = row_stride;
    batch.dtype = dtype;
    if (check_make_inputs(&batch, set, seed, offset, &inputs) != 0) {
        cli_error("check", "out of memory for %s", label);
        check_free_inputs(&inputs);
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
    batch.params.offset_per_row = inputs.offsets;
    batch.params.subsequence_per_row = inputs.subsequences;
    if (inputs.row_indices) {
        batch.params.row_indices = inputs.row_indices;
        batch.params.output_rows = inputs.output_rows;
    }
    if (set->request_state == REQUEST_STATE_POINTERS) {
        /* The scalars differ from the values pointed to, which win. */
        batch.params.seed_pointer = &inputs.seed_value;
        batch.params.offset_pointer = &inputs.offset_value;
        batch.params.seed = ~inputs.seed_value;
        batch.params.offset = ~inputs.offset_value;
    }
    outputs = (size_t)inputs.output_rows * (size_t)set->num_samples;

    for (p = 0; p < state->participant_count; ++p) {
        tokens[p] = malloc(outputs * sizeof(int32_t));
        logprobs[p] = malloc(outputs * sizeof(float));
        if (!tokens[p] || !logprobs[p]) {
            cli_error("check", "out of memory for %s", label);
            status = -1;
            break;
        }
        if (check_run_batch(&state->participants[p], &batch, tokens[p], logprobs[p]) != 0) {
            state->failed_calls++;
            check_report(state, "%s, %s: the call failed (message above)",
                         state->participants[p].name, label);
            continue;
        }
        ran[p] = 1;
        validate_tokens(state, p, label, &batch, &inputs, tokens[p]);
        if (set->per_row_seeds && check_composition(state, p, label, &batch, tokens[p]) != 0) {
            state->failed_calls++;
            check_report(state, "%s, %s: a batch-composition call failed",
                         state->participants[p].name, label);
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
    check_free_inputs(&inputs);
    return status;
}


int check_print_agreement(const check_state *state)
{
    int p, q, failures = 0;
    printf("\ntoken agreement per pair (must be 100%%), logprob max |difference|:\n");
    for (p = 0; p < state->participant_count; ++p)
        for (q = p + 1; q < state->participant_count; ++q) {
            const pair_record *record = &state->pairs[p][q];
            int agree = record->compared > 0 && record->agreed == record->compared;
            printf("  %-24s vs %-24s %10llu / %-10llu %8.4f%%  logprob %.2e%s  %s\n",
                   state->participants[p].name, state->participants[q].name,
                   (unsigned long long)record->agreed, (unsigned long long)record->compared,
                   record->compared
                       ? 100.0 * (double)record->agreed / (double)record->compared
                       : 0.0,
                   record->logprob_max_difference,
                   record->logprob_mismatches ? " (out of tolerance)" : "",
                   agree && !record->logprob_mismatches ? "ok" : "FAIL");
            failures += !agree || record->logprob_mismatches;
        }
    printf("\nbatch composition, per-row seeds (row alone, split batch, reversed batch):\n");
    for (p = 0; p < state->participant_count; ++p) {
        int agree = state->composition_agreed[p] == state->composition_compared[p] &&
                    state->composition_compared[p] > 0;
        printf("  %-24s %10llu / %-10llu %s\n", state->participants[p].name,
               (unsigned long long)state->composition_agreed[p],
               (unsigned long long)state->composition_compared[p], agree ? "ok" : "FAIL");
        failures += !agree;
    }
    printf("\ntoken validity (range, masked tokens, bad rows give -1, greedy is the argmax):\n");
    for (p = 0; p < state->participant_count; ++p) {
        printf("  %-24s %llu invalid  %s\n", state->participants[p].name,
               (unsigned long long)state->invalid_tokens[p],
               state->invalid_tokens[p] ? "FAIL" : "ok");
        failures += state->invalid_tokens[p] != 0;
    }
    return failures;
}
