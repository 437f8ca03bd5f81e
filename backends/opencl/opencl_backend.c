/*
 * opencl_backend.c: the OpenCL backend (host side, OpenCL 1.2 API): its
 * operations, the creation and destruction of its state, and its error
 * helpers. The other files (opencl_backend.h names them) hold the devices,
 * the programs, the buffers and the launch.
 *
 * Devices. device_index counts the GPU, accelerator and CPU devices of every
 * platform the ICD loader reports, in this order: all GPUs (platforms in
 * loader order, devices in platform order), then all accelerators, then all
 * CPUs. Index 0 is therefore the first GPU when there is one. With
 * options->native_stream the caller's cl_command_queue is used instead, and
 * its context and device come from clGetCommandQueueInfo.
 *
 * Memory. PSM_MEMORY_DEVICE means the pointer is a cl_mem of the context's
 * cl_context (per-row parameter arrays then are cl_mem too). Host inputs are
 * copied to device staging buffers with blocking writes (so the caller may
 * reuse them at once); host outputs are read back with blocking reads. With
 * cl_mem inputs and outputs a call enqueues kernels only: no host
 * synchronisation (unless check_rows) and, once the shape has been seen or
 * reserved, no allocation. With a caller's workspace (a cl_mem) every
 * buffer of the call is a sub-buffer of it (opencl_buffers.c), and the call
 * allocates no device memory at all; only the row check's one int
 * (first_bad_row) is the context's, allocated with it.
 *
 * Programs. The kernels (psm_kernels.cl, after the headers it includes,
 * which backends/opencl/CMakeLists.txt lists) are embedded at build time
 * (embed.cmake) and handed to the compiler as a program's source strings,
 * headers first, for two programs: the sampling program (what a
 * psm_sample or psm_probs call without logit processing, top-N logprobs or
 * an engine's filter order runs), built at context creation, and the
 * features program (those, psm_verify and the sharded passes), built by the
 * context's first call that needs it, so that PoCL's first-use compile of a
 * plain call is only the sampling program's. Every kernel takes the call's
 * description, a psm_opencl_request (psm_opencl_request.h, shared with the
 * kernels), as its first argument, then its buffers. A program is built
 * once per (cl_context, device, build options, source hash) and shared by
 * every psm_context using that key; contexts this backend creates are
 * shared per device for the same reason. Program binaries are also kept in
 * host memory for the process's lifetime (keyed by device, options and
 * hash), so that a later context on the same device loads a binary instead
 * of compiling.
 * Development mode: POLYSAMPLE_OPENCL_SOURCE_DIR (read by core/environment.c)
 * names a source tree whose kernel files replace the embedded copies; they
 * are read at context creation, for both programs.
 */
#include "backend.h"
#include "error.h"
#include "module.h"
#include "opencl_backend.h"

#include <CL/cl.h>

#include <stdio.h>
#include <stdlib.h>

/* ---- errors ------------------------------------------------------------- */

const char *opencl_error_name(cl_int code)
{
    switch (code) {
    case CL_DEVICE_NOT_FOUND: return "CL_DEVICE_NOT_FOUND";
    case CL_DEVICE_NOT_AVAILABLE: return "CL_DEVICE_NOT_AVAILABLE";
    case CL_COMPILER_NOT_AVAILABLE: return "CL_COMPILER_NOT_AVAILABLE";
    case CL_MEM_OBJECT_ALLOCATION_FAILURE: return "CL_MEM_OBJECT_ALLOCATION_FAILURE";
    case CL_OUT_OF_RESOURCES: return "CL_OUT_OF_RESOURCES";
    case CL_OUT_OF_HOST_MEMORY: return "CL_OUT_OF_HOST_MEMORY";
    case CL_BUILD_PROGRAM_FAILURE: return "CL_BUILD_PROGRAM_FAILURE";
    case CL_INVALID_VALUE: return "CL_INVALID_VALUE";
    case CL_INVALID_PLATFORM: return "CL_INVALID_PLATFORM";
    case CL_INVALID_DEVICE: return "CL_INVALID_DEVICE";
    case CL_INVALID_CONTEXT: return "CL_INVALID_CONTEXT";
    case CL_INVALID_COMMAND_QUEUE: return "CL_INVALID_COMMAND_QUEUE";
    case CL_INVALID_MEM_OBJECT: return "CL_INVALID_MEM_OBJECT";
    case CL_INVALID_BINARY: return "CL_INVALID_BINARY";
    case CL_INVALID_BUILD_OPTIONS: return "CL_INVALID_BUILD_OPTIONS";
    case CL_INVALID_PROGRAM: return "CL_INVALID_PROGRAM";
    case CL_INVALID_PROGRAM_EXECUTABLE: return "CL_INVALID_PROGRAM_EXECUTABLE";
    case CL_INVALID_KERNEL_NAME: return "CL_INVALID_KERNEL_NAME";
    case CL_INVALID_KERNEL: return "CL_INVALID_KERNEL";
    case CL_INVALID_ARG_INDEX: return "CL_INVALID_ARG_INDEX";
    case CL_INVALID_ARG_VALUE: return "CL_INVALID_ARG_VALUE";
    case CL_INVALID_ARG_SIZE: return "CL_INVALID_ARG_SIZE";
    case CL_INVALID_KERNEL_ARGS: return "CL_INVALID_KERNEL_ARGS";
    case CL_INVALID_WORK_DIMENSION: return "CL_INVALID_WORK_DIMENSION";
    case CL_INVALID_WORK_GROUP_SIZE: return "CL_INVALID_WORK_GROUP_SIZE";
    case CL_INVALID_GLOBAL_WORK_SIZE: return "CL_INVALID_GLOBAL_WORK_SIZE";
    case CL_INVALID_EVENT_WAIT_LIST: return "CL_INVALID_EVENT_WAIT_LIST";
    case CL_INVALID_OPERATION: return "CL_INVALID_OPERATION";
    case CL_INVALID_BUFFER_SIZE: return "CL_INVALID_BUFFER_SIZE";
    case CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST:
        return "CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST";
    case -1001: return "CL_PLATFORM_NOT_FOUND_KHR";
    default: return "unknown OpenCL error";
    }
}

psm_status opencl_status_of(cl_int code)
{
    return (code == CL_MEM_OBJECT_ALLOCATION_FAILURE || code == CL_OUT_OF_HOST_MEMORY ||
            code == CL_INVALID_BUFFER_SIZE)
               ? PSM_ERR_OUT_OF_MEMORY
               : PSM_ERR_DRIVER;
}

psm_status opencl_failure(cl_int code, const char *what)
{
    return psm_set_error(opencl_status_of(code), "OpenCL: %s failed: %s (%d)", what,
                         opencl_error_name(code), (int)code);
}

/* ---- state ------------------------------------------------------------- */

static void opencl_destroy(void *opaque)
{
    opencl_state *state = opaque;
    if (!state)
        return;
    if (state->queue)
        clFinish(state->queue);
    opencl_release_workspace(state);
    opencl_release_programs(state);
    if (state->queue)
        clReleaseCommandQueue(state->queue);
    if (state->context) {
        if (state->own_context)
            opencl_release_own_context(state->context);
        else
            clReleaseContext(state->context);
    }
    free(state);
}

/* ---- creation ------------------------------------------------------------ */

static psm_status create_state(const psm_context_options *options, int device_index,
                               opencl_state *state, char *device_name, size_t device_name_size)
{
    cl_int code = CL_SUCCESS;
    if (options->native_stream) {
        cl_command_queue queue = (cl_command_queue)options->native_stream;
        code = clGetCommandQueueInfo(queue, CL_QUEUE_CONTEXT, sizeof state->context,
                                     &state->context, NULL);
        if (code == CL_SUCCESS)
            code = clGetCommandQueueInfo(queue, CL_QUEUE_DEVICE, sizeof state->device,
                                         &state->device, NULL);
        if (code != CL_SUCCESS) {
            state->context = NULL;
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "OpenCL: native_stream is not a cl_command_queue "
                                 "(clGetCommandQueueInfo: %s)",
                                 opencl_error_name(code));
        }
        CL_TRY(clRetainContext(state->context), "clRetainContext");
        CL_TRY(clRetainCommandQueue(queue), "clRetainCommandQueue");
        state->queue = queue;
        cl_command_queue_properties properties = 0;
        CL_TRY(clGetCommandQueueInfo(queue, CL_QUEUE_PROPERTIES, sizeof properties,
                                     &properties, NULL),
               "clGetCommandQueueInfo");
        state->queue_out_of_order =
            (properties & CL_QUEUE_OUT_OF_ORDER_EXEC_MODE_ENABLE) != 0;
    } else {
        device_list list;
        PSM_TRY(opencl_list_devices(&list));
        if ((cl_uint)device_index >= list.count) {
            cl_uint count = list.count;
            free(list.devices);
            return psm_set_error(PSM_ERR_NO_DEVICE,
                                 "OpenCL: device index %d, but there are %u device(s)",
                                 device_index, (unsigned)count);
        }
        state->device = list.devices[device_index];
        free(list.devices);
        PSM_TRY(opencl_acquire_own_context(state->device, &state->context));
        state->own_context = 1;
        state->queue = clCreateCommandQueue(state->context, state->device, 0, &code);
        if (code != CL_SUCCESS) {
            state->queue = NULL;
            return opencl_failure(code, "clCreateCommandQueue");
        }
    }

    char name[256], platform_name[256];
    cl_platform_id platform = NULL;
    PSM_TRY(opencl_device_string(state->device, CL_DEVICE_NAME, name, sizeof name));
    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_PLATFORM, sizeof platform, &platform, NULL),
           "clGetDeviceInfo");
    CL_TRY(clGetPlatformInfo(platform, CL_PLATFORM_NAME, sizeof platform_name, platform_name,
                             NULL),
           "clGetPlatformInfo");
    platform_name[sizeof platform_name - 1] = '\0';
    snprintf(device_name, device_name_size, "%s (%s)", name, platform_name);

    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_LOCAL_MEM_SIZE, sizeof state->local_memory,
                           &state->local_memory, NULL),
           "clGetDeviceInfo");
    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_MAX_COMPUTE_UNITS,
                           sizeof state->compute_units, &state->compute_units, NULL),
           "clGetDeviceInfo");
    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_MAX_MEM_ALLOC_SIZE,
                           sizeof state->max_allocation, &state->max_allocation, NULL),
           "clGetDeviceInfo");

    cl_uint alignment_bits = 0;
    CL_TRY(clGetDeviceInfo(state->device, CL_DEVICE_MEM_BASE_ADDR_ALIGN, sizeof alignment_bits,
                           &alignment_bits, NULL),
           "clGetDeviceInfo");
    /* In bits; at least 16 bytes, so that every part suits the kernels'
     * 16-byte loads whatever the device reports. */
    state->base_alignment = alignment_bits / 8 > 16 ? alignment_bits / 8 : 16;

    PSM_TRY(opencl_build_program(state, options, device_name));
    return opencl_ensure_buffer(state, &state->first_bad_row, sizeof(cl_int), "row check");
}

static psm_status opencl_create(const psm_context_options *options, int device_index,
                                void **state_out, char *device_name, size_t device_name_size)
{
    opencl_state *state = calloc(1, sizeof *state);
    if (!state)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "cannot allocate the OpenCL backend state");
    psm_status status = create_state(options, device_index, state, device_name,
                                     device_name_size);
    if (status != PSM_OK) {
        opencl_destroy(state);
        return status;
    }
    *state_out = state;
    return PSM_OK;
}

static const psm_backend_ops opencl_ops = {
    .api_version = PSM_BACKEND_API_VERSION,
    .id = PSM_BACKEND_OPENCL,
    .features = PSM_FEATURE_LOGIT_PROCESSING | PSM_FEATURE_FILTER_ORDERS |
                PSM_FEATURE_TOP_LOGPROBS,
    .probe = opencl_probe,
    .create = opencl_create,
    .destroy = opencl_destroy,
    .reserve = opencl_reserve,
    .workspace_size = opencl_workspace_size,
    .sample = opencl_sample,
    .probs = opencl_probs,
    .synchronize = opencl_synchronize,
    .verify = opencl_verify,
    .shard_pass = opencl_shard_pass,
};

PSM_DEFINE_BACKEND_MODULE(opencl_ops)
