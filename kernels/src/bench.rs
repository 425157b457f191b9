//! The MoE layer benchmark behind `switchyard bench kernels`.
//!
//! [`run_kernel_bench`] times the whole layer (gate, dispatch, experts, combine) forward and
//! forward+backward, and one plain GEMM of the same FLOPs on the same backend and threads:
//!
//! * `expert_gemm_gflops_*` = FLOPs of the expert GEMMs (kept tokens only) / whole-layer time;
//! * `plain_gemm_gflops` = rate of one `[M, d] x [d, h]` GEMM with `2 M d h` = the layer's
//!   forward+backward expert FLOPs;
//! * `*_ratio_to_gemm` = the two divided.
//!
//! Layer and plain GEMM are timed in alternation, iteration by iteration; rates and ratios use
//! the fastest iteration of each (the least disturbed on a shared machine), and the report also
//! gives the median times.
//!
//! With `torch_python` set, the same layer in plain PyTorch (kernels/bench/torch_moe.py, embedded
//! in this crate) runs in the same call with the same shape and threads, and its JSON is
//! embedded as [`TorchBenchReport`].

use crate::bf16::Storage;
use crate::error::{KernelError, Result};
use crate::experts::Activation;
use crate::gate::{CapacityPolicy, DropPolicy, GateConfig};
use crate::gemm::{Compute, Engine, GemmBackend, Trans, sgemm};
use crate::layer::{MoeConfig, MoeGrads, MoeLayer, MoeState};
use crate::random::{normal_vec, seeded_rng};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// The PyTorch comparison script (also at `kernels/bench/torch_moe.py`).
pub const TORCH_SCRIPT: &str = include_str!("../bench/torch_moe.py");

/// What to benchmark.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelBenchConfig {
    /// Tokens per batch `T`.
    pub tokens: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// Expert FFN width `h`.
    pub d_ffn: usize,
    /// Experts `E`.
    pub experts: usize,
    /// Experts per token `k`.
    pub top_k: usize,
    /// Fixed capacity factor (tokens beyond `ceil(C * T * k / E)` per expert are dropped).
    pub capacity_factor: f32,
    /// Threads (the rayon pool for the pure-Rust GEMM, OpenBLAS threads with `blas`).
    pub threads: usize,
    /// Expert FFN form.
    pub activation: Activation,
    /// GEMM backend (`None`: the build's default).
    pub backend: Option<GemmBackend>,
    /// Untimed iterations first.
    pub warmup: usize,
    /// Timed iterations (the report gives the median and the minimum).
    pub iterations: usize,
    /// Seed of inputs and weights.
    pub seed: u64,
    /// Python interpreter with torch installed; runs the PyTorch comparison when set.
    pub torch_python: Option<PathBuf>,
}

impl Default for KernelBenchConfig {
    /// The first shape of the issue: T 4096, d 512, h 2048, 8 experts, top-2, C 1.25, 2 threads.
    fn default() -> Self {
        Self {
            tokens: 4096,
            d_model: 512,
            d_ffn: 2048,
            experts: 8,
            top_k: 2,
            capacity_factor: 1.25,
            threads: 2,
            activation: Activation::Gelu,
            backend: None,
            warmup: 1,
            iterations: 5,
            seed: 1,
            torch_python: None,
        }
    }
}

/// Timings of the PyTorch layer (parsed from the script's JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TorchBenchReport {
    /// `torch.__version__`.
    pub torch_version: String,
    /// Where it ran: `cpu`, or the GPU's name (absent from reports of older scripts).
    #[serde(default)]
    pub device: String,
    /// `torch.get_num_threads()` during the run.
    pub threads: usize,
    /// Capacity per expert (rows of the `[E, C, d]` buffer).
    pub capacity: usize,
    /// Assignments kept.
    pub routed_tokens: usize,
    /// Median forward time.
    pub forward_ms: f64,
    /// Fastest forward.
    pub forward_ms_min: f64,
    /// Median forward+backward time.
    pub fwd_bwd_ms: f64,
    /// Fastest forward+backward.
    pub fwd_bwd_ms_min: f64,
    /// Expert GEMM FLOPs of the kept tokens / fastest forward time.
    pub expert_gemm_gflops_forward: f64,
    /// Expert GEMM FLOPs of the kept tokens / fastest forward+backward time.
    pub expert_gemm_gflops_fwd_bwd: f64,
    /// FLOPs the padded `[E, C, d]` batched matmuls execute / fastest forward+backward time.
    pub padded_gemm_gflops_fwd_bwd: f64,
    /// Rate of a plain `torch.mm` of `[T k, d] x [d, h]`.
    pub plain_gemm_gflops: f64,
}

/// Result of [`run_kernel_bench`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KernelBenchReport {
    /// The configuration that ran.
    pub config: KernelBenchConfig,
    /// GEMM backend name (`pure-rust-gemm` or `openblas`).
    pub backend: String,
    /// Threads used.
    pub threads: usize,
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
    /// Median forward+backward time of the whole layer.
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
    /// Rate of the plain GEMM with the same FLOPs as the forward+backward (fastest
    /// iteration), GFLOP/s.
    pub plain_gemm_gflops: f64,
    /// `expert_gemm_gflops_forward / plain_gemm_gflops`.
    pub fwd_ratio_to_gemm: f64,
    /// `expert_gemm_gflops_fwd_bwd / plain_gemm_gflops`.
    pub fwd_bwd_ratio_to_gemm: f64,
    /// The PyTorch layer, when `torch_python` was given.
    pub torch: Option<TorchBenchReport>,
    /// `torch.fwd_bwd_ms_min / fwd_bwd_ms_min` (> 1: this crate is faster).
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

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

fn gflops(flop: f64, time_ms: f64) -> f64 {
    if time_ms > 0.0 { flop / (time_ms * 1e-3) / 1e9 } else { 0.0 }
}

/// Validates a benchmark configuration.
fn validate(cfg: &KernelBenchConfig) -> Result<()> {
    if cfg.iterations == 0 {
        return Err(KernelError::InvalidConfig { field: "iterations", reason: "must be at least 1".into() });
    }
    if cfg.tokens == 0 {
        return Err(KernelError::InvalidConfig { field: "tokens", reason: "must be at least 1".into() });
    }
    Ok(())
}

/// Runs the MoE layer benchmark (and the PyTorch comparison when asked).
pub fn run_kernel_bench(cfg: &KernelBenchConfig) -> Result<KernelBenchReport> {
    validate(cfg)?;
    let compute = Compute { backend: cfg.backend.unwrap_or_default(), threads: cfg.threads };
    let engine = Engine::new(compute)?;
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
    let layer = MoeLayer::random(moe, cfg.seed)?;
    let mut rng = seeded_rng(cfg.seed ^ 0x5eed);
    let x = normal_vec(&mut rng, cfg.tokens * cfg.d_model, 1.0);
    let d_out = normal_vec(&mut rng, cfg.tokens * cfg.d_model, 1.0);

    // The plain GEMM with the forward+backward's FLOPs: [M, d] x [d, h]. Its FLOPs follow from
    // the routed rows, known after one forward.
    let (d, h) = (cfg.d_model, cfg.d_ffn);
    let mut state = MoeState::default();
    let mut grads = MoeGrads::default();
    engine.run(|cx| layer.forward(cx, &x, cfg.tokens, &mut state))?;
    let fwd_flop = layer.expert_forward_flops(&state);
    let fwd_bwd_flop = 3.0 * fwd_flop;
    let m = ((fwd_bwd_flop / (2.0 * d as f64 * h as f64)).round() as usize).max(1);
    let a = normal_vec(&mut rng, m * d, 1.0);
    let b = normal_vec(&mut rng, d * h, 1.0);
    let mut c = vec![0.0f32; m * h];

    // Layer and plain GEMM are timed in alternation, so that load from other processes on a
    // shared machine falls on both alike.
    let (mut fwd, mut fwd_bwd, mut plain) = engine.run(|cx| -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        for _ in 0..cfg.warmup {
            layer.forward(cx, &x, cfg.tokens, &mut state)?;
            layer.backward(cx, &x, &state, &d_out, &mut grads)?;
            sgemm(cx, Trans::No, Trans::No, m, h, d, &a, d, &b, h, &mut c, h, false)?;
        }
        let mut fwd = Vec::with_capacity(cfg.iterations);
        let mut fwd_bwd = Vec::with_capacity(cfg.iterations);
        let mut plain = Vec::with_capacity(cfg.iterations);
        for _ in 0..cfg.iterations {
            let t = Instant::now();
            layer.forward(cx, &x, cfg.tokens, &mut state)?;
            fwd.push(ms(t));
            let t = Instant::now();
            layer.forward(cx, &x, cfg.tokens, &mut state)?;
            layer.backward(cx, &x, &state, &d_out, &mut grads)?;
            fwd_bwd.push(ms(t));
            let t = Instant::now();
            sgemm(cx, Trans::No, Trans::No, m, h, d, &a, d, &b, h, &mut c, h, false)?;
            plain.push(ms(t));
        }
        Ok((fwd, fwd_bwd, plain))
    })?;
    drop((a, b, c, grads));
    let forward_ms_min = fwd.iter().copied().fold(f64::INFINITY, f64::min);
    let fwd_bwd_ms_min = fwd_bwd.iter().copied().fold(f64::INFINITY, f64::min);
    let forward_ms = median(&mut fwd);
    let fwd_bwd_ms = median(&mut fwd_bwd);
    let routed_tokens = state.plan.rows();
    let dropped_tokens = state.routing.dropped();
    let capacity = state.routing.capacity;
    drop(state);
    let plain_gemm_ms_min = plain.iter().copied().fold(f64::INFINITY, f64::min);
    let plain_gemm_ms = median(&mut plain);
    let plain_flop = 2.0 * m as f64 * d as f64 * h as f64;
    // Rates and ratios use the fastest iteration of each (layer and plain GEMM alike): on a
    // shared machine the minimum is the time least disturbed by other processes.
    let plain_gemm_gflops = gflops(plain_flop, plain_gemm_ms_min);
    let expert_gemm_gflops_forward = gflops(fwd_flop, forward_ms_min);
    let expert_gemm_gflops_fwd_bwd = gflops(fwd_bwd_flop, fwd_bwd_ms_min);
    let ratio = |g: f64| {
        if plain_gemm_gflops > 0.0 { g / plain_gemm_gflops } else { 0.0 }
    };
    let (torch, speedup_vs_torch_fwd_bwd) = torch_beside(cfg, "cpu", fwd_bwd_ms_min)?;
    Ok(KernelBenchReport {
        config: cfg.clone(),
        backend: compute.backend.name().to_string(),
        threads: compute.threads,
        capacity,
        routed_tokens,
        dropped_tokens,
        forward_ms,
        forward_ms_min,
        fwd_bwd_ms,
        fwd_bwd_ms_min,
        expert_forward_gflop: fwd_flop / 1e9,
        expert_fwd_bwd_gflop: fwd_bwd_flop / 1e9,
        expert_gemm_gflops_forward,
        expert_gemm_gflops_fwd_bwd,
        plain_gemm_shape: [m, d, h],
        plain_gemm_ms,
        plain_gemm_ms_min,
        plain_gemm_gflops,
        fwd_ratio_to_gemm: ratio(expert_gemm_gflops_forward),
        fwd_bwd_ratio_to_gemm: ratio(expert_gemm_gflops_fwd_bwd),
        torch,
        speedup_vs_torch_fwd_bwd,
    })
}

/// The same layer in PyTorch on `device` (`cpu` or `cuda:N`) when `cfg.torch_python` is set, and its fastest
/// forward+backward time over ours (`ours_fwd_bwd_ms_min`); `(None, None)` without a Python.
pub(crate) fn torch_beside(
    cfg: &KernelBenchConfig,
    device: &str,
    ours_fwd_bwd_ms_min: f64,
) -> Result<(Option<TorchBenchReport>, Option<f64>)> {
    let Some(python) = &cfg.torch_python else { return Ok((None, None)) };
    let torch = run_torch(cfg, python, device)?;
    let speedup = (ours_fwd_bwd_ms_min > 0.0).then(|| torch.fwd_bwd_ms_min / ours_fwd_bwd_ms_min);
    Ok((Some(torch), speedup))
}

/// Runs the embedded PyTorch script with `python` on `device` (`cpu` or `cuda:N`) and parses its JSON.
fn run_torch(cfg: &KernelBenchConfig, python: &std::path::Path, device: &str) -> Result<TorchBenchReport> {
    let script = std::env::temp_dir().join(format!("switchyard_torch_moe_{}.py", std::process::id()));
    std::fs::write(&script, TORCH_SCRIPT)
        .map_err(|e| KernelError::Torch(format!("writing {}: {e}", script.display())))?;
    let activation = match cfg.activation {
        Activation::Gelu => "gelu",
        Activation::SwiGlu => "swiglu",
    };
    let output = std::process::Command::new(python)
        .arg(&script)
        .args(["--tokens", &cfg.tokens.to_string()])
        .args(["--d-model", &cfg.d_model.to_string()])
        .args(["--d-ffn", &cfg.d_ffn.to_string()])
        .args(["--experts", &cfg.experts.to_string()])
        .args(["--top-k", &cfg.top_k.to_string()])
        .args(["--capacity-factor", &cfg.capacity_factor.to_string()])
        .args(["--threads", &cfg.threads.to_string()])
        .args(["--activation", activation])
        .args(["--warmup", &cfg.warmup.to_string()])
        .args(["--iterations", &cfg.iterations.to_string()])
        .args(["--seed", &cfg.seed.to_string()])
        .args(["--device", device])
        .output();
    let _ = std::fs::remove_file(&script);
    let output = output.map_err(|e| KernelError::Torch(format!("running {}: {e}", python.display())))?;
    if !output.status.success() {
        return Err(KernelError::Torch(format!(
            "{} exited with {}: {}",
            python.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .ok_or_else(|| KernelError::Torch(format!("no JSON in the script's output: {stdout}")))?;
    serde_json::from_str(line).map_err(|e| KernelError::Torch(format!("bad JSON from the script ({e}): {line}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_bench_runs_and_reports() {
        let cfg = KernelBenchConfig {
            tokens: 64,
            d_model: 8,
            d_ffn: 16,
            experts: 4,
            top_k: 2,
            capacity_factor: 1.0,
            threads: 1,
            activation: Activation::SwiGlu,
            backend: None,
            warmup: 0,
            iterations: 2,
            seed: 3,
            torch_python: None,
        };
        let r = run_kernel_bench(&cfg).unwrap();
        assert!(r.routed_tokens + r.dropped_tokens == 128);
        assert!(r.forward_ms >= 0.0 && r.fwd_bwd_ms >= 0.0);
        assert_eq!(r.plain_gemm_shape[1..], [8, 16]);
        let json = serde_json::to_string(&r).unwrap();
        let back: KernelBenchReport = serde_json::from_str(&json).unwrap();
        assert_eq!(back.routed_tokens, r.routed_tokens);
        assert!(json.contains("fwd_bwd_ratio_to_gemm"));
    }

    #[test]
    fn bad_config_and_missing_python_are_errors() {
        let mut cfg = KernelBenchConfig {
            tokens: 16,
            d_model: 4,
            d_ffn: 4,
            experts: 2,
            iterations: 1,
            warmup: 0,
            threads: 1,
            ..KernelBenchConfig::default()
        };
        cfg.top_k = 3;
        assert!(matches!(run_kernel_bench(&cfg), Err(KernelError::InvalidTopK { .. })));
        cfg.top_k = 1;
        cfg.torch_python = Some(PathBuf::from("/nonexistent/python"));
        assert!(matches!(run_kernel_bench(&cfg), Err(KernelError::Torch(_))));
    }
}
