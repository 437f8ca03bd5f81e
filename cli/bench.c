/* bench.c: `polysample bench`: how long sampling takes, against how long
 * merely reading the same logits takes on the same device in the same run.
 * This file is the command: its options and the order of the work; the
 * cases, the timing and the report have files of their own (bench.h). */
#define _POSIX_C_SOURCE 200809L
#include "bench.h"
#include "cli_commands.h"
#include "cli_options.h"
#include "cli_util.h"
#include "polysample.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char bench_description[] =
    "Times psm_sample on random logits (generated once per shape and\n"
    "distribution from the seed) on every available backend. Default cases:\n"
    "10000 x 32000, 2048 x 151936, 256 x 151936 and 64 x 128256 in f32 and bf16\n"
    "with the settings plain and topk_topp and in f32 with top_p and min_p, and\n"
    "one row of 151936 in f32 (plain, topk_topp); every shape in f32 with\n"
    "mask+bias, penalties and top-20; verify in f32 on 64 x 128256, 256 x\n"
    "151936 and 1 x 128256 (rows: requests); each with both distributions.\n"
    "\n"
    "Logits distributions:\n"
    "  normal  every logit ~ N(0, 2^2)\n"
    "  lm      shaped like a language model's output: in each row the ranks\n"
    "          1..vocab are shuffled over the tokens (Fisher-Yates, from the\n"
    "          seed), and logit = -1.1 ln(rank) + u, u uniform in [-0.1, 0.1)\n"
    "          (in float): a few dominant tokens and a long tail\n"
    "\n"
    "Per case: the median time of repeated calls after a warm-up; GB/s of logits\n"
    "read; the read ceiling measured in the same run, the fastest of 7 (CPU: a\n"
    "parallel read-and-sum of the same buffer; CUDA/OpenCL: half a device-to-\n"
    "device copy of the same bytes) and the ratio time / read time; the speedup\n"
    "over the CPU backend when it ran the same case. CUDA and OpenCL keep the\n"
    "logits in device memory and time on the device's queue; other device\n"
    "backends are timed from host memory on the host clock (marked 'host' in\n"
    "the memory column).\n"
    "\n"
    "settings: plain (T 0.8), topk_topp (T 0.8, top-k 50, top-p 0.9),\n"
    "          top_p (T 0.8, top-p 0.9), min_p (T 0.8, min-p 0.05), greedy (T 0);\n"
    "          and plain with what a runtime adds around the draw, each also\n"
    "          reported as a ratio to plain of the same shape, dtype and logits\n"
    "          in the same run (x_plain; plain is run with them):\n"
    "          mask+bias (an allowed-token mask of random bits, about half the\n"
    "          tokens, and 64 bias entries per row), penalties (repetition 1.1,\n"
    "          frequency 0.2, presence 0.3 over a 2048-token history per row,\n"
    "          three in four tokens from a pool of 256), top-20 (the drawn\n"
    "          token's logprob and rank, and the 20 most probable tokens with\n"
    "          their processed logprobs); their inputs and outputs live in the\n"
    "          logits' memory. A backend that refuses one shows 'unsupported'.\n"
    "          verify: psm_verify of a chain of 4 drafts per request (rows are\n"
    "          requests) with draft logits, target and draft at T 0.8: the\n"
    "          target has requests x 5 rows, the draft requests x 4, each a copy\n"
    "          of the target row its token is proposed for, so every draft is\n"
    "          accepted (the longest walk) and the bonus token is drawn; the\n"
    "          draft tokens are the draft rows' greedy tokens; outputs: accepted\n"
    "          counts and tokens. read_ms and x_read count the target and draft\n"
    "          rows; a backend that refuses it shows 'unsupported'.\n"
    "\n"
    "--filter-order runs every case in that order (docs/SAMPLING.md, section 4);\n"
    "the table names it after the setting (top_p@vllm), the JSON in filter_order.\n"
    "\n"
    "--shards 2,4,8 also runs each case split by vocabulary (psm_sharded_*,\n"
    "docs/SAMPLING.md section 8) into that many contiguous shards, each a\n"
    "simulated rank with its own context and buffer on the same device, run one\n"
    "after another and exchanging by memcpy; every rank's tokens must equal\n"
    "psm_sample's (a difference fails the run). A second table gives the passes'\n"
    "time (measured: each round's slowest rank), the rounds and the bytes a rank\n"
    "sends, against gathering the logits and sampling them on one device. The\n"
    "all-gathers are not run but modelled, each --collective-us of latency plus\n"
    "(shards - 1) x a rank's bytes at --link-gb-per-s: the defaults, 10 us (a\n"
    "typical small NCCL all-gather) and 450 GB/s (NVLink 4 on an H100 or H200,\n"
    "one direction), are assumptions, not measurements.\n";

/* Every available backend, each on its first device. */
static void every_available_backend(cli_backend_list *list)
{
    int backend;
    list->count = 0;
    for (backend = PSM_BACKEND_CPU; backend < PSM_BACKEND_COUNT; ++backend)
        if (psm_backend_available((psm_backend)backend, NULL)) {
            list->backends[list->count] = (psm_backend)backend;
            list->device_indices[list->count++] = -1;
        }
}

/* Opens the listed backends, AUTO resolved to the one it picks and each
 * (backend, device) once. 0, or -1 after a message. */
static int open_backends(const cli_backend_list *list, const bench_config *config,
                         bench_backend *backends, int *backend_count)
{
    int b;
    for (b = 0; b < list->count; ++b) {
        psm_backend backend = list->backends[b];
        int device_index = list->device_indices[b], k, duplicate = 0;
        if (backend == PSM_BACKEND_AUTO) {
            /* Resolve AUTO (and POLYSAMPLE_BACKEND) to the backend it picks. */
            bench_backend probe;
            if (bench_open_backend("bench", PSM_BACKEND_AUTO, -1, config, &probe) != 0)
                return -1;
            backend = psm_context_backend(probe.context);
            bench_close_backend(&probe);
        }
        for (k = 0; k < *backend_count; ++k)
            duplicate |= backends[k].backend == backend && backends[k].device_index == device_index;
        if (duplicate)
            continue;
        if (bench_open_backend("bench", backend, device_index, config,
                               &backends[*backend_count]) != 0)
            return -1;
        ++*backend_count;
    }
    if (*backend_count == 0) {
        cli_error("bench", "no backend is available");
        return -1;
    }
    return 0;
}

/* Shape by shape (and distribution): generate the logits once, then each
 * dtype, then each backend runs that group's settings. Results go in run
 * order. 0, or -1 after a message. */
static int run_cases(const bench_config *config, bench_backend *backends, int backend_count,
                     const bench_case *cases, int case_count, bench_result *results,
                     bench_sharded_result *sharded, int *result_count)
{
    int progress = 0, progress_total = case_count * backend_count, first;
    for (first = 0; first < case_count; ++first) {
        const bench_case *shape = &cases[first];
        size_t count = (size_t)bench_logit_rows(shape) * (size_t)shape->vocab;
        float *logits;
        bench_processing processing;
        int seen = 0, k, dtype, b, with_processing = 0;
        for (k = 0; k < first; ++k)
            seen |= bench_same_logits(&cases[k], shape);
        if (seen)
            continue;
        logits = cli_alloc("bench", count * sizeof(float));
        if (!logits)
            return -1;
        if (config->show_progress)
            fprintf(stderr, "generating %lld x %lld %s logits (%s)\n",
                    (long long)bench_logit_rows(shape),
                    (long long)shape->vocab, bench_distribution_name(shape->distribution),
                    bench_distribution_formula(shape->distribution));
        if (bench_fill_case_logits(logits, shape, config->seed) != 0) {
            cli_error("bench", "out of memory generating the logits");
            free(logits);
            return -1;
        }
        /* The processing inputs, when a case of this shape needs them. */
        for (k = first; k < case_count; ++k)
            with_processing |= bench_same_logits(&cases[k], shape) &&
                               bench_needs_processing(&cases[k], 1);
        if (with_processing &&
            bench_make_processing(&processing, shape->rows, shape->vocab, config->seed) != 0) {
            cli_error("bench", "out of memory generating the processing inputs");
            bench_free_processing(&processing);
            free(logits);
            return -1;
        }
        for (dtype = PSM_DTYPE_F32; dtype <= PSM_DTYPE_BF16; ++dtype) {
            bench_case group[BENCH_SETTING_COUNT * 4];
            int group_count = 0;
            void *converted = NULL;
            const void *data = logits;
            for (k = first; k < case_count; ++k)
                if (bench_same_logits(&cases[k], shape) && cases[k].dtype == (psm_dtype)dtype)
                    group[group_count++] = cases[k];
            if (group_count == 0)
                continue;
            if (dtype != PSM_DTYPE_F32) {
                converted = cli_alloc("bench", count * 2);
                if (!converted) {
                    if (with_processing)
                        bench_free_processing(&processing);
                    free(logits);
                    return -1;
                }
                cli_convert_from_f32(logits, count, (psm_dtype)dtype, converted);
                data = converted;
            }
            for (b = 0; b < backend_count; ++b) {
                bench_result *slice = &results[*result_count];
                for (k = 0; k < group_count; ++k)
                    slice[k].which = group[k];
                bench_run_backend_cases(
                    config, &backends[b], data, count * cli_dtype_size((psm_dtype)dtype),
                    with_processing ? &processing : NULL, slice, group_count,
                    sharded ? &sharded[*result_count * config->sharding_count] : NULL, &progress,
                    progress_total);
                *result_count += group_count;
            }
            free(converted);
        }
        if (with_processing)
            bench_free_processing(&processing);
        free(logits);
    }
    return 0;
}

/* Did the case run and give a time? */
static int timed(const bench_result *result)
{
    return !result->failed && !result->unsupported;
}

/* Speedups over the CPU backend on the same case. */
static void compare_with_cpu(bench_result *results, int result_count)
{
    int i, k;
    for (i = 0; i < result_count; ++i) {
        if (!timed(&results[i]) || results[i].backend->backend == PSM_BACKEND_CPU)
            continue;
        for (k = 0; k < result_count; ++k)
            if (timed(&results[k]) && results[k].backend->backend == PSM_BACKEND_CPU &&
                bench_same_case(&results[k].which, &results[i].which))
                results[i].speedup_vs_cpu = results[k].median_ms / results[i].median_ms;
    }
}

/* Each case's time over plain sampling's on the same backend, shape, dtype
 * and logits, in the same run (not verify's: other calls on other logits). */
static void compare_with_plain(bench_result *results, int result_count)
{
    int i, k;
    for (i = 0; i < result_count; ++i) {
        bench_case plain = results[i].which;
        plain.setting = SETTING_PLAIN;
        if (!timed(&results[i]) || results[i].which.setting == SETTING_VERIFY)
            continue;
        for (k = 0; k < result_count; ++k)
            if (timed(&results[k]) && results[k].backend == results[i].backend &&
                bench_same_case(&results[k].which, &plain))
                results[i].ratio_to_plain = results[i].median_ms / results[k].median_ms;
    }
}

static int write_json_file(const char *path, const bench_result *results, int result_count,
                           const bench_sharded_result *sharded, int sharded_count,
                           const bench_exchange_model *model)
{
    FILE *out = fopen(path, "w");
    if (!out) {
        cli_error("bench", "cannot write '%s': %s", path, strerror(errno));
        return -1;
    }
    bench_write_json(out, results, result_count, sharded, sharded_count, model);
    if (fclose(out) != 0) {
        cli_error("bench", "writing '%s' failed", path);
        return -1;
    }
    return 0;
}

int cli_bench(int argc, char **argv)
{
    bench_config config = {.time_budget_s = 2.0, .seed = 1,
                           .filter_order = PSM_FILTER_ORDER_POLYSAMPLE};
    bench_backend backends[BENCH_MAX_BACKENDS];
    cli_backend_list backend_list = {0};
    cli_item_list dtype_list = {0}, setting_list = {0}, distribution_list = {0};
    uint64_t rows = 0, vocab = 0, repeat = 0, threads = 0;
    int quick = 0, json_to_stdout = 0;
    const char *json_path = NULL;
    const char *filter_order = NULL;
    bench_selection selection;
    bench_case cases[BENCH_MAX_CASES];
    bench_result *results = NULL;
    bench_sharded_result *sharded = NULL;
    cli_item_list shards_list = {0};
    /* NAN: not given (a parsed value is never NaN). */
    float link_gb_per_s = NAN, collective_us = NAN;
    int backend_count = 0, case_count, result_count = 0, sharded_count = 0, parsed, i, b;
    int tokens_differ = 0;
    int exit_status = CLI_EXIT_OK;
    const cli_option bench_options[] = {
        {.name = "--backend", .kind = CLI_OPTION_BACKEND_LIST, .value_name = "LIST",
         .target = &backend_list, .maximum = BENCH_MAX_BACKENDS,
         .help = "comma-separated backends (auto, cpu, cuda,\nhip, opencl, each optionally :N)",
         .default_text = "every available one"},
        {.name = "--rows", .kind = CLI_OPTION_DECIMAL, .value_name = "R", .target = &rows,
         .minimum = 1, .maximum = INT32_MAX, .help = "one shape of R rows (with --vocab)",
         .default_text = "2048"},
        {.name = "--vocab", .kind = CLI_OPTION_DECIMAL, .value_name = "V", .target = &vocab,
         .minimum = 1, .maximum = INT32_MAX, .help = "one shape of vocab V (with --rows)",
         .default_text = "32000"},
        {.name = "--dtype", .kind = CLI_OPTION_LIST, .value_name = "LIST", .target = &dtype_list,
         .maximum = 3, .parse_item = bench_parse_dtype_item, .items = "f32, f16 or bf16",
         .help = "f32, f16, bf16 (comma-separated): every\nlisted dtype"},
        {.name = "--setting", .kind = CLI_OPTION_LIST, .value_name = "LIST",
         .target = &setting_list, .maximum = BENCH_SETTING_COUNT,
         .parse_item = bench_parse_setting_item,
         .items = "plain, topk_topp, top_p, min_p, greedy, mask+bias, penalties, top-20 or "
                  "verify",
         .help = "settings above (comma-separated): every\nlisted setting"},
        {.name = "--distribution", .kind = CLI_OPTION_LIST, .value_name = "LIST",
         .target = &distribution_list, .maximum = BENCH_DISTRIBUTION_COUNT,
         .parse_item = bench_parse_distribution_item, .items = "normal, lm or both",
         .help = "logits distributions above: normal, lm or\nboth (comma-separated)",
         .default_text = "both"},
        {.name = "--filter-order", .kind = CLI_OPTION_STRING, .value_name = "NAME",
         .target = &filter_order,
         .help = "the filters' order and rules: polysample,\nvllm, sglang, llama.cpp,\n"
                 "flashinfer-top-k-first or flashinfer-joint",
         .default_text = "polysample"},
        {.name = "--shards", .kind = CLI_OPTION_LIST, .value_name = "LIST",
         .target = &shards_list, .maximum = BENCH_MAX_SHARDINGS,
         .parse_item = bench_parse_shards_item, .items = "a shard count, 1 to 64",
         .help = "also run each case split into that many\nshards (comma-separated; above)",
         .default_text = "none"},
        {.name = "--link-gb-per-s", .kind = CLI_OPTION_FLOAT, .value_name = "B",
         .target = &link_gb_per_s,
         .help = "--shards: the modelled link's bandwidth,\nGB/s a direction (an assumption)",
         .default_text = "450"},
        {.name = "--collective-us", .kind = CLI_OPTION_FLOAT, .value_name = "T",
         .target = &collective_us,
         .help = "--shards: the modelled latency of one\nall-gather in us (an assumption)",
         .default_text = "10"},
        {.name = "--repeat", .kind = CLI_OPTION_DECIMAL, .value_name = "N", .target = &repeat,
         .minimum = 1, .maximum = BENCH_MAX_RUNS,
         .help = "timed runs per case (default: 3 to 20\nwithin ~2 s; one when the warm-up "
                 "call\nalone exceeds that)",
         .default_text = ""},
        {.name = "--threads", .kind = CLI_OPTION_DECIMAL, .value_name = "N", .target = &threads,
         .minimum = 1, .maximum = 4096, .help = "CPU backend and CPU read ceiling threads",
         .default_text = "OpenMP's"},
        {.name = "--seed", .kind = CLI_OPTION_DECIMAL, .value_name = "S", .target = &config.seed,
         .maximum = UINT64_MAX, .help = "seed of the random logits"},
        {.name = "--quick", .kind = CLI_OPTION_FLAG, .target = &quick,
         .help = "a tenth of the rows of batches of 100 rows\nor more, ~0.5 s per case"},
        {.name = "--json", .kind = CLI_OPTION_FLAG, .target = &json_to_stdout,
         .help = "write JSON results to stdout instead of\nthe table"},
        {.name = "--json", .kind = CLI_OPTION_STRING, .value_name = "PATH", .target = &json_path,
         .value_attached_only = 1, .help = "write JSON results to PATH as well as the\ntable"},
    };
    const cli_command bench_command = {
        .name = "bench",
        .synopsis = "polysample bench [options]",
        .description = bench_description,
        .options = bench_options,
        .option_count = (int)(sizeof bench_options / sizeof bench_options[0]),
    };

    parsed = cli_parse_options(&bench_command, argc, argv);
    if (parsed != CLI_PARSE_OK)
        return parsed == CLI_PARSE_HELP ? CLI_EXIT_OK : CLI_EXIT_USAGE;
    if (filter_order && cli_parse_filter_order(filter_order, &config.filter_order) != 0) {
        cli_error("bench", "--filter-order %s: expected " CLI_FILTER_ORDER_NAMES, filter_order);
        return CLI_EXIT_USAGE;
    }
    if ((!isnan(link_gb_per_s) || !isnan(collective_us)) && shards_list.count == 0) {
        cli_error("bench", "%s models the exchange of --shards, which is not given",
                  isnan(link_gb_per_s) ? "--collective-us" : "--link-gb-per-s");
        return CLI_EXIT_USAGE;
    }
    if (!isnan(link_gb_per_s) && !(link_gb_per_s > 0.0f)) {
        cli_error("bench", "--link-gb-per-s %g: expected a bandwidth above 0",
                  (double)link_gb_per_s);
        return CLI_EXIT_USAGE;
    }
    if (!isnan(collective_us) && collective_us < 0.0f) {
        cli_error("bench", "--collective-us %g: expected a latency of 0 or more",
                  (double)collective_us);
        return CLI_EXIT_USAGE;
    }
    config.exchange.link_gb_per_s = isnan(link_gb_per_s) ? 450.0 : (double)link_gb_per_s;
    config.exchange.collective_us = isnan(collective_us) ? 10.0 : (double)collective_us;
    /* Each shard count once, in the order given. */
    for (i = 0; i < shards_list.count; ++i) {
        int k, seen = 0;
        for (k = 0; k < config.sharding_count; ++k)
            seen |= config.shard_counts[k] == shards_list.values[i];
        if (!seen)
            config.shard_counts[config.sharding_count++] = shards_list.values[i];
    }
    config.repeat = (int)repeat;
    config.threads = (int)threads;
    if (quick)
        config.time_budget_s = 0.5;
    config.show_progress = isatty(STDERR_FILENO);

    memset(&selection, 0, sizeof selection);
    selection.rows = (int64_t)rows;
    selection.vocab = (int64_t)vocab;
    selection.dtypes = dtype_list.values;
    selection.dtype_count = dtype_list.count;
    selection.settings = setting_list.values;
    selection.setting_count = setting_list.count;
    for (i = 0; i < distribution_list.count; ++i)
        selection.distributions |= distribution_list.values[i];
    if (distribution_list.count == 0)
        selection.distributions = (1 << DISTRIBUTION_NORMAL) | (1 << DISTRIBUTION_LM);
    selection.quick = quick;
    case_count = bench_make_cases(&selection, cases);

    if (backend_list.count == 0)
        every_available_backend(&backend_list);
    if (open_backends(&backend_list, &config, backends, &backend_count) != 0) {
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    results = calloc((size_t)case_count * (size_t)backend_count, sizeof *results);
    if (config.sharding_count > 0)
        sharded = calloc((size_t)case_count * (size_t)backend_count *
                             (size_t)config.sharding_count,
                         sizeof *sharded);
    if (!results || (config.sharding_count > 0 && !sharded)) {
        cli_error("bench", "out of memory");
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    if (run_cases(&config, backends, backend_count, cases, case_count, results, sharded,
                  &result_count) != 0) {
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    sharded_count = result_count * config.sharding_count;
    compare_with_cpu(results, result_count);
    compare_with_plain(results, result_count);
    for (i = 0; i < result_count; ++i)
        if (results[i].failed)
            exit_status = CLI_EXIT_FAILURE;
    for (i = 0; i < sharded_count; ++i) {
        if (sharded[i].failed)
            exit_status = CLI_EXIT_FAILURE;
        tokens_differ += sharded[i].tokens_differ;
    }

    if (json_to_stdout) {
        bench_write_json(stdout, results, result_count, sharded, sharded_count, &config.exchange);
    } else {
        bench_print_table(results, result_count);
        if (sharded_count > 0)
            bench_print_sharded_table(sharded, sharded_count, &config.exchange);
    }
    if (json_path && write_json_file(json_path, results, result_count, sharded, sharded_count,
                                     &config.exchange) != 0)
        exit_status = CLI_EXIT_FAILURE;
    /* A wrong token is the one result that must not scroll by unseen. */
    if (tokens_differ > 0)
        cli_error("bench", "in %d sharded case%s a rank's tokens differ from psm_sample's",
                  tokens_differ, tokens_differ == 1 ? "" : "s");

done:
    free(sharded);
    free(results);
    for (b = 0; b < backend_count; ++b)
        bench_close_backend(&backends[b]);
    return exit_status;
}
