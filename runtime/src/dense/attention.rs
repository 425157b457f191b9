//! Multi-head causal self-attention over a batch of sequences.
//!
//! `qkv = x W_qkv + b_qkv` (`[tokens, 3 d]`: columns `0..d` are the queries, `d..2d` the keys,
//! `2d..3d` the values; head `h` owns columns `h * dh..(h + 1) * dh` of each, `dh = d / heads`).
//! Per sequence and head, `P = softmax(Q K^T / sqrt(dh))` with position `i` attending to
//! positions `0..=i`, `Y = P V`; the heads are concatenated into `[tokens, d]` and projected,
//! `out = Y W_proj + b_proj`.
//!
//! The per-(sequence, head) products are GEMMs read and written in place inside the `qkv` and
//! head buffers through leading dimensions (no copies), one GEMM at a time; the softmax and its
//! backward are row-parallel. The full `seq x seq` score block is computed and the part above the
//! diagonal is masked (zero probability).

use super::linear::Linear;
use super::model::BatchShape;
use super::{ROW_BLOCK, resized};
use crate::error::{Result, RuntimeError, check_len};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use switchyard_kernels::random::SeededRng;
use switchyard_kernels::{Compute, Trans, sgemm};

/// Multi-head causal self-attention with its input (`d -> 3d`) and output (`d -> d`) projections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CausalSelfAttention {
    /// Model width `d`.
    pub d_model: usize,
    /// Number of heads (divides `d_model`).
    pub n_heads: usize,
    /// `d -> 3d` query/key/value projection.
    pub qkv: Linear,
    /// `d -> d` output projection.
    pub proj: Linear,
}

/// What [`CausalSelfAttention::forward`] saves, plus scratch reused by the backward pass.
#[derive(Debug, Clone, Default)]
pub struct AttentionCache {
    /// Shape of the last forward pass.
    pub shape: BatchShape,
    /// Projected queries, keys and values, `[tokens, 3 d]`.
    pub qkv: Vec<f32>,
    /// Attention probabilities, `[batch, heads, seq, seq]` (zero above the diagonal).
    pub probs: Vec<f32>,
    /// Concatenated head outputs (input of the output projection), `[tokens, d]`.
    pub heads: Vec<f32>,
    d_heads: Vec<f32>,
    d_probs: Vec<f32>,
    d_qkv: Vec<f32>,
}

impl CausalSelfAttention {
    /// Projections with weights `N(0, std^2)` (`proj_std` for the output projection) and zero biases.
    pub fn random(d_model: usize, n_heads: usize, std: f32, proj_std: f32, rng: &mut SeededRng) -> Result<Self> {
        let layer = Self {
            d_model,
            n_heads,
            qkv: Linear::random(d_model, 3 * d_model, true, std, rng),
            proj: Linear::random(d_model, d_model, true, proj_std, rng),
        };
        layer.check()?;
        Ok(layer)
    }

    /// A layer of the same shape, all zero (gradient storage).
    pub fn zeros_like(&self) -> Self {
        Self { qkv: self.qkv.zeros_like(), proj: self.proj.zeros_like(), ..*self }
    }

    /// Checks heads and projection shapes.
    pub fn check(&self) -> Result<()> {
        let (d, h) = (self.d_model, self.n_heads);
        if h == 0 || d == 0 || !d.is_multiple_of(h) {
            return Err(RuntimeError::invalid(
                "attention heads",
                format!("n_heads {h} must be >= 1 and divide d_model {d}"),
            ));
        }
        if (self.qkv.in_features, self.qkv.out_features) != (d, 3 * d)
            || (self.proj.in_features, self.proj.out_features) != (d, d)
        {
            return Err(RuntimeError::invalid(
                "attention projections",
                format!(
                    "need qkv [{d}, {}] and proj [{d}, {d}], got [{}, {}] and [{}, {}]",
                    3 * d,
                    self.qkv.in_features,
                    self.qkv.out_features,
                    self.proj.in_features,
                    self.proj.out_features
                ),
            ));
        }
        self.qkv.check()?;
        self.proj.check()
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.qkv.param_count() + self.proj.param_count()
    }

    /// `out = attention(x)` for `x: [batch * seq, d]` (`out` overwritten); fills `cache`.
    /// Call inside `Engine::run`.
    pub fn forward(
        &self,
        cx: &Compute,
        x: &[f32],
        shape: BatchShape,
        out: &mut [f32],
        cache: &mut AttentionCache,
    ) -> Result<()> {
        self.check()?;
        let (d, nh) = (self.d_model, self.n_heads);
        let (bsz, s, t, dh) = (shape.batch, shape.seq, shape.tokens(), d / nh);
        let act = format!("[{t}, {d}]");
        check_len("attention input", &act, t * d, x.len())?;
        check_len("attention output", &act, t * d, out.len())?;
        cache.shape = shape;
        let qkv = resized(&mut cache.qkv, t * 3 * d);
        self.qkv.forward(cx, x, t, qkv)?;

        let probs = resized(&mut cache.probs, bsz * nh * s * s);
        for b in 0..bsz {
            for h in 0..nh {
                let (q, k) = (b * s * 3 * d + h * dh, b * s * 3 * d + d + h * dh);
                let blk = &mut probs[(b * nh + h) * s * s..][..s * s];
                sgemm(cx, Trans::No, Trans::Yes, s, s, dh, &qkv[q..], 3 * d, &qkv[k..], 3 * d, blk, s, false)?;
            }
        }
        let scale = 1.0 / (dh as f32).sqrt();
        if s > 0 {
            probs.par_chunks_mut(s).enumerate().with_min_len(ROW_BLOCK).for_each(|(r, row)| {
                let i = r % s;
                let (live, masked) = row.split_at_mut(i + 1);
                let max = live.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * scale;
                let mut sum = 0.0f32;
                for v in live.iter_mut() {
                    *v = (*v * scale - max).exp();
                    sum += *v;
                }
                let inv = 1.0 / sum;
                live.iter_mut().for_each(|v| *v *= inv);
                masked.fill(0.0);
            });
        }

        let heads = resized(&mut cache.heads, t * d);
        for b in 0..bsz {
            for h in 0..nh {
                let v = b * s * 3 * d + 2 * d + h * dh;
                let p = &probs[(b * nh + h) * s * s..][..s * s];
                let y = &mut heads[b * s * d + h * dh..];
                sgemm(cx, Trans::No, Trans::No, s, dh, s, p, s, &qkv[v..], 3 * d, y, d, false)?;
            }
        }
        self.proj.forward(cx, heads, t, out)
    }

    /// Backward of [`CausalSelfAttention::forward`] given its input `x`, its `cache` and the output
    /// gradient `d_out`: writes `d_x` (overwritten) and overwrites `grads` (shape of
    /// [`CausalSelfAttention::zeros_like`]). Call inside `Engine::run`.
    pub fn backward(
        &self,
        cx: &Compute,
        x: &[f32],
        cache: &mut AttentionCache,
        d_out: &[f32],
        d_x: &mut [f32],
        grads: &mut CausalSelfAttention,
    ) -> Result<()> {
        self.check()?;
        grads.check()?;
        if (grads.d_model, grads.n_heads) != (self.d_model, self.n_heads) {
            return Err(RuntimeError::invalid(
                "attention gradient storage",
                "shape differs from the layer's; build it with zeros_like".to_string(),
            ));
        }
        let AttentionCache { shape, qkv, probs, heads, d_heads, d_probs, d_qkv } = cache;
        let (d, nh) = (self.d_model, self.n_heads);
        let (bsz, s, t, dh) = (shape.batch, shape.seq, shape.tokens(), d / nh);
        let act = format!("[{t}, {d}]");
        check_len("attention input", &act, t * d, x.len())?;
        check_len("attention d_output", &act, t * d, d_out.len())?;
        check_len("attention d_input", &act, t * d, d_x.len())?;
        check_len("attention saved qkv", &format!("[{t}, {}]", 3 * d), t * 3 * d, qkv.len())?;
        check_len("attention saved probs", &format!("[{bsz}, {nh}, {s}, {s}]"), bsz * nh * s * s, probs.len())?;
        check_len("attention saved heads", &act, t * d, heads.len())?;

        let d_heads = resized(d_heads, t * d);
        self.proj.backward(cx, heads, t, d_out, Some(d_heads), &mut grads.proj)?;

        let d_probs = resized(d_probs, bsz * nh * s * s);
        let d_qkv = resized(d_qkv, t * 3 * d);
        for b in 0..bsz {
            for h in 0..nh {
                let v = b * s * 3 * d + 2 * d + h * dh;
                let dy = &d_heads[b * s * d + h * dh..];
                let blk = (b * nh + h) * s * s;
                // dP = dY V^T, dV = P^T dY.
                let dp = &mut d_probs[blk..][..s * s];
                sgemm(cx, Trans::No, Trans::Yes, s, s, dh, dy, d, &qkv[v..], 3 * d, dp, s, false)?;
                let p = &probs[blk..][..s * s];
                sgemm(cx, Trans::Yes, Trans::No, s, dh, s, p, s, dy, d, &mut d_qkv[v..], 3 * d, false)?;
            }
        }
        // Softmax backward, in place: dS = P * (dP - sum_j P dP) * scale (zero where masked).
        let scale = 1.0 / (dh as f32).sqrt();
        if s > 0 {
            d_probs.par_chunks_mut(s).zip(probs.par_chunks(s)).enumerate().with_min_len(ROW_BLOCK).for_each(
                |(r, (dp, p))| {
                    let i = r % s;
                    let dot: f32 = dp[..=i].iter().zip(&p[..=i]).map(|(a, b)| a * b).sum();
                    for j in 0..=i {
                        dp[j] = p[j] * (dp[j] - dot) * scale;
                    }
                    dp[i + 1..].fill(0.0);
                },
            );
        }
        for b in 0..bsz {
            for h in 0..nh {
                let (q, k) = (b * s * 3 * d + h * dh, b * s * 3 * d + d + h * dh);
                let ds = &d_probs[(b * nh + h) * s * s..][..s * s];
                // dQ = dS K, dK = dS^T Q.
                sgemm(cx, Trans::No, Trans::No, s, dh, s, ds, s, &qkv[k..], 3 * d, &mut d_qkv[q..], 3 * d, false)?;
                sgemm(cx, Trans::Yes, Trans::No, s, dh, s, ds, s, &qkv[q..], 3 * d, &mut d_qkv[k..], 3 * d, false)?;
            }
        }
        self.qkv.backward(cx, x, t, d_qkv, Some(d_x), &mut grads.qkv)?;
        // The key bias adds `q . b_k` to every score of a query's row, which the softmax ignores: its
        // gradient is exactly zero. Computed, it is rounding noise that differs with the batch split, and
        // Adam would turn that noise into full-size steps; so it is set to its exact value.
        if let Some(b) = grads.qkv.bias.as_mut() {
            b[d..2 * d].fill(0.0);
        }
        Ok(())
    }

    /// Appends `prefix.qkv.*`, `prefix.proj.*` to a parameter list.
    pub(crate) fn tensors<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a [f32])>) {
        self.qkv.tensors(&format!("{prefix}.qkv"), out);
        self.proj.tensors(&format!("{prefix}.proj"), out);
    }

    /// Mutable form of [`CausalSelfAttention::tensors`].
    pub(crate) fn tensors_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut [f32])>) {
        self.qkv.tensors_mut(&format!("{prefix}.qkv"), out);
        self.proj.tensors_mut(&format!("{prefix}.proj"), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::reference::{self as r, assert_close, engine, fd_grad, to64};
    use switchyard_kernels::random::{normal_vec, seeded_rng};

    fn layer(d: usize, nh: usize, seed: u64) -> CausalSelfAttention {
        let mut rng = seeded_rng(seed);
        let mut a = CausalSelfAttention::random(d, nh, 0.4, 0.4, &mut rng).unwrap();
        a.qkv.bias = Some(normal_vec(&mut rng, 3 * d, 0.2));
        a.proj.bias = Some(normal_vec(&mut rng, d, 0.2));
        a
    }

    fn reference(a: &CausalSelfAttention, x: &[f32], shape: BatchShape) -> Vec<f64> {
        r::attention(
            &to64(x),
            shape,
            a.d_model,
            a.n_heads,
            &to64(&a.qkv.weight),
            a.qkv.bias.as_deref().map(to64).as_deref(),
            &to64(&a.proj.weight),
            a.proj.bias.as_deref().map(to64).as_deref(),
        )
    }

    #[test]
    fn forward_matches_reference() {
        let engine = engine();
        for (batch, seq, d, nh) in [(2, 5, 8, 2), (3, 1, 6, 3), (1, 9, 4, 1), (0, 4, 4, 2)] {
            let a = layer(d, nh, 30 + d as u64);
            let shape = BatchShape { batch, seq };
            let x = normal_vec(&mut seeded_rng(31), shape.tokens() * d, 1.0);
            let (mut out, mut cache) = (vec![0.0; shape.tokens() * d], AttentionCache::default());
            engine.run(|cx| a.forward(cx, &x, shape, &mut out, &mut cache)).unwrap();
            assert_close("out", &out, &reference(&a, &x, shape), 1e-5);
        }
    }

    #[test]
    fn causal_mask_hides_the_future() {
        let a = layer(4, 2, 33);
        let shape = BatchShape { batch: 1, seq: 6 };
        let mut x = normal_vec(&mut seeded_rng(34), 24, 1.0);
        let engine = engine();
        let run = |x: &[f32]| {
            let (mut out, mut cache) = (vec![0.0; 24], AttentionCache::default());
            engine.run(|cx| a.forward(cx, x, shape, &mut out, &mut cache)).unwrap();
            out
        };
        let before = run(&x);
        x[5 * 4..].iter_mut().for_each(|v| *v += 10.0); // change the last position only
        let after = run(&x);
        assert_eq!(before[..5 * 4], after[..5 * 4]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        let (d, nh) = (6, 2);
        let a = layer(d, nh, 35);
        let shape = BatchShape { batch: 2, seq: 4 };
        let t = shape.tokens();
        let mut rng = seeded_rng(36);
        let x = normal_vec(&mut rng, t * d, 1.0);
        let w_out = normal_vec(&mut rng, t * d, 1.0);
        let engine = engine();
        let (mut out, mut cache) = (vec![0.0; t * d], AttentionCache::default());
        let mut grads = a.zeros_like();
        let mut d_x = vec![0.0; t * d];
        engine
            .run(|cx| {
                a.forward(cx, &x, shape, &mut out, &mut cache)?;
                a.backward(cx, &x, &mut cache, &w_out, &mut d_x, &mut grads)
            })
            .unwrap();
        let w64 = to64(&w_out);
        let loss = |a: &CausalSelfAttention, x: &[f32]| r::dot(&reference(a, x, shape), &w64);
        assert_close("d_x", &d_x, &fd_grad(&x, |p| loss(&a, p)), 1e-4);
        let mut probe = a.clone();
        let fd = fd_grad(&a.qkv.weight, |p| {
            probe.qkv.weight.copy_from_slice(p);
            loss(&probe, &x)
        });
        assert_close("d_qkv_weight", &grads.qkv.weight, &fd, 1e-4);
        let mut probe = a.clone();
        let fd = fd_grad(a.qkv.bias.as_ref().unwrap(), |p| {
            probe.qkv.bias = Some(p.to_vec());
            loss(&probe, &x)
        });
        assert_close("d_qkv_bias", grads.qkv.bias.as_ref().unwrap(), &fd, 1e-4);
        let mut probe = a.clone();
        let fd = fd_grad(&a.proj.weight, |p| {
            probe.proj.weight.copy_from_slice(p);
            loss(&probe, &x)
        });
        assert_close("d_proj_weight", &grads.proj.weight, &fd, 1e-4);
    }

    #[test]
    fn same_bits_on_repeat_and_bad_shapes_are_errors() {
        let a = layer(8, 2, 37);
        let shape = BatchShape { batch: 2, seq: 3 };
        let x = normal_vec(&mut seeded_rng(38), 48, 1.0);
        let engine = engine();
        let run = || {
            let (mut out, mut cache) = (vec![0.0; 48], AttentionCache::default());
            engine.run(|cx| a.forward(cx, &x, shape, &mut out, &mut cache)).unwrap();
            out
        };
        assert_eq!(run(), run());
        let mut out = vec![0.0; 48];
        let mut cache = AttentionCache::default();
        assert!(engine.run(|cx| a.forward(cx, &x[..40], shape, &mut out, &mut cache)).is_err());
        assert!(CausalSelfAttention::random(8, 3, 0.1, 0.1, &mut seeded_rng(1)).is_err());
        assert!(CausalSelfAttention::random(8, 0, 0.1, 0.1, &mut seeded_rng(1)).is_err());
    }
}
