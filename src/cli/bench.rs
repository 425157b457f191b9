//! `switchyard bench`: benchmarks of Switchyard's own components, with a peer or ceiling in the same run.

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use switchyard_planner::space::for_each_plan;
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
    /// Timed repetitions per thread count (a first, warm-up run is reported separately).
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

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn planner(a: PlannerBenchArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let cluster = load_cluster(&a.cluster, Some(a.gpus))?;
    let workload = parse_workload(a.workload.as_deref(), model.moe.as_ref().and_then(|m| m.capacity_factor))?;
    let opts = SearchOptions { top: 10, ..Default::default() };
    let repeat = a.repeat.max(1);
    // The floor: enumerating the plan space without pricing anything.
    let enum_ms = median(
        (0..repeat)
            .map(|_| {
                let t = Instant::now();
                let mut n = 0u64;
                for_each_plan(&model, &cluster, &opts.space, |p| n += u64::from(p.tp > 0));
                std::hint::black_box(n);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let max_threads = rayon::current_num_threads();
    let mut runs = Vec::new();
    let mut result = None;
    for threads in [1, max_threads] {
        if threads == 1 && max_threads == 1 && !runs.is_empty() {
            break;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        let (first_ms, r) = pool.install(|| {
            let t = Instant::now();
            let r = search(&model, &cluster, &workload, &opts, &|_, _| {});
            (t.elapsed().as_secs_f64() * 1e3, r)
        });
        let times: Vec<f64> = (0..repeat)
            .map(|_| {
                pool.install(|| {
                    let t = Instant::now();
                    std::hint::black_box(search(&model, &cluster, &workload, &opts, &|_, _| {}));
                    t.elapsed().as_secs_f64() * 1e3
                })
            })
            .collect();
        let (med, min, max) = median(times);
        runs.push(
            json!({"threads": threads, "first_run_ms": first_ms, "median_ms": med, "min_ms": min, "max_ms": max}),
        );
        result = Some((r, med));
        if max_threads == 1 {
            break;
        }
    }
    let (r, med) = result.expect("at least one run");
    let single = runs[0]["median_ms"].as_f64().unwrap_or(med);
    let out = json!({
        "model": model.name, "cluster": cluster.name, "gpus": cluster.num_gpus(),
        "plans": r.enumerated, "fitting": r.fitting,
        "enumerate_only_median_ms": enum_ms.0,
        "runs": runs,
        "median_ms": med,
        "per_plan_us": med * 1e3 / r.enumerated.max(1) as f64,
        "speedup_vs_1_thread": single / med,
        "target_ms": 2000.0,
        "best_plan": r.plans.first().map(|p| p.layout.clone()),
        "best_iter_ms": r.plans.first().map(|p| p.predicted_iter_ms),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} on {} GPUs of {}: {} plans ({} fit in memory)",
        model.name,
        cluster.num_gpus(),
        cluster.name,
        r.enumerated,
        r.fitting
    );
    println!("  enumerate only (floor):   {:>8.1} ms median of {repeat}", enum_ms.0);
    for run in out["runs"].as_array().expect("runs") {
        println!(
            "  enumerate + price + rank: {:>8.1} ms median of {repeat} (min {:.1}, max {:.1}, first {:.1}) on {} thread(s)",
            run["median_ms"].as_f64().unwrap_or(0.0),
            run["min_ms"].as_f64().unwrap_or(0.0),
            run["max_ms"].as_f64().unwrap_or(0.0),
            run["first_run_ms"].as_f64().unwrap_or(0.0),
            run["threads"]
        );
    }
    println!(
        "  {:.2} us per plan; {:.2}x faster than 1 thread; {:.1}% of the 2 s target",
        med * 1e3 / r.enumerated.max(1) as f64,
        single / med,
        med / 2000.0 * 100.0
    );
    if let Some(p) = r.plans.first() {
        println!("  best: {} at {:.1} ms per iteration", p.layout, p.predicted_iter_ms);
    }
    Ok(())
}
