//! Measured MoE layer times with the routing that produced them: the CSV of `../shared/calibration`
//! (`sample_index, iter, layer, microbatch, real_ms, smartmoe_est_ms, r{s}_e{e}...`, one row per micro-batch)
//! and JSON Lines (one object per sample).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::workload::LoadMatrix;

/// One measurement: the layer's time and the load of each micro-batch it replayed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Identifier (the CSV's `sample_index`).
    pub id: String,
    /// Training iteration the routing was recorded at.
    #[serde(default)]
    pub iter: u64,
    /// MoE layer of the routing.
    #[serde(default)]
    pub layer: u32,
    /// Measured time of the layer, forward + backward.
    pub real_ms: f64,
    /// Another model's estimate for the same sample (SmartMoE's in the shared file), for comparison.
    #[serde(default)]
    pub reference_est_ms: Option<f64>,
    /// Tokens from each source GPU to each expert, per replayed micro-batch. The measurement is the minimum
    /// over rounds, round `r` replaying micro-batch `r`.
    pub micro_batches: Vec<LoadMatrix>,
}

impl Sample {
    /// Source GPUs.
    pub fn ranks(&self) -> usize {
        self.micro_batches.first().map_or(0, |m| m.ranks)
    }

    /// Experts.
    pub fn experts(&self) -> usize {
        self.micro_batches.first().map_or(0, |m| m.experts)
    }
}

/// A sample file that cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}:{line}: {reason}; fix: {fix}")]
pub struct SampleError {
    /// The file.
    pub file: String,
    /// 1-based line (0: the whole file).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
    /// How to fix it.
    pub fix: String,
}

fn err(file: &str, line: usize, reason: impl Into<String>, fix: impl Into<String>) -> SampleError {
    SampleError { file: file.to_string(), line, reason: reason.into(), fix: fix.into() }
}

/// Reads samples from a `.csv` or `.jsonl` / `.ndjson` file.
pub fn read_samples(path: &Path) -> Result<Vec<Sample>, SampleError> {
    let file = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| err(&file, 0, format!("cannot read: {e}"), "check the path"))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    let samples = match ext.as_str() {
        "csv" => parse_csv(&text, &file)?,
        "jsonl" | "ndjson" | "json" => parse_jsonl(&text, &file)?,
        _ => {
            return Err(err(
                &file,
                0,
                format!("unknown sample format `.{ext}`"),
                "use a .csv (as ../shared/calibration) or .jsonl file",
            ));
        }
    };
    if samples.is_empty() {
        return Err(err(&file, 0, "no samples", "the file must hold at least one measurement"));
    }
    Ok(samples)
}

/// Parses the calibration CSV.
pub fn parse_csv(text: &str, file: &str) -> Result<Vec<Sample>, SampleError> {
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let Some((_, header)) = lines.next() else { return Err(err(file, 1, "empty file", "add a header and rows")) };
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    let find = |name: &str| cols.iter().position(|c| *c == name);
    let need = |name: &str| {
        find(name).ok_or_else(|| {
            err(
                file,
                1,
                format!("missing column `{name}`"),
                "the header is sample_index,iter,layer,microbatch,real_ms,smartmoe_est_ms,r0_e0,...",
            )
        })
    };
    let (c_id, c_real) = (need("sample_index")?, need("real_ms")?);
    let (c_iter, c_layer, c_ref) = (find("iter"), find("layer"), find("smartmoe_est_ms"));
    // Load columns r{s}_e{e}.
    let mut load_cols = Vec::new();
    for (i, c) in cols.iter().enumerate() {
        if let Some(rest) = c.strip_prefix('r')
            && let Some((s, e)) = rest.split_once("_e")
            && let (Ok(s), Ok(e)) = (s.parse::<usize>(), e.parse::<usize>())
        {
            load_cols.push((i, s, e));
        }
    }
    if load_cols.is_empty() {
        return Err(err(file, 1, "no load columns r{s}_e{e}", "add one column per (source GPU, expert)"));
    }
    let ranks = load_cols.iter().map(|c| c.1).max().unwrap_or(0) + 1;
    let experts = load_cols.iter().map(|c| c.2).max().unwrap_or(0) + 1;
    if load_cols.len() != ranks * experts {
        return Err(err(
            file,
            1,
            format!(
                "{} load columns, expected {ranks} GPUs x {experts} experts = {}",
                load_cols.len(),
                ranks * experts
            ),
            "every (source GPU, expert) pair needs one column",
        ));
    }
    let mut by_id: BTreeMap<(usize, String), Sample> = BTreeMap::new();
    let mut order = 0usize;
    let mut first_line: BTreeMap<String, usize> = BTreeMap::new();
    for (n, line) in lines {
        let lno = n + 1;
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != cols.len() {
            return Err(err(
                file,
                lno,
                format!("{} fields, the header has {}", f.len(), cols.len()),
                "the line is truncated or has extra commas",
            ));
        }
        let num = |i: usize, what: &str| -> Result<f64, SampleError> {
            f[i].parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| {
                err(file, lno, format!("{what} `{}` is not a number", f[i]), "write a plain decimal number")
            })
        };
        let real = num(c_real, "real_ms")?;
        if real <= 0.0 {
            return Err(err(file, lno, format!("real_ms {real} must be positive"), "a measured time is > 0"));
        }
        let mut m = LoadMatrix::zeros(ranks, experts);
        for &(i, s, e) in &load_cols {
            let v = f[i].parse::<u64>().map_err(|_| {
                err(
                    file,
                    lno,
                    format!("{} `{}` is not a token count", cols[i], f[i]),
                    "counts are non-negative integers",
                )
            })?;
            m.counts[s * experts + e] = v;
        }
        let id = f[c_id].to_string();
        let key_order = *first_line.entry(id.clone()).or_insert_with(|| {
            order += 1;
            order
        });
        let iter = match c_iter {
            Some(i) => num(i, "iter")? as u64,
            None => 0,
        };
        let layer = match c_layer {
            Some(i) => num(i, "layer")? as u32,
            None => 0,
        };
        let reference = match c_ref {
            Some(i) if !f[i].is_empty() => Some(num(i, "smartmoe_est_ms")?),
            _ => None,
        };
        let s = by_id.entry((key_order, id.clone())).or_insert_with(|| Sample {
            id: id.clone(),
            iter,
            layer,
            real_ms: real,
            reference_est_ms: reference,
            micro_batches: Vec::new(),
        });
        if (s.real_ms - real).abs() > 1e-9 {
            return Err(err(
                file,
                lno,
                format!("sample {id} has real_ms {real} here but {} on its first row", s.real_ms),
                "all micro-batch rows of one sample carry the same measurement",
            ));
        }
        s.micro_batches.push(m);
    }
    Ok(by_id.into_values().collect())
}

/// Parses JSON Lines: one [`Sample`] object per line (`micro_batches`: a list of `{ranks, experts, counts}`
/// matrices, or of row lists `[[...], ...]`).
pub fn parse_jsonl(text: &str, file: &str) -> Result<Vec<Sample>, SampleError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Mb {
        Matrix(LoadMatrix),
        Rows(Vec<Vec<u64>>),
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Line {
        id: Option<String>,
        #[serde(default)]
        iter: u64,
        #[serde(default)]
        layer: u32,
        real_ms: f64,
        #[serde(default)]
        reference_est_ms: Option<f64>,
        micro_batches: Vec<Mb>,
    }
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let lno = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let l: Line = serde_json::from_str(line).map_err(|e| {
            err(file, lno, e.to_string(), "one object per line: {\"real_ms\": .., \"micro_batches\": [[[counts]]]}")
        })?;
        if !l.real_ms.is_finite() || l.real_ms <= 0.0 {
            return Err(err(file, lno, format!("real_ms {} must be positive", l.real_ms), "a measured time is > 0"));
        }
        let mut mbs = Vec::new();
        for mb in l.micro_batches {
            let m = match mb {
                Mb::Matrix(m) if m.counts.len() == m.ranks * m.experts => m,
                Mb::Matrix(m) => {
                    return Err(err(
                        file,
                        lno,
                        format!("matrix of {}x{} has {} counts", m.ranks, m.experts, m.counts.len()),
                        "counts must be ranks x experts",
                    ));
                }
                Mb::Rows(r) => LoadMatrix::from_rows(&r)
                    .map_err(|e| err(file, lno, e.to_string(), "every row lists every expert"))?,
            };
            mbs.push(m);
        }
        if mbs.is_empty()
            || mbs
                .iter()
                .any(|m| m.ranks != mbs[0].ranks || m.experts != mbs[0].experts || m.ranks == 0 || m.experts == 0)
        {
            return Err(err(
                file,
                lno,
                "micro-batches must be non-empty and share one shape",
                "give ranks x experts counts per micro-batch",
            ));
        }
        out.push(Sample {
            id: l.id.unwrap_or_else(|| out.len().to_string()),
            iter: l.iter,
            layer: l.layer,
            real_ms: l.real_ms,
            reference_est_ms: l.reference_est_ms,
            micro_batches: mbs,
        });
    }
    if let Some(first) = out.first() {
        let (r, e) = (first.ranks(), first.experts());
        if let Some(bad) = out.iter().find(|s| s.ranks() != r || s.experts() != e) {
            return Err(err(
                file,
                0,
                format!("sample {} is {}x{}, the first is {r}x{e}", bad.id, bad.ranks(), bad.experts()),
                "one file holds one configuration",
            ));
        }
    }
    Ok(out)
}

/// Writes samples as JSON Lines (the format [`parse_jsonl`] reads).
pub fn to_jsonl(samples: &[Sample]) -> String {
    let mut s = String::new();
    for x in samples {
        s.push_str(
            &serde_json::json!({
                "id": x.id, "iter": x.iter, "layer": x.layer, "real_ms": x.real_ms,
                "reference_est_ms": x.reference_est_ms, "micro_batches": x.micro_batches,
            })
            .to_string(),
        );
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CSV: &str = "sample_index,iter,layer,microbatch,real_ms,smartmoe_est_ms,r0_e0,r0_e1,r1_e0,r1_e1\n\
                       0,101,0,0,10,9.5,3,1,2,2\n0,101,0,1,10,9.5,1,3,0,4\n1,201,0,0,12,11,4,0,4,0\n";

    #[test]
    fn csv_groups_micro_batches() {
        let s = parse_csv(CSV, "t.csv").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].micro_batches.len(), 2);
        assert_eq!(s[0].micro_batches[1].row(1), &[0, 4]);
        assert_eq!((s[1].iter, s[1].real_ms, s[1].reference_est_ms), (201, 12.0, Some(11.0)));
        let back = parse_jsonl(&to_jsonl(&s), "t.jsonl").unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn broken_csv_names_the_line() {
        let e = parse_csv("sample_index,real_ms,r0_e0\n0,1.5,3\n0,1.5\n", "x.csv").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("x.csv:3"));
        let e = parse_csv("sample_index,real_ms,r0_e0\n0,abc,3\n", "x.csv").unwrap_err();
        assert!(e.reason.contains("abc"));
        let e = parse_csv("sample_index,real_ms,r0_e0,r1_e1\n", "x.csv").unwrap_err();
        assert!(e.reason.contains("load columns"));
        let e = parse_csv("sample_index,real_ms,r0_e0\n0,1,3\n0,2,3\n", "x.csv").unwrap_err();
        assert!(e.reason.contains("first row"));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in "[ -~\n]{0,300}") {
            let _ = parse_csv(&s, "f.csv");
            let _ = parse_jsonl(&s, "f.jsonl");
            let mut t = String::from("sample_index,real_ms,r0_e0\n");
            t.push_str(&s);
            let _ = parse_csv(&t, "f.csv");
        }
    }
}
