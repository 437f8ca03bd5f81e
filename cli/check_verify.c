/* check_verify.c: speculative verification (psm_verify, docs/SAMPLING.md
 * section 7) in `polysample check`. The verification cases run on every
 * participant: their accepted counts, tokens and path nodes must agree
 * exactly and their logprobs to float rounding, and each request's outputs
 * must follow the rules the host can check (a path of the tree whose tokens
 * are the drafts', -1 and NaN after the last token and for bad requests,
 * each emitted token's logprob the float64 reference's). A participant that
 * refuses psm_verify (a backend without it yet) is listed as skipped. Then
 * a chain with a poor draft is drawn many times on the CPU backend and its
 * first emitted token and accepted length compared with their float64
 * distribution and expectation. */
#include "check.h"
#include "cli_util.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Where a node's token was drawn from (psm_drafts). */
typedef enum draft_form { DRAFT_LOGITS, DRAFT_PROBS, DRAFT_ONE_HOT } draft_form;

typedef struct verify_kind {
    const char *name;
    int tree;               /* the tree below; else a chain of CHAIN_NODES */
    draft_form draft;
    int greedy_requests;    /* per-request temperatures, every third request greedy */
    int per_request_seeds;
    int bad_requests;       /* every fifth request (from request 1) has a NaN target logit */
} verify_kind;

static const verify_kind verify_kinds[] = {
    {"chain_draft_logits", 0, DRAFT_LOGITS, 0, 0, 0},
    {"chain_draft_probs", 0, DRAFT_PROBS, 0, 1, 0},
    {"chain_one_hot", 0, DRAFT_ONE_HOT, 1, 0, 0},
    {"tree_two_per_level", 1, DRAFT_LOGITS, 0, 1, 0},
    {"chain_bad_requests", 0, DRAFT_LOGITS, 0, 0, 1},
};
#define VERIFY_KIND_COUNT ((int)(sizeof verify_kinds / sizeof verify_kinds[0]))

#define CHAIN_NODES 4
/* Two candidates per level, depth 2: nodes 1 and 2 are the root's
 * children, 3 and 4 node 1's, 5 and 6 node 2's. */
#define TREE_NODES 6
#define TREE_DEPTH 2
static const int32_t tree_parents[TREE_NODES] = {0, 0, 1, 1, 2, 2};
#define MAX_NODES TREE_NODES

/* The target's and the draft logits' parameters. */
#define TARGET_TEMPERATURE 0.8f
#define TARGET_TOP_K 50
#define TARGET_TOP_P 0.95f
#define DRAFT_TEMPERATURE 1.0f
/* A draft row is its parent's target row plus N(0, DRAFT_NOISE^2): a draft
 * close enough to the target that paths of every length are accepted. */
#define DRAFT_NOISE 0.7f
/* Draft tokens are drawn among the tokens of at least this float64 draft
 * probability, so that none has draft weight 0 (a bad input): the weights'
 * 2^-40 is far below it. */
#define DRAFT_TOKEN_FLOOR 1e-9

/* The emitted tokens' logprobs against the float64 reference's, the bound of
 * tests/test_verify.c. */
#define VERIFY_LOGPROB_RELATIVE 1e-5

/* Streams of the random source, apart from the target logits' (the seed). */
#define DRAFT_NOISE_STREAM 0x4452414654ull /* "DRAFT" */
#define TOKEN_STREAM 0x544f4b454eull       /* "TOKEN" */

/* One case's inputs on the host. */
typedef struct verify_inputs {
    const verify_kind *kind;
    int64_t requests;
    int32_t nodes;
    int64_t vocab;
    psm_dtype dtype;
    float *target_values; /* requests x (nodes + 1) rows, as the backends read them */
    void *target;         /* the same in dtype */
    void *draft;          /* requests x nodes rows: logits in dtype, or f32 probabilities */
    int32_t *tokens;      /* requests x nodes */
    int32_t *parents;     /* the tree's, per request; NULL for a chain */
    float *temperature;   /* per request, or NULL */
    uint64_t *seeds;      /* per request, or NULL */
    unsigned char *bad;   /* per request: a target row is bad */
    psm_params target_params, draft_params;
} verify_inputs;

typedef struct verify_outputs {
    int32_t *accepted;   /* requests */
    int32_t *tokens;     /* requests x (nodes + 1) */
    int32_t *path_nodes; /* requests x (nodes + 1) */
    float *logprobs;     /* requests x (nodes + 1) */
} verify_outputs;

static int32_t parent_of(const verify_inputs *in, int64_t request, int32_t node)
{
    return in->parents ? in->parents[request * in->nodes + node - 1] : node - 1;
}

static void free_inputs(verify_inputs *in)
{
    free(in->target_values);
    free(in->target);
    free(in->draft);
    free(in->tokens);
    free(in->parents);
    free(in->temperature);
    free(in->seeds);
    free(in->bad);
}

/* values rounded to dtype (kept as floats) and converted into *converted. */
static void round_to_dtype(float *values, size_t count, psm_dtype dtype, void *converted)
{
    size_t i;
    cli_convert_from_f32(values, count, dtype, converted);
    if (dtype == PSM_DTYPE_F32)
        return;
    for (i = 0; i < count; ++i) {
        uint16_t half = ((const uint16_t *)converted)[i];
        values[i] = dtype == PSM_DTYPE_BF16 ? cli_bf16_to_float(half) : cli_f16_to_float(half);
    }
}

/* A token drawn from probs among those of at least DRAFT_TOKEN_FLOOR, with
 * a uniform u in [0, 1). */
static int32_t draw_token(const double *probs, int64_t vocab, double u)
{
    double total = 0.0, running = 0.0;
    int64_t i, last = 0;
    for (i = 0; i < vocab; ++i)
        if (probs[i] >= DRAFT_TOKEN_FLOOR)
            total += probs[i];
    for (i = 0; i < vocab; ++i) {
        if (probs[i] < DRAFT_TOKEN_FLOOR)
            continue;
        last = i;
        running += probs[i];
        if (u * total < running)
            break;
    }
    return (int32_t)last;
}

/* The case's inputs. 0, or -1 when out of memory (free them anyway). */
static int make_inputs(verify_inputs *in, const verify_kind *kind, int64_t requests,
                       int64_t vocab, psm_dtype dtype, uint64_t seed)
{
    const int32_t k = kind->tree ? TREE_NODES : CHAIN_NODES;
    const size_t target_count = (size_t)(requests * (k + 1) * vocab);
    const size_t draft_count = (size_t)(requests * k * vocab);
    const psm_ref_params draft_reference = {DRAFT_TEMPERATURE, 0, 1.0f, 0.0f};
    float *draft_values = NULL;
    double *q = NULL;
    int64_t r, i;
    int32_t node;

    memset(in, 0, sizeof *in);
    in->kind = kind;
    in->requests = requests;
    in->nodes = k;
    in->vocab = vocab;
    in->dtype = dtype;
    in->target_values = malloc(target_count * sizeof(float));
    in->target = malloc(target_count * cli_dtype_size(dtype));
    in->draft = kind->draft == DRAFT_ONE_HOT
                    ? NULL
                    : malloc(draft_count * (kind->draft == DRAFT_PROBS ? sizeof(float)
                                                                       : cli_dtype_size(dtype)));
    in->tokens = malloc((size_t)(requests * k) * sizeof(int32_t));
    in->bad = calloc((size_t)requests, 1);
    draft_values = malloc(draft_count * sizeof(float));
    q = malloc((size_t)vocab * sizeof(double));
    if (!in->target_values || !in->target || (kind->draft != DRAFT_ONE_HOT && !in->draft) ||
        !in->tokens || !in->bad || !draft_values || !q)
        goto out_of_memory;
    if (kind->tree) {
        in->parents = malloc((size_t)(requests * k) * sizeof(int32_t));
        if (!in->parents)
            goto out_of_memory;
        for (r = 0; r < requests; ++r)
            memcpy(in->parents + r * k, tree_parents, sizeof tree_parents);
    }
    if (kind->greedy_requests) {
        in->temperature = malloc((size_t)requests * sizeof(float));
        if (!in->temperature)
            goto out_of_memory;
        for (r = 0; r < requests; ++r)
            in->temperature[r] = r % 3 == 0 ? 0.0f : TARGET_TEMPERATURE;
    }
    if (kind->per_request_seeds) {
        in->seeds = malloc((size_t)requests * sizeof(uint64_t));
        if (!in->seeds)
            goto out_of_memory;
        for (r = 0; r < requests; ++r)
            in->seeds[r] = cli_random_u64(seed ^ 0x5eedu, (uint64_t)r);
    }

    cli_fill_normal(in->target_values, target_count, 2.0f, seed);
    round_to_dtype(in->target_values, target_count, dtype, in->target);
    /* Each node's draft row from its parent's target row, and its token. */
    for (r = 0; r < requests; ++r)
        for (node = 1; node <= k; ++node) {
            const int64_t draft_row = r * k + node - 1;
            const float *parent_row =
                in->target_values + (r * (k + 1) + parent_of(in, r, node)) * vocab;
            float *draft = draft_values + draft_row * vocab;
            for (i = 0; i < vocab; ++i)
                draft[i] = parent_row[i] +
                           DRAFT_NOISE * cli_normal(seed ^ DRAFT_NOISE_STREAM,
                                                    (uint64_t)(draft_row * vocab + i));
        }
    if (kind->draft == DRAFT_LOGITS)
        round_to_dtype(draft_values, draft_count, dtype, in->draft);
    for (r = 0; r < requests; ++r)
        for (node = 1; node <= k; ++node) {
            const int64_t draft_row = r * k + node - 1;
            const float *draft = draft_values + draft_row * vocab;
            if (kind->draft == DRAFT_ONE_HOT) {
                in->tokens[draft_row] = (int32_t)psm_ref_argmax(draft, vocab);
                continue;
            }
            if (psm_ref_distribution(draft, vocab, &draft_reference, q) != 1)
                goto out_of_memory;
            if (kind->draft == DRAFT_PROBS)
                for (i = 0; i < vocab; ++i)
                    ((float *)in->draft)[draft_row * vocab + i] = (float)q[i];
            in->tokens[draft_row] =
                draw_token(q, vocab, cli_random_unit(seed ^ TOKEN_STREAM, (uint64_t)draft_row));
        }
    /* Bad requests: a NaN in the last target row, which no draft row came
     * from and which the walk reaches only after every draft. */
    if (kind->bad_requests)
        for (r = 1; r < requests; r += 5) {
            const int64_t at = (r * (k + 1) + k) * vocab + vocab / 2;
            in->target_values[at] = NAN;
            round_to_dtype(in->target_values + at, 1, dtype,
                           (char *)in->target + (size_t)at * cli_dtype_size(dtype));
            in->bad[r] = 1;
        }

    psm_params_init(&in->target_params);
    in->target_params.temperature = TARGET_TEMPERATURE;
    in->target_params.top_k = TARGET_TOP_K;
    in->target_params.top_p = TARGET_TOP_P;
    in->target_params.seed = seed;
    in->target_params.offset = seed >> 17;
    in->target_params.temperature_per_row = in->temperature;
    in->target_params.seed_per_row = in->seeds;
    psm_params_init(&in->draft_params);
    in->draft_params.temperature = DRAFT_TEMPERATURE;
    free(draft_values);
    free(q);
    return 0;

out_of_memory:
    free(draft_values);
    free(q);
    return -1;
}

static int alloc_outputs(verify_outputs *out, int64_t requests, int32_t nodes)
{
    const size_t width = (size_t)requests * (size_t)(nodes + 1);
    out->accepted = malloc((size_t)requests * sizeof(int32_t));
    out->tokens = malloc(width * sizeof(int32_t));
    out->path_nodes = malloc(width * sizeof(int32_t));
    out->logprobs = malloc(width * sizeof(float));
    return out->accepted && out->tokens && out->path_nodes && out->logprobs ? 0 : -1;
}

static void free_outputs(verify_outputs *out)
{
    free(out->accepted);
    free(out->tokens);
    free(out->path_nodes);
    free(out->logprobs);
    memset(out, 0, sizeof *out);
}

/* psm_verify of the inputs, whose arrays are in `memory`, into `arrays`
 * (accepted, tokens, path nodes, logprobs). */
static psm_status call_verify(participant *who, const verify_inputs *in, psm_memory memory,
                              const void *target, const void *draft, const int32_t *tokens,
                              const int32_t *parents, const psm_params *target_params,
                              void *const arrays[4])
{
    psm_tensor target_tensor, draft_tensor;
    psm_drafts drafts;
    psm_verification outputs;
    memset(&target_tensor, 0, sizeof target_tensor);
    target_tensor.data = (void *)target;
    target_tensor.dtype = in->dtype;
    target_tensor.memory = memory;
    target_tensor.rows = in->requests * (in->nodes + 1);
    target_tensor.vocab = in->vocab;
    draft_tensor = target_tensor;
    draft_tensor.data = (void *)draft;
    draft_tensor.rows = in->requests * in->nodes;
    psm_drafts_init(&drafts);
    drafts.nodes = in->nodes;
    drafts.tokens = tokens;
    drafts.parents = parents;
    if (in->kind->draft == DRAFT_LOGITS) {
        drafts.draft_logits = &draft_tensor;
        drafts.draft_params = &in->draft_params;
    } else if (in->kind->draft == DRAFT_PROBS) {
        draft_tensor.dtype = PSM_DTYPE_F32;
        drafts.draft_probs = &draft_tensor;
    }
    outputs.accepted = (psm_output){arrays[0], memory};
    outputs.tokens = (psm_output){arrays[1], memory};
    outputs.path_nodes = (psm_output){arrays[2], memory};
    outputs.logprobs = (psm_output){arrays[3], memory};
    psm_status status = psm_verify(who->context, &target_tensor, target_params, &drafts, &outputs);
    return status == PSM_OK ? psm_synchronize(who->context) : status;
}

/* The device buffers of one call. */
enum verify_buffer {
    VBUF_TARGET,
    VBUF_DRAFT,
    VBUF_TOKENS,
    VBUF_PARENTS,
    VBUF_TEMPERATURE,
    VBUF_SEEDS,
    VBUF_ACCEPTED,
    VBUF_EMITTED,
    VBUF_PATH_NODES,
    VBUF_LOGPROBS,
    VBUF_COUNT
};

/* Runs the case on a participant into out (host). 0; CHECK_REFUSED (the
 * backend has no psm_verify yet, the message in who->refusal); or -1 after
 * a message. */
static int run_verify(participant *who, const verify_inputs *in, const verify_outputs *out)
{
    const size_t requests = (size_t)in->requests, k = (size_t)in->nodes;
    const size_t width = requests * (k + 1);
    const size_t target_bytes = requests * (k + 1) * (size_t)in->vocab * cli_dtype_size(in->dtype);
    const size_t draft_bytes =
        requests * k * (size_t)in->vocab *
        (in->kind->draft == DRAFT_PROBS ? sizeof(float) : cli_dtype_size(in->dtype));
    void *buffers[VBUF_COUNT] = {NULL};
    psm_params params = in->target_params;
    psm_status status;
    int failed = 0, outcome = -1, i;

    if (!who->device) {
        void *arrays[4] = {out->accepted, out->tokens, out->path_nodes, out->logprobs};
        status = call_verify(who, in, PSM_MEMORY_HOST, in->target, in->draft, in->tokens,
                             in->parents, &params, arrays);
    } else {
        failed |= check_device_copy(who, in->target, target_bytes, &buffers[VBUF_TARGET]);
        failed |= check_device_copy(who, in->draft, draft_bytes, &buffers[VBUF_DRAFT]);
        failed |= check_device_copy(who, in->tokens, requests * k * sizeof(int32_t),
                                    &buffers[VBUF_TOKENS]);
        failed |= check_device_copy(who, in->parents, requests * k * sizeof(int32_t),
                                    &buffers[VBUF_PARENTS]);
        failed |= check_device_copy(who, in->temperature, requests * sizeof(float),
                                    &buffers[VBUF_TEMPERATURE]);
        failed |= check_device_copy(who, in->seeds, requests * sizeof(uint64_t),
                                    &buffers[VBUF_SEEDS]);
        failed |= who->device->allocate(who->session, requests * sizeof(int32_t),
                                        &buffers[VBUF_ACCEPTED]);
        failed |= who->device->allocate(who->session, width * sizeof(int32_t),
                                        &buffers[VBUF_EMITTED]);
        failed |= who->device->allocate(who->session, width * sizeof(int32_t),
                                        &buffers[VBUF_PATH_NODES]);
        failed |= who->device->allocate(who->session, width * sizeof(float),
                                        &buffers[VBUF_LOGPROBS]);
        if (failed) {
            cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
            goto release;
        }
        params.temperature_per_row = buffers[VBUF_TEMPERATURE];
        params.seed_per_row = buffers[VBUF_SEEDS];
        status = call_verify(who, in, PSM_MEMORY_DEVICE, buffers[VBUF_TARGET], buffers[VBUF_DRAFT],
                             buffers[VBUF_TOKENS], buffers[VBUF_PARENTS], &params,
                             &buffers[VBUF_ACCEPTED]);
    }
    if (status == PSM_ERR_UNSUPPORTED) {
        snprintf(who->refusal, sizeof who->refusal, "%s", psm_last_error());
        outcome = CHECK_REFUSED;
    } else if (status != PSM_OK) {
        cli_library_error("check", who->name, status);
    } else if (who->device &&
               (who->device->download(who->session, out->accepted, buffers[VBUF_ACCEPTED],
                                      requests * sizeof(int32_t)) != 0 ||
                who->device->download(who->session, out->tokens, buffers[VBUF_EMITTED],
                                      width * sizeof(int32_t)) != 0 ||
                who->device->download(who->session, out->path_nodes, buffers[VBUF_PATH_NODES],
                                      width * sizeof(int32_t)) != 0 ||
                who->device->download(who->session, out->logprobs, buffers[VBUF_LOGPROBS],
                                      width * sizeof(float)) != 0)) {
        cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
    } else {
        outcome = 0;
    }
release:
    if (who->device)
        for (i = 0; i < VBUF_COUNT; ++i)
            who->device->release(who->session, buffers[i]);
    return outcome;
}

static void report_request(check_state *state, int who, const char *label, int64_t request,
                           const char *problem, long long detail)
{
    state->verify_invalid[who]++;
    check_report(state, "%s, %s: request %lld: %s (%lld)", state->participants[who].name, label,
                 (long long)request, problem, detail);
}

/* The rules of one participant's outputs (SAMPLING.md section 7, Outputs):
 * a bad request is -1 and NaN everywhere; a good one has an accepted path
 * from the root whose tokens are its nodes' drafts, then the last token,
 * then -1 and NaN; each emitted token's logprob is the float64 reference's
 * at its node (so its probability there is positive). */
static void validate_outputs(check_state *state, int who, const char *label,
                             const verify_inputs *in, const verify_outputs *out, double *probs)
{
    const int32_t k = in->nodes, depth = in->kind->tree ? TREE_DEPTH : CHAIN_NODES;
    int64_t r;
    int32_t j;
    for (r = 0; r < in->requests; ++r) {
        const int32_t accepted = out->accepted[r];
        const int32_t *tokens = out->tokens + r * (k + 1);
        const int32_t *path = out->path_nodes + r * (k + 1);
        const float *logprobs = out->logprobs + r * (k + 1);
        if (in->bad[r]) {
            int clean = accepted == -1;
            for (j = 0; j <= k; ++j)
                clean &= tokens[j] == -1 && path[j] == -1 && isnan(logprobs[j]);
            if (!clean)
                report_request(state, who, label, r, "a bad request is not -1 and NaN everywhere",
                               accepted);
            continue;
        }
        if (accepted < 0 || accepted > depth) {
            report_request(state, who, label, r, "accepted count out of range", accepted);
            continue;
        }
        if (path[0] != 0) {
            report_request(state, who, label, r, "the path does not start at the root", path[0]);
            continue;
        }
        for (j = 1; j <= accepted; ++j) {
            const int32_t node = path[j];
            if (node < 1 || node > k || parent_of(in, r, node) != path[j - 1]) {
                report_request(state, who, label, r, "the path is not a path of the tree", node);
                break;
            }
            if (tokens[j - 1] != in->tokens[r * k + node - 1]) {
                report_request(state, who, label, r, "an accepted token is not its node's draft",
                               tokens[j - 1]);
                break;
            }
        }
        if (j <= accepted)
            continue;
        for (j = accepted + 1; j <= k; ++j)
            if (tokens[j] != -1 || path[j] != -1 || !isnan(logprobs[j])) {
                report_request(state, who, label, r, "an entry after the last token is not -1, NaN",
                               j);
                break;
            }
        if (tokens[accepted] < 0 || tokens[accepted] >= in->vocab) {
            report_request(state, who, label, r, "the last token is out of range",
                           tokens[accepted]);
            continue;
        }
        for (j = 0; j <= accepted; ++j) {
            const float *row = in->target_values + (r * (k + 1) + path[j]) * in->vocab;
            psm_ref_params reference = {in->temperature ? in->temperature[r] : TARGET_TEMPERATURE,
                                        TARGET_TOP_K, TARGET_TOP_P, 0.0f};
            double expected;
            if (psm_ref_distribution(row, in->vocab, &reference, probs) != 1) {
                report_request(state, who, label, r, "the float64 reference failed", path[j]);
                break;
            }
            if (probs[tokens[j]] <= 0.0) {
                report_request(state, who, label, r,
                               "an emitted token has target probability 0 at its node", tokens[j]);
                break;
            }
            expected = log(probs[tokens[j]]);
            if (!(fabs((double)logprobs[j] - expected) <
                  VERIFY_LOGPROB_RELATIVE * (1.0 + fabs(expected)))) {
                report_request(state, who, label, r,
                               "an emitted token's logprob is not the float64 reference's",
                               tokens[j]);
                break;
            }
        }
    }
}

static void compare_entries(check_state *state, int first, int second, const char *label,
                            const char *what, const int32_t *a, const int32_t *b, size_t count,
                            size_t width)
{
    pair_record *record = &state->verify_pairs[first][second];
    size_t i;
    for (i = 0; i < count; ++i) {
        record->compared++;
        if (a[i] == b[i])
            record->agreed++;
        else
            check_report(state, "%s vs %s, %s: request %lld: %s %d vs %d",
                         state->participants[first].name, state->participants[second].name,
                         label, (long long)(i / width), what, (int)a[i], (int)b[i]);
    }
}

static void compare_outputs(check_state *state, int first, int second, const char *label,
                            const verify_inputs *in, const verify_outputs *a,
                            const verify_outputs *b)
{
    pair_record *record = &state->verify_pairs[first][second];
    const size_t width = (size_t)in->nodes + 1, entries = (size_t)in->requests * width;
    size_t i;
    compare_entries(state, first, second, label, "accepted", a->accepted, b->accepted,
                    (size_t)in->requests, 1);
    compare_entries(state, first, second, label, "token", a->tokens, b->tokens, entries, width);
    compare_entries(state, first, second, label, "path node", a->path_nodes, b->path_nodes,
                    entries, width);
    for (i = 0; i < entries; ++i) {
        if (a->tokens[i] != b->tokens[i])
            continue;
        if (!check_logprobs_agree(a->logprobs[i], b->logprobs[i]))
            record->logprob_mismatches++;
        if (isfinite(a->logprobs[i]) && isfinite(b->logprobs[i])) {
            double difference = fabs((double)a->logprobs[i] - (double)b->logprobs[i]);
            if (difference > record->logprob_max_difference)
                record->logprob_max_difference = difference;
        }
    }
}

static void count_accepted(check_state *state, const verify_inputs *in, const verify_outputs *out)
{
    const int bad_bin = (int)(sizeof state->verify_accepted_counts /
                              sizeof state->verify_accepted_counts[0]) - 1;
    int64_t r;
    for (r = 0; r < in->requests; ++r) {
        int32_t accepted = out->accepted[r];
        state->verify_accepted_counts[accepted >= 0 && accepted < bad_bin ? accepted : bad_bin]++;
    }
}

/* One case on every participant. 0, or -1 when it could not be made. */
static int run_verify_case(check_state *state, const verify_kind *kind, int64_t requests,
                           int64_t vocab, psm_dtype dtype, uint64_t seed)
{
    verify_inputs in;
    verify_outputs outputs[CHECK_MAX_PARTICIPANTS];
    int ran[CHECK_MAX_PARTICIPANTS] = {0};
    double *probs = malloc((size_t)vocab * sizeof *probs);
    char label[128];
    int p, q, status = 0;

    memset(outputs, 0, sizeof outputs);
    snprintf(label, sizeof label, "verify %lld x %lld %s %s", (long long)requests,
             (long long)vocab, cli_dtype_name(dtype), kind->name);
    if (!probs || make_inputs(&in, kind, requests, vocab, dtype, seed) != 0) {
        cli_error("check", "out of memory for %s", label);
        free(probs);
        free_inputs(&in);
        return -1;
    }
    for (p = 0; p < state->participant_count; ++p) {
        participant *who = &state->participants[p];
        int outcome;
        if (alloc_outputs(&outputs[p], requests, in.nodes) != 0) {
            cli_error("check", "out of memory for %s", label);
            status = -1;
            break;
        }
        outcome = run_verify(who, &in, &outputs[p]);
        if (outcome == CHECK_REFUSED && who->backend != PSM_BACKEND_CPU) {
            check_note_refusal(&state->verify_refused[p], who->refusal);
            continue;
        }
        if (outcome != 0) {
            state->failed_calls++;
            check_report(state, "%s, %s: the call failed%s", who->name, label,
                         outcome == CHECK_REFUSED ? " (refused psm_verify)" : " (message above)");
            continue;
        }
        ran[p] = 1;
        validate_outputs(state, p, label, &in, &outputs[p], probs);
        if (p == 0)
            count_accepted(state, &in, &outputs[p]);
    }
    for (p = 0; p < state->participant_count; ++p)
        for (q = p + 1; q < state->participant_count; ++q)
            if (ran[p] && ran[q])
                compare_outputs(state, p, q, label, &in, &outputs[p], &outputs[q]);
    for (p = 0; p < state->participant_count; ++p)
        free_outputs(&outputs[p]);
    free_inputs(&in);
    free(probs);
    state->verify_cases++;
    state->verify_requests += requests;
    return status;
}

/* The vocabs and their shares of the verification rows. */
static const struct {
    int64_t vocab;
    double row_share;
} verify_vocabs[] = {{1000, 0.5}, {32000, 0.35}, {151936, 0.15}};
#define VERIFY_VOCAB_COUNT ((int)(sizeof verify_vocabs / sizeof verify_vocabs[0]))
static const psm_dtype verify_dtypes[] = {PSM_DTYPE_F32, PSM_DTYPE_BF16};
#define VERIFY_DTYPE_COUNT 2
/* The verification cases' share of --rows, counted in target rows. */
#define VERIFY_ROW_SHARE 0.1
/* Enough requests for two bad ones in chain_bad_requests. */
#define VERIFY_MIN_REQUESTS 7

int check_run_verify_cases(check_state *state, int64_t row_budget, uint64_t seed)
{
    int v, d, c, index = 0;
    for (v = 0; v < VERIFY_VOCAB_COUNT; ++v)
        for (d = 0; d < VERIFY_DTYPE_COUNT; ++d)
            for (c = 0; c < VERIFY_KIND_COUNT; ++c, ++index) {
                const int32_t k = verify_kinds[c].tree ? TREE_NODES : CHAIN_NODES;
                double rows = VERIFY_ROW_SHARE * (double)row_budget * verify_vocabs[v].row_share /
                              (VERIFY_DTYPE_COUNT * VERIFY_KIND_COUNT);
                int64_t requests = (int64_t)(rows / (k + 1));
                if (requests < VERIFY_MIN_REQUESTS)
                    requests = VERIFY_MIN_REQUESTS;
                if (state->show_progress)
                    fprintf(stderr, "\rverify case %d/%d: %lld x %lld %s %s            ",
                            index + 1, VERIFY_VOCAB_COUNT * VERIFY_DTYPE_COUNT * VERIFY_KIND_COUNT,
                            (long long)requests, (long long)verify_vocabs[v].vocab,
                            cli_dtype_name(verify_dtypes[d]), verify_kinds[c].name);
                if (run_verify_case(state, &verify_kinds[c], requests, verify_vocabs[v].vocab,
                                    verify_dtypes[d],
                                    cli_random_u64(seed ^ 0x5e1f1u, (uint64_t)index)) != 0)
                    return -1;
            }
    if (state->show_progress)
        fprintf(stderr, "\r%70s\r", "");
    return 0;
}

int check_print_verify_agreement(const check_state *state)
{
    int p, q, failures = 0;
    printf("\nspeculative verification (psm_verify): %d cases, %lld requests per participant\n",
           state->verify_cases, (long long)state->verify_requests);
    printf("requests by accepted drafts (%s): 0: %llu, 1: %llu, 2: %llu, 3: %llu, 4: %llu; "
           "bad: %llu\n",
           state->participants[0].name, (unsigned long long)state->verify_accepted_counts[0],
           (unsigned long long)state->verify_accepted_counts[1],
           (unsigned long long)state->verify_accepted_counts[2],
           (unsigned long long)state->verify_accepted_counts[3],
           (unsigned long long)state->verify_accepted_counts[4],
           (unsigned long long)state->verify_accepted_counts[5]);
    printf("agreement per pair (accepted counts, tokens and path nodes must agree 100%%), "
           "logprob max |difference|:\n");
    for (p = 0; p < state->participant_count; ++p)
        for (q = p + 1; q < state->participant_count; ++q) {
            const pair_record *record = &state->verify_pairs[p][q];
            int agree = record->agreed == record->compared;
            /* The two CPU participants always run; a pair with a participant
             * that refused every case has nothing to compare. */
            if (record->compared == 0 && !(p == 0 && q == 1))
                continue;
            agree &= record->compared > 0;
            printf("  %-24s vs %-24s %10llu / %-10llu %8.4f%%  logprob %.2e%s  %s\n",
                   state->participants[p].name, state->participants[q].name,
                   (unsigned long long)record->agreed, (unsigned long long)record->compared,
                   record->compared ? 100.0 * (double)record->agreed / (double)record->compared
                                    : 0.0,
                   record->logprob_max_difference,
                   record->logprob_mismatches ? " (out of tolerance)" : "",
                   agree && !record->logprob_mismatches ? "ok" : "FAIL");
            failures += !agree || record->logprob_mismatches;
        }
    printf("validity (a path of the tree with its drafts' tokens, -1 and NaN after it and for bad "
           "requests, float64 logprobs):\n");
    for (p = 0; p < state->participant_count; ++p) {
        if (state->verify_refused[p].cases == state->verify_cases && state->verify_cases > 0)
            continue;
        printf("  %-24s %llu invalid requests  %s\n", state->participants[p].name,
               (unsigned long long)state->verify_invalid[p],
               state->verify_invalid[p] ? "FAIL" : "ok");
        failures += state->verify_invalid[p] != 0;
    }
    check_print_refusals(state, state->verify_refused,
                         "skipped (the backend refused psm_verify; not counted as agreement):");
    return failures;
}

/* ---- statistics ------------------------------------------------------------ */

/* A chain of CHAIN_NODES drafts over a small vocab: the target at position
 * j (row j of every request) is a fixed row of normal logits (sigma 1.5)
 * at temperature 1 with top-k STAT_TOP_K, so some tokens are masked; the
 * draft for node i, which proposes position i - 1's token, is that
 * position's logits moved by one token at temperature 2: a poor draft that
 * also proposes masked tokens. The tokens are drawn from the draft's float64
 * distribution. */
#define STAT_VOCAB 128
#define STAT_TOP_K 100
#define STAT_REQUESTS_PER_CALL 8192
#define DRAW_STREAM 0x4452415753ull /* "DRAWS" */
/* Two-sided 0.1% point of the standard normal, the chi-square tests' alpha. */
#define MEAN_Z 3.290526731491926

static double overlap(const double *p, const double *q, int64_t vocab)
{
    double sum = 0.0;
    int64_t i;
    for (i = 0; i < vocab; ++i)
        sum += p[i] < q[i] ? p[i] : q[i];
    return sum;
}

int check_run_verify_statistics(psm_context *context, int64_t draws, uint64_t seed)
{
    enum { K = CHAIN_NODES, V = STAT_VOCAB };
    const psm_ref_params target_reference = {1.0f, STAT_TOP_K, 1.0f, 0.0f};
    const psm_ref_params draft_reference = {2.0f, 0, 1.0f, 0.0f};
    static float position[K + 1][V], moved[K][V];
    static double p[K + 1][V], q[K][V];
    uint64_t counts[V] = {0};
    const int64_t per_call = draws < STAT_REQUESTS_PER_CALL ? draws : STAT_REQUESTS_PER_CALL;
    float *target = malloc((size_t)(per_call * (K + 1) * V) * sizeof(float));
    float *draft = malloc((size_t)(per_call * K * V) * sizeof(float));
    int32_t *tokens = malloc((size_t)(per_call * K) * sizeof(int32_t));
    int32_t *accepted = malloc((size_t)per_call * sizeof(int32_t));
    int32_t *emitted = malloc((size_t)(per_call * (K + 1)) * sizeof(int32_t));
    double at_least[K + 1], mean = 0.0, second = 0.0, accepted_sum = 0.0;
    double statistic, critical, standard_error, observed;
    int64_t done = 0, r;
    int i, j, degrees, failures = 0, call;

    printf("\nspeculative verification vs float64, a chain of %d drafts (a poor draft), vocab %d, "
           "%lld requests, CPU backend (alpha 0.001):\n",
           K, V, (long long)draws);
    if (!target || !draft || !tokens || !accepted || !emitted) {
        cli_error("check", "out of memory for the verification statistics");
        failures = 1;
        goto done;
    }
    cli_fill_normal(&position[0][0], (size_t)(K + 1) * V, 1.5f, seed ^ 0x57a7u);
    for (j = 0; j <= K; ++j)
        if (psm_ref_distribution(position[j], V, &target_reference, p[j]) != 1)
            goto reference_failed;
    for (i = 0; i < K; ++i) {
        for (j = 0; j < V; ++j)
            moved[i][j] = position[i][(j + 1) % V];
        if (psm_ref_distribution(moved[i], V, &draft_reference, q[i]) != 1)
            goto reference_failed;
    }
    for (r = 0; r < per_call; ++r) {
        memcpy(target + r * (K + 1) * V, position, sizeof position);
        memcpy(draft + r * K * V, moved, sizeof moved);
    }

    for (call = 0; done < draws; ++call) {
        const int64_t requests = draws - done < per_call ? draws - done : per_call;
        psm_tensor target_tensor, draft_tensor;
        psm_params target_params, draft_params;
        psm_drafts drafts;
        psm_verification outputs;
        psm_status status;
        for (r = 0; r < requests; ++r)
            for (i = 0; i < K; ++i)
                tokens[r * K + i] = draw_token(
                    q[i], V, cli_random_unit(seed ^ DRAW_STREAM, (uint64_t)((done + r) * K + i)));
        memset(&target_tensor, 0, sizeof target_tensor);
        target_tensor.data = target;
        target_tensor.dtype = PSM_DTYPE_F32;
        target_tensor.memory = PSM_MEMORY_HOST;
        target_tensor.rows = requests * (K + 1);
        target_tensor.vocab = V;
        draft_tensor = target_tensor;
        draft_tensor.data = draft;
        draft_tensor.rows = requests * K;
        psm_params_init(&target_params);
        target_params.top_k = STAT_TOP_K;
        target_params.seed = seed + (uint64_t)call;
        psm_params_init(&draft_params);
        draft_params.temperature = draft_reference.temperature;
        psm_drafts_init(&drafts);
        drafts.nodes = K;
        drafts.tokens = tokens;
        drafts.draft_logits = &draft_tensor;
        drafts.draft_params = &draft_params;
        memset(&outputs, 0, sizeof outputs);
        outputs.accepted = (psm_output){accepted, PSM_MEMORY_HOST};
        outputs.tokens = (psm_output){emitted, PSM_MEMORY_HOST};
        status = psm_verify(context, &target_tensor, &target_params, &drafts, &outputs);
        if (status == PSM_OK)
            status = psm_synchronize(context);
        if (status != PSM_OK) {
            cli_library_error("check", "psm_verify (statistics)", status);
            failures = 1;
            goto done;
        }
        for (r = 0; r < requests; ++r) {
            int32_t first = emitted[r * (K + 1)];
            if (accepted[r] < 0 || accepted[r] > K || first < 0 || first >= V) {
                printf("  request %lld: accepted %d, first token %d out of range  FAIL\n",
                       (long long)(done + r), (int)accepted[r], (int)first);
                failures = 1;
                goto done;
            }
            counts[first]++;
            accepted_sum += accepted[r];
        }
        done += requests;
    }

    /* The first emitted token follows the target's first position. */
    if (!check_chi_square(p[0], counts, V, draws, &statistic, &degrees, &critical))
        failures++;
    printf("  %-24s vocab %-6d chi2 %10.2f  df %5d  critical(0.001) %9.2f  %s\n",
           "first emitted token", V, statistic, degrees, critical,
           statistic <= critical ? "pass" : "FAIL");
    /* P(accepted >= j) is the product of the first j positions' overlaps
     * sum min(p, q); the mean and variance follow from those. */
    at_least[0] = 1.0;
    for (j = 1; j <= K; ++j)
        at_least[j] = at_least[j - 1] * overlap(p[j - 1], q[j - 1], V);
    for (j = 1; j <= K; ++j) {
        double exactly = at_least[j] - (j < K ? at_least[j + 1] : 0.0);
        mean += j * exactly;
        second += (double)j * j * exactly;
    }
    standard_error = sqrt((second - mean * mean) / (double)draws);
    observed = accepted_sum / (double)draws;
    printf("  %-24s %.6f, expected %.6f, |difference| %.2e <= %.2e (3.29 standard errors)  %s\n",
           "mean accepted length", observed, mean, fabs(observed - mean),
           MEAN_Z * standard_error, fabs(observed - mean) <= MEAN_Z * standard_error ? "pass"
                                                                                     : "FAIL");
    failures += fabs(observed - mean) > MEAN_Z * standard_error;
    goto done;

reference_failed:
    cli_error("check", "out of memory for the float64 reference");
    failures = 1;
done:
    free(target);
    free(draft);
    free(tokens);
    free(accepted);
    free(emitted);
    return failures;
}
