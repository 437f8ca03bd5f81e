/*
 * bench_device.h: device-resident buffers and device-side timing for the
 * bench and check subcommands.
 *
 * A device backend runs asynchronously, so timing psm_sample on the host
 * would measure the launch, not the work, and host-memory logits would add a
 * transfer to every call. For CUDA and OpenCL the tool therefore keeps the
 * logits in device memory, passes them with PSM_MEMORY_DEVICE, and times on
 * the device's own queue. Each implementation uses only its runtime API
 * (cudart, OpenCL) plus the public polysample API: the tool opens its own
 * stream or queue and hands it to the context through
 * psm_context_options.native_stream, so that the buffers and the work share
 * one queue (and, for OpenCL, one cl_context).
 *
 * An implementation is compiled only when its backend is; bench_device_find
 * returns NULL for the others, and the tool then falls back to host memory.
 */
#ifndef PSM_CLI_BENCH_DEVICE_H
#define PSM_CLI_BENCH_DEVICE_H

#include "polysample.h"

#include <stddef.h>

/* Called once per timed launch: does the work for launch number `index`. */
typedef int (*bench_device_work)(void *argument, int index);

typedef struct bench_device_ops {
    psm_backend backend;
    /* Opens device device_index (-1: the first) with its own stream or queue.
     * 0 on success; -1 with a message in error. */
    int (*open)(int device_index, void **session, char *error, size_t error_size);
    void (*close)(void *session);
    /* The cudaStream_t or cl_command_queue for psm_context_options.native_stream. */
    void *(*native_stream)(void *session);
    /* The device's last-level cache in bytes (0 when unknown): inputs that
     * fit in it are rotated through several copies so that they are read
     * from memory, as a real workload's would be. */
    size_t (*cache_bytes)(void *session);

    /* A buffer: a device pointer, or a cl_mem passed as the pointer. */
    int (*allocate)(void *session, size_t bytes, void **buffer);
    void (*release)(void *session, void *buffer);
    int (*upload)(void *session, void *buffer, const void *host, size_t bytes);
    int (*download)(void *session, void *host, void *buffer, size_t bytes);

    /* Runs work(argument, 0 .. launches - 1) on the queue and reports the
     * device time from before the first to after the last, in ms. */
    int (*time_work)(void *session, int launches, bench_device_work work, void *argument,
                     double *milliseconds);
    /* Device time of one device-to-device copy of bytes, in ms. */
    int (*time_copy)(void *session, void *destination, void *source, size_t bytes,
                     double *milliseconds);

    /* The message of the session's last failure. */
    const char *(*last_error)(void *session);
} bench_device_ops;

/* The helper for a backend, or NULL when none is compiled in. */
const bench_device_ops *bench_device_find(psm_backend backend);

#endif /* PSM_CLI_BENCH_DEVICE_H */
