/* bench_report.c: the results of `polysample bench` as tables on stdout
 * and as JSON (scripts/bench.sh reads it). */
#include "bench.h"
#include "cli_util.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* The logits a case reads (verify: the target's and the draft's). */
static double logits_gigabytes(const bench_case *which)
{
    return (double)bench_logit_rows(which) * (double)which->vocab *
           (double)cli_dtype_size(which->dtype) / 1e9;
}

static void print_optional(FILE *out, double value, const char *format)
{
    if (isnan(value))
        fputs("null", out);
    else
        fprintf(out, format, value);
}

/* A JSON string's characters: quotes and backslashes escaped, control
 * characters left out. */
static void write_json_characters(FILE *out, const char *text)
{
    const char *c;
    for (c = text; *c; ++c)
        if (*c == '"' || *c == '\\')
            fprintf(out, "\\%c", *c);
        else if ((unsigned char)*c >= 0x20)
            fputc(*c, out);
}

/* The setting's name, followed by "@order" when the run's filter order is
 * not the library's own. */
static void setting_label(const bench_result *result, char *text, size_t size)
{
    const char *setting = bench_settings[result->which.setting].name;
    if (result->filter_order == PSM_FILTER_ORDER_POLYSAMPLE)
        snprintf(text, size, "%s", setting);
    else
        snprintf(text, size, "%s@%s", setting, cli_filter_order_name(result->filter_order));
}

/* The fields that name a result's case and where it ran, each followed by
 * ", ". */
static void write_json_case(FILE *out, const bench_result *result)
{
    const bench_setting *setting = &bench_settings[result->which.setting];
    fprintf(out, "\"backend\": \"%s\", \"device\": \"",
            psm_backend_name(result->backend->backend));
    write_json_characters(out, result->backend->device_name);
    fprintf(out,
            "\", \"memory\": \"%s\", \"rows\": %lld, \"vocab\": %lld, "
            "\"distribution\": \"%s\", \"dtype\": \"%s\", "
            "\"setting\": \"%s\", \"temperature\": %g, \"top_k\": %d, \"top_p\": %g, "
            "\"min_p\": %g, \"filter_order\": \"%s\", ",
            result->backend->device ? "device" : "host", (long long)result->which.rows,
            (long long)result->which.vocab, bench_distribution_name(result->which.distribution),
            cli_dtype_name(result->which.dtype), setting->name, (double)setting->temperature,
            (int)setting->top_k, (double)setting->top_p, (double)setting->min_p,
            cli_filter_order_name(result->filter_order));
}

/* The sharded runs: what was measured and what the model adds, each
 * modelled figure named so ("_model_"). */
static void write_json_sharded(FILE *out, const bench_sharded_result *sharded, int sharded_count,
                               const bench_exchange_model *model)
{
    int i;
    fprintf(out,
            ",\n  \"exchange_model\": {\"measured\": false, \"link_gb_per_s\": %g, "
            "\"collective_us\": %g},\n  \"sharded\": [",
            model->link_gb_per_s, model->collective_us);
    for (i = 0; i < sharded_count; ++i) {
        const bench_sharded_result *result = &sharded[i];
        double step_ms, gather_sample_ms;
        fprintf(out, "%s\n    {", i ? "," : "");
        write_json_case(out, result->unsharded);
        fprintf(out, "\"shards\": %d, ", result->shards);
        if (result->failed || result->unsupported) {
            fputs(result->unsupported     ? "\"unsupported\": true, \"error\": \""
                  : result->tokens_differ ? "\"tokens_equal\": false, \"error\": \""
                                          : "\"error\": \"",
                  out);
            write_json_characters(out, result->error);
            fputs("\"}", out);
            continue;
        }
        step_ms = result->phases_ms + result->exchange_ms;
        gather_sample_ms = result->gather_ms + result->unsharded->median_ms;
        fprintf(out,
                "\"tokens_equal\": true, \"runs\": %d, \"rounds\": %d, "
                "\"send_bytes_per_row\": %.1f, \"phases_ms\": %.6f, "
                "\"exchange_model_ms\": %.6f, \"step_model_ms\": %.6f, "
                "\"sample_ms\": %.6f, \"gather_model_ms\": %.6f, "
                "\"gather_sample_model_ms\": %.6f, \"ratio_to_gather_sample\": %.3f}",
                result->runs, result->rounds, result->send_bytes_per_row, result->phases_ms,
                result->exchange_ms, step_ms, result->unsharded->median_ms, result->gather_ms,
                gather_sample_ms, step_ms / gather_sample_ms);
    }
    fputs("\n  ]", out);
}

void bench_write_json(FILE *out, const bench_result *results, int result_count,
                      const bench_sharded_result *sharded, int sharded_count,
                      const bench_exchange_model *model)
{
    int i;
    fprintf(out, "{\n  \"polysample_version\": \"%s\",\n  \"results\": [", psm_version_string());
    for (i = 0; i < result_count; ++i) {
        const bench_result *result = &results[i];
        double gigabytes = logits_gigabytes(&result->which);
        fprintf(out, "%s\n    {", i ? "," : "");
        write_json_case(out, result);
        if (result->which.setting == SETTING_VERIFY)
            fprintf(out, "\"draft_nodes\": %d, \"target_rows\": %lld, \"draft_rows\": %lld, ",
                    BENCH_VERIFY_DRAFTS,
                    (long long)(result->which.rows * (BENCH_VERIFY_DRAFTS + 1)),
                    (long long)(result->which.rows * BENCH_VERIFY_DRAFTS));
        if (result->failed || result->unsupported) {
            fputs(result->unsupported ? "\"unsupported\": true, \"error\": \"" : "\"error\": \"",
                  out);
            write_json_characters(out, result->error);
            fputs("\"}", out);
            continue;
        }
        fprintf(out, "\"runs\": %d, \"median_ms\": %.6f, \"gb_per_s\": %.3f, ", result->runs,
                result->median_ms, gigabytes / (result->median_ms * 1e-3));
        fputs("\"read_ceiling_ms\": ", out);
        print_optional(out, result->read_ceiling_ms, "%.6f");
        fputs(", \"read_ceiling_gb_per_s\": ", out);
        print_optional(out, gigabytes / (result->read_ceiling_ms * 1e-3), "%.3f");
        fputs(", \"ratio_to_read\": ", out);
        print_optional(out, result->median_ms / result->read_ceiling_ms, "%.3f");
        fputs(", \"speedup_vs_cpu\": ", out);
        print_optional(out, result->speedup_vs_cpu, "%.3f");
        fputs(", \"ratio_to_plain\": ", out);
        print_optional(out, result->ratio_to_plain, "%.3f");
        fputs(", \"host_call_ms\": ", out);
        print_optional(out, result->host_call_ms, "%.6f");
        fputc('}', out);
    }
    fputs("\n  ]", out);
    if (sharded_count > 0)
        write_json_sharded(out, sharded, sharded_count, model);
    fputs("\n}\n", out);
}

static void format_optional(char *text, size_t size, double value, const char *format)
{
    if (isnan(value))
        snprintf(text, size, "-");
    else
        snprintf(text, size, format, value);
}

/* The setting column's width: its heading's, or the longest label's. */
static int setting_width(const bench_result *results, int result_count)
{
    int i, width = 9;
    char setting[64];
    for (i = 0; i < result_count; ++i) {
        setting_label(&results[i], setting, sizeof setting);
        width = (int)strlen(setting) > width ? (int)strlen(setting) : width;
    }
    return width;
}

/* The columns that name a case and where it ran. */
static void print_case(const bench_result *result, int width)
{
    char setting[64];
    setting_label(result, setting, sizeof setting);
    printf("%-7s %-6s %6lld %7lld %-6s %-5s %-*s ", psm_backend_name(result->backend->backend),
           result->backend->device ? "device" : "host", (long long)result->which.rows,
           (long long)result->which.vocab, bench_distribution_name(result->which.distribution),
           cli_dtype_name(result->which.dtype), width, setting);
}

void bench_print_table(const bench_result *results, int result_count)
{
    int i, width = setting_width(results, result_count);
    printf("%-7s %-6s %6s %7s %-6s %-5s %-*s %10s %8s %9s %7s %7s %7s %10s %5s\n", "backend",
           "memory", "rows", "vocab", "logits", "dtype", width, "setting", "median_ms",
           "GB/s", "read_ms", "x_read", "x_plain", "vs_cpu", "host_ms", "runs");
    for (i = 0; i < result_count; ++i) {
        const bench_result *result = &results[i];
        char read_ms[32], ratio[32], plain[32], speedup[32], host_ms[32];
        print_case(result, width);
        if (result->unsupported) {
            printf("%10s (%s)\n", "unsupported", result->error);
            continue;
        }
        if (result->failed) {
            printf("failed: %s\n", result->error);
            continue;
        }
        format_optional(read_ms, sizeof read_ms, result->read_ceiling_ms, "%.3f");
        format_optional(ratio, sizeof ratio, result->median_ms / result->read_ceiling_ms, "%.2f");
        format_optional(plain, sizeof plain, result->ratio_to_plain, "%.3f");
        format_optional(speedup, sizeof speedup, result->speedup_vs_cpu, "%.2f");
        format_optional(host_ms, sizeof host_ms, result->host_call_ms, "%.3f");
        printf("%10.3f %8.2f %9s %7s %7s %7s %10s %5d\n", result->median_ms,
               logits_gigabytes(&result->which) / (result->median_ms * 1e-3), read_ms, ratio,
               plain, speedup, host_ms, result->runs);
    }
    printf("\nmedian_ms: median of the timed runs after a warm-up. read_ms: time to read the\n"
           "same logits once at the bandwidth measured in this run; x_read = median / read.\n"
           "x_plain: median / the plain setting's median (same backend, shape, dtype, logits).\n"
           "vs_cpu: CPU backend median / this median. host_ms: a whole call on the host.\n"
           "verify: psm_verify, rows = requests, each a chain of %d drafts (target rows\n"
           "requests x %d, draft rows requests x %d, all accepted); GB/s, read_ms and\n"
           "x_read count the target and draft rows.\n"
           "logits: normal %s; lm: logit = %s.\n",
           BENCH_VERIFY_DRAFTS, BENCH_VERIFY_DRAFTS + 1, BENCH_VERIFY_DRAFTS,
           bench_distribution_formula(DISTRIBUTION_NORMAL),
           bench_distribution_formula(DISTRIBUTION_LM));
    for (i = 0; i < result_count; ++i)
        if (i == 0 || results[i].backend != results[i - 1].backend) {
            int seen = 0, j;
            for (j = 0; j < i; ++j)
                seen |= results[j].backend == results[i].backend;
            if (!seen)
                printf("%s: %s\n", psm_backend_name(results[i].backend->backend),
                       results[i].backend->device_name);
        }
}


void bench_print_sharded_table(const bench_sharded_result *sharded, int sharded_count,
                               const bench_exchange_model *model)
{
    int i, width = 9;
    for (i = 0; i < sharded_count; ++i) {
        int one = setting_width(sharded[i].unsharded, 1);
        width = one > width ? one : width;
    }
    printf("\nSplit by vocabulary (--shards; * modelled, not measured):\n");
    printf("%-7s %-6s %6s %7s %-6s %-5s %-*s %6s %6s %9s %10s %9s %9s %9s %9s %11s %9s %5s\n",
           "backend", "memory", "rows", "vocab", "logits", "dtype", width, "setting", "shards",
           "rounds", "B/row", "phases_ms", "xchg_ms*", "step_ms*", "sample_ms", "gather_ms*",
           "gath+smp_ms*", "x_gather*", "runs");
    for (i = 0; i < sharded_count; ++i) {
        const bench_sharded_result *result = &sharded[i];
        double step_ms, gather_sample_ms;
        print_case(result->unsharded, width);
        printf("%6d ", result->shards);
        if (result->unsupported) {
            printf("%6s (%s)\n", "unsupported", result->error);
            continue;
        }
        if (result->failed) {
            printf("FAILED: %s\n", result->error);
            continue;
        }
        step_ms = result->phases_ms + result->exchange_ms;
        gather_sample_ms = result->gather_ms + result->unsharded->median_ms;
        printf("%6d %9.0f %10.3f %9.3f %9.3f %9.3f %9.3f %11.3f %9.2f %5d\n", result->rounds,
               result->send_bytes_per_row, result->phases_ms, result->exchange_ms, step_ms,
               result->unsharded->median_ms, result->gather_ms, gather_sample_ms,
               step_ms / gather_sample_ms, result->runs);
    }
    printf("\nshards: the rows split into that many contiguous column ranges (sizes within\n"
           "one), each a simulated rank with its own context on the device above, the\n"
           "ranks run one after another. Every rank's tokens equal psm_sample's (checked\n"
           "each run). rounds: all-gathers per call. B/row: what one rank sends per row\n"
           "over the rounds. phases_ms (measured, host clock; each pass synchronizes):\n"
           "the slowest rank's begin + each round's slowest rank + the slowest end,\n"
           "median of the runs. xchg_ms* = per round %g us + (shards - 1) x a rank's\n"
           "bytes / %g GB/s. step_ms* = phases_ms + xchg_ms*. sample_ms: psm_sample on\n"
           "the whole rows (median_ms above; for CUDA the device's time, without the\n"
           "host's launches and waits, which phases_ms includes: the rounds wait for\n"
           "each pass). gather_ms* = %g us + (shards - 1) / shards\n"
           "x the logits' bytes / %g GB/s; gath+smp_ms* = gather_ms* + sample_ms.\n"
           "x_gather* = step_ms* / gath+smp_ms*. One shard moves nothing (no collective).\n"
           "* modelled: a link of %g GB/s a direction (--link-gb-per-s) and %g us a\n"
           "collective (--collective-us) are assumptions, not measurements.\n",
           model->collective_us, model->link_gb_per_s, model->collective_us,
           model->link_gb_per_s, model->link_gb_per_s, model->collective_us);
}
