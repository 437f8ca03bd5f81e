/* cli_util.c: see cli_util.h. */
#define _POSIX_C_SOURCE 200809L
#include "cli_util.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void cli_error(const char *command, const char *format, ...)
{
    va_list arguments;
    fprintf(stderr, "polysample%s%s: ", command ? " " : "", command ? command : "");
    va_start(arguments, format);
    vfprintf(stderr, format, arguments);
    va_end(arguments);
    fputc('\n', stderr);
}

void cli_library_error(const char *command, const char *what, psm_status status)
{
    /* The library's message is whole (it says what the status stands for and
     * more), so it is said alone; the status's words are for when there is
     * none. */
    const char *detail = psm_last_error();
    cli_error(command, "%s failed: %s", what,
              detail && detail[0] ? detail : psm_status_string(status));
}

static void notice_on_stderr(void *user_data, const char *message)
{
    (void)user_data;
    fprintf(stderr, "polysample: %s\n", message);
}

void cli_context_options_init(psm_context_options *options)
{
    psm_context_options_init(options);
    if (isatty(STDERR_FILENO))
        options->notice = notice_on_stderr;
}

int cli_parse_decimal(const char *text, uint64_t min, uint64_t max, uint64_t *value,
                      char *problem, size_t problem_size)
{
    uint64_t parsed = 0;
    int overflow = 0;
    const char *digit;
    if (!text || !text[0] || strspn(text, "0123456789") != strlen(text)) {
        if (problem)
            snprintf(problem, problem_size, "%s (%s)",
                     text && text[0] ? "not a decimal number" : "empty", CLI_DECIMAL_RULE);
        return -1;
    }
    for (digit = text; *digit && !overflow; ++digit) {
        uint64_t next = (uint64_t)(*digit - '0');
        overflow = parsed > (UINT64_MAX - next) / 10;
        parsed = parsed * 10 + next;
    }
    if (overflow || parsed < min || parsed > max) {
        if (problem)
            snprintf(problem, problem_size, "out of range (%llu to %llu)", (unsigned long long)min,
                     (unsigned long long)max);
        return -1;
    }
    *value = parsed;
    return 0;
}

int cli_option_decimal(const char *command, const char *option, const char *text, uint64_t min,
                       uint64_t max, uint64_t *value)
{
    char problem[128];
    if (cli_parse_decimal(text, min, max, value, problem, sizeof problem) == 0)
        return 0;
    cli_error(command, "bad %s '%s': %s", option, text ? text : "", problem);
    return -1;
}

/* The length of the run of decimal digits at text. */
static size_t digit_run(const char *text)
{
    return strspn(text, "0123456789");
}

int cli_parse_float(const char *text, float *value, char *problem, size_t problem_size)
{
    const char *cursor = text;
    size_t whole, fraction = 0;
    char *end = NULL;
    float parsed;
    if (!text || !text[0]) {
        if (problem)
            snprintf(problem, problem_size, "empty (%s)", CLI_FLOAT_RULE);
        return -1;
    }
    /* The grammar is checked here; strtof alone would also take spaces,
     * hex, inf and nan. */
    if (*cursor == '+' || *cursor == '-')
        ++cursor;
    whole = digit_run(cursor);
    cursor += whole;
    if (*cursor == '.') {
        fraction = digit_run(cursor + 1);
        cursor += 1 + fraction;
    }
    if (whole + fraction > 0 && (*cursor == 'e' || *cursor == 'E')) {
        const char *exponent = cursor + 1;
        if (*exponent == '+' || *exponent == '-')
            ++exponent;
        cursor = digit_run(exponent) > 0 ? exponent + digit_run(exponent) : cursor;
    }
    if (whole + fraction == 0 || *cursor != '\0') {
        if (problem)
            snprintf(problem, problem_size, "not a decimal number (%s)", CLI_FLOAT_RULE);
        return -1;
    }
    errno = 0;
    parsed = strtof(text, &end);
    if (errno != 0 || *end != '\0' || !isfinite(parsed)) {
        if (problem)
            snprintf(problem, problem_size, "out of float range");
        return -1;
    }
    *value = parsed;
    return 0;
}

int cli_parse_backend(const char *text, psm_backend *backend, int *device_index)
{
    static const struct {
        const char *name;
        psm_backend backend;
    } names[] = {{"auto", PSM_BACKEND_AUTO},
                 {"cpu", PSM_BACKEND_CPU},
                 {"cuda", PSM_BACKEND_CUDA},
                 {"hip", PSM_BACKEND_HIP},
                 {"opencl", PSM_BACKEND_OPENCL}};
    const char *colon;
    size_t name_length;
    size_t i;
    if (!text)
        return -1;
    colon = strchr(text, ':');
    name_length = colon ? (size_t)(colon - text) : strlen(text);
    for (i = 0; i < sizeof names / sizeof names[0]; ++i) {
        if (strlen(names[i].name) == name_length && strncmp(text, names[i].name, name_length) == 0) {
            uint64_t index = 0;
            if (colon && (names[i].backend == PSM_BACKEND_AUTO ||
                          cli_parse_decimal(colon + 1, 0, 1024, &index, NULL, 0) != 0))
                return -1;
            *backend = names[i].backend;
            *device_index = colon ? (int)index : -1;
            return 0;
        }
    }
    return -1;
}

int cli_parse_dtype(const char *text, psm_dtype *dtype)
{
    if (!text)
        return -1;
    if (!strcmp(text, "f32") || !strcmp(text, "fp32") || !strcmp(text, "float32")) {
        *dtype = PSM_DTYPE_F32;
        return 0;
    }
    if (!strcmp(text, "f16") || !strcmp(text, "fp16") || !strcmp(text, "float16")) {
        *dtype = PSM_DTYPE_F16;
        return 0;
    }
    if (!strcmp(text, "bf16") || !strcmp(text, "bfloat16")) {
        *dtype = PSM_DTYPE_BF16;
        return 0;
    }
    return -1;
}

const char *cli_dtype_name(psm_dtype dtype)
{
    switch (dtype) {
    case PSM_DTYPE_F32: return "f32";
    case PSM_DTYPE_F16: return "f16";
    case PSM_DTYPE_BF16: return "bf16";
    }
    return "?";
}

size_t cli_dtype_size(psm_dtype dtype)
{
    return dtype == PSM_DTYPE_F32 ? 4 : 2;
}

static const char *const filter_order_names[PSM_FILTER_ORDER_COUNT] = {
    "polysample", "vllm", "sglang", "llama.cpp", "flashinfer-top-k-first", "flashinfer-joint"};

const char *cli_filter_order_name(int32_t order)
{
    return order >= 0 && order < PSM_FILTER_ORDER_COUNT ? filter_order_names[order] : "?";
}

int cli_parse_filter_order(const char *text, int32_t *order)
{
    for (int32_t i = 0; text && i < PSM_FILTER_ORDER_COUNT; ++i)
        if (!strcmp(text, filter_order_names[i])) {
            *order = i;
            return 0;
        }
    return -1;
}

static uint32_t float_bits(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

static float bits_float(uint32_t bits)
{
    float x;
    memcpy(&x, &bits, sizeof x);
    return x;
}

uint16_t cli_float_to_bf16(float x)
{
    uint32_t bits = float_bits(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u); /* keep it a (quiet) NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

uint16_t cli_float_to_f16(float x)
{
    uint32_t bits = float_bits(x);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u);
    if (magnitude >= 0x477ff000u) /* 65520 and above round to infinity */
        return (uint16_t)(sign | 0x7c00u);
    if (magnitude >= 0x38800000u) { /* a normal half: 2^-14 and above */
        uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
        return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
    }
    /* A subnormal half counts units of 2^-24; scaling by 2^24 is exact and
     * rintf rounds to nearest even in the default rounding mode. */
    return (uint16_t)(sign | (uint16_t)rintf(bits_float(magnitude) * 16777216.0f));
}

float cli_bf16_to_float(uint16_t h)
{
    return bits_float((uint32_t)h << 16);
}

float cli_f16_to_float(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exponent = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t mantissa = (uint32_t)h & 0x3ffu;
    if (exponent == 0x1fu)
        return bits_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0)
        return (sign ? -1.0f : 1.0f) * (float)mantissa * 0x1p-24f;
    return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

void cli_convert_from_f32(const float *source, size_t count, psm_dtype dtype, void *destination)
{
    int64_t i;
    int64_t n = (int64_t)count;
    if (dtype == PSM_DTYPE_F32) {
        memcpy(destination, source, count * sizeof(float));
        return;
    }
#pragma omp parallel for schedule(static)
    for (i = 0; i < n; ++i) {
        uint16_t *halves = (uint16_t *)destination;
        halves[i] = dtype == PSM_DTYPE_F16 ? cli_float_to_f16(source[i]) : cli_float_to_bf16(source[i]);
    }
}

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t cli_random_u64(uint64_t seed, uint64_t index)
{
    return mix64(mix64(seed ^ 0x6a09e667f3bcc909ull) + 0x9e3779b97f4a7c15ull * (index + 1));
}

double cli_random_unit(uint64_t seed, uint64_t index)
{
    return (double)(cli_random_u64(seed, index) >> 11) * 0x1p-53;
}

float cli_normal(uint64_t seed, uint64_t index)
{
    /* Box-Muller on the two halves of one random word; u1 is never 0. */
    uint64_t word = cli_random_u64(seed, index);
    double u1 = ((double)(word >> 32) + 0.5) * 0x1p-32;
    double u2 = (double)(word & 0xffffffffu) * 0x1p-32;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void cli_fill_normal(float *values, size_t count, float sigma, uint64_t seed)
{
    int64_t i;
    int64_t n = (int64_t)count;
#pragma omp parallel for schedule(static)
    for (i = 0; i < n; ++i)
        values[i] = sigma * cli_normal(seed, (uint64_t)i);
}

double cli_now_seconds(void)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)now.tv_sec + 1e-9 * (double)now.tv_nsec;
}

static int compare_doubles(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double cli_median(double *values, int count)
{
    if (count <= 0)
        return NAN;
    qsort(values, (size_t)count, sizeof *values, compare_doubles);
    return count % 2 ? values[count / 2] : 0.5 * (values[count / 2 - 1] + values[count / 2]);
}

void *cli_alloc(const char *command, size_t bytes)
{
    void *memory = malloc(bytes ? bytes : 1);
    if (!memory)
        cli_error(command, "out of memory (%zu bytes)", bytes);
    return memory;
}

void cli_print_logprob(float value, int json)
{
    if (isnan(value) || isinf(value))
        fputs(json ? "null" : (isnan(value) ? "nan" : "-inf"), stdout);
    else
        printf("%.9g", (double)value);
}
