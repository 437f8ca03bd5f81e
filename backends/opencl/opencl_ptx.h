/*
 * opencl_ptx.h: per-kernel register caps for program binaries that are PTX
 * text (NVIDIA's OpenCL driver). CUDA states a kernel's occupancy target with
 * __launch_bounds__; OpenCL C has no such attribute and NVIDIA's driver
 * ignores -cl-nv-maxrregcount, but PTX takes the cap per kernel (.maxnreg),
 * so opencl_programs.c rebuilds a source-built program from its PTX with the
 * caps added. Plain text work, no OpenCL calls (tests/test_opencl_ptx.c).
 */
#ifndef PSM_OPENCL_PTX_H
#define PSM_OPENCL_PTX_H

#include <stddef.h>

/* A copy of the NUL-terminated PTX in bytes[0 .. size) with a .maxnreg
 * directive added to each capped kernel's entry (malloc'd, *size_out its
 * size), or NULL when there is nothing to add: the binary is not PTX text,
 * it has none of the capped kernels, each already has a .maxnreg, or memory
 * ran out. */
unsigned char *opencl_ptx_with_register_caps(const unsigned char *bytes, size_t size,
                                             size_t *size_out);

#endif /* PSM_OPENCL_PTX_H */
