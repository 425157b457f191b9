//! `switchyard place`: one placement per MoE layer from per-expert loads, with any algorithm.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;
use switchyard_cost::Placement;
use switchyard_planner::online::{Algorithm, LayerContext, propose};
use switchyard_planner::placement::eplb::from_placements;

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
}

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
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"algorithm": alg.name(), "gpus": g, "slots_per_gpu": slots, "placements": placements})
            )?
        );
        return Ok(());
    }
    println!("{} on {g} GPUs x {slots} slots, {e} experts, {} layer(s):", alg.name(), loads.len());
    println!("{:>6} {:>12} {:>14} {:>10}", "layer", "busiest/mean", "static b/mean", "replicas");
    for (l, (p, w)) in placements.iter().zip(&loads).enumerate() {
        let reps: u32 = p.replica_counts().iter().map(|c| c - 1).sum();
        println!("{:>6} {:>12.3} {:>14.3} {:>10}", l, p.imbalance(w), start.imbalance(w), reps);
    }
    Ok(())
}
