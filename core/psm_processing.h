/*
 * psm_processing.h: logit processing of one row (docs/SAMPLING.md, section
 * 1), written once for every backend.
 *
 * Compiles as C, CUDA, HIP and OpenCL C 1.2, on psm_contract.h's platform
 * layer. A row is processed in three steps over a buffer of floats:
 *   1. every logit read (psm_read_logit) into the buffer (dense);
 *   2. psm_process_row_lists: the row's sparse lists, in order: penalties
 *      for the tokens of its history and prompt lists, then its bias entries
 *      in list order (the order of the bias entries is part of the rule);
 *      the GPU backends spread the penalties over a group,
 *      kernels/psm_stage_lists.h, with the same result;
 *   3. psm_processed_logit: the allowed-token mask and a final read (dense).
 * The passes of the sampling pipeline then read the buffer as f32 logits.
 */
#ifndef PSM_PROCESSING_H
#define PSM_PROCESSING_H

#ifndef PSM_CONTRACT_H
#include "psm_contract.h"
#endif

/* The count word of a token while its row's lists are applied: its history
 * count (below 2^24), and this bit when the prompt list holds it. */
#define PSM_IN_PROMPT 0x80000000u

/* One output row's lists (entries [begin, end) of the call's arrays) and
 * penalties. An array whose list is absent may be NULL, with empty ranges. */
typedef struct psm_row_lists {
    PSM_GLOBAL const psm_i32 *history_tokens;
    psm_i64 history_begin, history_end;
    PSM_GLOBAL const psm_i32 *prompt_tokens;
    psm_i64 prompt_begin, prompt_end;
    PSM_GLOBAL const psm_i32 *bias_tokens;
    PSM_GLOBAL const float *bias_values;
    psm_i64 bias_begin, bias_end;
    float repetition, frequency, presence;
} psm_row_lists;

/* The call's processing arrays, in the memory the backend's kernels read;
 * `present` (PSM_LISTS_* bits) says which are given. */
#define PSM_LISTS_HISTORY 1u
#define PSM_LISTS_PROMPT 2u
#define PSM_LISTS_BIAS 4u
#define PSM_LISTS_MASK 8u
#define PSM_LISTS_REPETITION_PER_ROW 16u
#define PSM_LISTS_FREQUENCY_PER_ROW 32u
#define PSM_LISTS_PRESENCE_PER_ROW 64u

typedef struct psm_processing_arrays {
    psm_u32 present;
    PSM_GLOBAL const psm_i64 *history_offsets;
    PSM_GLOBAL const psm_i32 *history_tokens;
    PSM_GLOBAL const psm_i64 *prompt_offsets;
    PSM_GLOBAL const psm_i32 *prompt_tokens;
    PSM_GLOBAL const psm_i64 *bias_offsets;
    PSM_GLOBAL const psm_i32 *bias_tokens;
    PSM_GLOBAL const float *bias_values;
    PSM_GLOBAL const float *repetition_per_row;
    PSM_GLOBAL const float *frequency_per_row;
    PSM_GLOBAL const float *presence_per_row;
    float repetition, frequency, presence; /* the scalars */
} psm_processing_arrays;

/* Output row `row`'s lists and penalties. */
PSM_FN psm_row_lists psm_row_lists_of(const psm_processing_arrays *a, psm_i64 row)
{
    psm_row_lists lists;
    lists.history_tokens = a->history_tokens;
    lists.history_begin = lists.history_end = 0;
    if (a->present & PSM_LISTS_HISTORY) {
        lists.history_begin = a->history_offsets[row];
        lists.history_end = a->history_offsets[row + 1];
    }
    lists.prompt_tokens = a->prompt_tokens;
    lists.prompt_begin = lists.prompt_end = 0;
    if (a->present & PSM_LISTS_PROMPT) {
        lists.prompt_begin = a->prompt_offsets[row];
        lists.prompt_end = a->prompt_offsets[row + 1];
    }
    lists.bias_tokens = a->bias_tokens;
    lists.bias_values = a->bias_values;
    lists.bias_begin = lists.bias_end = 0;
    if (a->present & PSM_LISTS_BIAS) {
        lists.bias_begin = a->bias_offsets[row];
        lists.bias_end = a->bias_offsets[row + 1];
    }
    lists.repetition =
        (a->present & PSM_LISTS_REPETITION_PER_ROW) ? a->repetition_per_row[row] : a->repetition;
    lists.frequency =
        (a->present & PSM_LISTS_FREQUENCY_PER_ROW) ? a->frequency_per_row[row] : a->frequency;
    lists.presence =
        (a->present & PSM_LISTS_PRESENCE_PER_ROW) ? a->presence_per_row[row] : a->presence;
    return lists;
}

/* Are a row's lists usable? Always true for host arrays (core checked
 * them); device arrays are checked here, and a row that fails is a bad row
 * whose logits are not processed. In two parts, so that a group of GPU
 * items can share the entries (kernels/psm_stage_lists.h): the penalties
 * and ranges, then each entry. */
PSM_FN int psm_row_lists_shape_valid(const psm_row_lists *lists)
{
    if (!psm_penalties_valid(lists->repetition, lists->frequency, lists->presence))
        return 0;
    /* Offsets below 0 would read before the arrays; how far a device array
     * reaches is the caller's to keep (the OpenCL host also bounds it by its
     * buffer's size). */
    return !(lists->history_begin < 0 || lists->prompt_begin < 0 || lists->bias_begin < 0 ||
             lists->history_end < lists->history_begin ||
             lists->prompt_end < lists->prompt_begin || lists->bias_end < lists->bias_begin ||
             lists->history_end - lists->history_begin > PSM_MAX_HISTORY_TOKENS);
}

PSM_FN int psm_list_token_valid(psm_i32 token, psm_i64 vocab)
{
    return token >= 0 && token < vocab;
}

PSM_FN int psm_bias_entry_valid(psm_i32 token, float value, psm_i64 vocab)
{
    return psm_list_token_valid(token, vocab) && psm_logit_class(value) == PSM_LOGIT_VALID;
}

PSM_FN int psm_row_lists_valid(const psm_row_lists *lists, psm_i64 vocab)
{
    psm_i64 e;
    if (!psm_row_lists_shape_valid(lists))
        return 0;
    for (e = lists->history_begin; e < lists->history_end; ++e)
        if (!psm_list_token_valid(lists->history_tokens[e], vocab))
            return 0;
    for (e = lists->prompt_begin; e < lists->prompt_end; ++e)
        if (!psm_list_token_valid(lists->prompt_tokens[e], vocab))
            return 0;
    for (e = lists->bias_begin; e < lists->bias_end; ++e)
        if (!psm_bias_entry_valid(lists->bias_tokens[e], lists->bias_values[e], vocab))
            return 0;
    return 1;
}

/* Entry e of a row's listed tokens: its history, then its prompt. */
PSM_FN psm_i32 psm_listed_token(const psm_row_lists *lists, psm_i64 e)
{
    const psm_i64 history_count = lists->history_end - lists->history_begin;
    return e < history_count ? lists->history_tokens[lists->history_begin + e]
                             : lists->prompt_tokens[lists->prompt_begin + (e - history_count)];
}

/* A listed token's value x penalised by its count word (history count, and
 * PSM_IN_PROMPT), which is applied once a token. */
PSM_FN float psm_penalised_by_word(float x, psm_u32 word, const psm_row_lists *lists,
                                   float reciprocal)
{
    return psm_penalised_logit(x, word & ~PSM_IN_PROMPT, (word & PSM_IN_PROMPT) != 0u,
                               lists->repetition, reciprocal, lists->frequency,
                               lists->presence);
}

/* The bias entries, each one rounded add, in list order. */
PSM_FN void psm_apply_bias(PSM_GLOBAL float *x, const psm_row_lists *lists)
{
    psm_i64 e;
    for (e = lists->bias_begin; e < lists->bias_end; ++e)
        x[lists->bias_tokens[e]] = PSM_FADD(x[lists->bias_tokens[e]], lists->bias_values[e]);
}

/* psm_apply_bias for one token: x plus its entries, in list order. */
PSM_FN float psm_token_bias(float x, const psm_row_lists *lists, psm_i32 token)
{
    psm_i64 e;
    for (e = lists->bias_begin; e < lists->bias_end; ++e)
        if (lists->bias_tokens[e] == token)
            x = PSM_FADD(x, lists->bias_values[e]);
    return x;
}

/* Step 2 on a row of read logits x: penalties, then bias. counts holds vocab
 * zeros on entry and on return. The lists must be valid. */
PSM_FN void psm_process_row_lists(PSM_GLOBAL float *x, PSM_GLOBAL psm_u32 *counts,
                                  const psm_row_lists *lists)
{
    psm_i64 e;
    const psm_i64 listed = (lists->history_end - lists->history_begin) +
                           (lists->prompt_end - lists->prompt_begin);
    const float reciprocal = psm_penalty_reciprocal(lists->repetition);
    for (e = lists->history_begin; e < lists->history_end; ++e)
        counts[lists->history_tokens[e]] += 1u;
    for (e = lists->prompt_begin; e < lists->prompt_end; ++e)
        counts[lists->prompt_tokens[e]] |= PSM_IN_PROMPT;
    /* Each listed token once: its count word is cleared when it is done,
     * which also leaves every count zero for the next row. */
    for (e = 0; e < listed; ++e) {
        const psm_i32 token = psm_listed_token(lists, e);
        const psm_u32 word = counts[token];
        if (word == 0u)
            continue;
        x[token] = psm_penalised_by_word(x[token], word, lists, reciprocal);
        counts[token] = 0u;
    }
    psm_apply_bias(x, lists);
}

/* Step 3 for one token: the mask (allowed: its bit), then the final read
 * (psm_processed_logit). A NaN or +inf stays, masked or not: the row is bad
 * either way, so a mask never hides a broken row (nor a row a GPU backend
 * marked bad with NaN). */
PSM_FN float psm_masked_logit(float x, int allowed)
{
    return allowed || psm_logit_class(x) == PSM_LOGIT_BAD ? x : psm_bits_float(0xff800000u);
}

PSM_FN float psm_processed_logit(float x, int allowed)
{
    return psm_read_logit(psm_masked_logit(x, allowed));
}

/* Bit `token` of a row's words, 32 tokens a word, lowest token in the
 * lowest bit (the layout of the allowed-token mask). */
PSM_FN int psm_token_bit(PSM_GLOBAL const psm_u32 *row_words, psm_i64 token)
{
    return (int)((row_words[token >> 5] >> (token & 31)) & 1u);
}

/* The mask bit of token i in its row's words. */
PSM_FN int psm_token_allowed(PSM_GLOBAL const psm_u32 *row_mask, psm_i64 token)
{
    return psm_token_bit(row_mask, token);
}

/* ---- processing as the GPU stages read a row ------------------------------
 * Where a call's pipeline reads its rows only through the tile and draw
 * stages (kernels/psm_stage_tile.h, psm_stage_draw.h), the GPU
 * backends write no processed copy of the batch: the lists step
 * (kernels/psm_stage_lists.h) leaves the listed tokens' final values in an
 * overlay row and sets their bits, and every read of a token applies the
 * rest, which gives each token the value of steps 1, 2 and 3:
 *   listed: the overlay's value (steps 1 to 3, made by the lists step);
 *   else:   psm_masked_logit of the logit as given (step 2 changes nothing
 *           it does not list), which the stage then reads (psm_read_logit,
 *           step 1's and step 3's read in one: it is idempotent and leaves
 *           -inf, NaN and +inf as they are). */
typedef struct psm_read_processing {
    PSM_GLOBAL const psm_u32 *mask;   /* the row's allowed-token words; NULL: all */
    PSM_GLOBAL const psm_u32 *listed; /* the row's listed-token bits; NULL: none */
    PSM_GLOBAL const float *overlay;  /* the row's listed tokens' values */
} psm_read_processing;

/* No processing: the logits as given. */
PSM_FN psm_read_processing psm_no_read_processing(void)
{
    psm_read_processing none;
    none.mask = 0;
    none.listed = 0;
    none.overlay = 0;
    return none;
}

/* Words of a row's listed-token bits. */
PSM_FN psm_i64 psm_listed_words(psm_i64 vocab)
{
    return (vocab + 31) / 32;
}

/* Output row `row`'s psm_read_processing from the call's arrays: the
 * allowed-token words (mask_words a row; NULL: every token allowed), the
 * listed-token bits and the overlay rows (NULL: no lists). */
PSM_FN psm_read_processing psm_row_read_processing(PSM_GLOBAL const psm_u32 *mask,
                                                   psm_i64 mask_words,
                                                   PSM_GLOBAL const psm_u32 *listed,
                                                   PSM_GLOBAL const float *overlay, psm_i64 row,
                                                   psm_i64 vocab)
{
    psm_read_processing processing;
    processing.mask = mask ? mask + row * mask_words : 0;
    processing.listed = listed ? listed + row * psm_listed_words(vocab) : 0;
    processing.overlay = overlay ? overlay + row * vocab : 0;
    return processing;
}

/* Token `token` of a row, given its logit as read from memory, before
 * psm_read_logit. */
PSM_FN float psm_processed_raw(psm_read_processing processing, psm_i64 token, float raw)
{
    if (processing.listed && psm_token_bit(processing.listed, token))
        return processing.overlay[token];
    return processing.mask ? psm_masked_logit(raw, psm_token_allowed(processing.mask, token))
                           : raw;
}

#endif /* PSM_PROCESSING_H */
