use crate::error::{Error, Result};
use crate::info::Dtype;
use crate::processing::Processing;
use polysample_sys as sys;
use std::ptr;

/// Sampling parameters, built by chaining setters on [`Params::new`].
///
/// The defaults are the library's (`psm_params_init`): temperature 1, one
/// sample, seed 0, offset 0, every filter off. Ranges are checked by the
/// library, which fails with [`Status::InvalidParameter`](crate::Status)
/// and a message naming the parameter (and the row, for per-row values).
///
/// Per-row slices borrow the caller's data for as long as the `Params` lives,
/// so they outlive every call that uses them; each must have one value per
/// output row: a row of the logits, or an entry of
/// [`row_indices`](Self::row_indices) when that is given.
///
/// ```
/// use polysample::Params;
/// let temperatures = [0.7f32, 1.0, 0.0];
/// let params = Params::new()
///     .top_k(50)
///     .top_p(0.9)
///     .seed(1234)
///     .offset(17) // e.g. the decoding step
///     .temperature_per_row(&temperatures);
/// # let _ = params;
/// ```
///
/// Request state: three completions of one request that share its one row
/// of logits, its seed and its position, drawing independently:
///
/// ```
/// use polysample::{Backend, ContextOptions, Logits, Params};
/// let mut context = ContextOptions::new().backend(Backend::Cpu).create()?;
/// let logits = vec![0.0f32; 2 * 8]; // two requests, vocabulary 8
/// let rows = [1i64, 1, 1]; // output rows 0..3 all sample logits row 1
/// let seeds = [99u64; 3];
/// let positions = [40u64; 3];
/// let completions = [0u32, 1, 2]; // one Philox stream each
/// let params = Params::new()
///     .row_indices(&rows)
///     .seed_per_row(&seeds)
///     .offset_per_row(&positions)
///     .subsequence_per_row(&completions);
/// assert_eq!(params.output_rows(2), 3);
/// let tokens = context.sample(&Logits::f32(&logits, 2, 8), &params)?;
/// assert_eq!(tokens.len(), 3);
/// # Ok::<(), polysample::Error>(())
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Params<'a> {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    min_p: f32,
    seed: u64,
    offset: u64,
    num_samples: u32,
    temperature_per_row: Option<&'a [f32]>,
    top_k_per_row: Option<&'a [i32]>,
    top_p_per_row: Option<&'a [f32]>,
    min_p_per_row: Option<&'a [f32]>,
    seed_per_row: Option<&'a [u64]>,
    offset_per_row: Option<&'a [u64]>,
    subsequence_per_row: Option<&'a [u32]>,
    row_indices: Option<&'a [i64]>,
    processing: Option<&'a Processing<'a>>,
    filter_order: FilterOrder,
}

/// Whose order and rules the filters follow (docs/SAMPLING.md, section 4,
/// "Filter orders"). Every order is exact and draws at the row's
/// temperature, on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FilterOrder {
    /// Temperature, top-k, top-p over the top-k set, min-p.
    #[default]
    Polysample,
    /// vLLM V1: min-p first, top-k keeping ties, top-p over what is left.
    Vllm,
    /// SGLang: top-k, top-p and min-p each on the whole distribution.
    Sglang,
    /// llama.cpp's default chain: top-k, top-p, min-p at temperature 1.
    LlamaCpp,
    /// FlashInfer `top_k_first`: top-k, then top-p over it, ties kept.
    FlashInferTopKFirst,
    /// FlashInfer `joint`: top-k and top-p on the whole distribution, ties kept.
    FlashInferJoint,
}

impl FilterOrder {
    fn raw(self) -> sys::psm_filter_order {
        match self {
            FilterOrder::Polysample => sys::PSM_FILTER_ORDER_POLYSAMPLE,
            FilterOrder::Vllm => sys::PSM_FILTER_ORDER_VLLM,
            FilterOrder::Sglang => sys::PSM_FILTER_ORDER_SGLANG,
            FilterOrder::LlamaCpp => sys::PSM_FILTER_ORDER_LLAMA_CPP,
            FilterOrder::FlashInferTopKFirst => sys::PSM_FILTER_ORDER_FLASHINFER_TOP_K_FIRST,
            FilterOrder::FlashInferJoint => sys::PSM_FILTER_ORDER_FLASHINFER_JOINT,
        }
    }
}

/// The C parameters of one call, with the processing struct they point to.
#[derive(Debug)]
pub(crate) struct RawParams {
    pub(crate) params: sys::psm_params,
    processing: Option<sys::psm_logit_processing>,
}

impl RawParams {
    /// The parameters for the C call, pointing at the processing struct
    /// held here (which therefore stays put while the result is borrowed).
    pub(crate) fn get(&mut self) -> &sys::psm_params {
        self.params.processing = self.processing.as_ref().map_or(ptr::null(), |processing| processing);
        &self.params
    }
}

impl Default for Params<'_> {
    fn default() -> Self {
        Params::new()
    }
}

impl<'a> Params<'a> {
    /// The library's defaults.
    pub fn new() -> Params<'a> {
        let mut raw = std::mem::MaybeUninit::<sys::psm_params>::uninit();
        // SAFETY: psm_params_init writes every field of the struct.
        let raw = unsafe {
            sys::psm_params_init(raw.as_mut_ptr());
            raw.assume_init()
        };
        Params {
            temperature: raw.temperature,
            top_k: raw.top_k.max(0) as u32,
            top_p: raw.top_p,
            min_p: raw.min_p,
            seed: raw.seed,
            offset: raw.offset,
            num_samples: raw.num_samples.max(0) as u32,
            temperature_per_row: None,
            top_k_per_row: None,
            top_p_per_row: None,
            min_p_per_row: None,
            seed_per_row: None,
            offset_per_row: None,
            subsequence_per_row: None,
            row_indices: None,
            processing: None,
            filter_order: FilterOrder::Polysample,
        }
    }

    /// In [0, 1e6]; below 1e-5 (0 included) is greedy: the argmax, the
    /// lowest index on ties.
    pub fn temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Temperature 0: always the most probable token.
    pub fn greedy(self) -> Self {
        self.temperature(0.0)
    }

    /// Keep the k most probable tokens; 0 (or k >= vocab) is off. Values
    /// above `i32::MAX` mean off too and are passed as `i32::MAX`.
    pub fn top_k(mut self, k: u32) -> Self {
        self.top_k = k;
        self
    }

    /// Keep the smallest set of most probable tokens reaching mass p, in
    /// (0, 1]; 1 is off.
    pub fn top_p(mut self, p: f32) -> Self {
        self.top_p = p;
        self
    }

    /// Keep tokens at least p times as probable as the top one, in [0, 1];
    /// 0 is off.
    pub fn min_p(mut self, p: f32) -> Self {
        self.min_p = p;
        self
    }

    /// The filters' order and rules; `FilterOrder::Polysample` by default.
    pub fn filter_order(mut self, order: FilterOrder) -> Self {
        self.filter_order = order;
        self
    }

    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The random stream's offset, e.g. the decoding step: the same seed at
    /// another offset draws anew.
    pub fn offset(mut self, offset: u64) -> Self {
        self.offset = offset;
        self
    }

    /// Tokens drawn per row, with replacement; at least 1.
    pub fn num_samples(mut self, num_samples: u32) -> Self {
        self.num_samples = num_samples;
        self
    }

    /// One temperature per row, replacing the scalar.
    pub fn temperature_per_row(mut self, values: &'a [f32]) -> Self {
        self.temperature_per_row = Some(values);
        self
    }

    /// One top-k per row (0 = off), replacing the scalar.
    pub fn top_k_per_row(mut self, values: &'a [i32]) -> Self {
        self.top_k_per_row = Some(values);
        self
    }

    /// One top-p per row, replacing the scalar.
    pub fn top_p_per_row(mut self, values: &'a [f32]) -> Self {
        self.top_p_per_row = Some(values);
        self
    }

    /// One min-p per row, replacing the scalar.
    pub fn min_p_per_row(mut self, values: &'a [f32]) -> Self {
        self.min_p_per_row = Some(values);
        self
    }

    /// One seed per row (one request, one seed): a row's tokens then do not
    /// depend on its position in the batch.
    pub fn seed_per_row(mut self, values: &'a [u64]) -> Self {
        self.seed_per_row = Some(values);
        self
    }

    /// One offset per row (e.g. each sequence's position), replacing the
    /// scalar offset.
    pub fn offset_per_row(mut self, values: &'a [u64]) -> Self {
        self.offset_per_row = Some(values);
        self
    }

    /// One Philox stream (subsequence) per row, so that rows with the same
    /// seed and offset (n completions of one request) draw independently.
    /// Without it a row's stream is its index with the scalar seed, and 0
    /// with per-row seeds (docs/SAMPLING.md, the draw).
    pub fn subsequence_per_row(mut self, values: &'a [u32]) -> Self {
        self.subsequence_per_row = Some(values);
        self
    }

    /// Row gather: output row i samples logits row `indices[i]`, so that
    /// sequences sharing a row of logits need no copies. The outputs and
    /// every per-row slice then have `indices.len()` rows (at least 1). An
    /// index outside the logits fails the call with
    /// [`Status::InvalidArgument`](crate::Status), naming the entry.
    pub fn row_indices(mut self, indices: &'a [i64]) -> Self {
        self.row_indices = Some(indices);
        self
    }

    /// Logit processing (penalties, bias, allowed-token mask) applied as the
    /// logits are read; see [`Processing`]. Its lists and per-row slices
    /// have one entry per output row.
    pub fn processing(mut self, processing: &'a Processing<'a>) -> Self {
        self.processing = Some(processing);
        self
    }

    pub(crate) fn has_processing(&self) -> bool {
        self.processing.is_some()
    }

    /// The rows of the outputs for logits of `logits_rows` rows: the number
    /// of [`row_indices`](Self::row_indices) when given, else `logits_rows`.
    pub fn output_rows(&self, logits_rows: usize) -> usize {
        self.row_indices.map_or(logits_rows, <[i64]>::len)
    }

    pub(crate) fn has_per_row_slices(&self) -> bool {
        self.temperature_per_row.is_some()
            || self.top_k_per_row.is_some()
            || self.top_p_per_row.is_some()
            || self.min_p_per_row.is_some()
            || self.seed_per_row.is_some()
            || self.offset_per_row.is_some()
            || self.subsequence_per_row.is_some()
            || self.row_indices.is_some()
    }

    /// The C struct for logits of `logits_rows` rows of `vocab` tokens, the
    /// per-row slices' lengths checked against the output rows. The pointers
    /// in it borrow from `self`.
    pub(crate) fn raw_for_logits(&self, logits_rows: usize, vocab: usize) -> Result<RawParams> {
        fn slice_pointer<T>(name: &str, values: Option<&[T]>, rows: usize, gathered: bool) -> Result<*const T> {
            match values {
                None => Ok(ptr::null()),
                Some(values) if values.len() == rows => Ok(values.as_ptr()),
                Some(values) if gathered => Err(Error::invalid_argument(format!(
                    "{name} has {} values for {rows} output rows; expected one per entry of row_indices",
                    values.len()
                ))),
                Some(values) => Err(Error::invalid_argument(format!(
                    "{name} has {} values for {rows} rows; expected one per row",
                    values.len()
                ))),
            }
        }
        let rows = self.output_rows(logits_rows);
        let gathered = self.row_indices.is_some();
        if gathered && rows == 0 {
            return Err(Error::invalid_argument("row_indices is empty; expected at least one entry".into()));
        }
        let num_samples = i32::try_from(self.num_samples).map_err(|_| {
            Error::invalid_parameter(format!("num_samples is {}; expected 1 .. 2^31-1", self.num_samples))
        })?;
        let processing = self.processing.map(|processing| processing.raw(rows, vocab)).transpose()?;
        let params = sys::psm_params {
            temperature: self.temperature,
            top_k: i32::try_from(self.top_k).unwrap_or(i32::MAX),
            top_p: self.top_p,
            min_p: self.min_p,
            seed: self.seed,
            offset: self.offset,
            num_samples,
            temperature_per_row: slice_pointer("temperature_per_row", self.temperature_per_row, rows, gathered)?,
            top_k_per_row: slice_pointer("top_k_per_row", self.top_k_per_row, rows, gathered)?,
            top_p_per_row: slice_pointer("top_p_per_row", self.top_p_per_row, rows, gathered)?,
            min_p_per_row: slice_pointer("min_p_per_row", self.min_p_per_row, rows, gathered)?,
            seed_per_row: slice_pointer("seed_per_row", self.seed_per_row, rows, gathered)?,
            offset_per_row: slice_pointer("offset_per_row", self.offset_per_row, rows, gathered)?,
            subsequence_per_row: slice_pointer("subsequence_per_row", self.subsequence_per_row, rows, gathered)?,
            seed_pointer: ptr::null(),
            offset_pointer: ptr::null(),
            row_indices: self.row_indices.map_or(ptr::null(), <[i64]>::as_ptr),
            // A slice's length is at most isize::MAX.
            output_rows: if gathered { rows as i64 } else { 0 },
            workspace: ptr::null_mut(),
            workspace_bytes: 0,
            processing: ptr::null(),
            top_logprobs: ptr::null(),
            filter_order: self.filter_order.raw() as i32,
        };
        Ok(RawParams { params, processing })
    }
}

/// The values of host logits: `f32`, or 16-bit floats as `u16` bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum LogitsData<'a> {
    F32(&'a [f32]),
    F16(&'a [u16]),
    Bf16(&'a [u16]),
}

/// A `rows x vocab` matrix of logits in host memory, row-major, rows
/// `row_stride` elements apart (default: `vocab`).
///
/// ```
/// use polysample::Logits;
/// let values = vec![0.0f32; 2 * 4];
/// let logits = Logits::f32(&values, 2, 4);
/// assert_eq!((logits.rows(), logits.vocab()), (2, 4));
/// // f16 and bf16 go in as bit patterns: 1.0 is 0x3c00 in f16, 0x3f80 in bf16.
/// let halves = [0x3c00u16, 0x0000];
/// let logits = Logits::f16(&halves, 1, 2);
/// # let _ = logits;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Logits<'a> {
    data: LogitsData<'a>,
    rows: usize,
    vocab: usize,
    row_stride: usize,
}

impl<'a> Logits<'a> {
    pub fn new(data: LogitsData<'a>, rows: usize, vocab: usize) -> Logits<'a> {
        Logits { data, rows, vocab, row_stride: vocab }
    }

    pub fn f32(values: &'a [f32], rows: usize, vocab: usize) -> Logits<'a> {
        Logits::new(LogitsData::F32(values), rows, vocab)
    }

    /// IEEE half-precision bit patterns.
    pub fn f16(bits: &'a [u16], rows: usize, vocab: usize) -> Logits<'a> {
        Logits::new(LogitsData::F16(bits), rows, vocab)
    }

    /// bfloat16 bit patterns.
    pub fn bf16(bits: &'a [u16], rows: usize, vocab: usize) -> Logits<'a> {
        Logits::new(LogitsData::Bf16(bits), rows, vocab)
    }

    /// Rows `row_stride` elements apart (at least `vocab`): the data then
    /// holds at least `(rows - 1) * row_stride + vocab` and at most
    /// `rows * row_stride` values.
    pub fn with_row_stride(mut self, row_stride: usize) -> Self {
        self.row_stride = row_stride;
        self
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    pub fn dtype(&self) -> Dtype {
        match self.data {
            LogitsData::F32(_) => Dtype::F32,
            LogitsData::F16(_) => Dtype::F16,
            LogitsData::Bf16(_) => Dtype::Bf16,
        }
    }

    /// The C tensor, after checking the shape against the slice's length.
    pub(crate) fn raw_tensor(&self) -> Result<sys::psm_tensor> {
        let (pointer, length) = match self.data {
            LogitsData::F32(values) => (values.as_ptr().cast::<std::ffi::c_void>(), values.len()),
            LogitsData::F16(bits) | LogitsData::Bf16(bits) => (bits.as_ptr().cast(), bits.len()),
        };
        check_shape("logits", self.rows, self.vocab, self.row_stride)?;
        // check_shape bounds rows * row_stride, so these cannot overflow.
        let least = (self.rows - 1) * self.row_stride + self.vocab;
        let most = self.rows * self.row_stride;
        if length < least || length > most {
            let expected = if least == most { format!("{least}") } else { format!("{least} .. {most}") };
            return Err(Error::invalid_argument(format!(
                "logits: {length} values for {} rows x {} (row stride {}); expected {expected}",
                self.rows, self.vocab, self.row_stride
            )));
        }
        Ok(sys::psm_tensor {
            data: pointer.cast_mut(),
            dtype: self.dtype().raw(),
            memory: sys::PSM_MEMORY_HOST,
            rows: self.rows as i64,
            vocab: self.vocab as i64,
            row_stride: self.row_stride as i64,
        })
    }
}

/// Checks what the length arithmetic relies on; the library checks the same
/// again, so the messages follow its wording.
pub(crate) fn check_shape(name: &str, rows: usize, vocab: usize, row_stride: usize) -> Result<()> {
    if rows < 1 {
        return Err(Error::invalid_argument(format!("{name}: rows is {rows}; expected >= 1")));
    }
    if vocab < 1 || vocab > i32::MAX as usize {
        return Err(Error::invalid_argument(format!("{name}: vocab is {vocab}; expected 1 .. 2^31-1")));
    }
    if row_stride < vocab {
        return Err(Error::invalid_argument(format!("{name}: row_stride is {row_stride}, below vocab {vocab}")));
    }
    if rows.checked_mul(row_stride).map_or(true, |elements| elements > (i64::MAX / 8) as usize) {
        return Err(Error::invalid_argument(format!("{name}: rows x row_stride ({rows} x {row_stride}) is too large")));
    }
    Ok(())
}
