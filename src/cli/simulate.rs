//! `switchyard simulate`: replay a routing trace under one placement policy.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use switchyard_cost::cost::MoeLayerShape;
use switchyard_cost::{ClusterSpec, Placement, presets};
use switchyard_planner::online::{Algorithm, Frequency, LayerContext, PolicyConfig, Predictor};
use switchyard_planner::simulate::{SimOptions, SimResult, simulate};
use switchyard_planner::trace::{ReadOptions, Trace, read_trace};

use super::progress::LazyProgress;
use super::specs::{load_cluster, load_model};

/// Where the trace ran and what its experts are: shared by `simulate` and `report`.
#[derive(Debug, Args)]
pub struct SimSetup {
    /// Routing trace: a directory or .tar.gz of SmartMoE `table_iter*_rank*.log`, a .csv or a .jsonl.
    #[arg(long)]
    pub trace: PathBuf,
    /// Cluster (preset, spec or calibrated profile); resized to the trace's ranks.
    #[arg(long, conflicts_with = "gpus")]
    pub cluster: Option<String>,
    /// GPUs (the trace's ranks) when no --cluster is given: A100 nodes of --gpus-per-node.
    #[arg(long, requires = "gpus_per_node")]
    pub gpus: Option<u32>,
    /// GPUs per node with --gpus.
    #[arg(long)]
    pub gpus_per_node: Option<u32>,
    /// Model whose MoE layers the trace routes to (hidden size, expert FFN size, dtype). Default: the layer of
    /// a calibrated profile given as --cluster, else SmartMoE's benchmark layer (2048 -> 4096 -> 2048, fp16).
    #[arg(long)]
    pub model: Option<String>,
    /// Expert slots per GPU (default: experts / GPUs, permutation only).
    #[arg(long)]
    pub slots: Option<usize>,
    /// Predictor of the next window's load: `last`, `mean:W` (mean of the last W snapshots) or `ema:A`.
    #[arg(long, default_value = "mean:4")]
    pub predictor: String,
    /// Decide with the load about to be played (an oracle) instead of past loads only.
    #[arg(long)]
    pub oracle: bool,
    /// Split replicated experts' tokens evenly (as EPLB and FasterMoE do) instead of recomputing the replicas'
    /// token shares from each iteration's routed counts at dispatch time (Switchyard's default).
    #[arg(long)]
    pub even_shares: bool,
    /// Skip broken lines of the trace and report them instead of failing.
    #[arg(long)]
    pub lenient: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Arguments of `switchyard simulate`.
#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[command(flatten)]
    setup: SimSetup,
    /// Placement algorithm: static, smartmoe, fastermoe, eplb, eplb-hierarchical or switchyard.
    #[arg(long, default_value = "switchyard")]
    algorithm: String,
    /// Re-planning frequency: `N` iterations (dyn.N; 0 = never) or `auto`.
    #[arg(long = "dyn", default_value = "10")]
    dyn_n: String,
    /// Write per-snapshot records to this file (.csv or .jsonl).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print JSON (`{"summary": {...}}`).
    #[arg(long)]
    json: bool,
}

/// A loaded simulation setup.
pub struct Loaded {
    /// The trace.
    pub trace: Trace,
    /// One context per layer.
    pub ctx: Vec<LayerContext>,
    /// Initial (contiguous) placements.
    pub initial: Vec<Placement>,
    /// The predictor.
    pub predictor: Predictor,
    /// Slots per GPU.
    pub slots: usize,
    /// Cluster used.
    pub cluster: ClusterSpec,
}

/// Parses `last`, `mean:W`, `ema:A`.
pub fn parse_predictor(s: &str) -> Result<Predictor> {
    let (k, v) = s.split_once(':').unwrap_or((s, ""));
    Ok(match k {
        "last" => Predictor::Last,
        "mean" => Predictor::WindowMean {
            window: v
                .parse()
                .ok()
                .filter(|&w| w > 0)
                .with_context(|| format!("--predictor {s}: fix: mean:W with W >= 1"))?,
        },
        "ema" => Predictor::Ema {
            alpha: v
                .parse()
                .ok()
                .filter(|a: &f64| *a > 0.0 && *a <= 1.0)
                .with_context(|| format!("--predictor {s}: fix: ema:A with 0 < A <= 1"))?,
        },
        _ => bail!("--predictor {s}: unknown; fix: last, mean:W or ema:A"),
    })
}

/// Parses an algorithm name.
pub fn parse_algorithm(s: &str) -> Result<Algorithm> {
    Algorithm::parse(s).with_context(|| {
        format!(
            "--algorithm {s}: unknown; fix: one of {}",
            Algorithm::ALL.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
        )
    })
}

/// Parses a frequency.
pub fn parse_frequency(s: &str) -> Result<Frequency> {
    Frequency::parse(s).with_context(|| format!("--dyn {s}: fix: a number of iterations (0 = never) or auto"))
}

/// Loads the trace, the cluster and the layer shape.
pub fn load(setup: &SimSetup) -> Result<Loaded> {
    let opts = ReadOptions { lenient: setup.lenient, ..Default::default() };
    let (trace, skipped) = read_trace(&setup.trace, &opts)?;
    for s in skipped.iter().take(10) {
        eprintln!("warning: skipped {s}");
    }
    if skipped.len() > 10 {
        eprintln!("warning: ... and {} more skipped", skipped.len() - 10);
    }
    if trace.snapshots.is_empty() {
        bail!("{}: the trace has no snapshots", setup.trace.display());
    }
    let ranks = trace.ranks as u32;
    let mut layer = None;
    let cluster = match (&setup.cluster, setup.gpus) {
        (Some(c), _) => {
            if std::path::Path::new(c).exists()
                && let Ok(text) = std::fs::read_to_string(c)
                && let Ok(p) = serde_json::from_str::<switchyard_cost::calibrate::CalibratedProfile>(&text)
            {
                layer = Some(p.layer);
            }
            let c = load_cluster(c, None)?;
            if c.num_gpus() == ranks {
                c
            } else {
                load_cluster(&c.name.clone(), Some(ranks))
                    .or_else(|_| c.with_gpus(ranks, &switchyard_cost::Source::Inline).map_err(anyhow::Error::from))?
            }
        }
        (None, Some(g)) => {
            let k = setup.gpus_per_node.unwrap_or(8);
            if g != ranks {
                bail!("--gpus {g}: the trace has {ranks} ranks; fix: --gpus {ranks}");
            }
            if k == 0 || g % k != 0 {
                bail!("--gpus-per-node {k}: must divide --gpus {g}");
            }
            let mut c = presets::cluster("smartmoe-a100").expect("preset");
            c.nodes = g / k;
            c.gpus_per_node = k;
            c.name = format!("{} x {k} A100", g / k);
            c
        }
        (None, None) => bail!("name the hardware: --cluster C, or --gpus G --gpus-per-node K"),
    };
    if cluster.num_gpus() != ranks {
        bail!(
            "the cluster has {} GPUs but the trace {ranks} ranks; fix: a cluster of {ranks} GPUs",
            cluster.num_gpus()
        );
    }
    let shape = match &setup.model {
        Some(m) => {
            let model = load_model(m)?;
            let Some(moe) = &model.moe else { bail!("--model {m}: a dense model has no experts to place") };
            MoeLayerShape {
                d_model: model.hidden_size,
                d_ffn: moe.expert_ffn_hidden,
                gated: moe.gated,
                act_bytes: model.dtype.comm_bytes(),
                param_bytes: model.dtype.bytes().max(2),
                grad_bytes: 4,
                peak_flops: cluster.gpu.peak_flops(model.dtype),
            }
        }
        None => {
            let l = layer.unwrap_or_default();
            MoeLayerShape {
                d_model: l.d_model,
                d_ffn: l.d_ffn,
                gated: l.gated,
                act_bytes: l.dtype.comm_bytes(),
                param_bytes: l.dtype.bytes().max(2),
                grad_bytes: 4,
                peak_flops: cluster.gpu.peak_flops(l.dtype),
            }
        }
    };
    let g = trace.ranks;
    let e = trace.experts;
    let slots = setup.slots.unwrap_or(e.div_ceil(g));
    if slots * g < e {
        bail!(
            "--slots {slots}: {g} GPUs x {slots} slots cannot hold {e} experts; fix: --slots {} or more",
            e.div_ceil(g)
        );
    }
    let mut ctx1 = LayerContext::for_cluster(&cluster, shape, g, slots, trace.micro_batches.max(1));
    ctx1.dynamic_shares = !setup.even_shares;
    let ctx = vec![ctx1; trace.layers];
    let initial = vec![Placement::contiguous(g, slots, e)?; trace.layers];
    Ok(Loaded { trace, ctx, initial, predictor: parse_predictor(&setup.predictor)?, slots, cluster })
}

/// Runs one simulation with a progress bar.
pub fn run_one(l: &Loaded, alg: Algorithm, freq: Frequency, oracle: bool, quiet: bool) -> SimResult {
    let bar = LazyProgress::new(&format!("{} {}", alg.name(), freq.label()), quiet);
    let opts = SimOptions { policy: PolicyConfig { algorithm: alg, frequency: freq, predictor: l.predictor }, oracle };
    // Only Switchyard's replicas take token shares; the baselines split evenly, as published.
    let ctx: Vec<LayerContext> = l
        .ctx
        .iter()
        .map(|c| LayerContext { dynamic_shares: c.dynamic_shares && alg.uses_token_shares(), ..c.clone() })
        .collect();
    let r = simulate(&l.trace, &l.initial, &ctx, &opts, &|d, t| bar.update(d as u64, t as u64));
    bar.finish();
    r
}

/// Runs `switchyard simulate`.
pub fn run(a: SimulateArgs) -> Result<()> {
    let alg = parse_algorithm(&a.algorithm)?;
    let freq = parse_frequency(&a.dyn_n)?;
    let l = load(&a.setup)?;
    let r = run_one(&l, alg, freq, a.setup.oracle, a.setup.quiet || a.json);
    if let Some(out) = &a.out {
        write_records(out, &r)?;
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"summary": r.summary, "slots_per_gpu": l.slots, "cluster": l.cluster.name})
            )?
        );
        return Ok(());
    }
    let s = &r.summary;
    println!(
        "{}: {} snapshots of {} ({} layers, {} GPUs, {} experts, {} slots per GPU) on {}",
        s.label, s.snapshots, l.trace.source, l.trace.layers, l.trace.ranks, l.trace.experts, l.slots, l.cluster.name
    );
    println!(
        "  snapshots are {} iterations apart: each stands for the {} iterations up to the next; decisions happen at snapshots",
        s.snapshot_interval, s.snapshot_interval
    );
    println!("  busiest GPU / mean load: mean {:.3}, p95 {:.3}", s.mean_imbalance, s.p95_imbalance);
    println!(
        "  modelled MoE time per iteration: {:.2} ms against a perfect-balance bound of {:.2} ms ({:.3}x, migrations included)",
        s.mean_iter_ms, s.mean_bound_ms, s.ratio_to_bound
    );
    println!(
        "  {} decisions, {} switches, {:.2} GB moved ({:.1} MB per decision), {:.1} ms migrating",
        s.decisions,
        s.switches,
        s.bytes_moved / 1e9,
        s.bytes_per_decision / 1e6,
        s.migration_ms
    );
    if let Some(out) = &a.out {
        println!("  per-snapshot records: {}", out.display());
    }
    Ok(())
}

/// Writes per-snapshot records as CSV or JSON Lines.
pub fn write_records(path: &std::path::Path, r: &SimResult) -> Result<()> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let mut s = String::new();
    if ext == "csv" {
        s.push_str(
            "iteration,span,iter_ms,bound_ms,mean_imbalance,max_imbalance,decided,switched,bytes_moved,migration_ms\n",
        );
        for x in &r.snapshots {
            let mean = x.imbalance.iter().sum::<f64>() / x.imbalance.len().max(1) as f64;
            let max = x.imbalance.iter().copied().fold(0.0, f64::max);
            s.push_str(&format!(
                "{},{},{:.4},{:.4},{:.4},{:.4},{},{},{:.0},{:.4}\n",
                x.iteration,
                x.span,
                x.iter_ms,
                x.bound_ms,
                mean,
                max,
                x.decided,
                x.switched,
                x.bytes_moved,
                x.migration_ms
            ));
        }
    } else {
        for x in &r.snapshots {
            s.push_str(&serde_json::to_string(x)?);
            s.push('\n');
        }
    }
    std::fs::write(path, s).with_context(|| format!("cannot write {}", path.display()))
}
