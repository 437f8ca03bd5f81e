/*
 * alloc.h: the one path of polysample's own allocations, so that a test
 * build can make any of them fail.
 *
 * Host memory of the core and the CPU backend goes through psm_alloc,
 * psm_alloc_zeroed and psm_alloc_aligned (released with psm_free); a GPU
 * module asks psm_fault_device_allocation() before each device allocation.
 *
 * Only a build configured with PSM_FAULT_INJECTION=ON (CMake) defines
 * PSM_FAULT_INJECTION: then psm_fault_inject arms, per thread, the failure
 * of the k-th host and/or the k-th device allocation, and psm_fault_counts
 * says how many were attempted. In every other build the wrappers are the C
 * library's functions and psm_fault_device_allocation() is the constant 0:
 * the released library has no hook.
 */
#ifndef PSM_ALLOC_H
#define PSM_ALLOC_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef PSM_FAULT_INJECTION

#if defined(__GNUC__)
#define PSM_FAULT_API __attribute__((visibility("default")))
#else
#define PSM_FAULT_API
#endif

/* Test builds: on the calling thread, from now on, the host_k-th host
 * allocation and the device_k-th device allocation (each counted from 1)
 * fail as if memory were exhausted; 0 arms none. Resets both counts. */
PSM_FAULT_API void psm_fault_inject(int64_t host_k, int64_t device_k);
/* Allocations attempted on this thread since psm_fault_inject. */
PSM_FAULT_API void psm_fault_counts(int64_t *host, int64_t *device);

/* 1 when this allocation is the one armed to fail (it is counted either
 * way). In a module it asks the core (core/module.h). */
int psm_fault_host_allocation(void);
int psm_fault_device_allocation(void);

static inline void *psm_alloc(size_t size)
{
    return psm_fault_host_allocation() ? NULL : malloc(size);
}

static inline void *psm_alloc_zeroed(size_t count, size_t size)
{
    return psm_fault_host_allocation() ? NULL : calloc(count, size);
}

static inline void *psm_alloc_aligned(size_t alignment, size_t size)
{
    return psm_fault_host_allocation() ? NULL : aligned_alloc(alignment, size);
}

#else /* the released library: no hook */

static inline int psm_fault_device_allocation(void)
{
    return 0;
}

static inline void *psm_alloc(size_t size)
{
    return malloc(size);
}

static inline void *psm_alloc_zeroed(size_t count, size_t size)
{
    return calloc(count, size);
}

static inline void *psm_alloc_aligned(size_t alignment, size_t size)
{
    return aligned_alloc(alignment, size);
}

#endif

static inline void psm_free(void *memory)
{
    free(memory);
}

#ifdef __cplusplus
}
#endif

#endif /* PSM_ALLOC_H */
