//! The output projection to vocabulary logits and the softmax cross-entropy loss.
//!
//! The head is *untied*: its weight `[d_model, vocab]` is its own parameter, not the transposed
//! token embedding. That keeps every parameter's gradient in one place (no sum of two uses to
//! remember) at the cost of `d_model * vocab` more parameters (16 K for `d = 64`, `vocab = 256`).
//! No bias (as in GPT-2).

use super::{ROW_BLOCK, push_named, push_named_mut, resized};
use crate::error::{Result, RuntimeError, check_len};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use switchyard_kernels::random::{SeededRng, normal_vec};
use switchyard_kernels::{Compute, Trans, sgemm};

/// A summed loss and the number of tokens in the sum; the mean is `sum / count`.
///
/// Sums from several workers or micro-batches add (`+`) before the division, so the
/// mean over a global batch does not depend on how it was split.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct LossSum {
    /// Sum over tokens of `-ln p(target)` (nats).
    pub sum: f64,
    /// Tokens in the sum.
    pub count: usize,
}

impl LossSum {
    /// `sum / count` in nats per token (NaN when `count == 0`).
    pub fn mean(&self) -> f64 {
        self.sum / self.count as f64
    }
}

/// The combined sum of two parts.
impl std::ops::Add for LossSum {
    type Output = LossSum;
    fn add(self, other: LossSum) -> LossSum {
        LossSum { sum: self.sum + other.sum, count: self.count + other.count }
    }
}

impl std::ops::AddAssign for LossSum {
    fn add_assign(&mut self, other: LossSum) {
        *self = *self + other;
    }
}

/// Untied output projection `logits = x W`, `W: [d_model, vocab]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LmHead {
    /// Input width.
    pub d_model: usize,
    /// Number of classes (token ids).
    pub vocab: usize,
    /// `[d_model, vocab]`, row-major.
    pub weight: Vec<f32>,
}

/// What [`LmHead::forward`] saves, plus scratch reused by the backward pass.
#[derive(Debug, Clone, Default)]
pub struct LmHeadCache {
    /// Softmax of the logits, `[rows, vocab]`.
    pub probs: Vec<f32>,
    /// `-ln p(target)` per row, `[rows]`.
    pub row_loss: Vec<f64>,
    d_logits: Vec<f32>,
}

impl LmHead {
    /// Weight drawn from `N(0, std^2)`.
    pub fn random(d_model: usize, vocab: usize, std: f32, rng: &mut SeededRng) -> Self {
        Self { d_model, vocab, weight: normal_vec(rng, d_model * vocab, std) }
    }

    /// A head of the same shape, all zero (gradient storage).
    pub fn zeros_like(&self) -> Self {
        Self { weight: vec![0.0; self.weight.len()], ..*self }
    }

    /// Checks the weight length and `vocab >= 1`.
    pub fn check(&self) -> Result<()> {
        if self.vocab == 0 {
            return Err(RuntimeError::invalid("lm head vocab", "must be at least 1"));
        }
        let (d, v) = (self.d_model, self.vocab);
        check_len("lm head weight", &format!("[{d}, {v}]"), d * v, self.weight.len())
    }

    /// `logits = x W` for `x: [rows, d_model]` into `logits: [rows, vocab]` (overwritten).
    pub fn logits(&self, cx: &Compute, x: &[f32], rows: usize, logits: &mut [f32]) -> Result<()> {
        self.check()?;
        let (d, v) = (self.d_model, self.vocab);
        check_len("lm head input", &format!("[{rows}, {d}]"), rows * d, x.len())?;
        check_len("lm head logits", &format!("[{rows}, {v}]"), rows * v, logits.len())?;
        sgemm(cx, Trans::No, Trans::No, rows, v, d, x, d, &self.weight, v, logits, v, false)?;
        Ok(())
    }

    /// The summed cross-entropy of `targets: [rows]` under `softmax(x W)`; fills `cache`.
    ///
    /// A diverged model (non-finite logits) gives a non-finite sum rather than an error: check
    /// `LossSum::mean().is_finite()`.
    pub fn forward(
        &self,
        cx: &Compute,
        x: &[f32],
        rows: usize,
        targets: &[u32],
        cache: &mut LmHeadCache,
    ) -> Result<LossSum> {
        self.check_targets(targets, rows)?;
        let v = self.vocab;
        let probs = resized(&mut cache.probs, rows * v);
        self.logits(cx, x, rows, probs)?;
        cache.row_loss.clear();
        cache.row_loss.resize(rows, 0.0);
        probs
            .par_chunks_mut(v)
            .zip(cache.row_loss.par_iter_mut())
            .zip(targets.par_iter())
            .with_min_len(ROW_BLOCK)
            .for_each(|((row, loss), &t)| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &l| m.max(l));
                let target_logit = row[t as usize];
                let mut sum = 0.0f64;
                for l in row.iter_mut() {
                    *l = (*l - max).exp();
                    sum += *l as f64;
                }
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|p| *p *= inv);
                *loss = max as f64 + sum.ln() - target_logit as f64;
            });
        Ok(LossSum { sum: cache.row_loss.iter().sum(), count: rows })
    }

    /// Backward of [`LmHead::forward`] for the loss `loss_scale * sum` (pass `1 / N` with `N` the
    /// number of tokens the mean is over, across all workers and micro-batches).
    ///
    /// Overwrites `grads.weight` and writes `d_x: [rows, d_model]` (overwritten).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        cx: &Compute,
        x: &[f32],
        targets: &[u32],
        cache: &mut LmHeadCache,
        loss_scale: f32,
        d_x: &mut [f32],
        grads: &mut LmHead,
    ) -> Result<()> {
        let (d, v, rows) = (self.d_model, self.vocab, targets.len());
        self.check_targets(targets, rows)?;
        check_len("lm head input", &format!("[{rows}, {d}]"), rows * d, x.len())?;
        check_len("lm head d_input", &format!("[{rows}, {d}]"), rows * d, d_x.len())?;
        check_len("lm head saved probs", &format!("[{rows}, {v}]"), rows * v, cache.probs.len())?;
        grads.check()?;
        if (grads.d_model, grads.vocab) != (d, v) {
            return Err(RuntimeError::invalid(
                "lm head gradient storage",
                "shape differs from the head's; build it with zeros_like".to_string(),
            ));
        }
        let d_logits = resized(&mut cache.d_logits, rows * v);
        d_logits
            .par_chunks_mut(v)
            .zip(cache.probs.par_chunks(v))
            .zip(targets.par_iter())
            .with_min_len(ROW_BLOCK)
            .for_each(|((dl, p), &t)| {
                for (g, &pj) in dl.iter_mut().zip(p) {
                    *g = pj * loss_scale;
                }
                dl[t as usize] -= loss_scale;
            });
        sgemm(cx, Trans::Yes, Trans::No, d, v, rows, x, d, d_logits, v, &mut grads.weight, v, false)?;
        sgemm(cx, Trans::No, Trans::Yes, rows, d, v, d_logits, v, &self.weight, v, d_x, d, false)?;
        Ok(())
    }

    fn check_targets(&self, targets: &[u32], rows: usize) -> Result<()> {
        self.check()?;
        check_len("targets", &format!("[{rows}]"), rows, targets.len())?;
        if let Some((i, &t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= self.vocab) {
            return Err(RuntimeError::invalid(
                "targets",
                format!("target {t} at index {i} is >= vocab {}", self.vocab),
            ));
        }
        Ok(())
    }

    /// Appends `prefix.weight` to a parameter list.
    pub(crate) fn tensors<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a [f32])>) {
        push_named(out, prefix, "weight", &self.weight);
    }

    /// Mutable form of [`LmHead::tensors`].
    pub(crate) fn tensors_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut [f32])>) {
        push_named_mut(out, prefix, "weight", &mut self.weight);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::reference::{self as r, assert_close, engine, fd_grad, to64};
    use switchyard_kernels::random::seeded_rng;

    #[test]
    fn loss_and_gradients_match_reference() {
        let (rows, d, v) = (6, 5, 9);
        let mut rng = seeded_rng(40);
        let head = LmHead::random(d, v, 0.7, &mut rng);
        let x = normal_vec(&mut rng, rows * d, 1.0);
        let targets: Vec<u32> = (0..rows as u32).map(|i| (i * 4) % v as u32).collect();
        let engine = engine();
        let mut cache = LmHeadCache::default();
        let mut grads = head.zeros_like();
        let mut d_x = vec![0.0; rows * d];
        let scale = 1.0 / rows as f32;
        let loss = engine
            .run(|cx| {
                let loss = head.forward(cx, &x, rows, &targets, &mut cache)?;
                head.backward(cx, &x, &targets, &mut cache, scale, &mut d_x, &mut grads)?;
                Ok::<_, RuntimeError>(loss)
            })
            .unwrap();
        let f =
            |x: &[f32], w: &[f32]| r::cross_entropy_sum(&r::linear(&to64(x), rows, &to64(w), None, d, v), v, &targets);
        let want = f(&x, &head.weight);
        assert_eq!(loss.count, rows);
        assert!((loss.sum - want).abs() < 1e-5 * want.abs(), "{} vs {want}", loss.sum);
        let mean = |x: &[f32], w: &[f32]| f(x, w) / rows as f64;
        assert_close("d_x", &d_x, &fd_grad(&x, |p| mean(p, &head.weight)), 1e-4);
        assert_close("d_w", &grads.weight, &fd_grad(&head.weight, |p| mean(&x, p)), 1e-4);
        for row in cache.probs.chunks(v) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn large_logits_stay_finite() {
        let head = LmHead { d_model: 1, vocab: 3, weight: vec![1000.0, -1000.0, 0.0] };
        let mut cache = LmHeadCache::default();
        let loss = engine().run(|cx| head.forward(cx, &[1.0, 1.0], 2, &[0, 1], &mut cache)).unwrap();
        assert!((loss.sum - 2000.0).abs() < 1e-3, "{loss:?}");
        assert!(cache.probs.iter().all(|p| p.is_finite()));
    }

    #[test]
    fn bad_targets_are_errors_and_sums_add() {
        let head = LmHead::random(2, 3, 0.1, &mut seeded_rng(41));
        let mut cache = LmHeadCache::default();
        let err = engine().run(|cx| head.forward(cx, &[0.0; 4], 2, &[0, 3], &mut cache)).unwrap_err();
        assert!(err.to_string().contains("target 3 at index 1"), "{err}");
        assert!(engine().run(|cx| head.forward(cx, &[0.0; 4], 2, &[0], &mut cache)).is_err());
        let mut s = LossSum { sum: 3.0, count: 2 } + LossSum { sum: 1.0, count: 1 };
        s += LossSum { sum: 0.0, count: 1 };
        assert_eq!(s.mean(), 1.0);
    }
}
