/* sample.c: `polysample sample`: tokens from logits in a .npy file. */
#include "cli_commands.h"
#include "cli_util.h"
#include "npy.h"
#include "polysample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char sample_usage[] =
    "usage: polysample sample [options] LOGITS.npy\n"
    "\n"
    "Samples tokens from a .npy file of logits: float32 or float16, 1-D (one\n"
    "row) or 2-D (rows x vocab), C order. Prints one line per row: the row's\n"
    "tokens separated by spaces (with --logprobs, a tab and then their logprobs).\n"
    "\n"
    "options:\n"
    "  --backend NAME[:N]   auto (default), cpu, cuda, hip or opencl; N picks a device\n"
    "  --threads N          CPU backend threads (default: OpenMP's default)\n"
    "  --temperature T      default 1; below 1e-5 (0 included) is greedy\n"
    "  --top-k K            keep the K most probable tokens (0 = off, default)\n"
    "  --top-p P            keep the smallest set reaching mass P, in (0, 1] (1 = off)\n"
    "  --min-p P            keep tokens at least P times the top probability (0 = off)\n"
    "  --seed S             random seed, 0 to 2^64 - 1 (default 0)\n"
    "  --offset O           random stream offset, e.g. the decoding step, 0 to\n"
    "                       2^64 - 1 (default 0)\n"
    "  --num-samples N      tokens per row, drawn with replacement (default 1)\n"
    "  --logprobs           also print each token's log-probability\n"
    "  --check-rows         fail on a row with NaN/+inf or no finite logit\n"
    "                       (by default such a row gets token -1)\n"
    "  --json               write {\"tokens\": [[...]], \"logprobs\": [[...]]} instead\n"
    "\n"
    "Integers are decimal digits only: no sign, spaces or 0x prefix, and a leading\n"
    "zero is not octal (--seed 010 is ten).\n";

static void print_logprob(float value, int json)
{
    if (isnan(value) || isinf(value))
        fputs(json ? "null" : (isnan(value) ? "nan" : "-inf"), stdout);
    else
        printf("%.9g", (double)value);
}

static void print_results(const int32_t *tokens, const float *logprobs, int64_t rows,
                          int64_t samples, int json)
{
    int64_t row, sample;
    if (json) {
        fputs("{\"tokens\": [", stdout);
        for (row = 0; row < rows; ++row) {
            fputs(row ? ", [" : "[", stdout);
            for (sample = 0; sample < samples; ++sample)
                printf("%s%d", sample ? ", " : "", (int)tokens[row * samples + sample]);
            fputc(']', stdout);
        }
        fputc(']', stdout);
        if (logprobs) {
            fputs(", \"logprobs\": [", stdout);
            for (row = 0; row < rows; ++row) {
                fputs(row ? ", [" : "[", stdout);
                for (sample = 0; sample < samples; ++sample) {
                    if (sample)
                        fputs(", ", stdout);
                    print_logprob(logprobs[row * samples + sample], 1);
                }
                fputc(']', stdout);
            }
            fputc(']', stdout);
        }
        fputs("}\n", stdout);
        return;
    }
    for (row = 0; row < rows; ++row) {
        for (sample = 0; sample < samples; ++sample)
            printf("%s%d", sample ? " " : "", (int)tokens[row * samples + sample]);
        if (logprobs) {
            fputc('\t', stdout);
            for (sample = 0; sample < samples; ++sample) {
                if (sample)
                    fputc(' ', stdout);
                print_logprob(logprobs[row * samples + sample], 0);
            }
        }
        fputc('\n', stdout);
    }
}

/* Why --check-rows refused the input: the first row with a NaN or +inf
 * logit, or with no finite one, and what is wrong with it. The command's
 * parameters were already accepted, so a refused row is one of these.
 * 0 when no such row is found. */
static int describe_bad_row(const cli_npy_array *array, char *text, size_t size)
{
    int64_t row, token;
    for (row = 0; row < array->rows; ++row) {
        int any_finite = 0;
        for (token = 0; token < array->vocab; ++token) {
            int64_t index = row * array->vocab + token;
            float value = array->dtype == PSM_DTYPE_F32
                              ? ((const float *)array->data)[index]
                              : cli_f16_to_float(((const uint16_t *)array->data)[index]);
            if (isnan(value) || (isinf(value) && value > 0)) {
                snprintf(text, size, "row %lld has a %s logit (token %lld)", (long long)row,
                         isnan(value) ? "NaN" : "+inf", (long long)token);
                return 1;
            }
            any_finite |= isfinite(value);
        }
        if (!any_finite) {
            snprintf(text, size, "row %lld has no finite logit (all are -inf)", (long long)row);
            return 1;
        }
    }
    return 0;
}

int cli_sample(int argc, char **argv)
{
    psm_context_options options;
    psm_params params;
    psm_context *context = NULL;
    psm_tensor logits;
    psm_output token_output, logprob_output;
    psm_status status;
    cli_npy_array array;
    const char *path = NULL;
    int want_logprobs = 0, json = 0;
    int32_t *tokens = NULL;
    float *logprobs = NULL;
    char error[512];
    int exit_status = CLI_EXIT_OK;
    int i;

    cli_context_options_init(&options);
    psm_params_init(&params);
    for (i = 0; i < argc; ++i) {
        const char *value = NULL;
        uint64_t integer = 0;
        int matched;
        const char *argument = argv[i];
        if (!strcmp(argument, "--help") || !strcmp(argument, "-h")) {
            fputs(sample_usage, stdout);
            return CLI_EXIT_OK;
        }
        if (!strcmp(argument, "--logprobs")) {
            want_logprobs = 1;
            continue;
        }
        if (!strcmp(argument, "--json")) {
            json = 1;
            continue;
        }
        if (!strcmp(argument, "--check-rows")) {
            options.check_rows = 1;
            continue;
        }
#define SAMPLE_OPTION(name)                                                       \
    (matched = cli_match_option("sample", argc, argv, &i, name, &value)) != 0
        if (SAMPLE_OPTION("--backend")) {
            if (matched < 0)
                return CLI_EXIT_USAGE;
            if (cli_parse_backend(value, &options.backend, &options.device_index) != 0) {
                cli_error("sample", "bad --backend '%s' (auto, cpu, cuda, hip, opencl, "
                                    "optionally :N)", value);
                return CLI_EXIT_USAGE;
            }
        } else if (SAMPLE_OPTION("--threads")) {
            if (matched < 0 ||
                cli_option_decimal("sample", "--threads", value, 1, 4096, &integer) != 0)
                return CLI_EXIT_USAGE;
            options.cpu_threads = (int)integer;
        } else if (SAMPLE_OPTION("--temperature")) {
            if (matched < 0 || cli_parse_float(value, &params.temperature) != 0) {
                if (matched > 0)
                    cli_error("sample", "bad --temperature '%s'", value);
                return CLI_EXIT_USAGE;
            }
        } else if (SAMPLE_OPTION("--top-k")) {
            if (matched < 0 ||
                cli_option_decimal("sample", "--top-k", value, 0, INT32_MAX, &integer) != 0)
                return CLI_EXIT_USAGE;
            params.top_k = (int32_t)integer;
        } else if (SAMPLE_OPTION("--top-p")) {
            if (matched < 0 || cli_parse_float(value, &params.top_p) != 0) {
                if (matched > 0)
                    cli_error("sample", "bad --top-p '%s'", value);
                return CLI_EXIT_USAGE;
            }
        } else if (SAMPLE_OPTION("--min-p")) {
            if (matched < 0 || cli_parse_float(value, &params.min_p) != 0) {
                if (matched > 0)
                    cli_error("sample", "bad --min-p '%s'", value);
                return CLI_EXIT_USAGE;
            }
        } else if (SAMPLE_OPTION("--seed")) {
            if (matched < 0 ||
                cli_option_decimal("sample", "--seed", value, 0, UINT64_MAX, &params.seed) != 0)
                return CLI_EXIT_USAGE;
        } else if (SAMPLE_OPTION("--offset")) {
            if (matched < 0 ||
                cli_option_decimal("sample", "--offset", value, 0, UINT64_MAX, &params.offset) != 0)
                return CLI_EXIT_USAGE;
        } else if (SAMPLE_OPTION("--num-samples")) {
            if (matched < 0 ||
                cli_option_decimal("sample", "--num-samples", value, 1, INT32_MAX, &integer) != 0)
                return CLI_EXIT_USAGE;
            params.num_samples = (int32_t)integer;
        } else if (argument[0] == '-' && argument[1] != '\0') {
            cli_error("sample", "unknown option '%s' (see polysample sample --help)", argument);
            return CLI_EXIT_USAGE;
        } else if (path) {
            cli_error("sample", "more than one input file ('%s' and '%s')", path, argument);
            return CLI_EXIT_USAGE;
        } else {
            path = argument;
        }
#undef SAMPLE_OPTION
    }
    if (!path) {
        cli_error("sample", "no input file\n%s", sample_usage);
        return CLI_EXIT_USAGE;
    }
    if (cli_npy_read(path, &array, error, sizeof error) != 0) {
        cli_error("sample", "%s", error);
        return CLI_EXIT_USAGE;
    }
    if ((uint64_t)array.rows > (uint64_t)(SIZE_MAX / sizeof(float)) / (uint64_t)params.num_samples) {
        cli_error("sample", "rows x num_samples is too large");
        cli_npy_free(&array);
        return CLI_EXIT_USAGE;
    }
    tokens = cli_alloc("sample", (size_t)array.rows * (size_t)params.num_samples * sizeof *tokens);
    if (want_logprobs)
        logprobs =
            cli_alloc("sample", (size_t)array.rows * (size_t)params.num_samples * sizeof *logprobs);
    if (!tokens || (want_logprobs && !logprobs)) {
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }

    status = psm_context_create(&options, &context);
    if (status != PSM_OK) {
        cli_library_error("sample", "creating the context", status);
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    memset(&logits, 0, sizeof logits);
    logits.data = array.data;
    logits.dtype = array.dtype;
    logits.memory = PSM_MEMORY_HOST;
    logits.rows = array.rows;
    logits.vocab = array.vocab;
    token_output.data = tokens;
    token_output.memory = PSM_MEMORY_HOST;
    logprob_output.data = logprobs;
    logprob_output.memory = PSM_MEMORY_HOST;
    status = psm_sample(context, &logits, &params, token_output, logprob_output);
    if (status == PSM_OK)
        status = psm_synchronize(context);
    if (status == PSM_ERR_BAD_ROW && describe_bad_row(&array, error, sizeof error)) {
        cli_error("sample", "%s; --check-rows refuses such a row (without it the row gets "
                            "token -1)", error);
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    if (status != PSM_OK) {
        cli_library_error("sample", "psm_sample", status);
        /* An out-of-range flag is the caller's mistake, not a failure. */
        exit_status = status == PSM_ERR_INVALID_PARAMETER ? CLI_EXIT_USAGE : CLI_EXIT_FAILURE;
        goto done;
    }
    print_results(tokens, logprobs, array.rows, params.num_samples, json);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        cli_error("sample", "writing the output failed");
        exit_status = CLI_EXIT_FAILURE;
    }

done:
    psm_context_destroy(context);
    free(tokens);
    free(logprobs);
    cli_npy_free(&array);
    return exit_status;
}
