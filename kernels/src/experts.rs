//! Expert FFNs grouped over experts with uneven token counts, forward and backward.
//!
//! Activations:
//! * [`Activation::Gelu`]: `y = gelu(x W_in + b_in) W_out + b_out` with `W_in: [d, h]`,
//!   `W_out: [h, d]`.
//! * [`Activation::SwiGlu`]: `y = (silu(x W1) * (x W3)) W2`, no biases. `W1` and `W3` are stored
//!   side by side as `W_in: [d, 2h]` (columns `0..h` are `W1`, `h..2h` are `W3`) so that both
//!   projections are one GEMM; `W_out = W2: [h, d]`.
//!
//! The input is the grouped buffer of [`crate::dispatch`]: expert `e` owns rows
//! `offsets[e]..offsets[e + 1]`. Experts run one after another, each GEMM using all threads
//! (never a parallel loop over experts with threaded GEMMs inside); bias and activation are fused
//! into one parallel pass after the first GEMM; the output bias is pre-filled so the second GEMM
//! accumulates onto it.

use crate::activation;
use crate::bf16::{Storage, Stored, bf16_to_f32, f32_to_bf16};
use crate::error::{KernelError, Result, check_finite, check_len};
use crate::gemm::{Compute, Trans, sgemm};
use crate::random::{normal_vec, seeded_rng};
use crate::tensor::set_len;
use half::bf16;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Rows per rayon task in elementwise passes (also the fixed reduction block: results do not
/// depend on the thread count).
const ROW_BLOCK: usize = 8;

/// The expert FFN form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `Linear(d, h) + bias -> GELU (erf) -> Linear(h, d) + bias`.
    #[default]
    Gelu,
    /// `(silu(x W1) * (x W3)) W2`, three matrices, no biases.
    SwiGlu,
}

impl Activation {
    /// Width of the first projection for FFN size `h` (`h`, or `2h` for SwiGLU).
    pub fn in_width(self, d_ffn: usize) -> usize {
        match self {
            Activation::Gelu => d_ffn,
            Activation::SwiGlu => 2 * d_ffn,
        }
    }

    /// Whether the form has biases.
    pub fn has_bias(self) -> bool {
        matches!(self, Activation::Gelu)
    }

    /// FLOPs of the expert GEMMs for `rows` routed tokens: forward `4 * rows * d * h`
    /// (`6 * ...` for SwiGLU); backward twice that.
    pub fn forward_flops(self, rows: usize, d_model: usize, d_ffn: usize) -> f64 {
        let per = 2.0 * rows as f64 * d_model as f64 * d_ffn as f64;
        match self {
            Activation::Gelu => 2.0 * per,
            Activation::SwiGlu => 3.0 * per,
        }
    }
}

/// The weights of `E` experts (one layer's slots).
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertParams {
    /// FFN form.
    pub activation: Activation,
    /// Number of experts `E`.
    pub experts: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// FFN width `h`.
    pub d_ffn: usize,
    /// First projection, `[E, d, h]` (GELU) or `[E, d, 2h]` (SwiGLU: `[W1 | W3]`).
    pub w_in: Stored,
    /// First bias, `[E, h]` (GELU); empty for SwiGLU.
    pub b_in: Vec<f32>,
    /// Second projection, `[E, h, d]`.
    pub w_out: Stored,
    /// Second bias, `[E, d]` (GELU); empty for SwiGLU.
    pub b_out: Vec<f32>,
}

impl ExpertParams {
    /// Wraps weights (f32 in, stored as `storage`), checking every shape.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        activation: Activation,
        experts: usize,
        d_model: usize,
        d_ffn: usize,
        w_in: Vec<f32>,
        b_in: Vec<f32>,
        w_out: Vec<f32>,
        b_out: Vec<f32>,
        storage: Storage,
    ) -> Result<Self> {
        let p = Self {
            activation,
            experts,
            d_model,
            d_ffn,
            w_in: Stored::from_f32(w_in, storage),
            b_in,
            w_out: Stored::from_f32(w_out, storage),
            b_out,
        };
        p.validate()?;
        p.validate_finite()?;
        Ok(p)
    }

    /// Seeded initialisation: `W_in ~ N(0, 1/d)`, `W_out ~ N(0, 1/h)`, biases `N(0, 0.02^2)`.
    pub fn random(
        activation: Activation,
        experts: usize,
        d_model: usize,
        d_ffn: usize,
        storage: Storage,
        seed: u64,
    ) -> Result<Self> {
        let mut rng = seeded_rng(seed);
        let hin = activation.in_width(d_ffn);
        let w_in = normal_vec(&mut rng, experts * d_model * hin, 1.0 / (d_model.max(1) as f32).sqrt());
        let w_out = normal_vec(&mut rng, experts * d_ffn * d_model, 1.0 / (d_ffn.max(1) as f32).sqrt());
        let (b_in, b_out) = if activation.has_bias() {
            (normal_vec(&mut rng, experts * d_ffn, 0.02), normal_vec(&mut rng, experts * d_model, 0.02))
        } else {
            (Vec::new(), Vec::new())
        };
        Self::new(activation, experts, d_model, d_ffn, w_in, b_in, w_out, b_out, storage)
    }

    /// Storage type of the weights.
    pub fn storage(&self) -> Storage {
        self.w_in.storage()
    }

    /// Checks that every weight and bias is finite (a pass over all weights: done by the
    /// constructors, not by every forward).
    pub fn validate_finite(&self) -> Result<()> {
        for (name, w) in [("w_in", &self.w_in), ("w_out", &self.w_out)] {
            match w {
                Stored::F32(v) => check_finite(name, v)?,
                Stored::Bf16(v) => {
                    if let Some(index) = v.iter().position(|x| !x.is_finite()) {
                        return Err(KernelError::NonFinite { operand: name, index });
                    }
                }
            }
        }
        check_finite("b_in", &self.b_in)?;
        check_finite("b_out", &self.b_out)
    }

    /// Checks every buffer against the shapes (cheap; run by every forward and backward).
    pub fn validate(&self) -> Result<()> {
        let (e, d, h) = (self.experts, self.d_model, self.d_ffn);
        let hin = self.activation.in_width(h);
        check_len("w_in", &[e, d, hin], self.w_in.len())?;
        check_len("w_out", &[e, h, d], self.w_out.len())?;
        if self.activation.has_bias() {
            check_len("b_in", &[e, h], self.b_in.len())?;
            check_len("b_out", &[e, d], self.b_out.len())?;
        } else {
            check_len("b_in", &[0], self.b_in.len())?;
            check_len("b_out", &[0], self.b_out.len())?;
        }
        if self.w_in.storage() != self.w_out.storage() {
            return Err(KernelError::InvalidConfig {
                field: "expert weights",
                reason: "w_in and w_out must use the same storage".into(),
            });
        }
        Ok(())
    }
}

/// Gradients of [`ExpertParams`] (always f32; same layouts as the weights).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExpertGrads {
    /// `d loss / d W_in`, `[E, d, in_width]`.
    pub d_w_in: Vec<f32>,
    /// `d loss / d b_in`, `[E, h]` (empty for SwiGLU).
    pub d_b_in: Vec<f32>,
    /// `d loss / d W_out`, `[E, h, d]`.
    pub d_w_out: Vec<f32>,
    /// `d loss / d b_out`, `[E, d]` (empty for SwiGLU).
    pub d_b_out: Vec<f32>,
    scratch: Scratch,
}

/// Activations saved by [`experts_forward`] for [`experts_backward`], plus reusable scratch.
#[derive(Debug, Clone, Default)]
pub struct ExpertCache {
    offsets: Vec<usize>,
    storage: Storage,
    /// First-projection output with bias (GELU: `H`, SwiGLU: `[G | U]`), `[N, in_width]`.
    pre: Vec<f32>,
    /// Activation output `A`, `[N, h]`.
    post: Vec<f32>,
    pre_bf16: Vec<bf16>,
    post_bf16: Vec<bf16>,
    scratch: Scratch,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct Scratch {
    w_a: Vec<f32>,
    w_b: Vec<f32>,
    pre: Vec<f32>,
    post: Vec<f32>,
    grad_post: Vec<f32>,
    grad_pre: Vec<f32>,
}

fn check_offsets(offsets: &[usize], experts: usize, rows: usize) -> Result<()> {
    check_len("offsets", &[experts + 1], offsets.len())?;
    let ok = offsets.first() == Some(&0) && offsets.last() == Some(&rows) && offsets.windows(2).all(|w| w[0] <= w[1]);
    if ok {
        Ok(())
    } else {
        Err(KernelError::InvalidConfig {
            field: "offsets",
            reason: format!("must rise from 0 to the {rows} input rows"),
        })
    }
}

/// Forward of all experts: `output[rows of e] = FFN_e(input[rows of e])`.
///
/// `input: [N, d]` grouped by expert (`offsets: [E + 1]`, rising from 0 to `N`);
/// `output` is resized to `[N, d]`. Saves what the backward needs in `cache`.
pub fn experts_forward(
    cx: &Compute,
    params: &ExpertParams,
    input: &[f32],
    offsets: &[usize],
    cache: &mut ExpertCache,
    output: &mut Vec<f32>,
) -> Result<()> {
    params.validate()?;
    let (e_n, d, h) = (params.experts, params.d_model, params.d_ffn);
    let hin = params.activation.in_width(h);
    if d == 0 {
        return Err(KernelError::InvalidConfig { field: "d_model", reason: "must be at least 1".into() });
    }
    if !input.len().is_multiple_of(d) {
        return Err(KernelError::ShapeMismatch {
            operand: "expert input",
            expected: format!("[N, {d}]"),
            actual: format!("{} elements", input.len()),
        });
    }
    let n = input.len() / d;
    check_offsets(offsets, e_n, n)?;
    let storage = params.storage();
    cache.offsets.clear();
    cache.offsets.extend_from_slice(offsets);
    cache.storage = storage;
    set_len(output, n * d);
    match storage {
        Storage::F32 => {
            set_len(&mut cache.pre, n * hin);
            set_len(&mut cache.post, n * h);
            cache.pre_bf16.clear();
            cache.post_bf16.clear();
        }
        Storage::Bf16 => {
            cache.pre_bf16.clear();
            cache.pre_bf16.resize(n * hin, bf16::ZERO);
            cache.post_bf16.clear();
            cache.post_bf16.resize(n * h, bf16::ZERO);
            cache.pre.clear();
            cache.post.clear();
        }
    }
    let sc = &mut cache.scratch;
    for e in 0..e_n {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        if rows == 0 {
            continue;
        }
        let x_e = &input[r0 * d..r1 * d];
        let w_in = params.w_in.view_f32(e * d * hin, (e + 1) * d * hin, &mut sc.w_a);
        let w_out = params.w_out.view_f32(e * h * d, (e + 1) * h * d, &mut sc.w_b);
        let (pre, post): (&mut [f32], &mut [f32]) = match storage {
            Storage::F32 => (&mut cache.pre[r0 * hin..r1 * hin], &mut cache.post[r0 * h..r1 * h]),
            Storage::Bf16 => {
                set_len(&mut sc.pre, rows * hin);
                set_len(&mut sc.post, rows * h);
                (&mut sc.pre[..], &mut sc.post[..])
            }
        };
        sgemm(cx, Trans::No, Trans::No, rows, hin, d, x_e, d, w_in, hin, pre, hin, false)?;
        match params.activation {
            Activation::Gelu => {
                let b = &params.b_in[e * h..(e + 1) * h];
                pre.par_chunks_mut(ROW_BLOCK * h)
                    .zip(post.par_chunks_mut(ROW_BLOCK * h))
                    .for_each(|(hc, ac)| activation::bias_gelu_forward(hc, ac, Some(b), h));
            }
            Activation::SwiGlu => {
                pre.par_chunks(ROW_BLOCK * hin)
                    .zip(post.par_chunks_mut(ROW_BLOCK * h))
                    .for_each(|(gu, ac)| activation::swiglu_forward(gu, ac, h));
            }
        }
        let y_e = &mut output[r0 * d..r1 * d];
        let accumulate = params.activation.has_bias();
        if accumulate {
            let b = &params.b_out[e * d..(e + 1) * d];
            y_e.par_chunks_mut(ROW_BLOCK * d).for_each(|c| {
                for r in c.chunks_exact_mut(d) {
                    r.copy_from_slice(b);
                }
            });
        }
        sgemm(cx, Trans::No, Trans::No, rows, d, h, post, h, w_out, d, y_e, d, accumulate)?;
        if storage == Storage::Bf16 {
            f32_to_bf16(pre, &mut cache.pre_bf16[r0 * hin..r1 * hin]);
            f32_to_bf16(post, &mut cache.post_bf16[r0 * h..r1 * h]);
        }
    }
    Ok(())
}

/// Backward of [`experts_forward`].
///
/// `input` must be the forward's input and `cache` its saved state; `d_output: [N, d]` is the
/// gradient of the loss with respect to the forward's output. Writes (overwrites) the weight
/// gradients in `grads` and the input gradient `d_input` (resized to `[N, d]`).
pub fn experts_backward(
    cx: &Compute,
    params: &ExpertParams,
    input: &[f32],
    cache: &ExpertCache,
    d_output: &[f32],
    grads: &mut ExpertGrads,
    d_input: &mut Vec<f32>,
) -> Result<()> {
    params.validate()?;
    let (e_n, d, h) = (params.experts, params.d_model, params.d_ffn);
    let hin = params.activation.in_width(h);
    let n = cache.offsets.last().copied().unwrap_or(0);
    check_offsets(&cache.offsets, e_n, n)?;
    check_len("expert input", &[n, d], input.len())?;
    check_len("d_expert_output", &[n, d], d_output.len())?;
    if cache.storage != params.storage() {
        return Err(KernelError::InvalidConfig {
            field: "expert cache",
            reason: "saved with a different storage type than the weights".into(),
        });
    }
    match cache.storage {
        Storage::F32 => {
            check_len("saved pre-activation", &[n, hin], cache.pre.len())?;
            check_len("saved activation", &[n, h], cache.post.len())?;
        }
        Storage::Bf16 => {
            check_len("saved pre-activation", &[n, hin], cache.pre_bf16.len())?;
            check_len("saved activation", &[n, h], cache.post_bf16.len())?;
        }
    }
    let has_bias = params.activation.has_bias();
    set_len(&mut grads.d_w_in, e_n * d * hin);
    set_len(&mut grads.d_w_out, e_n * h * d);
    if has_bias {
        set_len(&mut grads.d_b_in, e_n * h);
        set_len(&mut grads.d_b_out, e_n * d);
    } else {
        grads.d_b_in.clear();
        grads.d_b_out.clear();
    }
    set_len(d_input, n * d);
    let offsets = &cache.offsets;
    let sc = &mut grads.scratch;
    for e in 0..e_n {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        let rows = r1 - r0;
        let dw_in = &mut grads.d_w_in[e * d * hin..(e + 1) * d * hin];
        let dw_out = &mut grads.d_w_out[e * h * d..(e + 1) * h * d];
        if rows == 0 {
            dw_in.fill(0.0);
            dw_out.fill(0.0);
            if has_bias {
                grads.d_b_in[e * h..(e + 1) * h].fill(0.0);
                grads.d_b_out[e * d..(e + 1) * d].fill(0.0);
            }
            continue;
        }
        let x_e = &input[r0 * d..r1 * d];
        let dy_e = &d_output[r0 * d..r1 * d];
        let (pre, post): (&[f32], &[f32]) = match cache.storage {
            Storage::F32 => (&cache.pre[r0 * hin..r1 * hin], &cache.post[r0 * h..r1 * h]),
            Storage::Bf16 => {
                set_len(&mut sc.pre, rows * hin);
                set_len(&mut sc.post, rows * h);
                bf16_to_f32(&cache.pre_bf16[r0 * hin..r1 * hin], &mut sc.pre);
                bf16_to_f32(&cache.post_bf16[r0 * h..r1 * h], &mut sc.post);
                (&sc.pre[..], &sc.post[..])
            }
        };
        let w_in = params.w_in.view_f32(e * d * hin, (e + 1) * d * hin, &mut sc.w_a);
        let w_out = params.w_out.view_f32(e * h * d, (e + 1) * h * d, &mut sc.w_b);

        // d W_out = A^T dY ; d b_out = colsum(dY)
        sgemm(cx, Trans::Yes, Trans::No, h, d, rows, post, h, dy_e, d, dw_out, d, false)?;
        if has_bias {
            col_sums(dy_e, d, &mut grads.d_b_out[e * d..(e + 1) * d]);
        }
        // dA = dY W_out^T
        set_len(&mut sc.grad_post, rows * h);
        sgemm(cx, Trans::No, Trans::Yes, rows, h, d, dy_e, d, w_out, d, &mut sc.grad_post, h, false)?;
        // d pre-activation
        let grad_pre: &[f32] = match params.activation {
            Activation::Gelu => {
                let partials: Vec<Vec<f32>> = sc
                    .grad_post
                    .par_chunks_mut(ROW_BLOCK * h)
                    .zip(pre.par_chunks(ROW_BLOCK * h))
                    .map(|(g, hc)| {
                        let mut s = vec![0.0f32; h];
                        activation::gelu_backward(hc, g, &mut s, h);
                        s
                    })
                    .collect();
                let db = &mut grads.d_b_in[e * h..(e + 1) * h];
                db.fill(0.0);
                for p in &partials {
                    for (a, b) in db.iter_mut().zip(p) {
                        *a += b;
                    }
                }
                &sc.grad_post
            }
            Activation::SwiGlu => {
                set_len(&mut sc.grad_pre, rows * hin);
                sc.grad_pre
                    .par_chunks_mut(ROW_BLOCK * hin)
                    .zip(pre.par_chunks(ROW_BLOCK * hin))
                    .zip(sc.grad_post.par_chunks(ROW_BLOCK * h))
                    .for_each(|((dgu, gu), da)| activation::swiglu_backward(gu, da, dgu, h));
                &sc.grad_pre
            }
        };
        // d W_in = X^T dPre ; dX = dPre W_in^T
        sgemm(cx, Trans::Yes, Trans::No, d, hin, rows, x_e, d, grad_pre, hin, dw_in, hin, false)?;
        sgemm(
            cx,
            Trans::No,
            Trans::Yes,
            rows,
            d,
            hin,
            grad_pre,
            hin,
            w_in,
            hin,
            &mut d_input[r0 * d..r1 * d],
            d,
            false,
        )?;
    }
    Ok(())
}

/// Column sums of `m` (rows of `cols`) into `out`, with a fixed blocking (deterministic).
fn col_sums(m: &[f32], cols: usize, out: &mut [f32]) {
    let partials: Vec<Vec<f32>> = m
        .par_chunks(ROW_BLOCK * 8 * cols)
        .map(|c| {
            let mut s = vec![0.0f32; cols];
            activation::add_col_sums(c, &mut s, cols);
            s
        })
        .collect();
    out.fill(0.0);
    for p in &partials {
        for (a, b) in out.iter_mut().zip(p) {
            *a += b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testutil::{config, max_rel_err, normal_vec, rng};
    use proptest::prelude::*;

    fn random_offsets(r: &mut crate::random::SeededRng, experts: usize, total: usize) -> Vec<usize> {
        use rand::RngExt;
        let mut cuts: Vec<usize> = (0..experts.saturating_sub(1)).map(|_| r.random_range(0..=total)).collect();
        cuts.sort_unstable();
        let mut off = vec![0];
        off.extend(cuts);
        off.push(total);
        off
    }

    proptest! {
        #![proptest_config(config(24))]
        /// Grouped forward and backward vs the f64 reference, both activations, with empty
        /// experts and uneven counts.
        #[test]
        fn grouped_ffn_matches_reference(
            experts in 1usize..12,
            rows in 0usize..60,
            d in 1usize..9,
            h in 1usize..9,
            swiglu in any::<bool>(),
            threads in 1usize..3,
            seed in any::<u64>(),
        ) {
            let act = if swiglu { Activation::SwiGlu } else { Activation::Gelu };
            let mut r = rng(seed);
            let params = ExpertParams::random(act, experts, d, h, Storage::F32, seed).unwrap();
            let offsets = random_offsets(&mut r, experts, rows);
            let x = normal_vec(&mut r, rows * d, 1.0);
            let dy = normal_vec(&mut r, rows * d, 1.0);
            let engine = crate::gemm::Engine::new(Compute::new(threads)).unwrap();
            let mut cache = ExpertCache::default();
            let mut y = Vec::new();
            let mut grads = ExpertGrads::default();
            let mut dx = Vec::new();
            engine.run(|cx| {
                experts_forward(cx, &params, &x, &offsets, &mut cache, &mut y)?;
                experts_backward(cx, &params, &x, &cache, &dy, &mut grads, &mut dx)
            }).unwrap();
            let want = reference::experts(&params, &x, &offsets, &dy);
            prop_assert!(max_rel_err(&y, &want.output, 1e-3) < 1e-4);
            prop_assert!(max_rel_err(&dx, &want.d_input, 1e-3) < 1e-4);
            prop_assert!(max_rel_err(&grads.d_w_in, &want.d_w_in, 1e-3) < 1e-4);
            prop_assert!(max_rel_err(&grads.d_w_out, &want.d_w_out, 1e-3) < 1e-4);
            prop_assert!(max_rel_err(&grads.d_b_in, &want.d_b_in, 1e-3) < 1e-4);
            prop_assert!(max_rel_err(&grads.d_b_out, &want.d_b_out, 1e-3) < 1e-4);
        }

        /// bf16 storage stays within bf16 tolerance of the f32 path.
        #[test]
        fn bf16_storage_close_to_f32(
            experts in 1usize..6,
            rows in 0usize..40,
            d in 1usize..9,
            h in 1usize..9,
            swiglu in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let act = if swiglu { Activation::SwiGlu } else { Activation::Gelu };
            let mut r = rng(seed);
            let p32 = ExpertParams::random(act, experts, d, h, Storage::F32, seed).unwrap();
            let p16 = ExpertParams::random(act, experts, d, h, Storage::Bf16, seed).unwrap();
            let offsets = random_offsets(&mut r, experts, rows);
            let x = normal_vec(&mut r, rows * d, 1.0);
            let dy = normal_vec(&mut r, rows * d, 1.0);
            let cx = Compute::new(1);
            let run = |p: &ExpertParams| {
                let mut cache = ExpertCache::default();
                let mut y = Vec::new();
                let mut g = ExpertGrads::default();
                let mut dx = Vec::new();
                experts_forward(&cx, p, &x, &offsets, &mut cache, &mut y).unwrap();
                experts_backward(&cx, p, &x, &cache, &dy, &mut g, &mut dx).unwrap();
                (y, dx, g)
            };
            let (y32, dx32, g32) = run(&p32);
            let (y16, dx16, g16) = run(&p16);
            let close = |a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
                a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 0.05 * scale)
            };
            prop_assert!(close(&y16, &y32));
            prop_assert!(close(&dx16, &dx32));
            prop_assert!(close(&g16.d_w_in, &g32.d_w_in));
            prop_assert!(close(&g16.d_w_out, &g32.d_w_out));
        }
    }

    #[test]
    fn bad_offsets_are_errors() {
        let p = ExpertParams::random(Activation::Gelu, 2, 3, 4, Storage::F32, 1).unwrap();
        let cx = Compute::new(1);
        let x = vec![0.0; 5 * 3];
        let mut cache = ExpertCache::default();
        let mut y = Vec::new();
        assert!(experts_forward(&cx, &p, &x, &[0, 3], &mut cache, &mut y).is_err());
        assert!(experts_forward(&cx, &p, &x, &[0, 4, 3], &mut cache, &mut y).is_err());
        assert!(experts_forward(&cx, &p, &x[..14], &[0, 2, 5], &mut cache, &mut y).is_err());
        assert!(experts_forward(&cx, &p, &x, &[0, 2, 5], &mut cache, &mut y).is_ok());
        let mut g = ExpertGrads::default();
        let mut dx = Vec::new();
        assert!(experts_backward(&cx, &p, &x, &cache, &x[..3], &mut g, &mut dx).is_err());
    }
}
