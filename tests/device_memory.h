/*
 * device_memory.h: buffers in the memory a test's call reads, so that one
 * property runs from host memory and from a backend's device memory alike.
 *
 * A psm_test_memory is a context of one backend plus a place for buffers:
 * PSM_MEMORY_HOST (plain host buffers) or PSM_MEMORY_DEVICE (the backend's
 * memory). For device memory the test opens its own queue or stream and
 * gives it to the context as psm_context_options.native_stream, so that its
 * buffers and the library's work share one device (and, for OpenCL, one
 * cl_context):
 *   - cpu: device memory is host memory (include/polysample.h), malloc'd;
 *   - opencl: cl_mem buffers (passed as the pointer) in a cl_context of the
 *     backend's first device (GPUs, then accelerators, then CPUs, as
 *     backends/opencl/opencl_devices.c orders them), compiled in when the
 *     test program is linked with OpenCL (PSM_TEST_DEVICE_OPENCL);
 *   - cuda: cudaMalloc'd, on a stream of the test's (PSM_TEST_DEVICE_CUDA).
 * Other backends have no device memory here: psm_test_memory_unavailable
 * says so, and the property reports a skip.
 *
 * Buffers are owned by the psm_test_memory and freed by
 * psm_test_memory_close. Every failure fails the test.
 */
#ifndef PSM_TEST_DEVICE_MEMORY_H
#define PSM_TEST_DEVICE_MEMORY_H

#include "polysample.h"

#include <stddef.h>

typedef struct psm_test_memory psm_test_memory;

/* Why this test program cannot make buffers of this kind for the backend,
 * or NULL when it can. */
const char *psm_test_memory_unavailable(psm_backend backend, psm_memory kind);

/* Opens a context of the backend (checking mode when check_rows) whose
 * buffers are of this kind. */
psm_test_memory *psm_test_memory_open(psm_backend backend, psm_memory kind, int check_rows);
void psm_test_memory_close(psm_test_memory *memory);

psm_context *psm_test_memory_context(const psm_test_memory *memory);
psm_memory psm_test_memory_kind(const psm_test_memory *memory);
/* Does core read this memory's per-row arrays on the host (host memory, or
 * the CPU backend, whose device memory is host memory)? Then bad values are
 * PSM_ERR_INVALID_ARGUMENT; otherwise they make a bad row. */
int psm_test_memory_checked_on_host(const psm_test_memory *memory);

/* A buffer of the memory's kind holding a copy of bytes from host (NULL
 * host gives NULL: an absent per-row array stays absent). */
void *psm_test_memory_copy_in(psm_test_memory *memory, const void *host, size_t bytes);
/* A buffer of the memory's kind with every byte set to byte. */
void *psm_test_memory_filled(psm_test_memory *memory, size_t bytes, unsigned char byte);
/* Overwrites a buffer from host memory (between calls, as a runtime would). */
void psm_test_memory_write(psm_test_memory *memory, void *buffer, const void *host,
                           size_t bytes);
/* Copies a buffer out to host memory, after the context's queued work. */
void psm_test_memory_read(psm_test_memory *memory, void *host, const void *buffer,
                          size_t bytes);

/* Why this program cannot make the backend's own memory (what
 * psm_params.workspace must be), or NULL when it can. */
const char *psm_test_memory_workspace_unavailable(psm_backend backend);
/* A buffer in the backend's own memory (device memory, or host memory on the
 * CPU backend) for psm_params.workspace, whatever the memory's kind, its
 * bytes set to byte so that a call relying on their contents would show. */
void *psm_test_memory_workspace(psm_test_memory *memory, size_t bytes, unsigned char byte);

#endif /* PSM_TEST_DEVICE_MEMORY_H */
