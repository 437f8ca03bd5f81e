/*
 * psm_stage_orders.h: the engines' filter orders (psm_params.filter_order;
 * docs/SAMPLING.md section 4, "Filter orders") on the GPU backends, written
 * once for CUDA, HIP and OpenCL over kernels/psm_portable.h.
 *
 * psm_stage_orders turns a row's top-k, top-p and min-p into the kept test
 * of core/psm_row.h (psm_kept_rule: a cutoff key and a min-p weight) by an
 * order's rules, from exact searches over the row in global memory (or the
 * OpenCL row filter's copy of it): each filter is psm_radix_select of
 * kernels/psm_stage_select.h over the order's set, given as a reader whose
 * key is 0 outside it (vLLM's min-p survivors: psm_survivors_of) or as the
 * select's lower bound (the top-k set). The stages after the cutoff (kept
 * tile masses, draw, psm_probs, logprobs) then run unchanged.
 *
 * Cost, over the default order's searches (which first narrow the row by
 * lane maxima or gap bins): each filter's select reads the row once per
 * radix level (8 bits a level; usually 3 to 5 levels, at most 8), and one
 * more pass over the row counts vLLM's survivors (with min-p and top-k),
 * weighs SGLang's whole row (with top-p) or finds llama.cpp's min-p prefix
 * (with min-p).
 */
#ifndef PSM_STAGE_ORDERS_H
#define PSM_STAGE_ORDERS_H

#ifndef PSM_STAGE_SELECT_H /* the OpenCL program has it already */
#include "psm_stage_select.h"
#endif

/* The values of psm_filter_order (include/polysample.h, which device code
 * cannot include), as the kernels test them; the GPU backends check that
 * they agree. */
#define PSM_ORDER_POLYSAMPLE 0
#define PSM_ORDER_VLLM 1
#define PSM_ORDER_SGLANG 2
#define PSM_ORDER_LLAMA_CPP 3
#define PSM_ORDER_FLASHINFER_TOP_K_FIRST 4
#define PSM_ORDER_FLASHINFER_JOINT 5

PSM_STAGE_BEGIN

/* A row's filters and what the row summary knows of it. */
typedef struct psm_order_row {
    float row_max;   /* M */
    float scale;     /* s of the row's temperature: the draw's */
    int weight_bits;
    psm_i64 valid;   /* the row's valid tokens */
    psm_i32 top_k;
    float top_p;
    float min_p;
} psm_order_row;

/* What one pass finds among a reader's candidates with key >= lower and
 * g_i >= min_weight (g_i against row_max at scale). */
typedef struct psm_order_tally {
    psm_u64 count;
    psm_u64 mass;       /* the sum of their g_i */
    psm_u64 lowest_key; /* the least of their keys; ~0 when there is none */
} psm_order_tally;

/* One pass over the reader when `active`, else nothing read (every item
 * calls it, active or not, and passes the same barriers: the group
 * reductions end with one each). */
PSM_TEAM_READER_TEMPLATE
PSM_LOCAL_FN psm_order_tally psm_order_tally_of(PSM_TEAM_TYPE team, const psm_reader *reader,
                                                int active, psm_u64 lower, psm_u64 min_weight,
                                                float row_max, float scale, int weight_bits,
                                                PSM_LOCAL psm_group_scratch *group)
{
    psm_u64 count = 0, mass = 0, lowest = ~(psm_u64)0;
    const psm_i64 entries = active ? psm_reader_count(reader) : 0;
    for (psm_i64 i = psm_group_item(); i < entries; i += psm_group_size()) {
        float x;
        const psm_u64 key = psm_reader_key(reader, i, &x);
        if (key == 0 || key < lower)
            continue;
        const psm_u64 weight =
            psm_weight_of_gap(psm_unclamped_gap(row_max, x, scale), weight_bits);
        if (weight < min_weight)
            continue;
        count += 1;
        mass += weight;
        lowest = key < lowest ? key : lowest;
    }
    psm_order_tally tally;
    tally.count = psm_group_sum_u64(team, count, group);
    tally.mass = psm_group_sum_u64(team, mass, group);
    tally.lowest_key = ~psm_group_max_u64(team, ~lowest, group);
    return tally;
}

/* The scale of g_i in an order's filters: the row's, llama.cpp's 1 (its
 * chain filters before its temperature). */
PSM_DEVICE_FN float psm_order_scale(int order, psm_order_row filters)
{
    return order == PSM_ORDER_LLAMA_CPP ? psm_inverse_temperature_scale(1.0f) : filters.scale;
}

/* The test of the tokens an order's top-k and top-p see, for
 * psm_survivors_of: vLLM runs min-p first, so only its survivors; the other
 * orders, every valid token. */
PSM_DEVICE_FN psm_kept_rule psm_order_candidates(int order, psm_order_row filters)
{
    const psm_u64 survivor_weight =
        order == PSM_ORDER_VLLM ? psm_min_p_threshold(filters.min_p, filters.weight_bits) : 0;
    return psm_make_kept_rule(0, survivor_weight, filters.row_max, psm_order_scale(order, filters),
                              filters.weight_bits);
}

/* The kept test of a sampled row (not greedy, not bad) in `order` (a
 * PSM_ORDER_* other than POLYSAMPLE), its scale the row's own. `row` reads
 * the row's tokens (an entry's index is its token); `candidates` and
 * `no_candidates` are psm_survivors_of(row, psm_order_candidates(order,
 * filters), 1 and 0), made by the entry, since an OpenCL stage cannot hold
 * a reader of the type the program defines after it. The rules, as the CPU
 * backend's apply_engine_order states them:
 * - the filters weigh g_i at the row's scale, llama.cpp's at scale 1;
 * - vLLM's top-k and top-p see only min-p's survivors;
 * - top-k: its cutoff, lowered to its ties (psm_rank_key_tie_floor) in vLLM
 *   and FlashInfer;
 * - top-p: over the valid tokens (SGLang, FlashInfer joint) or over those at
 *   or above top-k's cutoff; SGLang's target is psm_top_p_target_exceeding
 *   of the row's mass, the others' psm_top_p_target of their set's (the
 *   select's own); FlashInfer's cutoff lowered to its ties;
 * - min-p: per token (the rule's min_weight), or for llama.cpp a prefix: the
 *   cutoff becomes the least key among the candidates that pass.
 * A cutoff from psm_radix_select may be a bucket's start below the smallest
 * selected key: only keys outside the select's set lie between, so that
 * invalid tokens (never kept) or, for vLLM, tokens that fail min-p (which
 * the kept test drops) do. Lowered to its ties it stays exact: a bucket
 * chosen in the first four levels holds every key of its logits, and a
 * start found later shares the selected key's logit.
 * Every item of the group calls it and passes the same barriers: each
 * search and pass runs whether its filter is on or not, over no entries
 * when it is off (psm_portable.h says why). */
PSM_TEAM_READER_TEMPLATE
PSM_LOCAL_FN psm_kept_rule psm_stage_orders(PSM_TEAM_TYPE team, const psm_reader *row,
                                            const PSM_SURVIVOR_READER *candidates,
                                            const PSM_SURVIVOR_READER *no_candidates, int order,
                                            psm_order_row filters,
                                            PSM_LOCAL psm_radix_scratch *radix,
                                            PSM_LOCAL psm_group_scratch *group)
{
    const int llama = order == PSM_ORDER_LLAMA_CPP;
    const int joint = order == PSM_ORDER_SGLANG || order == PSM_ORDER_FLASHINFER_JOINT;
    /* FlashInfer's thresholds are values, so its top-k and top-p keep the
     * boundary's ties; vLLM's top-k does too. */
    const int top_p_ties =
        order == PSM_ORDER_FLASHINFER_TOP_K_FIRST || order == PSM_ORDER_FLASHINFER_JOINT;
    const int top_k_ties = top_p_ties || order == PSM_ORDER_VLLM;
    const float scale = psm_order_scale(order, filters);
    const int bits = filters.weight_bits;
    const psm_u64 min_weight = psm_min_p_threshold(filters.min_p, bits);
    /* vLLM's top-k and top-p see only min-p's survivors. */
    const psm_u64 survivor_weight = psm_order_candidates(order, filters).min_weight;
    const int top_p_on = filters.top_p < 1.0f;

    /* Before the searches: how many survive min-p (vLLM's top-k is off when
     * k keeps them all) and the row's mass (SGLang's top-p target). */
    int top_k_on = psm_top_k_active(filters.top_k, filters.valid);
    const int count_survivors = top_k_on && survivor_weight != 0;
    const int weigh_row = top_p_on && order == PSM_ORDER_SGLANG;
    const psm_order_tally before =
        psm_order_tally_of(team, row, count_survivors || weigh_row, 0, survivor_weight,
                           filters.row_max, scale, bits, group);
    if (count_survivors)
        top_k_on = (psm_u64)filters.top_k < before.count;

    const psm_u64 top_k_select =
        psm_radix_select(team, top_k_on ? candidates : no_candidates, 0, 0,
                         (psm_u64)filters.top_k, 1.0f, filters.row_max, scale, bits, radix, group);
    psm_u64 cutoff = !top_k_on    ? 0
                     : top_k_ties ? psm_rank_key_tie_floor(top_k_select)
                                  : top_k_select;
    /* need 0: the select's target from the mass of its set. */
    const psm_u64 need = weigh_row ? psm_top_p_target_exceeding(before.mass, filters.top_p) : 0;
    const psm_u64 top_p_select =
        psm_radix_select(team, top_p_on ? candidates : no_candidates, joint ? 0 : cutoff, 1,
                         need, filters.top_p, filters.row_max, scale, bits, radix, group);
    const psm_u64 top_p_cutoff = !top_p_on    ? 0
                                 : top_p_ties ? psm_rank_key_tie_floor(top_p_select)
                                              : top_p_select;
    cutoff = top_p_cutoff > cutoff ? top_p_cutoff : cutoff;

    /* llama.cpp's min-p last, as a prefix: the candidates down to the last
     * one that passes (the top token always does). */
    const int prefix = llama && min_weight != 0;
    const psm_order_tally passing = psm_order_tally_of(
        team, row, prefix, cutoff, min_weight, filters.row_max, scale, bits, group);
    if (prefix)
        cutoff = passing.lowest_key;
    return psm_make_kept_rule(cutoff, llama ? 0 : min_weight, filters.row_max, filters.scale,
                              bits);
}

PSM_STAGE_END

#endif /* PSM_STAGE_ORDERS_H */
