/*
 * test_impossible_reserve.c: reserving a shape that cannot be had fails
 * cleanly and leaves a context that works.
 *
 * Two kinds of shape:
 * - sizes that overflow 64-bit arithmetic (rows x vocab or rows x
 *   num_samples beyond what any call could pass validation with): every
 *   backend must refuse them, with PSM_ERR_INVALID_ARGUMENT or
 *   PSM_ERR_OUT_OF_MEMORY, never by wrapping around to a small size;
 * - sizes that are representable but far beyond any device's memory
 *   (2^28 rows of 2^31 - 1 logits: 2^49 tiles of workspace): the device
 *   backends must give PSM_ERR_OUT_OF_MEMORY. The CPU backend's workspace
 *   does not depend on rows (one row per thread at a time, ~52 MB a thread
 *   at the largest vocabulary), so there it may succeed.
 * After each, the context must draw the same tokens as a fresh one.
 */
#include "harness.h"

#include <stdio.h>
#include <string.h>

#define ROWS 3
#define VOCAB 1500
#define SAMPLES 2

static void sample_small(psm_context *context, int32_t *tokens)
{
    float logits[ROWS * VOCAB];
    psm_test_rng rng = psm_test_rng_make(77);
    for (int i = 0; i < ROWS * VOCAB; ++i)
        logits[i] = (float)psm_test_rng_normal(&rng);
    psm_params params;
    psm_params_init(&params);
    params.num_samples = SAMPLES;
    params.top_k = 50;
    params.seed = 5;
    PSM_CHECK_OK(psm_test_sample_f32(context, logits, ROWS, VOCAB, &params, tokens, NULL));
}

/* What a backend may answer. */
enum expectation {
    REFUSED,    /* no call of this size can exist: invalid argument or out of memory */
    DEVICE_OOM, /* device backends: out of memory; CPU: success or out of memory */
    CLEAN       /* success or out of memory (a backend whose workspace ignores it) */
};

typedef struct shape {
    int64_t rows, vocab, num_samples;
    enum expectation expected;
} shape;

static const shape shapes[] = {
    {INT64_MAX, INT32_MAX, INT64_MAX, REFUSED},
    {(int64_t)1 << 40, INT32_MAX, 1, REFUSED},           /* rows x vocab > 2^63 */
    {(int64_t)1 << 62, 1, 1, REFUSED},
    {1, 1, INT64_MAX, REFUSED},                          /* rows x num_samples x 4 bytes */
    {(int64_t)1 << 33, 1024, (int64_t)1 << 30, REFUSED},
    /* Within the bounds of a call, but a workspace of tiles x its bytes per
     * tile would pass 2^64 (2^59 x 288 is 9 x 2^64 for the CUDA backend). */
    {(int64_t)1 << 59, 1, 1, DEVICE_OOM},
    {INT64_MAX / 8, 1, 1, DEVICE_OOM},
    {(int64_t)1 << 28, INT32_MAX, 1, DEVICE_OOM},        /* 2^49 tiles of workspace */
    {(int64_t)1 << 20, (int64_t)1 << 20, 1, DEVICE_OOM}, /* 2^30 tiles, 2^40 logits */
    {1, 1, (int64_t)1 << 45, CLEAN},                     /* 2^47 bytes of staged tokens */
};

PSM_PROPERTY(impossible_reserve_fails_cleanly)
{
    int32_t expected[ROWS * SAMPLES], tokens[ROWS * SAMPLES];
    psm_context *fresh = psm_test_open(backend);
    sample_small(fresh, expected);
    psm_context_destroy(fresh);

    psm_context *context = psm_test_open(backend);
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; ++s) {
        const shape *sh = &shapes[s];
        psm_status status = psm_context_reserve(context, sh->rows, sh->vocab, sh->num_samples);
        const char *message = psm_last_error();
        char what[160];
        snprintf(what, sizeof what, "[%s] reserve(%lld, %lld, %lld)", psm_backend_name(backend),
                 (long long)sh->rows, (long long)sh->vocab, (long long)sh->num_samples);
        if (sh->expected == REFUSED) {
            ck_assert_msg(status == PSM_ERR_INVALID_ARGUMENT || status == PSM_ERR_OUT_OF_MEMORY,
                          "%s returned %s (%s); expected invalid argument or out of memory",
                          what, psm_status_string(status), message);
        } else if (sh->expected == DEVICE_OOM && backend != PSM_BACKEND_CPU) {
            ck_assert_msg(status == PSM_ERR_OUT_OF_MEMORY,
                          "%s returned %s (%s); expected out of memory", what,
                          psm_status_string(status), message);
        } else {
            ck_assert_msg(status == PSM_OK || status == PSM_ERR_OUT_OF_MEMORY,
                          "%s returned %s (%s); expected success or out of memory", what,
                          psm_status_string(status), message);
        }
        if (status != PSM_OK)
            ck_assert_msg(message[0] != '\0', "%s failed without a message", what);
        printf("%s: %s%s%s\n", what, psm_status_string(status), status != PSM_OK ? ": " : "",
               status != PSM_OK ? message : "");
        memset(tokens, 0x7b, sizeof tokens);
        sample_small(context, tokens);
        ck_assert_msg(memcmp(tokens, expected, sizeof tokens) == 0,
                      "%s: the context draws other tokens afterwards", what);
    }
    fflush(stdout);
    psm_context_destroy(context);
}

int main(void)
{
    psm_test_register_property(impossible_reserve_fails_cleanly);
    return psm_test_run("test_impossible_reserve");
}
