/* opencl_sharded.c: one pass of a sharded call on the OpenCL backend
 * (docs/SAMPLING.md section 8; core/psm_shard_pass.h says what each pass
 * computes, the device code is kernels/psm_stage_sharded.h).
 *
 * The items, tile keys and out words are written to the context's shard
 * buffers (state->shard_own, grown as calls need them and kept), host
 * logits too; psm_shard_pass
 * runs a group per item (zeroing a skipped item's words); the out words are
 * read back. */
#include "error.h"
#include "opencl_backend.h"
#include "psm_shard_pass.h"

#include <CL/cl.h>

#include <stdint.h>

_Static_assert(sizeof(psm_shard_item) == PSM_SHARD_ITEM_BYTES,
               "psm_shard_item is laid out with padding");
_Static_assert(sizeof(psm_shard_geometry) == PSM_SHARD_GEOMETRY_BYTES,
               "psm_shard_geometry is laid out with padding");

/* The context's shard buffers. */
enum { SHARD_ITEMS, SHARD_TILE_KEYS, SHARD_OUT, SHARD_LOGITS };

/* Host data into shard buffer `slot` (grown to fit); *out: its cl_mem. */
static psm_status write_buffer(opencl_state *state, int slot, const void *data, size_t bytes,
                               cl_mem *out)
{
    device_buffer *buffer = &state->shard_own[slot];
    PSM_TRY(opencl_ensure_buffer(state, buffer, bytes, "a sharded pass"));
    CL_TRY(clEnqueueWriteBuffer(state->queue, buffer->mem, CL_TRUE, 0, bytes, data, 0, NULL,
                                NULL),
           "clEnqueueWriteBuffer");
    *out = buffer->mem;
    return PSM_OK;
}

psm_status opencl_shard_pass(void *opaque, const psm_tensor *logits,
                             const psm_shard_geometry *geometry, const psm_shard_item *items,
                             int64_t item_count, const psm_u64 *tile_keys, psm_u64 *out)
{
    opencl_state *state = opaque;
    PSM_TRY(opencl_use_programs(state, PROGRAM_BIT(PROGRAM_SHARDED)));
    const size_t count = (size_t)item_count;
    const size_t out_bytes =
        count * (size_t)psm_shard_pass_words(geometry->kind, geometry->local_tiles) *
        sizeof(psm_u64);
    cl_mem items_mem = NULL, keys_mem = NULL, out_mem = NULL, logits_mem = NULL;
    PSM_TRY(write_buffer(state, SHARD_ITEMS, items, count * sizeof *items, &items_mem));
    if (geometry->kind == PSM_SHARD_PASS_TILE_MASSES)
        PSM_TRY(write_buffer(state, SHARD_TILE_KEYS, tile_keys,
                             count * (size_t)geometry->local_tiles * sizeof *tile_keys,
                             &keys_mem));
    PSM_TRY(opencl_ensure_buffer(state, &state->shard_own[SHARD_OUT], out_bytes,
                                 "a sharded pass"));
    out_mem = state->shard_own[SHARD_OUT].mem;
    const size_t logits_bytes =
        ((size_t)(logits->rows - 1) * (size_t)logits->row_stride + (size_t)logits->vocab) *
        (logits->dtype == PSM_DTYPE_F32 ? 4 : 2);
    cl_mem staging = NULL;
    if (logits->memory == PSM_MEMORY_HOST) {
        PSM_TRY(opencl_ensure_buffer(state, &state->shard_own[SHARD_LOGITS], logits_bytes,
                                     "a sharded pass"));
        staging = state->shard_own[SHARD_LOGITS].mem;
    }
    PSM_TRY(opencl_input_buffer(state, staging, logits->data, logits->memory, logits_bytes,
                                "logits", &logits_mem));

    cl_kernel kernel = state->kernels[KERNEL_SHARD_PASS];
    cl_uint index = 0;
    PSM_TRY(opencl_set_arg(kernel, &index, sizeof *geometry, geometry));
    const cl_mem mems[] = {logits_mem, items_mem, keys_mem, out_mem};
    for (size_t i = 0; i < sizeof mems / sizeof mems[0]; ++i)
        PSM_TRY(opencl_set_arg(kernel, &index, sizeof(cl_mem), &mems[i]));
    PSM_TRY(opencl_enqueue(state, kernel, 1, count, opencl_kernel_names[KERNEL_SHARD_PASS]));
    CL_TRY(clEnqueueReadBuffer(state->queue, out_mem, CL_TRUE, 0, out_bytes, out, 0, NULL, NULL),
           "clEnqueueReadBuffer");
    return PSM_OK;
}
