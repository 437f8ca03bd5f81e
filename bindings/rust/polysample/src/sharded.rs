//! Sampling rows split by vocabulary across ranks (docs/SAMPLING.md,
//! section 8): each rank starts a [`Sharded`] call on its columns, then
//! all-gathers, with its own collective, the bytes each round names.

use crate::context::Context;
use crate::error::{check, Error, Result};
use crate::params::{Logits, Params};
use crate::sys;
use std::ffi::c_void;
use std::marker::PhantomData;
use std::ptr::{self, NonNull};

/// One rank's place in a vocabulary split: its columns start at
/// `first_token` of rows of `full_vocab` tokens, and it is `index` of
/// `count` ranks in every all-gather's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub first_token: usize,
    pub full_vocab: usize,
    pub index: usize,
    pub count: usize,
}

/// A sharded call in progress on one rank. Each [`next`](Self::next) takes
/// the previous round's all-gather (every rank's bytes, in shard order) and
/// gives this rank's bytes for the next one; when it gives `None`, the
/// outputs equal [`Context::sample_with_logprobs`] on the whole rows, bit
/// for bit. The logits stay borrowed until the call is dropped.
///
/// ```
/// use polysample::{Backend, ContextOptions, Logits, Params, Shard};
/// let values: Vec<f32> = (0..2 * 3000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
/// let params = Params::new().temperature(0.8).top_p(0.9).seed(5);
/// // Two ranks in one process: columns 0..1700 and 1700..3000 of 2 rows.
/// let mut contexts = [ContextOptions::new().backend(Backend::Cpu).create()?,
///                     ContextOptions::new().backend(Backend::Cpu).create()?];
/// let (first, second) = (Logits::f32(&values[..3000 + 1700], 2, 1700).with_row_stride(3000),
///                        Logits::f32(&values[1700..], 2, 1300).with_row_stride(3000));
/// let [a, b] = &mut contexts;
/// let mut calls = [
///     a.sharded(&first, Shard { first_token: 0, full_vocab: 3000, index: 0, count: 2 }, &params)?,
///     b.sharded(&second, Shard { first_token: 1700, full_vocab: 3000, index: 1, count: 2 }, &params)?,
/// ];
/// let mut gathered: Option<Vec<u8>> = None;
/// loop {
///     let mut round = Vec::new();
///     for call in calls.iter_mut() {
///         match call.next(gathered.as_deref())? {
///             Some(bytes) => round.extend_from_slice(bytes),
///             None => {}
///         }
///     }
///     if round.is_empty() { break; }
///     gathered = Some(round);
/// }
/// let (tokens, _logprobs) = calls[0].outputs().unwrap();
/// let whole = Logits::f32(&values, 2, 3000);
/// let mut context = ContextOptions::new().backend(Backend::Cpu).create()?;
/// assert_eq!(tokens, context.sample(&whole, &params)?.as_slice());
/// # Ok::<(), polysample::Error>(())
/// ```
pub struct Sharded<'a> {
    raw: NonNull<sys::psm_sharded>,
    tokens: Vec<i32>,
    logprobs: Vec<f32>,
    stage: Stage,
    _borrows: PhantomData<(&'a Logits<'a>, &'a mut Context)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    First,
    Rounds,
    Written,
    Failed,
}

impl std::fmt::Debug for Sharded<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sharded").field("stage", &self.stage).finish_non_exhaustive()
    }
}

impl Drop for Sharded<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from psm_sharded_begin and is ended once.
        unsafe { sys::psm_sharded_end(self.raw.as_ptr()) }
    }
}

impl Context {
    /// Starts a sharded call on this rank's columns (`logits`: rows x its
    /// columns, with the row stride of the full rows where it is a view of
    /// them). Every rank passes the same `params`, which are read here;
    /// logit processing, top-N logprobs and filter orders other than the
    /// default are refused, and on a GPU backend device logits with
    /// per-row arrays and device outputs
    /// ([`Status::Unsupported`](crate::Status::Unsupported)).
    pub fn sharded<'a>(&'a mut self, logits: &'a Logits<'a>, shard: Shard, params: &Params<'_>) -> Result<Sharded<'a>> {
        let to_i64 = |name: &str, value: usize| {
            i64::try_from(value).map_err(|_| Error::invalid_argument(format!("{name} is {value}; too large")))
        };
        let to_i32 = |name: &str, value: usize| {
            i32::try_from(value).map_err(|_| Error::invalid_argument(format!("{name} is {value}; too large")))
        };
        let raw_shard = sys::psm_shard {
            first_token: to_i64("first_token", shard.first_token)?,
            full_vocab: to_i64("full_vocab", shard.full_vocab)?,
            shard_index: to_i32("index", shard.index)?,
            shard_count: to_i32("count", shard.count)?,
        };
        let tensor = logits.raw_tensor()?;
        let mut raw_params = params.raw_for_logits(logits.rows(), logits.vocab())?;
        let samples = usize::try_from(raw_params.params.num_samples.max(0)).unwrap_or(0);
        let length = params
            .output_rows(logits.rows())
            .checked_mul(samples)
            .ok_or_else(|| Error::invalid_argument("rows x num_samples is too large".into()))?;
        let (mut tokens, mut logprobs) = (vec![0i32; length], vec![0f32; length]);
        let mut call = ptr::null_mut();
        // SAFETY: the tensor borrows `logits` for 'a (the call reads it in
        // its rounds); params and shard are read here only; the outputs are
        // Vecs whose heap buffers the returned value owns and never resizes.
        let status = unsafe {
            sys::psm_sharded_begin(
                self.raw_mut(),
                &tensor,
                &raw_shard,
                raw_params.get(),
                sys::psm_output { data: tokens.as_mut_ptr().cast(), memory: sys::PSM_MEMORY_HOST },
                sys::psm_output { data: logprobs.as_mut_ptr().cast(), memory: sys::PSM_MEMORY_HOST },
                &mut call,
            )
        };
        check(status)?;
        let raw = NonNull::new(call).ok_or_else(|| Error::invalid_argument("psm_sharded_begin gave no call".into()))?;
        Ok(Sharded { raw, tokens, logprobs, stage: Stage::First, _borrows: PhantomData })
    }
}

impl Sharded<'_> {
    /// One round: `gathered` is `None` the first time, then the previous
    /// round's all-gather. Returns this rank's bytes for the next all-gather
    /// (the same length on every rank), or `None` when the outputs are
    /// written. An error ends the call with nothing written.
    pub fn next(&mut self, gathered: Option<&[u8]>) -> Result<Option<&[u8]>> {
        match (self.stage, gathered.is_some()) {
            (Stage::Written | Stage::Failed, _) => {
                return Err(Error::invalid_argument("sharded call: already finished".into()))
            }
            (Stage::First, true) => {
                return Err(Error::invalid_argument("sharded call: the first round takes no gathered bytes".into()))
            }
            (Stage::Rounds, false) => {
                return Err(Error::invalid_argument(
                    "sharded call: every round after the first takes the previous all-gather".into(),
                ))
            }
            _ => {}
        }
        let (data, bytes) = gathered.map_or((ptr::null(), 0), |g| (g.as_ptr().cast::<c_void>(), g.len()));
        let mut send: *const c_void = ptr::null();
        let mut send_bytes = 0usize;
        // SAFETY: `gathered` lives for the call; the library copies what it
        // needs before returning. `send` points into the call's own buffer,
        // valid until the next call on it, which the returned borrow of
        // `self` enforces.
        let status = unsafe { sys::psm_sharded_next(self.raw.as_ptr(), data, bytes, &mut send, &mut send_bytes) };
        if let Err(error) = check(status) {
            self.stage = Stage::Failed;
            return Err(error);
        }
        if send_bytes == 0 {
            self.stage = Stage::Written;
            return Ok(None);
        }
        self.stage = Stage::Rounds;
        // SAFETY: the library says `send` holds `send_bytes` bytes.
        Ok(Some(unsafe { std::slice::from_raw_parts(send.cast::<u8>(), send_bytes) }))
    }

    /// The tokens and logprobs (`rows x num_samples`) once
    /// [`next`](Self::next) has returned `None`.
    pub fn outputs(&self) -> Option<(&[i32], &[f32])> {
        (self.stage == Stage::Written).then_some((self.tokens.as_slice(), self.logprobs.as_slice()))
    }
}
