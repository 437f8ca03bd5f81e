//! Raw FFI declarations for `include/polysample.h`, written by hand.
//!
//! Every item of the header is here under its C name. The safe wrapper is the
//! `polysample` crate; use this one only to reach something it does not cover.
//!
//! The C enums are integer type aliases with one constant per value, not Rust
//! enums: a value a C function returns that is not among the declared
//! variants (a newer library, a corrupted struct) would be undefined
//! behaviour in a Rust enum, while an integer can hold anything C writes.
//! Their underlying type is `c_uint` because the C compiler gives an enum
//! with no negative values an unsigned type; `tests/layout.rs` checks that,
//! every size, alignment and field offset, and every constant against the
//! header with the system C compiler.
//!
//! C's `size_t` is `usize` (the same width on every target Rust supports;
//! the layout test checks it for `psm_params.workspace_bytes`).
//!
//! `build.rs` finds or builds the library; see the crate README for how.
#![no_std]
#![allow(non_camel_case_types)]

use core::ffi::{c_char, c_int, c_uint, c_void};

pub const PSM_VERSION_MAJOR: c_int = 0;
pub const PSM_VERSION_MINOR: c_int = 1;
pub const PSM_VERSION_PATCH: c_int = 0;
pub const PSM_VERSION_NUMBER: c_int = PSM_VERSION_MAJOR * 10000 + PSM_VERSION_MINOR * 100 + PSM_VERSION_PATCH;

/// `enum psm_status`. The values are pinned by the header: they never change.
pub type psm_status = c_uint;
pub const PSM_OK: psm_status = 0;
pub const PSM_ERR_INVALID_ARGUMENT: psm_status = 1;
pub const PSM_ERR_INVALID_PARAMETER: psm_status = 2;
pub const PSM_ERR_UNSUPPORTED: psm_status = 3;
pub const PSM_ERR_BACKEND_NOT_COMPILED: psm_status = 4;
pub const PSM_ERR_NO_DEVICE: psm_status = 5;
pub const PSM_ERR_DRIVER: psm_status = 6;
pub const PSM_ERR_OUT_OF_MEMORY: psm_status = 7;
pub const PSM_ERR_BAD_ROW: psm_status = 8;
pub const PSM_ERR_WRONG_BACKEND: psm_status = 9;
pub const PSM_ERR_ENVIRONMENT: psm_status = 10;
pub const PSM_ERR_INTERNAL: psm_status = 11;

/// `enum psm_backend`.
pub type psm_backend = c_uint;
pub const PSM_BACKEND_AUTO: psm_backend = 0;
pub const PSM_BACKEND_CPU: psm_backend = 1;
pub const PSM_BACKEND_CUDA: psm_backend = 2;
pub const PSM_BACKEND_HIP: psm_backend = 3;
pub const PSM_BACKEND_OPENCL: psm_backend = 4;
pub const PSM_BACKEND_COUNT: c_int = 5;

/// The most CPU threads a context may ask for (`psm_context_options.cpu_threads`).
pub const PSM_MAX_CPU_THREADS: c_int = 1024;

/// `enum psm_dtype`.
pub type psm_dtype = c_uint;
pub const PSM_DTYPE_F32: psm_dtype = 0;
pub const PSM_DTYPE_F16: psm_dtype = 1;
pub const PSM_DTYPE_BF16: psm_dtype = 2;

/// `enum psm_memory`: where a buffer lives. `DEVICE` is memory of the
/// context's backend (a CUDA or HIP device pointer, or an OpenCL `cl_mem`
/// passed as the pointer); on the CPU backend the two are the same.
pub type psm_memory = c_uint;
pub const PSM_MEMORY_HOST: psm_memory = 0;
pub const PSM_MEMORY_DEVICE: psm_memory = 1;

/// Opaque `struct psm_context`; only ever behind a pointer.
#[repr(C)]
pub struct psm_context {
    _opaque: [u8; 0],
    // Neither Send, Sync nor Unpin: what may be done with it is up to the C API.
    _not_send_sync_unpin: core::marker::PhantomData<(*mut u8, core::marker::PhantomPinned)>,
}

/// `void (*notice)(void *user_data, const char *message)`.
pub type psm_notice_fn = unsafe extern "C" fn(user_data: *mut c_void, message: *const c_char);

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_context_options {
    pub backend: psm_backend,
    pub device_index: c_int,
    pub cpu_threads: c_int,
    pub native_stream: *mut c_void,
    pub check_rows: c_int,
    /// A NULL function pointer in C is `None` here.
    pub notice: Option<psm_notice_fn>,
    pub notice_user_data: *mut c_void,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_tensor {
    pub data: *mut c_void,
    pub dtype: psm_dtype,
    pub memory: psm_memory,
    pub rows: i64,
    pub vocab: i64,
    pub row_stride: i64,
}

/// `psm_logit_processing`: penalties, logit bias and allowed-token mask
/// (docs/SAMPLING.md, section 1). Per-row lists are CSR: row r's entries are
/// `[offsets[r], offsets[r + 1])` of the entry arrays.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_logit_processing {
    pub allowed_mask: *const u32,
    pub allowed_mask_words: i64,
    pub bias_offsets: *const i64,
    pub bias_tokens: *const i32,
    pub bias_values: *const f32,
    pub history_offsets: *const i64,
    pub history_tokens: *const i32,
    pub prompt_offsets: *const i64,
    pub prompt_tokens: *const i32,
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub repetition_penalty_per_row: *const f32,
    pub frequency_penalty_per_row: *const f32,
    pub presence_penalty_per_row: *const f32,
}

/// The most entries `psm_top_logprobs.count` may ask for.
pub const PSM_MAX_TOP_LOGPROBS: c_int = 64;

/// `enum psm_logprob_mode` (docs/SAMPLING.md, section 6).
pub type psm_logprob_mode = c_uint;
/// The distribution `psm_sample` draws from (after processing, temperature, filters).
pub const PSM_LOGPROBS_PROCESSED: psm_logprob_mode = 0;
/// The log-softmax of the logits as given.
pub const PSM_LOGPROBS_RAW: psm_logprob_mode = 1;

/// `psm_top_logprobs`: each row's N most probable tokens and their logprobs,
/// and optionally the rank of each drawn token (`psm_sample` only).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_top_logprobs {
    pub count: i32,
    pub mode: psm_logprob_mode,
    pub tokens: psm_output,
    pub logprobs: psm_output,
    /// `data` may be null: no ranks.
    pub sampled_ranks: psm_output,
}

/// `enum psm_filter_order` (docs/SAMPLING.md, section 4, "Filter orders").
pub type psm_filter_order = c_uint;
pub const PSM_FILTER_ORDER_POLYSAMPLE: psm_filter_order = 0;
pub const PSM_FILTER_ORDER_VLLM: psm_filter_order = 1;
pub const PSM_FILTER_ORDER_SGLANG: psm_filter_order = 2;
pub const PSM_FILTER_ORDER_LLAMA_CPP: psm_filter_order = 3;
pub const PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST: psm_filter_order = 4;
pub const PSM_FILTER_ORDER_FLASHINFER_JOINT: psm_filter_order = 5;
pub const PSM_FILTER_ORDER_COUNT: c_int = 6;

/// The most draft nodes (k) a request may have in `psm_drafts.nodes`.
pub const PSM_MAX_DRAFT_NODES: c_int = 64;

/// The most ranks a sharded call may have (`psm_shard.shard_count`).
pub const PSM_MAX_SHARDS: c_int = 64;

/// `psm_shard`: one rank's columns of rows split by vocabulary
/// (docs/SAMPLING.md, section 8).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct psm_shard {
    pub first_token: i64,
    pub full_vocab: i64,
    pub shard_index: i32,
    pub shard_count: i32,
}

/// Opaque `struct psm_sharded`: a sharded call in progress, behind a pointer.
#[repr(C)]
pub struct psm_sharded {
    _opaque: [u8; 0],
    _not_send_sync_unpin: core::marker::PhantomData<(*mut u8, core::marker::PhantomPinned)>,
}

/// `psm_drafts`: what a draft proposed for speculative verification
/// (docs/SAMPLING.md, section 7), k nodes per request as a chain or a tree,
/// and the distribution each node's token was drawn from: `draft_logits`
/// (with `draft_params`), `draft_probs`, or neither (one-hot).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_drafts {
    pub nodes: i32,
    /// `requests x k`: the token of node i at `[r * k + i - 1]`.
    pub tokens: *const i32,
    /// `requests x k`: the parent of node i, in `[0, i)`; null: a chain.
    pub parents: *const i32,
    pub draft_logits: *const psm_tensor,
    /// Null: temperature 1, no filters.
    pub draft_params: *const psm_params,
    pub draft_probs: *const psm_tensor,
}

/// `psm_verification`: the outputs of `psm_verify`. `path_nodes` and
/// `logprobs` are optional (`data` may be null).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_verification {
    /// `requests` int32.
    pub accepted: psm_output,
    /// `requests x (k + 1)` int32.
    pub tokens: psm_output,
    /// `requests x (k + 1)` int32.
    pub path_nodes: psm_output,
    /// `requests x (k + 1)` float.
    pub logprobs: psm_output,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_params {
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u64,
    pub offset: u64,
    pub num_samples: i32,
    pub temperature_per_row: *const f32,
    pub top_k_per_row: *const i32,
    pub top_p_per_row: *const f32,
    pub min_p_per_row: *const f32,
    pub seed_per_row: *const u64,
    pub offset_per_row: *const u64,
    pub subsequence_per_row: *const u32,
    pub seed_pointer: *const u64,
    pub offset_pointer: *const u64,
    pub row_indices: *const i64,
    pub output_rows: i64,
    pub workspace: *mut c_void,
    pub workspace_bytes: usize,
    /// Host memory; null: no processing.
    pub processing: *const psm_logit_processing,
    /// Host memory; null: no top-N logprobs.
    pub top_logprobs: *const psm_top_logprobs,
    /// A `psm_filter_order` value (the header declares the field `int32_t`).
    pub filter_order: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct psm_output {
    pub data: *mut c_void,
    pub memory: psm_memory,
}

extern "C" {
    pub fn psm_context_options_init(options: *mut psm_context_options);
    pub fn psm_context_create(options: *const psm_context_options, context_out: *mut *mut psm_context) -> psm_status;
    pub fn psm_context_destroy(context: *mut psm_context);

    pub fn psm_context_backend(context: *const psm_context) -> psm_backend;
    pub fn psm_context_device_name(context: *const psm_context) -> *const c_char;
    pub fn psm_context_selection_reason(context: *const psm_context) -> *const c_char;
    pub fn psm_context_reserve(context: *mut psm_context, rows: i64, vocab: i64, num_samples: i64) -> psm_status;

    pub fn psm_logit_processing_init(processing: *mut psm_logit_processing);

    pub fn psm_drafts_init(drafts: *mut psm_drafts);

    pub fn psm_params_init(params: *mut psm_params);

    pub fn psm_sample(
        context: *mut psm_context,
        logits: *const psm_tensor,
        params: *const psm_params,
        tokens: psm_output,
        logprobs: psm_output,
    ) -> psm_status;
    pub fn psm_probs(
        context: *mut psm_context,
        logits: *const psm_tensor,
        params: *const psm_params,
        probs: *const psm_tensor,
    ) -> psm_status;
    pub fn psm_sample_workspace_size(
        context: *mut psm_context,
        logits: *const psm_tensor,
        params: *const psm_params,
        tokens: psm_output,
        logprobs: psm_output,
        bytes: *mut usize,
    ) -> psm_status;
    pub fn psm_probs_workspace_size(
        context: *mut psm_context,
        logits: *const psm_tensor,
        params: *const psm_params,
        probs: *const psm_tensor,
        bytes: *mut usize,
    ) -> psm_status;
    pub fn psm_verify(
        context: *mut psm_context,
        target_logits: *const psm_tensor,
        target_params: *const psm_params,
        drafts: *const psm_drafts,
        outputs: *const psm_verification,
    ) -> psm_status;
    pub fn psm_sharded_begin(
        context: *mut psm_context,
        logits_shard: *const psm_tensor,
        shard: *const psm_shard,
        params: *const psm_params,
        tokens: psm_output,
        logprobs: psm_output,
        call: *mut *mut psm_sharded,
    ) -> psm_status;
    pub fn psm_sharded_next(
        call: *mut psm_sharded,
        gathered: *const c_void,
        gathered_bytes: usize,
        send: *mut *const c_void,
        send_bytes: *mut usize,
    ) -> psm_status;
    pub fn psm_sharded_end(call: *mut psm_sharded);
    pub fn psm_synchronize(context: *mut psm_context) -> psm_status;

    pub fn psm_status_string(status: psm_status) -> *const c_char;
    pub fn psm_last_error() -> *const c_char;

    pub fn psm_version_string() -> *const c_char;
    pub fn psm_version_number() -> c_int;

    pub fn psm_backend_name(backend: psm_backend) -> *const c_char;
    pub fn psm_backend_compiled(backend: psm_backend) -> c_int;
    pub fn psm_backend_available(backend: psm_backend, reason: *mut *const c_char) -> c_int;
    pub fn psm_backend_device_count(backend: psm_backend) -> c_int;
}
