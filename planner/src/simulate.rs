//! Replays a routing trace through the cost model under a placement policy: per snapshot and layer, the
//! modelled MoE time under the current placement, the decisions with their migration cost charged, and a
//! summary. One snapshot stands for the iterations up to the next one.

use serde::Serialize;
use switchyard_cost::{LoadMatrix, Placement};

use crate::online::{Decision, LayerContext, PolicyConfig, PolicyState, decide_windows};
use crate::trace::Trace;
use crate::window::LoadWindow;

/// How a simulation runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SimOptions {
    /// The policy.
    pub policy: PolicyConfig,
    /// Decide with the load of the snapshot being played (an oracle), instead of the past ones only.
    pub oracle: bool,
}

/// One snapshot of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRecord {
    /// Iteration of the snapshot.
    pub iteration: u64,
    /// Iterations it stands for.
    pub span: u64,
    /// Modelled MoE time of one iteration (all layers, forward + backward), ms.
    pub iter_ms: f64,
    /// The same under perfect balance (every GPU at the mean compute; communication as placed), ms.
    pub bound_ms: f64,
    /// Busiest GPU's load over the mean, per layer.
    pub imbalance: Vec<f64>,
    /// Whether the policy evaluated a proposal here.
    pub decided: bool,
    /// Whether it switched.
    pub switched: bool,
    /// Bytes moved by the switch.
    pub bytes_moved: f64,
    /// Modelled time of the switch, ms (charged once).
    pub migration_ms: f64,
}

/// Summary of a simulation.
#[derive(Debug, Clone, Serialize)]
pub struct SimSummary {
    /// Policy label, e.g. `switchyard dyn.10`.
    pub label: String,
    /// Snapshots played.
    pub snapshots: usize,
    /// Iterations between snapshots (one snapshot stands for this many).
    pub snapshot_interval: u64,
    /// Mean over snapshots and layers of busiest-GPU load over mean load.
    pub mean_imbalance: f64,
    /// 95th percentile of the same.
    pub p95_imbalance: f64,
    /// Mean modelled MoE time per iteration, ms (migrations excluded).
    pub mean_iter_ms: f64,
    /// Mean perfect-balance bound per iteration, ms.
    pub mean_bound_ms: f64,
    /// Modelled time over the whole trace including migrations, ms.
    pub total_ms: f64,
    /// `total_ms` over the bound's total.
    pub ratio_to_bound: f64,
    /// Decisions evaluated.
    pub decisions: usize,
    /// Switches made.
    pub switches: usize,
    /// Bytes moved over the trace.
    pub bytes_moved: f64,
    /// Bytes moved per decision evaluated.
    pub bytes_per_decision: f64,
    /// Time spent migrating, ms.
    pub migration_ms: f64,
}

/// A simulation's records and summary.
#[derive(Debug, Clone, Serialize)]
pub struct SimResult {
    /// Summary.
    pub summary: SimSummary,
    /// Per snapshot.
    pub snapshots: Vec<SnapshotRecord>,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Busiest GPU's load over the mean for a load matrix and a placement.
pub fn imbalance(load: &LoadMatrix, placement: &Placement) -> f64 {
    let loads: Vec<f64> = load.expert_loads().into_iter().map(|x| x as f64).collect();
    placement.imbalance(&loads)
}

/// Replays `trace` from the `initial` placements (one per layer) under `opts`; `ctx` has one entry per layer.
/// `progress(done, total)` is called after each snapshot.
pub fn simulate(
    trace: &Trace,
    initial: &[Placement],
    ctx: &[LayerContext],
    opts: &SimOptions,
    progress: &dyn Fn(usize, usize),
) -> SimResult {
    let n = trace.snapshots.len();
    let interval = trace.snapshot_interval().unwrap_or(1).max(1);
    let mut current = initial.to_vec();
    let mut state = PolicyState::default();
    let mut records = Vec::with_capacity(n);
    let mut imbs = Vec::new();
    let mut windows: Vec<LoadWindow> = (0..trace.layers)
        .map(|l| LoadWindow::new(opts.policy.predictor, ctx.get(l).map_or(1, |c| c.gpus_per_node)))
        .collect();
    let mut seen = 0;
    for i in 0..n {
        let snap = &trace.snapshots[i];
        let span =
            if i + 1 < n { trace.snapshots[i + 1].iteration.saturating_sub(snap.iteration).max(1) } else { interval };
        let since =
            if i == 0 { interval } else { snap.iteration.saturating_sub(trace.snapshots[i - 1].iteration).max(1) };
        // History visible to the policy: past snapshots, plus this one for an oracle; each window takes in
        // what it has not seen yet.
        let upto = if opts.oracle { i + 1 } else { i };
        for s in &trace.snapshots[seen..upto] {
            for (w, m) in windows.iter_mut().zip(&s.layers) {
                w.push(m);
            }
        }
        seen = upto;
        let d: Decision = decide_windows(&opts.policy, &mut state, snap.iteration, since, &windows, &current, ctx);
        if d.switch {
            current = d.placements;
        }
        let mut iter_ms = 0.0;
        let mut bound_ms = 0.0;
        let mut imb = Vec::with_capacity(trace.layers);
        for (l, c) in ctx.iter().enumerate().take(trace.layers) {
            let load = &snap.layers[l];
            // Serve the load once (dynamic shares), then price it once for both the time and the bound.
            let serving = c.serving(load, &current[l]);
            let (t, b) = c.times_ms(load, &serving);
            iter_ms += t;
            bound_ms += b;
            let x = imbalance(load, &serving);
            imb.push(x);
            imbs.push(x);
        }
        records.push(SnapshotRecord {
            iteration: snap.iteration,
            span,
            iter_ms,
            bound_ms,
            imbalance: imb,
            decided: d.evaluated,
            switched: d.switch,
            bytes_moved: if d.switch { d.bytes_moved } else { 0.0 },
            migration_ms: if d.switch { d.migration_ms } else { 0.0 },
        });
        progress(i + 1, n);
    }
    let iters: u64 = records.iter().map(|r| r.span).sum::<u64>().max(1);
    let mig: f64 = records.iter().map(|r| r.migration_ms).sum();
    let total: f64 = records.iter().map(|r| r.iter_ms * r.span as f64).sum::<f64>() + mig;
    let bound_total: f64 = records.iter().map(|r| r.bound_ms * r.span as f64).sum();
    let decisions = records.iter().filter(|r| r.decided).count();
    let bytes: f64 = records.iter().map(|r| r.bytes_moved).sum();
    let mean_imb = imbs.iter().sum::<f64>() / imbs.len().max(1) as f64;
    let p95 = percentile(&mut imbs, 0.95);
    let label = format!(
        "{} {}{}",
        opts.policy.algorithm.name(),
        opts.policy.frequency.label(),
        if opts.oracle { " (oracle)" } else { "" }
    );
    SimResult {
        summary: SimSummary {
            label,
            snapshots: n,
            snapshot_interval: interval,
            mean_imbalance: mean_imb,
            p95_imbalance: p95,
            mean_iter_ms: records.iter().map(|r| r.iter_ms * r.span as f64).sum::<f64>() / iters as f64,
            mean_bound_ms: bound_total / iters as f64,
            total_ms: total,
            ratio_to_bound: total / bound_total.max(f64::MIN_POSITIVE),
            decisions,
            switches: records.iter().filter(|r| r.switched).count(),
            bytes_moved: bytes,
            bytes_per_decision: bytes / decisions.max(1) as f64,
            migration_ms: mig,
        },
        snapshots: records,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::online::{Algorithm, Frequency, Predictor};
    use crate::trace::Snapshot;

    fn trace() -> Trace {
        // 4 GPUs x 8 experts; expert (i % 8) is hot in snapshot i.
        let snapshots = (0..6)
            .map(|i| {
                let rows: Vec<Vec<u64>> =
                    (0..4).map(|_| (0..8).map(|e| if e == (i / 2) % 8 { 3000 } else { 300 }).collect()).collect();
                Snapshot { iteration: 1 + 10 * i as u64, layers: vec![LoadMatrix::from_rows(&rows).unwrap()] }
            })
            .collect();
        Trace { source: "t".into(), layers: 1, layer_ids: vec![0], ranks: 4, experts: 8, micro_batches: 1, snapshots }
    }

    fn run(alg: Algorithm, freq: Frequency, slots: usize, oracle: bool) -> SimResult {
        let t = trace();
        let mut c = crate::online::tests_support::ctx(4, slots);
        c.gpus_per_node = 4;
        let init = vec![Placement::contiguous(4, slots, 8).unwrap()];
        let opts = SimOptions {
            policy: crate::online::PolicyConfig { algorithm: alg, frequency: freq, predictor: Predictor::Last },
            oracle,
        };
        simulate(&t, &init, &[c], &opts, &|_, _| {})
    }

    #[test]
    fn static_never_moves_and_dynamic_balances() {
        let s = run(Algorithm::Static, Frequency::Every { n: 10 }, 2, false);
        assert_eq!(s.summary.switches, 0);
        assert_eq!(s.summary.bytes_moved, 0.0);
        assert_eq!(s.snapshots.len(), 6);
        assert_eq!(s.summary.snapshot_interval, 10);
        let d = run(Algorithm::Switchyard, Frequency::Every { n: 10 }, 3, true);
        assert!(d.summary.switches >= 1);
        assert!(
            d.summary.mean_imbalance < s.summary.mean_imbalance,
            "{} vs {}",
            d.summary.mean_imbalance,
            s.summary.mean_imbalance
        );
        assert!(d.summary.total_ms >= d.summary.mean_bound_ms * 60.0 * 0.999);
        // Past loads only: the first snapshot cannot be anticipated.
        let p = run(Algorithm::Switchyard, Frequency::Every { n: 10 }, 3, false);
        assert!(!p.snapshots[0].switched);
        assert!(p.summary.mean_imbalance >= d.summary.mean_imbalance - 1e-9);
    }
}
