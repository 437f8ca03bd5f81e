/* registry.c: the backends compiled into this build (CMake sets PSM_HAVE_X). */
#include "backend.h"

#ifndef PSM_HAVE_CUDA
#define PSM_HAVE_CUDA 0
#endif
#ifndef PSM_HAVE_HIP
#define PSM_HAVE_HIP 0
#endif
#ifndef PSM_HAVE_OPENCL
#define PSM_HAVE_OPENCL 0
#endif

extern const psm_backend_ops psm_cpu_ops;
#if PSM_HAVE_CUDA
extern const psm_backend_ops psm_cuda_ops;
#endif
#if PSM_HAVE_HIP
extern const psm_backend_ops psm_hip_ops;
#endif
#if PSM_HAVE_OPENCL
extern const psm_backend_ops psm_opencl_ops;
#endif

const psm_backend_ops *psm_registry_lookup(psm_backend backend)
{
    switch (backend) {
    case PSM_BACKEND_CPU: return &psm_cpu_ops;
#if PSM_HAVE_CUDA
    case PSM_BACKEND_CUDA: return &psm_cuda_ops;
#endif
#if PSM_HAVE_HIP
    case PSM_BACKEND_HIP: return &psm_hip_ops;
#endif
#if PSM_HAVE_OPENCL
    case PSM_BACKEND_OPENCL: return &psm_opencl_ops;
#endif
    default: return NULL;
    }
}
