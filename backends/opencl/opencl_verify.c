/* opencl_verify.c: psm_verify on the OpenCL backend (docs/SAMPLING.md,
 * section 7; the device code is kernels/psm_stage_verify.h).
 *
 * 1. Host inputs are copied to the device; every array below is a cl_mem.
 * 2. psm_verify_expand gives each target row (and draft logits row) its
 *    request's filters, and the rows go through the pipeline's row passes
 *    (opencl_verify_row_passes), which leave each row's kept rule.
 * 3. psm_verify_check, a group per request: each draft node's Q_x
 *    and status, each request's target check and the rows whose exact
 *    totals its walk needs (one list for the call, its count zeroed
 *    first), into workspace; then psm_verify_totals, a grid sized for the
 *    device whose groups take the listed rows' parts in turn: their
 *    totals.
 * 4. Where a failure can be reported (host memory, where the outputs are
 *    read back anyway, or checking mode, which waits for its check), the
 *    host reads the checks and fails the call as the CPU backend does
 *    (core/verify_backend.h), before anything is written. Otherwise nothing
 *    waits: psm_verify_walk gives a request with a bad draft node -1
 *    everywhere, as it does a request with a bad target row.
 * 5. psm_verify_walk, a group per request, writes the outputs (staged and
 *    read back for host memory).
 * The call's buffers are the context's (state->verify_own, grown as calls
 * need them and kept, as the plain call's are): the n-th buffer a call asks
 * for is the n-th of them. Commands run in order (in-order queue, or a
 * barrier after each), so the next call's writes come after this one's
 * reads. */
#include "error.h"
#include "opencl_backend.h"
#include "psm_contract.h"
#include "psm_opencl_request.h"
#include "psm_row.h"
#include "psm_verify.h"
#include "verify_backend.h"

#include <CL/cl.h>

#include <stdlib.h>
#include <string.h>

_Static_assert(sizeof(psm_verify_call) == PSM_VERIFY_CALL_BYTES,
               "psm_verify_call is laid out with padding");
_Static_assert(sizeof(psm_verify_row) == PSM_VERIFY_ROW_BYTES,
               "psm_verify_row is laid out with padding");

/* How many of the context's verify buffers this call has taken. */
typedef struct verify_buffers {
    int count;
} verify_buffers;

static psm_status new_buffer(opencl_state *state, verify_buffers *buffers, size_t bytes,
                             cl_mem *out)
{
    if (buffers->count == OPENCL_VERIFY_BUFFERS)
        return psm_set_error(PSM_ERR_INTERNAL, "OpenCL: psm_verify ran out of buffer slots");
    device_buffer *buffer = &state->verify_own[buffers->count];
    PSM_TRY(opencl_ensure_buffer(state, buffer, bytes, "psm_verify"));
    buffers->count++;
    *out = buffer->mem;
    return PSM_OK;
}

/* An input as a cl_mem: the caller's (checked), or a copy of host memory. */
static psm_status input(opencl_state *state, verify_buffers *buffers, const void *data,
                        psm_memory memory, size_t bytes, const char *what, cl_mem *out)
{
    if (!data) {
        *out = NULL;
        return PSM_OK;
    }
    cl_mem staging = NULL;
    if (memory == PSM_MEMORY_HOST)
        PSM_TRY(new_buffer(state, buffers, bytes, &staging));
    return opencl_input_buffer(state, staging, data, memory, bytes, what, out);
}

static size_t tensor_bytes(const psm_tensor *tensor)
{
    const size_t element = tensor->dtype == PSM_DTYPE_F32 ? 4 : 2;
    return ((size_t)(tensor->rows - 1) * (size_t)tensor->row_stride + (size_t)tensor->vocab) *
           element;
}

/* A psm_params' per-request arrays on the device, in psm_row_arrays' order. */
static psm_status stage_params(opencl_state *state, verify_buffers *buffers,
                               const psm_params *params, int64_t requests, psm_memory memory,
                               cl_mem arrays[OPENCL_ROW_ARRAYS])
{
    psm_request shape;
    memset(&shape, 0, sizeof shape);
    shape.params = *params;
    shape.rows = requests;
    const void *given[OPENCL_ROW_ARRAYS];
    size_t bytes[OPENCL_ROW_ARRAYS];
    opencl_row_arrays(&shape, given, bytes);
    for (int i = 0; i < OPENCL_ROW_ARRAYS; ++i)
        PSM_TRY(input(state, buffers, given[i], memory, bytes[i], opencl_row_array_names[i],
                      &arrays[i]));
    return PSM_OK;
}

/* The per-request view of a psm_params over `logits` (rows = requests), as
 * psm_verify_expand, psm_verify_check and psm_verify_walk read it. */
static void describe_requests(const psm_params *params, const psm_tensor *logits,
                              int64_t requests, psm_opencl_request *description)
{
    psm_request shape;
    memset(&shape, 0, sizeof shape);
    shape.logits = *logits;
    shape.logits.rows = requests;
    shape.params = *params;
    shape.rows = requests;
    opencl_describe(&shape, description);
}

/* Rows of `logits` (device memory) through the row passes, each with the
 * filters of its request (per rows a request; psm_verify_expand spreads
 * per-request filter arrays to the rows): psm_verify_rows into rows_out. */
static psm_status row_passes(opencl_state *state, verify_buffers *buffers,
                             const psm_tensor *logits, cl_mem logits_mem, const psm_params *params,
                             const cl_mem arrays[OPENCL_ROW_ARRAYS], int64_t requests, int per,
                             cl_mem rows_out)
{
    const int64_t rows = logits->rows;
    const int per_request = psm_verify_per_request_filters(params);
    cl_mem filters[4] = {NULL, NULL, NULL, NULL};
    if (per_request) {
        psm_opencl_request by_request;
        describe_requests(params, logits, requests, &by_request);
        const size_t sizes[4] = {sizeof(cl_float), sizeof(cl_int), sizeof(cl_float),
                                 sizeof(cl_float)};
        for (int i = 0; i < 4; ++i)
            PSM_TRY(new_buffer(state, buffers, (size_t)rows * sizes[i], &filters[i]));
        cl_kernel kernel = state->kernels[KERNEL_VERIFY_EXPAND];
        cl_uint index = 0;
        const cl_int per_arg = per, rows_arg = (cl_int)rows;
        PSM_TRY(opencl_set_request_args(kernel, &by_request, logits_mem, arrays, &index));
        PSM_TRY(opencl_set_arg(kernel, &index, sizeof per_arg, &per_arg));
        PSM_TRY(opencl_set_arg(kernel, &index, sizeof rows_arg, &rows_arg));
        for (int i = 0; i < 4; ++i)
            PSM_TRY(opencl_set_arg(kernel, &index, sizeof(cl_mem), &filters[i]));
        PSM_TRY(opencl_enqueue(state, kernel, opencl_groups_over(state, (size_t)rows), 1,
                               opencl_kernel_names[KERNEL_VERIFY_EXPAND]));
    }

    /* The rows as a plain call's: their own filters, nothing drawn. */
    psm_request request;
    memset(&request, 0, sizeof request);
    request.logits = *logits;
    request.logits.data = logits_mem;
    request.logits.memory = PSM_MEMORY_DEVICE;
    request.params =
        psm_verify_rows_params(params, (const float *)filters[0], (const int32_t *)filters[1],
                               (const float *)filters[2], (const float *)filters[3]);
    request.rows = rows;
    request.tokens.memory = PSM_MEMORY_DEVICE;
    request.logprobs.memory = PSM_MEMORY_DEVICE;
    request.first_bad_row = -1;
    return opencl_verify_row_passes(state, &request, rows_out);
}

/* The call's kernels and outputs, once its buffers are made. */
typedef struct verify_launch {
    opencl_state *state;
    psm_verify_request *request;
    verify_buffers buffers;
    psm_opencl_request by_request; /* the target's per-request view */
    cl_mem target, draft, tokens, parents;
    cl_mem target_arrays[OPENCL_ROW_ARRAYS];
    cl_mem target_rows, draft_rows, node_drawn, partials, needed_rows, needed_count, node_status,
        node_decided, request_bad;
    psm_verify_call call;
} verify_launch;

static psm_status set_verify_args(verify_launch *v, cl_kernel kernel, cl_uint *index)
{
    PSM_TRY(opencl_set_request_args(kernel, &v->by_request, v->target, v->target_arrays, index));
    PSM_TRY(opencl_set_arg(kernel, index, sizeof v->call, &v->call));
    const cl_mem mems[] = {v->draft,        v->tokens,      v->parents,     v->target_rows,
                           v->draft_rows,   v->node_drawn,  v->partials,    v->needed_rows,
                           v->needed_count, v->node_status, v->node_decided,
                           v->request_bad};
    for (size_t i = 0; i < sizeof mems / sizeof mems[0]; ++i)
        PSM_TRY(opencl_set_arg(kernel, index, sizeof(cl_mem), &mems[i]));
    return PSM_OK;
}

/* An output's cl_mem: the caller's in device memory, else staging. */
static psm_status output(verify_launch *v, psm_output given, size_t bytes, const char *what,
                         cl_mem *out)
{
    if (!given.data) {
        *out = NULL;
        return PSM_OK;
    }
    if (given.memory == PSM_MEMORY_DEVICE) {
        PSM_TRY(opencl_check_device_buffer(v->state, given.data, bytes, what));
        *out = (cl_mem)given.data;
        return PSM_OK;
    }
    return new_buffer(v->state, &v->buffers, bytes, out);
}

static psm_status read_back(opencl_state *state, cl_mem from, void *to, size_t bytes)
{
    CL_TRY(clEnqueueReadBuffer(state->queue, from, CL_TRUE, 0, bytes, to, 0, NULL, NULL),
           "clEnqueueReadBuffer");
    return PSM_OK;
}

/* Step 4: the checks, read back and reported as every backend does. */
static psm_status report_checks(verify_launch *v)
{
    const psm_verify_request *request = v->request;
    const size_t nodes = (size_t)(request->requests * request->nodes);
    int32_t *node_status = malloc(nodes * sizeof *node_status);
    int32_t *bad = malloc((size_t)request->requests * sizeof *bad);
    psm_status status = PSM_OK;
    if (!node_status || !bad)
        status = psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                               "OpenCL: cannot allocate the checks of %lld requests",
                               (long long)request->requests);
    if (status == PSM_OK)
        status = read_back(v->state, v->node_status, node_status, nodes * sizeof *node_status);
    if (status == PSM_OK)
        status = read_back(v->state, v->request_bad, bad,
                           (size_t)request->requests * sizeof *bad);
    if (status == PSM_OK)
        status = psm_verify_report(request, node_status, bad,
                                   request->target.memory == PSM_MEMORY_HOST);
    free(node_status);
    free(bad);
    return status;
}

static psm_status verify_call(verify_launch *v)
{
    opencl_state *state = v->state;
    psm_verify_request *request = v->request;
    const psm_memory memory = request->target.memory;
    const int64_t requests = request->requests;
    const int32_t k = request->nodes;
    const size_t nodes = (size_t)(requests * k);
    const size_t width = (size_t)requests * (size_t)(k + 1);
    verify_buffers *buffers = &v->buffers;

    PSM_TRY(input(state, buffers, request->target.data, memory, tensor_bytes(&request->target),
                  "target_logits", &v->target));
    PSM_TRY(input(state, buffers, request->tokens, memory, nodes * sizeof(cl_int),
                  "drafts->tokens", &v->tokens));
    PSM_TRY(input(state, buffers, request->parents, memory, nodes * sizeof(cl_int),
                  "drafts->parents", &v->parents));
    const psm_tensor *draft = psm_verify_draft_tensor(request);
    v->draft = NULL;
    if (draft)
        PSM_TRY(input(state, buffers, draft->data, memory, tensor_bytes(draft),
                      request->draft_logits.data ? "drafts->draft_logits" : "drafts->draft_probs",
                      &v->draft));
    PSM_TRY(stage_params(state, buffers, &request->target_params, requests, memory,
                         v->target_arrays));
    describe_requests(&request->target_params, &request->target, requests, &v->by_request);

    PSM_TRY(new_buffer(state, buffers, width * sizeof(psm_verify_row), &v->target_rows));
    PSM_TRY(row_passes(state, buffers, &request->target, v->target, &request->target_params,
                       v->target_arrays, requests, k + 1, v->target_rows));
    v->draft_rows = NULL;
    if (request->draft_logits.data) {
        cl_mem draft_arrays[OPENCL_ROW_ARRAYS];
        PSM_TRY(stage_params(state, buffers, &request->draft_params, requests, memory,
                             draft_arrays));
        PSM_TRY(new_buffer(state, buffers, nodes * sizeof(psm_verify_row), &v->draft_rows));
        PSM_TRY(row_passes(state, buffers, &request->draft_logits, v->draft,
                           &request->draft_params, draft_arrays, requests, k, v->draft_rows));
    }

    PSM_TRY(new_buffer(state, buffers, nodes * sizeof(cl_ulong), &v->node_drawn));
    PSM_TRY(new_buffer(state, buffers, nodes * sizeof(cl_int), &v->node_status));
    PSM_TRY(new_buffer(state, buffers, nodes * sizeof(cl_int), &v->node_decided));
    v->call = psm_verify_describe(request);
    const size_t total_rows = (size_t)psm_verify_total_rows(v->call);
    PSM_TRY(new_buffer(state, buffers,
                       total_rows * (size_t)psm_verify_parts(v->call.vocab) * sizeof(cl_ulong),
                       &v->partials));
    PSM_TRY(new_buffer(state, buffers, total_rows * sizeof(cl_uint), &v->needed_rows));
    PSM_TRY(new_buffer(state, buffers, sizeof(cl_uint), &v->needed_count));
    PSM_TRY(new_buffer(state, buffers, (size_t)requests * sizeof(cl_int), &v->request_bad));
    const cl_uint zero = 0;
    CL_TRY(clEnqueueFillBuffer(state->queue, v->needed_count, &zero, sizeof zero, 0, sizeof zero,
                               0, NULL, NULL),
           "clEnqueueFillBuffer");
    if (state->queue_out_of_order)
        CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
               "clEnqueueBarrierWithWaitList");
    cl_kernel kernel = state->kernels[KERNEL_VERIFY_CHECK];
    cl_uint index = 0;
    PSM_TRY(set_verify_args(v, kernel, &index));
    PSM_TRY(opencl_enqueue(state, kernel, 1, (size_t)requests,
                           opencl_kernel_names[KERNEL_VERIFY_CHECK]));
    /* Every listed row's part a group at once where they fit on the
     * device (8 groups a compute unit); else the groups take them in
     * turn. */
    const size_t units = total_rows * (size_t)psm_verify_parts(v->call.vocab);
    const size_t resident = (size_t)(state->compute_units ? state->compute_units : 1) * 8;
    kernel = state->kernels[KERNEL_VERIFY_TOTALS];
    PSM_TRY(set_verify_args(v, kernel, &index));
    PSM_TRY(opencl_enqueue(state, kernel, units < resident ? units : resident, 1,
                           opencl_kernel_names[KERNEL_VERIFY_TOTALS]));
    if (memory == PSM_MEMORY_HOST || request->check_rows)
        PSM_TRY(report_checks(v));

    const psm_verification *given = &request->outputs;
    cl_mem accepted, tokens, path, logprobs;
    PSM_TRY(output(v, given->accepted, (size_t)requests * sizeof(cl_int), "outputs->accepted",
                   &accepted));
    PSM_TRY(output(v, given->tokens, width * sizeof(cl_int), "outputs->tokens", &tokens));
    PSM_TRY(output(v, given->path_nodes, width * sizeof(cl_int), "outputs->path_nodes", &path));
    PSM_TRY(output(v, given->logprobs, width * sizeof(cl_float), "outputs->logprobs",
                   &logprobs));
    kernel = state->kernels[KERNEL_VERIFY_WALK];
    PSM_TRY(set_verify_args(v, kernel, &index));
    const cl_mem outs[] = {accepted, tokens, path, logprobs};
    for (int i = 0; i < 4; ++i)
        PSM_TRY(opencl_set_arg(kernel, &index, sizeof(cl_mem), &outs[i]));
    PSM_TRY(opencl_enqueue(state, kernel, 1, (size_t)requests,
                           opencl_kernel_names[KERNEL_VERIFY_WALK]));
    if (given->accepted.memory == PSM_MEMORY_HOST)
        PSM_TRY(read_back(state, accepted, given->accepted.data,
                          (size_t)requests * sizeof(cl_int)));
    if (given->tokens.memory == PSM_MEMORY_HOST)
        PSM_TRY(read_back(state, tokens, given->tokens.data, width * sizeof(cl_int)));
    if (path && given->path_nodes.memory == PSM_MEMORY_HOST)
        PSM_TRY(read_back(state, path, given->path_nodes.data, width * sizeof(cl_int)));
    if (logprobs && given->logprobs.memory == PSM_MEMORY_HOST)
        PSM_TRY(read_back(state, logprobs, given->logprobs.data, width * sizeof(cl_float)));
    return PSM_OK;
}

psm_status opencl_verify(void *opaque, psm_verify_request *request)
{
    if (request->requests > INT32_MAX / (request->nodes + 1) ||
        request->target.vocab > INT32_MAX)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "OpenCL: psm_verify of %lld requests; this backend handles at "
                             "most 2^31 - 1 rows",
                             (long long)request->requests);
    /* Every program the call may run, before it enqueues anything: the
     * row passes of an engine's filter order need theirs. */
    const int orders = request->target_params.filter_order != PSM_FILTER_ORDER_POLYSAMPLE ||
                       request->draft_params.filter_order != PSM_FILTER_ORDER_POLYSAMPLE;
    PSM_TRY(opencl_use_programs(opaque, PROGRAM_BIT(PROGRAM_VERIFY) |
                                            (orders ? PROGRAM_BIT(PROGRAM_ORDERS) : 0)));
    verify_launch v;
    memset(&v, 0, sizeof v);
    v.state = opaque;
    v.request = request;
    return verify_call(&v);
}
