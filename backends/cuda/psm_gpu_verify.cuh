/*
 * psm_gpu_verify.cuh: psm_verify's kernels on CUDA and HIP (docs/SAMPLING.md,
 * section 7), thin entries into kernels/psm_stage_verify.h, shared with the
 * OpenCL backend. The host (gpu_verify in psm_gpu_backend.cu) runs the
 * target rows and the draft logits rows through the sampling kernels first,
 * with psm_gpu_call.kept_filters set, so that each row's kept rule is left
 * in memory; psm_gpu_verify_rows_kernel turns it into a psm_verify_row.
 */
#ifndef PSM_GPU_VERIFY_CUH
#define PSM_GPU_VERIFY_CUH

#include "psm_gpu_kernels.cuh"
#include "psm_stage_verify.h"
#include "psm_verify.h"

namespace PSM_GPU_NAMESPACE {

/* Threads of the check and walk kernels' blocks (one request per block). */
#define PSM_GPU_VERIFY_THREADS 256

/* One thread per pipeline row: its request's filters (row / per), from the
 * per-request view `by_request`. */
PSM_GPU_KERNEL void psm_gpu_verify_expand_kernel(const psm_gpu_call by_request, psm_i64 rows,
                                                 int per, float *temperature, psm_i32 *top_k,
                                                 float *top_p, float *min_p)
{
    const psm_i64 row = (psm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows)
        return;
    const psm_row_params p = psm_gpu_row_params(by_request, row / per);
    temperature[row] = p.temperature;
    top_k[row] = p.top_k;
    top_p[row] = p.top_p;
    min_p[row] = p.min_p;
}

/* One thread per pipeline row: its psm_verify_row from what the sampling
 * kernels left (call: the pipeline's; tokens: its drawn tokens, -1 for a
 * bad row, the greedy token for a greedy row). */
PSM_GPU_KERNEL void psm_gpu_verify_rows_kernel(const psm_gpu_call call,
                                               const psm_gpu_kept_filters *filters,
                                               const psm_i32 *tokens, psm_verify_row *rows)
{
    const psm_i64 row = (psm_i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= call.rows)
        return;
    const psm_row_params p = psm_gpu_row_params(call, row);
    psm_verify_row out;
    out.cutoff = 0;
    out.min_weight = 0;
    out.mass = 0;
    out.maximum = 0.0f;
    out.scale = 1.0f;
    out.greedy_token = 0;
    if (tokens[row] < 0) {
        out.status = PSM_VERIFY_ROW_BAD;
    } else if (psm_is_greedy(p.temperature)) {
        out.status = PSM_VERIFY_ROW_GREEDY;
        out.greedy_token = (psm_u32)tokens[row];
    } else {
        out.status = PSM_VERIFY_ROW_SAMPLE;
        out.cutoff = filters[row].cutoff;
        out.min_weight = filters[row].min_weight;
        out.maximum = filters[row].row_max;
        out.scale = psm_inverse_temperature_scale(p.temperature);
        /* The row's total: the last of its running sums of T_t. */
        out.mass = call.tile_prefix[(row + 1) * call.tiles_per_row - 1];
    }
    rows[row] = out;
}

/* A block per request; by_request: the target's per-request view. */
template <int WarpSize>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_VERIFY_THREADS)
    psm_gpu_verify_check_kernel(const psm_gpu_call by_request, const psm_verify_call call,
                                const psm_verify_arrays arrays)
{
    __shared__ psm_verify_scratch scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>()) {
        const psm_i64 r = blockIdx.x;
        const psm_row_params p = psm_gpu_row_params(by_request, r);
        psm_stage_verify_check(psm_team_of_thread<WarpSize>(), call, arrays, r, p.valid, p.seed,
                               p.offset, p.stream, &scratch);
    }
}

/* A grid sized for the device; the blocks take the listed rows' parts in
 * turn. */
template <int WarpSize>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_VERIFY_THREADS)
    psm_gpu_verify_totals_kernel(const psm_verify_call call, const psm_verify_arrays arrays)
{
    __shared__ psm_group_scratch scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_stage_verify_totals(psm_team_of_thread<WarpSize>(), call, arrays,
                                (psm_i64)blockIdx.x, (psm_i64)gridDim.x, &scratch);
}

template <int WarpSize>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_VERIFY_THREADS)
    psm_gpu_verify_walk_kernel(const psm_gpu_call by_request, const psm_verify_call call,
                               const psm_verify_arrays arrays, const psm_verify_outputs outputs)
{
    __shared__ psm_verify_scratch scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>()) {
        const psm_i64 r = blockIdx.x;
        const psm_row_params p = psm_gpu_row_params(by_request, r);
        psm_stage_verify_walk(psm_team_of_thread<WarpSize>(), call, arrays, outputs, r, p.seed,
                              p.offset, p.stream, &scratch);
    }
}

} /* namespace PSM_GPU_NAMESPACE */

#endif /* PSM_GPU_VERIFY_CUH */
