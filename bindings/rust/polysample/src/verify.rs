use crate::context::Context;
use crate::error::{check, Error, Result};
use crate::params::{Logits, Params, RawParams};
use polysample_sys as sys;
use std::ffi::c_void;
use std::ptr;

/// What a draft proposed, for [`Context::verify`] (docs/SAMPLING.md,
/// section 7): `nodes` (k, 1 ..= 64) drafted tokens per request, as a chain
/// or a tree, and the distribution each node's token was drawn from.
///
/// Node 0 is the root (the last token already emitted); nodes 1..=k carry
/// the drafted tokens, request r's node i at `tokens[r * k + i - 1]`. In a
/// chain node i follows node i - 1; in a tree `parents[r * k + i - 1]` is
/// node i's parent, an earlier node (0 ..= i - 1), as EAGLE-style drafts
/// lay them out.
///
/// The draft's distribution, one row per node (row `r * k + i - 1`: the
/// distribution node i's token was drawn from, given its parent's path and
/// its earlier siblings), is one of:
/// - [`logits`](Self::logits): the draft model's logits with its
///   parameters (temperature and filters; their per-row slices have one
///   value per request; seeds are not used, nothing is drawn from the draft);
/// - [`probs`](Self::probs): probabilities in [0, 1], `f32`, `requests * k`
///   rows of the target's vocab;
/// - neither (the default): one-hot, for drafts without probabilities
///   (n-gram or prompt lookup, a greedy draft model).
///
/// A drawn token the draft gives probability 0, a token outside the vocab,
/// a parent that is not an earlier node, or a probability outside [0, 1]
/// makes the call fail with [`Status::InvalidParameter`](crate::Status) and
/// the library's message naming the request and node.
#[derive(Debug, Clone, Copy)]
pub struct Drafts<'a> {
    nodes: usize,
    tokens: &'a [i32],
    parents: Option<&'a [i32]>,
    distribution: DraftDistribution<'a>,
}

#[derive(Debug, Clone, Copy)]
enum DraftDistribution<'a> {
    OneHot,
    Logits(Logits<'a>, &'a Params<'a>),
    Probs(&'a [f32]),
}

impl<'a> Drafts<'a> {
    /// `nodes` drafted tokens per request, each following the previous one;
    /// `tokens` holds `requests x nodes` of them, row-major. One-hot until
    /// [`logits`](Self::logits) or [`probs`](Self::probs) says otherwise.
    pub fn chain(nodes: usize, tokens: &'a [i32]) -> Drafts<'a> {
        Drafts { nodes, tokens, parents: None, distribution: DraftDistribution::OneHot }
    }

    /// A tree of `nodes` nodes per request: `parents` holds each node's
    /// parent (`requests x nodes`, the same layout as `tokens`).
    pub fn tree(nodes: usize, tokens: &'a [i32], parents: &'a [i32]) -> Drafts<'a> {
        Drafts { nodes, tokens, parents: Some(parents), distribution: DraftDistribution::OneHot }
    }

    /// The draft model's logits (`requests * nodes` rows of the target's
    /// vocab) and the parameters that shaped its distribution.
    pub fn logits(mut self, logits: Logits<'a>, params: &'a Params<'a>) -> Self {
        self.distribution = DraftDistribution::Logits(logits, params);
        self
    }

    /// The draft's probabilities, `requests * nodes` rows of the target's
    /// vocab, row-major; read as integers `floor(q * 2^B)`, so rows need not
    /// sum to 1.
    pub fn probs(mut self, probs: &'a [f32]) -> Self {
        self.distribution = DraftDistribution::Probs(probs);
        self
    }

    /// Back to one-hot drafts: each node's distribution is a point mass on
    /// its token.
    pub fn one_hot(mut self) -> Self {
        self.distribution = DraftDistribution::OneHot;
        self
    }

    /// k, the draft nodes per request.
    pub fn nodes(&self) -> usize {
        self.nodes
    }
}

/// The result of [`Context::verify`], row-major over the requests; each
/// request has `k + 1` entries in `tokens`, `path_nodes` and `logprobs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Verification {
    /// Per request: the accepted draft tokens (0 up to the tree's depth);
    /// -1 for a bad request.
    pub accepted: Vec<i32>,
    /// The accepted draft tokens in path order, then the correction (after
    /// a rejection) or bonus token (after a path that reached a leaf); -1
    /// after it, and everywhere for a bad request.
    pub tokens: Vec<i32>,
    /// The node each emitted token was drawn at: 0 (the root), then the
    /// accepted nodes, whose cache entries a runtime keeps; -1 after.
    pub path_nodes: Vec<i32>,
    /// Each emitted token's natural log probability under the target's
    /// distribution at its node; NaN after, and for a bad request.
    pub logprobs: Vec<f32>,
}

impl Verification {
    /// The number of requests.
    pub fn requests(&self) -> usize {
        self.accepted.len()
    }

    /// The tokens request `request` emits: its accepted drafts, then the
    /// correction or bonus token; empty for a bad request. Panics if
    /// `request` is not below [`requests`](Self::requests).
    pub fn emitted(&self, request: usize) -> &[i32] {
        &self.tokens[self.emitted_range(request)]
    }

    /// The nodes request `request`'s emitted tokens were drawn at: 0, then
    /// its accepted path. Empty for a bad request.
    pub fn path(&self, request: usize) -> &[i32] {
        &self.path_nodes[self.emitted_range(request)]
    }

    fn emitted_range(&self, request: usize) -> std::ops::Range<usize> {
        let positions = self.tokens.len() / self.requests();
        let start = request * positions;
        start..start + usize::try_from(self.accepted[request] + 1).unwrap_or(0)
    }
}

/// A host tensor of `rows x vocab` f32 values, rows packed.
fn host_f32_tensor(values: &[f32], rows: usize, vocab: usize) -> sys::psm_tensor {
    sys::psm_tensor {
        data: values.as_ptr().cast::<c_void>().cast_mut(),
        dtype: sys::PSM_DTYPE_F32,
        memory: sys::PSM_MEMORY_HOST,
        rows: rows as i64,
        vocab: vocab as i64,
        row_stride: vocab as i64,
    }
}

/// A draft slice must hold `requests x k` values (times the vocab, for
/// probabilities).
fn check_draft_len(name: &str, length: usize, requests: usize, k: usize, vocab: Option<usize>) -> Result<()> {
    // requests x k is at most the target's rows, so only the vocab's
    // product can overflow.
    let expected = (requests * k).checked_mul(vocab.unwrap_or(1));
    if expected == Some(length) {
        return Ok(());
    }
    let vocab_text = vocab.map_or_else(String::new, |vocab| format!(" x vocab {vocab}"));
    let expected_text = expected.map_or_else(|| "too many".to_string(), |count| count.to_string());
    Err(Error::invalid_argument(format!(
        "{name} has {length} values; expected requests x k{vocab_text} = {requests} x {k}{} = {expected_text}",
        vocab.map_or_else(String::new, |vocab| format!(" x {vocab}"))
    )))
}

/// `params` for a verification of `requests` requests: its per-row slices
/// have one value per request, which a length error says.
fn raw_per_request(which: &str, params: &Params<'_>, requests: usize, vocab: usize) -> Result<RawParams> {
    params.raw_for_logits(requests, vocab).map_err(|error| Error {
        status: error.status,
        message: format!("{which}: {} (in a verification, a row is a request)", error.message),
    })
}

impl Context {
    /// Speculative decoding verification (docs/SAMPLING.md, section 7):
    /// checks each request's drafted tokens against the target model's
    /// logits by exact rejection sampling in integers, and draws one more
    /// token from the target: the emitted tokens follow the target's
    /// distribution, and every backend accepts the same tokens.
    ///
    /// `target` holds `requests x (k + 1)` rows: row `r * (k + 1) + i` is
    /// the target's logits after node i's path (node 0: the root). `params`
    /// are the target's: temperature, filters, filter order, seed and
    /// offset; their per-row slices have one value per request, and a
    /// request's seed, offset and stream are those of row r of
    /// [`sample`](Self::sample). Row indices, logit processing and
    /// `num_samples` other than 1 are not supported
    /// ([`Status::Unsupported`](crate::Status)). Every backend runs it,
    /// with the same results.
    ///
    /// A request whose target rows include a bad row (NaN, +inf, no finite
    /// logit) gets -1 and NaN everywhere, or fails the call with
    /// [`Status::BadRow`](crate::Status) when the context checks rows.
    ///
    /// ```
    /// use polysample::{Backend, ContextOptions, Drafts, Logits, Params};
    /// let mut context = ContextOptions::new().backend(Backend::Cpu).create()?;
    /// // One request, k = 2 drafted tokens; the target's logits after the
    /// // root, after node 1 and after node 2, over a vocabulary of 4.
    /// let target = [
    ///     0.0f32, 3.0, 1.0, 0.0, // after the root, the target's argmax is token 1
    ///     2.0, 0.0, 0.0, 1.0, //    after node 1, token 0
    ///     0.0, 0.0, 0.0, 5.0, //    after node 2, token 3
    /// ];
    /// // One-hot drafts (say, from an n-gram table): tokens 1, then 2.
    /// let drafts = Drafts::chain(2, &[1, 2]);
    /// let result = context.verify(&Logits::f32(&target, 3, 4), &Params::new().greedy(), &drafts)?;
    /// // A greedy target accepts token 1, rejects token 2 and corrects it to 0.
    /// assert_eq!(result.accepted, [1]);
    /// assert_eq!(result.emitted(0), [1, 0]);
    /// assert_eq!(result.path(0), [0, 1]);
    /// assert_eq!(result.logprobs[..2], [0.0, 0.0]); // greedy: probability 1
    /// # Ok::<(), polysample::Error>(())
    /// ```
    pub fn verify(&mut self, target: &Logits<'_>, params: &Params<'_>, drafts: &Drafts<'_>) -> Result<Verification> {
        let k = drafts.nodes;
        let most = sys::PSM_MAX_DRAFT_NODES as usize;
        if !(1..=most).contains(&k) {
            return Err(Error::invalid_parameter(format!(
                "drafts nodes is {k}; expected 1 .. {most} (PSM_MAX_DRAFT_NODES)"
            )));
        }
        let raw_target = target.raw_tensor()?;
        let (rows, vocab) = (target.rows(), target.vocab());
        let positions = k + 1;
        if rows % positions != 0 {
            return Err(Error::invalid_argument(format!(
                "target logits have {rows} rows, not a multiple of k + 1 = {positions} (one row per node, the \
                 root included, per request)"
            )));
        }
        let requests = rows / positions;
        check_draft_len("draft tokens", drafts.tokens.len(), requests, k, None)?;
        if let Some(parents) = drafts.parents {
            check_draft_len("draft parents", parents.len(), requests, k, None)?;
        }
        let mut raw_params = raw_per_request("target params", params, requests, vocab)?;
        let mut draft_raw_params: Option<RawParams> = None;
        let (mut draft_logits, mut draft_probs) = (None, None);
        match drafts.distribution {
            DraftDistribution::OneHot => {}
            DraftDistribution::Logits(logits, draft_params) => {
                draft_logits = Some(logits.raw_tensor()?);
                draft_raw_params = Some(raw_per_request("draft params", draft_params, requests, vocab)?);
            }
            DraftDistribution::Probs(probs) => {
                check_draft_len("draft probs", probs.len(), requests, k, Some(vocab))?;
                draft_probs = Some(host_f32_tensor(probs, requests * k, vocab));
            }
        }
        let draft_params_pointer = draft_raw_params.as_mut().map_or(ptr::null(), |raw| raw.get() as *const _);
        let raw_drafts = sys::psm_drafts {
            nodes: k as i32,
            tokens: drafts.tokens.as_ptr(),
            parents: drafts.parents.map_or(ptr::null(), <[i32]>::as_ptr),
            draft_logits: draft_logits.as_ref().map_or(ptr::null(), |tensor| tensor),
            draft_params: draft_params_pointer,
            draft_probs: draft_probs.as_ref().map_or(ptr::null(), |tensor| tensor),
        };
        let slots = requests * positions;
        let mut result = Verification {
            accepted: vec![0; requests],
            tokens: vec![0; slots],
            path_nodes: vec![0; slots],
            logprobs: vec![0.0; slots],
        };
        let host = |data: *mut c_void| sys::psm_output { data, memory: sys::PSM_MEMORY_HOST };
        let outputs = sys::psm_verification {
            accepted: host(result.accepted.as_mut_ptr().cast()),
            tokens: host(result.tokens.as_mut_ptr().cast()),
            path_nodes: host(result.path_nodes.as_mut_ptr().cast()),
            logprobs: host(result.logprobs.as_mut_ptr().cast()),
        };
        // SAFETY: every input is a host slice whose length was checked
        // against the shapes above (the target and draft logits by
        // raw_tensor, the tokens, parents and probabilities here, the
        // per-request slices by raw_for_logits), borrowed for the whole
        // call; the outputs are Vecs of requests and requests x (k + 1)
        // entries owned here; the draft parameters and the processing
        // structs live in raw_params and draft_raw_params until after the
        // call. For host memory the library has finished when it returns.
        check(unsafe { sys::psm_verify(self.as_raw(), &raw_target, raw_params.get(), &raw_drafts, &outputs) })?;
        Ok(result)
    }
}
