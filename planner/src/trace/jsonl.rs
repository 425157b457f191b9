//! The JSON Lines trace format: one object per line, either
//! `{"iter": I, "layer": L, "rank": R, "counts": [c_0, ..., c_{N-1}]}` or, with the micro-batches kept apart,
//! `{"iter": I, "layer": L, "rank": R, "microbatches": [[..], [..]]}` (summed on reading). An optional
//! `"n_micro_batches": M` says how many micro-batches `counts` sums. Blank lines are ignored; records may come in
//! any order; every (iteration, layer, rank) must appear exactly once.

use std::fmt;
use std::io::{Read, Write};

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::assemble::{Cell, Collected, Issues, assemble};
use super::count::{MAX_COUNT, MAX_RANK};
use super::error::{Skipped, TraceError};
use super::{ReadOptions, Trace};

/// One record as written in the file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(alias = "iteration")]
    iter: u64,
    layer: u64,
    rank: u64,
    #[serde(default)]
    counts: Option<Vec<Count>>,
    #[serde(default, alias = "micro_batches")]
    microbatches: Option<Vec<Vec<Count>>>,
    #[serde(default)]
    n_micro_batches: Option<usize>,
}

/// A count: a non-negative whole JSON number (`12` or `12.0`).
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole non-negative count")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                if v > MAX_COUNT {
                    return Err(E::custom(format!("count {v} is too large")));
                }
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                if v < 0 {
                    return Err(E::custom(format!("count {v} is negative")));
                }
                self.visit_u64(v as u64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v <= MAX_COUNT as f64) {
                    return Err(E::custom(format!("count {v} is not a whole non-negative number")));
                }
                Ok(Count(v as u64))
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a JSON Lines trace from `input`; `name` (usually the path) names it in messages and in
/// [`Trace::source`].
pub fn read_jsonl<R: Read>(mut input: R, name: &str, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let mut data = Vec::new();
    input.read_to_end(&mut data).map_err(|source| TraceError::Io { path: name.to_string(), source })?;
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&data);
    let mut issues = Issues { lenient: opts.lenient, skipped: Vec::new() };
    let mut cells = Vec::new();
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = raw.trim_ascii();
        if text.is_empty() {
            continue;
        }
        match parse_record(text, name, line) {
            Ok(cell) => cells.push(cell),
            Err(e) => issues.report(e, "skipped the line")?,
        }
    }
    let home_name = name.to_string();
    let collected = Collected {
        source: name.to_string(),
        files: vec![name.to_string()],
        cells,
        skipped: issues.skipped,
        home: Box::new(move |_, _| home_name.clone()),
    };
    assemble(collected, opts)
}

fn parse_record(text: &[u8], file: &str, line: usize) -> Result<Cell, TraceError> {
    let json = |detail: String| TraceError::Json { file: file.to_string(), line, detail };
    let r: Record = serde_json::from_slice(text).map_err(|e| {
        // serde_json counts lines within the text it was given (always 1 here): keep only the column.
        let full = e.to_string();
        let message = full.rfind(" at line ").map_or(full.as_str(), |at| &full[..at]);
        let detail = format!("{message} (column {})", e.column());
        if e.is_eof() {
            TraceError::Truncated {
                file: file.to_string(),
                line,
                detail: format!("the JSON object is incomplete: {detail}"),
            }
        } else {
            json(detail)
        }
    })?;
    if r.rank > MAX_RANK {
        return Err(TraceError::NotANumber {
            file: file.to_string(),
            line,
            field: "rank".into(),
            token: r.rank.to_string(),
            why: format!("too large (at most {MAX_RANK})"),
        });
    }
    let (counts, micro_batches) = match (r.counts, r.microbatches) {
        (Some(c), None) => (c.into_iter().map(|x| x.0).collect(), r.n_micro_batches.unwrap_or(1)),
        (None, Some(mbs)) => {
            if let Some(n) = r.n_micro_batches.filter(|&n| n != mbs.len()) {
                return Err(json(format!("`n_micro_batches` is {n} but `microbatches` has {} lists", mbs.len())));
            }
            let experts = mbs.first().map_or(0, Vec::len);
            if let Some((k, mb)) = mbs.iter().enumerate().find(|(_, mb)| mb.len() != experts) {
                return Err(TraceError::ExpertCount {
                    file: file.to_string(),
                    line,
                    expected: experts,
                    found: mb.len(),
                    micro_batch: Some(k + 1),
                });
            }
            let mut sums = vec![0u64; experts];
            for mb in &mbs {
                for (s, c) in sums.iter_mut().zip(mb) {
                    *s = s.saturating_add(c.0);
                }
            }
            (sums, mbs.len())
        }
        (Some(_), Some(_)) => return Err(json("give either `counts` or `microbatches`, not both".into())),
        (None, None) => return Err(json("missing field `counts` (or `microbatches`)".into())),
    };
    if micro_batches == 0 {
        return Err(json("a record needs at least one micro-batch".into()));
    }
    Ok(Cell { iteration: r.iter, layer: r.layer, rank: r.rank as usize, counts, micro_batches, file: 0, line })
}

/// Writes `trace` as JSON Lines: one `{"iter", "layer", "rank", "counts"}` object per (snapshot, layer, rank), in
/// that order, with `"n_micro_batches"` when the trace sums more than one micro-batch per snapshot.
pub fn write_jsonl<W: Write>(trace: &Trace, mut out: W) -> std::io::Result<()> {
    let mut line = String::new();
    for s in &trace.snapshots {
        for (m, layer) in s.layers.iter().zip(&trace.layer_ids) {
            for rank in 0..m.ranks {
                line.clear();
                line += &format!("{{\"iter\":{},\"layer\":{layer},\"rank\":{rank},\"counts\":[", s.iteration);
                for (k, c) in m.row(rank).iter().enumerate() {
                    if k > 0 {
                        line.push(',');
                    }
                    line += &c.to_string();
                }
                line.push(']');
                if trace.micro_batches != 1 {
                    line += &format!(",\"n_micro_batches\":{}", trace.micro_batches);
                }
                line += "}\n";
                out.write_all(line.as_bytes())?;
            }
        }
    }
    Ok(())
}
