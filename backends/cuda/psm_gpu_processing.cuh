/*
 * psm_gpu_processing.cuh: logit processing on CUDA and HIP, before the
 * sampling kernels (docs/SAMPLING.md section 1). The rules are
 * core/psm_processing.h's, the same code the CPU backend runs; these kernels
 * only spread them over the GPU:
 *   1. read: every output row's logits, read (psm_read_logit) into a dense
 *      f32 buffer, its counts cleared; a row whose parameters or row index
 *      are out of range is written as NaN, so that the pipeline finds it bad;
 *   2. lists: a block per row, kernels/psm_stage_lists.h (its penalties
 *      over the block, its bias in list order); a row whose lists are out
 *      of range is marked bad the same way;
 *   3. mask: the allowed-token mask and the final read.
 * The pipeline then samples the buffer as f32 logits, one row per output
 * row. This costs a write and two reads of the batch more than sampling
 * alone; fusing the dense steps into the tile pass is future work.
 */
#ifndef PSM_GPU_PROCESSING_CUH
#define PSM_GPU_PROCESSING_CUH

#include "psm_gpu_kernels.cuh"
#include "psm_processing.h"
#include "psm_stage_lists.h"

namespace PSM_GPU_NAMESPACE {

/* The processing of one call, on the device. */
struct psm_gpu_processing {
    float *processed; /* rows x vocab: the logits the pipeline then samples */
    psm_u32 *counts;  /* rows x vocab: step 2's token counts */
    psm_processing_arrays arrays; /* device pointers */
    const psm_u32 *mask;          /* NULL: every token allowed */
    psm_i64 mask_words;           /* words per row of the mask */
};

template <int Dtype>
PSM_GPU_KERNEL void psm_gpu_process_read_kernel(const psm_gpu_call call,
                                                const psm_gpu_processing processing)
{
    const psm_i64 total = call.rows * call.vocab;
    for (psm_i64 k = (psm_i64)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (psm_i64)gridDim.x * blockDim.x) {
        const psm_i64 row = k / call.vocab;
        const psm_row_params p = psm_gpu_row_params(call, row);
        processing.counts[k] = 0u;
        processing.processed[k] =
            p.valid ? psm_read_logit(psm_raw_logit(psm_gpu_row_base<Dtype>(call, p.logits_row),
                                                   Dtype, k - row * call.vocab))
                    : NAN;
    }
}

/* A block per row (rows in turn), its threads sharing the row's lists. */
PSM_GPU_KERNEL void psm_gpu_process_lists_kernel(const psm_gpu_call call,
                                                 const psm_gpu_processing processing)
{
    __shared__ psm_u32 bad;
    for (psm_i64 row = blockIdx.x; row < call.rows; row += gridDim.x) {
        const psm_row_lists lists = psm_row_lists_of(&processing.arrays, row);
        psm_stage_row_lists(processing.processed + row * call.vocab,
                            processing.counts + row * call.vocab, &lists, call.vocab, 1, &bad);
    }
}

PSM_GPU_KERNEL void psm_gpu_process_mask_kernel(const psm_gpu_call call,
                                                const psm_gpu_processing processing)
{
    const psm_i64 total = call.rows * call.vocab;
    for (psm_i64 k = (psm_i64)blockIdx.x * blockDim.x + threadIdx.x; k < total;
         k += (psm_i64)gridDim.x * blockDim.x) {
        const psm_i64 row = k / call.vocab;
        const int allowed =
            processing.mask
                ? psm_token_allowed(processing.mask + row * processing.mask_words, k - row * call.vocab)
                : 1;
        processing.processed[k] = psm_processed_logit(processing.processed[k], allowed);
    }
}

} /* namespace PSM_GPU_NAMESPACE */

#endif /* PSM_GPU_PROCESSING_CUH */
