/*
 * psm_stage_lists.h: step 2 of logit processing (docs/SAMPLING.md section
 * 1; core/psm_processing.h) for one row, spread over a whole group, written
 * once for CUDA, HIP and OpenCL over kernels/psm_portable.h.
 *
 * The result is psm_process_row_lists' (the CPU backend's one-thread form):
 * a token's penalty depends only on its history count and whether the
 * prompt holds it, which atomic adds and ors give in any order, and is
 * applied once a token. A token's bias entries are added in list order: a
 * token listed twice gets two rounded adds, whose order is part of the
 * rule. One thread walking a history of a few hundred tokens is a chain of
 * dependent global accesses; a group takes them a group at a time. Where
 * the counts are kept:
 * - a row of at most PSM_LISTS_TABLE_ENTRIES entries (history, prompt and
 *   bias together): in a table in group-shared memory, a slot per distinct
 *   token, and each token's value made once, by the item that walks its
 *   slot (psm_lists_by_table): the logit read, penalised, given its bias
 *   entries (the item walks the bias list for them) and masked, in one read
 *   and one write of global memory;
 * - a longer row: in the row's vocab count words in global memory, each
 *   token penalised by the one item whose exchange finds its count word
 *   non-zero (clearing it again), then masked; the bias entries then stay
 *   with one item, in list order (psm_lists_by_counts).
 *
 * The GPU backends run step 3 (the mask and the final read) first, in the
 * dense read step, so that a call with processing writes and reads the batch
 * once instead of three times: every token's value is then final except the
 * listed ones'. This stage reads those again from the row as given, applies
 * the lists, and then step 3 to them alone, which gives each token exactly
 * the value of steps 1, 2, 3 in order (step 3 only reads a token's own value
 * and its mask bit). Where the pipeline applies the processing as it reads
 * (psm_read_processing), there is no dense step: the row here is an overlay
 * whose other values are never read, and the stage sets the listed tokens'
 * bits.
 */
#ifndef PSM_STAGE_LISTS_H
#define PSM_STAGE_LISTS_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has them already */
#include "psm_portable.h"
#endif
#ifndef PSM_PROCESSING_H
#include "psm_processing.h"
#endif

/* The group's table: up to PSM_LISTS_TABLE_SLOTS slots, each a token
 * (PSM_LISTS_TABLE_EMPTY: none) and its count word, open addressing; 32 KB
 * of group-shared memory. A row uses the fewest slots, a power of two from
 * 64, that its entries fill to at most three quarters (so a probe ends
 * within a few slots), when there are at most PSM_LISTS_TABLE_ENTRIES:
 * a short list clears and walks a short table. */
#define PSM_LISTS_TABLE_BITS 12
#define PSM_LISTS_TABLE_SLOTS (1 << PSM_LISTS_TABLE_BITS)
#define PSM_LISTS_TABLE_ENTRIES (PSM_LISTS_TABLE_SLOTS / 4 * 3)
#define PSM_LISTS_TABLE_MIN_BITS 6
#define PSM_LISTS_TABLE_EMPTY 0xffffffffu
/* A count word's bit for a token that the bias list holds (the history
 * count is at most 2^24, PSM_IN_PROMPT the top bit). */
#define PSM_HAS_BIAS 0x40000000u

PSM_STAGE_BEGIN

typedef struct psm_lists_table {
    PSM_LOCAL psm_u32 *tokens; /* PSM_LISTS_TABLE_SLOTS each */
    PSM_LOCAL psm_u32 *words;
} psm_lists_table;

/* The table's size for a row of `entries` entries (at most
 * PSM_LISTS_TABLE_ENTRIES). */
PSM_DEVICE_FN int psm_lists_table_bits(psm_i64 entries)
{
    int bits = PSM_LISTS_TABLE_MIN_BITS;
    while (bits < PSM_LISTS_TABLE_BITS && ((psm_i64)1 << bits) / 4 * 3 < entries)
        ++bits;
    return bits;
}

/* The count word of `token` in the row's 1 << bits slots of the table, its
 * slot claimed if no slot holds it yet. The table has room (see
 * psm_lists_table_bits), so a free slot is found; the bound only keeps the
 * loop finite. */
PSM_LOCAL_FN PSM_LOCAL psm_u32 *psm_lists_table_word(psm_lists_table table, int bits,
                                                     psm_i32 listed)
{
    const psm_u32 token = (psm_u32)listed;
    const psm_u32 last = (1u << bits) - 1u;
    psm_u32 slot = (token * 2654435761u) >> (32 - bits);
    for (psm_u32 probe = 0; probe <= last; ++probe) {
        const psm_u32 seen = psm_local_cas_u32(&table.tokens[slot], PSM_LISTS_TABLE_EMPTY, token);
        if (seen == PSM_LISTS_TABLE_EMPTY || seen == token)
            break;
        slot = (slot + 1u) & last;
    }
    return &table.words[slot];
}

/* Step 3 for the bias entries, once the bias is applied (a token listed
 * twice gets it twice, which changes nothing: it is idempotent). */
PSM_DEVICE_FN void psm_mask_bias_tokens(PSM_GLOBAL float *x, PSM_GLOBAL const psm_u32 *mask,
                                        const psm_row_lists *lists, int item, int items)
{
    for (psm_i64 e = lists->bias_begin + item; e < lists->bias_end; e += items) {
        const psm_i32 token = lists->bias_tokens[e];
        x[token] = psm_processed_logit(x[token], mask ? psm_token_allowed(mask, token) : 1);
    }
}

/* The lists of a row whose entries fit the table (see the top), in 1 <<
 * bits of its slots. */
PSM_LOCAL_FN void psm_lists_by_table(PSM_GLOBAL float *x, PSM_GLOBAL psm_u32 *listed_bits,
                                     PSM_GLOBAL const unsigned char *raw, int dtype,
                                     PSM_GLOBAL const psm_u32 *mask, const psm_row_lists *lists,
                                     psm_lists_table table, int bits)
{
    const int item = psm_group_item(), items = psm_group_size();
    const int slots = 1 << bits;
    psm_i64 e;
    for (int slot = item; slot < slots; slot += items) {
        table.tokens[slot] = PSM_LISTS_TABLE_EMPTY;
        table.words[slot] = 0u;
    }
    psm_group_barrier();
    for (e = lists->history_begin + item; e < lists->history_end; e += items)
        psm_local_add_u32(psm_lists_table_word(table, bits, lists->history_tokens[e]), 1u);
    for (e = lists->prompt_begin + item; e < lists->prompt_end; e += items)
        psm_local_or_u32(psm_lists_table_word(table, bits, lists->prompt_tokens[e]),
                         PSM_IN_PROMPT);
    for (e = lists->bias_begin + item; e < lists->bias_end; e += items)
        psm_local_or_u32(psm_lists_table_word(table, bits, lists->bias_tokens[e]), PSM_HAS_BIAS);
    psm_group_barrier();
    const float reciprocal = psm_penalty_reciprocal(lists->repetition);
    for (int slot = item; slot < slots; slot += items) {
        const psm_u32 token = table.tokens[slot];
        if (token == PSM_LISTS_TABLE_EMPTY)
            continue;
        const psm_u32 word = table.words[slot];
        float value = psm_penalised_by_word(psm_read_logit(psm_raw_logit(raw, dtype, token)),
                                            word & ~PSM_HAS_BIAS, lists, reciprocal);
        if (word & PSM_HAS_BIAS)
            value = psm_token_bias(value, lists, (psm_i32)token);
        x[token] = psm_processed_logit(value, mask ? psm_token_allowed(mask, token) : 1);
        if (listed_bits)
            psm_global_or_u32(&listed_bits[token >> 5], 1u << (token & 31));
    }
    /* Before the table is cleared for the group's next row. */
    psm_group_barrier();
}

/* The lists of a longer row, with count words in global memory: counts
 * holds the row's vocab words, of any value on entry; the listed tokens'
 * are zero on return. */
PSM_LOCAL_FN void psm_lists_by_counts(PSM_GLOBAL float *x, PSM_GLOBAL psm_u32 *listed_bits,
                                      PSM_GLOBAL const unsigned char *raw, int dtype,
                                      PSM_GLOBAL const psm_u32 *mask, PSM_GLOBAL psm_u32 *counts,
                                      const psm_row_lists *lists)
{
    const int item = psm_group_item(), items = psm_group_size();
    psm_i64 e;
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
            x[token] = psm_penalised_by_word(x[token], word, lists, reciprocal);
    }
    psm_group_barrier_global();
    if (item == 0)
        psm_apply_bias(x, lists);
    psm_group_barrier_global();
    /* Step 3 for the listed tokens (a token listed twice gets it twice, which
     * changes nothing: it is idempotent). */
    for (e = item; e < listed; e += items) {
        const psm_i32 token = psm_listed_token(lists, e);
        x[token] = psm_processed_logit(x[token], mask ? psm_token_allowed(mask, token) : 1);
    }
    psm_mask_bias_tokens(x, mask, lists, item, items);
}


/* Called by every item of the group, for one row (uniform). x: the row after
 * the read step (read, masked and read again: step 3 made early). raw: the
 * row's logits as given (dtype PSM_LOGITS_*), NULL for a row the read step
 * made bad (then the listed values are not read again: the row stays bad).
 * mask: the row's allowed-token words, NULL for none. counts: the row's
 * vocab count words, for psm_lists_by_counts. lists_in_range: the backend's
 * own bound on the entries (OpenCL: within the buffers), checked before any
 * entry is read. bad and table: group-shared scratch. listed_bits: the
 * row's listed-token bits, zero on entry, for an overlay row x; NULL for a
 * row x that the read step wrote. A row whose lists are unusable gets x[0]
 * = NaN (listed), which makes it a bad row for the pipeline, and is
 * otherwise left as read. */
PSM_LOCAL_FN void psm_stage_row_lists(PSM_GLOBAL float *x, PSM_GLOBAL psm_u32 *listed_bits,
                                      PSM_GLOBAL const unsigned char *raw, int dtype,
                                      PSM_GLOBAL const psm_u32 *mask, PSM_GLOBAL psm_u32 *counts,
                                      const psm_row_lists *lists, psm_i64 vocab,
                                      int lists_in_range, PSM_LOCAL psm_u32 *bad,
                                      psm_lists_table table)
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

    /* A row the read step made bad stays bad: its lists change nothing. */
    if (!raw)
        return;
    const psm_i64 entries = (lists->history_end - lists->history_begin) +
                            (lists->prompt_end - lists->prompt_begin) +
                            (lists->bias_end - lists->bias_begin);
    if (entries <= PSM_LISTS_TABLE_ENTRIES)
        psm_lists_by_table(x, listed_bits, raw, dtype, mask, lists, table,
                           psm_lists_table_bits(entries));
    else
        psm_lists_by_counts(x, listed_bits, raw, dtype, mask, counts, lists);
}

PSM_STAGE_END

#endif /* PSM_STAGE_LISTS_H */
