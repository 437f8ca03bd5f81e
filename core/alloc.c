/* alloc.c: the allocation-failure hook of test builds (alloc.h). Counts are
 * per thread, so that a test's injected failure never reaches another
 * thread's calls (or the OpenCL runtime's own threads). */
#include "alloc.h"

#ifdef PSM_FAULT_INJECTION

typedef struct fault_plan {
    int64_t fail_at[2]; /* host, device; 0: none */
    int64_t attempted[2];
} fault_plan;

static _Thread_local fault_plan plan;

void psm_fault_inject(int64_t host_k, int64_t device_k)
{
    plan.fail_at[0] = host_k;
    plan.fail_at[1] = device_k;
    plan.attempted[0] = 0;
    plan.attempted[1] = 0;
}

void psm_fault_counts(int64_t *host, int64_t *device)
{
    if (host)
        *host = plan.attempted[0];
    if (device)
        *device = plan.attempted[1];
}

static int next_fails(int kind)
{
    plan.attempted[kind] += 1;
    return plan.fail_at[kind] != 0 && plan.attempted[kind] == plan.fail_at[kind];
}

int psm_fault_host_allocation(void)
{
    return next_fails(0);
}

int psm_fault_device_allocation(void)
{
    return next_fails(1);
}

#else
/* ISO C wants a translation unit to declare something. */
typedef int psm_alloc_has_no_hook;
#endif
