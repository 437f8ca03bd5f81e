/* opencl_buffers.c: the OpenCL backend's buffers: what a call needs
 * (per-tile and per-row state, stagings of host inputs and of outputs),
 * taken from the context's own buffers (grown as calls need them, or
 * reserved) or carved from a caller's workspace, and the checks of a
 * caller's cl_mem. */
#include "alloc.h"
#include "error.h"
#include "opencl_backend.h"
#include "psm_contract.h"
#include "psm_opencl_request.h"

#include <CL/cl.h>

#include <stdint.h>
#include <string.h>

static void release_buffer(device_buffer *buffer)
{
    if (buffer->mem)
        clReleaseMemObject(buffer->mem);
    buffer->mem = NULL;
    buffer->bytes = 0;
}

/* Grows a context buffer. Work already queued keeps the old one alive
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
    for (int part = 0; part < PART_COUNT; ++part)
        release_buffer(&state->own[part]);
    for (int slot = 0; slot < OPENCL_VERIFY_BUFFERS; ++slot)
        release_buffer(&state->verify_own[slot]);
    for (int slot = 0; slot < OPENCL_SHARD_BUFFERS; ++slot)
        release_buffer(&state->shard_own[slot]);
    release_buffer(&state->first_bad_row);
}

size_t opencl_tile_count(int64_t vocab)
{
    return (size_t)((vocab + PSM_TILE - 1) / PSM_TILE);
}

/* What a failure to allocate a part names. */
static const char *part_name(int part)
{
    if (part >= PART_ROW_ARRAY && part < PART_ROW_ARRAY + OPENCL_ROW_ARRAYS)
        return opencl_row_array_names[part - PART_ROW_ARRAY];
    if (part >= PART_PROCESSING_ARRAY && part < PART_PROCESSING_ARRAY + OPENCL_PROCESSING_ARRAYS)
        return opencl_processing_array_names[part - PART_PROCESSING_ARRAY];
    switch (part) {
    case PART_PROCESSED: return "processed logits";
    case PART_COUNTS: return "token count";
    case PART_LISTED: return "listed-token bit";
    case PART_LANE_MAX: return "lane";
    case PART_ROW_STATE: return "row state";
    case PART_LOGITS: return "logits";
    case PART_TOKENS: return "token";
    case PART_LOGPROBS: return "logprob";
    case PART_PROBS: return "probs";
    case PART_TOP_KEY: return "top-N tile key";
    case PART_TOP_TOKENS: return "top-N token";
    case PART_TOP_LOGPROBS: return "top-N logprob";
    case PART_TOP_RANKS: return "drawn tokens' rank";
    default: return "tile";
    }
}

/* The per-tile and per-row parts of a call of rows x vocab. Core bounds
 * rows x vocab by 2^60, so these products fit. */
static void plan_rows(call_plan *plan, int64_t rows, int64_t vocab)
{
    const size_t slots = (size_t)rows * opencl_tile_count(vocab);
    plan->bytes[PART_TILE_KEY] = slots * sizeof(cl_ulong);
    plan->bytes[PART_TILE_INFO] = slots * sizeof(cl_uint);
    plan->bytes[PART_TILE_REF] = slots * sizeof(cl_float);
    plan->bytes[PART_TILE_MASS] = slots * sizeof(cl_ulong);
    plan->bytes[PART_TILE_PREFIX] = slots * sizeof(cl_ulong);
    /* A lane per item of a tile's team: at most 32 (PSM_TEAM). */
    plan->bytes[PART_LANE_MAX] = slots * 32 * sizeof(cl_uint);
    plan->bytes[PART_ROW_STATE] = (size_t)rows * PSM_ROW_STATE_BYTES;
}

const char *const opencl_row_array_names[OPENCL_ROW_ARRAYS] = {
    "temperature_per_row", "top_k_per_row",       "top_p_per_row", "min_p_per_row",
    "seed_per_row",        "offset_per_row",      "subsequence_per_row",
    "row_indices",         "seed_pointer",        "offset_pointer"};

void opencl_row_arrays(const psm_request *request, const void *arrays[OPENCL_ROW_ARRAYS],
                       size_t bytes[OPENCL_ROW_ARRAYS])
{
    const psm_row_arrays given = psm_request_row_arrays(&request->params);
    const void *const in_order[OPENCL_ROW_ARRAYS] = {
        given.temperature, given.top_k,       given.top_p,      given.min_p,
        given.seed,        given.offset,      given.subsequence, given.logits_row,
        given.seed_pointer, given.offset_pointer};
    static const size_t element[OPENCL_ROW_ARRAYS] = {4, 4, 4, 4, 8, 8, 4, 8, 8, 8};
    const size_t rows = (size_t)request->rows;
    for (int i = 0; i < OPENCL_ROW_ARRAYS; ++i) {
        /* The last two, seed_pointer and offset_pointer, hold one value. */
        const size_t count = i >= OPENCL_ROW_ARRAYS - 2 ? 1 : rows;
        arrays[i] = in_order[i];
        bytes[i] = element[i] * count;
    }
}

const char *const opencl_processing_array_names[OPENCL_PROCESSING_ARRAYS] = {
    "history_offsets", "history_tokens",   "prompt_offsets",
    "prompt_tokens",   "bias_offsets",     "bias_tokens",
    "bias_values",     "repetition_penalty_per_row", "frequency_penalty_per_row",
    "presence_penalty_per_row", "allowed_mask"};

/* Entries of a host list: its offsets' last entry, which core validates
 * before a call but not before a size query. */
static psm_status host_list_entries(const int64_t *offsets, int64_t rows, const char *what,
                                    size_t element, size_t *bytes)
{
    *bytes = 0;
    if (!offsets)
        return PSM_OK;
    const int64_t entries = offsets[rows];
    if (entries < 0)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "processing: %s_offsets[%lld] is %lld; expected >= 0", what,
                             (long long)rows, (long long)entries);
    if ((uint64_t)entries > SIZE_MAX / element)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                             "OpenCL: %lld %s entries are beyond any device's memory",
                             (long long)entries, what);
    *bytes = (size_t)entries * element;
    return PSM_OK;
}

psm_status opencl_processing_arrays(const psm_request *request,
                                    const void *arrays[OPENCL_PROCESSING_ARRAYS],
                                    size_t bytes[OPENCL_PROCESSING_ARRAYS])
{
    const psm_logit_processing *p = request->params.processing;
    const size_t rows = (size_t)request->rows;
    const size_t words = (size_t)(p->allowed_mask_words ? p->allowed_mask_words
                                                        : (request->logits.vocab + 31) / 32);
    const void *const in_order[OPENCL_PROCESSING_ARRAYS] = {
        p->history_offsets, p->history_tokens, p->prompt_offsets,
        p->prompt_tokens,   p->bias_offsets,   p->bias_tokens,
        p->bias_values,     p->repetition_penalty_per_row, p->frequency_penalty_per_row,
        p->presence_penalty_per_row, p->allowed_mask};
    for (int i = 0; i < OPENCL_PROCESSING_ARRAYS; ++i)
        arrays[i] = in_order[i];
    bytes[PROCESSING_HISTORY_OFFSETS] = bytes[PROCESSING_PROMPT_OFFSETS] =
        bytes[PROCESSING_BIAS_OFFSETS] = (rows + 1) * sizeof(cl_long);
    bytes[PROCESSING_REPETITION] = bytes[PROCESSING_FREQUENCY] = bytes[PROCESSING_PRESENCE] =
        rows * sizeof(cl_float);
    /* Core bounds rows x allowed_mask_words by 2^63 / 8. */
    bytes[PROCESSING_MASK] = rows * words * sizeof(cl_uint);
    bytes[PROCESSING_HISTORY_TOKENS] = bytes[PROCESSING_PROMPT_TOKENS] =
        bytes[PROCESSING_BIAS_TOKENS] = bytes[PROCESSING_BIAS_VALUES] = 0;
    if (request->logits.memory != PSM_MEMORY_HOST)
        return PSM_OK;
    PSM_TRY(host_list_entries(p->history_offsets, request->rows, "history", sizeof(cl_int),
                              &bytes[PROCESSING_HISTORY_TOKENS]));
    PSM_TRY(host_list_entries(p->prompt_offsets, request->rows, "prompt", sizeof(cl_int),
                              &bytes[PROCESSING_PROMPT_TOKENS]));
    PSM_TRY(host_list_entries(p->bias_offsets, request->rows, "bias", sizeof(cl_int),
                              &bytes[PROCESSING_BIAS_TOKENS]));
    bytes[PROCESSING_BIAS_VALUES] = bytes[PROCESSING_BIAS_TOKENS]; /* 4-byte floats */
    return PSM_OK;
}

int opencl_processing_on_read(const psm_request *request, int probs_mode)
{
    return !probs_mode && psm_processing_on_read_possible(request);
}

psm_status opencl_plan_call(const psm_request *request, int probs_mode, call_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    const psm_tensor *logits = &request->logits;
    const size_t rows = (size_t)request->rows;
    const size_t vocab = (size_t)logits->vocab;
    plan_rows(plan, request->rows, logits->vocab);
    if (logits->memory == PSM_MEMORY_HOST) {
        const size_t element = logits->dtype == PSM_DTYPE_F32 ? 4 : 2;
        plan->bytes[PART_LOGITS] =
            ((size_t)(logits->rows - 1) * (size_t)logits->row_stride + vocab) * element;
        const void *arrays[OPENCL_ROW_ARRAYS];
        size_t bytes[OPENCL_ROW_ARRAYS];
        opencl_row_arrays(request, arrays, bytes);
        for (int i = 0; i < OPENCL_ROW_ARRAYS; ++i)
            plan->bytes[PART_ROW_ARRAY + i] = arrays[i] ? bytes[i] : 0;
    }
    if (psm_processing_active(&request->params)) {
        /* Core bounds rows x vocab by 2^60, so these fit. Processed rows, or
         * where the processing is applied as the rows are read, with lists
         * only: the overlay rows and their listed bits. */
        const int lists = psm_processing_has_lists(&request->params);
        const int on_read = opencl_processing_on_read(request, probs_mode);
        if (!on_read || lists)
            plan->bytes[PART_PROCESSED] = rows * vocab * sizeof(cl_float);
        if (on_read && lists)
            plan->bytes[PART_LISTED] = rows * (size_t)psm_listed_words((psm_i64)vocab) *
                                       sizeof(cl_uint);
        if (lists)
            plan->bytes[PART_COUNTS] = rows * vocab * sizeof(cl_uint);
        if (logits->memory == PSM_MEMORY_HOST) {
            const void *arrays[OPENCL_PROCESSING_ARRAYS];
            size_t bytes[OPENCL_PROCESSING_ARRAYS];
            PSM_TRY(opencl_processing_arrays(request, arrays, bytes));
            /* An empty list has no part: its kernel argument is NULL. */
            for (int i = 0; i < OPENCL_PROCESSING_ARRAYS; ++i)
                plan->bytes[PART_PROCESSING_ARRAY + i] = arrays[i] ? bytes[i] : 0;
        }
    }
    /* In checking mode every output waits in staging for the row check. */
    const int staged = request->check_rows;
    if (probs_mode) {
        if (request->probs.memory == PSM_MEMORY_HOST || staged)
            plan->bytes[PART_PROBS] =
                ((rows - 1) * (size_t)request->probs.row_stride + vocab) * sizeof(cl_float);
    } else {
        const size_t outputs = rows * (size_t)request->params.num_samples;
        if (request->tokens.memory == PSM_MEMORY_HOST || staged)
            plan->bytes[PART_TOKENS] = outputs * sizeof(cl_int);
        /* Counted whatever logprobs.data is: at a size query it may still be
         * NULL (a call without logprobs does not use the part). */
        if (request->logprobs.memory == PSM_MEMORY_HOST || staged)
            plan->bytes[PART_LOGPROBS] = outputs * sizeof(cl_float);
        const psm_top_logprobs *top = request->params.top_logprobs;
        if (top) {
            const size_t entries = rows * (size_t)top->count;
            plan->bytes[PART_TOP_KEY] = rows * opencl_tile_count(request->logits.vocab) *
                                        sizeof(cl_ulong);
            if (top->tokens.memory == PSM_MEMORY_HOST || staged)
                plan->bytes[PART_TOP_TOKENS] = entries * sizeof(cl_int);
            if (top->logprobs.memory == PSM_MEMORY_HOST || staged)
                plan->bytes[PART_TOP_LOGPROBS] = entries * sizeof(cl_float);
            /* Counted whatever sampled_ranks.data is, as logprobs are. */
            if (top->sampled_ranks.memory == PSM_MEMORY_HOST || staged)
                plan->bytes[PART_TOP_RANKS] = outputs * sizeof(cl_int);
        }
    }
    return PSM_OK;
}

static size_t align_up(size_t bytes, size_t alignment)
{
    return (bytes + alignment - 1) / alignment * alignment;
}

/* A caller's workspace holds every part of the plan, each at an origin that
 * is a multiple of the device's base address alignment. */
static psm_status plan_workspace_bytes(const opencl_state *state, const call_plan *plan,
                                       size_t *bytes)
{
    size_t total = 0;
    for (int part = 0; part < PART_COUNT; ++part) {
        if (!plan->bytes[part])
            continue;
        const size_t rounded = align_up(plan->bytes[part], state->base_alignment);
        if (rounded < plan->bytes[part] || total > SIZE_MAX - rounded)
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "OpenCL: the workspace of this call is beyond any device's "
                                 "memory");
        total += rounded;
    }
    *bytes = total;
    return PSM_OK;
}

psm_status opencl_workspace_size(void *opaque, const psm_request *request, int probs_mode,
                                 size_t *bytes)
{
    const opencl_state *state = opaque;
    call_plan plan;
    PSM_TRY(opencl_plan_call(request, probs_mode, &plan));
    return plan_workspace_bytes(state, &plan, bytes);
}

/* A part the call uses: logprobs and the drawn tokens' ranks only when the
 * call has them. */
static int part_used(const psm_request *request, const call_plan *plan, int part)
{
    if (part == PART_TOP_RANKS)
        return plan->bytes[part] && request->params.top_logprobs->sampled_ranks.data;
    return plan->bytes[part] && (part != PART_LOGPROBS || request->logprobs.data);
}

void opencl_release_call_buffers(call_buffers *buffers)
{
    for (int i = 0; i < buffers->carved_count; ++i)
        clReleaseMemObject(buffers->carved[i]);
    buffers->carved_count = 0;
}

/* The parts as sub-buffers of the caller's workspace (which core checked is
 * as large as opencl_workspace_size said). Sub-buffers, because OpenCL 1.2
 * has no pointer arithmetic on a cl_mem: a kernel argument is a whole
 * buffer, so a region of the caller's buffer can be handed to a kernel only
 * as a buffer of its own. Creating one allocates no device memory, and the
 * commands enqueued with it retain it, so the call releases it as soon as
 * the commands are enqueued. A workspace that is itself a sub-buffer is
 * carved from its parent buffer at its offset (a sub-buffer of a sub-buffer
 * does not exist). */
static psm_status carve_workspace(opencl_state *state, const psm_request *request,
                                  const call_plan *plan, call_buffers *buffers)
{
    size_t needed = 0;
    PSM_TRY(plan_workspace_bytes(state, plan, &needed));
    void *workspace = request->params.workspace;
    PSM_TRY(opencl_check_device_buffer(state, workspace, needed, "workspace"));
    cl_mem parent = (cl_mem)workspace;
    cl_mem associated = NULL;
    size_t origin = 0;
    cl_mem_flags flags = 0;
    CL_TRY(clGetMemObjectInfo(parent, CL_MEM_FLAGS, sizeof flags, &flags, NULL),
           "clGetMemObjectInfo");
    if (flags & (CL_MEM_READ_ONLY | CL_MEM_WRITE_ONLY))
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "OpenCL: workspace is a %s cl_mem; the kernels read and write it",
                             (flags & CL_MEM_READ_ONLY) ? "read-only" : "write-only");
    CL_TRY(clGetMemObjectInfo(parent, CL_MEM_ASSOCIATED_MEMOBJECT, sizeof associated,
                              &associated, NULL),
           "clGetMemObjectInfo");
    if (associated) {
        CL_TRY(clGetMemObjectInfo(parent, CL_MEM_OFFSET, sizeof origin, &origin, NULL),
               "clGetMemObjectInfo");
        if (origin % state->base_alignment != 0)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "OpenCL: workspace is a sub-buffer at offset %zu, not a "
                                 "multiple of the device's base address alignment (%zu bytes)",
                                 origin, state->base_alignment);
        parent = associated;
    }
    for (int part = 0; part < PART_COUNT; ++part) {
        if (!plan->bytes[part])
            continue;
        if (part_used(request, plan, part)) {
            cl_buffer_region region = {origin, plan->bytes[part]};
            cl_int code = CL_SUCCESS;
            cl_mem carved = clCreateSubBuffer(parent, 0, CL_BUFFER_CREATE_TYPE_REGION, &region,
                                              &code);
            if (code != CL_SUCCESS) {
                opencl_release_call_buffers(buffers);
                return opencl_failure(code, "clCreateSubBuffer (workspace)");
            }
            buffers->carved[buffers->carved_count++] = carved;
            buffers->part[part] = carved;
        }
        origin += align_up(plan->bytes[part], state->base_alignment);
    }
    return PSM_OK;
}

psm_status opencl_call_buffers(opencl_state *state, const psm_request *request,
                               const call_plan *plan, call_buffers *buffers)
{
    memset(buffers, 0, sizeof *buffers);
    if (request->params.workspace)
        return carve_workspace(state, request, plan, buffers);
    for (int part = 0; part < PART_COUNT; ++part) {
        if (!part_used(request, plan, part))
            continue;
        PSM_TRY(opencl_ensure_buffer(state, &state->own[part], plan->bytes[part],
                                     part_name(part)));
        buffers->part[part] = state->own[part].mem;
    }
    return PSM_OK;
}

/* Everything a cl_mem psm_sample of this size needs, plus its staged
 * outputs (host outputs or checking mode). Host logits are staged on first
 * use instead: a caller with cl_mem logits should not pay for a copy. */
psm_status opencl_reserve(void *opaque, int64_t rows, int64_t vocab, int64_t num_samples)
{
    opencl_state *state = opaque;
    call_plan plan;
    memset(&plan, 0, sizeof plan);
    plan_rows(&plan, rows, vocab);
    const size_t outputs = (size_t)rows * (size_t)num_samples;
    plan.bytes[PART_TOKENS] = outputs * sizeof(cl_int);
    plan.bytes[PART_LOGPROBS] = outputs * sizeof(cl_float);
    for (int part = 0; part < PART_COUNT; ++part)
        if (plan.bytes[part])
            PSM_TRY(opencl_ensure_buffer(state, &state->own[part], plan.bytes[part],
                                         part_name(part)));
    return PSM_OK;
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

/* Input data as a cl_mem: the caller's, or a staged copy of host memory
 * (a blocking write, so that the caller may reuse its memory at once). */
psm_status opencl_input_buffer(opencl_state *state, cl_mem staging, const void *data,
                               psm_memory memory, size_t bytes, const char *what, cl_mem *out)
{
    if (memory == PSM_MEMORY_DEVICE) {
        PSM_TRY(opencl_check_device_buffer(state, (void *)data, bytes, what));
        *out = (cl_mem)data;
        return PSM_OK;
    }
    CL_TRY(clEnqueueWriteBuffer(state->queue, staging, CL_TRUE, 0, bytes, data, 0, NULL, NULL),
           "clEnqueueWriteBuffer");
    *out = staging;
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
