/*
 * psm_gpu_backend.cu: the host side of the CUDA backend (and, compiled as
 * HIP, of the HIP backend): device probe, context state, workspace, staging
 * of host-memory buffers, and the launches of psm_gpu_kernels.cuh.
 *
 * Every failure goes through psm_set_error with the runtime's message; the
 * code never prints, aborts or exits.
 *
 * Launches per call: the tile kernel and the row kernel (plus the check
 * kernel and one small copy in checking mode), whatever the batch size. A
 * call with filters and fewer rows than multiprocessors launches the row
 * kernel cooperatively with several blocks per row (split rows,
 * psm_gpu_kernels.cuh), where the device supports it. With
 * device buffers and no checking, a call queues only those launches on the
 * stream (no allocation once the shape has been seen, no synchronisation), so
 * it can be captured in a graph.
 */
#include "psm_gpu_kernels.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <dlfcn.h>

extern "C" {
#include "alloc.h"
#include "backend.h"
#include "error.h"
#include "module.h"
}

namespace PSM_GPU_NAMESPACE {
namespace {

/* The kernel instantiations of one wave size, indexed by dtype (and, for
 * the row kernel, by filtered variant and probs mode). */
typedef void (*kernel_fn)(const psm_gpu_call);
struct kernel_set {
    int warp_size;
    kernel_fn tile[3];
    kernel_fn check;
    kernel_fn row[3][2][2];
};

template <int WarpSize, int Dtype>
void add_dtype_kernels(kernel_set *set)
{
    set->tile[Dtype] = psm_gpu_tile_kernel<WarpSize, Dtype>;
    set->row[Dtype][0][0] = psm_gpu_row_kernel<WarpSize, Dtype, false, false>;
    set->row[Dtype][0][1] = psm_gpu_row_kernel<WarpSize, Dtype, false, true>;
    set->row[Dtype][1][0] = psm_gpu_row_kernel<WarpSize, Dtype, true, false>;
    set->row[Dtype][1][1] = psm_gpu_row_kernel<WarpSize, Dtype, true, true>;
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
    psm_gpu_split_row *split_rows; /* one pool per multiprocessor: split calls have fewer rows */

    /* per-tile workspace, see psm_gpu_call */
    void *tiles;
    size_t tile_capacity;
    unsigned long long *first_bad_row;      /* device */
    unsigned long long *first_bad_row_host; /* pinned */

    /* device copies of host-memory inputs and outputs, grown on demand */
    void *staged_logits;
    size_t staged_logits_bytes;
    void *staged_params;
    size_t staged_params_bytes;
    void *staged_outputs;
    size_t staged_outputs_bytes;
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

psm_status reserve_tiles(psm_gpu_state *state, psm_i64 rows, psm_i64 vocab)
{
    size_t tiles = (size_t)rows * (size_t)tiles_per_row(vocab);
    if (tiles <= state->tile_capacity)
        return PSM_OK;
    /* Within a call's bounds (rows x vocab < 2^60) the byte count can still
     * pass 2^64 (2^59 one-token rows); such a workspace exists nowhere, and
     * wrapped around it would look small. grow_buffer adds a quarter. */
    if (tiles > SIZE_MAX / 2 / tile_workspace_bytes)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                             "%s backend: a tile workspace for %lld rows of %lld tokens is "
                             "beyond any device's memory",
                             PSM_GPU_RUNTIME_NAME, (long long)rows, (long long)vocab);
    size_t capacity_bytes = state->tile_capacity * tile_workspace_bytes;
    psm_status status = grow_buffer(&state->tiles, &capacity_bytes, tiles * tile_workspace_bytes,
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
 * or runtime that cannot tell leaves rows unsplit. */
void find_split_capacity(psm_gpu_state *state)
{
    int cooperative = 0;
    memset(state->split_capacity, 0, sizeof state->split_capacity);
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
            state->split_capacity[dtype][probs] =
                (psm_i64)per_multiprocessor * state->multiprocessors;
        }
}

/* Device pointers for one call: host-memory inputs are copied into staging,
 * host-memory outputs are written to staging and copied back afterwards. */
struct call_buffers {
    psm_gpu_call call;
    void *host_tokens;
    void *host_logprobs;
    void *host_probs;
    psm_i64 host_probs_stride;
    size_t output_bytes;
};

psm_status stage_inputs(psm_gpu_state *state, const psm_request *request, psm_gpu_call *call)
{
    const psm_tensor *logits = &request->logits;
    const psm_params *params = &request->params;
    const size_t element_bytes = dtype_bytes(logits->dtype);

    call->logits = logits->data;
    call->rows = logits->rows;
    call->vocab = logits->vocab;
    call->row_stride = logits->row_stride;
    call->scalars.seed = params->seed;
    call->scalars.temperature = params->temperature;
    call->scalars.top_k = params->top_k;
    call->scalars.top_p = params->top_p;
    call->scalars.min_p = params->min_p;
    call->per_row = (params->temperature_per_row ? PSM_PER_ROW_TEMPERATURE : 0u) |
                    (params->top_k_per_row ? PSM_PER_ROW_TOP_K : 0u) |
                    (params->top_p_per_row ? PSM_PER_ROW_TOP_P : 0u) |
                    (params->min_p_per_row ? PSM_PER_ROW_MIN_P : 0u) |
                    (params->seed_per_row ? PSM_PER_ROW_SEED : 0u);
    call->per_row_arrays.temperature = params->temperature_per_row;
    call->per_row_arrays.top_k = params->top_k_per_row;
    call->per_row_arrays.top_p = params->top_p_per_row;
    call->per_row_arrays.min_p = params->min_p_per_row;
    call->per_row_arrays.seed = params->seed_per_row;
    call->offset = params->offset;
    call->num_samples = params->num_samples;
    call->weight_bits = psm_weight_bits(logits->vocab);

    if (logits->memory == PSM_MEMORY_HOST) {
        /* The stagings were grown by prepare_call before anything was queued. */
        const size_t row_bytes = (size_t)logits->vocab * element_bytes;
        PSM_GPU_TRY(psm_gpu_memcpy_2d_async(state->staged_logits, row_bytes, logits->data,
                                            (size_t)logits->row_stride * element_bytes, row_bytes,
                                            (size_t)logits->rows, psm_gpu_memcpy_host_to_device,
                                            state->stream),
                    "copying host logits to the device");
        call->logits = state->staged_logits;
        call->row_stride = logits->vocab;

        /* Per-row parameters live in the logits' memory: stage them too. */
        const size_t rows = (size_t)logits->rows;
        const int any_per_row = params->temperature_per_row || params->top_k_per_row ||
                                params->top_p_per_row || params->min_p_per_row ||
                                params->seed_per_row;
        if (any_per_row) {
            unsigned char *staging = (unsigned char *)state->staged_params;
            /* The u64 seeds first, so that they stay 8-byte aligned. */
            struct {
                const void *host;
                size_t element;
                const void **device;
            } arrays[5] = {
                {params->seed_per_row, sizeof(psm_u64), (const void **)&call->per_row_arrays.seed},
                {params->temperature_per_row, sizeof(float), (const void **)&call->per_row_arrays.temperature},
                {params->top_k_per_row, sizeof(psm_i32), (const void **)&call->per_row_arrays.top_k},
                {params->top_p_per_row, sizeof(float), (const void **)&call->per_row_arrays.top_p},
                {params->min_p_per_row, sizeof(float), (const void **)&call->per_row_arrays.min_p},
            };
            for (int a = 0; a < 5; ++a) {
                if (!arrays[a].host)
                    continue;
                PSM_GPU_TRY(psm_gpu_memcpy_async(staging, arrays[a].host, rows * arrays[a].element,
                                                 psm_gpu_memcpy_host_to_device, state->stream),
                            "copying per-row parameters to the device");
                *arrays[a].device = staging;
                staging += rows * arrays[a].element;
            }
        }
    }

    uintptr_t base = (uintptr_t)call->logits;
    call->logits_aligned = base % 16 == 0 && ((size_t)call->row_stride * element_bytes) % 16 == 0;
    return PSM_OK;
}

psm_status prepare_call(psm_gpu_state *state, psm_request *request, bool probs_mode,
                        call_buffers *buffers)
{
    memset(buffers, 0, sizeof *buffers);
    psm_gpu_call *call = &buffers->call;
    psm_status selected = select_device(state);
    if (selected != PSM_OK)
        return selected;

    psm_status status = reserve_tiles(state, request->logits.rows, request->logits.vocab);
    if (status != PSM_OK)
        return status;
    /* Output staging first: growing a buffer may wait for the device, which
     * must not happen after inputs were queued into another staging buffer. */
    const size_t rows = (size_t)request->logits.rows;
    size_t output_bytes = 0;
    size_t tokens_bytes = 0, logprobs_bytes = 0;
    if (probs_mode) {
        if (request->probs.memory == PSM_MEMORY_HOST)
            output_bytes = rows * (size_t)request->logits.vocab * sizeof(float);
    } else {
        const size_t samples = rows * (size_t)request->params.num_samples;
        if (request->tokens.memory == PSM_MEMORY_HOST)
            tokens_bytes = samples * sizeof(psm_i32);
        if (request->logprobs.data && request->logprobs.memory == PSM_MEMORY_HOST)
            logprobs_bytes = samples * sizeof(float);
        output_bytes = tokens_bytes + logprobs_bytes;
    }
    if (output_bytes) {
        status = grow_buffer(&state->staged_outputs, &state->staged_outputs_bytes, output_bytes,
                             "allocating staging for host outputs");
        if (status != PSM_OK)
            return status;
    }
    if (request->logits.memory == PSM_MEMORY_HOST) {
        /* Grow both input stagings before queuing any copy into them. */
        status = grow_buffer(&state->staged_logits, &state->staged_logits_bytes,
                             rows * (size_t)request->logits.vocab * dtype_bytes(request->logits.dtype),
                             "allocating staging for host logits");
        if (status != PSM_OK)
            return status;
        status = grow_buffer(&state->staged_params, &state->staged_params_bytes,
                             rows * (4 * sizeof(float) + sizeof(psm_u64)),
                             "allocating staging for per-row parameters");
        if (status != PSM_OK)
            return status;
    }

    status = stage_inputs(state, request, call);
    if (status != PSM_OK)
        return status;

    call->tiles_per_row = tiles_per_row(request->logits.vocab);
    unsigned char *tiles = (unsigned char *)state->tiles;
    const size_t tile_count = state->tile_capacity;
    call->tile_key = (psm_u64 *)tiles;
    call->tile_mass = (psm_u64 *)(tiles + tile_count * sizeof(psm_u64));
    call->tile_prefix = (psm_u64 *)(tiles + 2 * tile_count * sizeof(psm_u64));
    call->tile_info = (psm_u32 *)(tiles + 3 * tile_count * sizeof(psm_u64));
    call->lane_max = (psm_u32 *)(tiles + 3 * tile_count * sizeof(psm_u64) +
                                 tile_count * sizeof(psm_u32));
    call->first_bad_row = state->first_bad_row;
    call->row_parts = 1; /* launch() may split rows */
    call->split = state->split_rows;

    unsigned char *outputs = (unsigned char *)state->staged_outputs;
    buffers->output_bytes = output_bytes;
    if (probs_mode) {
        call->probs = (float *)request->probs.data;
        call->probs_stride = request->probs.row_stride;
        if (request->probs.memory == PSM_MEMORY_HOST) {
            buffers->host_probs = request->probs.data;
            buffers->host_probs_stride = request->probs.row_stride;
            call->probs = (float *)outputs;
            call->probs_stride = request->logits.vocab;
        }
    } else {
        call->tokens = (psm_i32 *)request->tokens.data;
        call->logprobs = (float *)request->logprobs.data;
        if (tokens_bytes) {
            buffers->host_tokens = request->tokens.data;
            call->tokens = (psm_i32 *)outputs;
        }
        if (logprobs_bytes) {
            buffers->host_logprobs = request->logprobs.data;
            call->logprobs = (float *)(outputs + tokens_bytes);
        }
    }
    return PSM_OK;
}

int filters_possible(const psm_request *request)
{
    const psm_params *p = &request->params;
    return p->top_k_per_row || p->top_p_per_row || p->min_p_per_row ||
           (p->top_k > 0 && p->top_k < request->logits.vocab) || p->top_p < 1.0f ||
           p->min_p > 0.0f;
}

/* Blocks per row of the row kernel: more than one only for calls that may
 * filter (a plain row's row-kernel work is per tile and per sample, not a
 * pass over the row) with fewer rows than multiprocessors, and only as many
 * as can be resident together, each with at least PSM_GPU_SPLIT_MIN_TILES
 * tiles to read. */
#define PSM_GPU_SPLIT_MIN_TILES 2

psm_i64 row_parts(const psm_gpu_state *state, const psm_gpu_call &call, psm_dtype dtype,
                  bool filtered, bool probs_mode)
{
    const psm_i64 capacity = state->split_capacity[dtype][probs_mode ? 1 : 0];
    if (!filtered || capacity == 0 || call.rows >= state->multiprocessors)
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
    const psm_dtype dtype = request->logits.dtype;
    /* The same test as the kernels' psm_gpu_may_filter, over every row. */
    const bool filtered = filters_possible(request) != 0;
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
    kernels.tile[dtype]<<<(unsigned)tile_blocks, (unsigned)(tile_block_tiles * kernels.warp_size), 0,
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
                                 "per-row parameter out of range",
                                 (long long)first_bad);
        }
    }

    const kernel_fn row_kernel = kernels.row[dtype][filtered ? 1 : 0][probs_mode ? 1 : 0];
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
    if (buffers->host_probs || buffers->host_tokens || buffers->host_logprobs ||
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
                          (size_t)state->multiprocessors * sizeof *state->split_rows);
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

static psm_status gpu_sample(void *state, psm_request *request)
{
    return run_request(state, request, false);
}

static psm_status gpu_probs(void *state, psm_request *request)
{
    return run_request(state, request, true);
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
    gpu_probe,               /* probe */
    gpu_create,              /* create */
    gpu_destroy,             /* destroy */
    gpu_reserve,             /* reserve */
    gpu_sample,              /* sample */
    gpu_probs,               /* probs */
    gpu_synchronize,         /* synchronize */
};

PSM_DEFINE_BACKEND_MODULE(gpu_ops)
#endif

} /* extern "C" */
