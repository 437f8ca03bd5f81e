/*
 * npy.h: a minimal reader for NumPy .npy files of 1-D (one row) or 2-D
 * (rows x columns) arrays in C order: logits (float32 or float16) and, for
 * allowed-token masks, uint32 words or bools. Any other file is rejected
 * with a message, never a crash.
 */
#ifndef PSM_CLI_NPY_H
#define PSM_CLI_NPY_H

#include "polysample.h"

#include <stddef.h>
#include <stdint.h>

/* Element types, as bits of the set a caller accepts. */
typedef enum cli_npy_element {
    CLI_NPY_F32 = 1,  /* '<f4' (either byte order) */
    CLI_NPY_F16 = 2,  /* '<f2' */
    CLI_NPY_U32 = 4,  /* '<u4' */
    CLI_NPY_BOOL = 8, /* '|b1': one byte, 0 or 1 (the reader does not check) */
    CLI_NPY_I32 = 16  /* '<i4' */
} cli_npy_element;

#define CLI_NPY_LOGITS (CLI_NPY_F32 | CLI_NPY_F16)
#define CLI_NPY_MASK (CLI_NPY_U32 | CLI_NPY_BOOL)

typedef struct cli_npy_array {
    void *data;       /* rows x vocab elements in native byte order; owned */
    cli_npy_element element;
    psm_dtype dtype;  /* for CLI_NPY_F32 and CLI_NPY_F16: PSM_DTYPE_F32 or PSM_DTYPE_F16 */
    int dimensions;   /* 1 or 2 as stored; a 1-D array is one row */
    int64_t rows;
    int64_t vocab;    /* columns: a row's logits, mask words or mask bools */
} cli_npy_array;

/* A file of logits (CLI_NPY_LOGITS). 0 on success; otherwise -1 with a
 * message in error. */
int cli_npy_read(const char *path, cli_npy_array *array, char *error, size_t error_size);
/* A file of any element type in `accepted` (CLI_NPY_* bits); others are
 * refused, the message naming the accepted ones. */
int cli_npy_read_elements(const char *path, unsigned accepted, cli_npy_array *array, char *error,
                          size_t error_size);
void cli_npy_free(cli_npy_array *array);

#endif /* PSM_CLI_NPY_H */
