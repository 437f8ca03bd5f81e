/*
 * harness.h: the test harness shared by every test program.
 *
 * A *property* is written once, as a function of a backend id, with
 * PSM_PROPERTY. Each test program registers its properties and calls
 * psm_test_run, which makes one Check TCase per backend (cpu, cuda, hip,
 * opencl) that is compiled in, available on this machine and selected, and
 * runs every property in each of them. For a backend that is not run, every
 * property prints one line to stdout
 *
 *     SKIP [opencl] chi_square_plain: <reason>
 *
 * and counts as a skip. Each program ends with `skipped: N` and a
 * `summary:` line (scripts/test.sh collects those).
 *
 * Environment:
 *   POLYSAMPLE_TEST_BACKENDS  comma-separated backend names (e.g. "cpu,opencl"):
 *                             only these backends run; the others are skipped.
 *                             Unset or empty: every available backend runs.
 *   POLYSAMPLE_TEST_QUICK     1: smaller problem sizes (used by the sanitizer
 *                             build); never fewer than 10^6 chi-square draws.
 *   CK_FORK                   Check's own switch. Unset, the harness runs tests
 *                             in-process (see psm_test_run for why).
 */
#ifndef PSM_TEST_HARNESS_H
#define PSM_TEST_HARNESS_H

#include <check.h>
#include <stddef.h>
#include <stdint.h>

#include "polysample.h"

/* Defines a Check test whose loop index is the backend under test; the body
 * sees it as `backend`. Register it with psm_test_register_property. */
#define PSM_PROPERTY(name)                                                                  \
    static void name##_body(psm_backend backend);                                           \
    START_TEST(name) { name##_body((psm_backend)_i); }                                      \
    END_TEST                                                                                \
    static void name##_body(psm_backend backend)

/* A property run once per selected, available backend. */
void psm_test_register_property(const TTest *test);
/* A test that does not depend on a backend (contract arithmetic, API rules). */
void psm_test_register_common(const TTest *test);
/* Records a skip decided at registration time (prints the SKIP line). */
void psm_test_skip(const char *scope, const char *test_name, const char *reason);

/* Builds the suite, runs it, prints the skip count and summary; returns the
 * process exit status. */
int psm_test_run(const char *program_name);

/* Is the backend selected by POLYSAMPLE_TEST_BACKENDS (or is it unset)? */
int psm_test_backend_selected(psm_backend backend);
/* Why a backend's tests do not run here, in the words every SKIP line uses
 * ("not listed in POLYSAMPLE_TEST_BACKENDS", "not compiled in", "not
 * available: <the library's reason>"; scripts/test.sh groups skips by them),
 * or NULL when they run. Valid until the next call. */
const char *psm_test_backend_skip_reason(psm_backend backend);
/* POLYSAMPLE_TEST_QUICK=1 */
int psm_test_quick(void);

/* ---- failing with the library's message -------------------------------- */

#define PSM_CHECK_OK(call)                                                                  \
    do {                                                                                    \
        psm_status check_ok_status_ = (call);                                               \
        ck_assert_msg(check_ok_status_ == PSM_OK, "%s returned %s: %s", #call,              \
                      psm_status_string(check_ok_status_), psm_last_error());               \
    } while (0)

/* A context of this backend with default options (fails the test otherwise). */
psm_context *psm_test_open(psm_backend backend);
psm_context *psm_test_open_with(const psm_context_options *options);

/* ---- buffers ------------------------------------------------------------ */

/* calloc that fails the test instead of returning NULL. */
void *psm_test_alloc(size_t count, size_t size);

psm_tensor psm_test_tensor(void *data, psm_dtype dtype, int64_t rows, int64_t vocab,
                           int64_t row_stride);
psm_output psm_test_output(void *data);

/* Draws through psm_sample with host f32 logits (contiguous rows). */
psm_status psm_test_sample_f32(psm_context *context, const float *logits, int64_t rows,
                               int64_t vocab, const psm_params *params, int32_t *tokens,
                               float *logprobs);
/* psm_probs with host f32 logits and probs (contiguous rows). */
psm_status psm_test_probs_f32(psm_context *context, const float *logits, int64_t rows,
                              int64_t vocab, const psm_params *params, float *probs);

/* ---- deterministic randomness ------------------------------------------ */

/* splitmix64: every test input comes from a fixed seed. */
typedef struct psm_test_rng {
    uint64_t state;
} psm_test_rng;

psm_test_rng psm_test_rng_make(uint64_t seed);
uint64_t psm_test_rng_next(psm_test_rng *rng);
/* Uniform in (0, 1), never 0 (so it can go through log). */
double psm_test_rng_uniform(psm_test_rng *rng);
/* Standard normal, Box-Muller in double. */
double psm_test_rng_normal(psm_test_rng *rng);
/* Uniform integer in [0, bound). */
uint64_t psm_test_rng_below(psm_test_rng *rng, uint64_t bound);

/* ---- 16-bit encodings --------------------------------------------------- */

/* Encodes x as IEEE half / bfloat16; fails the test unless x is exactly
 * representable (zero, infinities, and normal numbers of the format). */
uint16_t psm_test_f16_exact(float x);
uint16_t psm_test_bf16_exact(float x);

/* ---- contexts and parameters of the filter-order tests ------------------ */

/* A context of this backend; on the CPU backend, with `threads` threads. */
psm_context *psm_test_open_threads(psm_backend backend, int threads);

struct psm_ref_params;
/* psm_params_init's defaults with the reference's filters (temperature,
 * top-k, top-p, min-p) and this filter order. */
psm_params psm_test_params_of(const struct psm_ref_params *filters, int32_t filter_order);

/* ---- features some backends refuse ------------------------------------- */

/* After a call that needs a feature a backend may not run yet (logit
 * processing, top-N logprobs), with `status` its result: a refusal
 * (PSM_ERR_UNSUPPORTED) from a backend other than the CPU one, which runs
 * every feature, must have written nothing, so each of the `count` entries
 * of `untouched` (an output the caller filled with `sentinel`) is checked;
 * the test is then skipped visibly (a SKIP line naming the feature and the
 * library's message) and 0 is returned. Any other status must be PSM_OK;
 * the context is synchronised and 1 is returned. */
int psm_test_feature_ran(psm_context *context, psm_backend backend, psm_status status,
                         const char *test_name, const char *feature, const int32_t *untouched,
                         size_t count, int32_t sentinel);

#endif /* PSM_TEST_HARNESS_H */
