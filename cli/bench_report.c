/* bench_report.c: the results of `polysample bench` as a table on stdout
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

void bench_write_json(FILE *out, const bench_result *results, int result_count)
{
    int i;
    fprintf(out, "{\n  \"polysample_version\": \"%s\",\n  \"results\": [", psm_version_string());
    for (i = 0; i < result_count; ++i) {
        const bench_result *result = &results[i];
        const bench_setting *setting = &bench_settings[result->which.setting];
        double gigabytes = logits_gigabytes(&result->which);
        fprintf(out, "%s\n    {\"backend\": \"%s\", \"device\": \"", i ? "," : "",
                psm_backend_name(result->backend->backend));
        write_json_characters(out, result->backend->device_name);
        fprintf(out,
                "\", \"memory\": \"%s\", \"rows\": %lld, \"vocab\": %lld, "
                "\"distribution\": \"%s\", \"dtype\": \"%s\", "
                "\"setting\": \"%s\", \"temperature\": %g, \"top_k\": %d, \"top_p\": %g, "
                "\"min_p\": %g, \"filter_order\": \"%s\", ",
                result->backend->device ? "device" : "host", (long long)result->which.rows,
                (long long)result->which.vocab,
                bench_distribution_name(result->which.distribution),
                cli_dtype_name(result->which.dtype),
                setting->name, (double)setting->temperature, (int)setting->top_k,
                (double)setting->top_p, (double)setting->min_p,
                cli_filter_order_name(result->filter_order));
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
    fputs("\n  ]\n}\n", out);
}

static void format_optional(char *text, size_t size, double value, const char *format)
{
    if (isnan(value))
        snprintf(text, size, "-");
    else
        snprintf(text, size, format, value);
}

void bench_print_table(const bench_result *results, int result_count)
{
    int i, setting_width = 9;
    char setting[64];
    for (i = 0; i < result_count; ++i) {
        setting_label(&results[i], setting, sizeof setting);
        setting_width = (int)strlen(setting) > setting_width ? (int)strlen(setting) : setting_width;
    }
    printf("%-7s %-6s %6s %7s %-6s %-5s %-*s %10s %8s %9s %7s %7s %7s %10s %5s\n", "backend",
           "memory", "rows", "vocab", "logits", "dtype", setting_width, "setting", "median_ms",
           "GB/s", "read_ms", "x_read", "x_plain", "vs_cpu", "host_ms", "runs");
    for (i = 0; i < result_count; ++i) {
        const bench_result *result = &results[i];
        char read_ms[32], ratio[32], plain[32], speedup[32], host_ms[32];
        setting_label(result, setting, sizeof setting);
        printf("%-7s %-6s %6lld %7lld %-6s %-5s %-*s ",
               psm_backend_name(result->backend->backend),
               result->backend->device ? "device" : "host", (long long)result->which.rows,
               (long long)result->which.vocab,
               bench_distribution_name(result->which.distribution),
               cli_dtype_name(result->which.dtype), setting_width, setting);
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

