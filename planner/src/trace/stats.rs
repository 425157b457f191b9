//! Summary figures of a trace, per MoE layer and overall: load skew (the busiest expert's load over the mean
//! expert load, per snapshot), drift between consecutive snapshots (total variation distance between their
//! normalised per-expert loads), idle experts, and how often the hottest expert stays the hottest.

use serde::Serialize;

use super::Trace;

/// Distribution of one figure over snapshots (or snapshot pairs). Percentiles interpolate linearly between the
/// closest ranks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Values summarised.
    pub count: usize,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// Maximum.
    pub max: f64,
}

impl Summary {
    /// Summarises `values` (NaNs are ignored); `None` when there is none.
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let q = |p: f64| {
            let pos = p * (v.len() - 1) as f64;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Some(Summary {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: q(0.5),
            p95: q(0.95),
            max: v[v.len() - 1],
        })
    }
}

/// Figures for one MoE layer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerStats {
    /// The layer's index as written in the trace.
    pub layer: u64,
    /// Busiest expert's load over the mean expert load, per snapshot (1 = perfectly balanced, `experts` = one
    /// expert takes everything). Snapshots without load are left out.
    pub skew: Option<Summary>,
    /// The busiest expert's share of the layer's load, per snapshot (`skew / experts`).
    pub top_share: Option<Summary>,
    /// Total variation distance (0-1) between the normalised per-expert loads of consecutive snapshots.
    pub drift: Option<Summary>,
    /// Mean number of experts with no load in a snapshot.
    pub idle_experts_mean: f64,
    /// Experts that receive no load in any snapshot.
    pub never_used: Vec<usize>,
    /// Fraction of consecutive snapshot pairs whose hottest expert is the same (ties go to the lowest index).
    pub hottest_persistence: Option<f64>,
    /// The expert that is hottest in the most snapshots.
    pub usual_hottest: Option<usize>,
}

/// Figures over all layers together (every (layer, snapshot) value pooled).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OverallStats {
    /// Skew over all layers and snapshots.
    pub skew: Option<Summary>,
    /// Busiest expert's share over all layers and snapshots.
    pub top_share: Option<Summary>,
    /// Drift over all layers and consecutive snapshot pairs.
    pub drift: Option<Summary>,
    /// Mean number of idle experts per (layer, snapshot).
    pub idle_experts_mean: f64,
    /// (layer, expert) pairs that never receive load.
    pub never_used: usize,
    /// Hottest-expert persistence over all layers' consecutive snapshot pairs.
    pub hottest_persistence: Option<f64>,
}

/// Summary of a trace: its shape, then per-layer and overall figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceStats {
    /// Where the trace came from.
    pub source: String,
    /// Snapshots.
    pub snapshots: usize,
    /// First recorded iteration.
    pub first_iteration: Option<u64>,
    /// Last recorded iteration.
    pub last_iteration: Option<u64>,
    /// The common gap between snapshots ([`Trace::snapshot_interval`]).
    pub snapshot_interval: Option<u64>,
    /// MoE layers.
    pub layers: usize,
    /// Source ranks.
    pub ranks: usize,
    /// Experts per layer.
    pub experts: usize,
    /// Micro-batches per snapshot.
    pub micro_batches: usize,
    /// One entry per layer, in trace order.
    pub per_layer: Vec<LayerStats>,
    /// All layers together.
    pub overall: OverallStats,
}

/// Per-expert loads (column sums) of layer position `layer` in every snapshot, as `f64`.
fn loads(trace: &Trace, layer: usize) -> Vec<Vec<f64>> {
    trace
        .snapshots
        .iter()
        .map(|s| {
            let m = &s.layers[layer];
            let mut l = vec![0.0; m.experts];
            for r in 0..m.ranks {
                for (x, &c) in l.iter_mut().zip(m.row(r)) {
                    *x += c as f64;
                }
            }
            l
        })
        .collect()
}

/// Index of the largest value (the lowest index on a tie); `None` when all are zero.
fn hottest(l: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &x) in l.iter().enumerate() {
        if x > 0.0 && best.is_none_or(|b| x > l[b]) {
            best = Some(i);
        }
    }
    best
}

/// Normalised shares; `None` when the total is zero.
fn shares(l: &[f64]) -> Option<Vec<f64>> {
    let total: f64 = l.iter().sum();
    (total > 0.0).then(|| l.iter().map(|x| x / total).collect())
}

struct Raw {
    skew: Vec<f64>,
    top: Vec<f64>,
    drift: Vec<f64>,
    idle: Vec<f64>,
    same: usize,
    pairs: usize,
}

fn layer_raw(trace: &Trace, layer: usize) -> (Raw, Vec<usize>, Option<usize>) {
    let loads = loads(trace, layer);
    let experts = trace.experts;
    let mut raw = Raw { skew: Vec::new(), top: Vec::new(), drift: Vec::new(), idle: Vec::new(), same: 0, pairs: 0 };
    let mut used = vec![false; experts];
    let mut hot_count = vec![0usize; experts];
    let mut prev: Option<(Option<Vec<f64>>, Option<usize>)> = None;
    for l in &loads {
        let share = shares(l);
        let hot = hottest(l);
        if let Some(s) = &share {
            let top = s.iter().copied().fold(0.0, f64::max);
            raw.top.push(top);
            raw.skew.push(top * experts as f64);
        }
        raw.idle.push(l.iter().filter(|&&x| x == 0.0).count() as f64);
        for (u, &x) in used.iter_mut().zip(l) {
            *u |= x > 0.0;
        }
        if let Some(h) = hot {
            hot_count[h] += 1;
        }
        if let Some((prev_share, prev_hot)) = &prev {
            if let (Some(a), Some(b)) = (prev_share, &share) {
                raw.drift.push(0.5 * a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>());
            }
            if let (Some(a), Some(b)) = (prev_hot, hot) {
                raw.pairs += 1;
                raw.same += usize::from(*a == b);
            }
        }
        prev = Some((share, hot));
    }
    let never: Vec<usize> = (0..experts).filter(|&e| !used[e]).collect();
    let usual = (0..experts).filter(|&e| hot_count[e] > 0).max_by_key(|&e| (hot_count[e], std::cmp::Reverse(e)));
    (raw, never, usual)
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 }
}

/// Computes the summary figures of `trace`.
pub fn trace_stats(trace: &Trace) -> TraceStats {
    let mut per_layer = Vec::with_capacity(trace.layers);
    let mut all = Raw { skew: Vec::new(), top: Vec::new(), drift: Vec::new(), idle: Vec::new(), same: 0, pairs: 0 };
    let mut never_total = 0;
    for (p, &layer) in trace.layer_ids.iter().enumerate() {
        let (raw, never_used, usual_hottest) = layer_raw(trace, p);
        per_layer.push(LayerStats {
            layer,
            skew: Summary::of(&raw.skew),
            top_share: Summary::of(&raw.top),
            drift: Summary::of(&raw.drift),
            idle_experts_mean: mean(&raw.idle),
            hottest_persistence: (raw.pairs > 0).then(|| raw.same as f64 / raw.pairs as f64),
            never_used: never_used.clone(),
            usual_hottest,
        });
        never_total += never_used.len();
        all.skew.extend(raw.skew);
        all.top.extend(raw.top);
        all.drift.extend(raw.drift);
        all.idle.extend(raw.idle);
        all.same += raw.same;
        all.pairs += raw.pairs;
    }
    TraceStats {
        source: trace.source.clone(),
        snapshots: trace.snapshots.len(),
        first_iteration: trace.snapshots.first().map(|s| s.iteration),
        last_iteration: trace.snapshots.last().map(|s| s.iteration),
        snapshot_interval: trace.snapshot_interval(),
        layers: trace.layers,
        ranks: trace.ranks,
        experts: trace.experts,
        micro_batches: trace.micro_batches,
        per_layer,
        overall: OverallStats {
            skew: Summary::of(&all.skew),
            top_share: Summary::of(&all.top),
            drift: Summary::of(&all.drift),
            idle_experts_mean: mean(&all.idle),
            never_used: never_total,
            hottest_persistence: (all.pairs > 0).then(|| all.same as f64 / all.pairs as f64),
        },
    }
}

/// Per layer, the mean share of each expert in the layer's load over all snapshots (each snapshot weighs the
/// same; snapshots without load are left out). Each vector sums to 1 (uniform when the layer never has load):
/// the input of `Workload::Measured`.
pub fn mean_expert_fractions(trace: &Trace) -> Vec<Vec<f64>> {
    (0..trace.layers)
        .map(|p| {
            let mut acc = vec![0.0; trace.experts];
            let mut n = 0usize;
            for l in loads(trace, p) {
                if let Some(s) = shares(&l) {
                    for (a, x) in acc.iter_mut().zip(s) {
                        *a += x;
                    }
                    n += 1;
                }
            }
            if n == 0 {
                return vec![1.0 / trace.experts.max(1) as f64; trace.experts];
            }
            let total: f64 = acc.iter().sum();
            acc.into_iter().map(|x| x / total).collect()
        })
        .collect()
}

impl TraceStats {
    /// A readable, aligned text table: the trace's shape, then one row per layer and one for all layers.
    pub fn to_table(&self) -> String {
        let mut out = format!("trace: {}\n", self.source);
        let span = match (self.first_iteration, self.last_iteration) {
            (Some(a), Some(b)) => format!(" (iterations {a}-{b}"),
            _ => String::from(" ("),
        };
        let every = self.snapshot_interval.map_or(String::from(")"), |k| format!(", every {k})"));
        out += &format!(
            "{} snapshot(s){span}{every}, {} layer(s), {} rank(s), {} expert(s), {} micro-batch(es) per snapshot\n\n",
            self.snapshots, self.layers, self.ranks, self.experts, self.micro_batches
        );
        let header = [
            "layer",
            "skew mean",
            "p50",
            "p95",
            "max",
            "top share",
            "drift mean",
            "p95",
            "idle mean",
            "never used",
            "hot persist",
            "usual hot",
        ];
        let f2 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        let f3 = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
        let pct = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{:.1}%", v * 100.0));
        let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
        for l in &self.per_layer {
            rows.push(vec![
                l.layer.to_string(),
                f2(l.skew.as_ref().map(|s| s.mean)),
                f2(l.skew.as_ref().map(|s| s.p50)),
                f2(l.skew.as_ref().map(|s| s.p95)),
                f2(l.skew.as_ref().map(|s| s.max)),
                pct(l.top_share.as_ref().map(|s| s.mean)),
                f3(l.drift.as_ref().map(|s| s.mean)),
                f3(l.drift.as_ref().map(|s| s.p95)),
                format!("{:.1}", l.idle_experts_mean),
                l.never_used.len().to_string(),
                pct(l.hottest_persistence),
                l.usual_hottest.map_or("-".to_string(), |e| format!("e{e}")),
            ]);
        }
        let o = &self.overall;
        rows.push(vec![
            "all".to_string(),
            f2(o.skew.as_ref().map(|s| s.mean)),
            f2(o.skew.as_ref().map(|s| s.p50)),
            f2(o.skew.as_ref().map(|s| s.p95)),
            f2(o.skew.as_ref().map(|s| s.max)),
            pct(o.top_share.as_ref().map(|s| s.mean)),
            f3(o.drift.as_ref().map(|s| s.mean)),
            f3(o.drift.as_ref().map(|s| s.p95)),
            format!("{:.1}", o.idle_experts_mean),
            o.never_used.to_string(),
            pct(o.hottest_persistence),
            "-".to_string(),
        ]);
        let widths: Vec<usize> =
            (0..header.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
        for (i, r) in rows.iter().enumerate() {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(s, w)| format!("{s:>w$}")).collect();
            out += cells.join("  ").trim_end();
            out.push('\n');
            if i == 0 {
                out += &widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("  ");
                out.push('\n');
            }
        }
        out += "\nskew: busiest expert's load / mean expert load per snapshot; top share: busiest expert's share of \
                the load;\ndrift: total variation distance between consecutive snapshots' expert shares; idle: experts \
                with no load;\nhot persist: consecutive snapshot pairs whose hottest expert is the same.\n";
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::Snapshot;
    use switchyard_cost::LoadMatrix;

    fn trace(rows: &[[u64; 4]]) -> Trace {
        Trace {
            source: "t".into(),
            layers: 1,
            layer_ids: vec![0],
            ranks: 1,
            experts: 4,
            micro_batches: 1,
            snapshots: rows
                .iter()
                .enumerate()
                .map(|(i, r)| Snapshot {
                    iteration: 1 + 10 * i as u64,
                    layers: vec![LoadMatrix::from_rows(&[r.to_vec()]).unwrap()],
                })
                .collect(),
        }
    }

    #[test]
    fn figures_by_hand() {
        let t = trace(&[[4, 0, 0, 0], [2, 2, 0, 0], [1, 1, 1, 1]]);
        let s = trace_stats(&t);
        let l = &s.per_layer[0];
        let skew = l.skew.as_ref().unwrap();
        assert_eq!(skew.count, 3);
        assert!((skew.max - 4.0).abs() < 1e-12);
        assert!((skew.p50 - 2.0).abs() < 1e-12);
        assert!((skew.mean - 7.0 / 3.0).abs() < 1e-12);
        // TV([1,0,0,0],[.5,.5,0,0]) = .5; TV([.5,.5,0,0],[.25]*4) = .5.
        let drift = l.drift.as_ref().unwrap();
        assert!((drift.mean - 0.5).abs() < 1e-12);
        // Idle experts: 3, 2, 0.
        assert!((l.idle_experts_mean - 5.0 / 3.0).abs() < 1e-12);
        assert!(l.never_used.is_empty());
        // Hottest: e0, e0 (tie to lowest), e0 (tie): persistence 1.
        assert_eq!(l.hottest_persistence, Some(1.0));
        assert_eq!(l.usual_hottest, Some(0));
        assert_eq!(s.snapshot_interval, Some(10));
        let table = s.to_table();
        assert!(table.contains("skew mean"), "{table}");
        assert!(table.lines().any(|l| l.trim_start().starts_with("all")), "{table}");
    }

    #[test]
    fn never_used_and_fractions() {
        let t = trace(&[[3, 1, 0, 0], [1, 3, 0, 0]]);
        let s = trace_stats(&t);
        assert_eq!(s.per_layer[0].never_used, vec![2, 3]);
        assert_eq!(s.per_layer[0].hottest_persistence, Some(0.0));
        let f = mean_expert_fractions(&t);
        assert_eq!(f, vec![vec![0.5, 0.5, 0.0, 0.0]]);
    }

    #[test]
    fn empty_load_is_not_a_nan() {
        let t = trace(&[[0, 0, 0, 0], [0, 0, 0, 0]]);
        let s = trace_stats(&t);
        assert!(s.per_layer[0].skew.is_none());
        assert!(s.per_layer[0].drift.is_none());
        assert_eq!(s.per_layer[0].hottest_persistence, None);
        assert_eq!(mean_expert_fractions(&t), vec![vec![0.25; 4]]);
        serde_json::to_string(&s).unwrap();
    }

    #[test]
    fn percentiles_interpolate() {
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!((s.p50, s.max, s.mean), (3.0, 5.0, 3.0));
        assert!((s.p95 - 4.8).abs() < 1e-12);
        assert!(Summary::of(&[]).is_none());
    }
}
