//! The error type of the runtime: bad input is reported, never a panic.
//!
//! One enum for the whole crate. Add a variant per new failure domain (communication, migration, ...)
//! rather than folding causes into strings; callers outside the crate must keep a wildcard arm
//! (`#[non_exhaustive]`).

use std::path::PathBuf;
use switchyard_kernels::KernelError;
use thiserror::Error;

/// Why a runtime operation refused its input or could not run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A compute kernel (GEMM, MoE kernel) refused its input.
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    /// A collective failed: a peer died, stalled or sent something unexpected.
    #[error("communication: {0}")]
    Comm(#[from] crate::comm::CommError),
    /// A worker panicked or could not start.
    #[error("worker {rank}: {reason}")]
    Worker {
        /// The worker.
        rank: usize,
        /// What happened.
        reason: String,
    },
    /// An argument, shape or configuration value is invalid.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What is invalid (e.g. `"tokens"`, `"GptConfig.n_heads"`).
        what: String,
        /// Why, with the offending value and, where there is one, the fix.
        reason: String,
    },
    /// The GPU (CUDA driver, NVRTC, cuBLAS) failed or is missing, with the step that needed it.
    #[error("GPU, {step}: {reason}")]
    Device {
        /// What was being done.
        step: &'static str,
        /// The CUDA layer's message (what is missing and the fix, where it knows).
        reason: String,
    },
    /// The GPU path failed (a missing driver or library, a CUDA or cuBLAS error).
    #[cfg(feature = "cuda")]
    #[error("cuda: {0}")]
    Cuda(#[from] switchyard_kernels::cuda::CudaError),
    /// A file could not be read (or is not what it must be).
    #[error("cannot use {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
}

impl RuntimeError {
    /// Shorthand for [`RuntimeError::Invalid`].
    pub fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { what: what.into(), reason: reason.into() }
    }
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, RuntimeError>;

/// An [`RuntimeError::Invalid`] unless a flat buffer named `what` has `expected` elements
/// (`shape` describes the expected shape in the message, e.g. `"[tokens, d_model] = [8, 16]"`).
pub(crate) fn check_len(what: &str, shape: &str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(RuntimeError::invalid(what, format!("expected {shape} = {expected} elements, got {actual}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_cause() {
        let e = RuntimeError::invalid("tokens", "token 300 >= vocab 256");
        assert_eq!(e.to_string(), "invalid tokens: token 300 >= vocab 256");
        let e = RuntimeError::Io {
            path: PathBuf::from("/nope.txt"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found"),
        };
        assert!(e.to_string().contains("/nope.txt"));
        let k: RuntimeError = KernelError::ThreadPool("x".into()).into();
        assert!(matches!(k, RuntimeError::Kernel(_)));
        assert!(check_len("x", "[2, 3]", 6, 5).is_err());
        assert!(check_len("x", "[2, 3]", 6, 6).is_ok());
    }
}
