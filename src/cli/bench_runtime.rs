//! `switchyard bench runtime`: migration throughput against a plain memory copy.

use anyhow::Result;
use clap::Args;

/// Arguments of `switchyard bench runtime`.
#[derive(Debug, Args)]
pub struct RuntimeBenchArgs {
    /// In-process workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Experts (all move at every migration; a multiple of --workers).
    #[arg(long, default_value_t = 16)]
    experts: usize,
    /// Model width of the experts.
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    /// Expert hidden width.
    #[arg(long, default_value_t = 2048)]
    d_ffn: usize,
    /// Timed migrations.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs the benchmark.
pub fn run(a: RuntimeBenchArgs) -> Result<()> {
    let r = switchyard_runtime::bench::migration_bench(a.workers, a.experts, a.d_model, a.d_ffn, a.repeats)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "migration: {} workers, {} experts of {:.1} MB state each; {:.1} MB per migration",
            r.workers,
            r.experts,
            r.expert_state_bytes as f64 / 1e6,
            r.bytes_per_migration as f64 / 1e6
        );
        println!(
            "migrate {:.2} ms ({:.2} GB/s) vs memcpy of the same bytes {:.2} ms ({:.2} GB/s): ratio {:.2} (median of {})",
            r.migrate_ms, r.migrate_gbyte_s, r.memcpy_ms, r.memcpy_gbyte_s, r.ratio_to_memcpy, r.repeats
        );
    }
    Ok(())
}
