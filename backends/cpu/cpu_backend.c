/* cpu_backend.c: the CPU backend's state, its workspace (its own or the
 * caller's), the batch loop and its operations table (cpu_backend.h describes
 * the backend). */
#include "cpu_backend.h"

/* ---- scratch --------------------------------------------------------------- */

static void free_tile_arrays(cpu_tile_arrays *arrays)
{
    psm_free(arrays->tile_sum);
    psm_free(arrays->tile_prefix);
    psm_free(arrays->tile_max);
    psm_free(arrays->tile_valid);
    psm_free(arrays->tile_bad);
    psm_free(arrays->tile_raw);
    memset(arrays, 0, sizeof *arrays);
}

static void free_processing_arrays(cpu_processing_arrays *arrays)
{
    psm_free(arrays->logits);
    psm_free(arrays->counts);
    memset(arrays, 0, sizeof *arrays);
}

static void free_rank_arrays(cpu_rank_arrays *arrays)
{
    psm_free(arrays->keys);
    psm_free(arrays->sorted);
    psm_free(arrays->above);
    memset(arrays, 0, sizeof *arrays);
}

static void free_verify_arrays(cpu_scratch *scratch)
{
    psm_free(scratch->verify_target);
    psm_free(scratch->verify_residual);
    psm_free(scratch->verify_draft);
    scratch->verify_target = scratch->verify_residual = scratch->verify_draft = NULL;
    scratch->owned_verify_vocab = 0;
}

static void free_scratch(cpu_scratch *scratch)
{
    if (!scratch)
        return;
    free_verify_arrays(scratch);
    free_tile_arrays(&scratch->owned);
    free_processing_arrays(&scratch->owned_processing);
    free_rank_arrays(&scratch->owned_ranks);
    psm_free(scratch);
}

static void use_tile_arrays(cpu_scratch *scratch, const cpu_tile_arrays *arrays)
{
    scratch->tile_sum = arrays->tile_sum;
    scratch->tile_prefix = arrays->tile_prefix;
    scratch->tile_max = arrays->tile_max;
    scratch->tile_valid = arrays->tile_valid;
    scratch->tile_bad = arrays->tile_bad;
    scratch->tile_raw = arrays->tile_raw;
}

/* Grows every thread's own tile arrays to hold a row of `vocab` tokens. */
static psm_status ensure_capacity(cpu_state *state, int64_t vocab)
{
    int64_t tiles = (vocab + PSM_TILE - 1) / PSM_TILE;
    for (int t = 0; t < state->threads; ++t) {
        cpu_scratch *scratch = state->scratch[t];
        if (scratch->owned_tiles >= tiles)
            continue;
        size_t count = (size_t)tiles;
        cpu_tile_arrays grown = {
            .tile_sum = psm_alloc(count * sizeof(uint64_t)),
            .tile_prefix = psm_alloc(count * sizeof(uint64_t)),
            .tile_max = psm_alloc(count * sizeof(float)),
            .tile_valid = psm_alloc(count * sizeof(int32_t)),
            .tile_bad = psm_alloc(count * sizeof(uint8_t)),
            .tile_raw = psm_alloc(count * sizeof(uint8_t)),
        };
        if (!grown.tile_sum || !grown.tile_prefix || !grown.tile_max || !grown.tile_valid ||
            !grown.tile_bad || !grown.tile_raw) {
            free_tile_arrays(&grown);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate tile workspace for vocab %lld",
                                 (long long)vocab);
        }
        free_tile_arrays(&scratch->owned);
        scratch->owned = grown;
        scratch->owned_tiles = tiles;
    }
    return PSM_OK;
}

/* Grows every thread's own processing arrays to rows of `vocab` tokens. */
static psm_status ensure_processing_capacity(cpu_state *state, int64_t vocab)
{
    for (int t = 0; t < state->threads; ++t) {
        cpu_scratch *scratch = state->scratch[t];
        if (scratch->owned_processing_vocab >= vocab)
            continue;
        cpu_processing_arrays grown = {
            .logits = psm_alloc((size_t)vocab * sizeof(float)),
            .counts = psm_alloc_zeroed((size_t)vocab, sizeof(uint32_t)),
        };
        if (!grown.logits || !grown.counts) {
            free_processing_arrays(&grown);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate logit-processing workspace for "
                                 "vocab %lld",
                                 (long long)vocab);
        }
        free_processing_arrays(&scratch->owned_processing);
        scratch->owned_processing = grown;
        scratch->owned_processing_vocab = vocab;
    }
    return PSM_OK;
}

/* Grows every thread's own rank buffers to `samples` draws a row. */
static psm_status ensure_rank_capacity(cpu_state *state, int64_t samples)
{
    for (int t = 0; t < state->threads; ++t) {
        cpu_scratch *scratch = state->scratch[t];
        if (scratch->owned_rank_samples >= samples)
            continue;
        cpu_rank_arrays grown = {
            .keys = psm_alloc((size_t)samples * sizeof(uint64_t)),
            .sorted = psm_alloc((size_t)samples * sizeof(uint64_t)),
            .above = psm_alloc((size_t)samples * sizeof(int64_t)),
        };
        if (!grown.keys || !grown.sorted || !grown.above) {
            free_rank_arrays(&grown);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate rank buffers for %lld samples",
                                 (long long)samples);
        }
        free_rank_arrays(&scratch->owned_ranks);
        scratch->owned_ranks = grown;
        scratch->owned_rank_samples = samples;
    }
    return PSM_OK;
}

/* Does the call need rank buffers (top-N logprobs with the drawn ranks)? */
static int needs_ranks(const psm_request *request)
{
    return request->params.top_logprobs && request->params.top_logprobs->sampled_ranks.data;
}

/* A caller's workspace holds every thread's tile arrays, each array starting
 * on a cache line (so that threads never share one), after up to 63 bytes
 * that align the first. */
#define CPU_LINE 64

static size_t line_round(size_t bytes)
{
    return (bytes + CPU_LINE - 1) / CPU_LINE * CPU_LINE;
}

static size_t thread_workspace_bytes(int64_t vocab, int processing, int64_t rank_samples)
{
    size_t tiles = (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
    size_t bytes = 2 * line_round(tiles * sizeof(uint64_t)) + line_round(tiles * sizeof(float)) +
                   line_round(tiles * sizeof(int32_t)) + 2 * line_round(tiles * sizeof(uint8_t));
    if (processing)
        bytes += line_round((size_t)vocab * sizeof(float)) +
                 line_round((size_t)vocab * sizeof(uint32_t));
    bytes += 3 * line_round((size_t)rank_samples * sizeof(uint64_t));
    return bytes;
}

static size_t workspace_bytes(const cpu_state *state, const psm_request *request)
{
    /* The size query may come before the outputs exist: top-N logprobs
     * count their rank buffers whenever they are asked for. */
    const psm_top_logprobs *top = request->params.top_logprobs;
    const int64_t rank_samples = top ? request->params.num_samples : 0;
    return (CPU_LINE - 1) +
           (size_t)state->threads * thread_workspace_bytes(request->logits.vocab,
                                                           psm_processing_active(&request->params),
                                                           rank_samples);
}

/* With logit processing the counts must start at zero: the caller's memory
 * is cleared here (processed_row leaves them zero after each row). */
static void carve_workspace(cpu_state *state, void *workspace, int64_t vocab, int processing,
                            int64_t rank_samples)
{
    size_t tiles = (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
    unsigned char *next =
        (unsigned char *)(((uintptr_t)workspace + CPU_LINE - 1) / CPU_LINE * CPU_LINE);
    for (int t = 0; t < state->threads; ++t) {
        cpu_tile_arrays arrays;
        arrays.tile_sum = (uint64_t *)next;
        next += line_round(tiles * sizeof(uint64_t));
        arrays.tile_prefix = (uint64_t *)next;
        next += line_round(tiles * sizeof(uint64_t));
        arrays.tile_max = (float *)next;
        next += line_round(tiles * sizeof(float));
        arrays.tile_valid = (int32_t *)next;
        next += line_round(tiles * sizeof(int32_t));
        arrays.tile_bad = next;
        next += line_round(tiles * sizeof(uint8_t));
        arrays.tile_raw = next;
        next += line_round(tiles * sizeof(uint8_t));
        use_tile_arrays(state->scratch[t], &arrays);
        if (processing) {
            cpu_processing_arrays *own = &state->scratch[t]->processing;
            own->logits = (float *)next;
            next += line_round((size_t)vocab * sizeof(float));
            own->counts = (uint32_t *)next;
            memset(own->counts, 0, (size_t)vocab * sizeof(uint32_t));
            next += line_round((size_t)vocab * sizeof(uint32_t));
        }
        if (rank_samples) {
            cpu_rank_arrays *ranks = &state->scratch[t]->ranks;
            ranks->keys = (uint64_t *)next;
            next += line_round((size_t)rank_samples * sizeof(uint64_t));
            ranks->sorted = (uint64_t *)next;
            next += line_round((size_t)rank_samples * sizeof(uint64_t));
            ranks->above = (int64_t *)next;
            next += line_round((size_t)rank_samples * sizeof(int64_t));
        }
    }
}

/* The running call's tile (and processing) arrays: the caller's workspace
 * (which core checked is large enough), or the context's own, grown if
 * needed. */
static psm_status prepare_tile_arrays(cpu_state *state, const psm_request *request)
{
    const int processing = psm_processing_active(&request->params);
    const int64_t rank_samples = needs_ranks(request) ? request->params.num_samples : 0;
    if (request->params.workspace) {
        carve_workspace(state, request->params.workspace, request->logits.vocab, processing,
                        rank_samples);
        return PSM_OK;
    }
    psm_status status = ensure_capacity(state, request->logits.vocab);
    if (status == PSM_OK && processing)
        status = ensure_processing_capacity(state, request->logits.vocab);
    if (status == PSM_OK && rank_samples)
        status = ensure_rank_capacity(state, rank_samples);
    if (status != PSM_OK)
        return status;
    for (int t = 0; t < state->threads; ++t) {
        use_tile_arrays(state->scratch[t], &state->scratch[t]->owned);
        state->scratch[t]->processing = state->scratch[t]->owned_processing;
        state->scratch[t]->ranks = state->scratch[t]->owned_ranks;
    }
    return PSM_OK;
}

/* psm_verify always runs on the context's own arrays (it takes no caller
 * workspace). */
psm_status cpu_prepare_verify(cpu_state *state, int64_t vocab)
{
    psm_status status = ensure_capacity(state, vocab);
    if (status != PSM_OK)
        return status;
    for (int t = 0; t < state->threads; ++t) {
        cpu_scratch *scratch = state->scratch[t];
        use_tile_arrays(scratch, &scratch->owned);
        if (scratch->owned_verify_vocab >= vocab)
            continue;
        free_verify_arrays(scratch);
        scratch->verify_target = psm_alloc((size_t)vocab * sizeof(uint64_t));
        scratch->verify_residual = psm_alloc((size_t)vocab * sizeof(uint64_t));
        scratch->verify_draft = psm_alloc((size_t)vocab * sizeof(uint64_t));
        if (!scratch->verify_target || !scratch->verify_residual || !scratch->verify_draft) {
            free_verify_arrays(scratch);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate verification workspace for vocab "
                                 "%lld",
                                 (long long)vocab);
        }
        scratch->owned_verify_vocab = vocab;
    }
    return PSM_OK;
}

/* ---- the backend table ----------------------------------------------------- */

static int cpu_probe(int *device_count, int *auto_device_count, char *reason,
                     size_t reason_size)
{
    *device_count = 1;
    *auto_device_count = 1;
    if (reason && reason_size > 0)
        snprintf(reason, reason_size, "CPU (%d threads available)", omp_get_max_threads());
    return 1;
}

static void cpu_destroy(void *opaque)
{
    cpu_state *state = opaque;
    if (!state)
        return;
    if (state->scratch) {
        for (int t = 0; t < state->threads; ++t)
            free_scratch(state->scratch[t]);
        psm_free(state->scratch);
    }
    psm_free(state);
}

static psm_status cpu_create(const psm_context_options *options, int device_index,
                             void **state_out, char *device_name, size_t device_name_size)
{
    if (device_index != 0)
        return psm_set_error(PSM_ERR_NO_DEVICE,
                             "cpu backend: device %d asked for, the CPU is device 0 only",
                             device_index);
    cpu_state *state = psm_alloc_zeroed(1, sizeof *state);
    if (!state)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cpu backend: cannot allocate its state");
    state->threads = options->cpu_threads > 0 ? options->cpu_threads : omp_get_max_threads();
    if (state->threads < 1)
        state->threads = 1;
    state->scratch = psm_alloc_zeroed((size_t)state->threads, sizeof *state->scratch);
    if (!state->scratch) {
        cpu_destroy(state);
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cpu backend: cannot allocate its state");
    }
    for (int t = 0; t < state->threads; ++t) {
        /* Cache-line aligned so that threads never share a line. */
        size_t size = (sizeof(cpu_scratch) + 63) / 64 * 64;
        state->scratch[t] = psm_alloc_aligned(64, size);
        if (!state->scratch[t]) {
            cpu_destroy(state);
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "cpu backend: cannot allocate per-thread workspace");
        }
        memset(state->scratch[t], 0, sizeof(cpu_scratch));
        state->scratch[t]->last_cutoff_bin = -1;
    }
    if (device_name && device_name_size > 0)
        snprintf(device_name, device_name_size, "CPU (%d thread%s)", state->threads,
                 state->threads == 1 ? "" : "s");
    *state_out = state;
    return PSM_OK;
}

static psm_status cpu_reserve(void *opaque, int64_t rows, int64_t vocab, int64_t num_samples)
{
    /* Only the vocab shapes the workspace: rows go one per thread at a time,
     * and outputs are the caller's. */
    (void)rows;
    (void)num_samples;
    return ensure_capacity(opaque, vocab);
}

/* Checking mode: finds the first bad row without writing anything. */
static psm_status check_rows(const cpu_state *state, psm_request *request)
{
    int64_t rows = request->rows;
    int64_t first_bad = rows;
    if (rows >= state->threads) {
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 8) reduction(min : first_bad)
        for (int64_t r = 0; r < rows; ++r)
            if (r < first_bad &&
                cpu_row_check_fails(state, request, r, state->scratch[omp_get_thread_num()], 0))
                first_bad = r;
    } else {
        for (int64_t r = 0; r < rows && first_bad == rows; ++r)
            if (cpu_row_check_fails(state, request, r, state->scratch[0], 1))
                first_bad = r;
    }
    if (first_bad == rows)
        return PSM_OK;
    request->first_bad_row = first_bad;
    psm_row_params params = cpu_resolve_params(request, first_bad);
    return psm_set_error(PSM_ERR_BAD_ROW,
                         params.valid ? "row %lld has a NaN or +inf logit, or no finite logit"
                                      : "row %lld has a sampling parameter or row index out "
                                        "of range",
                         (long long)first_bad);
}

static psm_status cpu_run(void *opaque, psm_request *request, int want_probs)
{
    cpu_state *state = opaque;
    psm_status status = prepare_tile_arrays(state, request);
    if (status != PSM_OK)
        return status;
    if (request->check_rows) {
        status = check_rows(state, request);
        if (status != PSM_OK)
            return status;
    }
    int64_t rows = request->rows;
    if (rows >= state->threads) {
        /* Threads take runs of consecutive rows, so that each knows its next
         * row and a filtered row can prefetch it; runs are short enough to
         * leave a few per thread for balance. */
        int64_t run = rows / ((int64_t)state->threads * 8);
        run = run < 1 ? 1 : run > CPU_ROW_RUN ? CPU_ROW_RUN : run;
        int64_t runs = (rows + run - 1) / run;
#pragma omp parallel for num_threads(state->threads) schedule(dynamic, 1)
        for (int64_t k = 0; k < runs; ++k) {
            int64_t end = (k + 1) * run < rows ? (k + 1) * run : rows;
            for (int64_t r = k * run; r < end; ++r)
                cpu_process_row(state, request, r, state->scratch[omp_get_thread_num()], 0,
                            want_probs, r + 1 < end ? r + 1 : -1);
        }
    } else {
        for (int64_t r = 0; r < rows; ++r)
            cpu_process_row(state, request, r, state->scratch[0], 1, want_probs, -1);
    }
    return PSM_OK;
}

static psm_status cpu_workspace_size(void *opaque, const psm_request *request, int probs_mode,
                                     size_t *bytes)
{
    (void)probs_mode; /* both write their outputs directly */
    *bytes = workspace_bytes(opaque, request);
    return PSM_OK;
}

static psm_status cpu_sample(void *state, psm_request *request)
{
    return cpu_run(state, request, 0);
}

static psm_status cpu_probs(void *state, psm_request *request)
{
    return cpu_run(state, request, 1);
}

static psm_status cpu_synchronize(void *state)
{
    (void)state; /* every call has finished when it returns */
    return PSM_OK;
}

const psm_backend_ops psm_cpu_ops = {
    .api_version = PSM_BACKEND_API_VERSION,
    .id = PSM_BACKEND_CPU,
    .features =
        PSM_FEATURE_LOGIT_PROCESSING | PSM_FEATURE_TOP_LOGPROBS | PSM_FEATURE_FILTER_ORDERS,
    .probe = cpu_probe,
    .create = cpu_create,
    .destroy = cpu_destroy,
    .reserve = cpu_reserve,
    .workspace_size = cpu_workspace_size,
    .sample = cpu_sample,
    .probs = cpu_probs,
    .synchronize = cpu_synchronize,
    .verify = cpu_verify,
    .shard_pass = cpu_shard_pass,
};
