//! Turns the records every reader produces ([`Cell`]: the counts one rank sent in one layer of one iteration)
//! into a validated [`Trace`]: one expert count, one micro-batch count and one set of layers for the whole trace
//! (the most common ones), no duplicates, and every (layer, rank) present in every kept iteration.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use switchyard_cost::LoadMatrix;

use super::error::{Skipped, TraceError};
use super::{ReadOptions, Snapshot, Trace};

/// One record: what `rank` sent to each expert in `layer` at `iteration`, summed over `micro_batches`.
#[derive(Debug, Clone)]
pub(crate) struct Cell {
    pub iteration: u64,
    pub layer: u64,
    pub rank: usize,
    pub counts: Vec<u64>,
    pub micro_batches: usize,
    /// Index into [`Collected::files`].
    pub file: usize,
    /// 1-based line.
    pub line: usize,
}

/// Everything a reader collected.
pub(crate) struct Collected {
    /// The trace's path, for [`Trace::source`] and whole-trace errors.
    pub source: String,
    /// Names of the files the cells come from.
    pub files: Vec<String>,
    /// The records, in file and line order.
    pub cells: Vec<Cell>,
    /// What the reader already skipped (lenient mode).
    pub skipped: Vec<Skipped>,
    /// The file that should hold the data of (iteration, rank), for missing-data messages.
    pub home: Box<dyn Fn(u64, usize) -> String + Send + Sync>,
}

/// Strict mode turns an issue into an error; lenient mode records it as skipped.
pub(crate) struct Issues {
    pub lenient: bool,
    pub skipped: Vec<Skipped>,
}

impl Issues {
    /// Returns `error` in strict mode; records it with `action` (what was skipped) in lenient mode.
    pub fn report(&mut self, error: TraceError, action: &str) -> Result<(), TraceError> {
        if self.lenient {
            self.skipped.push(Skipped::from_error(&error, action));
            Ok(())
        } else {
            Err(error)
        }
    }
}

/// The most frequent value; on a tie the one `better` prefers.
pub(crate) fn mode<T: Ord + Clone>(items: impl IntoIterator<Item = T>, better: impl Fn(&T, &T) -> bool) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for x in items {
        *counts.entry(x).or_default() += 1;
    }
    let mut best: Option<(T, usize)> = None;
    for (x, n) in counts {
        let replace = match &best {
            None => true,
            Some((b, m)) => n > *m || (n == *m && better(&x, b)),
        };
        if replace {
            best = Some((x, n));
        }
    }
    best.map(|(x, _)| x)
}

/// Keeps only the layers `opts.layers` asks for; an unknown layer is an error.
pub(crate) fn filter_layers(cells: &mut Vec<Cell>, opts: &ReadOptions, source: &str) -> Result<(), TraceError> {
    let Some(want) = &opts.layers else { return Ok(()) };
    let present: BTreeSet<u64> = cells.iter().map(|c| c.layer).collect();
    if let Some(&missing) = want.iter().find(|l| !present.is_empty() && !present.contains(l)) {
        return Err(TraceError::UnknownLayer {
            path: source.to_string(),
            requested: missing,
            available: present.into_iter().collect(),
        });
    }
    cells.retain(|c| want.contains(&c.layer));
    Ok(())
}

/// Validates the collected records and builds the trace.
pub(crate) fn assemble(mut c: Collected, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let mut issues = Issues { lenient: opts.lenient, skipped: std::mem::take(&mut c.skipped) };
    filter_layers(&mut c.cells, opts, &c.source)?;
    let empty = |issues: &Issues, source: &str| {
        let detail = match issues.skipped.first() {
            Some(first) => format!(
                "nothing usable is left after {} problem(s) were skipped; the first: {first}",
                issues.skipped.len()
            ),
            None => "no records found".to_string(),
        };
        TraceError::Empty { path: source.to_string(), detail }
    };
    if c.cells.is_empty() {
        return Err(empty(&issues, &c.source));
    }
    let file = |c: &Collected, cell: &Cell| c.files[cell.file].clone();

    // One expert count and one micro-batch count for the whole trace: the most common ones.
    let experts = mode(c.cells.iter().map(|x| x.counts.len()), |a, b| a > b).unwrap_or(0);
    let micro_batches = mode(c.cells.iter().map(|x| x.micro_batches), |a, b| a > b).unwrap_or(1);
    let mut keep = vec![true; c.cells.len()];
    for (i, cell) in c.cells.iter().enumerate() {
        if cell.counts.len() != experts {
            let e = TraceError::ExpertCount {
                file: file(&c, cell),
                line: cell.line,
                expected: experts,
                found: cell.counts.len(),
                micro_batch: None,
            };
            issues.report(e, "skipped the line")?;
            keep[i] = false;
        } else if cell.micro_batches != micro_batches {
            let e = TraceError::MicroBatchCount {
                file: file(&c, cell),
                line: cell.line,
                expected: micro_batches,
                found: cell.micro_batches,
            };
            issues.report(e, "skipped the line")?;
            keep[i] = false;
        }
    }
    if experts == 0 {
        return Err(TraceError::Empty { path: c.source.clone(), detail: "the records have no expert counts".into() });
    }

    // Group by iteration; one record per (iteration, layer, rank).
    let mut by_iter: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, cell) in c.cells.iter().enumerate() {
        if keep[i] {
            by_iter.entry(cell.iteration).or_default().push(i);
        }
    }
    for idxs in by_iter.values_mut() {
        let mut seen: HashMap<(u64, usize), usize> = HashMap::new();
        let mut kept = Vec::with_capacity(idxs.len());
        for &i in idxs.iter() {
            let cell = &c.cells[i];
            if let Some(&j) = seen.get(&(cell.layer, cell.rank)) {
                let first = &c.cells[j];
                let e = TraceError::Duplicate {
                    file: file(&c, cell),
                    line: cell.line,
                    iteration: cell.iteration,
                    layer: cell.layer,
                    rank: cell.rank,
                    first: format!("{} line {}", c.files[first.file], first.line),
                };
                issues.report(e, "skipped the line, kept the first record")?;
            } else {
                seen.insert((cell.layer, cell.rank), i);
                kept.push(i);
            }
        }
        *idxs = kept;
    }

    // One set of layers and one rank count for the whole trace: the most common ones over iterations.
    let layer_set = |idxs: &[usize]| idxs.iter().map(|&i| c.cells[i].layer).collect::<BTreeSet<u64>>();
    let rank_count = |idxs: &[usize]| idxs.iter().map(|&i| c.cells[i].rank.saturating_add(1)).max().unwrap_or(0);
    let layer_ids: Vec<u64> = mode(by_iter.values().map(|v| layer_set(v)), |a, b| a.len() > b.len())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let ranks = mode(by_iter.values().map(|v| rank_count(v)), |a, b| a > b).unwrap_or(0);
    let position: HashMap<u64, usize> = layer_ids.iter().enumerate().map(|(p, &l)| (l, p)).collect();

    let mut snapshots = Vec::new();
    let limit = opts.max_snapshots.unwrap_or(usize::MAX);
    'iterations: for (&iteration, idxs) in &by_iter {
        if snapshots.len() >= limit {
            break;
        }
        let drop = format!("dropped iteration {iteration}");
        let found: Vec<u64> = layer_set(idxs).into_iter().collect();
        if found != layer_ids {
            let stray = idxs.iter().map(|&i| &c.cells[i]).find(|x| !position.contains_key(&x.layer));
            let at = stray.unwrap_or(&c.cells[idxs[0]]);
            let e = TraceError::LayerCount {
                file: file(&c, at),
                line: stray.map(|x| x.line),
                iteration,
                expected: layer_ids.clone(),
                found,
            };
            issues.report(e, &drop)?;
            continue;
        }
        if let Some(x) = idxs.iter().map(|&i| &c.cells[i]).find(|x| x.rank >= ranks) {
            let e = TraceError::RankOutOfRange { file: file(&c, x), line: x.line, iteration, rank: x.rank, ranks };
            issues.report(e, &drop)?;
            continue;
        }
        let mut slot: Vec<Option<usize>> = vec![None; layer_ids.len() * ranks];
        for &i in idxs {
            let x = &c.cells[i];
            slot[position[&x.layer] * ranks + x.rank] = Some(i);
        }
        for rank in 0..ranks {
            let missing: Vec<u64> =
                (0..layer_ids.len()).filter(|&p| slot[p * ranks + rank].is_none()).map(|p| layer_ids[p]).collect();
            if !missing.is_empty() {
                let layer = if missing.len() == layer_ids.len() { None } else { Some(missing[0]) };
                let e = TraceError::MissingRank { file: (c.home)(iteration, rank), iteration, rank, layer, ranks };
                issues.report(e, &drop)?;
                continue 'iterations;
            }
        }
        let mut layers = Vec::with_capacity(layer_ids.len());
        for p in 0..layer_ids.len() {
            let mut m = LoadMatrix::zeros(ranks, experts);
            for rank in 0..ranks {
                let i = slot[p * ranks + rank].expect("checked above");
                m.counts[rank * experts..(rank + 1) * experts].copy_from_slice(&c.cells[i].counts);
            }
            layers.push(m);
        }
        snapshots.push(Snapshot { iteration, layers });
    }
    if snapshots.is_empty() {
        return Err(empty(&issues, &c.source));
    }
    let trace =
        Trace { source: c.source, layers: layer_ids.len(), layer_ids, ranks, experts, micro_batches, snapshots };
    Ok((trace, issues.skipped))
}
