/* cpu_verify.c: psm_verify on the CPU backend, speculative decoding
 * verification by exact rejection sampling (docs/SAMPLING.md, section 7;
 * the arithmetic is core/psm_verify.h). Requests run in parallel, one per
 * thread at a time; a request's rows go through the passes of a plain call
 * (cpu_tiles.c, cpu_select.c) on that thread.
 *
 * Two phases, so that a failing call writes nothing:
 * 1. every request's rows are checked: its target rows (a bad one makes the
 *    request bad) and its draft nodes, each giving the drawn token's draft
 *    weight Q_x and the node's total Q_tot (Q_x = 0, or a bad draft logits
 *    row, fails the call);
 * 2. each good request walks its tree from the root: acceptance tests with
 *    the stored Q_x and Q_tot, a draft node's whole distribution only when
 *    it is rejected (the residual step), and a target row's distribution
 *    only at the nodes the walk reaches. */
#include "cpu_backend.h"
#include "psm_verify.h"
#include "verify_backend.h"

/* What phase 1 found at a draft node (its status goes to a separate array,
 * which core/verify_backend.h reads). */
typedef struct node_check {
    uint64_t drawn; /* Q_x */
    uint64_t total; /* Q_tot */
} node_check;

/* The distribution's parameters of a row. */
typedef struct row_filters {
    float temperature;
    int32_t top_k;
    float top_p;
    float min_p;
    int32_t filter_order; /* the call's psm_params.filter_order */
} row_filters;

static row_filters filters_of(const psm_row_params *params, int32_t filter_order)
{
    row_filters filters = {params->temperature, params->top_k, params->top_p, params->min_p,
                           filter_order};
    return filters;
}

/* A request's parameters from a psm_params whose per-row arrays have one
 * entry per request: its seed, offset and stream resolve as output row r's. */
static psm_row_params request_params(const psm_params *params, int64_t requests, int64_t r)
{
    return psm_resolve_row(r, psm_request_per_row(params),
                           psm_params_row_scalars(params, requests),
                           psm_request_row_arrays(params));
}

/* The kept tokens' global weights g_i (0 for the rest) into weights;
 * returns their sum. */
static uint64_t kept_global_weights(const cpu_row *row, cpu_scratch *owner, uint64_t *weights)
{
    uint64_t total = 0;
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        int n;
        const float *x = cpu_read_tile(row, owner, tile, owner->logits, &n);
        const uint32_t start = (uint32_t)(tile * PSM_TILE);
        uint64_t *g = weights + start;
        cpu_global_weights(row, x, n, g);
        for (int i = 0; i < n; ++i) {
            int kept = is_valid_logit(x[i]);
            if (kept && row->filtered)
                kept = key_at_least(x[i], start + (uint32_t)i, row->key_cutoff) &&
                       (row->min_weight == 0 || g[i] >= row->min_weight);
            if (!kept)
                g[i] = 0;
            total += g[i];
        }
    }
    return total;
}

/* The integer distribution of a row of logits (section 7): g_i over the kept
 * tokens, or a greedy row's point mass (weight 1 at the argmax). Returns 0
 * for a bad row, else 1 with the weights and their sum in *total. */
static int logits_distribution(const cpu_state *state, cpu_scratch *owner,
                               const psm_tensor *logits, int64_t logits_row, row_filters filters,
                               uint64_t *weights, uint64_t *total)
{
    cpu_row row;
    cpu_init_tensor_row(&row, logits, logits_row);
    const int greedy = psm_is_greedy(filters.temperature);
    if (!greedy)
        row.scale = psm_inverse_temperature_scale(filters.temperature);
    cpu_pass_args args = {.pass = PASS_SUMMARY, .row = &row, .owner = owner};
    cpu_run_pass(state, &args, 0);
    int64_t valid;
    if (!cpu_row_is_good(&row, owner, &valid, &row.row_max))
        return 0;
    if (greedy) {
        memset(weights, 0, (size_t)row.vocab * sizeof *weights);
        weights[cpu_greedy_token(&row, owner)] = 1;
        *total = 1;
        return 1;
    }
    const int top_k_on = filters.top_k > 0 && filters.top_k < row.vocab;
    if (top_k_on || filters.top_p < 1.0f || filters.min_p > 0.0f) {
        row.filtered = 1;
        cpu_apply_filters(state, &row, owner, 0, valid, filters.top_k, filters.top_p,
                          filters.min_p, filters.filter_order);
    }
    *total = kept_global_weights(&row, owner, weights);
    return 1;
}

/* Is a row of logits good (a summary pass)? */
static int logits_row_good(const cpu_state *state, cpu_scratch *owner, const psm_tensor *logits,
                           int64_t logits_row)
{
    cpu_row row;
    cpu_init_tensor_row(&row, logits, logits_row);
    cpu_pass_args args = {.pass = PASS_SUMMARY, .row = &row, .owner = owner};
    cpu_run_pass(state, &args, 0);
    int64_t valid;
    float max;
    return cpu_row_is_good(&row, owner, &valid, &max);
}

/* Draft node `node` of request r: its distribution's weights into weights
 * (draft logits, draft probabilities floor(q 2^B), or the point mass on its
 * token); returns 0 for a bad draft logits row, else 1 with *total. */
static int draft_distribution(const cpu_state *state, cpu_scratch *owner,
                              const psm_verify_request *request, int64_t r, int32_t node,
                              uint64_t *weights, uint64_t *total)
{
    const int64_t draft_row = r * request->nodes + node - 1;
    const int64_t vocab = request->target.vocab;
    if (request->draft_logits.data) {
        psm_row_params params = request_params(&request->draft_params, request->requests, r);
        return logits_distribution(state, owner, &request->draft_logits, draft_row,
                                   filters_of(&params, request->draft_params.filter_order), weights,
                                   total);
    }
    if (request->draft_probs.data) {
        const float *q = (const float *)request->draft_probs.data +
                         draft_row * request->draft_probs.row_stride;
        const int bits = psm_weight_bits(vocab);
        uint64_t sum = 0;
        for (int64_t i = 0; i < vocab; ++i) {
            weights[i] = psm_draft_prob_weight(q[i], bits);
            sum += weights[i];
        }
        *total = sum;
        return 1;
    }
    memset(weights, 0, (size_t)vocab * sizeof *weights);
    weights[request->tokens[draft_row]] = 1;
    *total = 1;
    return 1;
}

/* Phase 1 for request r: its target rows, then its draft nodes into
 * checks[r * k .. r * k + k). Returns whether the request is good. */
static int check_request(const cpu_state *state, cpu_scratch *owner,
                         const psm_verify_request *request, int64_t r, node_check *checks,
                         int32_t *node_status)
{
    const int32_t k = request->nodes;
    for (int32_t node = 1; node <= k; ++node) {
        node_check *check = &checks[r * k + node - 1];
        int32_t *status = &node_status[r * k + node - 1];
        uint64_t *q = owner->verify_draft;
        if (!draft_distribution(state, owner, request, r, node, q, &check->total)) {
            *status = PSM_NODE_BAD_DRAFT_ROW;
            continue;
        }
        check->drawn = q[request->tokens[r * k + node - 1]];
        *status = check->drawn == 0 ? PSM_NODE_ZERO_DRAFT : PSM_NODE_GOOD;
    }
    psm_row_params params = request_params(&request->target_params, request->requests, r);
    if (!params.valid)
        return 0;
    for (int32_t node = 0; node <= k; ++node)
        if (!logits_row_good(state, owner, &request->target, r * (k + 1) + node))
            return 0;
    return 1;
}

/* After draft distribution q rejects a token: the residual
 * max(0, R_i Q_tot - Q_i R_tot), shifted so that its largest weight is below
 * 2^(B+1) (core/psm_verify.h). Returns the new R_tot. */
static uint64_t residual_step(uint64_t *residual, uint64_t residual_total, const uint64_t *q,
                              uint64_t q_total, int64_t vocab, int weight_bits)
{
    psm_u128 largest = {0, 0};
    for (int64_t i = 0; i < vocab; ++i) {
        psm_u128 excess = psm_residual_excess(residual[i], q_total, q[i], residual_total);
        if (psm_u128_less(largest, excess))
            largest = excess;
    }
    const int shift = psm_residual_shift(largest, weight_bits);
    uint64_t total = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        residual[i] = psm_u128_shift_right(
            psm_residual_excess(residual[i], q_total, q[i], residual_total), shift);
        total += residual[i];
    }
    return total;
}

/* The token whose running sum of weights, in index order, first exceeds
 * pick (pick < the weights' sum). */
static int64_t token_at(const uint64_t *weights, int64_t vocab, uint64_t pick)
{
    uint64_t running = 0;
    for (int64_t i = 0; i < vocab; ++i) {
        running += weights[i];
        if (running > pick)
            return i;
    }
    return vocab - 1; /* unreachable for pick below the sum */
}

static int32_t parent_of(const psm_verify_request *request, int64_t r, int32_t node)
{
    return request->parents ? request->parents[r * request->nodes + node - 1] : node - 1;
}

/* Request r's outputs from position `from` on: -1 (NaN logprobs). */
static void write_tail(const psm_verify_request *request, int64_t r, int32_t from)
{
    const int64_t width = (int64_t)request->nodes + 1;
    int32_t *tokens = (int32_t *)request->outputs.tokens.data + r * width;
    int32_t *path = request->outputs.path_nodes.data
                        ? (int32_t *)request->outputs.path_nodes.data + r * width
                        : NULL;
    float *logprobs = request->outputs.logprobs.data
                          ? (float *)request->outputs.logprobs.data + r * width
                          : NULL;
    for (int64_t j = from; j < width; ++j) {
        tokens[j] = -1;
        if (path)
            path[j] = -1;
        if (logprobs)
            logprobs[j] = NAN;
    }
}

static void write_emitted(const psm_verify_request *request, int64_t r, int32_t position,
                          int64_t token, int32_t node, uint64_t weight, uint64_t total)
{
    const int64_t at = r * ((int64_t)request->nodes + 1) + position;
    ((int32_t *)request->outputs.tokens.data)[at] = (int32_t)token;
    if (request->outputs.path_nodes.data)
        ((int32_t *)request->outputs.path_nodes.data)[at] = node;
    if (request->outputs.logprobs.data)
        ((float *)request->outputs.logprobs.data)[at] = psm_weight_log_probability(weight, total);
}

/* Phase 2 for a good request: the walk of section 7. */
static void walk_request(const cpu_state *state, cpu_scratch *owner,
                         const psm_verify_request *request, int64_t r, const node_check *checks)
{
    const int32_t k = request->nodes;
    const int64_t vocab = request->target.vocab;
    const int weight_bits = psm_weight_bits(vocab);
    const psm_row_params params = request_params(&request->target_params, request->requests, r);
    uint64_t *target = owner->verify_target;
    uint64_t *residual = owner->verify_residual;
    int32_t node = 0, emitted = 0;
    for (;;) {
        uint64_t target_total = 0;
        /* Phase 1 found every target row of the request good. */
        logits_distribution(state, owner, &request->target, r * (k + 1) + node,
                            filters_of(&params, request->target_params.filter_order), target,
                            &target_total);
        memcpy(residual, target, (size_t)vocab * sizeof *residual);
        uint64_t residual_total = target_total;
        int32_t accepted_child = 0;
        for (int32_t child = node + 1; child <= k; ++child) {
            if (parent_of(request, r, child) != node)
                continue;
            const node_check *check = &checks[r * k + child - 1];
            const int32_t token = request->tokens[r * k + child - 1];
            psm_draw_bits bits =
                psm_sample_bits(params.seed, params.offset, params.stream, (uint32_t)child);
            if (psm_draft_accepted(bits.tile, check->drawn, check->total, residual[token],
                                   residual_total)) {
                accepted_child = child;
                write_emitted(request, r, emitted++, token, node, target[token], target_total);
                break;
            }
            uint64_t *q = owner->verify_draft;
            uint64_t q_total = 0;
            draft_distribution(state, owner, request, r, child, q, &q_total);
            residual_total =
                residual_step(residual, residual_total, q, q_total, vocab, weight_bits);
        }
        if (accepted_child) {
            node = accepted_child;
            continue;
        }
        /* No child accepted (or none): the correction or bonus token, drawn
         * from the residual at this node with words 2-3 of its counter. */
        psm_draw_bits bits =
            psm_sample_bits(params.seed, params.offset, params.stream, (uint32_t)node);
        const int64_t token = token_at(residual, vocab, psm_pick(bits.token, residual_total));
        write_emitted(request, r, emitted++, token, node, target[token], target_total);
        break;
    }
    ((int32_t *)request->outputs.accepted.data)[r] = emitted - 1;
    write_tail(request, r, emitted);
}

psm_status cpu_verify(void *opaque, psm_verify_request *request)
{
    cpu_state *state = opaque;
    psm_status status = cpu_prepare_verify(state, request->target.vocab);
    if (status != PSM_OK)
        return status;
    const int64_t requests = request->requests;
    const size_t nodes = (size_t)(requests * request->nodes);
    node_check *checks = psm_alloc(nodes * sizeof *checks);
    int32_t *node_status = psm_alloc(nodes * sizeof *node_status);
    int32_t *bad = psm_alloc((size_t)requests * sizeof *bad);
    if (!checks || !node_status || !bad) {
        psm_free(checks);
        psm_free(node_status);
        psm_free(bad);
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                             "cpu backend: cannot allocate the checks of %lld requests",
                             (long long)requests);
    }
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 1)
    for (int64_t r = 0; r < requests; ++r)
        bad[r] = !check_request(state, state->scratch[omp_get_thread_num()], request, r, checks,
                                node_status);
    status = psm_verify_report(request, node_status, bad, 1);
    if (status == PSM_OK) {
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 1)
        for (int64_t r = 0; r < requests; ++r) {
            if (!bad[r]) {
                walk_request(state, state->scratch[omp_get_thread_num()], request, r, checks);
            } else {
                ((int32_t *)request->outputs.accepted.data)[r] = -1;
                write_tail(request, r, 0);
            }
        }
    }
    psm_free(checks);
    psm_free(node_status);
    psm_free(bad);
    return status;
}
