/* cpu_rows.c: one row from its parameters to its outputs (cpu_backend.h
 * describes the backend). */
#include "cpu_backend.h"

/* ---- rows ------------------------------------------------------------------ */

/* Output row r's parameters (psm_resolve_row over the caller's host arrays). */
psm_row_params cpu_resolve_params(const psm_request *request, int64_t r)
{
    return psm_resolve_row(r, psm_request_per_row(&request->params),
                           psm_request_row_scalars(request),
                           psm_request_row_arrays(&request->params));
}

static const unsigned char *row_data(const psm_tensor *logits, int64_t logits_row)
{
    return (const unsigned char *)logits->data +
           (size_t)logits_row * (size_t)logits->row_stride * dtype_size(logits->dtype);
}

static void init_row(cpu_row *row, const psm_tensor *logits, int64_t r)
{
    row->data = row_data(logits, r);
    row->dtype = logits->dtype;
    row->vocab = logits->vocab;
    row->tiles = (logits->vocab + PSM_TILE - 1) / PSM_TILE;
    row->weight_bits = psm_weight_bits(logits->vocab);
    row->scale = 0.0f;
    row->row_max = -INFINITY;
    row->filtered = 0;
    row->key_cutoff = 0;
    row->min_weight = 0;
    row->kept_floor = -FLT_MAX;
    row->next_data = NULL;
    row->prefetch_step = PREFETCH_IN_KEPT;
}

/* Output row r's processed logits (docs/SAMPLING.md, section 1;
 * core/psm_processing.h), in the owner's buffer: the row the passes then
 * read as f32. Core checked every list and value (CPU arrays are host
 * memory). */
static const float *processed_row(const psm_request *request, int64_t r, int64_t logits_row,
                                  cpu_scratch *owner)
{
    const psm_logit_processing *p = request->params.processing;
    const psm_tensor *logits = &request->logits;
    const int64_t vocab = logits->vocab;
    const unsigned char *raw = row_data(logits, logits_row);
    float *x = owner->processing.logits;
    /* A loop per dtype, each a plain conversion loop. */
    if (logits->dtype == PSM_DTYPE_F32)
        for (int64_t i = 0; i < vocab; ++i)
            x[i] = cpu_logit_at(raw, PSM_DTYPE_F32, i);
    else if (logits->dtype == PSM_DTYPE_BF16)
        for (int64_t i = 0; i < vocab; ++i)
            x[i] = cpu_logit_at(raw, PSM_DTYPE_BF16, i);
    else
        for (int64_t i = 0; i < vocab; ++i)
            x[i] = cpu_logit_at(raw, PSM_DTYPE_F16, i);

    const psm_processing_arrays arrays = psm_request_processing_arrays(p);
    const psm_row_lists lists = psm_row_lists_of(&arrays, r);
    psm_process_row_lists(x, owner->processing.counts, &lists);
    if (p->allowed_mask) {
        const int64_t words = p->allowed_mask_words ? p->allowed_mask_words : (vocab + 31) / 32;
        const uint32_t *mask = p->allowed_mask + r * words;
        for (int64_t i = 0; i < vocab; ++i)
            x[i] = psm_processed_logit(x[i], psm_token_allowed(mask, i));
    } else {
        for (int64_t i = 0; i < vocab; ++i)
            x[i] = psm_processed_logit(x[i], 1);
    }
    return x;
}

/* The row the passes read: the logits row, or its processed copy. */
static void init_request_row(cpu_row *row, const psm_request *request, int64_t r,
                             int64_t logits_row, cpu_scratch *owner)
{
    init_row(row, &request->logits, logits_row);
    if (psm_processing_active(&request->params)) {
        row->data = (const unsigned char *)processed_row(request, r, logits_row, owner);
        row->dtype = PSM_DTYPE_F32;
    }
}

/* Is row r bad (checking mode)? Out-of-range parameters, a NaN/+inf, or no
 * valid logit. */
int cpu_row_check_fails(const cpu_state *state, const psm_request *request, int64_t r,
                        cpu_scratch *owner, int parallel)
{
    psm_row_params params = cpu_resolve_params(request, r);
    if (!params.valid)
        return 1;
    cpu_row row;
    init_request_row(&row, request, r, params.logits_row, owner);
    cpu_pass_args args = {.pass = PASS_SUMMARY, .row = &row, .owner = owner};
    cpu_run_pass(state, &args, parallel);
    int64_t valid;
    float max;
    return !cpu_row_is_good(&row, owner, &valid, &max);
}

static void write_bad_row(const psm_request *request, int64_t r, int want_probs)
{
    if (want_probs) {
        float *out = (float *)request->probs.data + r * request->probs.row_stride;
        for (int64_t i = 0; i < request->logits.vocab; ++i)
            out[i] = NAN;
        return;
    }
    int64_t samples = request->params.num_samples;
    int32_t *tokens = (int32_t *)request->tokens.data + r * samples;
    float *logprobs = request->logprobs.data ? (float *)request->logprobs.data + r * samples : NULL;
    for (int64_t j = 0; j < samples; ++j) {
        tokens[j] = -1;
        if (logprobs)
            logprobs[j] = NAN;
    }
}

/* The greedy token: the first index holding M. */
static int64_t greedy_token(const cpu_row *row, cpu_scratch *owner)
{
    for (int64_t tile = 0; tile < row->tiles; ++tile) {
        if (owner->tile_valid[tile] == 0 || owner->tile_max[tile] != row->row_max)
            continue;
        int n;
        const float *logits = cpu_read_tile(row, owner, tile, owner->logits, &n);
        for (int i = 0; i < n; ++i)
            if (logits[i] == row->row_max)
                return tile * PSM_TILE + i;
    }
    return -1; /* unreachable for a good row: M is some valid logit */
}

static void write_greedy_row(const psm_request *request, int64_t r, int64_t token, int want_probs)
{
    if (want_probs) {
        float *out = (float *)request->probs.data + r * request->probs.row_stride;
        for (int64_t i = 0; i < request->logits.vocab; ++i)
            out[i] = 0.0f;
        out[token] = 1.0f;
        return;
    }
    int64_t samples = request->params.num_samples;
    int32_t *tokens = (int32_t *)request->tokens.data + r * samples;
    float *logprobs = request->logprobs.data ? (float *)request->logprobs.data + r * samples : NULL;
    for (int64_t j = 0; j < samples; ++j) {
        tokens[j] = (int32_t)token;
        if (logprobs)
            logprobs[j] = 0.0f;
    }
}

/* The running weight sums of a tile (w_0, w_0 + w_1, ...), from the row
 * owner's cache or computed into it. */
static const uint64_t *tile_running_sums(const cpu_row *row, cpu_scratch *owner, int64_t tile)
{
    for (int slot = 0; slot < CPU_CACHED_TILES; ++slot)
        if (owner->cached_tile[slot] == tile)
            return owner->cached_running[slot];
    int slot = owner->next_slot;
    owner->next_slot = (slot + 1) % CPU_CACHED_TILES;
    uint64_t *running = owner->cached_running[slot];
    cpu_tile_weights(row, owner, tile, owner->logits, running);
    int n = (int)tile_length(row, tile);
    for (int i = 1; i < n; ++i)
        running[i] += running[i - 1];
    owner->cached_tile[slot] = tile;
    return running;
}

static void draw_row(const psm_request *request, const cpu_row *row, cpu_scratch *owner, int64_t r,
                     const psm_row_params *params, uint64_t total)
{
    int64_t samples = request->params.num_samples;
    int32_t *tokens = (int32_t *)request->tokens.data + r * samples;
    float *logprobs = request->logprobs.data ? (float *)request->logprobs.data + r * samples : NULL;
    for (int slot = 0; slot < CPU_CACHED_TILES; ++slot)
        owner->cached_tile[slot] = -1;
    for (int64_t j = 0; j < samples; ++j) {
        psm_draw_bits bits =
            psm_sample_bits(params->seed, params->offset, params->stream, (uint32_t)j);
        int64_t tile =
            psm_first_above(owner->tile_prefix, (int32_t)row->tiles, psm_pick(bits.tile, total));
        uint64_t mass = owner->tile_prefix[tile] - (tile > 0 ? owner->tile_prefix[tile - 1] : 0);
        const uint64_t *running = tile_running_sums(row, owner, tile);
        int64_t n = tile_length(row, tile);
        uint64_t tile_sum = running[n - 1];
        /* The token is the first whose running sum exceeds b. */
        int64_t chosen = psm_first_above(running, (int32_t)n, psm_pick(bits.token, tile_sum));
        uint64_t weight = running[chosen] - (chosen > 0 ? running[chosen - 1] : 0);
        tokens[j] = (int32_t)(tile * PSM_TILE + chosen);
        if (logprobs)
            logprobs[j] = psm_log_probability(weight, tile_sum, mass, total);
    }
}

/* One row, sampled (want_probs 0) or written out as probabilities. */
void cpu_process_row(const cpu_state *state, const psm_request *request, int64_t r,
                     cpu_scratch *owner, int parallel, int want_probs, int64_t next_row)
{
    const int top_logprobs = !want_probs && request->params.top_logprobs;
    psm_row_params params = cpu_resolve_params(request, r);
    if (!params.valid) {
        write_bad_row(request, r, want_probs);
        if (top_logprobs)
            cpu_write_bad_top_logprobs(request, r);
        return;
    }
    cpu_row row;
    init_request_row(&row, request, r, params.logits_row, owner);
    if (next_row >= 0) {
        psm_row_params next = cpu_resolve_params(request, next_row);
        if (next.valid)
            row.next_data = row_data(&request->logits, next.logits_row);
    }
    int greedy = psm_is_greedy(params.temperature);
    int plain = !greedy && !psm_may_filter(params.top_k, params.top_p, params.min_p, row.vocab);
    if (!greedy)
        row.scale = psm_inverse_temperature_scale(params.temperature);

    cpu_pass_args args = {.pass = plain ? PASS_PLAIN : PASS_SUMMARY, .row = &row, .owner = owner};
    cpu_run_pass(state, &args, parallel);
    int64_t valid;
    if (!cpu_row_is_good(&row, owner, &valid, &row.row_max)) {
        write_bad_row(request, r, want_probs);
        if (top_logprobs)
            cpu_write_bad_top_logprobs(request, r);
        return;
    }
    if (greedy) {
        write_greedy_row(request, r, greedy_token(&row, owner), want_probs);
        if (top_logprobs)
            cpu_top_logprobs(request, &row, owner, r, params.logits_row, 0, 1);
        return;
    }
    if (!plain) {
        row.filtered = 1;
        switch (cpu_apply_filters(state, &row, owner, parallel, valid, params.top_k, params.top_p,
                                  params.min_p, request->params.filter_order)) {
        case KEPT_FROM_HEAP:
            cpu_kept_masses_from_heap(&row, owner, params.top_k);
            break;
        case KEPT_DONE:
            break;
        case KEPT_BY_PASS:
            args.pass = PASS_KEPT;
            cpu_run_pass(state, &args, parallel);
            break;
        }
    }
    uint64_t total = cpu_tile_masses(&row, owner);
    if (want_probs) {
        args.pass = PASS_PROBS;
        args.total = total;
        args.probs_row = (float *)request->probs.data + r * request->probs.row_stride;
        cpu_run_pass(state, &args, parallel);
        return;
    }
    draw_row(request, &row, owner, r, &params, total);
    if (top_logprobs)
        cpu_top_logprobs(request, &row, owner, r, params.logits_row, total, 0);
}

/* ---- speculative verification (cpu_verify.c) -------------------------------- */

void cpu_init_tensor_row(cpu_row *row, const psm_tensor *tensor, int64_t tensor_row)
{
    init_row(row, tensor, tensor_row);
}

int64_t cpu_greedy_token(const cpu_row *row, cpu_scratch *owner)
{
    return greedy_token(row, owner);
}
