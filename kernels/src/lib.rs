//! # switchyard-kernels
//!
//! CPU compute kernels of a Mixture-of-Experts layer, forward and backward, exact (f32, checked
//! against f64 references) and at GEMM speed. The runtime builds its distributed layer from the
//! pieces; [`layer::MoeLayer`] composes them for one process.
//!
//! | module | job |
//! | --- | --- |
//! | [`gemm`] | the GEMM backends ([`GemmBackend::PureRust`]: the `gemm` crate, default; [`GemmBackend::Blas`]: OpenBLAS, feature `blas`), [`Compute`] settings and the [`Engine`] thread pool |
//! | [`gate`] | router: logits, softmax, top-k, capacity (fixed, dropless, capped dynamic; arrival order or batch-prioritised), aux loss, z-loss, loss-free bias, noise, backward |
//! | [`dispatch`] | token <-> (expert, position) maps; gather into per-expert contiguous rows; weighted combine; both backward directions |
//! | [`experts`] | grouped expert FFNs (GELU with biases, SwiGLU) over uneven token counts, forward and backward |
//! | [`layer`] | the whole layer with its [`MoeConfig`], reusable [`MoeState`] / [`MoeGrads`] |
//! | [`bf16`] | bf16 storage of weights and saved activations, f32 compute |
//! | [`bench`](mod@bench) | [`run_kernel_bench`], the benchmark behind `switchyard bench kernels` |
//! | [`reference`](mod@reference) | naive f64 references (what the kernels must compute) |
//! | `cuda` | the same layer on an NVIDIA GPU (feature `cuda`, default): NVRTC-compiled kernels, cuBLAS expert GEMMs, device probe and selection |
//!
//! ## Use
//!
//! ```
//! use switchyard_kernels::{Compute, Engine, MoeConfig, MoeGrads, MoeLayer, MoeState};
//! use switchyard_kernels::{Activation, CapacityPolicy, GateConfig, Storage};
//!
//! let config = MoeConfig {
//!     d_model: 16,
//!     d_ffn: 32,
//!     experts: 4,
//!     activation: Activation::Gelu,
//!     gate: GateConfig { top_k: 2, capacity: CapacityPolicy::Fixed { factor: 1.25 }, ..GateConfig::default() },
//!     storage: Storage::F32,
//! };
//! let layer = MoeLayer::random(config, 42)?;
//! let engine = Engine::new(Compute::new(2))?; // 2 threads, the build's default GEMM backend
//! let tokens = 10;
//! let x = vec![0.1f32; tokens * 16];
//! let (mut state, mut grads) = (MoeState::default(), MoeGrads::default());
//! engine.run(|cx| {
//!     layer.forward(cx, &x, tokens, &mut state)?;             // state.output: [tokens, 16]
//!     let d_out = vec![1.0f32; tokens * 16];
//!     layer.backward(cx, &x, &state, &d_out, &mut grads)      // grads.d_x, grads.gate, grads.experts
//! })?;
//! assert_eq!(grads.d_x.len(), tokens * 16);
//! # Ok::<(), switchyard_kernels::KernelError>(())
//! ```
//!
//! The distributed runtime calls the pieces itself: [`route`] on the local tokens,
//! [`DispatchPlan::from_routing`] and [`gather`], the all-to-all of the grouped rows,
//! [`experts_forward`] on its local experts, the reverse all-to-all, [`combine`]; and backward
//! [`combine_backward`], [`experts_backward`], [`gather_backward`], [`route_backward`].
//!
//! ## Conventions
//!
//! * Row-major `f32` slices with explicit shapes; every shape is checked and a mismatch, `k > E`,
//!   a bad capacity factor or non-finite logits is a [`KernelError`], never a panic.
//! * Threads: run kernels inside [`Engine::run`]. GEMMs run one at a time with the threads inside
//!   (rayon for the pure-Rust backend, OpenBLAS's own threads with `blas`); elementwise passes use
//!   the rayon pool between GEMMs. No GEMM is ever called from inside a parallel loop.
//! * Determinism: fixed seeds ([`random`]); reductions use fixed blocking, so the same inputs
//!   give the same bits for a given thread count.
//! * Backward functions overwrite gradients (they do not accumulate across calls).

pub mod bench;
pub mod bf16;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dispatch;
pub mod error;
pub mod experts;
pub mod gate;
pub mod gemm;
pub mod layer;
pub mod random;
pub mod reference;
pub mod tensor;

mod activation;
#[cfg(test)]
mod testutil;
mod transpose;

pub use bench::{KernelBenchConfig, KernelBenchReport, TorchBenchReport, run_kernel_bench};
pub use bf16::{Storage, Stored};
pub use dispatch::{DispatchPlan, combine, combine_backward, gather, gather_backward};
pub use error::{KernelError, Result};
pub use experts::{Activation, ExpertCache, ExpertGrads, ExpertParams, experts_backward, experts_forward};
pub use gate::{
    CapacityPolicy, DropPolicy, GateConfig, GateGrads, Routing, route, route_backward, update_balance_bias,
};
pub use gemm::{Compute, Engine, GemmBackend, Trans, sgemm};
pub use layer::{MoeConfig, MoeGrads, MoeLayer, MoeState};
pub use tensor::Matrix;
