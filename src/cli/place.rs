//! `switchyard place`: one placement per MoE layer from per-expert loads, with any algorithm.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use rayon::prelude::*;
use serde_json::json;
use switchyard_cost::Placement;
use switchyard_planner::online::{Algorithm, LayerContext, propose};
use switchyard_planner::placement::eplb::from_placements;
use switchyard_planner::placement::exact::{self, ExactOptions, ExactSolution, ExactSolver, exact_placement};

use super::simulate::parse_algorithm;
use super::specs::load_cluster;

/// Arguments of `switchyard place`.
#[derive(Debug, Args)]
pub struct PlaceArgs {
    /// Per-expert loads: JSON `[[load per expert] per layer]` (or `{"loads": ...}`), or a routing trace (its mean
    /// load per layer).
    #[arg(long)]
    loads: PathBuf,
    /// Cluster (preset, spec or profile); its GPUs form the expert-parallel group unless --gpus is given.
    #[arg(long, default_value = "smartmoe-a100")]
    cluster: String,
    /// GPUs of the expert-parallel group (the cluster resized).
    #[arg(long)]
    gpus: Option<u32>,
    /// Expert slots per GPU (default: experts / GPUs).
    #[arg(long)]
    slots: Option<usize>,
    /// Algorithm: static, smartmoe, fastermoe, eplb, eplb-hierarchical or switchyard.
    #[arg(long, default_value = "switchyard")]
    algorithm: String,
    /// Expert groups for EPLB's hierarchical policy (default: one per node).
    #[arg(long)]
    groups: Option<usize>,
    /// Print the placements as JSON.
    #[arg(long, conflicts_with = "eplb_json")]
    json: bool,
    /// Print EPLB's tensors (phy2log, log2phy, logcnt) as JSON.
    #[arg(long)]
    eplb_json: bool,
    /// Also solve each layer exactly (an integer program with token shares; small instances only) and print the
    /// algorithm's optimality gap: (algorithm's busiest GPU - optimum) / optimum.
    #[arg(long, conflicts_with = "eplb_json")]
    exact: bool,
    /// Solver for --exact: microlp or highs (default: highs when built with `--features highs`, else microlp).
    #[arg(long, requires = "exact")]
    exact_solver: Option<String>,
    /// Time limit of --exact per layer, seconds; when it runs out the best placement found is reported, marked
    /// not optimal [default: 60].
    #[arg(long, requires = "exact")]
    exact_time_limit: Option<f64>,
}

/// The exact optimum of one layer beside the algorithm's placement.
struct ExactReport {
    sol: ExactSolution,
    /// The algorithm's busiest GPU's tokens, its replicas split as the algorithm splits them.
    heuristic: f64,
    /// The same with the replicas' shares balanced (Switchyard's share model, the one the optimum uses).
    heuristic_with_shares: f64,
}

impl ExactReport {
    fn gap_pct(&self, heuristic: f64) -> f64 {
        if self.sol.max_load > 0.0 { (heuristic - self.sol.max_load) / self.sol.max_load * 100.0 } else { 0.0 }
    }

    fn json(&self, layer: usize) -> serde_json::Value {
        json!({
            "layer": layer,
            "max_load": self.sol.max_load,
            "heuristic_max_load": self.heuristic,
            "gap_pct": self.gap_pct(self.heuristic),
            "heuristic_max_load_with_shares": self.heuristic_with_shares,
            "gap_with_shares_pct": self.gap_pct(self.heuristic_with_shares),
            "lower_bound": self.sol.lower_bound,
            "optimal": self.sol.optimal,
            "solver": self.sol.solver,
            "solve_ms": self.sol.solve_ms,
            "placement": self.sol.placement,
        })
    }
}

/// Solves every layer exactly (in parallel), each warm-started from the algorithm's placement.
fn solve_exact(a: &PlaceArgs, loads: &[Vec<f64>], placements: &[Placement], slots: usize) -> Result<Vec<ExactReport>> {
    let solver = match &a.exact_solver {
        None => ExactSolver::best_available(),
        Some(s) => {
            ExactSolver::parse(s).with_context(|| format!("--exact-solver {s}: unknown; fix: microlp or highs"))?
        }
    };
    if !solver.available() {
        bail!(
            "--exact-solver {}: not in this build; fix: build with `--features highs`, or --exact-solver microlp",
            solver.name()
        );
    }
    let time_limit_s = a.exact_time_limit.unwrap_or(60.0);
    if !(time_limit_s > 0.0 && time_limit_s.is_finite()) {
        bail!("--exact-time-limit {time_limit_s}: must be a positive number of seconds");
    }
    let g = placements.first().map(|p| p.gpus).unwrap_or(1);
    let e = loads[0].len();
    let max_cells = match solver {
        ExactSolver::Microlp => exact::DEFAULT_MAX_CELLS,
        ExactSolver::Highs => HIGHS_MAX_CELLS,
    };
    if e * g > max_cells {
        let hint = if solver == ExactSolver::Microlp && e * g <= HIGHS_MAX_CELLS {
            " or --exact-solver highs (a build with `--features highs`)"
        } else {
            ""
        };
        bail!(
            "--exact: {e} experts x {g} GPUs = {} expert-GPU pairs is over {}'s limit of {max_cells}; fix: fewer GPUs \
             (--gpus {}){hint}",
            e * g,
            solver.name(),
            (max_cells / e.max(1)).max(1)
        );
    }
    loads
        .par_iter()
        .zip(placements.par_iter())
        .map(|(w, p)| {
            let opts =
                ExactOptions { solver, time_limit_s, max_cells, warm_start: Some(p.clone()), ..Default::default() };
            let sol = exact_placement(w, g, slots, &opts)?;
            let heuristic = p.gpu_loads(w).into_iter().fold(0.0, f64::max);
            let heuristic_with_shares = exact::balanced_max_load(p, w)?;
            Ok(ExactReport { sol, heuristic, heuristic_with_shares })
        })
        .collect::<Result<Vec<_>>>()
        .context("--exact")
}

/// Largest `experts x GPUs` accepted with HiGHS.
const HIGHS_MAX_CELLS: usize = 2048;

fn read_loads(path: &std::path::Path) -> Result<Vec<Vec<f64>>> {
    let is_json = path.extension().and_then(|e| e.to_str()) == Some("json");
    if is_json {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not JSON; fix: [[load per expert] per layer]", path.display()))?;
        let v = v.get("loads").cloned().unwrap_or(v);
        let loads: Vec<Vec<f64>> = serde_json::from_value(v)
            .with_context(|| format!("{}: expected [[load per expert] per layer] of numbers", path.display()))?;
        if loads.is_empty() || loads.iter().any(|l| l.is_empty() || l.len() != loads[0].len()) {
            bail!("{}: every layer needs the same, non-zero number of experts", path.display());
        }
        if loads.iter().flatten().any(|x| !x.is_finite() || *x < 0.0) {
            bail!("{}: loads must be finite and non-negative", path.display());
        }
        return Ok(loads);
    }
    let (trace, _) = switchyard_planner::trace::read_trace(path, &Default::default())?;
    let n = trace.snapshots.len().max(1) as f64;
    Ok((0..trace.layers)
        .map(|l| {
            let mut v = vec![0.0; trace.experts];
            for s in &trace.snapshots {
                for (x, y) in v.iter_mut().zip(s.layers[l].expert_loads()) {
                    *x += y as f64 / n;
                }
            }
            v
        })
        .collect())
}

/// Runs `switchyard place`.
pub fn run(a: PlaceArgs) -> Result<()> {
    let alg = parse_algorithm(&a.algorithm)?;
    let loads = read_loads(&a.loads)?;
    let cluster = load_cluster(&a.cluster, a.gpus)?;
    let g = cluster.num_gpus() as usize;
    let e = loads[0].len();
    let slots = a.slots.unwrap_or(e.div_ceil(g));
    if slots * g < e {
        bail!(
            "--slots {slots}: {g} GPUs x {slots} slots cannot hold {e} experts; fix: --slots {} or more",
            e.div_ceil(g)
        );
    }
    if alg == Algorithm::Smartmoe && slots * g != e {
        bail!(
            "--algorithm smartmoe permutes experts: it needs exactly {e} slots ({g} GPUs x {slots} = {}); fix: --slots {}",
            slots * g,
            e / g.max(1)
        );
    }
    let shape = switchyard_cost::cost::MoeLayerShape {
        d_model: 2048,
        d_ffn: 4096,
        gated: false,
        act_bytes: 2,
        param_bytes: 2,
        grad_bytes: 4,
        peak_flops: cluster.gpu.peak_flops(switchyard_cost::Dtype::Fp16),
    };
    let mut ctx = LayerContext::for_cluster(&cluster, shape, g, slots, 1);
    ctx.dynamic_shares = alg.uses_token_shares();
    let start = Placement::contiguous(g, slots, e)?;
    let placements: Vec<Placement> = match alg {
        // EPLB works on all layers at once, with its own groups and nodes.
        Algorithm::Eplb | Algorithm::EplbHierarchical => {
            use switchyard_planner::placement::eplb::{EplbPolicy, eplb, to_placement};
            let nodes = cluster.nodes as usize;
            let (policy, groups) = match alg {
                Algorithm::Eplb => (EplbPolicy::Global, 1),
                _ => (EplbPolicy::Hierarchical, a.groups.unwrap_or(nodes)),
            };
            let t = eplb(&loads, g * slots, groups, nodes, g, policy).map_err(|x| {
                anyhow::anyhow!("{x}; fix: --groups must divide the experts and be a multiple of the nodes ({nodes})")
            })?;
            t.phy2log.iter().map(|p| to_placement(p, g, e)).collect::<Result<_, _>>()?
        }
        _ => loads.iter().map(|l| propose(alg, std::slice::from_ref(l), &start, &ctx)).collect(),
    };
    if a.eplb_json {
        println!("{}", serde_json::to_string_pretty(&from_placements(&placements))?);
        return Ok(());
    }
    let exact = if a.exact { Some(solve_exact(&a, &loads, &placements, slots)?) } else { None };
    if a.json {
        let mut v = json!({"algorithm": alg.name(), "gpus": g, "slots_per_gpu": slots, "placements": placements});
        if let Some(x) = &exact {
            v["exact"] = x.iter().enumerate().map(|(l, r)| r.json(l)).collect();
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{} on {g} GPUs x {slots} slots, {e} experts, {} layer(s):", alg.name(), loads.len());
    match &exact {
        None => println!("{:>6} {:>12} {:>14} {:>10}", "layer", "busiest/mean", "static b/mean", "replicas"),
        Some(_) => println!(
            "{:>6} {:>12} {:>14} {:>10} {:>12} {:>12} {:>8} {:>14} {:>8} {:>10}",
            "layer",
            "busiest/mean",
            "static b/mean",
            "replicas",
            "busiest",
            "exact",
            "gap %",
            "shares gap %",
            "optimal",
            "solve ms"
        ),
    }
    for (l, (p, w)) in placements.iter().zip(&loads).enumerate() {
        let reps: u32 = p.replica_counts().iter().map(|c| c - 1).sum();
        print!("{:>6} {:>12.3} {:>14.3} {:>10}", l, p.imbalance(w), start.imbalance(w), reps);
        match exact.as_ref().map(|x| &x[l]) {
            None => println!(),
            Some(r) => println!(
                " {:>12.1} {:>12.1} {:>8.2} {:>14.2} {:>8} {:>10.0}",
                r.heuristic,
                r.sol.max_load,
                r.gap_pct(r.heuristic),
                r.gap_pct(r.heuristic_with_shares),
                if r.sol.optimal { "yes" } else { "no" },
                r.sol.solve_ms
            ),
        }
    }
    if let Some(x) = &exact {
        let solver = x.first().map(|r| r.sol.solver).unwrap_or("none");
        println!(
            "busiest: the algorithm's busiest GPU (tokens); exact: the optimum with token shares ({solver}); gap: \
             (busiest - exact) / exact; shares gap: the same with the algorithm's replicas' shares balanced; \
             optimal no: time limit reached, exact is the best found (the gap is a lower bound)"
        );
    }
    Ok(())
}
