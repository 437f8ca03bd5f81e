/*
 * bench.h: what the files of `polysample bench` share. bench.c is the
 * command (options, the order of the work); bench_cases.c says what is run
 * (settings, logits distributions, the case list) and makes the logits;
 * bench_run.c opens the backends and times the cases against a read ceiling;
 * bench_sharded.c runs the cases split by vocabulary over simulated ranks
 * (--shards); bench_report.c prints the tables and writes the JSON.
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
    /* The simulated ranks' contexts of the sharded runs, on the same device
     * and stream as context; made when first needed. */
    psm_context *rank_contexts[PSM_MAX_SHARDS];
    int rank_context_count;
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

/* The all-gathers of a sharded step are not run but modelled: each costs
 * a fixed latency plus the bytes a rank receives over its link. */
typedef struct bench_exchange_model {
    double link_gb_per_s; /* one direction of one GPU's link, 1e9 bytes/s */
    double collective_us; /* the latency of one collective */
} bench_exchange_model;

/* The most shard counts --shards takes. */
#define BENCH_MAX_SHARDINGS 8

typedef struct bench_config {
    int repeat;            /* 0: adaptive */
    double time_budget_s;  /* adaptive: stop adding runs after this */
    int threads;
    uint64_t seed;
    int show_progress;
    int32_t filter_order;  /* psm_params.filter_order of every case */
    /* --shards: each case is also run split into shard_counts[i] ranks. */
    int shard_counts[BENCH_MAX_SHARDINGS];
    int sharding_count;
    bench_exchange_model exchange;
} bench_config;

int bench_open_backend(const char *command, psm_backend backend, int device_index,
                       const bench_config *config, bench_backend *opened);
/* Makes the backend's rank contexts up to count (those made stay). */
psm_status bench_open_rank_contexts(const bench_config *config, bench_backend *backend,
                                    int count);
void bench_close_backend(bench_backend *backend);

/* Have the timed runs so far, elapsed_s after a warm-up of warm_up_s,
 * enough? (--repeat, or adaptive within the time budget.) */
int bench_enough_runs(const bench_config *config, int runs, double elapsed_s, double warm_up_s);

/* A case split by vocabulary (--shards) over simulated ranks. */
typedef struct bench_sharded_result {
    const bench_result *unsharded; /* the same case on the whole rows */
    int shards;
    int failed;
    int unsupported;          /* the backend or the library refused it: no time */
    int tokens_differ;        /* a rank's tokens are not psm_sample's (failed too) */
    char error[320];          /* why it failed, or the refusal */
    int runs;
    int rounds;               /* all-gathers per call */
    double send_bytes_per_row; /* what one rank sends over all rounds, per row */
    double phases_ms;         /* measured: the median run's begin, rounds and end */
    double exchange_ms;       /* modelled: the rounds' all-gathers */
    double gather_ms;         /* modelled: one all-gather of the whole logits */
} bench_sharded_result;

/* Runs every case of one (shape, distribution, dtype) on one backend:
 * results[0 .. result_count - 1].which name the cases; host_logits holds
 * bytes of their logits; processing (NULL when no case needs it) the
 * shape's processing inputs, which a device backend gets in device memory.
 * sharded (NULL without --shards) gets config->sharding_count results per
 * case, case i's at i * sharding_count. progress counts the cases started,
 * for the progress lines. */
void bench_run_backend_cases(const bench_config *config, bench_backend *backend,
                             const void *host_logits, size_t bytes,
                             const bench_processing *processing, bench_result *results,
                             int result_count, bench_sharded_result *sharded, int *progress,
                             int progress_total);

/* ---- sharded runs (bench_sharded.c) -------------------------------------------- */

/* --shards items: a shard count, 1 to PSM_MAX_SHARDS. */
int bench_parse_shards_item(const char *item, int *value);

/* A case as its sharded runs see it: the unsharded call's parameters and
 * the tokens it drew, which every rank must draw too. */
typedef struct bench_sharded_case {
    const bench_result *unsharded;
    psm_params params;
    const int32_t *expected_tokens; /* rows of them; NULL: the unsharded call drew none */
} bench_sharded_case;

/* Runs each case split into each of config's shard counts on the backend:
 * the shards (contiguous columns, sizes within one of each other) are
 * copied from host_logits, in rotation copies in device memory as the
 * unsharded runs use; results[i * sharding_count + s] is case i's at
 * shard_counts[s]. */
void bench_run_sharded(const bench_config *config, bench_backend *backend,
                       const void *host_logits, int rotation, const bench_sharded_case *cases,
                       int case_count, bench_sharded_result *results);

/* The model's all-gather time, in ms, when each of shards ranks
 * contributes bytes (none for one rank: nothing moves). */
double bench_all_gather_ms(const bench_exchange_model *model, int shards, double bytes);

/* ---- report (bench_report.c) --------------------------------------------------- */

/* sharded: sharded_count results (none without --shards). */
void bench_write_json(FILE *out, const bench_result *results, int result_count,
                      const bench_sharded_result *sharded, int sharded_count,
                      const bench_exchange_model *model);
void bench_print_table(const bench_result *results, int result_count);
void bench_print_sharded_table(const bench_sharded_result *sharded, int sharded_count,
                               const bench_exchange_model *model);

#endif /* PSM_CLI_BENCH_H */
