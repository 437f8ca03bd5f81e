use polysample_sys as sys;
use std::ffi::CStr;
use std::fmt;

/// Why a call failed: the library's `psm_status` values other than `PSM_OK`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Status {
    /// A null pointer, bad size or bad enum value; also a slice of the wrong
    /// length, found by this crate before calling the library.
    InvalidArgument,
    /// A sampling parameter out of range.
    InvalidParameter,
    /// A valid request the backend cannot do.
    Unsupported,
    /// The backend asked for is not compiled into the library.
    BackendNotCompiled,
    /// The backend is compiled in but has no usable device.
    NoDevice,
    /// A driver or runtime call failed.
    Driver,
    /// A host or device allocation failed.
    OutOfMemory,
    /// Checking mode: a row had a NaN or +inf logit, or no finite logit.
    BadRow,
    /// Memory of another backend was passed.
    WrongBackend,
    /// `POLYSAMPLE_BACKEND` could not be parsed.
    Environment,
    /// A bug in polysample.
    Internal,
    /// A status this crate does not know (a newer library): its raw value.
    Other(u32),
}

impl Status {
    /// The status of a raw `psm_status`; `None` for `PSM_OK`.
    pub fn from_raw(raw: sys::psm_status) -> Option<Status> {
        Some(match raw {
            sys::PSM_OK => return None,
            sys::PSM_ERR_INVALID_ARGUMENT => Status::InvalidArgument,
            sys::PSM_ERR_INVALID_PARAMETER => Status::InvalidParameter,
            sys::PSM_ERR_UNSUPPORTED => Status::Unsupported,
            sys::PSM_ERR_BACKEND_NOT_COMPILED => Status::BackendNotCompiled,
            sys::PSM_ERR_NO_DEVICE => Status::NoDevice,
            sys::PSM_ERR_DRIVER => Status::Driver,
            sys::PSM_ERR_OUT_OF_MEMORY => Status::OutOfMemory,
            sys::PSM_ERR_BAD_ROW => Status::BadRow,
            sys::PSM_ERR_WRONG_BACKEND => Status::WrongBackend,
            sys::PSM_ERR_ENVIRONMENT => Status::Environment,
            sys::PSM_ERR_INTERNAL => Status::Internal,
            other => Status::Other(other),
        })
    }

    /// The raw `psm_status` value.
    pub fn raw(self) -> sys::psm_status {
        match self {
            Status::InvalidArgument => sys::PSM_ERR_INVALID_ARGUMENT,
            Status::InvalidParameter => sys::PSM_ERR_INVALID_PARAMETER,
            Status::Unsupported => sys::PSM_ERR_UNSUPPORTED,
            Status::BackendNotCompiled => sys::PSM_ERR_BACKEND_NOT_COMPILED,
            Status::NoDevice => sys::PSM_ERR_NO_DEVICE,
            Status::Driver => sys::PSM_ERR_DRIVER,
            Status::OutOfMemory => sys::PSM_ERR_OUT_OF_MEMORY,
            Status::BadRow => sys::PSM_ERR_BAD_ROW,
            Status::WrongBackend => sys::PSM_ERR_WRONG_BACKEND,
            Status::Environment => sys::PSM_ERR_ENVIRONMENT,
            Status::Internal => sys::PSM_ERR_INTERNAL,
            Status::Other(raw) => raw,
        }
    }

    /// The library's short description (`psm_status_string`), e.g.
    /// "sampling parameter out of range".
    pub fn description(self) -> &'static str {
        // SAFETY: psm_status_string returns a static, NUL-terminated string
        // for every value, known or not.
        let text = unsafe { CStr::from_ptr(sys::psm_status_string(self.raw())) };
        text.to_str().unwrap_or("unknown status")
    }
}

impl fmt::Display for Status {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.description())
    }
}

/// A failed call: its status and the library's message for it.
///
/// `message` is `psm_last_error()` copied on the calling thread right after
/// the failing call, or, for a mistake this crate finds before calling the
/// library (a slice of the wrong length), this crate's own message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

impl Error {
    /// The error for `raw`, with the calling thread's `psm_last_error()`;
    /// call it right after the failing call, on the same thread.
    pub(crate) fn from_last_call(raw: sys::psm_status) -> Error {
        // SAFETY: psm_last_error returns a thread-local, NUL-terminated
        // string, valid until the next polysample call on this thread; it is
        // copied before any other call.
        let message = unsafe { CStr::from_ptr(sys::psm_last_error()) }.to_string_lossy().into_owned();
        Error { status: Status::from_raw(raw).unwrap_or(Status::Other(raw)), message }
    }

    pub(crate) fn invalid_argument(message: String) -> Error {
        Error { status: Status::InvalidArgument, message }
    }

    pub(crate) fn invalid_parameter(message: String) -> Error {
        Error { status: Status::InvalidParameter, message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.message.is_empty() {
            write!(formatter, "{}", self.status)
        } else {
            write!(formatter, "{}: {}", self.status, self.message)
        }
    }
}

impl std::error::Error for Error {}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Ok for `PSM_OK`, else the error with the thread's message.
pub(crate) fn check(raw: sys::psm_status) -> Result<()> {
    if raw == sys::PSM_OK {
        Ok(())
    } else {
        Err(Error::from_last_call(raw))
    }
}
