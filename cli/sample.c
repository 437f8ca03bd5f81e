/* sample.c: `polysample sample`: tokens from logits in a .npy file. */
#include "cli_commands.h"
#include "cli_options.h"
#include "cli_util.h"
#include "npy.h"
#include "polysample.h"
#include "processing_files.h"
#include "sample_verify.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char sample_description[] =
    "Samples tokens from a .npy file of logits: float32 or float16, 1-D (one\n"
    "row) or 2-D (rows x vocab), C order. Prints one line per row: the row's\n"
    "tokens separated by spaces (with --logprobs, a tab and then their logprobs;\n"
    "with --top-logprobs N, a tab and the row's N most probable tokens as\n"
    "TOKEN:LOGPROB, then a tab and each drawn token's rank, 1 the most probable).\n"
    "With --verify it verifies drafted tokens instead (see below).\n";

static const char sample_notes[] =
    "\n"
    "Logit processing (docs/SAMPLING.md, section 1) changes each row's logits\n"
    "before sampling, in this order: the penalties, for tokens of the row's\n"
    "history (and, for the repetition penalty, of its prompt); the bias; the\n"
    "mask. A row left with no finite allowed logit, or with a NaN or +inf one\n"
    "(masked or not), is a bad row (token -1; --check-rows refuses it).\n"
    "The CPU, CUDA, HIP and OpenCL backends run it. The files:\n"
    "  --allowed-mask  a .npy of uint32 words, rows x W with W >= ceil(vocab/32)\n"
    "                  (bit i % 32 of word i / 32 allows token i), or of bool,\n"
    "                  rows x vocab (true allows); 1-D for one row\n"
    "  --logit-bias    text: lines \"ROW TOKEN VALUE\" (VALUE is added)\n"
    "  --history       text: lines \"ROW TOKEN [TOKEN ...]\", e.g. the tokens\n"
    "  --prompt        generated so far, and the prompt's tokens\n"
    "In the text files ROW is a logits row from 0, or '*' for every row; a row\n"
    "may have several lines, and its entries keep the file's order (bias\n"
    "entries of one token add in that order); words are separated by spaces or\n"
    "tabs; '#' starts a comment; blank lines are skipped.\n"
    "\n"
    "Verification (--verify; docs/SAMPLING.md, section 7) checks k drafted\n"
    "tokens per request against the target's logits by exact rejection\n"
    "sampling (CPU backend). LOGITS.npy then holds requests x (k + 1) rows: row\n"
    "r (k + 1) + i is the target's distribution after draft node i of request r\n"
    "(node 0, the root, is the last token already emitted). The drafts:\n"
    "  --draft-tokens   a .npy of int32, requests x k (1-D for one request): the\n"
    "                   token of node i in column i - 1; k is its column count\n"
    "  --draft-parents  int32, requests x k: node i's parent, 0 .. i - 1 (a\n"
    "                   tree); without it the nodes are a chain\n"
    "  --draft-logits   the distribution each node's token was drawn from,\n"
    "                   requests x k rows of the target's vocab (float32 or\n"
    "                   float16), shaped by --draft-temperature, --draft-top-k,\n"
    "                   --draft-top-p, --draft-min-p and --draft-filter-order\n"
    "  --draft-probs    or the same as float32 probabilities in [0, 1]\n"
    "                   (neither: one-hot drafts, as from n-grams or prompt\n"
    "                   lookup)\n"
    "The target's options are the usual ones (--temperature, --top-k, --top-p,\n"
    "--min-p, --filter-order, --seed, --offset). It prints one line per\n"
    "request: the accepted count; a tab and the emitted tokens (the accepted\n"
    "drafts, then the correction or bonus token); a tab and the nodes they were\n"
    "drawn at (0, then the accepted path); with --logprobs, a tab and their\n"
    "logprobs under the target. A bad request prints -1 in each place (nan\n"
    "for its logprob). --json writes {\"accepted\": [...], \"tokens\": [[...]],\n"
    "\"path_nodes\": [[...]], \"logprobs\": [[...]]} with the same lists (the\n"
    "logprobs with --logprobs).\n";

/* The processing options: their files, and the penalties, which go
 * straight into processing. */
typedef struct processing_options {
    const char *mask_path, *bias_path, *history_path, *prompt_path;
    psm_logit_processing processing;
} processing_options;

/* What the processing files held, in the library's layout. */
typedef struct processing_inputs {
    uint32_t *mask;
    cli_row_lists bias, history, prompt;
} processing_inputs;

static void free_processing_inputs(processing_inputs *inputs)
{
    free(inputs->mask);
    inputs->mask = NULL;
    cli_row_lists_free(&inputs->bias);
    cli_row_lists_free(&inputs->history);
    cli_row_lists_free(&inputs->prompt);
}

static int processing_requested(const processing_options *options)
{
    return options->mask_path || options->bias_path || options->history_path ||
           options->prompt_path;
}

/* Reads the files named in options for logits of rows x vocab into inputs,
 * and points options->processing at them. 0, or -1 with a message in error
 * (inputs then hold nothing). */
static int read_processing_files(processing_options *options, int64_t rows, int64_t vocab,
                                 processing_inputs *inputs, char *error, size_t error_size)
{
    psm_logit_processing *processing = &options->processing;
    memset(inputs, 0, sizeof *inputs);
    if (options->mask_path &&
        cli_read_allowed_mask(options->mask_path, rows, vocab, &inputs->mask,
                              &processing->allowed_mask_words, error, error_size) != 0)
        return -1;
    if ((options->bias_path && cli_read_bias_lists(options->bias_path, rows, vocab,
                                                   &inputs->bias, error, error_size) != 0) ||
        (options->history_path && cli_read_token_lists(options->history_path, rows, vocab,
                                                       &inputs->history, error,
                                                       error_size) != 0) ||
        (options->prompt_path && cli_read_token_lists(options->prompt_path, rows, vocab,
                                                      &inputs->prompt, error, error_size) != 0)) {
        free_processing_inputs(inputs);
        return -1;
    }
    processing->allowed_mask = inputs->mask;
    cli_attach_row_lists(processing, &inputs->bias, &inputs->history, &inputs->prompt);
    return 0;
}

/* The top-N outputs, when asked for. */
typedef struct top_results {
    int32_t count; /* 0: none */
    const int32_t *tokens, *ranks;
    const float *logprobs;
} top_results;

static void print_top(const top_results *top, int64_t row, int64_t samples, int json)
{
    for (int32_t e = 0; e < top->count; ++e) {
        const int64_t k = row * top->count + e;
        if (json) {
            printf("%s[%d, ", e ? ", " : "", (int)top->tokens[k]);
            cli_print_logprob(top->logprobs[k], 1);
            fputc(']', stdout);
        } else {
            printf("%s%d:", e ? " " : "", (int)top->tokens[k]);
            cli_print_logprob(top->logprobs[k], 0);
        }
    }
    if (!json) {
        fputc('\t', stdout);
        for (int64_t sample = 0; sample < samples; ++sample)
            printf("%s%d", sample ? " " : "", (int)top->ranks[row * samples + sample]);
    }
}

static void print_results(const int32_t *tokens, const float *logprobs, const top_results *top,
                          int64_t rows, int64_t samples, int json)
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
                    cli_print_logprob(logprobs[row * samples + sample], 1);
                }
                fputc(']', stdout);
            }
            fputc(']', stdout);
        }
        if (top->count) {
            fputs(", \"top_logprobs\": [", stdout);
            for (row = 0; row < rows; ++row) {
                fputs(row ? ", [" : "[", stdout);
                print_top(top, row, samples, 1);
                fputc(']', stdout);
            }
            fputs("], \"ranks\": [", stdout);
            for (row = 0; row < rows; ++row) {
                fputs(row ? ", [" : "[", stdout);
                for (sample = 0; sample < samples; ++sample)
                    printf("%s%d", sample ? ", " : "", (int)top->ranks[row * samples + sample]);
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
                cli_print_logprob(logprobs[row * samples + sample], 0);
            }
        }
        if (top->count) {
            fputc('\t', stdout);
            print_top(top, row, samples, 0);
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

/* --top-logprobs and --raw-logprobs. */
typedef struct top_options {
    uint64_t count; /* 0: none */
    int raw;
} top_options;

/* The --draft-* options that only --draft-logits uses: given (not at their
 * defaults) without it, they would change nothing. */
static int draft_params_given(const cli_verify_options *verify)
{
    psm_params defaults;
    psm_params_init(&defaults);
    return verify->draft_params.temperature != defaults.temperature ||
           verify->draft_top_k != (uint64_t)defaults.top_k ||
           verify->draft_params.top_p != defaults.top_p ||
           verify->draft_params.min_p != defaults.min_p || verify->draft_filter_order;
}

/* Refuses --verify's options without it, --verify without its drafts, and
 * what psm_verify does not take. 0, or -1 after a message. */
static int check_verify_options(const cli_verify_options *verify, const psm_params *params,
                                const processing_options *processing, const top_options *top)
{
    const char *draft_option = verify->tokens_path    ? "--draft-tokens"
                               : verify->parents_path ? "--draft-parents"
                               : verify->logits_path  ? "--draft-logits"
                               : verify->probs_path   ? "--draft-probs"
                               : draft_params_given(verify) ? "--draft-temperature, --draft-top-k, "
                                                              "--draft-top-p, --draft-min-p or "
                                                              "--draft-filter-order"
                                                            : NULL;
    if (!verify->verify) {
        if (draft_option)
            cli_error("sample", "%s needs --verify", draft_option);
        return draft_option ? -1 : 0;
    }
    if (!verify->tokens_path) {
        cli_error("sample", "--verify needs --draft-tokens FILE (the drafted tokens)");
        return -1;
    }
    if (verify->logits_path && verify->probs_path) {
        cli_error("sample", "--draft-logits and --draft-probs are two forms of the draft's "
                            "distribution; give one (or neither, for one-hot drafts)");
        return -1;
    }
    if (!verify->logits_path && draft_params_given(verify)) {
        cli_error("sample", "--draft-temperature, --draft-top-k, --draft-top-p, --draft-min-p "
                            "and --draft-filter-order shape --draft-logits, which is not given");
        return -1;
    }
    if (params->num_samples != 1 || top->count || processing_requested(processing)) {
        cli_error("sample", "--verify emits one token per draft node and takes no %s",
                  params->num_samples != 1 ? "--num-samples"
                  : top->count             ? "--top-logprobs"
                                           : "logit processing (psm_verify has none yet)");
        return -1;
    }
    return 0;
}

/* The options into options and params; the input file into *path (NULL
 * after --help). CLI_EXIT_OK, or CLI_EXIT_USAGE after a message. */
static int read_command_line(int argc, char **argv, psm_context_options *options,
                             psm_params *params, processing_options *processing,
                             top_options *top, cli_verify_options *verify, const char **path,
                             int *want_logprobs, int *json)
{
    psm_logit_processing *penalties = &processing->processing;
    cli_backend_list backend = {0};
    uint64_t threads = 0, top_k = (uint64_t)params->top_k,
             num_samples = (uint64_t)params->num_samples;
    int check_rows = 0, parsed;
    const char *filter_order = NULL;
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
        {.name = "--filter-order", .kind = CLI_OPTION_STRING, .value_name = "NAME",
         .target = &filter_order,
         .help = "the filters' order and rules: polysample,\nvllm, sglang, llama.cpp,\n"
                 "flashinfer-top-k-first or flashinfer-joint\n(docs/SAMPLING.md, 4)",
         .default_text = "polysample"},
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
        {.name = "--top-logprobs", .kind = CLI_OPTION_DECIMAL, .value_name = "N",
         .target = &top->count, .minimum = 1, .maximum = PSM_MAX_TOP_LOGPROBS,
         .help = "also print each row's N most probable\ntokens, their logprobs and the "
                 "drawn\ntokens' ranks (docs/SAMPLING.md, 6)"},
        {.name = "--raw-logprobs", .kind = CLI_OPTION_FLAG, .target = &top->raw,
         .help = "--top-logprobs of the logits as given\n(no processing, temperature 1, no\n"
                 "filters), not of the distribution drawn\nfrom"},
        {.name = "--check-rows", .kind = CLI_OPTION_FLAG, .target = &check_rows,
         .help = "fail on a row with NaN/+inf or no finite\nlogit (by default such a row "
                 "gets\ntoken -1)"},
        {.name = "--json", .kind = CLI_OPTION_FLAG, .target = json,
         .help = "write {\"tokens\": [[...]], \"logprobs\":\n[[...]]} instead"},
        {.name = "--allowed-mask", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &processing->mask_path,
         .help = "allow only these tokens (.npy of uint32\nwords or bool; see below)"},
        {.name = "--logit-bias", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &processing->bias_path, .help = "add these values to these tokens' logits"},
        {.name = "--history", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &processing->history_path,
         .help = "each row's tokens so far, which the\npenalties count"},
        {.name = "--prompt", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &processing->prompt_path,
         .help = "each row's prompt tokens, which the\nrepetition penalty also penalises"},
        {.name = "--repetition-penalty", .kind = CLI_OPTION_FLOAT, .value_name = "R",
         .target = &penalties->repetition_penalty,
         .help = "a listed token's logit x > 0 becomes\nx / R, others x * R; 1e-3 to 1e3, 1 is off"},
        {.name = "--frequency-penalty", .kind = CLI_OPTION_FLOAT, .value_name = "F",
         .target = &penalties->frequency_penalty,
         .help = "subtract F times the token's count in\nthe history; -1e3 to 1e3, 0 is off"},
        {.name = "--presence-penalty", .kind = CLI_OPTION_FLOAT, .value_name = "P",
         .target = &penalties->presence_penalty,
         .help = "subtract P from tokens in the history;\n-1e3 to 1e3, 0 is off"},
        {.name = "--verify", .kind = CLI_OPTION_FLAG, .target = &verify->verify,
         .help = "verify the drafts of --draft-tokens\nagainst LOGITS.npy (see below)"},
        {.name = "--draft-tokens", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &verify->tokens_path,
         .help = "--verify: the drafted tokens (.npy of\nint32, requests x k)"},
        {.name = "--draft-parents", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &verify->parents_path,
         .help = "--verify: each node's parent (.npy of\nint32, requests x k); none: a chain",
         .default_text = ""},
        {.name = "--draft-logits", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &verify->logits_path,
         .help = "--verify: the draft's logits, requests x\nk rows (with neither this nor\n"
                 "--draft-probs: one-hot drafts)"},
        {.name = "--draft-probs", .kind = CLI_OPTION_STRING, .value_name = "FILE",
         .target = &verify->probs_path,
         .help = "--verify: the draft's probabilities,\nrequests x k rows of float32",
         .default_text = ""},
        {.name = "--draft-temperature", .kind = CLI_OPTION_FLOAT, .value_name = "T",
         .target = &verify->draft_params.temperature,
         .help = "--draft-logits' temperature"},
        {.name = "--draft-top-k", .kind = CLI_OPTION_DECIMAL, .value_name = "K",
         .target = &verify->draft_top_k, .maximum = INT32_MAX,
         .help = "--draft-logits' top-k; 0 is off"},
        {.name = "--draft-top-p", .kind = CLI_OPTION_FLOAT, .value_name = "P",
         .target = &verify->draft_params.top_p, .help = "--draft-logits' top-p; 1 is off"},
        {.name = "--draft-min-p", .kind = CLI_OPTION_FLOAT, .value_name = "P",
         .target = &verify->draft_params.min_p, .help = "--draft-logits' min-p; 0 is off"},
        {.name = "--draft-filter-order", .kind = CLI_OPTION_STRING, .value_name = "NAME",
         .target = &verify->draft_filter_order,
         .help = "--draft-logits' filter order (as\n--filter-order)", .default_text = "polysample"},
    };
    const cli_command sample_command = {
        .name = "sample",
        .synopsis = "polysample sample [options] LOGITS.npy\n"
                    "       polysample sample --verify --draft-tokens FILE [options] LOGITS.npy",
        .description = sample_description,
        .options = sample_options,
        .option_count = (int)(sizeof sample_options / sizeof sample_options[0]),
        .notes = sample_notes,
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
    /* A penalty without the list it applies to would change nothing. */
    if ((penalties->frequency_penalty != 0.0f || penalties->presence_penalty != 0.0f) &&
        !processing->history_path) {
        cli_error("sample", "--%s-penalty needs --history (the tokens it counts)",
                  penalties->frequency_penalty != 0.0f ? "frequency" : "presence");
        return CLI_EXIT_USAGE;
    }
    if (penalties->repetition_penalty != 1.0f && !processing->history_path &&
        !processing->prompt_path) {
        cli_error("sample", "--repetition-penalty needs --history or --prompt (the tokens it "
                            "penalises)");
        return CLI_EXIT_USAGE;
    }
    if (filter_order && cli_parse_filter_order(filter_order, &params->filter_order) != 0) {
        cli_error("sample", "--filter-order %s: expected " CLI_FILTER_ORDER_NAMES, filter_order);
        return CLI_EXIT_USAGE;
    }
    if (verify->draft_filter_order &&
        cli_parse_filter_order(verify->draft_filter_order, &verify->draft_params.filter_order) !=
            0) {
        cli_error("sample", "--draft-filter-order %s: expected " CLI_FILTER_ORDER_NAMES,
                  verify->draft_filter_order);
        return CLI_EXIT_USAGE;
    }
    if (top->raw && !top->count) {
        cli_error("sample", "--raw-logprobs needs --top-logprobs N");
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
    return check_verify_options(verify, params, processing, top) == 0 ? CLI_EXIT_OK
                                                                       : CLI_EXIT_USAGE;
}

int cli_sample(int argc, char **argv)
{
    psm_context_options options;
    psm_params params;
    processing_options processing;
    processing_inputs inputs;
    psm_context *context = NULL;
    psm_tensor logits;
    psm_output token_output, logprob_output;
    psm_status status;
    cli_npy_array array;
    const char *path = NULL;
    int want_logprobs = 0, json = 0;
    int32_t *tokens = NULL;
    float *logprobs = NULL;
    top_options top;
    cli_verify_options verify;
    psm_top_logprobs top_request;
    top_results top_out = {0};
    int32_t *top_tokens = NULL, *ranks = NULL;
    float *top_logprobs = NULL;
    char error[512];
    int exit_status = CLI_EXIT_OK;

    cli_context_options_init(&options);
    psm_params_init(&params);
    memset(&processing, 0, sizeof processing);
    memset(&inputs, 0, sizeof inputs);
    psm_logit_processing_init(&processing.processing);
    memset(&top, 0, sizeof top);
    memset(&verify, 0, sizeof verify);
    psm_params_init(&verify.draft_params);
    verify.draft_top_k = (uint64_t)verify.draft_params.top_k;
    exit_status = read_command_line(argc, argv, &options, &params, &processing, &top, &verify,
                                    &path, &want_logprobs, &json);
    if (exit_status != CLI_EXIT_OK || !path)
        return exit_status;
    if (verify.verify)
        return cli_sample_verify(path, &verify, &options, &params, want_logprobs, json);
    if (cli_npy_read(path, &array, error, sizeof error) != 0) {
        cli_error("sample", "%s", error);
        return CLI_EXIT_USAGE;
    }
    if ((uint64_t)array.rows > (uint64_t)(SIZE_MAX / sizeof(float)) / (uint64_t)params.num_samples) {
        cli_error("sample", "rows x num_samples is too large");
        cli_npy_free(&array);
        return CLI_EXIT_USAGE;
    }
    if (processing_requested(&processing)) {
        if (read_processing_files(&processing, array.rows, array.vocab, &inputs, error,
                                  sizeof error) != 0) {
            cli_error("sample", "%s", error);
            cli_npy_free(&array);
            return CLI_EXIT_USAGE;
        }
        params.processing = &processing.processing;
    }
    tokens = cli_alloc("sample", (size_t)array.rows * (size_t)params.num_samples * sizeof *tokens);
    if (want_logprobs)
        logprobs =
            cli_alloc("sample", (size_t)array.rows * (size_t)params.num_samples * sizeof *logprobs);
    if (!tokens || (want_logprobs && !logprobs)) {
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    if (top.count) {
        top_tokens = cli_alloc("sample", (size_t)array.rows * top.count * sizeof *top_tokens);
        top_logprobs = cli_alloc("sample", (size_t)array.rows * top.count * sizeof *top_logprobs);
        ranks = cli_alloc("sample", (size_t)array.rows * (size_t)params.num_samples * sizeof *ranks);
        if (!top_tokens || !top_logprobs || !ranks) {
            exit_status = CLI_EXIT_FAILURE;
            goto done;
        }
        memset(&top_request, 0, sizeof top_request);
        top_request.count = (int32_t)top.count;
        top_request.mode = top.raw ? PSM_LOGPROBS_RAW : PSM_LOGPROBS_PROCESSED;
        top_request.tokens = (psm_output){top_tokens, PSM_MEMORY_HOST};
        top_request.logprobs = (psm_output){top_logprobs, PSM_MEMORY_HOST};
        top_request.sampled_ranks = (psm_output){ranks, PSM_MEMORY_HOST};
        params.top_logprobs = &top_request;
        top_out = (top_results){(int32_t)top.count, top_tokens, ranks, top_logprobs};
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
    /* With processing a row is judged after it (a mask or a bias can make a
     * row bad), so the raw logits cannot say which row failed; the library's
     * message does. */
    if (status == PSM_ERR_BAD_ROW && !params.processing &&
        describe_bad_row(&array, error, sizeof error)) {
        cli_error("sample", "%s; --check-rows refuses such a row (without it the row gets "
                            "token -1)", error);
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    if (status == PSM_ERR_BAD_ROW && params.processing) {
        cli_error("sample", "psm_sample failed: %s; with logit processing a row is judged "
                            "after it (a mask that allows no finite logit, or a bias that "
                            "reaches +inf, makes it bad)", psm_last_error());
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    if (status != PSM_OK) {
        cli_library_error("sample", "psm_sample", status);
        /* An out-of-range flag is the caller's mistake, not a failure. */
        exit_status = status == PSM_ERR_INVALID_PARAMETER ? CLI_EXIT_USAGE : CLI_EXIT_FAILURE;
        goto done;
    }
    print_results(tokens, logprobs, &top_out, array.rows, params.num_samples, json);
    if (fflush(stdout) != 0 || ferror(stdout)) {
        cli_error("sample", "writing the output failed");
        exit_status = CLI_EXIT_FAILURE;
    }

done:
    psm_context_destroy(context);
    free(tokens);
    free(logprobs);
    free(top_tokens);
    free(top_logprobs);
    free(ranks);
    free_processing_inputs(&inputs);
    cli_npy_free(&array);
    return exit_status;
}
