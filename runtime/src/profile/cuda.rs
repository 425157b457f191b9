//! The GPU measurements of `switchyard profile --device cuda` (feature `cuda`): one GPU per worker.
//!
//! - GEMMs: FP32 cuBLAS (the kernels' [`switchyard_kernels::cuda::blas::sgemm`]) at the CPU path's shapes
//!   ([`super::GEMM_ROWS`] rows, `d_model` inner, `d_ffn` out), timed from launch to stream completion.
//! - Copies: a device-to-device copy of 64 MiB (bytes copied per second, as the CPU path counts them).
//! - Collectives (more than one worker): NCCL on device buffers ([`NcclComm::all_to_all_v_device`], which
//!   includes its count exchange, NCCL's own all-reduce, device send/receive) at the CPU path's sizes, timed
//!   by [`super::measure_collectives`] like the CPU ones.
//! - Layer samples: the single-GPU MoE layer of the kernels ([`CudaMoeLayer`], forward + backward, all
//!   experts on the worker's GPU) under the CPU path's routing skews; each sample is the slowest worker's
//!   time and carries a one-GPU load matrix. The runtime's distributed layer with GPU experts (`train --device cuda`)
//!   still exchanges tokens through host memory, so it would time host staging rather than the GPU links: the samples
//!   calibrate the per-expert and per-layer fixed costs and the GEMM efficiency; the links come from the NCCL
//!   line as measured (their achieved fraction is not fitted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_cost::calibrate::Sample;
use switchyard_cost::{ClusterSpec, LoadMatrix};
use switchyard_kernels::cuda::blas::sgemm;
use switchyard_kernels::cuda::{CudaDevice, CudaError, CudaMoeLayer};
use switchyard_kernels::{Activation, CapacityPolicy, GateConfig, MoeConfig, MoeLayer, Storage, Trans};

use super::{
    Collective, CommPoint, GEMM_ROWS, GemmPoint, MeasureSource, ProfileConfig, TimedOp, max_over, measure_collectives,
    min_over,
};
use super::{ProfileReport, profile_with};
use crate::comm::Communicator;
use crate::comm::local::LocalWorld;
use crate::comm::nccl::{self, NcclComm};
use crate::error::RuntimeError;

/// Bytes of the device copy measurement.
const COPY_BYTES: usize = 64 << 20;

/// Repetitions of the copy measurement (the fastest is kept).
const COPY_REPEATS: usize = 5;

/// Measurements on this worker's GPU; collectives through `nccl` (required with more than one worker).
pub struct CudaSource<'a> {
    dev: Arc<CudaDevice>,
    nccl: Option<&'a NcclComm>,
}

impl<'a> CudaSource<'a> {
    /// A source on `dev`, the collectives on `nccl` (its group is the profile's workers).
    pub fn new(dev: Arc<CudaDevice>, nccl: Option<&'a NcclComm>) -> Self {
        CudaSource { dev, nccl }
    }
}

fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> RuntimeError {
    move |e| RuntimeError::Cuda(CudaError::Driver { op, detail: format!("{e:?}") })
}

impl MeasureSource for CudaSource<'_> {
    fn device(&self) -> String {
        let info = self.dev.info();
        format!("cuda:{} ({})", info.ordinal, info.name)
    }

    fn gemm(
        &self,
        comm: &dyn Communicator,
        k: usize,
        n: usize,
        repeats: usize,
    ) -> Result<Vec<GemmPoint>, RuntimeError> {
        let dev = &*self.dev;
        let mut out = Vec::new();
        for m in GEMM_ROWS {
            comm.barrier()?;
            let a = dev.upload(&vec![0.5f32; m * k])?;
            let b = dev.upload(&vec![0.25f32; k * n])?;
            let mut c = dev.zeros::<f32>(m * n)?;
            dev.synchronize()?;
            let mut best = f64::INFINITY;
            for _ in 0..repeats.max(1) + 1 {
                let t = Instant::now();
                sgemm(dev, Trans::No, Trans::No, m, n, k, &a, k, &b, n, 0.0, &mut c, n)?;
                dev.synchronize()?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            let best = max_over(comm, best)?;
            out.push(GemmPoint { m, n, k, gflops: 2.0 * (m * n * k) as f64 / best.max(1e-12) / 1e9 });
        }
        Ok(out)
    }

    fn copy_gbyte_s(&self, comm: &dyn Communicator) -> Result<f64, RuntimeError> {
        let dev = &*self.dev;
        let src = dev.zeros::<u8>(COPY_BYTES)?;
        let mut dst = dev.zeros::<u8>(COPY_BYTES)?;
        dev.synchronize()?;
        let mut best = f64::INFINITY;
        for _ in 0..COPY_REPEATS {
            let t = Instant::now();
            dev.stream().memcpy_dtod(&src, &mut dst).map_err(driver("device-to-device copy"))?;
            dev.synchronize()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        min_over(comm, COPY_BYTES as f64 / best.max(1e-12) / 1e9)
    }

    fn collectives(&self, comm: &dyn Communicator, repeats: usize) -> Result<Vec<CommPoint>, RuntimeError> {
        let (me, w) = (comm.rank(), comm.size());
        if w < 2 {
            return Ok(Vec::new());
        }
        let Some(nccl) = self.nccl else {
            return Err(RuntimeError::invalid(
                "profile --device cuda",
                format!("{w} workers need the NCCL communicator for the GPU collectives"),
            ));
        };
        let stream = nccl.stream().clone();
        measure_collectives(comm, repeats, &mut |kind, per_peer| -> Result<TimedOp<'_>, RuntimeError> {
            Ok(match kind {
                Collective::AllToAll => {
                    let send = stream.alloc_zeros::<u8>(per_peer * w).map_err(driver("allocating"))?;
                    let counts = vec![per_peer; w];
                    Box::new(move || {
                        nccl.all_to_all_v_device(&send, &counts)?;
                        Ok(())
                    })
                }
                Collective::AllReduce => {
                    let len = (per_peer / 4).max(1);
                    let mut buf = stream.alloc_zeros::<f32>(len).map_err(driver("allocating"))?;
                    Box::new(move || Ok(nccl.all_reduce_sum_device(&mut buf, len)?))
                }
                Collective::SendRecv => {
                    let mut buf = stream.alloc_zeros::<u8>(per_peer).map_err(driver("allocating"))?;
                    Box::new(move || {
                        if me == 0 {
                            nccl.send_device(1, &buf, per_peer)?;
                            nccl.recv_device(1, &mut buf, per_peer)?;
                        } else if me == 1 {
                            nccl.recv_device(0, &mut buf, per_peer)?;
                            nccl.send_device(0, &buf, per_peer)?;
                        }
                        Ok(())
                    })
                }
            })
        })
    }

    fn layer(&self, comm: &dyn Communicator, cfg: &ProfileConfig) -> Result<Vec<Sample>, RuntimeError> {
        let config = MoeConfig {
            d_model: cfg.d_model,
            d_ffn: cfg.d_ffn,
            experts: cfg.experts,
            activation: Activation::Gelu,
            gate: GateConfig { top_k: 2.min(cfg.experts), capacity: CapacityPolicy::Dropless, ..GateConfig::default() },
            storage: Storage::F32,
        };
        let host = MoeLayer::random(config, 5)?;
        let mut gpu = CudaMoeLayer::from_layer(Arc::clone(&self.dev), &host)?;
        let (mut state, mut grads) = (gpu.new_state()?, gpu.new_grads()?);
        let (d, t) = (cfg.d_model, cfg.tokens_per_worker);
        let mut rng = switchyard_kernels::random::seeded_rng(77 + comm.rank() as u64);
        let x_host: Vec<f32> =
            (0..t * d).map(|_| switchyard_kernels::random::standard_normal(&mut rng) as f32).collect();
        let d_out_host: Vec<f32> = x_host.iter().map(|v| v * 1e-3).collect();
        let x = self.dev.upload(&x_host)?;
        let d_out = self.dev.upload(&d_out_host)?;
        let mut samples = Vec::new();
        for i in 0..cfg.samples.max(1) {
            // The CPU path's skews: from uniform routing to most tokens on a few experts.
            let skew = 3.0 * i as f32 / cfg.samples.max(2) as f32;
            let bias: Vec<f32> = (0..cfg.experts).map(|e| -skew * ((e + 1) as f32).ln()).collect();
            gpu.set_expert_bias(Some(&bias))?;
            let mut best = f64::INFINITY;
            let mut loads = Vec::new();
            for _ in 0..cfg.repeats.max(1) {
                comm.barrier()?;
                let t0 = Instant::now();
                gpu.forward(&x, t, &mut state)?;
                gpu.backward(&x, &state, &d_out, &mut grads)?;
                self.dev.synchronize()?;
                best = best.min(max_over(comm, t0.elapsed().as_secs_f64() * 1e3)?);
                loads.push(LoadMatrix {
                    ranks: 1,
                    experts: cfg.experts,
                    counts: state.kept.iter().map(|&c| c as u64).collect(),
                });
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

    fn fitted_constants(&self) -> &'static [&'static str] {
        &["per_expert_overhead_us", "moe_layer_overhead_us", "gemm_max_efficiency"]
    }

    fn adjust_cluster(&self, cluster: &mut ClusterSpec) {
        let info = self.dev.info();
        cluster.gpu.name = info.name.clone();
        cluster.gpu.memory_gib = info.total_memory_bytes as f64 / (1u64 << 30) as f64;
    }
}

/// Why `--device cuda` cannot run `workers` workers on GPUs `0..gpus_needed` of this machine (the first
/// missing piece, with its fix), or `None` when it can: the driver, the GPUs, NVRTC and cuBLAS (the kernels'
/// probe), and libnccl when there is more than one worker.
pub fn gpu_unavailable(gpus_needed: usize, workers: usize) -> Option<String> {
    let p = switchyard_kernels::cuda::probe();
    if let Err(e) = p.check(gpus_needed.saturating_sub(1)) {
        return Some(match e {
            CudaError::BadOrdinal { count, .. } => format!(
                "{gpus_needed} GPUs are needed (one per worker on this node), {count} found; fix: fewer workers per node"
            ),
            e => e.to_string(),
        });
    }
    if workers > 1
        && let Err(e) = nccl::probe().check()
    {
        return Some(format!("{workers} GPU workers talk through NCCL: {e}"));
    }
    None
}

/// Profiles one GPU rank of an NCCL group (every rank of `comm` must call it): opens the rank's GPU, measures
/// on it and through `comm`, fits; rank 0 returns the report.
pub fn profile_gpu_rank(comm: &NcclComm, cfg: &ProfileConfig) -> Result<Option<ProfileReport>, RuntimeError> {
    let result = (|| {
        let dev = Arc::new(CudaDevice::open(comm.ordinal())?);
        profile_with(comm, cfg, &CudaSource::new(dev, Some(comm)))
    })();
    if let Err(e) = &result {
        comm.abort(&e.to_string());
    }
    result
}

/// Profiles `workers` GPUs of this machine from one process: one thread per GPU (GPU `r` for worker `r`),
/// an NCCL group between them when there are several. Returns worker 0's report.
pub fn profile_gpu_threads(
    workers: usize,
    cfg: &ProfileConfig,
    timeout: Duration,
) -> Result<ProfileReport, RuntimeError> {
    if workers == 1 {
        let dev = Arc::new(CudaDevice::open(0)?);
        let comm = LocalWorld::new(1, timeout).pop().ok_or_else(|| RuntimeError::invalid("workers", "no worker"))?;
        return profile_with(&comm, cfg, &CudaSource::new(dev, None))?
            .ok_or_else(|| RuntimeError::invalid("profile", "worker 0 returned no report".to_string()));
    }
    let mut results = nccl::run_threads(workers, timeout, |c| profile_gpu_rank(&c, cfg));
    // The first failure is the cause; the others are usually its consequences (aborts, timeouts).
    let mut first = None;
    let mut report = None;
    for (r, res) in results.drain(..).enumerate() {
        match res {
            Ok(Some(rep)) => report = Some(rep),
            Ok(None) => {}
            Err(e) => {
                first.get_or_insert(RuntimeError::Worker { rank: r, reason: e.to_string() });
            }
        }
    }
    match (first, report) {
        (Some(e), _) => Err(e),
        (None, Some(rep)) => Ok(rep),
        (None, None) => Err(RuntimeError::invalid("profile", "worker 0 returned no report".to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn availability_agrees_with_the_probes() {
        let p = switchyard_kernels::cuda::probe();
        match gpu_unavailable(1, 1) {
            None => assert!(p.check(0).is_ok()),
            Some(why) => {
                eprintln!("no GPU here: {why}");
                assert_eq!(why, p.check(0).unwrap_err().to_string());
                if !p.driver_found {
                    assert!(why.contains("install the NVIDIA driver"), "{why}");
                }
            }
        }
        // Two workers also need libnccl.
        if p.check(1).is_ok() && !nccl::probe().found {
            assert!(gpu_unavailable(2, 2).unwrap().contains("SWITCHYARD_NCCL_LIB"));
        }
    }

    #[test]
    fn one_gpu_profile_fits_the_layer() {
        if let Some(why) = gpu_unavailable(1, 1) {
            assert!(std::env::var("SWITCHYARD_REQUIRE_GPU").as_deref() != Ok("1"), "SWITCHYARD_REQUIRE_GPU=1: {why}");
            eprintln!("skipped: {why}");
            return;
        }
        let cfg = ProfileConfig {
            d_model: 64,
            d_ffn: 128,
            experts: 4,
            tokens_per_worker: 256,
            samples: 4,
            repeats: 2,
            ..ProfileConfig::default()
        };
        let rep = profile_gpu_threads(1, &cfg, Duration::from_secs(60)).expect("profile");
        assert!(rep.device.starts_with("cuda:0"), "{}", rep.device);
        assert_eq!(rep.samples.len(), 4);
        assert!(rep.gemm.iter().all(|g| g.gflops > 0.0));
        for s in &rep.samples {
            // Every token's top-2 assignments are kept (dropless) on the one GPU.
            assert_eq!(s.micro_batches[0].counts.iter().sum::<u64>(), 2 * 256);
        }
        assert!(rep.profile.fit.mape_percent.is_finite());
        // One GPU has no link to measure: none is fitted, and the profile keeps a physical figure.
        assert_eq!(rep.all_to_all_fit, None);
        assert!(rep.profile.cluster.intra_node.bandwidth_gbyte_s >= 1.0, "{:?}", rep.profile.cluster.intra_node);
    }

    #[test]
    fn two_gpu_profile_measures_nccl_collectives() {
        if let Some(why) = gpu_unavailable(2, 2) {
            eprintln!("skipped: {why}");
            return;
        }
        let cfg = ProfileConfig {
            d_model: 64,
            d_ffn: 128,
            experts: 4,
            tokens_per_worker: 128,
            samples: 3,
            repeats: 1,
            ..ProfileConfig::default()
        };
        let rep = profile_gpu_threads(2, &cfg, Duration::from_secs(120)).expect("profile");
        assert_eq!(rep.transport, "nccl");
        assert_eq!(rep.comm.len(), 12);
        assert!(rep.all_to_all_fit.unwrap().bandwidth_gbyte_s > 0.0);
    }
}
