/*
 * opencl_embedded.h: the kernel sources compiled into the library.
 * embed.cmake generates the definitions at build time from the files that
 * backends/opencl/CMakeLists.txt lists: psm_kernels.cl after the headers it
 * includes, in the order the program reads them.
 */
#ifndef PSM_OPENCL_EMBEDDED_H
#define PSM_OPENCL_EMBEDDED_H

#include <stddef.h>
#include <stdint.h>

typedef struct psm_opencl_embedded_source {
    const char *name;   /* path relative to the source tree */
    const char *text;   /* NUL-terminated */
    size_t size;        /* bytes, without the NUL */
} psm_opencl_embedded_source;

extern const psm_opencl_embedded_source psm_opencl_embedded_sources[];
extern const size_t psm_opencl_embedded_source_count;
/* First 64 bits of a SHA-256 over the names and contents: the program cache key. */
extern const uint64_t psm_opencl_embedded_hash;

#endif /* PSM_OPENCL_EMBEDDED_H */
