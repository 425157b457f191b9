//! A fully connected layer `y = x W + b` with `W: [in, out]` row-major and an optional bias.

use super::{push_named, push_named_mut};
use crate::error::{Result, RuntimeError, check_len};
use serde::{Deserialize, Serialize};
use switchyard_kernels::random::{SeededRng, normal_vec};
use switchyard_kernels::{Compute, Trans, sgemm};

/// `y = x W + b`: `x: [rows, in_features]`, `W: [in_features, out_features]`, `b: [out_features]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Linear {
    /// Input width.
    pub in_features: usize,
    /// Output width.
    pub out_features: usize,
    /// `[in_features, out_features]`, row-major.
    pub weight: Vec<f32>,
    /// `[out_features]`, or no bias.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// A layer from its tensors; an error unless their lengths fit the widths.
    pub fn new(in_features: usize, out_features: usize, weight: Vec<f32>, bias: Option<Vec<f32>>) -> Result<Self> {
        let layer = Self { in_features, out_features, weight, bias };
        layer.check()?;
        Ok(layer)
    }

    /// Weights `N(0, std^2)` from `rng`, bias zero when `with_bias`.
    pub fn random(in_features: usize, out_features: usize, with_bias: bool, std: f32, rng: &mut SeededRng) -> Self {
        let weight = normal_vec(rng, in_features * out_features, std);
        let bias = with_bias.then(|| vec![0.0; out_features]);
        Self { in_features, out_features, weight, bias }
    }

    /// A layer of the same shape with every value zero (gradient storage).
    pub fn zeros_like(&self) -> Self {
        Self {
            in_features: self.in_features,
            out_features: self.out_features,
            weight: vec![0.0; self.weight.len()],
            bias: self.bias.as_ref().map(|b| vec![0.0; b.len()]),
        }
    }

    /// Checks the tensor lengths against the widths.
    pub fn check(&self) -> Result<()> {
        let (i, o) = (self.in_features, self.out_features);
        check_len("linear weight", &format!("[{i}, {o}]"), i * o, self.weight.len())?;
        if let Some(b) = &self.bias {
            check_len("linear bias", &format!("[{o}]"), o, b.len())?;
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.weight.len() + self.bias.as_ref().map_or(0, Vec::len)
    }

    /// `y = x W + b` for `rows` rows (`y` is overwritten). Call inside `Engine::run`.
    pub fn forward(&self, cx: &Compute, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        self.check()?;
        let (i, o) = (self.in_features, self.out_features);
        check_len("linear input", &format!("[{rows}, {i}]"), rows * i, x.len())?;
        check_len("linear output", &format!("[{rows}, {o}]"), rows * o, y.len())?;
        match &self.bias {
            Some(b) => {
                for row in y.chunks_exact_mut(o.max(1)) {
                    row.copy_from_slice(b);
                }
                sgemm(cx, Trans::No, Trans::No, rows, o, i, x, i, &self.weight, o, y, o, true)?;
            }
            None => sgemm(cx, Trans::No, Trans::No, rows, o, i, x, i, &self.weight, o, y, o, false)?,
        }
        Ok(())
    }

    /// Backward of [`Linear::forward`] given its input `x` and the output gradient `d_y`.
    ///
    /// Overwrites `grads.weight = x^T d_y` and `grads.bias` (column sums of `d_y`, in row order);
    /// writes `d_x = d_y W^T` when `d_x` is given. `grads` must have this layer's shape
    /// ([`Linear::zeros_like`]).
    pub fn backward(
        &self,
        cx: &Compute,
        x: &[f32],
        rows: usize,
        d_y: &[f32],
        d_x: Option<&mut [f32]>,
        grads: &mut Linear,
    ) -> Result<()> {
        self.check()?;
        let (i, o) = (self.in_features, self.out_features);
        check_len("linear input", &format!("[{rows}, {i}]"), rows * i, x.len())?;
        check_len("linear d_output", &format!("[{rows}, {o}]"), rows * o, d_y.len())?;
        self.check_same_shape(grads)?;
        sgemm(cx, Trans::Yes, Trans::No, i, o, rows, x, i, d_y, o, &mut grads.weight, o, false)?;
        if let Some(db) = grads.bias.as_mut() {
            db.fill(0.0);
            for row in d_y.chunks_exact(o.max(1)) {
                for (acc, &g) in db.iter_mut().zip(row) {
                    *acc += g;
                }
            }
        }
        if let Some(d_x) = d_x {
            check_len("linear d_input", &format!("[{rows}, {i}]"), rows * i, d_x.len())?;
            sgemm(cx, Trans::No, Trans::Yes, rows, i, o, d_y, o, &self.weight, o, d_x, i, false)?;
        }
        Ok(())
    }

    /// An error unless `other` has this layer's widths and bias presence.
    pub(crate) fn check_same_shape(&self, other: &Linear) -> Result<()> {
        other.check()?;
        if other.in_features != self.in_features
            || other.out_features != self.out_features
            || other.bias.is_some() != self.bias.is_some()
        {
            return Err(RuntimeError::invalid(
                "linear gradient storage",
                format!(
                    "shape [{}, {}] (bias {}) differs from the layer's [{}, {}] (bias {}); build it with zeros_like",
                    other.in_features,
                    other.out_features,
                    other.bias.is_some(),
                    self.in_features,
                    self.out_features,
                    self.bias.is_some()
                ),
            ));
        }
        Ok(())
    }

    /// Appends `prefix.weight` (and `prefix.bias`) to a parameter list.
    pub(crate) fn tensors<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a [f32])>) {
        push_named(out, prefix, "weight", &self.weight);
        if let Some(b) = &self.bias {
            push_named(out, prefix, "bias", b);
        }
    }

    /// Mutable form of [`Linear::tensors`].
    pub(crate) fn tensors_mut<'a>(&'a mut self, prefix: &str, out: &mut Vec<(String, &'a mut [f32])>) {
        push_named_mut(out, prefix, "weight", &mut self.weight);
        if let Some(b) = &mut self.bias {
            push_named_mut(out, prefix, "bias", b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::reference::{self as r, assert_close, fd_grad, to64};
    use switchyard_kernels::random::seeded_rng;

    fn run<T: Send>(f: impl FnOnce(&Compute) -> T + Send) -> T {
        r::engine().run(f)
    }

    #[test]
    fn forward_matches_reference_with_and_without_bias() {
        let mut rng = seeded_rng(1);
        for (rows, i, o, bias) in [(5, 3, 4, true), (7, 6, 2, false), (1, 1, 1, true), (0, 3, 2, true)] {
            let mut layer = Linear::random(i, o, bias, 0.5, &mut rng);
            if let Some(b) = layer.bias.as_mut() {
                *b = normal_vec(&mut rng, o, 0.5);
            }
            let x = normal_vec(&mut rng, rows * i, 1.0);
            let mut y = vec![0.0; rows * o];
            run(|cx| layer.forward(cx, &x, rows, &mut y)).unwrap();
            let want =
                r::linear(&to64(&x), rows, &to64(&layer.weight), layer.bias.as_deref().map(to64).as_deref(), i, o);
            assert_close("y", &y, &want, 1e-5);
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let mut rng = seeded_rng(2);
        let (rows, i, o) = (4, 5, 3);
        let mut layer = Linear::random(i, o, true, 0.5, &mut rng);
        layer.bias = Some(normal_vec(&mut rng, o, 0.5));
        let x = normal_vec(&mut rng, rows * i, 1.0);
        let w_out = normal_vec(&mut rng, rows * o, 1.0); // loss = sum(y * w_out)
        let mut grads = layer.zeros_like();
        let mut d_x = vec![0.0; rows * i];
        run(|cx| layer.backward(cx, &x, rows, &w_out, Some(&mut d_x), &mut grads)).unwrap();

        let loss = |x: &[f32], w: &[f32], b: &[f32]| -> f64 {
            let y = r::linear(&to64(x), rows, &to64(w), Some(&to64(b)), i, o);
            r::dot(&y, &to64(&w_out))
        };
        let b = layer.bias.clone().unwrap();
        assert_close("d_x", &d_x, &fd_grad(&x, |p| loss(p, &layer.weight, &b)), 1e-4);
        assert_close("d_w", &grads.weight, &fd_grad(&layer.weight, |p| loss(&x, p, &b)), 1e-4);
        assert_close("d_b", grads.bias.as_ref().unwrap(), &fd_grad(&b, |p| loss(&x, &layer.weight, p)), 1e-4);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let mut rng = seeded_rng(3);
        let layer = Linear::random(3, 2, true, 0.1, &mut rng);
        let mut y = vec![0.0; 4];
        assert!(run(|cx| layer.forward(cx, &[0.0; 5], 2, &mut y)).is_err());
        assert!(run(|cx| layer.forward(cx, &[0.0; 6], 2, &mut y[..3])).is_err());
        let mut wrong = Linear::random(3, 2, false, 0.1, &mut rng);
        assert!(run(|cx| layer.backward(cx, &[0.0; 6], 2, &[0.0; 4], None, &mut wrong)).is_err());
        assert!(Linear::new(3, 2, vec![0.0; 5], None).is_err());
        assert!(Linear::new(3, 2, vec![0.0; 6], Some(vec![0.0; 3])).is_err());
    }
}
