/* check.c: `polysample check`: the contract's promise, tested end to end.
 * The same random inputs go through every available backend, the CPU backend
 * at 1 and 2 threads, device-resident buffers where the tool can make them,
 * and different batch compositions; every pair must agree on every token.
 * Then a few settings are drawn 10^6 times on the CPU backend and compared
 * with a float64 softmax by a chi-square test. This file is the command: its
 * options, the list of cases and the verdict; the work is in the files that
 * check.h names. */
#include "check.h"
#include "cli_commands.h"
#include "cli_options.h"
#include "cli_util.h"
#include "polysample.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static const char check_description[] =
    "Runs the same random logits (vocab 1, 1000, 1025, 32000, 151936; f32, f16,\n"
    "bf16; parameter sets plain, greedy, top_k, top_p, min_p, combined,\n"
    "per_row_params, per_row_seeds, num_samples_4, and the request state:\n"
    "offset_per_row, subsequences (one seed and position, a subsequence per\n"
    "row), gather (row indices with repeats, 1.5x the logits' rows, per-row\n"
    "parameters) and seed_offset_pointers; logit processing: processing and\n"
    "processing_per_row (a mask allowing about half the tokens, a bias list, a\n"
    "history of 200-400 tokens with repeats and a prompt list per row, the\n"
    "penalties as scalars or per row); top-N logprobs, N = 20 with the drawn\n"
    "tokens' ranks: top_logprobs (processed), top_logprobs_raw, and\n"
    "processing_top_logprobs (with processing and a gather); the filter\n"
    "orders order_vllm, order_sglang, order_llama.cpp,\n"
    "order_flashinfer_top_k_first and order_flashinfer_joint (T 0.8, top-k\n"
    "40, top-p 0.9, min-p 0.02)) through every\n"
    "device of every available backend (e.g. opencl:0 and opencl:1 for a GPU\n"
    "driver and PoCL), the CPU backend at 1 and 2 threads, each batch split\n"
    "by vocabulary into 3 shards (psm_sharded_*) on the CPU and on every\n"
    "device, device-resident\n"
    "buffers (CUDA, OpenCL; per-row arrays, indices, pointers and processing\n"
    "lists too) and, with per-row seeds, rows alone, split and reversed\n"
    "batches; every other case has padded rows (row_stride > vocab) and\n"
    "offsets use both 32-bit words. Prints token agreement for every pair (it\n"
    "must be 100%), logprob differences, top-N list and rank agreement, the\n"
    "participants that refused a case's logit processing, top-N logprobs or\n"
    "filter order (skipped, not counted as agreement), and chi-square tests\n"
    "of a few settings, one with logit processing and one per filter order,\n"
    "against a float64 softmax (10^6 draws each on the CPU backend).\n"
    "Speculative verification (psm_verify), a tenth of --rows in target rows:\n"
    "chains of 4 drafts with draft logits, draft probabilities and one-hot\n"
    "drafts (greedy targets among them), a tree of two candidates per level\n"
    "and a batch with bad requests, vocab 1000, 32000 and 151936 in f32 and\n"
    "bf16, on every participant: accepted counts, tokens and path nodes must\n"
    "agree exactly and logprobs to float rounding, each request's outputs\n"
    "follow the rules (path, drafts, -1 after, the float64 logprobs); then\n"
    "--draws requests of a chain with a poor draft on the CPU backend: the\n"
    "first emitted token against the target's float64 distribution\n"
    "(chi-square) and the mean accepted length against its float64\n"
    "expectation.\n"
    "Exit status 1 on any disagreement, failed call or failed test.\n";

static const parameter_set parameter_sets[] = {
    {"plain", 1.0f, 0, 1.0f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"greedy", 0.0f, 0, 1.0f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"top_k", 0.8f, 50, 1.0f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"top_p", 1.0f, 0, 0.9f, 0.0f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"min_p", 1.0f, 0, 1.0f, 0.05f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"combined", 0.7f, 40, 0.95f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"per_row_params", 1.0f, 0, 1.0f, 0.0f, 1, 1, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"per_row_seeds", 0.9f, 0, 1.0f, 0.0f, 1, 1, 1, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"num_samples_4", 1.2f, 0, 0.8f, 0.0f, 4, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0, 0},
    {"offset_per_row", 1.0f, 0, 0.95f, 0.0f, 2, 0, 0, REQUEST_STATE_OFFSETS, PROCESSING_NONE, 0,
     0, 0},
    {"subsequences", 0.9f, 0, 1.0f, 0.0f, 2, 0, 1, REQUEST_STATE_SUBSEQUENCES, PROCESSING_NONE, 0,
     0, 0},
    {"gather", 0.8f, 30, 1.0f, 0.0f, 2, 1, 0, REQUEST_STATE_GATHER, PROCESSING_NONE, 0, 0, 0},
    {"seed_offset_pointers", 1.0f, 0, 0.9f, 0.02f, 1, 0, 0, REQUEST_STATE_POINTERS,
     PROCESSING_NONE, 0, 0, 0},
    /* Logit processing and top-N logprobs (N = 20, with the drawn tokens'
     * ranks). */
    {"processing", 0.9f, 0, 0.95f, 0.0f, 2, 0, 0, REQUEST_STATE_NONE, PROCESSING_SCALAR_PENALTIES,
     0, 0, 0},
    {"processing_per_row", 1.0f, 0, 1.0f, 0.0f, 1, 1, 1, REQUEST_STATE_NONE,
     PROCESSING_PER_ROW_PENALTIES, 0, 0, 0},
    {"top_logprobs", 0.8f, 0, 0.9f, 0.0f, 3, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 20,
     PSM_LOGPROBS_PROCESSED, 0},
    {"top_logprobs_raw", 0.7f, 40, 1.0f, 0.0f, 2, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 20,
     PSM_LOGPROBS_RAW, 0},
    {"processing_top_logprobs", 1.0f, 50, 1.0f, 0.0f, 2, 0, 0, REQUEST_STATE_GATHER,
     PROCESSING_SCALAR_PENALTIES, 20, PSM_LOGPROBS_PROCESSED, 0},
    /* The filter orders other than the default, every filter on so that
     * the order decides the kept set. */
    {"order_vllm", 0.8f, 40, 0.9f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0,
     PSM_FILTER_ORDER_VLLM},
    {"order_sglang", 0.8f, 40, 0.9f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0, 0,
     PSM_FILTER_ORDER_SGLANG},
    {"order_llama.cpp", 0.8f, 40, 0.9f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE, PROCESSING_NONE, 0,
     0, PSM_FILTER_ORDER_LLAMA_CPP},
    {"order_flashinfer_top_k_first", 0.8f, 40, 0.9f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE,
     PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST},
    {"order_flashinfer_joint", 0.8f, 40, 0.9f, 0.02f, 1, 0, 0, REQUEST_STATE_NONE,
     PROCESSING_NONE, 0, 0, PSM_FILTER_ORDER_FLASHINFER_JOINT},
};
#define PARAMETER_SET_COUNT ((int)(sizeof parameter_sets / sizeof parameter_sets[0]))

/* Vocabularies: a single token, less than one tile, one tile and a token,
 * and two real ones. The weight is each vocab's share of the row budget. */
static const struct {
    int64_t vocab;
    double row_share;
} check_vocabs[] = {{1, 0.1}, {1000, 0.3}, {1025, 0.3}, {32000, 0.2}, {151936, 0.1}};
#define CHECK_VOCAB_COUNT ((int)(sizeof check_vocabs / sizeof check_vocabs[0]))

static const psm_dtype check_dtypes[] = {PSM_DTYPE_F32, PSM_DTYPE_F16, PSM_DTYPE_BF16};
#define CHECK_DTYPE_COUNT 3

/* Every case: each vocab, dtype and parameter set, with its share of the
 * rows. 0, or -1 when a case could not be made. */
static int run_cases(check_state *state, int64_t row_budget, uint64_t seed, int *case_count,
                     int64_t *total_rows)
{
    int v, d, s;
    for (v = 0; v < CHECK_VOCAB_COUNT; ++v)
        for (d = 0; d < CHECK_DTYPE_COUNT; ++d)
            for (s = 0; s < PARAMETER_SET_COUNT; ++s) {
                int64_t vocab = check_vocabs[v].vocab;
                double share =
                    check_vocabs[v].row_share / (CHECK_DTYPE_COUNT * PARAMETER_SET_COUNT);
                int64_t rows = (int64_t)(share * (double)row_budget);
                uint64_t case_seed = cli_random_u64(seed, (uint64_t)*case_count);
                if (rows < 8)
                    rows = 8;
                if (state->show_progress)
                    fprintf(stderr, "\rcase %d/%d: %lld x %lld %s %s            ", *case_count + 1,
                            CHECK_VOCAB_COUNT * CHECK_DTYPE_COUNT * PARAMETER_SET_COUNT,
                            (long long)rows, (long long)vocab, cli_dtype_name(check_dtypes[d]),
                            parameter_sets[s].name);
                /* Every other case has padded rows; offsets use both words. */
                int64_t row_stride = *case_count % 2 ? vocab + 5 : vocab;
                uint64_t offset = (uint64_t)*case_count * 0x100000007ull;
                if (check_run_case(state, rows, vocab, row_stride, check_dtypes[d],
                                   &parameter_sets[s], case_seed, offset) != 0)
                    return -1;
                *total_rows += rows;
                ++*case_count;
            }
    if (state->show_progress)
        fprintf(stderr, "\r%70s\r", "");
    return 0;
}

int cli_check(int argc, char **argv)
{
    static check_state state;
    uint64_t row_budget = 20000, draws = 1000000, seed = 2026;
    cli_backend_list requested = {0};
    int p, failures = 0, exit_status = CLI_EXIT_OK, parsed, case_count = 0;
    int64_t total_rows = 0;
    const cli_option check_options[] = {
        {.name = "--rows", .kind = CLI_OPTION_DECIMAL, .value_name = "N", .target = &row_budget,
         .minimum = 1, .maximum = INT32_MAX, .help = "total rows over all cases"},
        /* Each named backend adds up to two participants (host and device
         * memory) beside the two CPU ones. */
        {.name = "--backend", .kind = CLI_OPTION_BACKEND_LIST, .value_name = "LIST",
         .target = &requested, .maximum = (CHECK_MAX_PARTICIPANTS - 3) / 3,
         .help = "comma-separated backends (each optionally\n:N) to compare with the CPU "
                 "backend, at\nmost 5 (default: every device of every\navailable backend)",
         .default_text = ""},
        {.name = "--seed", .kind = CLI_OPTION_DECIMAL, .value_name = "S", .target = &seed,
         .maximum = UINT64_MAX, .help = "seed of the inputs and the draws"},
        {.name = "--draws", .kind = CLI_OPTION_DECIMAL, .value_name = "N", .target = &draws,
         .maximum = 100000000, .help = "draws per chi-square test; 0 skips them"},
    };
    const cli_command check_command = {
        .name = "check",
        .synopsis = "polysample check [options]",
        .description = check_description,
        .options = check_options,
        .option_count = (int)(sizeof check_options / sizeof check_options[0]),
    };

    memset(&state, 0, sizeof state);
    parsed = cli_parse_options(&check_command, argc, argv);
    if (parsed != CLI_PARSE_OK)
        return parsed == CLI_PARSE_HELP ? CLI_EXIT_OK : CLI_EXIT_USAGE;
    state.show_progress = isatty(STDERR_FILENO);

    /* The participants: the CPU backend at 1 and 2 threads and sharded, then
     * every other backend from host memory and, where the tool can, device
     * memory. */
    if (check_open_participants(&state, requested.backends, requested.device_indices,
                                requested.count ? requested.count : -1) != 0) {
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    printf("polysample %s check: participants:", psm_version_string());
    for (p = 0; p < state.participant_count; ++p)
        printf("%s %s", p ? "," : "", state.participants[p].name);
    printf("\n");
    for (p = 0; p < state.participant_count; ++p)
        printf("  %-24s %s\n", state.participants[p].name,
               psm_context_device_name(state.participants[p].context));
    printf("\nproblems (at most %d listed):\n", CHECK_MAX_REPORTED);
    fflush(stdout);

    if (run_cases(&state, (int64_t)row_budget, seed, &case_count, &total_rows) != 0 ||
        check_run_verify_cases(&state, (int64_t)row_budget, seed) != 0) {
        exit_status = CLI_EXIT_FAILURE;
        goto done;
    }
    if (state.reported == 0)
        printf("  none\n");
    printf("\n%d cases, %lld rows per participant\n", case_count, (long long)total_rows);
    failures += check_print_agreement(&state);
    failures += check_print_verify_agreement(&state);
    if (state.failed_calls) {
        printf("\n%llu calls failed\n", (unsigned long long)state.failed_calls);
        failures++;
    }
    if (draws > 0) {
        failures += check_run_chi_square_tests(state.participants[1].context, (int64_t)draws,
                                               seed);
        failures += check_run_verify_statistics(state.participants[1].context, (int64_t)draws,
                                                seed);
    }

    printf("\n%s\n", failures ? "check FAILED" : "check passed");
    exit_status = failures ? CLI_EXIT_FAILURE : CLI_EXIT_OK;

done:
    for (p = 0; p < state.participant_count; ++p)
        check_close_participant(&state.participants[p]);
    return exit_status;
}
