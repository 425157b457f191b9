//! Adam with decoupled weight decay (AdamW) and gradient clipping by global norm.
//!
//! The update is elementwise and each tensor has its own [`AdamState`]: the state of one tensor
//! depends on nothing else, so an expert's state can travel with the expert when it migrates, and
//! the result does not depend on threads or on how tensors are grouped.
//!
//! One step for a tensor with gradient `g` (PyTorch `AdamW` order, `t` the step after increment):
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)
//! m <- beta1 m + (1 - beta1) g
//! v <- beta2 v + (1 - beta2) g^2
//! p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
//! ```

use crate::error::{Result, RuntimeError};
use serde::{Deserialize, Serialize};

/// Adam hyper-parameters (AdamW: decay decoupled from the gradient).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// Decay of the first moment.
    pub beta1: f32,
    /// Decay of the second moment.
    pub beta2: f32,
    /// Added to the root of the second moment.
    pub eps: f32,
    /// Decoupled weight decay per unit learning rate (0 disables).
    pub weight_decay: f32,
}

impl Default for Adam {
    /// `lr = 1e-3`, `betas = (0.9, 0.999)`, `eps = 1e-8`, no weight decay.
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Adam's per-tensor state: first and second moments and the number of steps taken.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct AdamState {
    /// First moment, one per element.
    pub m: Vec<f32>,
    /// Second moment, one per element.
    pub v: Vec<f32>,
    /// Steps taken (the bias correction uses it).
    pub step: u64,
}

impl AdamState {
    /// Zero state for a tensor of `len` elements.
    pub fn new(len: usize) -> Self {
        Self { m: vec![0.0; len], v: vec![0.0; len], step: 0 }
    }
}

impl Adam {
    /// Checks the hyper-parameters: `lr >= 0`, `0 <= beta < 1`, `eps > 0`, `weight_decay >= 0`,
    /// all finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, v: f32, need: &str| {
            Err(RuntimeError::invalid(format!("Adam.{field}"), format!("{v} is out of range (need {need})")))
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "finite, >= 0");
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, b, "0 <= beta < 1");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps, "finite, > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "finite, >= 0");
        }
        Ok(())
    }

    /// One step on one tensor. An empty `state` (e.g. `AdamState::default()`) is sized on first
    /// use; an error when the lengths of `params`, `grads` and a non-empty state differ or the
    /// hyper-parameters are invalid (nothing is changed then).
    pub fn step(&self, params: &mut [f32], grads: &[f32], state: &mut AdamState) -> Result<()> {
        self.validate()?;
        let n = params.len();
        if grads.len() != n {
            return Err(RuntimeError::invalid(
                "Adam gradients",
                format!("{} elements for a tensor of {n}", grads.len()),
            ));
        }
        if state.m.is_empty() && state.v.is_empty() && state.step == 0 {
            *state = AdamState::new(n);
        }
        if state.m.len() != n || state.v.len() != n {
            return Err(RuntimeError::invalid(
                "Adam state",
                format!("moments of {} and {} elements for a tensor of {n}", state.m.len(), state.v.len()),
            ));
        }
        state.step += 1;
        let t = state.step.min(i32::MAX as u64) as i32;
        let c1 = 1.0 - (self.beta1 as f64).powi(t);
        let c2 = 1.0 - (self.beta2 as f64).powi(t);
        // p -= lr * (m / c1) / (sqrt(v / c2) + eps) = step_size * m / (sqrt(v) / sqrt(c2) + eps).
        let step_size = (self.lr as f64 / c1) as f32;
        let inv_sqrt_c2 = (1.0 / c2.sqrt()) as f32;
        let decay = 1.0 - self.lr * self.weight_decay;
        let (b1, b2, eps) = (self.beta1, self.beta2, self.eps);
        for (((p, &g), m), v) in params.iter_mut().zip(grads).zip(state.m.iter_mut()).zip(state.v.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p = *p * decay - step_size * *m / (v.sqrt() * inv_sqrt_c2 + eps);
        }
        Ok(())
    }
}

/// Sum of squares of a gradient tensor, in f64 (add the sums of all tensors and all workers, then
/// take the root, to get the global norm for [`clip_by_global_norm`]).
pub fn sum_of_squares(grads: &[f32]) -> f64 {
    grads.iter().map(|&g| g as f64 * g as f64).sum()
}

/// The factor that clipping by global norm applies: `min(1, max_norm / global_norm)` (1 when
/// `global_norm` is 0 or not finite, or `max_norm` is not positive).
pub fn clip_factor(global_norm: f64, max_norm: f64) -> f32 {
    if global_norm.is_finite() && global_norm > max_norm && max_norm > 0.0 {
        (max_norm / global_norm) as f32
    } else {
        1.0
    }
}

/// Scales one gradient tensor so that the global norm (computed by the caller over every tensor
/// on every worker) is at most `max_norm`; returns the factor applied. Call it on every tensor
/// with the same `global_norm`.
pub fn clip_by_global_norm(grads: &mut [f32], global_norm: f64, max_norm: f64) -> f32 {
    let f = clip_factor(global_norm, max_norm);
    if f != 1.0 {
        grads.iter_mut().for_each(|g| *g *= f);
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_steps_match_a_hand_calculation() {
        let adam = Adam { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let mut p = vec![1.0f32, -2.0, 0.5];
        let g = vec![0.5f32, -0.25, 0.0];
        let mut s = AdamState::default();
        adam.step(&mut p, &g, &mut s).unwrap();
        // Step 1: m_hat = g, v_hat = g^2, update = lr * sign(g) (g != 0), nothing where g == 0.
        assert_eq!(s.step, 1);
        assert!((p[0] - 0.9).abs() < 1e-6 && (p[1] + 1.9).abs() < 1e-6 && p[2] == 0.5, "{p:?}");
        assert!((s.m[0] - 0.05).abs() < 1e-7 && (s.v[0] / 0.00025 - 1.0).abs() < 1e-4, "{s:?}");

        // Step 2 with g = 1.0 on element 0: m = 0.9*0.05 + 0.1 = 0.145, v = 0.999*0.00025 + 0.001
        // = 0.00124975; m_hat = 0.145 / 0.19, v_hat = 0.00124975 / 0.001999.
        adam.step(&mut p, &[1.0, 0.0, 0.0], &mut s).unwrap();
        let m_hat = 0.145f64 / (1.0 - 0.81);
        let v_hat = 0.00124975f64 / (1.0 - 0.998001);
        let want = 0.9 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((p[0] as f64 - want).abs() < 1e-5, "{} vs {want}", p[0]);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        let adam = Adam { lr: 0.1, weight_decay: 0.5, ..Adam::default() };
        let mut p = vec![2.0f32];
        let mut s = AdamState::new(1);
        adam.step(&mut p, &[0.0], &mut s).unwrap();
        // Zero gradient: only the decay acts, p * (1 - lr * wd) = 2 * 0.95.
        assert!((p[0] - 1.9).abs() < 1e-6);
    }

    #[test]
    fn tensors_are_independent_and_errors_change_nothing() {
        let adam = Adam::default();
        let (mut a, mut b) = (vec![1.0f32, 2.0], vec![1.0f32]);
        let (mut sa, mut sb) = (AdamState::default(), AdamState::default());
        adam.step(&mut a, &[0.3, -0.7], &mut sa).unwrap();
        adam.step(&mut b, &[0.3], &mut sb).unwrap();
        assert_eq!(a[0], b[0]);
        assert_eq!(sa.m[0], sb.m[0]);

        let before = (a.clone(), sa.clone());
        assert!(adam.step(&mut a, &[0.1], &mut sa).is_err());
        assert!(adam.step(&mut a[..1], &[0.1], &mut sa).is_err());
        assert!(Adam { beta1: 1.0, ..adam }.step(&mut a, &[0.1, 0.1], &mut sa).is_err());
        assert!(Adam { lr: f32::NAN, ..adam }.step(&mut a, &[0.1, 0.1], &mut sa).is_err());
        assert_eq!((a, sa), before);
    }

    #[test]
    fn clipping_by_global_norm() {
        let mut g1 = vec![3.0f32, 0.0];
        let mut g2 = vec![4.0f32];
        let norm = (sum_of_squares(&g1) + sum_of_squares(&g2)).sqrt();
        assert_eq!(norm, 5.0);
        assert_eq!(clip_by_global_norm(&mut g1, norm, 1.0), 0.2);
        clip_by_global_norm(&mut g2, norm, 1.0);
        assert!((g1[0] - 0.6).abs() < 1e-7 && (g2[0] - 0.8).abs() < 1e-7);
        assert_eq!(clip_by_global_norm(&mut g1, 0.5, 1.0), 1.0);
        assert_eq!(clip_factor(f64::NAN, 1.0), 1.0);
        assert_eq!(clip_factor(0.0, 1.0), 1.0);
    }
}
