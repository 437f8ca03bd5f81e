/* bench_device.c: which device helpers this build has (see bench_device.h). */
#include "bench_device.h"

#include <stddef.h>

#if defined(PSM_CLI_HAVE_CUDA_DEVICE)
extern const bench_device_ops bench_cuda_ops;
#endif
#if defined(PSM_CLI_HAVE_OPENCL_DEVICE)
extern const bench_device_ops bench_opencl_ops;
#endif

const bench_device_ops *bench_device_find(psm_backend backend)
{
    switch (backend) {
#if defined(PSM_CLI_HAVE_CUDA_DEVICE)
    case PSM_BACKEND_CUDA: return &bench_cuda_ops;
#endif
#if defined(PSM_CLI_HAVE_OPENCL_DEVICE)
    case PSM_BACKEND_OPENCL: return &bench_opencl_ops;
#endif
    default: return NULL;
    }
}
