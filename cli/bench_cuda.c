/* bench_cuda.c: device buffers and cudaEvent timing for the CUDA backend's
 * benchmark (see bench_device.h). Plain C against the CUDA runtime API. */
#include "bench_device.h"
#include "cli_util.h"

#include <cuda_runtime_api.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct cuda_session {
    int device;
    cudaStream_t stream;
    cudaEvent_t start;
    cudaEvent_t stop;
    size_t cache_bytes;
    char error[256];
} cuda_session;

static int cuda_failed(cuda_session *session, const char *what, cudaError_t status)
{
    snprintf(session->error, sizeof session->error, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

static int cuda_open(int device_index, void **session_out, char *error, size_t error_size)
{
    cuda_session *session = calloc(1, sizeof *session);
    cudaError_t status;
    int l2_bytes = 0;
    if (!session) {
        snprintf(error, error_size, "out of memory");
        return -1;
    }
    session->device = device_index < 0 ? 0 : device_index;
    status = cudaSetDevice(session->device);
    if (status == cudaSuccess)
        status = cudaStreamCreateWithFlags(&session->stream, cudaStreamNonBlocking);
    if (status == cudaSuccess)
        status = cudaEventCreate(&session->start);
    if (status == cudaSuccess)
        status = cudaEventCreate(&session->stop);
    if (status != cudaSuccess) {
        snprintf(error, error_size, "CUDA device %d: %s", session->device,
                 cudaGetErrorString(status));
        if (session->start)
            cudaEventDestroy(session->start);
        if (session->stream)
            cudaStreamDestroy(session->stream);
        free(session);
        return -1;
    }
    if (cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, session->device) == cudaSuccess &&
        l2_bytes > 0)
        session->cache_bytes = (size_t)l2_bytes;
    *session_out = session;
    return 0;
}

static void cuda_close(void *opaque)
{
    cuda_session *session = opaque;
    if (!session)
        return;
    cudaSetDevice(session->device);
    cudaStreamSynchronize(session->stream);
    cudaEventDestroy(session->start);
    cudaEventDestroy(session->stop);
    cudaStreamDestroy(session->stream);
    free(session);
}

static void *cuda_native_stream(void *opaque)
{
    return ((cuda_session *)opaque)->stream;
}

static size_t cuda_cache_bytes(void *opaque)
{
    return ((cuda_session *)opaque)->cache_bytes;
}

static int cuda_allocate(void *opaque, size_t bytes, void **buffer)
{
    cuda_session *session = opaque;
    cudaError_t status = cudaSetDevice(session->device);
    if (status == cudaSuccess)
        status = cudaMalloc(buffer, bytes ? bytes : 1);
    return status == cudaSuccess ? 0 : cuda_failed(session, "cudaMalloc", status);
}

static void cuda_release(void *opaque, void *buffer)
{
    cuda_session *session = opaque;
    if (!buffer)
        return;
    cudaSetDevice(session->device);
    cudaStreamSynchronize(session->stream);
    cudaFree(buffer);
}

static int cuda_upload(void *opaque, void *buffer, const void *host, size_t bytes)
{
    cuda_session *session = opaque;
    cudaError_t status = cudaMemcpyAsync(buffer, host, bytes, cudaMemcpyHostToDevice,
                                         session->stream);
    if (status == cudaSuccess)
        status = cudaStreamSynchronize(session->stream);
    return status == cudaSuccess ? 0 : cuda_failed(session, "upload", status);
}

static int cuda_download(void *opaque, void *host, void *buffer, size_t bytes)
{
    cuda_session *session = opaque;
    cudaError_t status = cudaMemcpyAsync(host, buffer, bytes, cudaMemcpyDeviceToHost,
                                         session->stream);
    if (status == cudaSuccess)
        status = cudaStreamSynchronize(session->stream);
    return status == cudaSuccess ? 0 : cuda_failed(session, "download", status);
}

static int cuda_elapsed(cuda_session *session, double *milliseconds)
{
    float elapsed = 0.0f;
    cudaError_t status = cudaEventRecord(session->stop, session->stream);
    if (status == cudaSuccess)
        status = cudaEventSynchronize(session->stop);
    if (status == cudaSuccess)
        status = cudaEventElapsedTime(&elapsed, session->start, session->stop);
    if (status != cudaSuccess)
        return cuda_failed(session, "event timing", status);
    *milliseconds = elapsed;
    return 0;
}

/* The stream gate: a host function queued before the start event that holds
 * the stream until the timed work has been queued behind it. Without it, a
 * short call's events would time the host queuing the kernels (the GPU
 * waits for each launch); with it they time what the GPU does, kernels and
 * the gaps between them. The host time of a whole call is measured apart
 * (bench.c). The gate opens by itself after a while, so that work which
 * waits for the stream (a host-memory call) cannot hang; such a run is
 * then timed again without the gate. */
typedef struct stream_gate {
    atomic_int open;
    atomic_int timed_out;
} stream_gate;

#define GATE_TIMEOUT_S 0.5

static void CUDART_CB hold_stream(void *opaque)
{
    stream_gate *gate = opaque;
    const double start = cli_now_seconds();
    while (!atomic_load(&gate->open)) {
        if (cli_now_seconds() - start > GATE_TIMEOUT_S) {
            atomic_store(&gate->timed_out, 1);
            return;
        }
    }
}

static int time_work_once(cuda_session *session, int gated, int launches, bench_device_work work,
                          void *argument, double *milliseconds, int *gate_timed_out)
{
    static stream_gate gate; /* one timing at a time per process */
    cudaError_t status = cudaSuccess;
    int i, failed = 0;
    atomic_store(&gate.open, 0);
    atomic_store(&gate.timed_out, 0);
    if (gated)
        status = cudaLaunchHostFunc(session->stream, hold_stream, &gate);
    if (status == cudaSuccess)
        status = cudaEventRecord(session->start, session->stream);
    if (status != cudaSuccess) {
        atomic_store(&gate.open, 1);
        return cuda_failed(session, "starting the timing", status);
    }
    for (i = 0; i < launches && !failed; ++i)
        failed = work(argument, i) != 0;
    atomic_store(&gate.open, 1);
    if (failed) {
        cudaStreamSynchronize(session->stream);
        snprintf(session->error, sizeof session->error, "the timed work failed");
        return -1;
    }
    if (cuda_elapsed(session, milliseconds) != 0)
        return -1;
    *gate_timed_out = atomic_load(&gate.timed_out);
    return 0;
}

static int cuda_time_work(void *opaque, int launches, bench_device_work work, void *argument,
                          double *milliseconds)
{
    cuda_session *session = opaque;
    int timed_out = 0;
    if (time_work_once(session, 1, launches, work, argument, milliseconds, &timed_out) != 0)
        return -1;
    if (timed_out)
        return time_work_once(session, 0, launches, work, argument, milliseconds, &timed_out);
    return 0;
}

static int cuda_time_copy(void *opaque, void *destination, void *source, size_t bytes,
                          double *milliseconds)
{
    cuda_session *session = opaque;
    cudaError_t status = cudaEventRecord(session->start, session->stream);
    if (status == cudaSuccess)
        status = cudaMemcpyAsync(destination, source, bytes, cudaMemcpyDeviceToDevice,
                                 session->stream);
    if (status != cudaSuccess)
        return cuda_failed(session, "device-to-device copy", status);
    return cuda_elapsed(session, milliseconds);
}

static const char *cuda_last_error(void *opaque)
{
    return ((cuda_session *)opaque)->error;
}

const bench_device_ops bench_cuda_ops = {
    .backend = PSM_BACKEND_CUDA,
    .open = cuda_open,
    .close = cuda_close,
    .native_stream = cuda_native_stream,
    .cache_bytes = cuda_cache_bytes,
    .allocate = cuda_allocate,
    .release = cuda_release,
    .upload = cuda_upload,
    .download = cuda_download,
    .time_work = cuda_time_work,
    .time_copy = cuda_time_copy,
    .last_error = cuda_last_error,
};
