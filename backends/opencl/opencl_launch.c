/* opencl_launch.c: one OpenCL call: the request as the kernels read it
 * (psm_opencl_request.h), where the filter kernels keep their candidates,
 * the kernels' arguments, and the pipeline enqueued for psm_sample and
 * psm_probs. */
#include "error.h"
#include "opencl_backend.h"
#include "psm_contract.h"
#include "psm_opencl_request.h"
#include "psm_row.h"

#include <CL/cl.h>

#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* The kernels read these structs as this file writes them (and check the
 * same sizes): no padding anywhere (psm_opencl_request.h). */
_Static_assert(sizeof(psm_row_scalars) == 40 &&
                   offsetof(psm_opencl_request, dtype) == 56 &&
                   sizeof(psm_opencl_request) == PSM_OPENCL_REQUEST_BYTES,
               "psm_opencl_request is laid out with padding");
_Static_assert(sizeof(psm_row_state) == PSM_ROW_STATE_BYTES,
               "psm_row_state is laid out with padding");
/* kernels/psm_stage_top_logprobs.h's PSM_TOP_LIST_MAX: its lists hold 64. */
_Static_assert(PSM_MAX_TOP_LOGPROBS == 64, "the top-N stage's lists hold 64 entries");
_Static_assert(PSM_LOGITS_F32 == PSM_DTYPE_F32 && PSM_LOGITS_F16 == PSM_DTYPE_F16 &&
                   PSM_LOGITS_BF16 == PSM_DTYPE_BF16,
               "the kernels' dtype values differ from psm_dtype");

/* Keys in psm_row_filter's candidate list on the global path, and in
 * psm_row_top_k's (see plan_filters). */
#define PSM_LIST_CAP 2048
#define PSM_TOP_K_LIST 1024

static size_t dtype_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

typedef struct launch {
    opencl_state *state;
    psm_request *request;
    int64_t rows, vocab, stride; /* rows: the output rows */
    size_t tiles;
    call_buffers buffers;        /* released by finish_call */
    cl_mem logits;
    cl_mem per_row_arrays[OPENCL_ROW_ARRAYS]; /* NULL where absent */
    int processing;   /* the call has logit processing (psm_processing_active) */
    int processing_on_read; /* applied as the rows are read (opencl_processing_on_read) */
    cl_long mask_words; /* the allowed-token mask's words per row */
    cl_mem processing_arrays[OPENCL_PROCESSING_ARRAYS]; /* NULL where absent or empty */
    cl_long list_capacity[3]; /* entries of the history, prompt and bias buffers */
    int filters;      /* some row may have an active filter */
    int may_top_k;    /* some row may have top-k */
    int may_search;   /* some row may have top-k or top-p (a cutoff search) */
    size_t list_bytes; /* psm_row_filter's local row cache or candidate list */
    psm_opencl_request description; /* every kernel's first argument */
} launch;

/* Where the filter kernels keep their candidates. The on-chip path keeps
 * the row's values in local memory across the radix passes when they fit
 * next to the row filter's own local use. Otherwise the same local memory
 * holds a list of candidate rank keys (8 bytes each), capped so that more
 * row groups fit on a compute unit at once (the local memory a group asks
 * for limits how many run side by side): PSM_LIST_CAP keys hold the gap-bin
 * tallies and the tokens of the bin that holds a cutoff; longer lists
 * narrow by radix levels first. Min-p alone needs neither.
 * Top-k rows first try the lane maxima (psm_row_top_k, with a list of its
 * own, small enough for several groups per compute unit: top-k up to a few
 * hundred), which reads far less than even the on-chip path; the row filter
 * takes the rows it leaves. A call in an engine's filter order
 * (psm_params.filter_order) runs neither: psm_row_orders searches the rows in
 * global memory. */
static void plan_filters(launch *call)
{
    const opencl_state *state = call->state;
    psm_opencl_request *plan = &call->description;
    if (!call->filters)
        return;
    cl_ulong row_bytes = (cl_ulong)call->vocab * sizeof(cl_float);
    cl_ulong free_local = state->local_memory > state->row_filter_local
                              ? state->local_memory - state->row_filter_local
                              : 0;
    int use_cache = call->may_search && row_bytes <= free_local;
    cl_ulong list_bytes =
        use_cache ? row_bytes : free_local / sizeof(cl_ulong) * sizeof(cl_ulong);
    if (!use_cache && list_bytes > PSM_LIST_CAP * sizeof(cl_ulong))
        list_bytes = PSM_LIST_CAP * sizeof(cl_ulong);
    if (!call->may_search)
        list_bytes = 0;
#ifdef PSM_OPENCL_TEST_LIST_BYTES
    /* Test builds only: force the global path with a small list. */
    use_cache = 0;
    list_bytes = PSM_OPENCL_TEST_LIST_BYTES;
#endif
    plan->use_row_cache = use_cache;
    plan->list_capacity = use_cache ? 0 : (psm_i32)(list_bytes / sizeof(cl_ulong));
    call->list_bytes = list_bytes >= sizeof(cl_ulong) ? (size_t)list_bytes : sizeof(cl_ulong);
    plan->top_k_list_capacity = PSM_TOP_K_LIST;
    plan->top_k_ran = call->may_top_k && plan->filter_order == PSM_FILTER_ORDER_POLYSAMPLE &&
                      (cl_ulong)PSM_TOP_K_LIST * sizeof(cl_ulong) <= free_local;
    plan->filters_ran = 1;
}

/* A request as the kernels read it (the host's launch choices left 0). */
void opencl_describe(const psm_request *request, psm_opencl_request *description)
{
    memset(description, 0, sizeof *description);
    description->scalars = psm_request_row_scalars(request);
    description->row_stride = request->logits.row_stride;
    description->probs_stride = request->probs.row_stride;
    description->dtype = (psm_i32)request->logits.dtype;
    description->rows = (psm_i32)request->rows;
    description->vocab = (psm_i32)request->logits.vocab;
    description->tiles = (psm_i32)opencl_tile_count(request->logits.vocab);
    description->per_row = psm_request_per_row(&request->params);
    description->num_samples = (psm_i32)request->params.num_samples;
    description->want_logprobs = request->logprobs.data != NULL;
    description->check_rows = request->check_rows;
    description->filter_order = request->params.filter_order;
}

/* The entries a token or value buffer holds. */
static psm_status buffer_entries(cl_mem buffer, size_t element, cl_long *entries)
{
    size_t size = 0;
    if (buffer)
        CL_TRY(clGetMemObjectInfo(buffer, CL_MEM_SIZE, sizeof size, &size, NULL),
               "clGetMemObjectInfo");
    *entries = (cl_long)(size / element);
    return PSM_OK;
}

/* Logit processing's arrays on the device: the caller's cl_mem (checked
 * like the per-row arrays), or copies of host arrays, each in its part.
 * An empty host list stays NULL: the kernels never read it. */
static psm_status stage_processing(launch *call, int probs_mode)
{
    opencl_state *state = call->state;
    const psm_request *request = call->request;
    const void *arrays[OPENCL_PROCESSING_ARRAYS];
    size_t bytes[OPENCL_PROCESSING_ARRAYS];
    PSM_TRY(opencl_processing_arrays(request, arrays, bytes));
    const int host = request->logits.memory == PSM_MEMORY_HOST;
    for (int i = 0; i < OPENCL_PROCESSING_ARRAYS; ++i)
        if (arrays[i] && (bytes[i] || !host))
            PSM_TRY(opencl_input_buffer(state, call->buffers.part[PART_PROCESSING_ARRAY + i],
                                        arrays[i], request->logits.memory, bytes[i],
                                        opencl_processing_array_names[i],
                                        &call->processing_arrays[i]));
    const cl_mem *staged = call->processing_arrays;
    cl_long bias_tokens = 0, bias_values = 0;
    PSM_TRY(buffer_entries(staged[PROCESSING_HISTORY_TOKENS], sizeof(cl_int),
                           &call->list_capacity[0]));
    PSM_TRY(buffer_entries(staged[PROCESSING_PROMPT_TOKENS], sizeof(cl_int),
                           &call->list_capacity[1]));
    PSM_TRY(buffer_entries(staged[PROCESSING_BIAS_TOKENS], sizeof(cl_int), &bias_tokens));
    PSM_TRY(buffer_entries(staged[PROCESSING_BIAS_VALUES], sizeof(cl_float), &bias_values));
    call->list_capacity[2] = bias_tokens < bias_values ? bias_tokens : bias_values;
    const psm_logit_processing *p = request->params.processing;
    call->mask_words = p->allowed_mask_words ? p->allowed_mask_words : (call->vocab + 31) / 32;
    call->processing = 1;
    call->processing_on_read = opencl_processing_on_read(request, probs_mode);
    return PSM_OK;
}

/* The call's buffers, its inputs on the device and its description. On
 * success the caller ends the call with finish_call. */
static psm_status prepare(opencl_state *state, psm_request *request, int probs_mode,
                          launch *call)
{
    memset(call, 0, sizeof *call);
    call->state = state;
    call->request = request;
    call->rows = request->rows;
    call->vocab = request->logits.vocab;
    call->stride = request->logits.row_stride;
    call->tiles = opencl_tile_count(call->vocab);
    if (call->rows > INT32_MAX)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "OpenCL: %lld rows; this backend handles at most 2^31 - 1",
                             (long long)call->rows);
    call_plan plan;
    PSM_TRY(opencl_plan_call(request, probs_mode, &plan));
    PSM_TRY(opencl_call_buffers(state, request, &plan, &call->buffers));

    /* Every logits row, since output rows may read any of them. */
    const psm_tensor *logits = &request->logits;
    size_t span = ((size_t)(logits->rows - 1) * (size_t)call->stride + (size_t)call->vocab) *
                  dtype_size(logits->dtype);
    psm_status status =
        opencl_input_buffer(state, call->buffers.part[PART_LOGITS], logits->data, logits->memory,
                            span, "logits", &call->logits);
    const void *arrays[OPENCL_ROW_ARRAYS];
    size_t bytes[OPENCL_ROW_ARRAYS];
    opencl_row_arrays(request, arrays, bytes);
    for (int i = 0; i < OPENCL_ROW_ARRAYS && status == PSM_OK; ++i)
        if (arrays[i])
            status = opencl_input_buffer(state, call->buffers.part[PART_ROW_ARRAY + i], arrays[i],
                                         logits->memory, bytes[i], opencl_row_array_names[i],
                                         &call->per_row_arrays[i]);
    if (status == PSM_OK && psm_processing_active(&request->params))
        status = stage_processing(call, probs_mode);
    if (status != PSM_OK) {
        opencl_release_call_buffers(&call->buffers);
        return status;
    }

    opencl_describe(request, &call->description);
    const psm_params *params = &request->params;
    const cl_uint per_row = call->description.per_row;
    int scalar_filter = (params->top_k > 0 && params->top_k < call->vocab) ||
                        params->top_p < 1.0f || params->min_p > 0.0f;
    int per_row_filter = (per_row & (PSM_PER_ROW_TOP_K | PSM_PER_ROW_TOP_P |
                                     PSM_PER_ROW_MIN_P)) != 0;
    int all_greedy = !(per_row & PSM_PER_ROW_TEMPERATURE) && psm_is_greedy(params->temperature);
    call->filters = (scalar_filter || per_row_filter) && !all_greedy;
    call->may_top_k = call->filters && (params->top_k > 0 || (per_row & PSM_PER_ROW_TOP_K));
    call->may_search = call->may_top_k || (call->filters && (params->top_p < 1.0f ||
                                                            (per_row & PSM_PER_ROW_TOP_P)));
    /* The programs of the kernels this call may run beyond the sampling
     * program's; before plan_filters, which reads the row filter's local
     * memory, which a rebuild at a smaller group size changes. */
    unsigned programs = 0;
    if (call->processing)
        programs |= PROGRAM_BIT(PROGRAM_PROCESSING);
    if (params->top_logprobs)
        programs |= PROGRAM_BIT(PROGRAM_TOP_LOGPROBS);
    if (call->filters && params->filter_order != PSM_FILTER_ORDER_POLYSAMPLE)
        programs |= PROGRAM_BIT(PROGRAM_ORDERS);
    status = opencl_use_programs(state, programs);
    if (status != PSM_OK) {
        opencl_release_call_buffers(&call->buffers);
        return status;
    }
    plan_filters(call);
    return PSM_OK;
}

/* Ends a prepared call, whether its commands were enqueued or not. */
static psm_status finish_call(launch *call, psm_status status)
{
    opencl_release_call_buffers(&call->buffers);
    return status;
}

/* The arguments every kernel starts with (PSM_REQUEST_PARAMS): the call's
 * description, the logits and the per-row arrays (NULL where absent), set
 * here only. */
psm_status opencl_set_request_args(cl_kernel kernel, const psm_opencl_request *description,
                                   cl_mem logits, const cl_mem arrays[OPENCL_ROW_ARRAYS],
                                   cl_uint *next)
{
    cl_uint index = 0;
    cl_int code = clSetKernelArg(kernel, index++, sizeof *description, description);
    code |= clSetKernelArg(kernel, index++, sizeof(cl_mem), &logits);
    for (int i = 0; i < OPENCL_ROW_ARRAYS; ++i)
        code |= clSetKernelArg(kernel, index++, sizeof(cl_mem), &arrays[i]);
    if (code != CL_SUCCESS)
        return psm_set_error(PSM_ERR_INTERNAL, "OpenCL: clSetKernelArg failed for the request");
    *next = index;
    return PSM_OK;
}

static psm_status set_request_args(const launch *call, cl_kernel kernel, cl_uint *next)
{
    return opencl_set_request_args(kernel, &call->description, call->logits,
                                   call->per_row_arrays, next);
}

psm_status opencl_set_arg(cl_kernel kernel, cl_uint *index, size_t size, const void *value)
{
    cl_int code = clSetKernelArg(kernel, (*index)++, size, value);
    if (code != CL_SUCCESS)
        return psm_set_error(PSM_ERR_INTERNAL, "OpenCL: clSetKernelArg(%u) failed: %s",
                             (unsigned)(*index - 1), opencl_error_name(code));
    return PSM_OK;
}

#define set_arg opencl_set_arg
#define SET_MEM(kernel, index, buffer) set_arg((kernel), (index), sizeof(cl_mem), &(buffer))

/* Enqueues over groups_x x rows groups; on an out-of-order caller queue a
 * barrier keeps our kernels in order. */
psm_status opencl_enqueue(opencl_state *state, cl_kernel kernel, size_t groups_x, size_t rows,
                          const char *name)
{
    size_t global[2] = {groups_x * state->group_size, rows};
    size_t local[2] = {state->group_size, 1};
    cl_int code = clEnqueueNDRangeKernel(state->queue, kernel, 2, NULL, global, local, 0, NULL,
                                         NULL);
    if (code != CL_SUCCESS) {
        char what[96];
        snprintf(what, sizeof what, "clEnqueueNDRangeKernel(%s)", name);
        return opencl_failure(code, what);
    }
    if (state->queue_out_of_order)
        CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
               "clEnqueueBarrierWithWaitList");
    return PSM_OK;
}

#define enqueue opencl_enqueue

/* Groups for `units` units of work (tiles, rows or draws) of the kernels
 * that give each unit a team of min(32, group size) items (psm_kernels.cl,
 * PSM_TEAM), several teams per group. */
static size_t team_groups(const opencl_state *state, size_t units)
{
    size_t team = state->group_size < 32 ? state->group_size : 32;
    size_t teams = state->group_size / team;
    return (units + teams - 1) / teams;
}

/* Groups of the processing kernels' items: one per (token, row) in groups
 * along the vocab, or one per row. */
size_t opencl_groups_over(const opencl_state *state, size_t items)
{
    return (items + state->group_size - 1) / state->group_size;
}

/* Runs the logit-processing kernels (psm_kernels.cl, "logit processing").
 * Then the pipeline reads their output (f32 logits, one dense row per
 * output row, no row index left to follow), or, where the processing is
 * applied as the rows are read, the rows as given with the mask and the
 * lists step's overlay (its listed tokens' values and bits). */
static psm_status run_processing(launch *call)
{
    opencl_state *state = call->state;
    const psm_logit_processing *p = call->request->params.processing;
    const cl_mem *part = call->buffers.part;
    const cl_mem *arrays = call->processing_arrays;
    const int on_read = call->processing_on_read;
    const int lists = psm_processing_has_lists(&call->request->params);
    cl_uint index = 0;
    cl_kernel kernel;

    if (!on_read) {
        const size_t token_groups = opencl_groups_over(
            state, ((size_t)call->vocab + PSM_PROCESS_SPAN - 1) / PSM_PROCESS_SPAN);
        kernel = state->kernels[KERNEL_PROCESS_READ];
        PSM_TRY(set_request_args(call, kernel, &index));
        PSM_TRY(SET_MEM(kernel, &index, arrays[PROCESSING_MASK]));
        PSM_TRY(set_arg(kernel, &index, sizeof call->mask_words, &call->mask_words));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_PROCESSED]));
        PSM_TRY(enqueue(state, kernel, token_groups, (size_t)call->rows,
                        opencl_kernel_names[KERNEL_PROCESS_READ]));
    } else if (lists) {
        const cl_uint zero = 0;
        CL_TRY(clEnqueueFillBuffer(state->queue, part[PART_LISTED], &zero, sizeof zero, 0,
                                   (size_t)call->rows *
                                       (size_t)psm_listed_words(call->vocab) * sizeof zero,
                                   0, NULL, NULL),
               "clEnqueueFillBuffer");
        if (state->queue_out_of_order)
            CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
                   "clEnqueueBarrierWithWaitList");
    }

    /* Without lists the read step's values are final. */
    if (lists) {
        const psm_processing_arrays given = psm_request_processing_arrays(p);
        kernel = state->kernels[KERNEL_PROCESS_LISTS];
        const cl_uint present = given.present;
        const cl_mem listed = on_read ? part[PART_LISTED] : NULL;
        PSM_TRY(set_request_args(call, kernel, &index));
        PSM_TRY(set_arg(kernel, &index, sizeof present, &present));
        PSM_TRY(set_arg(kernel, &index, sizeof(cl_float), &given.repetition));
        PSM_TRY(set_arg(kernel, &index, sizeof(cl_float), &given.frequency));
        PSM_TRY(set_arg(kernel, &index, sizeof(cl_float), &given.presence));
        for (int i = 0; i < PROCESSING_MASK; ++i)
            PSM_TRY(SET_MEM(kernel, &index, arrays[i]));
        for (int list = 0; list < 3; ++list)
            PSM_TRY(set_arg(kernel, &index, sizeof(cl_long), &call->list_capacity[list]));
        PSM_TRY(SET_MEM(kernel, &index, arrays[PROCESSING_MASK]));
        PSM_TRY(set_arg(kernel, &index, sizeof call->mask_words, &call->mask_words));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_PROCESSED]));
        PSM_TRY(SET_MEM(kernel, &index, listed));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_COUNTS]));
        PSM_TRY(enqueue(state, kernel, 1, (size_t)call->rows,
                        opencl_kernel_names[KERNEL_PROCESS_LISTS]));
    }
    if (on_read)
        return PSM_OK;

    psm_opencl_request *description = &call->description;
    call->logits = part[PART_PROCESSED];
    description->dtype = PSM_LOGITS_F32;
    description->row_stride = call->vocab;
    description->per_row &= ~PSM_PER_ROW_LOGITS_ROW;
    description->scalars.logits_rows = call->rows;
    return PSM_OK;
}

/* The on-read kernels' last arguments (psm_kernels.cl's
 * PSM_READ_PROCESSING_PARAMS): the mask, its words per row, and with lists
 * the listed bits and the overlay; NULL where the call has none. */
static psm_status set_read_processing_args(const launch *call, cl_kernel kernel, cl_uint *index)
{
    const int lists = psm_processing_has_lists(&call->request->params);
    const cl_mem listed = lists ? call->buffers.part[PART_LISTED] : NULL;
    const cl_mem overlay = lists ? call->buffers.part[PART_PROCESSED] : NULL;
    PSM_TRY(SET_MEM(kernel, index, call->processing_arrays[PROCESSING_MASK]));
    PSM_TRY(set_arg(kernel, index, sizeof call->mask_words, &call->mask_words));
    PSM_TRY(SET_MEM(kernel, index, listed));
    return SET_MEM(kernel, index, overlay);
}

/* The pipeline up to the per-row combination, shared by sample and probs:
 * logit processing first when the call has it. */
static psm_status run_rows(launch *call)
{
    opencl_state *state = call->state;
    const int check_rows = call->request->check_rows;
    const cl_mem *part = call->buffers.part;
    cl_uint index = 0;
    if (state->queue_out_of_order)
        CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
               "clEnqueueBarrierWithWaitList");
    if (check_rows) {
        cl_int none = INT32_MAX;
        CL_TRY(clEnqueueFillBuffer(state->queue, state->first_bad_row.mem, &none, sizeof none,
                                   0, sizeof none, 0, NULL, NULL),
               "clEnqueueFillBuffer");
    }
    if (call->processing)
        PSM_TRY(run_processing(call));

    const size_t tile_groups = team_groups(state, (size_t)call->rows * call->tiles);
    const int tile_kernel =
        call->processing_on_read ? KERNEL_TILE_REDUCE_ON_READ : KERNEL_TILE_REDUCE;
    cl_kernel kernel = state->kernels[tile_kernel];
    PSM_TRY(set_request_args(call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_KEY]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_INFO]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_REF]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_MASS]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_LANE_MAX]));
    if (call->processing_on_read)
        PSM_TRY(set_read_processing_args(call, kernel, &index));
    PSM_TRY(enqueue(state, kernel, tile_groups, 1, opencl_kernel_names[tile_kernel]));

    if (call->filters) {
        if (call->description.top_k_ran) {
            kernel = state->kernels[KERNEL_ROW_TOP_K];
            PSM_TRY(set_request_args(call, kernel, &index));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_KEY]));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_INFO]));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_LANE_MAX]));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_REF]));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_MASS]));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_ROW_STATE]));
            PSM_TRY(set_arg(kernel, &index, (size_t)PSM_TOP_K_LIST * sizeof(cl_ulong), NULL));
            PSM_TRY(enqueue(state, kernel, 1, (size_t)call->rows,
                            opencl_kernel_names[KERNEL_ROW_TOP_K]));
        }

        /* An engine's filter order has a row kernel of its own. */
        const int row_kernel = call->description.filter_order == PSM_FILTER_ORDER_POLYSAMPLE
                                   ? KERNEL_ROW_FILTER
                                   : KERNEL_ROW_ORDERS;
        kernel = state->kernels[row_kernel];
        PSM_TRY(set_request_args(call, kernel, &index));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_KEY]));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_INFO]));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_ROW_STATE]));
        if (row_kernel == KERNEL_ROW_FILTER) {
            /* the tile masses of top-p alone, then its row cache or candidate list */
            PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_REF]));
            PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_MASS]));
            PSM_TRY(set_arg(kernel, &index, call->list_bytes, NULL));
        }
        PSM_TRY(enqueue(state, kernel, 1, (size_t)call->rows, opencl_kernel_names[row_kernel]));

        kernel = state->kernels[KERNEL_TILE_FILTER];
        PSM_TRY(set_request_args(call, kernel, &index));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_KEY]));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_ROW_STATE]));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_REF]));
        PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_MASS]));
        PSM_TRY(enqueue(state, kernel, tile_groups, 1, opencl_kernel_names[KERNEL_TILE_FILTER]));
    }

    kernel = state->kernels[KERNEL_ROW_COMBINE];
    PSM_TRY(set_request_args(call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_KEY]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_INFO]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_REF]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_MASS]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_PREFIX]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_ROW_STATE]));
    PSM_TRY(SET_MEM(kernel, &index, state->first_bad_row.mem));
    return enqueue(state, kernel, team_groups(state, (size_t)call->rows), 1,
                   opencl_kernel_names[KERNEL_ROW_COMBINE]);
}

/* Checking mode: waits for the row check and fails naming the first bad row. */
static psm_status check_rows_result(opencl_state *state, psm_request *request)
{
    cl_int first_bad = INT32_MAX;
    CL_TRY(clEnqueueReadBuffer(state->queue, state->first_bad_row.mem, CL_TRUE, 0,
                               sizeof first_bad, &first_bad, 0, NULL, NULL),
           "clEnqueueReadBuffer");
    if (first_bad == INT32_MAX)
        return PSM_OK;
    request->first_bad_row = first_bad;
    return psm_set_error(PSM_ERR_BAD_ROW,
                         "row %d has a NaN or +inf logit, no finite logit, or a per-row "
                         "parameter or row index out of range",
                         (int)first_bad);
}

/* The cl_mem a kernel writes an output to: the caller's own when it is a
 * cl_mem and nothing has to be checked first, else the staging part (which
 * the plan has then). */
static psm_status output_target(const launch *call, psm_output output, int part, size_t bytes,
                                const char *what, cl_mem *target)
{
    if (output.memory == PSM_MEMORY_DEVICE)
        PSM_TRY(opencl_check_device_buffer(call->state, output.data, bytes, what));
    *target = call->buffers.part[part] ? call->buffers.part[part] : (cl_mem)output.data;
    return PSM_OK;
}

/* Where psm_top_logprobs writes the top-N outputs: the caller's or staging. */
typedef struct top_targets {
    cl_mem tokens, logprobs, ranks; /* ranks: NULL when not asked for */
} top_targets;

static psm_status top_output_targets(const launch *call, top_targets *targets)
{
    const psm_top_logprobs *top = call->request->params.top_logprobs;
    const size_t entries = (size_t)call->rows * (size_t)top->count;
    const size_t samples = (size_t)call->rows * (size_t)call->request->params.num_samples;
    PSM_TRY(output_target(call, top->tokens, PART_TOP_TOKENS, entries * sizeof(cl_int),
                          "top_logprobs.tokens", &targets->tokens));
    PSM_TRY(output_target(call, top->logprobs, PART_TOP_LOGPROBS, entries * sizeof(cl_float),
                          "top_logprobs.logprobs", &targets->logprobs));
    targets->ranks = NULL;
    if (top->sampled_ranks.data)
        PSM_TRY(output_target(call, top->sampled_ranks, PART_TOP_RANKS, samples * sizeof(cl_int),
                              "top_logprobs.sampled_ranks", &targets->ranks));
    return PSM_OK;
}

/* The top-N kernel, after the draw: a group per row; then, with sampled
 * ranks, the rank kernel. raw_logits and raw_description are the call
 * before logit processing. */
static psm_status run_top_logprobs(launch *call, cl_mem raw_logits,
                                   const psm_opencl_request *raw_description, cl_mem tokens,
                                   const top_targets *targets)
{
    opencl_state *state = call->state;
    const psm_top_logprobs *top = call->request->params.top_logprobs;
    const cl_mem *part = call->buffers.part;
    const cl_int count = top->count;
    const cl_int raw_mode = top->mode == PSM_LOGPROBS_RAW;
    cl_kernel kernel = state->kernels[KERNEL_TOP_LOGPROBS];
    cl_uint index = 0;
    PSM_TRY(set_request_args(call, kernel, &index));
    PSM_TRY(set_arg(kernel, &index, sizeof *raw_description, raw_description));
    PSM_TRY(SET_MEM(kernel, &index, raw_logits));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_REF]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_MASS]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TILE_PREFIX]));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_ROW_STATE]));
    PSM_TRY(SET_MEM(kernel, &index, tokens));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TOP_KEY]));
    PSM_TRY(set_arg(kernel, &index, sizeof count, &count));
    PSM_TRY(set_arg(kernel, &index, sizeof raw_mode, &raw_mode));
    PSM_TRY(SET_MEM(kernel, &index, targets->tokens));
    PSM_TRY(SET_MEM(kernel, &index, targets->logprobs));
    PSM_TRY(SET_MEM(kernel, &index, targets->ranks));
    PSM_TRY(enqueue(state, kernel, 1, (size_t)call->rows,
                    opencl_kernel_names[KERNEL_TOP_LOGPROBS]));
    if (!top->sampled_ranks.data)
        return PSM_OK;
    /* The ranks' counts: a group per PSM_RANK_TILES tiles of a row. */
    kernel = state->kernels[KERNEL_TOP_RANKS];
    index = 0;
    PSM_TRY(set_request_args(call, kernel, &index));
    PSM_TRY(set_arg(kernel, &index, sizeof *raw_description, raw_description));
    PSM_TRY(SET_MEM(kernel, &index, raw_logits));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_ROW_STATE]));
    PSM_TRY(SET_MEM(kernel, &index, tokens));
    PSM_TRY(SET_MEM(kernel, &index, part[PART_TOP_KEY]));
    PSM_TRY(set_arg(kernel, &index, sizeof raw_mode, &raw_mode));
    PSM_TRY(SET_MEM(kernel, &index, targets->ranks));
    const size_t parts = (call->tiles + PSM_RANK_TILES - 1) / PSM_RANK_TILES;
    return enqueue(state, kernel, parts, (size_t)call->rows,
                   opencl_kernel_names[KERNEL_TOP_RANKS]);
}

/* Delivers the staged top-N outputs (after the row check). */
static psm_status deliver_top_logprobs(const launch *call, const top_targets *targets)
{
    const psm_top_logprobs *top = call->request->params.top_logprobs;
    const cl_mem *part = call->buffers.part;
    const size_t entries = (size_t)call->rows * (size_t)top->count;
    const size_t samples = (size_t)call->rows * (size_t)call->request->params.num_samples;
    if (targets->tokens == part[PART_TOP_TOKENS])
        PSM_TRY(opencl_deliver(call->state, targets->tokens, top->tokens,
                               entries * sizeof(cl_int)));
    if (targets->logprobs == part[PART_TOP_LOGPROBS])
        PSM_TRY(opencl_deliver(call->state, targets->logprobs, top->logprobs,
                               entries * sizeof(cl_float)));
    if (targets->ranks && targets->ranks == part[PART_TOP_RANKS])
        PSM_TRY(opencl_deliver(call->state, targets->ranks, top->sampled_ranks,
                               samples * sizeof(cl_int)));
    return PSM_OK;
}

/* The arguments psm_draw and psm_probs share: the request's, then what the
 * row passes left (tile maxima, masses and prefixes, the rows' state). */
static psm_status set_row_result_args(launch *call, cl_kernel kernel, cl_uint *index)
{
    const cl_mem *part = call->buffers.part;
    PSM_TRY(set_request_args(call, kernel, index));
    PSM_TRY(SET_MEM(kernel, index, part[PART_TILE_REF]));
    PSM_TRY(SET_MEM(kernel, index, part[PART_TILE_MASS]));
    PSM_TRY(SET_MEM(kernel, index, part[PART_TILE_PREFIX]));
    return SET_MEM(kernel, index, part[PART_ROW_STATE]);
}

static psm_status sample_call(launch *call)
{
    opencl_state *state = call->state;
    psm_request *request = call->request;
    const cl_mem *part = call->buffers.part;
    const size_t samples = (size_t)request->params.num_samples;
    const size_t outputs = (size_t)call->rows * samples;
    const int want_logprobs = call->description.want_logprobs;
    cl_mem tokens = NULL, logprobs = NULL;
    PSM_TRY(output_target(call, request->tokens, PART_TOKENS, outputs * sizeof(cl_int), "tokens",
                          &tokens));
    if (want_logprobs)
        PSM_TRY(output_target(call, request->logprobs, PART_LOGPROBS,
                              outputs * sizeof(cl_float), "logprobs", &logprobs));
    else
        logprobs = tokens; /* never written: want_logprobs is 0 */
    top_targets top = {NULL, NULL, NULL};
    if (request->params.top_logprobs)
        PSM_TRY(top_output_targets(call, &top));
    /* Before run_rows points the call at the processed logits. */
    const cl_mem raw_logits = call->logits;
    const psm_opencl_request raw_description = call->description;

    PSM_TRY(run_rows(call));
    const int draw_kernel = call->processing_on_read ? KERNEL_DRAW_ON_READ : KERNEL_DRAW;
    cl_kernel kernel = state->kernels[draw_kernel];
    cl_uint index = 0;
    PSM_TRY(set_row_result_args(call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, tokens));
    PSM_TRY(SET_MEM(kernel, &index, logprobs));
    if (call->processing_on_read)
        PSM_TRY(set_read_processing_args(call, kernel, &index));
    PSM_TRY(enqueue(state, kernel, team_groups(state, outputs), 1,
                    opencl_kernel_names[draw_kernel]));
    if (request->params.top_logprobs)
        PSM_TRY(run_top_logprobs(call, raw_logits, &raw_description, tokens, &top));

    if (request->check_rows)
        PSM_TRY(check_rows_result(state, request));
    if (tokens == part[PART_TOKENS])
        PSM_TRY(opencl_deliver(state, tokens, request->tokens, outputs * sizeof(cl_int)));
    if (want_logprobs && logprobs == part[PART_LOGPROBS])
        PSM_TRY(opencl_deliver(state, logprobs, request->logprobs, outputs * sizeof(cl_float)));
    if (request->params.top_logprobs)
        PSM_TRY(deliver_top_logprobs(call, &top));
    return PSM_OK;
}

/* psm_verify's row passes (opencl_verify.c): the pipeline up to
 * psm_row_combine over the request's rows (device memory, no checking
 * mode), then each row's kept rule into `rows` (psm_verify_row). */
psm_status opencl_verify_row_passes(opencl_state *state, psm_request *request, cl_mem rows)
{
    launch call;
    PSM_TRY(prepare(state, request, 0, &call));
    psm_status status = run_rows(&call);
    cl_kernel kernel = state->kernels[KERNEL_VERIFY_ROWS];
    cl_uint index = 0;
    if (status == PSM_OK)
        status = set_request_args(&call, kernel, &index);
    if (status == PSM_OK)
        status = SET_MEM(kernel, &index, call.buffers.part[PART_ROW_STATE]);
    if (status == PSM_OK)
        status = SET_MEM(kernel, &index, rows);
    if (status == PSM_OK)
        status = enqueue(state, kernel, opencl_groups_over(state, (size_t)call.rows), 1,
                         opencl_kernel_names[KERNEL_VERIFY_ROWS]);
    return finish_call(&call, status);
}

psm_status opencl_sample(void *opaque, psm_request *request)
{
    launch call;
    PSM_TRY(prepare(opaque, request, 0, &call));
    return finish_call(&call, sample_call(&call));
}

static int is_sub_buffer(cl_mem buffer)
{
    cl_mem parent = NULL;
    return clGetMemObjectInfo(buffer, CL_MEM_ASSOCIATED_MEMOBJECT, sizeof parent, &parent,
                              NULL) == CL_SUCCESS &&
           parent != NULL;
}

/* Copies rows of row_bytes, pitch bytes apart, between two buffers of the
 * same layout; only each row's bytes, so that the caller's padding stays
 * untouched. The buffers end at the last row's bytes, not at a whole pitch,
 * and NVIDIA's driver refuses a rectangle whose last row pitch would pass
 * the end (CL_INVALID_VALUE); so the rows before the last go as a rectangle
 * and the last row as a plain copy. PoCL 2.10 crashes in
 * clEnqueueCopyBufferRect when either buffer is a sub-buffer (as a part of
 * a caller's workspace is), so those go a row at a time. */
static psm_status copy_rows(opencl_state *state, cl_mem from, cl_mem to, size_t rows,
                            size_t row_bytes, size_t pitch)
{
    const size_t last_row = (rows - 1) * pitch;
    if (pitch == row_bytes) {
        CL_TRY(clEnqueueCopyBuffer(state->queue, from, to, 0, 0, last_row + row_bytes, 0, NULL,
                                   NULL),
               "clEnqueueCopyBuffer");
    } else if (is_sub_buffer(from) || is_sub_buffer(to)) {
        for (size_t row = 0; row < rows; ++row)
            CL_TRY(clEnqueueCopyBuffer(state->queue, from, to, row * pitch, row * pitch,
                                       row_bytes, 0, NULL, NULL),
                   "clEnqueueCopyBuffer");
    } else {
        size_t origin[3] = {0, 0, 0};
        size_t region[3] = {row_bytes, rows - 1, 1};
        if (rows > 1)
            CL_TRY(clEnqueueCopyBufferRect(state->queue, from, to, origin, origin, region, pitch,
                                           0, pitch, 0, 0, NULL, NULL),
                   "clEnqueueCopyBufferRect");
        CL_TRY(clEnqueueCopyBuffer(state->queue, from, to, last_row, last_row, row_bytes, 0,
                                   NULL, NULL),
               "clEnqueueCopyBuffer");
    }
    if (state->queue_out_of_order)
        CL_TRY(clEnqueueBarrierWithWaitList(state->queue, 0, NULL, NULL),
               "clEnqueueBarrierWithWaitList");
    return PSM_OK;
}

static psm_status probs_call(launch *call)
{
    opencl_state *state = call->state;
    psm_request *request = call->request;
    const cl_mem *part = call->buffers.part;
    const psm_tensor *probs = &request->probs;
    const size_t probs_bytes =
        ((size_t)(probs->rows - 1) * (size_t)probs->row_stride + (size_t)probs->vocab) *
        sizeof(cl_float);
    cl_mem target = NULL;
    PSM_TRY(output_target(call, (psm_output){probs->data, probs->memory}, PART_PROBS,
                          probs_bytes, "probs", &target));

    PSM_TRY(run_rows(call));
    cl_kernel kernel = state->kernels[KERNEL_PROBS];
    cl_uint index = 0;
    PSM_TRY(set_row_result_args(call, kernel, &index));
    PSM_TRY(SET_MEM(kernel, &index, target));
    PSM_TRY(enqueue(state, kernel, team_groups(state, (size_t)call->rows * call->tiles), 1,
                    opencl_kernel_names[KERNEL_PROBS]));

    if (request->check_rows)
        PSM_TRY(check_rows_result(state, request));
    if (target != part[PART_PROBS])
        return PSM_OK;
    const size_t pitch = (size_t)probs->row_stride * sizeof(cl_float);
    const size_t row_bytes = (size_t)probs->vocab * sizeof(cl_float);
    if (probs->memory == PSM_MEMORY_DEVICE)
        return copy_rows(state, target, (cl_mem)probs->data, (size_t)probs->rows, row_bytes,
                         pitch);
    /* As in copy_rows: the rows before the last as a rectangle. */
    const size_t last_row = (size_t)(probs->rows - 1) * pitch;
    size_t origin[3] = {0, 0, 0};
    size_t region[3] = {row_bytes, (size_t)probs->rows - 1, 1};
    if (probs->rows > 1)
        CL_TRY(clEnqueueReadBufferRect(state->queue, target, CL_TRUE, origin, origin, region,
                                       pitch, 0, pitch, 0, probs->data, 0, NULL, NULL),
               "clEnqueueReadBufferRect");
    CL_TRY(clEnqueueReadBuffer(state->queue, target, CL_TRUE, last_row, row_bytes,
                               (char *)probs->data + last_row, 0, NULL, NULL),
           "clEnqueueReadBuffer");
    return PSM_OK;
}

psm_status opencl_probs(void *opaque, psm_request *request)
{
    launch call;
    PSM_TRY(prepare(opaque, request, 1, &call));
    return finish_call(&call, probs_call(&call));
}

psm_status opencl_synchronize(void *opaque)
{
    opencl_state *state = opaque;
    CL_TRY(clFinish(state->queue), "clFinish");
    return PSM_OK;
}

