/*
 * test_cuda_graph_kernels.h: the one kernel test_cuda_graph.c needs of its
 * own, compiled by nvcc (test_cuda_graph_kernels.cu) and called from C.
 */
#ifndef PSM_TEST_CUDA_GRAPH_KERNELS_H
#define PSM_TEST_CUDA_GRAPH_KERNELS_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Queues on `stream` a kernel that adds 1 to each of offsets[0 .. count):
 * what a decode step does to its sequences' positions. Returns the launch's
 * error. */
cudaError_t psm_test_advance_offsets(uint64_t *offsets, int64_t count, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* PSM_TEST_CUDA_GRAPH_KERNELS_H */
