use polysample_sys as sys;
use std::ffi::{c_char, CStr};
use std::fmt;
use std::ptr;
use std::str::FromStr;

/// A polysample backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Backend {
    /// Context creation only: `POLYSAMPLE_BACKEND` if set, else CUDA, HIP, an
    /// OpenCL GPU or accelerator, then the CPU backend.
    Auto,
    Cpu,
    Cuda,
    Hip,
    Opencl,
}

impl Backend {
    /// The backends that do the work (every one but [`Backend::Auto`]).
    pub const CONCRETE: [Backend; 4] = [Backend::Cpu, Backend::Cuda, Backend::Hip, Backend::Opencl];

    /// The raw `psm_backend` value.
    pub fn raw(self) -> sys::psm_backend {
        match self {
            Backend::Auto => sys::PSM_BACKEND_AUTO,
            Backend::Cpu => sys::PSM_BACKEND_CPU,
            Backend::Cuda => sys::PSM_BACKEND_CUDA,
            Backend::Hip => sys::PSM_BACKEND_HIP,
            Backend::Opencl => sys::PSM_BACKEND_OPENCL,
        }
    }

    /// The backend of a raw value; `None` for a value this crate does not know.
    pub fn from_raw(raw: sys::psm_backend) -> Option<Backend> {
        match raw {
            sys::PSM_BACKEND_AUTO => Some(Backend::Auto),
            sys::PSM_BACKEND_CPU => Some(Backend::Cpu),
            sys::PSM_BACKEND_CUDA => Some(Backend::Cuda),
            sys::PSM_BACKEND_HIP => Some(Backend::Hip),
            sys::PSM_BACKEND_OPENCL => Some(Backend::Opencl),
            _ => None,
        }
    }

    /// The library's name for it: "auto", "cpu", "cuda", "hip", "opencl".
    pub fn name(self) -> &'static str {
        // SAFETY: psm_backend_name returns a static string for every value.
        unsafe { static_str(sys::psm_backend_name(self.raw())) }
    }

    /// Whether the library was built with this backend.
    pub fn is_compiled(self) -> bool {
        // SAFETY: no pointers; any value is accepted.
        unsafe { sys::psm_backend_compiled(self.raw()) != 0 }
    }

    /// Whether a context of this backend can be created now, and the
    /// library's reason why not (or a device summary when it can).
    pub fn availability(self) -> Availability {
        let mut reason: *const c_char = ptr::null();
        // SAFETY: reason is a valid out-pointer; the text it receives is
        // static or thread-local and is copied before any other call.
        let available = unsafe { sys::psm_backend_available(self.raw(), &mut reason) } != 0;
        let reason = if reason.is_null() {
            String::new()
        } else {
            unsafe { CStr::from_ptr(reason) }.to_string_lossy().into_owned()
        };
        Availability { available, reason }
    }

    /// The number of devices this backend sees (0 when it is unavailable).
    pub fn device_count(self) -> usize {
        // SAFETY: no pointers; any value is accepted.
        let count = unsafe { sys::psm_backend_device_count(self.raw()) };
        usize::try_from(count).unwrap_or(0)
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.name())
    }
}

/// Parses "auto", "cpu", "cuda", "hip" or "opencl" (any case).
impl FromStr for Backend {
    type Err = String;

    fn from_str(text: &str) -> Result<Backend, String> {
        match text.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Backend::Auto),
            "cpu" => Ok(Backend::Cpu),
            "cuda" => Ok(Backend::Cuda),
            "hip" => Ok(Backend::Hip),
            "opencl" => Ok(Backend::Opencl),
            other => Err(format!("unknown backend {other:?}; expected auto, cpu, cuda, hip or opencl")),
        }
    }
}

/// The answer of [`Backend::availability`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Availability {
    pub available: bool,
    /// Why not, or a device summary when available.
    pub reason: String,
}

/// One row of [`backends`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendInfo {
    pub backend: Backend,
    pub compiled: bool,
    pub available: bool,
    /// Why the backend is unavailable, or a device summary.
    pub reason: String,
    pub device_count: usize,
}

/// Every concrete backend, whether compiled in and available, and why.
///
/// ```
/// for info in polysample::backends() {
///     println!("{:7} compiled {:5} available {:5} {}", info.backend, info.compiled, info.available, info.reason);
/// }
/// assert!(polysample::backends().iter().any(|info| info.backend == polysample::Backend::Cpu && info.available));
/// ```
pub fn backends() -> Vec<BackendInfo> {
    Backend::CONCRETE
        .iter()
        .map(|&backend| {
            let availability = backend.availability();
            BackendInfo {
                backend,
                compiled: backend.is_compiled(),
                available: availability.available,
                reason: availability.reason,
                device_count: backend.device_count(),
            }
        })
        .collect()
}

/// The library's version, e.g. "0.1.0" (of the library linked, which may
/// differ from this crate's).
pub fn version() -> &'static str {
    // SAFETY: psm_version_string returns a static string.
    unsafe { static_str(sys::psm_version_string()) }
}

/// The library's version as major * 10000 + minor * 100 + patch.
pub fn version_number() -> i32 {
    // SAFETY: no arguments.
    unsafe { sys::psm_version_number() }
}

/// The element type of logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    /// IEEE half precision, passed as `u16` bit patterns.
    F16,
    /// bfloat16, passed as `u16` bit patterns.
    Bf16,
}

impl Dtype {
    pub fn raw(self) -> sys::psm_dtype {
        match self {
            Dtype::F32 => sys::PSM_DTYPE_F32,
            Dtype::F16 => sys::PSM_DTYPE_F16,
            Dtype::Bf16 => sys::PSM_DTYPE_BF16,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// # Safety
/// `text` must be a NUL-terminated string that lives for the whole program.
pub(crate) unsafe fn static_str(text: *const c_char) -> &'static str {
    if text.is_null() {
        return "";
    }
    // SAFETY: the caller guarantees a static NUL-terminated string.
    unsafe { CStr::from_ptr(text) }.to_str().unwrap_or("(not UTF-8)")
}
