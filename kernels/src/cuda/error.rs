//! The error type of the GPU path: missing pieces are named with the fix, never a panic.

use crate::error::KernelError;
use thiserror::Error;

/// Why the GPU path could not run.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CudaError {
    /// `libcuda.so` (the NVIDIA driver) could not be loaded or initialised.
    #[error("no CUDA driver (libcuda.so) found: install the NVIDIA driver or use --device cpu ({0})")]
    NoDriver(String),
    /// The driver is there but reports no usable GPU.
    #[error("no CUDA device: {0}; use --device cpu")]
    NoDevice(String),
    /// The requested device ordinal does not exist.
    #[error("CUDA device {ordinal} does not exist ({count} device(s) found)")]
    BadOrdinal {
        /// The requested ordinal.
        ordinal: usize,
        /// Devices the driver reports.
        count: usize,
    },
    /// `libnvrtc` (the runtime compiler of the kernels) could not be loaded.
    #[error(
        "libnvrtc (NVRTC) not found: {0}; set SWITCHYARD_NVRTC_LIB=/path/to/libnvrtc.so.13 or add its directory to \
         LD_LIBRARY_PATH (e.g. `pip install nvidia-cuda-nvrtc`), or use --device cpu"
    )]
    NvrtcMissing(String),
    /// `libcublas` (the expert GEMMs) could not be loaded.
    #[error(
        "libcublas not found: {0}; add the directory of libcublas.so.13 to LD_LIBRARY_PATH (e.g. `pip install \
         nvidia-cublas`), or use --device cpu"
    )]
    CublasMissing(String),
    /// NVRTC rejected a kernel source.
    #[error("NVRTC could not compile {file} for {arch}: {log}")]
    Compile {
        /// The `.cu` file (`kernels/cuda/<file>`).
        file: &'static str,
        /// The target (`compute_XY`).
        arch: String,
        /// NVRTC's log (or its error code).
        log: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {detail}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {op}: {detail}")]
    Cublas {
        /// What was being done.
        op: &'static str,
        /// cuBLAS's status.
        detail: String,
    },
    /// An operation the GPU path does not offer.
    #[error("not supported on the GPU path: {0}")]
    Unsupported(String),
    /// Bad input (shapes, configuration, non-finite values): the same checks as the CPU kernels.
    #[error(transparent)]
    Kernel(#[from] KernelError),
}

/// Shorthand for results of the GPU path.
pub type CudaResult<T> = std::result::Result<T, CudaError>;

/// Maps a driver error of `op` (`map_err(driver("..."))`).
pub(crate) fn driver<E: std::fmt::Debug>(op: &'static str) -> impl FnOnce(E) -> CudaError {
    move |e| CudaError::Driver { op, detail: format!("{e:?}") }
}

/// Maps a cuBLAS error of `op`.
pub(crate) fn cublas<E: std::fmt::Debug>(op: &'static str) -> impl FnOnce(E) -> CudaError {
    move |e| CudaError::Cublas { op, detail: format!("{e:?}") }
}
