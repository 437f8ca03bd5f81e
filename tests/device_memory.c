/* device_memory.c: host and device buffers for properties (device_memory.h). */
#include "device_memory.h"
#include "harness.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if PSM_TEST_DEVICE_OPENCL
#define CL_TARGET_OPENCL_VERSION 120
#include <CL/cl.h>

#define CL_OK(call)                                                                         \
    do {                                                                                    \
        cl_int cl_ok_status_ = (call);                                                      \
        ck_assert_msg(cl_ok_status_ == CL_SUCCESS, "%s failed (OpenCL error %d)", #call,    \
                      (int)cl_ok_status_);                                                  \
    } while (0)
#endif

#if PSM_TEST_DEVICE_CUDA
#include <cuda_runtime_api.h>

#define CUDA_OK(call)                                                                       \
    do {                                                                                    \
        cudaError_t cuda_ok_error_ = (call);                                                \
        ck_assert_msg(cuda_ok_error_ == cudaSuccess, "%s failed: %s", #call,                \
                      cudaGetErrorString(cuda_ok_error_));                                  \
    } while (0)
#endif

typedef struct owned_buffer {
    void *pointer;
    int in_backend_memory; /* else a host malloc */
} owned_buffer;

struct psm_test_memory {
    psm_backend backend;
    psm_memory kind;
    psm_context *context;
#if PSM_TEST_DEVICE_OPENCL
    cl_context cl_context;
    cl_command_queue cl_queue;
#endif
#if PSM_TEST_DEVICE_CUDA
    cudaStream_t cuda_stream;
#endif
    owned_buffer *buffers;
    size_t buffer_count, buffer_capacity;
};

const char *psm_test_memory_workspace_unavailable(psm_backend backend)
{
    switch (backend) {
    case PSM_BACKEND_CPU: return NULL;
    case PSM_BACKEND_OPENCL:
#if PSM_TEST_DEVICE_OPENCL
        return NULL;
#else
        return "this test program is built without OpenCL (no cl_mem buffers)";
#endif
    case PSM_BACKEND_CUDA:
#if PSM_TEST_DEVICE_CUDA
        return NULL;
#else
        return "this test program is built without the CUDA runtime (no device buffers)";
#endif
    default: return "tests/device_memory.c makes no buffers of this backend";
    }
}

const char *psm_test_memory_unavailable(psm_backend backend, psm_memory kind)
{
    return kind == PSM_MEMORY_HOST ? NULL : psm_test_memory_workspace_unavailable(backend);
}

/* ---- the backend's own memory ------------------------------------------- */

#if PSM_TEST_DEVICE_OPENCL
/* The device a context of the backend opens by default: index 0 in the
 * backend's order, every GPU of every platform, then accelerators, then
 * CPUs. */
static cl_device_id first_opencl_device(void)
{
    static const cl_device_type types[] = {CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_ACCELERATOR,
                                           CL_DEVICE_TYPE_CPU};
    cl_platform_id platforms[16];
    cl_uint platform_count = 0;
    CL_OK(clGetPlatformIDs(16, platforms, &platform_count));
    if (platform_count > 16)
        platform_count = 16;
    for (size_t t = 0; t < sizeof types / sizeof types[0]; ++t)
        for (cl_uint p = 0; p < platform_count; ++p) {
            cl_device_id device = NULL;
            if (clGetDeviceIDs(platforms[p], types[t], 1, &device, NULL) == CL_SUCCESS)
                return device;
        }
    ck_abort_msg("the OpenCL backend is available but no OpenCL device was found");
    return NULL;
}
#endif

static void open_queue(psm_test_memory *memory)
{
    switch (memory->backend) {
#if PSM_TEST_DEVICE_OPENCL
    case PSM_BACKEND_OPENCL: {
        cl_device_id device = first_opencl_device();
        cl_int status = CL_SUCCESS;
        memory->cl_context = clCreateContext(NULL, 1, &device, NULL, NULL, &status);
        CL_OK(status);
        memory->cl_queue = clCreateCommandQueue(memory->cl_context, device, 0, &status);
        CL_OK(status);
        break;
    }
#endif
#if PSM_TEST_DEVICE_CUDA
    case PSM_BACKEND_CUDA:
        CUDA_OK(cudaStreamCreate(&memory->cuda_stream));
        break;
#endif
    default: break;
    }
}

static void *native_stream(const psm_test_memory *memory)
{
#if PSM_TEST_DEVICE_OPENCL
    if (memory->backend == PSM_BACKEND_OPENCL)
        return memory->cl_queue;
#endif
#if PSM_TEST_DEVICE_CUDA
    if (memory->backend == PSM_BACKEND_CUDA)
        return memory->cuda_stream;
#endif
    (void)memory;
    return NULL;
}

static void *backend_allocate(psm_test_memory *memory, size_t bytes)
{
    if (bytes == 0)
        bytes = 1;
#if PSM_TEST_DEVICE_OPENCL
    if (memory->backend == PSM_BACKEND_OPENCL) {
        cl_int status = CL_SUCCESS;
        cl_mem buffer =
            clCreateBuffer(memory->cl_context, CL_MEM_READ_WRITE, bytes, NULL, &status);
        CL_OK(status);
        return buffer;
    }
#endif
#if PSM_TEST_DEVICE_CUDA
    if (memory->backend == PSM_BACKEND_CUDA) {
        void *buffer = NULL;
        CUDA_OK(cudaMalloc(&buffer, bytes));
        return buffer;
    }
#endif
    ck_assert_msg(memory->backend == PSM_BACKEND_CPU, "no %s memory in this test program",
                  psm_backend_name(memory->backend));
    return psm_test_alloc(bytes, 1);
}

static void backend_free(psm_test_memory *memory, void *buffer)
{
#if PSM_TEST_DEVICE_OPENCL
    if (memory->backend == PSM_BACKEND_OPENCL) {
        clReleaseMemObject((cl_mem)buffer);
        return;
    }
#endif
#if PSM_TEST_DEVICE_CUDA
    if (memory->backend == PSM_BACKEND_CUDA) {
        cudaFree(buffer);
        return;
    }
#endif
    (void)memory;
    free(buffer);
}

/* Copies go through the context's own queue or stream, so they are ordered
 * after the calls queued before them, and they complete before returning. */
static void backend_write(psm_test_memory *memory, void *buffer, const void *host, size_t bytes)
{
#if PSM_TEST_DEVICE_OPENCL
    if (memory->backend == PSM_BACKEND_OPENCL) {
        CL_OK(clEnqueueWriteBuffer(memory->cl_queue, (cl_mem)buffer, CL_TRUE, 0, bytes, host, 0,
                                   NULL, NULL));
        return;
    }
#endif
#if PSM_TEST_DEVICE_CUDA
    if (memory->backend == PSM_BACKEND_CUDA) {
        CUDA_OK(cudaMemcpyAsync(buffer, host, bytes, cudaMemcpyHostToDevice,
                                memory->cuda_stream));
        CUDA_OK(cudaStreamSynchronize(memory->cuda_stream));
        return;
    }
#endif
    (void)memory;
    memcpy(buffer, host, bytes);
}

static void backend_read(psm_test_memory *memory, void *host, const void *buffer, size_t bytes)
{
#if PSM_TEST_DEVICE_OPENCL
    if (memory->backend == PSM_BACKEND_OPENCL) {
        CL_OK(clEnqueueReadBuffer(memory->cl_queue, (cl_mem)buffer, CL_TRUE, 0, bytes, host, 0,
                                  NULL, NULL));
        return;
    }
#endif
#if PSM_TEST_DEVICE_CUDA
    if (memory->backend == PSM_BACKEND_CUDA) {
        CUDA_OK(cudaMemcpyAsync(host, buffer, bytes, cudaMemcpyDeviceToHost,
                                memory->cuda_stream));
        CUDA_OK(cudaStreamSynchronize(memory->cuda_stream));
        return;
    }
#endif
    (void)memory;
    memcpy(host, buffer, bytes);
}

/* ---- the psm_test_memory -------------------------------------------------- */

psm_test_memory *psm_test_memory_open(psm_backend backend, psm_memory kind, int check_rows)
{
    const char *why = psm_test_memory_unavailable(backend, kind);
    ck_assert_msg(why == NULL, "%s memory of %s: %s",
                  kind == PSM_MEMORY_HOST ? "host" : "device", psm_backend_name(backend), why);
    psm_test_memory *memory = psm_test_alloc(1, sizeof *memory);
    memory->backend = backend;
    memory->kind = kind;
    /* The queue is opened whatever the kind: a workspace is the backend's
     * memory even when the logits are on the host. */
    open_queue(memory);
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.check_rows = check_rows;
    options.native_stream = native_stream(memory);
    memory->context = psm_test_open_with(&options);
    return memory;
}

void psm_test_memory_close(psm_test_memory *memory)
{
    if (!memory)
        return;
    psm_context_destroy(memory->context); /* waits for its queued work */
    for (size_t i = 0; i < memory->buffer_count; ++i) {
        if (memory->buffers[i].in_backend_memory)
            backend_free(memory, memory->buffers[i].pointer);
        else
            free(memory->buffers[i].pointer);
    }
    free(memory->buffers);
#if PSM_TEST_DEVICE_OPENCL
    if (memory->cl_queue)
        clReleaseCommandQueue(memory->cl_queue);
    if (memory->cl_context)
        clReleaseContext(memory->cl_context);
#endif
#if PSM_TEST_DEVICE_CUDA
    if (memory->cuda_stream)
        cudaStreamDestroy(memory->cuda_stream);
#endif
    free(memory);
}

psm_context *psm_test_memory_context(const psm_test_memory *memory)
{
    return memory->context;
}

psm_memory psm_test_memory_kind(const psm_test_memory *memory)
{
    return memory->kind;
}

int psm_test_memory_checked_on_host(const psm_test_memory *memory)
{
    return memory->kind == PSM_MEMORY_HOST || memory->backend == PSM_BACKEND_CPU;
}

static void *keep(psm_test_memory *memory, void *pointer, int in_backend_memory)
{
    if (memory->buffer_count == memory->buffer_capacity) {
        size_t capacity = memory->buffer_capacity ? 2 * memory->buffer_capacity : 16;
        owned_buffer *grown = realloc(memory->buffers, capacity * sizeof *grown);
        ck_assert_msg(grown != NULL, "out of host memory");
        memory->buffers = grown;
        memory->buffer_capacity = capacity;
    }
    memory->buffers[memory->buffer_count].pointer = pointer;
    memory->buffers[memory->buffer_count].in_backend_memory = in_backend_memory;
    memory->buffer_count++;
    return pointer;
}

static int in_backend_memory(const psm_test_memory *memory)
{
    return memory->kind == PSM_MEMORY_DEVICE;
}

void *psm_test_memory_copy_in(psm_test_memory *memory, const void *host, size_t bytes)
{
    if (!host)
        return NULL;
    if (!in_backend_memory(memory)) {
        void *copy = keep(memory, psm_test_alloc(bytes, 1), 0);
        memcpy(copy, host, bytes);
        return copy;
    }
    void *buffer = keep(memory, backend_allocate(memory, bytes), 1);
    backend_write(memory, buffer, host, bytes);
    return buffer;
}

void *psm_test_memory_filled(psm_test_memory *memory, size_t bytes, unsigned char byte)
{
    unsigned char *pattern = psm_test_alloc(bytes, 1);
    memset(pattern, byte, bytes);
    void *buffer = psm_test_memory_copy_in(memory, pattern, bytes);
    free(pattern);
    return buffer;
}

void psm_test_memory_write(psm_test_memory *memory, void *buffer, const void *host,
                           size_t bytes)
{
    PSM_CHECK_OK(psm_synchronize(memory->context));
    if (in_backend_memory(memory))
        backend_write(memory, buffer, host, bytes);
    else
        memcpy(buffer, host, bytes);
}

void psm_test_memory_read(psm_test_memory *memory, void *host, const void *buffer,
                          size_t bytes)
{
    PSM_CHECK_OK(psm_synchronize(memory->context));
    if (in_backend_memory(memory))
        backend_read(memory, host, buffer, bytes);
    else
        memcpy(host, buffer, bytes);
}

void *psm_test_memory_workspace(psm_test_memory *memory, size_t bytes, unsigned char byte)
{
    const char *why = psm_test_memory_workspace_unavailable(memory->backend);
    ck_assert_msg(why == NULL, "a workspace of %s: %s", psm_backend_name(memory->backend), why);
    unsigned char *pattern = psm_test_alloc(bytes, 1);
    memset(pattern, byte, bytes);
    void *buffer = keep(memory, backend_allocate(memory, bytes), 1);
    if (bytes > 0)
        backend_write(memory, buffer, pattern, bytes);
    free(pattern);
    return buffer;
}
