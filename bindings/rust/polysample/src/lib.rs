#![doc = include_str!("../README.md")]
//!
//! # Device memory and streams
//!
//! [`Context::sample_device`] and [`Context::probs_device`] take logits and
//! outputs already in the backend's memory (a CUDA or HIP device pointer, an
//! OpenCL `cl_mem`) and queue the work on the context's stream, which
//! [`ContextOptions::native_stream`] can set to the caller's own. They are
//! `unsafe`: their documentation states what the caller guarantees.
//! `examples/cuda_buffer.rs` samples from a CUDA buffer, and
//! `examples/candle_custom_op.md` shows how a candle `CustomOp` would pass its
//! CUDA storage pointer and stream.
//!
//! # Threads
//!
//! A [`Context`] moves between threads but is never shared by two at once:
//!
//! ```compile_fail
//! fn shared<T: Sync>() {}
//! shared::<polysample::Context>();
//! ```
//!
//! Parallel work uses one context per thread, or a `Mutex<Context>`.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]

mod context;
mod error;
mod info;
mod params;
mod processing;
mod sharded;
mod verify;

pub use context::{
    Context, ContextOptions, DeviceLogits, DevicePerRow, DeviceProcessing, DeviceWorkspace, LogprobMode, TopLogprobs,
};
pub use error::{Error, Result, Status};
pub use info::{backends, version, version_number, Availability, Backend, BackendInfo, Dtype};
pub use params::{FilterOrder, Logits, LogitsData, Params};
pub use processing::Processing;
pub use sharded::{Shard, Sharded};
pub use verify::{Drafts, Verification};

/// The raw declarations, for what this crate does not wrap.
pub use polysample_sys as sys;
