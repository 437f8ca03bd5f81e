/* test_cuda_graph_kernels.cu: see test_cuda_graph_kernels.h. */
#include "test_cuda_graph_kernels.h"

static __global__ void advance_offsets(unsigned long long *offsets, long long count)
{
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < count)
        offsets[i] += 1ull;
}

extern "C" cudaError_t psm_test_advance_offsets(uint64_t *offsets, int64_t count,
                                                cudaStream_t stream)
{
    const int threads = 128;
    const unsigned blocks = (unsigned)((count + threads - 1) / threads);
    advance_offsets<<<blocks, threads, 0, stream>>>((unsigned long long *)offsets,
                                                    (long long)count);
    return cudaGetLastError();
}
