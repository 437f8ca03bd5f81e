/*
 * fuzz_npy.c: the command-line tool's file readers on arbitrary files: the
 * .npy reader (cli/npy.c) as it reads logits, and the readers of the
 * processing files (cli/processing_files.c): an allowed-token mask (.npy of
 * uint32 or bool) for 2 rows of 40 tokens, and the text lists of a logit
 * bias and of tokens for 3 rows of 100 tokens. None may crash, read out of
 * bounds or leak, and a failure must come with a message. On success the
 * logits must be what the header promised (a 1-D or 2-D f32/f16 array of
 * rows x vocab elements, vocab within int32), the mask 2 rows of at least
 * 2 words, and the lists valid for the library: offsets from 0, never
 * decreasing, tokens inside the vocab, finite bias values.
 *
 * The reader takes a path, so each input is written to a memory file
 * (memfd) once per process and reopened through /proc/self/fd.
 */
#define _GNU_SOURCE /* memfd_create */
#include "npy.h"
#include "processing_files.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int memory_file = -1;
static char path[64];

#define FAIL(...)                                                                            \
    do {                                                                                     \
        fprintf(stderr, "npy: " __VA_ARGS__);                                                \
        fputc('\n', stderr);                                                                 \
        abort();                                                                             \
    } while (0)

enum { MASK_ROWS = 2, MASK_VOCAB = 40, LIST_ROWS = 3, LIST_VOCAB = 100 };

static void check_mask(void)
{
    uint32_t *words = NULL;
    int64_t words_per_row = -1;
    char error[512];
    error[0] = '\0';
    if (cli_read_allowed_mask(path, MASK_ROWS, MASK_VOCAB, &words, &words_per_row, error,
                              sizeof error) != 0) {
        if (error[0] == '\0' || words)
            FAIL("the mask reader failed without a message, or left words allocated");
        return;
    }
    if (!words || words_per_row < (MASK_VOCAB + 31) / 32 || words_per_row > INT32_MAX)
        FAIL("the mask reader accepted %lld words a row", (long long)words_per_row);
    volatile uint32_t sink = 0;
    for (int64_t w = 0; w < MASK_ROWS * words_per_row; ++w)
        sink ^= words[w]; /* ASan: every word promised is there */
    (void)sink;
    free(words);
}

static void check_lists(int with_values)
{
    cli_row_lists lists;
    char error[512];
    error[0] = '\0';
    int result = with_values
                     ? cli_read_bias_lists(path, LIST_ROWS, LIST_VOCAB, &lists, error, sizeof error)
                     : cli_read_token_lists(path, LIST_ROWS, LIST_VOCAB, &lists, error,
                                            sizeof error);
    if (result != 0) {
        if (error[0] == '\0' || lists.offsets || lists.tokens || lists.values)
            FAIL("a list reader failed without a message, or left lists allocated");
        return;
    }
    if (!lists.offsets || lists.offsets[0] != 0 || lists.entries != lists.offsets[LIST_ROWS] ||
        (with_values != (lists.values != NULL)))
        FAIL("a list reader gave lists without offsets from 0 or with %lld entries",
             (long long)lists.entries);
    for (int64_t row = 0; row < LIST_ROWS; ++row)
        if (lists.offsets[row + 1] < lists.offsets[row])
            FAIL("list offsets decrease after row %lld", (long long)row);
    for (int64_t e = 0; e < lists.entries; ++e)
        if (lists.tokens[e] < 0 || lists.tokens[e] >= LIST_VOCAB ||
            (with_values && !isfinite(lists.values[e])))
            FAIL("list entry %lld: token %d, value %g", (long long)e, lists.tokens[e],
                 with_values ? (double)lists.values[e] : 0.0);
    cli_row_lists_free(&lists);
}

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

    check_mask();
    check_lists(1);
    check_lists(0);

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
