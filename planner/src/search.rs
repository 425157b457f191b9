//! Prices every plan of the space under an expected workload, drops those over GPU memory, and ranks the rest
//! by modelled time per iteration. Pricing runs on all cores (rayon).

use std::sync::atomic::{AtomicU64, Ordering};

use rayon::prelude::*;
use serde::Serialize;
use switchyard_cost::cost::{Fabric, IterationCost, ModelTables, price_plan};
use switchyard_cost::{ClusterSpec, ModelSpec, ParallelPlan, Workload};

use crate::profile::ProfileCache;
use crate::space::{SpaceOptions, for_each_plan};

/// One ranked plan.
#[derive(Debug, Clone, Serialize)]
pub struct RankedPlan {
    /// 1 = best.
    pub rank: usize,
    /// Short layout label.
    pub layout: String,
    /// The plan.
    pub plan: ParallelPlan,
    /// Modelled milliseconds per iteration.
    pub predicted_iter_ms: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Memory of the busiest GPU, GiB.
    pub memory_gib_per_gpu: f64,
    /// Busiest GPU's routed load over the mean under the expected workload and the seed placement.
    pub expected_imbalance: f64,
    /// The full price: breakdown and memory.
    pub cost: IterationCost,
}

/// What a search found.
#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    /// Plans enumerated (all valid).
    pub enumerated: u64,
    /// Plans that fit in GPU memory.
    pub fitting: u64,
    /// The best `top` fitting plans, best first.
    pub plans: Vec<RankedPlan>,
    /// When nothing fits: the plan that needs the least memory, to say how far off the cluster is.
    pub least_memory: Option<RankedPlan>,
    /// The workload plans were priced under.
    pub workload: String,
}

/// Options of a search.
#[derive(Debug, Clone, Default)]
pub struct SearchOptions {
    /// The plan space.
    pub space: SpaceOptions,
    /// How many ranked plans to keep.
    pub top: usize,
}

/// Prices every plan; `progress(done, total)` is called from worker threads as plans are priced.
pub fn search(
    model: &ModelSpec,
    cluster: &ClusterSpec,
    workload: &Workload,
    opts: &SearchOptions,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> SearchResult {
    let mut plans = Vec::new();
    let enumerated = for_each_plan(model, cluster, &opts.space, |p| plans.push(p));
    let fabric = Fabric::from_cluster(cluster);
    let tables = ModelTables::new(model);
    let experts = model.moe.as_ref().map_or(0, |m| m.num_experts as usize);
    let profiles = ProfileCache::new(workload.clone(), experts, model.num_moe_layers() as usize);
    let done = AtomicU64::new(0);
    let total = plans.len() as u64;
    let step = (total / 200).max(1);
    let priced: Vec<(ParallelPlan, IterationCost, f64)> = plans
        .into_par_iter()
        .map(|p| {
            let prof = profiles.profile(p.ep, p.slots_per_gpu);
            let c = price_plan(model, &tables, cluster, &fabric, &p, &prof);
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d.is_multiple_of(step) || d == total {
                progress(d, total);
            }
            (p, c, prof.imbalance)
        })
        .collect();
    let rank = |(i, (p, c, imb)): (usize, &(ParallelPlan, IterationCost, f64))| RankedPlan {
        rank: i + 1,
        layout: p.label(),
        plan: p.clone(),
        predicted_iter_ms: c.iter_ms,
        tokens_per_s: c.tokens_per_s,
        memory_gib_per_gpu: c.memory.total_bytes / (1u64 << 30) as f64,
        expected_imbalance: *imb,
        cost: c.clone(),
    };
    let mut fit: Vec<&(ParallelPlan, IterationCost, f64)> =
        priced.iter().filter(|x| x.1.fits && x.1.iter_ms.is_finite()).collect();
    let fitting = fit.len() as u64;
    // Deterministic order: time, then memory, then the label.
    fit.sort_by(|a, b| {
        a.1.iter_ms
            .total_cmp(&b.1.iter_ms)
            .then(a.1.memory.total_bytes.total_cmp(&b.1.memory.total_bytes))
            .then_with(|| a.0.label().cmp(&b.0.label()))
    });
    let top: Vec<RankedPlan> = fit.into_iter().take(opts.top.max(1)).enumerate().map(rank).collect();
    let least_memory = if top.is_empty() {
        priced.iter().min_by(|a, b| a.1.memory.total_bytes.total_cmp(&b.1.memory.total_bytes)).map(|x| rank((0, x)))
    } else {
        None
    };
    SearchResult { enumerated, fitting, plans: top, least_memory, workload: workload.label() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cost::presets;

    fn run(model: &str, cluster: &str, gpus: Option<u32>, w: Workload) -> SearchResult {
        let m = presets::model(model).unwrap().unwrap();
        let mut c = presets::cluster(cluster).unwrap();
        if let Some(g) = gpus {
            c = c.with_gpus(g, &switchyard_cost::Source::Inline).unwrap();
        }
        search(&m, &c, &w, &SearchOptions { top: 10, ..Default::default() }, &|_, _| {})
    }

    #[test]
    fn ranks_are_sorted_and_fit() {
        let r = run("gpt-moe-l8-h2048-e32", "smartmoe-a100", None, Workload::Uniform);
        assert!(r.fitting > 0 && r.enumerated >= r.fitting);
        assert_eq!(r.plans.len(), 10);
        for w in r.plans.windows(2) {
            assert!(w[0].predicted_iter_ms <= w[1].predicted_iter_ms);
        }
        for p in &r.plans {
            assert!(p.cost.fits && p.memory_gib_per_gpu <= 80.0);
        }
    }

    #[test]
    fn skew_makes_spare_slots_pay() {
        // Under a strongly skewed load the best plan holds replicas (spare slots) or fetches experts.
        let r = run("gpt-moe-l8-h2048-e32", "smartmoe-a100", None, Workload::Skewed { zipf_s: 1.2 });
        let u = run("gpt-moe-l8-h2048-e32", "smartmoe-a100", None, Workload::Uniform);
        assert!(r.plans[0].predicted_iter_ms > u.plans[0].predicted_iter_ms);
        let best = &r.plans[0].plan;
        assert!(
            best.spare_slots_per_gpu(&presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap()) > 0
                || best.dispatch == switchyard_cost::DispatchMode::ExpertFetch
                || best.ep == 1,
            "{}",
            best.label()
        );
    }
}
