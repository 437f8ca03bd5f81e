/* npy.c: see npy.h. The format: "\x93NUMPY", a version byte pair, the header
 * length (2 bytes in version 1, 4 in versions 2 and 3, little end first),
 * then a Python dict literal with 'descr', 'fortran_order' and 'shape',
 * then the raw elements. */
#define _POSIX_C_SOURCE 200809L
#include "npy.h"

#include "cli_util.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

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

static const struct {
    cli_npy_element element;
    char kind, size; /* the descr's letter and byte count: 'f', '4' */
    const char *short_name, *name, *descr; /* for messages */
} element_types[] = {
    {CLI_NPY_F32, 'f', '4', "f32", "float32", "'<f4'"},
    {CLI_NPY_F16, 'f', '2', "f16", "float16", "'<f2'"},
    {CLI_NPY_U32, 'u', '4', "u32", "uint32", "'<u4'"},
    {CLI_NPY_BOOL, 'b', '1', "bool", "bool", "'|b1'"},
    {CLI_NPY_I32, 'i', '4', "i32", "int32", "'<i4'"},
};
#define ELEMENT_TYPES (sizeof element_types / sizeof element_types[0])

static const char *element_name(cli_npy_element element)
{
    size_t i;
    for (i = 0; i < ELEMENT_TYPES; ++i)
        if (element_types[i].element == element)
            return element_types[i].short_name;
    return "?";
}

/* "float32 '<f4' or float16 '<f2'": the accepted types, for messages. */
static void describe_accepted(unsigned accepted, char *text, size_t size)
{
    size_t i, used = 0, listed = 0, count = 0;
    for (i = 0; i < ELEMENT_TYPES; ++i)
        count += (accepted & element_types[i].element) != 0;
    text[0] = '\0';
    for (i = 0; i < ELEMENT_TYPES && used < size; ++i) {
        if (!(accepted & element_types[i].element))
            continue;
        ++listed;
        used += (size_t)snprintf(text + used, size - used, "%s%s %s",
                                 listed == 1 ? "" : (listed == count ? " or " : ", "),
                                 element_types[i].name, element_types[i].descr);
    }
}

static int parse_descr(const char *value, unsigned accepted, cli_npy_element *element,
                       int *swap_bytes, char *error, size_t error_size)
{
    char quote, order, descr[16], expected[128];
    size_t length = 0, i;
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
    describe_accepted(accepted, expected, sizeof expected);
    for (i = 0; i < ELEMENT_TYPES; ++i)
        if ((accepted & element_types[i].element) && length == 3 &&
            descr[1] == element_types[i].kind && descr[2] == element_types[i].size)
            break;
    if (i == ELEMENT_TYPES)
        return fail(error, error_size, "dtype '%s' is not supported (use %s)", descr, expected);
    order = descr[0];
    if (order != '<' && order != '>' && order != '=' && order != '|')
        return fail(error, error_size, "dtype '%s' has an unknown byte order", descr);
    {
        const unsigned probe = 1;
        int host_little = *(const unsigned char *)&probe == 1;
        *swap_bytes = (order == '<' && !host_little) || (order == '>' && host_little);
    }
    *element = element_types[i].element;
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

/* The shape as written, "(R, V)" or "(V,)", for messages. */
static void describe_shape(const int64_t *extent, int dimensions, char *text, size_t size)
{
    if (dimensions == 2)
        snprintf(text, size, "(%lld, %lld)", (long long)extent[0], (long long)extent[1]);
    else
        snprintf(text, size, "(%lld,)", (long long)extent[0]);
}

/* Reads the data of a file whose size is not known in advance (a pipe, say):
 * the buffer grows with what actually arrives, so a header that claims more
 * than is sent costs no more memory than the bytes that came. Reads at most
 * one byte past `expected`, which tells a surplus from an exact fit; *got is
 * the count read. NULL when out of memory. */
static unsigned char *read_unsized(FILE *file, size_t expected, size_t *got)
{
    const size_t first_capacity = (size_t)1 << 20;
    size_t limit = expected < SIZE_MAX ? expected + 1 : expected;
    size_t capacity = 0, used = 0;
    unsigned char *buffer = NULL;
    while (used < limit) {
        size_t wanted, chunk;
        if (used == capacity) {
            size_t grown = capacity == 0 ? first_capacity : capacity * 2;
            unsigned char *larger;
            if (grown > limit || grown < capacity)
                grown = limit;
            larger = realloc(buffer, grown);
            if (!larger) {
                free(buffer);
                return NULL;
            }
            buffer = larger;
            capacity = grown;
        }
        wanted = capacity - used;
        chunk = fread(buffer + used, 1, wanted, file);
        used += chunk;
        if (chunk < wanted)
            break;
    }
    *got = used;
    return buffer;
}

int cli_npy_read(const char *path, cli_npy_array *array, char *error, size_t error_size)
{
    return cli_npy_read_elements(path, CLI_NPY_LOGITS, array, error, error_size);
}

int cli_npy_read_elements(const char *path, unsigned accepted, cli_npy_array *array, char *error,
                          size_t error_size)
{
    unsigned char preamble[12];
    size_t header_length, element_size, preamble_length = 10, i;
    char *header = NULL;
    const char *fortran;
    int swap_bytes = 0, dimensions = 0;
    int64_t extent[2] = {0, 0};
    uint64_t count, data_bytes, file_bytes = 0;
    char shape[64];
    cli_npy_element element = CLI_NPY_F32;
    struct stat status;
    int sized;
    size_t got;
    FILE *file;

    memset(array, 0, sizeof *array);
    file = fopen(path, "rb");
    if (!file)
        return fail(error, error_size, "cannot open '%s': %s", path, strerror(errno));
    /* A regular file's size is known before anything is allocated. */
    sized = fstat(fileno(file), &status) == 0 && S_ISREG(status.st_mode);
    if (sized)
        file_bytes = (uint64_t)status.st_size;
    got = fread(preamble, 1, 10, file);
    if (got != 10 && ferror(file)) {
        int reason = errno;
        fclose(file);
        return fail(error, error_size, "cannot read '%s': %s", path, strerror(reason));
    }
    if (got != 10 || memcmp(preamble, "\x93NUMPY", 6) != 0) {
        int short_file = got < 10 && memcmp(preamble, "\x93NUMPY", got < 6 ? got : 6) == 0;
        fclose(file);
        return fail(error, error_size, "'%s' is not a .npy file (%s)", path,
                    short_file ? "shorter than the 10-byte preamble" : "bad magic");
    }
    if (preamble[6] == 1) {
        header_length = (size_t)preamble[8] | ((size_t)preamble[9] << 8);
    } else if (preamble[6] == 2 || preamble[6] == 3) {
        if (fread(preamble + 10, 1, 2, file) != 2) {
            fclose(file);
            return fail(error, error_size, "'%s' is truncated in its header", path);
        }
        preamble_length = 12;
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
    if (sized && file_bytes < preamble_length + header_length) {
        fclose(file);
        return fail(error, error_size,
                    "'%s' is truncated in its header: it declares %zu header bytes after the "
                    "%zu-byte preamble; the file has %llu bytes in all",
                    path, header_length, preamble_length, (unsigned long long)file_bytes);
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

    if (parse_descr(find_value(header, "descr"), accepted, &element, &swap_bytes, error,
                    error_size) != 0 ||
        parse_shape(find_value(header, "shape"), extent, &dimensions, error, error_size) != 0) {
        /* The parsers' messages do not name the file. */
        char detail[256];
        snprintf(detail, sizeof detail, "%s", error);
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s': %s", path, detail);
    }
    fortran = find_value(header, "fortran_order");
    if (!fortran || (strncmp(fortran, "False", 5) != 0 && strncmp(fortran, "True", 4) != 0)) {
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s' header has no valid 'fortran_order'", path);
    }
    /* Fortran order is the same bytes as C order when a dimension is 1. */
    if (strncmp(fortran, "True", 4) == 0 && dimensions == 2 && extent[0] > 1 && extent[1] > 1) {
        free(header);
        fclose(file);
        return fail(error, error_size, "'%s' is in Fortran order; save it in C order", path);
    }
    free(header);

    describe_shape(extent, dimensions, shape, sizeof shape);
    array->dimensions = dimensions;
    array->rows = dimensions == 2 ? extent[0] : 1;
    array->vocab = dimensions == 2 ? extent[1] : extent[0];
    array->element = element;
    array->dtype = element == CLI_NPY_F16 ? PSM_DTYPE_F16 : PSM_DTYPE_F32;
    if (array->rows < 1 || array->vocab < 1) {
        fclose(file);
        return fail(error, error_size, "'%s' is empty (shape %s has a zero)", path, shape);
    }
    if (array->vocab > INT32_MAX) {
        fclose(file);
        return fail(error, error_size, "'%s': a row of %lld logits is too long (at most 2^31 - 1)",
                    path, (long long)array->vocab);
    }
    element_size = element == CLI_NPY_F16 ? 2 : element == CLI_NPY_BOOL ? 1 : 4;
    /* rows and vocab are each below 2^63, so both products are checked. */
    if ((uint64_t)array->rows > UINT64_MAX / (uint64_t)array->vocab ||
        (uint64_t)array->rows * (uint64_t)array->vocab > UINT64_MAX / element_size) {
        fclose(file);
        return fail(error, error_size,
                    "'%s' declares shape %s, whose size in bytes does not fit in 64 bits", path,
                    shape);
    }
    count = (uint64_t)array->rows * (uint64_t)array->vocab;
    data_bytes = count * element_size;
    if (sized && file_bytes - (preamble_length + header_length) != data_bytes) {
        uint64_t present = file_bytes - (preamble_length + header_length);
        fclose(file);
        if (present < data_bytes)
            return fail(error, error_size,
                        "'%s' is truncated: shape %s of %s needs %llu bytes of data after the "
                        "%zu-byte header, the file has %llu (%llu bytes in all)",
                        path, shape, element_name(element), (unsigned long long)data_bytes,
                        preamble_length + header_length, (unsigned long long)present,
                        (unsigned long long)file_bytes);
        return fail(error, error_size,
                    "'%s' has %llu bytes after the %llu bytes of data its shape %s of %s "
                    "describes", path, (unsigned long long)(present - data_bytes),
                    (unsigned long long)data_bytes, shape, element_name(element));
    }
    if (data_bytes > SIZE_MAX) {
        fclose(file);
        return fail(error, error_size, "'%s' (shape %s) does not fit in this machine's memory",
                    path, shape);
    }
    if (sized) {
        array->data = malloc((size_t)data_bytes);
        if (!array->data) {
            fclose(file);
            return fail(error, error_size, "out of memory for the %llu bytes of '%s' (shape %s)",
                        (unsigned long long)data_bytes, path, shape);
        }
        if (fread(array->data, 1, (size_t)data_bytes, file) != data_bytes) {
            int read_error = ferror(file), reason = errno;
            cli_npy_free(array);
            fclose(file);
            return fail(error, error_size, "cannot read '%s': %s", path,
                        read_error ? strerror(reason) : "the file shrank while being read");
        }
    } else {
        size_t present = 0;
        array->data = read_unsized(file, (size_t)data_bytes, &present);
        if (!array->data) {
            fclose(file);
            return fail(error, error_size, "out of memory reading the data of '%s' (shape %s)",
                        path, shape);
        }
        if (present != data_bytes) {
            cli_npy_free(array);
            fclose(file);
            if (present < data_bytes)
                return fail(error, error_size,
                            "'%s' is truncated: shape %s of %s needs %llu bytes of data after "
                            "the %zu-byte header, it has %zu",
                            path, shape, element_name(element), (unsigned long long)data_bytes,
                            preamble_length + header_length, present);
            return fail(error, error_size,
                        "'%s' has bytes after the %llu bytes of data its shape %s of %s "
                        "describes", path, (unsigned long long)data_bytes, shape,
                        element_name(element));
        }
    }
    fclose(file);
    if (swap_bytes) {
        unsigned char *bytes = array->data;
        for (i = 0; i < (size_t)count; ++i) {
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
