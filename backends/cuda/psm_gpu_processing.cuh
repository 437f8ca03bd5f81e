/*
 * psm_gpu_processing.cuh: logit processing on CUDA and HIP, before the
 * sampling kernels (docs/SAMPLING.md section 1). The rules are
 * core/psm_processing.h's, the same code the CPU backend runs; these kernels
 * only spread them over the GPU:
 *   1. read: every output row's logits read (psm_read_logit), masked and
 *      read again (step 3, made early: kernels/psm_stage_lists.h says why
 *      that is exact) into a dense f32 buffer; a row whose parameters or row
 *      index are out of range is written as NaN, so that the pipeline finds
 *      it bad;
 *   2. lists: a block per row, kernels/psm_stage_lists.h (the listed tokens
 *      read again from the row as given, its penalties over the block, its
 *      bias in list order, then step 3 for them); a row whose lists are out
 *      of range is marked bad the same way. Calls without lists skip it.
 * The pipeline then samples the buffer as f32 logits, one row per output
 * row. This costs a write and a read of the batch (as f32) more than
 * sampling alone. Calls whose rows are read only by the tile and draw
 * stages (psm_gpu_backend.cu's processing_on_read: no filters, no top-N)
 * skip step 1 and the buffer: step 2 writes the listed tokens' values into
 * an overlay row and sets their bits, and those stages apply the mask and
 * the overlay as they read each tile (core/psm_processing.h's
 * psm_read_processing).
 */
#ifndef PSM_GPU_PROCESSING_CUH
#define PSM_GPU_PROCESSING_CUH

#include "psm_gpu_kernels.cuh"
#include "psm_processing.h"
#include "psm_stage_lists.h"

namespace PSM_GPU_NAMESPACE {

/* The processing of one call, on the device. */
struct psm_gpu_processing {
    float *processed; /* rows x vocab: the logits the pipeline then samples, or
                         where it processes them as it reads, the overlay */
    psm_u32 *counts;  /* rows x vocab: step 2's token counts */
    psm_u32 *listed;  /* the overlay's listed-token bits; NULL: no overlay */
    psm_processing_arrays arrays; /* device pointers */
    const psm_u32 *mask;          /* NULL: every token allowed */
    psm_i64 mask_words;           /* words per row of the mask */
};

/* The mask words of an output row; NULL when every token is allowed. */
PSM_GPU_DEVICE const psm_u32 *psm_gpu_row_mask(const psm_gpu_processing &processing, psm_i64 row)
{
    return processing.mask ? processing.mask + row * processing.mask_words : NULL;
}

/* Tokens of a row that one block takes at a time in the read step: each
 * thread then reads 16 of them for one resolution of the row's parameters
 * and one 64-bit division, which per token made the step compute-bound
 * (215 us at 41% of DRAM bandwidth for 256 x 151,936 on an H100, with a
 * span of one token a thread). */
#define PSM_GPU_PROCESS_SPAN 4096

/* Steps 1 and 3 of every token: a grid-stride loop over rows x spans. */
template <int Dtype>
PSM_GPU_KERNEL void psm_gpu_process_read_kernel(const psm_gpu_call call,
                                                const psm_gpu_processing processing)
{
    const psm_i64 spans = (call.vocab + PSM_GPU_PROCESS_SPAN - 1) / PSM_GPU_PROCESS_SPAN;
    for (psm_i64 unit = blockIdx.x; unit < call.rows * spans; unit += gridDim.x) {
        const psm_i64 row = unit / spans;
        const psm_i64 begin = (unit - row * spans) * PSM_GPU_PROCESS_SPAN;
        const psm_i64 end =
            begin + PSM_GPU_PROCESS_SPAN < call.vocab ? begin + PSM_GPU_PROCESS_SPAN : call.vocab;
        const psm_row_params p = psm_gpu_row_params(call, row);
        const psm_u32 *mask = psm_gpu_row_mask(processing, row);
        float *out = processing.processed + row * call.vocab;
        const unsigned char *logits =
            p.valid ? psm_gpu_row_base<Dtype>(call, p.logits_row) : nullptr;
#pragma unroll 4
        for (psm_i64 token = begin + threadIdx.x; token < end; token += blockDim.x) {
            if (!logits) {
                out[token] = NAN;
                continue;
            }
            const float x = psm_read_logit(psm_raw_logit(logits, Dtype, token));
            out[token] = psm_processed_logit(x, mask ? psm_token_allowed(mask, token) : 1);
        }
    }
}

/* Threads of the lists step's blocks (one row per block): a row's lists
 * are walked in chains of dependent accesses, a block's width at a time.
 * Token histories take the widest blocks (2,048-token histories at 256 x
 * 151,936 took 104 us on an H100 with blocks of 256, at 4% of SM
 * throughput); a bias list alone, applied by one thread in list order,
 * runs faster in blocks of 256 (blocks of 1,024 cost it 7 us). */
#define PSM_GPU_LISTS_THREADS 1024
#define PSM_GPU_LISTS_THREADS_BIAS 256

/* Step 2: a block per row (rows in turn), its threads sharing the row's
 * lists. */
template <int Dtype>
PSM_GPU_KERNEL void __launch_bounds__(PSM_GPU_LISTS_THREADS)
    psm_gpu_process_lists_kernel(const psm_gpu_call call, const psm_gpu_processing processing)
{
    __shared__ psm_u32 bad;
    __shared__ psm_u32 table_tokens[PSM_LISTS_TABLE_SLOTS], table_words[PSM_LISTS_TABLE_SLOTS];
    const psm_lists_table table = {table_tokens, table_words};
    for (psm_i64 row = blockIdx.x; row < call.rows; row += gridDim.x) {
        const psm_row_params p = psm_gpu_row_params(call, row);
        const psm_row_lists lists = psm_row_lists_of(&processing.arrays, row);
        psm_stage_row_lists(processing.processed + row * call.vocab,
                            processing.listed
                                ? processing.listed + row * psm_listed_words(call.vocab)
                                : NULL,
                            p.valid ? psm_gpu_row_base<Dtype>(call, p.logits_row) : NULL, Dtype,
                            psm_gpu_row_mask(processing, row),
                            processing.counts + row * call.vocab, &lists, call.vocab, 1, &bad,
                            table);
    }
}

} /* namespace PSM_GPU_NAMESPACE */

#endif /* PSM_GPU_PROCESSING_CUH */
