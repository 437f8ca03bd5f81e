/*
 * test_cli_input.c: the command-line tool's input checks, on their own: the
 * strict decimal parser every integer option goes through (cli/cli_util.c)
 * and the .npy reader (cli/npy.c) on well-formed and malformed files, which
 * this program writes into a temporary directory. A plain program: exit
 * status 0 when every check passes, 1 otherwise, with one line per failure.
 */
#define _POSIX_C_SOURCE 200809L
#include "cli_util.h"
#include "npy.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define EXPECT(condition, ...)                                                                \
    do {                                                                                      \
        if (!(condition)) {                                                                   \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                                       \
            printf(__VA_ARGS__);                                                              \
            putchar('\n');                                                                    \
            ++failures;                                                                       \
        }                                                                                     \
    } while (0)

/* ---- cli_parse_decimal --------------------------------------------------- */

static void expect_decimal(const char *text, uint64_t min, uint64_t max, uint64_t expected)
{
    uint64_t value = 12345;
    char problem[128] = "";
    int status = cli_parse_decimal(text, min, max, &value, problem, sizeof problem);
    EXPECT(status == 0 && value == expected, "'%s' in [%llu, %llu]: status %d, value %llu (%s); "
           "expected %llu", text, (unsigned long long)min, (unsigned long long)max, status,
           (unsigned long long)value, problem, (unsigned long long)expected);
}

/* Refused, value untouched, and the problem names the expected kind. */
static void expect_refused(const char *text, uint64_t min, uint64_t max, const char *problem_start)
{
    uint64_t value = 12345;
    char problem[128] = "";
    int status = cli_parse_decimal(text, min, max, &value, problem, sizeof problem);
    EXPECT(status == -1 && value == 12345 &&
               strncmp(problem, problem_start, strlen(problem_start)) == 0,
           "'%s' in [%llu, %llu]: status %d, value %llu, problem '%s'; expected refusal "
           "starting '%s'", text, (unsigned long long)min, (unsigned long long)max, status,
           (unsigned long long)value, problem, problem_start);
}

static void test_decimal(void)
{
    expect_decimal("0", 0, UINT64_MAX, 0);
    expect_decimal("10", 0, UINT64_MAX, 10);
    expect_decimal("010", 0, UINT64_MAX, 10); /* not octal */
    expect_decimal("08", 0, UINT64_MAX, 8);   /* not an octal error */
    expect_decimal("0000000000000000000000042", 0, UINT64_MAX, 42);
    expect_decimal("18446744073709551615", 0, UINT64_MAX, UINT64_MAX);
    expect_decimal("1", 1, 4096, 1);
    expect_decimal("4096", 1, 4096, 4096);

    expect_refused("0x10", 0, UINT64_MAX, "not a decimal number");
    expect_refused("0X10", 0, UINT64_MAX, "not a decimal number");
    expect_refused(" 5", 0, UINT64_MAX, "not a decimal number");
    expect_refused("5 ", 0, UINT64_MAX, "not a decimal number");
    expect_refused("+5", 0, UINT64_MAX, "not a decimal number");
    expect_refused("-0", 0, UINT64_MAX, "not a decimal number");
    expect_refused("-1", 0, UINT64_MAX, "not a decimal number");
    expect_refused("1e3", 0, UINT64_MAX, "not a decimal number");
    expect_refused("1.0", 0, UINT64_MAX, "not a decimal number");
    expect_refused("", 0, UINT64_MAX, "empty");
    expect_refused("18446744073709551616", 0, UINT64_MAX, "out of range (0 to 18446744073709551615)");
    expect_refused("99999999999999999999999", 0, UINT64_MAX, "out of range");
    expect_refused("0", 1, 4096, "out of range (1 to 4096)");
    expect_refused("4097", 1, 4096, "out of range (1 to 4096)");
    {
        uint64_t value = 7;
        EXPECT(cli_parse_decimal(NULL, 0, 10, &value, NULL, 0) == -1 && value == 7,
               "NULL text is refused (with no problem buffer)");
    }
}

/* ---- backend names use the same rule for :N ----------------------------- */

static void test_backend_device_index(void)
{
    psm_backend backend = PSM_BACKEND_AUTO;
    int device = -7;
    EXPECT(cli_parse_backend("cpu", &backend, &device) == 0 && backend == PSM_BACKEND_CPU &&
               device == -1, "cpu: backend %d device %d", (int)backend, device);
    EXPECT(cli_parse_backend("opencl:010", &backend, &device) == 0 &&
               backend == PSM_BACKEND_OPENCL && device == 10,
           "opencl:010: backend %d device %d", (int)backend, device);
    EXPECT(cli_parse_backend("opencl:0x1", &backend, &device) == -1, "opencl:0x1 refused");
    EXPECT(cli_parse_backend("opencl:+1", &backend, &device) == -1, "opencl:+1 refused");
    EXPECT(cli_parse_backend("opencl: 1", &backend, &device) == -1, "'opencl: 1' refused");
    EXPECT(cli_parse_backend("opencl:", &backend, &device) == -1, "'opencl:' refused");
}

int main(void)
{
    test_decimal();
    test_backend_device_index();
    if (failures) {
        printf("test_cli_input: %d failure(s)\n", failures);
        return EXIT_FAILURE;
    }
    printf("test_cli_input: all checks passed\n");
    return EXIT_SUCCESS;
}
