use crate::error::{check, Error, Result, Status};
use crate::info::{Backend, Dtype};
use crate::params::{check_shape, Logits, Params};
use polysample_sys as sys;
use std::any::Any;
use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr};
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::ptr::{self, NonNull};

/// How to create a [`Context`]: a builder over `psm_context_options`.
///
/// ```
/// use polysample::{Backend, ContextOptions};
/// let context = ContextOptions::new().backend(Backend::Cpu).cpu_threads(2).create()?;
/// assert_eq!(context.backend(), Some(Backend::Cpu));
/// # Ok::<(), polysample::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct ContextOptions {
    backend: Backend,
    device: Option<u32>,
    cpu_threads: u32,
    check_rows: bool,
    native_stream: *mut c_void,
}

// SAFETY: the stream pointer is only a value here; it is used by
// psm_context_create, and whoever set it promised (native_stream is unsafe)
// that it is valid wherever the context is created and used.
unsafe impl Send for ContextOptions {}
unsafe impl Sync for ContextOptions {}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions::new()
    }
}

impl ContextOptions {
    /// The library's defaults: [`Backend::Auto`], the backend's default
    /// device, OpenMP's default thread count, the context's own stream, no
    /// row checking.
    pub fn new() -> ContextOptions {
        ContextOptions {
            backend: Backend::Auto,
            device: None,
            cpu_threads: 0,
            check_rows: false,
            native_stream: ptr::null_mut(),
        }
    }

    /// The backend; [`Backend::Auto`] reads `POLYSAMPLE_BACKEND`, else takes
    /// CUDA, HIP, an OpenCL GPU or accelerator, then the CPU.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.backend = backend;
        self
    }

    /// The device index within the backend (default: the backend's default,
    /// or the `:N` of `POLYSAMPLE_BACKEND`).
    pub fn device(mut self, index: u32) -> Self {
        self.device = Some(index);
        self
    }

    /// Threads of the CPU backend; 0 is OpenMP's default.
    pub fn cpu_threads(mut self, threads: u32) -> Self {
        self.cpu_threads = threads;
        self
    }

    /// Checking mode: a row with a NaN or +inf logit, or no finite logit,
    /// makes a call fail with [`Status::BadRow`](crate::Status) and write
    /// nothing, instead of giving that row token -1. Device backends then
    /// wait for the result.
    pub fn check_rows(mut self, check: bool) -> Self {
        self.check_rows = check;
        self
    }

    /// Runs the context's work on an existing `cudaStream_t`, `hipStream_t`
    /// or `cl_command_queue` instead of a stream of its own.
    ///
    /// # Safety
    /// `stream` must be null or a live stream (queue) of the backend and
    /// device the context is created for, and stay alive until the
    /// [`Context`] is dropped.
    pub unsafe fn native_stream(mut self, stream: *mut c_void) -> Self {
        self.native_stream = stream;
        self
    }

    /// Creates the context.
    pub fn create(&self) -> Result<Context> {
        self.create_inner(None)
    }

    /// Creates the context, passing the library's notices (e.g. "compiling
    /// OpenCL kernels ... (first use; cached)") to `notice`, on this thread,
    /// before this returns. The library itself never prints.
    ///
    /// ```
    /// use polysample::{Backend, ContextOptions};
    /// let mut notices = Vec::new();
    /// let context = ContextOptions::new()
    ///     .backend(Backend::Cpu)
    ///     .create_with_notice(&mut |message: &str| notices.push(message.to_owned()))?;
    /// # drop(context);
    /// # Ok::<(), polysample::Error>(())
    /// ```
    pub fn create_with_notice(&self, notice: &mut dyn FnMut(&str)) -> Result<Context> {
        self.create_inner(Some(notice))
    }

    fn create_inner(&self, notice: Option<&mut dyn FnMut(&str)>) -> Result<Context> {
        let mut raw = std::mem::MaybeUninit::<sys::psm_context_options>::uninit();
        // SAFETY: psm_context_options_init writes every field.
        let mut raw = unsafe {
            sys::psm_context_options_init(raw.as_mut_ptr());
            raw.assume_init()
        };
        raw.backend = self.backend.raw();
        if let Some(index) = self.device {
            raw.device_index = i32::try_from(index)
                .map_err(|_| Error::invalid_argument(format!("device index {index} is above 2^31-1")))?;
        }
        raw.cpu_threads = i32::try_from(self.cpu_threads)
            .map_err(|_| Error::invalid_argument(format!("cpu_threads {} is above 2^31-1", self.cpu_threads)))?;
        raw.native_stream = self.native_stream;
        raw.check_rows = i32::from(self.check_rows);

        let mut state = notice.map(|callback| NoticeState { callback, panic: None });
        if let Some(state) = state.as_mut() {
            raw.notice = Some(notice_trampoline);
            raw.notice_user_data = (state as *mut NoticeState).cast();
        }
        let mut context: *mut sys::psm_context = ptr::null_mut();
        // SAFETY: raw is fully initialised; notice_user_data points to
        // `state`, which outlives the call (the library calls notice only
        // during psm_context_create).
        let status = unsafe { sys::psm_context_create(&raw, &mut context) };
        let result = check(status);
        let created = NonNull::new(context).map(|raw| Context { raw, _not_sync: PhantomData });
        if let Some(panic) = state.and_then(|state| state.panic) {
            drop(created);
            resume_unwind(panic);
        }
        result?;
        created.ok_or_else(|| Error {
            status: Status::Internal,
            message: "psm_context_create succeeded but returned no context".into(),
        })
    }
}

struct NoticeState<'a> {
    callback: &'a mut dyn FnMut(&str),
    /// A panic of the callback, resumed once the C call has returned (it must
    /// not unwind through C).
    panic: Option<Box<dyn Any + Send>>,
}

unsafe extern "C" fn notice_trampoline(user_data: *mut c_void, message: *const c_char) {
    // SAFETY: user_data is the NoticeState that create_inner passed, alive
    // and not otherwise borrowed during psm_context_create.
    let state = unsafe { &mut *user_data.cast::<NoticeState>() };
    if state.panic.is_some() || message.is_null() {
        return;
    }
    // SAFETY: the library passes a NUL-terminated message.
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (state.callback)(&text))) {
        state.panic = Some(panic);
    }
}

/// A sampling context: one backend, one device, one stream, and the
/// workspace reused between calls. Freed on drop (after the work it queued).
///
/// `Send` but not `Sync`: the library allows one thread at a time per
/// context; use one context per thread for parallel work.
///
/// ```
/// use polysample::{Backend, Context, ContextOptions, Logits, Params};
/// let mut context = Context::new(&ContextOptions::new().backend(Backend::Cpu))?;
/// let logits = [0.5f32, 3.0, -1.0, 2.0, /* row 2 */ 9.0, 0.0, 0.0, 0.0];
/// let tokens = context.sample(&Logits::f32(&logits, 2, 4), &Params::new().greedy())?;
/// assert_eq!(tokens, [1, 0]);
/// # Ok::<(), polysample::Error>(())
/// ```
#[derive(Debug)]
pub struct Context {
    raw: NonNull<sys::psm_context>,
    _not_sync: PhantomData<Cell<()>>,
}

// SAFETY: a psm_context may be used by one thread at a time, from any
// thread; `!Sync` and `&mut self` on every call that works keep it to one.
unsafe impl Send for Context {}

impl Context {
    /// The C context, for the calls of other modules (which take `&mut self`).
    pub(crate) fn raw_mut(&mut self) -> *mut sys::psm_context {
        self.raw.as_ptr()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: raw came from psm_context_create and is destroyed once.
        unsafe { sys::psm_context_destroy(self.raw.as_ptr()) }
    }
}

/// Logits in the memory of a context's backend, for the `unsafe` device
/// calls: a CUDA or HIP device pointer, or an OpenCL `cl_mem` passed as the
/// pointer (on the CPU backend, host memory).
#[derive(Debug, Clone, Copy)]
pub struct DeviceLogits {
    pub data: *mut c_void,
    pub dtype: Dtype,
    pub rows: usize,
    pub vocab: usize,
    /// Elements between row starts; 0 means `vocab`.
    pub row_stride: usize,
}

/// Per-row parameter arrays, and the request state read when the work runs,
/// in the same memory as [`DeviceLogits`]; a null pointer uses the scalar
/// from [`Params`] (or, for `row_indices`, logits row i for output row i).
/// Out-of-range values in them cannot be checked on the host: that row gets
/// token -1 (or [`Status::BadRow`](crate::Status) in checking mode) and its
/// logits are not read.
///
/// The arrays hold one value per output row: `output_rows` with
/// `row_indices`, else the logits' rows. `seed_pointer` and
/// `offset_pointer` each point to one value, the scalar seed or offset,
/// read when the kernels run: a captured CUDA graph reads their current
/// contents at every replay, so advancing the offset in device memory
/// between replays (or inside the graph) draws anew. A per-row array and
/// the pointer of the same parameter exclude each other.
#[derive(Debug, Clone, Copy)]
pub struct DevicePerRow {
    pub temperature: *const f32,
    pub top_k: *const i32,
    pub top_p: *const f32,
    pub min_p: *const f32,
    pub seed: *const u64,
    /// Each row's offset, e.g. its sequence position.
    pub offset: *const u64,
    /// Each row's Philox stream ([`Params::subsequence_per_row`]).
    pub subsequence: *const u32,
    /// Output row i samples logits row `row_indices[i]`.
    pub row_indices: *const i64,
    /// The entries of `row_indices`; 0 without it.
    pub output_rows: usize,
    /// The scalar seed, one value.
    pub seed_pointer: *const u64,
    /// The scalar offset, one value.
    pub offset_pointer: *const u64,
    /// Logit processing from arrays in the same memory; `None`: none.
    pub processing: Option<DeviceProcessing>,
}

impl Default for DevicePerRow {
    fn default() -> Self {
        DevicePerRow {
            temperature: ptr::null(),
            top_k: ptr::null(),
            top_p: ptr::null(),
            min_p: ptr::null(),
            seed: ptr::null(),
            offset: ptr::null(),
            subsequence: ptr::null(),
            row_indices: ptr::null(),
            output_rows: 0,
            seed_pointer: ptr::null(),
            offset_pointer: ptr::null(),
            processing: None,
        }
    }
}

impl DevicePerRow {
    /// The rows of the outputs for logits of `logits_rows` rows.
    pub fn output_rows(&self, logits_rows: usize) -> usize {
        if self.row_indices.is_null() {
            logits_rows
        } else {
            self.output_rows
        }
    }
}

/// Logit processing for the `unsafe` device calls (docs/SAMPLING.md, section
/// 1; the fields of the C API's `psm_logit_processing`, which
/// [`Processing`](crate::Processing) fills from host slices): every array in
/// the same memory as [`DeviceLogits`], per output row, a null pointer
/// meaning none. Lists are CSR: row r's entries are `[offsets[r],
/// offsets[r + 1])` of their token (and bias value) arrays, offsets having
/// output rows + 1 entries. Token ids, penalty ranges and offsets' order are
/// checked by the library (a bad value fails the call before anything is
/// written, or marks the row bad where only the device can see it); the
/// arrays' lengths cannot be: the library reads as far as the offsets say.
#[derive(Debug, Clone, Copy)]
pub struct DeviceProcessing {
    /// Bit `i % 32` of word `row * words + i / 32` set: token i allowed.
    pub allowed_mask: *const u32,
    /// Words a row of `allowed_mask`; 0 means `ceil(vocab / 32)`.
    pub allowed_mask_words: usize,
    pub bias_offsets: *const i64,
    pub bias_tokens: *const i32,
    pub bias_values: *const f32,
    /// The tokens the penalties count (e.g. those generated so far).
    pub history_offsets: *const i64,
    pub history_tokens: *const i32,
    /// Tokens the repetition penalty takes without counting (e.g. the prompt).
    pub prompt_offsets: *const i64,
    pub prompt_tokens: *const i32,
    /// 1 is off.
    pub repetition_penalty: f32,
    /// 0 is off.
    pub frequency_penalty: f32,
    /// 0 is off.
    pub presence_penalty: f32,
    pub repetition_penalty_per_row: *const f32,
    pub frequency_penalty_per_row: *const f32,
    pub presence_penalty_per_row: *const f32,
}

impl Default for DeviceProcessing {
    /// No processing: every pointer null, the penalties off.
    fn default() -> Self {
        DeviceProcessing {
            allowed_mask: ptr::null(),
            allowed_mask_words: 0,
            bias_offsets: ptr::null(),
            bias_tokens: ptr::null(),
            bias_values: ptr::null(),
            history_offsets: ptr::null(),
            history_tokens: ptr::null(),
            prompt_offsets: ptr::null(),
            prompt_tokens: ptr::null(),
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repetition_penalty_per_row: ptr::null(),
            frequency_penalty_per_row: ptr::null(),
            presence_penalty_per_row: ptr::null(),
        }
    }
}

impl DeviceProcessing {
    fn raw(&self) -> Result<sys::psm_logit_processing> {
        let words = i64::try_from(self.allowed_mask_words).map_err(|_| {
            Error::invalid_argument(format!(
                "processing: allowed_mask_words {} is above 2^63-1",
                self.allowed_mask_words
            ))
        })?;
        Ok(sys::psm_logit_processing {
            allowed_mask: self.allowed_mask,
            allowed_mask_words: words,
            bias_offsets: self.bias_offsets,
            bias_tokens: self.bias_tokens,
            bias_values: self.bias_values,
            history_offsets: self.history_offsets,
            history_tokens: self.history_tokens,
            prompt_offsets: self.prompt_offsets,
            prompt_tokens: self.prompt_tokens,
            repetition_penalty: self.repetition_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            repetition_penalty_per_row: self.repetition_penalty_per_row,
            frequency_penalty_per_row: self.frequency_penalty_per_row,
            presence_penalty_per_row: self.presence_penalty_per_row,
        })
    }
}

/// Workspace owned by the caller for the `unsafe` device calls: memory of
/// the context's backend (a CUDA or HIP device pointer, an OpenCL `cl_mem`
/// passed as the pointer; host memory on the CPU backend), any alignment, at
/// least the bytes that [`Context::sample_device_workspace_size`] or
/// [`Context::probs_device_workspace_size`] gives for the call. With it the
/// call allocates nothing (e.g. memory from a graph's pool, for a call
/// captured in a CUDA graph).
#[derive(Debug, Clone, Copy)]
pub struct DeviceWorkspace {
    pub data: *mut c_void,
    pub bytes: usize,
}

impl Context {
    pub fn new(options: &ContextOptions) -> Result<Context> {
        options.create()
    }

    /// The backend the context runs on (AUTO resolved). `None` only if the
    /// linked library is newer than this crate and chose a backend it does
    /// not know.
    pub fn backend(&self) -> Option<Backend> {
        // SAFETY: raw is a live context.
        Backend::from_raw(unsafe { sys::psm_context_backend(self.raw.as_ptr()) })
    }

    /// A human-readable device name, e.g. "CPU (2 threads)".
    pub fn device_name(&self) -> String {
        // SAFETY: raw is live; the string lives as long as the context.
        unsafe { owned_string(sys::psm_context_device_name(self.raw.as_ptr())) }
    }

    /// Why AUTO chose this backend, or "requested" when it was named.
    pub fn selection_reason(&self) -> String {
        // SAFETY: raw is live; the string lives as long as the context.
        unsafe { owned_string(sys::psm_context_selection_reason(self.raw.as_ptr())) }
    }

    /// Reserves workspace for calls up to `rows x vocab x num_samples`, so
    /// that later calls of that size or smaller allocate nothing.
    pub fn reserve(&mut self, rows: usize, vocab: usize, num_samples: usize) -> Result<()> {
        let as_i64 = |value: usize| i64::try_from(value).unwrap_or(i64::MAX);
        // SAFETY: raw is live; the library checks the sizes.
        check(unsafe { sys::psm_context_reserve(self.raw.as_ptr(), as_i64(rows), as_i64(vocab), as_i64(num_samples)) })
    }

    /// Draws `num_samples` tokens per output row: `rows x num_samples`,
    /// row-major, where rows are the logits' rows or the entries of
    /// [`Params::row_indices`]. A bad row (NaN, +inf, or no finite logit)
    /// gets -1 unless the context checks rows.
    pub fn sample(&mut self, logits: &Logits<'_>, params: &Params<'_>) -> Result<Vec<i32>> {
        let raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let mut tokens = vec![0; output_len(params.output_rows(logits.rows()), raw_params.params.num_samples)?];
        self.sample_into(logits, params, &mut tokens, None)?;
        Ok(tokens)
    }

    /// Like [`sample`](Self::sample), also returning each token's natural-log
    /// probability under the final (filtered, renormalised) distribution.
    pub fn sample_with_logprobs(&mut self, logits: &Logits<'_>, params: &Params<'_>) -> Result<(Vec<i32>, Vec<f32>)> {
        let raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let length = output_len(params.output_rows(logits.rows()), raw_params.params.num_samples)?;
        let (mut tokens, mut logprobs) = (vec![0; length], vec![0.0; length]);
        self.sample_into(logits, params, &mut tokens, Some(&mut logprobs))?;
        Ok((tokens, logprobs))
    }

    /// Like [`sample_with_logprobs`](Self::sample_with_logprobs), also
    /// returning each output row's `count` most probable tokens with their
    /// logprobs and the rank of each drawn token (docs/SAMPLING.md,
    /// section 6), in the [`LogprobMode`] asked for. `count` is 1 ..= 64.
    /// Every backend computes them.
    ///
    /// ```
    /// use polysample::{Backend, ContextOptions, LogprobMode, Logits, Params};
    /// let mut context = ContextOptions::new().backend(Backend::Cpu).create()?;
    /// let values = [1.0f32, 3.0, 2.0, -1.0];
    /// let logits = Logits::f32(&values, 1, 4);
    /// let top = context.sample_with_top_logprobs(&logits, &Params::new(), 2, LogprobMode::Processed)?;
    /// assert_eq!(top.top_tokens, vec![1, 2]);
    /// assert!(top.top_logprobs[0] > top.top_logprobs[1]);
    /// # Ok::<(), polysample::Error>(())
    /// ```
    pub fn sample_with_top_logprobs(
        &mut self,
        logits: &Logits<'_>,
        params: &Params<'_>,
        count: usize,
        mode: LogprobMode,
    ) -> Result<TopLogprobs> {
        if !(1..=sys::PSM_MAX_TOP_LOGPROBS as usize).contains(&count) {
            return Err(Error::invalid_parameter(format!(
                "top_logprobs count is {count}; expected 1 .. {}",
                sys::PSM_MAX_TOP_LOGPROBS
            )));
        }
        let raw_logits = logits.raw_tensor()?;
        let mut raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let rows = params.output_rows(logits.rows());
        let length = output_len(rows, raw_params.params.num_samples)?;
        let top_length = rows
            .checked_mul(count)
            .ok_or_else(|| Error::invalid_argument(format!("rows x count ({rows} x {count}) is too large")))?;
        let mut result = TopLogprobs {
            tokens: vec![0; length],
            logprobs: vec![0.0; length],
            top_tokens: vec![0; top_length],
            top_logprobs: vec![0.0; top_length],
            ranks: vec![0; length],
        };
        let host = |data: *mut c_void| sys::psm_output { data, memory: sys::PSM_MEMORY_HOST };
        let top = sys::psm_top_logprobs {
            count: count as i32,
            mode: mode.raw(),
            tokens: host(result.top_tokens.as_mut_ptr().cast()),
            logprobs: host(result.top_logprobs.as_mut_ptr().cast()),
            sampled_ranks: host(result.ranks.as_mut_ptr().cast()),
        };
        let tokens = host(result.tokens.as_mut_ptr().cast());
        let logprobs = host(result.logprobs.as_mut_ptr().cast());
        let mut call_params = *raw_params.get();
        call_params.top_logprobs = &top;
        // SAFETY: every output is a host Vec sized from the shape above and
        // owned here for the whole call; `top` and the processing struct
        // that raw_params holds outlive it; the library has finished with
        // host memory when it returns.
        check(unsafe { sys::psm_sample(self.raw.as_ptr(), &raw_logits, &call_params, tokens, logprobs) })?;
        Ok(result)
    }

    /// Samples into caller-provided buffers of `rows x num_samples` each
    /// (output rows). On any error nothing is written.
    pub fn sample_into(
        &mut self,
        logits: &Logits<'_>,
        params: &Params<'_>,
        tokens: &mut [i32],
        logprobs: Option<&mut [f32]>,
    ) -> Result<()> {
        self.host_sample(logits, params, tokens, logprobs, None)
    }

    /// [`sample_into`](Self::sample_into) with the caller's workspace, so
    /// that the call allocates nothing: at least
    /// [`sample_workspace_size`](Self::sample_workspace_size) bytes, any
    /// alignment. Host memory is the workspace of the CPU backend only; on
    /// another backend this fails with [`Status::WrongBackend`] (device
    /// workspace goes through
    /// [`sample_device_with_workspace`](Self::sample_device_with_workspace)).
    /// Too small a workspace fails with [`Status::InvalidArgument`] and
    /// nothing is written.
    ///
    /// ```
    /// use polysample::{Backend, ContextOptions, Logits, Params};
    /// let mut context = ContextOptions::new().backend(Backend::Cpu).create()?;
    /// let values = vec![0.5f32; 4 * 1000];
    /// let logits = Logits::f32(&values, 4, 1000);
    /// let params = Params::new().seed(3);
    /// let mut workspace = vec![0u8; context.sample_workspace_size(&logits, &params)?];
    /// let mut tokens = [0i32; 4];
    /// context.sample_into_with_workspace(&logits, &params, &mut tokens, None, &mut workspace)?;
    /// assert_eq!(tokens.to_vec(), context.sample(&logits, &params)?);
    /// # Ok::<(), polysample::Error>(())
    /// ```
    pub fn sample_into_with_workspace(
        &mut self,
        logits: &Logits<'_>,
        params: &Params<'_>,
        tokens: &mut [i32],
        logprobs: Option<&mut [f32]>,
        workspace: &mut [u8],
    ) -> Result<()> {
        self.host_sample(logits, params, tokens, logprobs, Some(workspace))
    }

    fn host_sample(
        &mut self,
        logits: &Logits<'_>,
        params: &Params<'_>,
        tokens: &mut [i32],
        logprobs: Option<&mut [f32]>,
        workspace: Option<&mut [u8]>,
    ) -> Result<()> {
        let raw_logits = logits.raw_tensor()?;
        let mut raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let rows = params.output_rows(logits.rows());
        // A num_samples below 1 is left to the library, which rejects it
        // with its own message before looking at the outputs.
        if raw_params.params.num_samples >= 1 {
            let expected = output_len(rows, raw_params.params.num_samples)?;
            check_len("tokens", tokens.len(), expected, rows, raw_params.params.num_samples)?;
            if let Some(logprobs) = logprobs.as_deref() {
                check_len("logprobs", logprobs.len(), expected, rows, raw_params.params.num_samples)?;
            }
        }
        if let Some(workspace) = workspace {
            self.check_host_workspace()?;
            raw_params.params.workspace = workspace.as_mut_ptr().cast();
            raw_params.params.workspace_bytes = workspace.len();
        }
        let tokens = sys::psm_output { data: tokens.as_mut_ptr().cast(), memory: sys::PSM_MEMORY_HOST };
        let logprobs = sys::psm_output {
            data: logprobs.map_or(ptr::null_mut(), |values| values.as_mut_ptr().cast()),
            memory: sys::PSM_MEMORY_HOST,
        };
        // SAFETY: every pointer is a host slice whose length was checked
        // against the shape, borrowed for the whole call (the workspace
        // only on the CPU backend, whose memory is host memory); for host
        // memory the library has finished with them when it returns.
        check(unsafe { sys::psm_sample(self.raw.as_ptr(), &raw_logits, raw_params.get(), tokens, logprobs) })
    }

    /// The final distribution `sample` draws from: `rows x vocab` f32,
    /// row-major (output rows). Greedy rows are 1 at the argmax and 0
    /// elsewhere; a bad row is all NaN.
    pub fn probs(&mut self, logits: &Logits<'_>, params: &Params<'_>) -> Result<Vec<f32>> {
        let rows = params.output_rows(logits.rows());
        let length = rows
            .checked_mul(logits.vocab())
            .ok_or_else(|| Error::invalid_argument(format!("probs: {rows} x {} is too large", logits.vocab())))?;
        let mut probs = vec![0.0; length];
        self.probs_into(logits, params, &mut probs)?;
        Ok(probs)
    }

    /// [`probs`](Self::probs) into a caller-provided `rows x vocab` buffer.
    /// On any error nothing is written.
    pub fn probs_into(&mut self, logits: &Logits<'_>, params: &Params<'_>, probs: &mut [f32]) -> Result<()> {
        self.host_probs(logits, params, probs, None)
    }

    /// [`probs_into`](Self::probs_into) with the caller's workspace (at
    /// least [`probs_workspace_size`](Self::probs_workspace_size) bytes), as
    /// for [`sample_into_with_workspace`](Self::sample_into_with_workspace).
    pub fn probs_into_with_workspace(
        &mut self,
        logits: &Logits<'_>,
        params: &Params<'_>,
        probs: &mut [f32],
        workspace: &mut [u8],
    ) -> Result<()> {
        self.host_probs(logits, params, probs, Some(workspace))
    }

    fn host_probs(
        &mut self,
        logits: &Logits<'_>,
        params: &Params<'_>,
        probs: &mut [f32],
        workspace: Option<&mut [u8]>,
    ) -> Result<()> {
        let raw_logits = logits.raw_tensor()?;
        let mut raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let rows = params.output_rows(logits.rows());
        let expected = rows.checked_mul(logits.vocab());
        if expected != Some(probs.len()) {
            let expected = expected.map_or_else(|| "too many".to_string(), |count| count.to_string());
            return Err(Error::invalid_argument(format!(
                "probs has {} values; expected rows x vocab = {rows} x {} = {expected}",
                probs.len(),
                logits.vocab()
            )));
        }
        if let Some(workspace) = workspace {
            self.check_host_workspace()?;
            raw_params.params.workspace = workspace.as_mut_ptr().cast();
            raw_params.params.workspace_bytes = workspace.len();
        }
        let raw_probs = sys::psm_tensor {
            data: probs.as_mut_ptr().cast(),
            dtype: sys::PSM_DTYPE_F32,
            memory: sys::PSM_MEMORY_HOST,
            rows: rows as i64,
            vocab: raw_logits.vocab,
            row_stride: raw_logits.vocab,
        };
        // SAFETY: host slices of checked lengths, borrowed for the call (the
        // workspace only on the CPU backend).
        check(unsafe { sys::psm_probs(self.raw.as_ptr(), &raw_logits, raw_params.get(), &raw_probs) })
    }

    /// The bytes of workspace a [`sample_into_with_workspace`] call with
    /// these logits and parameters needs on this context
    /// (`psm_sample_workspace_size`); 0 is a valid answer. The per-row
    /// values are not read: their presence and the shapes decide it.
    ///
    /// [`sample_into_with_workspace`]: Self::sample_into_with_workspace
    pub fn sample_workspace_size(&mut self, logits: &Logits<'_>, params: &Params<'_>) -> Result<usize> {
        let raw_logits = logits.raw_tensor()?;
        let mut raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let output = sys::psm_output { data: ptr::null_mut(), memory: sys::PSM_MEMORY_HOST };
        let mut bytes = 0;
        // SAFETY: the query reads the shapes and pointers' presence only;
        // every pointer is a live host slice anyway.
        check(unsafe {
            sys::psm_sample_workspace_size(self.raw.as_ptr(), &raw_logits, raw_params.get(), output, output, &mut bytes)
        })?;
        Ok(bytes)
    }

    /// The bytes of workspace a [`probs_into_with_workspace`] call with
    /// these logits and parameters needs on this context
    /// (`psm_probs_workspace_size`).
    ///
    /// [`probs_into_with_workspace`]: Self::probs_into_with_workspace
    pub fn probs_workspace_size(&mut self, logits: &Logits<'_>, params: &Params<'_>) -> Result<usize> {
        let raw_logits = logits.raw_tensor()?;
        let mut raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let raw_probs =
            probs_tensor(ptr::null_mut(), sys::PSM_MEMORY_HOST, params.output_rows(logits.rows()), &raw_logits);
        let mut bytes = 0;
        // SAFETY: as for sample_workspace_size.
        check(unsafe {
            sys::psm_probs_workspace_size(self.raw.as_ptr(), &raw_logits, raw_params.get(), &raw_probs, &mut bytes)
        })?;
        Ok(bytes)
    }

    fn check_host_workspace(&self) -> Result<()> {
        match self.backend() {
            Some(Backend::Cpu) => Ok(()),
            other => Err(Error {
                status: Status::WrongBackend,
                message: format!(
                    "a host workspace serves the CPU backend only; this context runs on {}: pass \
                     device workspace to sample_device_with_workspace, or none",
                    other.map_or_else(|| "an unknown backend".to_string(), |backend| backend.to_string())
                ),
            }),
        }
    }

    /// Samples from logits already in the backend's memory, writing tokens
    /// (and optionally logprobs) to the backend's memory. On a device backend
    /// this only queues the work on the context's stream and returns; order
    /// later work on that stream, or call [`synchronize`](Self::synchronize)
    /// before reading the results on the host.
    ///
    /// `params` must not hold per-row slices or row indices (those are host
    /// memory); put per-row arrays, row indices, and the seed or offset read
    /// when the work runs, in device memory and pass them in `per_row`.
    ///
    /// # Safety
    /// - `logits.data` is memory of this context's backend and device (a
    ///   CUDA/HIP device pointer, an OpenCL `cl_mem`, or host memory for the
    ///   CPU backend) holding `(rows - 1) * row_stride + vocab` elements of
    ///   `logits.dtype`.
    /// - `tokens` is such memory with room for `output_rows * num_samples`
    ///   `i32` (output rows: `per_row.output_rows` with
    ///   `per_row.row_indices`, else `logits.rows`); `logprobs` is null or
    ///   the same for `f32`. Neither overlaps the inputs.
    /// - Each non-null array of `per_row` is such memory holding one value
    ///   per output row; `seed_pointer` and `offset_pointer`, when non-null,
    ///   hold one value each.
    /// - All of them stay valid, and the inputs unchanged (except as the
    ///   caller's own work ordered on the same stream changes them, e.g.
    ///   advancing the offsets between calls), until the queued work has
    ///   finished on the context's stream.
    /// - The stream given with [`ContextOptions::native_stream`], if any, is
    ///   still alive.
    ///
    /// If this returns an error, nothing was queued and nothing written.
    pub unsafe fn sample_device(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
        tokens: *mut i32,
        logprobs: *mut f32,
    ) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.device_sample(logits, params, per_row, tokens, logprobs, None) }
    }

    /// [`sample_device`](Self::sample_device) with the caller's workspace:
    /// the call allocates nothing (for example inside a CUDA graph capture,
    /// with memory from the graph's pool).
    ///
    /// # Safety
    /// As for [`sample_device`](Self::sample_device), and: `workspace.data`
    /// is memory of this context's backend and device holding at least
    /// `workspace.bytes` bytes, with `workspace.bytes` at least what
    /// [`sample_device_workspace_size`](Self::sample_device_workspace_size)
    /// gives for these arguments; no other work uses it until the queued
    /// work has finished on the context's stream.
    pub unsafe fn sample_device_with_workspace(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
        tokens: *mut i32,
        logprobs: *mut f32,
        workspace: &DeviceWorkspace,
    ) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.device_sample(logits, params, per_row, tokens, logprobs, Some(workspace)) }
    }

    /// # Safety
    /// As for [`sample_device_with_workspace`](Self::sample_device_with_workspace).
    unsafe fn device_sample(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
        tokens: *mut i32,
        logprobs: *mut f32,
        workspace: Option<&DeviceWorkspace>,
    ) -> Result<()> {
        let raw_logits = device_tensor("logits", logits)?;
        let mut processing = None;
        let mut raw_params = device_params(params, per_row, logits, &mut processing)?;
        if let Some(workspace) = workspace {
            raw_params.workspace = workspace.data;
            raw_params.workspace_bytes = workspace.bytes;
        }
        let tokens = sys::psm_output { data: tokens.cast(), memory: sys::PSM_MEMORY_DEVICE };
        let logprobs = sys::psm_output { data: logprobs.cast(), memory: sys::PSM_MEMORY_DEVICE };
        // SAFETY: the caller's contract above.
        check(unsafe { sys::psm_sample(self.raw.as_ptr(), &raw_logits, &raw_params, tokens, logprobs) })
    }

    /// [`probs`](Self::probs) from and into the backend's memory: `probs` is
    /// `output_rows x vocab` f32, row-major. Queued like
    /// [`sample_device`](Self::sample_device).
    ///
    /// # Safety
    /// As for [`sample_device`](Self::sample_device), with `probs` in place
    /// of `tokens`: backend memory with room for `output_rows * vocab` `f32`.
    pub unsafe fn probs_device(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
        probs: *mut f32,
    ) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.device_probs(logits, params, per_row, probs, None) }
    }

    /// [`probs_device`](Self::probs_device) with the caller's workspace.
    ///
    /// # Safety
    /// As for [`probs_device`](Self::probs_device), and for the workspace as
    /// for [`sample_device_with_workspace`](Self::sample_device_with_workspace),
    /// sized by [`probs_device_workspace_size`](Self::probs_device_workspace_size).
    pub unsafe fn probs_device_with_workspace(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
        probs: *mut f32,
        workspace: &DeviceWorkspace,
    ) -> Result<()> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.device_probs(logits, params, per_row, probs, Some(workspace)) }
    }

    /// # Safety
    /// As for [`probs_device_with_workspace`](Self::probs_device_with_workspace).
    unsafe fn device_probs(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
        probs: *mut f32,
        workspace: Option<&DeviceWorkspace>,
    ) -> Result<()> {
        let raw_logits = device_tensor("logits", logits)?;
        let mut processing = None;
        let mut raw_params = device_params(params, per_row, logits, &mut processing)?;
        if let Some(workspace) = workspace {
            raw_params.workspace = workspace.data;
            raw_params.workspace_bytes = workspace.bytes;
        }
        let raw_probs =
            probs_tensor(probs.cast(), sys::PSM_MEMORY_DEVICE, per_row.output_rows(logits.rows), &raw_logits);
        // SAFETY: the caller's contract above.
        check(unsafe { sys::psm_probs(self.raw.as_ptr(), &raw_logits, &raw_params, &raw_probs) })
    }

    /// The bytes of workspace a [`sample_device_with_workspace`] call with
    /// these arguments needs on this context. Nothing behind the pointers is
    /// read: the shapes and which pointers are non-null decide it, so it can
    /// be asked before the buffers exist (with null pointers for them, and
    /// any non-null value for the arrays the call will have).
    ///
    /// [`sample_device_with_workspace`]: Self::sample_device_with_workspace
    pub fn sample_device_workspace_size(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
    ) -> Result<usize> {
        let raw_logits = device_tensor("logits", logits)?;
        let mut processing = None;
        let raw_params = device_params(params, per_row, logits, &mut processing)?;
        let output = sys::psm_output { data: ptr::null_mut(), memory: sys::PSM_MEMORY_DEVICE };
        let mut bytes = 0;
        // SAFETY: psm_sample_workspace_size reads no memory behind the data
        // and per-row pointers (include/polysample.h).
        check(unsafe {
            sys::psm_sample_workspace_size(self.raw.as_ptr(), &raw_logits, &raw_params, output, output, &mut bytes)
        })?;
        Ok(bytes)
    }

    /// The bytes of workspace a [`probs_device_with_workspace`] call with
    /// these arguments needs on this context; as for
    /// [`sample_device_workspace_size`](Self::sample_device_workspace_size).
    ///
    /// [`probs_device_with_workspace`]: Self::probs_device_with_workspace
    pub fn probs_device_workspace_size(
        &mut self,
        logits: &DeviceLogits,
        params: &Params<'_>,
        per_row: &DevicePerRow,
    ) -> Result<usize> {
        let raw_logits = device_tensor("logits", logits)?;
        let mut processing = None;
        let raw_params = device_params(params, per_row, logits, &mut processing)?;
        let raw_probs =
            probs_tensor(ptr::null_mut(), sys::PSM_MEMORY_DEVICE, per_row.output_rows(logits.rows), &raw_logits);
        let mut bytes = 0;
        // SAFETY: as for sample_device_workspace_size.
        check(unsafe {
            sys::psm_probs_workspace_size(self.raw.as_ptr(), &raw_logits, &raw_params, &raw_probs, &mut bytes)
        })?;
        Ok(bytes)
    }
    /// Waits until the work this context queued is done.
    pub fn synchronize(&mut self) -> Result<()> {
        // SAFETY: raw is live.
        check(unsafe { sys::psm_synchronize(self.raw.as_ptr()) })
    }

    /// The raw context, for the `polysample-sys` calls; it stays owned by
    /// `self`.
    pub fn as_raw(&mut self) -> *mut sys::psm_context {
        self.raw.as_ptr()
    }
}

fn device_tensor(name: &str, logits: &DeviceLogits) -> Result<sys::psm_tensor> {
    let row_stride = if logits.row_stride == 0 { logits.vocab } else { logits.row_stride };
    check_shape(name, logits.rows, logits.vocab, row_stride)?;
    Ok(sys::psm_tensor {
        data: logits.data,
        dtype: logits.dtype.raw(),
        memory: sys::PSM_MEMORY_DEVICE,
        rows: logits.rows as i64,
        vocab: logits.vocab as i64,
        row_stride: row_stride as i64,
    })
}

/// The C parameters of a device call; `processing` holds the processing
/// struct they point to, so it must outlive their use.
fn device_params(
    params: &Params<'_>,
    per_row: &DevicePerRow,
    logits: &DeviceLogits,
    processing: &mut Option<sys::psm_logit_processing>,
) -> Result<sys::psm_params> {
    let (logits_rows, vocab) = (logits.rows, logits.vocab);
    if params.has_processing() {
        return Err(Error::invalid_argument(
            "logit processing of Params is host memory; device calls take it in DevicePerRow::processing".into(),
        ));
    }
    if params.has_per_row_slices() {
        return Err(Error::invalid_argument(
            "per-row slices and row indices of Params are host memory; device calls take them in DevicePerRow".into(),
        ));
    }
    let mut raw = params.raw_for_logits(logits_rows, vocab)?.params;
    raw.temperature_per_row = per_row.temperature;
    raw.top_k_per_row = per_row.top_k;
    raw.top_p_per_row = per_row.top_p;
    raw.min_p_per_row = per_row.min_p;
    raw.seed_per_row = per_row.seed;
    raw.offset_per_row = per_row.offset;
    raw.subsequence_per_row = per_row.subsequence;
    raw.row_indices = per_row.row_indices;
    raw.output_rows = i64::try_from(per_row.output_rows)
        .map_err(|_| Error::invalid_argument(format!("output_rows {} is above 2^63-1", per_row.output_rows)))?;
    raw.seed_pointer = per_row.seed_pointer;
    raw.offset_pointer = per_row.offset_pointer;
    *processing = per_row.processing.as_ref().map(DeviceProcessing::raw).transpose()?;
    raw.processing = processing.as_ref().map_or(ptr::null(), |processing| processing as *const _);
    Ok(raw)
}

/// A `rows x vocab` f32 probs tensor, rows packed.
fn probs_tensor(data: *mut c_void, memory: sys::psm_memory, rows: usize, logits: &sys::psm_tensor) -> sys::psm_tensor {
    sys::psm_tensor {
        data,
        dtype: sys::PSM_DTYPE_F32,
        memory,
        rows: i64::try_from(rows).unwrap_or(i64::MAX),
        vocab: logits.vocab,
        row_stride: logits.vocab,
    }
}
/// Which distribution [`Context::sample_with_top_logprobs`] ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobMode {
    /// The distribution `sample` draws from: after processing, temperature
    /// and filters.
    Processed,
    /// The log-softmax of the logits as given: no processing, temperature 1,
    /// no filters.
    Raw,
}

impl LogprobMode {
    fn raw(self) -> sys::psm_logprob_mode {
        match self {
            LogprobMode::Processed => sys::PSM_LOGPROBS_PROCESSED,
            LogprobMode::Raw => sys::PSM_LOGPROBS_RAW,
        }
    }
}

/// The result of [`Context::sample_with_top_logprobs`], row-major over the
/// output rows.
#[derive(Debug, Clone, PartialEq)]
pub struct TopLogprobs {
    /// `rows x num_samples` drawn tokens (-1 for a bad row).
    pub tokens: Vec<i32>,
    /// Their logprobs.
    pub logprobs: Vec<f32>,
    /// `rows x count`: each row's most probable tokens, most probable first;
    /// -1 past the last candidate.
    pub top_tokens: Vec<i32>,
    /// Their logprobs; -inf past the last candidate, NaN for a bad row.
    pub top_logprobs: Vec<f32>,
    /// `rows x num_samples`: each drawn token's rank (1 = most probable).
    pub ranks: Vec<i32>,
}

fn output_len(rows: usize, num_samples: i32) -> Result<usize> {
    let samples = usize::try_from(num_samples.max(0)).unwrap_or(0);
    rows.checked_mul(samples)
        .ok_or_else(|| Error::invalid_argument(format!("rows x num_samples ({rows} x {num_samples}) is too large")))
}

fn check_len(name: &str, length: usize, expected: usize, rows: usize, num_samples: i32) -> Result<()> {
    if length == expected {
        return Ok(());
    }
    Err(Error::invalid_argument(format!(
        "{name} has {length} values; expected rows x num_samples = {rows} x {num_samples} = {expected}"
    )))
}

/// # Safety
/// `text` is null or a NUL-terminated string valid for this call.
unsafe fn owned_string(text: *const c_char) -> String {
    if text.is_null() {
        String::new()
    } else {
        unsafe { CStr::from_ptr(text) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The library calls notice only for long steps (an OpenCL kernel
    // compile), so the trampoline is checked here by calling it as C would.
    fn call_notice(state: &mut NoticeState<'_>, message: &CStr) {
        // SAFETY: a live NoticeState and a NUL-terminated message.
        unsafe { notice_trampoline((state as *mut NoticeState).cast(), message.as_ptr()) }
    }

    #[test]
    fn notices_reach_the_callback_in_order() {
        let mut seen = Vec::new();
        let mut callback = |message: &str| seen.push(message.to_owned());
        let mut state = NoticeState { callback: &mut callback, panic: None };
        call_notice(&mut state, c"compiling OpenCL kernels");
        call_notice(&mut state, c"done");
        assert!(state.panic.is_none());
        assert_eq!(seen, ["compiling OpenCL kernels", "done"]);
    }

    #[test]
    fn a_panicking_callback_is_held_for_after_the_c_call() {
        let mut calls = 0;
        let mut callback = |_: &str| {
            calls += 1;
            panic!("callback failed");
        };
        let mut state = NoticeState { callback: &mut callback, panic: None };
        call_notice(&mut state, c"first");
        call_notice(&mut state, c"second"); // not called again after a panic
        let panic = state.panic.take().expect("the panic is kept");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"callback failed"));
        assert_eq!(calls, 1);
    }
}
