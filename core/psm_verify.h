/*
 * psm_verify.h: the exact arithmetic of speculative decoding verification
 * (docs/SAMPLING.md, section 7), written once.
 *
 * Compiles as C, CUDA, HIP and OpenCL C 1.2 on psm_contract.h's platform
 * layer. OpenCL C has no 128-bit integer, so the wide products are built
 * from 64-bit halves (psm_mulhi64) on every platform alike.
 *
 * Sizes that keep every step in range (B = psm_weight_bits(vocab), so
 * vocab x 2^(B+1) <= 2^64):
 * - a target weight P_i <= 2^B; a residual weight R_i < 2^(B+1) (the
 *   residual step shifts to keep it there), so R_tot < 2^64;
 * - a draft weight Q_i <= 2^B (a weight, or a probability in [0, 1] times
 *   2^B), so Q_tot <= vocab x 2^B <= 2^63;
 * - the acceptance test compares u x Q_x x R_tot < 2^(128 + B + 1) with
 *   R_x x Q_tot x 2^64 < 2^(B + 1 + 63 + 64): both below 2^192;
 * - the residual step's R_i x Q_tot and Q_i x R_tot are below 2^128.
 */
#ifndef PSM_VERIFY_H
#define PSM_VERIFY_H

/* The OpenCL program receives psm_contract.h as an earlier source string,
 * so it is included only where it has not been read yet (as psm_row.h). */
#ifndef PSM_CONTRACT_H
#include "psm_contract.h"
#endif

/* polysample.h's PSM_MAX_DRAFT_NODES, for device code (core/verify.c checks
 * they agree). */
#define PSM_VERIFY_MAX_NODES 64

/* What the check of a draft node found (every backend's phase 1; the first
 * bad node in request and node order is the call's error,
 * core/verify_backend.h). The last three come only from arrays in device
 * memory, which the host does not read. */
#define PSM_NODE_GOOD 0
#define PSM_NODE_BAD_DRAFT_ROW 1 /* draft logits: a NaN or +inf logit, or no finite logit */
#define PSM_NODE_ZERO_DRAFT 2    /* the drawn token has draft weight 0 */
#define PSM_NODE_BAD_TOKEN 3     /* the token lies outside the vocab */
#define PSM_NODE_BAD_PARENT 4    /* the parent is not an earlier node */
#define PSM_NODE_BAD_PROB 5      /* a draft probability outside [0, 1] (NaN included) */

typedef struct psm_u128 {
    psm_u64 low;
    psm_u64 high;
} psm_u128;

typedef struct psm_u192 {
    psm_u64 low;
    psm_u64 middle;
    psm_u64 high;
} psm_u192;

PSM_FN psm_u128 psm_u128_product(psm_u64 a, psm_u64 b)
{
    psm_u128 product;
    product.low = a * b;
    product.high = psm_mulhi64(a, b);
    return product;
}

PSM_FN psm_u192 psm_u192_product(psm_u128 a, psm_u64 b)
{
    psm_u128 low = psm_u128_product(a.low, b);
    psm_u128 high = psm_u128_product(a.high, b);
    psm_u192 product;
    product.low = low.low;
    product.middle = low.high + high.low;
    product.high = high.high + (product.middle < low.high ? 1u : 0u);
    return product;
}

PSM_FN int psm_u128_less(psm_u128 a, psm_u128 b)
{
    return a.high < b.high || (a.high == b.high && a.low < b.low);
}

PSM_FN int psm_u192_less(psm_u192 a, psm_u192 b)
{
    if (a.high != b.high)
        return a.high < b.high;
    if (a.middle != b.middle)
        return a.middle < b.middle;
    return a.low < b.low;
}

/* Is draft node c's token x accepted? u is its 64 random bits (words 0-1 of
 * Philox counter c), Q_x / Q_tot its draft probability and R_x / R_tot the
 * target's (residual) probability at its parent: accept iff
 * u / 2^64 < (R_x / R_tot) / (Q_x / Q_tot), cross-multiplied in integers,
 * u x Q_x x R_tot < R_x x Q_tot x 2^64. Needs Q_x >= 1 and R_tot >= 1. */
PSM_FN int psm_draft_accepted(psm_u64 u, psm_u64 draft_weight, psm_u64 draft_total,
                              psm_u64 residual_weight, psm_u64 residual_total)
{
    psm_u192 left = psm_u192_product(psm_u128_product(u, draft_weight), residual_total);
    psm_u128 right_high = psm_u128_product(residual_weight, draft_total);
    psm_u192 right;
    right.low = 0;
    right.middle = right_high.low;
    right.high = right_high.high;
    return psm_u192_less(left, right);
}

/* ---- totals known only within bounds -------------------------------------
 * The GPU backends need a row's exact G (or Q_tot) only where a walk uses
 * it whole: a residual, a draw, a logprob, or an acceptance test too close
 * to call. Every other test is decided from bounds on the totals, which
 * the row passes give for free: a sampled row's `mass`, the total of
 * section 5 (the sum over tiles of T_t, each tile's kept weights against
 * its own maximum rescaled to the row's), differs from G, the sum of the
 * same tokens' weights against the row maximum, only by roundings. Per
 * token: the gap's (both gaps are the same float differences up to
 * 2^-24 relative each, and the scaling's 2^-24, so d_i and d'_i + D_t
 * differ by at most 2^-22 d_i, and a weight is 0 from d = B + 1 <= 41 on:
 * a relative 2^-22 x 41 x ln 2 < 7e-6), the polynomial's (1.1e-7 relative,
 * once in the token's weight and once in the tile's rescaling) and the
 * truncations (a unit per token and per tile). So |G - mass| < 1e-5 x mass
 * + 2 x vocab + 2; the bounds below allow 2^-12 x mass (24 times the
 * relative part) and 4 x vocab + 4. A test decided at both ends of the
 * bounds is decided as the exact totals would decide it; the others (a
 * fraction of about 2^-11 of uniform u) wait for the exact totals. */
typedef struct psm_total_bounds {
    psm_u64 low;
    psm_u64 high;
} psm_total_bounds;

/* An exactly known total. */
PSM_FN psm_total_bounds psm_total_exactly(psm_u64 total)
{
    psm_total_bounds bounds;
    bounds.low = total;
    bounds.high = total;
    return bounds;
}

/* Bounds on G (or a draft row's Q_tot) from its row's mass (< 2^63). */
PSM_FN psm_total_bounds psm_total_bounds_of_mass(psm_u64 mass, psm_i64 vocab)
{
    const psm_u64 slack = (mass >> 12) + 4u * (psm_u64)vocab + 4u;
    psm_total_bounds bounds;
    bounds.low = mass > slack ? mass - slack : 1u;
    bounds.high = mass + slack;
    return bounds;
}

#define PSM_TEST_REJECTED 0
#define PSM_TEST_ACCEPTED 1
#define PSM_TEST_UNDECIDED 2

/* psm_draft_accepted with totals known within bounds: PSM_TEST_ACCEPTED
 * or PSM_TEST_REJECTED where every pair of totals in the bounds gives that
 * answer (the test's left side grows with R_tot, its right side with
 * Q_tot), else PSM_TEST_UNDECIDED. */
PSM_FN int psm_draft_test_within(psm_u64 u, psm_u64 draft_weight, psm_total_bounds draft_total,
                                 psm_u64 residual_weight, psm_total_bounds residual_total)
{
    if (psm_draft_accepted(u, draft_weight, draft_total.low, residual_weight,
                           residual_total.high))
        return PSM_TEST_ACCEPTED;
    if (!psm_draft_accepted(u, draft_weight, draft_total.high, residual_weight,
                            residual_total.low))
        return PSM_TEST_REJECTED;
    return PSM_TEST_UNDECIDED;
}

/* One token's part of the residual after a rejection, before the shift:
 * max(0, R_i x Q_tot - Q_i x R_tot), the integer form of
 * max(0, R_i / R_tot - Q_i / Q_tot) scaled by R_tot x Q_tot. */
PSM_FN psm_u128 psm_residual_excess(psm_u64 residual_weight, psm_u64 draft_total,
                                    psm_u64 draft_weight, psm_u64 residual_total)
{
    psm_u128 kept = psm_u128_product(residual_weight, draft_total);
    psm_u128 removed = psm_u128_product(draft_weight, residual_total);
    psm_u128 excess;
    excess.low = 0;
    excess.high = 0;
    if (!psm_u128_less(removed, kept))
        return excess;
    excess.low = kept.low - removed.low;
    excess.high = kept.high - removed.high - (kept.low < removed.low ? 1u : 0u);
    return excess;
}

PSM_FN int psm_u128_bit_length(psm_u128 value)
{
    int length = 0;
    psm_u64 word = value.high != 0 ? value.high : value.low;
    while (word != 0) {
        ++length;
        word >>= 1;
    }
    return value.high != 0 ? 64 + length : length;
}

/* The right shift that brings the largest excess of a residual step below
 * 2^(B+1), where a target's weights are (the top one is 2^B): 0 when it is
 * there already. Every token's excess is shifted by the same amount. */
PSM_FN int psm_residual_shift(psm_u128 largest_excess, int weight_bits)
{
    int surplus = psm_u128_bit_length(largest_excess) - (weight_bits + 1);
    return surplus > 0 ? surplus : 0;
}

/* value >> shift, for a shift that leaves it below 2^64 (0 <= shift < 128). */
PSM_FN psm_u64 psm_u128_shift_right(psm_u128 value, int shift)
{
    if (shift == 0)
        return value.low;
    if (shift >= 64)
        return value.high >> (shift - 64);
    return (value.low >> shift) | (value.high << (64 - shift));
}

/* Is q a draft probability the rule reads (finite, in [0, 1])? */
PSM_FN int psm_draft_prob_valid(float q)
{
    return q >= 0.0f && q <= 1.0f;
}

/* A draft probability q in [0, 1] as an integer weight: floor(q x 2^B).
 * Exact on every device: the product by a power of two only moves the
 * exponent (q x 2^B <= 2^40 stays normal, and a denormal q reads 0 either
 * way, since it is below 2^-126), and the conversion truncates. */
PSM_FN psm_u64 psm_draft_prob_weight(float q, int weight_bits)
{
    return (psm_u64)PSM_FMUL(q, psm_bits_float((psm_u32)(127 + weight_bits) << 23));
}

/* ---- what the GPU backends' host and stages exchange ------------------------
 * (kernels/psm_stage_verify.h runs the stages; the OpenCL host passes these
 * by value, so each has fixed-size members, 8-byte ones first.) */

/* A row's status in psm_verify_row. */
#define PSM_VERIFY_ROW_SAMPLE 0
#define PSM_VERIFY_ROW_GREEDY 1
#define PSM_VERIFY_ROW_BAD 2

/* Where the draft distributions come from (psm_verify_call.draft_kind). */
#define PSM_DRAFT_LOGITS 0
#define PSM_DRAFT_PROBS 1
#define PSM_DRAFT_ONE_HOT 2

/* A row's distribution as the row passes left it: kept iff psm_token_kept
 * of psm_make_kept_rule(cutoff, min_weight, maximum, scale, B). 32 bytes,
 * 8-byte members first (the OpenCL host reads the same layout). */
typedef struct psm_verify_row {
    psm_u64 cutoff;
    psm_u64 min_weight;
    psm_u64 mass;         /* PSM_VERIFY_ROW_SAMPLE: the row's total of section 5 */
    float maximum;
    float scale;
    psm_i32 status;       /* PSM_VERIFY_ROW_* */
    psm_u32 greedy_token; /* PSM_VERIFY_ROW_GREEDY: the point mass */
} psm_verify_row;

#define PSM_VERIFY_ROW_BYTES 40

/* The call, by value (an OpenCL kernel argument: fixed-size members, 8-byte
 * ones first, no padding). */
typedef struct psm_verify_call {
    psm_i64 target_stride; /* elements */
    psm_i64 draft_stride;  /* elements of draft logits or probs */
    psm_i32 requests;
    psm_i32 nodes;         /* k */
    psm_i32 vocab;
    psm_i32 weight_bits;
    psm_i32 target_dtype;  /* PSM_LOGITS_* */
    psm_i32 draft_dtype;   /* draft logits: PSM_LOGITS_*; probs: f32 */
    psm_i32 draft_kind;    /* PSM_DRAFT_* */
    psm_i32 has_parents;   /* else a chain */
    psm_i32 check_drafts;  /* tokens, parents and probs were not checked on the host */
    psm_i32 want_path;
    psm_i32 want_logprobs;
    psm_i32 pad;
} psm_verify_call;

#define PSM_VERIFY_CALL_BYTES 64

/* Tokens of a part: the totals are kept as one partial sum per part of a
 * row, a group's work in psm_stage_verify_totals, so that a draw whose
 * residual is the row finds its part from the partials and reads only that
 * part's tokens. */
#define PSM_VERIFY_PART 2048

/* Parts of a row of `vocab` tokens (the partials per row). */
PSM_FN int psm_verify_parts(int vocab)
{
    return (vocab + PSM_VERIFY_PART - 1) / PSM_VERIFY_PART;
}

/* Rows whose totals psm_stage_verify_totals makes: the target rows, then
 * the draft rows unless the drafts are one-hot (whose Q_tot is 1). */
PSM_FN psm_i64 psm_verify_total_rows(const psm_verify_call call)
{
    const psm_i64 target_rows = (psm_i64)call.requests * (call.nodes + 1);
    return call.draft_kind == PSM_DRAFT_ONE_HOT
               ? target_rows
               : target_rows + (psm_i64)call.requests * call.nodes;
}

#endif /* PSM_VERIFY_H */
