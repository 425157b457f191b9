//! `switchyard train`: trains a small GPT-style MoE model on in-process workers (or MPI ranks with
//! the `mpi` feature), re-placing experts with the online policy.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use switchyard_kernels::{Activation, CapacityPolicy};
use switchyard_planner::online::{Algorithm, Frequency};
use switchyard_runtime::trainer::{FaultSpec, StepMetrics, TrainConfig, TrainDevice, TrainSummary};

use super::progress::LazyProgress;
use super::simulate::parse_predictor;

/// Flags of `switchyard train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Workers: in-process threads (default 4), or MPI ranks (default: the rank count `mpirun -np N` started).
    #[arg(long)]
    workers: Option<usize>,
    /// Communicator: local (in-process worker threads), mpi (this process is one rank of `mpirun -np N`; needs
    /// a build with `--features mpi`), nccl (in-process workers, one per GPU, exchanging through NCCL; needs
    /// --device cuda and libnccl) or auto (mpi when started by mpirun in a build with MPI, else local).
    #[arg(long, default_value = "auto")]
    comm: String,
    /// Logical experts per MoE layer.
    #[arg(long, default_value_t = 16)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Slots per worker (default: experts / workers, rounded up; more slots hold replicas of hot experts).
    #[arg(long)]
    slots: Option<usize>,
    /// Re-planning frequency: 0 (never), N (dyn.N: decide every N steps) or auto (when it pays).
    #[arg(long = "dyn", default_value = "10")]
    dyn_freq: String,
    /// Placement algorithm: static, smartmoe, fastermoe, eplb, eplb-hierarchical, switchyard.
    #[arg(long, default_value = "switchyard")]
    algorithm: String,
    /// Load predictor: last, mean:W or ema:A.
    #[arg(long, default_value = "mean:4")]
    predictor: String,
    /// Training steps.
    #[arg(long, default_value_t = 200)]
    steps: u64,
    /// Seed of the weights, the data and the generated corpus.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// A UTF-8 text file to train on (default: a corpus generated at run time).
    #[arg(long)]
    text: Option<PathBuf>,
    /// Model width.
    #[arg(long, default_value_t = 64)]
    d_model: usize,
    /// Expert hidden width.
    #[arg(long, default_value_t = 128)]
    d_ffn: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Transformer blocks (each with an MoE FFN).
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 32)]
    ctx: usize,
    /// Sequences per step over all workers (a multiple of --workers).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Learning rate (Adam).
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Expert FFN: gelu or swiglu.
    #[arg(long, default_value = "gelu")]
    activation: String,
    /// Router capacity: dropless, or a capacity factor (tokens over capacity are dropped).
    #[arg(long, default_value = "dropless")]
    capacity: String,
    /// Skew of the routing (a fixed selection bias making low-numbered experts popular; 0: none).
    #[arg(long, default_value_t = 0.0)]
    route_skew: f32,
    /// How MoE layers meet their tokens: token (the all-to-all: tokens travel to the experts) or fetch (the
    /// data-centric, Janus-style mode: the weights of the experts a worker's tokens need travel to it, once
    /// per node, and their gradients go back); one mode for every layer or a comma-separated list, one per layer.
    #[arg(long, default_value = "token")]
    dispatch: String,
    /// Workers per node (consecutive ranks) for the data-centric mode's once-per-node fetch (default: all
    /// workers on one node).
    #[arg(long)]
    workers_per_node: Option<usize>,
    /// Expert-data-parallel groups: the workers form this many expert-parallel groups of consecutive ranks, each
    /// holding every expert (its tokens go to its own group's experts); expert gradients are summed over the
    /// groups. Must divide the worker count.
    #[arg(long, default_value_t = 1)]
    edp: usize,
    /// Compute threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Timeout of every collective, seconds: a dead or stuck worker ends the run with an error after it.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Device: cpu, cuda or auto (auto runs on CPU when no CUDA driver is found, and says so).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Price placements with this calibrated profile (from `switchyard profile --out` or `calibrate --out`)
    /// instead of a quick measurement at start-up.
    #[arg(long)]
    profile: Option<PathBuf>,
    /// Write per-step metrics as JSON Lines here.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Write the loss curve as <STEM>.png and <STEM>.svg.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Inject a migration fault (demonstrates rollback): corrupt:RANK or fail:RANK.
    #[arg(long)]
    inject_migration_fault: Option<String>,
    /// Print the summary as one JSON object on the last line.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// Where the workers run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum CommMode {
    /// In-process worker threads.
    Local,
    /// This process is one of `size` MPI ranks.
    Mpi { size: usize },
}

/// The rank count of the MPI job that started this process (Open MPI's or a PMI launcher's variable), if any.
fn mpi_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"].iter().find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

pub(super) fn comm_mode(comm: &str) -> Result<CommMode> {
    let launched = mpi_world_size();
    match (comm, launched) {
        ("local", _) | ("auto", None) => Ok(CommMode::Local),
        ("auto", Some(size)) if cfg!(feature = "mpi") => Ok(CommMode::Mpi { size }),
        ("auto", Some(_)) => Ok(CommMode::Local),
        ("mpi", _) if !cfg!(feature = "mpi") => bail!(
            "--comm mpi: this switchyard was built without MPI; fix: cargo build --release --features mpi \
             (needs libopenmpi-dev, openmpi-bin and libclang-dev), then mpirun -np N switchyard train ..."
        ),
        ("mpi", None) => bail!(
            "--comm mpi: this process was not started by mpirun (no OMPI_COMM_WORLD_SIZE or PMI_SIZE); fix: \
             mpirun -np N switchyard train --comm mpi ..."
        ),
        ("mpi", Some(size)) => Ok(CommMode::Mpi { size }),
        (o, _) => bail!("--comm {o}: unknown; fix: local, mpi or auto"),
    }
}

fn config(a: &TrainArgs, mode: CommMode) -> Result<TrainConfig> {
    let workers = match (mode, a.workers) {
        (CommMode::Local, w) => w.unwrap_or(4),
        (CommMode::Mpi { size }, None) => size,
        (CommMode::Mpi { size }, Some(w)) if w == size => w,
        (CommMode::Mpi { size }, Some(w)) => {
            bail!("--workers {w}: mpirun started {size} ranks; fix: --workers {size}, or leave --workers out")
        }
    };
    let frequency = Frequency::parse(&a.dyn_freq)
        .with_context(|| format!("--dyn {}: fix: 0 (never), a number of steps, or auto", a.dyn_freq))?;
    let algorithm = Algorithm::parse(&a.algorithm).with_context(|| {
        format!(
            "--algorithm {}: unknown; fix: one of {}",
            a.algorithm,
            Algorithm::ALL.iter().map(|x| x.name()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let activation = match a.activation.as_str() {
        "gelu" => Activation::Gelu,
        "swiglu" => Activation::SwiGlu,
        o => bail!("--activation {o}: unknown; fix: gelu or swiglu"),
    };
    let capacity = match a.capacity.as_str() {
        "dropless" => CapacityPolicy::Dropless,
        f => CapacityPolicy::Fixed {
            factor: f
                .parse::<f32>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .with_context(|| format!("--capacity {f}: fix: dropless or a factor > 0 such as 1.25"))?,
        },
    };
    let migration = match a.inject_migration_fault.as_deref() {
        None => None,
        Some(s) => {
            let (k, r) = s.split_once(':').unwrap_or((s, ""));
            let rank: usize = r.parse().ok().filter(|&r| r < workers).with_context(|| {
                format!("--inject-migration-fault {s}: fix: corrupt:RANK or fail:RANK with RANK < {workers}")
            })?;
            Some(match k {
                "corrupt" => FaultSpec::Corrupt(rank),
                "fail" => FaultSpec::Fail(rank),
                _ => bail!("--inject-migration-fault {s}: fix: corrupt:RANK or fail:RANK"),
            })
        }
    };
    let cfg = TrainConfig {
        workers,
        threads_per_worker: a.threads,
        experts: a.experts,
        top_k: a.top_k,
        slots_per_worker: a.slots.unwrap_or_else(|| a.experts.div_ceil((workers / a.edp.max(1)).max(1))),
        d_model: a.d_model,
        d_ffn: a.d_ffn,
        n_heads: a.heads,
        n_layers: a.layers,
        ctx: a.ctx,
        global_batch: a.batch,
        steps: a.steps,
        seed: a.seed,
        lr: a.lr,
        activation,
        capacity,
        route_skew: a.route_skew,
        algorithm,
        frequency,
        predictor: parse_predictor(&a.predictor)?,
        text: a.text.clone(),
        timeout_s: a.timeout_s,
        cluster: match &a.profile {
            Some(p) => Some(super::calibrate::read_profile(p)?.cluster),
            None => None,
        },
        faults: switchyard_runtime::trainer::Faults { migration, ..Default::default() },
        dispatch: parse_dispatch(&a.dispatch)?,
        workers_per_node: a.workers_per_node.unwrap_or(0),
        edp: a.edp,
        ..TrainConfig::default()
    };
    if a.edp == 0 {
        bail!("--edp 0: must be at least 1 (1: one expert-parallel group of all workers)");
    }
    if a.workers_per_node == Some(0) {
        bail!("--workers-per-node 0: must be at least 1 (leave it out for one node)");
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(t) = &a.text {
        std::fs::metadata(t).with_context(|| format!("--text {}: cannot read the file", t.display()))?;
    }
    Ok(cfg)
}

/// `--dispatch`: `token`, `fetch`, or a comma-separated mode per layer.
fn parse_dispatch(s: &str) -> Result<Vec<switchyard_cost::DispatchMode>> {
    s.split(',')
        .map(|m| match m.trim() {
            "token" | "tokens" | "all-to-all" => Ok(switchyard_cost::DispatchMode::Token),
            "fetch" | "expert-fetch" | "data-centric" => Ok(switchyard_cost::DispatchMode::ExpertFetch),
            o => bail!("--dispatch {s}: unknown mode {o:?}; fix: token or fetch, or one per layer (token,fetch)"),
        })
        .collect()
}

/// `--device`: where the expert FFNs run, and the line to print when `auto` chose (or fell back).
fn train_device(device: &str) -> Result<(TrainDevice, Option<String>)> {
    use switchyard_kernels::cuda::{Device, DeviceRequest};
    let request = super::device::parse(device)?;
    match request {
        DeviceRequest::Cuda(n) if n > 0 => bail!(
            "--device {device}: the trainer picks each worker's GPU itself (worker r uses GPU r mod count); fix: --device cuda"
        ),
        _ => {}
    }
    let auto = request == DeviceRequest::Auto;
    let choice = super::device::choose(device, request)?;
    Ok(match choice.device {
        Device::Cpu if auto => (
            TrainDevice::Cpu,
            Some(format!(
                "--device auto: no usable GPU, the experts run on the CPU ({})",
                super::device::cpu_reason(&choice)
            )),
        ),
        Device::Cpu => (TrainDevice::Cpu, None),
        Device::Cuda(_) => (
            TrainDevice::Cuda,
            Some(format!(
                "--device {device}: the expert FFNs run on the GPU ({}; worker r on GPU r mod count); the dense model, routing and Adam on the CPU",
                choice.reason
            )),
        ),
    })
}

/// Runs `switchyard train`.
pub fn run(a: TrainArgs) -> Result<()> {
    // `--comm nccl`: in-process workers, one per GPU, exchanging through NCCL.
    let nccl = a.comm == "nccl";
    let mode = if nccl { CommMode::Local } else { comm_mode(&a.comm)? };
    let mut cfg = config(&a, mode)?;
    let (device, note) = train_device(&a.device)?;
    if nccl && device != TrainDevice::Cuda {
        bail!(
            "--comm nccl: NCCL moves data between GPUs, but the experts would run on the CPU (--device {}); fix: --device cuda on a machine with GPUs, or --comm local",
            a.device
        );
    }
    cfg.device = device;
    if let Some(n) = note.filter(|_| mode == CommMode::Local || mpi_rank().is_none_or(|r| r == 0)) {
        eprintln!("{n}");
    }
    // Under MPI only rank 0 writes (the other ranks would truncate the same file).
    let reports = mode == CommMode::Local || mpi_rank().is_none_or(|r| r == 0);
    let mut metrics_out = match a.metrics.as_ref().filter(|_| reports) {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("--metrics {}: cannot create the file", p.display()))?,
        )),
        None => None,
    };
    let progress = LazyProgress::new("training", a.quiet || a.json);
    let lines = std::sync::Mutex::new(Vec::<StepMetrics>::new());
    let on_step = |m: &StepMetrics| {
        progress.update(m.step + 1, cfg.steps);
        if let Ok(mut l) = lines.lock() {
            l.push(m.clone());
        }
    };
    let result = match mode {
        CommMode::Local if nccl => {
            switchyard_runtime::trainer::train_nccl_threads(&cfg, &on_step).map(|mut r| r.swap_remove(0))
        }
        CommMode::Local => switchyard_runtime::trainer::train_local(&cfg, &on_step).map(|mut r| r.swap_remove(0)),
        CommMode::Mpi { .. } => {
            let (rank, r) = train_on_mpi(&cfg, &on_step)?;
            if rank != 0 {
                // Rank 0 reports for the job.
                return Ok(());
            }
            Ok(r)
        }
    };
    progress.finish();
    let worker0 = match result {
        Ok(r) => r,
        Err(errs) => {
            for (rank, e) in &errs {
                eprintln!("worker {rank}: {e}");
            }
            bail!("training failed on {} of {} workers", errs.len(), cfg.workers);
        }
    };
    let steps = lines.into_inner().unwrap_or_default();
    if let Some(out) = metrics_out.as_mut() {
        for m in &steps {
            serde_json::to_writer(&mut *out, m)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
    }
    let summary: &TrainSummary = &worker0.summary;
    let mut written = Vec::new();
    if let Some(stem) = &a.plot {
        let points: Vec<(f64, f64)> = steps.iter().map(|m| (m.step as f64, m.loss)).collect();
        written = crate::plot::lines(
            stem,
            &format!("switchyard train: {} workers, {} experts, {}", cfg.workers, cfg.experts, cfg.frequency.label()),
            "step",
            "loss (nats/token)",
            &[crate::plot::Line { label: "training loss".into(), points }],
        )?;
    }
    if a.json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        println!(
            "trained {} steps on {} {} ({} experts, top-{}, {} slots/worker, {} with {})",
            summary.steps,
            summary.workers,
            match mode {
                CommMode::Local if nccl => "in-process workers over NCCL",
                CommMode::Local => "in-process workers",
                CommMode::Mpi { .. } => "MPI ranks",
            },
            cfg.experts,
            cfg.top_k,
            cfg.slots_per_worker,
            cfg.frequency.label(),
            cfg.algorithm.name()
        );
        if cfg.edp > 1 {
            println!(
                "{} expert-parallel groups of {} workers, each holding every expert; expert gradients summed over them",
                cfg.edp,
                cfg.workers / cfg.edp
            );
        }
        if cfg.dispatch.contains(&switchyard_cost::DispatchMode::ExpertFetch) {
            let modes: Vec<&str> = (0..cfg.n_layers)
                .map(|l| match cfg.dispatch_of(l) {
                    switchyard_cost::DispatchMode::Token => "token",
                    switchyard_cost::DispatchMode::ExpertFetch => "fetch",
                })
                .collect();
            println!("MoE layers: {} (fetch: experts travel to the tokens, once per node)", modes.join(", "));
        }
        if summary.device != "cpu" {
            println!("expert FFNs on {} (worker 0; worker r on GPU r mod count)", summary.device);
        }
        println!("loss {:.4} -> {:.4} nats/token", summary.first_loss, summary.final_loss);
        println!(
            "switches {} (rolled back {}), {} bytes moved, mean imbalance {:.3}, {:.1} ms/step, sampler {:.3}% of a step",
            summary.switches,
            summary.rollbacks,
            summary.bytes_moved,
            summary.mean_imbalance,
            summary.mean_step_ms,
            100.0 * summary.sampler_fraction
        );
        println!("param_checksum {}", summary.param_checksum);
        for f in written {
            println!("wrote {f}");
        }
    }
    Ok(())
}

/// Trains as one MPI rank; returns the rank and, on rank 0, the result (an error on any rank is reported by
/// that rank and ends the process with a non-zero status).
#[cfg(feature = "mpi")]
fn train_on_mpi(
    cfg: &TrainConfig,
    on_step: &(dyn Fn(&StepMetrics) + Sync),
) -> Result<(usize, switchyard_runtime::trainer::WorkerResult)> {
    match switchyard_runtime::trainer::train_mpi(cfg, on_step) {
        Ok(r) => Ok(r),
        Err(e) => {
            let rank = mpi_rank().map_or_else(|| "?".to_string(), |r| r.to_string());
            bail!("MPI rank {rank}: training failed: {e}")
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn train_on_mpi(
    _cfg: &TrainConfig,
    _on_step: &(dyn Fn(&StepMetrics) + Sync),
) -> Result<(usize, switchyard_runtime::trainer::WorkerResult)> {
    bail!("--comm mpi: this switchyard was built without MPI; fix: cargo build --release --features mpi")
}

/// This process's rank in the MPI job that started it, from the launcher's environment.
pub(super) fn mpi_rank() -> Option<usize> {
    ["OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"].iter().find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_modes() {
        // These tests run outside mpirun unless the environment says otherwise.
        if mpi_world_size().is_some() {
            return;
        }
        assert_eq!(comm_mode("local").unwrap(), CommMode::Local);
        assert_eq!(comm_mode("auto").unwrap(), CommMode::Local);
        assert!(comm_mode("mpi").is_err());
        let e = comm_mode("nccl").unwrap_err().to_string();
        assert!(e.contains("--comm nccl") && e.contains("fix"), "{e}");
    }
}
