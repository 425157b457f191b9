//! The MoE layer on NVIDIA GPUs (feature `cuda`, on by default): CUDA C kernels compiled at run
//! time by NVRTC, expert GEMMs on cuBLAS, through [cudarc] with the CUDA libraries loaded at run
//! time. The build needs no CUDA toolkit and the binary runs without a driver: [`probe`] and
//! [`select`] report what is missing, and the caller stays on the CPU.
//!
//! | file | job |
//! | --- | --- |
//! | [`device`] | [`probe`] (driver, GPUs, NVRTC, cuBLAS, each with a reason when absent), [`select`] (`--device cpu\|cuda\|auto`), [`CudaDevice`] (context, stream, cuBLAS handle, loaded kernels) |
//! | [`nvrtc`] | the `.cu` sources (`kernels/cuda/`), NVRTC compilation to PTX, the per-process cache, how libnvrtc is found |
//! | [`launch`] | one launcher per kernel: gate softmax/top-k, capacity positions, loss sums, gate backward, row maps, gather, combine (+ backward), bias + GELU, SwiGLU, bias fill / bias gradient, AdamW |
//! | [`blas`] | row-major GEMM on cuBLAS, the grouped expert FFN forward and backward |
//! | [`layer`](mod@layer) | [`CudaMoeLayer`]: the whole layer, mirroring [`crate::MoeLayer`] |
//! | [`bench`](mod@bench) | [`run_cuda_bench`]: layer vs one cuBLAS GEMM of the same FLOPs |
//! | [`error`] | [`CudaError`] |
//!
//! ## Use
//!
//! ```no_run
//! use std::sync::Arc;
//! use switchyard_kernels::cuda::{CudaDevice, CudaMoeLayer, Device, DeviceRequest, select};
//! use switchyard_kernels::{Activation, GateConfig, MoeConfig, MoeLayer, Storage};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = MoeConfig {
//!     d_model: 64,
//!     d_ffn: 128,
//!     experts: 4,
//!     activation: Activation::Gelu,
//!     gate: GateConfig::default(),
//!     storage: Storage::F32,
//! };
//! let layer = MoeLayer::random(config, 1)?;
//! let choice = select(DeviceRequest::Auto)?;
//! eprintln!("device: {} ({})", choice.device, choice.reason);
//! if let Device::Cuda(n) = choice.device {
//!     let dev = Arc::new(CudaDevice::open(n)?);
//!     let gpu = CudaMoeLayer::from_layer(dev.clone(), &layer)?;
//!     let (mut state, mut grads) = (gpu.new_state()?, gpu.new_grads()?);
//!     let x = dev.upload(&vec![0.1f32; 10 * layer.config.d_model])?;
//!     gpu.forward(&x, 10, &mut state)?;
//!     let d_out = dev.upload(&vec![1.0f32; 10 * layer.config.d_model])?;
//!     gpu.backward(&x, &state, &d_out, &mut grads)?;
//! }
//! # Ok(()) }
//! ```
//!
//! ## Conventions
//!
//! * The CPU conventions hold: row-major f32, shapes checked (an error, never a panic), the same
//!   routing rules (ties to the lower expert, choice rank then token order, the capacity policies,
//!   arrival or batch-prioritised order), backward overwrites.
//! * Determinism: no float atomics; each reduction has a fixed order (combine: one block per token
//!   summing its k contributions in choice order), so a run repeats bit for bit on one GPU.
//! * Numerics: f32 everywhere, GEMMs in FP32 (not TF32); GELU is the exact erf form, as on the CPU.
//!   Outputs and gradients match the CPU layer to about 1e-5 relative.
//! * Only kernel launches, cuBLAS calls and library probes are `unsafe`, each with its argument.

pub mod bench;
pub mod blas;
pub mod device;
pub mod error;
pub mod launch;
pub mod layer;
pub mod nvrtc;

pub use bench::{CudaBenchReport, run_cuda_bench, run_cuda_bench_on};
pub use blas::{DeviceExpertGrads, DeviceExperts, ExpertActivations};
pub use cudarc;
pub use device::{CudaDevice, Device, DeviceProbe, DeviceRequest, DeviceSelection, GpuInfo, probe, select};
pub use error::{CudaError, CudaResult};
pub use launch::{AdamW, GateBuffers, RowMaps};
pub use layer::{CudaMoeGrads, CudaMoeLayer, CudaMoeState};
pub use nvrtc::{NvrtcInfo, compile_all, kernel_count, nvrtc_info};
