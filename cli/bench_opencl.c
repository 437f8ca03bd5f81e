/* bench_opencl.c: cl_mem buffers and queue timing for the OpenCL backend's
 * benchmark (see bench_device.h). The tool creates the cl_context and the
 * queue and passes the queue to polysample, so the cl_mem buffers made here
 * belong to the context the backend works in. Timing: clFinish, host clock,
 * the launches, clFinish, host clock (the kernels are polysample's own, so
 * there are no events of ours to profile). */
#define _POSIX_C_SOURCE 200809L
#define CL_TARGET_OPENCL_VERSION 120
#include "bench_device.h"

#include <CL/cl.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* The OpenCL entry points, resolved from the ICD loader at run time (as the
 * library's module does by linking it), so that the tool itself starts on a
 * machine without libOpenCL.so.1 and only this helper is then unavailable. */
#define OPENCL_API_FUNCTIONS(X) X(clCreateBuffer) X(clCreateCommandQueue) X(clCreateContext) X(clEnqueueCopyBuffer) X(clEnqueueReadBuffer) X(clEnqueueWriteBuffer) X(clFinish) X(clGetDeviceIDs) X(clGetDeviceInfo) X(clGetPlatformIDs) X(clReleaseCommandQueue) X(clReleaseContext) X(clReleaseMemObject)
static struct opencl_api {
#define OPENCL_API_POINTER(name) __typeof__(name) *name;
    OPENCL_API_FUNCTIONS(OPENCL_API_POINTER)
#undef OPENCL_API_POINTER
} opencl_api;

static int load_opencl_api(char *error, size_t error_size)
{
    static void *loader;
    if (loader)
        return 0;
    void *handle = dlopen("libOpenCL.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        snprintf(error, error_size, "cannot load the OpenCL ICD loader: %s", dlerror());
        return -1;
    }
#define OPENCL_API_RESOLVE(name)                                                            \
    if (!(*(void **)&opencl_api.name = dlsym(handle, #name))) {                             \
        snprintf(error, error_size, "libOpenCL.so.1 has no %s", #name);                     \
        dlclose(handle);                                                                    \
        return -1;                                                                          \
    }
    OPENCL_API_FUNCTIONS(OPENCL_API_RESOLVE)
#undef OPENCL_API_RESOLVE
    loader = handle;
    return 0;
}

typedef struct opencl_session {
    cl_context context;
    cl_command_queue queue;
    size_t cache_bytes;
    char error[256];
} opencl_session;

static double seconds_now(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

static int opencl_failed(opencl_session *session, const char *what, cl_int status)
{
    snprintf(session->error, sizeof session->error, "%s failed (OpenCL error %d)", what,
             (int)status);
    return -1;
}

/* Device device_index numbers devices as the library does
 * (backends/opencl/opencl_devices.c): every GPU of every platform, then every
 * accelerator, then every CPU, platforms in loader order; so "opencl:N" names
 * the same device here and in a context. -1 takes index 0. */
static int pick_device(int device_index, cl_device_id *chosen, char *error, size_t error_size)
{
    static const cl_device_type types[] = {CL_DEVICE_TYPE_GPU, CL_DEVICE_TYPE_ACCELERATOR,
                                           CL_DEVICE_TYPE_CPU};
    cl_platform_id platforms[16];
    cl_uint platform_count = 0, p;
    int seen = 0, wanted = device_index < 0 ? 0 : device_index;
    size_t t;
    if (opencl_api.clGetPlatformIDs(16, platforms, &platform_count) != CL_SUCCESS || platform_count == 0) {
        snprintf(error, error_size, "no OpenCL platform");
        return -1;
    }
    if (platform_count > 16)
        platform_count = 16;
    for (t = 0; t < sizeof types / sizeof types[0]; ++t)
        for (p = 0; p < platform_count; ++p) {
            cl_device_id devices[64];
            cl_uint device_count = 0;
            if (opencl_api.clGetDeviceIDs(platforms[p], types[t], 64, devices, &device_count) != CL_SUCCESS)
                continue; /* CL_DEVICE_NOT_FOUND: none of this type here */
            if (device_count > 64)
                device_count = 64;
            if (wanted < seen + (int)device_count) {
                *chosen = devices[wanted - seen];
                return 0;
            }
            seen += (int)device_count;
        }
    snprintf(error, error_size, "no OpenCL device %d (%d found)", wanted, seen);
    return -1;
}

static int opencl_open(int device_index, void **session_out, char *error, size_t error_size)
{
    opencl_session *session = calloc(1, sizeof *session);
    cl_device_id device = NULL;
    cl_ulong cache = 0;
    cl_int status = CL_SUCCESS;
    if (!session) {
        snprintf(error, error_size, "out of memory");
        return -1;
    }
    if (load_opencl_api(error, error_size) != 0 ||
        pick_device(device_index, &device, error, error_size) != 0) {
        free(session);
        return -1;
    }
    session->context = opencl_api.clCreateContext(NULL, 1, &device, NULL, NULL, &status);
    if (status == CL_SUCCESS)
        session->queue = opencl_api.clCreateCommandQueue(session->context, device, 0, &status);
    if (status != CL_SUCCESS) {
        snprintf(error, error_size, "creating an OpenCL context and queue failed (error %d)",
                 (int)status);
        if (session->context)
            opencl_api.clReleaseContext(session->context);
        free(session);
        return -1;
    }
    if (opencl_api.clGetDeviceInfo(device, CL_DEVICE_GLOBAL_MEM_CACHE_SIZE, sizeof cache, &cache,
                                   NULL) == CL_SUCCESS)
        session->cache_bytes = (size_t)cache;
    *session_out = session;
    return 0;
}

static void opencl_close(void *opaque)
{
    opencl_session *session = opaque;
    if (!session)
        return;
    opencl_api.clFinish(session->queue);
    opencl_api.clReleaseCommandQueue(session->queue);
    opencl_api.clReleaseContext(session->context);
    free(session);
}

static void *opencl_native_stream(void *opaque)
{
    return ((opencl_session *)opaque)->queue;
}

static size_t opencl_cache_bytes(void *opaque)
{
    return ((opencl_session *)opaque)->cache_bytes;
}

static int opencl_allocate(void *opaque, size_t bytes, void **buffer)
{
    opencl_session *session = opaque;
    cl_int status = CL_SUCCESS;
    cl_mem memory = opencl_api.clCreateBuffer(session->context, CL_MEM_READ_WRITE, bytes ? bytes : 1, NULL,
                                   &status);
    if (status != CL_SUCCESS)
        return opencl_failed(session, "clCreateBuffer", status);
    *buffer = memory;
    return 0;
}

static void opencl_release(void *opaque, void *buffer)
{
    opencl_session *session = opaque;
    if (!buffer)
        return;
    opencl_api.clFinish(session->queue);
    opencl_api.clReleaseMemObject((cl_mem)buffer);
}

static int opencl_upload(void *opaque, void *buffer, const void *host, size_t bytes)
{
    opencl_session *session = opaque;
    cl_int status = opencl_api.clEnqueueWriteBuffer(session->queue, (cl_mem)buffer, CL_TRUE, 0, bytes, host,
                                         0, NULL, NULL);
    return status == CL_SUCCESS ? 0 : opencl_failed(session, "clEnqueueWriteBuffer", status);
}

static int opencl_download(void *opaque, void *host, void *buffer, size_t bytes)
{
    opencl_session *session = opaque;
    cl_int status = opencl_api.clEnqueueReadBuffer(session->queue, (cl_mem)buffer, CL_TRUE, 0, bytes, host,
                                        0, NULL, NULL);
    return status == CL_SUCCESS ? 0 : opencl_failed(session, "clEnqueueReadBuffer", status);
}

static int opencl_time_work(void *opaque, int launches, bench_device_work work, void *argument,
                            double *milliseconds)
{
    opencl_session *session = opaque;
    double start;
    cl_int status = opencl_api.clFinish(session->queue);
    int i;
    if (status != CL_SUCCESS)
        return opencl_failed(session, "clFinish", status);
    start = seconds_now();
    for (i = 0; i < launches; ++i) {
        if (work(argument, i) != 0) {
            opencl_api.clFinish(session->queue);
            snprintf(session->error, sizeof session->error, "the timed work failed");
            return -1;
        }
    }
    status = opencl_api.clFinish(session->queue);
    if (status != CL_SUCCESS)
        return opencl_failed(session, "clFinish", status);
    *milliseconds = 1e3 * (seconds_now() - start);
    return 0;
}

static int opencl_time_copy(void *opaque, void *destination, void *source, size_t bytes,
                            double *milliseconds)
{
    opencl_session *session = opaque;
    double start;
    cl_int status = opencl_api.clFinish(session->queue);
    if (status != CL_SUCCESS)
        return opencl_failed(session, "clFinish", status);
    start = seconds_now();
    status = opencl_api.clEnqueueCopyBuffer(session->queue, (cl_mem)source, (cl_mem)destination, 0, 0, bytes,
                                 0, NULL, NULL);
    if (status == CL_SUCCESS)
        status = opencl_api.clFinish(session->queue);
    if (status != CL_SUCCESS)
        return opencl_failed(session, "clEnqueueCopyBuffer", status);
    *milliseconds = 1e3 * (seconds_now() - start);
    return 0;
}

static const char *opencl_last_error(void *opaque)
{
    return ((opencl_session *)opaque)->error;
}

const bench_device_ops bench_opencl_ops = {
    .backend = PSM_BACKEND_OPENCL,
    .open = opencl_open,
    .close = opencl_close,
    .native_stream = opencl_native_stream,
    .cache_bytes = opencl_cache_bytes,
    .allocate = opencl_allocate,
    .release = opencl_release,
    .upload = opencl_upload,
    .download = opencl_download,
    .time_work = opencl_time_work,
    .time_copy = opencl_time_copy,
    .last_error = opencl_last_error,
};
