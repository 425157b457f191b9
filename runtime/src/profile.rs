//! `switchyard profile`: measures the machine the workers run on and fits the performance model's
//! calibrated cluster profile to it, so that the planner and the online policy price placements with this
//! machine's numbers instead of a GPU preset's.
//!
//! Three kinds of measurement, all on the runtime's own code paths:
//! - GEMM throughput of one worker at several row counts (the kernels' `sgemm`), which gives the peak rate and
//!   the efficiency curve `max * m / (m + half)` for `m` rows;
//! - collectives across the workers (all-to-all, all-reduce, send/recv) at several sizes, in-process or over
//!   MPI, which give the link latency and bandwidth (a least-squares line `t = latency + bytes / bandwidth`);
//! - the distributed MoE layer itself (forward + backward) under routings of several skews, as calibration
//!   samples: the remaining constants (per-expert and per-layer fixed costs, achieved link fraction) are
//!   fitted to them with the calibration's least squares, and the fit's error is reported.
//!
//! Where the measurements come from is a [`MeasureSource`]: [`CpuSource`] (the kernels' CPU GEMM, the
//! workers' communicator, the distributed layer; what [`profile`] uses) or, with the `cuda` feature,
//! [`cuda::CudaSource`] (cuBLAS GEMMs, NCCL device collectives, the single-GPU layer). The fitting is the same
//! for both ([`profile_with`]).

use std::time::Instant;

use serde::Serialize;
use switchyard_cost::calibrate::{CalibratedProfile, LayerSpec, Metrics, Sample, Selection, calibrate, metrics};
use switchyard_cost::model::Dtype;
use switchyard_cost::{ClusterSpec, LoadMatrix, Placement};
use switchyard_kernels::{Activation, CapacityPolicy, Compute, Engine, GateConfig, Trans, sgemm};

use crate::comm::Communicator;
use crate::error::RuntimeError;
use crate::experts::{ExpertRuntime, MoeShape};
use crate::machine::{LocalRates, cpu_cluster};
use crate::optim::Adam;

#[cfg(feature = "cuda")]
pub mod cuda;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProfileConfig {
    /// Compute threads per worker.
    pub threads_per_worker: usize,
    /// Model width of the measured MoE layer (and the GEMMs' inner size).
    pub d_model: usize,
    /// Expert hidden width of the measured layer (and the GEMMs' output size).
    pub d_ffn: usize,
    /// Experts of the measured layer (a multiple of the worker count).
    pub experts: usize,
    /// Tokens per worker of the measured layer.
    pub tokens_per_worker: usize,
    /// Routing skews of the layer samples (one sample each).
    pub samples: usize,
    /// Repetitions of every timed operation (the minimum is kept, as the shared calibration file does).
    pub repeats: usize,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig {
            threads_per_worker: 1,
            d_model: 256,
            d_ffn: 512,
            experts: 8,
            tokens_per_worker: 512,
            samples: 12,
            repeats: 3,
        }
    }
}

/// One GEMM measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct GemmPoint {
    /// Rows.
    pub m: usize,
    /// Columns.
    pub n: usize,
    /// Inner size.
    pub k: usize,
    /// Throughput, GFLOP/s.
    pub gflops: f64,
}

/// One collective measurement.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CommPoint {
    /// `all_to_all`, `all_reduce` or `send_recv`.
    pub op: String,
    /// Bytes each worker sends in the operation (all peers together).
    pub bytes_per_worker: u64,
    /// Time of the slowest worker, ms (minimum over repetitions).
    pub ms: f64,
    /// `bytes_per_worker / ms`, GB/s.
    pub gbyte_s: f64,
}

/// A fitted line `t = latency + bytes / bandwidth`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LinkFit {
    /// Fixed cost, microseconds.
    pub latency_us: f64,
    /// Bandwidth, GB/s.
    pub bandwidth_gbyte_s: f64,
}

/// Everything `switchyard profile` measured and fitted.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileReport {
    /// Workers measured.
    pub workers: usize,
    /// The transport of the collectives (`local`, `mpi` or `nccl`).
    pub transport: String,
    /// Where the GEMMs, collectives and layer samples ran (`cpu`, or `cuda:N (GPU name)`).
    pub device: String,
    /// What was measured.
    pub config: ProfileConfig,
    /// GEMM throughput of one worker by rows.
    pub gemm: Vec<GemmPoint>,
    /// Memory-copy bandwidth of one worker, GB/s.
    pub copy_gbyte_s: f64,
    /// Collectives by size.
    pub comm: Vec<CommPoint>,
    /// The all-to-all's line; `None` (JSON `null`) with one worker, where there is no link to measure
    /// (the profile's link figures are then the defaults of [`measured_cluster`], not measurements).
    pub all_to_all_fit: Option<LinkFit>,
    /// The MoE layer samples (loads and measured forward + backward times).
    pub samples: Vec<Sample>,
    /// The model's error on the samples before fitting (the measured rates, default constants).
    pub before_fit: Metrics,
    /// The profile: the cluster with the measured rates and the fitted constants.
    pub profile: CalibratedProfile,
}

/// Every worker's value of `v`.
fn gather(comm: &dyn Communicator, v: f64) -> Result<Vec<f64>, RuntimeError> {
    let mut all = vec![0.0f64; comm.size()];
    all[comm.rank()] = v;
    comm.all_reduce_sum_f64(&mut all)?;
    Ok(all)
}

/// The slowest worker's time (the largest value).
pub(crate) fn max_over(comm: &dyn Communicator, v: f64) -> Result<f64, RuntimeError> {
    Ok(gather(comm, v)?.into_iter().fold(f64::NEG_INFINITY, f64::max))
}

/// The smallest value over workers.
pub(crate) fn min_over(comm: &dyn Communicator, v: f64) -> Result<f64, RuntimeError> {
    Ok(gather(comm, v)?.into_iter().fold(f64::INFINITY, f64::min))
}

/// Row counts of the GEMM measurements.
pub const GEMM_ROWS: [usize; 4] = [64, 256, 1024, 4096];

/// GEMM throughput of this worker at `m` = 64 .. 4096 rows of `m x k` by `k x n`, every worker of `comm` at
/// once (they share the machine as in training; every worker must call it); the slowest worker's rate.
pub fn measure_gemm(
    comm: &dyn Communicator,
    engine: &Engine,
    k: usize,
    n: usize,
    repeats: usize,
) -> Result<Vec<GemmPoint>, RuntimeError> {
    let mut out = Vec::new();
    for m in GEMM_ROWS {
        comm.barrier()?;
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0.0f32; m * n];
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) + 1 {
            let t = Instant::now();
            engine.run(|cx| sgemm(cx, Trans::No, Trans::No, m, n, k, &a, k, &b, n, &mut c, n, false))?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        let best = max_over(comm, best)?;
        out.push(GemmPoint { m, n, k, gflops: 2.0 * (m * n * k) as f64 / best.max(1e-12) / 1e9 });
    }
    Ok(out)
}

/// The collectives [`measure_collectives`] times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collective {
    /// All-to-all with `per_peer` bytes to every worker (this one included).
    AllToAll,
    /// Sum of `per_peer / 4` floats over the workers.
    AllReduce,
    /// Ping-pong of `per_peer` bytes between workers 0 and 1 (half the round trip is kept).
    SendRecv,
}

/// One timed operation, with its buffers prepared (allocation is not timed).
pub type TimedOp<'a> = Box<dyn FnMut() -> Result<(), RuntimeError> + 'a>;

/// Bytes per peer of the collectives' measurements.
pub const COMM_SIZES_BYTES: [usize; 4] = [4 << 10, 64 << 10, 512 << 10, 4 << 20];

/// Times the collectives at [`COMM_SIZES_BYTES`] per peer (every worker must call it): `prepare` returns the
/// operation for a collective and size, run `repeats + 1` times between barriers of `comm`; the slowest
/// worker's time is kept, the minimum over repetitions.
pub fn measure_collectives<'a>(
    comm: &dyn Communicator,
    repeats: usize,
    prepare: &mut dyn FnMut(Collective, usize) -> Result<TimedOp<'a>, RuntimeError>,
) -> Result<Vec<CommPoint>, RuntimeError> {
    let w = comm.size();
    let mut out = Vec::new();
    if w < 2 {
        return Ok(out);
    }
    let timed = |f: &mut TimedOp<'a>| -> Result<f64, RuntimeError> {
        let mut best = f64::INFINITY;
        for _ in 0..repeats.max(1) + 1 {
            comm.barrier()?;
            let t = Instant::now();
            f()?;
            best = best.min(max_over(comm, t.elapsed().as_secs_f64() * 1e3)?);
        }
        Ok(best)
    };
    for per_peer in COMM_SIZES_BYTES {
        let ms = timed(&mut prepare(Collective::AllToAll, per_peer)?)?;
        let bytes = (per_peer * (w - 1)) as u64;
        out.push(CommPoint { op: "all_to_all".into(), bytes_per_worker: bytes, ms, gbyte_s: bytes as f64 / ms / 1e6 });
        let ms = timed(&mut prepare(Collective::AllReduce, per_peer)?)?;
        out.push(CommPoint {
            op: "all_reduce".into(),
            bytes_per_worker: per_peer as u64,
            ms,
            gbyte_s: per_peer as f64 / ms / 1e6,
        });
        let ms = timed(&mut prepare(Collective::SendRecv, per_peer)?)? / 2.0;
        out.push(CommPoint {
            op: "send_recv".into(),
            bytes_per_worker: per_peer as u64,
            ms,
            gbyte_s: per_peer as f64 / ms / 1e6,
        });
    }
    Ok(out)
}

/// Collectives across `comm`'s workers at several sizes per peer, on host buffers through the
/// communicator itself (every worker must call it).
pub fn measure_comm(comm: &dyn Communicator, repeats: usize) -> Result<Vec<CommPoint>, RuntimeError> {
    let (me, w) = (comm.rank(), comm.size());
    measure_collectives(comm, repeats, &mut |kind, per_peer| -> Result<TimedOp<'_>, RuntimeError> {
        Ok(match kind {
            Collective::AllToAll => {
                let bufs: Vec<Vec<u8>> = (0..w).map(|_| vec![me as u8; per_peer]).collect();
                Box::new(move || {
                    let refs: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
                    comm.all_to_all_v(&refs)?;
                    Ok(())
                })
            }
            Collective::AllReduce => {
                let mut data = vec![1.0f32; per_peer / 4];
                Box::new(move || Ok(comm.all_reduce_sum_f32(&mut data)?))
            }
            Collective::SendRecv => {
                let msg = vec![7u8; per_peer];
                Box::new(move || {
                    if me == 0 {
                        comm.send(1, 11, &msg)?;
                        comm.recv(1, 12)?;
                    } else if me == 1 {
                        let m = comm.recv(0, 11)?;
                        comm.send(0, 12, &m)?;
                    }
                    Ok(())
                })
            }
        })
    })
}

/// Least-squares line through `(bytes, ms)`: latency and bandwidth (both kept physical). `None` without
/// points; one point gives its bandwidth with no latency.
pub fn fit_line(points: &[(f64, f64)]) -> Option<LinkFit> {
    let n = points.len() as f64;
    match points {
        [] => return None,
        [(b, t)] => return Some(LinkFit { latency_us: 0.0, bandwidth_gbyte_s: b / t.max(1e-12) / 1e6 }),
        _ => {}
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let slope = if sxx > 0.0 { (sxy / sxx).max(1e-15) } else { my / mx.max(1e-12) };
    let intercept = (my - slope * mx).max(0.0);
    Some(LinkFit { latency_us: intercept * 1e3, bandwidth_gbyte_s: 1.0 / slope / 1e6 })
}

/// The MoE layer's forward + backward time under routings of increasing skew: one calibration sample per
/// skew (every worker must call it; the loads are the sampled counts of each timed step, the time the
/// slowest worker's, the minimum over repetitions).
pub fn measure_layer(
    comm: &dyn Communicator,
    engine: &Engine,
    cfg: &ProfileConfig,
) -> Result<Vec<Sample>, RuntimeError> {
    let w = comm.size();
    if cfg.experts == 0 || !cfg.experts.is_multiple_of(w) {
        return Err(RuntimeError::invalid(
            "--experts",
            format!("{} must be a positive multiple of the {w} workers", cfg.experts),
        ));
    }
    let shape = MoeShape {
        layers: 1,
        d_model: cfg.d_model,
        d_ffn: cfg.d_ffn,
        experts: cfg.experts,
        slots_per_worker: cfg.experts / w,
        activation: Activation::Gelu,
        gate: GateConfig { top_k: 2.min(cfg.experts), capacity: CapacityPolicy::Dropless, ..GateConfig::default() },
    };
    let start = Placement::contiguous(w, shape.slots_per_worker, cfg.experts)
        .map_err(|e| RuntimeError::invalid("placement", e.to_string()))?;
    let mut rt = ExpertRuntime::new(comm, shape, vec![start], 5, Adam { lr: 1e-6, ..Adam::default() }, None)?;
    let d = cfg.d_model;
    let t = cfg.tokens_per_worker;
    let mut rng = switchyard_kernels::random::seeded_rng(77 + comm.rank() as u64);
    let x: Vec<f32> = (0..t * d).map(|_| switchyard_kernels::random::standard_normal(&mut rng) as f32).collect();
    let d_out: Vec<f32> = x.iter().map(|v| v * 1e-3).collect();
    let (mut out, mut d_x) = (vec![0.0f32; t * d], vec![0.0f32; t * d]);
    let mut samples = Vec::new();
    let mut step = 0u64;
    for i in 0..cfg.samples.max(1) {
        // Skews from uniform routing to most tokens on a few experts.
        let skew = 3.0 * i as f32 / cfg.samples.max(2) as f32;
        rt.layers[0].expert_bias = Some((0..cfg.experts).map(|e| -skew * ((e + 1) as f32).ln()).collect());
        let mut best = f64::INFINITY;
        let mut loads: Vec<LoadMatrix> = Vec::new();
        for _ in 0..cfg.repeats.max(1) {
            comm.barrier()?;
            let t0 = Instant::now();
            engine.run(|cx| -> Result<(), RuntimeError> {
                rt.forward(cx, comm, 0, &x, t, &mut out)?;
                rt.backward(cx, comm, 0, &x, &d_out, &mut d_x)
            })?;
            let ms = max_over(comm, t0.elapsed().as_secs_f64() * 1e3)?;
            best = best.min(ms);
            let rep = rt.finish_step(comm, step)?;
            step += 1;
            loads.extend(rep.loads.into_iter().take(1));
        }
        samples.push(Sample {
            id: format!("skew{skew:.2}"),
            iter: i as u64,
            layer: 0,
            real_ms: best,
            reference_est_ms: None,
            micro_batches: loads,
        });
    }
    Ok(samples)
}

/// The GEMM rate curve `peak * m / (m + half)` for `m` rows fitted to the measurements by least squares on
/// relative errors: returns the asymptotic `peak` (GFLOP/s) and `half` (rows at which half of it is reached).
/// `peak` is in closed form for each `half` on a fine logarithmic grid of 1 to 10^5 rows.
pub fn fit_gemm_curve(points: &[GemmPoint]) -> (f64, f64) {
    let fastest = points.iter().map(|p| p.gflops).fold(0.0, f64::max);
    if fastest <= 0.0 {
        return (fastest, 1.0);
    }
    let mut best = (f64::INFINITY, fastest, 1.0);
    for i in 0..=500 {
        let half = 10f64.powf(i as f64 / 100.0);
        // Residuals r = (peak * s - y) / y with s = m / (m + half): peak = sum(s/y) / sum(s^2/y^2).
        let (mut num, mut den) = (0.0, 0.0);
        for p in points.iter().filter(|p| p.gflops > 0.0) {
            let q = p.m as f64 / (p.m as f64 + half) / p.gflops;
            num += q;
            den += q * q;
        }
        let peak = num / den.max(1e-300);
        let err: f64 = points
            .iter()
            .filter(|p| p.gflops > 0.0)
            .map(|p| (peak * p.m as f64 / (p.m as f64 + half) / p.gflops - 1.0).powi(2))
            .sum();
        if err < best.0 {
            best = (err, peak, half);
        }
    }
    (best.1, best.2)
}

/// The cluster the measurements describe: `workers` workers as the "GPUs" of one node, the peak rate the
/// GEMMs' fitted asymptote, the efficiency curve's half point fitted to them, the links the all-to-all's line
/// when there is one (with one worker none is measured: the links stay those of [`cpu_cluster`], derived from
/// the copy bandwidth, and a one-worker profile has no link the model would use).
pub fn measured_cluster(workers: usize, gemm: &[GemmPoint], copy_gbyte_s: f64, a2a: Option<LinkFit>) -> ClusterSpec {
    let (peak, half) = fit_gemm_curve(gemm);
    let mut c = cpu_cluster(workers, LocalRates { gemm_gflops: peak, copy_gbyte_s });
    c.name = "profiled".into();
    // The fitted asymptote is the peak: the efficiency curve reaches 1 there.
    c.constants.gemm_max_efficiency = 1.0;
    c.constants.gemm_half_efficiency_rows = half;
    if let Some(a2a) = a2a.filter(|f| f.bandwidth_gbyte_s.is_finite() && f.bandwidth_gbyte_s > 0.0) {
        c.intra_node.bandwidth_gbyte_s = a2a.bandwidth_gbyte_s;
        c.intra_node.latency_us = a2a.latency_us;
        c.constants.intra_bandwidth_efficiency = 1.0;
    }
    c
}

/// A source of measurements: what runs the GEMMs, the collectives and the layer samples. Every method is
/// collective over `comm` (every worker calls it; `comm` also carries the timing's barriers and maxima).
pub trait MeasureSource {
    /// Where it runs (`cpu`, `cuda:0 (NVIDIA H200)`), for the report.
    fn device(&self) -> String;
    /// GEMM throughput at the profile's row counts, `m x k` by `k x n` (see [`measure_gemm`]).
    fn gemm(&self, comm: &dyn Communicator, k: usize, n: usize, repeats: usize)
    -> Result<Vec<GemmPoint>, RuntimeError>;
    /// Memory-copy bandwidth of one worker, GB/s (the slowest worker's).
    fn copy_gbyte_s(&self, comm: &dyn Communicator) -> Result<f64, RuntimeError>;
    /// The collectives (see [`measure_collectives`]); empty with one worker.
    fn collectives(&self, comm: &dyn Communicator, repeats: usize) -> Result<Vec<CommPoint>, RuntimeError>;
    /// MoE layer samples (see [`measure_layer`]).
    fn layer(&self, comm: &dyn Communicator, cfg: &ProfileConfig) -> Result<Vec<Sample>, RuntimeError>;
    /// The model constants fitted to the samples (the rates are measured).
    fn fitted_constants(&self) -> &'static [&'static str];
    /// What the source knows of its hardware beyond the rates (a GPU's name and memory); the CPU source
    /// leaves the measured cluster as it is.
    fn adjust_cluster(&self, cluster: &mut ClusterSpec) {
        let _ = cluster;
    }
}

/// The CPU measurements: the kernels' `sgemm` on each worker's threads, the workers' communicator, the
/// distributed MoE layer of the runtime.
pub struct CpuSource {
    engine: Engine,
    threads_per_worker: usize,
}

impl CpuSource {
    /// A source with `cfg.threads_per_worker` compute threads per worker.
    pub fn new(cfg: &ProfileConfig) -> Result<Self, RuntimeError> {
        let threads_per_worker = cfg.threads_per_worker.max(1);
        Ok(CpuSource { engine: Engine::new(Compute::new(threads_per_worker))?, threads_per_worker })
    }
}

impl MeasureSource for CpuSource {
    fn device(&self) -> String {
        "cpu".into()
    }

    fn gemm(
        &self,
        comm: &dyn Communicator,
        k: usize,
        n: usize,
        repeats: usize,
    ) -> Result<Vec<GemmPoint>, RuntimeError> {
        measure_gemm(comm, &self.engine, k, n, repeats)
    }

    fn copy_gbyte_s(&self, comm: &dyn Communicator) -> Result<f64, RuntimeError> {
        let rates = crate::machine::measure_local(self.threads_per_worker)?;
        min_over(comm, rates.copy_gbyte_s)
    }

    fn collectives(&self, comm: &dyn Communicator, repeats: usize) -> Result<Vec<CommPoint>, RuntimeError> {
        measure_comm(comm, repeats)
    }

    fn layer(&self, comm: &dyn Communicator, cfg: &ProfileConfig) -> Result<Vec<Sample>, RuntimeError> {
        measure_layer(comm, &self.engine, cfg)
    }

    fn fitted_constants(&self) -> &'static [&'static str] {
        &["per_expert_overhead_us", "moe_layer_overhead_us", "intra_bandwidth_efficiency", "gemm_max_efficiency"]
    }
}

/// Measures on the CPU and fits, on every worker of `comm` (every worker must call it); worker 0 returns the
/// report.
pub fn profile(comm: &dyn Communicator, cfg: &ProfileConfig) -> Result<Option<ProfileReport>, RuntimeError> {
    profile_with(comm, cfg, &CpuSource::new(cfg)?)
}

/// Measures with `source` and fits, on every worker of `comm` (every worker must call it); worker 0 returns
/// the report.
pub fn profile_with(
    comm: &dyn Communicator,
    cfg: &ProfileConfig,
    source: &dyn MeasureSource,
) -> Result<Option<ProfileReport>, RuntimeError> {
    // GEMMs and copies: every worker at once, as in training (they share the machine).
    let gemm = source.gemm(comm, cfg.d_model, cfg.d_ffn, cfg.repeats)?;
    let copy_gbyte_s = source.copy_gbyte_s(comm)?;
    let comm_points = source.collectives(comm, cfg.repeats)?;
    let samples = source.layer(comm, cfg)?;
    if comm.rank() != 0 {
        return Ok(None);
    }
    let a2a: Vec<(f64, f64)> =
        comm_points.iter().filter(|p| p.op == "all_to_all").map(|p| (p.bytes_per_worker as f64, p.ms)).collect();
    let all_to_all_fit = fit_line(&a2a);
    let mut cluster = measured_cluster(comm.size(), &gemm, copy_gbyte_s, all_to_all_fit);
    source.adjust_cluster(&mut cluster);
    let layer = LayerSpec { d_model: cfg.d_model as u64, d_ffn: cfg.d_ffn as u64, gated: false, dtype: Dtype::Fp32 };
    let bad = |e: String| RuntimeError::invalid("profile fit", e);
    let before = switchyard_cost::calibrate::predict_all(&samples, &layer, &cluster).map_err(bad)?;
    let real: Vec<f64> = samples.iter().map(|s| s.real_ms).collect();
    let before_fit = metrics(&before, &real);
    // The rates are measured; the fixed costs (and, where the samples communicate, the achieved link
    // fraction) are fitted to the layer.
    let fit: Vec<String> = source.fitted_constants().iter().map(|s| s.to_string()).collect();
    let device = source.device();
    let provenance = if device == "cpu" {
        format!("switchyard profile ({} workers, {})", comm.size(), comm.transport())
    } else {
        format!("switchyard profile ({} workers, {}, {device})", comm.size(), comm.transport())
    };
    let profile = calibrate(&samples, &provenance, Selection::All, &layer, &cluster, &fit).map_err(bad)?;
    Ok(Some(ProfileReport {
        workers: comm.size(),
        transport: comm.transport().to_string(),
        device,
        config: *cfg,
        gemm,
        copy_gbyte_s,
        comm: comm_points,
        all_to_all_fit,
        samples,
        before_fit,
        profile,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::local::run_local;
    use std::time::Duration;

    #[test]
    fn gemm_curve_recovers_its_parameters() {
        let pts: Vec<GemmPoint> = [64usize, 256, 1024, 4096]
            .iter()
            .map(|&m| GemmPoint { m, n: 1, k: 1, gflops: 100.0 * 0.8 * m as f64 / (m as f64 + 300.0) })
            .collect();
        let (peak, half) = fit_gemm_curve(&pts);
        assert!((peak - 80.0).abs() < 1.0, "{peak}");
        assert!((half - 300.0).abs() < 10.0, "{half}");
    }

    #[test]
    fn line_fit_by_hand() {
        // 10 us + bytes / 2 GB/s.
        let pts: Vec<(f64, f64)> = [1e3, 1e5, 1e6, 1e7].iter().map(|&b| (b, 0.01 + b / 2e9 * 1e3)).collect();
        let f = fit_line(&pts).unwrap();
        assert!((f.latency_us - 10.0).abs() < 1e-6, "{f:?}");
        assert!((f.bandwidth_gbyte_s - 2.0).abs() < 1e-9, "{f:?}");
        assert_eq!(fit_line(&[]), None);
        let one = fit_line(&[(2e6, 1.0)]).unwrap();
        assert!((one.bandwidth_gbyte_s - 2.0).abs() < 1e-12 && one.latency_us == 0.0, "{one:?}");
    }

    #[test]
    fn profile_on_two_workers_fits_the_layer() {
        let cfg = ProfileConfig {
            d_model: 32,
            d_ffn: 64,
            experts: 4,
            tokens_per_worker: 64,
            samples: 4,
            repeats: 1,
            ..ProfileConfig::default()
        };
        let out = run_local(2, Duration::from_secs(60), |comm| profile(&comm, &cfg));
        let mut reports: Vec<ProfileReport> = Vec::new();
        for r in out {
            if let Some(rep) = r.expect("worker ok") {
                reports.push(rep);
            }
        }
        assert_eq!(reports.len(), 1, "only worker 0 reports");
        let rep = &reports[0];
        assert_eq!(rep.samples.len(), 4);
        assert!(rep.samples.iter().all(|s| s.real_ms > 0.0 && !s.micro_batches.is_empty()));
        // Every sample's loads count every token's top-2 assignments.
        for s in &rep.samples {
            let total: u64 = s.micro_batches[0].counts.iter().sum();
            assert_eq!(total, 2 * 64 * 2);
        }
        assert_eq!(rep.comm.len(), 12);
        assert_eq!(rep.device, "cpu");
        assert!(rep.gemm.iter().all(|g| g.gflops > 0.0));
        assert!(rep.copy_gbyte_s > 0.0 && rep.copy_gbyte_s.is_finite());
        assert!(rep.profile.fit.mape_percent.is_finite());
        assert_eq!(rep.profile.cluster.num_gpus(), 2);
        assert!(rep.all_to_all_fit.is_some_and(|f| f.bandwidth_gbyte_s > 0.0));
    }

    /// One worker measures no link: the report says so (`None`) and the profile keeps a link figure
    /// derived from the copy bandwidth (a one-GPU profile once wrote 1e-6 GB/s here).
    #[test]
    fn one_worker_leaves_the_links_unmeasured() {
        let cfg = ProfileConfig {
            d_model: 16,
            d_ffn: 32,
            experts: 2,
            tokens_per_worker: 32,
            samples: 2,
            repeats: 1,
            ..ProfileConfig::default()
        };
        let mut out = run_local(1, Duration::from_secs(60), |comm| profile(&comm, &cfg));
        let rep = out.swap_remove(0).expect("worker ok").expect("worker 0 reports");
        assert!(rep.comm.is_empty());
        assert_eq!(rep.all_to_all_fit, None);
        let link = &rep.profile.cluster.intra_node;
        assert!((link.bandwidth_gbyte_s - rep.copy_gbyte_s).abs() <= 1e-9 * rep.copy_gbyte_s, "{link:?}");
    }
}
