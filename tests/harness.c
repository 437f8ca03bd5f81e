/* harness.c: registration, backend selection, skips and helpers (harness.h). */
#include "harness.h"
#include "psm_reference.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REGISTERED 128

static const psm_backend tested_backends[] = {PSM_BACKEND_CPU, PSM_BACKEND_CUDA,
                                              PSM_BACKEND_HIP, PSM_BACKEND_OPENCL};
#define TESTED_BACKEND_COUNT (sizeof tested_backends / sizeof tested_backends[0])

static const TTest *properties[MAX_REGISTERED];
static int property_count;
static const TTest *common_tests[MAX_REGISTERED];
static int common_count;
static int skip_count;

void psm_test_register_property(const TTest *test)
{
    if (property_count == MAX_REGISTERED) {
        fprintf(stderr, "harness: more than %d properties\n", MAX_REGISTERED);
        exit(EXIT_FAILURE);
    }
    properties[property_count++] = test;
}

void psm_test_register_common(const TTest *test)
{
    if (common_count == MAX_REGISTERED) {
        fprintf(stderr, "harness: more than %d common tests\n", MAX_REGISTERED);
        exit(EXIT_FAILURE);
    }
    common_tests[common_count++] = test;
}

void psm_test_skip(const char *scope, const char *test_name, const char *reason)
{
    printf("SKIP [%s] %s: %s\n", scope, test_name, reason);
    fflush(stdout);
    ++skip_count;
}

/* POLYSAMPLE_TEST_BACKENDS parsed once: selected[backend], or all when unset.
 * An unknown name is an error, not a silent skip of everything. */
static int selection_parsed;
static int selection_all = 1;
static int selected[PSM_BACKEND_COUNT];

static int parse_selection(void)
{
    if (selection_parsed)
        return 1;
    selection_parsed = 1;
    const char *list = getenv("POLYSAMPLE_TEST_BACKENDS");
    if (!list || !list[0])
        return 1;
    selection_all = 0;
    const char *cursor = list;
    while (*cursor) {
        size_t length = strcspn(cursor, ",");
        int found = 0;
        for (size_t b = 0; b < TESTED_BACKEND_COUNT; ++b) {
            const char *name = psm_backend_name(tested_backends[b]);
            if (strlen(name) == length && strncmp(cursor, name, length) == 0) {
                selected[tested_backends[b]] = 1;
                found = 1;
            }
        }
        if (!found && length > 0) {
            fprintf(stderr, "POLYSAMPLE_TEST_BACKENDS=%s: unknown backend '%.*s' "
                    "(expected cpu, cuda, hip, opencl)\n", list, (int)length, cursor);
            return 0;
        }
        cursor += length;
        if (*cursor == ',')
            ++cursor;
    }
    return 1;
}

int psm_test_backend_selected(psm_backend backend)
{
    parse_selection();
    if ((int)backend < 0 || (int)backend >= PSM_BACKEND_COUNT)
        return 0;
    return selection_all || selected[backend];
}

const char *psm_test_backend_skip_reason(psm_backend backend)
{
    static char reason[512];
    const char *why = NULL;
    if (!psm_test_backend_selected(backend))
        return "not listed in POLYSAMPLE_TEST_BACKENDS";
    if (!psm_backend_compiled(backend))
        return "not compiled in";
    if (psm_backend_available(backend, &why))
        return NULL;
    snprintf(reason, sizeof reason, "not available: %s",
             why && why[0] ? why : "(no reason given)");
    return reason;
}

int psm_test_quick(void)
{
    const char *quick = getenv("POLYSAMPLE_TEST_QUICK");
    return quick && strcmp(quick, "1") == 0;
}

int psm_test_run(const char *program_name)
{
    if (!parse_selection())
        return EXIT_FAILURE;
    Suite *suite = suite_create(program_name);
    /* Check's default 4 s limit (fork mode only) is far below a 10^6-draw
     * chi-square under a sanitizer; ctest's TIMEOUT is the real guard. */
    const double timeout_seconds = 1800.0;

    if (common_count > 0) {
        TCase *common = tcase_create("common");
        tcase_set_timeout(common, timeout_seconds);
        for (int t = 0; t < common_count; ++t)
            _tcase_add_test(common, common_tests[t], 0, 0, 0, 1);
        suite_add_tcase(suite, common);
    }

    char backends_run[64] = "";
    for (size_t b = 0; b < TESTED_BACKEND_COUNT && property_count > 0; ++b) {
        psm_backend backend = tested_backends[b];
        const char *name = psm_backend_name(backend);
        const char *reason = psm_test_backend_skip_reason(backend);
        if (reason) {
            for (int p = 0; p < property_count; ++p)
                psm_test_skip(name, properties[p]->name, reason);
            continue;
        }
        TCase *per_backend = tcase_create(name);
        tcase_set_timeout(per_backend, timeout_seconds);
        for (int p = 0; p < property_count; ++p)
            _tcase_add_test(per_backend, properties[p], 0, 0, (int)backend, (int)backend + 1);
        suite_add_tcase(suite, per_backend);
        if (backends_run[0])
            strncat(backends_run, ",", sizeof backends_run - strlen(backends_run) - 1);
        strncat(backends_run, name, sizeof backends_run - strlen(backends_run) - 1);
    }

    SRunner *runner = srunner_create(suite);
    /* In-process by default: forking after OpenMP or an OpenCL runtime has
     * started its threads (the availability probes above may do so) leaves
     * the child with a runtime whose threads are gone. CK_FORK=yes still
     * forks, for isolating a crashing test. */
    if (!getenv("CK_FORK"))
        srunner_set_fork_status(runner, CK_NOFORK);
    srunner_run_all(runner, CK_ENV);
    int run = srunner_ntests_run(runner);
    int failed = srunner_ntests_failed(runner);
    srunner_free(runner);

    printf("skipped: %d\n", skip_count);
    printf("summary: %s: %d run, %d failed, %d skipped; backends run: %s\n", program_name, run,
           failed, skip_count,
           backends_run[0] ? backends_run : property_count ? "none" : "(its tests pick their own)");
    fflush(stdout);
    if (failed > 0)
        return EXIT_FAILURE;
    /* Everything skipped: ctest's SKIP_RETURN_CODE shows it as skipped. */
    if (run == 0)
        return 77;
    return EXIT_SUCCESS;
}

/* ---- contexts ----------------------------------------------------------- */

psm_context *psm_test_open_with(const psm_context_options *options)
{
    psm_context *context = NULL;
    psm_status status = psm_context_create(options, &context);
    ck_assert_msg(status == PSM_OK, "psm_context_create(%s) returned %s: %s",
                  psm_backend_name(options->backend), psm_status_string(status),
                  psm_last_error());
    ck_assert_ptr_nonnull(context);
    return context;
}

psm_context *psm_test_open(psm_backend backend)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    return psm_test_open_with(&options);
}

/* ---- buffers ------------------------------------------------------------ */

void *psm_test_alloc(size_t count, size_t size)
{
    void *memory = calloc(count ? count : 1, size ? size : 1);
    ck_assert_msg(memory != NULL, "out of host memory (%zu x %zu bytes)", count, size);
    return memory;
}

psm_tensor psm_test_tensor(void *data, psm_dtype dtype, int64_t rows, int64_t vocab,
                           int64_t row_stride)
{
    psm_tensor tensor;
    memset(&tensor, 0, sizeof tensor);
    tensor.data = data;
    tensor.dtype = dtype;
    tensor.memory = PSM_MEMORY_HOST;
    tensor.rows = rows;
    tensor.vocab = vocab;
    tensor.row_stride = row_stride;
    return tensor;
}

psm_output psm_test_output(void *data)
{
    psm_output output;
    output.data = data;
    output.memory = PSM_MEMORY_HOST;
    return output;
}

psm_status psm_test_sample_f32(psm_context *context, const float *logits, int64_t rows,
                               int64_t vocab, const psm_params *params, int32_t *tokens,
                               float *logprobs)
{
    psm_tensor tensor = psm_test_tensor((void *)logits, PSM_DTYPE_F32, rows, vocab, 0);
    return psm_sample(context, &tensor, params, psm_test_output(tokens),
                      psm_test_output(logprobs));
}

psm_status psm_test_probs_f32(psm_context *context, const float *logits, int64_t rows,
                              int64_t vocab, const psm_params *params, float *probs)
{
    psm_tensor tensor = psm_test_tensor((void *)logits, PSM_DTYPE_F32, rows, vocab, 0);
    psm_tensor out = psm_test_tensor(probs, PSM_DTYPE_F32, rows, vocab, 0);
    return psm_probs(context, &tensor, params, &out);
}

/* ---- randomness --------------------------------------------------------- */

psm_test_rng psm_test_rng_make(uint64_t seed)
{
    psm_test_rng rng;
    rng.state = seed;
    return rng;
}

uint64_t psm_test_rng_next(psm_test_rng *rng)
{
    rng->state += 0x9e3779b97f4a7c15u;
    uint64_t z = rng->state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    return z ^ (z >> 31);
}

double psm_test_rng_uniform(psm_test_rng *rng)
{
    /* 53 random bits, centred in their interval so 0 and 1 never occur. */
    return ((double)(psm_test_rng_next(rng) >> 11) + 0.5) * 0x1p-53;
}

double psm_test_rng_normal(psm_test_rng *rng)
{
    const double two_pi = 6.283185307179586476925286766559;
    double radius = sqrt(-2.0 * log(psm_test_rng_uniform(rng)));
    return radius * cos(two_pi * psm_test_rng_uniform(rng));
}

uint64_t psm_test_rng_below(psm_test_rng *rng, uint64_t bound)
{
    return (uint64_t)(((unsigned __int128)psm_test_rng_next(rng) * bound) >> 64);
}

/* ---- 16-bit encodings --------------------------------------------------- */

static uint32_t float_bits(float x)
{
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

uint16_t psm_test_f16_exact(float x)
{
    uint32_t bits = float_bits(x);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude == 0)
        return sign;
    if (magnitude == 0x7f800000u)
        return (uint16_t)(sign | 0x7c00u);
    int exponent = (int)(magnitude >> 23) - 127;
    uint32_t mantissa = magnitude & 0x7fffffu;
    ck_assert_msg(exponent >= -14 && exponent <= 15 && (mantissa & 0x1fffu) == 0,
                  "%a is not an exact normal f16 value", (double)x);
    return (uint16_t)(sign | (uint32_t)(exponent + 15) << 10 | mantissa >> 13);
}

uint16_t psm_test_bf16_exact(float x)
{
    uint32_t bits = float_bits(x);
    ck_assert_msg((bits & 0xffffu) == 0 && !isnan(x), "%a is not an exact bf16 value",
                  (double)x);
    return (uint16_t)(bits >> 16);
}

/* ---- contexts and parameters of the filter-order tests ------------------ */

psm_context *psm_test_open_threads(psm_backend backend, int threads)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    options.cpu_threads = backend == PSM_BACKEND_CPU ? threads : 0;
    return psm_test_open_with(&options);
}

psm_params psm_test_params_of(const psm_ref_params *filters, int32_t filter_order)
{
    psm_params params;
    psm_params_init(&params);
    params.temperature = filters->temperature;
    params.top_k = filters->top_k;
    params.top_p = filters->top_p;
    params.min_p = filters->min_p;
    params.filter_order = filter_order;
    return params;
}

/* ---- features some backends refuse ------------------------------------- */

int psm_test_feature_ran(psm_context *context, psm_backend backend, psm_status status,
                         const char *test_name, const char *feature, const int32_t *untouched,
                         size_t count, int32_t sentinel)
{
    if (status == PSM_ERR_UNSUPPORTED && backend != PSM_BACKEND_CPU) {
        for (size_t k = 0; k < count; ++k)
            ck_assert_msg(untouched[k] == sentinel,
                          "%s: a refused call wrote entry %zu (%d)", test_name, k,
                          (int)untouched[k]);
        char reason[512];
        snprintf(reason, sizeof reason,
                 "refused as it should be (%s); the rest needs the backend to run %s",
                 psm_last_error(), feature);
        psm_test_skip(psm_backend_name(backend), test_name, reason);
        return 0;
    }
    ck_assert_msg(status == PSM_OK, "%s: %s: %s", test_name, psm_status_string(status),
                  psm_last_error());
    PSM_CHECK_OK(psm_synchronize(context));
    return 1;
}
