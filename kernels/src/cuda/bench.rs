//! The GPU MoE layer benchmark: [`run_cuda_bench`] times the layer forward and forward+backward
//! on one GPU against one cuBLAS GEMM with the same FLOPs, with the fields of the CPU report
//! ([`crate::bench::KernelBenchReport`]) where they carry over.
//!
//! Each timed iteration ends with a stream synchronisation, so the times are wall-clock times of
//! finished GPU work (the forward reads the demand back once anyway). Rates use the fastest
//! iteration, as on the CPU; GEMMs run in FP32 (no TF32). With `torch_python` set, the same layer in
//! plain PyTorch runs on the same GPU after the layer's timings (kernels/bench/torch_moe.py with
//! `--device cuda:N`, FP32, TF32 off), and the report carries its times beside ours.

use crate::bench::{KernelBenchConfig, TorchBenchReport, torch_beside};
use crate::bf16::Storage;
use crate::cuda::blas::sgemm;
use crate::cuda::device::{CudaDevice, GpuInfo};
use crate::cuda::error::CudaResult;
use crate::cuda::layer::CudaMoeLayer;
use crate::error::KernelError;
use crate::gate::{CapacityPolicy, DropPolicy, GateConfig};
use crate::gemm::Trans;
use crate::layer::{MoeConfig, MoeLayer};
use crate::random::{normal_vec, seeded_rng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Instant;

/// Result of [`run_cuda_bench`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CudaBenchReport {
    /// The configuration that ran (`threads`, `backend` do not apply to the GPU).
    pub config: KernelBenchConfig,
    /// `"cuda"`.
    pub backend: String,
    /// GPU name.
    pub device: String,
    /// Compute capability.
    pub compute_capability: (i32, i32),
    /// NVRTC target of the kernels.
    pub arch: String,
    /// Capacity per expert.
    pub capacity: usize,
    /// Assignments kept (rows through the experts).
    pub routed_tokens: usize,
    /// Assignments dropped by capacity.
    pub dropped_tokens: usize,
    /// Median forward time of the whole layer.
    pub forward_ms: f64,
    /// Fastest forward.
    pub forward_ms_min: f64,
    /// Median forward+backward time.
    pub fwd_bwd_ms: f64,
    /// Fastest forward+backward.
    pub fwd_bwd_ms_min: f64,
    /// Expert GEMM work of one forward, GFLOP.
    pub expert_forward_gflop: f64,
    /// Expert GEMM work of one forward+backward, GFLOP.
    pub expert_fwd_bwd_gflop: f64,
    /// Expert GEMM FLOPs / fastest forward time, GFLOP/s.
    pub expert_gemm_gflops_forward: f64,
    /// Expert GEMM FLOPs / fastest forward+backward time, GFLOP/s.
    pub expert_gemm_gflops_fwd_bwd: f64,
    /// Shape `[M, K, N]` of the plain GEMM.
    pub plain_gemm_shape: [usize; 3],
    /// Median time of the plain GEMM.
    pub plain_gemm_ms: f64,
    /// Fastest plain GEMM.
    pub plain_gemm_ms_min: f64,
    /// Rate of the plain cuBLAS GEMM with the forward+backward's FLOPs, GFLOP/s.
    pub plain_gemm_gflops: f64,
    /// `expert_gemm_gflops_forward / plain_gemm_gflops`.
    pub fwd_ratio_to_gemm: f64,
    /// `expert_gemm_gflops_fwd_bwd / plain_gemm_gflops`.
    pub fwd_bwd_ratio_to_gemm: f64,
    /// The same layer in PyTorch on the same GPU, when `torch_python` was given.
    #[serde(default)]
    pub torch: Option<TorchBenchReport>,
    /// PyTorch's fastest forward+backward time / ours.
    #[serde(default)]
    pub speedup_vs_torch_fwd_bwd: Option<f64>,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn gflops(flop: f64, time_ms: f64) -> f64 {
    if time_ms > 0.0 { flop / (time_ms * 1e-3) / 1e9 } else { 0.0 }
}

/// Runs the layer benchmark on CUDA device 0; an error (naming what is missing) without a usable
/// GPU. See [`run_cuda_bench_on`].
pub fn run_cuda_bench(cfg: &KernelBenchConfig) -> CudaResult<CudaBenchReport> {
    run_cuda_bench_on(cfg, 0)
}

/// Runs the layer benchmark on CUDA device `ordinal`: the same layer as the CPU benchmark
/// (seeded weights and inputs, fixed capacity, arrival order, no aux losses), timed forward and
/// forward+backward, in alternation with one `[M, d] x [d, h]` cuBLAS GEMM whose FLOPs equal the
/// forward+backward expert FLOPs.
pub fn run_cuda_bench_on(cfg: &KernelBenchConfig, ordinal: usize) -> CudaResult<CudaBenchReport> {
    if cfg.iterations == 0 {
        return Err(KernelError::InvalidConfig { field: "iterations", reason: "must be at least 1".into() }.into());
    }
    if cfg.tokens == 0 {
        return Err(KernelError::InvalidConfig { field: "tokens", reason: "must be at least 1".into() }.into());
    }
    let moe = MoeConfig {
        d_model: cfg.d_model,
        d_ffn: cfg.d_ffn,
        experts: cfg.experts,
        activation: cfg.activation,
        gate: GateConfig {
            top_k: cfg.top_k,
            renormalize: false,
            capacity: CapacityPolicy::Fixed { factor: cfg.capacity_factor },
            drop_policy: DropPolicy::ArrivalOrder,
            aux_loss_weight: 0.0,
            z_loss_weight: 0.0,
            noise_std: 0.0,
            noise_seed: 0,
        },
        storage: Storage::F32,
    };
    // Checks the configuration before touching the GPU.
    let layer = MoeLayer::random(moe, cfg.seed)?;
    let dev = Arc::new(CudaDevice::open(ordinal)?);
    let info: GpuInfo = dev.info().clone();
    let gpu = CudaMoeLayer::from_layer(dev.clone(), &layer)?;
    drop(layer);
    let mut rng = seeded_rng(cfg.seed ^ 0x5eed);
    let x = dev.upload(&normal_vec(&mut rng, cfg.tokens * cfg.d_model, 1.0))?;
    let d_out = dev.upload(&normal_vec(&mut rng, cfg.tokens * cfg.d_model, 1.0))?;
    let mut st = gpu.new_state()?;
    let mut g = gpu.new_grads()?;

    gpu.forward(&x, cfg.tokens, &mut st)?;
    let fwd_flop = cfg.activation.forward_flops(st.rows(), cfg.d_model, cfg.d_ffn);
    let fwd_bwd_flop = 3.0 * fwd_flop;
    let (d, h) = (cfg.d_model, cfg.d_ffn);
    let m = ((fwd_bwd_flop / (2.0 * d as f64 * h as f64)).round() as usize).max(1);
    let a = dev.upload(&normal_vec(&mut rng, m * d, 1.0))?;
    let b = dev.upload(&normal_vec(&mut rng, d * h, 1.0))?;
    let mut c = dev.zeros::<f32>(m * h)?;
    let plain = |c: &mut cudarc::driver::CudaSlice<f32>| -> CudaResult<()> {
        sgemm(&dev, Trans::No, Trans::No, m, h, d, &a, d, &b, h, 0.0, c, h)
    };

    for _ in 0..cfg.warmup {
        gpu.forward(&x, cfg.tokens, &mut st)?;
        gpu.backward(&x, &st, &d_out, &mut g)?;
        plain(&mut c)?;
    }
    dev.synchronize()?;
    let (mut fwd, mut fwd_bwd, mut gemm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cfg.iterations {
        let t = Instant::now();
        gpu.forward(&x, cfg.tokens, &mut st)?;
        dev.synchronize()?;
        fwd.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        gpu.forward(&x, cfg.tokens, &mut st)?;
        gpu.backward(&x, &st, &d_out, &mut g)?;
        dev.synchronize()?;
        fwd_bwd.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        plain(&mut c)?;
        dev.synchronize()?;
        gemm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (forward_ms_min, fwd_bwd_ms_min, plain_gemm_ms_min) = (min(&fwd), min(&fwd_bwd), min(&gemm));
    let plain_gemm_gflops = gflops(2.0 * m as f64 * d as f64 * h as f64, plain_gemm_ms_min);
    let expert_gemm_gflops_forward = gflops(fwd_flop, forward_ms_min);
    let expert_gemm_gflops_fwd_bwd = gflops(fwd_bwd_flop, fwd_bwd_ms_min);
    let ratio = |v: f64| if plain_gemm_gflops > 0.0 { v / plain_gemm_gflops } else { 0.0 };
    // PyTorch runs after our timings, with our buffers still held (a few hundred MB at most).
    let (torch, speedup_vs_torch_fwd_bwd) = torch_beside(cfg, &format!("cuda:{ordinal}"), fwd_bwd_ms_min)?;
    Ok(CudaBenchReport {
        config: cfg.clone(),
        backend: "cuda".into(),
        device: info.name,
        compute_capability: info.compute_capability,
        arch: dev.arch().to_string(),
        capacity: st.capacity,
        routed_tokens: st.rows(),
        dropped_tokens: st.dropped(cfg.top_k),
        forward_ms: median(&mut fwd),
        forward_ms_min,
        fwd_bwd_ms: median(&mut fwd_bwd),
        fwd_bwd_ms_min,
        expert_forward_gflop: fwd_flop / 1e9,
        expert_fwd_bwd_gflop: fwd_bwd_flop / 1e9,
        expert_gemm_gflops_forward,
        expert_gemm_gflops_fwd_bwd,
        plain_gemm_shape: [m, d, h],
        plain_gemm_ms: median(&mut gemm),
        plain_gemm_ms_min,
        plain_gemm_gflops,
        fwd_ratio_to_gemm: ratio(expert_gemm_gflops_forward),
        fwd_bwd_ratio_to_gemm: ratio(expert_gemm_gflops_fwd_bwd),
        torch,
        speedup_vs_torch_fwd_bwd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::error::CudaError;

    #[test]
    fn without_a_usable_gpu_the_bench_is_a_clear_error() {
        let cfg = KernelBenchConfig {
            tokens: 16,
            d_model: 4,
            d_ffn: 4,
            experts: 2,
            iterations: 1,
            warmup: 0,
            ..Default::default()
        };
        if crate::cuda::probe().check(0).is_err() {
            let e = run_cuda_bench(&cfg).unwrap_err();
            assert!(
                matches!(
                    e,
                    CudaError::NoDriver(_)
                        | CudaError::NoDevice(_)
                        | CudaError::NvrtcMissing(_)
                        | CudaError::CublasMissing(_)
                ),
                "{e}"
            );
        }
        let bad = KernelBenchConfig { iterations: 0, ..cfg.clone() };
        assert!(matches!(run_cuda_bench(&bad), Err(CudaError::Kernel(KernelError::InvalidConfig { .. }))));
        let bad = KernelBenchConfig { top_k: 3, ..cfg };
        assert!(matches!(run_cuda_bench(&bad), Err(CudaError::Kernel(KernelError::InvalidTopK { .. }))));
    }
}
