/* npy.c: see npy.h. The format: "\x93NUMPY", a version byte pair, the header
 * length (2 bytes in version 1, 4 in versions 2 and 3, little end first),
 * then a Python dict literal with 'descr', 'fortran_order' and 'shape',
 * then the raw elements. */
#include "npy.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAX_HEADER_BYTES (1u << 20)

static int fail(char *error, size_t error_size, const char *format, ...)
{
    va_list arguments;
    va_start(arguments, format);
    vsnprintf(error, error_size, format, arguments);
    va_end(arguments);
    return -1;
}

/* Finds the value after the key 'name' (either quote style) and its colon. */
static const char *find_value(const char *header, const char *name)
{
    char single_quoted[32], double_quoted[32];
    const char *at;
    snprintf(single_quoted, sizeof single_quoted, "'%s'", name);
    snprintf(double_quoted, sizeof double_quoted, "\"%s\"", name);
    at = strstr(header, single_quoted);
    if (!at)
        at = strstr(header, double_quoted);
    if (!at)
        return NULL;
    at += strlen(single_quoted);
    while (isspace((unsigned char)*at))
        ++at;
    if (*at != ':')
        return NULL;
    ++at;
    while (isspace((unsigned char)*at))
        ++at;
    return at;
}

static int parse_descr(const char *value, psm_dtype *dtype, int *swap_bytes, char *error,
                       size_t error_size)
{
    char quote, order, descr[16];
    size_t length = 0;
    if (!value || (*value != '\'' && *value != '"'))
        return fail(error, error_size, "header has no 'descr' string");
    quote = *value++;
    while (value[length] && value[length] != quote && length + 1 < sizeof descr) {
        descr[length] = value[length];
        ++length;
    }
    if (value[length] != quote)
        return fail(error, error_size, "header has a malformed 'descr'");
    descr[length] = '\0';
    if (length != 3 || descr[1] != 'f' || (descr[2] != '4' && descr[2] != '2'))
        return fail(error, error_size,
                    "dtype '%s' is not supported (use float32 '<f4' or float16 '<f2')", descr);
    order = descr[0];
    if (order != '<' && order != '>' && order != '=' && order != '|')
        return fail(error, error_size, "dtype '%s' has an unknown byte order", descr);
    {
        const unsigned probe = 1;
        int host_little = *(const unsigned char *)&probe == 1;
        *swap_bytes = (order == '<' && !host_little) || (order == '>' && host_little);
    }
    *dtype = descr[2] == '4' ? PSM_DTYPE_F32 : PSM_DTYPE_F16;
    return 0;
}

static int parse_shape(const char *value, int64_t *extent, int *dimensions, char *error,
                       size_t error_size)
{
    int count = 0;
    if (!value || *value != '(')
        return fail(error, error_size, "header has no 'shape' tuple");
    ++value;
    for (;;) {
        while (isspace((unsigned char)*value))
            ++value;
        if (*value == ')')
            break;
        if (!isdigit((unsigned char)*value))
            return fail(error, error_size, "header has a malformed 'shape'");
        if (count == 2)
            return fail(error, error_size, "arrays of more than 2 dimensions are not supported");
        {
            int64_t number = 0;
            while (isdigit((unsigned char)*value)) {
                if (number > (INT64_MAX - 9) / 10)
                    return fail(error, error_size, "a dimension in 'shape' is too large");
                number = number * 10 + (*value - '0');
                ++value;
            }
            extent[count++] = number;
        }
        while (isspace((unsigned char)*value))
            ++value;
        if (*value == ',')
            ++value;
        else if (*value != ')')
            return fail(error, error_size, "header has a malformed 'shape'");
    }
    if (count == 0)
        return fail(error, error_size, "a 0-dimensional array holds no row of logits");
    *dimensions = count;
    return 0;
}

int cli_npy_read(const char *path, cli_npy_array *array, char *error, size_t error_size)
{
    unsigned char preamble[12];
    size_t header_length, element_size, count, i;
    char *header = NULL;
    const char *fortran;
    int swap_bytes = 0, dimensions = 0;
    int64_t extent[2] = {0, 0};
    psm_dtype dtype = PSM_DTYPE_F32;
    FILE *file;

    memset(array, 0, sizeof *array);
    file = fopen(path, "rb");
    if (!file)
        return fail(error, error_size, "cannot open '%s'", path);
    if (fread(preamble, 1, 10, file) != 10 || memcmp(preamble, "\x93NUMPY", 6) != 0) {
        fclose(file);
        return fail(error, error_size, "'%s' is not a .npy file (bad magic)", path);
    }
    if (preamble[6] == 1) {
        header_length = (size_t)preamble[8] | ((size_t)preamble[9] << 8);
    } else if (preamble[6] == 2 || preamble[6] == 3) {
        if (fread(preamble + 10, 1, 2, file) != 2) {
            fclose(file);
            return fail(error, error_size, "'%s' is truncated in its header", path);
        }
        header_length = (size_t)preamble[8] | ((size_t)preamble[9] << 8) |
                        ((size_t)preamble[10] << 16) | ((size_t)preamble[11] << 24);
    } else {
        fclose(file);
        return fail(error, error_size, "'%s' has unsupported .npy version %d", path, preamble[6]);
    }
    if (header_length == 0 || header_length > NPY_MAX_HEADER_BYTES) {
        fclose(file);
        return fail(error, error_size, "'%s' has an implausible header length %zu", path,
                    header_length);
    }
    header = malloc(header_length + 1);
    if (!header) {
        fclose(file);
        return fail(error, error_size, "out of memory reading the header of '%s'", path);
    }
    if (fread(header, 1, header_length, file) != header_length) {
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s' is truncated in its header", path);
    }
    header[header_length] = '\0';
    if (strlen(header) != header_length) {
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s' has a NUL byte in its header", path);
    }

    if (parse_descr(find_value(header, "descr"), &dtype, &swap_bytes, error, error_size) != 0 ||
        parse_shape(find_value(header, "shape"), extent, &dimensions, error, error_size) != 0) {
        free(header);
        fclose(file);
        return -1;
    }
    fortran = find_value(header, "fortran_order");
    if (!fortran || (strncmp(fortran, "False", 5) != 0 && strncmp(fortran, "True", 4) != 0)) {
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s' header has no valid 'fortran_order'", path);
    }
    if (strncmp(fortran, "True", 4) == 0 && dimensions == 2 && extent[0] > 1 && extent[1] > 1) {
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s' is in Fortran order; save it in C order", path);
    }
    free(header);

    array->dimensions = dimensions;
    array->rows = dimensions == 2 ? extent[0] : 1;
    array->vocab = dimensions == 2 ? extent[1] : extent[0];
    array->dtype = dtype;
    if (array->rows < 1 || array->vocab < 1) {
        fclose(file);
        return fail(error, error_size, "'%s' is empty (shape has a zero)", path);
    }
    if (array->vocab > INT32_MAX) {
        fclose(file);
        return fail(error, error_size, "'%s': a row of %lld logits is too long", path,
                    (long long)array->vocab);
    }
    element_size = dtype == PSM_DTYPE_F32 ? 4 : 2;
    if ((uint64_t)array->rows > (uint64_t)(SIZE_MAX / element_size) / (uint64_t)array->vocab) {
        fclose(file);
        return fail(error, error_size, "'%s' is too large", path);
    }
    count = (size_t)array->rows * (size_t)array->vocab;
    array->data = malloc(count * element_size);
    if (!array->data) {
        fclose(file);
        return fail(error, error_size, "out of memory for %zu elements of '%s'", count, path);
    }
    if (fread(array->data, element_size, count, file) != count) {
        cli_npy_free(array);
        fclose(file);
        return fail(error, error_size, "'%s' is truncated: its shape needs %zu bytes of data",
                    path, count * element_size);
    }
    if (fgetc(file) != EOF) {
        cli_npy_free(array);
        fclose(file);
        return fail(error, error_size, "'%s' has bytes after the data its shape describes", path);
    }
    fclose(file);
    if (swap_bytes) {
        unsigned char *bytes = array->data;
        for (i = 0; i < count; ++i) {
            unsigned char *element = bytes + i * element_size;
            size_t low, high;
            for (low = 0, high = element_size - 1; low < high; ++low, --high) {
                unsigned char kept = element[low];
                element[low] = element[high];
                element[high] = kept;
            }
        }
    }
    return 0;
}

void cli_npy_free(cli_npy_array *array)
{
    free(array->data);
    array->data = NULL;
}
