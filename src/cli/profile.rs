//! `switchyard profile`: measures this machine (GEMMs, collectives across the workers, the MoE layer itself) and
//! writes the calibrated cluster profile that `plan`, `place`, `simulate`, `validate` and `train --profile` read.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use switchyard_runtime::comm::rendezvous::RendezvousConfig;
use switchyard_runtime::profile::{ProfileConfig, ProfileReport, profile};

use super::profile_gpu::{self, GpuWorld, ProfileDevice};
use super::train::{CommMode, comm_mode};

/// Flags of `switchyard profile`.
#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// Workers: in-process threads (default 2 on the CPU, 1 GPU with --device cuda; one GPU each), MPI ranks
    /// (the rank count `mpirun -np N` started), or the file rendezvous's world size.
    #[arg(long)]
    workers: Option<usize>,
    /// Where to measure: cpu (the kernels' GEMM, in-process or MPI workers), cuda (cuBLAS GEMMs, NCCL
    /// collectives, the GPU layer; one GPU per worker; an error naming what is missing when it cannot), or auto
    /// (cuda when everything it needs is there, else the CPU, saying why).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// GPU ranks started by hand on one node: the directory where they meet (rank 0 publishes the NCCL id
    /// there). Default: SWITCHYARD_RENDEZVOUS. Needs --rank and --world-size (or their variables).
    #[arg(long)]
    rendezvous: Option<PathBuf>,
    /// This process's rank for --rendezvous (default: SWITCHYARD_RANK).
    #[arg(long)]
    rank: Option<usize>,
    /// The number of ranks for --rendezvous (default: SWITCHYARD_WORLD_SIZE).
    #[arg(long)]
    world_size: Option<usize>,
    /// Communicator: local, mpi or auto (as `switchyard train`).
    #[arg(long, default_value = "auto")]
    comm: String,
    /// Compute threads per worker.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Model width of the measured MoE layer (and the GEMMs' inner size) [default: 256 on the CPU, 1024 on
    /// GPUs].
    #[arg(long)]
    d_model: Option<usize>,
    /// Expert hidden width of the measured layer [default: 512 on the CPU, 4096 on GPUs].
    #[arg(long)]
    d_ffn: Option<usize>,
    /// Experts of the measured layer (a multiple of the workers).
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Tokens per worker of the measured layer [default: 512 on the CPU, 4096 on GPUs: a GPU layer of the CPU's
    /// size is mostly launch overhead, which varies from run to run].
    #[arg(long)]
    tokens: Option<usize>,
    /// Layer samples (routings from uniform to skewed).
    #[arg(long, default_value_t = 12)]
    samples: usize,
    /// Repetitions of each timed operation (the minimum is kept).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Timeout of every collective, seconds.
    #[arg(long, default_value_t = 120.0)]
    timeout_s: f64,
    /// Write the calibrated profile here (JSON).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the MoE layer samples (JSON Lines, the format `calibrate` and `validate` read): e.g. profile
    /// one configuration, validate the profile on another.
    #[arg(long)]
    samples_out: Option<PathBuf>,
    /// Print everything measured and fitted as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `switchyard profile`.
pub fn run(a: ProfileArgs) -> Result<()> {
    let mode = comm_mode(&a.comm)?;
    let requested: ProfileDevice = a.device.parse()?;
    let rdv = RendezvousConfig::resolve(a.rank, a.world_size, a.rendezvous.clone(), |k| std::env::var(k).ok())?;
    let (device, gpu_world) = profile_gpu::choose(requested, mode, rdv, a.workers)?;
    let workers = match (gpu_world.as_ref().map(GpuWorld::size), mode, a.workers) {
        (Some(size), _, Some(w)) if w != size => {
            bail!(
                "--workers {w}: the GPU world has {size} ranks (mpirun -np or the rendezvous's world size); fix: --workers {size}"
            )
        }
        (Some(size), _, _) => size,
        (None, CommMode::Local, w) => w.unwrap_or(2),
        (None, CommMode::Mpi { size }, None) => size,
        (None, CommMode::Mpi { size }, Some(w)) if w == size => w,
        (None, CommMode::Mpi { size }, Some(w)) => {
            bail!("--workers {w}: mpirun started {size} ranks; fix: --workers {size}")
        }
    };
    if workers == 0 {
        bail!("--workers 0: fix: at least 1 worker");
    }
    if a.experts == 0 || !a.experts.is_multiple_of(workers) {
        bail!(
            "--experts {}: must be a positive multiple of the {workers} workers; fix: e.g. --experts {}",
            a.experts,
            4 * workers
        );
    }
    let gpu = gpu_world.is_some();
    let pick = |v: Option<usize>, cpu: usize, on_gpu: usize| v.unwrap_or(if gpu { on_gpu } else { cpu });
    let (d_model, d_ffn, tokens) = (pick(a.d_model, 256, 1024), pick(a.d_ffn, 512, 4096), pick(a.tokens, 512, 4096));
    for (flag, v) in [
        ("--threads", a.threads),
        ("--d-model", d_model),
        ("--d-ffn", d_ffn),
        ("--tokens", tokens),
        ("--samples", a.samples),
        ("--repeats", a.repeats),
    ] {
        if v == 0 {
            bail!("{flag} 0: fix: at least 1");
        }
    }
    if !(a.timeout_s.is_finite() && a.timeout_s > 0.0) {
        bail!("--timeout-s {}: fix: a positive number of seconds", a.timeout_s);
    }
    let cfg = ProfileConfig {
        threads_per_worker: a.threads,
        d_model,
        d_ffn,
        experts: a.experts,
        tokens_per_worker: tokens,
        samples: a.samples,
        repeats: a.repeats,
    };
    let timeout = Duration::from_secs_f64(a.timeout_s);
    if !a.json {
        let what = match (&gpu_world, mode) {
            (Some(g), _) => g.describe(),
            (None, CommMode::Local) => "in-process workers".to_string(),
            (None, CommMode::Mpi { .. }) => "MPI ranks".to_string(),
        };
        eprintln!("profiling {workers} {what} on {device} (GEMMs, collectives, {} MoE layer samples) ...", cfg.samples);
    }
    let report = if let Some(world) = &gpu_world {
        match profile_gpu::run(world, &cfg, timeout)? {
            Some(r) => r,
            // Rank 0 reports for the job.
            None => return Ok(()),
        }
    } else {
        match mode {
            CommMode::Local => {
                let mut results =
                    switchyard_runtime::comm::local::run_local(workers, timeout, |comm| profile(&comm, &cfg));
                match results.swap_remove(0) {
                    Ok(Some(r)) => r,
                    Ok(None) => bail!("worker 0 returned no report"),
                    Err(e) => bail!("profile failed on worker 0: {e}"),
                }
            }
            CommMode::Mpi { .. } => match profile_on_mpi(&cfg, timeout)? {
                Some(r) => r,
                // Rank 0 reports for the job.
                None => return Ok(()),
            },
        }
    };
    if let Some(out) = &a.out {
        std::fs::write(out, serde_json::to_string_pretty(&report.profile)? + "\n")
            .with_context(|| format!("--out {}: cannot write the profile", out.display()))?;
    }
    if let Some(out) = &a.samples_out {
        std::fs::write(out, switchyard_cost::calibrate::samples::to_jsonl(&report.samples))
            .with_context(|| format!("--samples-out {}: cannot write the samples", out.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, a.out.as_deref());
    }
    Ok(())
}

fn print_report(r: &ProfileReport, out: Option<&std::path::Path>) {
    let on = if r.device == "cpu" { format!("{} threads", r.config.threads_per_worker) } else { r.device.clone() };
    println!("GEMM (one worker, {on}; m x {} x {}):", r.config.d_ffn, r.config.d_model);
    for g in &r.gemm {
        println!("  m = {:>5}: {:>7.1} GFLOP/s", g.m, g.gflops);
    }
    let c = &r.profile.cluster;
    println!(
        "  fitted: peak {:.1} GFLOP/s, half of it at {:.0} rows; copy {:.1} GB/s per worker",
        c.gpu.peak_tflops_fp32 * 1e3,
        c.constants.gemm_half_efficiency_rows,
        r.copy_gbyte_s
    );
    println!("collectives over {} workers ({}):", r.workers, r.transport);
    for p in &r.comm {
        println!("  {:<10} {:>10} B per worker: {:>9.3} ms ({:.2} GB/s)", p.op, p.bytes_per_worker, p.ms, p.gbyte_s);
    }
    match &r.all_to_all_fit {
        Some(f) => println!("  all-to-all line: {:.1} us + bytes / {:.2} GB/s", f.latency_us, f.bandwidth_gbyte_s),
        None => println!("  none with one worker: the profile's links are not measured"),
    }
    println!(
        "MoE layer ({} experts, {} tokens per worker, d {} -> {}): {} samples, {:.2} - {:.2} ms",
        r.config.experts,
        r.config.tokens_per_worker,
        r.config.d_model,
        r.config.d_ffn,
        r.samples.len(),
        r.samples.iter().map(|s| s.real_ms).fold(f64::INFINITY, f64::min),
        r.samples.iter().map(|s| s.real_ms).fold(0.0, f64::max)
    );
    println!(
        "  model error: MAPE {:.1}% (r {:.3}) with the measured rates and default constants; {:.1}% (r {:.3}) fitted",
        r.before_fit.mape_percent, r.before_fit.pearson_r, r.profile.fit.mape_percent, r.profile.fit.pearson_r
    );
    let k = &c.constants;
    println!(
        "  fitted constants: per_expert_overhead_us {:.1}, moe_layer_overhead_us {:.1}, intra_bandwidth_efficiency {:.3}, gemm_max_efficiency {:.3}",
        k.per_expert_overhead_us, k.moe_layer_overhead_us, k.intra_bandwidth_efficiency, k.gemm_max_efficiency
    );
    if let Some(p) = out {
        println!("wrote {}", p.display());
    }
}

#[cfg(feature = "mpi")]
fn profile_on_mpi(cfg: &ProfileConfig, timeout: Duration) -> Result<Option<ProfileReport>> {
    use switchyard_runtime::comm::Communicator;
    let comm = switchyard_runtime::comm::mpi::init(timeout).map_err(|e| anyhow::anyhow!("{e}"))?;
    match profile(&comm, cfg) {
        Ok(r) => Ok(r),
        Err(e) => {
            comm.abort(&e.to_string());
            bail!("MPI rank {}: profile failed: {e}", comm.rank())
        }
    }
}

#[cfg(not(feature = "mpi"))]
fn profile_on_mpi(_cfg: &ProfileConfig, _timeout: Duration) -> Result<Option<ProfileReport>> {
    bail!("--comm mpi: this switchyard was built without MPI; fix: cargo build --release --features mpi")
}
