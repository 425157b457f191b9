//! What can go wrong while reading a trace ([`TraceError`]) and what lenient mode skipped instead of failing
//! ([`Skipped`]). Every error names the file and, where one is to blame, its 1-based line, says what was expected
//! and what was found, and ends with a hint on how to fix it.

use std::fmt;

use serde::Serialize;

/// A trace that cannot be read. The `Display` form is a complete, human-readable message:
/// `FILE line N: PROBLEM; fix: HINT`.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file or directory could not be read.
    Io {
        /// The path that failed.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The path is neither a SmartMoE directory/.tar.gz, a .csv nor a .jsonl/.ndjson file.
    UnknownFormat {
        /// The path given.
        path: String,
    },
    /// A line ends before its record is complete (e.g. a file cut off while it was written).
    Truncated {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Where the line ends and what should have followed.
        detail: String,
    },
    /// A character or token that the format does not allow at that place.
    Syntax {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// 1-based column (byte offset), 0 when unknown.
        column: usize,
        /// What was expected and what was found.
        detail: String,
    },
    /// A field that should be a whole non-negative number is not one.
    NotANumber {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Which field (e.g. `e5`, `rank`, `micro-batch 2, expert 7`).
        field: String,
        /// The text found.
        token: String,
        /// Why it is not a count (not a number, negative, fractional, too large).
        why: String,
    },
    /// A record with another number of experts than the rest of the trace.
    ExpertCount {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Experts per record in the rest of the trace (or in the CSV header).
        expected: usize,
        /// Experts in this record.
        found: usize,
        /// The 1-based micro-batch of the record that has the wrong length, where the format has micro-batches.
        micro_batch: Option<usize>,
    },
    /// A record with another number of micro-batches than the rest of the trace.
    MicroBatchCount {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// Micro-batches per record in the rest of the trace.
        expected: usize,
        /// Micro-batches in this record.
        found: usize,
    },
    /// A file or an iteration holds another set of MoE layers than the rest of the trace.
    LayerCount {
        /// The file.
        file: String,
        /// 1-based line of the first unexpected layer, `None` when layers are only missing.
        line: Option<usize>,
        /// The iteration concerned.
        iteration: u64,
        /// The layer indices the rest of the trace has.
        expected: Vec<u64>,
        /// The layer indices found here.
        found: Vec<u64>,
    },
    /// An iteration lacks the data of one source rank (for one layer or for all of them).
    MissingRank {
        /// The file that should hold the data.
        file: String,
        /// The iteration.
        iteration: u64,
        /// The missing rank.
        rank: usize,
        /// The layer whose data is missing, `None` when the rank is missing for every layer.
        layer: Option<u64>,
        /// Ranks per iteration in the rest of the trace.
        ranks: usize,
    },
    /// A rank index beyond the number of ranks the rest of the trace has.
    RankOutOfRange {
        /// The file.
        file: String,
        /// 1-based line number, 0 when the whole file is concerned.
        line: usize,
        /// The iteration.
        iteration: u64,
        /// The rank found.
        rank: usize,
        /// Ranks per iteration in the rest of the trace.
        ranks: usize,
    },
    /// The same (iteration, layer, rank) appears twice.
    Duplicate {
        /// The file of the second occurrence.
        file: String,
        /// 1-based line of the second occurrence.
        line: usize,
        /// The iteration.
        iteration: u64,
        /// The layer.
        layer: u64,
        /// The rank.
        rank: usize,
        /// Where the first occurrence is (`FILE line N`).
        first: String,
    },
    /// A missing or malformed CSV header.
    Header {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// A JSON Lines record that is not valid JSON or not a trace record.
    Json {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// The JSON parser's message.
        detail: String,
    },
    /// `ReadOptions::layers` asks for a layer the trace does not have.
    UnknownLayer {
        /// The trace.
        path: String,
        /// The layer asked for.
        requested: u64,
        /// The layers the trace has.
        available: Vec<u64>,
    },
    /// Nothing usable is left.
    Empty {
        /// The trace.
        path: String,
        /// Why.
        detail: String,
    },
}

/// Formats sorted layer indices compactly: `0-4, 6, 9-11`.
pub(crate) fn ranges(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}-{}", ids[i], ids[j]) } else { ids[i].to_string() });
        i = j + 1;
    }
    out.join(", ")
}

impl TraceError {
    /// The file (or path) the error is about.
    pub fn file(&self) -> &str {
        match self {
            TraceError::Io { path, .. }
            | TraceError::UnknownFormat { path }
            | TraceError::UnknownLayer { path, .. }
            | TraceError::Empty { path, .. } => path,
            TraceError::Truncated { file, .. }
            | TraceError::Syntax { file, .. }
            | TraceError::NotANumber { file, .. }
            | TraceError::ExpertCount { file, .. }
            | TraceError::MicroBatchCount { file, .. }
            | TraceError::LayerCount { file, .. }
            | TraceError::MissingRank { file, .. }
            | TraceError::RankOutOfRange { file, .. }
            | TraceError::Duplicate { file, .. }
            | TraceError::Header { file, .. }
            | TraceError::Json { file, .. } => file,
        }
    }

    /// The 1-based line the error is about, if one is to blame.
    pub fn line(&self) -> Option<usize> {
        match self {
            TraceError::Truncated { line, .. }
            | TraceError::Syntax { line, .. }
            | TraceError::NotANumber { line, .. }
            | TraceError::ExpertCount { line, .. }
            | TraceError::MicroBatchCount { line, .. }
            | TraceError::Duplicate { line, .. }
            | TraceError::Header { line, .. }
            | TraceError::Json { line, .. } => Some(*line),
            TraceError::RankOutOfRange { line, .. } => (*line > 0).then_some(*line),
            TraceError::LayerCount { line, .. } => *line,
            _ => None,
        }
    }

    /// What is wrong, without the location and the fix hint.
    pub fn problem(&self) -> String {
        match self {
            TraceError::Io { source, .. } => format!("cannot read: {source}"),
            TraceError::UnknownFormat { .. } => "unrecognised trace format".into(),
            TraceError::Truncated { detail, .. } => format!("truncated line: {detail}"),
            TraceError::Syntax { column, detail, .. } => {
                if *column > 0 {
                    format!("column {column}: {detail}")
                } else {
                    detail.clone()
                }
            }
            TraceError::NotANumber { field, token, why, .. } => {
                format!("{field} is `{token}`: {why} (expected a whole non-negative number)")
            }
            TraceError::ExpertCount { expected, found, micro_batch, .. } => match micro_batch {
                Some(mb) => format!("expected {expected} experts per micro-batch, found {found} in micro-batch {mb}"),
                None => format!("expected {expected} experts, found {found}"),
            },
            TraceError::MicroBatchCount { expected, found, .. } => {
                format!("expected {expected} micro-batches, found {found}")
            }
            TraceError::LayerCount { iteration, expected, found, .. } => {
                let missing: Vec<u64> = expected.iter().filter(|l| !found.contains(l)).copied().collect();
                let extra: Vec<u64> = found.iter().filter(|l| !expected.contains(l)).copied().collect();
                let mut s = format!(
                    "iteration {iteration}: inconsistent layers: found {} layer(s) ({}), the rest of the trace has {} ({})",
                    found.len(),
                    ranges(found),
                    expected.len(),
                    ranges(expected)
                );
                if !missing.is_empty() {
                    s += &format!("; missing {}", ranges(&missing));
                }
                if !extra.is_empty() {
                    s += &format!("; unexpected {}", ranges(&extra));
                }
                s
            }
            TraceError::MissingRank { iteration, rank, layer, ranks, .. } => {
                let what = match layer {
                    Some(l) => format!("layer {l}"),
                    None => "any layer".into(),
                };
                format!(
                    "iteration {iteration}: rank {rank} is missing (no data for {what}); every iteration needs ranks 0-{}",
                    ranks.saturating_sub(1)
                )
            }
            TraceError::RankOutOfRange { iteration, rank, ranks, .. } => format!(
                "iteration {iteration}: rank {rank} is out of range: the rest of the trace has ranks 0-{}",
                ranks.saturating_sub(1)
            ),
            TraceError::Duplicate { iteration, layer, rank, first, .. } => {
                format!("duplicate record for iteration {iteration}, layer {layer}, rank {rank} (first at {first})")
            }
            TraceError::Header { detail, .. } => format!("bad CSV header: {detail}"),
            TraceError::Json { detail, .. } => format!("bad JSON record: {detail}"),
            TraceError::UnknownLayer { requested, available, .. } => {
                format!("layer {requested} was requested but the trace has layers {}", ranges(available))
            }
            TraceError::Empty { detail, .. } => format!("empty trace: {detail}"),
        }
    }

    /// How to fix it.
    pub fn fix(&self) -> &'static str {
        match self {
            TraceError::Io { .. } => "check that the path exists and is readable",
            TraceError::UnknownFormat { .. } => {
                "pass a directory or .tar.gz of table_iter{I}_rank{R}.log files (SmartMoE), a .csv file \
                 (header iter,layer,rank,e0,...) or a .jsonl/.ndjson file"
            }
            TraceError::Truncated { .. } => {
                "complete or delete the line (the file was probably cut off), or pass --lenient to skip it"
            }
            TraceError::Syntax { .. } | TraceError::Json { .. } => {
                "correct the line to the format's syntax, or pass --lenient to skip it"
            }
            TraceError::NotANumber { .. } => "write token counts as whole numbers, or pass --lenient to skip the line",
            TraceError::ExpertCount { .. } => {
                "every record needs one count per expert; correct the line or pass --lenient to skip it"
            }
            TraceError::MicroBatchCount { .. } => {
                "every record needs the same number of micro-batches; correct the line or pass --lenient to skip it"
            }
            TraceError::LayerCount { .. } => {
                "every file/iteration needs the same MoE layers; restore the missing lines, select layers that all \
                 iterations have, or pass --lenient to drop the iteration"
            }
            TraceError::MissingRank { .. } => "supply the missing data, or pass --lenient to drop the iteration",
            TraceError::RankOutOfRange { .. } => {
                "remove the stray rank or supply all ranks for every iteration, or pass --lenient to drop the iteration"
            }
            TraceError::Duplicate { .. } => "keep one record per (iteration, layer, rank), or pass --lenient",
            TraceError::Header { .. } => "start the file with the header iter,layer,rank,e0,e1,...,e{N-1}",
            TraceError::UnknownLayer { .. } => "select layers the trace has",
            TraceError::Empty { .. } => "point at a trace with at least one complete iteration",
        }
    }
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file())?;
        if let Some(line) = self.line() {
            write!(f, " line {line}")?;
        }
        write!(f, ": {}; fix: {}", self.problem(), self.fix())
    }
}

/// Something lenient mode skipped instead of failing: a bad line, or a whole iteration that was incomplete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The file concerned.
    pub file: String,
    /// The 1-based line, `None` when a whole iteration (snapshot) was dropped.
    pub line: Option<usize>,
    /// What was wrong and what was skipped.
    pub reason: String,
}

impl Skipped {
    /// A skip caused by `error`; `action` says what was skipped (e.g. "skipped the line").
    pub(crate) fn from_error(error: &TraceError, action: &str) -> Self {
        Skipped { file: error.file().to_string(), line: error.line(), reason: format!("{}; {action}", error.problem()) }
    }
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "{} line {l}: {}", self.file, self.reason),
            None => write!(f, "{}: {}", self.file, self.reason),
        }
    }
}
