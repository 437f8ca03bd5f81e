/*
 * test_threads.c: polysample under many threads.
 *
 * - Many threads, each with contexts of its own, created and destroyed
 *   concurrently, sample batches (plain and filtered, f32 and bf16, host
 *   memory) and must get the tokens of the single-threaded run.
 * - Error messages stay per thread: while other threads fail with messages
 *   of their own or succeed, each thread's psm_last_error() is what its own
 *   last call left.
 * - The first load of a backend module, from two threads at once (run at
 *   the start of main, before anything else has loaded a module): both
 *   threads get a working context, or both get the same refusal.
 * - cpu_threads beyond PSM_MAX_CPU_THREADS is refused (each thread's
 *   workspace is allocated at creation).
 *
 * Failures inside worker threads are recorded and asserted by the test's
 * own thread (Check's assertions must not run elsewhere). The ThreadSanitizer
 * build (fuzz/tsan.sh) runs this program too.
 */
#define _POSIX_C_SOURCE 200809L

#include "harness.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WORKERS 6
#define ROUNDS 4
#define BATCHES 3
#define ROWS 6
#define VOCAB 3000
#define SAMPLES 4

typedef struct batch {
    uint16_t logits_bf16[ROWS * VOCAB];
    float logits[ROWS * VOCAB];
    psm_params params;
    psm_dtype dtype;
    int32_t expected[ROWS * SAMPLES];
} batch;

static batch batches[BATCHES];

static psm_status sample_batch(psm_context *context, const batch *b, int32_t *tokens)
{
    void *data = b->dtype == PSM_DTYPE_F32 ? (void *)b->logits : (void *)b->logits_bf16;
    psm_tensor tensor = psm_test_tensor(data, b->dtype, ROWS, VOCAB, 0);
    return psm_sample(context, &tensor, &b->params, psm_test_output(tokens),
                      psm_test_output(NULL));
}

static void make_batches(psm_backend backend)
{
    psm_test_rng rng = psm_test_rng_make(4242);
    for (int n = 0; n < BATCHES; ++n) {
        batch *b = &batches[n];
        for (int i = 0; i < ROWS * VOCAB; ++i) {
            /* bf16-exact values, so that both dtypes hold the same logits */
            float x = (float)(int)(psm_test_rng_normal(&rng) * 16.0) / 8.0f;
            b->logits[i] = x;
            b->logits_bf16[i] = psm_test_bf16_exact(x);
        }
        psm_params_init(&b->params);
        b->params.num_samples = SAMPLES;
        b->params.seed = 1000 + (uint64_t)n;
        b->params.offset = (uint64_t)n * 7;
        b->dtype = n == 1 ? PSM_DTYPE_BF16 : PSM_DTYPE_F32;
        if (n == 2) {
            b->params.temperature = 0.7f;
            b->params.top_k = 100;
            b->params.top_p = 0.9f;
            b->params.min_p = 0.02f;
        }
    }
    psm_context *context = psm_test_open(backend);
    for (int n = 0; n < BATCHES; ++n)
        PSM_CHECK_OK(sample_batch(context, &batches[n], batches[n].expected));
    psm_context_destroy(context);
}

typedef struct worker {
    pthread_t thread;
    psm_backend backend;
    int index;
    pthread_barrier_t *barrier;
    char failure[512]; /* empty: no failure */
} worker;

static void record(worker *w, const char *format, const char *detail)
{
    if (w->failure[0] == '\0')
        snprintf(w->failure, sizeof w->failure, format, detail);
}

/* Rounds of: create a context, sample every batch, destroy it. */
static void *sample_concurrently(void *argument)
{
    worker *w = argument;
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = w->backend;
    options.cpu_threads = w->backend == PSM_BACKEND_CPU ? 1 + w->index % 3 : 0;
    for (int round = 0; round < ROUNDS; ++round) {
        psm_context *context = NULL;
        if (psm_context_create(&options, &context) != PSM_OK) {
            record(w, "psm_context_create failed: %s", psm_last_error());
            return NULL;
        }
        for (int n = 0; n < BATCHES; ++n) {
            const batch *b = &batches[(n + w->index) % BATCHES];
            int32_t tokens[ROWS * SAMPLES];
            if (sample_batch(context, b, tokens) != PSM_OK)
                record(w, "psm_sample failed: %s", psm_last_error());
            else if (memcmp(tokens, b->expected, sizeof tokens) != 0)
                record(w, "%s", "tokens differ from the single-threaded run");
        }
        psm_context_destroy(context);
    }
    return NULL;
}

PSM_PROPERTY(threads_get_single_threaded_tokens)
{
    make_batches(backend);
    worker workers[WORKERS];
    memset(workers, 0, sizeof workers);
    for (int t = 0; t < WORKERS; ++t) {
        workers[t].backend = backend;
        workers[t].index = t;
        ck_assert_int_eq(pthread_create(&workers[t].thread, NULL, sample_concurrently,
                                        &workers[t]), 0);
    }
    for (int t = 0; t < WORKERS; ++t) {
        pthread_join(workers[t].thread, NULL);
        ck_assert_msg(workers[t].failure[0] == '\0', "[%s] thread %d: %s",
                      psm_backend_name(backend), t, workers[t].failure);
    }
}

/* Each thread's failing call: num_samples -(index + 1), so that each
 * thread's message names its own number. */
static psm_status fail_own_way(psm_context *context, int index)
{
    psm_params params = batches[0].params;
    params.num_samples = -(index + 1);
    int32_t token = 0;
    psm_tensor tensor = psm_test_tensor(batches[0].logits, PSM_DTYPE_F32, ROWS, VOCAB, 0);
    return psm_sample(context, &tensor, &params, psm_test_output(&token),
                      psm_test_output(NULL));
}

static void *keep_own_errors(void *argument)
{
    worker *w = argument;
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = w->backend;
    options.cpu_threads = 1;
    psm_context *context = NULL;
    if (psm_context_create(&options, &context) != PSM_OK) {
        record(w, "psm_context_create failed: %s", psm_last_error());
    }
    char own[256];
    for (int round = 0; round < 2 * ROUNDS; ++round) {
        /* Odd threads succeed in odd rounds while the others fail: every
         * thread's message must stay what its own last call left. */
        int succeed = context && (round + w->index) % 2 == 1;
        if (context && !succeed) {
            if (fail_own_way(context, w->index) != PSM_ERR_INVALID_PARAMETER)
                record(w, "the failing call did not fail as expected: %s", psm_last_error());
            snprintf(own, sizeof own, "%s", psm_last_error());
        } else if (context) {
            int32_t tokens[ROWS * SAMPLES];
            if (sample_batch(context, &batches[0], tokens) != PSM_OK)
                record(w, "psm_sample failed: %s", psm_last_error());
            own[0] = '\0';
        }
        pthread_barrier_wait(w->barrier);
        /* Every thread has made its call; now each reads its own message. */
        if (context) {
            char expected_number[32];
            snprintf(expected_number, sizeof expected_number, "is %d;", -(w->index + 1));
            if (strcmp(psm_last_error(), own) != 0)
                record(w, "psm_last_error() changed under another thread's call: %s",
                       psm_last_error());
            else if (!succeed && !strstr(own, expected_number))
                record(w, "the message names another thread's value: %s", own);
        }
        pthread_barrier_wait(w->barrier);
    }
    psm_context_destroy(context);
    return NULL;
}

PSM_PROPERTY(error_messages_stay_per_thread)
{
    make_batches(backend);
    worker workers[WORKERS];
    memset(workers, 0, sizeof workers);
    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, WORKERS);
    for (int t = 0; t < WORKERS; ++t) {
        workers[t].backend = backend;
        workers[t].index = t;
        workers[t].barrier = &barrier;
        ck_assert_int_eq(pthread_create(&workers[t].thread, NULL, keep_own_errors, &workers[t]),
                         0);
    }
    for (int t = 0; t < WORKERS; ++t)
        pthread_join(workers[t].thread, NULL);
    pthread_barrier_destroy(&barrier);
    for (int t = 0; t < WORKERS; ++t)
        ck_assert_msg(workers[t].failure[0] == '\0', "[%s] thread %d: %s",
                      psm_backend_name(backend), t, workers[t].failure);
}

/* ---- the first load of a module, from two threads ------------------------ */

typedef struct first_load {
    pthread_t thread;
    psm_backend backend;
    pthread_barrier_t *barrier;
    psm_status status;
    char message[512];
    int32_t tokens[ROWS * SAMPLES];
} first_load;

static batch first_batch; /* its own: the properties remake `batches` */

static struct {
    int ran;
    psm_backend backend;
    first_load loads[2];
} first_load_result;

static void *create_at_once(void *argument)
{
    first_load *load = argument;
    psm_context_options options;
    psm_context_options_init(&options);
    options.backend = load->backend;
    pthread_barrier_wait(load->barrier);
    psm_context *context = NULL;
    load->status = psm_context_create(&options, &context);
    snprintf(load->message, sizeof load->message, "%s", psm_last_error());
    if (load->status == PSM_OK) {
        load->status = sample_batch(context, &first_batch, load->tokens);
        snprintf(load->message, sizeof load->message, "%s", psm_last_error());
        psm_context_destroy(context);
    }
    return NULL;
}

/* Called first thing in main: no module has been loaded yet. */
static void load_module_from_two_threads(psm_backend backend)
{
    /* Expected tokens come from the CPU backend in the test itself. */
    psm_test_rng rng = psm_test_rng_make(9);
    for (int i = 0; i < ROWS * VOCAB; ++i)
        first_batch.logits[i] = (float)psm_test_rng_normal(&rng);
    first_batch.dtype = PSM_DTYPE_F32;
    psm_params_init(&first_batch.params);
    first_batch.params.num_samples = SAMPLES;
    first_batch.params.top_k = 20;
    first_batch.params.seed = 3;

    pthread_barrier_t barrier;
    pthread_barrier_init(&barrier, NULL, 2);
    first_load_result.backend = backend;
    for (int t = 0; t < 2; ++t) {
        first_load_result.loads[t].backend = backend;
        first_load_result.loads[t].barrier = &barrier;
        pthread_create(&first_load_result.loads[t].thread, NULL, create_at_once,
                       &first_load_result.loads[t]);
    }
    for (int t = 0; t < 2; ++t)
        pthread_join(first_load_result.loads[t].thread, NULL);
    pthread_barrier_destroy(&barrier);
    first_load_result.ran = 1;
}

START_TEST(module_first_load_from_two_threads)
{
    const first_load *a = &first_load_result.loads[0], *b = &first_load_result.loads[1];
    const char *name = psm_backend_name(first_load_result.backend);
    printf("[%s] first load from two threads: %s / %s\n", name, psm_status_string(a->status),
           psm_status_string(b->status));
    fflush(stdout);
    ck_assert_msg(a->status == b->status,
                  "[%s] two threads loading the module at once got %s (%s) and %s (%s)", name,
                  psm_status_string(a->status), a->message, psm_status_string(b->status),
                  b->message);
    if (a->status != PSM_OK) {
        /* Both refused: for the same reason, and it must be a refusal for
         * want of a device or module, not a failure of the load itself. */
        ck_assert_str_eq(a->message, b->message);
        ck_assert_msg(a->status == PSM_ERR_NO_DEVICE || a->status == PSM_ERR_BACKEND_NOT_COMPILED,
                      "[%s] refused with %s: %s", name, psm_status_string(a->status), a->message);
        return;
    }
    ck_assert_msg(memcmp(a->tokens, b->tokens, sizeof a->tokens) == 0,
                  "[%s] the two contexts drew different tokens", name);
    psm_context *cpu = psm_test_open(PSM_BACKEND_CPU);
    int32_t expected[ROWS * SAMPLES];
    PSM_CHECK_OK(sample_batch(cpu, &first_batch, expected));
    psm_context_destroy(cpu);
    ck_assert_msg(memcmp(a->tokens, expected, sizeof expected) == 0,
                  "[%s] tokens differ from the CPU backend's", name);
}
END_TEST

START_TEST(cpu_threads_beyond_the_limit_refused)
{
    const int counts[] = {PSM_MAX_CPU_THREADS + 1, 1 << 20, 0x7fffffff};
    for (size_t c = 0; c < sizeof counts / sizeof counts[0]; ++c) {
        psm_context_options options;
        psm_context_options_init(&options);
        options.backend = PSM_BACKEND_CPU;
        options.cpu_threads = counts[c];
        psm_context *const canary = (psm_context *)&options;
        psm_context *context = canary;
        psm_status status = psm_context_create(&options, &context);
        ck_assert_msg(status == PSM_ERR_INVALID_ARGUMENT, "cpu_threads %d gave %s: %s", counts[c],
                      psm_status_string(status), psm_last_error());
        ck_assert_msg(strstr(psm_last_error(), "cpu_threads") != NULL, "message: %s",
                      psm_last_error());
        ck_assert_ptr_eq(context, canary);
    }
}
END_TEST

int main(void)
{
    /* The module-loading race must come before anything loads a module
     * (psm_test_run probes every backend). The OpenCL module is the one a
     * machine without a GPU can load. */
    const psm_backend loaded[] = {PSM_BACKEND_OPENCL, PSM_BACKEND_CUDA, PSM_BACKEND_HIP};
    for (size_t i = 0; i < sizeof loaded / sizeof loaded[0]; ++i) {
        if (psm_backend_compiled(loaded[i]) && psm_test_backend_selected(loaded[i])) {
            load_module_from_two_threads(loaded[i]);
            break;
        }
    }
    if (first_load_result.ran)
        psm_test_register_common(module_first_load_from_two_threads);
    else
        psm_test_skip("common", "module_first_load_from_two_threads",
                      "no GPU backend module compiled in and selected");
    psm_test_register_common(cpu_threads_beyond_the_limit_refused);
    psm_test_register_property(threads_get_single_threaded_tokens);
    psm_test_register_property(error_messages_stay_per_thread);
    return psm_test_run("test_threads");
}
