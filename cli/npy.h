/*
 * npy.h: a minimal reader for NumPy .npy files holding logits: float32 or
 * float16, 1-D (one row) or 2-D (rows x vocab), C order. Any other file is
 * rejected with a message, never a crash.
 */
#ifndef PSM_CLI_NPY_H
#define PSM_CLI_NPY_H

#include "polysample.h"

#include <stddef.h>
#include <stdint.h>

typedef struct cli_npy_array {
    void *data;       /* rows x vocab elements in native byte order; owned */
    psm_dtype dtype;  /* PSM_DTYPE_F32 or PSM_DTYPE_F16 */
    int dimensions;   /* 1 or 2 as stored; a 1-D array is one row */
    int64_t rows;
    int64_t vocab;
} cli_npy_array;

/* 0 on success; otherwise -1 with a message in error. */
int cli_npy_read(const char *path, cli_npy_array *array, char *error, size_t error_size);
void cli_npy_free(cli_npy_array *array);

#endif /* PSM_CLI_NPY_H */
