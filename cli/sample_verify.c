/* sample_verify.c: see sample_verify.h. */
#include "sample_verify.h"

#include "cli_util.h"
#include "npy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The input files as read. */
typedef struct verify_inputs {
    cli_npy_array target, tokens, parents, logits, probs;
} verify_inputs;

static void free_inputs(verify_inputs *inputs)
{
    cli_npy_free(&inputs->target);
    cli_npy_free(&inputs->tokens);
    cli_npy_free(&inputs->parents);
    cli_npy_free(&inputs->logits);
    cli_npy_free(&inputs->probs);
}

/* What psm_verify writes. */
typedef struct verify_results {
    int32_t *accepted, *tokens, *path_nodes;
    float *logprobs;
} verify_results;

static void free_results(verify_results *results)
{
    free(results->accepted);
    free(results->tokens);
    free(results->path_nodes);
    free(results->logprobs);
}

/* A draft distribution file (--draft-logits or --draft-probs) must have a
 * row per draft node of the target's vocab. 0, or -1 after a message. */
static int check_draft_rows(const char *option, const char *path, const cli_npy_array *array,
                            int64_t requests, int64_t k, int64_t vocab)
{
    if (array->rows == requests * k && array->vocab == vocab)
        return 0;
    cli_error("sample", "%s '%s' is %lld x %lld; the drafts need requests x k = %lld x %lld = "
                        "%lld rows of the target's vocab, %lld",
              option, path, (long long)array->rows, (long long)array->vocab, (long long)requests,
              (long long)k, (long long)(requests * k), (long long)vocab);
    return -1;
}

/* Reads every file and checks the shapes against each other, and the
 * tokens and parents against the vocab and the node order (so that the
 * message names the file). The draft probabilities' values are left to the
 * library, whose message names the request, node and token. 0, or -1 after
 * a message (inputs then hold nothing). */
static int read_inputs(const char *target_path, const cli_verify_options *verify,
                       verify_inputs *inputs)
{
    char error[512];
    memset(inputs, 0, sizeof *inputs);
    if (cli_npy_read(target_path, &inputs->target, error, sizeof error) != 0 ||
        cli_npy_read_elements(verify->tokens_path, CLI_NPY_I32, &inputs->tokens, error,
                              sizeof error) != 0 ||
        (verify->parents_path &&
         cli_npy_read_elements(verify->parents_path, CLI_NPY_I32, &inputs->parents, error,
                               sizeof error) != 0) ||
        (verify->logits_path &&
         cli_npy_read(verify->logits_path, &inputs->logits, error, sizeof error) != 0) ||
        (verify->probs_path && cli_npy_read_elements(verify->probs_path, CLI_NPY_F32,
                                                     &inputs->probs, error, sizeof error) != 0)) {
        cli_error("sample", "%s", error);
        free_inputs(inputs);
        return -1;
    }
    const int64_t requests = inputs->tokens.rows, k = inputs->tokens.vocab;
    const int64_t vocab = inputs->target.vocab;
    if (k > PSM_MAX_DRAFT_NODES) {
        cli_error("sample", "--draft-tokens '%s' has %lld columns, one per draft node; k is at "
                            "most %d (PSM_MAX_DRAFT_NODES)",
                  verify->tokens_path, (long long)k, PSM_MAX_DRAFT_NODES);
        free_inputs(inputs);
        return -1;
    }
    if (inputs->target.rows != requests * (k + 1)) {
        cli_error("sample", "target logits '%s' have %lld rows; %lld requests of k = %lld drafts "
                            "(--draft-tokens '%s' is %lld x %lld) need requests x (k + 1) = %lld",
                  target_path, (long long)inputs->target.rows, (long long)requests, (long long)k,
                  verify->tokens_path, (long long)requests, (long long)k,
                  (long long)(requests * (k + 1)));
        free_inputs(inputs);
        return -1;
    }
    if (verify->parents_path &&
        (inputs->parents.rows != requests || inputs->parents.vocab != k)) {
        cli_error("sample", "--draft-parents '%s' is %lld x %lld; it needs the shape of "
                            "--draft-tokens '%s', %lld x %lld (one parent per draft node)",
                  verify->parents_path, (long long)inputs->parents.rows,
                  (long long)inputs->parents.vocab, verify->tokens_path, (long long)requests,
                  (long long)k);
        free_inputs(inputs);
        return -1;
    }
    if ((verify->logits_path && check_draft_rows("--draft-logits", verify->logits_path,
                                                 &inputs->logits, requests, k, vocab) != 0) ||
        (verify->probs_path && check_draft_rows("--draft-probs", verify->probs_path,
                                                &inputs->probs, requests, k, vocab) != 0)) {
        free_inputs(inputs);
        return -1;
    }
    const int32_t *tokens = inputs->tokens.data, *parents = inputs->parents.data;
    for (int64_t at = 0; at < requests * k; ++at) {
        const long long request = (long long)(at / k), node = (long long)(at % k + 1);
        if (tokens[at] < 0 || tokens[at] >= vocab) {
            cli_error("sample", "--draft-tokens '%s': request %lld, node %lld: token %d is "
                                "outside the target's vocab of %lld",
                      verify->tokens_path, request, node, (int)tokens[at], (long long)vocab);
            free_inputs(inputs);
            return -1;
        }
        if (parents && (parents[at] < 0 || parents[at] >= node)) {
            cli_error("sample", "--draft-parents '%s': request %lld, node %lld: parent %d; a "
                                "node's parent is an earlier node, 0 (the root) .. %lld",
                      verify->parents_path, request, node, (int)parents[at], node - 1);
            free_inputs(inputs);
            return -1;
        }
    }
    return 0;
}

/* Each request prints its emitted entries: accepted + 1 of them, or the
 * one -1 (NaN) a bad request has in each place, as sample prints a bad row. */
static int64_t printed_entries(int32_t accepted)
{
    return accepted >= 0 ? (int64_t)accepted + 1 : 1;
}

/* ", NAME: [[...], ...]": each request's printed entries of one output,
 * the int32 values or (values NULL) the logprobs. */
static void print_json_lists(const char *name, const int32_t *values, const float *logprobs,
                             const int32_t *accepted, int64_t requests, int64_t positions)
{
    printf(", \"%s\": [", name);
    for (int64_t r = 0; r < requests; ++r) {
        fputs(r ? ", [" : "[", stdout);
        for (int64_t e = 0; e < printed_entries(accepted[r]); ++e) {
            const int64_t at = r * positions + e;
            if (e)
                fputs(", ", stdout);
            if (values)
                printf("%d", (int)values[at]);
            else
                cli_print_logprob(logprobs[at], 1);
        }
        fputc(']', stdout);
    }
    fputc(']', stdout);
}

/* One request's printed entries on a text line, after a tab. */
static void print_text_list(const int32_t *values, const float *logprobs, int64_t first,
                            int64_t count)
{
    fputc('\t', stdout);
    for (int64_t e = 0; e < count; ++e) {
        if (e)
            fputc(' ', stdout);
        if (values)
            printf("%d", (int)values[first + e]);
        else
            cli_print_logprob(logprobs[first + e], 0);
    }
}

static void print_results(const verify_results *results, int64_t requests, int64_t positions,
                          int json)
{
    if (json) {
        fputs("{\"accepted\": [", stdout);
        for (int64_t r = 0; r < requests; ++r)
            printf("%s%d", r ? ", " : "", (int)results->accepted[r]);
        fputc(']', stdout);
        print_json_lists("tokens", results->tokens, NULL, results->accepted, requests, positions);
        print_json_lists("path_nodes", results->path_nodes, NULL, results->accepted, requests,
                         positions);
        if (results->logprobs)
            print_json_lists("logprobs", NULL, results->logprobs, results->accepted, requests,
                             positions);
        fputs("}\n", stdout);
        return;
    }
    for (int64_t r = 0; r < requests; ++r) {
        const int64_t count = printed_entries(results->accepted[r]), first = r * positions;
        printf("%d", (int)results->accepted[r]);
        print_text_list(results->tokens, NULL, first, count);
        print_text_list(results->path_nodes, NULL, first, count);
        if (results->logprobs)
            print_text_list(NULL, results->logprobs, first, count);
        fputc('\n', stdout);
    }
}

static psm_tensor host_tensor(const cli_npy_array *array)
{
    psm_tensor tensor = {array->data, array->dtype, PSM_MEMORY_HOST, array->rows, array->vocab, 0};
    return tensor;
}

/* Runs psm_verify on the inputs into results. A psm_status, with the
 * library's message and, in *failed_call, what failed. */
static psm_status run_verify(const verify_inputs *inputs, const cli_verify_options *verify,
                             const psm_context_options *options,
                             const psm_params *target_params, const verify_results *results,
                             const char **failed_call)
{
    const psm_tensor target = host_tensor(&inputs->target);
    const psm_tensor draft_logits = host_tensor(&inputs->logits);
    const psm_tensor draft_probs = host_tensor(&inputs->probs);
    psm_params draft_params = verify->draft_params;
    draft_params.top_k = (int32_t)verify->draft_top_k;
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = (int32_t)inputs->tokens.vocab;
    drafts.tokens = inputs->tokens.data;
    drafts.parents = inputs->parents.data;
    if (verify->logits_path) {
        drafts.draft_logits = &draft_logits;
        drafts.draft_params = &draft_params;
    }
    if (verify->probs_path)
        drafts.draft_probs = &draft_probs;
    const psm_verification outputs = {
        {results->accepted, PSM_MEMORY_HOST},
        {results->tokens, PSM_MEMORY_HOST},
        {results->path_nodes, PSM_MEMORY_HOST},
        {results->logprobs, PSM_MEMORY_HOST},
    };
    psm_context *context = NULL;
    *failed_call = "creating the context";
    psm_status status = psm_context_create(options, &context);
    if (status == PSM_OK) {
        *failed_call = "psm_verify";
        status = psm_verify(context, &target, target_params, &drafts, &outputs);
    }
    if (status == PSM_OK) {
        *failed_call = "psm_synchronize";
        status = psm_synchronize(context);
    }
    psm_context_destroy(context);
    return status;
}

int cli_sample_verify(const char *target_path, const cli_verify_options *verify,
                      const psm_context_options *options, const psm_params *target_params,
                      int want_logprobs, int json)
{
    verify_inputs inputs;
    verify_results results = {0};
    int exit_status = CLI_EXIT_OK;

    if (read_inputs(target_path, verify, &inputs) != 0)
        return CLI_EXIT_USAGE;
    const int64_t requests = inputs.tokens.rows, positions = inputs.tokens.vocab + 1;
    const size_t slots = (size_t)requests * (size_t)positions;
    results.accepted = cli_alloc("sample", (size_t)requests * sizeof *results.accepted);
    results.tokens = cli_alloc("sample", slots * sizeof *results.tokens);
    results.path_nodes = cli_alloc("sample", slots * sizeof *results.path_nodes);
    if (want_logprobs)
        results.logprobs = cli_alloc("sample", slots * sizeof *results.logprobs);
    if (!results.accepted || !results.tokens || !results.path_nodes ||
        (want_logprobs && !results.logprobs)) {
        exit_status = CLI_EXIT_FAILURE;
    } else {
        const char *failed_call = NULL;
        psm_status status =
            run_verify(&inputs, verify, options, target_params, &results, &failed_call);
        if (status == PSM_OK) {
            print_results(&results, requests, positions, json);
            if (fflush(stdout) != 0 || ferror(stdout)) {
                cli_error("sample", "writing the output failed");
                exit_status = CLI_EXIT_FAILURE;
            }
        } else {
            cli_library_error("sample", failed_call, status);
            /* A value out of range (a parameter, a draft probability, a token
             * the draft could not have drawn) is the caller's mistake. */
            exit_status =
                status == PSM_ERR_INVALID_PARAMETER ? CLI_EXIT_USAGE : CLI_EXIT_FAILURE;
        }
    }
    free_results(&results);
    free_inputs(&inputs);
    return exit_status;
}
