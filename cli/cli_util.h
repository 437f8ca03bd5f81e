/*
 * cli_util.h: small helpers shared by the polysample subcommands: strict
 * number parsing (cli_options.h parses the options with it), backend names,
 * dtype conversions, a deterministic random source for test and benchmark
 * logits, and a monotonic clock.
 */
#ifndef PSM_CLI_UTIL_H
#define PSM_CLI_UTIL_H

#include "polysample.h"

#include <stddef.h>
#include <stdint.h>

/* Exit statuses of the tool. */
#define CLI_EXIT_OK 0
#define CLI_EXIT_FAILURE 1 /* a library call failed, or check found a disagreement */
#define CLI_EXIT_USAGE 2   /* bad command line or bad input file */

/* Prints "polysample <command>: <message>" on stderr. */
void cli_error(const char *command, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* Prints "<what> failed: " and psm_last_error(), or the status's words when
 * the library left no message. */
void cli_library_error(const char *command, const char *what, psm_status status);

/* psm_context_options_init, plus a notice callback that shows the library's
 * reports of long steps (compiling OpenCL kernels at first use, say) as
 * "polysample: <message>" on stderr when stderr is a terminal, so that a
 * wait is explained; elsewhere they are not shown. */
void cli_context_options_init(psm_context_options *options);

/* Every integer the tool reads is written in decimal: one or more digits 0-9
 * and nothing else. No sign, no spaces, no base prefix; leading zeros do not
 * mean octal ("010" is ten, "08" is eight, "0x10" is refused). */
#define CLI_DECIMAL_RULE "decimal digits only: no sign, spaces or 0x prefix"

/* Parses a strict decimal integer in [min, max]. 0 on success; otherwise -1
 * and, when problem is not NULL, a few words in it saying why (e.g. "not a
 * decimal number (...)" or "out of range (1 to 4096)"). */
int cli_parse_decimal(const char *text, uint64_t min, uint64_t max, uint64_t *value,
                      char *problem, size_t problem_size);

/* The value of an integer option, e.g. "--threads": as cli_parse_decimal,
 * printing "bad --threads '<text>': <why>" on failure. */
int cli_option_decimal(const char *command, const char *option, const char *text, uint64_t min,
                       uint64_t max, uint64_t *value);

/* Every fraction the tool reads is written in decimal: an optional sign,
 * digits with an optional decimal point (at least one digit in all), and an
 * optional exponent "e" or "E", optional sign, digits. Nothing before or
 * after: no spaces, no hex ("0x1p-3"), no "inf" or "nan". */
#define CLI_FLOAT_RULE "decimal: digits, optional point and exponent; no spaces, hex, inf or nan"

/* Parses a strict decimal float (CLI_FLOAT_RULE) that is finite as a float.
 * 0 on success; otherwise -1 and, when problem is not NULL, why ("not a
 * decimal number (...)", "empty" or "out of float range"). */
int cli_parse_float(const char *text, float *value, char *problem, size_t problem_size);

/* "auto", "cpu", "cuda", "hip", "opencl", optionally ":N" for a device. */
int cli_parse_backend(const char *text, psm_backend *backend, int *device_index);

/* "f32"/"fp32"/"float32", "f16"/"fp16"/"float16", "bf16"/"bfloat16". */
int cli_parse_dtype(const char *text, psm_dtype *dtype);
const char *cli_dtype_name(psm_dtype dtype);
size_t cli_dtype_size(psm_dtype dtype);

/* A filter order's name (psm_filter_order): "polysample", "vllm", "sglang",
 * "llama.cpp", "flashinfer-top-k-first", "flashinfer-joint". 0 on success,
 * -1 for another text. CLI_FILTER_ORDER_NAMES lists them for messages. */
#define CLI_FILTER_ORDER_NAMES \
    "polysample, vllm, sglang, llama.cpp, flashinfer-top-k-first or flashinfer-joint"
int cli_parse_filter_order(const char *text, int32_t *order);
/* The name cli_parse_filter_order reads as `order` ("?" for another value). */
const char *cli_filter_order_name(int32_t order);

/* Round to nearest even; NaN stays NaN. */
uint16_t cli_float_to_bf16(float x);
uint16_t cli_float_to_f16(float x);
float cli_bf16_to_float(uint16_t h);
float cli_f16_to_float(uint16_t h);

/* Converts count floats to dtype (f32 is a copy). */
void cli_convert_from_f32(const float *source, size_t count, psm_dtype dtype, void *destination);

/* A counter-based normal generator: value i of stream `seed` is the same
 * whatever the thread that computes it, so large buffers fill in parallel
 * and still reproduce. */
float cli_normal(uint64_t seed, uint64_t index);
/* A uniform 64-bit value, same property. */
uint64_t cli_random_u64(uint64_t seed, uint64_t index);
/* Uniform in [0, 1). */
double cli_random_unit(uint64_t seed, uint64_t index);

/* Fills count floats with N(0, sigma^2), in parallel. */
void cli_fill_normal(float *values, size_t count, float sigma, uint64_t seed);

/* Seconds on a monotonic clock. */
double cli_now_seconds(void);

/* Median of count values (sorts them). */
double cli_median(double *values, int count);

/* Allocation that reports failure on stderr and returns NULL. */
void *cli_alloc(const char *command, size_t bytes);

/* Prints a logprob on stdout with 9 significant digits (a float reads back
 * exactly); NaN and -inf as "nan" and "-inf", or in JSON as null. */
void cli_print_logprob(float value, int json);

#endif /* PSM_CLI_UTIL_H */
