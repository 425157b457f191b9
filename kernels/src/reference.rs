//! Naive f64 references of every operation, for tests: plain loops, no blocking, no threads.
//!
//! They define what the fast kernels must compute. Routing decisions can be taken from given
//! f32 probabilities (`selection_probs`) so that a comparison is not disturbed by near-ties that
//! f32 and f64 would break differently.

// Plain index loops are the point of a reference.
#![allow(clippy::needless_range_loop)]

use crate::bf16::Stored;
use crate::experts::{Activation, ExpertParams};
use crate::gate::{CapacityPolicy, DropPolicy, GateConfig};
use crate::layer::MoeLayer;

/// `erf` in f64 (series below 3, continued fraction above; error < 1e-13).
pub fn erf64(x: f64) -> f64 {
    let a = x.abs();
    let v = if a < 3.0 {
        let mut term = a;
        let mut sum = a;
        let x2 = a * a;
        let mut n = 0.0f64;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...))))
        let mut f = a;
        for i in (1..80).rev() {
            f = a + (i as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    if x < 0.0 { -v } else { v }
}

/// Exact GELU in f64.
pub fn gelu64(x: f64) -> f64 {
    0.5 * x * (1.0 + erf64(x / std::f64::consts::SQRT_2))
}

/// Derivative of [`gelu64`].
pub fn gelu_grad64(x: f64) -> f64 {
    let phi = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    0.5 * (1.0 + erf64(x / std::f64::consts::SQRT_2)) + x * phi
}

fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Reference routing (see [`crate::gate`] for the definition).
#[derive(Debug, Clone, PartialEq)]
pub struct RefRouting {
    /// `[T, E]`
    pub probs: Vec<f64>,
    /// `[T * k]`
    pub expert_index: Vec<u32>,
    /// `[T * k]`
    pub weight: Vec<f64>,
    /// `[T * k]`
    pub position: Vec<Option<u32>>,
    /// Applied capacity.
    pub capacity: usize,
    /// Weighted load-balancing loss.
    pub aux_loss: f64,
    /// Weighted z-loss.
    pub z_loss: f64,
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Reference router on f32 inputs (widened to f64).
#[allow(clippy::too_many_arguments)]
pub fn route(
    cfg: &GateConfig,
    x: &[f32],
    tokens: usize,
    d: usize,
    wg: &[f32],
    experts: usize,
    bias: Option<&[f32]>,
    selection_probs: Option<&[f32]>,
) -> RefRouting {
    route64(cfg, &to64(x), tokens, d, &to64(wg), experts, bias, selection_probs)
}

/// Reference router in f64.
#[allow(clippy::too_many_arguments)]
pub fn route64(
    cfg: &GateConfig,
    x: &[f64],
    tokens: usize,
    d: usize,
    wg: &[f64],
    experts: usize,
    bias: Option<&[f32]>,
    selection_probs: Option<&[f32]>,
) -> RefRouting {
    let (t_n, e_n, k) = (tokens, experts, cfg.top_k);
    let mut probs = vec![0.0f64; t_n * e_n];
    let mut lse = vec![0.0f64; t_n];
    for t in 0..t_n {
        let logits: Vec<f64> = (0..e_n).map(|e| (0..d).map(|i| x[t * d + i] * wg[i * e_n + e]).sum()).collect();
        let m = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = logits.iter().map(|l| (l - m).exp()).sum();
        for e in 0..e_n {
            probs[t * e_n + e] = (logits[e] - m).exp() / s;
        }
        lse[t] = m + s.ln();
    }
    let sel = |t: usize, e: usize| -> f64 {
        match selection_probs {
            Some(p) => (p[t * e_n + e] + bias.map_or(0.0, |b| b[e])) as f64,
            None => probs[t * e_n + e] + bias.map_or(0.0, |b| b[e] as f64),
        }
    };
    let sel_prob = |t: usize, e: usize| -> f64 {
        match selection_probs {
            Some(p) => p[t * e_n + e] as f64,
            None => probs[t * e_n + e],
        }
    };
    let mut expert_index = vec![0u32; t_n * k];
    let mut weight = vec![0.0f64; t_n * k];
    let mut demand = vec![0usize; e_n];
    for t in 0..t_n {
        let mut order: Vec<usize> = (0..e_n).collect();
        order.sort_by(|&a, &b| sel(t, b).total_cmp(&sel(t, a)).then(a.cmp(&b)));
        let sum: f64 = order[..k].iter().map(|&e| probs[t * e_n + e]).sum();
        for j in 0..k {
            let e = order[j];
            expert_index[t * k + j] = e as u32;
            demand[e] += 1;
            let p = probs[t * e_n + e];
            weight[t * k + j] = if cfg.renormalize && sum > 0.0 { p / sum } else { p };
        }
    }
    let nominal = |f: f32| (f as f64 * (t_n * k) as f64 / e_n as f64).ceil() as usize;
    let max_demand = demand.iter().copied().max().unwrap_or(0);
    let capacity = match cfg.capacity {
        CapacityPolicy::Fixed { factor } => nominal(factor),
        CapacityPolicy::Dropless => max_demand,
        CapacityPolicy::CappedDynamic { max_factor } => max_demand.min(nominal(max_factor)),
    };
    let mut order: Vec<usize> = (0..t_n).collect();
    if cfg.drop_policy == DropPolicy::BatchPrioritized {
        order.sort_by(|&a, &b| {
            sel_prob(b, expert_index[b * k] as usize)
                .total_cmp(&sel_prob(a, expert_index[a * k] as usize))
                .then(a.cmp(&b))
        });
    }
    let mut fill = vec![0usize; e_n];
    let mut position = vec![None; t_n * k];
    for j in 0..k {
        for &t in &order {
            let e = expert_index[t * k + j] as usize;
            if fill[e] < capacity {
                position[t * k + j] = Some(fill[e] as u32);
                fill[e] += 1;
            }
        }
    }
    let mut aux_loss = 0.0;
    let mut z_loss = 0.0;
    if t_n > 0 {
        for e in 0..e_n {
            let f = demand[e] as f64 / (t_n * k) as f64;
            let pm: f64 = (0..t_n).map(|t| probs[t * e_n + e]).sum::<f64>() / t_n as f64;
            aux_loss += f * pm;
        }
        aux_loss *= cfg.aux_loss_weight as f64 * e_n as f64;
        z_loss = cfg.z_loss_weight as f64 * lse.iter().map(|v| v * v).sum::<f64>() / t_n as f64;
    }
    RefRouting { probs, expert_index, weight, position, capacity, aux_loss, z_loss }
}

/// f64 copies of expert weights.
#[derive(Debug, Clone, PartialEq)]
pub struct RefExpertParams {
    /// Form.
    pub activation: Activation,
    /// `E`
    pub experts: usize,
    /// `d`
    pub d: usize,
    /// `h`
    pub h: usize,
    /// `[E, d, in_width]`
    pub w_in: Vec<f64>,
    /// `[E, h]` or empty
    pub b_in: Vec<f64>,
    /// `[E, h, d]`
    pub w_out: Vec<f64>,
    /// `[E, d]` or empty
    pub b_out: Vec<f64>,
}

fn stored64(s: &Stored) -> Vec<f64> {
    to64(&s.to_f32_vec())
}

impl RefExpertParams {
    /// Widens the (possibly bf16) weights to f64.
    pub fn from_params(p: &ExpertParams) -> Self {
        Self {
            activation: p.activation,
            experts: p.experts,
            d: p.d_model,
            h: p.d_ffn,
            w_in: stored64(&p.w_in),
            b_in: to64(&p.b_in),
            w_out: stored64(&p.w_out),
            b_out: to64(&p.b_out),
        }
    }

    /// One token through expert `e`: returns `(y, pre, post)`.
    pub fn token_forward(&self, e: usize, x: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (d, h) = (self.d, self.h);
        let hin = self.activation.in_width(h);
        let mut pre = vec![0.0; hin];
        for (j, p) in pre.iter_mut().enumerate() {
            let mut s = if self.activation.has_bias() { self.b_in[e * h + j] } else { 0.0 };
            for i in 0..d {
                s += x[i] * self.w_in[(e * d + i) * hin + j];
            }
            *p = s;
        }
        let post: Vec<f64> = (0..h)
            .map(|j| match self.activation {
                Activation::Gelu => gelu64(pre[j]),
                Activation::SwiGlu => pre[j] * sigmoid64(pre[j]) * pre[h + j],
            })
            .collect();
        let mut y = vec![0.0; d];
        for (i, yi) in y.iter_mut().enumerate() {
            let mut s = if self.activation.has_bias() { self.b_out[e * d + i] } else { 0.0 };
            for j in 0..h {
                s += post[j] * self.w_out[(e * h + j) * d + i];
            }
            *yi = s;
        }
        (y, pre, post)
    }
}

/// Reference expert forward and backward results.
#[derive(Debug, Clone, PartialEq)]
pub struct RefExperts {
    /// `[N, d]`
    pub output: Vec<f64>,
    /// `[N, d]`
    pub d_input: Vec<f64>,
    /// `[E, d, in_width]`
    pub d_w_in: Vec<f64>,
    /// `[E, h]` or empty
    pub d_b_in: Vec<f64>,
    /// `[E, h, d]`
    pub d_w_out: Vec<f64>,
    /// `[E, d]` or empty
    pub d_b_out: Vec<f64>,
}

/// Grouped experts forward and backward, token by token.
pub fn experts(p: &ExpertParams, x: &[f32], offsets: &[usize], dy: &[f32]) -> RefExperts {
    let r = RefExpertParams::from_params(p);
    let (d, h) = (r.d, r.h);
    let hin = r.activation.in_width(h);
    let n = x.len() / d.max(1);
    let bias = r.activation.has_bias();
    let mut out = RefExperts {
        output: vec![0.0; n * d],
        d_input: vec![0.0; n * d],
        d_w_in: vec![0.0; r.experts * d * hin],
        d_b_in: vec![0.0; if bias { r.experts * h } else { 0 }],
        d_w_out: vec![0.0; r.experts * h * d],
        d_b_out: vec![0.0; if bias { r.experts * d } else { 0 }],
    };
    for e in 0..r.experts {
        for row in offsets[e]..offsets[e + 1] {
            let xr = to64(&x[row * d..(row + 1) * d]);
            let g = to64(&dy[row * d..(row + 1) * d]);
            let (y, pre, post) = r.token_forward(e, &xr);
            out.output[row * d..(row + 1) * d].copy_from_slice(&y);
            // backward
            let mut d_post = vec![0.0; h];
            for j in 0..h {
                for i in 0..d {
                    out.d_w_out[(e * h + j) * d + i] += post[j] * g[i];
                    d_post[j] += g[i] * r.w_out[(e * h + j) * d + i];
                }
            }
            if bias {
                for i in 0..d {
                    out.d_b_out[e * d + i] += g[i];
                }
            }
            let mut d_pre = vec![0.0; hin];
            for j in 0..h {
                match r.activation {
                    Activation::Gelu => d_pre[j] = d_post[j] * gelu_grad64(pre[j]),
                    Activation::SwiGlu => {
                        let s = sigmoid64(pre[j]);
                        d_pre[j] = d_post[j] * pre[h + j] * (s * (1.0 + pre[j] * (1.0 - s)));
                        d_pre[h + j] = d_post[j] * pre[j] * s;
                    }
                }
            }
            if bias {
                for j in 0..h {
                    out.d_b_in[e * h + j] += d_pre[j];
                }
            }
            for i in 0..d {
                for j in 0..hin {
                    out.d_w_in[(e * d + i) * hin + j] += xr[i] * d_pre[j];
                    out.d_input[row * d + i] += d_pre[j] * r.w_in[(e * d + i) * hin + j];
                }
            }
        }
    }
    out
}

/// A whole MoE layer in f64 (forward only; gradients come from finite differences).
#[derive(Debug, Clone, PartialEq)]
pub struct RefLayer {
    /// Router settings.
    pub gate: GateConfig,
    /// `[d, E]`
    pub gate_weight: Vec<f64>,
    /// `[E]`
    pub expert_bias: Option<Vec<f32>>,
    /// Experts.
    pub experts: RefExpertParams,
}

/// Reference layer output.
#[derive(Debug, Clone, PartialEq)]
pub struct RefForward {
    /// `[T, d]`
    pub output: Vec<f64>,
    /// Routing used.
    pub routing: RefRouting,
}

impl RefLayer {
    /// Widens a layer to f64.
    pub fn from_layer(layer: &MoeLayer) -> Self {
        Self {
            gate: layer.config.gate,
            gate_weight: to64(&layer.gate_weight),
            expert_bias: layer.expert_bias.clone(),
            experts: RefExpertParams::from_params(&layer.experts),
        }
    }

    /// Forward on `x: [T, d]`.
    pub fn forward(&self, x: &[f64], tokens: usize, selection_probs: Option<&[f32]>) -> RefForward {
        let d = self.experts.d;
        let e_n = self.experts.experts;
        let k = self.gate.top_k;
        let routing =
            route64(&self.gate, x, tokens, d, &self.gate_weight, e_n, self.expert_bias.as_deref(), selection_probs);
        let mut output = vec![0.0; tokens * d];
        for t in 0..tokens {
            for j in 0..k {
                let a = t * k + j;
                if routing.position[a].is_none() {
                    continue;
                }
                let e = routing.expert_index[a] as usize;
                let (y, _, _) = self.experts.token_forward(e, &x[t * d..(t + 1) * d]);
                for i in 0..d {
                    output[t * d + i] += routing.weight[a] * y[i];
                }
            }
        }
        RefForward { output, routing }
    }

    /// `sum(output * r) + aux_loss + z_loss`: the scalar whose gradient the layer's backward
    /// computes when given `d_output = r`.
    pub fn loss(&self, x: &[f64], tokens: usize, r: &[f64]) -> f64 {
        let f = self.forward(x, tokens, None);
        f.output.iter().zip(r).map(|(a, b)| a * b).sum::<f64>() + f.routing.aux_loss + f.routing.z_loss
    }
}
