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
//! `offsets[e]..offsets[e + 1]`. With one thread experts run one after another; with several,
//! experts of similar size run side by side in lanes, one single-threaded GEMM each (never threaded
//! GEMMs inside a parallel loop), and an expert with more than a lane's share of the rows runs alone
//! on all threads first (see `Schedule` below). Bias and activation are fused into one pass after
//! the first GEMM; the output bias is pre-filled so the second GEMM accumulates onto it.

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
    /// One scratch per lane of experts run side by side.
    lanes: Vec<Scratch>,
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
    /// One scratch per lane of experts run side by side.
    lanes: Vec<Scratch>,
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
    let rows: Vec<FwdRows<'_>> = rows_of(&mut cache.pre, offsets, hin)
        .into_iter()
        .zip(rows_of(&mut cache.post, offsets, h))
        .zip(rows_of(&mut cache.pre_bf16, offsets, hin))
        .zip(rows_of(&mut cache.post_bf16, offsets, h))
        .zip(rows_of(output, offsets, d))
        .map(|((((pre, post), pre16), post16), y)| FwdRows { pre, post, pre16, post16, y })
        .collect();
    let x_of = |e: usize| &input[offsets[e] * d..offsets[e + 1] * d];
    run_schedule(cx, offsets, rows, &mut cache.scratch, &mut cache.lanes, |cx, e, out, sc| {
        expert_forward(cx, params, e, x_of(e), out, sc)
    })
}

/// One expert's rows of the forward's outputs (empty slices for the storage not in use).
struct FwdRows<'a> {
    pre: &'a mut [f32],
    post: &'a mut [f32],
    pre16: &'a mut [bf16],
    post16: &'a mut [bf16],
    y: &'a mut [f32],
}

/// Forward of expert `e` on its rows `x_e` (at least one).
fn expert_forward(
    cx: &Compute,
    params: &ExpertParams,
    e: usize,
    x_e: &[f32],
    out: FwdRows<'_>,
    sc: &mut Scratch,
) -> Result<()> {
    let (d, h) = (params.d_model, params.d_ffn);
    let hin = params.activation.in_width(h);
    let rows = x_e.len() / d;
    let storage = params.storage();
    let w_in = params.w_in.view_f32(e * d * hin, (e + 1) * d * hin, &mut sc.w_a);
    let w_out = params.w_out.view_f32(e * h * d, (e + 1) * h * d, &mut sc.w_b);
    let (pre, post): (&mut [f32], &mut [f32]) = match storage {
        Storage::F32 => (out.pre, out.post),
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
    let accumulate = params.activation.has_bias();
    if accumulate {
        let b = &params.b_out[e * d..(e + 1) * d];
        out.y.par_chunks_mut(ROW_BLOCK * d).for_each(|c| {
            for r in c.chunks_exact_mut(d) {
                r.copy_from_slice(b);
            }
        });
    }
    sgemm(cx, Trans::No, Trans::No, rows, d, h, post, h, w_out, d, out.y, d, accumulate)?;
    if storage == Storage::Bf16 {
        f32_to_bf16(pre, out.pre16);
        f32_to_bf16(post, out.post16);
    }
    Ok(())
}

/// The order in which one call runs its experts (those with at least one row): `whole` one after another,
/// every GEMM on all threads; then the `lanes` side by side, one thread each, each lane's experts in turn.
///
/// With several threads, the GEMM of one expert's ~1000 rows splits over the threads less well than separate
/// experts run on separate threads, with the pure-Rust GEMM and with OpenBLAS (whose calls from several threads
/// at once are safe in its threaded builds; measured in docs/BENCHMARKS.md). Experts with more than a lane's
/// share of the rows (`rows x threads > all rows`) stay whole so that no lane waits on one big expert; the rest
/// go to the lane with the fewest rows so far, biggest first. The schedule depends only on the offsets and the
/// thread count, and each expert's arithmetic only on its own rows, so results do not depend on timing.
struct Schedule {
    whole: Vec<usize>,
    lanes: Vec<Vec<usize>>,
}

fn schedule(cx: &Compute, offsets: &[usize]) -> Schedule {
    let rows = |e: usize| offsets[e + 1] - offsets[e];
    let total = offsets.last().copied().unwrap_or(0);
    let busy: Vec<usize> = (0..offsets.len().saturating_sub(1)).filter(|&e| rows(e) > 0).collect();
    let threads = cx.threads.max(1);
    if threads == 1 {
        return Schedule { whole: busy, lanes: Vec::new() };
    }
    let (whole, mut rest): (Vec<usize>, Vec<usize>) = busy.into_iter().partition(|&e| rows(e) * threads > total);
    if rest.len() < 2 {
        let mut whole = whole;
        whole.extend(rest);
        whole.sort_unstable();
        return Schedule { whole, lanes: Vec::new() };
    }
    rest.sort_by_key(|&e| (std::cmp::Reverse(rows(e)), e));
    let mut lanes = vec![Vec::new(); threads.min(rest.len())];
    let mut load = vec![0usize; lanes.len()];
    for e in rest {
        let l = (0..lanes.len()).min_by_key(|&l| (load[l], l)).expect("at least one lane");
        lanes[l].push(e);
        load[l] += rows(e);
    }
    Schedule { whole, lanes }
}

/// `buf` cut into each expert's rows, `width` values per row (all empty when `buf` is).
fn rows_of<'a, T>(mut buf: &'a mut [T], offsets: &[usize], width: usize) -> Vec<&'a mut [T]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let len = if buf.is_empty() { 0 } else { (w[1] - w[0]) * width };
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        out.push(head);
        buf = tail;
    }
    out
}

/// `buf` (`[E, ...]`) cut into its `experts` equal parts (all empty when `buf` is).
fn per_expert(buf: &mut [f32], experts: usize) -> Vec<&mut [f32]> {
    let width = buf.len() / experts.max(1);
    if width == 0 {
        return (0..experts).map(|_| &mut [][..]).collect();
    }
    buf.chunks_mut(width).collect()
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
    let mut rows: Vec<BwdRows<'_>> = per_expert(&mut grads.d_w_in, e_n)
        .into_iter()
        .zip(per_expert(&mut grads.d_w_out, e_n))
        .zip(per_expert(&mut grads.d_b_in, e_n))
        .zip(per_expert(&mut grads.d_b_out, e_n))
        .zip(rows_of(d_input, offsets, d))
        .map(|((((dw_in, dw_out), db_in), db_out), dx)| BwdRows { dw_in, dw_out, db_in, db_out, dx })
        .collect();
    let saved = |e: usize| {
        let (r0, r1) = (offsets[e], offsets[e + 1]);
        Saved {
            x: &input[r0 * d..r1 * d],
            dy: &d_output[r0 * d..r1 * d],
            pre: cache.pre.get(r0 * hin..r1 * hin).unwrap_or(&[]),
            post: cache.post.get(r0 * h..r1 * h).unwrap_or(&[]),
            pre16: cache.pre_bf16.get(r0 * hin..r1 * hin).unwrap_or(&[]),
            post16: cache.post_bf16.get(r0 * h..r1 * h).unwrap_or(&[]),
        }
    };
    // An expert without rows is not scheduled: its gradients are zero.
    for (_, out) in offsets.windows(2).zip(&mut rows).filter(|(w, _)| w[0] == w[1]) {
        out.dw_in.fill(0.0);
        out.dw_out.fill(0.0);
        out.db_in.fill(0.0);
        out.db_out.fill(0.0);
    }
    let storage = cache.storage;
    run_schedule(cx, offsets, rows, &mut grads.scratch, &mut grads.lanes, |cx, e, out, sc| {
        expert_backward(cx, params, storage, e, saved(e), out, sc)
    })
}

/// Runs `work(cx, e, outputs[e], scratch)` for every expert with rows: first the [`Schedule`]'s whole experts,
/// in turn on `cx`, then its lanes side by side, one thread and one of `lanes` scratch each.
fn run_schedule<T: Send>(
    cx: &Compute,
    offsets: &[usize],
    outputs: Vec<T>,
    scratch: &mut Scratch,
    lanes: &mut Vec<Scratch>,
    work: impl Fn(&Compute, usize, T, &mut Scratch) -> Result<()> + Sync,
) -> Result<()> {
    let plan = schedule(cx, offsets);
    if lanes.len() < plan.lanes.len() {
        lanes.resize_with(plan.lanes.len(), Scratch::default);
    }
    let mut outputs: Vec<Option<T>> = outputs.into_iter().map(Some).collect();
    let mut take = |e: usize| outputs[e].take().expect("each expert is scheduled once");
    for &e in &plan.whole {
        work(cx, e, take(e), scratch)?;
    }
    let one = Compute { threads: 1, ..*cx };
    let lane_work: Vec<Vec<(usize, T)>> =
        plan.lanes.iter().map(|lane| lane.iter().map(|&e| (e, take(e))).collect()).collect();
    lane_work
        .into_par_iter()
        .zip(lanes.par_iter_mut())
        .try_for_each(|(lane, sc)| lane.into_iter().try_for_each(|(e, out)| work(&one, e, out, sc)))
}

/// What the backward of one expert reads: its rows of the input, the output gradient and the saved activations
/// (empty slices for the storage not in use).
struct Saved<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    pre: &'a [f32],
    post: &'a [f32],
    pre16: &'a [bf16],
    post16: &'a [bf16],
}

/// One expert's gradients: its weight and bias gradients (biases empty for SwiGLU) and its rows of `d_input`.
struct BwdRows<'a> {
    dw_in: &'a mut [f32],
    dw_out: &'a mut [f32],
    db_in: &'a mut [f32],
    db_out: &'a mut [f32],
    dx: &'a mut [f32],
}

/// Backward of expert `e` (at least one row).
fn expert_backward(
    cx: &Compute,
    params: &ExpertParams,
    storage: Storage,
    e: usize,
    saved: Saved<'_>,
    out: BwdRows<'_>,
    sc: &mut Scratch,
) -> Result<()> {
    let (d, h) = (params.d_model, params.d_ffn);
    let hin = params.activation.in_width(h);
    let rows = saved.x.len() / d;
    let (x_e, dy_e) = (saved.x, saved.dy);
    let (pre, post): (&[f32], &[f32]) = match storage {
        Storage::F32 => (saved.pre, saved.post),
        Storage::Bf16 => {
            set_len(&mut sc.pre, rows * hin);
            set_len(&mut sc.post, rows * h);
            bf16_to_f32(saved.pre16, &mut sc.pre);
            bf16_to_f32(saved.post16, &mut sc.post);
            (&sc.pre[..], &sc.post[..])
        }
    };
    let w_in = params.w_in.view_f32(e * d * hin, (e + 1) * d * hin, &mut sc.w_a);
    let w_out = params.w_out.view_f32(e * h * d, (e + 1) * h * d, &mut sc.w_b);

    // d W_out = A^T dY ; d b_out = colsum(dY)
    sgemm(cx, Trans::Yes, Trans::No, h, d, rows, post, h, dy_e, d, out.dw_out, d, false)?;
    if params.activation.has_bias() {
        col_sums(dy_e, d, out.db_out);
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
            out.db_in.fill(0.0);
            for p in &partials {
                for (a, b) in out.db_in.iter_mut().zip(p) {
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
    sgemm(cx, Trans::Yes, Trans::No, d, hin, rows, x_e, d, grad_pre, hin, out.dw_in, hin, false)?;
    sgemm(cx, Trans::No, Trans::Yes, rows, d, hin, grad_pre, hin, w_in, hin, out.dx, d, false)
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
            threads in 1usize..5,
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
            threads in 1usize..4,
            seed in any::<u64>(),
        ) {
            let act = if swiglu { Activation::SwiGlu } else { Activation::Gelu };
            let mut r = rng(seed);
            let p32 = ExpertParams::random(act, experts, d, h, Storage::F32, seed).unwrap();
            let p16 = ExpertParams::random(act, experts, d, h, Storage::Bf16, seed).unwrap();
            let offsets = random_offsets(&mut r, experts, rows);
            let x = normal_vec(&mut r, rows * d, 1.0);
            let dy = normal_vec(&mut r, rows * d, 1.0);
            let engine = crate::gemm::Engine::new(Compute::new(threads)).unwrap();
            let run = |p: &ExpertParams| {
                let mut cache = ExpertCache::default();
                let mut y = Vec::new();
                let mut g = ExpertGrads::default();
                let mut dx = Vec::new();
                engine.run(|cx| {
                    experts_forward(cx, p, &x, &offsets, &mut cache, &mut y).unwrap();
                    experts_backward(cx, p, &x, &cache, &dy, &mut g, &mut dx).unwrap();
                });
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

    proptest! {
        #![proptest_config(config(64))]
        /// Every expert with rows runs exactly once, whole or in one lane; lanes are at most the threads, hold
        /// no expert bigger than a lane's share, and are filled biggest first onto the lightest lane.
        #[test]
        fn schedule_runs_every_expert_once(
            experts in 1usize..40,
            rows in 0usize..400,
            threads in 1usize..6,
            seed in any::<u64>(),
        ) {
            let offsets = random_offsets(&mut rng(seed), experts, rows);
            let cx = Compute::new(threads);
            let plan = schedule(&cx, &offsets);
            let size = |e: usize| offsets[e + 1] - offsets[e];
            let mut seen: Vec<usize> = plan.whole.iter().chain(plan.lanes.iter().flatten()).copied().collect();
            seen.sort_unstable();
            let busy: Vec<usize> = (0..experts).filter(|&e| size(e) > 0).collect();
            prop_assert_eq!(seen, busy);
            prop_assert!(plan.lanes.len() <= threads);
            prop_assert!(plan.lanes.is_empty() || plan.lanes.len() >= 2);
            for lane in &plan.lanes {
                prop_assert!(!lane.is_empty());
                for &e in lane {
                    prop_assert!(size(e) * threads <= rows);
                }
            }
            // The lanes' row counts differ by at most their biggest expert (the greedy's bound).
            let loads: Vec<usize> = plan.lanes.iter().map(|l| l.iter().map(|&e| size(e)).sum()).collect();
            let biggest = plan.lanes.iter().flatten().map(|&e| size(e)).max().unwrap_or(0);
            if let (Some(lo), Some(hi)) = (loads.iter().min(), loads.iter().max()) {
                prop_assert!(hi - lo <= biggest);
            }
        }

        /// Experts run side by side give the same bits on every call and the same values (to rounding) for
        /// every thread count, with the buffers reused between calls of different shapes.
        #[test]
        fn lanes_match_sequential_experts(
            experts in 2usize..10,
            rows in 0usize..80,
            d in 1usize..12,
            h in 1usize..12,
            swiglu in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let act = if swiglu { Activation::SwiGlu } else { Activation::Gelu };
            let mut r = rng(seed);
            let params = ExpertParams::random(act, experts, d, h, Storage::F32, seed).unwrap();
            let offsets = random_offsets(&mut r, experts, rows);
            let x = normal_vec(&mut r, rows * d, 1.0);
            let dy = normal_vec(&mut r, rows * d, 1.0);
            let mut cache = ExpertCache::default();
            let mut grads = ExpertGrads::default();
            let (mut y, mut dx) = (Vec::new(), Vec::new());
            let mut run = |threads: usize, x: &[f32], offsets: &[usize], dy: &[f32]| {
                let engine = crate::gemm::Engine::new(Compute::new(threads)).unwrap();
                engine.run(|cx| {
                    experts_forward(cx, &params, x, offsets, &mut cache, &mut y).unwrap();
                    experts_backward(cx, &params, x, &cache, dy, &mut grads, &mut dx).unwrap();
                });
                (y.clone(), dx.clone(), grads.d_w_in.clone(), grads.d_w_out.clone(), grads.d_b_in.clone())
            };
            let one = run(1, &x, &offsets, &dy);
            for threads in [2, 3] {
                let first = run(threads, &x, &offsets, &dy);
                // A call of another shape in between: the lanes' scratch is reused.
                let half = rows / 2;
                let other = random_offsets(&mut r, experts, half);
                run(threads, &x[..half * d], &other, &dy[..half * d]);
                prop_assert_eq!(&first, &run(threads, &x, &offsets, &dy));
                for (a, b) in [(&first.0, &one.0), (&first.1, &one.1), (&first.2, &one.2), (&first.3, &one.3), (&first.4, &one.4)] {
                    let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
                    prop_assert_eq!(a.len(), b.len());
                    prop_assert!(max_rel_err(a, &b64, 1e-4) < 1e-5);
                }
            }
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
