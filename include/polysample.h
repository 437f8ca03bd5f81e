/*
 * polysample: exact, cross-vendor token sampling from batches of logits.
 *
 * One C API over four backends (CUDA, HIP, OpenCL, OpenMP CPU). For the same
 * logits, parameters and seed every backend returns the same tokens, bit for
 * bit; docs/SAMPLING.md is the contract that makes this true.
 *
 * Rules of use:
 * - Every call returns a psm_status. On failure nothing is written to any
 *   output, and psm_last_error() holds a message for the calling thread.
 * - The library never aborts, exits or prints.
 * - A psm_context may be used by one thread at a time. Different contexts
 *   may be used concurrently.
 */
#ifndef POLYSAMPLE_H
#define POLYSAMPLE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PSM_VERSION_MAJOR 0
#define PSM_VERSION_MINOR 1
#define PSM_VERSION_PATCH 0
#define PSM_VERSION_NUMBER \
    (PSM_VERSION_MAJOR * 10000 + PSM_VERSION_MINOR * 100 + PSM_VERSION_PATCH)

#if defined(_WIN32) && defined(PSM_BUILDING_LIBRARY)
#define PSM_API __declspec(dllexport)
#elif defined(__GNUC__)
#define PSM_API __attribute__((visibility("default")))
#else
#define PSM_API
#endif

/* Status codes. The values are pinned: they never change between versions. */
typedef enum psm_status {
    PSM_OK = 0,
    PSM_ERR_INVALID_ARGUMENT = 1,   /* a NULL pointer, bad size, bad enum */
    PSM_ERR_INVALID_PARAMETER = 2,  /* a sampling parameter out of range */
    PSM_ERR_UNSUPPORTED = 3,        /* valid request the backend cannot do */
    PSM_ERR_BACKEND_NOT_COMPILED = 4, /* asked-for backend not built in */
    PSM_ERR_NO_DEVICE = 5,          /* backend built in, no usable device */
    PSM_ERR_DRIVER = 6,             /* a driver or runtime call failed */
    PSM_ERR_OUT_OF_MEMORY = 7,      /* host or device allocation failed */
    PSM_ERR_BAD_ROW = 8,            /* checking mode: a row had NaN/+inf or no finite logit */
    PSM_ERR_WRONG_BACKEND = 9,      /* memory of another backend was passed */
    PSM_ERR_ENVIRONMENT = 10,       /* POLYSAMPLE_BACKEND could not be parsed */
    PSM_ERR_INTERNAL = 11           /* a bug in polysample; please report it */
} psm_status;

typedef enum psm_backend {
    PSM_BACKEND_AUTO = 0,
    PSM_BACKEND_CPU = 1,
    PSM_BACKEND_CUDA = 2,
    PSM_BACKEND_HIP = 3,
    PSM_BACKEND_OPENCL = 4
} psm_backend;
#define PSM_BACKEND_COUNT 5

typedef enum psm_dtype {
    PSM_DTYPE_F32 = 0,
    PSM_DTYPE_F16 = 1,
    PSM_DTYPE_BF16 = 2
} psm_dtype;

/* Where a buffer lives. DEVICE means memory of the context's backend:
 * a CUDA or HIP device pointer, or an OpenCL cl_mem passed as the pointer.
 * On the CPU backend DEVICE and HOST are the same. */
typedef enum psm_memory {
    PSM_MEMORY_HOST = 0,
    PSM_MEMORY_DEVICE = 1
} psm_memory;

typedef struct psm_context psm_context;

/* The most CPU threads a context may ask for (psm_context_options.cpu_threads). */
#define PSM_MAX_CPU_THREADS 1024

typedef struct psm_context_options {
    psm_backend backend;  /* AUTO reads POLYSAMPLE_BACKEND, else CUDA, HIP, an OpenCL
                             GPU or accelerator, then the CPU backend */
    int device_index;     /* -1: the backend's default (or the :N of POLYSAMPLE_BACKEND) */
    int cpu_threads;      /* CPU backend: 0 (OpenMP's default) .. PSM_MAX_CPU_THREADS */
    void *native_stream;  /* cudaStream_t, hipStream_t or cl_command_queue; NULL: own one */
    int check_rows;       /* 1: a bad row makes psm_sample fail with PSM_ERR_BAD_ROW
                             (device backends then wait for the result) */
    /* Optional: told when a long step starts, e.g. "compiling OpenCL kernels for
     * <device> (first use; cached)", since the library never prints. Called on the
     * thread that creates the context, during psm_context_create. */
    void (*notice)(void *user_data, const char *message);
    void *notice_user_data;
} psm_context_options;

/* Fills *options with the defaults (AUTO, device -1, default threads). */
PSM_API void psm_context_options_init(psm_context_options *options);

PSM_API psm_status psm_context_create(const psm_context_options *options,
                                      psm_context **context_out);
/* NULL is a no-op. Waits for work queued by this context on its stream. */
PSM_API void psm_context_destroy(psm_context *context);

PSM_API psm_backend psm_context_backend(const psm_context *context);
/* A human-readable device name, e.g. "NVIDIA H100 80GB HBM3" or "CPU (2 threads)". */
PSM_API const char *psm_context_device_name(const psm_context *context);
/* Why AUTO chose this backend, or "requested" when it was named. */
PSM_API const char *psm_context_selection_reason(const psm_context *context);
/* Reserves workspace for batches up to rows x vocab x num_samples, so that
 * later psm_sample calls of that size or smaller allocate nothing. Optional:
 * the first call of a shape reserves it otherwise. */
PSM_API psm_status psm_context_reserve(psm_context *context, int64_t rows,
                                       int64_t vocab, int64_t num_samples);

/* A rows x vocab matrix of logits (or probabilities out of psm_probs). */
typedef struct psm_tensor {
    void *data;           /* host pointer, device pointer, or cl_mem */
    psm_dtype dtype;
    psm_memory memory;
    int64_t rows;
    int64_t vocab;
    int64_t row_stride;   /* in elements; >= vocab; 0 means vocab */
} psm_tensor;

/* A rows x num_samples int32 matrix of tokens, or a float matrix of logprobs. */
typedef struct psm_output {
    void *data;
    psm_memory memory;
} psm_output;

/* Logit processing (docs/SAMPLING.md, section 1): what a runtime does to the
 * logits before it samples, done inside the call as the logits are read.
 * In order, per token of an output row: the penalties, for tokens in the
 * row's history; the logit bias; the allowed-token mask. Every array below
 * is per output row and lives in the logits' memory, like the per-row
 * arrays of psm_params; the struct itself is host memory. Rows' lists are
 * given CSR-style: row r's entries are [offsets[r], offsets[r + 1]) of the
 * entry arrays, offsets having rows + 1 non-decreasing entries, the first >= 0.
 * Backends: CPU, CUDA, HIP and OpenCL (core/psm_processing.h on each); a backend
 * without it returns PSM_ERR_UNSUPPORTED. */
typedef struct psm_logit_processing {
    /* Allowed tokens (a grammar's mask): token i of row r is allowed when bit
     * i % 32 of word allowed_mask[r * allowed_mask_words + i / 32] is set;
     * others are masked like -inf. A row that allows no valid token is a bad
     * row. allowed_mask_words: 0 means ceil(vocab / 32). NULL: all allowed. */
    const uint32_t *allowed_mask;
    int64_t allowed_mask_words;
    /* Logit bias: entry e adds bias_values[e] to token bias_tokens[e]
     * (entries of one token add in list order). NULL: no bias. */
    const int64_t *bias_offsets;
    const int32_t *bias_tokens;
    const float *bias_values;
    /* The history that penalties count: a token may repeat (frequency counts
     * its repeats), e.g. the tokens generated so far. prompt_tokens (optional,
     * repetition penalty only) adds tokens that repetition penalises without
     * counting, e.g. the prompt, as vLLM and Hugging Face do. */
    const int64_t *history_offsets;
    const int32_t *history_tokens;
    const int64_t *prompt_offsets;
    const int32_t *prompt_tokens;
    float repetition_penalty; /* in [1e-3, 1e3]; 1 = off. x > 0: x * (1/r), else x * r */
    float frequency_penalty;  /* in [-1e3, 1e3]; 0 = off. x - f * count */
    float presence_penalty;   /* in [-1e3, 1e3]; 0 = off. x - p, if count > 0 */
    const float *repetition_penalty_per_row;
    const float *frequency_penalty_per_row;
    const float *presence_penalty_per_row;
} psm_logit_processing;

/* No processing: every pointer NULL, penalties off. */
PSM_API void psm_logit_processing_init(psm_logit_processing *processing);

/* Top-N logprobs (psm_sample only): each row's N most probable tokens and
 * their logprobs, and optionally the rank of each drawn token, in one of
 * two modes (docs/SAMPLING.md, section 6). Ranks follow the rank order of
 * the mode's candidates: higher logit first, lower index on ties (exact;
 * probabilities follow it up to the contract's rounding). */
#define PSM_MAX_TOP_LOGPROBS 64

typedef enum psm_logprob_mode {
    PSM_LOGPROBS_PROCESSED = 0, /* the distribution psm_sample draws from: after
                                   processing, temperature and filters */
    PSM_LOGPROBS_RAW = 1        /* log-softmax of the logits as given: no processing,
                                   temperature 1, no filters */
} psm_logprob_mode;

typedef struct psm_top_logprobs {
    int32_t count;             /* N: 1 .. PSM_MAX_TOP_LOGPROBS */
    psm_logprob_mode mode;
    psm_output tokens;         /* rows x N int32, most probable first; -1 past the last
                                  candidate (and for a bad row) */
    psm_output logprobs;       /* rows x N float; -inf past the last candidate, NaN for
                                  a bad row */
    psm_output sampled_ranks;  /* optional (data may be NULL): rows x num_samples int32,
                                  the rank of each drawn token in this mode (1 = the
                                  most probable); -1 for a bad row */
} psm_top_logprobs;

/* Filter orders (docs/SAMPLING.md, section 4, "Filter orders"): which
 * engine's order and semantics temperature, top-k, top-p and min-p follow,
 * so that a runtime keeps its users' distributions. Each is exact (integer
 * thresholds on the contract's weights); the draw is always at the row's
 * temperature over the kept set. Backends: CPU; the others return
 * PSM_ERR_UNSUPPORTED for any order but POLYSAMPLE. */
typedef enum psm_filter_order {
    PSM_FILTER_ORDER_POLYSAMPLE = 0,  /* temperature, top-k, top-p over the top-k set,
                                         min-p (per token) */
    PSM_FILTER_ORDER_VLLM = 1,        /* vLLM V1: temperature, min-p, top-k (ties at the
                                         k-th logit kept), top-p over what is left */
    PSM_FILTER_ORDER_SGLANG = 2,      /* SGLang: temperature; top-k, top-p and min-p each
                                         on the whole distribution (top-p keeps a token
                                         whose preceding mass is at most p) */
    PSM_FILTER_ORDER_LLAMA_CPP = 3,   /* llama.cpp's default chain: top-k, top-p, min-p at
                                         temperature 1, then temperature */
    PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST = 4, /* FlashInfer filter_apply_order
                                         "top_k_first": top-k, then top-p over the top-k set,
                                         ties at either boundary kept; min-p last */
    PSM_FILTER_ORDER_FLASHINFER_JOINT = 5 /* FlashInfer "joint": top-k and top-p both on the
                                         whole distribution, ties kept; min-p last */
} psm_filter_order;
#define PSM_FILTER_ORDER_COUNT 6
/* Speculative decoding verification (docs/SAMPLING.md, section 7): a draft
 * proposed up to k tokens per request, as a chain or a tree; psm_verify checks
 * them against the target model's logits in one call and returns the accepted
 * tokens, then one token drawn from the target (the correction after a
 * rejection, or the bonus after a fully accepted path). The rule is exact
 * rejection sampling in integers: the emitted tokens follow the target's
 * distribution, and every backend accepts the same tokens. */
#define PSM_MAX_DRAFT_NODES 64 /* k: draft tokens per request (chain length or tree nodes) */

typedef struct psm_drafts {
    int32_t nodes;           /* k, 1 .. PSM_MAX_DRAFT_NODES: draft nodes per request, numbered
                                1..k; node 0 is the root (the last token already emitted) */
    const int32_t *tokens;   /* requests x k: the token of node i at [r * k + i - 1] */
    const int32_t *parents;  /* requests x k, the parent of node i in [0, i) at [r * k + i - 1];
                                NULL: a chain (the parent of node i is i - 1) */
    /* The distribution each node's token was drawn from (row r * k + i - 1),
     * given its parent's path and its earlier siblings; one of:
     * - draft_logits (requests * k rows, the target's vocab), with
     *   draft_params: temperature, top_k, top_p, min_p and their per-request
     *   arrays, as in psm_params (seeds and offsets are not used: nothing is
     *   drawn from the draft); NULL draft_params: temperature 1, no filters;
     * - draft_probs (requests * k rows of f32 in [0, 1], the target's vocab),
     *   read as integers floor(q * 2^B) (SAMPLING.md, section 7);
     * - neither: a deterministic draft (n-gram, prompt lookup, a greedy draft
     *   model): each node's distribution is a point mass on its token. */
    const psm_tensor *draft_logits;
    const struct psm_params *draft_params; /* psm_params, defined below */
    const psm_tensor *draft_probs;
} psm_drafts;

typedef struct psm_verification {
    psm_output accepted;   /* requests int32: accepted draft tokens (0 .. the tree's depth);
                              -1 for a bad request */
    psm_output tokens;     /* requests x (k + 1) int32: the accepted draft tokens in path
                              order, then the correction or bonus token; -1 after it, and
                              everywhere for a bad request */
    psm_output path_nodes; /* optional (data may be NULL): requests x (k + 1) int32: the
                              node each emitted token was drawn at (0, the root, then the
                              accepted nodes in order: the accepted path, whose cache a
                              runtime keeps); -1 after, and for a bad request */
    psm_output logprobs;   /* optional (data may be NULL): requests x (k + 1) float: each
                              emitted token's natural log probability under the target's
                              distribution at its node; NaN after, and for a bad request */
} psm_verification;

/* Fills *drafts with k = 0 and every pointer NULL (set nodes and tokens). */
PSM_API void psm_drafts_init(psm_drafts *drafts);

/* A call's parameters. Rows here are the rows of the outputs: logits row i,
 * or logits row row_indices[i] when row_indices is given.
 *
 * A per-row parameter array (the *_per_row members, row_indices, and the
 * seed and offset pointers) is optional, NULL meaning "use the scalar", and
 * lives in the same memory as the logits: with device logits it is a device
 * pointer (an OpenCL cl_mem passed as the pointer) that the kernels read when
 * they run, so a captured CUDA graph reads its current contents at every
 * replay. Host arrays are validated on the host; values out of range in a
 * device array give that row token -1 (or PSM_ERR_BAD_ROW in checking mode),
 * since reading them on the host would need a sync. */
typedef struct psm_params {
    float temperature;    /* < 1e-5 (including 0) is greedy: argmax, lowest index on ties */
    int32_t top_k;        /* 0 = off; k >= vocab means off */
    float top_p;          /* in (0, 1]; 1 = off */
    float min_p;          /* in [0, 1]; 0 = off */
    uint64_t seed;
    uint64_t offset;      /* e.g. the decoding step: the same seed at another offset draws anew */
    int32_t num_samples;  /* >= 1, drawn with replacement */
    const float *temperature_per_row;
    const int32_t *top_k_per_row;
    const float *top_p_per_row;
    const float *min_p_per_row;
    const uint64_t *seed_per_row;  /* one request, one seed: a row's tokens then do
                                      not depend on its position in the batch */

    /* Request state (docs/SAMPLING.md, the draw). */
    const uint64_t *offset_per_row;      /* each row's offset, e.g. its sequence position */
    const uint32_t *subsequence_per_row; /* Philox stream of each row, so that rows with the
                                            same seed and offset (n completions of one
                                            request) draw independently; default: the row
                                            index with one seed, 0 with per-row seeds */
    const uint64_t *seed_pointer;        /* the scalar seed, read when the call runs */
    const uint64_t *offset_pointer;      /* the scalar offset, read when the call runs */

    /* Row gather: output row i samples logits row row_indices[i]
     * (0 <= row_indices[i] < logits->rows), so that sequences sharing a row
     * of logits need no copies. output_rows is the number of entries (>= 1);
     * without row_indices output_rows is 0 (or logits->rows) and output row i
     * samples logits row i. */
    const int64_t *row_indices;
    int64_t output_rows;

    /* Caller-owned workspace (optional): memory of the context's backend (a
     * CUDA or HIP device pointer, an OpenCL cl_mem passed as the pointer,
     * host memory on the CPU backend), any alignment, at least the bytes
     * psm_sample_workspace_size or psm_probs_workspace_size gives for the
     * call. With it the call allocates nothing; the memory must not be in use
     * by other work while the call runs on the context's stream. */
    void *workspace;
    size_t workspace_bytes;

    /* Logit processing (above); NULL: none. */
    const psm_logit_processing *processing;
    /* Top-N logprobs (above; psm_sample only); NULL: none. */
    const psm_top_logprobs *top_logprobs;

    /* The order and semantics of the filters (psm_filter_order, above);
     * 0 (PSM_FILTER_ORDER_POLYSAMPLE) is this library's own. */
    int32_t filter_order;
} psm_params;

/* Plain sampling at temperature 1, one sample, seed 0, every filter off. */
PSM_API void psm_params_init(psm_params *params);

/* Draws num_samples tokens per row. tokens: rows x num_samples int32 (rows:
 * output_rows with row_indices, else logits->rows).
 * logprobs (optional, data may be NULL): the natural log of each drawn token's
 * probability under the final (filtered, renormalised) distribution.
 * A row with a NaN or +inf logit, or no finite logit, gets token -1 and
 * logprob NaN. On device backends the call is asynchronous on the context's
 * stream and needs no host synchronisation (unless check_rows is set). */
PSM_API psm_status psm_sample(psm_context *context, const psm_tensor *logits,
                              const psm_params *params, psm_output tokens,
                              psm_output logprobs);

/* The final distribution psm_sample draws from: probs is rows x vocab f32
 * (rows: output_rows with row_indices, else logits->rows; row_stride as
 * given, dtype must be F32). A bad row is all NaN. */
PSM_API psm_status psm_probs(psm_context *context, const psm_tensor *logits,
                             const psm_params *params, const psm_tensor *probs);

/* The bytes of caller workspace (psm_params.workspace) that psm_sample or
 * psm_probs needs for these arguments on this context: the same arguments as
 * the call, whose data pointers may still be NULL here (the shapes, memory
 * kinds, scalars and per-row pointers' presence decide the size; host
 * per-row values are not read, except the last offset of each logit-
 * processing list in host memory: its length). 0 is a valid answer. */
PSM_API psm_status psm_sample_workspace_size(psm_context *context, const psm_tensor *logits,
                                             const psm_params *params, psm_output tokens,
                                             psm_output logprobs, size_t *bytes);
PSM_API psm_status psm_probs_workspace_size(psm_context *context, const psm_tensor *logits,
                                            const psm_params *params, const psm_tensor *probs,
                                            size_t *bytes);

/* Verifies drafts (docs/SAMPLING.md, section 7). target_logits: requests x
 * (k + 1) rows; row r * (k + 1) + i is the target's distribution after node
 * i's path (requests = target_logits->rows / (k + 1), which must divide).
 * target_params: temperature, filters, seed, offset and their per-row
 * arrays, which here have one entry per request (seed, offset and stream
 * resolve as for output row r of psm_sample); row_indices, processing,
 * top_logprobs, num_samples other than 1 and a caller workspace are not
 * supported yet (PSM_ERR_UNSUPPORTED). Every array (drafts, per-request
 * arrays, outputs) lives in the target logits' memory. A request with a bad
 * target row (NaN, +inf, no finite logit) gets -1 everywhere (checking mode:
 * PSM_ERR_BAD_ROW). Draft arrays in a GPU's device memory are not read on the
 * host: a bad draft node there (a token outside the vocab, a bad parent or
 * probability, a drawn token of draft probability 0) makes its request bad,
 * unless checking mode fails the call (SAMPLING.md, section 7). Every
 * backend runs it, with the same outputs. On the GPU backends a call with
 * device memory and no checking mode needs no host synchronisation (CUDA
 * and HIP: it can be captured in a graph once an uncaptured call of the
 * same or a larger shape has grown the context's buffers; a larger call
 * after the capture grows them again and leaves the graph reading freed
 * memory). */
PSM_API psm_status psm_verify(psm_context *context, const psm_tensor *target_logits,
                              const psm_params *target_params, const psm_drafts *drafts,
                              const psm_verification *outputs);

/* ---- A batch split by vocabulary across ranks (docs/SAMPLING.md, section 8)
 * With tensor parallelism a row's logits come out split by vocabulary: each
 * rank holds rows x shard_vocab logits, the columns first_token ..
 * first_token + shard_vocab - 1 of every row. A sharded call gives every rank
 * the tokens and logprobs of psm_sample on the full rows, bit for bit,
 * without gathering the logits: each rank starts the call on its shard, then
 * in each round psm_sharded_next names the bytes this rank contributes, the
 * caller all-gathers every rank's bytes in shard_index order with its own
 * collective (NCCL, MPI, torch.distributed; polysample owns no
 * communicator) and passes the result to the next psm_sharded_next. When
 * nothing is left to send the outputs are written. Every rank passes the
 * same params, rows and full_vocab; the shards cover the full row without
 * overlap, in any sizes (a shard may begin or end inside a tile), and each
 * round's bytes are the same size on every rank. Bytes and rounds per call
 * are in docs/SAMPLING.md. Every backend runs it: the rounds are decided
 * on the host (the exchanged bytes and the outputs are host memory) and
 * the backend reads the shard (on a GPU from device or host memory). On a
 * GPU backend, device logits with per-row arrays (or seed/offset pointers),
 * which would be device memory too, and outputs in device memory give
 * PSM_ERR_UNSUPPORTED; so do logit processing, top-N logprobs and filter
 * orders other than POLYSAMPLE on every backend. */
#define PSM_MAX_SHARDS 64

typedef struct psm_shard {
    int64_t first_token; /* the shard's first column's token index in the full row */
    int64_t full_vocab;  /* the full row's tokens (weights and filters use it) */
    int32_t shard_index; /* this rank's place in every all-gather, 0 .. shard_count - 1 */
    int32_t shard_count; /* 1 .. PSM_MAX_SHARDS */
} psm_shard;

typedef struct psm_sharded psm_sharded;

/* Validates the call (logits_shard: rows x shard_vocab) and starts it;
 * nothing is written until the last round. params (and its per-row arrays
 * and pointers) are read here; the shard's logits are read in the rounds
 * and must stay valid until the call ends. *call must be ended with
 * psm_sharded_end. */
PSM_API psm_status psm_sharded_begin(psm_context *context, const psm_tensor *logits_shard,
                                     const psm_shard *shard, const psm_params *params,
                                     psm_output tokens, psm_output logprobs,
                                     psm_sharded **call);

/* One round: gathered is NULL (gathered_bytes 0) on the first call, then the
 * all-gather of the previous round (shard_count x its send_bytes, in
 * shard_index order). Sets *send to this rank's next contribution and
 * *send_bytes to its size, valid until the next call; *send_bytes 0: the
 * outputs are written and the call is over. A failure (a bad exchange, a
 * bad row in checking mode) ends the call with nothing written. */
PSM_API psm_status psm_sharded_next(psm_sharded *call, const void *gathered,
                                    size_t gathered_bytes, const void **send,
                                    size_t *send_bytes);

/* Frees the call (NULL is allowed). */
PSM_API void psm_sharded_end(psm_sharded *call);

/* Waits until the context's queued work is done. */
PSM_API psm_status psm_synchronize(psm_context *context);

PSM_API const char *psm_status_string(psm_status status);
/* The detailed message of the last failed call on this thread ("" if none). */
PSM_API const char *psm_last_error(void);

PSM_API const char *psm_version_string(void);
PSM_API int psm_version_number(void);

PSM_API const char *psm_backend_name(psm_backend backend); /* "cpu", "cuda", ... */
PSM_API int psm_backend_compiled(psm_backend backend);
/* 1 if a context of this backend can be created now. reason (optional) gets
 * a static or thread-local text saying why not (or a device summary). The GPU
 * backends are modules loaded at first use (libpolysample-cuda.so, -hip.so,
 * -opencl.so, beside the library or in POLYSAMPLE_BACKEND_PATH); a missing
 * module or vendor runtime makes the backend unavailable, with the reason. */
PSM_API int psm_backend_available(psm_backend backend, const char **reason);
PSM_API int psm_backend_device_count(psm_backend backend);

#ifdef __cplusplus
}
#endif

#endif /* POLYSAMPLE_H */
