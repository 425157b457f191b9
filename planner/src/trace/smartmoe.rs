//! The SmartMoE artifact's trace format: one file per (iteration, rank) named `table_iter{I}_rank{R}.log`, one
//! line per MoE layer, `L:[[c_0, ..., c_{E-1}], [..], ...]`: the layer index, then for each micro-batch of the
//! iteration how many token-expert assignments the rank sent to each expert (written as floats, `177.0`).
//! Whitespace may appear anywhere within a line. Files are read and parsed in parallel; a `.tar.gz` of such files
//! is read directly.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::assemble::{Cell, Collected, Issues, assemble, filter_layers, mode};
use super::count::parse_count;
use super::error::{Skipped, TraceError};
use super::{ReadOptions, Trace};

/// Parses a SmartMoE file name `table_iter{I}_rank{R}.log` into `(I, R)`.
pub fn parse_file_name(name: &str) -> Option<(u64, usize)> {
    let rest = name.strip_prefix("table_iter")?.strip_suffix(".log")?;
    let (iter, rank) = rest.split_once("_rank")?;
    let digits = |s: &str| !s.is_empty() && s.len() <= 18 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(iter) || !digits(rank) {
        return None;
    }
    let rank: u64 = rank.parse().ok()?;
    if rank > super::count::MAX_RANK {
        return None;
    }
    Some((iter.parse().ok()?, rank as usize))
}

/// Reads a directory of `table_iter{I}_rank{R}.log` files (or a directory whose single sub-directory holds
/// them, such as the folder the artifact's archive was extracted into). Other files are ignored.
pub fn read_smartmoe_dir(dir: &Path, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let mut found = trace_files(dir)?;
    let mut base = dir.to_path_buf();
    if found.is_empty() {
        let mut subs = Vec::new();
        for sub in list_dir(dir)? {
            if sub.is_dir() {
                let files = trace_files(&sub)?;
                if !files.is_empty() {
                    subs.push((sub, files));
                }
            }
        }
        if subs.len() > 1 {
            let names: Vec<String> = subs.iter().map(|(p, _)| p.display().to_string()).collect();
            return Err(TraceError::Empty {
                path: dir.display().to_string(),
                detail: format!("several sub-directories hold trace files ({}); pass one of them", names.join(", ")),
            });
        }
        if let Some((sub, files)) = subs.pop() {
            base = sub;
            found = files;
        }
    }
    if found.is_empty() {
        return Err(TraceError::Empty {
            path: dir.display().to_string(),
            detail: "no table_iter{I}_rank{R}.log files found".into(),
        });
    }
    let entries = found.into_iter().map(|(path, iteration, rank)| Entry {
        name: path.display().to_string(),
        iteration,
        rank,
        data: Data::Path(path),
    });
    let prefix = base.join("").display().to_string();
    read_entries(entries.collect(), dir.display().to_string(), prefix, opts)
}

/// Reads a `.tar.gz` (or `.tgz`) archive holding `table_iter{I}_rank{R}.log` files, at any depth, without
/// extracting it. Other members are ignored. Files are named `ARCHIVE:MEMBER` in messages.
pub fn read_smartmoe_tar_gz(archive: &Path, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let shown = archive.display().to_string();
    let io_err = |source: std::io::Error| TraceError::Io { path: shown.clone(), source };
    let file = std::fs::File::open(archive).map_err(io_err)?;
    let gz = flate2::read::GzDecoder::new(std::io::BufReader::with_capacity(1 << 20, file));
    let mut tar = tar::Archive::new(gz);
    let lenient = opts.lenient;
    // Decompression is sequential; parse the members on the other cores while it goes on.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, String, Vec<u8>)>(256);
    let (walked, parsed) = std::thread::scope(|scope| {
        let parser = scope.spawn(move || {
            rx.into_iter()
                .par_bridge()
                .map(|(i, name, data)| (i, parse_file(&name, &data, lenient)))
                .collect::<Vec<(usize, Parsed)>>()
        });
        let walked = (|| -> Result<(Vec<Entry>, Option<String>), TraceError> {
            let mut entries = Vec::new();
            let mut prefix = None;
            for entry in tar.entries().map_err(io_err)? {
                let mut entry = entry.map_err(io_err)?;
                if !entry.header().entry_type().is_file() {
                    continue;
                }
                let member = entry.path().map_err(io_err)?.into_owned();
                let Some((iteration, rank)) = member.file_name().and_then(|n| n.to_str()).and_then(parse_file_name)
                else {
                    continue;
                };
                let mut data = Vec::with_capacity(entry.header().size().unwrap_or(0).min(1 << 26) as usize);
                entry.read_to_end(&mut data).map_err(io_err)?;
                let member = member.display().to_string();
                if prefix.is_none() {
                    let dir = member.rsplit_once('/').map_or(String::new(), |(d, _)| format!("{d}/"));
                    prefix = Some(format!("{shown}:{dir}"));
                }
                let name = format!("{shown}:{member}");
                // The parser only stops receiving if it panicked, which `join` reports below.
                let _ = tx.send((entries.len(), name.clone(), data));
                entries.push(Entry { name, iteration, rank, data: Data::Bytes(Vec::new()) });
            }
            Ok((entries, prefix))
        })();
        drop(tx);
        let parsed = parser.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (walked, parsed)
    });
    let (mut entries, prefix): (Vec<Entry>, Option<String>) = walked?;
    for (i, p) in parsed {
        entries[i].data = Data::Parsed(p);
    }
    if entries.is_empty() {
        return Err(TraceError::Empty {
            path: shown,
            detail: "no table_iter{I}_rank{R}.log files in the archive".into(),
        });
    }
    let prefix = prefix.unwrap_or_default();
    read_entries(entries, shown, prefix, opts)
}

/// Reads in-memory SmartMoE files: `(name, contents)` pairs whose names (their last `/`-separated part) follow
/// `table_iter{I}_rank{R}.log`; other names are ignored. `source` names the whole trace.
pub fn read_smartmoe_files(
    files: Vec<(String, Vec<u8>)>,
    source: &str,
    opts: &ReadOptions,
) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let entries: Vec<Entry> = files
        .into_iter()
        .filter_map(|(name, data)| {
            let (iteration, rank) = parse_file_name(name.rsplit('/').next().unwrap_or(&name))?;
            Some(Entry { name, iteration, rank, data: Data::Bytes(data) })
        })
        .collect();
    if entries.is_empty() {
        return Err(TraceError::Empty {
            path: source.to_string(),
            detail: "no table_iter{I}_rank{R}.log files found".into(),
        });
    }
    read_entries(entries, source.to_string(), String::new(), opts)
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, TraceError> {
    let io_err = |source| TraceError::Io { path: dir.display().to_string(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        out.push(entry.map_err(io_err)?.path());
    }
    Ok(out)
}

fn trace_files(dir: &Path) -> Result<Vec<(PathBuf, u64, usize)>, TraceError> {
    Ok(list_dir(dir)?
        .into_iter()
        .filter_map(|p| {
            let (iteration, rank) = parse_file_name(p.file_name()?.to_str()?)?;
            p.is_file().then_some((p, iteration, rank))
        })
        .collect())
}

enum Data {
    Path(PathBuf),
    Bytes(Vec<u8>),
    /// Already parsed (while the archive was being decompressed).
    Parsed(Parsed),
}

struct Entry {
    name: String,
    iteration: u64,
    rank: usize,
    data: Data,
}

/// One well-formed line: the layer, the length of each micro-batch list and the per-expert sums over them.
struct Line {
    line: usize,
    layer: u64,
    mb_lens: Vec<usize>,
    sums: Vec<u64>,
}

/// A parsed file: its well-formed lines and the errors of the others (in line order).
#[derive(Default)]
struct Parsed {
    lines: Vec<Line>,
    errors: Vec<TraceError>,
}

fn read_entries(
    mut entries: Vec<Entry>,
    source: String,
    prefix: String,
    opts: &ReadOptions,
) -> Result<(Trace, Vec<Skipped>), TraceError> {
    entries.sort_by(|a, b| (a.iteration, a.rank, &a.name).cmp(&(b.iteration, b.rank, &b.name)));
    if let (false, Some(n)) = (opts.lenient, opts.max_snapshots) {
        // Strict: the first n iterations are the answer or the error; later files need not be parsed.
        let keep: BTreeSet<u64> =
            entries.iter().map(|e| e.iteration).collect::<BTreeSet<_>>().into_iter().take(n).collect();
        entries.retain(|e| keep.contains(&e.iteration));
    }
    let lenient = opts.lenient;
    let parsed: Vec<Parsed> = entries
        .par_iter_mut()
        .map(|e| {
            let data = match std::mem::replace(&mut e.data, Data::Bytes(Vec::new())) {
                Data::Bytes(b) => b,
                Data::Parsed(p) => return p,
                Data::Path(p) => match std::fs::read(&p) {
                    Ok(b) => b,
                    Err(source) => {
                        return Parsed {
                            lines: Vec::new(),
                            errors: vec![TraceError::Io { path: e.name.clone(), source }],
                        };
                    }
                },
            };
            parse_file(&e.name, &data, lenient)
        })
        .collect();
    check(entries, parsed, source, prefix, opts)
}

/// Line-level and file-level checks, then the common assembly.
fn check(
    entries: Vec<Entry>,
    mut parsed: Vec<Parsed>,
    source: String,
    prefix: String,
    opts: &ReadOptions,
) -> Result<(Trace, Vec<Skipped>), TraceError> {
    let mut issues = Issues { lenient: opts.lenient, skipped: Vec::new() };
    // I/O errors are never skipped: a file that cannot be read means something is wrong with the input.
    for p in &mut parsed {
        if let Some(pos) = p.errors.iter().position(|e| matches!(e, TraceError::Io { .. })) {
            return Err(p.errors.swap_remove(pos));
        }
    }
    // Layer selection (an unknown layer is an error).
    if let Some(want) = &opts.layers {
        let present: BTreeSet<u64> = parsed.iter().flat_map(|p| p.lines.iter().map(|l| l.layer)).collect();
        if let Some(&missing) = want.iter().find(|l| !present.is_empty() && !present.contains(l)) {
            return Err(TraceError::UnknownLayer {
                path: source,
                requested: missing,
                available: present.into_iter().collect(),
            });
        }
        for p in &mut parsed {
            p.lines.retain(|l| want.contains(&l.layer));
        }
    }
    // The expert count (per micro-batch) and micro-batch count of the trace: the most common ones.
    let experts =
        mode(parsed.iter().flat_map(|p| p.lines.iter().flat_map(|l| l.mb_lens.iter().copied())), |a, b| a > b)
            .unwrap_or(0);
    let micro_batches =
        mode(parsed.iter().flat_map(|p| p.lines.iter().map(|l| l.mb_lens.len())), |a, b| a > b).unwrap_or(0);

    // Line-level problems, file by file in line order.
    for (e, p) in entries.iter().zip(&mut parsed) {
        let mut problems: Vec<TraceError> = std::mem::take(&mut p.errors);
        let mut seen: HashMap<u64, usize> = HashMap::new();
        let mut bad_lines = BTreeSet::new();
        for l in &p.lines {
            let problem = if let Some((mb, &found)) = l.mb_lens.iter().enumerate().find(|(_, n)| **n != experts) {
                Some(TraceError::ExpertCount {
                    file: e.name.clone(),
                    line: l.line,
                    expected: experts,
                    found,
                    micro_batch: Some(mb + 1),
                })
            } else if l.mb_lens.len() != micro_batches {
                Some(TraceError::MicroBatchCount {
                    file: e.name.clone(),
                    line: l.line,
                    expected: micro_batches,
                    found: l.mb_lens.len(),
                })
            } else if let Some(&first) = seen.get(&l.layer) {
                Some(TraceError::Duplicate {
                    file: e.name.clone(),
                    line: l.line,
                    iteration: e.iteration,
                    layer: l.layer,
                    rank: e.rank,
                    first: format!("{} line {first}", e.name),
                })
            } else {
                seen.insert(l.layer, l.line);
                None
            };
            if let Some(problem) = problem {
                bad_lines.insert(l.line);
                problems.push(problem);
            }
        }
        problems.sort_by_key(|x| x.line());
        for problem in problems {
            issues.report(problem, "skipped the line")?;
        }
        p.lines.retain(|l| !bad_lines.contains(&l.line));
    }

    // File-level: every file holds the same layers; every iteration has every rank.
    let expected_layers: BTreeSet<u64> =
        mode(parsed.iter().map(|p| p.lines.iter().map(|l| l.layer).collect::<BTreeSet<u64>>()), |a, b| {
            a.len() > b.len()
        })
        .unwrap_or_default();
    let mut by_iter: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (i, e) in entries.iter().enumerate() {
        by_iter.entry(e.iteration).or_default().push(i);
    }
    let ranks = mode(by_iter.values().map(|v| v.iter().map(|&i| entries[i].rank + 1).max().unwrap_or(0)), |a, b| a > b)
        .unwrap_or(0);
    let home = move |iteration: u64, rank: usize| format!("{prefix}table_iter{iteration}_rank{rank}.log");
    let mut dropped: BTreeSet<u64> = BTreeSet::new();
    for (&iteration, idxs) in &by_iter {
        let drop = format!("dropped iteration {iteration}");
        let mut problem = None;
        for &i in idxs {
            let found: BTreeSet<u64> = parsed[i].lines.iter().map(|l| l.layer).collect();
            if found != expected_layers {
                let stray = parsed[i].lines.iter().find(|l| !expected_layers.contains(&l.layer)).map(|l| l.line);
                problem = Some(TraceError::LayerCount {
                    file: entries[i].name.clone(),
                    line: stray,
                    iteration,
                    expected: expected_layers.iter().copied().collect(),
                    found: found.into_iter().collect(),
                });
                break;
            }
            if entries[i].rank >= ranks {
                problem = Some(TraceError::RankOutOfRange {
                    file: entries[i].name.clone(),
                    line: 0,
                    iteration,
                    rank: entries[i].rank,
                    ranks,
                });
                break;
            }
        }
        if problem.is_none() {
            let present: BTreeSet<usize> = idxs.iter().map(|&i| entries[i].rank).collect();
            if let Some(rank) = (0..ranks).find(|r| !present.contains(r)) {
                problem =
                    Some(TraceError::MissingRank { file: home(iteration, rank), iteration, rank, layer: None, ranks });
            }
        }
        if let Some(problem) = problem {
            issues.report(problem, &drop)?;
            dropped.insert(iteration);
        }
    }

    let files: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    let mut cells = Vec::with_capacity(parsed.iter().map(|p| p.lines.len()).sum());
    for (f, (e, p)) in entries.iter().zip(parsed).enumerate() {
        if dropped.contains(&e.iteration) {
            continue;
        }
        for l in p.lines {
            cells.push(Cell {
                iteration: e.iteration,
                layer: l.layer,
                rank: e.rank,
                counts: l.sums,
                micro_batches: l.mb_lens.len(),
                file: f,
                line: l.line,
            });
        }
    }
    filter_layers(&mut cells, opts, &source)?;
    assemble(Collected { source, files, cells, skipped: issues.skipped, home: Box::new(home) }, opts)
}

/// Parses one file; in strict mode stops at the first malformed line.
fn parse_file(name: &str, data: &[u8], lenient: bool) -> Parsed {
    let data = data.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(data);
    let mut out = Parsed::default();
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        if raw.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        let line = i + 1;
        match parse_line(raw) {
            Ok((layer, mb_lens, sums)) => out.lines.push(Line { line, layer, mb_lens, sums }),
            Err(e) => {
                out.errors.push(e.into_error(name, line));
                if !lenient {
                    break;
                }
            }
        }
    }
    out
}

/// A malformed line, before the file and line are attached.
#[derive(Debug)]
enum LineError {
    Truncated(String),
    Syntax(usize, String),
    Number { field: String, token: String, why: &'static str },
}

impl LineError {
    fn into_error(self, file: &str, line: usize) -> TraceError {
        let file = file.to_string();
        match self {
            LineError::Truncated(detail) => TraceError::Truncated { file, line, detail },
            LineError::Syntax(column, detail) => TraceError::Syntax { file, line, column, detail },
            LineError::Number { field, token, why } => {
                TraceError::NotANumber { file, line, field, token, why: why.into() }
            }
        }
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | 0x0b | 0x0c)
}

fn is_delim(b: u8) -> bool {
    is_space(b) || matches!(b, b',' | b']' | b'[' | b':')
}

fn skip_ws(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_space(s[i]) {
        i += 1;
    }
    i
}

/// Shows the byte at `i` for a message.
fn shown(s: &[u8], i: usize) -> String {
    match s.get(i) {
        None => "the end of the line".into(),
        Some(&b) if b.is_ascii_graphic() => format!("'{}'", b as char),
        Some(&b) => format!("byte 0x{b:02x}"),
    }
}

/// Expects `want` at `i` (after whitespace); returns the index after it.
fn expect(s: &[u8], i: usize, want: u8, context: &str) -> Result<usize, LineError> {
    let i = skip_ws(s, i);
    match s.get(i) {
        Some(&b) if b == want => Ok(i + 1),
        None => Err(LineError::Truncated(format!("the line ends {context}; expected '{}'", want as char))),
        Some(_) => {
            Err(LineError::Syntax(i + 1, format!("expected '{}' {context}, found {}", want as char, shown(s, i))))
        }
    }
}

/// Parses `L:[[..],[..]]` into (layer, length of each micro-batch list, per-expert sums over micro-batches).
fn parse_line(s: &[u8]) -> Result<(u64, Vec<usize>, Vec<u64>), LineError> {
    let mut i = skip_ws(s, 0);
    let start = i;
    while i < s.len() && !is_delim(s[i]) {
        i += 1;
    }
    if i == start {
        return Err(LineError::Syntax(i + 1, format!("expected a layer index, found {}", shown(s, i))));
    }
    let token = &s[start..i];
    let layer = match parse_count(token) {
        Ok(l) if token.iter().all(u8::is_ascii_digit) => l,
        Ok(_) => return Err(number_error("the layer index", token, "not a plain whole number")),
        Err(why) => return Err(number_error("the layer index", token, why)),
    };
    i = expect(s, i, b':', "after the layer index")?;
    i = expect(s, i, b'[', "before the list of micro-batches")?;
    let mut mb_lens: Vec<usize> = Vec::with_capacity(4);
    let mut sums: Vec<u64> = Vec::new();
    i = skip_ws(s, i);
    if s.get(i) == Some(&b']') {
        i += 1;
    } else {
        loop {
            let mb = mb_lens.len() + 1;
            i = expect(s, i, b'[', &format!("at the start of micro-batch {mb}"))?;
            let mut n = 0usize;
            i = skip_ws(s, i);
            if s.get(i) == Some(&b']') {
                i += 1;
            } else {
                loop {
                    i = skip_ws(s, i);
                    let t0 = i;
                    let mut v: u64 = 0;
                    while i < s.len() && s[i].is_ascii_digit() {
                        v = v.wrapping_mul(10).wrapping_add(u64::from(s[i] - b'0'));
                        i += 1;
                    }
                    let digits = i - t0;
                    if i < s.len() && s[i] == b'.' {
                        i += 1;
                        while i < s.len() && s[i] == b'0' {
                            i += 1;
                        }
                    }
                    if (i < s.len() && !is_delim(s[i])) || (digits == 0 && i > t0) || digits > 15 {
                        // Not a plain `123` / `123.0`: take the whole token and let the general parser judge it.
                        while i < s.len() && !is_delim(s[i]) {
                            i += 1;
                        }
                        let token = &s[t0..i];
                        v = parse_count(token)
                            .map_err(|why| number_error(&format!("count {} of micro-batch {mb}", n + 1), token, why))?;
                    } else if i == t0 {
                        let context = format!("in micro-batch {mb} after {n} count(s)");
                        return Err(if i == s.len() {
                            LineError::Truncated(format!("the line ends {context}; expected a count"))
                        } else {
                            LineError::Syntax(i + 1, format!("expected a count {context}, found {}", shown(s, i)))
                        });
                    }
                    match sums.get_mut(n) {
                        Some(x) => *x = x.saturating_add(v),
                        None => sums.push(v),
                    }
                    n += 1;
                    i = skip_ws(s, i);
                    match s.get(i) {
                        Some(b',') => i += 1,
                        Some(b']') => {
                            i += 1;
                            break;
                        }
                        None => {
                            return Err(LineError::Truncated(format!(
                                "the line ends inside micro-batch {mb} after {n} count(s); expected ',' or ']'"
                            )));
                        }
                        Some(_) => {
                            return Err(LineError::Syntax(
                                i + 1,
                                format!(
                                    "expected ',' or ']' after count {n} of micro-batch {mb}, found {}",
                                    shown(s, i)
                                ),
                            ));
                        }
                    }
                }
            }
            mb_lens.push(n);
            i = skip_ws(s, i);
            match s.get(i) {
                Some(b',') => i += 1,
                Some(b']') => {
                    i += 1;
                    break;
                }
                None => {
                    return Err(LineError::Truncated(format!(
                        "the line ends after micro-batch {mb}; expected ',' or the closing ']'"
                    )));
                }
                Some(_) => {
                    return Err(LineError::Syntax(
                        i + 1,
                        format!("expected ',' or ']' after micro-batch {mb}, found {}", shown(s, i)),
                    ));
                }
            }
        }
    }
    i = skip_ws(s, i);
    if i < s.len() {
        return Err(LineError::Syntax(i + 1, format!("unexpected {} after the closing ']'", shown(s, i))));
    }
    Ok((layer, mb_lens, sums))
}

fn number_error(field: &str, token: &[u8], why: &'static str) -> LineError {
    let mut token = String::from_utf8_lossy(token).into_owned();
    if token.chars().count() > 40 {
        token = token.chars().take(40).collect::<String>() + "...";
    }
    LineError::Number { field: field.to_string(), token, why }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        assert_eq!(parse_file_name("table_iter11_rank3.log"), Some((11, 3)));
        assert_eq!(parse_file_name("table_iter11_rank3.log.bak"), None);
        assert_eq!(parse_file_name("table_iter_rank3.log"), None);
        assert_eq!(parse_file_name("table_iterx_rank3.log"), None);
        assert_eq!(parse_file_name("README.md"), None);
    }

    #[test]
    fn lines_with_whitespace_anywhere() {
        let (l, lens, sums) = parse_line(b" 3 : [ [1.0, 2 ,3.0 ] ,[ 4, 5.00, 6]]\r").unwrap();
        assert_eq!(l, 3);
        assert_eq!(lens, vec![3, 3]);
        assert_eq!(sums, vec![5, 7, 9]);
        let (_, lens, sums) = parse_line(b"0:[[],[]]").unwrap();
        assert_eq!((lens, sums), (vec![0, 0], vec![]));
        let (_, lens, _) = parse_line(b"0:[]").unwrap();
        assert!(lens.is_empty());
        let (_, _, sums) = parse_line(b"0:[[1e2, 2.0E1]]").unwrap();
        assert_eq!(sums, vec![100, 20]);
    }

    #[test]
    fn malformed_lines() {
        let truncated = |s: &[u8]| matches!(parse_line(s), Err(LineError::Truncated(_)));
        assert!(truncated(b"0:[[1.0, 2.0"));
        assert!(truncated(b"0:[[1.0, 2.0,"));
        assert!(truncated(b"0:[[1.0, 2.0]"));
        assert!(truncated(b"0:[[1.0, 2.0],"));
        assert!(truncated(b"0:"));
        assert!(truncated(b"0"));
        let syntax = |s: &[u8]| matches!(parse_line(s), Err(LineError::Syntax(..)));
        assert!(syntax(b"0:[[1.0, 2.0]]]"));
        assert!(syntax(b"0 [[1.0]]"));
        assert!(syntax(b":[[1.0]]"));
        assert!(syntax(b"0:[[1.0,,2.0]]"));
        assert!(syntax(b"0:[[1.0 2.0]]"));
        let number = |s: &[u8]| matches!(parse_line(s), Err(LineError::Number { .. }));
        assert!(number(b"0:[[1.0, x]]"));
        assert!(number(b"0:[[1.5]]"));
        assert!(number(b"0:[[-1]]"));
        assert!(number(b"0:[[.]]"));
        assert!(number(b"0:[[1.0.0]]"));
        assert!(number(b"0:[[99999999999999999999]]"));
        assert!(number(b"a:[[1]]"));
        assert!(number(b"1.0:[[1]]"));
    }
}
