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

/* A host array copied to the device (NULL stays NULL). */
static int device_copy(participant *who, const void *host, size_t bytes, void **buffer)
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
    BUFFER_COUNT
};

/* Samples a batch; tokens and logprobs (host) get output rows x num_samples. */
int check_run_batch(participant *who, const check_batch *batch, int32_t *tokens, float *logprobs)
{
    psm_tensor logits;
    psm_params params = batch->params;
    psm_output token_output, logprob_output;
    psm_status status;
    size_t rows = (size_t)check_output_rows(batch); /* the per-row arrays' entries */
    size_t outputs = rows * (size_t)params.num_samples;
    void *buffers[BUFFER_COUNT] = {NULL};
    int failed = 0, i;

    memset(&logits, 0, sizeof logits);
    logits.dtype = batch->dtype;
    logits.rows = batch->rows;
    logits.vocab = batch->vocab;
    logits.row_stride = batch->row_stride;
    if (!who->device) {
        logits.data = (void *)batch->logits;
        logits.memory = PSM_MEMORY_HOST;
        token_output.data = tokens;
        token_output.memory = PSM_MEMORY_HOST;
        logprob_output.data = logprobs;
        logprob_output.memory = PSM_MEMORY_HOST;
        status = psm_sample(who->context, &logits, &params, token_output, logprob_output);
        if (status == PSM_OK)
            status = psm_synchronize(who->context);
        if (status != PSM_OK) {
            cli_library_error("check", who->name, status);
            return -1;
        }
        return 0;
    }

    /* Device memory: the logits, the per-row arrays, the seed and offset
     * pointers, and the outputs. */
    failed |= device_copy(who, batch->logits,
                          (size_t)batch->rows * (size_t)batch->row_stride *
                              cli_dtype_size(batch->dtype),
                          &buffers[BUFFER_LOGITS]);
    failed |= device_copy(who, batch->params.temperature_per_row, rows * sizeof(float),
                          &buffers[BUFFER_TEMPERATURE]);
    failed |= device_copy(who, batch->params.top_k_per_row, rows * sizeof(int32_t),
                          &buffers[BUFFER_TOP_K]);
    failed |= device_copy(who, batch->params.top_p_per_row, rows * sizeof(float),
                          &buffers[BUFFER_TOP_P]);
    failed |= device_copy(who, batch->params.min_p_per_row, rows * sizeof(float),
                          &buffers[BUFFER_MIN_P]);
    failed |= device_copy(who, batch->params.seed_per_row, rows * sizeof(uint64_t),
                          &buffers[BUFFER_SEEDS]);
    failed |= device_copy(who, batch->params.offset_per_row, rows * sizeof(uint64_t),
                          &buffers[BUFFER_OFFSETS]);
    failed |= device_copy(who, batch->params.subsequence_per_row, rows * sizeof(uint32_t),
                          &buffers[BUFFER_SUBSEQUENCES]);
    failed |= device_copy(who, batch->params.row_indices, rows * sizeof(int64_t),
                          &buffers[BUFFER_ROW_INDICES]);
    failed |= device_copy(who, batch->params.seed_pointer, sizeof(uint64_t),
                          &buffers[BUFFER_SEED_POINTER]);
    failed |= device_copy(who, batch->params.offset_pointer, sizeof(uint64_t),
                          &buffers[BUFFER_OFFSET_POINTER]);
    failed |= who->device->allocate(who->session, outputs * sizeof(int32_t),
                                    &buffers[BUFFER_TOKENS]);
    failed |= who->device->allocate(who->session, outputs * sizeof(float),
                                    &buffers[BUFFER_LOGPROBS]);
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
        token_output.data = buffers[BUFFER_TOKENS];
        token_output.memory = PSM_MEMORY_DEVICE;
        logprob_output.data = buffers[BUFFER_LOGPROBS];
        logprob_output.memory = PSM_MEMORY_DEVICE;
        status = psm_sample(who->context, &logits, &params, token_output, logprob_output);
        if (status == PSM_OK)
            status = psm_synchronize(who->context);
        if (status != PSM_OK) {
            cli_library_error("check", who->name, status);
            failed = 1;
        } else if (who->device->download(who->session, tokens, buffers[BUFFER_TOKENS],
                                         outputs * sizeof(int32_t)) != 0 ||
                   who->device->download(who->session, logprobs, buffers[BUFFER_LOGPROBS],
                                         outputs * sizeof(float)) != 0) {
            cli_error("check", "%s: %s", who->name, who->device->last_error(who->session));
            failed = 1;
        }
    }
    for (i = 0; i < BUFFER_COUNT; ++i)
        who->device->release(who->session, buffers[i]);
    return failed ? -1 : 0;
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
    if (requested_count < 0) {
        requested_count = 0;
        /* Every device of every available backend (OpenCL on a GPU driver
         * and on PoCL, say), as far as the participant table holds them. */
        for (backend = PSM_BACKEND_CUDA; backend < PSM_BACKEND_COUNT; ++backend) {
            int devices = psm_backend_available(backend, NULL) ? psm_backend_device_count(backend)
                                                               : 0;
            for (int device = 0; device < devices; ++device) {
                if (requested_count == CHECK_MAX_PARTICIPANTS / 2 - 1) {
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
    }
    return 0;
}
