//! Layer normalisation over the last dimension: `y = (x - mean) / sqrt(var + eps) * gamma + beta`.

use super::{ROW_BLOCK, push_named, push_named_mut, resized};
use crate::error::{Result, RuntimeError, check_len};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Layer normalisation of rows of width `gamma.len()` (biased variance, as in GPT-2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerNorm {
    /// Gain, `[d]`.
    pub gamma: Vec<f32>,
    /// Shift, `[d]`.
    pub beta: Vec<f32>,
    /// Added to the variance before the square root.
    pub eps: f32,
}

/// What [`LayerNorm::forward`] saves for the backward pass.
#[derive(Debug, Clone, Default)]
pub struct LayerNormCache {
    /// Normalised input `(x - mean) * rstd`, `[rows, d]`.
    pub xhat: Vec<f32>,
    /// `1 / sqrt(var + eps)` per row, `[rows]`.
    pub rstd: Vec<f32>,
}

impl LayerNormCache {
    /// Rows of the last forward pass.
    pub fn rows(&self) -> usize {
        self.rstd.len()
    }
}

impl LayerNorm {
    /// The identity initialisation: `gamma = 1`, `beta = 0` of width `d`.
    pub fn new(d: usize, eps: f32) -> Self {
        Self { gamma: vec![1.0; d], beta: vec![0.0; d], eps }
    }

    /// Width `d`.
    pub fn width(&self) -> usize {
        self.gamma.len()
    }

    /// A norm of the same width with zero gain and shift (gradient storage).
    pub fn zeros_like(&self) -> Self {
        Self { gamma: vec![0.0; self.gamma.len()], beta: vec![0.0; self.beta.len()], eps: self.eps }
    }

    /// Checks the tensors (`gamma`, `beta` of one width, `eps` finite and positive).
    pub fn check(&self) -> Result<()> {
        let d = self.gamma.len();
        check_len("layer norm beta", &format!("[{d}]"), d, self.beta.len())?;
        if d == 0 {
            return Err(RuntimeError::invalid("layer norm", "width must be at least 1"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(RuntimeError::invalid("layer norm eps", format!("{} must be finite and > 0", self.eps)));
        }
        Ok(())
    }

    /// Normalises `rows` rows of `x` into `y` (overwritten) and fills `cache`.
    pub fn forward(&self, x: &[f32], rows: usize, y: &mut [f32], cache: &mut LayerNormCache) -> Result<()> {
        self.check()?;
        let d = self.width();
        check_len("layer norm input", &format!("[{rows}, {d}]"), rows * d, x.len())?;
        check_len("layer norm output", &format!("[{rows}, {d}]"), rows * d, y.len())?;
        let xhat = resized(&mut cache.xhat, rows * d);
        let rstd = resized(&mut cache.rstd, rows);
        let eps = self.eps as f64;
        let (gamma, beta) = (&self.gamma, &self.beta);
        y.par_chunks_mut(d)
            .zip(xhat.par_chunks_mut(d))
            .zip(rstd.par_iter_mut())
            .zip(x.par_chunks(d))
            .with_min_len(ROW_BLOCK)
            .for_each(|(((y, xh), rs), x)| {
                let mean = x.iter().map(|&v| v as f64).sum::<f64>() / d as f64;
                let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / d as f64;
                let r = 1.0 / (var + eps).sqrt();
                *rs = r as f32;
                for j in 0..d {
                    let n = ((x[j] as f64 - mean) * r) as f32;
                    xh[j] = n;
                    y[j] = n * gamma[j] + beta[j];
                }
            });
        Ok(())
    }

    /// Backward of [`LayerNorm::forward`] from its `cache` and the output gradient `d_y`.
    ///
    /// Overwrites `grads.gamma` and `grads.beta` (column sums in row order). Writes the input
    /// gradient into `d_x`, adding to its contents when `accumulate` (a residual stream).
    pub fn backward(
        &self,
        cache: &LayerNormCache,
        d_y: &[f32],
        d_x: &mut [f32],
        accumulate: bool,
        grads: &mut LayerNorm,
    ) -> Result<()> {
        self.check()?;
        let (d, rows) = (self.width(), cache.rows());
        let shape = format!("[{rows}, {d}]");
        check_len("layer norm saved input", &shape, rows * d, cache.xhat.len())?;
        check_len("layer norm d_output", &shape, rows * d, d_y.len())?;
        check_len("layer norm d_input", &shape, rows * d, d_x.len())?;
        if grads.width() != d || grads.beta.len() != d {
            return Err(RuntimeError::invalid(
                "layer norm gradient storage",
                format!("width {} differs from the norm's {d}; build it with zeros_like", grads.width()),
            ));
        }
        let gamma = &self.gamma;
        d_x.par_chunks_mut(d)
            .zip(d_y.par_chunks(d))
            .zip(cache.xhat.par_chunks(d))
            .zip(cache.rstd.par_iter())
            .with_min_len(ROW_BLOCK)
            .for_each(|(((dx, dy), xh), &rs)| {
                // dxhat = dy * gamma; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)).
                let (mut m1, mut m2) = (0.0f64, 0.0f64);
                for j in 0..d {
                    let g = (dy[j] * gamma[j]) as f64;
                    m1 += g;
                    m2 += g * xh[j] as f64;
                }
                let (m1, m2) = ((m1 / d as f64) as f32, (m2 / d as f64) as f32);
                for j in 0..d {
                    let v = rs * (dy[j] * gamma[j] - m1 - xh[j] * m2);
                    if accumulate {
                        dx[j] += v;
                    } else {
                        dx[j] = v;
                    }
                }
            });
        grads.gamma.fill(0.0);
        grads.beta.fill(0.0);
        for (dy, xh) in d_y.chunks_exact(d).zip(cache.xhat.chunks_exact(d)) {
            for j in 0..d {
                grads.gamma[j] += dy[j] * xh[j];
                grads.beta[j] += dy[j];
            }
        }
        Ok(())
    }

    /// Appends `prefix.gamma`, `prefix.beta` to a parameter list.
    pub(crate) fn tensors<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a [f32])>) {
        push_named(out, prefix, "gamma", &self.gamma);
        push_named(out, prefix, "beta", &self.beta);
    }

    /// Mutable form of [`LayerNorm::tensors`].
    pub(crate) fn tensors_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut [f32])>) {
        push_named_mut(out, prefix, "gamma", &mut self.gamma);
        push_named_mut(out, prefix, "beta", &mut self.beta);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::reference::{self as r, assert_close, fd_grad, to64};
    use switchyard_kernels::random::{normal_vec, seeded_rng};

    fn random_norm(d: usize, seed: u64) -> LayerNorm {
        let mut rng = seeded_rng(seed);
        let gamma = normal_vec(&mut rng, d, 0.5).iter().map(|g| 1.0 + g).collect();
        LayerNorm { gamma, beta: normal_vec(&mut rng, d, 0.5), eps: 1e-5 }
    }

    #[test]
    fn forward_matches_reference() {
        let mut rng = seeded_rng(10);
        for (rows, d) in [(3, 8), (40, 5), (1, 1), (0, 4)] {
            let ln = random_norm(d, 11);
            let x: Vec<f32> = normal_vec(&mut rng, rows * d, 2.0).iter().map(|v| v + 3.0).collect();
            let (mut y, mut cache) = (vec![0.0; rows * d], LayerNormCache::default());
            ln.forward(&x, rows, &mut y, &mut cache).unwrap();
            let want = r::layer_norm(&to64(&x), rows, d, &to64(&ln.gamma), &to64(&ln.beta), 1e-5);
            assert_close("y", &y, &want, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = seeded_rng(12);
        let (rows, d) = (5, 7);
        let ln = random_norm(d, 13);
        let x = normal_vec(&mut rng, rows * d, 1.0);
        let w_out = to64(&normal_vec(&mut rng, rows * d, 1.0));
        let (mut y, mut cache) = (vec![0.0; rows * d], LayerNormCache::default());
        ln.forward(&x, rows, &mut y, &mut cache).unwrap();
        let d_y: Vec<f32> = w_out.iter().map(|&v| v as f32).collect();
        let mut grads = ln.zeros_like();
        let mut d_x = vec![0.5; rows * d];
        ln.backward(&cache, &d_y, &mut d_x, false, &mut grads).unwrap();
        let loss = |x: &[f32], g: &[f32], b: &[f32]| {
            r::dot(&r::layer_norm(&to64(x), rows, d, &to64(g), &to64(b), 1e-5), &w_out)
        };
        assert_close("d_x", &d_x, &fd_grad(&x, |p| loss(p, &ln.gamma, &ln.beta)), 1e-4);
        assert_close("d_gamma", &grads.gamma, &fd_grad(&ln.gamma, |p| loss(&x, p, &ln.beta)), 1e-4);
        assert_close("d_beta", &grads.beta, &fd_grad(&ln.beta, |p| loss(&x, &ln.gamma, p)), 1e-4);

        // Accumulating adds onto what is there.
        let mut d_acc = vec![0.5; rows * d];
        ln.backward(&cache, &d_y, &mut d_acc, true, &mut grads).unwrap();
        for (a, b) in d_acc.iter().zip(&d_x) {
            assert!((a - (b + 0.5)).abs() < 1e-6);
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let ln = LayerNorm::new(4, 1e-5);
        let mut cache = LayerNormCache::default();
        assert!(ln.forward(&[0.0; 7], 2, &mut [0.0; 8], &mut cache).is_err());
        assert!(LayerNorm { eps: 0.0, ..ln.clone() }.forward(&[0.0; 8], 2, &mut [0.0; 8], &mut cache).is_err());
        ln.forward(&[1.0; 8], 2, &mut [0.0; 8], &mut cache).unwrap();
        let mut wrong = LayerNorm::new(3, 1e-5);
        assert!(ln.backward(&cache, &[0.0; 8], &mut [0.0; 8], false, &mut wrong).is_err());
        assert!(ln.backward(&cache, &[0.0; 6], &mut [0.0; 8], false, &mut ln.zeros_like()).is_err());
    }
}
