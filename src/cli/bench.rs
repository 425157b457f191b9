//! `switchyard bench`: benchmarks of Switchyard's own components, with a peer or ceiling in the same run.

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use switchyard_planner::{SearchOptions, search};

use super::plan::parse_workload;
use super::specs::{load_cluster, load_model};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the planner: enumerate and price every plan of a model on a cluster.
    Planner(PlannerBenchArgs),
}

/// Arguments of `switchyard bench planner`.
#[derive(Debug, Args)]
pub struct PlannerBenchArgs {
    /// Model preset or file.
    #[arg(long, short, default_value = "deepseek-v3")]
    model: String,
    /// Cluster preset or file.
    #[arg(long, short, default_value = "dgx-h100")]
    cluster: String,
    /// GPUs.
    #[arg(long, default_value_t = 1024)]
    gpus: u32,
    /// Expected workload (as for `plan`).
    #[arg(long, short)]
    workload: Option<String>,
    /// Timed repetitions (the first run is a warm-up and is reported separately).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Planner(a) => planner(a),
    }
}

fn planner(a: PlannerBenchArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let cluster = load_cluster(&a.cluster, Some(a.gpus))?;
    let workload = parse_workload(a.workload.as_deref(), model.moe.as_ref().and_then(|m| m.capacity_factor))?;
    let opts = SearchOptions { top: 10, ..Default::default() };
    let run_once = || {
        let t = Instant::now();
        let r = search(&model, &cluster, &workload, &opts, &|_, _| {});
        (t.elapsed().as_secs_f64() * 1e3, r)
    };
    let (first_ms, r) = run_once();
    let mut times: Vec<f64> = (0..a.repeat.max(1)).map(|_| run_once().0).collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let threads = rayon::current_num_threads();
    let per_plan_us = median * 1e3 / r.enumerated.max(1) as f64;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "model": model.name, "cluster": cluster.name, "gpus": cluster.num_gpus(), "threads": threads,
                "plans": r.enumerated, "fitting": r.fitting, "first_run_ms": first_ms, "median_ms": median,
                "min_ms": times[0], "max_ms": times[times.len() - 1], "per_plan_us": per_plan_us,
                "best_plan": r.plans.first().map(|p| p.layout.clone()),
                "best_iter_ms": r.plans.first().map(|p| p.predicted_iter_ms),
            }))?
        );
    } else {
        println!(
            "{} on {} GPUs of {}: {} plans ({} fit) enumerated and priced in {:.0} ms median of {} (min {:.0}, max {:.0}; first run {:.0} ms), {:.2} us per plan, {} threads",
            model.name,
            cluster.num_gpus(),
            cluster.name,
            r.enumerated,
            r.fitting,
            median,
            times.len(),
            times[0],
            times[times.len() - 1],
            first_ms,
            per_plan_us,
            threads
        );
        if let Some(p) = r.plans.first() {
            println!("best: {} at {:.1} ms per iteration", p.layout, p.predicted_iter_ms);
        }
    }
    Ok(())
}
