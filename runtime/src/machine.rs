//! The machine the workers run on, as the performance model sees it: a quick measurement of the
//! GEMM rate and the memory-copy bandwidth (what an in-process all-to-all moves at), turned into a
//! one-node `ClusterSpec` whose "GPUs" are the workers. The online policy prices placements with
//! it. `switchyard profile` measures more thoroughly and fits the model's constants; a profile it
//! writes can replace this estimate (`switchyard train --cluster PROFILE`).

use std::time::Instant;

use serde::Serialize;
use switchyard_cost::{ClusterSpec, GpuSpec, InterNodeSpec, IntraNodeKind, IntraNodeSpec, ModelConstants};
use switchyard_kernels::{Compute, Engine, Trans, sgemm};

use crate::error::RuntimeError;

/// Rates measured on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LocalRates {
    /// f32 GEMM throughput of one worker (its threads), GFLOP/s.
    pub gemm_gflops: f64,
    /// Memory-copy bandwidth of one worker, GB/s.
    pub copy_gbyte_s: f64,
}

/// Measures one worker's GEMM rate (a `n x n x n` product, best of a few) and copy bandwidth.
/// Takes about a tenth of a second.
pub fn measure_local(threads_per_worker: usize) -> Result<LocalRates, RuntimeError> {
    let engine = Engine::new(Compute::new(threads_per_worker.max(1)))?;
    let n = 256usize;
    let a = vec![0.5f32; n * n];
    let b = vec![0.25f32; n * n];
    let mut c = vec![0.0f32; n * n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        engine.run(|cx| sgemm(cx, Trans::No, Trans::No, n, n, n, &a, n, &b, n, &mut c, n, false))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gemm_gflops = 2.0 * (n * n * n) as f64 / best.max(1e-9) / 1e9;
    let len = 8 << 20;
    let src = vec![1.0f32; len / 4];
    let mut dst = vec![0.0f32; len / 4];
    let mut best_copy = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&dst);
        best_copy = best_copy.min(t.elapsed().as_secs_f64());
    }
    let copy_gbyte_s = len as f64 / best_copy.max(1e-9) / 1e9;
    Ok(LocalRates { gemm_gflops, copy_gbyte_s })
}

/// A one-node cluster of `workers` CPU workers with the measured rates: each worker is a "GPU"
/// with the worker's GEMM rate as its fp32 peak; the workers share the memory bus like GPUs share
/// a PCIe switch.
pub fn cpu_cluster(workers: usize, rates: LocalRates) -> ClusterSpec {
    ClusterSpec {
        name: "cpu-local".into(),
        nodes: 1,
        gpus_per_node: workers.max(1) as u32,
        gpu: GpuSpec {
            name: "cpu-worker".into(),
            memory_gib: 4.0,
            peak_tflops_fp16: rates.gemm_gflops / 1e3,
            peak_tflops_bf16: None,
            peak_tflops_fp32: rates.gemm_gflops / 1e3,
            peak_tflops_fp8: None,
            hbm_gbyte_s: rates.copy_gbyte_s,
        },
        intra_node: IntraNodeSpec { kind: IntraNodeKind::Pcie, bandwidth_gbyte_s: rates.copy_gbyte_s, latency_us: 5.0 },
        inter_node: InterNodeSpec { nics_per_node: 1, nic_gbit_s: 8.0 * rates.copy_gbyte_s, latency_us: 5.0 },
        constants: ModelConstants::default(),
    }
}
