/* check_agreement.c: one `polysample check` case on every participant, and
 * what is checked of the tokens: validity on the host (range, masked tokens,
 * bad rows, greedy argmax; with logit processing, of the processed logits;
 * the rules of top-N lists and ranks), agreement of tokens, logprobs, top-N
 * lists and ranks between every pair of participants, and, with per-row
 * seeds, that a row's tokens do not depend on its batch. A participant that
 * refuses a case's processing or top-N logprobs (a feature its backend does
 * not run yet) is listed as such and left out of the case. */
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

/* What an output row samples: the logits row it reads or, with logit
 * processing, that row as the float64 reference processes it. */
static const float *sampled_values(const check_batch *batch, const case_inputs *inputs,
                                   int64_t row)
{
    int64_t logits_row = batch->params.row_indices ? batch->params.row_indices[row] : row;
    if (inputs->processed)
        return inputs->processed + row * batch->vocab;
    return inputs->values + logits_row * batch->vocab;
}

/* The reference rounds its processed logits once where the contract rounds
 * each float operation (a penalty, each bias entry), so the two differ by a
 * few ulps of the operands, all below 32 in magnitude here: a greedy token
 * within this of the reference's maximum is one of a near-tie. */
#define CHECK_PROCESSED_TIE 1e-5f

/* Tokens must be in range, never a masked token, -1 exactly on bad rows, and
 * the argmax (lowest index on ties) when the row is greedy. */
static void validate_tokens(check_state *state, int who, const char *label,
                            const check_batch *batch, const case_inputs *inputs,
                            const int32_t *tokens)
{
    int64_t row, sample;
    int32_t samples = batch->params.num_samples;
    for (row = 0; row < check_output_rows(batch); ++row) {
        const float *values = sampled_values(batch, inputs, row);
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
            else if (argmax >= 0 && token != argmax &&
                     !(inputs->processed &&
                       values[argmax] - values[token] <= CHECK_PROCESSED_TIE))
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

int check_logprobs_agree(float a, float b)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    if (isinf(a) || isinf(b))
        return a == b;
    return fabs((double)a - (double)b) <=
           CHECK_LOGPROB_ABSOLUTE + CHECK_LOGPROB_RELATIVE * fabs((double)a);
}

/* ---- top-N logprobs ------------------------------------------------------- */

/* A logit as the contract reads it (magnitudes below 2^-64 and -0 are +0),
 * for rank order on the host. */
static float read_logit(float x)
{
    return fabsf(x) < 0x1p-64f ? 0.0f : x;
}

/* Is token i ranked before token j (higher logit, then lower index)? */
static int ranked_before(const float *values, int64_t i, int64_t j)
{
    float a = read_logit(values[i]), b = read_logit(values[j]);
    return a > b || (a == b && i < j);
}

/* Raw top-N: the logprob the contract gives raw token i is its float64
 * log-softmax to float rounding; the bound is that of test_top_logprobs. */
static int raw_logprob_matches(float got, double expected)
{
    return fabs((double)got - expected) <= 1e-5 + 1e-6 * fabs(expected);
}

static void report_top(check_state *state, int who, const char *label, int64_t row,
                       const char *problem, long long detail)
{
    state->invalid_top[who]++;
    check_report(state, "%s, %s: row %lld: %s (%lld)", state->participants[who].name, label,
                 (long long)row, problem, detail);
}

/* The rules of the top-N outputs that the host can check exactly. Bad
 * rows: tokens and ranks -1, logprobs NaN. Every mode: a drawn token of
 * rank k <= N is the list's entry k, with the logprob its draw reported.
 * Raw mode, from the logits as given: the list is the first N valid tokens
 * in rank order (then -1 and -inf), each with its log-softmax, and each
 * drawn token's rank counts the valid tokens ranked before it. */
static void validate_top(check_state *state, int who, const char *label,
                         const check_batch *batch, const case_inputs *inputs,
                         const check_outputs *out)
{
    const int32_t count = batch->top_count, samples = batch->params.num_samples;
    const int64_t vocab = batch->vocab;
    int64_t row, i;
    for (row = 0; row < check_output_rows(batch); ++row) {
        int64_t logits_row = batch->params.row_indices ? batch->params.row_indices[row] : row;
        const float *raw = inputs->values + logits_row * vocab;
        const int32_t *tokens = out->top_tokens + row * count;
        const float *logprobs = out->top_logprobs + row * count;
        const int32_t *ranks = out->ranks + row * samples;
        int32_t e, j;
        if (row_is_bad(sampled_values(batch, inputs, row), vocab)) {
            for (e = 0; e < count; ++e)
                if (tokens[e] != -1 || !isnan(logprobs[e]))
                    report_top(state, who, label, row, "a bad row's list entry is not -1, NaN",
                               e);
            for (j = 0; j < samples; ++j)
                if (ranks[j] != -1)
                    report_top(state, who, label, row, "a bad row's rank is not -1", ranks[j]);
            continue;
        }
        for (j = 0; j < samples; ++j) {
            int32_t drawn = out->tokens[row * samples + j], rank = ranks[j];
            if (rank < 1)
                report_top(state, who, label, row, "a drawn token's rank is below 1", rank);
            else if (rank <= count && tokens[rank - 1] != drawn)
                report_top(state, who, label, row, "the list's entry at a drawn token's rank is "
                           "another token", drawn);
            else if (rank <= count && batch->top_mode == PSM_LOGPROBS_PROCESSED &&
                     !check_logprobs_agree(logprobs[rank - 1], out->logprobs[row * samples + j]))
                report_top(state, who, label, row, "a listed drawn token's logprob differs from "
                           "its draw's", drawn);
        }
        if (batch->top_mode != PSM_LOGPROBS_RAW)
            continue;
        double max = -INFINITY, sum = 0.0;
        int64_t valid = 0;
        for (i = 0; i < vocab; ++i)
            if (isfinite(raw[i]) && read_logit(raw[i]) > max)
                max = read_logit(raw[i]);
        for (i = 0; i < vocab; ++i)
            if (isfinite(raw[i])) {
                sum += exp((double)read_logit(raw[i]) - max);
                ++valid;
            }
        for (e = 0; e < count; ++e) {
            int32_t token = tokens[e];
            if (e >= valid) {
                if (token != -1 || logprobs[e] != -INFINITY)
                    report_top(state, who, label, row, "an entry past the valid tokens is not "
                               "-1, -inf", e);
                continue;
            }
            if (token < 0 || token >= vocab || !isfinite(raw[token])) {
                report_top(state, who, label, row, "a raw list entry is not a valid token", token);
                continue;
            }
            /* Entry e holds the token with exactly e valid tokens before it. */
            int64_t before = 0;
            for (i = 0; i < vocab; ++i)
                before += isfinite(raw[i]) && ranked_before(raw, i, token);
            if (before != e)
                report_top(state, who, label, row, "a raw list entry is out of rank order",
                           token);
            else if (!raw_logprob_matches(logprobs[e],
                                          (double)read_logit(raw[token]) - max - log(sum)))
                report_top(state, who, label, row, "a raw logprob is not the log-softmax", token);
        }
        for (j = 0; j < samples; ++j) {
            int32_t drawn = out->tokens[row * samples + j];
            int64_t before = 0;
            for (i = 0; i < vocab; ++i)
                before += isfinite(raw[i]) && ranked_before(raw, i, drawn);
            if (ranks[j] != before + 1)
                report_top(state, who, label, row, "a raw rank does not count the tokens ranked "
                           "before it", ranks[j]);
        }
    }
}

static void compare_top(check_state *state, int first, int second, const char *label,
                        size_t rows, int32_t count, int32_t samples, const check_outputs *a,
                        const check_outputs *b)
{
    pair_record *record = &state->pairs[first][second];
    size_t k;
    for (k = 0; k < rows * (size_t)count + rows * (size_t)samples; ++k) {
        int is_rank = k >= rows * (size_t)count;
        size_t at = is_rank ? k - rows * (size_t)count : k;
        int32_t token_a = is_rank ? a->ranks[at] : a->top_tokens[at];
        int32_t token_b = is_rank ? b->ranks[at] : b->top_tokens[at];
        record->top_compared++;
        if (token_a != token_b) {
            check_report(state, "%s vs %s, %s: row %lld: %s %d vs %d",
                         state->participants[first].name, state->participants[second].name,
                         label, (long long)(at / (size_t)(is_rank ? samples : count)),
                         is_rank ? "rank" : "top-N token", (int)token_a, (int)token_b);
            continue;
        }
        record->top_agreed++;
        if (is_rank)
            continue;
        if (!check_logprobs_agree(a->top_logprobs[at], b->top_logprobs[at]))
            record->top_logprob_mismatches++;
        if (isfinite(a->top_logprobs[at]) && isfinite(b->top_logprobs[at])) {
            double difference = fabs((double)a->top_logprobs[at] - (double)b->top_logprobs[at]);
            if (difference > record->top_logprob_max_difference)
                record->top_logprob_max_difference = difference;
        }
    }
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
            if (!check_logprobs_agree(logprobs_a[i], logprobs_b[i]))
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
 * without row indices: logits rows are output rows). Its processing, when
 * the batch has some, is written to *lists: the same entry arrays, the
 * offsets and per-row arrays from row `first` on. */
static check_batch sub_batch(const check_batch *batch, int64_t first, int64_t count,
                             psm_logit_processing *lists)
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
    if (batch->processing) {
        *lists = *batch->processing;
#define SHIFT(field, by) \
    if (lists->field) lists->field += (by)
        SHIFT(allowed_mask, first * lists->allowed_mask_words);
        SHIFT(bias_offsets, first);
        SHIFT(history_offsets, first);
        SHIFT(prompt_offsets, first);
        SHIFT(repetition_penalty_per_row, first);
        SHIFT(frequency_penalty_per_row, first);
        SHIFT(presence_penalty_per_row, first);
#undef SHIFT
        part.processing = lists;
    }
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

/* A row list (CSR) in reverse row order, into *out (cli_row_lists_free). */
static int reverse_list(const int64_t *offsets, const int32_t *tokens, const float *values,
                        size_t rows, cli_row_lists *out)
{
    size_t entries = (size_t)offsets[rows], r;
    out->offsets = malloc((rows + 1) * sizeof(int64_t));
    out->tokens = malloc((entries ? entries : 1) * sizeof(int32_t));
    out->values = values ? malloc((entries ? entries : 1) * sizeof(float)) : NULL;
    if (!out->offsets || !out->tokens || (values && !out->values))
        return -1;
    out->offsets[0] = 0;
    for (r = 0; r < rows; ++r) {
        size_t from = rows - 1 - r;
        int64_t length = offsets[from + 1] - offsets[from];
        out->offsets[r + 1] = out->offsets[r] + length;
        memcpy(out->tokens + out->offsets[r], tokens + offsets[from],
               (size_t)length * sizeof(int32_t));
        if (values)
            memcpy(out->values + out->offsets[r], values + offsets[from],
                   (size_t)length * sizeof(float));
    }
    out->entries = (int64_t)entries;
    return 0;
}

/* A per-row array of `size`-byte entries in reverse row order (NULL stays
 * NULL); *failed is set when out of memory. */
static void *reversed_rows(const void *rows_in, size_t rows, size_t size, int *failed)
{
    char *out;
    size_t r;
    if (!rows_in)
        return NULL;
    out = malloc(rows * size);
    if (!out) {
        *failed = 1;
        return NULL;
    }
    for (r = 0; r < rows; ++r)
        memcpy(out + r * size, (const char *)rows_in + (rows - 1 - r) * size, size);
    return out;
}

/* The batch in reverse row order: its logits and every per-row array and
 * list, in memory of its own (free_reversed_batch). */
typedef struct reversed_batch {
    check_batch batch;
    psm_logit_processing processing;
    cli_row_lists bias, history, prompt;
    void *arrays[12];
    int array_count;
} reversed_batch;

static void free_reversed_batch(reversed_batch *reversed)
{
    int i;
    for (i = 0; i < reversed->array_count; ++i)
        free(reversed->arrays[i]);
    cli_row_lists_free(&reversed->bias);
    cli_row_lists_free(&reversed->history);
    cli_row_lists_free(&reversed->prompt);
}

static int reverse_batch(const check_batch *batch, reversed_batch *reversed)
{
    const size_t rows = (size_t)batch->rows;
    const size_t row_bytes = (size_t)batch->row_stride * cli_dtype_size(batch->dtype);
    psm_params *params = &reversed->batch.params;
    int failed = 0;
    memset(reversed, 0, sizeof *reversed);
    reversed->batch = *batch;
#define REVERSE(pointer, size)                                                           \
    do {                                                                                 \
        void *copy = reversed_rows((pointer), rows, (size), &failed);                    \
        reversed->arrays[reversed->array_count++] = copy;                                \
        (pointer) = copy;                                                                \
    } while (0)
    REVERSE(reversed->batch.logits, row_bytes);
    REVERSE(params->temperature_per_row, sizeof(float));
    REVERSE(params->top_k_per_row, sizeof(int32_t));
    REVERSE(params->top_p_per_row, sizeof(float));
    REVERSE(params->min_p_per_row, sizeof(float));
    REVERSE(params->seed_per_row, sizeof(uint64_t));
    REVERSE(params->offset_per_row, sizeof(uint64_t));
    REVERSE(params->subsequence_per_row, sizeof(uint32_t));
    if (batch->processing) {
        psm_logit_processing *p = &reversed->processing;
        *p = *batch->processing;
        REVERSE(p->allowed_mask, (size_t)p->allowed_mask_words * sizeof(uint32_t));
        REVERSE(p->repetition_penalty_per_row, sizeof(float));
        REVERSE(p->frequency_penalty_per_row, sizeof(float));
        REVERSE(p->presence_penalty_per_row, sizeof(float));
        if (p->bias_offsets)
            failed |= reverse_list(p->bias_offsets, p->bias_tokens, p->bias_values, rows,
                                   &reversed->bias) != 0;
        if (p->history_offsets)
            failed |= reverse_list(p->history_offsets, p->history_tokens, NULL, rows,
                                   &reversed->history) != 0;
        if (p->prompt_offsets)
            failed |= reverse_list(p->prompt_offsets, p->prompt_tokens, NULL, rows,
                                   &reversed->prompt) != 0;
        cli_attach_row_lists(p, &reversed->bias, &reversed->history, &reversed->prompt);
        reversed->batch.processing = p;
    }
#undef REVERSE
    return failed ? -1 : 0;
}

/* With per-row seeds a row's tokens may not depend on its batch: rows alone,
 * the batch split in two, and the batch in reverse order must all give the
 * tokens of the whole batch (with per-row offsets, subsequences and
 * processing lists, when the case has them, moving with their rows). The
 * top-N outputs are left out here. */
static int check_composition(check_state *state, int who, const char *label,
                             const check_batch *batch, const int32_t *expected)
{
    participant *runner = &state->participants[who];
    int32_t samples = batch->params.num_samples;
    check_batch whole = *batch;
    check_outputs outputs;
    psm_logit_processing lists;
    int64_t alone[3];
    int64_t split;
    int i, failed = 0;
    whole.top_count = 0;
    if (check_alloc_outputs(&outputs, batch->rows, samples, 0) != 0) {
        check_free_outputs(&outputs);
        return -1;
    }
    alone[0] = 0;
    alone[1] = batch->rows / 2;
    alone[2] = batch->rows - 1;
    for (i = 0; i < 3 && !failed; ++i) {
        check_batch part = sub_batch(&whole, alone[i], 1, &lists);
        if (check_run_batch(runner, &part, &outputs) != 0)
            failed = 1;
        else
            compare_composition(state, who, label, expected, outputs.tokens, alone[i], 1,
                                samples, "alone");
    }
    split = batch->rows / 3 + 1;
    if (!failed && split < batch->rows) {
        check_batch head = sub_batch(&whole, 0, split, &lists);
        if (check_run_batch(runner, &head, &outputs) != 0)
            failed = 1;
        else
            compare_composition(state, who, label, expected, outputs.tokens, 0, split, samples,
                                "in the first part of a split batch");
        check_batch tail = sub_batch(&whole, split, batch->rows - split, &lists);
        if (!failed && check_run_batch(runner, &tail, &outputs) != 0)
            failed = 1;
        else if (!failed)
            compare_composition(state, who, label, expected, outputs.tokens, split,
                                batch->rows - split, samples,
                                "in the second part of a split batch");
    }
    if (!failed && batch->rows > 1) {
        reversed_batch reversed;
        size_t r, rows = (size_t)batch->rows;
        if (reverse_batch(&whole, &reversed) != 0 ||
            check_run_batch(runner, &reversed.batch, &outputs) != 0) {
            failed = 1;
        } else {
            for (r = 0; r < rows; ++r)
                compare_composition(state, who, label, expected,
                                    outputs.tokens + (rows - 1 - r) * (size_t)samples,
                                    (int64_t)r, 1, samples, "in the reversed batch");
        }
        free_reversed_batch(&reversed);
    }
    check_free_outputs(&outputs);
    return failed ? -1 : 0;
}

/* ---- one case ------------------------------------------------------------ */

int check_run_case(check_state *state, int64_t rows, int64_t vocab, int64_t row_stride,
                   psm_dtype dtype, const parameter_set *set, uint64_t seed, uint64_t offset)
{
    check_batch batch;
    case_inputs inputs;
    check_outputs outputs[CHECK_MAX_PARTICIPANTS];
    int ran[CHECK_MAX_PARTICIPANTS] = {0};
    size_t drawn;
    char label[128];
    int p, q, status = 0;

    memset(outputs, 0, sizeof outputs);
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
    batch.processing = set->processing != PROCESSING_NONE ? &inputs.processing : NULL;
    batch.params.filter_order = set->filter_order;
    batch.top_count = set->top_logprobs;
    batch.top_mode = set->top_mode;
    drawn = (size_t)inputs.output_rows * (size_t)set->num_samples;

    for (p = 0; p < state->participant_count; ++p) {
        participant *who = &state->participants[p];
        int outcome;
        if (check_alloc_outputs(&outputs[p], inputs.output_rows, set->num_samples,
                                set->top_logprobs) != 0) {
            cli_error("check", "out of memory for %s", label);
            status = -1;
            break;
        }
        outcome = check_run_batch(who, &batch, &outputs[p]);
        /* The CPU backend runs every feature of psm_sample; a refusal is
         * expected only from other backends and from the sharded call. */
        if (outcome == CHECK_REFUSED && (who->backend != PSM_BACKEND_CPU || who->shards > 0)) {
            check_note_refusal(&state->refused[p], who->refusal);
            continue;
        }
        if (outcome != 0) {
            state->failed_calls++;
            check_report(state, "%s, %s: the call failed%s", who->name, label,
                         outcome == CHECK_REFUSED ? " (refused a feature)" : " (message above)");
            continue;
        }
        ran[p] = 1;
        validate_tokens(state, p, label, &batch, &inputs, outputs[p].tokens);
        if (set->top_logprobs > 0)
            validate_top(state, p, label, &batch, &inputs, &outputs[p]);
        if (set->per_row_seeds &&
            check_composition(state, p, label, &batch, outputs[p].tokens) != 0) {
            state->failed_calls++;
            check_report(state, "%s, %s: a batch-composition call failed", who->name, label);
        }
    }
    for (p = 0; p < state->participant_count; ++p)
        for (q = p + 1; q < state->participant_count; ++q)
            if (ran[p] && ran[q]) {
                compare_pair(state, p, q, label, drawn, outputs[p].tokens, outputs[p].logprobs,
                             outputs[q].tokens, outputs[q].logprobs, set->num_samples);
                if (set->top_logprobs > 0)
                    compare_top(state, p, q, label, (size_t)inputs.output_rows,
                                set->top_logprobs, set->num_samples, &outputs[p], &outputs[q]);
            }
    for (p = 0; p < state->participant_count; ++p)
        check_free_outputs(&outputs[p]);
    check_free_inputs(&inputs);
    return status;
}


void check_note_refusal(refusal_record *record, const char *reason)
{
    int i;
    record->cases++;
    for (i = 0; i < record->reason_count; ++i)
        if (!strcmp(record->reasons[i], reason)) {
            record->reason_cases[i]++;
            return;
        }
    if (record->reason_count == CHECK_MAX_REASONS) {
        record->other_cases++;
        return;
    }
    snprintf(record->reasons[record->reason_count], sizeof record->reasons[0], "%s", reason);
    record->reason_cases[record->reason_count++] = 1;
}

void check_print_refusals(const check_state *state, const refusal_record *records,
                          const char *heading)
{
    int p, i, any = 0;
    for (p = 0; p < state->participant_count; ++p)
        any |= records[p].cases > 0;
    if (!any)
        return;
    printf("%s\n", heading);
    for (p = 0; p < state->participant_count; ++p) {
        for (i = 0; i < records[p].reason_count; ++i)
            printf("  %-24s %d cases: %s\n", state->participants[p].name,
                   records[p].reason_cases[i], records[p].reasons[i]);
        if (records[p].other_cases > 0)
            printf("  %-24s %d cases: other reasons\n", state->participants[p].name,
                   records[p].other_cases);
    }
}

int check_print_agreement(const check_state *state)
{
    int p, q, failures = 0, any_top = 0;
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
            any_top |= record->top_compared > 0;
        }
    if (any_top) {
        printf("\ntop-N logprobs per pair (list tokens and ranks must agree 100%%), logprob max "
               "|difference|:\n");
        for (p = 0; p < state->participant_count; ++p)
            for (q = p + 1; q < state->participant_count; ++q) {
                const pair_record *record = &state->pairs[p][q];
                int agree = record->top_agreed == record->top_compared;
                if (record->top_compared == 0)
                    continue;
                printf("  %-24s vs %-24s %10llu / %-10llu %8.4f%%  logprob %.2e%s  %s\n",
                       state->participants[p].name, state->participants[q].name,
                       (unsigned long long)record->top_agreed,
                       (unsigned long long)record->top_compared,
                       100.0 * (double)record->top_agreed / (double)record->top_compared,
                       record->top_logprob_max_difference,
                       record->top_logprob_mismatches ? " (out of tolerance)" : "",
                       agree && !record->top_logprob_mismatches ? "ok" : "FAIL");
                failures += !agree || record->top_logprob_mismatches;
            }
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
    printf("\ntoken validity (range, masked tokens, bad rows give -1, greedy is the argmax; "
           "top-N lists and ranks):\n");
    for (p = 0; p < state->participant_count; ++p) {
        int invalid = state->invalid_tokens[p] != 0 || state->invalid_top[p] != 0;
        printf("  %-24s %llu invalid tokens, %llu invalid top-N entries  %s\n",
               state->participants[p].name, (unsigned long long)state->invalid_tokens[p],
               (unsigned long long)state->invalid_top[p], invalid ? "FAIL" : "ok");
        failures += invalid;
    }
    check_print_refusals(state, state->refused,
                         "\nskipped (the backend refused the case's logit processing, top-N "
                         "logprobs or filter order; not counted as agreement):");
    return failures;
}
