/*
 * psm_gpu.h: the vendor layer under the GPU kernels and their host code.
 *
 * The CUDA backend compiles psm_gpu_backend.cu as CUDA; the HIP backend
 * compiles the same file as HIP. Everything vendor-specific that they use is
 * named here once, under the project's own psm_gpu_* names, so that neither
 * backend needs a rename list: a new runtime call is added to both branches
 * of this file and nowhere else.
 *
 * Warp size: every warp-level reduction, scan and ballot of the kernels is
 * written over a WarpSize template parameter (psm_gpu_warp.h), never with a
 * literal 32 or a literal lane mask, and the kernels are templates over it.
 * The host code instantiates them for every wave size of the vendor (32 for
 * CUDA; 32 and 64 for HIP: RDNA and CDNA in one fat binary), reads the
 * device's warpSize when a context is made and launches the matching set.
 * On the device pass PSM_GPU_DEVICE_WARP_SIZE is the wave size of the target
 * being compiled; an instantiation for another wave size compiles to an
 * empty kernel there (psm_gpu_wave_compiled), so each target carries one
 * real copy of each kernel.
 *
 * Everything is declared in a vendor namespace (psm_cuda / psm_hip), so that
 * the CUDA and HIP objects, built from the same files, link into one
 * library without clashing symbols.
 */
#ifndef PSM_GPU_H
#define PSM_GPU_H

#if defined(__HIPCC__) || defined(__HIP_PLATFORM_AMD__)
#define PSM_GPU_HIP 1
#else
#define PSM_GPU_HIP 0
#endif

/* 1 while compiling device code (the kernels), 0 on the host pass. */
#if defined(__CUDA_ARCH__) || defined(__HIP_DEVICE_COMPILE__)
#define PSM_GPU_DEVICE_PASS 1
#else
#define PSM_GPU_DEVICE_PASS 0
#endif

#if PSM_GPU_HIP
/* ---------------------------------------------------------------- HIP --- */
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>

/* Wave size: 64 on CDNA (gfx9xx), 32 on RDNA (gfx10xx, gfx11xx). Only the
 * device pass knows it (clang also defines __AMDGCN_WAVEFRONT_SIZE on the
 * host pass, where it means nothing, hence the test of the device pass). */
#if defined(__HIP_DEVICE_COMPILE__)
#define PSM_GPU_DEVICE_WARP_SIZE __AMDGCN_WAVEFRONT_SIZE
#endif
#define PSM_GPU_HAS_WAVE64 1
#define PSM_GPU_NAMESPACE psm_hip

#define PSM_GPU_BACKEND_ID PSM_BACKEND_HIP
#define PSM_GPU_OPS_SYMBOL psm_hip_ops
#define PSM_GPU_RUNTIME_NAME "HIP"

typedef hipStream_t psm_gpu_stream_t;
typedef hipEvent_t psm_gpu_event_t;
typedef hipError_t psm_gpu_error_t;
typedef hipDeviceProp_t psm_gpu_device_prop_t;
#define psm_gpu_success hipSuccess
#define psm_gpu_error_string hipGetErrorString
#define psm_gpu_get_device_count hipGetDeviceCount
#define psm_gpu_set_device hipSetDevice
#define psm_gpu_get_device hipGetDevice
#define psm_gpu_get_device_properties hipGetDeviceProperties
#define psm_gpu_malloc hipMalloc
#define psm_gpu_free hipFree
#define psm_gpu_malloc_host hipHostMalloc
#define psm_gpu_free_host hipHostFree
#define psm_gpu_memcpy_async hipMemcpyAsync
#define psm_gpu_memcpy_2d_async hipMemcpy2DAsync
#define psm_gpu_memset_async hipMemsetAsync
#define psm_gpu_memcpy_host_to_device hipMemcpyHostToDevice
#define psm_gpu_memcpy_device_to_host hipMemcpyDeviceToHost
#define psm_gpu_memcpy_device_to_device hipMemcpyDeviceToDevice
#define psm_gpu_stream_create_non_blocking(stream) \
    hipStreamCreateWithFlags((stream), hipStreamNonBlocking)
#define psm_gpu_stream_destroy hipStreamDestroy
#define psm_gpu_stream_synchronize hipStreamSynchronize
#define psm_gpu_get_last_error hipGetLastError
/* AMD GPUs give a block its whole LDS (sharedMemPerBlock, 64 KiB) without an
 * opt-in, and ROCm before 5.6 does not implement this attribute: no call. */
#define psm_gpu_func_set_max_dynamic_shared(kernel, bytes) ((void)(kernel), (void)(bytes), hipSuccess)
typedef hipFuncAttributes psm_gpu_func_attributes_t;
#define psm_gpu_func_get_attributes(attributes, kernel) \
    hipFuncGetAttributes((attributes), (const void *)(kernel))
#define psm_gpu_error_out_of_memory hipErrorOutOfMemory
#define psm_gpu_error_cooperative_too_large hipErrorCooperativeLaunchTooLarge
#define psm_gpu_shared_optin(prop) ((size_t)(prop).sharedMemPerBlock)
/* Cooperative launch (all blocks resident at once, or the launch fails). */
#define psm_gpu_cooperative_supported(value, device) \
    hipDeviceGetAttribute((value), hipDeviceAttributeCooperativeLaunch, (device))
#define psm_gpu_occupancy_blocks(blocks, kernel, threads) \
    hipOccupancyMaxActiveBlocksPerMultiprocessor((blocks), (const void *)(kernel), (threads), 0)
#define psm_gpu_launch_cooperative(kernel, blocks, threads, arguments, stream) \
    hipLaunchCooperativeKernel((const void *)(kernel), dim3(blocks), dim3(threads), (arguments), 0, \
                               (stream))

#define PSM_GPU_KERNEL __global__
#define PSM_GPU_DEVICE __device__ __forceinline__
#define PSM_GPU_HOST_DEVICE __host__ __device__ __forceinline__

namespace PSM_GPU_NAMESPACE {
/* Shuffles within groups of WarpSize lanes (the whole wave on the device
 * whose kernels use them). Ballot is 64 bits wide on AMD; on a wave32 target
 * the upper half is zero. */
template <int WarpSize, typename T>
PSM_GPU_DEVICE T psm_gpu_shfl_xor(T value, int lane_mask)
{
    return __shfl_xor(value, lane_mask, WarpSize);
}
template <int WarpSize, typename T>
PSM_GPU_DEVICE T psm_gpu_shfl_up(T value, unsigned delta)
{
    return __shfl_up(value, delta, WarpSize);
}
template <int WarpSize, typename T>
PSM_GPU_DEVICE T psm_gpu_shfl(T value, int source_lane)
{
    return __shfl(value, source_lane, WarpSize);
}
PSM_GPU_DEVICE unsigned long long psm_gpu_ballot(int predicate)
{
    return (unsigned long long)__ballot(predicate);
}
PSM_GPU_DEVICE float psm_gpu_half_bits_to_float(unsigned short bits)
{
    return __half2float(__ushort_as_half(bits));
}
/* max(a, b), NaN when either is NaN. */
PSM_GPU_DEVICE float psm_gpu_max_keep_nan(float a, float b)
{
    return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
}
} /* namespace PSM_GPU_NAMESPACE */

#else
/* --------------------------------------------------------------- CUDA --- */
#include <cuda_runtime.h>
#include <cuda_fp16.h>

/* NVIDIA warps are 32 wide on both passes. */
#define PSM_GPU_DEVICE_WARP_SIZE 32
#define PSM_GPU_HAS_WAVE64 0
#define PSM_GPU_NAMESPACE psm_cuda
/* All lanes of a warp, for the *_sync intrinsics. */
#define PSM_GPU_FULL_WARP_MASK 0xffffffffu

#define PSM_GPU_BACKEND_ID PSM_BACKEND_CUDA
#define PSM_GPU_OPS_SYMBOL psm_cuda_ops
#define PSM_GPU_RUNTIME_NAME "CUDA"

typedef cudaStream_t psm_gpu_stream_t;
typedef cudaEvent_t psm_gpu_event_t;
typedef cudaError_t psm_gpu_error_t;
typedef cudaDeviceProp psm_gpu_device_prop_t;
#define psm_gpu_success cudaSuccess
#define psm_gpu_error_string cudaGetErrorString
#define psm_gpu_get_device_count cudaGetDeviceCount
#define psm_gpu_set_device cudaSetDevice
#define psm_gpu_get_device cudaGetDevice
#define psm_gpu_get_device_properties cudaGetDeviceProperties
#define psm_gpu_malloc cudaMalloc
#define psm_gpu_free cudaFree
#define psm_gpu_malloc_host cudaMallocHost
#define psm_gpu_free_host cudaFreeHost
#define psm_gpu_memcpy_async cudaMemcpyAsync
#define psm_gpu_memcpy_2d_async cudaMemcpy2DAsync
#define psm_gpu_memset_async cudaMemsetAsync
#define psm_gpu_memcpy_host_to_device cudaMemcpyHostToDevice
#define psm_gpu_memcpy_device_to_host cudaMemcpyDeviceToHost
#define psm_gpu_memcpy_device_to_device cudaMemcpyDeviceToDevice
#define psm_gpu_stream_create_non_blocking(stream) \
    cudaStreamCreateWithFlags((stream), cudaStreamNonBlocking)
#define psm_gpu_stream_destroy cudaStreamDestroy
#define psm_gpu_stream_synchronize cudaStreamSynchronize
#define psm_gpu_get_last_error cudaGetLastError
#define psm_gpu_func_set_max_dynamic_shared(kernel, bytes) \
    cudaFuncSetAttribute((kernel), cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(bytes))
#define psm_gpu_shared_optin(prop) ((size_t)(prop).sharedMemPerBlockOptin)
typedef cudaFuncAttributes psm_gpu_func_attributes_t;
#define psm_gpu_func_get_attributes(attributes, kernel) cudaFuncGetAttributes((attributes), (kernel))
#define psm_gpu_error_out_of_memory cudaErrorMemoryAllocation
#define psm_gpu_error_cooperative_too_large cudaErrorCooperativeLaunchTooLarge
/* Cooperative launch (all blocks resident at once, or the launch fails). */
#define psm_gpu_cooperative_supported(value, device) \
    cudaDeviceGetAttribute((value), cudaDevAttrCooperativeLaunch, (device))
#define psm_gpu_occupancy_blocks(blocks, kernel, threads) \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor((blocks), (kernel), (threads), 0)
#define psm_gpu_launch_cooperative(kernel, blocks, threads, arguments, stream) \
    cudaLaunchCooperativeKernel((const void *)(kernel), dim3(blocks), dim3(threads), (arguments), 0, \
                                (stream))

#define PSM_GPU_KERNEL __global__
#define PSM_GPU_DEVICE __device__ __forceinline__
#define PSM_GPU_HOST_DEVICE __host__ __device__ __forceinline__

namespace PSM_GPU_NAMESPACE {
template <int WarpSize, typename T>
PSM_GPU_DEVICE T psm_gpu_shfl_xor(T value, int lane_mask)
{
    return __shfl_xor_sync(PSM_GPU_FULL_WARP_MASK, value, lane_mask, WarpSize);
}
template <int WarpSize, typename T>
PSM_GPU_DEVICE T psm_gpu_shfl_up(T value, unsigned delta)
{
    return __shfl_up_sync(PSM_GPU_FULL_WARP_MASK, value, delta, WarpSize);
}
template <int WarpSize, typename T>
PSM_GPU_DEVICE T psm_gpu_shfl(T value, int source_lane)
{
    return __shfl_sync(PSM_GPU_FULL_WARP_MASK, value, source_lane, WarpSize);
}
PSM_GPU_DEVICE unsigned long long psm_gpu_ballot(int predicate)
{
    return (unsigned long long)__ballot_sync(PSM_GPU_FULL_WARP_MASK, predicate);
}
PSM_GPU_DEVICE float psm_gpu_half_bits_to_float(unsigned short bits)
{
    return __half2float(__ushort_as_half(bits));
}
/* max(a, b), NaN when either is NaN: one instruction from sm_80 on. */
PSM_GPU_DEVICE float psm_gpu_max_keep_nan(float a, float b)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float result;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(result) : "f"(a), "f"(b));
    return result;
#else
    return (a != a || b != b) ? __int_as_float(0x7fc00000) : fmaxf(a, b);
#endif
}
} /* namespace PSM_GPU_NAMESPACE */
#endif

/* ------------------------------------------------------ both vendors --- */

namespace PSM_GPU_NAMESPACE {

/* Does this pass compile real code for kernels of this warp size? On the
 * device pass, only for the target's own wave size; on the host pass (launch
 * stubs) for every one. */
template <int WarpSize>
PSM_GPU_HOST_DEVICE constexpr bool psm_gpu_wave_compiled()
{
#if defined(PSM_GPU_DEVICE_WARP_SIZE)
    return WarpSize == PSM_GPU_DEVICE_WARP_SIZE;
#else
    return true;
#endif
}

/* Shared-memory and global atomics used by the kernels (the same spelling
 * in CUDA and HIP, named here so that a third vendor changes one file). */
PSM_GPU_DEVICE unsigned psm_gpu_atomic_add_u32(unsigned *address, unsigned value)
{
    return atomicAdd(address, value);
}
PSM_GPU_DEVICE unsigned psm_gpu_atomic_or_u32(unsigned *address, unsigned value)
{
    return atomicOr(address, value);
}
PSM_GPU_DEVICE unsigned psm_gpu_atomic_exchange_u32(unsigned *address, unsigned value)
{
    return atomicExch(address, value);
}
PSM_GPU_DEVICE unsigned psm_gpu_atomic_cas_u32(unsigned *address, unsigned expected,
                                               unsigned value)
{
    return atomicCAS(address, expected, value);
}
PSM_GPU_DEVICE unsigned long long psm_gpu_atomic_add_u64(unsigned long long *address,
                                                         unsigned long long value)
{
    return atomicAdd(address, value);
}
PSM_GPU_DEVICE unsigned long long psm_gpu_atomic_max_u64(unsigned long long *address,
                                                         unsigned long long value)
{
    return atomicMax(address, value);
}
PSM_GPU_DEVICE unsigned long long psm_gpu_atomic_min_u64(unsigned long long *address,
                                                         unsigned long long value)
{
    return atomicMin(address, value);
}
/* The lowest set bit of a ballot, -1 for none. */
PSM_GPU_DEVICE int psm_gpu_first_set_lane(unsigned long long ballot)
{
    return __ffsll((long long)ballot) - 1;
}
PSM_GPU_DEVICE void psm_gpu_block_barrier(void)
{
    __syncthreads();
}
/* Orders this thread's global writes before its later ones, device-wide. */
PSM_GPU_DEVICE void psm_gpu_device_fence(void)
{
    __threadfence();
}

/* Lane exchange for the warp algorithms of psm_gpu_warp.h: on the device it
 * is the hardware shuffle and ballot; tests/test_warp.cpp passes a simulated
 * one instead. */
template <int WarpSize>
struct psm_gpu_hardware_lanes {
    template <typename T>
    PSM_GPU_DEVICE T exchange_xor(T value, int lane_mask) const
    {
        return psm_gpu_shfl_xor<WarpSize>(value, lane_mask);
    }
    template <typename T>
    PSM_GPU_DEVICE T exchange_up(T value, unsigned delta) const
    {
        return psm_gpu_shfl_up<WarpSize>(value, delta);
    }
    template <typename T>
    PSM_GPU_DEVICE T exchange_from(T value, int source_lane) const
    {
        return psm_gpu_shfl<WarpSize>(value, source_lane);
    }
    PSM_GPU_DEVICE int first_lane_where(int predicate) const
    {
        return psm_gpu_first_set_lane(psm_gpu_ballot(predicate));
    }
};

struct psm_gpu_hardware_block {
    PSM_GPU_DEVICE void barrier() const { psm_gpu_block_barrier(); }
};

} /* namespace PSM_GPU_NAMESPACE */

#endif /* PSM_GPU_H */
