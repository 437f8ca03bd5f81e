/*
 * sample_verify.h: `polysample sample --verify`: speculative decoding
 * verification (psm_verify, docs/SAMPLING.md section 7) of drafts read from
 * .npy files. sample.c parses the options, all in its one table, and refuses
 * the combinations that make no sense; this file reads the files, checks
 * their shapes against each other, calls the library and prints the result.
 */
#ifndef PSM_CLI_SAMPLE_VERIFY_H
#define PSM_CLI_SAMPLE_VERIFY_H

#include "polysample.h"

#include <stdint.h>

typedef struct cli_verify_options {
    int verify;                /* --verify */
    const char *tokens_path;   /* --draft-tokens: int32, requests x k */
    const char *parents_path;  /* --draft-parents: int32, requests x k; NULL: a chain */
    const char *logits_path;   /* --draft-logits: requests * k rows of the target's vocab */
    const char *probs_path;    /* --draft-probs: float32, the same shape */
    psm_params draft_params;   /* --draft-temperature, --draft-top-p, --draft-min-p,
                                  --draft-filter-order */
    uint64_t draft_top_k;      /* --draft-top-k (the table parses into a uint64_t) */
    const char *draft_filter_order; /* --draft-filter-order's text; NULL: not given */
} cli_verify_options;

/* Verifies the drafts against the target logits in target_path with
 * target_params (temperature, filters, filter order, seed, offset) on a
 * context made from options, and prints one line per request (or JSON).
 * Returns the exit status: CLI_EXIT_USAGE for a bad file, a shape that does
 * not fit, or a value the library refuses as a parameter; CLI_EXIT_FAILURE
 * when the library fails otherwise (or refuses a bad row in checking mode). */
int cli_sample_verify(const char *target_path, const cli_verify_options *verify,
                      const psm_context_options *options, const psm_params *target_params,
                      int want_logprobs, int json);

#endif /* PSM_CLI_SAMPLE_VERIFY_H */
