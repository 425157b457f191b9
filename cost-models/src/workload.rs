//! Routing load: how many token-expert assignments each source rank sends to each logical expert of one MoE
//! layer in one iteration (a [`LoadMatrix`]), and the expected per-expert load shapes the planner prices plans
//! under (a [`Workload`]).

use serde::{Deserialize, Serialize};

/// Tokens sent from each source rank to each logical expert of one MoE layer in one iteration (or micro-batch).
/// Row-major: `counts[rank * experts + expert]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadMatrix {
    /// Source ranks (rows).
    pub ranks: usize,
    /// Logical experts (columns).
    pub experts: usize,
    /// Token-expert assignments, row-major.
    pub counts: Vec<u64>,
}

/// A load matrix whose shape does not match its data or its use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("load matrix shape mismatch: {0}")]
pub struct ShapeError(pub String);

impl LoadMatrix {
    /// An all-zero matrix.
    pub fn zeros(ranks: usize, experts: usize) -> Self {
        LoadMatrix { ranks, experts, counts: vec![0; ranks * experts] }
    }

    /// Builds a matrix from rows (one per source rank); every row must have the same length.
    pub fn from_rows(rows: &[Vec<u64>]) -> Result<Self, ShapeError> {
        let experts = rows.first().map_or(0, |r| r.len());
        if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != experts) {
            return Err(ShapeError(format!("row {i} has {} experts, row 0 has {experts}", r.len())));
        }
        Ok(LoadMatrix { ranks: rows.len(), experts, counts: rows.concat() })
    }

    /// Assignments from `rank` to `expert`.
    pub fn get(&self, rank: usize, expert: usize) -> u64 {
        self.counts[rank * self.experts + expert]
    }

    /// One source rank's row.
    pub fn row(&self, rank: usize) -> &[u64] {
        &self.counts[rank * self.experts..(rank + 1) * self.experts]
    }

    /// Per-expert load: the column sums.
    pub fn expert_loads(&self) -> Vec<u64> {
        let mut loads = vec![0u64; self.experts];
        for r in 0..self.ranks {
            for (l, c) in loads.iter_mut().zip(self.row(r)) {
                *l += c;
            }
        }
        loads
    }

    /// All assignments.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds another matrix of the same shape (e.g. micro-batches of one iteration).
    pub fn add(&mut self, other: &LoadMatrix) -> Result<(), ShapeError> {
        if other.ranks != self.ranks || other.experts != self.experts {
            return Err(ShapeError(format!(
                "cannot add a {}x{} matrix to a {}x{} one",
                other.ranks, other.experts, self.ranks, self.experts
            )));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        Ok(())
    }

    /// A matrix where every rank sends `per_rank` assignments spread as `fractions` (which sum to 1) over the
    /// experts, rounded so that each row sums exactly to `per_rank`.
    pub fn from_fractions(ranks: usize, fractions: &[f64], per_rank: u64) -> Self {
        let row = apportion(fractions, per_rank);
        LoadMatrix { ranks, experts: fractions.len(), counts: (0..ranks).flat_map(|_| row.iter().copied()).collect() }
    }
}

/// Splits `total` into integers proportional to `weights` (largest-remainder method); sums exactly to `total`
/// when the weights have a positive sum, otherwise spreads evenly.
pub fn apportion(weights: &[f64], total: u64) -> Vec<u64> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let sum: f64 = weights.iter().filter(|w| w.is_finite() && **w > 0.0).sum();
    let w: Vec<f64> = if sum > 0.0 {
        weights.iter().map(|&x| if x.is_finite() && x > 0.0 { x / sum } else { 0.0 }).collect()
    } else {
        vec![1.0 / n as f64; n]
    };
    let exact: Vec<f64> = w.iter().map(|x| x * total as f64).collect();
    let mut out: Vec<u64> = exact.iter().map(|x| x.floor() as u64).collect();
    let assigned: u64 = out.iter().sum();
    let mut rest: Vec<usize> = (0..n).collect();
    rest.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())).then(a.cmp(&b)));
    for &i in rest.iter().cycle().take(total.saturating_sub(assigned) as usize) {
        out[i] += 1;
    }
    out
}

/// The expected routing load the planner prices plans under.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// Every expert gets the same share.
    Uniform,
    /// The busiest GPU processes `capacity_factor` times the mean: the bound a capacity factor guarantees.
    CapacityBound {
        /// Capacity factor (>= 1).
        capacity_factor: f64,
    },
    /// Expert loads follow a Zipf law with exponent `zipf_s` (0 = uniform; 1.2 is strongly skewed).
    Skewed {
        /// Zipf exponent.
        zipf_s: f64,
    },
    /// Measured per-expert load shares, one vector per MoE layer (each sums to 1), e.g. the mean over a trace.
    Measured {
        /// Where they came from (a trace path), for reports.
        source: String,
        /// Per layer, per expert share of the layer's assignments.
        layer_fractions: Vec<Vec<f64>>,
    },
}

impl Workload {
    /// Per-expert load shares of MoE layer `layer` for `experts` experts (sum 1). For
    /// [`Workload::CapacityBound`] this is uniform: the bound is applied to the busiest GPU by the cost model.
    /// Measured loads with another expert count are resampled to `experts` by proportional binning.
    pub fn expert_fractions(&self, layer: usize, experts: usize) -> Vec<f64> {
        match self {
            Workload::Uniform | Workload::CapacityBound { .. } => vec![1.0 / experts as f64; experts],
            Workload::Skewed { zipf_s } => {
                let w: Vec<f64> = (0..experts).map(|i| 1.0 / ((i + 1) as f64).powf(*zipf_s)).collect();
                let s: f64 = w.iter().sum();
                w.into_iter().map(|x| x / s).collect()
            }
            Workload::Measured { layer_fractions, .. } => {
                if layer_fractions.is_empty() {
                    return vec![1.0 / experts as f64; experts];
                }
                let f = &layer_fractions[layer % layer_fractions.len()];
                resample(f, experts)
            }
        }
    }

    /// Distinct per-layer load shapes (1 for synthetic workloads, one per measured layer).
    pub fn num_distinct_layers(&self) -> usize {
        match self {
            Workload::Measured { layer_fractions, .. } => layer_fractions.len().max(1),
            _ => 1,
        }
    }

    /// Lower bound on the busiest GPU's load over the mean that the workload asks for (capacity bound), else 1.
    pub fn imbalance_floor(&self) -> f64 {
        match self {
            Workload::CapacityBound { capacity_factor } => capacity_factor.max(1.0),
            _ => 1.0,
        }
    }

    /// Short label for tables.
    pub fn label(&self) -> String {
        match self {
            Workload::Uniform => "uniform".into(),
            Workload::CapacityBound { capacity_factor } => format!("capacity:{capacity_factor}"),
            Workload::Skewed { zipf_s } => format!("zipf:{zipf_s}"),
            Workload::Measured { source, .. } => format!("trace:{source}"),
        }
    }
}

/// Resamples shares over `from.len()` experts onto `to` experts, keeping the shape and the sum.
fn resample(from: &[f64], to: usize) -> Vec<f64> {
    let n = from.len();
    if n == to {
        return from.to_vec();
    }
    let mut out = vec![0.0; to];
    // Spread each source bucket [i/n, (i+1)/n) over the target buckets it overlaps.
    for (i, &v) in from.iter().enumerate() {
        let (a, b) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
        let first = (a * to as f64).floor() as usize;
        let last = ((b * to as f64).ceil() as usize).min(to);
        for (j, o) in out.iter_mut().enumerate().take(last).skip(first) {
            let (c, d) = (j as f64 / to as f64, (j + 1) as f64 / to as f64);
            let overlap = (b.min(d) - a.max(c)).max(0.0);
            *o += v * overlap * n as f64;
        }
    }
    let s: f64 = out.iter().sum();
    if s > 0.0 { out.iter().map(|x| x / s).collect() } else { vec![1.0 / to as f64; to] }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn column_sums_are_expert_loads() {
        let m = LoadMatrix::from_rows(&[vec![1, 2, 3], vec![4, 5, 6]]).unwrap();
        assert_eq!(m.expert_loads(), vec![5, 7, 9]);
        assert_eq!(m.total(), 21);
        assert_eq!(m.get(1, 2), 6);
    }

    #[test]
    fn ragged_rows_are_rejected() {
        assert!(LoadMatrix::from_rows(&[vec![1, 2], vec![1]]).is_err());
    }

    #[test]
    fn zipf_is_decreasing_and_sums_to_one() {
        let f = Workload::Skewed { zipf_s: 1.0 }.expert_fractions(0, 4);
        // 1, 1/2, 1/3, 1/4 normalised by 25/12.
        let expect = [12.0 / 25.0, 6.0 / 25.0, 4.0 / 25.0, 3.0 / 25.0];
        for (a, b) in f.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    proptest! {
        #[test]
        fn apportion_sums_exactly(w in proptest::collection::vec(0.0f64..10.0, 1..40), total in 0u64..100_000) {
            let a = apportion(&w, total);
            prop_assert_eq!(a.iter().sum::<u64>(), total);
        }

        #[test]
        fn resample_keeps_sum(w in proptest::collection::vec(0.01f64..10.0, 1..70), to in 1usize..300) {
            let s: f64 = w.iter().sum();
            let f: Vec<f64> = w.iter().map(|x| x / s).collect();
            let r = resample(&f, to);
            prop_assert_eq!(r.len(), to);
            prop_assert!((r.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        }
    }
}
