/*
 * psm_stage_verify.h: speculative decoding verification (docs/SAMPLING.md,
 * section 7) on the GPUs, written once for CUDA, HIP and OpenCL over
 * kernels/psm_portable.h; the exact arithmetic is core/psm_verify.h.
 *
 * A request is one group's work. Before these stages run, the backend has
 * sent the target rows (and draft logits rows) through the row passes of a
 * plain call (the tile pass, the cutoff selection, the row combination) and
 * written each row's kept rule as a psm_verify_row; a token's weight is then
 * one element read and psm_kept_weight against the row maximum (the global
 * weight g_i), so every sum over a row is exact and takes one pass.
 *   psm_stage_verify_check  phase 1: per draft node, Q_x (one element) and
 *                           its status (PSM_NODE_*); per request, whether a
 *                           target row or a parameter is bad, and which
 *                           rows' exact totals its walk will need, appended
 *                           to one list for the whole call
 *                           (psm_verify_list_needed). Writes only
 *                           workspace; reads a draft row whole only to
 *                           check probabilities in device memory.
 *   psm_stage_verify_totals those rows' G and Q_tot, as partial sums of
 *                           parts of the rows (PSM_VERIFY_PART tokens), a
 *                           group a part, the listed rows' parts shared
 *                           out over a grid that fills the device: all
 *                           rows at once, whatever the batch, and no
 *                           group for a row that is not listed.
 *   psm_stage_verify_walk   phase 2: the walk from the root, with those
 *                           totals; per rejection, two passes over the row
 *                           (the residual's largest excess, then its sum)
 *                           and, at the end, the draw: over the row after a
 *                           rejection, else over the one part that the
 *                           partials say holds the pick. Writes the
 *                           outputs.
 * The walk's other acceptance tests are decided from bounds on the totals
 * (psm_draft_test_within, core/psm_verify.h), which the row passes leave in
 * each psm_verify_row: a walk down accepted drafts without logprobs reads
 * no row whole but the one it draws the bonus token from, and after a
 * rejection only the node's target row and the rejected draft's row.
 * A residual is never stored: its weight at token i is recomputed from
 * P_i and the rejected siblings' Q_i by the steps taken so far (each step's
 * Q_tot, R_tot before it and shift, the same on every item), which gives
 * exactly the CPU backend's residual without a vocab-sized buffer per
 * request.
 *
 * Every item of the group calls every function with the same values (all
 * the walk's decisions come from group reductions), so the branches around
 * the group operations are uniform, as the layer requires.
 */
#ifndef PSM_STAGE_VERIFY_H
#define PSM_STAGE_VERIFY_H

#ifndef PSM_PORTABLE_H /* the OpenCL program has it already */
#include "psm_portable.h"
#endif
#ifndef PSM_VERIFY_H
#include "psm_verify.h"
#endif

PSM_STAGE_BEGIN

/* The call's arrays (device memory). */
typedef struct psm_verify_arrays {
    PSM_GLOBAL const unsigned char *target; /* target logits */
    PSM_GLOBAL const unsigned char *draft;  /* draft logits or probs; unread for one-hot */
    PSM_GLOBAL const psm_i32 *tokens;
    PSM_GLOBAL const psm_i32 *parents;      /* unread for a chain */
    PSM_GLOBAL const psm_verify_row *target_rows;
    PSM_GLOBAL const psm_verify_row *draft_rows; /* unread unless draft logits */
    PSM_GLOBAL psm_u64 *node_drawn;         /* workspace: Q_x per node */
    PSM_GLOBAL psm_u64 *partials;           /* workspace: psm_stage_verify_totals' sums, a row's
                                             * parts in turn (rows numbered as
                                             * psm_verify_total_rows counts them) */
    PSM_GLOBAL psm_u32 *needed_rows;        /* workspace: the rows whose exact totals a walk
                                             * needs, in no particular order */
    PSM_GLOBAL psm_u32 *needed_count;       /* workspace: their number (zeroed by the host
                                             * before phase 1) */
    PSM_GLOBAL psm_i32 *node_status;        /* workspace: PSM_NODE_* per node */
    PSM_GLOBAL psm_i32 *node_decided;       /* workspace: per node, its first test within
                                             * bounds (PSM_TEST_*) */
    PSM_GLOBAL psm_i32 *request_bad;        /* workspace: per request */
} psm_verify_arrays;

/* The outputs (device memory; path_nodes and logprobs unread when not
 * wanted). */
typedef struct psm_verify_outputs {
    PSM_GLOBAL psm_i32 *accepted;
    PSM_GLOBAL psm_i32 *tokens;
    PSM_GLOBAL psm_i32 *path_nodes;
    PSM_GLOBAL float *logprobs;
} psm_verify_outputs;

/* A distribution over the vocab as integer weights. */
#define PSM_DIST_KEPT 0  /* g_i of the kept tokens of a logits row */
#define PSM_DIST_POINT 1 /* weight 1 at `point` */
#define PSM_DIST_PROBS 2 /* floor(q_i 2^B) */

/* The walk's mark for a node of a bad request, beside PSM_TEST_*. */
#define PSM_VERIFY_NODE_BAD (-1)

/* The loads an item of psm_stage_verify_totals has in flight over a logits
 * row. */
#define PSM_VERIFY_TOTALS_BATCH 8

typedef struct psm_verify_dist {
    int kind;
    PSM_GLOBAL const unsigned char *data; /* the row's first element */
    int dtype;
    psm_kept_rule rule;
    psm_u32 point;
} psm_verify_dist;

/* The group-shared memory (declared by the entry). */
typedef struct psm_verify_scratch {
    psm_group_scratch group;
    /* The residual's steps at the current node: the rejected child, its
     * Q_tot, R_tot before the step, the shift after it. */
    psm_u64 step_q_total[PSM_VERIFY_MAX_NODES];
    psm_u64 step_r_total[PSM_VERIFY_MAX_NODES];
    psm_i32 step_node[PSM_VERIFY_MAX_NODES];
    psm_i32 step_shift[PSM_VERIFY_MAX_NODES];
    /* Each node's first-test decision within bounds (PSM_TEST_*; in the
     * walk, PSM_VERIFY_NODE_BAD for a bad node), token and parent. */
    psm_i32 decided[PSM_VERIFY_MAX_NODES];
    psm_i32 node_token[PSM_VERIFY_MAX_NODES];
    psm_i32 node_parent[PSM_VERIFY_MAX_NODES];
    /* Phase 1: whether a node's draft probabilities hold an invalid one. */
    psm_i32 bad_probs[PSM_VERIFY_MAX_NODES];
    /* Phase 1: the request's rows whose exact totals its walk needs. */
    psm_u32 listed[2 * PSM_VERIFY_MAX_NODES + 1];
    psm_u64 found;        /* the drawn token (or part), from the item that finds it */
    psm_u64 found_before; /* the sum of the parts before the found part */
} psm_verify_scratch;

PSM_DEVICE_FN psm_u64 psm_verify_weight(psm_verify_dist dist, psm_i64 token)
{
    if (dist.kind == PSM_DIST_POINT)
        return (psm_u32)token == dist.point ? 1u : 0u;
    if (dist.kind == PSM_DIST_PROBS)
        return psm_draft_prob_weight(((PSM_GLOBAL const float *)dist.data)[token],
                                     dist.rule.weight_bits);
    const float x = psm_read_logit(psm_raw_logit(dist.data, dist.dtype, token));
    return psm_kept_weight(dist.rule, dist.rule.row_max, x, (psm_u32)token);
}

/* A logits row's distribution from its psm_verify_row (not a bad row). */
PSM_DEVICE_FN psm_verify_dist psm_verify_row_dist(PSM_GLOBAL const unsigned char *data, int dtype,
                                                  psm_verify_row row, int weight_bits)
{
    psm_verify_dist dist;
    dist.kind = row.status == PSM_VERIFY_ROW_GREEDY ? PSM_DIST_POINT : PSM_DIST_KEPT;
    dist.data = data;
    dist.dtype = dtype;
    dist.rule = psm_make_kept_rule(row.cutoff, row.min_weight, row.maximum, row.scale,
                                   weight_bits);
    dist.point = row.greedy_token;
    return dist;
}

/* Target row of node v of request r. */
PSM_DEVICE_FN psm_verify_dist psm_verify_target_dist(const psm_verify_call call,
                                                     const psm_verify_arrays arrays, psm_i64 r,
                                                     int v)
{
    const psm_i64 row = r * (call.nodes + 1) + v;
    return psm_verify_row_dist(arrays.target + row * call.target_stride *
                                                   psm_element_bytes(call.target_dtype),
                               call.target_dtype, arrays.target_rows[row], call.weight_bits);
}

/* The draft distribution of node `node` (1..k) of request r. */
PSM_DEVICE_FN psm_verify_dist psm_verify_draft_dist(const psm_verify_call call,
                                                    const psm_verify_arrays arrays, psm_i64 r,
                                                    int node)
{
    const psm_i64 row = r * call.nodes + node - 1;
    if (call.draft_kind == PSM_DRAFT_LOGITS)
        return psm_verify_row_dist(arrays.draft + row * call.draft_stride *
                                                      psm_element_bytes(call.draft_dtype),
                                   call.draft_dtype, arrays.draft_rows[row], call.weight_bits);
    psm_verify_dist dist;
    dist.kind = call.draft_kind == PSM_DRAFT_PROBS ? PSM_DIST_PROBS : PSM_DIST_POINT;
    dist.data = arrays.draft + row * call.draft_stride * 4;
    dist.dtype = PSM_LOGITS_F32;
    dist.rule = psm_make_kept_rule(0, 0, 0.0f, 1.0f, call.weight_bits);
    dist.point = (psm_u32)arrays.tokens[row];
    return dist;
}

/* An item's share of the weights of tokens [from, to) of `dist` (its
 * items: the group's). */
PSM_DEVICE_FN psm_u64 psm_verify_part_weights(psm_verify_dist dist, int from, int to)
{
    const int items = psm_group_size();
    if (dist.kind == PSM_DIST_POINT) {
        /* in the part that holds the point, where a draw finds it */
        return psm_group_item() == 0 && dist.point >= (psm_u32)from && dist.point < (psm_u32)to
                   ? 1u
                   : 0u;
    }
    psm_u64 sum = 0;
    if (dist.kind == PSM_DIST_PROBS) {
        for (int i = from + psm_group_item(); i < to; i += items)
            sum += psm_verify_weight(dist, i);
        return sum;
    }
    /* PSM_VERIFY_TOTALS_BATCH loads in flight an item (see
     * psm_load_logits_batch), not one. The arithmetic bounds the stage: a
     * rule without top-k, top-p or min-p keeps every valid token, and a
     * listed row is not bad, so holds only valid logits and -inf (whose
     * infinite gap weighs 0); there the kept test is left out. */
    const int keeps_valid = dist.rule.cutoff == 0 && dist.rule.min_weight == 0;
    for (int i = from + psm_group_item(); i < to; i += PSM_VERIFY_TOTALS_BATCH * items) {
        psm_i32 at[PSM_VERIFY_TOTALS_BATCH];
        float x[PSM_VERIFY_TOTALS_BATCH];
        for (int b = 0; b < PSM_VERIFY_TOTALS_BATCH; ++b)
            at[b] = i + b * items < to ? i + b * items : -1;
        psm_load_logits_batch(dist.data, dist.dtype, at, x, PSM_VERIFY_TOTALS_BATCH);
        for (int b = 0; b < PSM_VERIFY_TOTALS_BATCH; ++b) {
            const psm_u64 weight =
                keeps_valid ? psm_weight_of_gap(psm_unclamped_gap(dist.rule.row_max, x[b],
                                                                  dist.rule.scale),
                                                dist.rule.weight_bits)
                            : psm_kept_weight(dist.rule, dist.rule.row_max, x[b], (psm_u32)at[b]);
            sum += at[b] >= 0 ? weight : 0u;
        }
    }
    return sum;
}

/* The partial sums of G (a target row) or Q_tot (a draft row) over the
 * parts of the rows phase 1 listed: a unit is a listed row's part, a group
 * each, taken in turn by the `groups` groups of the grid (group: this
 * one's index), so that every row is summed by many groups at once (one
 * request's rows too) instead of in turn by its request's walk, and a
 * grid sized for the device covers any batch. Integer partials, so the
 * sum of a row's parts is exact in any order. The partials of a row that
 * is not listed are not written: no walk reads them. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_stage_verify_totals(PSM_TEAM_TYPE team, const psm_verify_call call,
                                          const psm_verify_arrays arrays, psm_i64 group,
                                          psm_i64 groups, PSM_LOCAL psm_group_scratch *scratch)
{
    const int parts = psm_verify_parts(call.vocab);
    const psm_i64 target_rows = (psm_i64)call.requests * (call.nodes + 1);
    const psm_i64 units = (psm_i64)arrays.needed_count[0] * parts;
    for (psm_i64 unit = group; unit < units; unit += groups) {
        const psm_i64 row = arrays.needed_rows[unit / parts];
        const int part = (int)(unit - unit / parts * parts);
        psm_verify_dist dist;
        if (row < target_rows) {
            const psm_i64 r = row / (call.nodes + 1);
            dist = psm_verify_target_dist(call, arrays, r, (int)(row - r * (call.nodes + 1)));
        } else {
            const psm_i64 draft_row = row - target_rows;
            const psm_i64 r = draft_row / call.nodes;
            dist = psm_verify_draft_dist(call, arrays, r, (int)(draft_row - r * call.nodes) + 1);
        }
        const int from = part * PSM_VERIFY_PART;
        const int to = from + PSM_VERIFY_PART < call.vocab ? from + PSM_VERIFY_PART : call.vocab;
        const psm_u64 sum =
            psm_group_sum_u64(team, psm_verify_part_weights(dist, from, to), scratch);
        if (psm_group_item() == 0)
            arrays.partials[row * parts + part] = sum;
    }
}

/* A row's total from its parts' partials (row: as psm_stage_verify_totals
 * numbers them), summed by the group; every item gets it. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_u64 psm_verify_row_total(PSM_TEAM_TYPE team, const psm_verify_call call,
                                          PSM_GLOBAL const psm_u64 *partials, psm_i64 row,
                                          PSM_LOCAL psm_verify_scratch *scratch)
{
    const int parts = psm_verify_parts(call.vocab);
    psm_u64 total = 0;
    for (int j = psm_group_item(); j < parts; j += psm_group_size())
        total += partials[row * parts + j];
    return psm_group_sum_u64(team, total, &scratch->group);
}

/* G of a walk's target row, `known` where it was summed already (a good
 * row's G is at least 1, so 0 means not yet), else summed now. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_u64 psm_verify_target_total(PSM_TEAM_TYPE team, const psm_verify_call call,
                                             PSM_GLOBAL const psm_u64 *partials, psm_i64 row,
                                             psm_u64 known, PSM_LOCAL psm_verify_scratch *scratch)
{
    return known != 0 ? known : psm_verify_row_total(team, call, partials, row, scratch);
}

/* A draft node's Q_tot: its row's partials, or 1 for a one-hot draft
 * (group-uniform). */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN psm_u64 psm_verify_draft_total(PSM_TEAM_TYPE team, const psm_verify_call call,
                                            PSM_GLOBAL const psm_u64 *partials, psm_i64 r,
                                            int node, PSM_LOCAL psm_verify_scratch *scratch)
{
    if (call.draft_kind == PSM_DRAFT_ONE_HOT)
        return 1u;
    return psm_verify_row_total(team, call, partials,
                                (psm_i64)call.requests * (call.nodes + 1) + r * call.nodes +
                                    node - 1,
                                scratch);
}

/* Bounds on G of target row v of request r (from its row's mass; a
 * greedy row's point mass weighs 1). */
PSM_DEVICE_FN psm_total_bounds psm_verify_target_bounds(const psm_verify_call call,
                                                        const psm_verify_arrays arrays,
                                                        psm_i64 r, int v)
{
    const psm_verify_row row = arrays.target_rows[r * (call.nodes + 1) + v];
    return row.status == PSM_VERIFY_ROW_GREEDY ? psm_total_exactly(1u)
                                               : psm_total_bounds_of_mass(row.mass, call.vocab);
}

/* Bounds on Q_tot of draft node `node` of request r: exact for one-hot
 * drafts, else from the row's mass (not for probabilities, whose rows have
 * no mass: their tests are decided with the exact totals). */
PSM_DEVICE_FN psm_total_bounds psm_verify_draft_bounds(const psm_verify_call call,
                                                       const psm_verify_arrays arrays,
                                                       psm_i64 r, int node)
{
    if (call.draft_kind == PSM_DRAFT_ONE_HOT)
        return psm_total_exactly(1u);
    const psm_verify_row row = arrays.draft_rows[r * call.nodes + node - 1];
    return row.status == PSM_VERIFY_ROW_GREEDY ? psm_total_exactly(1u)
                                               : psm_total_bounds_of_mass(row.mass, call.vocab);
}

/* The first child of node v after node `after` (0: none). */
PSM_DEVICE_FN int psm_verify_next_child(const psm_verify_call call,
                                        const psm_verify_arrays arrays, psm_i64 r, int v,
                                        int after)
{
    for (int child = after + 1; child <= call.nodes; ++child)
        if ((call.has_parents ? arrays.parents[r * call.nodes + child - 1] : child - 1) == v)
            return child;
    return 0;
}

/* Node `node`'s acceptance test as the first at its parent (the residual
 * is then the parent's target row P, R_tot = G), decided within bounds on
 * the totals (PSM_TEST_*). It does not depend on the walk's path, so phase
 * 1 decides every node's side by side, an item a node, for the list of
 * needed rows and for the walk (whose tests where it leaves them undecided
 * take the exact totals). For a good node (token: its draft token, in the
 * vocab; parent: an earlier node; drawn: its Q_x, positive); a test with
 * draft probabilities is left undecided (they have no mass for bounds). */
PSM_DEVICE_FN int psm_verify_decide_within(const psm_verify_call call,
                                           const psm_verify_arrays arrays, psm_i64 r, int node,
                                           psm_i32 token, int parent, psm_u64 drawn,
                                           psm_u64 seed, psm_u64 offset, psm_u32 stream)
{
    /* A bad parent row (its request is bad, the decision unused) is not
     * weighed: it may hold NaN and infinite logits. */
    if (call.draft_kind == PSM_DRAFT_PROBS ||
        arrays.target_rows[r * (call.nodes + 1) + parent].status == PSM_VERIFY_ROW_BAD)
        return PSM_TEST_UNDECIDED;
    return psm_draft_test_within(
        psm_sample_bits(seed, offset, stream, (psm_u32)node).tile, drawn,
        psm_verify_draft_bounds(call, arrays, r, node),
        psm_verify_weight(psm_verify_target_dist(call, arrays, r, parent), token),
        psm_verify_target_bounds(call, arrays, r, parent));
}

/* Appends request r's rows whose exact totals its walk will need to
 * arrays.needed_rows: the walk of psm_stage_verify_walk followed as far as
 * tests decided within bounds take it (scratch->decided: each node's
 * psm_verify_decide_within). Down accepted drafts it needs no total but G
 * of each node it emits at when logprobs are wanted; it ends at a leaf
 * (the bonus draw: G there), at a rejection (the residual: G there and
 * that draft's Q_tot; a later sibling is tested against the residual, so
 * past it every row is listed), or at a test the bounds leave undecided
 * (every row). Draft probabilities have no mass for bounds: every row. A
 * bad request lists none. The walk visits each row once, so no row is
 * listed twice. One item calls it. */
PSM_DEVICE_FN void psm_verify_list_needed(const psm_verify_call call,
                                          const psm_verify_arrays arrays, psm_i64 r, int bad,
                                          PSM_LOCAL psm_verify_scratch *scratch)
{
    const int k = call.nodes;
    const psm_u32 target_first = (psm_u32)(r * (k + 1));
    const int draft_totals = call.draft_kind != PSM_DRAFT_ONE_HOT;
    const psm_u32 draft_first = (psm_u32)((psm_i64)call.requests * (k + 1) + r * k);
    PSM_LOCAL psm_u32 *listed = scratch->listed;
    int count = 0;
    int all = !bad && call.draft_kind == PSM_DRAFT_PROBS;
    int v = 0;
    while (!bad && !all) {
        const int child = psm_verify_next_child(call, arrays, r, v, v);
        if (!child) {
            listed[count++] = target_first + v; /* the bonus draw */
            break;
        }
        if (scratch->decided[child - 1] == PSM_TEST_UNDECIDED) {
            all = 1;
        } else if (scratch->decided[child - 1] == PSM_TEST_ACCEPTED) {
            if (call.want_logprobs)
                listed[count++] = target_first + v;
            v = child;
        } else {
            listed[count++] = target_first + v;
            if (draft_totals)
                listed[count++] = draft_first + child - 1;
            all = psm_verify_next_child(call, arrays, r, v, child) != 0;
            break;
        }
    }
    if (all) {
        count = 0;
        for (int w = 0; w <= k; ++w)
            listed[count++] = target_first + w;
        for (int node = 1; draft_totals && node <= k; ++node)
            listed[count++] = draft_first + node - 1;
    }
    if (count == 0)
        return;
    const psm_u32 at = psm_global_add_u32(arrays.needed_count, (psm_u32)count);
    for (int j = 0; j < count; ++j)
        arrays.needed_rows[at + j] = listed[j];
}

/* Phase 1 for request r: its draft nodes' Q_x, status and first test
 * within bounds, and whether its target rows and parameters are good
 * (params_valid: its resolved parameters are in range). A node's item
 * writes the node's; item 0 the request's flag and the list of its needed
 * rows. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_stage_verify_check(PSM_TEAM_TYPE team, const psm_verify_call call,
                                         const psm_verify_arrays arrays, psm_i64 r,
                                         int params_valid, psm_u64 seed, psm_u64 offset,
                                         psm_u32 stream, PSM_LOCAL psm_verify_scratch *scratch)
{
    const int k = call.nodes;
    /* Draft probabilities in device memory: each node's row is checked
     * whole by the group. */
    const int check_probs = call.check_drafts && call.draft_kind == PSM_DRAFT_PROBS;
    for (int node = 1; check_probs && node <= k; ++node) {
        PSM_GLOBAL const float *probs = (PSM_GLOBAL const float *)psm_verify_draft_dist(
                                            call, arrays, r, node)
                                            .data;
        psm_u64 invalid = 0;
        for (int i = psm_group_item(); i < call.vocab; i += psm_group_size())
            invalid |= psm_draft_prob_valid(probs[i]) ? 0u : 1u;
        invalid = psm_group_max_u64(team, invalid, &scratch->group);
        if (psm_group_item() == 0)
            scratch->bad_probs[node - 1] = invalid != 0;
    }
    psm_group_barrier();
    /* Each target row's status, and each node's status, Q_x and first test
     * within bounds, an item a row and an item a node, so that their loads
     * go side by side; one group sum counts the bad target rows (high
     * word) and the bad nodes (low word). */
    psm_u64 bad_counts = 0;
    for (int v = psm_group_item(); v <= k; v += psm_group_size())
        bad_counts += arrays.target_rows[r * (k + 1) + v].status == PSM_VERIFY_ROW_BAD
                          ? (psm_u64)1 << 32
                          : 0u;
    for (int node = 1 + psm_group_item(); node <= k; node += psm_group_size()) {
        const psm_i64 at = r * k + node - 1;
        const psm_i32 token = arrays.tokens[at];
        const int parent = call.has_parents ? arrays.parents[at] : node - 1;
        int status = PSM_NODE_GOOD;
        if (call.check_drafts) {
            if (token < 0 || token >= call.vocab)
                status = PSM_NODE_BAD_TOKEN;
            else if (!(parent >= 0 && parent < node))
                status = PSM_NODE_BAD_PARENT;
        }
        if (status == PSM_NODE_GOOD && call.draft_kind == PSM_DRAFT_LOGITS &&
            arrays.draft_rows[at].status == PSM_VERIFY_ROW_BAD)
            status = PSM_NODE_BAD_DRAFT_ROW;
        if (status == PSM_NODE_GOOD && check_probs && scratch->bad_probs[node - 1])
            status = PSM_NODE_BAD_PROB;
        psm_u64 drawn = 0;
        if (status == PSM_NODE_GOOD) {
            drawn = psm_verify_weight(psm_verify_draft_dist(call, arrays, r, node), token);
            if (drawn == 0)
                status = PSM_NODE_ZERO_DRAFT;
        }
        const int decided = status == PSM_NODE_GOOD
                                ? psm_verify_decide_within(call, arrays, r, node, token, parent,
                                                           drawn, seed, offset, stream)
                                : PSM_TEST_UNDECIDED;
        arrays.node_drawn[at] = drawn;
        arrays.node_status[at] = status;
        arrays.node_decided[at] = decided;
        scratch->decided[node - 1] = decided;
        bad_counts += status != PSM_NODE_GOOD ? 1u : 0u;
    }
    bad_counts = psm_group_sum_u64(team, bad_counts, &scratch->group);
    const int bad = !params_valid || (bad_counts >> 32) != 0;
    if (psm_group_item() == 0) {
        arrays.request_bad[r] = bad;
        psm_verify_list_needed(call, arrays, r, bad || (bad_counts & 0xffffffffu) != 0,
                               scratch);
    }
}

/* The residual's weight at token i after the first `steps` rejections at
 * the current node, whose target distribution is `target`. */
PSM_LOCAL_FN psm_u64 psm_verify_residual(const psm_verify_call call,
                                         const psm_verify_arrays arrays, psm_i64 r,
                                         psm_verify_dist target, int steps, psm_i64 token,
                                         PSM_LOCAL const psm_verify_scratch *scratch)
{
    psm_u64 weight = psm_verify_weight(target, token);
    for (int j = 0; j < steps; ++j) {
        const psm_u64 q = psm_verify_weight(
            psm_verify_draft_dist(call, arrays, r, scratch->step_node[j]), token);
        weight = psm_u128_shift_right(psm_residual_excess(weight, scratch->step_q_total[j], q,
                                                          scratch->step_r_total[j]),
                                      scratch->step_shift[j]);
    }
    return weight;
}

/* The excess of step `steps` (the rejection of its child) at token i,
 * before the shift. */
PSM_LOCAL_FN psm_u128 psm_verify_excess(const psm_verify_call call,
                                        const psm_verify_arrays arrays, psm_i64 r,
                                        psm_verify_dist target, int steps, psm_i64 token,
                                        PSM_LOCAL const psm_verify_scratch *scratch)
{
    const psm_u64 residual = psm_verify_residual(call, arrays, r, target, steps, token, scratch);
    const psm_u64 q =
        psm_verify_weight(psm_verify_draft_dist(call, arrays, r, scratch->step_node[steps]), token);
    return psm_residual_excess(residual, scratch->step_q_total[steps], q,
                               scratch->step_r_total[steps]);
}

/* Writes emitted position `position` of request r (item 0 only). */
PSM_DEVICE_FN void psm_verify_emit(const psm_verify_call call, const psm_verify_outputs outputs,
                                   psm_i64 r, int position, psm_i32 token, int node,
                                   psm_u64 weight, psm_u64 total)
{
    const psm_i64 at = r * (call.nodes + 1) + position;
    outputs.tokens[at] = token;
    if (call.want_path)
        outputs.path_nodes[at] = node;
    if (call.want_logprobs) {
#if PSM_HAVE_FP64
        outputs.logprobs[at] = psm_weight_log_probability(weight, total);
#else
        outputs.logprobs[at] = log((float)weight) - log((float)total);
#endif
    }
}

/* Request r's outputs from position `from` on: -1 (NaN logprobs); item 0. */
PSM_DEVICE_FN void psm_verify_tail(const psm_verify_call call, const psm_verify_outputs outputs,
                                   psm_i64 r, int from)
{
    for (int j = from; j <= call.nodes; ++j) {
        const psm_i64 at = r * (call.nodes + 1) + j;
        outputs.tokens[at] = -1;
        if (call.want_path)
            outputs.path_nodes[at] = -1;
        if (call.want_logprobs)
            outputs.logprobs[at] = psm_bits_float(0x7fc00000u); /* NaN */
    }
}

/* The part of row `row` (as psm_stage_verify_totals numbers them) that
 * holds `pick` (< the row's total): the parts' partials scanned in item
 * order, a round of the group's size at a time; *before gets the sum of
 * the parts before it. Every item gets the same. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN int psm_verify_find_part(PSM_TEAM_TYPE team, const psm_verify_call call,
                                      PSM_GLOBAL const psm_u64 *partials, psm_i64 row,
                                      psm_u64 pick, psm_u64 *before,
                                      PSM_LOCAL psm_verify_scratch *scratch)
{
    const int parts = psm_verify_parts(call.vocab);
    if (psm_group_item() == 0) { /* where no part holds it: the last, read whole */
        scratch->found = (psm_u64)(parts - 1);
        scratch->found_before = 0;
    }
    psm_group_barrier();
    psm_u64 passed = 0; /* the sum of the earlier rounds' parts */
    for (int round = 0; round < parts && pick >= passed; round += psm_group_size()) {
        const int j = round + psm_group_item();
        const psm_u64 part = j < parts ? partials[row * parts + j] : 0u;
        psm_u64 all = 0;
        const psm_u64 through =
            passed + psm_group_inclusive_scan_u64(team, part, &all, &scratch->group);
        if (part != 0 && pick >= through - part && pick < through) {
            scratch->found = (psm_u64)j;
            scratch->found_before = through - part;
        }
        passed += all;
    }
    psm_group_barrier();
    *before = scratch->found_before;
    return (int)scratch->found;
}

/* Phase 2 for request r: section 7's walk, with its seed, offset and stream.
 * A bad request (a bad target row or parameter, or a bad draft node, which
 * only arrays in device memory leave for this phase: the host fails the
 * call on the others) gets -1 everywhere. A first test at a node is taken
 * from phase 1's decisions within bounds (psm_verify_decide_within)
 * where they decide it, so a walk down accepted drafts
 * reads no total; a total is summed from its partials where it is first
 * used (target_total 0: not yet), as phase 1 listed it. */
PSM_TEAM_TEMPLATE
PSM_LOCAL_FN void psm_stage_verify_walk(PSM_TEAM_TYPE team, const psm_verify_call call,
                                        const psm_verify_arrays arrays,
                                        const psm_verify_outputs outputs, psm_i64 r,
                                        psm_u64 seed, psm_u64 offset, psm_u32 stream,
                                        PSM_LOCAL psm_verify_scratch *scratch)
{
    const int k = call.nodes;
    const int writer = psm_group_item() == 0;
    /* Each node's token, parent, status and first test within bounds (as
     * phase 1 decided it), an item a node, so that their loads go side by
     * side and the walk below loads nothing per node it passes. */
    const int request_bad = arrays.request_bad[r] != 0;
    for (int node = 1 + psm_group_item(); node <= k; node += psm_group_size()) {
        const psm_i64 at = r * k + node - 1;
        scratch->node_token[node - 1] = arrays.tokens[at];
        scratch->node_parent[node - 1] = call.has_parents ? arrays.parents[at] : node - 1;
        scratch->decided[node - 1] = request_bad || arrays.node_status[at] != PSM_NODE_GOOD
                                         ? PSM_VERIFY_NODE_BAD
                                         : arrays.node_decided[at];
    }
    psm_group_barrier();
    int bad = request_bad;
    for (int node = 1; node <= k; ++node)
        bad |= scratch->decided[node - 1] == PSM_VERIFY_NODE_BAD;
    if (bad) {
        if (writer) {
            outputs.accepted[r] = -1;
            psm_verify_tail(call, outputs, r, 0);
        }
        return;
    }
    int node = 0, emitted = 0;
    for (;;) {
        const psm_i64 target_row = r * (k + 1) + node;
        const psm_verify_dist target = psm_verify_target_dist(call, arrays, r, node);
        psm_u64 target_total = 0; /* G: summed where first used (0: not yet) */
        psm_u64 residual_total = 0;
        int steps = 0, accepted_child = 0;
        for (int child = node + 1; child <= k; ++child) {
            const psm_i64 at = r * k + child - 1;
            if (scratch->node_parent[child - 1] != node)
                continue;
            const psm_i32 token = scratch->node_token[child - 1];
            const int decided = steps == 0 ? scratch->decided[child - 1] : PSM_TEST_UNDECIDED;
            int accepted = decided == PSM_TEST_ACCEPTED;
            psm_u64 draft_total = 0;
            if (!accepted) { /* a test with the exact totals, or a rejection */
                target_total = psm_verify_target_total(team, call, arrays.partials, target_row,
                                                       target_total, scratch);
                if (steps == 0)
                    residual_total = target_total;
                draft_total = psm_verify_draft_total(team, call, arrays.partials, r, child, scratch);
            }
            if (decided == PSM_TEST_UNDECIDED)
                accepted = psm_draft_accepted(
                    psm_sample_bits(seed, offset, stream, (psm_u32)child).tile,
                    arrays.node_drawn[at], draft_total,
                    psm_verify_residual(call, arrays, r, target, steps, token, scratch),
                    residual_total);
            if (accepted) {
                psm_u64 weight = 0;
                if (call.want_logprobs) {
                    target_total = psm_verify_target_total(team, call, arrays.partials,
                                                           target_row, target_total, scratch);
                    weight = psm_verify_weight(target, token);
                }
                if (writer)
                    psm_verify_emit(call, outputs, r, emitted, token, node, weight, target_total);
                ++emitted;
                accepted_child = child;
                break;
            }
            /* Rejected: the residual step, recorded for the tokens' recomputation. */
            if (writer) {
                scratch->step_node[steps] = child;
                scratch->step_q_total[steps] = draft_total;
                scratch->step_r_total[steps] = residual_total;
            }
            psm_group_barrier();
            psm_u64 high = 0, low = 0;
            for (int i = psm_group_item(); i < call.vocab; i += psm_group_size()) {
                const psm_u128 excess =
                    psm_verify_excess(call, arrays, r, target, steps, i, scratch);
                if (excess.high > high || (excess.high == high && excess.low > low)) {
                    high = excess.high;
                    low = excess.low;
                }
            }
            psm_u128 largest;
            largest.high = psm_group_max_u64(team, high, &scratch->group);
            largest.low = psm_group_max_u64(team, high == largest.high ? low : 0u, &scratch->group);
            const int shift = psm_residual_shift(largest, call.weight_bits);
            if (writer)
                scratch->step_shift[steps] = shift;
            psm_group_barrier();
            psm_u64 sum = 0;
            for (int i = psm_group_item(); i < call.vocab; i += psm_group_size())
                sum += psm_u128_shift_right(
                    psm_verify_excess(call, arrays, r, target, steps, i, scratch), shift);
            residual_total = psm_group_sum_u64(team, sum, &scratch->group);
            ++steps;
        }
        if (accepted_child) {
            node = accepted_child;
            continue;
        }
        /* No child accepted (or none): the correction or bonus token from
         * the residual at this node, words 2-3 of its counter. Without a
         * rejection here the residual is P, whose parts' sums are the
         * totals' partials: the pick's part is found from them and only
         * its tokens are read. Each item sums a contiguous run of the
         * tokens searched; the one whose run holds the pick finds the token
         * in it. */
        target_total = psm_verify_target_total(team, call, arrays.partials, target_row,
                                               target_total, scratch);
        if (steps == 0)
            residual_total = target_total;
        const psm_draw_bits bits = psm_sample_bits(seed, offset, stream, (psm_u32)node);
        const psm_u64 pick = psm_pick(bits.token, residual_total);
        int low = 0, high = call.vocab;
        psm_u64 before = 0;
        if (steps == 0) {
            low = psm_verify_find_part(team, call, arrays.partials, target_row, pick, &before,
                                       scratch) *
                  PSM_VERIFY_PART;
            high = low + PSM_VERIFY_PART < call.vocab ? low + PSM_VERIFY_PART : call.vocab;
        }
        const int run = (high - low + psm_group_size() - 1) / psm_group_size();
        const int begin =
            low + psm_group_item() * run < high ? low + psm_group_item() * run : high;
        const int end = begin + run < high ? begin + run : high;
        psm_u64 own = 0;
        for (int i = begin; i < end; ++i)
            own += psm_verify_residual(call, arrays, r, target, steps, i, scratch);
        psm_u64 all = 0;
        const psm_u64 through =
            before + psm_group_inclusive_scan_u64(team, own, &all, &scratch->group);
        psm_u64 running = through - own;
        if (pick >= running && pick < through) {
            for (int i = begin; i < end; ++i) {
                running += psm_verify_residual(call, arrays, r, target, steps, i, scratch);
                if (running > pick) {
                    scratch->found = (psm_u64)i;
                    break;
                }
            }
        }
        psm_group_barrier();
        const psm_i32 token = (psm_i32)scratch->found;
        if (writer) {
            psm_verify_emit(call, outputs, r, emitted, token, node,
                            psm_verify_weight(target, token), target_total);
            outputs.accepted[r] = emitted;
            psm_verify_tail(call, outputs, r, emitted + 1);
        }
        psm_group_barrier();
        return;
    }
}

PSM_STAGE_END

#endif /* PSM_STAGE_VERIFY_H */
