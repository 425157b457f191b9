//! The command line: one module per subcommand; no logic that belongs in a crate.

mod bench;
mod bench_runtime;
mod calibrate;
mod device;
mod place;
mod plan;
mod presets;
mod profile;
mod profile_gpu;
mod progress;
mod report;
mod simulate;
mod specs;
mod trace;
mod train;

use clap::{Parser, Subcommand};

/// Plans and re-plans the parallel layout of Mixture-of-Experts training on GPU clusters.
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Rank every hybrid-parallel layout of a model on a cluster and build the pool of the best.
    Plan(plan::PlanArgs),
    /// Place experts for given per-expert loads with any algorithm (placements or EPLB tensors as JSON).
    Place(place::PlaceArgs),
    /// List the built-in models and clusters.
    Presets(presets::PresetsArgs),
    /// Fit the performance model's constants to measured MoE layer times; write a calibrated profile.
    Calibrate(calibrate::CalibrateArgs),
    /// Check a calibrated profile against measurements: MAPE, Pearson r and a scatter plot.
    Validate(calibrate::ValidateArgs),
    /// Replay a routing trace under a placement policy and a re-planning frequency.
    Simulate(simulate::SimulateArgs),
    /// Replay a trace under every algorithm and frequency: markdown table, JSON and plots.
    Report(report::ReportArgs),
    /// Routing traces.
    #[command(subcommand)]
    Trace(trace::TraceCommand),
    /// Show the link classes of a cluster's topology graph.
    Topology(presets::TopologyArgs),
    /// Train a small MoE language model on CPU workers, re-placing experts as the load moves.
    Train(Box<train::TrainArgs>),
    /// Measure this machine (GEMMs, collectives, the MoE layer) and fit a calibrated cluster profile to it.
    Profile(profile::ProfileArgs),
    /// Benchmarks of Switchyard's own components.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Plan(a) => plan::run(a),
        Command::Place(a) => place::run(a),
        Command::Presets(a) => presets::run(a),
        Command::Topology(a) => presets::run_topology(a),
        Command::Calibrate(a) => calibrate::run_calibrate(a),
        Command::Simulate(a) => simulate::run(a),
        Command::Report(a) => report::run(a),
        Command::Trace(c) => trace::run(c),
        Command::Validate(a) => calibrate::run_validate(a),
        Command::Bench(b) => bench::run(b),
        Command::Train(a) => train::run(*a),
        Command::Profile(a) => profile::run(a),
    }
}
