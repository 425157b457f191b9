//! The error type of every fallible kernel: bad input is reported, never a panic.

use thiserror::Error;

/// Why a kernel refused its input or could not run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum KernelError {
    /// An operand does not have the shape the operation needs.
    #[error("shape mismatch for {operand}: expected {expected}, got {actual}")]
    ShapeMismatch {
        /// Which operand (e.g. `"x"`, `"gate_weight"`, `"d_output"`).
        operand: &'static str,
        /// The shape that was required, e.g. `"[4096, 512]"`.
        expected: String,
        /// The shape that was given.
        actual: String,
    },
    /// `top_k` is zero or larger than the number of experts.
    #[error("top_k = {top_k} is invalid for {experts} experts (need 1 <= k <= experts)")]
    InvalidTopK {
        /// The requested k.
        top_k: usize,
        /// The number of experts.
        experts: usize,
    },
    /// A value that must be finite is NaN or infinite.
    #[error("non-finite value in {operand} at index {index}")]
    NonFinite {
        /// Which operand holds the value (e.g. `"gate logits"`).
        operand: &'static str,
        /// Flat index of the first offending element.
        index: usize,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid configuration {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The requested GEMM backend is not compiled into this build.
    #[error("backend {0} is not available in this build (enable the `blas` feature)")]
    BackendUnavailable(&'static str),
    /// A thread pool could not be built.
    #[error("thread pool: {0}")]
    ThreadPool(String),
    /// The PyTorch comparison script failed.
    #[error("torch benchmark failed: {0}")]
    Torch(String),
}

/// Shorthand for results of this crate.
pub type Result<T> = std::result::Result<T, KernelError>;

/// Formats a shape as `[a, b, ...]` for error messages.
pub(crate) fn shape_str(dims: &[usize]) -> String {
    let inner: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", inner.join(", "))
}

/// Returns a [`KernelError::ShapeMismatch`] unless a flat buffer has `expected` elements.
pub(crate) fn check_len(operand: &'static str, dims: &[usize], len: usize) -> Result<()> {
    let expected: usize = dims.iter().product();
    if expected == len {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            operand,
            expected: format!("{} ({} elements)", shape_str(dims), expected),
            actual: format!("{len} elements"),
        })
    }
}

/// Returns [`KernelError::NonFinite`] at the first NaN or infinity.
pub(crate) fn check_finite(operand: &'static str, data: &[f32]) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(index) => Err(KernelError::NonFinite { operand, index }),
    }
}
