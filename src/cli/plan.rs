//! `switchyard plan`: rank every layout of a model on a cluster, and build the pool of the best.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;
use switchyard_cost::Workload;
use switchyard_planner::export::{ExportTarget, export};
use switchyard_planner::pool::build_pool;
use switchyard_planner::{RankedPlan, SearchOptions, SpaceOptions, search};

use super::progress::LazyProgress;
use super::specs::{load_cluster, load_model};

/// Arguments of `switchyard plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Model: a preset name (`switchyard presets`), a model spec JSON, or a Hugging Face config.json.
    #[arg(long, short)]
    model: String,
    /// Cluster: a preset name or a cluster spec JSON.
    #[arg(long, short)]
    cluster: String,
    /// Use this many GPUs of the cluster's kind (a multiple of the node size).
    #[arg(long)]
    gpus: Option<u32>,
    /// Expected routing load: `uniform`, `capacity:F` (busiest GPU at F x the mean), `zipf:S` (skewed), or
    /// `trace:PATH` (mean loads of a routing trace). Default: the model's capacity bound, else uniform.
    #[arg(long, short)]
    workload: Option<String>,
    /// How many plans to show.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Print JSON (`{"plans": [...]}`, best first) instead of a table.
    #[arg(long)]
    json: bool,
    /// Print the launch arguments of the chosen plan for a training framework instead of the table.
    #[arg(long, value_enum)]
    export: Option<ExportArg>,
    /// Which ranked plan `--export` prints (1 = best).
    #[arg(long, default_value_t = 1)]
    rank: usize,
    /// Spare (replica) expert slots per GPU to consider.
    #[arg(long, default_value_t = 3)]
    max_spare_slots: u32,
    /// Largest micro-batch size (sequences) to consider.
    #[arg(long, default_value_t = 16)]
    max_micro_batch: u32,
    /// Do not consider expert tensor parallelism.
    #[arg(long)]
    no_expert_tp: bool,
    /// Do not consider expert fetch (data-centric MoE).
    #[arg(long)]
    no_expert_fetch: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ExportArg {
    Megatron,
    Deepspeed,
}

/// Parses `--workload`.
pub fn parse_workload(arg: Option<&str>, capacity: Option<f64>) -> Result<Workload> {
    let Some(s) = arg else {
        return Ok(match capacity {
            Some(cf) => Workload::CapacityBound { capacity_factor: cf },
            None => Workload::Uniform,
        });
    };
    let (kind, value) = s.split_once(':').unwrap_or((s, ""));
    let num = |what: &str| -> Result<f64> {
        let v: f64 = value
            .parse()
            .with_context(|| format!("--workload {s}: `{value}` is not a number; fix: write e.g. `{kind}:{what}`"))?;
        if !v.is_finite() || v < 0.0 {
            bail!("--workload {s}: must be a non-negative number; fix: write e.g. `{kind}:{what}`");
        }
        Ok(v)
    };
    Ok(match kind {
        "uniform" => Workload::Uniform,
        "capacity" => {
            let cf = num("1.25")?;
            if cf < 1.0 {
                bail!(
                    "--workload {s}: a capacity bound below 1 is impossible; fix: use a factor >= 1, e.g. capacity:1.25"
                );
            }
            Workload::CapacityBound { capacity_factor: cf }
        }
        "zipf" => Workload::Skewed { zipf_s: num("1.2")? },
        "trace" => {
            if value.is_empty() {
                bail!("--workload trace: needs a path; fix: `trace:PATH` (a trace directory, .tar.gz, .csv or .jsonl)");
            }
            let (trace, _) = switchyard_planner::trace::read_trace(
                std::path::Path::new(value),
                &switchyard_planner::trace::ReadOptions::default(),
            )?;
            Workload::Measured {
                source: value.to_string(),
                layer_fractions: switchyard_planner::trace::mean_expert_fractions(&trace),
            }
        }
        _ => bail!("--workload {s}: unknown kind `{kind}`; fix: use uniform, capacity:F, zipf:S or trace:PATH"),
    })
}

fn gib(b: f64) -> f64 {
    b / (1u64 << 30) as f64
}

fn table(plans: &[RankedPlan]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:>4}  {:<62} {:>5} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>11}\n",
        "rank", "layout", "slots", "ms/iter", "compute", "a2a", "tp+pp", "bubble", "sync+opt", "GiB/GPU", "tokens/s"
    ));
    for p in plans {
        let b = &p.cost.breakdown;
        out.push_str(&format!(
            "{:>4}  {:<62} {:>5} {:>10.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>8.1} {:>11.0}\n",
            p.rank,
            p.layout,
            p.plan.slots_per_gpu,
            p.predicted_iter_ms,
            b.dense_compute_ms + b.expert_compute_ms,
            b.all_to_all_ms + b.expert_fetch_ms,
            b.tp_comm_ms + b.pp_p2p_ms,
            b.pp_bubble_ms,
            b.dp_sync_ms + b.edp_sync_ms + b.replica_sync_ms + b.optimizer_ms,
            p.memory_gib_per_gpu,
            p.tokens_per_s,
        ));
    }
    out
}

/// Runs `switchyard plan`.
pub fn run(a: PlanArgs) -> Result<()> {
    let start = Instant::now();
    let model = load_model(&a.model)?;
    let cluster = load_cluster(&a.cluster, a.gpus)?;
    let workload = parse_workload(a.workload.as_deref(), model.moe.as_ref().and_then(|m| m.capacity_factor))?;
    let opts = SearchOptions {
        space: SpaceOptions {
            max_spare_slots: a.max_spare_slots,
            max_micro_batch_size: a.max_micro_batch.max(1),
            expert_tp: !a.no_expert_tp,
            expert_fetch: !a.no_expert_fetch,
        },
        top: a.top.max(a.rank).max(1),
    };
    let bar = LazyProgress::new("pricing plans", a.quiet || a.json);
    let result = search(&model, &cluster, &workload, &opts, &|d, t| bar.update(d, t));
    bar.finish();
    let gpus = cluster.num_gpus();
    if result.plans.is_empty() {
        if result.enumerated == 0 {
            bail!(
                "model {} has no valid layout on {gpus} GPUs ({} per node): global_batch {} sequences, {} heads, {} layers \
                 admit no tp*pp*dp = {gpus}; fix: use a GPU count that divides the batch, or change global_batch",
                model.name,
                cluster.gpus_per_node,
                model.global_batch,
                model.attention.num_heads(),
                model.num_layers
            );
        }
        let lm = result.least_memory.as_ref().expect("plans were enumerated");
        bail!(
            "model {} fits no layout of {} ({gpus} GPUs): of {} valid plans the leanest, {}, needs {:.1} GiB per GPU \
             against {:.0} GiB; fix: use more GPUs (--gpus), a smaller global_batch or seq_len, or GPUs with more memory",
            model.name,
            cluster.name,
            result.enumerated,
            lm.layout,
            lm.memory_gib_per_gpu,
            cluster.gpu.memory_gib
        );
    }
    if let Some(target) = a.export {
        let Some(chosen) = result.plans.get(a.rank.max(1) - 1) else {
            bail!(
                "--rank {}: only {} plans fit; fix: choose a rank up to {}",
                a.rank,
                result.plans.len(),
                result.plans.len()
            );
        };
        let t = match target {
            ExportArg::Megatron => ExportTarget::Megatron,
            ExportArg::Deepspeed => ExportTarget::Deepspeed,
        };
        println!("{}", export(&model, &chosen.plan, t));
        return Ok(());
    }
    let best = &result.plans[0];
    let pool = build_pool(&model, &best.plan, &workload)?;
    let elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    let shown: Vec<RankedPlan> = result.plans.iter().take(a.top.max(1)).cloned().collect();
    if a.json {
        let v = json!({
            "model": model.name,
            "cluster": cluster.name,
            "gpus": gpus,
            "workload": result.workload,
            "enumerated": result.enumerated,
            "fitting": result.fitting,
            "elapsed_ms": elapsed_ms,
            "plans": shown,
            "pool": pool,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "{} on {} x {} ({} GPUs, {} per node), workload {}",
        model.name, cluster.name, cluster.nodes, gpus, cluster.gpus_per_node, result.workload
    );
    print!("{}", table(&shown));
    println!(
        "{} valid plans, {} fit in {:.0} GiB per GPU; planned in {:.0} ms",
        result.enumerated, result.fitting, cluster.gpu.memory_gib, elapsed_ms
    );
    let m = &best.cost.memory;
    println!(
        "best: {:.1} GiB per GPU = weights {:.1} + grads {:.1} + optimizer {:.1} + activations {:.1} + buffers {:.1} + reserve {:.1}",
        best.memory_gib_per_gpu,
        gib(m.weights_bytes),
        gib(m.grads_bytes),
        gib(m.optimizer_bytes),
        gib(m.activations_bytes),
        gib(m.comm_buffers_bytes),
        gib(m.reserved_bytes)
    );
    if let Some(pool) = pool {
        let seeds: Vec<String> = pool
            .placements
            .iter()
            .map(|p| match p.layer {
                Some(l) => format!("{}[layer {l}] {:.2}x", p.name, p.expected_imbalance),
                None => format!("{} {:.2}x", p.name, p.expected_imbalance),
            })
            .take(6)
            .collect();
        println!(
            "pool of #1: {} GPUs per expert group x {} slots ({} experts, {} replica slots); seed placements (busiest/mean): {}{}",
            pool.slots.ep,
            pool.slots.slots_per_gpu,
            pool.slots.experts,
            pool.slots.ep * pool.slots.slots_per_gpu - pool.slots.experts,
            seeds.join(", "),
            if pool.placements.len() > 6 { ", ..." } else { "" }
        );
    }
    Ok(())
}
