/*
 * test_fault_injection.c: every allocation polysample makes can fail, and
 * each failure is clean. Built only with PSM_FAULT_INJECTION=ON (core/alloc.h).
 *
 * For a set of calls (context creation, reserve, sample and probs with host
 * inputs, plain and filtered) and for k = 1, 2, ...: the k-th host allocation
 * (core and CPU backend), and on the device backends the k-th device
 * allocation, is made to fail. The call must then return
 * PSM_ERR_OUT_OF_MEMORY with a message and write nothing (canaries), and the
 * context must still give the right tokens afterwards. The loop ends at the
 * first k beyond the call's allocations, where the call must succeed. Leaks
 * are LeakSanitizer's to find: the sanitizer build runs this program too.
 */
#include "alloc.h"
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define ROWS 5
#define VOCAB 2500 /* three tiles */
#define SAMPLES 3
#define CANARY_BYTE 0x5c
/* No call of this test makes more allocations than this; reaching it means
 * the loop does not end (a failure that is retried for ever, say). */
#define MAX_K 200

enum call_kind { CALL_RESERVE, CALL_SAMPLE_PLAIN, CALL_SAMPLE_FILTERED, CALL_PROBS };
static const char *const call_names[] = {"reserve", "sample (plain)", "sample (filtered)",
                                         "probs"};

typedef struct fixture {
    float logits[ROWS * VOCAB];
    int32_t tokens[ROWS * SAMPLES];
    float logprobs[ROWS * SAMPLES];
    float probs[ROWS * VOCAB];
    int32_t expected_tokens[2][ROWS * SAMPLES]; /* plain, filtered */
    float expected_probs[ROWS * VOCAB];
} fixture;

static fixture shared;

static psm_params params_of(enum call_kind kind)
{
    psm_params params;
    psm_params_init(&params);
    params.num_samples = SAMPLES;
    params.seed = 42;
    if (kind == CALL_SAMPLE_FILTERED || kind == CALL_PROBS) {
        params.temperature = 0.8f;
        params.top_k = 40;
        params.top_p = 0.9f;
        params.min_p = 0.01f;
    }
    return params;
}

static void fill_canaries(void)
{
    memset(shared.tokens, CANARY_BYTE, sizeof shared.tokens);
    memset(shared.logprobs, CANARY_BYTE, sizeof shared.logprobs);
    memset(shared.probs, CANARY_BYTE, sizeof shared.probs);
}

static int untouched(const void *memory, size_t bytes)
{
    const unsigned char *byte = memory;
    for (size_t i = 0; i < bytes; ++i)
        if (byte[i] != CANARY_BYTE)
            return 0;
    return 1;
}

static psm_status make_call(psm_context *context, enum call_kind kind)
{
    psm_params params = params_of(kind);
    switch (kind) {
    case CALL_RESERVE:
        return psm_context_reserve(context, ROWS, VOCAB, SAMPLES);
    case CALL_PROBS:
        return psm_test_probs_f32(context, shared.logits, ROWS, VOCAB, &params, shared.probs);
    case CALL_SAMPLE_PLAIN:
    case CALL_SAMPLE_FILTERED:
    default:
        return psm_test_sample_f32(context, shared.logits, ROWS, VOCAB, &params, shared.tokens,
                                   shared.logprobs);
    }
}

static void prepare_expectations(psm_backend backend)
{
    psm_test_rng rng = psm_test_rng_make(2024);
    for (int i = 0; i < ROWS * VOCAB; ++i)
        shared.logits[i] = (float)(3.0 * psm_test_rng_normal(&rng));
    psm_context *context = psm_test_open(backend);
    PSM_CHECK_OK(make_call(context, CALL_SAMPLE_PLAIN));
    memcpy(shared.expected_tokens[0], shared.tokens, sizeof shared.tokens);
    PSM_CHECK_OK(make_call(context, CALL_SAMPLE_FILTERED));
    memcpy(shared.expected_tokens[1], shared.tokens, sizeof shared.tokens);
    PSM_CHECK_OK(make_call(context, CALL_PROBS));
    memcpy(shared.expected_probs, shared.probs, sizeof shared.probs);
    psm_context_destroy(context);
}

/* The context still works: a filtered draw gives the expected tokens. */
static void check_context_works(psm_context *context, const char *after)
{
    fill_canaries();
    psm_status status = make_call(context, CALL_SAMPLE_FILTERED);
    ck_assert_msg(status == PSM_OK, "after %s, sampling returned %s: %s", after,
                  psm_status_string(status), psm_last_error());
    ck_assert_msg(memcmp(shared.tokens, shared.expected_tokens[1], sizeof shared.tokens) == 0,
                  "after %s, the context draws other tokens", after);
}

/* The result of a successful call is the one without injection. */
static void check_result(enum call_kind kind, const char *what)
{
    if (kind == CALL_SAMPLE_PLAIN || kind == CALL_SAMPLE_FILTERED)
        ck_assert_msg(memcmp(shared.tokens, shared.expected_tokens[kind == CALL_SAMPLE_FILTERED],
                             sizeof shared.tokens) == 0,
                      "%s: other tokens than without injection", what);
    if (kind == CALL_PROBS)
        ck_assert_msg(memcmp(shared.probs, shared.expected_probs, sizeof shared.probs) == 0,
                      "%s: other probabilities than without injection", what);
}

static void arm(int device, int64_t k)
{
    psm_fault_inject(device ? 0 : k, device ? k : 0);
}

static int64_t attempts(int device)
{
    int64_t host = 0, device_count = 0;
    psm_fault_counts(&host, &device_count);
    return device ? device_count : host;
}

/* A failed call: OUT_OF_MEMORY, a message, nothing written. */
static void check_clean_failure(psm_status status, const char *what)
{
    ck_assert_msg(status == PSM_ERR_OUT_OF_MEMORY, "%s returned %s, expected out of memory (%s)",
                  what, psm_status_string(status), psm_last_error());
    ck_assert_msg(psm_last_error()[0] != '\0', "%s failed without a message", what);
    ck_assert_msg(untouched(shared.tokens, sizeof shared.tokens), "%s wrote tokens", what);
    ck_assert_msg(untouched(shared.logprobs, sizeof shared.logprobs), "%s wrote logprobs", what);
    ck_assert_msg(untouched(shared.probs, sizeof shared.probs), "%s wrote probs", what);
}

/* psm_context_create with the k-th allocation failing, for every k. */
static int64_t inject_into_create(psm_backend backend, int device)
{
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = backend;
    for (int64_t k = 1; k <= MAX_K; ++k) {
        char what[128];
        snprintf(what, sizeof what, "[%s] psm_context_create with %s allocation %lld failing",
                 psm_backend_name(backend), device ? "device" : "host", (long long)k);
        psm_context *const canary = (psm_context *)&shared;
        psm_context *context = canary;
        fill_canaries();
        arm(device, k);
        psm_status status = psm_context_create(&options, &context);
        int64_t made = attempts(device);
        arm(0, 0);
        if (status == PSM_OK && made < k) {
            check_context_works(context, what);
            psm_context_destroy(context);
            return k - 1;
        }
        ck_assert_msg(status != PSM_OK, "%s succeeded although the allocation failed", what);
        check_clean_failure(status, what);
        ck_assert_msg(context == canary, "%s wrote context_out", what);
    }
    ck_abort_msg("[%s] psm_context_create made more than %d allocations",
                 psm_backend_name(backend), MAX_K);
    return -1;
}

/* One call on a fresh context with the k-th allocation failing, for every k.
 * Returns the number of allocations the call makes. */
static int64_t inject_into_call(psm_backend backend, enum call_kind kind, int device)
{
    for (int64_t k = 1; k <= MAX_K; ++k) {
        char what[160];
        snprintf(what, sizeof what, "[%s] %s with %s allocation %lld failing",
                 psm_backend_name(backend), call_names[kind], device ? "device" : "host",
                 (long long)k);
        psm_context *context = psm_test_open(backend);
        fill_canaries();
        arm(device, k);
        psm_status status = make_call(context, kind);
        int64_t made = attempts(device);
        arm(0, 0);
        if (status == PSM_OK && made < k) {
            check_result(kind, what);
            check_context_works(context, what);
            psm_context_destroy(context);
            return k - 1;
        }
        ck_assert_msg(status != PSM_OK, "%s succeeded although the allocation failed", what);
        check_clean_failure(status, what);
        check_context_works(context, what);
        /* The call itself works now, with the same result. */
        fill_canaries();
        PSM_CHECK_OK(make_call(context, kind));
        check_result(kind, what);
        psm_context_destroy(context);
    }
    ck_abort_msg("[%s] %s made more than %d allocations", psm_backend_name(backend),
                 call_names[kind], MAX_K);
    return -1;
}

static void inject_everywhere(psm_backend backend, int device)
{
    prepare_expectations(backend);
    int64_t counts[5];
    counts[0] = inject_into_create(backend, device);
    for (int kind = CALL_RESERVE; kind <= CALL_PROBS; ++kind)
        counts[kind + 1] = inject_into_call(backend, (enum call_kind)kind, device);
    printf("[%s] %s allocations failed one at a time: create %lld, reserve %lld, sample plain "
           "%lld, sample filtered %lld, probs %lld\n",
           psm_backend_name(backend), device ? "device" : "host", (long long)counts[0],
           (long long)counts[1], (long long)counts[2], (long long)counts[3],
           (long long)counts[4]);
    fflush(stdout);
    if (!device && backend == PSM_BACKEND_CPU) {
        /* The CPU backend allocates its state and, on first use of a
         * vocabulary, its tile workspace: the loops above must have met them. */
        ck_assert_msg(counts[0] >= 3, "create made %lld host allocations; expected >= 3",
                      (long long)counts[0]);
        ck_assert_msg(counts[1] >= 5 && counts[2] >= 5,
                      "reserve and the first sample made %lld and %lld host allocations; "
                      "expected >= 5 (the tile workspace)",
                      (long long)counts[1], (long long)counts[2]);
    }
}

PSM_PROPERTY(host_allocation_failures_are_clean)
{
    inject_everywhere(backend, 0);
}

PSM_PROPERTY(device_allocation_failures_are_clean)
{
    if (backend == PSM_BACKEND_CPU) {
        /* The CPU backend has no device memory: no device allocation may be
         * counted by any call. */
        prepare_expectations(backend);
        psm_fault_inject(0, 1);
        psm_context *context = psm_test_open(backend);
        PSM_CHECK_OK(make_call(context, CALL_SAMPLE_FILTERED));
        PSM_CHECK_OK(make_call(context, CALL_PROBS));
        ck_assert_int_eq(attempts(1), 0);
        psm_fault_inject(0, 0);
        psm_context_destroy(context);
        return;
    }
    inject_everywhere(backend, 1);
}

int main(void)
{
    psm_test_register_property(host_allocation_failures_are_clean);
    psm_test_register_property(device_allocation_failures_are_clean);
    return psm_test_run("test_fault_injection");
}
