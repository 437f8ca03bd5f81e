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

typedef struct bench_setting {
    const char *name;
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
} bench_setting;

enum { SETTING_PLAIN, SETTING_TOPK_TOPP, SETTING_TOP_P, SETTING_MIN_P, SETTING_GREEDY };
extern const bench_setting bench_settings[];
#define BENCH_SETTING_COUNT 5

/* The logits a case samples from (bench_fill_logits says how they are made). */
enum { DISTRIBUTION_NORMAL, DISTRIBUTION_LM };
#define BENCH_DISTRIBUTION_COUNT 2
/* "normal", "lm". */
const char *bench_distribution_name(int distribution);
/* --distribution items as bits of (1 << DISTRIBUTION_*): "both" is both. */
int bench_parse_distribution_item(const char *item, int *value);
int bench_parse_setting_item(const char *item, int *value);
int bench_parse_dtype_item(const char *item, int *value);

#define BENCH_MAX_CASES 256

typedef struct bench_case {
    int64_t rows;
    int64_t vocab;
    int distribution;
    psm_dtype dtype;
    int setting;
} bench_case;

int bench_same_case(const bench_case *a, const bench_case *b);

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
/* How the distribution's logits are made, in a few words ("~ N(0, 2^2)"). */
const char *bench_distribution_formula(int distribution);

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
    char error[320];
    int runs;
    double median_ms;
    double read_ceiling_ms; /* NAN when not measured */
    double host_call_ms;    /* device backends, one row: the whole call on the host */
    double speedup_vs_cpu;  /* NAN when the CPU did not run the case */
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
 * bytes of their logits. progress counts the cases started, for the
 * progress lines. */
void bench_run_backend_cases(const bench_config *config, bench_backend *backend,
                             const void *host_logits, size_t bytes, bench_result *results,
                             int result_count, int *progress, int progress_total);

/* ---- report (bench_report.c) --------------------------------------------------- */

void bench_write_json(FILE *out, const bench_result *results, int result_count);
void bench_print_table(const bench_result *results, int result_count);

#endif /* PSM_CLI_BENCH_H */
