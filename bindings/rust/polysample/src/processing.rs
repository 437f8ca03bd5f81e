use crate::error::{Error, Result};
use polysample_sys as sys;
use std::borrow::Cow;
use std::ptr;

/// Logit processing: what a runtime does to the logits before it samples,
/// done by the library as it reads them (docs/SAMPLING.md, section 1). Per
/// token of an output row, in this order: the repetition, frequency and
/// presence penalties for tokens of the row's history (and, for repetition,
/// its prompt list); the logit bias; the allowed-token mask. Attach it with
/// [`Params::processing`](crate::Params::processing). Only the CPU backend
/// runs it so far; the GPU backends refuse it with
/// [`Status::Unsupported`](crate::Status).
///
/// Every list and per-row slice has one entry per **output** row (a row of
/// the logits, or an entry of [`Params::row_indices`](crate::Params::row_indices)).
/// Lists come in two forms, as the caller keeps them:
///
/// - per row, e.g. `&[Vec<i32>]` ([`history`](Self::history),
///   [`logit_bias`](Self::logit_bias), ...): flattened here once, into
///   storage this `Processing` owns;
/// - CSR slices ([`history_csr`](Self::history_csr), ...): row r's entries
///   are `tokens[offsets[r]..offsets[r + 1]]`, borrowed without a copy, for
///   a runtime that keeps its histories flat and appends each step.
///
/// Lengths are checked when a call uses it (offsets: rows + 1 entries, each
/// within the entry slices; per-row slices: one value per row; the mask:
/// rows x words), so that the library never reads past a slice. Token ids,
/// offsets that decrease, and penalties out of range are the library's to
/// refuse: its error comes back with the row and entry it names.
///
/// ```
/// use polysample::{Backend, ContextOptions, Logits, Params, Processing};
/// let mut context = ContextOptions::new().backend(Backend::Cpu).create()?;
/// let logits = [2.0f32, 1.9, 0.0, 0.0, /* row 1 */ 0.0, 0.0, 5.0, 4.9];
/// let logits = Logits::f32(&logits, 2, 4);
/// let processing = Processing::new()
///     // Row 0 has generated token 0 twice: 2.0 - 0.5 * 2 = 1.0, below token 1's 1.9.
///     .history(&[vec![0, 0], vec![]])
///     .frequency_penalty(0.5)
///     // Row 1: token 0 gains 4.95 and token 2 (5.0) is not allowed.
///     .logit_bias(&[vec![], vec![(0, 4.95)]])
///     .allowed_mask(&[0b1111, 0b1011]);
/// let params = Params::new().greedy().processing(&processing);
/// assert_eq!(context.sample(&logits, &params)?, [1, 0]);
/// assert_eq!(context.sample(&logits, &Params::new().greedy())?, [0, 2]);
/// # Ok::<(), polysample::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Processing<'a> {
    allowed_mask: Option<(&'a [u32], Option<usize>)>,
    bias: Option<BiasLists<'a>>,
    history: Option<TokenLists<'a>>,
    prompt: Option<TokenLists<'a>>,
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    repetition_penalty_per_row: Option<&'a [f32]>,
    frequency_penalty_per_row: Option<&'a [f32]>,
    presence_penalty_per_row: Option<&'a [f32]>,
}

#[derive(Debug, Clone)]
struct TokenLists<'a> {
    offsets: Cow<'a, [i64]>,
    tokens: Cow<'a, [i32]>,
}

#[derive(Debug, Clone)]
struct BiasLists<'a> {
    offsets: Cow<'a, [i64]>,
    tokens: Cow<'a, [i32]>,
    values: Cow<'a, [f32]>,
}

/// CSR offsets of per-row lists of these lengths: 0, then running sums.
fn offsets_of(lengths: impl Iterator<Item = usize>) -> Vec<i64> {
    let mut offsets = vec![0i64];
    let mut total = 0i64;
    for length in lengths {
        // A slice holds at most isize::MAX elements, so the sum of the
        // lengths of lists that all exist in memory fits.
        total += length as i64;
        offsets.push(total);
    }
    offsets
}

impl<'a> TokenLists<'a> {
    fn from_rows<Row: AsRef<[i32]>>(rows: &[Row]) -> TokenLists<'static> {
        TokenLists {
            offsets: Cow::Owned(offsets_of(rows.iter().map(|row| row.as_ref().len()))),
            tokens: Cow::Owned(rows.iter().flat_map(|row| row.as_ref().iter().copied()).collect()),
        }
    }

    fn csr(offsets: &'a [i64], tokens: &'a [i32]) -> TokenLists<'a> {
        TokenLists { offsets: Cow::Borrowed(offsets), tokens: Cow::Borrowed(tokens) }
    }
}

impl<'a> Processing<'a> {
    /// No processing: every list absent, penalties off (repetition 1,
    /// frequency 0, presence 0).
    pub fn new() -> Processing<'a> {
        Processing::default()
    }

    /// Allowed tokens (e.g. a grammar's mask): token i of row r is allowed
    /// when bit `i % 32` of `mask[r * words + i / 32]` is set, with `words =
    /// ceil(vocab / 32)`; the others become -inf. A row that allows no valid
    /// token is a bad row (token -1, or [`Status::BadRow`](crate::Status)
    /// when the context checks rows). `mask` holds `rows x words` values.
    pub fn allowed_mask(mut self, mask: &'a [u32]) -> Self {
        self.allowed_mask = Some((mask, None));
        self
    }

    /// [`allowed_mask`](Self::allowed_mask) with rows `words` apart (at least
    /// `ceil(vocab / 32)`): `mask` holds `rows x words` values.
    pub fn allowed_mask_with_words(mut self, mask: &'a [u32], words: usize) -> Self {
        self.allowed_mask = Some((mask, Some(words)));
        self
    }

    /// Logit bias per row: `(token, bias)` pairs added to the token's logit,
    /// in list order (after the penalties). Copied into this `Processing`.
    pub fn logit_bias<Row: AsRef<[(i32, f32)]>>(mut self, rows: &[Row]) -> Self {
        let entries = || rows.iter().flat_map(|row| row.as_ref().iter().copied());
        self.bias = Some(BiasLists {
            offsets: Cow::Owned(offsets_of(rows.iter().map(|row| row.as_ref().len()))),
            tokens: Cow::Owned(entries().map(|(token, _)| token).collect()),
            values: Cow::Owned(entries().map(|(_, value)| value).collect()),
        });
        self
    }

    /// Logit bias as CSR slices, borrowed: row r adds `values[e]` to token
    /// `tokens[e]` for e in `offsets[r]..offsets[r + 1]`.
    pub fn logit_bias_csr(mut self, offsets: &'a [i64], tokens: &'a [i32], values: &'a [f32]) -> Self {
        self.bias = Some(BiasLists {
            offsets: Cow::Borrowed(offsets),
            tokens: Cow::Borrowed(tokens),
            values: Cow::Borrowed(values),
        });
        self
    }

    /// The tokens each row has generated so far, which the penalties count
    /// (a token may repeat: the frequency penalty counts its repeats; at
    /// most 2^24 tokens a row). Copied into this `Processing`.
    pub fn history<Row: AsRef<[i32]>>(mut self, rows: &[Row]) -> Self {
        self.history = Some(TokenLists::from_rows(rows));
        self
    }

    /// The history as CSR slices, borrowed.
    pub fn history_csr(mut self, offsets: &'a [i64], tokens: &'a [i32]) -> Self {
        self.history = Some(TokenLists::csr(offsets, tokens));
        self
    }

    /// Tokens the repetition penalty applies to without being counted,
    /// e.g. each row's prompt (as vLLM and Hugging Face do). Copied into
    /// this `Processing`.
    pub fn prompt<Row: AsRef<[i32]>>(mut self, rows: &[Row]) -> Self {
        self.prompt = Some(TokenLists::from_rows(rows));
        self
    }

    /// The prompt lists as CSR slices, borrowed.
    pub fn prompt_csr(mut self, offsets: &'a [i64], tokens: &'a [i32]) -> Self {
        self.prompt = Some(TokenLists::csr(offsets, tokens));
        self
    }

    /// In [1e-3, 1e3]; 1 is off. A listed token's logit x > 0 becomes x / r
    /// (times the contract's reciprocal of r), any other x becomes x * r.
    pub fn repetition_penalty(mut self, penalty: f32) -> Self {
        self.repetition_penalty = Some(penalty);
        self
    }

    /// In [-1e3, 1e3]; 0 is off. x - f * count for a token of the history.
    pub fn frequency_penalty(mut self, penalty: f32) -> Self {
        self.frequency_penalty = Some(penalty);
        self
    }

    /// In [-1e3, 1e3]; 0 is off. x - p for a token the history holds.
    pub fn presence_penalty(mut self, penalty: f32) -> Self {
        self.presence_penalty = Some(penalty);
        self
    }

    /// One repetition penalty per row, replacing the scalar.
    pub fn repetition_penalty_per_row(mut self, values: &'a [f32]) -> Self {
        self.repetition_penalty_per_row = Some(values);
        self
    }

    /// One frequency penalty per row, replacing the scalar.
    pub fn frequency_penalty_per_row(mut self, values: &'a [f32]) -> Self {
        self.frequency_penalty_per_row = Some(values);
        self
    }

    /// One presence penalty per row, replacing the scalar.
    pub fn presence_penalty_per_row(mut self, values: &'a [f32]) -> Self {
        self.presence_penalty_per_row = Some(values);
        self
    }

    /// The C struct for `rows` output rows of `vocab` tokens, after checking
    /// every slice's length; its pointers borrow from `self`.
    pub(crate) fn raw(&self, rows: usize, vocab: usize) -> Result<sys::psm_logit_processing> {
        let mut raw = std::mem::MaybeUninit::<sys::psm_logit_processing>::uninit();
        // SAFETY: psm_logit_processing_init writes every field of the struct.
        let mut raw = unsafe {
            sys::psm_logit_processing_init(raw.as_mut_ptr());
            raw.assume_init()
        };
        if let Some((mask, words)) = self.allowed_mask {
            let needed = vocab.div_ceil(32);
            let words = words.unwrap_or(needed);
            let name = "processing: allowed_mask";
            // Too few words a row is the library's to refuse (before it
            // reads anything); here only the slice must hold rows x words.
            match rows.checked_mul(words) {
                Some(expected) if expected == mask.len() => {}
                Some(expected) => {
                    return Err(Error::invalid_argument(format!(
                        "{name} has {} words; expected rows x words = {rows} x {words} = {expected}",
                        mask.len()
                    )))
                }
                None => return Err(Error::invalid_argument(format!("{name}: {rows} x {words} words is too large"))),
            }
            raw.allowed_mask = mask.as_ptr();
            raw.allowed_mask_words = i64::try_from(words)
                .map_err(|_| Error::invalid_argument(format!("{name}: {words} words a row is too many")))?;
        }
        if let Some(bias) = &self.bias {
            if bias.values.len() != bias.tokens.len() {
                return Err(Error::invalid_argument(format!(
                    "processing: logit bias has {} tokens but {} values; expected one value per token",
                    bias.tokens.len(),
                    bias.values.len()
                )));
            }
            check_offsets("bias", &bias.offsets, bias.tokens.len(), rows)?;
            raw.bias_offsets = bias.offsets.as_ptr();
            raw.bias_tokens = bias.tokens.as_ptr();
            raw.bias_values = bias.values.as_ptr();
        }
        if let Some(history) = &self.history {
            check_offsets("history", &history.offsets, history.tokens.len(), rows)?;
            raw.history_offsets = history.offsets.as_ptr();
            raw.history_tokens = history.tokens.as_ptr();
        }
        if let Some(prompt) = &self.prompt {
            check_offsets("prompt", &prompt.offsets, prompt.tokens.len(), rows)?;
            raw.prompt_offsets = prompt.offsets.as_ptr();
            raw.prompt_tokens = prompt.tokens.as_ptr();
        }
        raw.repetition_penalty = self.repetition_penalty.unwrap_or(raw.repetition_penalty);
        raw.frequency_penalty = self.frequency_penalty.unwrap_or(raw.frequency_penalty);
        raw.presence_penalty = self.presence_penalty.unwrap_or(raw.presence_penalty);
        raw.repetition_penalty_per_row = per_row("repetition_penalty_per_row", self.repetition_penalty_per_row, rows)?;
        raw.frequency_penalty_per_row = per_row("frequency_penalty_per_row", self.frequency_penalty_per_row, rows)?;
        raw.presence_penalty_per_row = per_row("presence_penalty_per_row", self.presence_penalty_per_row, rows)?;
        Ok(raw)
    }
}

/// rows + 1 offsets, each inside the entry slice, so that the library reads
/// only the caller's entries whatever their order (which it checks).
fn check_offsets(what: &str, offsets: &[i64], entries: usize, rows: usize) -> Result<()> {
    if offsets.len() != rows + 1 {
        return Err(Error::invalid_argument(format!(
            "processing: {what} offsets has {} values for {rows} rows; expected rows + 1 = {}",
            offsets.len(),
            rows + 1
        )));
    }
    if let Some((index, &offset)) =
        offsets.iter().enumerate().find(|(_, &offset)| usize::try_from(offset).map_or(true, |at| at > entries))
    {
        return Err(Error::invalid_argument(format!(
            "processing: {what} offsets[{index}] is {offset}; the {what} lists hold {entries} entries"
        )));
    }
    Ok(())
}

fn per_row(name: &str, values: Option<&[f32]>, rows: usize) -> Result<*const f32> {
    match values {
        None => Ok(ptr::null()),
        Some(values) if values.len() == rows => Ok(values.as_ptr()),
        Some(values) => Err(Error::invalid_argument(format!(
            "processing: {name} has {} values for {rows} rows; expected one per output row",
            values.len()
        ))),
    }
}
