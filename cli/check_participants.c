/* check_participants.c: the backends `polysample check` compares: opening
 * them (host or device memory, bench_device.h) and running one batch on
 * one of them. */
#include "check.h"
#include "cli_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int check_open_participant(participant *opened, const char *name, psm_backend backend,
                           int device_index, int threads, int device_memory)
{
    psm_context_options options;
    psm_status status;
    char error[256];
    memset(opened, 0, sizeof *opened);
    snprintf(opened->name, sizeof opened->name, "%s", name);
    opened->backend = backend;
    cli_context_options_init(&options);
    options.backend = backend;
    options.device_index = device_index;
    options.cpu_threads = threads;
    if (device_memory) {
        opened->device = bench_device_find(backend);
        if (opened->device->open(device_index, &opened->session, error, sizeof error) != 0) {
            cli_error("check", "%s: %s", name, error);
            return -1;
        }
        options.native_stream = opened->device->native_stream(opened->session);
    }
    status = psm_context_create(&options, &opened->context);
    if (status != PSM_OK) {
        cli_library_error("check", name, status);
        if (opened->device)
            opened->device->close(opened->session);
        return -1;
    }
    return 0;
}

void check_close_participant(participant *closing)
{
    psm_context_destroy(closing->context);
    if (closing->device)
        closing->device->close(closing->session);
}

int check_device_copy(participant *who, const void *host, size_t bytes, void **buffer)
{
    *buffer = NULL;
    if (!host)
        return 0;
    if (who->device->allocate(who->session, bytes, buffer) != 0)
        return -1;
    return who->device->upload(who->session, *buffer, host, bytes);
}

int64_t check_output_rows(const check_batch *batch)
{
    return batch->params.row_indices ? batch->params.output_rows : batch->rows;
}

int check_alloc_outputs(check_outputs *outputs, int64_t rows, int32_t samples, int32_t top_count)
{
    size_t drawn = (size_t)rows * (size_t)samples, listed = (size_t)rows * (size_t)top_count;
    memset(outputs, 0, sizeof *outputs);
    outputs->tokens = malloc(drawn * sizeof(int32_t));
    outputs->logprobs = malloc(drawn * sizeof(float));
    if (!outputs->tokens || !outputs->logprobs)
        return -1;
    if (top_count > 0) {
        outputs->top_tokens = malloc(listed * sizeof(int32_t));
        outputs->top_logprobs = malloc(listed * sizeof(float));
        outputs->ranks = malloc(drawn * sizeof(int32_t));
        if (!outputs->top_tokens || !outputs->top_logprobs || !outputs->ranks)
            return -1;
    }
    return 0;
}

void check_free_outputs(check_outputs *outputs)
{
    free(outputs->tokens);
    free(outputs->logprobs);
    free(outputs->top_tokens);
    free(outputs->top_logprobs);
    free(outputs->ranks);
    memset(outputs, 0, sizeof *outputs);
}

/* The device buffers of one batch, in the order check_run_batch fills them. */
enum batch_buffer {
    BUFFER_LOGITS,
    BUFFER_TEMPERATURE,
    BUFFER_TOP_K,
    BUFFER_TOP_P,
    BUFFER_MIN_P,
    BUFFER_SEEDS,
    BUFFER_OFFSETS,
    BUFFER_SUBSEQUENCES,
    BUFFER_ROW_INDICES,
    BUFFER_SEED_POINTER,
    BUFFER_OFFSET_POINTER,
    BUFFER_TOKENS,
    BUFFER_LOGPROBS,
    BUFFER_MASK,
    BUFFER_BIAS_OFFSETS,
    BUFFER_BIAS_TOKENS,
    BUFFER_BIAS_VALUES,
    BUFFER_HISTORY_OFFSETS,
    BUFFER_HISTORY_TOKENS,
    BUFFER_PROMPT_OFFSETS,
    BUFFER_PROMPT_TOKENS,
    BUFFER_REPETITION,
    BUFFER_FREQUENCY,
    BUFFER_PRESENCE,
    BUFFER_TOP_TOKENS,
    BUFFER_TOP_LOGPROBS,
    BUFFER_RANKS,
    BUFFER_COUNT
};

/* A list's entries as the rows' offsets reach them (at least one, so that
 * an empty list still has a buffer). */
static size_t list_entries(const int64_t *offsets, size_t rows)
{
    return offsets && offsets[rows] > 0 ? (size_t)offsets[rows] : 1;
}

/* The processing arrays copied to the device, into *device (whose arrays
 * then name device buffers). 0, or -1. */
static int device_processing(participant *who, const psm_logit_processing *host, size_t rows,
                             int64_t vocab, void **buffers, psm_logit_processing *device)
{
    size_t words = (size_t)(host->allowed_mask_words ? host->allowed_mask_words
                                                     : (vocab + 31) / 32);
    size_t bias = list_entries(host->bias_offsets, rows);
    size_t history = list_entries(host->history_offsets, rows);
    size_t prompt = list_entries(host->prompt_offsets, rows);
    int failed = 0;
    *device = *host;
    failed |= check_device_copy(who, host->allowed_mask, rows * words * sizeof(uint32_t),
                          &buffers[BUFFER_MASK]);
    failed |= check_device_copy(who, host->bias_offsets, (rows + 1) * sizeof(int64_t),
                          &buffers[BUFFER_BIAS_OFFSETS]);
    failed |= check_device_copy(who, host->bias_tokens, bias * sizeof(int32_t),
                          &buffers[BUFFER_BIAS_TOKENS]);
    failed |= check_device_copy(who, host->bias_values, bias * sizeof(float),
                          &buffers[BUFFER_BIAS_VALUES]);
    failed |= check_device_copy(who, host->history_offsets, (rows + 1) * sizeof(int64_t),
                          &buffers[BUFFER_HISTORY_OFFSETS]);
    failed |= check_device_copy(who, host->history_tokens, history * sizeof(int32_t),
                          &buffers[BUFFER_HISTORY_TOKENS]);
    failed |= check_device_copy(who, host->prompt_offsets, (rows + 1) * sizeof(int64_t),
                          &buffers[BUFFER_PROMPT_OFFSETS]);
    failed |= check_device_copy(who, host->prompt_tokens, prompt * sizeof(int32_t),
                          &buffers[BUFFER_PROMPT_TOKENS]);
    failed |= check_device_copy(who, host->repetition_penalty_per_row, rows * sizeof(float),
                          &buffers[BUFFER_REPETITION]);
    failed |= check_device_copy(who, host->frequency_penalty_per_row, rows * sizeof(float),
                          &buffers[BUFFER_FREQUENCY]);
    failed |= check_device_copy(who, host->presence_penalty_per_row, rows * sizeof(float),
                          &buffers[BUFFER_PRESENCE]);
    device->allowed_mask = buffers[BUFFER_MASK];
    device->bias_offsets = buffers[BUFFER_BIAS_OFFSETS];
    device->bias_tokens = buffers[BUFFER_BIAS_TOKENS];
    device->bias_values = buffers[BUFFER_BIAS_VALUES];
    device->history_offsets = buffers[BUFFER_HISTORY_OFFSETS];
    device->history_tokens = buffers[BUFFER_HISTORY_TOKENS];
    device->prompt_offsets = buffers[BUFFER_PROMPT_OFFSETS];
    device->prompt_tokens = buffers[BUFFER_PROMPT_TOKENS];
    device->repetition_penalty_per_row = buffers[BUFFER_REPETITION];
    device->frequency_penalty_per_row = buffers[BUFFER_FREQUENCY];
    device->presence_penalty_per_row = buffers[BUFFER_PRESENCE];
    return failed ? -1 : 0;
}

/* The call's outcome: 0, CHECK_REFUSED (a feature the backend lacks: logit
 * processing, top-N logprobs, a filter order), or -1 after a message. */
static int call_outcome(participant *who, const check_batch *batch, psm_status status)
{
    if (status == PSM_OK)
        status = psm_synchronize(who->context);
    if (status == PSM_ERR_UNSUPPORTED &&
        (batch->processing || batch->top_count > 0 || batch->params.filter_order != 0)) {
        snprintf(who->refusal, sizeof who->refusal, "%s", psm_last_error());
        return CHECK_REFUSED;
    }
    if (status != PSM_OK) {
        cli_library_error("check", who->name, status);
        return -1;
    }
    return 0;
}

/* The batch split by vocabulary into who->shards shards (cut inside tiles,
 * shard indices in reverse column order), every rank's call run in turn and
 * each round's all-gather made by copying; rank 0's outputs are written to
 * the caller's, and every other rank's must equal them. */
static psm_status run_sharded(participant *who, const check_batch *batch, const psm_params *params,
                              psm_output tokens, psm_output logprobs)
{
    enum { MOST = 8 };
    const int shards = (int)(batch->vocab < who->shards ? batch->vocab : who->shards);
    const size_t drawn = (size_t)check_output_rows(batch) * (size_t)params->num_samples;
    const size_t element = cli_dtype_size(batch->dtype);
    psm_sharded *calls[MOST] = {NULL};
    int32_t *rank_tokens[MOST] = {NULL};
    float *rank_logprobs[MOST] = {NULL};
    unsigned char *gathered = NULL;
    size_t gathered_bytes = 0;
    psm_status status = PSM_OK;
    /* Cuts 7 tokens past the even ones (inside a tile) when the shards are
     * long enough that they stay in order. */
    const int64_t nudge = batch->vocab / shards > 14 ? 7 : 0;
    for (int k = 0; k < shards && status == PSM_OK; ++k) {
        const int64_t first = k == 0 ? 0 : batch->vocab * k / shards + nudge;
        const int64_t next = k + 1 == shards ? batch->vocab : batch->vocab * (k + 1) / shards + nudge;
        const int rank = shards - 1 - k;
        psm_tensor shard_logits = {(char *)batch->logits + (size_t)first * element, batch->dtype,
                                   PSM_MEMORY_HOST, batch->rows, next - first, batch->row_stride};
        const psm_shard shard = {first, batch->vocab, rank, shards};
        rank_tokens[rank] = rank == 0 ? tokens.data : malloc(drawn * sizeof(int32_t));
        rank_logprobs[rank] = rank == 0 ? logprobs.data : malloc(drawn * sizeof(float));
        if (!rank_tokens[rank] || !rank_logprobs[rank]) {
            status = PSM_ERR_OUT_OF_MEMORY;
            break;
        }
        status = psm_sharded_begin(who->context, &shard_logits, &shard, params,
                                   (psm_output){rank_tokens[rank], PSM_MEMORY_HOST},
                                   (psm_output){rank_logprobs[rank], PSM_MEMORY_HOST},
                                   &calls[rank]);
    }
    for (int round = 0; status == PSM_OK; ++round) {
        const void *send[MOST];
        size_t bytes[MOST];
        for (int rank = 0; rank < shards && status == PSM_OK; ++rank)
            status = psm_sharded_next(calls[rank], round ? gathered : NULL, gathered_bytes,
                                      &send[rank], &bytes[rank]);
        if (status != PSM_OK || bytes[0] == 0)
            break;
        free(gathered);
        gathered_bytes = (size_t)shards * bytes[0];
        gathered = malloc(gathered_bytes);
        if (!gathered) {
            status = PSM_ERR_OUT_OF_MEMORY;
            break;
        }
        for (int rank = 0; rank < shards; ++rank)
            memcpy(gathered + (size_t)rank * bytes[0], send[rank], bytes[0]);
    }
    for (int rank = 1; rank < shards && status == PSM_OK; ++rank)
        if (memcmp(rank_tokens[rank], rank_tokens[0], drawn * sizeof(int32_t)) != 0 ||
            memcmp(rank_logprobs[rank], rank_logprobs[0], drawn * sizeof(float)) != 0) {
            cli_error("check", "%s: rank %d's outputs differ from rank 0's", who->name, rank);
            status = PSM_ERR_INTERNAL;
        }
    for (int rank = 0; rank < shards; ++rank) {
        psm_sharded_end(calls[rank]);
        if (rank > 0) {
            free(rank_tokens[rank]);
            free(rank_logprobs[rank]);
        }
    }
    free(gathered);
    return status;
}

int check_run_batch(participant *who, const check_batch *batch, const check_outputs *outputs)
{
    psm_tensor logits;
    psm_params params = batch->params;
    psm_logit_processing device_lists;
    psm_top_logprobs top;
    psm_output token_output, logprob_output;
    size_t rows = (size_t)check_output_rows(batch); /* the per-row arrays' entries */
    size_t drawn = rows * (size_t)params.num_samples;
    size_t listed = rows * (size_t)batch->top_count;
    void *buffers[BUFFER_COUNT] = {NULL};
    int failed = 0, outcome = -1, i;

    memset(&logits, 0, sizeof logits);
    logits.dtype = batch->dtype;
    logits.rows = batch->rows;
    logits.vocab = batch->vocab;
    logits.row_stride = batch->row_stride;
    memset(&top, 0, sizeof top);
    top.count = batch->top_count;
    top.mode = batch->top_mode;
    params.processing = batch->processing;
    params.top_logprobs = batch->top_count > 0 ? &top : NULL;
    if (!who->device) {
        logits.data = (void *)batch->logits;
        logits.memory = PSM_MEMORY_HOST;
        token_output = (psm_output){outputs->tokens, PSM_MEMORY_HOST};
        logprob_output = (psm_output){outputs->logprobs, PSM_MEMORY_HOST};
        top.tokens = (psm_output){outputs->top_tokens, PSM_MEMORY_HOST};
        top.logprobs = (psm_output){outputs->top_logprobs, PSM_MEMORY_HOST};
        top.sampled_ranks = (psm_output){outputs->ranks, PSM_MEMORY_HOST};
        if (who->shards > 0)
            return call_outcome(who, batch,
                                run_sharded(who, batch, &params, token_output, logprob_output));
        return call_outcome(who, batch,
                            psm_sample(who->context, &logits, &params, token_output,
                                       logprob_output));
    }

    /* Device memory: the logits, the per-row arrays, the seed and offset
     * pointers, the processing arrays, and the outputs. */
    failed |= check_device_copy(who, batch->logits,
                          (size_t)batch->rows * (size_t)batch->row_stride *
                              cli_dtype_size(batch->dtype),
                          &buffers[BUFFER_LOGITS]);
    failed |= check_device_copy(who, batch->params.temperature_per_row, rows * sizeof(float),
                          &buffers[BUFFER_TEMPERATURE]);
    failed |= check_device_copy(who, batch->params.top_k_per_row, rows * sizeof(int32_t),
                          &buffers[BUFFER_TOP_K]);
    failed |= check_device_copy(who, batch->params.top_p_per_row, rows * sizeof(float),
                          &buffers[BUFFER_TOP_P]);
    failed |= check_device_copy(who, batch->params.min_p_per_row, rows * sizeof(float),
                          &buffers[BUFFER_MIN_P]);
    failed |= check_device_copy(who, batch->params.seed_per_row, rows * sizeof(uint64_t),
                          &buffers[BUFFER_SEEDS]);
    failed |= check_device_copy(who, batch->params.offset_per_row, rows * sizeof(uint64_t),
                          &buffers[BUFFER_OFFSETS]);
    failed |= check_device_copy(who, batch->params.subsequence_per_row, rows * sizeof(uint32_t),
                          &buffers[BUFFER_SUBSEQUENCES]);
    failed |= check_device_copy(who, batch->params.row_indices, rows * sizeof(int64_t),
                          &buffers[BUFFER_ROW_INDICES]);
    failed |= check_device_copy(who, batch->params.seed_pointer, sizeof(uint64_t),
                          &buffers[BUFFER_SEED_POINTER]);
    failed |= check_device_copy(who, batch->params.offset_pointer, sizeof(uint64_t),
                          &buffers[BUFFER_OFFSET_POINTER]);
    failed |= who->device->allocate(who->session, drawn * sizeof(int32_t),
                                    &buffers[BUFFER_TOKENS]);
    failed |= who->device->allocate(who->session, drawn * sizeof(float),
                                    &buffers[BUFFER_LOGPROBS]);
    if (batch->processing) {
        failed |= device_processing(who, batch->processing, rows, batch->vocab, buffers,
                                    &device_lists);
        params.processing = &device_lists;
    }
    if (batch->top_count > 0) {
        failed |= who->device->allocate(who->session, listed * sizeof(int32_t),
                                        &buffers[BUFFER_TOP_TOKENS]);
        failed |= who->device->allocate(who->session, listed * sizeof(float),
                                        &buffers[BUFFER_TOP_LOGPROBS]);
        failed |= who->device->allocate(who->session, drawn * sizeof(int32_t),
                                        &buffers[BUFFER_RANKS]);
    }
    if (failed) {
        cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
    } else {
        logits.data = buffers[BUFFER_LOGITS];
        logits.memory = PSM_MEMORY_DEVICE;
        params.temperature_per_row = buffers[BUFFER_TEMPERATURE];
        params.top_k_per_row = buffers[BUFFER_TOP_K];
        params.top_p_per_row = buffers[BUFFER_TOP_P];
        params.min_p_per_row = buffers[BUFFER_MIN_P];
        params.seed_per_row = buffers[BUFFER_SEEDS];
        params.offset_per_row = buffers[BUFFER_OFFSETS];
        params.subsequence_per_row = buffers[BUFFER_SUBSEQUENCES];
        params.row_indices = buffers[BUFFER_ROW_INDICES];
        params.seed_pointer = buffers[BUFFER_SEED_POINTER];
        params.offset_pointer = buffers[BUFFER_OFFSET_POINTER];
        token_output = (psm_output){buffers[BUFFER_TOKENS], PSM_MEMORY_DEVICE};
        logprob_output = (psm_output){buffers[BUFFER_LOGPROBS], PSM_MEMORY_DEVICE};
        top.tokens = (psm_output){buffers[BUFFER_TOP_TOKENS], PSM_MEMORY_DEVICE};
        top.logprobs = (psm_output){buffers[BUFFER_TOP_LOGPROBS], PSM_MEMORY_DEVICE};
        top.sampled_ranks = (psm_output){buffers[BUFFER_RANKS], PSM_MEMORY_DEVICE};
        outcome = call_outcome(who, batch,
                               psm_sample(who->context, &logits, &params, token_output,
                                          logprob_output));
        if (outcome == 0 &&
            (who->device->download(who->session, outputs->tokens, buffers[BUFFER_TOKENS],
                                   drawn * sizeof(int32_t)) != 0 ||
             who->device->download(who->session, outputs->logprobs, buffers[BUFFER_LOGPROBS],
                                   drawn * sizeof(float)) != 0 ||
             (batch->top_count > 0 &&
              (who->device->download(who->session, outputs->top_tokens,
                                     buffers[BUFFER_TOP_TOKENS], listed * sizeof(int32_t)) != 0 ||
               who->device->download(who->session, outputs->top_logprobs,
                                     buffers[BUFFER_TOP_LOGPROBS], listed * sizeof(float)) != 0 ||
               who->device->download(who->session, outputs->ranks, buffers[BUFFER_RANKS],
                                     drawn * sizeof(int32_t)) != 0)))) {
            cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
            outcome = -1;
        }
    }
    for (i = 0; i < BUFFER_COUNT; ++i)
        who->device->release(who->session, buffers[i]);
    return outcome;
}


int check_open_participants(check_state *state, const psm_backend *requested,
                            const int *requested_devices, int requested_count)
{
    psm_backend every[CHECK_MAX_PARTICIPANTS];
    int every_device[CHECK_MAX_PARTICIPANTS];
    psm_backend backend;
    int q;
    if (check_open_participant(&state->participants[0], "cpu/1-thread", PSM_BACKEND_CPU, -1, 1,
                               0) != 0)
        return -1;
    state->participant_count = 1;
    if (check_open_participant(&state->participants[1], "cpu/2-threads", PSM_BACKEND_CPU, -1, 2,
                               0) != 0)
        return -1;
    state->participant_count = 2;
    /* The batch split by vocabulary (psm_sharded_*), against the unsplit calls. */
    if (check_open_participant(&state->participants[2], "cpu/sharded-3", PSM_BACKEND_CPU, -1, 1,
                               0) != 0)
        return -1;
    state->participants[2].shards = 3;
    state->participant_count = 3;
    if (requested_count < 0) {
        requested_count = 0;
        /* Every device of every available backend (OpenCL on a GPU driver
         * and on PoCL, say), as far as the participant table holds them. */
        for (backend = PSM_BACKEND_CUDA; backend < PSM_BACKEND_COUNT; ++backend) {
            int devices = psm_backend_available(backend, NULL) ? psm_backend_device_count(backend)
                                                               : 0;
            for (int device = 0; device < devices; ++device) {
                /* Up to three participants a device, after the CPU's three. */
                if (requested_count == (CHECK_MAX_PARTICIPANTS - 3) / 3) {
                    fprintf(stderr, "polysample check: more devices than it compares at once; "
                                    "name them with --backend\n");
                    break;
                }
                every[requested_count] = backend;
                every_device[requested_count++] = devices > 1 ? device : -1;
            }
        }
        requested = every;
        requested_devices = every_device;
    }
    for (q = 0; q < requested_count; ++q) {
        char name[48];
        backend = requested[q];
        if (backend == PSM_BACKEND_AUTO) {
            participant probe;
            if (check_open_participant(&probe, "auto", PSM_BACKEND_AUTO, -1, 0, 0) != 0)
                return -1;
            backend = psm_context_backend(probe.context);
            check_close_participant(&probe);
        }
        if (backend == PSM_BACKEND_CPU)
            continue; /* already here, at 1 and 2 threads */
        if (requested_devices[q] >= 0)
            snprintf(name, sizeof name, "%s:%d", psm_backend_name(backend), requested_devices[q]);
        else
            snprintf(name, sizeof name, "%s", psm_backend_name(backend));
        if (check_open_participant(&state->participants[state->participant_count], name, backend,
                                   requested_devices[q], 0, 0) != 0)
            return -1;
        state->participant_count++;
        if (bench_device_find(backend)) {
            size_t length = strlen(name);
            snprintf(name + length, sizeof name - length, "/device-memory");
            if (check_open_participant(&state->participants[state->participant_count], name,
                                       backend, requested_devices[q], 0, 1) != 0)
                return -1;
            state->participant_count++;
        }
        /* The device's sharded call (host logits, split as the CPU's). */
        if (requested_devices[q] >= 0)
            snprintf(name, sizeof name, "%s:%d/sharded-3", psm_backend_name(backend),
                     requested_devices[q]);
        else
            snprintf(name, sizeof name, "%s/sharded-3", psm_backend_name(backend));
        if (state->participant_count == CHECK_MAX_PARTICIPANTS)
            return 0;
        if (check_open_participant(&state->participants[state->participant_count], name, backend,
                                   requested_devices[q], 0, 0) != 0)
            return -1;
        state->participants[state->participant_count++].shards = 3;
    }
    return 0;
}
