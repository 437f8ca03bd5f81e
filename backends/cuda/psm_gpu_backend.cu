/*
 * psm_gpu_backend.cu: the host side of the CUDA backend (and, compiled as
 * HIP, of the HIP backend): device probe, context state, workspace, staging
 * of host-memory buffers, and the launches of psm_gpu_kernels.cuh.
 *
 * Every failure goes through psm_set_error with the runtime's message; the
 * code never prints, aborts or exits.
 *
 * Launches per call: the tile kernel and the row kernel (plus the check
 * kernel and one small copy in checking mode, the top-N kernel with
 * top_logprobs and the rank kernel with its sampled ranks), whatever the
 * batch size. A call with filters and few enough rows (each with two blocks
 * resident at once) launches the row kernel cooperatively with several
 * blocks per row (split rows, psm_gpu_kernels.cuh), where the device
 * supports it. With device buffers and no checking, a call queues only those
 * launches on the stream (no synchronisation, and no allocation once the
 * shape has been seen, or ever with a caller's workspace), so it can be
 * captured in a graph; the seed and offset given by pointer and the per-row
 * arrays are read by the kernels, so each replay of the graph reads their
 * current values.
 */
#include "psm_gpu_kernels.cuh"
#include "psm_gpu_processing.cuh"
#include "psm_gpu_sharded.cuh"
#include "psm_gpu_verify.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dlfcn.h>

extern "C" {
#include "alloc.h"
#include "backend.h"
#include "error.h"
#include "module.h"
#include "verify_backend.h"
}

namespace PSM_GPU_NAMESPACE {
namespace {

/* The kernel instantiations of one wave size, indexed by dtype (and, for
 * the tile kernel, by whether it processes the rows as it reads them; for
 * the row kernel, by variant: plain, filtered, filtered in an engine's
 * filter order, plain processing its rows as it reads them; and by probs
 * mode). */
typedef void (*kernel_fn)(const psm_gpu_call);
typedef void (*top_kernel_fn)(const psm_gpu_call, const psm_gpu_top_call);
struct kernel_set {
    int warp_size;
    kernel_fn tile[3][2];
    kernel_fn check;
    kernel_fn row[3][4][2];
    top_kernel_fn top[3];  /* by the dtype the mode reads */
    top_kernel_fn rank[3]; /* likewise */
};

template <int WarpSize, int Dtype>
void add_dtype_kernels(kernel_set *set)
{
    set->tile[Dtype][0] = psm_gpu_tile_kernel<WarpSize, Dtype, false>;
    set->tile[Dtype][1] = psm_gpu_tile_kernel<WarpSize, Dtype, true>;
    set->row[Dtype][0][0] = psm_gpu_row_kernel<WarpSize, Dtype, false, false>;
    set->row[Dtype][0][1] = psm_gpu_row_kernel<WarpSize, Dtype, false, true>;
    set->row[Dtype][1][0] = psm_gpu_row_kernel<WarpSize, Dtype, true, false>;
    set->row[Dtype][1][1] = psm_gpu_row_kernel<WarpSize, Dtype, true, true>;
    set->row[Dtype][2][0] = psm_gpu_row_kernel<WarpSize, Dtype, true, false, true>;
    set->row[Dtype][2][1] = psm_gpu_row_kernel<WarpSize, Dtype, true, true, true>;
    set->row[Dtype][3][0] = psm_gpu_row_kernel<WarpSize, Dtype, false, false, false, true>;
    set->row[Dtype][3][1] = psm_gpu_row_kernel<WarpSize, Dtype, false, true, false, true>;
    set->top[Dtype] = psm_gpu_top_kernel<WarpSize, Dtype>;
    set->rank[Dtype] = psm_gpu_rank_kernel<WarpSize, Dtype>;
}

template <int WarpSize>
void fill_kernel_set(kernel_set *set)
{
    set->warp_size = WarpSize;
    add_dtype_kernels<WarpSize, PSM_DTYPE_F32>(set);
    add_dtype_kernels<WarpSize, PSM_DTYPE_F16>(set);
    add_dtype_kernels<WarpSize, PSM_DTYPE_BF16>(set);
    set->check = psm_gpu_check_kernel<WarpSize>;
}

/* The set built for a device's warp size; false when this build has none. */
bool select_kernel_set(int warp_size, kernel_set *set)
{
    if (warp_size == 32) {
        fill_kernel_set<32>(set);
        return true;
    }
#if PSM_GPU_HAS_WAVE64
    if (warp_size == 64) {
        fill_kernel_set<64>(set);
        return true;
    }
#endif
    return false;
}

struct psm_gpu_state {
    int device;
    psm_gpu_stream_t stream;
    int owns_stream;
    int multiprocessors;
    kernel_set kernels;      /* for the device's warp size */
    /* split rows: how many blocks of the filtered row kernel (by dtype and
     * probs mode) can be resident at once; 0 without cooperative launch */
    psm_i64 split_capacity[3][2];
    /* the most rows a split call may have: every row at least two blocks
     * resident at once, and never fewer than the multiprocessors */
    psm_i64 split_pool_rows;
    psm_gpu_split_row *split_rows; /* split_pool_rows pools */
    /* The split pools above and the bad-row flag are allocated with the
     * context, sized by the device and not by a request, and every call uses
     * them, a call with a caller's workspace too. */
    unsigned long long *first_bad_row;      /* device */
    unsigned long long *first_bad_row_host; /* pinned */

    /* The context's own per-call buffers, grown on demand (a call with a
     * caller's workspace carves its own from that instead, call_memory):
     * the per-tile workspace (see psm_gpu_call), and device copies of
     * host-memory inputs and outputs. */
    void *tiles;
    size_t tile_capacity;
    void *staged_logits;
    size_t staged_logits_bytes;
    void *staged_params;
    size_t staged_params_bytes;
    void *staged_outputs;
    size_t staged_outputs_bytes;
    /* logit processing: processed rows and counts, and host arrays' staging */
    void *processed;
    size_t processed_bytes;
    void *staged_processing;
    size_t staged_processing_bytes;
    /* top-N logprobs: the rows' filter values, the raw mode's tile keys and
     * the stagings of host outputs (place_top_logprobs) */
    void *top;
    size_t top_bytes;
    /* psm_verify: its staged inputs, rows' rules, checks and staged outputs
     * (verify_place) */
    void *verify;
    size_t verify_bytes;
    /* a sharded call's pass: its items, tile keys, out words and staged
     * logits (shard_pass) */
    void *shard;
    size_t shard_bytes;
};

/* Every device (and pinned host) allocation of the backend, so that test
 * builds can make any of them fail (core/alloc.h). */
psm_gpu_error_t device_malloc(void **buffer, size_t bytes)
{
    if (psm_fault_device_allocation()) {
        *buffer = NULL;
        return psm_gpu_error_out_of_memory;
    }
    return psm_gpu_malloc(buffer, bytes);
}

psm_gpu_error_t pinned_malloc(void **buffer, size_t bytes)
{
    if (psm_fault_device_allocation()) {
        *buffer = NULL;
        return psm_gpu_error_out_of_memory;
    }
    return psm_gpu_malloc_host(buffer, bytes);
}

psm_status gpu_failure(psm_gpu_error_t error, const char *what)
{
    psm_status status =
        error == psm_gpu_error_out_of_memory ? PSM_ERR_OUT_OF_MEMORY : PSM_ERR_DRIVER;
    /* Clear the sticky last error so that the next call starts clean. */
    (void)psm_gpu_get_last_error();
    return psm_set_error(status, "%s backend: %s failed: %s", PSM_GPU_RUNTIME_NAME, what,
                         psm_gpu_error_string(error));
}

#define PSM_GPU_TRY(call, what)                          \
    do {                                                 \
        psm_gpu_error_t psm_gpu_error_ = (call);         \
        if (psm_gpu_error_ != psm_gpu_success)           \
            return gpu_failure(psm_gpu_error_, (what));  \
    } while (0)

/* Makes the context's device current for this thread; a no-op when it is
 * already (the common case, and the one inside a graph capture). */
psm_status select_device(const psm_gpu_state *state)
{
    int current = -1;
    PSM_GPU_TRY(psm_gpu_get_device(&current), "reading the current device");
    if (current != state->device)
        PSM_GPU_TRY(psm_gpu_set_device(state->device), "selecting the device");
    return PSM_OK;
}

size_t dtype_bytes(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

psm_i64 tiles_per_row(psm_i64 vocab)
{
    return (vocab + PSM_TILE - 1) / PSM_TILE;
}

/* Grows a device buffer to at least `bytes`; the old contents are dropped. */
psm_status grow_buffer(void **buffer, size_t *capacity, size_t bytes, const char *what)
{
    if (bytes <= *capacity)
        return PSM_OK;
    if (*buffer) {
        /* cudaFree waits for the device, so queued work that still reads the
         * old buffer finishes first. */
        PSM_GPU_TRY(psm_gpu_free(*buffer), what);
        *buffer = NULL;
        *capacity = 0;
    }
    size_t rounded = bytes + bytes / 4; /* some headroom against regrowth */
    PSM_GPU_TRY(device_malloc(buffer, rounded), what);
    *capacity = rounded;
    return PSM_OK;
}

/* Bytes of workspace per tile: key, mass, prefix (u64), info (u32) and the
 * lane maxima (one u32 per lane, for the widest wave). */
const int max_warp_size = 64;
const size_t tile_workspace_bytes =
    3 * sizeof(psm_u64) + sizeof(psm_u32) + max_warp_size * sizeof(psm_u32);

/* The tiles of `rows` rows of `vocab` tokens. Within a call's bounds
 * (rows x vocab < 2^60) their byte count can still pass 2^64 (2^59 one-token
 * rows); such a workspace exists nowhere, and wrapped around it would look
 * small. The bound leaves room for grow_buffer's quarter. */
psm_status count_tiles(psm_i64 rows, psm_i64 vocab, size_t *tiles)
{
    *tiles = (size_t)rows * (size_t)tiles_per_row(vocab);
    if (*tiles > SIZE_MAX / 2 / tile_workspace_bytes)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                             "%s backend: a tile workspace for %lld rows of %lld tokens is "
                             "beyond any device's memory",
                             PSM_GPU_RUNTIME_NAME, (long long)rows, (long long)vocab);
    return PSM_OK;
}

psm_status reserve_tiles(psm_gpu_state *state, psm_i64 rows, psm_i64 vocab)
{
    size_t tiles = 0;
    psm_status status = count_tiles(rows, vocab, &tiles);
    if (status != PSM_OK || tiles <= state->tile_capacity)
        return status;
    size_t capacity_bytes = state->tile_capacity * tile_workspace_bytes;
    status = grow_buffer(&state->tiles, &capacity_bytes, tiles * tile_workspace_bytes,
                         "allocating the tile workspace");
    if (status != PSM_OK) {
        state->tile_capacity = 0;
        return status;
    }
    state->tile_capacity = capacity_bytes / tile_workspace_bytes;
    return PSM_OK;
}

void release_state(psm_gpu_state *state)
{
    if (state->stream)
        (void)psm_gpu_stream_synchronize(state->stream);
    if (state->tiles)
        (void)psm_gpu_free(state->tiles);
    if (state->split_rows)
        (void)psm_gpu_free(state->split_rows);
    if (state->first_bad_row)
        (void)psm_gpu_free(state->first_bad_row);
    if (state->first_bad_row_host)
        (void)psm_gpu_free_host(state->first_bad_row_host);
    if (state->staged_logits)
        (void)psm_gpu_free(state->staged_logits);
    if (state->staged_params)
        (void)psm_gpu_free(state->staged_params);
    if (state->staged_outputs)
        (void)psm_gpu_free(state->staged_outputs);
    if (state->processed)
        (void)psm_gpu_free(state->processed);
    if (state->staged_processing)
        (void)psm_gpu_free(state->staged_processing);
    if (state->top)
        (void)psm_gpu_free(state->top);
    if (state->verify)
        (void)psm_gpu_free(state->verify);
    if (state->shard)
        (void)psm_gpu_free(state->shard);
    if (state->owns_stream && state->stream)
        (void)psm_gpu_stream_destroy(state->stream);
    (void)psm_gpu_get_last_error();
    free(state);
}

#if PSM_GPU_HIP
/* Asks the device which wave size its code object was compiled for (the
 * kernels of another size compile to nothing there), so that a device whose
 * code disagrees with its reported warpSize (an RDNA target built with
 * -mwavefrontsize64, say) is refused instead of running empty kernels. */
psm_status check_device_wave_size(psm_gpu_state *state)
{
    psm_gpu_stream_t stream;
    PSM_GPU_TRY(psm_gpu_stream_create_non_blocking(&stream), "creating a stream");
    *state->first_bad_row_host = 0;
    psm_gpu_wave_size_kernel<<<1, 1, 0, stream>>>(state->first_bad_row);
    psm_gpu_error_t error = psm_gpu_get_last_error();
    if (error == psm_gpu_success)
        error = psm_gpu_memcpy_async(state->first_bad_row_host, state->first_bad_row,
                                     sizeof *state->first_bad_row, psm_gpu_memcpy_device_to_host,
                                     stream);
    if (error == psm_gpu_success)
        error = psm_gpu_stream_synchronize(stream);
    (void)psm_gpu_stream_destroy(stream);
    if (error != psm_gpu_success)
        return gpu_failure(error, "reading the wave size of the device code");
    const unsigned long long compiled = *state->first_bad_row_host;
    if (compiled != (unsigned long long)state->kernels.warp_size)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s device %d reports warp size %d, but its code object was "
                             "compiled for wave size %llu",
                             PSM_GPU_RUNTIME_NAME, state->device, state->kernels.warp_size,
                             compiled);
    return PSM_OK;
}
#endif

/* Split rows need a cooperative launch of the filtered row kernel; its
 * capacity is the occupancy the runtime reports for each variant. A device
 * or runtime that cannot tell leaves rows unsplit. Also sets the rows whose
 * pools the context holds (split_pool_rows). */
void find_split_capacity(psm_gpu_state *state)
{
    int cooperative = 0;
    memset(state->split_capacity, 0, sizeof state->split_capacity);
    state->split_pool_rows = state->multiprocessors;
    if (psm_gpu_cooperative_supported(&cooperative, state->device) != psm_gpu_success ||
        !cooperative) {
        (void)psm_gpu_get_last_error();
        return;
    }
    for (int dtype = 0; dtype < 3; ++dtype)
        for (int probs = 0; probs < 2; ++probs) {
            int per_multiprocessor = 0;
            if (psm_gpu_occupancy_blocks(&per_multiprocessor, state->kernels.row[dtype][1][probs],
                                         PSM_GPU_ROW_THREADS) != psm_gpu_success) {
                (void)psm_gpu_get_last_error();
                per_multiprocessor = 0;
            }
            const psm_i64 capacity = (psm_i64)per_multiprocessor * state->multiprocessors;
            state->split_capacity[dtype][probs] = capacity;
            if (capacity / 2 > state->split_pool_rows)
                state->split_pool_rows = capacity / 2;
        }
}

/* ---- one call's device memory -------------------------------------------- */

/* Checked addition of sizes: false when the sum would not fit. */
bool add_bytes(size_t *total, size_t more)
{
    if (more > SIZE_MAX - *total)
        return false;
    *total += more;
    return true;
}

/* Buffers carved from a caller's workspace start on this boundary, so that
 * any workspace pointer works and every buffer suits 16-byte loads. */
const size_t workspace_alignment = 256;

size_t workspace_round(size_t bytes)
{
    return (bytes + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
}

/* One host-memory per-row input (a per-row array, or the seed or offset
 * given by pointer: one value) and the call's pointer that its device copy
 * replaces. */
struct staged_array {
    const void *host; /* NULL: the request has none */
    size_t bytes;
    const void **device;
};
const int staged_array_count = 10;

/* The request's per-row inputs in staging order: the 8-byte ones first, so
 * that each copy stays 8-byte aligned in one staging buffer. */
void list_staged_arrays(const psm_params *p, size_t rows, psm_row_arrays *arrays,
                        staged_array list[staged_array_count])
{
    list[0] = {p->seed_per_row, rows * sizeof(psm_u64), (const void **)&arrays->seed};
    list[1] = {p->offset_per_row, rows * sizeof(psm_u64), (const void **)&arrays->offset};
    list[2] = {p->row_indices, rows * sizeof(psm_i64), (const void **)&arrays->logits_row};
    list[3] = {p->seed_pointer, sizeof(psm_u64), (const void **)&arrays->seed_pointer};
    list[4] = {p->offset_pointer, sizeof(psm_u64), (const void **)&arrays->offset_pointer};
    list[5] = {p->temperature_per_row, rows * sizeof(float), (const void **)&arrays->temperature};
    list[6] = {p->top_k_per_row, rows * sizeof(psm_i32), (const void **)&arrays->top_k};
    list[7] = {p->top_p_per_row, rows * sizeof(float), (const void **)&arrays->top_p};
    list[8] = {p->min_p_per_row, rows * sizeof(float), (const void **)&arrays->min_p};
    list[9] = {p->subsequence_per_row, rows * sizeof(psm_u32),
               (const void **)&arrays->subsequence};
}

/* The arrays of a call's logit processing in staging order (8-byte ones
 * first). A token list's length is its offsets' last entry, read on the
 * host: host lists only. */
const int staged_processing_count = 11;

void list_staged_processing(const psm_logit_processing *p, const psm_request *request,
                            psm_processing_arrays *arrays, const psm_u32 **mask,
                            staged_array list[staged_processing_count])
{
    const size_t rows = (size_t)request->rows;
    const size_t offsets = (rows + 1) * sizeof(psm_i64);
    const size_t words = (size_t)(p->allowed_mask_words ? p->allowed_mask_words
                                                        : (request->logits.vocab + 31) / 32);
    const size_t history = p->history_offsets ? (size_t)p->history_offsets[rows] : 0;
    const size_t prompt = p->prompt_offsets ? (size_t)p->prompt_offsets[rows] : 0;
    const size_t bias = p->bias_offsets ? (size_t)p->bias_offsets[rows] : 0;
    list[0] = {p->history_offsets, offsets, (const void **)&arrays->history_offsets};
    list[1] = {p->prompt_offsets, offsets, (const void **)&arrays->prompt_offsets};
    list[2] = {p->bias_offsets, offsets, (const void **)&arrays->bias_offsets};
    list[3] = {p->history_tokens, history * sizeof(psm_i32), (const void **)&arrays->history_tokens};
    list[4] = {p->prompt_tokens, prompt * sizeof(psm_i32), (const void **)&arrays->prompt_tokens};
    list[5] = {p->bias_tokens, bias * sizeof(psm_i32), (const void **)&arrays->bias_tokens};
    list[6] = {p->bias_values, bias * sizeof(float), (const void **)&arrays->bias_values};
    list[7] = {p->allowed_mask, rows * words * sizeof(psm_u32), (const void **)mask};
    list[8] = {p->repetition_penalty_per_row, rows * sizeof(float),
               (const void **)&arrays->repetition_per_row};
    list[9] = {p->frequency_penalty_per_row, rows * sizeof(float),
               (const void **)&arrays->frequency_per_row};
    list[10] = {p->presence_penalty_per_row, rows * sizeof(float),
                (const void **)&arrays->presence_per_row};
}

/* The device memory one call needs, in bytes: the tile workspace of its
 * output rows and the stagings of its host-memory inputs and outputs. The
 * sizes follow from the request's shapes, memory kinds and which per-row
 * pointers it has, never from its data pointers, so that a workspace size
 * query (whose data pointers may still be NULL) and the call agree. */
struct call_plan {
    size_t tile_count;
    size_t tiles_bytes;
    size_t logits_bytes;   /* host logits: a dense copy of every logits row */
    size_t params_bytes;   /* host logits: their per-row inputs (staged_array) */
    size_t tokens_bytes;   /* host tokens */
    size_t logprobs_bytes; /* host logprobs */
    size_t probs_bytes;    /* host probs */
    size_t outputs_bytes;  /* tokens then logprobs, or probs: one staging */
    size_t processed_bytes;  /* logit processing: processed or overlay rows, counts, listed bits */
    size_t processing_bytes; /* host logits with processing: its arrays (staged_array) */
    /* top-N logprobs, each from a workspace_alignment boundary: */
    size_t kept_filters_bytes; /* the rows' filter values */
    size_t top_key_bytes;      /* raw mode: a key per tile */
    size_t top_tokens_bytes;   /* host outputs' stagings */
    size_t top_logprobs_bytes;
    size_t top_ranks_bytes;
    size_t top_bytes;          /* all of the above */
};

psm_status too_large(const psm_request *request)
{
    return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                         "%s backend: the buffers of a call of %lld rows of %lld tokens are "
                         "beyond any device's memory",
                         PSM_GPU_RUNTIME_NAME, (long long)request->rows,
                         (long long)request->logits.vocab);
}

/* Whether a call's logit processing is applied as its rows are read
 * (core/backend.h says when that may be): psm_probs' kernels apply it too. */
bool processing_on_read(const psm_request *request)
{
    return psm_processing_on_read_possible(request) != 0;
}

psm_status plan_call(const psm_request *request, bool probs_mode, call_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    const psm_tensor *logits = &request->logits;
    /* Core's validation bounds rows x vocab, rows x num_samples and
     * logits rows x row stride by 2^60, so the products of whole
     * outputs and logits below fit; the tiles and the per-row inputs are
     * checked. */
    const size_t rows = (size_t)request->rows;
    const size_t vocab = (size_t)logits->vocab;
    psm_status status = count_tiles(request->rows, logits->vocab, &plan->tile_count);
    if (status != PSM_OK)
        return status;
    plan->tiles_bytes = plan->tile_count * tile_workspace_bytes;

    if (logits->memory == PSM_MEMORY_HOST) {
        plan->logits_bytes = (size_t)logits->rows * vocab * dtype_bytes(logits->dtype);
        psm_row_arrays unused;
        staged_array list[staged_array_count];
        if (rows > SIZE_MAX / sizeof(psm_u64))
            return too_large(request);
        list_staged_arrays(&request->params, rows, &unused, list);
        for (int a = 0; a < staged_array_count; ++a)
            if (list[a].host && !add_bytes(&plan->params_bytes, list[a].bytes))
                return too_large(request);
    }

    if (psm_processing_active(&request->params)) {
        /* Processed rows (f32), or where the processing is applied as the
         * rows are read, overlay rows (f32) and their listed bits when there
         * are lists; with lists, their counts (u32). */
        const bool lists = psm_processing_has_lists(&request->params);
        if (processing_on_read(request))
            plan->processed_bytes =
                lists ? 2 * rows * vocab * sizeof(float) +
                            rows * (size_t)psm_listed_words((psm_i64)vocab) * sizeof(psm_u32)
                      : 0;
        else
            plan->processed_bytes = (lists ? 2 : 1) * rows * vocab * sizeof(float);
        if (logits->memory == PSM_MEMORY_HOST) {
            psm_processing_arrays unused;
            const psm_u32 *unused_mask;
            staged_array list[staged_processing_count];
            list_staged_processing(request->params.processing, request, &unused, &unused_mask,
                                   list);
            for (int a = 0; a < staged_processing_count; ++a)
                if (list[a].host && !add_bytes(&plan->processing_bytes, workspace_round(list[a].bytes)))
                    return too_large(request);
        }
    }

    if (probs_mode) {
        if (request->probs.memory == PSM_MEMORY_HOST)
            plan->probs_bytes = rows * vocab * sizeof(float);
        plan->outputs_bytes = plan->probs_bytes;
    } else {
        const size_t samples = rows * (size_t)request->params.num_samples;
        if (request->tokens.memory == PSM_MEMORY_HOST)
            plan->tokens_bytes = samples * sizeof(psm_i32);
        /* Counted whenever logprobs name host memory: at a size query their
         * data may still be NULL. */
        if (request->logprobs.memory == PSM_MEMORY_HOST)
            plan->logprobs_bytes = samples * sizeof(float);
        plan->outputs_bytes = plan->tokens_bytes + plan->logprobs_bytes;
        const psm_top_logprobs *top = request->params.top_logprobs;
        if (top) {
            const size_t entries = rows * (size_t)top->count;
            plan->kept_filters_bytes = rows * sizeof(psm_gpu_kept_filters);
            if (top->mode == PSM_LOGPROBS_RAW)
                plan->top_key_bytes = plan->tile_count * sizeof(psm_u64);
            if (top->tokens.memory == PSM_MEMORY_HOST)
                plan->top_tokens_bytes = entries * sizeof(psm_i32);
            if (top->logprobs.memory == PSM_MEMORY_HOST)
                plan->top_logprobs_bytes = entries * sizeof(float);
            /* Counted whatever sampled_ranks.data is, as logprobs are. */
            if (top->sampled_ranks.memory == PSM_MEMORY_HOST)
                plan->top_ranks_bytes = samples * sizeof(psm_i32);
            const size_t parts[] = {plan->kept_filters_bytes, plan->top_key_bytes,
                                    plan->top_tokens_bytes, plan->top_logprobs_bytes,
                                    plan->top_ranks_bytes};
            for (size_t part : parts)
                if (!add_bytes(&plan->top_bytes, workspace_round(part)))
                    return too_large(request);
        }
    }
    return PSM_OK;
}

/* The caller's workspace a call needs: each buffer of the plan from a
 * workspace_alignment boundary, after up to workspace_alignment - 1 bytes
 * that align the first. */
psm_status workspace_bytes(const psm_request *request, const call_plan &plan, size_t *bytes)
{
    const size_t parts[] = {plan.tiles_bytes,     plan.logits_bytes,     plan.params_bytes,
                            plan.outputs_bytes,   plan.processed_bytes,  plan.processing_bytes,
                            plan.top_bytes};
    size_t total = workspace_alignment - 1;
    for (size_t part : parts)
        if (part > SIZE_MAX - workspace_alignment || !add_bytes(&total, workspace_round(part)))
            return too_large(request);
    *bytes = total;
    return PSM_OK;
}

/* Where one call's buffers are: the context's own, or a caller's workspace. */
struct call_memory {
    unsigned char *tiles;
    size_t tile_count; /* tiles the tile arrays have room for */
    void *logits;      /* staging for host logits */
    void *params;      /* staging for host per-row inputs */
    void *outputs;     /* staging for host outputs */
    void *processed;   /* logit processing: as call_plan.processed_bytes */
    void *processing;  /* staging for host processing arrays */
    void *top;         /* top-N logprobs: place_top_logprobs' parts */
};

void carve_workspace(void *workspace, const call_plan &plan, call_memory *memory)
{
    const uintptr_t first = ((uintptr_t)workspace + workspace_alignment - 1) /
                            workspace_alignment * workspace_alignment;
    unsigned char *next = (unsigned char *)first;
    memory->tiles = next;
    memory->tile_count = plan.tile_count;
    next += workspace_round(plan.tiles_bytes);
    memory->logits = next;
    next += workspace_round(plan.logits_bytes);
    memory->params = next;
    next += workspace_round(plan.params_bytes);
    memory->outputs = next;
    next += workspace_round(plan.outputs_bytes);
    memory->processed = next;
    next += workspace_round(plan.processed_bytes);
    memory->processing = next;
    next += workspace_round(plan.processing_bytes);
    memory->top = next;
}

/* The context's own buffers, grown to the plan. */
psm_status own_memory(psm_gpu_state *state, const psm_request *request, const call_plan &plan,
                      call_memory *memory)
{
    psm_status status = reserve_tiles(state, request->rows, request->logits.vocab);
    if (status != PSM_OK)
        return status;
    /* Output staging first: growing a buffer may wait for the device, which
     * must not happen after inputs were queued into another staging buffer.
     * Unlike a caller's workspace, it holds logprobs only when the call has
     * them, so that a call without them never grows it for nothing. */
    const size_t outputs_bytes =
        plan.outputs_bytes - (request->logprobs.data ? 0 : plan.logprobs_bytes);
    if (outputs_bytes) {
        status = grow_buffer(&state->staged_outputs, &state->staged_outputs_bytes, outputs_bytes,
                             "allocating staging for host outputs");
        if (status != PSM_OK)
            return status;
    }
    /* Both input stagings before any copy is queued into them. */
    if (plan.logits_bytes) {
        status = grow_buffer(&state->staged_logits, &state->staged_logits_bytes, plan.logits_bytes,
                             "allocating staging for host logits");
        if (status != PSM_OK)
            return status;
    }
    if (plan.params_bytes) {
        status = grow_buffer(&state->staged_params, &state->staged_params_bytes, plan.params_bytes,
                             "allocating staging for per-row parameters");
        if (status != PSM_OK)
            return status;
    }
    if (plan.processed_bytes) {
        status = grow_buffer(&state->processed, &state->processed_bytes, plan.processed_bytes,
                             "allocating the processed logits");
        if (status != PSM_OK)
            return status;
    }
    if (plan.processing_bytes) {
        status = grow_buffer(&state->staged_processing, &state->staged_processing_bytes,
                             plan.processing_bytes, "allocating staging for logit processing");
        if (status != PSM_OK)
            return status;
    }
    if (plan.top_bytes) {
        status = grow_buffer(&state->top, &state->top_bytes, plan.top_bytes,
                             "allocating the top-N logprobs' buffers");
        if (status != PSM_OK)
            return status;
    }
    memory->top = state->top;
    memory->processed = state->processed;
    memory->processing = state->staged_processing;
    memory->tiles = (unsigned char *)state->tiles;
    memory->tile_count = state->tile_capacity;
    memory->logits = state->staged_logits;
    memory->params = state->staged_params;
    memory->outputs = state->staged_outputs;
    return PSM_OK;
}

/* ---- one call --------------------------------------------------------------- */

/* Device pointers for one call: host-memory inputs are copied into staging,
 * host-memory outputs are written to staging and copied back afterwards. */
struct call_buffers {
    psm_gpu_call call;
    psm_gpu_top_call top; /* with top_logprobs */
    void *host_top_tokens;
    void *host_top_logprobs;
    void *host_top_ranks;
    bool processing_active;
    bool processing_on_read; /* processing_on_read(): no processed copy */
    psm_gpu_processing processing;
    void *host_tokens;
    void *host_logprobs;
    void *host_probs;
    psm_i64 host_probs_stride;
};

psm_status stage_inputs(psm_gpu_state *state, const psm_request *request,
                        const call_memory &memory, psm_gpu_call *call)
{
    const psm_tensor *logits = &request->logits;
    const psm_params *params = &request->params;
    const size_t element_bytes = dtype_bytes(logits->dtype);

    call->logits = logits->data;
    call->rows = request->rows;
    call->vocab = logits->vocab;
    call->row_stride = logits->row_stride;
    call->scalars = psm_request_row_scalars(request);
    call->per_row = psm_request_per_row(params);
    call->per_row_arrays = psm_request_row_arrays(params);
    call->num_samples = params->num_samples;
    call->filter_order = params->filter_order;
    call->weight_bits = psm_weight_bits(logits->vocab);

    if (logits->memory == PSM_MEMORY_HOST) {
        /* Every logits row, since the kernels gather output rows from them. */
        const size_t row_bytes = (size_t)logits->vocab * element_bytes;
        PSM_GPU_TRY(psm_gpu_memcpy_2d_async(memory.logits, row_bytes, logits->data,
                                            (size_t)logits->row_stride * element_bytes, row_bytes,
                                            (size_t)logits->rows, psm_gpu_memcpy_host_to_device,
                                            state->stream),
                    "copying host logits to the device");
        call->logits = memory.logits;
        call->row_stride = logits->vocab;

        /* Per-row inputs live in the logits' memory: stage them too. */
        staged_array list[staged_array_count];
        list_staged_arrays(params, (size_t)request->rows, &call->per_row_arrays, list);
        unsigned char *staging = (unsigned char *)memory.params;
        for (int a = 0; a < staged_array_count; ++a) {
            if (!list[a].host)
                continue;
            PSM_GPU_TRY(psm_gpu_memcpy_async(staging, list[a].host, list[a].bytes,
                                             psm_gpu_memcpy_host_to_device, state->stream),
                        "copying per-row parameters to the device");
            *list[a].device = staging;
            staging += list[a].bytes;
        }
    }

    uintptr_t base = (uintptr_t)call->logits;
    call->logits_aligned = base % 16 == 0 && ((size_t)call->row_stride * element_bytes) % 16 == 0;
    return PSM_OK;
}

/* Logit processing's device view: the caller's arrays, or with host logits
 * their staged copies; the processed rows and counts from the call's
 * memory. */
psm_status stage_processing(psm_gpu_state *state, const psm_request *request,
                            const call_memory &memory, call_buffers *buffers)
{
    const psm_logit_processing *p = request->params.processing;
    psm_gpu_processing &processing = buffers->processing;
    buffers->processing_active = true;
    processing.arrays = psm_request_processing_arrays(p);
    processing.mask = p->allowed_mask;
    processing.mask_words =
        p->allowed_mask_words ? p->allowed_mask_words : (request->logits.vocab + 31) / 32;
    const size_t cells = (size_t)request->rows * (size_t)request->logits.vocab;
    const bool lists = psm_processing_has_lists(&request->params);
    buffers->processing_on_read = processing_on_read(request);
    processing.processed =
        !buffers->processing_on_read || lists ? (float *)memory.processed : NULL;
    processing.counts =
        lists ? (psm_u32 *)((unsigned char *)memory.processed + cells * sizeof(float)) : NULL;
    processing.listed = buffers->processing_on_read && lists
                            ? (psm_u32 *)((unsigned char *)memory.processed +
                                          2 * cells * sizeof(float))
                            : NULL;
    if (request->logits.memory != PSM_MEMORY_HOST)
        return PSM_OK;
    staged_array list[staged_processing_count];
    list_staged_processing(p, request, &processing.arrays, &processing.mask, list);
    unsigned char *staging = (unsigned char *)memory.processing;
    for (int a = 0; a < staged_processing_count; ++a) {
        if (!list[a].host)
            continue;
        if (list[a].bytes)
            PSM_GPU_TRY(psm_gpu_memcpy_async(staging, list[a].host, list[a].bytes,
                                             psm_gpu_memcpy_host_to_device, state->stream),
                        "copying logit-processing arrays to the device");
        *list[a].device = staging;
        staging += workspace_round(list[a].bytes);
    }
    return PSM_OK;
}

/* The processing kernels of one dtype: the read step (unless the rows are
 * processed as they are read), then the lists step when the call has lists
 * (without them the read step's values are final). */
template <int Dtype>
void launch_processing(psm_gpu_state *state, const psm_gpu_call &call,
                       const psm_gpu_processing &processing, psm_i64 blocks, psm_i64 row_blocks,
                       int lists, bool on_read)
{
    if (!on_read)
        psm_gpu_process_read_kernel<Dtype>
            <<<(unsigned)blocks, 256, 0, state->stream>>>(call, processing);
    const bool histories =
        (processing.arrays.present & (PSM_LISTS_HISTORY | PSM_LISTS_PROMPT)) != 0;
    if (lists)
        psm_gpu_process_lists_kernel<Dtype>
            <<<(unsigned)row_blocks, histories ? PSM_GPU_LISTS_THREADS : PSM_GPU_LISTS_THREADS_BIAS,
               0, state->stream>>>(call, processing);
}

/* Runs the processing kernels (psm_gpu_processing.cuh), then points the call
 * at the processed rows: f32, one per output row, no gather left to do; or,
 * where the rows are processed as they are read, gives the call the mask
 * and the listed tokens. Returns the dtype the sampling kernels then read. */
psm_status run_processing(psm_gpu_state *state, const psm_request *request,
                          call_buffers *buffers, psm_dtype *dtype)
{
    psm_gpu_call &call = buffers->call;
    const psm_gpu_processing &processing = buffers->processing;
    const bool on_read = buffers->processing_on_read;
    const int lists = psm_processing_has_lists(&request->params);
    if (on_read && lists)
        PSM_GPU_TRY(psm_gpu_memset_async(processing.listed, 0,
                                         (size_t)call.rows * (size_t)psm_listed_words(call.vocab) *
                                             sizeof(psm_u32),
                                         state->stream),
                    "clearing the listed-token bits");
    const psm_i64 cap = (psm_i64)state->multiprocessors * 32;
    const psm_i64 units =
        call.rows * ((call.vocab + PSM_GPU_PROCESS_SPAN - 1) / PSM_GPU_PROCESS_SPAN);
    const psm_i64 blocks = units < cap ? units : cap;
    const psm_i64 row_blocks = call.rows < cap ? call.rows : cap;
    switch (request->logits.dtype) {
    case PSM_DTYPE_F32:
        launch_processing<PSM_DTYPE_F32>(state, call, processing, blocks, row_blocks, lists,
                                         on_read);
        break;
    case PSM_DTYPE_F16:
        launch_processing<PSM_DTYPE_F16>(state, call, processing, blocks, row_blocks, lists,
                                         on_read);
        break;
    case PSM_DTYPE_BF16:
        launch_processing<PSM_DTYPE_BF16>(state, call, processing, blocks, row_blocks, lists,
                                          on_read);
        break;
    }
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the processing kernels");

    if (on_read) {
        call.read_mask = processing.mask;
        call.read_mask_words = processing.mask_words;
        call.read_listed = processing.listed;
        call.read_overlay = processing.processed;
        return PSM_OK;
    }

    call.logits = processing.processed;
    call.row_stride = call.vocab;
    call.per_row &= ~PSM_PER_ROW_LOGITS_ROW;
    call.scalars.logits_rows = call.rows;
    call.logits_aligned = (call.vocab * sizeof(float)) % 16 == 0; /* the base is carved aligned */
    *dtype = PSM_DTYPE_F32;
    return PSM_OK;
}

/* The top-N call's buffers: the rows' filter values, the raw
 * mode's tile keys, then the stagings of host outputs, each from a
 * workspace_alignment boundary of `top` (the call's top part). Where the
 * mode reads its logits is set by launch, before logit processing. */
void place_top_logprobs(const psm_request *request, const call_plan &plan, unsigned char *top,
                        call_buffers *buffers)
{
    const psm_top_logprobs *given = request->params.top_logprobs;
    psm_gpu_top_call &call = buffers->top;
    buffers->call.kept_filters = (psm_gpu_kept_filters *)top;
    top += workspace_round(plan.kept_filters_bytes);
    call.tile_key = (psm_u64 *)top;
    top += workspace_round(plan.top_key_bytes);
    call.raw_mode = given->mode == PSM_LOGPROBS_RAW;
    call.count = given->count;
    call.tokens = (psm_i32 *)given->tokens.data;
    call.logprobs = (float *)given->logprobs.data;
    call.ranks = (psm_i32 *)given->sampled_ranks.data;
    if (plan.top_tokens_bytes) {
        buffers->host_top_tokens = given->tokens.data;
        call.tokens = (psm_i32 *)top;
    }
    top += workspace_round(plan.top_tokens_bytes);
    if (plan.top_logprobs_bytes) {
        buffers->host_top_logprobs = given->logprobs.data;
        call.logprobs = (float *)top;
    }
    top += workspace_round(plan.top_logprobs_bytes);
    if (plan.top_ranks_bytes && given->sampled_ranks.data) {
        buffers->host_top_ranks = given->sampled_ranks.data;
        call.ranks = (psm_i32 *)top;
    }
}

/* Everything a call needs before its launches: its buffers (the context's,
 * grown if needed, or carved from the caller's workspace, which core checked
 * is large enough: then nothing is allocated) and its staged inputs. */
psm_status prepare_call(psm_gpu_state *state, psm_request *request, bool probs_mode,
                        call_buffers *buffers)
{
    memset(buffers, 0, sizeof *buffers);
    psm_gpu_call *call = &buffers->call;
    psm_status status = select_device(state);
    if (status != PSM_OK)
        return status;

    call_plan plan;
    status = plan_call(request, probs_mode, &plan);
    if (status != PSM_OK)
        return status;
    call_memory memory;
    if (request->params.workspace)
        carve_workspace(request->params.workspace, plan, &memory);
    else
        status = own_memory(state, request, plan, &memory);
    if (status != PSM_OK)
        return status;

    status = stage_inputs(state, request, memory, call);
    if (status == PSM_OK && psm_processing_active(&request->params))
        status = stage_processing(state, request, memory, buffers);
    if (status != PSM_OK)
        return status;

    call->tiles_per_row = tiles_per_row(request->logits.vocab);
    unsigned char *tiles = memory.tiles;
    const size_t tile_count = memory.tile_count;
    call->tile_key = (psm_u64 *)tiles;
    call->tile_mass = (psm_u64 *)(tiles + tile_count * sizeof(psm_u64));
    call->tile_prefix = (psm_u64 *)(tiles + 2 * tile_count * sizeof(psm_u64));
    call->tile_info = (psm_u32 *)(tiles + 3 * tile_count * sizeof(psm_u64));
    call->lane_max = (psm_u32 *)(tiles + 3 * tile_count * sizeof(psm_u64) +
                                 tile_count * sizeof(psm_u32));
    call->first_bad_row = state->first_bad_row;
    call->row_parts = 1; /* launch() may split rows */
    call->split = state->split_rows;

    unsigned char *outputs = (unsigned char *)memory.outputs;
    if (probs_mode) {
        call->probs = (float *)request->probs.data;
        call->probs_stride = request->probs.row_stride;
        if (plan.probs_bytes) {
            buffers->host_probs = request->probs.data;
            buffers->host_probs_stride = request->probs.row_stride;
            call->probs = (float *)outputs;
            call->probs_stride = request->logits.vocab;
        }
    } else {
        call->tokens = (psm_i32 *)request->tokens.data;
        call->logprobs = (float *)request->logprobs.data;
        if (plan.tokens_bytes) {
            buffers->host_tokens = request->tokens.data;
            call->tokens = (psm_i32 *)outputs;
        }
        if (plan.logprobs_bytes && request->logprobs.data) {
            buffers->host_logprobs = request->logprobs.data;
            call->logprobs = (float *)(outputs + plan.tokens_bytes);
        }
        if (request->params.top_logprobs)
            place_top_logprobs(request, plan, (unsigned char *)memory.top, buffers);
    }
    return PSM_OK;
}

/* Blocks per row of the row kernel: more than one only for calls that may
 * filter (a plain row's row-kernel work is per tile and per sample, not a
 * pass over the row) with few enough rows that each can have two blocks
 * resident at once, and only as many as can be resident together, each
 * with at least PSM_GPU_SPLIT_MIN_TILES tiles to read. */
#define PSM_GPU_SPLIT_MIN_TILES 2

psm_i64 row_parts(const psm_gpu_state *state, const psm_gpu_call &call, psm_dtype dtype,
                  bool filtered, bool probs_mode)
{
    const psm_i64 capacity = state->split_capacity[dtype][probs_mode ? 1 : 0];
    if (!filtered || capacity == 0 || call.rows > state->split_pool_rows)
        return 1;
    const psm_i64 by_work = (call.tiles_per_row + PSM_GPU_SPLIT_MIN_TILES - 1) / PSM_GPU_SPLIT_MIN_TILES;
    const psm_i64 by_room = capacity / call.rows;
    const psm_i64 parts = by_work < by_room ? by_work : by_room;
    return parts > 1 ? parts : 1;
}

psm_status launch(psm_gpu_state *state, psm_request *request, call_buffers *buffers,
                  bool probs_mode)
{
    psm_gpu_call &call = buffers->call;
    psm_dtype dtype = request->logits.dtype;
    /* The raw mode of top-N logprobs reads the logits as given. */
    psm_gpu_top_call &top = buffers->top;
    top.logits = call.logits;
    top.row_stride = call.row_stride;
    top.per_row = call.per_row;
    top.logits_rows = call.scalars.logits_rows;
    const psm_dtype given_dtype = dtype;
    if (buffers->processing_active) {
        psm_status status = run_processing(state, request, buffers, &dtype);
        if (status != PSM_OK)
            return status;
    }
    /* The same test as the kernels' psm_may_filter, over every row. */
    const bool filtered = psm_request_may_filter(request) != 0;
    call.row_parts = (psm_i32)row_parts(state, call, dtype, filtered, probs_mode);

    const psm_i64 total_tiles = call.rows * call.tiles_per_row;
    const kernel_set &kernels = state->kernels;
    const psm_i64 tiles_per_block = PSM_GPU_TILE_THREADS / kernels.warp_size;
    /* Too few tiles to give every multiprocessor a full block (a row or a
     * few): blocks of two warps, so that they spread over more of the GPU. */
    const bool few_tiles = total_tiles < tiles_per_block * state->multiprocessors;
    const psm_i64 tile_block_tiles = few_tiles ? 2 : tiles_per_block;
    psm_i64 tile_blocks = (total_tiles + tile_block_tiles - 1) / tile_block_tiles;
    const psm_i64 tile_block_cap = (psm_i64)state->multiprocessors * 64;
    if (tile_blocks > tile_block_cap)
        tile_blocks = tile_block_cap;
    kernels.tile[dtype][buffers->processing_on_read ? 1 : 0]<<<(unsigned)tile_blocks, (unsigned)(tile_block_tiles * kernels.warp_size), 0,
                          state->stream>>>(call);
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the tile kernel");

    if (request->check_rows) {
        PSM_GPU_TRY(psm_gpu_memset_async(state->first_bad_row, 0xff, sizeof *state->first_bad_row,
                                         state->stream),
                    "clearing the bad-row flag");
        psm_i64 check_blocks = (call.rows + tiles_per_block - 1) / tiles_per_block;
        if (check_blocks > tile_block_cap)
            check_blocks = tile_block_cap;
        kernels.check<<<(unsigned)check_blocks, PSM_GPU_TILE_THREADS, 0, state->stream>>>(call);
        PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the check kernel");
        PSM_GPU_TRY(psm_gpu_memcpy_async(state->first_bad_row_host, state->first_bad_row,
                                         sizeof *state->first_bad_row,
                                         psm_gpu_memcpy_device_to_host, state->stream),
                    "reading the bad-row flag");
        PSM_GPU_TRY(psm_gpu_stream_synchronize(state->stream), "waiting for the row check");
        const unsigned long long first_bad = *state->first_bad_row_host;
        if (first_bad != ~0ull) {
            request->first_bad_row = (int64_t)first_bad;
            return psm_set_error(PSM_ERR_BAD_ROW,
                                 "row %lld has a NaN or +inf logit, no finite logit, or a "
                                 "sampling parameter or row index out of range",
                                 (long long)first_bad);
        }
    }

    /* An engine's filter order has a variant of its own; it needs less
     * shared memory than the filtered one, so the split capacity of that
     * one holds for it too. */
    const int variant = !filtered ? (buffers->processing_on_read ? 3 : 0)
                        : call.filter_order == PSM_FILTER_ORDER_POLYSAMPLE ? 1
                                                                            : 2;
    const kernel_fn row_kernel = kernels.row[dtype][variant][probs_mode ? 1 : 0];
    bool row_launched = false;
    if (call.row_parts > 1) {
        void *arguments[] = {&call};
        const psm_gpu_error_t error =
            psm_gpu_launch_cooperative(row_kernel, (unsigned)(call.rows * call.row_parts),
                                       PSM_GPU_ROW_THREADS, arguments, state->stream);
        if (error == psm_gpu_error_cooperative_too_large) {
            /* Fewer multiprocessors are ours than the device has (MPS, say):
             * one block per row instead. Launch 1's clearing is harmless. */
            (void)psm_gpu_get_last_error();
            call.row_parts = 1;
        } else {
            PSM_GPU_TRY(error, "launching the split row kernel");
            row_launched = true;
        }
    }
    if (!row_launched) {
        const psm_i64 row_blocks = call.rows < (psm_i64)1 << 30 ? call.rows : (psm_i64)1 << 30;
        const unsigned row_threads = filtered ? PSM_GPU_ROW_THREADS : PSM_GPU_ROW_THREADS_PLAIN;
        row_kernel<<<(unsigned)row_blocks, row_threads, 0, state->stream>>>(call);
        PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the row kernel");
    }

    if (request->params.top_logprobs) {
        if (!top.raw_mode) {
            top.logits = call.logits;
            top.row_stride = call.row_stride;
            top.per_row = call.per_row;
            top.logits_rows = call.scalars.logits_rows;
        }
        const psm_dtype top_dtype = top.raw_mode ? given_dtype : dtype;
        const psm_i64 top_blocks = call.rows < (psm_i64)1 << 30 ? call.rows : (psm_i64)1 << 30;
        kernels.top[top_dtype]<<<(unsigned)top_blocks, PSM_GPU_TOP_THREADS, 0, state->stream>>>(
            call, top);
        PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the top-N logprobs kernel");
        if (top.ranks) {
            const psm_i64 units =
                call.rows * ((call.tiles_per_row + PSM_GPU_RANK_TILES - 1) / PSM_GPU_RANK_TILES);
            const psm_i64 cap = (psm_i64)state->multiprocessors * 8;
            kernels.rank[top_dtype]<<<(unsigned)(units < cap ? units : cap), PSM_GPU_TOP_THREADS,
                                      0, state->stream>>>(call, top);
            PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the rank kernel");
        }
    }

    /* Host outputs: copy back and wait, so the caller can read them. */
    if (buffers->host_probs) {
        const size_t row_bytes = (size_t)request->logits.vocab * sizeof(float);
        PSM_GPU_TRY(psm_gpu_memcpy_2d_async(buffers->host_probs,
                                            (size_t)buffers->host_probs_stride * sizeof(float),
                                            call.probs, row_bytes, row_bytes, (size_t)call.rows,
                                            psm_gpu_memcpy_device_to_host, state->stream),
                    "copying probabilities to the host");
    }
    const size_t samples = (size_t)call.rows * (size_t)call.num_samples;
    if (buffers->host_tokens)
        PSM_GPU_TRY(psm_gpu_memcpy_async(buffers->host_tokens, call.tokens, samples * sizeof(psm_i32),
                                         psm_gpu_memcpy_device_to_host, state->stream),
                    "copying tokens to the host");
    if (buffers->host_logprobs)
        PSM_GPU_TRY(psm_gpu_memcpy_async(buffers->host_logprobs, call.logprobs,
                                         samples * sizeof(float), psm_gpu_memcpy_device_to_host,
                                         state->stream),
                    "copying logprobs to the host");
    if (request->params.top_logprobs) {
        const size_t entries = (size_t)call.rows * (size_t)top.count;
        if (buffers->host_top_tokens)
            PSM_GPU_TRY(psm_gpu_memcpy_async(buffers->host_top_tokens, top.tokens,
                                             entries * sizeof(psm_i32),
                                             psm_gpu_memcpy_device_to_host, state->stream),
                        "copying top-N tokens to the host");
        if (buffers->host_top_logprobs)
            PSM_GPU_TRY(psm_gpu_memcpy_async(buffers->host_top_logprobs, top.logprobs,
                                             entries * sizeof(float),
                                             psm_gpu_memcpy_device_to_host, state->stream),
                        "copying top-N logprobs to the host");
        if (buffers->host_top_ranks)
            PSM_GPU_TRY(psm_gpu_memcpy_async(buffers->host_top_ranks, top.ranks,
                                             samples * sizeof(psm_i32),
                                             psm_gpu_memcpy_device_to_host, state->stream),
                        "copying the drawn tokens' ranks to the host");
    }
    if (buffers->host_probs || buffers->host_tokens || buffers->host_logprobs ||
        buffers->host_top_tokens || buffers->host_top_logprobs || buffers->host_top_ranks ||
        request->logits.memory == PSM_MEMORY_HOST)
        PSM_GPU_TRY(psm_gpu_stream_synchronize(state->stream), "waiting for host outputs");
    return PSM_OK;
}

psm_status run_request(void *opaque_state, psm_request *request, bool probs_mode)
{
    psm_gpu_state *state = (psm_gpu_state *)opaque_state;
    call_buffers buffers;
    psm_status status = prepare_call(state, request, probs_mode, &buffers);
    if (status != PSM_OK)
        return status;
    return launch(state, request, &buffers, probs_mode);
}


#define PSM_TRY_STATUS(call)                    \
    do {                                        \
        psm_status psm_try_status_ = (call);    \
        if (psm_try_status_ != PSM_OK)          \
            return psm_try_status_;             \
    } while (0)

/* ---- psm_verify ------------------------------------------------------------------
 * (docs/SAMPLING.md, section 7; the kernels are psm_gpu_verify.cuh.)
 * 1. Host inputs are copied to the device, into the context's verify buffer.
 * 2. The target rows (and draft logits rows) go through the sampling
 *    kernels as a plain call of their own (prepare_call, launch), each row
 *    with its request's filters (psm_gpu_verify_expand_kernel spreads
 *    per-request arrays to the rows) and kept_filters set; the rows kernel
 *    keeps each row's kept rule as a psm_verify_row.
 * 3. The check kernel (a block per request) writes each draft node's Q_x
 *    and status, each request's target check and the rows whose exact
 *    totals its walk needs (one list for the call, its count zeroed first),
 *    to the buffer; the totals kernel (a grid that fills the device, a
 *    block per part of a listed row in turn) those rows' totals.
 * 4. With host memory (read back anyway) or in checking mode (which waits
 *    for its check), the host reads the checks and fails the call as every
 *    backend does (core/verify_backend.h), before anything is written.
 *    Otherwise nothing waits: the walk kernel makes a request with a bad
 *    draft node bad (-1 everywhere).
 * 5. The walk kernel (a block per request) writes the outputs.
 * With device memory and a buffer already large enough (a call of the same
 * shape before), nothing is allocated and nothing waits: the call can be
 * captured in a CUDA graph. */

/* Parts of the verify buffer, each from a workspace_alignment boundary: a
 * pass with base NULL counts the bytes, the next one places them. */
struct verify_carve {
    unsigned char *base;
    size_t used;
};

void *verify_take(verify_carve *carve, size_t bytes)
{
    void *at = carve->base ? carve->base + carve->used : NULL;
    carve->used += workspace_round(bytes);
    return at;
}

struct verify_device {
    const void *target;
    const void *draft;
    const psm_i32 *tokens;
    const psm_i32 *parents;
    psm_row_arrays target_arrays;
    psm_row_arrays draft_arrays;
    float *filters[2][4]; /* target, draft: temperature, top-k, top-p, min-p per row */
    psm_gpu_kept_filters *kept[2];
    psm_i32 *row_tokens[2];
    psm_verify_row *rows[2];
    psm_u64 *node_drawn;
    psm_u64 *partials;
    psm_u32 *needed_rows;
    psm_u32 *needed_count;
    psm_i32 *node_status;
    psm_i32 *node_decided;
    psm_i32 *request_bad;
    psm_i32 *accepted, *tokens_out, *path_out;
    float *logprobs_out;
};

size_t verify_tensor_bytes(const psm_tensor *tensor)
{
    return ((size_t)(tensor->rows - 1) * (size_t)tensor->row_stride + (size_t)tensor->vocab) *
           dtype_bytes(tensor->dtype);
}

/* A psm_params' per-request arrays as device pointers: the caller's, or
 * copies of host arrays into the carve. */
psm_status verify_arrays_of(psm_gpu_state *state, const psm_params *params, psm_i64 requests,
                            bool host, verify_carve *carve, psm_row_arrays *out)
{
    *out = psm_request_row_arrays(params);
    const void **slots[] = {(const void **)&out->temperature, (const void **)&out->top_k,
                            (const void **)&out->top_p,       (const void **)&out->min_p,
                            (const void **)&out->seed,        (const void **)&out->offset,
                            (const void **)&out->subsequence, (const void **)&out->seed_pointer,
                            (const void **)&out->offset_pointer};
    const size_t element[] = {4, 4, 4, 4, 8, 8, 4, 8, 8};
    for (int a = 0; a < 9; ++a) {
        if (!host || !*slots[a])
            continue;
        const size_t bytes = element[a] * (a >= 7 ? 1 : (size_t)requests);
        void *copy = verify_take(carve, bytes);
        if (carve->base) {
            PSM_GPU_TRY(psm_gpu_memcpy_async(copy, *slots[a], bytes,
                                             psm_gpu_memcpy_host_to_device, state->stream),
                        "copying per-request parameters to the device");
            *slots[a] = copy;
        }
    }
    return PSM_OK;
}

/* The buffer's parts (carve->base NULL: only their size). */
psm_status verify_place(psm_gpu_state *state, const psm_verify_request *request,
                        verify_carve *carve, verify_device *d)
{
    const bool host = request->target.memory == PSM_MEMORY_HOST;
    const psm_i64 requests = request->requests, k = request->nodes;
    const size_t rows[2] = {(size_t)(requests * (k + 1)), (size_t)(requests * k)};
    const size_t width = rows[0];
    const psm_tensor *draft = psm_verify_draft_tensor(request);
    memset(d, 0, sizeof *d);
    d->target = request->target.data;
    d->draft = draft ? draft->data : NULL;
    d->tokens = request->tokens;
    d->parents = request->parents;
    struct copy {
        const void **device;
        const void *host;
        size_t bytes;
    } copies[] = {
        {&d->target, request->target.data, verify_tensor_bytes(&request->target)},
        {&d->draft, draft ? draft->data : NULL, draft ? verify_tensor_bytes(draft) : 0},
        {(const void **)&d->tokens, request->tokens, rows[1] * sizeof(psm_i32)},
        {(const void **)&d->parents, request->parents, rows[1] * sizeof(psm_i32)},
    };
    for (size_t c = 0; host && c < sizeof copies / sizeof copies[0]; ++c) {
        if (!copies[c].host)
            continue;
        void *at = verify_take(carve, copies[c].bytes);
        if (carve->base) {
            PSM_GPU_TRY(psm_gpu_memcpy_async(at, copies[c].host, copies[c].bytes,
                                             psm_gpu_memcpy_host_to_device, state->stream),
                        "copying psm_verify's inputs to the device");
            *copies[c].device = at;
        }
    }
    psm_status status =
        verify_arrays_of(state, &request->target_params, requests, host, carve, &d->target_arrays);
    if (status == PSM_OK && request->draft_logits.data)
        status = verify_arrays_of(state, &request->draft_params, requests, host, carve,
                                  &d->draft_arrays);
    if (status != PSM_OK)
        return status;
    const psm_params *params[2] = {&request->target_params, &request->draft_params};
    for (int which = 0; which < (request->draft_logits.data ? 2 : 1); ++which) {
        if (psm_verify_per_request_filters(params[which]))
            for (int f = 0; f < 4; ++f)
                d->filters[which][f] = (float *)verify_take(carve, rows[which] * sizeof(float));
        d->kept[which] =
            (psm_gpu_kept_filters *)verify_take(carve, rows[which] * sizeof(psm_gpu_kept_filters));
        d->row_tokens[which] = (psm_i32 *)verify_take(carve, rows[which] * sizeof(psm_i32));
        d->rows[which] = (psm_verify_row *)verify_take(carve, rows[which] * sizeof(psm_verify_row));
    }
    d->node_drawn = (psm_u64 *)verify_take(carve, rows[1] * sizeof(psm_u64));
    const psm_verify_call call = psm_verify_describe(request);
    d->partials = (psm_u64 *)verify_take(carve, (size_t)psm_verify_total_rows(call) *
                                                   (size_t)psm_verify_parts(call.vocab) *
                                                   sizeof(psm_u64));
    d->needed_rows = (psm_u32 *)verify_take(carve, (size_t)psm_verify_total_rows(call) *
                                                       sizeof(psm_u32));
    d->needed_count = (psm_u32 *)verify_take(carve, sizeof(psm_u32));
    d->node_status = (psm_i32 *)verify_take(carve, rows[1] * sizeof(psm_i32));
    d->node_decided = (psm_i32 *)verify_take(carve, rows[1] * sizeof(psm_i32));
    d->request_bad = (psm_i32 *)verify_take(carve, (size_t)requests * sizeof(psm_i32));
    const psm_verification *out = &request->outputs;
    d->accepted = (psm_i32 *)out->accepted.data;
    d->tokens_out = (psm_i32 *)out->tokens.data;
    d->path_out = (psm_i32 *)out->path_nodes.data;
    d->logprobs_out = (float *)out->logprobs.data;
    if (out->accepted.memory == PSM_MEMORY_HOST)
        d->accepted = (psm_i32 *)verify_take(carve, (size_t)requests * sizeof(psm_i32));
    if (out->tokens.memory == PSM_MEMORY_HOST)
        d->tokens_out = (psm_i32 *)verify_take(carve, width * sizeof(psm_i32));
    if (out->path_nodes.data && out->path_nodes.memory == PSM_MEMORY_HOST)
        d->path_out = (psm_i32 *)verify_take(carve, width * sizeof(psm_i32));
    if (out->logprobs.data && out->logprobs.memory == PSM_MEMORY_HOST)
        d->logprobs_out = (float *)verify_take(carve, width * sizeof(float));
    return PSM_OK;
}

/* A psm_gpu_call of the per-request parameters (what psm_gpu_row_params
 * reads), for the expand, check and walk kernels. */
psm_gpu_call verify_by_request(const psm_params *params, const psm_row_arrays &arrays,
                               psm_i64 requests)
{
    psm_gpu_call call;
    memset(&call, 0, sizeof call);
    call.rows = requests;
    call.scalars = psm_params_row_scalars(params, requests);
    call.per_row = psm_request_per_row(params);
    call.per_row_arrays = arrays;
    return call;
}

/* Rows of `logits` (device memory, rows x vocab) through the sampling
 * kernels with their requests' filters (per rows a request), then their
 * psm_verify_rows. */
psm_status verify_row_passes(psm_gpu_state *state, const psm_tensor &given, const void *logits,
                             const psm_params *params, const psm_row_arrays &arrays,
                             psm_i64 requests, int per, float *const filters[4],
                             psm_gpu_kept_filters *kept, psm_i32 *tokens, psm_verify_row *rows)
{
    const psm_i64 count = given.rows;
    const unsigned threads = 256;
    const unsigned blocks = (unsigned)((count + threads - 1) / threads);
    psm_request request;
    memset(&request, 0, sizeof request);
    request.logits = given;
    request.logits.data = (void *)logits; /* only read */
    request.logits.memory = PSM_MEMORY_DEVICE;
    if (filters[0]) {
        psm_gpu_verify_expand_kernel<<<blocks, threads, 0, state->stream>>>(
            verify_by_request(params, arrays, requests), count, per, filters[0],
            (psm_i32 *)filters[1], filters[2], filters[3]);
        PSM_GPU_TRY(psm_gpu_get_last_error(), "launching psm_verify's expand kernel");
    }
    request.params = psm_verify_rows_params(params, filters[0], (const int32_t *)filters[1],
                                            filters[2], filters[3]);
    request.rows = count;
    request.tokens = psm_output{tokens, PSM_MEMORY_DEVICE};
    request.logprobs = psm_output{NULL, PSM_MEMORY_DEVICE};
    request.first_bad_row = -1;
    call_buffers buffers;
    psm_status status = prepare_call(state, &request, false, &buffers);
    if (status != PSM_OK)
        return status;
    buffers.call.kept_filters = kept;
    buffers.call.rule_only = 1;
    status = launch(state, &request, &buffers, false);
    if (status != PSM_OK)
        return status;
    psm_gpu_verify_rows_kernel<<<blocks, threads, 0, state->stream>>>(buffers.call, kept, tokens,
                                                                       rows);
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching psm_verify's rows kernel");
    return PSM_OK;
}

typedef void (*verify_check_fn)(const psm_gpu_call, const psm_verify_call, const psm_verify_arrays);
typedef void (*verify_totals_fn)(const psm_verify_call, const psm_verify_arrays);
typedef void (*verify_walk_fn)(const psm_gpu_call, const psm_verify_call, const psm_verify_arrays,
                               const psm_verify_outputs);

template <int WarpSize>
void verify_kernels(verify_check_fn *check, verify_totals_fn *totals, verify_walk_fn *walk)
{
    *check = psm_gpu_verify_check_kernel<WarpSize>;
    *totals = psm_gpu_verify_totals_kernel<WarpSize>;
    *walk = psm_gpu_verify_walk_kernel<WarpSize>;
}

/* Step 4: the checks, read back and reported as every backend does. */
psm_status verify_report_checks(psm_gpu_state *state, const psm_verify_request *request,
                                const verify_device &d)
{
    const size_t nodes = (size_t)(request->requests * request->nodes);
    int32_t *node_status = (int32_t *)malloc(nodes * sizeof *node_status);
    int32_t *bad = (int32_t *)malloc((size_t)request->requests * sizeof *bad);
    psm_status status = PSM_OK;
    if (!node_status || !bad) {
        status = psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                               "%s backend: cannot allocate the checks of %lld requests",
                               PSM_GPU_RUNTIME_NAME, (long long)request->requests);
    } else {
        psm_gpu_error_t error = psm_gpu_memcpy_async(node_status, d.node_status,
                                                     nodes * sizeof *node_status,
                                                     psm_gpu_memcpy_device_to_host, state->stream);
        if (error == psm_gpu_success)
            error = psm_gpu_memcpy_async(bad, d.request_bad,
                                         (size_t)request->requests * sizeof *bad,
                                         psm_gpu_memcpy_device_to_host, state->stream);
        if (error == psm_gpu_success)
            error = psm_gpu_stream_synchronize(state->stream);
        status = error == psm_gpu_success
                     ? psm_verify_report(request, node_status, bad,
                                         request->target.memory == PSM_MEMORY_HOST)
                     : gpu_failure(error, "reading psm_verify's checks");
    }
    free(node_status);
    free(bad);
    return status;
}

psm_status verify_request(psm_gpu_state *state, psm_verify_request *request)
{
    PSM_TRY_STATUS(select_device(state));
    const psm_i64 requests = request->requests;
    const int k = request->nodes;
    /* The kernels number the target and draft rows in 32 bits. */
    if (requests > (((psm_i64)1 << 31) - 1) / (2 * k + 1))
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s backend: psm_verify of %lld requests of %d drafts; at most "
                             "2^31 - 1 target and draft rows",
                             PSM_GPU_RUNTIME_NAME, (long long)requests, k);
    verify_carve carve = {NULL, 0};
    verify_device d;
    PSM_TRY_STATUS(verify_place(state, request, &carve, &d));
    PSM_TRY_STATUS(grow_buffer(&state->verify, &state->verify_bytes, carve.used,
                               "allocating psm_verify's buffer"));
    carve.base = (unsigned char *)state->verify;
    carve.used = 0;
    PSM_TRY_STATUS(verify_place(state, request, &carve, &d));

    psm_tensor target_shape = request->target;
    PSM_TRY_STATUS(verify_row_passes(state, target_shape, d.target, &request->target_params,
                                     d.target_arrays, requests, k + 1, d.filters[0], d.kept[0],
                                     d.row_tokens[0], d.rows[0]));
    if (request->draft_logits.data)
        PSM_TRY_STATUS(verify_row_passes(state, request->draft_logits, d.draft,
                                         &request->draft_params, d.draft_arrays, requests, k,
                                         d.filters[1], d.kept[1], d.row_tokens[1], d.rows[1]));

    const psm_verify_call call = psm_verify_describe(request);
    psm_verify_arrays arrays;
    arrays.target = (const unsigned char *)d.target;
    arrays.draft = (const unsigned char *)d.draft;
    arrays.tokens = d.tokens;
    arrays.parents = d.parents;
    arrays.target_rows = d.rows[0];
    arrays.draft_rows = d.rows[1];
    arrays.node_drawn = d.node_drawn;
    arrays.partials = d.partials;
    arrays.needed_rows = d.needed_rows;
    arrays.needed_count = d.needed_count;
    arrays.node_status = d.node_status;
    arrays.node_decided = d.node_decided;
    arrays.request_bad = d.request_bad;
    const psm_gpu_call by_request =
        verify_by_request(&request->target_params, d.target_arrays, requests);

    verify_check_fn check = NULL;
    verify_totals_fn totals = NULL;
    verify_walk_fn walk = NULL;
#if PSM_GPU_HAS_WAVE64
    if (state->kernels.warp_size == 64)
        verify_kernels<64>(&check, &totals, &walk);
    else
#endif
        verify_kernels<32>(&check, &totals, &walk);
    PSM_GPU_TRY(psm_gpu_memset_async(d.needed_count, 0, sizeof *d.needed_count, state->stream),
                "zeroing psm_verify's count of needed rows");
    check<<<(unsigned)requests, PSM_GPU_VERIFY_THREADS, 0, state->stream>>>(by_request, call,
                                                                             arrays);
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching psm_verify's check kernel");
    /* Every listed row's part a block at once where they fit on the
     * device (8 blocks a multiprocessor: its 2,048 threads); else the
     * blocks take them in turn. */
    const psm_i64 units = psm_verify_total_rows(call) * psm_verify_parts(call.vocab);
    const psm_i64 resident = (psm_i64)state->multiprocessors * 8;
    totals<<<(unsigned)(units < resident ? units : resident), PSM_GPU_VERIFY_THREADS, 0,
             state->stream>>>(call, arrays);
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching psm_verify's totals kernel");
    if (request->target.memory == PSM_MEMORY_HOST || request->check_rows)
        PSM_TRY_STATUS(verify_report_checks(state, request, d));

    psm_verify_outputs outputs;
    outputs.accepted = d.accepted;
    outputs.tokens = d.tokens_out;
    outputs.path_nodes = d.path_out;
    outputs.logprobs = d.logprobs_out;
    walk<<<(unsigned)requests, PSM_GPU_VERIFY_THREADS, 0, state->stream>>>(by_request, call,
                                                                            arrays, outputs);
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching psm_verify's walk kernel");

    const psm_verification *given = &request->outputs;
    const size_t width = (size_t)requests * (size_t)(k + 1);
    struct back {
        void *host;
        const void *device;
        size_t bytes;
    } backs[] = {
        {given->accepted.data, d.accepted, (size_t)requests * sizeof(psm_i32)},
        {given->tokens.data, d.tokens_out, width * sizeof(psm_i32)},
        {given->path_nodes.data, d.path_out, width * sizeof(psm_i32)},
        {given->logprobs.data, d.logprobs_out, width * sizeof(float)},
    };
    const psm_memory kinds[] = {given->accepted.memory, given->tokens.memory,
                                given->path_nodes.memory, given->logprobs.memory};
    bool copied = false;
    for (int b = 0; b < 4; ++b) {
        if (!backs[b].host || kinds[b] != PSM_MEMORY_HOST)
            continue;
        PSM_GPU_TRY(psm_gpu_memcpy_async(backs[b].host, backs[b].device, backs[b].bytes,
                                         psm_gpu_memcpy_device_to_host, state->stream),
                    "copying psm_verify's outputs to the host");
        copied = true;
    }
    if (copied || request->target.memory == PSM_MEMORY_HOST)
        PSM_GPU_TRY(psm_gpu_stream_synchronize(state->stream), "waiting for host outputs");
    return PSM_OK;
}

/* ---- sharded sampling ------------------------------------------------------------
 * One pass of a sharded call (core/psm_shard_pass.h; the kernel is
 * psm_gpu_sharded.cuh): the items, tile keys and out words go to the
 * context's shard buffer, host logits too, then a block per item (zeroing a skipped item's words) and
 * the out words back. */

static_assert(sizeof(psm_shard_item) == PSM_SHARD_ITEM_BYTES,
              "psm_shard_item is laid out with padding");
static_assert(sizeof(psm_shard_geometry) == PSM_SHARD_GEOMETRY_BYTES,
              "psm_shard_geometry is laid out with padding");

typedef void (*shard_pass_fn)(const psm_shard_geometry, const psm_shard_arrays);

psm_status shard_pass(psm_gpu_state *state, const psm_tensor *logits,
                      const psm_shard_geometry *geometry, const psm_shard_item *items,
                      psm_i64 item_count, const psm_u64 *tile_keys, psm_u64 *out)
{
    if (item_count > ((psm_i64)1 << 31) - 1)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s backend: a sharded pass of %lld items; at most 2^31 - 1",
                             PSM_GPU_RUNTIME_NAME, (long long)item_count);
    PSM_TRY_STATUS(select_device(state));

    const size_t count = (size_t)item_count;
    const size_t items_bytes = count * sizeof(psm_shard_item);
    const size_t keys_bytes = geometry->kind == PSM_SHARD_PASS_TILE_MASSES
                                  ? count * (size_t)geometry->local_tiles * sizeof(psm_u64)
                                  : 0;
    const size_t out_bytes =
        count * (size_t)psm_shard_pass_words(geometry->kind, geometry->local_tiles) *
        sizeof(psm_u64);
    const bool host_logits = logits->memory == PSM_MEMORY_HOST;
    const size_t logits_bytes =
        host_logits ? ((size_t)(logits->rows - 1) * (size_t)logits->row_stride +
                       (size_t)logits->vocab) *
                          dtype_bytes(logits->dtype)
                    : 0;
    const size_t parts[] = {items_bytes, keys_bytes, out_bytes, logits_bytes};
    size_t offsets[4], used = 0;
    for (int p = 0; p < 4; ++p) {
        offsets[p] = used;
        used += workspace_round(parts[p]);
    }
    PSM_TRY_STATUS(grow_buffer(&state->shard, &state->shard_bytes, used,
                               "allocating the sharded pass's buffer"));
    unsigned char *base = (unsigned char *)state->shard;
    psm_shard_arrays arrays;
    arrays.items = (const psm_shard_item *)(base + offsets[0]);
    arrays.tile_keys = keys_bytes ? (const psm_u64 *)(base + offsets[1]) : NULL;
    arrays.out = (psm_u64 *)(base + offsets[2]);
    arrays.logits = host_logits ? base + offsets[3] : (const unsigned char *)logits->data;
    const struct {
        const void *device, *host;
        size_t bytes;
    } copies[] = {{arrays.items, items, items_bytes},
                  {arrays.tile_keys, tile_keys, keys_bytes},
                  {arrays.logits, logits->data, logits_bytes}};
    for (const auto &copy : copies)
        if (copy.bytes)
            PSM_GPU_TRY(psm_gpu_memcpy_async((void *)copy.device, copy.host, copy.bytes,
                                             psm_gpu_memcpy_host_to_device, state->stream),
                        "copying a sharded pass's inputs to the device");

    shard_pass_fn kernel = psm_gpu_shard_pass_kernel<32>;
#if PSM_GPU_HAS_WAVE64
    if (state->kernels.warp_size == 64)
        kernel = psm_gpu_shard_pass_kernel<64>;
#endif
    kernel<<<(unsigned)item_count, PSM_GPU_SHARD_THREADS, 0, state->stream>>>(*geometry, arrays);
    PSM_GPU_TRY(psm_gpu_get_last_error(), "launching the sharded pass kernel");
    PSM_GPU_TRY(psm_gpu_memcpy_async(out, arrays.out, out_bytes, psm_gpu_memcpy_device_to_host,
                                     state->stream),
                "copying a sharded pass's words to the host");
    PSM_GPU_TRY(psm_gpu_stream_synchronize(state->stream), "waiting for a sharded pass");
    return PSM_OK;
}

} /* namespace */
} /* namespace PSM_GPU_NAMESPACE */

using namespace PSM_GPU_NAMESPACE;

extern "C" {

#if !PSM_GPU_HIP
/* The CUDA runtime is linked statically and opens the driver itself; without
 * the driver it reports an "insufficient driver version", so the driver's
 * absence is named here first. */
static int nvidia_driver_present(char *reason, size_t reason_size)
{
    void *driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
    if (driver) {
        dlclose(driver);
        return 1;
    }
    const char *why = dlerror();
    if (reason && reason_size)
        snprintf(reason, reason_size, "no NVIDIA driver (%s)",
                 why ? why : "libcuda.so.1 cannot be loaded");
    return 0;
}
#endif

static int gpu_probe(int *device_count, int *auto_device_count, char *reason,
                     size_t reason_size)
{
    int count = 0;
    *device_count = 0;
    *auto_device_count = 0;
#if !PSM_GPU_HIP
    if (!nvidia_driver_present(reason, reason_size))
        return 0;
#endif
    psm_gpu_error_t error = psm_gpu_get_device_count(&count);
    if (error != psm_gpu_success) {
        (void)psm_gpu_get_last_error();
        if (reason && reason_size)
            snprintf(reason, reason_size, "no %s device: %sGetDeviceCount: %s",
                     PSM_GPU_RUNTIME_NAME, PSM_GPU_HIP ? "hip" : "cuda",
                     psm_gpu_error_string(error));
        return 0;
    }
    if (count <= 0) {
        if (reason && reason_size)
            snprintf(reason, reason_size, "no %s device: the runtime found none",
                     PSM_GPU_RUNTIME_NAME);
        return 0;
    }
    *device_count = count;
    *auto_device_count = count;
    if (reason && reason_size)
        snprintf(reason, reason_size, "%d %s device%s", count, PSM_GPU_RUNTIME_NAME,
                 count == 1 ? "" : "s");
    return 1;
}

static psm_status gpu_create(const psm_context_options *options, int device_index,
                             void **state_out, char *device_name, size_t device_name_size)
{
    int count = 0, auto_count = 0;
    char reason[256];
    if (!gpu_probe(&count, &auto_count, reason, sizeof reason))
        return psm_set_error(PSM_ERR_NO_DEVICE, "%s", reason);
    if (device_index >= count)
        return psm_set_error(PSM_ERR_NO_DEVICE, "%s device %d requested, %d present",
                             PSM_GPU_RUNTIME_NAME, device_index, count);

    psm_gpu_state *state = (psm_gpu_state *)calloc(1, sizeof *state);
    if (!state)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "%s backend: no memory for the context",
                             PSM_GPU_RUNTIME_NAME);
    state->device = device_index;

    psm_status status = PSM_OK;
    psm_gpu_device_prop_t properties;
    psm_gpu_error_t error = psm_gpu_set_device(device_index);
    if (error == psm_gpu_success)
        error = psm_gpu_get_device_properties(&properties, device_index);
    if (error != psm_gpu_success) {
        status = gpu_failure(error, "reading the device properties");
        release_state(state);
        return status;
    }
    /* The kernels for the device's wave size (HIP: 64 on CDNA, 32 on RDNA). */
    if (!select_kernel_set(properties.warpSize, &state->kernels)) {
        release_state(state);
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "%s device %d (%s) has warp size %d; this build has kernels for %s",
                             PSM_GPU_RUNTIME_NAME, device_index, properties.name,
                             properties.warpSize, PSM_GPU_HAS_WAVE64 ? "32 and 64" : "32");
    }
    state->multiprocessors = properties.multiProcessorCount > 0 ? properties.multiProcessorCount : 1;
    find_split_capacity(state);

    if (options->native_stream) {
        state->stream = (psm_gpu_stream_t)options->native_stream;
    } else {
        error = psm_gpu_stream_create_non_blocking(&state->stream);
        if (error != psm_gpu_success) {
            status = gpu_failure(error, "creating a stream");
            release_state(state);
            return status;
        }
        state->owns_stream = 1;
    }
    error = device_malloc((void **)&state->split_rows,
                          (size_t)state->split_pool_rows * sizeof *state->split_rows);
    if (error == psm_gpu_success)
        error = device_malloc((void **)&state->first_bad_row, sizeof *state->first_bad_row);
    if (error == psm_gpu_success)
        error = pinned_malloc((void **)&state->first_bad_row_host,
                              sizeof *state->first_bad_row_host);
    if (error != psm_gpu_success) {
        status = gpu_failure(error, "allocating the bad-row flag");
        release_state(state);
        return status;
    }
#if PSM_GPU_HIP
    status = check_device_wave_size(state);
    if (status != PSM_OK) {
        release_state(state);
        return status;
    }
#endif
    if (device_name && device_name_size)
        snprintf(device_name, device_name_size, "%s", properties.name);
    *state_out = state;
    return PSM_OK;
}

static void gpu_destroy(void *state)
{
    if (state)
        release_state((psm_gpu_state *)state);
}

static psm_status gpu_reserve(void *opaque_state, int64_t rows, int64_t vocab, int64_t num_samples)
{
    (void)num_samples; /* the workspace does not depend on it */
    psm_gpu_state *state = (psm_gpu_state *)opaque_state;
    psm_status selected = select_device(state);
    if (selected != PSM_OK)
        return selected;
    return reserve_tiles(state, rows, vocab);
}

static psm_status gpu_workspace_size(void *opaque_state, const psm_request *request,
                                     int probs_mode, size_t *bytes)
{
    (void)opaque_state; /* the context's own buffers are not part of it */
    call_plan plan;
    psm_status status = plan_call(request, probs_mode != 0, &plan);
    if (status != PSM_OK)
        return status;
    return workspace_bytes(request, plan, bytes);
}

static psm_status gpu_sample(void *state, psm_request *request)
{
    return run_request(state, request, false);
}

static psm_status gpu_probs(void *state, psm_request *request)
{
    return run_request(state, request, true);
}

static psm_status gpu_verify(void *state, psm_verify_request *request)
{
    return verify_request((psm_gpu_state *)state, request);
}

static psm_status gpu_shard_pass(void *state, const psm_tensor *logits,
                                 const psm_shard_geometry *geometry, const psm_shard_item *items,
                                 int64_t item_count, const psm_u64 *tile_keys, psm_u64 *out)
{
    return shard_pass((psm_gpu_state *)state, logits, geometry, items, item_count, tile_keys,
                      out);
}

static psm_status gpu_synchronize(void *opaque_state)
{
    psm_gpu_state *state = (psm_gpu_state *)opaque_state;
    psm_status selected = select_device(state);
    if (selected != PSM_OK)
        return selected;
    PSM_GPU_TRY(psm_gpu_stream_synchronize(state->stream), "synchronising the stream");
    return PSM_OK;
}

/* Not on HIP's device pass: clang makes a namespace-scope const variable with
 * a constant initialiser __constant__ there, and the host functions it points
 * to do not exist on the device. */
#if !(PSM_GPU_HIP && PSM_GPU_DEVICE_PASS)
static const psm_backend_ops gpu_ops = {
    PSM_BACKEND_API_VERSION, /* api_version */
    PSM_GPU_BACKEND_ID,      /* id */
    PSM_FEATURE_LOGIT_PROCESSING | PSM_FEATURE_FILTER_ORDERS |
        PSM_FEATURE_TOP_LOGPROBS, /* features */
    gpu_probe,               /* probe */
    gpu_create,              /* create */
    gpu_destroy,             /* destroy */
    gpu_reserve,             /* reserve */
    gpu_workspace_size,      /* workspace_size */
    gpu_sample,              /* sample */
    gpu_probs,               /* probs */
    gpu_synchronize,         /* synchronize */
    gpu_verify,              /* verify */
    gpu_shard_pass,          /* shard_pass */
};

PSM_DEFINE_BACKEND_MODULE(gpu_ops)
#endif

} /* extern "C" */
