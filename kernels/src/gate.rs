//! The router: gate logits, softmax, top-k, capacity, auxiliary losses, and its backward.
//!
//! Forward ([`route`]):
//! 1. `logits = x * Wg` (`x: [T, d]`, `Wg: [d, E]`), plus optional Gaussian noise
//!    (`N(0, noise_std^2)`, seeded by `noise_seed`); non-finite logits are an error.
//! 2. `probs = softmax(logits)` per token, in f32, max-subtracted (numerically stable).
//! 3. top-k per token on `probs + expert_bias` (the bias, for loss-free balancing, only
//!    changes *which* experts are selected; the combine weights use the unbiased probabilities).
//!    Ties go to the lower expert index; the k choices are ordered by descending score.
//! 4. combine weights `w[t, j] = probs[t, e_j]`, or `probs[t, e_j] / sum_j probs[t, e_j]` with
//!    `renormalize` (over the k selected experts, before any capacity dropping).
//! 5. capacity (see [`CapacityPolicy`]) and positions: choice rank first (all first choices are
//!    placed before any second choice, as GShard and Tutel), then token order, which is arrival
//!    order or, with [`DropPolicy::BatchPrioritized`], descending top-1 score (Tutel's
//!    batch-prioritised routing). An assignment beyond its expert's capacity is dropped.
//! 6. losses: the load-balancing loss `aux = aux_loss_weight * E * sum_e f_e * P_e`
//!    (Switch/GShard form; `f_e` = share of the `T*k` top-k assignments that chose `e`, before
//!    capacity; `P_e` = mean router probability of `e`), and the router z-loss
//!    `z = z_loss_weight * mean_t logsumexp(logits_t)^2`.
//!
//! Backward ([`route_backward`]) takes the gradient of the training loss with respect to the
//! combine weights and adds the gradients of `aux` and `z` (each enters the loss with weight 1:
//! their coefficients are the config's weights). Noise does not change the gradient.

use crate::error::{KernelError, Result, check_finite, check_len};
use crate::gemm::{Compute, Trans, sgemm};
use crate::random::{seeded_rng, standard_normal};
use crate::tensor::set_len;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How many tokens an expert may take.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CapacityPolicy {
    /// `capacity = ceil(factor * T * k / E)`; assignments beyond it are dropped.
    Fixed {
        /// The capacity factor (> 0).
        factor: f32,
    },
    /// No dropping: `capacity = max_e demand_e` (the largest need).
    Dropless,
    /// `capacity = min(max_e demand_e, ceil(max_factor * T * k / E))`: dropless up to a cap.
    CappedDynamic {
        /// The cap as a capacity factor (> 0).
        max_factor: f32,
    },
}

impl CapacityPolicy {
    /// The capacity for `tokens` tokens with `top_k` choices over `experts` experts whose
    /// demands (assignments before dropping) are `demand`.
    pub fn capacity(&self, tokens: usize, top_k: usize, experts: usize, demand: &[usize]) -> Result<usize> {
        let max_demand = demand.iter().copied().max().unwrap_or(0);
        let from_factor = |field: &'static str, factor: f32| -> Result<usize> {
            if !factor.is_finite() || factor <= 0.0 {
                return Err(KernelError::InvalidConfig {
                    field,
                    reason: format!("capacity factor must be finite and > 0, got {factor}"),
                });
            }
            let c = (factor as f64 * tokens as f64 * top_k as f64 / experts.max(1) as f64).ceil();
            Ok(if c >= usize::MAX as f64 { usize::MAX } else { c as usize })
        };
        match *self {
            CapacityPolicy::Fixed { factor } => from_factor("capacity factor", factor),
            CapacityPolicy::Dropless => Ok(max_demand),
            CapacityPolicy::CappedDynamic { max_factor } => {
                Ok(max_demand.min(from_factor("capacity max_factor", max_factor)?))
            }
        }
    }
}

/// Which assignments win when an expert is over capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Token order (first choices before second choices): later tokens are dropped.
    #[default]
    ArrivalOrder,
    /// Tokens with the highest top-1 score first (Tutel's batch-prioritised routing).
    BatchPrioritized,
}

/// Router settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GateConfig {
    /// Experts per token (1 <= k <= E).
    pub top_k: usize,
    /// Renormalise the k selected probabilities to sum to 1.
    pub renormalize: bool,
    /// Capacity policy.
    pub capacity: CapacityPolicy,
    /// Drop order when over capacity.
    pub drop_policy: DropPolicy,
    /// Coefficient of the load-balancing loss (0 disables it).
    pub aux_loss_weight: f32,
    /// Coefficient of the router z-loss (0 disables it).
    pub z_loss_weight: f32,
    /// Standard deviation of Gaussian noise added to the logits (0 disables it).
    pub noise_std: f32,
    /// Seed of the noise (vary it per step for training).
    pub noise_seed: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            top_k: 2,
            renormalize: false,
            capacity: CapacityPolicy::Fixed { factor: 1.25 },
            drop_policy: DropPolicy::ArrivalOrder,
            aux_loss_weight: 0.0,
            z_loss_weight: 0.0,
            noise_std: 0.0,
            noise_seed: 0,
        }
    }
}

impl GateConfig {
    /// Checks the settings for `experts` experts.
    pub fn validate(&self, experts: usize) -> Result<()> {
        if experts == 0 {
            return Err(KernelError::InvalidConfig { field: "experts", reason: "must be at least 1".into() });
        }
        if self.top_k == 0 || self.top_k > experts {
            return Err(KernelError::InvalidTopK { top_k: self.top_k, experts });
        }
        for (field, v) in [
            ("aux_loss_weight", self.aux_loss_weight),
            ("z_loss_weight", self.z_loss_weight),
            ("noise_std", self.noise_std),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(KernelError::InvalidConfig { field, reason: format!("must be finite and >= 0, got {v}") });
            }
        }
        // Validates the factor even when there are no tokens.
        self.capacity.capacity(1, self.top_k, experts, &[0])?;
        Ok(())
    }
}

/// The router's decisions for one batch, and what its backward needs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    /// Tokens `T`.
    pub tokens: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Choices per token `k`.
    pub top_k: usize,
    /// The capacity that was applied (tokens per expert).
    pub capacity: usize,
    /// Logits after noise, `[T, E]`.
    pub logits: Vec<f32>,
    /// Router probabilities, `[T, E]`.
    pub probs: Vec<f32>,
    /// `logsumexp` of each token's logits, `[T]`.
    pub logsumexp: Vec<f32>,
    /// Selected expert of assignment `t * k + j`, `[T * k]` (descending score per token).
    pub expert_index: Vec<u32>,
    /// Combine weight of assignment `t * k + j`, `[T * k]` (kept even if the assignment is dropped).
    pub weight: Vec<f32>,
    /// Position of assignment `t * k + j` in its expert's buffer, `None` when dropped.
    pub position: Vec<Option<u32>>,
    /// Assignments per expert before capacity, `[E]`.
    pub demand: Vec<usize>,
    /// Assignments per expert kept after capacity, `[E]` (each <= capacity).
    pub kept: Vec<usize>,
    /// Value of the load-balancing loss (already multiplied by its weight).
    pub aux_loss: f32,
    /// Value of the router z-loss (already multiplied by its weight).
    pub z_loss: f32,
}

impl Routing {
    /// Number of dropped assignments.
    pub fn dropped(&self) -> usize {
        self.position.iter().filter(|p| p.is_none()).count()
    }
}

/// Checks `x: [T, d]`, `gate_weight: [d, E]`, bias `[E]`.
fn check_inputs(
    x: &[f32],
    tokens: usize,
    d_model: usize,
    gate_weight: &[f32],
    experts: usize,
    expert_bias: Option<&[f32]>,
) -> Result<()> {
    check_len("x", &[tokens, d_model], x.len())?;
    check_len("gate_weight", &[d_model, experts], gate_weight.len())?;
    if let Some(b) = expert_bias {
        check_len("expert_bias", &[experts], b.len())?;
        check_finite("expert_bias", b)?;
    }
    Ok(())
}

/// Runs the router on `x: [T, d]` (row-major) with `gate_weight: [d, E]`.
///
/// `expert_bias` (`[E]`, loss-free balancing) shifts the selection scores only.
/// The result is written into `out` (its buffers are reused).
#[allow(clippy::too_many_arguments)]
pub fn route(
    cx: &Compute,
    cfg: &GateConfig,
    x: &[f32],
    tokens: usize,
    d_model: usize,
    gate_weight: &[f32],
    experts: usize,
    expert_bias: Option<&[f32]>,
    out: &mut Routing,
) -> Result<()> {
    cfg.validate(experts)?;
    check_inputs(x, tokens, d_model, gate_weight, experts, expert_bias)?;
    let k = cfg.top_k;
    let (t_n, e_n) = (tokens, experts);
    out.tokens = t_n;
    out.experts = e_n;
    out.top_k = k;

    // 1. logits
    set_len(&mut out.logits, t_n * e_n);
    sgemm(cx, Trans::No, Trans::No, t_n, e_n, d_model, x, d_model, gate_weight, e_n, &mut out.logits, e_n, false)?;
    if cfg.noise_std > 0.0 {
        let mut rng = seeded_rng(cfg.noise_seed);
        for l in out.logits.iter_mut() {
            *l += (standard_normal(&mut rng) * cfg.noise_std as f64) as f32;
        }
    }
    check_finite("gate logits", &out.logits)?;

    // 2.-4. softmax, top-k, weights: independent per token.
    set_len(&mut out.probs, t_n * e_n);
    set_len(&mut out.logsumexp, t_n);
    out.expert_index.clear();
    out.expert_index.resize(t_n * k, 0);
    set_len(&mut out.weight, t_n * k);
    if t_n > 0 {
        out.logits
            .par_chunks(e_n)
            .zip(out.probs.par_chunks_mut(e_n))
            .zip(out.logsumexp.par_iter_mut())
            .zip(out.expert_index.par_chunks_mut(k))
            .zip(out.weight.par_chunks_mut(k))
            .with_min_len(64)
            .for_each(|((((l, p), lse), idx), w)| {
                *lse = softmax_row(l, p);
                top_k_row(p, expert_bias, idx);
                let mut sum = 0.0f32;
                for (wj, &e) in w.iter_mut().zip(idx.iter()) {
                    *wj = p[e as usize];
                    sum += *wj;
                }
                if cfg.renormalize && sum > 0.0 {
                    for wj in w.iter_mut() {
                        *wj /= sum;
                    }
                }
            });
    }

    // 5. capacity and positions
    out.demand.clear();
    out.demand.resize(e_n, 0);
    for &e in &out.expert_index {
        out.demand[e as usize] += 1;
    }
    let capacity = cfg.capacity.capacity(t_n, k, e_n, &out.demand)?;
    out.capacity = capacity;
    let order: Vec<usize> = match cfg.drop_policy {
        DropPolicy::ArrivalOrder => (0..t_n).collect(),
        DropPolicy::BatchPrioritized => {
            let mut o: Vec<usize> = (0..t_n).collect();
            // Highest top-1 probability first; ties keep token order (stable sort).
            o.sort_by(|&a, &b| {
                let pa = out.probs[a * e_n + out.expert_index[a * k] as usize];
                let pb = out.probs[b * e_n + out.expert_index[b * k] as usize];
                pb.total_cmp(&pa)
            });
            o
        }
    };
    out.kept.clear();
    out.kept.resize(e_n, 0);
    out.position.clear();
    out.position.resize(t_n * k, None);
    for j in 0..k {
        for &t in &order {
            let a = t * k + j;
            let e = out.expert_index[a] as usize;
            if out.kept[e] < capacity {
                // Positions are < capacity <= T * k, which fits u32 for any realistic batch;
                // `try_from` keeps an absurd one an error rather than a wrap.
                let pos = u32::try_from(out.kept[e]).map_err(|_| KernelError::InvalidConfig {
                    field: "tokens",
                    reason: "more than u32::MAX assignments per expert".into(),
                })?;
                out.position[a] = Some(pos);
                out.kept[e] += 1;
            }
        }
    }

    // 6. losses
    out.aux_loss = 0.0;
    out.z_loss = 0.0;
    if t_n > 0 && cfg.aux_loss_weight > 0.0 {
        let mean_p = column_means(&out.probs, t_n, e_n);
        let mut s = 0.0f64;
        for (&demand, &p) in out.demand.iter().zip(&mean_p) {
            s += demand as f64 / (t_n * k) as f64 * p;
        }
        out.aux_loss = (cfg.aux_loss_weight as f64 * e_n as f64 * s) as f32;
    }
    if t_n > 0 && cfg.z_loss_weight > 0.0 {
        let s: f64 = out.logsumexp.iter().map(|&v| (v as f64) * (v as f64)).sum();
        out.z_loss = (cfg.z_loss_weight as f64 * s / t_n as f64) as f32;
    }
    Ok(())
}

/// Column means of a `[rows, cols]` matrix, accumulated in f64 in row order.
fn column_means(m: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    let mut s = vec![0.0f64; cols];
    for r in m.chunks(cols) {
        for (acc, &v) in s.iter_mut().zip(r) {
            *acc += v as f64;
        }
    }
    for v in &mut s {
        *v /= rows.max(1) as f64;
    }
    s
}

/// Stable softmax of one row into `p`; returns `logsumexp(l)`.
pub fn softmax_row(l: &[f32], p: &mut [f32]) -> f32 {
    let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0f32;
    for (pi, &li) in p.iter_mut().zip(l) {
        *pi = (li - m).exp();
        s += *pi;
    }
    let inv = 1.0 / s;
    for pi in p.iter_mut() {
        *pi *= inv;
    }
    m + s.ln()
}

/// Indices of the `idx.len()` largest `p[e] + bias[e]`, descending, ties to the lower index.
fn top_k_row(p: &[f32], bias: Option<&[f32]>, idx: &mut [u32]) {
    let k = idx.len();
    let score = |e: usize| p[e] + bias.map_or(0.0, |b| b[e]);
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for e in 0..p.len() {
        let s = score(e);
        if best.len() == k && best.last().is_some_and(|&(bs, _)| s <= bs) {
            continue;
        }
        // Insert after all entries with score >= s (stable: earlier index wins ties).
        let at = best.partition_point(|&(bs, _)| bs >= s);
        best.insert(at, (s, e as u32));
        best.truncate(k);
    }
    for (slot, &(_, e)) in idx.iter_mut().zip(&best) {
        *slot = e;
    }
}

/// Gradients of the router.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GateGrads {
    /// Gradient of the loss with respect to the logits, `[T, E]`.
    pub d_logits: Vec<f32>,
    /// Gradient with respect to the gate weight, `[d, E]`.
    pub d_gate_weight: Vec<f32>,
}

/// Backward of [`route`].
///
/// `d_weight` (`[T * k]`) is the gradient of the loss with respect to the combine weights
/// (zero for dropped assignments). Writes `grads.d_logits` and `grads.d_gate_weight`
/// (overwritten) and *adds* the input gradient `d_logits * Wg^T` into `d_x` (`[T, d]`).
#[allow(clippy::too_many_arguments)]
pub fn route_backward(
    cx: &Compute,
    cfg: &GateConfig,
    routing: &Routing,
    x: &[f32],
    d_model: usize,
    gate_weight: &[f32],
    d_weight: &[f32],
    grads: &mut GateGrads,
    d_x: &mut [f32],
) -> Result<()> {
    let (t_n, e_n, k) = (routing.tokens, routing.experts, routing.top_k);
    check_len("x", &[t_n, d_model], x.len())?;
    check_len("gate_weight", &[d_model, e_n], gate_weight.len())?;
    check_len("d_weight", &[t_n, k], d_weight.len())?;
    check_len("d_x", &[t_n, d_model], d_x.len())?;
    check_len("routing.probs", &[t_n, e_n], routing.probs.len())?;
    check_len("routing.expert_index", &[t_n, k], routing.expert_index.len())?;
    check_len("routing.logsumexp", &[t_n], routing.logsumexp.len())?;
    if routing.expert_index.iter().any(|&e| e as usize >= e_n) {
        return Err(KernelError::InvalidConfig {
            field: "routing.expert_index",
            reason: format!("expert index out of range 0..{e_n}"),
        });
    }

    // Per-expert constant of the aux-loss gradient: weight * E * f_e / T.
    let aux_coef: Vec<f32> = if cfg.aux_loss_weight > 0.0 && t_n > 0 {
        (0..e_n)
            .map(|e| {
                let f = routing.demand.get(e).copied().unwrap_or(0) as f64 / (t_n * k) as f64;
                (cfg.aux_loss_weight as f64 * e_n as f64 * f / t_n as f64) as f32
            })
            .collect()
    } else {
        vec![0.0; e_n]
    };
    let z_coef = if t_n > 0 { 2.0 * cfg.z_loss_weight / t_n as f32 } else { 0.0 };

    set_len(&mut grads.d_logits, t_n * e_n);
    if t_n > 0 {
        grads
            .d_logits
            .par_chunks_mut(e_n)
            .zip(routing.probs.par_chunks(e_n))
            .zip(routing.expert_index.par_chunks(k))
            .zip(d_weight.par_chunks(k))
            .zip(routing.logsumexp.par_iter())
            .with_min_len(64)
            .for_each(|((((dl, p), idx), dw), &lse)| {
                // dl first holds d loss / d probs.
                dl.copy_from_slice(&aux_coef);
                let sum_sel: f32 = idx.iter().map(|&e| p[e as usize]).sum();
                if cfg.renormalize && sum_sel > 0.0 {
                    // w_j = p_j / S  =>  dp_j = (dw_j - sum_i dw_i w_i) / S
                    let dot: f32 = idx.iter().zip(dw).map(|(&e, &g)| g * p[e as usize] / sum_sel).sum();
                    for (&e, &g) in idx.iter().zip(dw) {
                        dl[e as usize] += (g - dot) / sum_sel;
                    }
                } else {
                    for (&e, &g) in idx.iter().zip(dw) {
                        dl[e as usize] += g;
                    }
                }
                // softmax backward, then the z-loss term.
                let dot: f32 = dl.iter().zip(p).map(|(&g, &pi)| g * pi).sum();
                for (g, &pi) in dl.iter_mut().zip(p) {
                    *g = pi * (*g - dot) + z_coef * lse * pi;
                }
            });
    }

    // d_gate_weight = x^T d_logits ; d_x += d_logits Wg^T
    set_len(&mut grads.d_gate_weight, d_model * e_n);
    sgemm(
        cx,
        Trans::Yes,
        Trans::No,
        d_model,
        e_n,
        t_n,
        x,
        d_model,
        &grads.d_logits,
        e_n,
        &mut grads.d_gate_weight,
        e_n,
        false,
    )?;
    sgemm(cx, Trans::No, Trans::Yes, t_n, d_model, e_n, &grads.d_logits, e_n, gate_weight, e_n, d_x, d_model, true)?;
    Ok(())
}

/// Loss-free balancing (DeepSeek-V3): moves each expert's bias by `rate` towards the mean
/// load (`bias_e += rate * sign(mean_load - load_e)`).
pub fn update_balance_bias(bias: &mut [f32], load: &[usize], rate: f32) -> Result<()> {
    check_len("load", &[bias.len()], load.len())?;
    if load.is_empty() {
        return Ok(());
    }
    let mean = load.iter().sum::<usize>() as f64 / load.len() as f64;
    for (b, &l) in bias.iter_mut().zip(load) {
        let l = l as f64;
        if l < mean {
            *b += rate;
        } else if l > mean {
            *b -= rate;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use crate::testutil::{config, max_rel_err, normal_vec, rng};
    use proptest::prelude::*;

    fn policy(sel: u8, factor: f32) -> CapacityPolicy {
        match sel % 3 {
            0 => CapacityPolicy::Fixed { factor },
            1 => CapacityPolicy::Dropless,
            _ => CapacityPolicy::CappedDynamic { max_factor: factor },
        }
    }

    proptest! {
        #![proptest_config(config(32))]
        /// Routing equals the f64 reference: probabilities, choices, weights, positions, losses.
        #[test]
        fn route_matches_reference(
            tokens in prop_oneof![Just(0usize), Just(1usize), 0usize..2000],
            experts in 1usize..64,
            k_frac in 0.0f64..1.0,
            d in 1usize..6,
            sel in any::<u8>(),
            factor in 0.1f32..2.0,
            bpr in any::<bool>(),
            renorm in any::<bool>(),
            use_bias in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let k = 1 + ((experts as f64 * k_frac) as usize).min(experts - 1);
            let mut r = rng(seed);
            let x = normal_vec(&mut r, tokens * d, 1.0);
            let wg = normal_vec(&mut r, d * experts, 1.0);
            let bias = normal_vec(&mut r, experts, 0.05);
            let cfg = GateConfig {
                top_k: k,
                renormalize: renorm,
                capacity: policy(sel, factor),
                drop_policy: if bpr { DropPolicy::BatchPrioritized } else { DropPolicy::ArrivalOrder },
                aux_loss_weight: 0.01,
                z_loss_weight: 0.001,
                noise_std: 0.0,
                noise_seed: 0,
            };
            let cx = Compute::new(1);
            let bias_ref = if use_bias { Some(&bias[..]) } else { None };
            let mut out = Routing::default();
            route(&cx, &cfg, &x, tokens, d, &wg, experts, bias_ref, &mut out).unwrap();
            let want = reference::route(&cfg, &x, tokens, d, &wg, experts, bias_ref, Some(&out.probs));
            prop_assert!(max_rel_err(&out.probs, &want.probs, 1e-6) < 1e-4);
            prop_assert_eq!(&out.expert_index, &want.expert_index);
            prop_assert!(max_rel_err(&out.weight, &want.weight, 1e-6) < 1e-4);
            prop_assert_eq!(&out.position, &want.position);
            prop_assert_eq!(out.capacity, want.capacity);
            prop_assert!(((out.aux_loss as f64) - want.aux_loss).abs() <= 1e-4 * (1e-6 + want.aux_loss.abs()));
            prop_assert!(((out.z_loss as f64) - want.z_loss).abs() <= 1e-4 * (1e-6 + want.z_loss.abs()));
            for e in 0..experts {
                prop_assert!(out.kept[e] <= out.capacity);
            }
            if matches!(cfg.capacity, CapacityPolicy::Dropless) {
                prop_assert_eq!(out.dropped(), 0);
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let cx = Compute::new(1);
        let mut out = Routing::default();
        let cfg = GateConfig { top_k: 3, ..GateConfig::default() };
        let x = vec![0.5f32; 4 * 2];
        let wg = vec![0.1f32; 2 * 2];
        assert!(matches!(
            route(&cx, &cfg, &x, 4, 2, &wg, 2, None, &mut out),
            Err(KernelError::InvalidTopK { top_k: 3, experts: 2 })
        ));
        let cfg = GateConfig::default();
        assert!(matches!(
            route(&cx, &cfg, &x, 4, 2, &wg[..3], 2, None, &mut out),
            Err(KernelError::ShapeMismatch { operand: "gate_weight", .. })
        ));
        let mut xn = x.clone();
        xn[3] = f32::NAN;
        assert!(matches!(
            route(&cx, &cfg, &xn, 4, 2, &wg, 2, None, &mut out),
            Err(KernelError::NonFinite { operand: "gate logits", .. })
        ));
        let cfg = GateConfig { capacity: CapacityPolicy::Fixed { factor: f32::NAN }, ..GateConfig::default() };
        assert!(matches!(route(&cx, &cfg, &x, 4, 2, &wg, 2, None, &mut out), Err(KernelError::InvalidConfig { .. })));
    }

    #[test]
    fn softmax_is_stable_for_large_logits() {
        let l = [1000.0f32, 999.0, -1000.0];
        let mut p = [0.0f32; 3];
        let lse = softmax_row(&l, &mut p);
        assert!(p.iter().all(|v| v.is_finite()));
        assert!((p[0] - 0.7310586).abs() < 1e-6);
        assert!((lse - 1000.3133).abs() < 1e-3);
    }

    #[test]
    fn noise_is_reproducible() {
        let cx = Compute::new(1);
        let mut r = rng(7);
        let x = normal_vec(&mut r, 50 * 4, 1.0);
        let wg = normal_vec(&mut r, 4 * 8, 1.0);
        let cfg = GateConfig { noise_std: 0.5, noise_seed: 42, ..GateConfig::default() };
        let (mut a, mut b) = (Routing::default(), Routing::default());
        route(&cx, &cfg, &x, 50, 4, &wg, 8, None, &mut a).unwrap();
        route(&cx, &cfg, &x, 50, 4, &wg, 8, None, &mut b).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn balance_bias_moves_towards_mean() {
        let mut b = vec![0.0f32; 3];
        update_balance_bias(&mut b, &[10, 20, 30], 0.1).unwrap();
        assert_eq!(b, vec![0.1, 0.0, -0.1]);
        assert!(update_balance_bias(&mut b, &[1], 0.1).is_err());
    }
}
