/*
 * test_cli.c: the command-line tool's helpers, on their own: the
 * strict decimal and float parsers every number option goes through
 * (cli/cli_util.c), the option parser (cli/cli_options.c) on a table of every
 * kind and through the subcommands themselves (--help, refusals, usage
 * texts), the bench's language-model logits (cli/bench_cases.c), its
 * sharded runs and their exchange model (cli/bench_sharded.c), the notice
 * callback the tool gives the library (shown on a terminal only),
 * and the .npy reader (cli/npy.c) on well-formed and malformed files, which
 * this program writes into a temporary directory (and through a FIFO, for
 * input whose size is not known in advance). A plain program: exit status 0
 * when every check passes, 1 otherwise, with one line per failure.
 */
#define _XOPEN_SOURCE 700
#include "bench.h"
#include "cli_commands.h"
#include "cli_options.h"
#include "cli_util.h"
#include "npy.h"
#include "processing_files.h"

#include <math.h>
#include <omp.h>

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

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
    expect_refused("18446744073709551616", 0, UINT64_MAX,
                   "out of range (0 to 18446744073709551615)");
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

/* ---- cli_parse_float ----------------------------------------------------- */

static void expect_float(const char *text, float expected)
{
    float value = -12345.0f;
    char problem[160] = "";
    int status = cli_parse_float(text, &value, problem, sizeof problem);
    EXPECT(status == 0 && value == expected,
           "float '%s': status %d, value %.9g (%s); expected %.9g", text, status, (double)value,
           problem, (double)expected);
}

static void expect_float_refused(const char *text, const char *problem_start)
{
    float value = -12345.0f;
    char problem[160] = "";
    int status = cli_parse_float(text, &value, problem, sizeof problem);
    EXPECT(status == -1 && value == -12345.0f &&
               strncmp(problem, problem_start, strlen(problem_start)) == 0,
           "float '%s': status %d, value %.9g, problem '%s'; expected refusal starting '%s'", text,
           status, (double)value, problem, problem_start);
}

static void test_float(void)
{
    expect_float("0", 0.0f);
    expect_float("0.9", 0.9f);
    expect_float(".5", 0.5f);
    expect_float("5.", 5.0f);
    expect_float("1e-5", 1e-5f);
    expect_float("5E-2", 5e-2f);
    expect_float("2.5e+1", 25.0f);
    expect_float("-1", -1.0f); /* the library says why a negative value is wrong */
    expect_float("+0.8", 0.8f);
    expect_float("007", 7.0f);

    expect_float_refused("", "empty");
    expect_float_refused(" 0.9", "not a decimal number");
    expect_float_refused("0.9 ", "not a decimal number");
    expect_float_refused("\t1", "not a decimal number");
    expect_float_refused("0x1p-3", "not a decimal number");
    expect_float_refused("0X10", "not a decimal number");
    expect_float_refused("0.9x", "not a decimal number");
    expect_float_refused("1e", "not a decimal number");
    expect_float_refused("1e+", "not a decimal number");
    expect_float_refused("e5", "not a decimal number");
    expect_float_refused(".", "not a decimal number");
    expect_float_refused("-", "not a decimal number");
    expect_float_refused("--1", "not a decimal number");
    expect_float_refused("1.2.3", "not a decimal number");
    expect_float_refused("inf", "not a decimal number");
    expect_float_refused("-infinity", "not a decimal number");
    expect_float_refused("nan", "not a decimal number");
    expect_float_refused("1,5", "not a decimal number");
    expect_float_refused("1e39", "out of float range");
    expect_float_refused("-1e39", "out of float range");
    expect_float_refused("1e-60", "out of float range");
    {
        float value = 3.0f;
        EXPECT(cli_parse_float(NULL, &value, NULL, 0) == -1 && value == 3.0f,
               "NULL text is refused (with no problem buffer)");
    }
}

/* ---- capturing a command's stdout and stderr ------------------------------ */

typedef struct captured {
    int status;
    char out[16384];
    char err[4096];
} captured;

static void read_back(FILE *file, char *text, size_t size)
{
    size_t length;
    rewind(file);
    length = fread(text, 1, size - 1, file);
    text[length] = '\0';
    fclose(file);
}

/* Runs parse(argc, argv) or command(argc, argv) with stdout and stderr sent
 * to temporary files, and keeps what they received. */
static void capture(captured *result, int (*command)(int, char **),
                    const cli_command *table, int argc, char **argv)
{
    FILE *out = tmpfile(), *err = tmpfile();
    int saved_out, saved_err;
    if (!out || !err) {
        printf("FAIL: cannot make temporary files\n");
        exit(EXIT_FAILURE);
    }
    fflush(stdout);
    fflush(stderr);
    saved_out = dup(STDOUT_FILENO);
    saved_err = dup(STDERR_FILENO);
    dup2(fileno(out), STDOUT_FILENO);
    dup2(fileno(err), STDERR_FILENO);
    result->status = command ? command(argc, argv) : cli_parse_options(table, argc, argv);
    fflush(stdout);
    fflush(stderr);
    dup2(saved_out, STDOUT_FILENO);
    dup2(saved_err, STDERR_FILENO);
    close(saved_out);
    close(saved_err);
    read_back(out, result->out, sizeof result->out);
    read_back(err, result->err, sizeof result->err);
}

/* Splits a command line written as one string at spaces (no quoting). */
static int split_words(const char *line, char *buffer, size_t size, char **words, int capacity)
{
    int count = 0;
    char *word, *save = NULL;
    snprintf(buffer, size, "%s", line);
    for (word = strtok_r(buffer, " ", &save); word && count < capacity;
         word = strtok_r(NULL, " ", &save))
        words[count++] = word;
    return count;
}

/* ---- the option parser on a table of every kind --------------------------- */

typedef struct parsed_values {
    int flag;
    uint64_t count;
    float fraction;
    const char *name;
    const char *path;
    cli_backend_list backends;
    cli_item_list colours;
    const char *positional;
} parsed_values;

static int parse_colour(const char *item, int *value)
{
    static const char *const colours[] = {"red", "green", "blue"};
    int i;
    for (i = 0; i < 3; ++i)
        if (!strcmp(item, colours[i])) {
            *value = i;
            return 0;
        }
    return -1;
}

/* Parses line against the test table into values (reset first). */
static void parse_test_line(const char *line, parsed_values *values, captured *result)
{
    static char buffer[512];
    char *words[32];
    int count = split_words(line, buffer, sizeof buffer, words, 32);
    const cli_option options[] = {
        {.name = "--flag", .kind = CLI_OPTION_FLAG, .target = &values->flag, .help = "a flag"},
        {.name = "--count", .kind = CLI_OPTION_DECIMAL, .value_name = "N",
         .target = &values->count, .minimum = 1, .maximum = 100, .help = "a count"},
        {.name = "--fraction", .kind = CLI_OPTION_FLOAT, .value_name = "F",
         .target = &values->fraction, .help = "a fraction"},
        {.name = "--name", .kind = CLI_OPTION_STRING, .value_name = "NAME",
         .target = &values->name, .help = "a name"},
        {.name = "--backend", .kind = CLI_OPTION_BACKEND_LIST, .value_name = "LIST",
         .target = &values->backends, .maximum = 3, .help = "backends"},
        {.name = "--colour", .kind = CLI_OPTION_LIST, .value_name = "LIST",
         .target = &values->colours, .maximum = 2, .parse_item = parse_colour,
         .items = "red, green or blue", .help = "colours"},
        {.name = "--out", .kind = CLI_OPTION_FLAG, .target = &values->flag, .help = "stdout"},
        {.name = "--out", .kind = CLI_OPTION_STRING, .value_name = "PATH",
         .target = &values->path, .value_attached_only = 1, .help = "a file"},
    };
    const cli_command command = {
        .name = "test",
        .synopsis = "polysample test [options] FILE",
        .options = options,
        .option_count = (int)(sizeof options / sizeof options[0]),
        .positional_name = "file",
        .positional = &values->positional,
    };
    memset(values, 0, sizeof *values);
    values->count = 7;
    values->fraction = 0.5f;
    capture(result, NULL, &command, count, words);
}

static void expect_parse_refused(const char *line, const char *message)
{
    parsed_values values;
    captured result;
    parse_test_line(line, &values, &result);
    EXPECT(result.status == CLI_PARSE_ERROR && strstr(result.err, message) != NULL &&
               result.out[0] == '\0',
           "'%s': status %d, stderr '%s', stdout '%s'; expected a refusal saying '%s'", line,
           result.status, result.err, result.out, message);
}

static void test_option_parser(void)
{
    parsed_values values;
    captured result;

    parse_test_line("--flag --count 42 --fraction=0.25 --name=x --backend cpu,opencl:1 "
                    "--colour blue,red file.npy",
                    &values, &result);
    EXPECT(result.status == CLI_PARSE_OK && result.err[0] == '\0', "good line: status %d, '%s'",
           result.status, result.err);
    EXPECT(values.flag == 1 && values.count == 42 && values.fraction == 0.25f &&
               values.name && !strcmp(values.name, "x") && values.positional &&
               !strcmp(values.positional, "file.npy"),
           "good line: flag %d count %llu fraction %g name %s positional %s", values.flag,
           (unsigned long long)values.count, (double)values.fraction,
           values.name ? values.name : "(null)", values.positional ? values.positional : "(null)");
    EXPECT(values.backends.count == 2 && values.backends.backends[0] == PSM_BACKEND_CPU &&
               values.backends.device_indices[0] == -1 &&
               values.backends.backends[1] == PSM_BACKEND_OPENCL &&
               values.backends.device_indices[1] == 1,
           "good line: %d backends", values.backends.count);
    EXPECT(values.colours.count == 2 && values.colours.values[0] == 2 &&
               values.colours.values[1] == 0,
           "good line: %d colours", values.colours.count);

    /* Options not given keep their values; a "-" alone is a positional. */
    parse_test_line("-", &values, &result);
    EXPECT(result.status == CLI_PARSE_OK && values.count == 7 && values.fraction == 0.5f &&
               !values.flag && values.backends.count == 0 && values.positional &&
               !strcmp(values.positional, "-"),
           "'-': status %d count %llu", result.status, (unsigned long long)values.count);

    /* A flag and its "=VALUE" form are two options. */
    parse_test_line("--out --out=o.json", &values, &result);
    EXPECT(result.status == CLI_PARSE_OK && values.flag == 1 && values.path &&
               !strcmp(values.path, "o.json"),
           "--out --out=o.json: status %d, '%s'", result.status, result.err);

    /* The word after an option is its value, whatever it looks like. */
    parse_test_line("--name --flag", &values, &result);
    EXPECT(result.status == CLI_PARSE_OK && values.name && !strcmp(values.name, "--flag") &&
               values.flag == 0,
           "--name --flag: status %d", result.status);

    parse_test_line("--flag --help --bogus", &values, &result);
    EXPECT(result.status == CLI_PARSE_HELP && result.err[0] == '\0' &&
               strstr(result.out, "usage: polysample test [options] FILE\n") == result.out &&
               strstr(result.out, "  --count N ") && strstr(result.out, "(default 7)") &&
               strstr(result.out, "(default 0.5)") && strstr(result.out, "  --out=PATH ") &&
               strstr(result.out, "  --help, -h ") && strstr(result.out, "Integers are decimal") &&
               strstr(result.out, "Fractions are decimal"),
           "--help: status %d, stdout '%s'", result.status, result.out);
    parse_test_line("-h", &values, &result);
    EXPECT(result.status == CLI_PARSE_HELP && strstr(result.out, "usage: "), "-h: status %d",
           result.status);

    expect_parse_refused("--bogus", "unknown option '--bogus' (see polysample test --help)");
    expect_parse_refused("-x", "unknown option '-x'");
    expect_parse_refused("--flags", "unknown option '--flags'");
    expect_parse_refused("--count", "option --count needs a value");
    expect_parse_refused("--flag --count", "option --count needs a value");
    expect_parse_refused("--count 1 --count 2", "option --count is given more than once");
    expect_parse_refused("--count=1 --count 1", "option --count is given more than once");
    expect_parse_refused("--flag --flag", "option --flag is given more than once");
    expect_parse_refused("--out=a --out=b", "option --out= is given more than once");
    expect_parse_refused("--flag=1", "option --flag takes no value");
    expect_parse_refused("--out=", "option --out=PATH needs a value");
    expect_parse_refused("--name=", "option --name NAME needs a value");
    expect_parse_refused("--count 0", "bad --count '0': out of range (1 to 100)");
    expect_parse_refused("--count=0x10", "bad --count '0x10': not a decimal number");
    expect_parse_refused("--fraction 0x1p-3", "bad --fraction '0x1p-3': not a decimal number");
    expect_parse_refused("--fraction 1e99", "bad --fraction '1e99': out of float range");
    expect_parse_refused("--backend gpu", "bad --backend item 'gpu'");
    expect_parse_refused("--backend cpu,cpu,cpu,cpu", "--backend takes at most 3 items");
    expect_parse_refused("--backend ,", "--backend needs at least one item");
    expect_parse_refused("--colour green,pink", "bad --colour item 'pink' (red, green or blue)");
    expect_parse_refused("a b", "more than one file ('a' and 'b')");
}

/* ---- the subcommands' command lines ---------------------------------------- */

/* --help: exit 0, the usage on stdout (nothing on stderr) with each option
 * (names separated by spaces) and no line longer than CLI_USAGE_WIDTH. */
static void expect_command_help(const char *name, int (*command)(int, char **),
                                const char *options)
{
    static char buffer[512];
    char *words[32], *argv[1] = {"--help"};
    char usage_start[64];
    captured result;
    const char *line;
    int count = split_words(options, buffer, sizeof buffer, words, 32), i;
    capture(&result, command, NULL, 1, argv);
    snprintf(usage_start, sizeof usage_start, "usage: polysample %s", name);
    EXPECT(result.status == CLI_EXIT_OK && result.err[0] == '\0' &&
               strncmp(result.out, usage_start, strlen(usage_start)) == 0 &&
               strstr(result.out, "\n  --help, -h "),
           "%s --help: status %d, stderr '%s', stdout starts '%.40s'", name, result.status,
           result.err, result.out);
    for (i = 0; i < count; ++i) {
        char label[64];
        snprintf(label, sizeof label, "\n  %s", words[i]);
        EXPECT(strstr(result.out, label) != NULL, "%s --help does not list %s", name, words[i]);
    }
    for (line = result.out; *line;) {
        const char *end = strchr(line, '\n');
        size_t length = end ? (size_t)(end - line) : strlen(line);
        EXPECT(length <= CLI_USAGE_WIDTH, "%s --help: a line of %zu characters: '%.*s'", name,
               length, (int)length, line);
        line += length + (end ? 1 : 0);
    }
}

static void expect_command_refused(const char *name, int (*command)(int, char **),
                                   const char *line, const char *message)
{
    static char buffer[512];
    char *words[32];
    captured result;
    int count = split_words(line, buffer, sizeof buffer, words, 32);
    capture(&result, command, NULL, count, words);
    EXPECT(result.status == CLI_EXIT_USAGE && strstr(result.err, message) != NULL,
           "%s %s: status %d, stderr '%s'; expected exit %d saying '%s'", name, line,
           result.status, result.err, CLI_EXIT_USAGE, message);
}

static void test_commands(void)
{
    expect_command_help("info", cli_info, "");
    expect_command_help("sample", cli_sample,
                        "--backend --threads --temperature --top-k --top-p --min-p "
                        "--filter-order --seed "
                        "--offset --num-samples --logprobs --check-rows --json --allowed-mask "
                        "--logit-bias --history --prompt --repetition-penalty "
                        "--frequency-penalty --presence-penalty --verify --draft-tokens "
                        "--draft-parents --draft-logits --draft-probs --draft-temperature "
                        "--draft-top-k --draft-top-p --draft-min-p --draft-filter-order");
    expect_command_help("bench", cli_bench,
                        "--backend --rows --vocab --dtype --setting --distribution "
                        "--filter-order --shards --link-gb-per-s --collective-us --repeat "
                        "--threads --seed --quick --json --json=PATH");
    expect_command_help("check", cli_check, "--rows --backend --seed --draws");

    static const struct {
        const char *name;
        int (*command)(int, char **);
        const char *line;
        const char *message;
    } refusals[] = {
        {"info", cli_info, "extra", "unexpected argument 'extra'"},
        {"sample", cli_sample, "--top-k", "option --top-k needs a value"},
        {"sample", cli_sample, "--seed 1 --seed 1 x.npy", "option --seed is given more than once"},
        {"sample", cli_sample, "--top-p 0.9x x.npy", "bad --top-p '0.9x': not a decimal number"},
        {"sample", cli_sample, "--temperature 0x1p-1 x.npy", "bad --temperature '0x1p-1'"},
        {"sample", cli_sample, "--backend cpu,opencl x.npy", "--backend takes at most 1 item"},
        {"sample", cli_sample, "--logprobs", "no input file"},
        {"sample", cli_sample, "--presence-penalty 0.5 x.npy",
         "--presence-penalty needs --history (the tokens it counts)"},
        {"sample", cli_sample, "--repetition-penalty 1.2 x.npy",
         "--repetition-penalty needs --history or --prompt"},
        {"sample", cli_sample, "--history", "option --history needs a value"},
        {"sample", cli_sample, "--unknown x.npy",
         "unknown option '--unknown' (see polysample sample --help)"},
        {"bench", cli_bench, "--distribution normal,gamma",
         "bad --distribution item 'gamma' (normal, lm or both)"},
        {"bench", cli_bench, "--json=", "option --json=PATH needs a value"},
        {"bench", cli_bench, "--filter-order vllm2",
         "--filter-order vllm2: expected polysample, vllm, sglang"},
        {"bench", cli_bench, "--quick --quick", "option --quick is given more than once"},
        {"bench", cli_bench, "--repeat 201", "bad --repeat '201': out of range (1 to 200)"},
        {"bench", cli_bench, "--shards 0", "bad --shards item '0' (a shard count, 1 to 64)"},
        {"bench", cli_bench, "--shards 2,65", "bad --shards item '65' (a shard count, 1 to 64)"},
        {"bench", cli_bench, "--shards 1,2,3,4,5,6,7,8,9", "--shards takes at most 8 items"},
        {"bench", cli_bench, "--collective-us 5",
         "--collective-us models the exchange of --shards, which is not given"},
        {"bench", cli_bench, "--shards 2 --link-gb-per-s 0",
         "--link-gb-per-s 0: expected a bandwidth above 0"},
        {"bench", cli_bench, "--shards 2 --collective-us -1",
         "--collective-us -1: expected a latency of 0 or more"},
        {"check", cli_check, "--backend cpu,cpu,cpu,cpu,cpu",
         "--backend takes at most 4 items"},
        {"check", cli_check, "--draws -1", "bad --draws '-1'"},
    };
    size_t i;
    for (i = 0; i < sizeof refusals / sizeof refusals[0]; ++i)
        expect_command_refused(refusals[i].name, refusals[i].command, refusals[i].line,
                               refusals[i].message);
}

/* ---- the bench's verify setting ------------------------------------------ */

/* --setting verify without a shape runs on the verify shapes (rows are
 * requests), in every listed dtype, without plain added; the default list
 * has them in f32; a verify case reads requests x (2k + 1) rows, which no
 * sampling case of as many rows shares; its draft rows are copies of the
 * target rows their tokens are proposed for. */
static void test_bench_verify_cases(void)
{
    enum { REQUESTS = 3, VOCAB = 50, K = BENCH_VERIFY_DRAFTS };
    static const int64_t shapes[3][2] = {{64, 128256}, {256, 151936}, {1, 128256}};
    static bench_case cases[BENCH_MAX_CASES];
    static float case_logits[REQUESTS * (2 * K + 1) * VOCAB], target[REQUESTS * (K + 1) * VOCAB];
    const int verify_only[1] = {SETTING_VERIFY};
    bench_selection selection;
    int count, i, s, found[3] = {0};

    memset(&selection, 0, sizeof selection);
    selection.settings = verify_only;
    selection.setting_count = 1;
    selection.distributions = 1 << DISTRIBUTION_NORMAL;
    count = bench_make_cases(&selection, cases);
    EXPECT(count == 6, "--setting verify: %d cases, expected 3 shapes x 2 dtypes", count);
    for (i = 0; i < count; ++i) {
        int shape = -1;
        for (s = 0; s < 3; ++s)
            if (cases[i].rows == shapes[s][0] && cases[i].vocab == shapes[s][1])
                shape = s;
        EXPECT(cases[i].setting == SETTING_VERIFY && shape >= 0,
               "--setting verify: case %d is setting %d at %lld x %lld", i, cases[i].setting,
               (long long)cases[i].rows, (long long)cases[i].vocab);
    }
    selection.settings = NULL;
    selection.setting_count = 0;
    count = bench_make_cases(&selection, cases);
    for (i = 0; i < count; ++i)
        for (s = 0; s < 3; ++s)
            found[s] += cases[i].setting == SETTING_VERIFY && cases[i].rows == shapes[s][0] &&
                        cases[i].vocab == shapes[s][1] && cases[i].dtype == PSM_DTYPE_F32;
    EXPECT(found[0] == 1 && found[1] == 1 && found[2] == 1,
           "default list: verify cases %d, %d, %d on its shapes, expected one each", found[0],
           found[1], found[2]);

    bench_case verify = {REQUESTS, VOCAB, DISTRIBUTION_LM, PSM_DTYPE_F32, SETTING_VERIFY};
    bench_case plain = {REQUESTS * (2 * K + 1), VOCAB, DISTRIBUTION_LM, PSM_DTYPE_F32,
                        SETTING_PLAIN};
    EXPECT(bench_logit_rows(&verify) == REQUESTS * (2 * K + 1) && bench_logit_rows(&plain) ==
           plain.rows, "logit rows %lld and %lld", (long long)bench_logit_rows(&verify),
           (long long)bench_logit_rows(&plain));
    EXPECT(!bench_same_logits(&verify, &plain), "a verify case shares a sampling case's logits");
    EXPECT(bench_fill_case_logits(case_logits, &verify, 7) == 0 &&
               bench_fill_logits(target, REQUESTS * (K + 1), VOCAB, DISTRIBUTION_LM, 7) == 0,
           "fill failed");
    EXPECT(memcmp(case_logits, target, sizeof target) == 0,
           "the verify case's target rows are not the distribution's rows");
    for (int request = 0; request < REQUESTS; ++request)
        for (int node = 1; node <= K; ++node)
            EXPECT(memcmp(case_logits + (REQUESTS * (K + 1) + request * K + node - 1) * VOCAB,
                          target + (request * (K + 1) + node - 1) * VOCAB,
                          VOCAB * sizeof(float)) == 0,
                   "request %d node %d: the draft row is not its target row", request, node);
}

/* ---- the bench's sharded runs ---------------------------------------------- */

static int occurrences(const char *text, const char *part)
{
    int count = 0;
    for (text = strstr(text, part); text; text = strstr(text + 1, part))
        ++count;
    return count;
}

/* The exchange model: nothing for one rank; a latency plus the other
 * ranks' bytes at the link's bandwidth. A tiny sharded bench on the CPU:
 * every rank's tokens equal psm_sample's, plain sampling takes the 4
 * rounds of SAMPLING.md section 8, a setting the sharded call refuses is
 * "unsupported" and not a failure, and without --shards the JSON is as
 * before. */
static void test_bench_sharded(void)
{
    const bench_exchange_model model = {400.0, 10.0};
    static char buffer[512];
    char *words[32];
    captured result;
    int count;

    EXPECT(bench_all_gather_ms(&model, 1, 1e6) == 0.0, "one shard: %g ms",
           bench_all_gather_ms(&model, 1, 1e6));
    EXPECT(fabs(bench_all_gather_ms(&model, 5, 1e6) - (0.010 + 4e6 / 400e9 * 1e3)) < 1e-12,
           "five shards of 1 MB: %g ms", bench_all_gather_ms(&model, 5, 1e6));

    count = split_words("--backend cpu --rows 3 --vocab 3000 --dtype f32 --distribution normal "
                        "--setting plain,top_p,mask+bias --shards 1,3,3 --repeat 1 --json",
                        buffer, sizeof buffer, words, 32);
    capture(&result, cli_bench, NULL, count, words);
    EXPECT(result.status == CLI_EXIT_OK, "bench --shards: status %d, stderr '%s'", result.status,
           result.err);
    EXPECT(strstr(result.out, "\"exchange_model\": {\"measured\": false, \"link_gb_per_s\": 450, "
                              "\"collective_us\": 10}"),
           "bench --shards: no exchange model in '%.300s'", result.out);
    EXPECT(occurrences(result.out, "\"shards\": ") == 6 &&
               occurrences(result.out, "\"tokens_equal\": true") == 4 &&
               occurrences(result.out, "\"unsupported\": true") == 2,
           "bench --shards 1,3,3 (one 3 kept) of plain, top_p, mask+bias: %d results, %d with "
           "equal tokens, %d unsupported; expected 6, 4, 2",
           occurrences(result.out, "\"shards\": "),
           occurrences(result.out, "\"tokens_equal\": true"),
           occurrences(result.out, "\"unsupported\": true"));
    EXPECT(occurrences(result.out, "\"setting\": \"plain\", \"temperature\": 0.8, \"top_k\": 0, "
                                   "\"top_p\": 1, \"min_p\": 0, \"filter_order\": \"polysample\", "
                                   "\"shards\": 3, \"tokens_equal\": true, \"runs\": 1, "
                                   "\"rounds\": 4,") == 1,
           "bench --shards: plain at 3 shards is not 4 rounds in '%s'", result.out);

    count = split_words("--backend cpu --rows 3 --vocab 3000 --dtype f32 --distribution normal "
                        "--setting plain --repeat 1 --json",
                        buffer, sizeof buffer, words, 32);
    capture(&result, cli_bench, NULL, count, words);
    EXPECT(result.status == CLI_EXIT_OK && !strstr(result.out, "sharded") &&
               !strstr(result.out, "exchange_model"),
           "bench without --shards: status %d, JSON '%s'", result.status, result.out);
}

/* ---- the bench's language-model logits ------------------------------------- */

static int compare_descending(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* Each row's k-th largest logit lies within the noise of -1.1 ln(k) (noise
 * of at most 0.1 moves each order statistic by at most 0.1); the rows are
 * shuffled differently (their top tokens differ); the values do not depend
 * on the thread count. */
static void test_language_model_logits(void)
{
    enum { ROWS = 3, VOCAB = 1000 };
    static float one_thread[ROWS * VOCAB], two_threads[ROWS * VOCAB], sorted[VOCAB];
    int saved_threads = omp_get_max_threads(), row, k, worst = -1, top[ROWS] = {0};
    double worst_error = 0.0;
    omp_set_num_threads(1);
    EXPECT(bench_fill_logits(one_thread, ROWS, VOCAB, DISTRIBUTION_LM, 1) == 0, "lm fill failed");
    omp_set_num_threads(2);
    EXPECT(bench_fill_logits(two_threads, ROWS, VOCAB, DISTRIBUTION_LM, 1) == 0, "lm fill failed");
    omp_set_num_threads(saved_threads);
    EXPECT(memcmp(one_thread, two_threads, sizeof one_thread) == 0,
           "lm logits differ between 1 and 2 threads");
    for (row = 0; row < ROWS; ++row) {
        memcpy(sorted, one_thread + row * VOCAB, sizeof sorted);
        qsort(sorted, VOCAB, sizeof sorted[0], compare_descending);
        for (k = 0; k < VOCAB; ++k) {
            double error = fabs((double)sorted[k] + 1.1 * log((double)(k + 1)));
            if (error > worst_error) {
                worst_error = error;
                worst = k;
            }
        }
    }
    EXPECT(worst_error <= 0.1 + 1e-5, "lm logits: order statistic %d is %.6f from -1.1 ln(rank)",
           worst, worst_error);
    EXPECT(worst_error > 0.05, "lm logits: no noise seen (largest deviation %.6f)", worst_error);
    for (row = 0; row < ROWS; ++row) {
        const float *values = one_thread + row * VOCAB;
        for (k = 0; k < VOCAB; ++k)
            if (values[k] > values[top[row]])
                top[row] = k;
    }
    EXPECT(top[0] != top[1] && top[1] != top[2] && top[0] != top[2],
           "lm logits: the rows' top tokens are %d, %d and %d; shuffled rows differ", top[0],
           top[1], top[2]);
}

/* ---- the notice callback, on a terminal and off one --------------------- */

static void test_notice(void)
{
    psm_context_options options;
    int saved_stderr = dup(STDERR_FILENO), terminal, master;
    char *terminal_name, received[128] = "";
    ssize_t length;

    /* A file or pipe (ctest's capture): nothing is shown. */
    if (!isatty(STDERR_FILENO)) {
        cli_context_options_init(&options);
        EXPECT(options.notice == NULL, "stderr is not a terminal, yet a notice callback is set");
    }

    /* A pseudo-terminal as stderr: the message arrives, prefixed. */
    master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) != 0 || unlockpt(master) != 0 ||
        !(terminal_name = ptsname(master)) ||
        (terminal = open(terminal_name, O_RDWR | O_NOCTTY)) < 0) {
        printf("SKIP notice on a terminal: no pseudo-terminal here\n");
        if (master >= 0)
            close(master);
        return;
    }
    dup2(terminal, STDERR_FILENO);
    cli_context_options_init(&options);
    EXPECT(options.notice != NULL, "stderr is a terminal, yet no notice callback is set");
    if (options.notice)
        options.notice(options.notice_user_data, "compiling kernels (first use; cached)");
    dup2(saved_stderr, STDERR_FILENO);
    close(saved_stderr);
    close(terminal);
    length = read(master, received, sizeof received - 1);
    received[length > 0 ? length : 0] = '\0';
    close(master);
    EXPECT(strncmp(received, "polysample: compiling kernels (first use; cached)",
                   strlen("polysample: compiling kernels (first use; cached)")) == 0,
           "the terminal received '%s'", received);
    EXPECT(options.backend == PSM_BACKEND_AUTO && options.device_index == -1,
           "cli_context_options_init left other defaults: backend %d device %d",
           (int)options.backend, options.device_index);
}

/* ---- the .npy reader ------------------------------------------------------ */

static char directory[64];

/* The 10-byte (version 1) or 12-byte (versions 2, 3) preamble and the header
 * dict, padded with spaces and a newline to a multiple of 64 bytes as NumPy
 * writes it, followed by data_bytes bytes of data. Returns the file's path. */
static const char *write_npy(const char *name, int version, const char *dict, const void *data,
                             size_t data_bytes)
{
    static char path[128];
    unsigned char preamble[12] = {0x93, 'N', 'U', 'M', 'P', 'Y', 0, 0};
    size_t preamble_length = version == 1 ? 10 : 12;
    size_t header_length = strlen(dict) + 1, padded;
    char header[512];
    FILE *file;
    padded = (preamble_length + header_length + 63) / 64 * 64 - preamble_length;
    memset(header, ' ', padded);
    memcpy(header, dict, strlen(dict));
    header[padded - 1] = '\n';
    preamble[6] = (unsigned char)version;
    preamble[8] = (unsigned char)(padded & 0xff);
    preamble[9] = (unsigned char)(padded >> 8);
    snprintf(path, sizeof path, "%s/%s", directory, name);
    file = fopen(path, "wb");
    if (!file || fwrite(preamble, 1, preamble_length, file) != preamble_length ||
        fwrite(header, 1, padded, file) != padded ||
        (data_bytes && fwrite(data, 1, data_bytes, file) != data_bytes) || fclose(file) != 0) {
        printf("FAIL: cannot write %s\n", path);
        exit(EXIT_FAILURE);
    }
    return path;
}

static const char *write_raw(const char *name, const void *bytes, size_t length)
{
    static char path[128];
    FILE *file;
    snprintf(path, sizeof path, "%s/%s", directory, name);
    file = fopen(path, "wb");
    if (!file || fwrite(bytes, 1, length, file) != length || fclose(file) != 0) {
        printf("FAIL: cannot write %s\n", path);
        exit(EXIT_FAILURE);
    }
    return path;
}

static long file_size(const char *path)
{
    struct stat status;
    return stat(path, &status) == 0 ? (long)status.st_size : -1;
}

/* The reader refuses the file, allocates nothing for the caller, and its
 * message contains every one of the NULL-terminated fragments. */
static void expect_npy_refused(const char *what, const char *path, ...)
{
    cli_npy_array array;
    char error[512] = "";
    va_list fragments;
    const char *fragment;
    int status = cli_npy_read(path, &array, error, sizeof error);
    EXPECT(status == -1 && array.data == NULL, "%s: status %d, data %p; expected a refusal",
           what, status, array.data);
    va_start(fragments, path);
    while ((fragment = va_arg(fragments, const char *)) != NULL)
        EXPECT(strstr(error, fragment) != NULL, "%s: message '%s' lacks '%s'", what, error,
               fragment);
    va_end(fragments);
    if (status == 0)
        cli_npy_free(&array);
}

static void test_npy_well_formed(void)
{
    const float values[6] = {1.0f, -2.5f, 3.0f, 0.125f, -0.0f, 65504.0f};
    /* 1.0, 2.0, -3.0 as big-endian float16. */
    const unsigned char big_halves[6] = {0x3c, 0x00, 0x40, 0x00, 0xc2, 0x00};
    cli_npy_array array;
    char error[512] = "";
    const char *path;

    path = write_npy("good_2d.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", values,
                     sizeof values);
    EXPECT(cli_npy_read(path, &array, error, sizeof error) == 0, "good_2d: %s", error);
    if (array.data) {
        EXPECT(array.rows == 2 && array.vocab == 3 && array.dimensions == 2 &&
                   array.dtype == PSM_DTYPE_F32 && memcmp(array.data, values, sizeof values) == 0,
               "good_2d: rows %lld vocab %lld dimensions %d dtype %d, or other values",
               (long long)array.rows, (long long)array.vocab, array.dimensions, (int)array.dtype);
        cli_npy_free(&array);
    }

    path = write_npy("good_1d.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (6,), }",
                     values, sizeof values);
    EXPECT(cli_npy_read(path, &array, error, sizeof error) == 0, "good_1d: %s", error);
    if (array.data) {
        EXPECT(array.rows == 1 && array.vocab == 6 && array.dimensions == 1,
               "good_1d: rows %lld vocab %lld dimensions %d", (long long)array.rows,
               (long long)array.vocab, array.dimensions);
        cli_npy_free(&array);
    }

    /* Fortran order is the same layout when a dimension is 1. */
    path = write_npy("fortran_one_row.npy", 1,
                     "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 6), }", values,
                     sizeof values);
    EXPECT(cli_npy_read(path, &array, error, sizeof error) == 0, "fortran_one_row: %s", error);
    cli_npy_free(&array);

    path = write_npy("big_endian_f16_v2.npy", 2,
                     "{'descr': '>f2', 'fortran_order': False, 'shape': (3,), }", big_halves,
                     sizeof big_halves);
    EXPECT(cli_npy_read(path, &array, error, sizeof error) == 0, "big_endian_f16_v2: %s", error);
    if (array.data) {
        const uint16_t *halves = array.data;
        EXPECT(array.dtype == PSM_DTYPE_F16 && cli_f16_to_float(halves[0]) == 1.0f &&
                   cli_f16_to_float(halves[1]) == 2.0f && cli_f16_to_float(halves[2]) == -3.0f,
               "big_endian_f16_v2: dtype %d, values %g %g %g", (int)array.dtype,
               (double)cli_f16_to_float(halves[0]), (double)cli_f16_to_float(halves[1]),
               (double)cli_f16_to_float(halves[2]));
        cli_npy_free(&array);
    }
}

static void test_npy_malformed(void)
{
    const unsigned char zeros[64] = {0};
    char expected[128];
    const char *path;

    /* The issue's case: 168 bytes that declare 10^10 float32 elements. The
     * reader must compare the declared size with the file before it
     * allocates (under AddressSanitizer a 40 GB request would abort). */
    path = write_npy("huge_shape.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (100000, 100000), }",
                     zeros, 40);
    EXPECT(file_size(path) == 168, "huge_shape.npy is %ld bytes; expected 168", file_size(path));
    expect_npy_refused("huge shape in a 168-byte file", path, "is truncated",
                       "shape (100000, 100000)", "needs 40000000000 bytes",
                       "the file has 40 (168 bytes in all)", (const char *)NULL);

    path = write_npy("short_data.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", zeros, 20);
    expect_npy_refused("data 4 bytes short", path, "is truncated", "needs 24 bytes",
                       "the file has 20", (const char *)NULL);

    path = write_npy("no_data.npy", 1, "{'descr': '<f2', 'fortran_order': False, 'shape': (7,), }",
                     zeros, 0);
    expect_npy_refused("header only", path, "is truncated", "needs 14 bytes", "the file has 0",
                       (const char *)NULL);

    path = write_npy("long_data.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", zeros, 28);
    expect_npy_refused("4 bytes too many", path, "has 4 bytes after the 24 bytes of data",
                       (const char *)NULL);

    path = write_raw("bad_magic.npy", "\x93NUMPX\x01\x00\x10\x00{}", 12);
    expect_npy_refused("bad magic", path, "not a .npy file (bad magic)", (const char *)NULL);
    path = write_raw("text.npy", "hello, world\n", 13);
    expect_npy_refused("a text file", path, "not a .npy file (bad magic)", (const char *)NULL);
    path = write_raw("short.npy", "\x93NUM", 4);
    expect_npy_refused("4 bytes", path, "shorter than the 10-byte preamble", (const char *)NULL);
    path = write_raw("empty.npy", "", 0);
    expect_npy_refused("empty file", path, "shorter than the 10-byte preamble",
                       (const char *)NULL);
    path = write_raw("version9.npy", "\x93NUMPY\x09\x00\x10\x00", 10);
    expect_npy_refused("version 9", path, "unsupported .npy version 9", (const char *)NULL);
    /* The header length says 0x7000 bytes; the file ends after 10. */
    path = write_raw("short_header.npy", "\x93NUMPY\x01\x00\x00\x70", 10);
    expect_npy_refused("header longer than the file", path, "truncated in its header",
                       "28672 header bytes", "10 bytes in all", (const char *)NULL);

    path = write_npy("int32.npy", 1, "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }",
                     zeros, 8);
    expect_npy_refused("int32 dtype", path, "dtype '<i4' is not supported", (const char *)NULL);
    path = write_npy("float64.npy", 1,
                     "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", zeros, 16);
    expect_npy_refused("float64 dtype", path, "dtype '<f8' is not supported", (const char *)NULL);
    path = write_npy("no_descr.npy", 1, "{'fortran_order': False, 'shape': (2,), }", zeros, 8);
    expect_npy_refused("no descr", path, "no 'descr'", (const char *)NULL);

    path = write_npy("fortran.npy", 1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }",
                     zeros, 24);
    expect_npy_refused("Fortran order", path, "Fortran order", (const char *)NULL);
    path = write_npy("no_fortran.npy", 1, "{'descr': '<f4', 'shape': (2, 3), }", zeros, 24);
    expect_npy_refused("no fortran_order", path, "no valid 'fortran_order'", (const char *)NULL);

    path = write_npy("three_d.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 4), }", zeros, 64);
    expect_npy_refused("3-D", path, "more than 2 dimensions", (const char *)NULL);
    path = write_npy("zero_d.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (), }",
                     zeros, 4);
    expect_npy_refused("0-D", path, "0-dimensional", (const char *)NULL);
    path = write_npy("zero_rows.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (0, 3), }", zeros, 0);
    expect_npy_refused("zero rows", path, "is empty", (const char *)NULL);
    path = write_npy("negative.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (-2, 3), }", zeros, 24);
    expect_npy_refused("negative dimension", path, "malformed 'shape'", (const char *)NULL);
    path = write_npy("long_row.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 2147483648), }",
                     zeros, 0);
    expect_npy_refused("row longer than 2^31 - 1", path, "is too long", (const char *)NULL);

    /* Element count past 2^64; element count fits but bytes do not; a
     * dimension past 2^63. */
    path = write_npy("count_overflow.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, "
                     "'shape': (4611686018427387904, 8), }", zeros, 8);
    expect_npy_refused("element count overflows", path, "does not fit in 64 bits",
                       (const char *)NULL);
    path = write_npy("bytes_overflow.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, "
                     "'shape': (2305843009213693952, 4), }", zeros, 8);
    expect_npy_refused("byte count overflows", path, "does not fit in 64 bits",
                       (const char *)NULL);
    path = write_npy("dimension_overflow.npy", 1,
                     "{'descr': '<f4', 'fortran_order': False, "
                     "'shape': (99999999999999999999, 4), }", zeros, 8);
    expect_npy_refused("dimension past 2^63", path, "too large", (const char *)NULL);

    snprintf(expected, sizeof expected, "%s/absent.npy", directory);
    expect_npy_refused("missing file", expected, "cannot open", "absent.npy",
                       "No such file or directory", (const char *)NULL);
    expect_npy_refused("a directory", directory, "cannot read", "Is a directory",
                       (const char *)NULL);
}

/* The same checks on input of unknown size: the file is fed through a FIFO
 * by a child process. */
static void expect_fifo(const char *what, const char *source, int expect_ok, const char *fragment)
{
    char fifo[128], error[512] = "";
    cli_npy_array array;
    pid_t child;
    int status, child_status = 0;
    snprintf(fifo, sizeof fifo, "%s/fifo", directory);
    if (mkfifo(fifo, 0600) != 0) {
        printf("FAIL: mkfifo %s\n", fifo);
        ++failures;
        return;
    }
    child = fork();
    if (child == 0) {
        FILE *in = fopen(source, "rb"), *out = fopen(fifo, "wb");
        char buffer[4096];
        size_t length;
        if (!in || !out)
            _exit(1);
        while ((length = fread(buffer, 1, sizeof buffer, in)) > 0)
            if (fwrite(buffer, 1, length, out) != length)
                _exit(0); /* the reader stopped early: its answer is what counts */
        fclose(out);
        _exit(0);
    }
    status = cli_npy_read(fifo, &array, error, sizeof error);
    waitpid(child, &child_status, 0);
    unlink(fifo);
    EXPECT(expect_ok ? status == 0 : status == -1 && array.data == NULL,
           "%s through a FIFO: status %d (%s)", what, status, error);
    if (fragment)
        EXPECT(strstr(error, fragment) != NULL, "%s through a FIFO: message '%s' lacks '%s'", what,
               error, fragment);
    if (status == 0)
        cli_npy_free(&array);
}

static void test_npy_unsized(void)
{
    char path[128];
    snprintf(path, sizeof path, "%s/good_2d.npy", directory);
    expect_fifo("good_2d", path, 1, NULL);
    snprintf(path, sizeof path, "%s/huge_shape.npy", directory);
    expect_fifo("huge shape", path, 0,
                "needs 40000000000 bytes of data after the 128-byte header, it has 40");
    snprintf(path, sizeof path, "%s/long_data.npy", directory);
    expect_fifo("4 bytes too many", path, 0, "has bytes after the 24 bytes of data");
}

/* ---- sample with logit processing ------------------------------------------ */

enum { PROCESSING_ROWS = 3, PROCESSING_VOCAB = 70, PROCESSING_WORDS = 3, PROCESSING_SAMPLES = 6 };

/* What the files below hold, in the library's layout, written out by hand:
 * '*' lines become one entry of every row at their place in the file. */
static const int64_t expected_bias_offsets[] = {0, 3, 5, 7};
static const int32_t expected_bias_tokens[] = {10, 20, 10, 20, 65, 20, 68};
static const float expected_bias_values[] = {2.5f, -1.25f, 5.0f, -1.25f, 4.0f, -1.25f, -3.0f};
static const int64_t expected_history_offsets[] = {0, 5, 8, 11};
static const int32_t expected_history_tokens[] = {10, 11, 11, 12, 30, 65, 65, 30, 30, 40, 41};
static const int64_t expected_prompt_offsets[] = {0, 1, 3, 3};
static const int32_t expected_prompt_tokens[] = {13, 66, 67};

static const char bias_text[] = "# token bias\n"
                                "0 10 2.5\n"
                                "* 20 -1.25   # every row\n"
                                "1 65 4\n"
                                "\n"
                                "0 10 0.5e1\n"
                                "2\t68 -3\r\n";
static const char history_text[] = "0 10 11 11 12\n"
                                   "1 65 65\n"
                                   "* 30\n"
                                   "2 40 41";
static const char prompt_text[] = "\t1 66 67\n"
                                  "0 13\n";

/* Row 0 allows tokens i % 3 != 0; row 1 all but 0-31; row 2 all but 3 (a
 * NaN logit: the row stays bad, since a mask never hides a broken row) and
 * 69. */
static int mask_allows(int64_t row, int64_t token)
{
    if (row == 0)
        return token % 3 != 0;
    if (row == 1)
        return token >= 32;
    return token != 3 && token != 69;
}

static float processing_logits[PROCESSING_ROWS * PROCESSING_VOCAB];
static uint32_t processing_mask[PROCESSING_ROWS * PROCESSING_WORDS];

static void write_processing_files(void)
{
    unsigned char bools[PROCESSING_ROWS * PROCESSING_VOCAB];
    int64_t row, token;
    cli_fill_normal(processing_logits, PROCESSING_ROWS * PROCESSING_VOCAB, 2.0f, 11);
    processing_logits[2 * PROCESSING_VOCAB + 3] = NAN;
    memset(processing_mask, 0, sizeof processing_mask);
    for (row = 0; row < PROCESSING_ROWS; ++row)
        for (token = 0; token < PROCESSING_VOCAB; ++token) {
            bools[row * PROCESSING_VOCAB + token] = (unsigned char)mask_allows(row, token);
            if (mask_allows(row, token))
                processing_mask[row * PROCESSING_WORDS + token / 32] |= 1u << (token % 32);
        }
    write_npy("processing_logits.npy", 1,
              "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 70), }", processing_logits,
              sizeof processing_logits);
    write_npy("mask_words.npy", 1, "{'descr': '<u4', 'fortran_order': False, 'shape': (3, 3), }",
              processing_mask, sizeof processing_mask);
    write_npy("mask_bools.npy", 1, "{'descr': '|b1', 'fortran_order': False, 'shape': (3, 70), }",
              bools, sizeof bools);
    write_raw("bias.txt", bias_text, strlen(bias_text));
    write_raw("history.txt", history_text, strlen(history_text));
    write_raw("prompt.txt", prompt_text, strlen(prompt_text));
}

/* The readers give exactly the lists above. */
static void test_processing_readers(void)
{
    char path[128], error[512] = "";
    cli_row_lists lists;
    uint32_t *words = NULL;
    int64_t words_per_row = 0;
    const char *const masks[] = {"mask_words.npy", "mask_bools.npy"};
    size_t i;

    snprintf(path, sizeof path, "%s/bias.txt", directory);
    EXPECT(cli_read_bias_lists(path, PROCESSING_ROWS, PROCESSING_VOCAB, &lists, error,
                               sizeof error) == 0, "bias.txt: %s", error);
    EXPECT(lists.offsets && lists.values && lists.entries == 7 &&
               !memcmp(lists.offsets, expected_bias_offsets, sizeof expected_bias_offsets) &&
               !memcmp(lists.tokens, expected_bias_tokens, sizeof expected_bias_tokens) &&
               !memcmp(lists.values, expected_bias_values, sizeof expected_bias_values),
           "bias.txt: %lld entries, or other offsets, tokens or values than written",
           (long long)lists.entries);
    cli_row_lists_free(&lists);

    snprintf(path, sizeof path, "%s/history.txt", directory);
    EXPECT(cli_read_token_lists(path, PROCESSING_ROWS, PROCESSING_VOCAB, &lists, error,
                                sizeof error) == 0, "history.txt: %s", error);
    EXPECT(lists.offsets && !lists.values && lists.entries == 11 &&
               !memcmp(lists.offsets, expected_history_offsets,
                       sizeof expected_history_offsets) &&
               !memcmp(lists.tokens, expected_history_tokens, sizeof expected_history_tokens),
           "history.txt: %lld entries, or other offsets or tokens than written",
           (long long)lists.entries);
    cli_row_lists_free(&lists);

    snprintf(path, sizeof path, "%s/prompt.txt", directory);
    EXPECT(cli_read_token_lists(path, PROCESSING_ROWS, PROCESSING_VOCAB, &lists, error,
                                sizeof error) == 0, "prompt.txt: %s", error);
    EXPECT(lists.offsets && lists.entries == 3 &&
               !memcmp(lists.offsets, expected_prompt_offsets, sizeof expected_prompt_offsets) &&
               !memcmp(lists.tokens, expected_prompt_tokens, sizeof expected_prompt_tokens),
           "prompt.txt: %lld entries, or other offsets or tokens than written",
           (long long)lists.entries);
    cli_row_lists_free(&lists);

    for (i = 0; i < 2; ++i) {
        snprintf(path, sizeof path, "%s/%s", directory, masks[i]);
        EXPECT(cli_read_allowed_mask(path, PROCESSING_ROWS, PROCESSING_VOCAB, &words,
                                     &words_per_row, error, sizeof error) == 0,
               "%s: %s", masks[i], error);
        EXPECT(words && words_per_row == PROCESSING_WORDS &&
                   !memcmp(words, processing_mask, sizeof processing_mask),
               "%s: %lld words a row, or other bits than written", masks[i],
               (long long)words_per_row);
        free(words);
        words = NULL;
    }
}

/* text with each "@" replaced by the temporary directory, into out. */
static void expand_directory(const char *text, char *out, size_t size)
{
    size_t used = 0;
    const char *at;
    out[0] = '\0';
    for (at = text; *at && used + sizeof directory < size; ++at)
        used += (size_t)snprintf(out + used, size - used, "%s",
                                 *at == '@' ? directory : (char[2]){*at, '\0'});
}

/* Runs `polysample sample` on a command line whose words are separated by
 * spaces, with "@" standing for the temporary directory. */
static void run_sample(captured *result, const char *line)
{
    static char expanded[2048], buffer[2048];
    char *words[40];
    expand_directory(line, expanded, sizeof expanded);
    capture(result, cli_sample, NULL, split_words(expanded, buffer, sizeof buffer, words, 40),
            words);
}

/* Reads sample's text output: rows lines of samples tokens, a tab and
 * samples logprobs. 0 when it has exactly that shape. */
static int parse_sample_output(const char *text, int32_t *tokens, float *logprobs)
{
    const char *cursor = text;
    char *end;
    int row, sample;
    for (row = 0; row < PROCESSING_ROWS; ++row) {
        for (sample = 0; sample < PROCESSING_SAMPLES; ++sample) {
            long value = strtol(cursor, &end, 10);
            if (end == cursor)
                return -1;
            tokens[row * PROCESSING_SAMPLES + sample] = (int32_t)value;
            cursor = end;
        }
        if (*cursor++ != '\t')
            return -1;
        for (sample = 0; sample < PROCESSING_SAMPLES; ++sample) {
            logprobs[row * PROCESSING_SAMPLES + sample] = strtof(cursor, &end);
            if (end == cursor)
                return -1;
            cursor = end;
        }
        if (*cursor++ != '\n')
            return -1;
    }
    return *cursor == '\0' ? 0 : -1;
}

static void library_sample(const psm_logit_processing *processing, int32_t *tokens,
                           float *logprobs)
{
    psm_context_options options;
    psm_context *context = NULL;
    psm_params params;
    psm_tensor logits = {processing_logits, PSM_DTYPE_F32, PSM_MEMORY_HOST, PROCESSING_ROWS,
                         PROCESSING_VOCAB, 0};
    psm_output token_output = {tokens, PSM_MEMORY_HOST}, logprob_output = {logprobs,
                                                                           PSM_MEMORY_HOST};
    psm_status status;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    psm_params_init(&params);
    params.seed = 7;
    params.num_samples = PROCESSING_SAMPLES;
    params.processing = processing;
    status = psm_context_create(&options, &context);
    if (status == PSM_OK)
        status = psm_sample(context, &logits, &params, token_output, logprob_output);
    if (status == PSM_OK)
        status = psm_synchronize(context);
    EXPECT(status == PSM_OK, "the library call failed: %s", psm_last_error());
    psm_context_destroy(context);
}

/* `sample` with every kind of processing gives exactly the library's tokens
 * and logprobs for the same lists, given by hand; the bool and the word mask
 * give the same output; and the processing changes the tokens. */
static void test_sample_processing(void)
{
    static const char options[] =
        "--backend cpu --seed 7 --num-samples 6 --logprobs --logit-bias @/bias.txt "
        "--history @/history.txt --prompt @/prompt.txt --repetition-penalty 1.5 "
        "--frequency-penalty 0.25 --presence-penalty 0.5 --allowed-mask";
    int32_t cli_tokens[PROCESSING_ROWS * PROCESSING_SAMPLES],
        library_tokens[PROCESSING_ROWS * PROCESSING_SAMPLES],
        plain_tokens[PROCESSING_ROWS * PROCESSING_SAMPLES];
    float cli_logprobs[PROCESSING_ROWS * PROCESSING_SAMPLES],
        library_logprobs[PROCESSING_ROWS * PROCESSING_SAMPLES],
        plain_logprobs[PROCESSING_ROWS * PROCESSING_SAMPLES];
    psm_logit_processing processing;
    captured words_run, bools_run;
    char line[512];
    int i, differ = 0;

    snprintf(line, sizeof line, "%s @/mask_words.npy @/processing_logits.npy", options);
    run_sample(&words_run, line);
    snprintf(line, sizeof line, "%s @/mask_bools.npy @/processing_logits.npy", options);
    run_sample(&bools_run, line);
    EXPECT(words_run.status == CLI_EXIT_OK && words_run.err[0] == '\0',
           "sample with processing: status %d, stderr '%s'", words_run.status, words_run.err);
    EXPECT(!strcmp(words_run.out, bools_run.out) && bools_run.status == CLI_EXIT_OK,
           "the word mask printed '%s', the bool mask (status %d) '%s'", words_run.out,
           bools_run.status, bools_run.out);
    if (parse_sample_output(words_run.out, cli_tokens, cli_logprobs) != 0) {
        EXPECT(0, "sample with processing printed '%s'; expected %d rows of %d tokens and "
                  "logprobs", words_run.out, PROCESSING_ROWS, PROCESSING_SAMPLES);
        return;
    }

    psm_logit_processing_init(&processing);
    processing.allowed_mask = processing_mask;
    processing.bias_offsets = expected_bias_offsets;
    processing.bias_tokens = expected_bias_tokens;
    processing.bias_values = expected_bias_values;
    processing.history_offsets = expected_history_offsets;
    processing.history_tokens = expected_history_tokens;
    processing.prompt_offsets = expected_prompt_offsets;
    processing.prompt_tokens = expected_prompt_tokens;
    processing.repetition_penalty = 1.5f;
    processing.frequency_penalty = 0.25f;
    processing.presence_penalty = 0.5f;
    library_sample(&processing, library_tokens, library_logprobs);
    library_sample(NULL, plain_tokens, plain_logprobs);
    for (i = 0; i < PROCESSING_ROWS * PROCESSING_SAMPLES; ++i) {
        int row = i / PROCESSING_SAMPLES;
        EXPECT(cli_tokens[i] == library_tokens[i] &&
                   (cli_logprobs[i] == library_logprobs[i] ||
                    (isnan(cli_logprobs[i]) && isnan(library_logprobs[i]))),
               "row %d sample %d: sample printed token %d logprob %.9g; the library gives %d, "
               "%.9g", row, i % PROCESSING_SAMPLES, cli_tokens[i], (double)cli_logprobs[i],
               library_tokens[i], (double)library_logprobs[i]);
        if (row == 2) {
            EXPECT(cli_tokens[i] == -1, "row 2 (a masked NaN): token %d, expected -1",
                   cli_tokens[i]);
            continue;
        }
        EXPECT(cli_tokens[i] >= 0 && mask_allows(row, cli_tokens[i]),
               "row %d: token %d, which the mask does not allow", row, cli_tokens[i]);
        differ |= cli_tokens[i] != plain_tokens[i];
    }
    EXPECT(differ, "the processing changed no token: the comparison shows nothing");
}

/* A bad processing file: exit 2, nothing on stdout, and a message naming
 * the file (and line) and the problem. */
static void test_sample_processing_refusals(void)
{
    static const unsigned char bools_with_two[PROCESSING_ROWS * PROCESSING_VOCAB] = {[75] = 2};
    static const unsigned char zeros[PROCESSING_ROWS * PROCESSING_VOCAB] = {0};
    static const struct {
        const char *name, *text, *option, *message;
    } texts[] = {
        {"bias_words.txt", "0 1 2\n0 1\n", "--logit-bias",
         "bias_words.txt:2: expected ROW TOKEN VALUE; found only 2 words"},
        {"bias_extra.txt", "0 1 2 3\n", "--logit-bias",
         "bias_extra.txt:1: expected ROW TOKEN VALUE; found more than 3 words"},
        {"bias_nan.txt", "0 1 nan\n", "--logit-bias", "bias_nan.txt:1: bad value 'nan'"},
        {"bias_huge.txt", "0 1 1e39\n", "--logit-bias",
         "bias_huge.txt:1: bad value '1e39': out of float range"},
        {"bias_row.txt", "3 1 1\n", "--logit-bias",
         "bias_row.txt:1: row 3 is out of range: the logits have 3 rows (0 to 2)"},
        {"history_token.txt", "# c\n\n0 70\n", "--history",
         "history_token.txt:3: token 70 is out of range: a row has 70 tokens (0 to 69)"},
        {"history_sign.txt", "0 -1\n", "--history", "history_sign.txt:1: bad token '-1'"},
        {"prompt_row.txt", "-1 2\n", "--prompt", "prompt_row.txt:1: bad row '-1'"},
        {"prompt_empty_row.txt", "1 3\n2 # nothing\n", "--prompt",
         "prompt_empty_row.txt:2: a row without tokens"},
    };
    static const struct {
        const char *name, *dict;
        const void *data;
        size_t bytes;
        const char *message;
    } masks[] = {
        {"mask_short_words.npy", "{'descr': '<u4', 'fortran_order': False, 'shape': (3, 2), }",
         zeros, 24, "has 2 uint32 words a row; a row of 70 tokens needs at least 3"},
        {"mask_short_bools.npy", "{'descr': '|b1', 'fortran_order': False, 'shape': (3, 69), }",
         zeros, 207, "has 69 bools a row; the logits have 70 tokens a row"},
        {"mask_rows.npy", "{'descr': '|b1', 'fortran_order': False, 'shape': (2, 70), }",
         zeros, 140, "has 2 mask rows; the logits have 3"},
        {"mask_two.npy", "{'descr': '|b1', 'fortran_order': False, 'shape': (3, 70), }",
         bools_with_two, sizeof bools_with_two,
         "row 1, token 5 holds byte 2, which is not a bool (0 or 1)"},
        {"mask_float.npy", "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 3), }",
         zeros, 36, "dtype '<f4' is not supported (use uint32 '<u4' or bool '|b1')"},
        {"mask_truncated.npy", "{'descr': '<u4', 'fortran_order': False, 'shape': (3, 3), }",
         zeros, 20, "is truncated"},
    };
    static const struct {
        const char *line, *message;
    } others[] = {
        {"--backend cpu --history @/missing.txt @/processing_logits.npy",
         "cannot open '@/missing.txt': No such file or directory"},
        {"--backend cpu --history @/history.txt --repetition-penalty 0 "
         "@/processing_logits.npy",
         "repetition_penalty is 0; expected 1e-3 .. 1e3"},
        {"--backend cpu --prompt @/prompt.txt --frequency-penalty 1 @/processing_logits.npy",
         "--frequency-penalty needs --history"},
    };
    char line[512], message[256];
    captured result;
    size_t i, length;
    const char *nul_text = "0 1\0 2\n";

    for (i = 0; i < sizeof texts / sizeof texts[0]; ++i) {
        write_raw(texts[i].name, texts[i].text, strlen(texts[i].text));
        snprintf(line, sizeof line, "--backend cpu %s @/%s @/processing_logits.npy",
                 texts[i].option, texts[i].name);
        run_sample(&result, line);
        EXPECT(result.status == CLI_EXIT_USAGE && result.out[0] == '\0' &&
                   strstr(result.err, texts[i].message),
               "%s: status %d, stdout '%s', stderr '%s'; expected exit %d saying '%s'",
               texts[i].name, result.status, result.out, result.err, CLI_EXIT_USAGE,
               texts[i].message);
    }
    write_raw("history_nul.txt", nul_text, 7);
    run_sample(&result, "--backend cpu --history @/history_nul.txt @/processing_logits.npy");
    EXPECT(result.status == CLI_EXIT_USAGE && strstr(result.err, "history_nul.txt:1: a NUL byte"),
           "history_nul.txt: status %d, stderr '%s'", result.status, result.err);
    for (i = 0; i < sizeof masks / sizeof masks[0]; ++i) {
        write_npy(masks[i].name, 1, masks[i].dict, masks[i].data, masks[i].bytes);
        snprintf(line, sizeof line, "--backend cpu --allowed-mask @/%s @/processing_logits.npy",
                 masks[i].name);
        run_sample(&result, line);
        EXPECT(result.status == CLI_EXIT_USAGE && result.out[0] == '\0' &&
                   strstr(result.err, masks[i].name) && strstr(result.err, masks[i].message),
               "%s: status %d, stdout '%s', stderr '%s'; expected exit %d saying '%s'",
               masks[i].name, result.status, result.out, result.err, CLI_EXIT_USAGE,
               masks[i].message);
    }
    for (i = 0; i < sizeof others / sizeof others[0]; ++i) {
        const char *at = strchr(others[i].message, '@');
        if (at) { /* the message names the path as given */
            length = (size_t)(at - others[i].message);
            snprintf(message, sizeof message, "%.*s%s%s", (int)length, others[i].message,
                     directory, at + 1);
        } else {
            snprintf(message, sizeof message, "%s", others[i].message);
        }
        run_sample(&result, others[i].line);
        EXPECT(result.status == CLI_EXIT_USAGE && result.out[0] == '\0' &&
                   strstr(result.err, message),
               "sample %s: status %d, stdout '%s', stderr '%s'; expected exit %d saying '%s'",
               others[i].line, result.status, result.out, result.err, CLI_EXIT_USAGE, message);
    }
}

static void remove_directory(void)
{
    static const char *const names[] = {
        "good_2d.npy", "good_1d.npy", "fortran_one_row.npy", "big_endian_f16_v2.npy",
        "huge_shape.npy", "short_data.npy", "no_data.npy", "long_data.npy", "bad_magic.npy",
        "text.npy", "short.npy", "empty.npy", "version9.npy", "short_header.npy", "int32.npy",
        "float64.npy", "no_descr.npy", "fortran.npy", "no_fortran.npy", "three_d.npy",
        "zero_d.npy", "zero_rows.npy", "negative.npy", "long_row.npy", "count_overflow.npy",
        "bytes_overflow.npy", "dimension_overflow.npy", "processing_logits.npy",
        "mask_words.npy", "mask_bools.npy", "bias.txt", "history.txt", "prompt.txt",
        "bias_words.txt", "bias_extra.txt", "bias_nan.txt", "bias_huge.txt", "bias_row.txt",
        "history_token.txt", "history_sign.txt", "prompt_row.txt", "prompt_empty_row.txt",
        "history_nul.txt", "mask_short_words.npy", "mask_short_bools.npy", "mask_rows.npy",
        "mask_two.npy", "mask_float.npy", "mask_truncated.npy", "top_logits.npy", "orders.npy",
        "verify_target.npy", "verify_chain_tokens.npy", "verify_chain_logits.npy",
        "verify_chain_probs.npy", "verify_tree_tokens.npy", "verify_tree_logits.npy",
        "verify_tree_probs.npy", "verify_tree_parents.npy", "verify_greedy_tokens.npy",
        "verify_bad_tokens.npy", "verify_bad_parents.npy", "verify_short_parents.npy",
        "verify_two_requests.npy", "verify_wide_tokens.npy", "verify_float_tokens.npy",
        "verify_narrow_logits.npy", "verify_short_probs.npy", "verify_big_probs.npy",
        "verify_zero_probs.npy"};
    char path[128];
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; ++i) {
        snprintf(path, sizeof path, "%s/%s", directory, names[i]);
        unlink(path);
    }
    rmdir(directory);
}

/* `sample --top-logprobs N` (and --raw-logprobs) prints exactly the
 * library's top-N tokens, logprobs and ranks, in the text layout its help
 * describes: tokens, a tab, TOKEN:LOGPROB pairs, a tab, the ranks. */
/* The tokens psm_sample draws on a CPU context, to compare with what the
 * sample command printed. */
static void library_tokens(const psm_tensor *logits, const psm_params *params, int32_t *tokens)
{
    psm_context_options options;
    psm_context *context = NULL;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    psm_status status = psm_context_create(&options, &context);
    if (status == PSM_OK)
        status = psm_sample(context, logits, params, (psm_output){tokens, PSM_MEMORY_HOST},
                            (psm_output){NULL, PSM_MEMORY_HOST});
    psm_context_destroy(context);
    EXPECT(status == PSM_OK, "the library call failed: %s", psm_last_error());
}

static void test_sample_top_logprobs(void)
{
    enum { N = 3, SAMPLES = 4 };
    for (int raw = 0; raw < 2; ++raw) {
        char line[256];
        captured run;
        snprintf(line, sizeof line,
                 "--backend cpu --seed 5 --num-samples 4 --temperature 0.7 --top-k 9 "
                 "--top-logprobs 3%s @/top_logits.npy",
                 raw ? " --raw-logprobs" : "");
        run_sample(&run, line);
        EXPECT(run.status == CLI_EXIT_OK, "sample --top-logprobs: status %d, '%s'", run.status,
               run.err);

        psm_params params;
        psm_params_init(&params);
        params.seed = 5;
        params.num_samples = SAMPLES;
        params.temperature = 0.7f;
        params.top_k = 9;
        int32_t tokens[2 * SAMPLES], top_tokens[2 * N], ranks[2 * SAMPLES];
        float top_logprobs[2 * N];
        psm_top_logprobs top = {N, raw ? PSM_LOGPROBS_RAW : PSM_LOGPROBS_PROCESSED,
                                {top_tokens, PSM_MEMORY_HOST}, {top_logprobs, PSM_MEMORY_HOST},
                                {ranks, PSM_MEMORY_HOST}};
        params.top_logprobs = &top;
        psm_tensor logits = {processing_logits, PSM_DTYPE_F32, PSM_MEMORY_HOST, 2,
                             PROCESSING_VOCAB, 0};
        library_tokens(&logits, &params, tokens);

        char expected[1024];
        size_t used = 0;
        for (int row = 0; row < 2; ++row) {
            for (int j = 0; j < SAMPLES; ++j)
                used += (size_t)snprintf(expected + used, sizeof expected - used, "%s%d",
                                         j ? " " : "", tokens[row * SAMPLES + j]);
            for (int e = 0; e < N; ++e)
                used += (size_t)snprintf(expected + used, sizeof expected - used, "%s%d:%.9g",
                                         e ? " " : "\t", top_tokens[row * N + e],
                                         (double)top_logprobs[row * N + e]);
            for (int j = 0; j < SAMPLES; ++j)
                used += (size_t)snprintf(expected + used, sizeof expected - used, "%s%d",
                                         j ? " " : "\t", ranks[row * SAMPLES + j]);
            used += (size_t)snprintf(expected + used, sizeof expected - used, "\n");
        }
        EXPECT(!strcmp(run.out, expected), "sample --top-logprobs%s printed\n%s\nexpected\n%s",
               raw ? " --raw-logprobs" : "", run.out, expected);
    }
    captured refused;
    run_sample(&refused, "--raw-logprobs @/top_logits.npy");
    EXPECT(refused.status == CLI_EXIT_USAGE &&
               strstr(refused.err, "--raw-logprobs needs --top-logprobs N") != NULL,
           "--raw-logprobs alone: status %d, '%s'", refused.status, refused.err);
    run_sample(&refused, "--top-logprobs 65 @/top_logits.npy");
    EXPECT(refused.status == CLI_EXIT_USAGE, "--top-logprobs 65: status %d", refused.status);
}

/* sample --filter-order NAME prints the library's tokens in that order
 * (on a row where every order keeps a different set; see
 * tests/test_filter_orders.c), and an unknown name is a usage error. */
static void test_sample_filter_order(void)
{
    static const float row[12] = {0.5f, 1, 0.5f, 2.5f, 0, 4, -1, 1, 0, -1, 0.5f, 1};
    static const char *const names[PSM_FILTER_ORDER_COUNT] = {
        "polysample", "vllm", "sglang", "llama.cpp", "flashinfer-top-k-first",
        "flashinfer-joint"};
    enum { SAMPLES = 16 };
    write_npy("orders.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (1, 12), }",
              row, sizeof row);
    for (int32_t order = 0; order < PSM_FILTER_ORDER_COUNT; ++order) {
        char line[256];
        captured run;
        snprintf(line, sizeof line,
                 "--backend cpu --seed 3 --num-samples 16 --temperature 3 --top-k 6 --top-p 0.6 "
                 "--min-p 0.02 --filter-order %s @/orders.npy",
                 names[order]);
        run_sample(&run, line);
        EXPECT(run.status == CLI_EXIT_OK, "sample --filter-order %s: status %d, '%s'",
               names[order], run.status, run.err);

        psm_params params;
        psm_params_init(&params);
        params.seed = 3;
        params.num_samples = SAMPLES;
        params.temperature = 3.0f;
        params.top_k = 6;
        params.top_p = 0.6f;
        params.min_p = 0.02f;
        params.filter_order = order;
        int32_t tokens[SAMPLES];
        psm_tensor logits = {(void *)row, PSM_DTYPE_F32, PSM_MEMORY_HOST, 1, 12, 0};
        library_tokens(&logits, &params, tokens);
        char expected[256];
        size_t used = 0;
        for (int j = 0; j < SAMPLES; ++j)
            used += (size_t)snprintf(expected + used, sizeof expected - used, "%s%d",
                                     j ? " " : "", tokens[j]);
        snprintf(expected + used, sizeof expected - used, "\n");
        EXPECT(!strcmp(run.out, expected), "sample --filter-order %s printed\n%s\nexpected\n%s",
               names[order], run.out, expected);
    }
    captured refused;
    run_sample(&refused, "--filter-order vllm2 @/orders.npy");
    EXPECT(refused.status == CLI_EXIT_USAGE &&
               strstr(refused.err, "--filter-order vllm2: expected polysample, vllm") != NULL,
           "--filter-order vllm2: status %d, '%s'", refused.status, refused.err);
}

/* ---- sample --verify ------------------------------------------------------ */

enum { VERIFY_REQUESTS = 4, VERIFY_K = 3, VERIFY_VOCAB = 40, VERIFY_POSITIONS = VERIFY_K + 1 };
enum { VERIFY_ONE_HOT, VERIFY_LOGITS, VERIFY_PROBS };

/* The tree case's layout: nodes 1 and 2 are the root's children, node 3 is
 * node 1's; the chain's parent of node i is i - 1. */
static const int32_t verify_tree_parents[VERIFY_K] = {0, 0, 1};

/* Inputs of one layout (chain or tree): node i's draft logits are a noisy
 * copy of the target row of its parent, its probabilities their softmax,
 * and its token their argmax, which every draft filter keeps. */
typedef struct verify_layout {
    const char *name;
    int32_t parents[VERIFY_REQUESTS * VERIFY_K];
    int32_t tokens[VERIFY_REQUESTS * VERIFY_K];
    float logits[VERIFY_REQUESTS * VERIFY_K * VERIFY_VOCAB];
    float probs[VERIFY_REQUESTS * VERIFY_K * VERIFY_VOCAB];
} verify_layout;

/* The target: request 3 has a NaN in its node-2 row (a bad request). */
static float verify_target[VERIFY_REQUESTS * VERIFY_POSITIONS * VERIFY_VOCAB];
static verify_layout verify_layouts[2] = {{.name = "chain"}, {.name = "tree"}};

static int32_t argmax_of(const float *row, int64_t count)
{
    int32_t best = 0;
    for (int32_t i = 1; i < count; ++i)
        if (row[i] > row[best])
            best = i;
    return best;
}

static const char *write_int32_npy(const char *name, const int32_t *values, int rows, int columns)
{
    char dict[128];
    snprintf(dict, sizeof dict, "{'descr': '<i4', 'fortran_order': False, 'shape': (%d, %d), }",
             rows, columns);
    return write_npy(name, 1, dict, values, (size_t)rows * (size_t)columns * sizeof *values);
}

static const char *write_float_npy(const char *name, const float *values, int rows, int columns)
{
    char dict[128];
    snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%d, %d), }",
             rows, columns);
    return write_npy(name, 1, dict, values, (size_t)rows * (size_t)columns * sizeof *values);
}

static void write_verify_files(void)
{
    enum { DRAFT_ROWS = VERIFY_REQUESTS * VERIFY_K };
    float noise[DRAFT_ROWS * VERIFY_VOCAB];
    char name[64];
    cli_fill_normal(verify_target, sizeof verify_target / sizeof *verify_target, 2.0f, 41);
    verify_target[(3 * VERIFY_POSITIONS + 2) * VERIFY_VOCAB + 5] = NAN;
    write_float_npy("verify_target.npy", verify_target, VERIFY_REQUESTS * VERIFY_POSITIONS,
                    VERIFY_VOCAB);
    cli_fill_normal(noise, DRAFT_ROWS * VERIFY_VOCAB, 0.8f, 42);
    for (int tree = 0; tree < 2; ++tree) {
        verify_layout *layout = &verify_layouts[tree];
        for (int64_t at = 0; at < DRAFT_ROWS; ++at) {
            const int64_t r = at / VERIFY_K, node = at % VERIFY_K + 1;
            const int32_t parent = tree ? verify_tree_parents[node - 1] : (int32_t)node - 1;
            const float *target_row = verify_target + (r * VERIFY_POSITIONS + parent) * VERIFY_VOCAB;
            float *logits = layout->logits + at * VERIFY_VOCAB, *probs = layout->probs + at * VERIFY_VOCAB;
            double total = 0.0;
            for (int i = 0; i < VERIFY_VOCAB; ++i) {
                /* The NaN row's draft stays finite: a draft row must be good. */
                logits[i] = (isnan(target_row[i]) ? 0.0f : target_row[i]) +
                            noise[at * VERIFY_VOCAB + i];
                total += exp((double)logits[i]);
            }
            for (int i = 0; i < VERIFY_VOCAB; ++i)
                probs[i] = (float)(exp((double)logits[i]) / total);
            layout->parents[at] = parent;
            layout->tokens[at] = argmax_of(logits, VERIFY_VOCAB);
        }
        snprintf(name, sizeof name, "verify_%s_tokens.npy", layout->name);
        write_int32_npy(name, layout->tokens, VERIFY_REQUESTS, VERIFY_K);
        snprintf(name, sizeof name, "verify_%s_logits.npy", layout->name);
        write_float_npy(name, layout->logits, DRAFT_ROWS, VERIFY_VOCAB);
        snprintf(name, sizeof name, "verify_%s_probs.npy", layout->name);
        write_float_npy(name, layout->probs, DRAFT_ROWS, VERIFY_VOCAB);
    }
    write_int32_npy("verify_tree_parents.npy", verify_layouts[1].parents, VERIFY_REQUESTS,
                    VERIFY_K);
}

/* What psm_verify writes for the comparison (with logprobs). */
typedef struct verify_outputs {
    int32_t accepted[VERIFY_REQUESTS];
    int32_t tokens[VERIFY_REQUESTS * VERIFY_POSITIONS];
    int32_t nodes[VERIFY_REQUESTS * VERIFY_POSITIONS];
    float logprobs[VERIFY_REQUESTS * VERIFY_POSITIONS];
} verify_outputs;

/* Reads sample --verify's text output (with --logprobs) into the library's
 * layout: the printed entries of each request, then -1 (NaN) to k + 1, as
 * the library pads. 0 when the text has exactly the documented shape. */
static int parse_verify_output(const char *text, verify_outputs *out)
{
    const char *cursor = text;
    char *end;
    for (int r = 0; r < VERIFY_REQUESTS; ++r) {
        long accepted = strtol(cursor, &end, 10);
        const long count = accepted >= 0 ? accepted + 1 : 1;
        if (end == cursor || count > VERIFY_POSITIONS)
            return -1;
        out->accepted[r] = (int32_t)accepted;
        cursor = end;
        for (int list = 0; list < 3; ++list) {
            if (*cursor++ != '\t')
                return -1;
            for (int e = 0; e < VERIFY_POSITIONS; ++e) {
                const int at = r * VERIFY_POSITIONS + e;
                int32_t *ints = list == 0 ? out->tokens : out->nodes;
                if (e >= count) {
                    if (list == 2)
                        out->logprobs[at] = NAN;
                    else
                        ints[at] = -1;
                    continue;
                }
                if (e && *cursor++ != ' ')
                    return -1;
                if (list == 2)
                    out->logprobs[at] = strtof(cursor, &end);
                else
                    ints[at] = (int32_t)strtol(cursor, &end, 10);
                if (end == cursor)
                    return -1;
                cursor = end;
            }
        }
        if (*cursor++ != '\n')
            return -1;
    }
    return *cursor == '\0' ? 0 : -1;
}

/* One comparison: a layout, a kind of draft distribution, and the target's
 * and draft's parameters. */
typedef struct verify_case {
    int tree, kind;
    float temperature, top_p;
    int32_t top_k;
    uint64_t seed;
    float draft_temperature;
    int32_t draft_top_k;
    int32_t draft_filter_order; /* psm_filter_order; the target's is the default */
    float draft_top_p;
} verify_case;

static void library_verify(const verify_case *c, verify_outputs *out)
{
    const verify_layout *layout = &verify_layouts[c->tree];
    psm_tensor target = {verify_target, PSM_DTYPE_F32, PSM_MEMORY_HOST,
                         VERIFY_REQUESTS * VERIFY_POSITIONS, VERIFY_VOCAB, 0};
    psm_tensor logits = {(void *)layout->logits, PSM_DTYPE_F32, PSM_MEMORY_HOST,
                         VERIFY_REQUESTS * VERIFY_K, VERIFY_VOCAB, 0};
    psm_tensor probs = logits;
    probs.data = (void *)layout->probs;
    psm_params params, draft_params;
    psm_params_init(&params);
    params.temperature = c->temperature;
    params.top_k = c->top_k;
    params.top_p = c->top_p;
    params.seed = c->seed;
    psm_params_init(&draft_params);
    draft_params.temperature = c->draft_temperature;
    draft_params.top_k = c->draft_top_k;
    draft_params.filter_order = c->draft_filter_order;
    draft_params.top_p = c->draft_top_p;
    psm_drafts drafts;
    psm_drafts_init(&drafts);
    drafts.nodes = VERIFY_K;
    drafts.tokens = layout->tokens;
    drafts.parents = c->tree ? layout->parents : NULL;
    if (c->kind == VERIFY_LOGITS) {
        drafts.draft_logits = &logits;
        drafts.draft_params = &draft_params;
    } else if (c->kind == VERIFY_PROBS) {
        drafts.draft_probs = &probs;
    }
    psm_verification outputs = {{out->accepted, PSM_MEMORY_HOST},
                                {out->tokens, PSM_MEMORY_HOST},
                                {out->nodes, PSM_MEMORY_HOST},
                                {out->logprobs, PSM_MEMORY_HOST}};
    psm_context_options options;
    psm_context *context = NULL;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    psm_status status = psm_context_create(&options, &context);
    if (status == PSM_OK)
        status = psm_verify(context, &target, &params, &drafts, &outputs);
    psm_context_destroy(context);
    EXPECT(status == PSM_OK, "psm_verify failed: %s", psm_last_error());
}

/* `sample --verify` prints exactly psm_verify's outputs on the same inputs,
 * for one-hot, probability and logits drafts, as a chain and as a tree,
 * with a bad request among them; and the cases between them accept every
 * draft of some request and reject some, so the comparison covers both. */
static void test_sample_verify(void)
{
    static const verify_case cases[] = {
        {0, VERIFY_ONE_HOT, 1.0f, 1.0f, 0, 11, 1.0f, 0, PSM_FILTER_ORDER_POLYSAMPLE, 1.0f},
        {0, VERIFY_LOGITS, 0.8f, 1.0f, 8, 12, 0.9f, 10, PSM_FILTER_ORDER_POLYSAMPLE, 1.0f},
        {0, VERIFY_PROBS, 1.2f, 0.9f, 0, 13, 1.0f, 0, PSM_FILTER_ORDER_POLYSAMPLE, 1.0f},
        {1, VERIFY_ONE_HOT, 0.7f, 1.0f, 0, 14, 1.0f, 0, PSM_FILTER_ORDER_POLYSAMPLE, 1.0f},
        {1, VERIFY_LOGITS, 1.0f, 1.0f, 0, 15, 1.0f, 0, PSM_FILTER_ORDER_POLYSAMPLE, 1.0f},
        {1, VERIFY_PROBS, 1.0f, 0.95f, 20, 16, 1.0f, 0, PSM_FILTER_ORDER_POLYSAMPLE, 1.0f},
        {0, VERIFY_LOGITS, 0.9f, 1.0f, 0, 17, 1.6f, 0, PSM_FILTER_ORDER_LLAMA_CPP, 0.6f},
    };
    static const char *const kinds[] = {"one-hot", "logits", "probs"};
    int full_paths = 0, rejections = 0;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; ++i) {
        const verify_case *c = &cases[i];
        const char *layout = verify_layouts[c->tree].name;
        char line[768], draft[256] = "";
        if (c->kind == VERIFY_LOGITS)
            snprintf(draft, sizeof draft,
                     " --draft-logits @/verify_%s_logits.npy --draft-temperature %g "
                     "--draft-top-k %d --draft-top-p %g --draft-filter-order %s",
                     layout, (double)c->draft_temperature, (int)c->draft_top_k,
                     (double)c->draft_top_p, cli_filter_order_name(c->draft_filter_order));
        else if (c->kind == VERIFY_PROBS)
            snprintf(draft, sizeof draft, " --draft-probs @/verify_%s_probs.npy", layout);
        snprintf(line, sizeof line,
                 "--backend cpu --verify --logprobs --temperature %g --top-k %d --top-p %g "
                 "--seed %llu --draft-tokens @/verify_%s_tokens.npy%s%s @/verify_target.npy",
                 (double)c->temperature, (int)c->top_k, (double)c->top_p,
                 (unsigned long long)c->seed, layout,
                 c->tree ? " --draft-parents @/verify_tree_parents.npy" : "", draft);
        captured run;
        run_sample(&run, line);
        verify_outputs printed, library;
        if (run.status != CLI_EXIT_OK || parse_verify_output(run.out, &printed) != 0) {
            EXPECT(0, "sample --verify (%s, %s drafts): status %d, stderr '%s', stdout '%s'",
                   layout, kinds[c->kind], run.status, run.err, run.out);
            continue;
        }
        library_verify(c, &library);
        if (c->draft_filter_order != PSM_FILTER_ORDER_POLYSAMPLE) {
            /* The order must change this case's outcome, or the comparison
             * would pass with the option ignored. */
            verify_case default_order = *c;
            verify_outputs unordered;
            default_order.draft_filter_order = PSM_FILTER_ORDER_POLYSAMPLE;
            library_verify(&default_order, &unordered);
            EXPECT(memcmp(unordered.accepted, library.accepted, sizeof library.accepted) ||
                       memcmp(unordered.tokens, library.tokens, sizeof library.tokens),
                   "sample --verify (%s drafts, order %s): the same outcome as the default "
                   "order; the case does not test --draft-filter-order",
                   kinds[c->kind], cli_filter_order_name(c->draft_filter_order));
        }
        EXPECT(!memcmp(printed.accepted, library.accepted, sizeof library.accepted) &&
                   !memcmp(printed.tokens, library.tokens, sizeof library.tokens) &&
                   !memcmp(printed.nodes, library.nodes, sizeof library.nodes),
               "sample --verify (%s, %s drafts) printed\n%sother counts, tokens or nodes than "
               "psm_verify", layout, kinds[c->kind], run.out);
        for (int at = 0; at < VERIFY_REQUESTS * VERIFY_POSITIONS; ++at)
            EXPECT(printed.logprobs[at] == library.logprobs[at] ||
                       (isnan(printed.logprobs[at]) && isnan(library.logprobs[at])),
                   "sample --verify (%s, %s drafts): request %d entry %d: logprob %.9g printed, "
                   "%.9g from psm_verify", layout, kinds[c->kind], at / VERIFY_POSITIONS,
                   at % VERIFY_POSITIONS, (double)printed.logprobs[at],
                   (double)library.logprobs[at]);
        EXPECT(library.accepted[3] == -1, "request 3 has a NaN target row: accepted %d",
               library.accepted[3]);
        for (int r = 0; r < 3; ++r) {
            const int depth = c->tree ? 2 : VERIFY_K;
            full_paths += library.accepted[r] == depth;
            rejections += library.accepted[r] < depth;
        }
    }
    EXPECT(full_paths > 0 && rejections > 0,
           "the cases accepted a whole path %d times and rejected a draft %d times; the "
           "comparison needs both", full_paths, rejections);
}

/* A greedy target and one-hot drafts, checked by hand: a draft token that
 * is its row's argmax is accepted; request 1's second draft is not, so its
 * correction is the argmax of the target row after node 1; the others get
 * the bonus, the argmax after node 3; every logprob is ln 1 = 0; request 3
 * (a NaN row) is bad. Written as JSON. */
static void test_sample_verify_greedy_json(void)
{
    int32_t tokens[VERIFY_REQUESTS * VERIFY_K], argmax[VERIFY_REQUESTS * VERIFY_POSITIONS];
    for (int row = 0; row < VERIFY_REQUESTS * VERIFY_POSITIONS; ++row)
        argmax[row] = argmax_of(verify_target + row * VERIFY_VOCAB, VERIFY_VOCAB);
    for (int r = 0; r < VERIFY_REQUESTS; ++r)
        for (int node = 1; node <= VERIFY_K; ++node)
            tokens[r * VERIFY_K + node - 1] = argmax[r * VERIFY_POSITIONS + node - 1];
    tokens[1 * VERIFY_K + 1] = (argmax[1 * VERIFY_POSITIONS + 1] + 1) % VERIFY_VOCAB;
    write_int32_npy("verify_greedy_tokens.npy", tokens, VERIFY_REQUESTS, VERIFY_K);
    const int32_t *a = argmax;
    char expected[1024];
    snprintf(expected, sizeof expected,
             "{\"accepted\": [3, 1, 3, -1], \"tokens\": [[%d, %d, %d, %d], [%d, %d], "
             "[%d, %d, %d, %d], [-1]], \"path_nodes\": [[0, 1, 2, 3], [0, 1], [0, 1, 2, 3], "
             "[-1]], \"logprobs\": [[0, 0, 0, 0], [0, 0], [0, 0, 0, 0], [null]]}\n",
             a[0], a[1], a[2], a[3], a[4], a[5], a[8], a[9], a[10], a[11]);
    captured run;
    run_sample(&run, "--backend cpu --verify --json --logprobs --temperature 0 "
                     "--draft-tokens @/verify_greedy_tokens.npy @/verify_target.npy");
    EXPECT(run.status == CLI_EXIT_OK && !strcmp(run.out, expected),
           "sample --verify --json (greedy): status %d, stderr '%s', printed\n%sexpected\n%s",
           run.status, run.err, run.out, expected);
}

/* Bad files, shapes and option combinations: the exit status, nothing on
 * stdout, and a message naming the file (or options) and the problem. */
static void test_sample_verify_refusals(void)
{
    enum { ROWS = VERIFY_REQUESTS * VERIFY_K };
    static int32_t wide_tokens[2 * 65], tokens[ROWS], parents[ROWS];
    static float probs[ROWS * VERIFY_VOCAB];
    memcpy(tokens, verify_layouts[0].tokens, sizeof tokens);
    tokens[1 * VERIFY_K + 2] = VERIFY_VOCAB;
    write_int32_npy("verify_bad_tokens.npy", tokens, VERIFY_REQUESTS, VERIFY_K);
    memcpy(parents, verify_layouts[1].parents, sizeof parents);
    parents[1] = 2;
    write_int32_npy("verify_bad_parents.npy", parents, VERIFY_REQUESTS, VERIFY_K);
    write_int32_npy("verify_short_parents.npy", parents, VERIFY_REQUESTS, 2);
    write_int32_npy("verify_two_requests.npy", verify_layouts[0].tokens, 2, VERIFY_K);
    write_int32_npy("verify_wide_tokens.npy", wide_tokens, 1, 65);
    write_float_npy("verify_float_tokens.npy", verify_layouts[0].logits, VERIFY_REQUESTS,
                    VERIFY_K);
    write_float_npy("verify_narrow_logits.npy", verify_layouts[0].logits, ROWS,
                    VERIFY_VOCAB - 1);
    write_float_npy("verify_short_probs.npy", verify_layouts[0].probs, ROWS - 1, VERIFY_VOCAB);
    memcpy(probs, verify_layouts[0].probs, sizeof probs);
    probs[2 * VERIFY_VOCAB + 7] = 1.5f;
    write_float_npy("verify_big_probs.npy", probs, ROWS, VERIFY_VOCAB);
    memcpy(probs, verify_layouts[0].probs, sizeof probs);
    probs[VERIFY_VOCAB + verify_layouts[0].tokens[1]] = 0.0f;
    write_float_npy("verify_zero_probs.npy", probs, ROWS, VERIFY_VOCAB);

    static const struct {
        const char *options, *message;
        int status;
    } refusals[] = {
        {"--draft-tokens @/verify_two_requests.npy",
         "target logits '@/verify_target.npy' have 16 rows; 2 requests of k = 3 drafts "
         "(--draft-tokens '@/verify_two_requests.npy' is 2 x 3) need requests x (k + 1) = 8",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_float_tokens.npy",
         "'@/verify_float_tokens.npy': dtype '<f4' is not supported (use int32 '<i4')",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_wide_tokens.npy",
         "--draft-tokens '@/verify_wide_tokens.npy' has 65 columns, one per draft node; k is at "
         "most 64 (PSM_MAX_DRAFT_NODES)",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_bad_tokens.npy",
         "--draft-tokens '@/verify_bad_tokens.npy': request 1, node 3: token 40 is outside the "
         "target's vocab of 40",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_tree_tokens.npy --draft-parents @/verify_short_parents.npy",
         "--draft-parents '@/verify_short_parents.npy' is 4 x 2; it needs the shape of "
         "--draft-tokens '@/verify_tree_tokens.npy', 4 x 3",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_tree_tokens.npy --draft-parents @/verify_bad_parents.npy",
         "--draft-parents '@/verify_bad_parents.npy': request 0, node 2: parent 2; a node's "
         "parent is an earlier node, 0 (the root) .. 1",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-logits @/verify_narrow_logits.npy",
         "--draft-logits '@/verify_narrow_logits.npy' is 12 x 39; the drafts need requests x k "
         "= 4 x 3 = 12 rows of the target's vocab, 40",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-probs @/verify_short_probs.npy",
         "--draft-probs '@/verify_short_probs.npy' is 11 x 40", CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-probs @/verify_big_probs.npy",
         "psm_verify failed: request 0, draft node 3: draft_probs[7] is 1.5; expected a "
         "probability in [0, 1]",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-probs @/verify_zero_probs.npy",
         "psm_verify failed: request 0, draft node 2: token", CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_missing.npy",
         "cannot open '@/verify_missing.npy': No such file or directory", CLI_EXIT_USAGE},
        {"--check-rows --draft-tokens @/verify_chain_tokens.npy",
         "psm_verify failed: request 3 has a target row with a NaN or +inf logit",
         CLI_EXIT_FAILURE},
        {"--top-p 0 --draft-tokens @/verify_chain_tokens.npy",
         "psm_verify failed: target_params.top_p is 0", CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-logits @/verify_chain_logits.npy "
         "--draft-probs @/verify_chain_probs.npy",
         "--draft-logits and --draft-probs are two forms of the draft's distribution; give one",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-top-k 5",
         "--draft-temperature, --draft-top-k, --draft-top-p, --draft-min-p and "
         "--draft-filter-order shape --draft-logits, which is not given",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-filter-order vllm",
         "--draft-temperature, --draft-top-k, --draft-top-p, --draft-min-p and "
         "--draft-filter-order shape --draft-logits, which is not given",
         CLI_EXIT_USAGE},
        {"--draft-tokens @/verify_chain_tokens.npy --draft-logits @/verify_chain_logits.npy "
         "--draft-filter-order vlm",
         "--draft-filter-order vlm: expected polysample, vllm, sglang, llama.cpp, "
         "flashinfer-top-k-first or flashinfer-joint",
         CLI_EXIT_USAGE},
        {"--num-samples 2 --draft-tokens @/verify_chain_tokens.npy",
         "--verify emits one token per draft node and takes no --num-samples", CLI_EXIT_USAGE},
        {"--top-logprobs 2 --draft-tokens @/verify_chain_tokens.npy",
         "--verify emits one token per draft node and takes no --top-logprobs", CLI_EXIT_USAGE},
        {"--history @/history.txt --draft-tokens @/verify_chain_tokens.npy",
         "takes no logit processing (psm_verify has none yet)", CLI_EXIT_USAGE},
        {"", "--verify needs --draft-tokens FILE (the drafted tokens)", CLI_EXIT_USAGE},
    };
    char line[512], message[512];
    for (size_t i = 0; i < sizeof refusals / sizeof refusals[0]; ++i) {
        captured run;
        snprintf(line, sizeof line, "--backend cpu --verify %s @/verify_target.npy",
                 refusals[i].options);
        run_sample(&run, line);
        expand_directory(refusals[i].message, message, sizeof message);
        EXPECT(run.status == refusals[i].status && run.out[0] == '\0' &&
                   strstr(run.err, message) != NULL,
               "sample %s: status %d, stdout '%s', stderr '%s'; expected exit %d saying '%s'",
               line, run.status, run.out, run.err, refusals[i].status, message);
    }
    /* The drafts' options mean nothing without --verify. */
    static const struct {
        const char *line, *message;
    } without_verify[] = {
        {"--draft-tokens @/verify_chain_tokens.npy @/verify_target.npy",
         "--draft-tokens needs --verify"},
        {"--draft-probs @/verify_chain_probs.npy @/verify_target.npy",
         "--draft-probs needs --verify"},
        {"--draft-temperature 0.5 @/verify_target.npy",
         "--draft-temperature, --draft-top-k, --draft-top-p, --draft-min-p or "
         "--draft-filter-order needs --verify"},
        {"--draft-filter-order sglang @/verify_target.npy",
         "--draft-temperature, --draft-top-k, --draft-top-p, --draft-min-p or "
         "--draft-filter-order needs --verify"},
    };
    for (size_t i = 0; i < sizeof without_verify / sizeof without_verify[0]; ++i) {
        captured run;
        run_sample(&run, without_verify[i].line);
        EXPECT(run.status == CLI_EXIT_USAGE && run.out[0] == '\0' &&
                   strstr(run.err, without_verify[i].message) != NULL,
               "sample %s: status %d, stderr '%s'; expected exit %d saying '%s'",
               without_verify[i].line, run.status, run.err, CLI_EXIT_USAGE,
               without_verify[i].message);
    }
}

int main(void)
{
    const char *temporary = getenv("TMPDIR");
    test_decimal();
    test_float();
    test_backend_device_index();
    test_option_parser();
    test_commands();
    test_language_model_logits();
    test_bench_verify_cases();
    test_bench_sharded();
    test_notice();
    snprintf(directory, sizeof directory, "%s/test_cli.XXXXXX",
             temporary && temporary[0] && strlen(temporary) < 32 ? temporary : "/tmp");
    if (!mkdtemp(directory)) {
        printf("FAIL: cannot make a temporary directory %s\n", directory);
        return EXIT_FAILURE;
    }
    test_npy_well_formed();
    test_npy_malformed();
    test_npy_unsized();
    write_processing_files();
    test_processing_readers();
    test_sample_processing();
    test_sample_processing_refusals();
    write_npy("top_logits.npy", 1, "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 70), }",
              processing_logits, 2 * PROCESSING_VOCAB * sizeof(float));
    test_sample_top_logprobs();
    test_sample_filter_order();
    write_verify_files();
    test_sample_verify();
    test_sample_verify_greedy_json();
    test_sample_verify_refusals();
    remove_directory();
    if (failures) {
        printf("test_cli: %d failure(s)\n", failures);
        return EXIT_FAILURE;
    }
    printf("test_cli: all checks passed\n");
    return EXIT_SUCCESS;
}
