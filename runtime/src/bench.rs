//! Runtime benchmarks behind `switchyard bench runtime`: migration throughput against a plain
//! memory copy of the same bytes on the same workers.

use std::time::{Duration, Instant};

use serde::Serialize;
use switchyard_cost::Placement;
use switchyard_kernels::{Activation, GateConfig};

use crate::comm::Communicator;
use crate::comm::local::{WorkerError, run_local};
use crate::error::RuntimeError;
use crate::experts::{ExpertRuntime, MoeShape};
use crate::optim::Adam;

/// What the migration benchmark measured.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationBench {
    /// Workers.
    pub workers: usize,
    /// Experts (all of them move at every migration).
    pub experts: usize,
    /// Bytes of one expert's state (weights and two Adam moments, f32).
    pub expert_state_bytes: u64,
    /// Bytes all workers sent per migration.
    pub bytes_per_migration: u64,
    /// Median wall time of one migration (slowest worker), ms.
    pub migrate_ms: f64,
    /// Median wall time of the workers copying the same bytes with `copy_from_slice` at once (slowest worker), ms.
    pub memcpy_ms: f64,
    /// Migration throughput over all workers, GB/s.
    pub migrate_gbyte_s: f64,
    /// Copy throughput over all workers, GB/s.
    pub memcpy_gbyte_s: f64,
    /// `memcpy_ms / migrate_ms`: migration throughput as a fraction of a plain copy (target >= 0.5).
    pub ratio_to_memcpy: f64,
    /// Migrations timed.
    pub repeats: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Moves every expert of one layer to the next worker and back, `repeats` times, on `workers` in-process
/// workers, and copies the same bytes with `copy_from_slice` for comparison.
pub fn migration_bench(
    workers: usize,
    experts: usize,
    d_model: usize,
    d_ffn: usize,
    repeats: usize,
) -> Result<MigrationBench, RuntimeError> {
    if workers < 2 || experts == 0 || !experts.is_multiple_of(workers) || repeats == 0 {
        return Err(RuntimeError::invalid(
            "migration bench",
            format!(
                "needs >= 2 workers, experts a multiple of workers and >= 1 repeat; got {workers}, {experts}, {repeats}"
            ),
        ));
    }
    let spw = experts / workers;
    let shape = MoeShape {
        layers: 1,
        d_model,
        d_ffn,
        experts,
        slots_per_worker: spw,
        activation: Activation::Gelu,
        gate: GateConfig { top_k: 1, ..GateConfig::default() },
    };
    let a =
        Placement::contiguous(workers, spw, experts).map_err(|e| RuntimeError::invalid("placement", e.to_string()))?;
    // Every expert one worker further on.
    let rotated: Vec<u32> = (0..experts).map(|s| a.slots[(s + experts - spw) % experts]).collect();
    let b = Placement::new(workers, spw, experts, rotated)
        .map_err(|e| RuntimeError::invalid("placement", e.to_string()))?;
    let results =
        run_local(workers, Duration::from_secs(120), |comm| -> Result<(Vec<f64>, Vec<f64>, u64, u64), RuntimeError> {
            let mut rt = ExpertRuntime::new(&comm, shape, vec![a.clone()], 1, Adam::default(), None)?;
            let state_bytes = rt.layers[0].slots.state_len() as u64 * 4;
            let (mut mig, mut cpy) = (Vec::new(), Vec::new());
            let mut sent = 0;
            // Warm-up migration (first touch of fresh buffers), then the timed ones.
            for i in 0..=repeats {
                let target = if i % 2 == 0 { &b } else { &a };
                comm.barrier()?;
                let t = Instant::now();
                let out = rt.migrate_to(&comm, std::slice::from_ref(target))?;
                let mut ms = [t.elapsed().as_secs_f64() * 1e3];
                if !out.committed {
                    return Err(RuntimeError::invalid("migration bench", "a migration rolled back".to_string()));
                }
                sent = out.bytes_sent;
                comm_max(&comm, &mut ms)?;
                if i > 0 {
                    mig.push(ms[0]);
                }
            }
            let n = sent as usize / 4;
            let src = vec![1.0f32; n];
            let mut dst = vec![0.0f32; n];
            for i in 0..=repeats {
                comm.barrier()?;
                let t = Instant::now();
                dst.copy_from_slice(&src);
                std::hint::black_box(&dst);
                let mut ms = [t.elapsed().as_secs_f64() * 1e3];
                comm_max(&comm, &mut ms)?;
                if i > 0 {
                    cpy.push(ms[0]);
                }
            }
            let mut total = [sent as f64];
            comm.all_reduce_sum_f64(&mut total)?;
            Ok((mig, cpy, total[0] as u64, state_bytes))
        });
    let mut first = None;
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => {
                first.get_or_insert(v);
            }
            Err(WorkerError::Failed(e)) => return Err(e),
            Err(e) => return Err(RuntimeError::Worker { rank, reason: e.to_string() }),
        }
    }
    let (mig, cpy, bytes, state_bytes) = first.ok_or_else(|| RuntimeError::invalid("migration bench", "no worker"))?;
    let (migrate_ms, memcpy_ms) = (median(mig), median(cpy));
    Ok(MigrationBench {
        workers,
        experts,
        expert_state_bytes: state_bytes,
        bytes_per_migration: bytes,
        migrate_ms,
        memcpy_ms,
        migrate_gbyte_s: bytes as f64 / (migrate_ms * 1e-3) / 1e9,
        memcpy_gbyte_s: bytes as f64 / (memcpy_ms * 1e-3) / 1e9,
        ratio_to_memcpy: memcpy_ms / migrate_ms,
        repeats,
    })
}

/// Replaces `v` with its maximum over workers.
fn comm_max(comm: &dyn Communicator, v: &mut [f64; 1]) -> Result<(), RuntimeError> {
    let all = comm.all_gather(&v[0].to_le_bytes())?;
    v[0] = all
        .iter()
        .filter_map(|b| b.get(..8))
        .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
        .fold(0.0, f64::max);
    Ok(())
}
