/* sample.c: `polysample sample`: tokens from logits in a .npy file. */
#include "cli_commands.h"
#include "cli_options.h"
#include "cli_util.h"
#include "npy.h"
#include "polysample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char sample_description[] =
    "Samples tokens from a .npy file of logits: float32 or float16, 1-D (one\n"
    "row) or 2-D (rows x vocab), C order. Prints one line per row: the row's\n"
    "tokens separated by spaces (with --logprobs, a tab and then their logprobs).\n";

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

/* The options into options and params; the input file into *path (NULL
 * after --help). CLI_EXIT_OK, or CLI_EXIT_USAGE after a message. */
static int read_command_line(int argc, char **argv, psm_context_options *options,
                             psm_params *params, const char **path, int *want_logprobs,
                             int *json)
{
    cli_backend_list backend = {0};
    uint64_t threads = 0, top_k = (uint64_t)params->top_k,
             num_samples = (uint64_t)params->num_samples;
    int check_rows = 0, parsed;
    const cli_option sample_options[] = {
        {.name = "--backend", .kind = CLI_OPTION_BACKEND_LIST, .value_name = "NAME[:N]",
         .target = &backend, .maximum = 1,
         .help = "auto, cpu, cuda, hip or opencl; N picks\na device", .default_text = "auto"},
        {.name = "--threads", .kind = CLI_OPTION_DECIMAL, .value_name = "N", .target = &threads,
         .minimum = 1, .maximum = 4096, .help = "CPU backend threads",
         .default_text = "OpenMP's"},
        {.name = "--temperature", .kind = CLI_OPTION_FLOAT, .value_name = "T",
         .target = &params->temperature, .help = "below 1e-5 (0 included) is greedy"},
        {.name = "--top-k", .kind = CLI_OPTION_DECIMAL, .value_name = "K", .target = &top_k,
         .maximum = INT32_MAX, .help = "keep the K most probable tokens; 0 is off"},
        {.name = "--top-p", .kind = CLI_OPTION_FLOAT, .value_name = "P", .target = &params->top_p,
         .help = "keep the smallest set reaching mass P,\nin (0, 1]; 1 is off"},
        {.name = "--min-p", .kind = CLI_OPTION_FLOAT, .value_name = "P", .target = &params->min_p,
         .help = "keep tokens at least P times the top\nprobability; 0 is off"},
        {.name = "--seed", .kind = CLI_OPTION_DECIMAL, .value_name = "S", .target = &params->seed,
         .maximum = UINT64_MAX, .help = "random seed, 0 to 2^64 - 1"},
        {.name = "--offset", .kind = CLI_OPTION_DECIMAL, .value_name = "O",
         .target = &params->offset, .maximum = UINT64_MAX,
         .help = "random stream offset, e.g. the decoding\nstep, 0 to 2^64 - 1"},
        {.name = "--num-samples", .kind = CLI_OPTION_DECIMAL, .value_name = "N",
         .target = &num_samples, .minimum = 1, .maximum = INT32_MAX,
         .help = "tokens per row, drawn with replacement"},
        {.name = "--logprobs", .kind = CLI_OPTION_FLAG, .target = want_logprobs,
         .help = "also print each token's log-probability"},
        {.name = "--check-rows", .kind = CLI_OPTION_FLAG, .target = &check_rows,
         .help = "fail on a row with NaN/+inf or no finite\nlogit (by default such a row "
                 "gets\ntoken -1)"},
        {.name = "--json", .kind = CLI_OPTION_FLAG, .target = json,
         .help = "write {\"tokens\": [[...]], \"logprobs\":\n[[...]]} instead"},
    };
    const cli_command sample_command = {
        .name = "sample",
        .synopsis = "polysample sample [options] LOGITS.npy",
        .description = sample_description,
        .options = sample_options,
        .option_count = (int)(sizeof sample_options / sizeof sample_options[0]),
        .positional_name = "input file",
        .positional = path,
    };
    parsed = cli_parse_options(&sample_command, argc, argv);
    if (parsed != CLI_PARSE_OK) {
        *path = NULL;
        return parsed == CLI_PARSE_HELP ? CLI_EXIT_OK : CLI_EXIT_USAGE;
    }
    if (!*path) {
        cli_error("sample", "no input file");
        cli_print_usage(&sample_command, stderr);
        return CLI_EXIT_USAGE;
    }
    if (backend.count) {
        options->backend = backend.backends[0];
        options->device_index = backend.device_indices[0];
    }
    options->cpu_threads = (int)threads;
    options->check_rows = check_rows;
    params->top_k = (int32_t)top_k;
    params->num_samples = (int32_t)num_samples;
    return CLI_EXIT_OK;
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

    cli_context_options_init(&options);
    psm_params_init(&params);
    exit_status = read_command_line(argc, argv, &options, &params, &path, &want_logprobs, &json);
    if (exit_status != CLI_EXIT_OK || !path)
        return exit_status;
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
