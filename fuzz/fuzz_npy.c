/*
 * fuzz_npy.c: the .npy reader of the command-line tool (cli/npy.c) on
 * arbitrary files. It must never crash, read out of bounds or leak; on
 * success the array must be what the header promised (a 1-D or 2-D f32/f16
 * array of rows x vocab elements, vocab within int32), and on failure the
 * message must say something.
 *
 * The reader takes a path, so each input is written to a memory file
 * (memfd) once per process and reopened through /proc/self/fd.
 */
#define _GNU_SOURCE /* memfd_create */
#include "npy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int memory_file = -1;
static char path[64];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (memory_file < 0) {
        memory_file = memfd_create("fuzz_npy", 0);
        if (memory_file < 0)
            abort();
        snprintf(path, sizeof path, "/proc/self/fd/%d", memory_file);
    }
    if (ftruncate(memory_file, 0) != 0 || pwrite(memory_file, data, size, 0) != (ssize_t)size)
        abort();

    cli_npy_array array;
    char error[512];
    error[0] = '\0';
    int result = cli_npy_read(path, &array, error, sizeof error);
    if (result != 0) {
        if (result != -1 || error[0] == '\0') {
            fprintf(stderr, "npy: failure %d without a message\n", result);
            abort();
        }
        return 0;
    }
    size_t element = array.dtype == PSM_DTYPE_F32 ? 4 : 2;
    if ((array.dtype != PSM_DTYPE_F32 && array.dtype != PSM_DTYPE_F16) || array.rows < 1 ||
        array.vocab < 1 || array.vocab > INT32_MAX ||
        (array.dimensions != 1 && array.dimensions != 2) ||
        (array.dimensions == 1 && array.rows != 1) || !array.data) {
        fprintf(stderr, "npy: accepted an array it cannot hold (dims %d, %lld x %lld)\n",
                array.dimensions, (long long)array.rows, (long long)array.vocab);
        abort();
    }
    /* The whole payload was read: the data is exactly rows x vocab elements
     * at the end of the file. */
    size_t payload = (size_t)array.rows * (size_t)array.vocab * element;
    if (payload > size) {
        fprintf(stderr, "npy: %zu bytes of elements from a %zu-byte file\n", payload, size);
        abort();
    }
    volatile unsigned char sink = 0;
    const unsigned char *bytes = array.data;
    for (size_t i = 0; i < payload; ++i)
        sink ^= bytes[i]; /* ASan: every promised byte is there */
    (void)sink;
    cli_npy_free(&array);
    return 0;
}
