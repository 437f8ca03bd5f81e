/*
 * check.h: what the files of `polysample check` share. check.c is the
 * command (options, the case list, the verdict); check_participants.c opens
 * the backends being compared and runs a batch on one of them;
 * check_inputs.c makes a case's logits and per-row parameters;
 * check_agreement.c runs a case on every participant and checks the tokens
 * (validity, agreement between every pair, batch composition);
 * check_statistics.c compares the CPU backend's draws with the float64
 * reference by chi-square tests; check_verify.c does both for speculative
 * verification (psm_verify).
 */
#ifndef PSM_CLI_CHECK_H
#define PSM_CLI_CHECK_H

#include "bench_device.h"
#include "polysample.h"
#include "processing_files.h"

#include <stdint.h>

#define CHECK_MAX_PARTICIPANTS 16
#define CHECK_MAX_REPORTED 10

/* Request state a case exercises (include/polysample.h, psm_params). */
typedef enum request_state_form {
    REQUEST_STATE_NONE = 0,
    REQUEST_STATE_OFFSETS,      /* offset_per_row, both words */
    REQUEST_STATE_SUBSEQUENCES, /* with per_row_seeds: one seed and one offset in every
                                   row's per-row arrays, a subsequence id per row */
    REQUEST_STATE_GATHER,       /* row_indices with repeats, more output rows than logits */
    REQUEST_STATE_POINTERS      /* seed_pointer and offset_pointer */
} request_state_form;

/* Logit processing a case exercises (include/polysample.h,
 * psm_logit_processing): a mask allowing about half the tokens, a bias list,
 * a history of a few hundred tokens with repeats and a prompt list, with
 * the penalties as scalars or one value per row. */
typedef enum processing_form {
    PROCESSING_NONE = 0,
    PROCESSING_SCALAR_PENALTIES,
    PROCESSING_PER_ROW_PENALTIES
} processing_form;

typedef struct parameter_set {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    int32_t num_samples;
    int per_row_params;
    int per_row_seeds;
    request_state_form request_state;
    processing_form processing;
    int32_t top_logprobs;      /* N of top-N logprobs (with the drawn tokens' ranks); 0: none */
    psm_logprob_mode top_mode;
    int32_t filter_order;      /* psm_params.filter_order */
} parameter_set;

typedef struct participant {
    char name[48];
    psm_backend backend;
    psm_context *context;
    const bench_device_ops *device; /* non-NULL: buffers live on the device */
    void *session;
    char refusal[256]; /* the library's message when it last refused a feature */
    int shards;        /* > 0: each batch split by vocabulary into this many shards,
                          sampled with psm_sharded_* (CPU backend, host memory) */
} participant;

/* One batch of inputs on the host. */
typedef struct check_batch {
    int64_t rows;       /* of the logits */
    int64_t vocab;
    int64_t row_stride; /* elements from one row to the next, >= vocab */
    psm_dtype dtype;
    const void *logits; /* rows rows of row_stride elements of dtype */
    psm_params params;  /* per-row pointers are host arrays (or NULL) of
                           check_output_rows entries; params.processing and
                           params.top_logprobs are set at the call, from: */
    const psm_logit_processing *processing; /* host arrays; NULL: none */
    int32_t top_count;  /* top-N logprobs: N; 0: none */
    psm_logprob_mode top_mode;
} check_batch;

/* A batch's outputs on the host: tokens and logprobs, output rows x
 * num_samples; with top-N logprobs, top_tokens and top_logprobs (output
 * rows x N) and the drawn tokens' ranks (output rows x num_samples). */
typedef struct check_outputs {
    int32_t *tokens;
    float *logprobs;
    int32_t *top_tokens;
    float *top_logprobs;
    int32_t *ranks;
} check_outputs;

/* Allocates a batch's outputs (top-N ones only with top_count > 0). 0, or
 * -1 when out of memory (free them anyway). */
int check_alloc_outputs(check_outputs *outputs, int64_t rows, int32_t samples, int32_t top_count);
void check_free_outputs(check_outputs *outputs);

/* The rows of a batch's outputs and per-row arrays: params.output_rows
 * with row indices, else the logits' rows. */
int64_t check_output_rows(const check_batch *batch);

typedef struct pair_record {
    uint64_t compared;
    uint64_t agreed;
    double logprob_max_difference;
    uint64_t logprob_mismatches;
    /* Top-N logprobs: list entries and ranks compared and equal (tokens,
     * ranks), and the list's logprobs as above. */
    uint64_t top_compared;
    uint64_t top_agreed;
    double top_logprob_max_difference;
    uint64_t top_logprob_mismatches;
} pair_record;

/* The cases a participant refused (PSM_ERR_UNSUPPORTED: a feature its
 * backend does not run yet), not counted as agreement, by the library's
 * reason (the first CHECK_MAX_REASONS distinct ones; cases of further
 * reasons are counted in other_cases). */
#define CHECK_MAX_REASONS 8
typedef struct refusal_record {
    int cases;
    int other_cases;
    int reason_count;
    int reason_cases[CHECK_MAX_REASONS];
    char reasons[CHECK_MAX_REASONS][256];
} refusal_record;

typedef struct check_state {
    participant participants[CHECK_MAX_PARTICIPANTS];
    int participant_count;
    pair_record pairs[CHECK_MAX_PARTICIPANTS][CHECK_MAX_PARTICIPANTS];
    uint64_t composition_compared[CHECK_MAX_PARTICIPANTS];
    uint64_t composition_agreed[CHECK_MAX_PARTICIPANTS];
    uint64_t invalid_tokens[CHECK_MAX_PARTICIPANTS]; /* out of range, masked, not argmax... */
    uint64_t invalid_top[CHECK_MAX_PARTICIPANTS];    /* top-N lists and ranks that break a rule */
    refusal_record refused[CHECK_MAX_PARTICIPANTS];
    /* Verification (check_verify.c): per pair, the entries of accepted
     * counts, tokens and path nodes compared and equal, and the emitted
     * tokens' logprobs; per participant, requests whose outputs break a
     * rule; the cases a participant refused. */
    pair_record verify_pairs[CHECK_MAX_PARTICIPANTS][CHECK_MAX_PARTICIPANTS];
    uint64_t verify_invalid[CHECK_MAX_PARTICIPANTS];
    refusal_record verify_refused[CHECK_MAX_PARTICIPANTS];
    int verify_cases;
    int64_t verify_requests;
    /* The first participant's requests by accepted count (0..4), bad ones
     * last: how far the cases' walks went. */
    uint64_t verify_accepted_counts[6];
    uint64_t failed_calls;
    int reported;
    int show_progress;
} check_state;

/* Lists a problem (the first CHECK_MAX_REPORTED of them; the others are
 * counted). */
void check_report(check_state *state, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- participants (check_participants.c) --------------------------------------- */

/* Opens a participant: backend and device, CPU threads (0: the default), and
 * with device_memory, buffers in device memory (bench_device.h). 0, or -1
 * after a message. */
int check_open_participant(participant *opened, const char *name, psm_backend backend,
                           int device_index, int threads, int device_memory);
void check_close_participant(participant *closing);

/* Opens the participants: the CPU backend at 1 and 2 threads, then each
 * requested backend (count < 0: every device of every available one) from
 * host memory and, where the tool can, from device memory. 0, or -1 after a
 * message (the participants opened so far stay counted, to be closed). */
int check_open_participants(check_state *state, const psm_backend *requested,
                            const int *requested_devices, int requested_count);

/* What check_run_batch returns when the backend refused the batch's logit
 * processing, top-N logprobs or filter order with PSM_ERR_UNSUPPORTED (the
 * library's message is then in who->refusal). */
#define CHECK_REFUSED 1

/* Samples a batch into outputs (host). 0; CHECK_REFUSED; or -1 after a
 * message. */
int check_run_batch(participant *who, const check_batch *batch, const check_outputs *outputs);

/* A buffer in who's device memory holding bytes of host (NULL stays NULL,
 * with nothing allocated). 0, or -1. */
int check_device_copy(participant *who, const void *host, size_t bytes, void **buffer);

/* ---- inputs (check_inputs.c) -------------------------------------------------- */

typedef struct case_inputs {
    float *values;        /* rows x vocab, f32, as the backends read them */
    void *logits;         /* the same in the case's dtype, rows of row_stride */
    int64_t output_rows;  /* the entries of every per-row array below */
    float *temperature;
    int32_t *top_k;
    float *top_p;
    float *min_p;
    uint64_t *seeds;
    uint64_t *offsets;
    uint32_t *subsequences;
    int64_t *row_indices;
    uint64_t seed_value;   /* what seed_pointer points to */
    uint64_t offset_value; /* what offset_pointer points to */
    /* Logit processing (output rows' lists; NULL without it) and, for the
     * checks of the tokens, each output row's logits as processed by the
     * float64 reference (reference/psm_reference.h). */
    psm_logit_processing processing;
    uint32_t *mask;
    cli_row_lists bias, history, prompt;
    float *repetition, *frequency, *presence;
    float *processed; /* output rows x vocab */
} case_inputs;

/* The case's inputs for shape (rows, vocab, row_stride, dtype) and the
 * parameter set, from seed, with offset the case's scalar offset. 0, or -1
 * when out of memory (free them anyway). */
int check_make_inputs(const check_batch *shape, const parameter_set *set, uint64_t seed,
                      uint64_t offset, case_inputs *inputs);
void check_free_inputs(case_inputs *inputs);

/* One row's processing lists (also the chi-square test's):
 * a mask allowing about half the tokens, 16 to 64 bias entries (some of
 * one token twice), a history of 200 to 400 tokens drawn mostly from a
 * pool of 48 (repeats), a prompt of 30 to 120 tokens. The arrays must hold
 * (vocab + 31) / 32 words, 64 bias entries, 400 history and 120 prompt
 * tokens; the counts are returned through the pointers. */
#define CHECK_MAX_BIAS 64
#define CHECK_MAX_HISTORY 400
#define CHECK_MAX_PROMPT 120
void check_make_row_lists(uint64_t seed, uint64_t row, int64_t vocab, uint32_t *mask,
                          int32_t *bias_tokens, float *bias_values, int64_t *bias_count,
                          int32_t *history, int64_t *history_count, int32_t *prompt,
                          int64_t *prompt_count);

/* ---- agreement (check_agreement.c) --------------------------------------------- */

/* Runs one case on every participant and records what it finds in state.
 * 0, or -1 when the case could not be made (out of memory). */
int check_run_case(check_state *state, int64_t rows, int64_t vocab, int64_t row_stride,
                   psm_dtype dtype, const parameter_set *set, uint64_t seed, uint64_t offset);

/* Prints token agreement per pair, batch composition and token validity;
 * returns the number of failed lines. */
int check_print_agreement(const check_state *state);

/* Counts a refused case under its reason. */
void check_note_refusal(refusal_record *record, const char *reason);
/* Prints each participant's refusals under heading (none: nothing). */
void check_print_refusals(const check_state *state, const refusal_record *records,
                          const char *heading);

/* Do two logprobs agree to float rounding (NaN with NaN, infinities
 * exactly)? */
int check_logprobs_agree(float a, float b);

/* ---- statistics (check_statistics.c) ------------------------------------------- */

/* The chi-square tests, draws each, on context; returns how many failed. */
int check_run_chi_square_tests(psm_context *context, int64_t draws, uint64_t seed);

/* Pearson's statistic of counts (draws in all) against probs, bins of an
 * expected count below 5 pooled into one; returns 1 when it is within the
 * upper 0.1% point, with the statistic, the degrees of freedom and that
 * point through the pointers. */
int check_chi_square(const double *probs, const uint64_t *counts, int64_t vocab, int64_t draws,
                     double *statistic, int *degrees, double *critical);

/* ---- speculative verification (check_verify.c) ---------------------------------- */

/* The verification cases (chains with draft logits, draft probabilities and
 * one-hot drafts, a tree of two candidates per level, a batch with a bad
 * request; vocabs 1000, 32000 and 151936 in f32 and bf16) on every
 * participant, with a tenth of row_budget in target rows; records in
 * state. 0, or -1 when a case could not be made. */
int check_run_verify_cases(check_state *state, int64_t row_budget, uint64_t seed);

/* Prints the verification agreement per pair, the validity per participant
 * and the refusals; returns the number of failed lines. */
int check_print_verify_agreement(const check_state *state);

/* draws requests of a chain with a poor draft on context: the first
 * emitted token against the target's float64 distribution (chi-square) and
 * the mean accepted length against its float64 expectation. Returns how
 * many failed. */
int check_run_verify_statistics(psm_context *context, int64_t draws, uint64_t seed);

#endif /* PSM_CLI_CHECK_H */
