/* sharded.c: psm_sample over one rank's shard of rows split by vocabulary
 * (docs/SAMPLING.md, section 8). The contract's quantities are integers or
 * short fixed float sequences of one token's logit, so a row splits into
 * per-shard partials that combine exactly in any order: the row's best key
 * and valid count, radix histograms (counts and g_i masses) for the top-k
 * and top-p cutoffs, the best kept key and kept mass of the tiles a shard
 * boundary cuts, the T_t of the tiles a shard holds whole. Each round every
 * rank sends the same-sized record, every rank combines all of them the
 * same way, so every rank takes the same decisions; the rank that holds a
 * drawn token reports it in the last round.
 *
 * Core holds the rounds: the records, their checks and every decision taken
 * from the combined records, on the host. What reads the shard's logits is
 * the backend's: the passes of core/psm_shard_pass.h, each over a list of
 * rows or draws, answering a few words each in host memory. */
#include "alloc.h"
#include "backend.h"
#include "context.h"
#include "error.h"
#include "psm_contract.h"
#include "psm_row.h"
#include "psm_shard_pass.h"
#include "validate.h"

#include <stdint.h>
#include <string.h>

_Static_assert(PSM_LOGITS_F32 == PSM_DTYPE_F32 && PSM_LOGITS_F16 == PSM_DTYPE_F16 &&
                   PSM_LOGITS_BF16 == PSM_DTYPE_BF16,
               "the passes' dtype ids are psm_dtype's");

/* A record: this header, then the round's words per row. */
#define HEADER_WORDS 4
#define ROUND_MAGIC 0x7073686172640000ull /* "pshard" */
#define RADIX_BUCKETS 256
#define RADIX_LEVELS 8

enum round_kind {
    ROUND_SUMMARY = 1,     /* per row: best key, valid count, bad */
    ROUND_SELECT = 2,      /* per row: 256 x (count, mass) of one radix level */
    ROUND_CUT_MAXIMA = 3,  /* per row: best kept key of the first and last tile */
    ROUND_MASSES = 4,      /* per row: kept mass of the first and last tile, whole tiles' T */
    ROUND_DRAWS = 5,       /* per row and sample: token, logprob bits */
    ROUND_DONE = 6
};

enum row_status { ROW_SAMPLE, ROW_GREEDY, ROW_BAD };
enum search { SEARCH_NONE, SEARCH_TOP_K, SEARCH_TOP_P };

typedef struct shard_row {
    psm_row_params p;
    int status;
    psm_u64 best_key;  /* the row's largest rank key */
    psm_u64 own_best;  /* this shard's largest (a combined one below it: a corrupt exchange) */
    psm_u64 valid;
    float row_max, scale;
    int top_p_on;
    /* the cutoff search (psm_radix_select's, level by level over the ranks) */
    int search, level, by_mass;
    psm_u64 prefix, need, lower_bound, cutoff, min_weight;
    psm_u64 total; /* sum of T_t over the row */
} shard_row;

/* A shard of the row as every rank sees it (from the summary round). */
typedef struct shard_span {
    int64_t first, count;
    int64_t first_tile, last_tile;
} shard_span;

struct psm_sharded {
    psm_context *context; /* its backend runs the passes over the shard */
    psm_request request;  /* the shard's call: logits are rows x shard_vocab */
    psm_shard shard;
    psm_shard_geometry geometry;
    psm_shard_item *item; /* a pass's items: max(rows, draws) of them */
    int check_rows;
    int weight_bits;
    int64_t rows;             /* output rows */
    int64_t local_tiles;      /* tiles this shard touches */
    int round, select_round;  /* the kind of the record out; radix rounds so far */
    /* A radix round's record holds the rows still searching only (every
     * rank knows which): select_slot[r] is row r's place in it, or -1. */
    int64_t *select_slot;
    int64_t select_rows;
    psm_u64 *send;
    size_t send_words, send_capacity;
    shard_row *row;
    psm_u64 *local_key;       /* rows x local_tiles: best kept key of this shard's part */
    psm_u64 *local_mass;      /* rows x local_tiles: kept mass of this shard's part */
    psm_u64 *tile_key;        /* rows x local_tiles: each tile's m_t (combined when cut) */
    shard_span span[PSM_MAX_SHARDS]; /* by shard_index */
    int order[PSM_MAX_SHARDS];        /* shard indices by first token */
    /* The cut tiles' combined values, per row: best kept key and mass of the
     * first and last tile of every shard (2 x shard_count entries). */
    psm_u64 *cut_key, *cut_mass;
    int *draw_owner;          /* rows x num_samples: the shard that holds each draw */
    psm_u64 *pick;            /* draws x 2: the pick pass's token and weight */
    psm_u64 *pick_mass, *pick_rescaled; /* draws: kept mass and T_t of the pick's tile */
    int32_t *tokens_out;      /* rows x num_samples, written to the caller at the end */
    float *logprobs_out;
};

/* ---- the backend's passes over the shard ---------------------------------- */

/* Item i of the next pass, reading nothing until the caller names a row. */
static psm_shard_item *clear_item(psm_sharded *call, int64_t i)
{
    psm_shard_item *item = &call->item[i];
    memset(item, 0, sizeof *item);
    item->logits_row = -1;
    return item;
}

/* An item reading row r with its kept rule (its cutoff and min-p). */
static psm_shard_item *rule_item(psm_sharded *call, int64_t i, const shard_row *row)
{
    psm_shard_item *item = clear_item(call, i);
    item->logits_row = row->p.logits_row;
    item->cutoff = row->cutoff;
    item->min_weight = row->min_weight;
    item->row_max = row->row_max;
    item->scale = row->scale;
    return item;
}

static psm_status run_pass(psm_sharded *call, int kind, int64_t items, const psm_u64 *tile_keys,
                           psm_u64 *out)
{
    if (items == 0)
        return PSM_OK;
    /* The backends read the rows an item names without checking them. */
    int64_t reading = 0;
    for (int64_t i = 0; i < items; ++i) {
        if (call->item[i].logits_row >= call->request.logits.rows)
            return psm_set_error(PSM_ERR_INTERNAL,
                                 "sharded call: pass item %lld names row %lld of %lld",
                                 (long long)i, (long long)call->item[i].logits_row,
                                 (long long)call->request.logits.rows);
        reading += call->item[i].logits_row >= 0;
    }
    /* Nothing to read (greedy or bad rows only, draws all another shard's):
     * a GPU pass would still cost a round trip to the device. */
    if (reading == 0) {
        memset(out, 0,
               (size_t)items * (size_t)psm_shard_pass_words(kind, call->local_tiles) *
                   sizeof *out);
        return PSM_OK;
    }
    call->geometry.kind = kind;
    return call->context->ops->shard_pass(call->context->state, &call->request.logits,
                                          &call->geometry, call->item, items, tile_keys, out);
}

static int64_t tile_end(const psm_sharded *call, int64_t tile)
{
    const int64_t end = (tile + 1) * PSM_TILE;
    return end < call->shard.full_vocab ? end : call->shard.full_vocab;
}

/* Is the tile whole in this span (no other shard holds a part of it)? */
static int tile_whole_in(const psm_sharded *call, const shard_span *span, int64_t tile)
{
    return tile * PSM_TILE >= span->first &&
           tile_end(call, tile) <= span->first + span->count;
}

/* ---- records ------------------------------------------------------------ */

static size_t round_words_per_row(const psm_sharded *call, int kind)
{
    switch (kind) {
    case ROUND_SUMMARY: return 3;
    case ROUND_SELECT: return 2 * RADIX_BUCKETS;
    case ROUND_CUT_MAXIMA: return 2;
    case ROUND_MASSES: return 3;
    case ROUND_DRAWS: return 2 * (size_t)call->request.params.num_samples;
    default: return 0;
    }
}

static psm_u64 round_tag(const psm_sharded *call)
{
    return ROUND_MAGIC | ((psm_u64)call->round << 8) | (psm_u64)call->select_round;
}

/* Sizes the send record for the current round and writes its header; the
 * payload (rows x words) is zeroed. */
static psm_status open_record(psm_sharded *call)
{
    const int64_t entries = call->round == ROUND_SELECT ? call->select_rows : call->rows;
    const size_t words = HEADER_WORDS + (size_t)entries * round_words_per_row(call, call->round);
    if (words > call->send_capacity) {
        psm_u64 *grown = psm_alloc(words * sizeof *grown);
        if (!grown)
            return psm_set_error(PSM_ERR_OUT_OF_MEMORY,
                                 "sharded call: %zu bytes for a round's record",
                                 words * sizeof *grown);
        psm_free(call->send);
        call->send = grown;
        call->send_capacity = words;
    }
    memset(call->send, 0, words * sizeof *call->send);
    call->send_words = words;
    call->send[0] = round_tag(call);
    call->send[1] = (psm_u64)call->shard.shard_index;
    call->send[2] = (psm_u64)call->shard.first_token;
    call->send[3] = (psm_u64)call->request.logits.vocab;
    return PSM_OK;
}

static const psm_u64 *record_of(const psm_sharded *call, const psm_u64 *gathered, int shard)
{
    return gathered + (size_t)shard * call->send_words;
}

static const psm_u64 *row_words(const psm_sharded *call, const psm_u64 *record, int64_t row)
{
    return record + HEADER_WORDS + (size_t)row * round_words_per_row(call, call->round);
}

static psm_u64 *send_row(psm_sharded *call, int64_t row)
{
    return call->send + HEADER_WORDS + (size_t)row * round_words_per_row(call, call->round);
}

/* The gathered records must be this round's, one per shard in order, each
 * naming the span its shard named in the summary round. */
static psm_status check_gathered(psm_sharded *call, const void *gathered, size_t bytes)
{
    const size_t expected = (size_t)call->shard.shard_count * call->send_words * sizeof(psm_u64);
    if (!gathered)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "sharded call: gathered is NULL");
    if (bytes != expected)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "sharded call: gathered_bytes is %zu; this round's all-gather is "
                             "%d x %zu = %zu bytes",
                             bytes, (int)call->shard.shard_count,
                             call->send_words * sizeof(psm_u64), expected);
    for (int s = 0; s < call->shard.shard_count; ++s) {
        const psm_u64 *record = record_of(call, gathered, s);
        if (record[0] != round_tag(call) || record[1] != (psm_u64)s)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: gathered record %d is not shard %d's record of "
                                 "this round (ranks out of step, or not in shard_index order)",
                                 s, s);
        if (call->round != ROUND_SUMMARY &&
            (record[2] != (psm_u64)call->span[s].first || record[3] != (psm_u64)call->span[s].count))
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: shard %d changed its columns between rounds", s);
    }
    return PSM_OK;
}

/* ---- round 1: the row's best key, valid count and bad flag -------------- */

static psm_status send_summary(psm_sharded *call)
{
    /* A row with a parameter out of range is not read: every rank marks it
     * bad. The record's row words are the pass's output. */
    for (int64_t r = 0; r < call->rows; ++r)
        if (call->row[r].p.valid)
            clear_item(call, r)->logits_row = call->row[r].p.logits_row;
        else
            clear_item(call, r);
    psm_status status = run_pass(call, PSM_SHARD_PASS_SUMMARY, call->rows, NULL, send_row(call, 0));
    for (int64_t r = 0; r < call->rows && status == PSM_OK; ++r)
        call->row[r].own_best = send_row(call, r)[0];
    return status;
}

/* The shards' spans from their headers: they must tile the full row. */
static psm_status take_spans(psm_sharded *call, const psm_u64 *gathered)
{
    const int n = call->shard.shard_count;
    for (int s = 0; s < n; ++s) {
        const psm_u64 *record = record_of(call, gathered, s);
        const psm_u64 full = (psm_u64)call->shard.full_vocab;
        if (record[2] >= full || record[3] < 1 || record[3] > full - record[2])
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: shard %d's record names columns outside the "
                                 "full row (a corrupt exchange)",
                                 s);
        shard_span *span = &call->span[s];
        span->first = (int64_t)record[2];
        span->count = (int64_t)record[3];
        span->first_tile = span->first / PSM_TILE;
        span->last_tile = (span->first + span->count - 1) / PSM_TILE;
        call->order[s] = s;
    }
    for (int a = 1; a < n; ++a) /* insertion sort by first token: n is small */
        for (int b = a; b > 0 && call->span[call->order[b]].first <
                                     call->span[call->order[b - 1]].first; --b) {
            const int swap = call->order[b];
            call->order[b] = call->order[b - 1];
            call->order[b - 1] = swap;
        }
    int64_t next = 0;
    for (int k = 0; k < n; ++k) {
        const shard_span *span = &call->span[call->order[k]];
        if (span->first != next)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: the shards do not cover the row without "
                                 "overlap: a shard starts at token %lld where %lld was expected",
                                 (long long)span->first, (long long)next);
        next += span->count;
    }
    if (next != call->shard.full_vocab)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "sharded call: the shards cover %lld tokens; full_vocab is %lld",
                             (long long)next, (long long)call->shard.full_vocab);
    return PSM_OK;
}

static void start_search(shard_row *row, int search, psm_u64 need, psm_u64 lower_bound)
{
    row->search = search;
    row->by_mass = search == SEARCH_TOP_P;
    row->level = 0;
    row->prefix = 0;
    row->need = need;
    row->lower_bound = lower_bound;
}

static psm_status take_summary(psm_sharded *call, const psm_u64 *gathered)
{
    psm_status status = take_spans(call, gathered);
    if (status != PSM_OK)
        return status;
    for (int64_t r = 0; r < call->rows; ++r) {
        shard_row *row = &call->row[r];
        psm_u64 best = 0, valid = 0, bad = 0;
        for (int s = 0; s < call->shard.shard_count; ++s) {
            const psm_u64 *in = row_words(call, record_of(call, gathered, s), r);
            best = in[0] > best ? in[0] : best;
            valid += in[1];
            bad |= in[2];
        }
        /* Honest records give a finite logit (a bad row is flagged); a
         * corrupt one must not reach the weights' float-to-integer steps. */
        if (best < row->own_best ||
            (best != 0 && (psm_logit_class(psm_rank_key_logit(best)) != PSM_LOGIT_VALID ||
                           psm_rank_key_token(best) >= (psm_u64)call->shard.full_vocab)))
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: row %lld's best key is below this shard's, or "
                                 "not a finite logit of a token of the row (a corrupt "
                                 "exchange)",
                                 (long long)r);
        row->best_key = best;
        row->valid = valid;
        if (!row->p.valid || bad || valid == 0) {
            row->status = ROW_BAD;
            if (call->check_rows)
                return psm_set_error(PSM_ERR_BAD_ROW,
                                     "row %lld has a NaN or +inf logit, no finite logit, or a "
                                     "parameter out of range (checking mode; nothing was "
                                     "written)",
                                     (long long)r);
            continue;
        }
        if (psm_is_greedy(row->p.temperature)) {
            row->status = ROW_GREEDY;
            continue;
        }
        row->status = ROW_SAMPLE;
        row->row_max = psm_rank_key_logit(best);
        row->scale = psm_inverse_temperature_scale(row->p.temperature);
        row->min_weight = psm_min_p_threshold(row->p.min_p, call->weight_bits);
        row->top_p_on = row->p.top_p < 1.0f;
        if (psm_top_k_active(row->p.top_k, (psm_i64)valid))
            start_search(row, SEARCH_TOP_K, (psm_u64)row->p.top_k, 0);
        else if (row->top_p_on)
            start_search(row, SEARCH_TOP_P, 0, 0);
    }
    return PSM_OK;
}

/* ---- radix rounds: the top-k and top-p cutoffs ----------------------------
 * psm_radix_select (kernels/psm_stage_select.h) with the tally summed over
 * the shards: the same levels, buckets, choices and cutoffs. */

/* Numbers the rows still searching (their slots in the next radix record);
 * returns how many there are. */
static int64_t number_searching_rows(psm_sharded *call)
{
    int64_t slots = 0;
    for (int64_t r = 0; r < call->rows; ++r)
        call->select_slot[r] =
            call->row[r].status == ROW_SAMPLE && call->row[r].search != SEARCH_NONE ? slots++
                                                                                   : -1;
    call->select_rows = slots;
    return slots;
}

/* The record holds the searching rows' tallies (count, mass per bucket) in
 * slot order, as the pass writes them. */
static psm_status send_select(psm_sharded *call)
{
    for (int64_t r = 0; r < call->rows; ++r) {
        const shard_row *row = &call->row[r];
        if (call->select_slot[r] < 0)
            continue;
        psm_shard_item *item = clear_item(call, call->select_slot[r]);
        item->logits_row = row->p.logits_row;
        item->lower_bound = row->lower_bound;
        item->prefix = row->prefix;
        item->level = row->level;
        item->by_mass = row->by_mass;
        item->row_max = row->row_max;
        item->scale = row->scale;
    }
    return run_pass(call, PSM_SHARD_PASS_TALLY, call->select_rows, NULL, send_row(call, 0));
}

/* A finished search: top-k's cutoff starts top-p's search above it. */
static void finish_search(shard_row *row, psm_u64 cutoff)
{
    row->cutoff = cutoff > row->lower_bound ? cutoff : row->lower_bound;
    if (row->search == SEARCH_TOP_K && row->top_p_on)
        start_search(row, SEARCH_TOP_P, 0, row->cutoff);
    else
        row->search = SEARCH_NONE;
}

static void take_select(psm_sharded *call, const psm_u64 *gathered)
{
    for (int64_t r = 0; r < call->rows; ++r) {
        shard_row *row = &call->row[r];
        if (call->select_slot[r] < 0)
            continue;
        psm_u64 count[RADIX_BUCKETS] = {0}, mass[RADIX_BUCKETS] = {0};
        for (int s = 0; s < call->shard.shard_count; ++s) {
            const psm_u64 *in =
                row_words(call, record_of(call, gathered, s), call->select_slot[r]);
            for (int b = 0; b < RADIX_BUCKETS; ++b) {
                count[b] += in[2 * b];
                mass[b] += in[2 * b + 1];
            }
        }
        const int shift = 64 - 8 * (row->level + 1);
        if (row->level == 0 && row->by_mass && row->need == 0) {
            psm_u64 total = 0;
            for (int b = 0; b < RADIX_BUCKETS; ++b)
                total += mass[b];
            const psm_u64 target = psm_top_p_target(total, row->p.top_p);
            row->need = target > 1 ? target : 1;
        }
        int chosen = RADIX_BUCKETS;
        psm_u64 above = 0, running = 0;
        for (int b = RADIX_BUCKETS - 1; b >= 0; --b) {
            const psm_u64 amount = row->by_mass ? mass[b] : count[b];
            if (running + amount >= row->need) {
                chosen = b;
                above = running;
                break;
            }
            running += amount;
        }
        if (chosen == RADIX_BUCKETS) { /* cannot happen: need <= the level's total */
            finish_search(row, row->level == 0 ? 0 : row->prefix << (shift + 8));
        } else if (count[chosen] == 1 || (!row->by_mass && above + count[chosen] == row->need) ||
                   row->level == RADIX_LEVELS - 1) {
            finish_search(row, ((row->prefix << 8) | (psm_u64)chosen) << shift);
        } else {
            row->prefix = (row->prefix << 8) | (psm_u64)chosen;
            row->need -= above;
            ++row->level;
        }
    }
}

/* ---- the kept tile masses ----------------------------------------------- */

/* Best kept key of this shard's part of each tile it touches; the record
 * has the first and the last (the ones a boundary may cut). */
static psm_status send_cut_maxima(psm_sharded *call)
{
    for (int64_t r = 0; r < call->rows; ++r)
        if (call->row[r].status == ROW_SAMPLE)
            rule_item(call, r, &call->row[r]);
        else
            clear_item(call, r);
    const psm_status status =
        run_pass(call, PSM_SHARD_PASS_TILE_MAXIMA, call->rows, NULL, call->local_key);
    for (int64_t r = 0; r < call->rows && status == PSM_OK; ++r) {
        if (call->row[r].status != ROW_SAMPLE)
            continue;
        const psm_u64 *keys = call->local_key + r * call->local_tiles;
        psm_u64 *out = send_row(call, r);
        out[0] = keys[0];
        out[1] = keys[call->local_tiles - 1];
    }
    return status;
}

/* Every shard's first and last tile's combined value: the max (keys) or
 * the sum (masses) over the shards whose part of that tile was sent. */
static void combine_cut(psm_sharded *call, const psm_u64 *gathered, int64_t r, int is_sum,
                        psm_u64 *combined)
{
    const int n = call->shard.shard_count;
    for (int s = 0; s < n; ++s)
        for (int end = 0; end < 2; ++end) {
            const int64_t tile = end ? call->span[s].last_tile : call->span[s].first_tile;
            psm_u64 value = 0;
            for (int o = 0; o < n; ++o) {
                const shard_span *other = &call->span[o];
                const psm_u64 *in = row_words(call, record_of(call, gathered, o), r);
                if (other->first_tile == tile)
                    value = is_sum ? value + in[0] : (in[0] > value ? in[0] : value);
                if (other->last_tile == tile && other->last_tile != other->first_tile)
                    value = is_sum ? value + in[1] : (in[1] > value ? in[1] : value);
            }
            combined[2 * s + end] = value;
        }
}

static psm_u64 tile_rescaled(const shard_row *row, psm_u64 key, psm_u64 mass)
{
    return mass != 0 ? psm_rescale_mass(mass, psm_scaled_gap(row->row_max,
                                                             psm_rank_key_logit(key), row->scale))
                     : 0;
}

/* m_t of this shard's tile t (local index): combined for a cut tile. */
static psm_u64 local_tile_key(const psm_sharded *call, int64_t r, int64_t t)
{
    const int me = call->shard.shard_index;
    if (t == 0)
        return call->cut_key[(size_t)r * 2 * call->shard.shard_count + 2 * me];
    if (t == call->local_tiles - 1)
        return call->cut_key[(size_t)r * 2 * call->shard.shard_count + 2 * me + 1];
    return call->local_key[r * call->local_tiles + t];
}

/* The kept masses of this shard's parts: the record has the cut first and
 * last tiles' and the sum of T_t over the tiles it holds whole. */
static psm_status send_masses(psm_sharded *call)
{
    const shard_span *me = &call->span[call->shard.shard_index];
    for (int64_t r = 0; r < call->rows; ++r) {
        if (call->row[r].status != ROW_SAMPLE) {
            clear_item(call, r);
            continue;
        }
        rule_item(call, r, &call->row[r]);
        for (int64_t t = 0; t < call->local_tiles; ++t)
            call->tile_key[r * call->local_tiles + t] = local_tile_key(call, r, t);
    }
    const psm_status status = run_pass(call, PSM_SHARD_PASS_TILE_MASSES, call->rows,
                                       call->tile_key, call->local_mass);
    for (int64_t r = 0; r < call->rows && status == PSM_OK; ++r) {
        const shard_row *row = &call->row[r];
        if (row->status != ROW_SAMPLE)
            continue;
        const psm_u64 *masses = call->local_mass + r * call->local_tiles;
        psm_u64 whole_rescaled = 0;
        for (int64_t t = 0; t < call->local_tiles; ++t)
            if (tile_whole_in(call, me, me->first_tile + t))
                whole_rescaled +=
                    tile_rescaled(row, call->tile_key[r * call->local_tiles + t], masses[t]);
        psm_u64 *out = send_row(call, r);
        out[0] = tile_whole_in(call, me, me->first_tile) ? 0 : masses[0];
        out[1] = tile_whole_in(call, me, me->last_tile) ? 0 : masses[call->local_tiles - 1];
        out[2] = whole_rescaled;
    }
    return status;
}

/* ---- the draw ------------------------------------------------------------ *
 * The full row's tiles in order are runs of tiles a shard holds whole (their
 * T_t known to that shard, their sum to all) and cut tiles (T_t known to
 * all). A draw's tile bits choose a run or a cut tile; a run's shard finds
 * the tile and the token, a cut tile's token bits choose the part (its
 * shards' kept masses in token order) and the part's shard finds the token. */

/* Segment `end` of shard s in the full row's tile order (0: its first tile
 * when a boundary cuts it, 1: its run of whole tiles, 2: its last tile when
 * cut) and that segment's T: the run's sum from shard s's masses record, a
 * cut tile's T_t from the combined m_t and S_t. A tile the shard holds
 * whole belongs to its run, and a cut tile already counted (*last_cut, the
 * previous shard's last tile) is 0 here. *tile: the cut tile, or -1. */
static psm_u64 segment_rescaled(const psm_sharded *call, const psm_u64 *gathered, int64_t r,
                                int s, int end, int64_t *last_cut, int64_t *tile)
{
    const shard_span *span = &call->span[s];
    const size_t at = (size_t)r * 2 * call->shard.shard_count + 2 * (size_t)s + (end == 2);
    *tile = -1;
    if (end == 1)
        return row_words(call, record_of(call, gathered, s), r)[2];
    const int64_t cut = end == 2 ? span->last_tile : span->first_tile;
    if (tile_whole_in(call, span, cut) || cut == *last_cut)
        return 0;
    *last_cut = *tile = cut;
    return tile_rescaled(&call->row[r], call->cut_key[at], call->cut_mass[at]);
}

typedef struct draw_place {
    int owner;        /* the shard that finds the token */
    int64_t tile;     /* -1: a tile of the owner's whole run, found by the owner */
    psm_u64 within;   /* the tile bits' pick left within the run, or the token pick left
                         within the owner's part of the cut tile */
    psm_u64 tile_mass, tile_rescaled; /* of the cut tile */
} draw_place;

/* Which shard holds the pick, from the combined masses of row r. */
static draw_place place_draw(const psm_sharded *call, const psm_u64 *gathered, int64_t r,
                             psm_draw_bits bits)
{
    const shard_row *row = &call->row[r];
    const int n = call->shard.shard_count;
    const psm_u64 *cut_mass = call->cut_mass + (size_t)r * 2 * n;
    const psm_u64 pick = psm_pick(bits.tile, row->total);
    psm_u64 running = 0;
    int64_t last_cut = -1;
    draw_place place = {0};
    for (int k = 0; k < n; ++k) {
        const int s = call->order[k];
        for (int end = 0; end < 3; ++end) {
            int64_t tile;
            const psm_u64 rescaled = segment_rescaled(call, gathered, r, s, end, &last_cut, &tile);
            if (!(pick < running + rescaled)) {
                running += rescaled;
                continue;
            }
            if (tile < 0) { /* shard s's run: it finds the tile */
                place.owner = s;
                place.tile = -1;
                place.within = pick - running;
                return place;
            }
            /* The token pick over the cut tile's parts, in token order. */
            const psm_u64 mass = cut_mass[2 * s + (end == 2)];
            psm_u64 token_pick = psm_pick(bits.token, mass), before = 0;
            place.tile = tile;
            place.tile_mass = mass;
            place.tile_rescaled = rescaled;
            for (int j = 0; j < n; ++j) {
                const int o = call->order[j];
                const shard_span *other = &call->span[o];
                if (tile < other->first_tile || tile > other->last_tile)
                    continue;
                const psm_u64 *in = row_words(call, record_of(call, gathered, o), r);
                const psm_u64 part = tile == other->first_tile ? in[0] : in[1];
                if (token_pick < before + part) {
                    place.owner = o;
                    place.within = token_pick - before;
                    return place;
                }
                before += part;
            }
            place.owner = -1; /* cannot happen: the pick is below the tile's mass */
            return place;
        }
    }
    place.owner = -1; /* cannot happen: the pick is below the row's total */
    return place;
}

/* The pick item of this shard's draw `at`: its tile (for a run's draw,
 * found from this shard's whole tiles' T_t) and the token pick within this
 * shard's part of it; the tile's kept mass and T_t are kept for its
 * logprob. Leaves the item reading nothing if no tile holds the pick (which
 * cannot happen: the picks are below the masses they pick in). */
static void prepare_pick(psm_sharded *call, int64_t r, size_t at, draw_place place,
                         psm_draw_bits bits)
{
    const shard_row *row = &call->row[r];
    const shard_span *me = &call->span[call->shard.shard_index];
    int64_t local = -1;
    psm_u64 mass = place.tile_mass, rescaled = place.tile_rescaled, token_pick = place.within;
    if (place.tile < 0) { /* a tile of this shard's whole run */
        psm_u64 running = 0;
        for (int64_t t = 0; t < call->local_tiles; ++t) {
            if (!tile_whole_in(call, me, me->first_tile + t))
                continue;
            const psm_u64 m = call->local_mass[r * call->local_tiles + t];
            const psm_u64 amount = tile_rescaled(row, local_tile_key(call, r, t), m);
            if (place.within < running + amount) {
                local = t;
                mass = m;
                rescaled = amount;
                break;
            }
            running += amount;
        }
        if (local < 0)
            return;
        token_pick = psm_pick(bits.token, mass);
    } else {
        local = place.tile - me->first_tile;
    }
    psm_shard_item *item = rule_item(call, (int64_t)at, row);
    item->tile = (psm_i32)local;
    item->pick = token_pick;
    item->reference = local_tile_key(call, r, local);
    call->pick_mass[at] = mass;
    call->pick_rescaled[at] = rescaled;
}

/* The cut tiles' m_t. Honest records give, for every tile, a key of a
 * finite logit at most M's and at least this shard's own part's; anything
 * else is a corrupt exchange, refused before a gap of the wrong sign or a
 * NaN reaches the weights. */
static psm_status take_cut_maxima(psm_sharded *call, const psm_u64 *gathered)
{
    const int n = call->shard.shard_count, me = call->shard.shard_index;
    for (int64_t r = 0; r < call->rows; ++r) {
        const shard_row *row = &call->row[r];
        if (row->status != ROW_SAMPLE)
            continue;
        psm_u64 *combined = call->cut_key + (size_t)r * 2 * n;
        combine_cut(call, gathered, r, 0, combined);
        const psm_u64 *own = call->local_key + r * call->local_tiles;
        int corrupt = combined[2 * me] < own[0] || combined[2 * me + 1] < own[call->local_tiles - 1];
        for (int k = 0; k < 2 * n; ++k)
            corrupt |= combined[k] != 0 &&
                       (combined[k] > row->best_key ||
                        psm_logit_class(psm_rank_key_logit(combined[k])) != PSM_LOGIT_VALID);
        if (corrupt)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: row %lld's tile maxima disagree with this "
                                 "shard's (a corrupt exchange)",
                                 (long long)r);
    }
    return PSM_OK;
}

/* The row totals, then where each draw lands: its owner and, for this
 * shard's draws, the token (kept until the draws round). */
static psm_status take_masses(psm_sharded *call, const psm_u64 *gathered)
{
    const int n = call->shard.shard_count;
    const int32_t samples = call->request.params.num_samples;
    const int64_t draws = call->rows * samples;
    for (int64_t at = 0; at < draws; ++at)
        clear_item(call, at);
    for (int64_t r = 0; r < call->rows; ++r) {
        shard_row *row = &call->row[r];
        if (row->status != ROW_SAMPLE)
            continue;
        psm_u64 *cut_mass = call->cut_mass + (size_t)r * 2 * n;
        combine_cut(call, gathered, r, 1, cut_mass);
        /* Every whole run and every cut tile once, as place_draw walks them. */
        psm_u64 total = 0;
        int64_t last_cut = -1, tile;
        for (int k = 0; k < n; ++k)
            for (int end = 0; end < 3; ++end)
                total += segment_rescaled(call, gathered, r, call->order[k], end, &last_cut, &tile);
        row->total = total;
        for (int32_t j = 0; j < samples; ++j) {
            const psm_draw_bits bits =
                psm_sample_bits(row->p.seed, row->p.offset, row->p.stream, (psm_u32)j);
            const draw_place place = place_draw(call, gathered, r, bits);
            const size_t at = (size_t)r * samples + j;
            call->draw_owner[at] = place.owner;
            if (place.owner == call->shard.shard_index)
                prepare_pick(call, r, at, place, bits);
        }
    }
    const psm_status status = run_pass(call, PSM_SHARD_PASS_PICK, draws, NULL, call->pick);
    for (int64_t at = 0; at < draws && status == PSM_OK; ++at) {
        if (call->draw_owner[at] != call->shard.shard_index ||
            call->row[at / samples].status != ROW_SAMPLE)
            continue;
        const psm_u64 token = call->pick[2 * at], weight = call->pick[2 * at + 1];
        const int found = call->item[at].logits_row >= 0 && token < (psm_u64)call->shard.full_vocab;
        /* Not found cannot happen: the picks are below the masses they pick in. */
        call->tokens_out[at] = found ? (psm_i32)token : -1;
        call->logprobs_out[at] =
            found ? psm_log_probability(weight, call->pick_mass[at], call->pick_rescaled[at],
                                        call->row[at / samples].total)
                  : psm_bits_float(0x7fc00000u);
    }
    return status;
}

static void send_draws(psm_sharded *call)
{
    const int32_t samples = call->request.params.num_samples;
    for (int64_t r = 0; r < call->rows; ++r) {
        if (call->row[r].status != ROW_SAMPLE)
            continue;
        psm_u64 *out = send_row(call, r);
        for (int32_t j = 0; j < samples; ++j) {
            const size_t at = (size_t)r * samples + j;
            if (call->draw_owner[at] != call->shard.shard_index)
                continue;
            out[2 * j] = (psm_u64)(psm_u32)call->tokens_out[at];
            out[2 * j + 1] = psm_float_bits(call->logprobs_out[at]);
        }
    }
}

static psm_status take_draws(psm_sharded *call, const psm_u64 *gathered)
{
    const int32_t samples = call->request.params.num_samples;
    for (int64_t r = 0; r < call->rows; ++r) {
        const shard_row *row = &call->row[r];
        for (int32_t j = 0; j < samples; ++j) {
            const size_t at = (size_t)r * samples + j;
            if (row->status == ROW_BAD) {
                call->tokens_out[at] = -1;
                call->logprobs_out[at] = psm_bits_float(0x7fc00000u);
            } else if (row->status == ROW_GREEDY) {
                call->tokens_out[at] = (psm_i32)psm_rank_key_token(row->best_key);
                call->logprobs_out[at] = 0.0f;
            } else if (call->draw_owner[at] < 0) {
                call->tokens_out[at] = -1; /* cannot happen (place_draw) */
                call->logprobs_out[at] = psm_bits_float(0x7fc00000u);
            } else {
                const psm_u64 *in =
                    row_words(call, record_of(call, gathered, call->draw_owner[at]), r);
                /* The owner draws a token of the row, or -1 (a corrupt
                 * exchange may give anything). */
                if (in[2 * j] >= (psm_u64)call->shard.full_vocab && in[2 * j] != 0xffffffffu)
                    return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                         "sharded call: row %lld's draw from shard %d is not a "
                                         "token of the row (a corrupt exchange)",
                                         (long long)r, call->draw_owner[at]);
                call->tokens_out[at] = (psm_i32)(psm_u32)in[2 * j];
                call->logprobs_out[at] = psm_bits_float((psm_u32)in[2 * j + 1]);
            }
        }
    }
    return PSM_OK;
}

/* ---- the public calls ---------------------------------------------------- */

void psm_sharded_end(psm_sharded *call)
{
    if (!call)
        return;
    psm_free(call->send);
    psm_free(call->row);
    psm_free(call->select_slot);
    psm_free(call->local_key);
    psm_free(call->local_mass);
    psm_free(call->tile_key);
    psm_free(call->item);
    psm_free(call->pick);
    psm_free(call->pick_mass);
    psm_free(call->pick_rescaled);
    psm_free(call->cut_key);
    psm_free(call->cut_mass);
    psm_free(call->draw_owner);
    psm_free(call->tokens_out);
    psm_free(call->logprobs_out);
    psm_free(call);
}

static psm_status check_shard(const psm_context *context, const psm_tensor *logits,
                              const psm_shard *shard, const psm_params *params,
                              const psm_output *tokens, const psm_output *logprobs)
{
    if (!shard)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "shard is NULL");
    if (shard->shard_count < 1 || shard->shard_count > PSM_MAX_SHARDS)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "shard_count is %d; expected 1 to %d (PSM_MAX_SHARDS)",
                             (int)shard->shard_count, PSM_MAX_SHARDS);
    if (shard->shard_index < 0 || shard->shard_index >= shard->shard_count)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "shard_index is %d; expected 0 to %d", (int)shard->shard_index,
                             (int)shard->shard_count - 1);
    if (shard->full_vocab < 1 || shard->full_vocab > (int64_t)INT32_MAX)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "full_vocab is %lld; expected 1 to 2^31 - 1",
                             (long long)shard->full_vocab);
    if (shard->first_token < 0 || logits->vocab > shard->full_vocab - shard->first_token)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                             "the shard's %lld columns from token %lld lie outside the full row "
                             "of %lld tokens",
                             (long long)logits->vocab, (long long)shard->first_token,
                             (long long)shard->full_vocab);
    if (!context->ops->shard_pass)
        return psm_set_error(PSM_ERR_UNSUPPORTED, "the %s backend has no sharded sampling",
                             psm_backend_name(context->backend));
    /* The rounds' decisions and the outputs are the host's: a GPU's
     * device-memory per-row arrays (and seed or offset pointers) would need
     * a copy back first, and device outputs a copy out. */
    const int device = context->backend != PSM_BACKEND_CPU;
    if (device && logits->memory == PSM_MEMORY_DEVICE && psm_request_per_row(params) != 0)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "sharded sampling reads per-row arrays, row_indices and the seed "
                             "and offset pointers on the host; with %s device logits they "
                             "would be device memory",
                             psm_backend_name(context->backend));
    if (device && (tokens->memory == PSM_MEMORY_DEVICE ||
                   (logprobs->data && logprobs->memory == PSM_MEMORY_DEVICE)))
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "sharded sampling writes its tokens and logprobs from the host: "
                             "give them in host memory on the %s backend",
                             psm_backend_name(context->backend));
    if (psm_processing_active(params) || params->top_logprobs ||
        params->filter_order != PSM_FILTER_ORDER_POLYSAMPLE)
        return psm_set_error(PSM_ERR_UNSUPPORTED,
                             "sharded sampling does not run logit processing, top-N logprobs "
                             "or filter orders other than POLYSAMPLE yet");
    return PSM_OK;
}

psm_status psm_sharded_begin(psm_context *context, const psm_tensor *logits_shard,
                             const psm_shard *shard, const psm_params *params,
                             psm_output tokens, psm_output logprobs, psm_sharded **call_out)
{
    psm_clear_error();
    if (!call_out)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "call is NULL");
    *call_out = NULL;
    if (!context)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "context is NULL");
    /* Validated without logit processing and top-N logprobs, which the
     * sharded call refuses (their token lists and outputs are the full
     * row's, not the shard's). */
    psm_params checked;
    if (params) {
        checked = *params;
        checked.processing = NULL;
        checked.top_logprobs = NULL;
    }
    psm_request request;
    psm_status status = psm_validate_request(logits_shard, params ? &checked : NULL, &tokens,
                                             &logprobs, NULL, 1, 0, &request);
    if (status == PSM_OK)
        status = check_shard(context, logits_shard, shard, params, &tokens, &logprobs);
    if (status != PSM_OK)
        return status;

    psm_sharded *call = psm_alloc_zeroed(1, sizeof *call);
    if (!call)
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "sharded call: its state");
    call->context = context;
    call->request = request;
    call->shard = *shard;
    call->check_rows = context->check_rows;
    call->weight_bits = psm_weight_bits(shard->full_vocab);
    call->rows = request.rows;
    shard_span *me = &call->span[shard->shard_index];
    me->first = shard->first_token;
    me->count = logits_shard->vocab;
    me->first_tile = me->first / PSM_TILE;
    me->last_tile = (me->first + me->count - 1) / PSM_TILE;
    call->local_tiles = me->last_tile - me->first_tile + 1;
    psm_shard_geometry *geometry = &call->geometry;
    geometry->row_stride = request.logits.row_stride;
    geometry->shard_vocab = logits_shard->vocab;
    geometry->first_token = shard->first_token;
    geometry->full_vocab = shard->full_vocab;
    geometry->first_tile = me->first_tile;
    geometry->local_tiles = call->local_tiles;
    geometry->dtype = (psm_i32)request.logits.dtype; /* the PSM_LOGITS_* of the same type */
    geometry->weight_bits = call->weight_bits;
    const size_t rows = (size_t)call->rows, n = (size_t)shard->shard_count;
    const size_t draws = rows * (size_t)params->num_samples;
    call->row = psm_alloc_zeroed(rows, sizeof *call->row);
    call->select_slot = psm_alloc_zeroed(rows, sizeof *call->select_slot);
    call->local_key = psm_alloc_zeroed(rows * (size_t)call->local_tiles, sizeof(psm_u64));
    call->local_mass = psm_alloc_zeroed(rows * (size_t)call->local_tiles, sizeof(psm_u64));
    call->tile_key = psm_alloc_zeroed(rows * (size_t)call->local_tiles, sizeof(psm_u64));
    call->item = psm_alloc_zeroed(draws > rows ? draws : rows, sizeof *call->item);
    call->pick = psm_alloc_zeroed(2 * draws, sizeof(psm_u64));
    call->pick_mass = psm_alloc_zeroed(draws, sizeof(psm_u64));
    call->pick_rescaled = psm_alloc_zeroed(draws, sizeof(psm_u64));
    call->cut_key = psm_alloc_zeroed(rows * 2 * n, sizeof(psm_u64));
    call->cut_mass = psm_alloc_zeroed(rows * 2 * n, sizeof(psm_u64));
    call->draw_owner = psm_alloc_zeroed(draws, sizeof *call->draw_owner);
    call->tokens_out = psm_alloc_zeroed(draws, sizeof *call->tokens_out);
    call->logprobs_out = psm_alloc_zeroed(draws, sizeof *call->logprobs_out);
    if (!call->row || !call->select_slot || !call->local_key || !call->local_mass ||
        !call->tile_key || !call->item || !call->pick || !call->pick_mass ||
        !call->pick_rescaled || !call->cut_key || !call->cut_mass || !call->draw_owner ||
        !call->tokens_out || !call->logprobs_out) {
        psm_sharded_end(call);
        return psm_set_error(PSM_ERR_OUT_OF_MEMORY, "sharded call: its state for %zu rows",
                             rows);
    }
    const psm_u32 per_row = psm_request_per_row(params);
    const psm_row_scalars scalars = psm_request_row_scalars(&request);
    const psm_row_arrays arrays = psm_request_row_arrays(params);
    for (int64_t r = 0; r < call->rows; ++r)
        call->row[r].p = psm_resolve_row(r, per_row, scalars, arrays);
    *call_out = call;
    return PSM_OK;
}

/* Writes the outputs (the last round's combined draws). */
static void write_outputs(const psm_sharded *call)
{
    const size_t draws = (size_t)call->rows * (size_t)call->request.params.num_samples;
    memcpy(call->request.tokens.data, call->tokens_out, draws * sizeof *call->tokens_out);
    if (call->request.logprobs.data)
        memcpy(call->request.logprobs.data, call->logprobs_out, draws * sizeof(float));
}

psm_status psm_sharded_next(psm_sharded *call, const void *gathered, size_t gathered_bytes,
                            const void **send, size_t *send_bytes)
{
    psm_clear_error();
    if (!call || !send || !send_bytes)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "call, send or send_bytes is NULL");
    *send = NULL;
    *send_bytes = 0;
    if (call->round == ROUND_DONE)
        return psm_set_error(PSM_ERR_INVALID_ARGUMENT, "sharded call: already finished");
    psm_status status = PSM_OK;
    if (call->round == 0) {
        if (gathered || gathered_bytes)
            return psm_set_error(PSM_ERR_INVALID_ARGUMENT,
                                 "sharded call: the first round takes no gathered bytes");
    } else {
        status = check_gathered(call, gathered, gathered_bytes);
        if (status != PSM_OK) {
            call->round = ROUND_DONE;
            return status;
        }
    }
    const psm_u64 *in = gathered;
    int next = ROUND_SUMMARY;
    switch (call->round) {
    case 0:
        break;
    case ROUND_SUMMARY:
        status = take_summary(call, in);
        next = ROUND_SELECT;
        break;
    case ROUND_SELECT:
        take_select(call, in);
        ++call->select_round;
        next = ROUND_SELECT;
        break;
    case ROUND_CUT_MAXIMA:
        status = take_cut_maxima(call, in);
        next = ROUND_MASSES;
        break;
    case ROUND_MASSES:
        status = take_masses(call, in);
        next = ROUND_DRAWS;
        break;
    case ROUND_DRAWS:
        status = take_draws(call, in);
        next = ROUND_DONE;
        break;
    default:
        status = psm_set_error(PSM_ERR_INTERNAL, "sharded call: round %d", call->round);
    }
    if (status != PSM_OK) {
        call->round = ROUND_DONE;
        return status;
    }
    if (next == ROUND_SELECT && number_searching_rows(call) == 0)
        next = ROUND_CUT_MAXIMA;
    call->round = next;
    if (next == ROUND_DONE) {
        write_outputs(call);
        return PSM_OK;
    }
    status = open_record(call);
    if (status != PSM_OK) {
        call->round = ROUND_DONE;
        return status;
    }
    switch (next) {
    case ROUND_SUMMARY: status = send_summary(call); break;
    case ROUND_SELECT: status = send_select(call); break;
    case ROUND_CUT_MAXIMA: status = send_cut_maxima(call); break;
    case ROUND_MASSES: status = send_masses(call); break;
    case ROUND_DRAWS: send_draws(call); break;
    }
    if (status != PSM_OK) {
        call->round = ROUND_DONE;
        return status;
    }
    *send = call->send;
    *send_bytes = call->send_words * sizeof *call->send;
    return PSM_OK;
}
