/* opencl_buffers.c: the OpenCL backend's buffers: the workspace (per-tile
 * and per-row state, grown as calls need it, or reserved), the staging
 * buffers of host inputs and outputs, and the checks of a caller's cl_mem. */
#include "alloc.h"
#include "error.h"
#include "opencl_backend.h"
#include "psm_contract.h"
#include "psm_opencl_request.h"

#include <CL/cl.h>

static void release_buffer(device_buffer *buffer)
{
    if (buffer->mem)
        clReleaseMemObject(buffer->mem);
    buffer->mem = NULL;
    buffer->bytes = 0;
}

/* Grows a workspace buffer. Work already queued keeps the old one alive
 * (OpenCL reference-counts buffers used by enqueued commands). */
psm_status opencl_ensure_buffer(opencl_state *state, device_buffer *buffer, size_t bytes,
                                const char *what)
{
    if (bytes == 0)
        bytes = 1;
    if (buffer->mem && buffer->bytes >= bytes)
        return PSM_OK;
    if ((cl_ulong)bytes > state->max_allocation)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                             "OpenCL: the %s workspace needs %zu bytes, more than the device's "
                             "largest allocation (%llu bytes)",
                             what, bytes, (unsigned long long)state->max_allocation);
    release_buffer(buffer);
    cl_int code = CL_SUCCESS;
    if (psm_fault_device_allocation())
        code = CL_MEM_OBJECT_ALLOCATION_FAILURE; /* test builds: an injected failure */
    else
        buffer->mem = clCreateBuffer(state->context, CL_MEM_READ_WRITE, bytes, NULL, &code);
    if (code != CL_SUCCESS) {
        buffer->mem = NULL;
        return psm_set_error(opencl_status_of(code),
                             "OpenCL: cannot allocate %zu bytes for the %s workspace: %s", bytes,
                             what, opencl_error_name(code));
    }
    buffer->bytes = bytes;
    return PSM_OK;
}

void opencl_release_workspace(opencl_state *state)
{
    device_buffer *buffers[] = {&state->tile_key,   &state->tile_info,
                                &state->tile_ref,   &state->tile_mass, &state->tile_prefix,
                                &state->lane_max,
                                &state->row_state,  &state->first_bad_row, &state->tokens,
                                &state->logprobs,   &state->probs,     &state->logits,
                                &state->per_row[0], &state->per_row[1], &state->per_row[2],
                                &state->per_row[3], &state->per_row[4]};
    for (size_t i = 0; i < sizeof buffers / sizeof buffers[0]; ++i)
        release_buffer(buffers[i]);
}

size_t opencl_tile_count(int64_t vocab)
{
    return (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
}

psm_status opencl_reserve_rows(opencl_state *state, int64_t rows, int64_t vocab)
{
    size_t slots = (size_t)rows * opencl_tile_count(vocab);
    PSM_TRY(opencl_ensure_buffer(state, &state->tile_key, slots * sizeof(cl_ulong), "tile"));
    PSM_TRY(opencl_ensure_buffer(state, &state->tile_info, slots * sizeof(cl_uint), "tile"));
    PSM_TRY(opencl_ensure_buffer(state, &state->tile_ref, slots * sizeof(cl_float), "tile"));
    PSM_TRY(opencl_ensure_buffer(state, &state->tile_mass, slots * sizeof(cl_ulong), "tile"));
    PSM_TRY(opencl_ensure_buffer(state, &state->tile_prefix, slots * sizeof(cl_ulong), "tile"));
    /* A lane per item of a tile's team: at most 32 (PSM_TEAM). */
    PSM_TRY(opencl_ensure_buffer(state, &state->lane_max, slots * 32 * sizeof(cl_uint), "lane"));
    return opencl_ensure_buffer(state, &state->row_state, (size_t)rows * PSM_ROW_STATE_BYTES,
                                "row state");
}

/* Everything a cl_mem psm_sample of this size needs, plus its staged
 * outputs (host outputs or checking mode). Host logits are staged on first
 * use instead: a caller with cl_mem logits should not pay for a copy. */
psm_status opencl_reserve(void *opaque, int64_t rows, int64_t vocab, int64_t num_samples)
{
    opencl_state *state = opaque;
    PSM_TRY(opencl_reserve_rows(state, rows, vocab));
    size_t outputs = (size_t)rows * (size_t)num_samples;
    PSM_TRY(opencl_ensure_buffer(state, &state->tokens, outputs * sizeof(cl_int), "token"));
    return opencl_ensure_buffer(state, &state->logprobs, outputs * sizeof(cl_float), "logprob");
}

/* A caller's cl_mem: of this context and large enough. */
psm_status opencl_check_device_buffer(opencl_state *state, void *pointer, size_t bytes,
                                      const char *what)
{
    cl_mem mem = (cl_mem)pointer;
    cl_context owner = NULL;
    size_t size = 0;
    cl_int code = clGetMemObjectInfo(mem, CL_MEM_CONTEXT, sizeof owner, &owner, NULL);
    if (code == CL_SUCCESS)
        code = clGetMemObjectInfo(mem, CL_MEM_SIZE, sizeof size, &size, NULL);
    if (code != CL_SUCCESS)
        return psm_set_error(PSM_ERR_WRONG_BACKEND,
                             "OpenCL: %s is not a cl_mem (clGetMemObjectInfo: %s)", what,
                             opencl_error_name(code));
    if (owner != state->context)
        return psm_set_error(PSM_ERR_WRONG_BACKEND,
                             "OpenCL: %s is a cl_mem of another cl_context", what);
    if (size < bytes)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "OpenCL: %s holds %zu bytes; the call needs %zu", what, size,
                             bytes);
    return PSM_OK;
}

/* Input data as a cl_mem: the caller's, or a staged copy of host memory. */
psm_status opencl_input_buffer(opencl_state *state, device_buffer *staging, void *data,
                               psm_memory memory, size_t bytes, const char *what, cl_mem *out)
{
    if (memory == PSM_MEMORY_DEVICE) {
        PSM_TRY(opencl_check_device_buffer(state, data, bytes, what));
        *out = (cl_mem)data;
        return PSM_OK;
    }
    PSM_TRY(opencl_ensure_buffer(state, staging, bytes, what));
    CL_TRY(clEnqueueWriteBuffer(state->queue, staging->mem, CL_TRUE, 0, bytes, data, 0, NULL,
                                NULL),
           "clEnqueueWriteBuffer");
    *out = staging->mem;
    return PSM_OK;
}

/* Moves a staged output to where the caller wants it. */
psm_status opencl_deliver(opencl_state *state, cl_mem staged, psm_output output, size_t bytes)
{
    if (output.memory == PSM_MEMORY_DEVICE) {
        CL_TRY(clEnqueueCopyBuffer(state->queue, staged, (cl_mem)output.data, 0, 0, bytes, 0,
                                   NULL, NULL),
               "clEnqueueCopyBuffer");
        if (state->queue_out_of_order)
            CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
                   "clEnqueueBarrierWithWaitList");
        return PSM_OK;
    }
    CL_TRY(clEnqueueReadBuffer(state->queue, staged, CL_TRUE, 0, bytes, output.data, 0, NULL,
                               NULL),
           "clEnqueueReadBuffer");
    return PSM_OK;
}

/* The cl_mem a kernel writes an output to: the caller's own when it is a
 * cl_mem and nothing has to be checked first, else a staging buffer. */
psm_status opencl_output_target(opencl_state *state, psm_output output, device_buffer *staging,
                                size_t bytes, int check_rows, const char *what, cl_mem *target,
                                int *staged)
{
    if (output.memory == PSM_MEMORY_DEVICE)
        PSM_TRY(opencl_check_device_buffer(state, output.data, bytes, what));
    if (output.memory == PSM_MEMORY_DEVICE && !check_rows) {
        *target = (cl_mem)output.data;
        *staged = 0;
        return PSM_OK;
    }
    PSM_TRY(opencl_ensure_buffer(state, staging, bytes, what));
    *target = staging->mem;
    *staged = 1;
    return PSM_OK;
}

