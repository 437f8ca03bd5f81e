/*
 * psm_gpu_sharded.cuh: the sharded call's pass on CUDA and HIP
 * (docs/SAMPLING.md section 8), a thin entry into kernels/psm_stage_sharded.h,
 * shared with the OpenCL backend. The host side is gpu_shard_pass in
 * psm_gpu_backend.cu.
 */
#ifndef PSM_GPU_SHARDED_CUH
#define PSM_GPU_SHARDED_CUH

#include "psm_gpu_kernels.cuh"
#include "psm_shard_pass.h"
#include "psm_stage_sharded.h"

namespace PSM_GPU_NAMESPACE {

/* Threads of a block (one item per block). */
#define PSM_GPU_SHARD_THREADS 256

template <int WarpSize>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_SHARD_THREADS)
    psm_gpu_shard_pass_kernel(const psm_shard_geometry geometry, const psm_shard_arrays arrays)
{
    __shared__ psm_shard_scratch scratch;
    if constexpr (psm_gpu_wave_compiled<WarpSize>())
        psm_stage_shard_pass(psm_team_of_thread<WarpSize>(), geometry, arrays,
                             (psm_i64)blockIdx.x, &scratch);
}

} /* namespace PSM_GPU_NAMESPACE */

#endif /* PSM_GPU_SHARDED_CUH */
