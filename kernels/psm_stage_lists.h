/*
 * psm_stage_lists.h: step 2 of logit processing (docs/SAMPLING.md section
 * 1; core/psm_processing.h) for one row, spread over a whole group, written
 * once for CUDA, HIP and OpenCL over kernels/psm_portable.h.
 *
 * The result is psm_process_row_lists' (the CPU backend's one-thread form):
 * a token's penalty depends only on its history count and whether the
 * prompt holds it, which atomic adds and ors give in any order, and is
 * applied once, by the one item whose exchange finds the token's count word
 * non-zero (clearing it again). The bias entries stay with one item in list
 * order: a token listed twice gets two rounded adds, whose order is part of
 * the rule. One thread walking a history of a few hundred tokens is a chain
 * of dependent global accesses; a group takes them a group at a time.
 *
 * The GPU backends run step 3 (the mask and the final read) first, in the
 * dense read step, so that a call with processing writes and reads the batch
 * once instead of three times: every token's value is then final except the
 * listed ones'. This stage reads those again from the row as given, applies
 * the lists, and then step 3 to them alone, which gives each token exactly
 * the value of steps 1, 2, 3 in order (step 3 only reads a token's own value
 * and its mask bit). The counts are cleared here for the listed tokens only:
 * no dense pass clears them. Where the pipeline applies the processing as
 * it reads (psm_read_processing), there is no dense step: the row here is
 * an overlay whose other values are never read, and the stage sets the
 * listed tokens' bits.
 */
#ifndef PSM_STAGE_LISTS_H
#define PSM_STAGE_LISTS_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has them already */
#include "psm_portable.h"
#endif
#ifndef PSM_PROCESSING_H
#include "psm_processing.h"
#endif

PSM_STAGE_BEGIN

/* Called by every item of the group, for one row (uniform). x: the row after
 * the read step (read, masked and read again: step 3 made early). raw: the
 * row's logits as given (dtype PSM_LOGITS_*), NULL for a row the read step
 * made bad (then the listed values are not read again: the row stays bad).
 * mask: the row's allowed-token words, NULL for none. counts: the row's
 * vocab count words, of any value on entry; the listed tokens' are zero on
 * return. lists_in_range: the backend's own bound on the entries (OpenCL:
 * within the buffers), checked before any entry is read. bad: group-shared
 * scratch. listed_bits: the row's listed-token bits, zero on entry, for an overlay
 * row x; NULL for a row x that the read step wrote. A row whose lists are
 * unusable gets x[0] = NaN (listed), which makes it a bad row for the
 * pipeline, and is otherwise left as read. */
PSM_LOCAL_FN void psm_stage_row_lists(PSM_GLOBAL float *x, PSM_GLOBAL psm_u32 *listed_bits,
                                      PSM_GLOBAL const unsigned char *raw, int dtype,
                                      PSM_GLOBAL const psm_u32 *mask, PSM_GLOBAL psm_u32 *counts,
                                      const psm_row_lists *lists, psm_i64 vocab,
                                      int lists_in_range, PSM_LOCAL psm_u32 *bad)
{
    const int item = psm_group_item(), items = psm_group_size();
    const int shape_valid = lists_in_range && psm_row_lists_shape_valid(lists);
    psm_i64 e;
    if (item == 0)
        *bad = 0u;
    psm_group_barrier();
    if (shape_valid) {
        for (e = lists->history_begin + item; e < lists->history_end; e += items)
            if (!psm_list_token_valid(lists->history_tokens[e], vocab))
                psm_local_add_u32(bad, 1u);
        for (e = lists->prompt_begin + item; e < lists->prompt_end; e += items)
            if (!psm_list_token_valid(lists->prompt_tokens[e], vocab))
                psm_local_add_u32(bad, 1u);
        for (e = lists->bias_begin + item; e < lists->bias_end; e += items)
            if (!psm_bias_entry_valid(lists->bias_tokens[e], lists->bias_values[e], vocab))
                psm_local_add_u32(bad, 1u);
    }
    psm_group_barrier();
    const int usable = shape_valid && *bad == 0u;
    /* Before *bad is written again for the group's next row. */
    psm_group_barrier();
    if (!usable) {
        if (item == 0) {
            x[0] = psm_bits_float(0x7fc00000u); /* NaN */
            if (listed_bits)
                listed_bits[0] |= 1u;
        }
        return;
    }

    const psm_i64 listed = (lists->history_end - lists->history_begin) +
                           (lists->prompt_end - lists->prompt_begin);
    const psm_i64 bias_entries = lists->bias_end - lists->bias_begin;
    /* The listed tokens as step 1 read them (before the early step 3), and
     * their counts from zero. */
    for (e = item; e < listed + bias_entries; e += items) {
        const psm_i32 token = e < listed ? psm_listed_token(lists, e)
                                         : lists->bias_tokens[lists->bias_begin + e - listed];
        if (e < listed)
            counts[token] = 0u;
        if (raw)
            x[token] = psm_read_logit(psm_raw_logit(raw, dtype, token));
        if (listed_bits)
            psm_global_or_u32(&listed_bits[token >> 5], 1u << (token & 31));
    }
    psm_group_barrier_global();
    const float reciprocal = psm_penalty_reciprocal(lists->repetition);
    for (e = lists->history_begin + item; e < lists->history_end; e += items)
        psm_global_add_u32(&counts[lists->history_tokens[e]], 1u);
    for (e = lists->prompt_begin + item; e < lists->prompt_end; e += items)
        psm_global_or_u32(&counts[lists->prompt_tokens[e]], PSM_IN_PROMPT);
    psm_group_barrier_global();
    for (e = item; e < listed; e += items) {
        const psm_i32 token = psm_listed_token(lists, e);
        const psm_u32 word = psm_global_exchange_u32(&counts[token], 0u);
        if (word != 0u)
            psm_penalise_token(x, token, word, lists, reciprocal);
    }
    psm_group_barrier_global();
    if (item == 0)
        psm_apply_bias(x, lists);
    psm_group_barrier_global();
    /* Step 3 for the listed tokens (a token listed twice gets it twice, which
     * changes nothing: it is idempotent). */
    if (raw)
        for (e = item; e < listed + bias_entries; e += items) {
            const psm_i32 token = e < listed ? psm_listed_token(lists, e)
                                             : lists->bias_tokens[lists->bias_begin + e - listed];
            x[token] = psm_processed_logit(x[token], mask ? psm_token_allowed(mask, token) : 1);
        }
}

PSM_STAGE_END

#endif /* PSM_STAGE_LISTS_H */
