/*
 * test_validation.c: every bad argument or parameter fails with the right
 * status, writes nothing, and leaves a message; plus the API's small rules
 * (NULL destroy, status strings, backend selection and POLYSAMPLE_BACKEND).
 */
#define _POSIX_C_SOURCE 200809L /* setenv, unsetenv, strdup */

#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4
#define VOCAB 16
#define SAMPLES 3
#define SENTINEL_BYTE 0xa5

/* A valid call; each case breaks one thing in a copy of it. */
typedef struct call {
    float logits[ROWS * VOCAB];
    psm_tensor logits_tensor;
    psm_params params;
    int32_t tokens[ROWS * SAMPLES];
    float logprobs[ROWS * SAMPLES];
    float probs[ROWS * VOCAB];
    psm_output tokens_output;
    psm_output logprobs_output;
    psm_tensor probs_tensor;
    /* NULL-pointer cases */
    int null_context, null_logits, null_params, null_probs;
} call;

static void make_valid_call(call *c)
{
    memset(c, 0, sizeof *c);
    psm_test_rng rng = psm_test_rng_make(11);
    for (int i = 0; i < ROWS * VOCAB; ++i)
        c->logits[i] = (float)psm_test_rng_normal(&rng);
    c->logits_tensor = psm_test_tensor(c->logits, PSM_DTYPE_F32, ROWS, VOCAB, 0);
    psm_params_init(&c->params);
    c->params.num_samples = SAMPLES;
    c->tokens_output = psm_test_output(c->tokens);
    c->logprobs_output = psm_test_output(c->logprobs);
    c->probs_tensor = psm_test_tensor(c->probs, PSM_DTYPE_F32, ROWS, VOCAB, 0);
}

static void fill_sentinels(call *c)
{
    memset(c->tokens, SENTINEL_BYTE, sizeof c->tokens);
    memset(c->logprobs, SENTINEL_BYTE, sizeof c->logprobs);
    memset(c->probs, SENTINEL_BYTE, sizeof c->probs);
}

static int untouched(const void *memory, size_t bytes)
{
    const unsigned char *byte = memory;
    for (size_t i = 0; i < bytes; ++i)
        if (byte[i] != SENTINEL_BYTE)
            return 0;
    return 1;
}

enum which_call { SAMPLE, PROBS };

static psm_status invoke(psm_context *context, call *c, enum which_call which)
{
    psm_context *used = c->null_context ? NULL : context;
    const psm_tensor *logits = c->null_logits ? NULL : &c->logits_tensor;
    const psm_params *params = c->null_params ? NULL : &c->params;
    if (which == SAMPLE)
        return psm_sample(used, logits, params, c->tokens_output, c->logprobs_output);
    return psm_probs(used, logits, params, c->null_probs ? NULL : &c->probs_tensor);
}

/* Two different earlier errors, so that a call that forgot to set its own
 * message would show a stale one that differs between the two runs. */
static void prime_error(psm_context *context, int which_primer)
{
    psm_params params;
    psm_params_init(&params);
    if (which_primer == 0) {
        psm_sample(NULL, NULL, NULL, psm_test_output(NULL), psm_test_output(NULL));
    } else {
        float logit = 0.0f;
        int32_t token = 0;
        psm_tensor empty = psm_test_tensor(&logit, PSM_DTYPE_F32, 0, 1, 0);
        psm_sample(context, &empty, &params, psm_test_output(&token), psm_test_output(NULL));
    }
    ck_assert_msg(psm_last_error()[0] != '\0', "the primer error left no message");
}

static void expect_failure_of(psm_context *context, call *c, enum which_call which,
                              psm_status expected, const char *what)
{
    char messages[2][512];
    for (int primer = 0; primer < 2; ++primer) {
        prime_error(context, primer);
        fill_sentinels(c);
        psm_status status = invoke(context, c, which);
        const char *call_name = which == SAMPLE ? "psm_sample" : "psm_probs";
        ck_assert_msg(status == expected, "%s with %s returned %s, expected %s (%s)", call_name,
                      what, psm_status_string(status), psm_status_string(expected),
                      psm_last_error());
        snprintf(messages[primer], sizeof messages[primer], "%s", psm_last_error());
        ck_assert_msg(messages[primer][0] != '\0', "%s with %s left psm_last_error() empty",
                      call_name, what);
        ck_assert_msg(untouched(c->tokens, sizeof c->tokens), "%s with %s wrote tokens",
                      call_name, what);
        ck_assert_msg(untouched(c->logprobs, sizeof c->logprobs), "%s with %s wrote logprobs",
                      call_name, what);
        ck_assert_msg(untouched(c->probs, sizeof c->probs), "%s with %s wrote probs", call_name,
                      what);
    }
    ck_assert_msg(strcmp(messages[0], messages[1]) == 0,
                  "%s: the message depends on the previous error ('%s' vs '%s'): the call "
                  "did not set its own",
                  what, messages[0], messages[1]);
}

static void expect_failure(psm_context *context, call *c, psm_status expected, const char *what)
{
    expect_failure_of(context, c, SAMPLE, expected, what);
    expect_failure_of(context, c, PROBS, expected, what);
}

PSM_PROPERTY(bad_pointers_and_shapes)
{
    psm_context *context = psm_test_open(backend);
    call c;

    make_valid_call(&c);
    c.null_context = 1;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "a NULL context");

    make_valid_call(&c);
    c.null_logits = 1;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "NULL logits");

    make_valid_call(&c);
    c.null_params = 1;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "NULL params");

    make_valid_call(&c);
    c.logits_tensor.data = NULL;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "NULL logits.data");

    make_valid_call(&c);
    c.tokens_output.data = NULL;
    expect_failure_of(context, &c, SAMPLE, PSM_ERR_INVALID_ARGUMENT, "NULL tokens.data");

    make_valid_call(&c);
    c.null_probs = 1;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT, "NULL probs");

    make_valid_call(&c);
    c.probs_tensor.data = NULL;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT, "NULL probs.data");

    const int64_t bad_rows[] = {0, -1, INT64_MIN};
    for (size_t i = 0; i < sizeof bad_rows / sizeof bad_rows[0]; ++i) {
        make_valid_call(&c);
        c.logits_tensor.rows = bad_rows[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "rows <= 0");
    }
    const int64_t bad_vocab[] = {0, -3};
    for (size_t i = 0; i < sizeof bad_vocab / sizeof bad_vocab[0]; ++i) {
        make_valid_call(&c);
        c.logits_tensor.vocab = bad_vocab[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "vocab <= 0");
    }
    const int64_t bad_strides[] = {VOCAB - 1, 1, -1};
    for (size_t i = 0; i < sizeof bad_strides / sizeof bad_strides[0]; ++i) {
        make_valid_call(&c);
        c.logits_tensor.row_stride = bad_strides[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "row_stride < vocab");
    }

    const int bad_dtypes[] = {3, -1, 1000};
    for (size_t i = 0; i < sizeof bad_dtypes / sizeof bad_dtypes[0]; ++i) {
        make_valid_call(&c);
        c.logits_tensor.dtype = (psm_dtype)bad_dtypes[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "an unknown dtype");
    }
    const int bad_memory[] = {2, -1, 77};
    for (size_t i = 0; i < sizeof bad_memory / sizeof bad_memory[0]; ++i) {
        make_valid_call(&c);
        c.logits_tensor.memory = (psm_memory)bad_memory[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "an unknown logits.memory");
        make_valid_call(&c);
        c.tokens_output.memory = (psm_memory)bad_memory[i];
        expect_failure_of(context, &c, SAMPLE, PSM_ERR_INVALID_ARGUMENT,
                          "an unknown tokens.memory");
        make_valid_call(&c);
        c.probs_tensor.memory = (psm_memory)bad_memory[i];
        expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT,
                          "an unknown probs.memory");
    }

    make_valid_call(&c);
    c.probs_tensor.dtype = PSM_DTYPE_F16;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT, "f16 probs");
    make_valid_call(&c);
    c.probs_tensor.rows = ROWS - 1;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT, "probs with fewer rows");
    make_valid_call(&c);
    c.probs_tensor.vocab = VOCAB - 1;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT, "probs with a short vocab");
    make_valid_call(&c);
    c.probs_tensor.row_stride = VOCAB - 1;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT,
                      "probs.row_stride < vocab");

    psm_context_destroy(context);
}
END_TEST

PSM_PROPERTY(bad_scalar_parameters)
{
    psm_context *context = psm_test_open(backend);
    call c;

    const int32_t bad_samples[] = {0, -1, INT32_MIN};
    for (size_t i = 0; i < sizeof bad_samples / sizeof bad_samples[0]; ++i) {
        make_valid_call(&c);
        c.params.num_samples = bad_samples[i];
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "num_samples < 1");
    }
    const float bad_top_p[] = {0.0f, -0.0f, -0.25f, nextafterf(1.0f, 2.0f), 2.0f, NAN, INFINITY,
                               -INFINITY};
    for (size_t i = 0; i < sizeof bad_top_p / sizeof bad_top_p[0]; ++i) {
        make_valid_call(&c);
        c.params.top_p = bad_top_p[i];
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "top_p out of (0, 1]");
    }
    const float bad_temperature[] = {-1.0f, -1e-30f, NAN, INFINITY, -INFINITY,
                                     nextafterf(1e6f, INFINITY), 1e30f};
    for (size_t i = 0; i < sizeof bad_temperature / sizeof bad_temperature[0]; ++i) {
        make_valid_call(&c);
        c.params.temperature = bad_temperature[i];
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "temperature out of [0, 1e6]");
    }
    const int32_t bad_top_k[] = {-1, INT32_MIN};
    for (size_t i = 0; i < sizeof bad_top_k / sizeof bad_top_k[0]; ++i) {
        make_valid_call(&c);
        c.params.top_k = bad_top_k[i];
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "top_k < 0");
    }
    const float bad_min_p[] = {-0.01f, nextafterf(1.0f, 2.0f), 1.5f, NAN, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof bad_min_p / sizeof bad_min_p[0]; ++i) {
        make_valid_call(&c);
        c.params.min_p = bad_min_p[i];
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "min_p out of [0, 1]");
    }
    psm_context_destroy(context);
}
END_TEST

/* One bad value in an otherwise good host per-row array. */
PSM_PROPERTY(bad_per_row_parameters)
{
    psm_context *context = psm_test_open(backend);
    const int bad_row = 2;
    call c;

    const float bad_temperature[] = {NAN, -2.0f, INFINITY, 2e6f};
    for (size_t i = 0; i < sizeof bad_temperature / sizeof bad_temperature[0]; ++i) {
        float values[ROWS] = {1.0f, 0.5f, 1.0f, 0.0f};
        values[bad_row] = bad_temperature[i];
        make_valid_call(&c);
        c.params.temperature_per_row = values;
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "a bad temperature_per_row");
    }
    {
        int32_t values[ROWS] = {0, 5, 0, 100};
        values[bad_row] = -3;
        make_valid_call(&c);
        c.params.top_k_per_row = values;
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "a bad top_k_per_row");
    }
    const float bad_top_p[] = {0.0f, 1.5f, NAN};
    for (size_t i = 0; i < sizeof bad_top_p / sizeof bad_top_p[0]; ++i) {
        float values[ROWS] = {1.0f, 0.9f, 1.0f, 0.5f};
        values[bad_row] = bad_top_p[i];
        make_valid_call(&c);
        c.params.top_p_per_row = values;
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "a bad top_p_per_row");
    }
    const float bad_min_p[] = {-0.5f, 2.0f, NAN};
    for (size_t i = 0; i < sizeof bad_min_p / sizeof bad_min_p[0]; ++i) {
        float values[ROWS] = {0.0f, 0.1f, 0.0f, 1.0f};
        values[bad_row] = bad_min_p[i];
        make_valid_call(&c);
        c.params.min_p_per_row = values;
        expect_failure(context, &c, PSM_ERR_INVALID_PARAMETER, "a bad min_p_per_row");
    }
    psm_context_destroy(context);
}
END_TEST

/* Request state (include/polysample.h): host row indices out of range, the
 * output rows without row indices or below 1 with them, a value given both
 * per row and by pointer, a workspace size without a workspace, and probs
 * whose rows are not the output rows. */
PSM_PROPERTY(bad_request_state)
{
    psm_context *context = psm_test_open(backend);
    call c;

    const int64_t bad_indices[] = {-1, ROWS, INT64_MAX, INT64_MIN};
    for (size_t i = 0; i < sizeof bad_indices / sizeof bad_indices[0]; ++i) {
        int64_t indices[ROWS] = {3, 0, 1, 1};
        indices[2] = bad_indices[i];
        make_valid_call(&c);
        c.params.row_indices = indices;
        c.params.output_rows = ROWS;
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "a row index out of range");
        ck_assert_msg(strstr(psm_last_error(), "row_indices[2]") != NULL,
                      "row index %lld: the message does not name the entry: %s",
                      (long long)bad_indices[i], psm_last_error());
    }
    const int64_t indices[ROWS] = {3, 0, 1, 1};
    const int64_t bad_output_rows[] = {0, -1, INT64_MIN};
    for (size_t i = 0; i < sizeof bad_output_rows / sizeof bad_output_rows[0]; ++i) {
        make_valid_call(&c);
        c.params.row_indices = indices;
        c.params.output_rows = bad_output_rows[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "output_rows < 1 with row_indices");
    }
    const int64_t stray_output_rows[] = {1, ROWS + 1, -1};
    for (size_t i = 0; i < sizeof stray_output_rows / sizeof stray_output_rows[0]; ++i) {
        make_valid_call(&c);
        c.params.output_rows = stray_output_rows[i];
        expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT,
                       "output_rows without row_indices");
    }

    const uint64_t seeds[ROWS] = {1, 2, 3, 4}, offsets[ROWS] = {5, 6, 7, 8};
    const uint64_t seed = 9, offset = 10;
    make_valid_call(&c);
    c.params.seed_per_row = seeds;
    c.params.seed_pointer = &seed;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "seed_pointer with seed_per_row");
    make_valid_call(&c);
    c.params.offset_per_row = offsets;
    c.params.offset_pointer = &offset;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "offset_pointer with offset_per_row");

    make_valid_call(&c);
    c.params.workspace_bytes = 1;
    expect_failure(context, &c, PSM_ERR_INVALID_ARGUMENT, "workspace_bytes without workspace");

    make_valid_call(&c);
    c.params.row_indices = indices;
    c.params.output_rows = ROWS - 1;
    expect_failure_of(context, &c, PROBS, PSM_ERR_INVALID_ARGUMENT,
                      "probs with the logits' rows, not the output rows");
    make_valid_call(&c);
    c.params.row_indices = indices;
    c.params.output_rows = ROWS - 1;
    c.probs_tensor.rows = ROWS - 1;
    PSM_CHECK_OK(invoke(context, &c, PROBS));
    PSM_CHECK_OK(invoke(context, &c, SAMPLE));
    PSM_CHECK_OK(psm_synchronize(context));
    psm_context_destroy(context);
}
END_TEST

/* The workspace-size queries fail like the calls, and leave *bytes alone. */
PSM_PROPERTY(workspace_size_queries_reject_bad_arguments)
{
    psm_context *context = psm_test_open(backend);
    call c;
    const int64_t indices[ROWS] = {3, 0, 1, 1};
    const size_t untouched_size = 0x5a5a5a5au;
    for (int which = 0; which < 5; ++which) {
        make_valid_call(&c);
        psm_context *used = context;
        size_t bytes = untouched_size;
        size_t *bytes_out = &bytes;
        const char *what = "";
        switch (which) {
        case 0: used = NULL; what = "a NULL context"; break;
        case 1: bytes_out = NULL; what = "NULL bytes"; break;
        case 2: c.params.num_samples = 0; what = "num_samples 0"; break;
        case 3:
            c.params.row_indices = indices;
            c.params.output_rows = 0;
            what = "output_rows 0 with row_indices";
            break;
        default: c.logits_tensor.vocab = 0; what = "vocab 0"; break;
        }
        psm_status expected =
            which == 2 ? PSM_ERR_INVALID_PARAMETER : PSM_ERR_INVALID_ARGUMENT;
        psm_status status = psm_sample_workspace_size(used, &c.logits_tensor, &c.params,
                                                      c.tokens_output, c.logprobs_output,
                                                      bytes_out);
        ck_assert_msg(status == expected, "psm_sample_workspace_size with %s: %s (%s)", what,
                      psm_status_string(status), psm_last_error());
        ck_assert_msg(psm_last_error()[0] != '\0', "%s: no message", what);
        ck_assert_msg(bytes == untouched_size, "psm_sample_workspace_size with %s wrote %zu",
                      what, bytes);
        status = psm_probs_workspace_size(used, &c.logits_tensor, &c.params, &c.probs_tensor,
                                          bytes_out);
        ck_assert_msg(status == expected, "psm_probs_workspace_size with %s: %s (%s)", what,
                      psm_status_string(status), psm_last_error());
        ck_assert_msg(bytes == untouched_size, "psm_probs_workspace_size with %s wrote %zu",
                      what, bytes);
    }
    size_t bytes = untouched_size;
    ck_assert_int_eq(psm_probs_workspace_size(context, &c.logits_tensor, &c.params, NULL, &bytes),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_msg(bytes == untouched_size, "psm_probs_workspace_size with NULL probs wrote %zu",
                  bytes);
    psm_context_destroy(context);
}
END_TEST

/* The edges of every range are accepted. */
PSM_PROPERTY(boundary_parameters_accepted)
{
    psm_context *context = psm_test_open(backend);
    call c;
    struct {
        float temperature;
        int32_t top_k;
        float top_p;
        float min_p;
    } edges[] = {
        {0.0f, 0, 1.0f, 0.0f},      {1e6f, 0, 1.0f, 0.0f},        {1e-5f, 0, 1.0f, 0.0f},
        {1.0f, INT32_MAX, 1.0f, 0.0f}, {1.0f, 0, 1e-30f, 0.0f},   {1.0f, 0, 1.0f, 1.0f},
        {-0.0f, 0, 1.0f, 0.0f},     {1.0f, 1, 0.5f, 0.5f},
    };
    for (size_t i = 0; i < sizeof edges / sizeof edges[0]; ++i) {
        make_valid_call(&c);
        c.params.temperature = edges[i].temperature;
        c.params.top_k = edges[i].top_k;
        c.params.top_p = edges[i].top_p;
        c.params.min_p = edges[i].min_p;
        c.logits_tensor.row_stride = i % 2 ? VOCAB : 0;
        PSM_CHECK_OK(invoke(context, &c, SAMPLE));
        PSM_CHECK_OK(invoke(context, &c, PROBS));
        PSM_CHECK_OK(psm_synchronize(context));
        for (int t = 0; t < ROWS * SAMPLES; ++t)
            ck_assert_msg(c.tokens[t] >= 0 && c.tokens[t] < VOCAB, "edge case %zu: token %d", i,
                          c.tokens[t]);
    }
    psm_context_destroy(context);
}
END_TEST

START_TEST(destroy_null_is_a_no_op)
{
    psm_context_destroy(NULL);
}
END_TEST

START_TEST(status_strings)
{
    for (int status = PSM_OK; status <= PSM_ERR_INTERNAL; ++status) {
        const char *text = psm_status_string((psm_status)status);
        ck_assert_msg(text != NULL && text[0] != '\0', "psm_status_string(%d) is empty", status);
        for (int other = PSM_OK; other < status; ++other)
            ck_assert_msg(strcmp(text, psm_status_string((psm_status)other)) != 0,
                          "statuses %d and %d share the string '%s'", other, status, text);
    }
    ck_assert_ptr_nonnull(psm_status_string((psm_status)999));
}
END_TEST

START_TEST(version_and_names)
{
    ck_assert_int_eq(psm_version_number(), PSM_VERSION_NUMBER);
    ck_assert_str_eq(psm_version_string(), "0.1.0");
    ck_assert_str_eq(psm_backend_name(PSM_BACKEND_CPU), "cpu");
    ck_assert_str_eq(psm_backend_name(PSM_BACKEND_CUDA), "cuda");
    ck_assert_str_eq(psm_backend_name(PSM_BACKEND_HIP), "hip");
    ck_assert_str_eq(psm_backend_name(PSM_BACKEND_OPENCL), "opencl");
    ck_assert_int_eq(psm_backend_compiled(PSM_BACKEND_CPU), 1);
    const char *reason = NULL;
    ck_assert_int_eq(psm_backend_available(PSM_BACKEND_CPU, &reason), 1);
    ck_assert_int_ge(psm_backend_device_count(PSM_BACKEND_CPU), 1);
}
END_TEST

static psm_status create_expecting_nothing_written(const psm_context_options *options,
                                                  const char *what)
{
    psm_context *const sentinel = (psm_context *)(uintptr_t)0x5a5a5a50u;
    psm_context *context = sentinel;
    psm_status status = psm_context_create(options, &context);
    if (status == PSM_OK) {
        psm_context_destroy(context);
        return status;
    }
    ck_assert_msg(context == sentinel, "%s: a failed psm_context_create wrote context_out", what);
    ck_assert_msg(psm_last_error()[0] != '\0', "%s: no message", what);
    return status;
}

START_TEST(unknown_backend_value_fails)
{
    const int bad_values[] = {PSM_BACKEND_COUNT, -1, 99};
    for (size_t i = 0; i < sizeof bad_values / sizeof bad_values[0]; ++i) {
        psm_context_options options;
        psm_context_options_init(&options);
        options.backend = (psm_backend)bad_values[i];
        psm_status status = create_expecting_nothing_written(&options, "unknown backend");
        ck_assert_msg(status == PSM_ERR_INVALID_ARGUMENT, "backend %d: %s", bad_values[i],
                      psm_status_string(status));
    }
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = PSM_BACKEND_CPU;
    options.cpu_threads = -2;
    ck_assert_int_eq(create_expecting_nothing_written(&options, "cpu_threads -2"),
                     PSM_ERR_INVALID_ARGUMENT);
    ck_assert_int_eq(psm_context_create(&options, NULL), PSM_ERR_INVALID_ARGUMENT);
}
END_TEST

static psm_backend first_backend_where(int compiled)
{
    const psm_backend gpu[] = {PSM_BACKEND_CUDA, PSM_BACKEND_HIP, PSM_BACKEND_OPENCL};
    for (size_t i = 0; i < 3; ++i) {
        if (compiled && psm_backend_compiled(gpu[i]) && !psm_backend_available(gpu[i], NULL))
            return gpu[i];
        if (!compiled && !psm_backend_compiled(gpu[i]))
            return gpu[i];
    }
    return PSM_BACKEND_AUTO;
}

START_TEST(named_backend_not_compiled)
{
    psm_backend missing = first_backend_where(0);
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = missing;
    psm_status status = create_expecting_nothing_written(&options, "not compiled");
    ck_assert_msg(status == PSM_ERR_BACKEND_NOT_COMPILED, "%s: %s (%s)",
                  psm_backend_name(missing), psm_status_string(status), psm_last_error());
    ck_assert_int_eq(psm_backend_available(missing, NULL), 0);
    ck_assert_int_eq(psm_backend_device_count(missing), 0);
}
END_TEST

START_TEST(named_backend_without_device)
{
    psm_backend idle = first_backend_where(1);
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = idle;
    psm_status status = create_expecting_nothing_written(&options, "no device");
    ck_assert_msg(status == PSM_ERR_NO_DEVICE, "%s: %s (%s)", psm_backend_name(idle),
                  psm_status_string(status), psm_last_error());
}
END_TEST

/* Restores POLYSAMPLE_BACKEND after a test changed it (tests run in one
 * process by default). */
static char *saved_backend_variable;

static void save_backend_variable(void)
{
    const char *value = getenv("POLYSAMPLE_BACKEND");
    free(saved_backend_variable);
    saved_backend_variable = value ? strdup(value) : NULL;
}

static void restore_backend_variable(void)
{
    if (saved_backend_variable)
        setenv("POLYSAMPLE_BACKEND", saved_backend_variable, 1);
    else
        unsetenv("POLYSAMPLE_BACKEND");
}

START_TEST(environment_garbage_fails)
{
    save_backend_variable();
    const char *garbage[] = {"garbage", "cpu:", "cpu:x", "cuda:-1", "CPU ", "opencl:1:2"};
    for (size_t i = 0; i < sizeof garbage / sizeof garbage[0]; ++i) {
        setenv("POLYSAMPLE_BACKEND", garbage[i], 1);
        psm_context_options options;
        psm_context_options_init(&options);
        psm_status status = create_expecting_nothing_written(&options, garbage[i]);
        restore_backend_variable();
        ck_assert_msg(status == PSM_ERR_ENVIRONMENT, "POLYSAMPLE_BACKEND=%s gave %s",
                      garbage[i], psm_status_string(status));
    }
}
END_TEST

START_TEST(environment_selects_cpu)
{
    save_backend_variable();
    setenv("POLYSAMPLE_BACKEND", "cpu", 1);
    psm_context_options options;
    psm_context_options_init(&options);
    psm_context *context = NULL;
    psm_status status = psm_context_create(&options, &context);
    restore_backend_variable();
    ck_assert_msg(status == PSM_OK, "POLYSAMPLE_BACKEND=cpu: %s (%s)", psm_status_string(status),
                  psm_last_error());
    ck_assert_int_eq(psm_context_backend(context), PSM_BACKEND_CPU);
    ck_assert_msg(psm_context_selection_reason(context)[0] != '\0', "no selection reason");
    ck_assert_msg(psm_context_device_name(context)[0] != '\0', "no device name");
    psm_context_destroy(context);

    /* core/environment.h: the variable is "consulted by AUTO only", so a
     * named backend does not read it, garbage or not. */
    setenv("POLYSAMPLE_BACKEND", "garbage", 1);
    options.backend = PSM_BACKEND_CPU;
    context = NULL;
    status = psm_context_create(&options, &context);
    restore_backend_variable();
    ck_assert_msg(status == PSM_OK, "a named cpu backend with POLYSAMPLE_BACKEND=garbage: %s (%s)",
                  psm_status_string(status), psm_last_error());
    psm_context_destroy(context);
}
END_TEST

int main(void)
{
    psm_test_register_property(bad_pointers_and_shapes);
    psm_test_register_property(bad_scalar_parameters);
    psm_test_register_property(bad_per_row_parameters);
    psm_test_register_property(boundary_parameters_accepted);
    psm_test_register_property(bad_request_state);
    psm_test_register_property(workspace_size_queries_reject_bad_arguments);
    psm_test_register_common(destroy_null_is_a_no_op);
    psm_test_register_common(status_strings);
    psm_test_register_common(version_and_names);
    psm_test_register_common(unknown_backend_value_fails);
    psm_test_register_common(environment_garbage_fails);
    psm_test_register_common(environment_selects_cpu);
    if (first_backend_where(0) != PSM_BACKEND_AUTO)
        psm_test_register_common(named_backend_not_compiled);
    else
        psm_test_skip("common", "named_backend_not_compiled", "every backend is compiled in");
    if (first_backend_where(1) != PSM_BACKEND_AUTO)
        psm_test_register_common(named_backend_without_device);
    else
        psm_test_skip("common", "named_backend_without_device",
                      "every compiled backend has a device");
    return psm_test_run("test_validation");
}
