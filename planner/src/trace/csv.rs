//! The CSV trace format: a required header `iter,layer,rank,e0,e1,...,e{N-1}`, then one row per (iteration,
//! layer, source rank) with the rank's token-expert assignments to each of the N experts. Rows may come in any
//! order; every (iteration, layer, rank) must appear exactly once. Blank lines and lines starting with `#` are
//! ignored; fields may be padded with spaces; counts may be written `12` or `12.0`.

use std::io::{Read, Write};

use super::assemble::{Cell, Collected, Issues, assemble};
use super::count::{MAX_RANK, parse_count};
use super::error::{Skipped, TraceError};
use super::{ReadOptions, Trace};

/// Reads a CSV trace from `input`; `name` (usually the path) names it in messages and in [`Trace::source`].
pub fn read_csv<R: Read>(mut input: R, name: &str, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let mut data = Vec::new();
    input.read_to_end(&mut data).map_err(|source| TraceError::Io { path: name.to_string(), source })?;
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&data);
    let mut issues = Issues { lenient: opts.lenient, skipped: Vec::new() };
    let mut cells = Vec::new();
    let mut experts: Option<usize> = None;
    let last = data.split(|&b| b == b'\n').count();
    let ends_with_newline = data.ends_with(b"\n");
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let text = raw.trim_ascii();
        if text.is_empty() || text.starts_with(b"#") {
            continue;
        }
        let fields: Vec<&[u8]> = text.split(|&b| b == b',').map(<[u8]>::trim_ascii).collect();
        let Some(experts) = experts else {
            experts = Some(check_header(&fields, name, line)?);
            continue;
        };
        let want = 3 + experts;
        if fields.len() != want {
            let cut_off =
                fields.len() < want && ((line == last && !ends_with_newline) || fields.last() == Some(&&b""[..]));
            let e = if cut_off {
                TraceError::Truncated {
                    file: name.to_string(),
                    line,
                    detail: format!(
                        "found {} of {want} fields (iter, layer, rank and {experts} expert counts)",
                        fields.len()
                    ),
                }
            } else {
                TraceError::ExpertCount {
                    file: name.to_string(),
                    line,
                    expected: experts,
                    found: fields.len().saturating_sub(3),
                    micro_batch: None,
                }
            };
            issues.report(e, "skipped the line")?;
            continue;
        }
        match parse_row(&fields, name, line) {
            Ok((iteration, layer, rank, counts)) => {
                cells.push(Cell { iteration, layer, rank, counts, micro_batches: 1, file: 0, line })
            }
            Err(e) => issues.report(e, "skipped the line")?,
        }
    }
    if experts.is_none() {
        return Err(TraceError::Empty { path: name.to_string(), detail: "the file has no header and no rows".into() });
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

/// Checks the header; returns the number of experts it names.
fn check_header(fields: &[&[u8]], file: &str, line: usize) -> Result<usize, TraceError> {
    let err = |detail: String| TraceError::Header { file: file.to_string(), line, detail };
    let text = |f: &[u8]| String::from_utf8_lossy(f).into_owned();
    if fields.len() < 4 {
        return Err(err(format!(
            "expected iter,layer,rank followed by at least one expert column e0, found {} column(s)",
            fields.len()
        )));
    }
    for (k, want) in ["iter", "layer", "rank"].iter().enumerate() {
        if !fields[k].eq_ignore_ascii_case(want.as_bytes()) {
            return Err(err(format!("column {} should be `{want}`, found `{}`", k + 1, text(fields[k]))));
        }
    }
    for (k, f) in fields[3..].iter().enumerate() {
        let want = format!("e{k}");
        if !f.eq_ignore_ascii_case(want.as_bytes()) {
            return Err(err(format!("column {} should be `{want}`, found `{}`", k + 4, text(f))));
        }
    }
    Ok(fields.len() - 3)
}

/// Parses one data row of the right width.
fn parse_row(fields: &[&[u8]], file: &str, line: usize) -> Result<(u64, u64, usize, Vec<u64>), TraceError> {
    let num = |k: usize| {
        parse_count(fields[k]).map_err(|why| {
            let field = match k {
                0 => "iter".to_string(),
                1 => "layer".to_string(),
                2 => "rank".to_string(),
                _ => format!("e{}", k - 3),
            };
            let mut token = String::from_utf8_lossy(fields[k]).into_owned();
            if token.chars().count() > 40 {
                token = token.chars().take(40).collect::<String>() + "...";
            }
            TraceError::NotANumber { file: file.to_string(), line, field, token, why: why.into() }
        })
    };
    let iteration = num(0)?;
    let layer = num(1)?;
    let rank = num(2)?;
    if rank > MAX_RANK {
        return Err(TraceError::NotANumber {
            file: file.to_string(),
            line,
            field: "rank".into(),
            token: rank.to_string(),
            why: format!("too large (at most {MAX_RANK})"),
        });
    }
    let counts = (3..fields.len()).map(num).collect::<Result<Vec<u64>, _>>()?;
    Ok((iteration, layer, rank as usize, counts))
}

/// Writes `trace` as CSV: the header, then one row per (snapshot, layer, rank), in that order. Layers are written
/// with their original indices ([`Trace::layer_ids`]). The micro-batch count is not part of the format.
pub fn write_csv<W: Write>(trace: &Trace, mut out: W) -> std::io::Result<()> {
    let mut line = String::from("iter,layer,rank");
    for e in 0..trace.experts {
        line += &format!(",e{e}");
    }
    line.push('\n');
    out.write_all(line.as_bytes())?;
    for s in &trace.snapshots {
        for (m, layer) in s.layers.iter().zip(&trace.layer_ids) {
            for rank in 0..m.ranks {
                line.clear();
                line += &format!("{},{layer},{rank}", s.iteration);
                for c in m.row(rank) {
                    line.push(',');
                    line += &c.to_string();
                }
                line.push('\n');
                out.write_all(line.as_bytes())?;
            }
        }
    }
    Ok(())
}
