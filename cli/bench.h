/*
 * bench.h: what the files of `polysample bench` share. bench.c is the
 * command (options, the order of the work); bench_cases.c says what is run
 * (settings, logits distributions, the case list) and makes the logits;
 * bench_run.c opens the backends and times the cases against a read ceiling;
 * bench_report.c prints the table and writes the JSON.
 */
#ifndef PSM_CLI_BENCH_H
#define PSM_CLI_BENCH_H

#include "bench_device.h"
#include "polysample.h"

#include <stdint.h>
#include <stdio.h>

/* ---- cases (bench_cases.c) ---------------------------------------------------- */

/* What a setting asks for beyond the sampling parameters. */
typedef enum bench_extra {
    EXTRA_NONE,
    EXTRA_MASK_BIAS,   /* an allowed-token mask and 64 bias entries per row */
    EXTRA_PENALTIES,   /* repetition, frequency and presence penalties over a
                          2,048-token history per row */
    EXTRA_TOP_20,      /* the drawn tokens' logprobs and ranks and the 20 most
                          probable tokens with their (processed) logprobs */
    EXTRA_VERIFY       /* not psm_sample but psm_verify of BENCH_VERIFY_DRAFTS
                          drafts per row (a request), a chain with draft logits,
                          the setting's parameters for the target and the draft */
} bench_extra;

typedef struct bench_setting {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    bench_extra extra;
} bench_setting;

enum {
    SETTING_PLAIN,
    SETTING_TOPK_TOPP,
    SETTING_TOP_P,
    SETTING_MIN_P,
    SETTING_GREEDY,
    SETTING_MASK_BIAS,
    SETTING_PENALTIES,
    SETTING_TOP_20,
    SETTING_VERIFY
};
extern const bench_setting bench_settings[];
#define BENCH_SETTING_COUNT 9

/* The verify setting: a chain of this many drafts per request. A case's
 * rows are its requests; its logits are requests x (k + 1) target rows
 * followed by requests x k draft rows, each draft row a copy of the target
 * row its token is proposed for (a perfect draft: every draft is accepted,
 * so the walk computes every target row's distribution and draws the bonus
 * token, the most a chain of k can cost). */
#define BENCH_VERIFY_DRAFTS 4

/* The logits a case samples from (bench_fill_logits says how they are made). */
enum { DISTRIBUTION_NORMAL, DISTRIBUTION_LM };
#define BENCH_DISTRIBUTION_COUNT 2
/* "normal", "lm". */
const char *bench_distribution_name(int distribution);
/* --distribution items as bits of (1 << DISTRIBUTION_*): "both" is both. */
int bench_parse_distribution_item(const char *item, int *value);
int bench_parse_setting_item(const char *item, int *value);
int bench_parse_dtype_item(const char *item, int *value);

#define BENCH_MAX_CASES 320

typedef struct bench_case {
    int64_t rows;
    int64_t vocab;
    int distribution;
    psm_dtype dtype;
    int setting;
} bench_case;

int bench_same_case(const bench_case *a, const bench_case *b);

/* The rows of logits a case reads: its rows, or for verify its target and
 * draft rows. */
int64_t bench_logit_rows(const bench_case *one);
/* Do two cases read the same generated logits (the same logit rows, vocab
 * and distribution, both verify or neither)? */
int bench_same_logits(const bench_case *a, const bench_case *b);

/* What the command line asked for; zero counts mean "the default". */
typedef struct bench_selection {
    int64_t rows, vocab; /* 0: not given */
    const int *dtypes;
    int dtype_count;
    const int *settings;
    int setting_count;
    int distributions; /* bits of (1 << DISTRIBUTION_*) */
    int quick;
} bench_selection;

/* The cases to run: the default list when no shape, dtype or setting was
 * asked for, else the cross product of what was asked. Returns the count. */
int bench_make_cases(const bench_selection *selection, bench_case *cases);

/* Fills rows x vocab logits of the distribution from seed, in parallel; the
 * same values whatever the thread count. 0, or -1 when out of memory. */
int bench_fill_logits(float *values, int64_t rows, int64_t vocab, int distribution,
                      uint64_t seed);
/* The logits of a case's shape: bench_logit_rows(shape) x vocab, as
 * bench_fill_logits makes them, with a verify case's draft rows copied from
 * its target rows (BENCH_VERIFY_DRAFTS). 0, or -1 when out of memory. */
int bench_fill_case_logits(float *values, const bench_case *shape, uint64_t seed);
/* How the distribution's logits are made, in a few words ("~ N(0, 2^2)"). */
const char *bench_distribution_formula(int distribution);

/* The logit processing inputs of a shape (host arrays): per row an allowed
 * mask (random bits: about half the tokens), BENCH_BIAS_ENTRIES bias entries
 * and a history of BENCH_HISTORY_TOKENS tokens with repeats. */
#define BENCH_BIAS_ENTRIES 64
#define BENCH_HISTORY_TOKENS 2048
/* The penalties of the "penalties" setting. */
#define BENCH_REPETITION_PENALTY 1.1f
#define BENCH_FREQUENCY_PENALTY 0.2f
#define BENCH_PRESENCE_PENALTY 0.3f
/* N of the "top-20" setting. */
#define BENCH_TOP_LOGPROBS 20

typedef struct bench_processing {
    int64_t rows, vocab;
    int64_t mask_words;
    uint32_t *mask;
    int64_t *bias_offsets;
    int32_t *bias_tokens;
    float *bias_values;
    int64_t *history_offsets;
    int32_t *history_tokens;
} bench_processing;

/* Does any case need processing inputs? */
int bench_needs_processing(const bench_case *cases, int case_count);
/* 0, or -1 when out of memory (free them anyway). */
int bench_make_processing(bench_processing *inputs, int64_t rows, int64_t vocab, uint64_t seed);
void bench_free_processing(bench_processing *inputs);

/* ---- backends and timing (bench_run.c) ---------------------------------------- */

#define BENCH_MAX_BACKENDS 8
#define BENCH_MAX_RUNS 200

typedef struct bench_backend {
    psm_backend backend;
    int device_index;
    psm_context *context;
    const bench_device_ops *device; /* NULL: host memory, host clock */
    void *session;
    char device_name[160];
} bench_backend;

typedef struct bench_result {
    bench_case which;
    const bench_backend *backend;
    int failed;
    int unsupported;        /* the backend refused the setting (PSM_ERR_UNSUPPORTED): no time */
    char error[320];        /* why it failed, or the refusal */
    int runs;
    double median_ms;
    double read_ceiling_ms; /* NAN when not measured */
    double host_call_ms;    /* device backends, one row: the whole call on the host */
    double speedup_vs_cpu;  /* NAN when the CPU did not run the case */
    double ratio_to_plain;  /* median / the plain setting's median, same backend, shape,
                               dtype and logits; NAN when plain did not run */
    int32_t filter_order;   /* psm_params.filter_order of the run (bench_config's) */
} bench_result;

typedef struct bench_config {
    int repeat;            /* 0: adaptive */
    double time_budget_s;  /* adaptive: stop adding runs after this */
    int threads;
    uint64_t seed;
    int show_progress;
    int32_t filter_order;  /* psm_params.filter_order of every case */
} bench_config;

int bench_open_backend(const char *command, psm_backend backend, int device_index,
                       const bench_config *config, bench_backend *opened);
void bench_close_backend(bench_backend *backend);

/* Runs every case of one (shape, distribution, dtype) on one backend:
 * results[0 .. result_count - 1].which name the cases; host_logits holds
 * bytes of their logits; processing (NULL when no case needs it) the
 * shape's processing inputs, which a device backend gets in device memory.
 * progress counts the cases started, for the progress lines. */
void bench_run_backend_cases(const bench_config *config, bench_backend *backend,
                             const void *host_logits, size_t bytes,
                             const bench_processing *processing, bench_result *results,
                             int result_count, int *progress, int progress_total);

/* ---- report (bench_report.c) --------------------------------------------------- */

void bench_write_json(FILE *out, const bench_result *results, int result_count);
void bench_print_table(const bench_result *results, int result_count);

#endif /* PSM_CLI_BENCH_H */
