//! `switchyard trace stats`: per-layer skew, drift between snapshots and idle experts of a routing trace.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use switchyard_planner::trace::{ReadOptions, read_trace, trace_stats};

/// Trace subcommands.
#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Per-layer skew (max/mean expert load), drift between snapshots, idle experts.
    Stats(StatsArgs),
}

/// Arguments of `switchyard trace stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// The trace: a directory or .tar.gz of SmartMoE logs, a .csv or a .jsonl.
    path: PathBuf,
    /// Skip broken lines and report them instead of failing.
    #[arg(long)]
    lenient: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a trace subcommand.
pub fn run(cmd: TraceCommand) -> Result<()> {
    match cmd {
        TraceCommand::Stats(a) => {
            let (trace, skipped) = read_trace(&a.path, &ReadOptions { lenient: a.lenient, ..Default::default() })?;
            let stats = trace_stats(&trace);
            if a.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"stats": stats, "skipped": skipped.iter().map(|s| s.to_string()).collect::<Vec<_>>()})
                    )?
                );
            } else {
                print!("{}", stats.to_table());
                if !skipped.is_empty() {
                    println!("skipped {} broken item(s):", skipped.len());
                    for s in skipped.iter().take(20) {
                        println!("  {s}");
                    }
                }
            }
            Ok(())
        }
    }
}
