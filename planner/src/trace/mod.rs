//! Routing traces: per-iteration, per-MoE-layer [`LoadMatrix`] series (iteration x layer x source rank x expert)
//! read from the SmartMoE artifact's per-rank text files (a directory or a `.tar.gz` of
//! `table_iter{I}_rank{R}.log`), from CSV (`iter,layer,rank,e0..eN-1`) or from JSON Lines, and summarised by
//! [`trace_stats`] (skew, drift between snapshots, idle experts).
//!
//! Reading is strict by default: the first problem is returned as a [`TraceError`] that names the file and the
//! 1-based line. With [`ReadOptions::lenient`] bad lines are skipped, iterations left incomplete are dropped
//! whole, and both are listed as [`Skipped`].
//!
//! Module layout: `smartmoe` (the artifact's text format), `csv`, `jsonl` (readers and writers), `assemble`
//! (records to a validated [`Trace`]), `stats` (summary figures), `error` (errors and skips).

mod assemble;
mod count;
pub mod csv;
mod error;
pub mod jsonl;
pub mod smartmoe;
pub mod stats;
#[cfg(test)]
mod tests;

use std::path::Path;

use serde::{Deserialize, Serialize};
use switchyard_cost::LoadMatrix;

pub use csv::{read_csv, write_csv};
pub use error::{Skipped, TraceError};
pub use jsonl::{read_jsonl, write_jsonl};
pub use smartmoe::{read_smartmoe_dir, read_smartmoe_tar_gz};
pub use stats::{LayerStats, OverallStats, Summary, TraceStats, mean_expert_fractions, trace_stats};

/// A routing trace: for each recorded iteration (a [`Snapshot`]), one [`LoadMatrix`] per MoE layer whose rows
/// are the source ranks and whose columns are the logical experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// Where the trace was read from (a path), for reports.
    pub source: String,
    /// MoE layers per snapshot.
    pub layers: usize,
    /// The original index of each MoE layer (as written in the trace), `layers` of them, ascending.
    pub layer_ids: Vec<u64>,
    /// Source ranks (rows of every matrix).
    pub ranks: usize,
    /// Logical experts per layer (columns of every matrix).
    pub experts: usize,
    /// Micro-batches summed into each snapshot's matrices (1 when the format does not say).
    pub micro_batches: usize,
    /// The snapshots, by ascending iteration.
    pub snapshots: Vec<Snapshot>,
}

/// The routing load of one recorded iteration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The training iteration it was recorded at.
    pub iteration: u64,
    /// One matrix per MoE layer (in the order of [`Trace::layer_ids`]), summed over the iteration's micro-batches.
    pub layers: Vec<LoadMatrix>,
}

impl Trace {
    /// Number of snapshots.
    pub fn len(&self) -> usize {
        self.snapshots.len()
    }

    /// Whether the trace has no snapshot (never true for a trace returned by a reader).
    pub fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// The recorded iterations, ascending.
    pub fn iterations(&self) -> Vec<u64> {
        self.snapshots.iter().map(|s| s.iteration).collect()
    }

    /// The common gap between consecutive snapshots' iterations (the most frequent one; the smaller on a tie),
    /// e.g. 10 for a trace recorded every 10 iterations: one snapshot stands for that many iterations.
    /// `None` with fewer than two snapshots.
    pub fn snapshot_interval(&self) -> Option<u64> {
        let mut gaps: Vec<u64> = self.snapshots.windows(2).map(|w| w[1].iteration - w[0].iteration).collect();
        gaps.sort_unstable();
        let mut best: Option<(u64, usize)> = None;
        for run in gaps.chunk_by(|a, b| a == b) {
            if best.is_none_or(|(_, n)| run.len() > n) {
                best = Some((run[0], run.len()));
            }
        }
        best.map(|(gap, _)| gap)
    }

    /// Per-expert load (column sums over ranks) of layer position `layer` (an index into
    /// [`Trace::layer_ids`]) in snapshot `snapshot`.
    pub fn expert_loads(&self, snapshot: usize, layer: usize) -> Vec<u64> {
        self.snapshots[snapshot].layers[layer].expert_loads()
    }
}

/// How to read a trace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Skip bad lines and drop incomplete iterations (reported as [`Skipped`]) instead of failing on the first.
    pub lenient: bool,
    /// Keep only these MoE layers (indices as written in the trace); `None` keeps all.
    pub layers: Option<Vec<u64>>,
    /// Keep at most this many snapshots, the earliest iterations first; `None` keeps all. (In strict mode a
    /// SmartMoE directory or archive does not even parse the files of later iterations.)
    pub max_snapshots: Option<usize>,
}

/// The trace formats [`read_trace`] understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceFormat {
    /// A directory of SmartMoE `table_iter{I}_rank{R}.log` files (or of one sub-directory holding them).
    SmartMoeDir,
    /// A `.tar.gz`/`.tgz` archive of SmartMoE `table_iter{I}_rank{R}.log` files.
    SmartMoeTarGz,
    /// A CSV file with header `iter,layer,rank,e0,...,eN-1`.
    Csv,
    /// A JSON Lines (`.jsonl`/`.ndjson`) file of `{"iter", "layer", "rank", "counts" | "microbatches"}` objects.
    JsonLines,
}

impl TraceFormat {
    /// The format of `path`: a directory is SmartMoE; files go by extension.
    pub fn detect(path: &Path) -> Result<TraceFormat, TraceError> {
        if path.is_dir() {
            return Ok(TraceFormat::SmartMoeDir);
        }
        let name = path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default();
        if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
            Ok(TraceFormat::SmartMoeTarGz)
        } else if name.ends_with(".csv") {
            Ok(TraceFormat::Csv)
        } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
            Ok(TraceFormat::JsonLines)
        } else if !path.exists() {
            Err(TraceError::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            })
        } else {
            Err(TraceError::UnknownFormat { path: path.display().to_string() })
        }
    }
}

/// Reads the trace at `path` in whatever format it is in (see [`TraceFormat::detect`]). Returns the trace and, in
/// lenient mode, what was skipped (always empty in strict mode).
pub fn read_trace(path: &Path, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    match TraceFormat::detect(path)? {
        TraceFormat::SmartMoeDir => read_smartmoe_dir(path, opts),
        TraceFormat::SmartMoeTarGz => read_smartmoe_tar_gz(path, opts),
        TraceFormat::Csv => {
            let file = open(path)?;
            read_csv(file, &path.display().to_string(), opts)
        }
        TraceFormat::JsonLines => {
            let file = open(path)?;
            read_jsonl(file, &path.display().to_string(), opts)
        }
    }
}

/// Writes `trace` to `path` as CSV (`.csv`) or JSON Lines (`.jsonl`/`.ndjson`).
pub fn write_trace(trace: &Trace, path: &Path) -> Result<(), TraceError> {
    let io_err = |source| TraceError::Io { path: path.display().to_string(), source };
    let format = match TraceFormat::detect(path) {
        Ok(f) => f,
        // The file need not exist yet: go by its name.
        Err(TraceError::Io { .. }) => {
            let name = path.to_string_lossy().to_ascii_lowercase();
            if name.ends_with(".csv") {
                TraceFormat::Csv
            } else if name.ends_with(".jsonl") || name.ends_with(".ndjson") {
                TraceFormat::JsonLines
            } else {
                return Err(TraceError::UnknownFormat { path: path.display().to_string() });
            }
        }
        Err(e) => return Err(e),
    };
    let file = std::fs::File::create(path).map_err(io_err)?;
    let mut w = std::io::BufWriter::new(file);
    match format {
        TraceFormat::Csv => write_csv(trace, &mut w),
        TraceFormat::JsonLines => write_jsonl(trace, &mut w),
        _ => return Err(TraceError::UnknownFormat { path: path.display().to_string() }),
    }
    .and_then(|()| std::io::Write::flush(&mut w))
    .map_err(io_err)
}

fn open(path: &Path) -> Result<std::fs::File, TraceError> {
    std::fs::File::open(path).map_err(|source| TraceError::Io { path: path.display().to_string(), source })
}
