//! The dense (non-MoE) parts of a small GPT-style language model, forward and backward, for one
//! process: the runtime's trainer composes them with its distributed MoE FFN.
//!
//! | module | job |
//! | --- | --- |
//! | [`linear`] | `y = x W + b` ([`Linear`]) |
//! | [`layer_norm`] | [`LayerNorm`] over the last dimension |
//! | [`embedding`] | token table plus learned positions ([`Embedding`]) |
//! | [`attention`] | multi-head [`CausalSelfAttention`] |
//! | [`lm_head`] | untied output projection plus softmax cross-entropy ([`LmHead`], [`LossSum`]) |
//! | [`model`] | [`GptDense`]: every dense parameter of the model, called sub-layer by sub-layer |
//!
//! ## Conventions
//!
//! * Activations are row-major `f32` buffers `[tokens, width]` with `tokens = batch * seq`
//!   (row `b * seq + s` is position `s` of sequence `b`). Shapes are explicit arguments and every
//!   buffer is checked: a mismatch is a [`RuntimeError::Invalid`](crate::error::RuntimeError),
//!   never a panic.
//! * Matrix products go through [`switchyard_kernels::sgemm`]: call the GEMM-using functions (those
//!   taking a [`Compute`](switchyard_kernels::Compute)) inside
//!   [`Engine::run`](switchyard_kernels::Engine::run). Row-wise passes (normalisation, softmax)
//!   use the current rayon pool; column reductions (bias and norm gains) run sequentially in
//!   row order. The same inputs give the same bits for a given thread count.
//! * Backward functions *overwrite* the gradients of the parameters they own (gradients are
//!   stored in a value of the same type as the parameters, e.g. [`Linear::zeros_like`]); input
//!   gradients are overwritten unless the function says it accumulates.
//! * Saved activations live in reusable cache structs (`*Cache`, `*Saved`): buffers are resized,
//!   not reallocated, from one step to the next.

pub mod attention;
pub mod embedding;
pub mod layer_norm;
pub mod linear;
pub mod lm_head;
pub mod model;

#[cfg(test)]
mod reference;

pub use attention::{AttentionCache, CausalSelfAttention};
pub use embedding::Embedding;
pub use layer_norm::{LayerNorm, LayerNormCache};
pub use linear::Linear;
pub use lm_head::{LmHead, LmHeadCache, LossSum};
pub use model::{
    AttnSublayerSaved, BatchShape, EmbedSaved, GptConfig, GptDense, GptGrads, GptLayer, GptSaved, HeadSaved,
    LayerSaved, PreFfnSaved, weight_decay_applies,
};

/// Rows per rayon task in row-wise passes.
pub(crate) const ROW_BLOCK: usize = 16;

/// Resizes `v` to `n` elements (zero-filled) and returns it as a slice; keeps the allocation.
pub(crate) fn resized(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.clear();
    v.resize(n, 0.0);
    v.as_mut_slice()
}

/// Appends `(prefix.name, tensor)` to a parameter list.
pub(crate) fn push_named<'a>(out: &mut Vec<(String, &'a [f32])>, prefix: &str, name: &str, t: &'a [f32]) {
    out.push((format!("{prefix}.{name}"), t));
}

/// Appends `(prefix.name, tensor)` to a mutable parameter list.
pub(crate) fn push_named_mut<'a>(out: &mut Vec<(String, &'a mut [f32])>, prefix: &str, name: &str, t: &'a mut [f32]) {
    out.push((format!("{prefix}.{name}"), t));
}
