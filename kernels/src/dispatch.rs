//! Dispatch and combine: index maps between tokens and per-expert contiguous buffers.
//!
//! The grouped buffer holds the kept assignments of expert 0, then expert 1, ... with no
//! padding: expert `e` owns rows `offsets[e]..offsets[e + 1]`, and the assignment at position
//! `p` of expert `e` is row `offsets[e] + p`.
//!
//! * [`gather`]: `buf[row] = x[token(row)]`.
//! * [`combine`]: `out[t] = sum_j w[t, j] * y[row(t, j)]` over the kept assignments of `t`.
//! * [`combine_backward`]: `d_y[row] = w * d_out[token]`, `d_w[t, j] = d_out[t] . y[row(t, j)]`.
//! * [`gather_backward`]: `d_x[t] += sum_j d_buf[row(t, j)]`.
//!
//! Every direction is parallel over rows or tokens with no write conflicts (no atomics, and the
//! summation order is fixed, so results do not depend on the thread count).

use crate::error::{KernelError, Result, check_len};
use crate::gate::Routing;
use crate::tensor::set_len;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Rows per rayon task for row-wise copies.
const MIN_ROWS: usize = 16;

/// Token <-> (expert, position) maps of one routed batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DispatchPlan {
    /// Tokens `T`.
    pub tokens: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Choices per token `k`.
    pub top_k: usize,
    /// Row ranges of the experts in the grouped buffer, `[E + 1]`.
    pub offsets: Vec<usize>,
    /// Token of each grouped row, `[N]`.
    pub row_token: Vec<u32>,
    /// Assignment (`t * k + j`) of each grouped row, `[N]`.
    pub row_assignment: Vec<u32>,
    /// Grouped row of each assignment, `None` when dropped, `[T * k]`.
    pub assignment_row: Vec<Option<u32>>,
}

impl DispatchPlan {
    /// Builds the maps from a routing.
    pub fn from_routing(routing: &Routing) -> Result<Self> {
        let mut plan = Self::default();
        plan.rebuild(routing)?;
        Ok(plan)
    }

    /// Rebuilds the maps in place (reusing the allocations).
    pub fn rebuild(&mut self, routing: &Routing) -> Result<()> {
        let (t_n, e_n, k) = (routing.tokens, routing.experts, routing.top_k);
        check_len("routing.expert_index", &[t_n, k], routing.expert_index.len())?;
        check_len("routing.position", &[t_n, k], routing.position.len())?;
        check_len("routing.kept", &[e_n], routing.kept.len())?;
        self.tokens = t_n;
        self.experts = e_n;
        self.top_k = k;
        self.offsets.clear();
        self.offsets.push(0);
        let mut acc = 0usize;
        for &c in &routing.kept {
            acc += c;
            self.offsets.push(acc);
        }
        let n = acc;
        let too_big = || KernelError::InvalidConfig { field: "tokens", reason: "more than u32::MAX rows".into() };
        if n > u32::MAX as usize || t_n.checked_mul(k).is_none_or(|a| a > u32::MAX as usize) {
            return Err(too_big());
        }
        self.row_token.clear();
        self.row_token.resize(n, u32::MAX);
        self.row_assignment.clear();
        self.row_assignment.resize(n, u32::MAX);
        self.assignment_row.clear();
        self.assignment_row.resize(t_n * k, None);
        for (a, (&e, &pos)) in routing.expert_index.iter().zip(&routing.position).enumerate() {
            let Some(pos) = pos else { continue };
            let e = e as usize;
            if e >= e_n || pos as usize >= routing.kept[e] {
                return Err(KernelError::InvalidConfig {
                    field: "routing.position",
                    reason: format!("assignment {a}: expert {e} position {pos} out of range"),
                });
            }
            let row = self.offsets[e] + pos as usize;
            if self.row_token[row] != u32::MAX {
                return Err(KernelError::InvalidConfig {
                    field: "routing.position",
                    reason: format!("two assignments at expert {e} position {pos}"),
                });
            }
            self.row_token[row] = (a / k) as u32;
            self.row_assignment[row] = a as u32;
            self.assignment_row[a] = Some(row as u32);
        }
        Ok(())
    }

    /// Checks that the maps are consistent (every index in range), so that the kernels below
    /// cannot index out of bounds even for a plan built by hand. Linear in `N + T * k`.
    pub fn validate(&self) -> Result<()> {
        let (t_n, k, n) = (self.tokens, self.top_k, self.row_token.len());
        let bad = |reason: String| KernelError::InvalidConfig { field: "dispatch plan", reason };
        check_len("plan.offsets", &[self.experts + 1], self.offsets.len())?;
        check_len("plan.row_assignment", &[n], self.row_assignment.len())?;
        check_len("plan.assignment_row", &[t_n, k], self.assignment_row.len())?;
        if self.offsets.first() != Some(&0)
            || self.offsets.last() != Some(&n)
            || self.offsets.windows(2).any(|w| w[0] > w[1])
        {
            return Err(bad(format!("offsets must rise from 0 to {n}")));
        }
        if self.row_token.iter().any(|&t| t as usize >= t_n) {
            return Err(bad("row token out of range".into()));
        }
        if k == 0 && n > 0 {
            return Err(bad("rows without assignments".into()));
        }
        if self
            .row_assignment
            .iter()
            .zip(&self.row_token)
            .any(|(&a, &t)| a as usize >= t_n * k || a as usize / k != t as usize)
        {
            return Err(bad("row assignment out of range or not of the row's token".into()));
        }
        if self.assignment_row.iter().flatten().any(|&r| r as usize >= n) {
            return Err(bad("assignment row out of range".into()));
        }
        Ok(())
    }

    /// Rows of the grouped buffer (kept assignments) `N`.
    pub fn rows(&self) -> usize {
        self.row_token.len()
    }

    /// Rows of each expert, `[E]`.
    pub fn counts(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| w[1] - w[0]).collect()
    }
}

/// Copies `x[token(row)]` (`x: [T, d]`) into `buf: [N, d]` (resized).
pub fn gather(plan: &DispatchPlan, x: &[f32], d: usize, buf: &mut Vec<f32>) -> Result<()> {
    plan.validate()?;
    check_len("x", &[plan.tokens, d], x.len())?;
    set_len(buf, plan.rows() * d);
    if d == 0 {
        return Ok(());
    }
    buf.par_chunks_mut(d).zip(plan.row_token.par_iter()).with_min_len(MIN_ROWS).for_each(|(dst, &t)| {
        let t = t as usize;
        dst.copy_from_slice(&x[t * d..(t + 1) * d]);
    });
    Ok(())
}

/// `out[t] = sum_j weight[t, j] * y[row(t, j)]` (`y: [N, d]`, `out: [T, d]`, overwritten;
/// a token with every assignment dropped gets zeros).
pub fn combine(plan: &DispatchPlan, weight: &[f32], y: &[f32], d: usize, out: &mut [f32]) -> Result<()> {
    plan.validate()?;
    let (t_n, k) = (plan.tokens, plan.top_k);
    check_len("combine weight", &[t_n, k], weight.len())?;
    check_len("expert output", &[plan.rows(), d], y.len())?;
    check_len("output", &[t_n, d], out.len())?;
    if d == 0 {
        return Ok(());
    }
    out.par_chunks_mut(d)
        .zip(plan.assignment_row.par_chunks(k.max(1)))
        .zip(weight.par_chunks(k.max(1)))
        .with_min_len(MIN_ROWS)
        .for_each(|((o, rows), w)| {
            o.fill(0.0);
            for (&row, &wj) in rows.iter().zip(w) {
                if let Some(r) = row {
                    let r = r as usize;
                    for (oi, &yi) in o.iter_mut().zip(&y[r * d..(r + 1) * d]) {
                        *oi += wj * yi;
                    }
                }
            }
        });
    Ok(())
}

/// Backward of [`combine`]: `d_y[row] = weight * d_out[token]` (`[N, d]`, resized) and
/// `d_weight[t, j] = d_out[t] . y[row(t, j)]` (`[T * k]`, resized; zero when dropped).
pub fn combine_backward(
    plan: &DispatchPlan,
    weight: &[f32],
    y: &[f32],
    d: usize,
    d_out: &[f32],
    d_y: &mut Vec<f32>,
    d_weight: &mut Vec<f32>,
) -> Result<()> {
    plan.validate()?;
    let (t_n, k) = (plan.tokens, plan.top_k);
    check_len("combine weight", &[t_n, k], weight.len())?;
    check_len("expert output", &[plan.rows(), d], y.len())?;
    check_len("d_output", &[t_n, d], d_out.len())?;
    set_len(d_y, plan.rows() * d);
    set_len(d_weight, t_n * k);
    if d > 0 {
        d_y.par_chunks_mut(d).zip(plan.row_assignment.par_iter()).with_min_len(MIN_ROWS).for_each(|(dst, &a)| {
            let a = a as usize;
            let t = a / k;
            let w = weight[a];
            for (di, &g) in dst.iter_mut().zip(&d_out[t * d..(t + 1) * d]) {
                *di = w * g;
            }
        });
    }
    if k > 0 {
        d_weight.par_chunks_mut(k).zip(plan.assignment_row.par_chunks(k)).enumerate().with_min_len(MIN_ROWS).for_each(
            |(t, (dw, rows))| {
                let g = &d_out[t * d..(t + 1) * d];
                for (dwj, &row) in dw.iter_mut().zip(rows) {
                    *dwj = match row {
                        Some(r) => {
                            let r = r as usize;
                            dot(g, &y[r * d..(r + 1) * d])
                        }
                        None => 0.0,
                    };
                }
            },
        );
    }
    Ok(())
}

/// Backward of [`gather`]: `d_x[t] += sum_j d_buf[row(t, j)]` (`d_buf: [N, d]`,
/// `d_x: [T, d]`); with `accumulate == false`, `d_x` is overwritten instead.
pub fn gather_backward(plan: &DispatchPlan, d_buf: &[f32], d: usize, d_x: &mut [f32], accumulate: bool) -> Result<()> {
    plan.validate()?;
    let (t_n, k) = (plan.tokens, plan.top_k);
    check_len("d_dispatched", &[plan.rows(), d], d_buf.len())?;
    check_len("d_x", &[t_n, d], d_x.len())?;
    if d == 0 {
        return Ok(());
    }
    d_x.par_chunks_mut(d).zip(plan.assignment_row.par_chunks(k.max(1))).with_min_len(MIN_ROWS).for_each(
        |(dx, rows)| {
            if !accumulate {
                dx.fill(0.0);
            }
            for &row in rows {
                if let Some(r) = row {
                    let r = r as usize;
                    for (o, &g) in dx.iter_mut().zip(&d_buf[r * d..(r + 1) * d]) {
                        *o += g;
                    }
                }
            }
        },
    );
    Ok(())
}

/// Dot product with 8 independent accumulators (vectorises; fixed order).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(test)]
#[allow(clippy::needless_range_loop)] // index loops keep the naive reference readable
mod tests {
    use super::*;
    use crate::gate::{CapacityPolicy, DropPolicy, GateConfig, route};
    use crate::gemm::Compute;
    use crate::testutil::{config, normal_vec, rng};
    use proptest::prelude::*;

    fn routed(tokens: usize, experts: usize, k: usize, factor: f32, seed: u64) -> (Routing, Vec<f32>) {
        let mut r = rng(seed);
        let d = 3;
        let x = normal_vec(&mut r, tokens * d, 1.0);
        let wg = normal_vec(&mut r, d * experts, 1.0);
        let cfg = GateConfig {
            top_k: k,
            capacity: CapacityPolicy::Fixed { factor },
            drop_policy: DropPolicy::ArrivalOrder,
            ..GateConfig::default()
        };
        let mut out = Routing::default();
        route(&Compute::new(1), &cfg, &x, tokens, d, &wg, experts, None, &mut out).unwrap();
        (out, x)
    }

    proptest! {
        #![proptest_config(config(32))]
        /// gather/combine and their backward against naive f64 loops over assignments.
        #[test]
        fn dispatch_combine_match_naive(
            tokens in prop_oneof![Just(0usize), Just(1usize), 0usize..2000],
            experts in 1usize..64,
            k_frac in 0.0f64..1.0,
            factor in 0.1f32..1.5,
            d in 1usize..5,
            seed in any::<u64>(),
        ) {
            let k = 1 + ((experts as f64 * k_frac) as usize).min(experts - 1);
            let (routing, _) = routed(tokens, experts, k, factor, seed);
            let plan = DispatchPlan::from_routing(&routing).unwrap();
            let mut r = rng(seed ^ 1);
            let x = normal_vec(&mut r, tokens * d, 1.0);
            let n = plan.rows();
            prop_assert_eq!(n, routing.kept.iter().sum::<usize>());
            let y = normal_vec(&mut r, n * d, 1.0);
            let g = normal_vec(&mut r, tokens * d, 1.0);

            let mut buf = Vec::new();
            gather(&plan, &x, d, &mut buf).unwrap();
            let mut out = vec![0.0f32; tokens * d];
            combine(&plan, &routing.weight, &y, d, &mut out).unwrap();
            let mut dy = Vec::new();
            let mut dw = Vec::new();
            combine_backward(&plan, &routing.weight, &y, d, &g, &mut dy, &mut dw).unwrap();
            let mut dx = vec![0.0f32; tokens * d];
            gather_backward(&plan, &buf, d, &mut dx, false).unwrap();

            let mut out_ref = vec![0.0f64; tokens * d];
            let mut dx_ref = vec![0.0f64; tokens * d];
            for a in 0..tokens * k {
                let t = a / k;
                let e = routing.expert_index[a] as usize;
                let Some(p) = routing.position[a] else {
                    prop_assert_eq!(dw[a], 0.0);
                    continue;
                };
                let row = plan.offsets[e] + p as usize;
                let w = routing.weight[a] as f64;
                let mut dot_ref = 0.0f64;
                for i in 0..d {
                    prop_assert_eq!(buf[row * d + i], x[t * d + i]);
                    out_ref[t * d + i] += w * y[row * d + i] as f64;
                    dot_ref += g[t * d + i] as f64 * y[row * d + i] as f64;
                    prop_assert!((dy[row * d + i] as f64 - w * g[t * d + i] as f64).abs() < 1e-6);
                    dx_ref[t * d + i] += x[t * d + i] as f64;
                }
                prop_assert!((dw[a] as f64 - dot_ref).abs() < 1e-5 * (1.0 + dot_ref.abs()));
            }
            for i in 0..tokens * d {
                prop_assert!((out[i] as f64 - out_ref[i]).abs() < 1e-5 * (1.0 + out_ref[i].abs()));
                prop_assert!((dx[i] as f64 - dx_ref[i]).abs() < 1e-5 * (1.0 + dx_ref[i].abs()));
            }
        }
    }

    #[test]
    fn shape_errors() {
        let (routing, x) = routed(10, 4, 2, 1.0, 3);
        let plan = DispatchPlan::from_routing(&routing).unwrap();
        let mut buf = Vec::new();
        assert!(matches!(gather(&plan, &x[..5], 3, &mut buf), Err(KernelError::ShapeMismatch { operand: "x", .. })));
        let mut out = vec![0.0; 29];
        assert!(combine(&plan, &routing.weight, &[], 3, &mut out).is_err());
    }
}
