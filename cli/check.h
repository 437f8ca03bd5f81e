/*
 * check.h: what the files of `polysample check` share. check.c is the
 * command (options, the case list, the verdict); check_participants.c opens
 * the backends being compared and runs a batch on one of them;
 * check_inputs.c makes a case's logits and per-row parameters;
 * check_agreement.c runs a case on every participant and checks the tokens
 * (validity, agreement between every pair, batch composition);
 * check_statistics.c compares the CPU backend's draws with the float64
 * reference by chi-square tests.
 */
#ifndef PSM_CLI_CHECK_H
#define PSM_CLI_CHECK_H

#include "bench_device.h"
#include "polysample.h"

#include <stdint.h>

#define CHECK_MAX_PARTICIPANTS 12
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
} parameter_set;

typedef struct participant {
    char name[48];
    psm_backend backend;
    psm_context *context;
    const bench_device_ops *device; /* non-NULL: buffers live on the device */
    void *session;
} participant;

/* One batch of inputs on the host. */
typedef struct check_batch {
    int64_t rows;       /* of the logits */
    int64_t vocab;
    int64_t row_stride; /* elements from one row to the next, >= vocab */
    psm_dtype dtype;
    const void *logits; /* rows rows of row_stride elements of dtype */
    psm_params params;  /* per-row pointers are host arrays (or NULL) of
                           check_output_rows entries */
} check_batch;

/* The rows of a batch's outputs and per-row arrays: params.output_rows
 * with row indices, else the logits' rows. */
int64_t check_output_rows(const check_batch *batch);

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

/* Samples a batch; tokens and logprobs (host) get output rows x
 * num_samples. 0, or -1 after a message. */
int check_run_batch(participant *who, const check_batch *batch, int32_t *tokens,
                    float *logprobs);

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
} case_inputs;

/* The case's inputs for shape (rows, vocab, row_stride, dtype) and the
 * parameter set, from seed, with offset the case's scalar offset. 0, or -1
 * when out of memory (free them anyway). */
int check_make_inputs(const check_batch *shape, const parameter_set *set, uint64_t seed,
                      uint64_t offset, case_inputs *inputs);
void check_free_inputs(case_inputs *inputs);

/* ---- agreement (check_agreement.c) --------------------------------------------- */

/* Runs one case on every participant and records what it finds in state.
 * 0, or -1 when the case could not be made (out of memory). */
int check_run_case(check_state *state, int64_t rows, int64_t vocab, int64_t row_stride,
                   psm_dtype dtype, const parameter_set *set, uint64_t seed, uint64_t offset);

/* Prints token agreement per pair, batch composition and token validity;
 * returns the number of failed lines. */
int check_print_agreement(const check_state *state);

/* ---- statistics (check_statistics.c) ------------------------------------------- */

/* The chi-square tests, draws each, on context; returns how many failed. */
int check_run_chi_square_tests(psm_context *context, int64_t draws, uint64_t seed);

#endif /* PSM_CLI_CHECK_H */
