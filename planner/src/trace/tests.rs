//! Tests of the trace readers, writers and statistics on the fixtures in `planner/tests/fixtures/trace/` (small,
//! generated: 3 iterations x 2 ranks x 2 layers x 4 experts x 2 micro-batches), plus the shared SmartMoE trace
//! when it is present.

use std::path::{Path, PathBuf};
use std::time::Instant;

use proptest::prelude::*;
use switchyard_cost::LoadMatrix;

use super::smartmoe::read_smartmoe_files;
use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/trace").join(name)
}

fn strict() -> ReadOptions {
    ReadOptions::default()
}

fn lenient() -> ReadOptions {
    ReadOptions { lenient: true, ..ReadOptions::default() }
}

fn read(name: &str, opts: &ReadOptions) -> Result<(Trace, Vec<Skipped>), TraceError> {
    read_trace(&fixture(name), opts)
}

/// The count the fixture generator wrote for (iteration, rank, layer, micro-batch, expert).
fn count(i: u64, r: u64, l: u64, mb: u64, e: u64) -> u64 {
    (i + 3 * r + 5 * l + 7 * mb + 11 * e) % 13
}

/// The fixtures' trace, summed over the 2 micro-batches.
fn expected_fixture() -> Vec<Snapshot> {
    [1u64, 11, 21]
        .iter()
        .map(|&i| Snapshot {
            iteration: i,
            layers: (0..2)
                .map(|l| {
                    let rows: Vec<Vec<u64>> =
                        (0..2).map(|r| (0..4).map(|e| count(i, r, l, 0, e) + count(i, r, l, 1, e)).collect()).collect();
                    LoadMatrix::from_rows(&rows).unwrap()
                })
                .collect(),
        })
        .collect()
}

fn assert_fixture_shape(t: &Trace, micro_batches: usize) {
    assert_eq!((t.layers, t.ranks, t.experts, t.micro_batches), (2, 2, 4, micro_batches));
    assert_eq!(t.layer_ids, vec![0, 1]);
    assert_eq!(t.iterations(), vec![1, 11, 21]);
    assert_eq!(t.snapshot_interval(), Some(10));
    assert_eq!(t.snapshots, expected_fixture());
    // Iteration 1, rank 0, layer 0: [1,12,10,8] + [8,6,4,2].
    assert_eq!(t.snapshots[0].layers[0].row(0), &[9, 18, 14, 10]);
}

#[test]
fn all_formats_read_the_same_trace() {
    for (name, mbs) in
        [("smartmoe-good", 2), ("smartmoe-good.tar.gz", 2), ("smartmoe-spaced", 2), ("good.csv", 1), ("good.jsonl", 2)]
    {
        let (t, skipped) = read(name, &strict()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(skipped.is_empty(), "{name}: {skipped:?}");
        assert_fixture_shape(&t, mbs);
        assert!(t.source.ends_with(name), "{name}: source {}", t.source);
    }
}

#[test]
fn a_directory_holding_one_trace_directory_is_read() {
    // `smartmoe-nested` holds `moe_trace/`, as the artifact's archive extracts.
    let (t, _) = read("smartmoe-nested", &strict()).unwrap();
    assert_fixture_shape(&t, 2);
    // `tests/fixtures/trace` holds several SmartMoE directories: ambiguous, so refused with the choices named.
    let e = read_trace(&fixture(""), &strict()).unwrap_err();
    assert!(matches!(e, TraceError::Empty { .. }), "{e}");
    assert!(e.to_string().contains("smartmoe-good"), "{e}");
}

/// Asserts the strict error mentions `file` and `line N` and matches `pred`.
fn strict_error(name: &str, file: &str, line: Option<usize>, pred: impl Fn(&TraceError) -> bool) -> TraceError {
    let e = read(name, &strict()).expect_err(name);
    let msg = e.to_string();
    assert!(pred(&e), "{name}: unexpected error {e:?}");
    assert!(msg.contains(file), "{name}: `{msg}` does not name {file}");
    if let Some(line) = line {
        assert!(msg.contains(&format!("line {line}:")), "{name}: `{msg}` does not name line {line}");
        assert_eq!(e.line(), Some(line));
    }
    assert!(msg.contains("fix:"), "{msg}");
    e
}

#[test]
fn smartmoe_broken_files_name_file_and_line() {
    let e = strict_error("smartmoe-truncated", "table_iter11_rank1.log", Some(2), |e| {
        matches!(e, TraceError::Truncated { .. })
    });
    assert!(e.to_string().contains("truncated line"), "{e}");
    let e = strict_error("smartmoe-wrong-experts", "table_iter11_rank1.log", Some(2), |e| {
        matches!(e, TraceError::ExpertCount { expected: 4, found: 3, micro_batch: Some(1), .. })
    });
    assert!(e.to_string().contains("expected 4 experts per micro-batch, found 3"), "{e}");
    let e = strict_error("smartmoe-not-a-number", "table_iter11_rank1.log", Some(1), |e| {
        matches!(e, TraceError::NotANumber { .. })
    });
    assert!(e.to_string().contains("`x3`"), "{e}");
    let e = strict_error("smartmoe-missing-rank", "table_iter11_rank1.log", None, |e| {
        matches!(e, TraceError::MissingRank { iteration: 11, rank: 1, layer: None, ranks: 2, .. })
    });
    assert!(e.to_string().contains("iteration 11: rank 1 is missing"), "{e}");
    let e = strict_error("smartmoe-missing-layer", "table_iter11_rank1.log", None, |e| {
        matches!(e, TraceError::LayerCount { iteration: 11, .. })
    });
    assert!(e.to_string().contains("missing 1"), "{e}");
    strict_error("smartmoe-empty", "smartmoe-empty", None, |e| matches!(e, TraceError::Empty { .. }));
}

#[test]
fn smartmoe_lenient_skips_and_reports() {
    for name in ["smartmoe-truncated", "smartmoe-wrong-experts", "smartmoe-not-a-number", "smartmoe-missing-layer"] {
        let (t, skipped) = read(name, &lenient()).unwrap_or_else(|e| panic!("{name}: {e}"));
        // Iteration 11 loses rank 1's data for a layer: the whole snapshot is dropped.
        assert_eq!(t.iterations(), vec![1, 21], "{name}");
        assert!(!skipped.is_empty(), "{name}");
        assert!(skipped.iter().all(|s| s.file.ends_with("table_iter11_rank1.log")), "{name}: {skipped:?}");
        assert!(skipped.iter().any(|s| s.reason.contains("dropped iteration 11")), "{name}: {skipped:?}");
        assert_eq!(t.snapshots[1], expected_fixture()[2]);
    }
    let (t, skipped) = read("smartmoe-truncated", &lenient()).unwrap();
    assert_eq!(skipped[0].line, Some(2));
    assert!(skipped[0].reason.contains("skipped the line"), "{:?}", skipped[0]);
    assert_eq!(t.snapshot_interval(), Some(20));
    let (t, skipped) = read("smartmoe-missing-rank", &lenient()).unwrap();
    assert_eq!(t.iterations(), vec![1, 21]);
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].line, None);
    assert!(skipped[0].to_string().contains("rank 1 is missing"), "{}", skipped[0]);
}

#[test]
fn csv_broken_files_name_file_and_line() {
    strict_error("truncated.csv", "truncated.csv", Some(13), |e| matches!(e, TraceError::Truncated { .. }));
    strict_error("wrong-experts.csv", "wrong-experts.csv", Some(6), |e| {
        matches!(e, TraceError::ExpertCount { expected: 4, found: 5, .. })
    });
    let e = strict_error(
        "not-a-number.csv",
        "not-a-number.csv",
        Some(5),
        |e| matches!(e, TraceError::NotANumber { field, .. } if field == "e3"),
    );
    assert!(e.to_string().contains("`abc`"), "{e}");
    strict_error("missing-rank.csv", "missing-rank.csv", None, |e| {
        matches!(e, TraceError::MissingRank { iteration: 11, rank: 1, layer: Some(0), .. })
    });
    strict_error("duplicate.csv", "duplicate.csv", Some(14), |e| {
        matches!(e, TraceError::Duplicate { iteration: 1, layer: 1, rank: 0, .. })
    });
    strict_error("no-header.csv", "no-header.csv", Some(1), |e| matches!(e, TraceError::Header { .. }));
    strict_error("empty.csv", "empty.csv", None, |e| matches!(e, TraceError::Empty { .. }));
}

#[test]
fn csv_lenient() {
    let (t, skipped) = read("wrong-experts.csv", &lenient()).unwrap();
    // Line 6 is iteration 11, layer 0, rank 0: iteration 11 is incomplete without it.
    assert_eq!(t.iterations(), vec![1, 21]);
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].line, Some(6));
    let (t, skipped) = read("duplicate.csv", &lenient()).unwrap();
    assert_eq!(t.snapshots, expected_fixture());
    assert_eq!(skipped.len(), 1);
    let (t, _) = read("truncated.csv", &lenient()).unwrap();
    assert_eq!(t.iterations(), vec![1, 11]);
    let (t, skipped) = read("missing-rank.csv", &lenient()).unwrap();
    assert_eq!(t.iterations(), vec![1, 21]);
    assert_eq!(skipped.len(), 1);
    // Header problems and empty files are fatal even in lenient mode.
    assert!(read("no-header.csv", &lenient()).is_err());
    assert!(read("empty.csv", &lenient()).is_err());
}

#[test]
fn jsonl_broken_files_name_file_and_line() {
    strict_error("truncated.jsonl", "truncated.jsonl", Some(7), |e| matches!(e, TraceError::Truncated { .. }));
    strict_error("wrong-experts.jsonl", "wrong-experts.jsonl", Some(3), |e| {
        matches!(e, TraceError::ExpertCount { expected: 4, found: 3, .. })
    });
    let e = strict_error("not-a-number.jsonl", "not-a-number.jsonl", Some(2), |e| matches!(e, TraceError::Json { .. }));
    assert!(e.to_string().contains("whole non-negative count"), "{e}");
    strict_error("missing-rank.jsonl", "missing-rank.jsonl", None, |e| {
        matches!(e, TraceError::MissingRank { iteration: 21, rank: 0, layer: None, .. })
    });
    strict_error("empty.jsonl", "empty.jsonl", None, |e| matches!(e, TraceError::Empty { .. }));
    let (t, skipped) = read("truncated.jsonl", &lenient()).unwrap();
    assert_eq!(t.iterations(), vec![1, 21]);
    assert_eq!(skipped.len(), 2);
}

#[test]
fn jsonl_variants() {
    let opts = strict();
    let text = "{\"iteration\":5,\"layer\":3,\"rank\":0,\"counts\":[1,2.0],\"n_micro_batches\":3}\n";
    let (t, _) = read_jsonl(text.as_bytes(), "x.jsonl", &opts).unwrap();
    assert_eq!(
        (t.layer_ids.clone(), t.micro_batches, t.snapshots[0].layers[0].counts.clone()),
        (vec![3], 3, vec![1, 2])
    );
    for bad in [
        "{\"iter\":1,\"layer\":0,\"rank\":0}",
        "{\"iter\":1,\"layer\":0,\"rank\":0,\"counts\":[1],\"microbatches\":[[1]]}",
        "{\"iter\":1,\"layer\":0,\"rank\":0,\"counts\":[-1]}",
        "{\"iter\":1,\"layer\":0,\"rank\":0,\"counts\":[1.5]}",
        "{\"iter\":1,\"layer\":0,\"rank\":0,\"counts\":[1],\"extra\":1}",
        "{\"iter\":1,\"layer\":0,\"rank\":99999999,\"counts\":[1]}",
        "[1,2,3]",
    ] {
        let e = read_jsonl(bad.as_bytes(), "x.jsonl", &opts).expect_err(bad);
        assert!(e.to_string().starts_with("x.jsonl line 1: "), "{e}");
    }
}

#[test]
fn layer_selection_and_snapshot_limit() {
    for name in ["smartmoe-good", "good.csv", "good.jsonl", "smartmoe-good.tar.gz"] {
        let opts = ReadOptions { layers: Some(vec![1]), max_snapshots: Some(2), ..strict() };
        let (t, _) = read(name, &opts).unwrap();
        assert_eq!((t.layers, t.layer_ids.clone(), t.iterations()), (1, vec![1], vec![1, 11]), "{name}");
        assert_eq!(t.snapshots[1].layers[0], expected_fixture()[1].layers[1]);
        let opts = ReadOptions { layers: Some(vec![7]), ..strict() };
        let e = read(name, &opts).unwrap_err();
        assert!(matches!(e, TraceError::UnknownLayer { requested: 7, .. }), "{name}: {e}");
    }
    // Strict mode with a snapshot limit does not look at later iterations' files.
    let opts = ReadOptions { max_snapshots: Some(1), ..strict() };
    let (t, _) = read("smartmoe-missing-rank", &opts).unwrap();
    assert_eq!(t.iterations(), vec![1]);
}

#[test]
fn unknown_format_and_missing_path() {
    let e = read_trace(&fixture("smartmoe-good/README.txt"), &strict()).unwrap_err();
    assert!(matches!(e, TraceError::UnknownFormat { .. }), "{e}");
    let e = read_trace(&fixture("nope.csv"), &strict()).unwrap_err();
    assert!(matches!(e, TraceError::Io { .. }), "{e}");
    assert!(e.to_string().contains("nope.csv"), "{e}");
}

#[test]
fn write_trace_round_trips_through_files() {
    let (t, _) = read("smartmoe-good", &strict()).unwrap();
    let dir = std::env::temp_dir().join(format!("switchyard-trace-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["t.csv", "t.jsonl"] {
        let path = dir.join(name);
        write_trace(&t, &path).unwrap();
        let (back, _) = read_trace(&path, &strict()).unwrap();
        assert_eq!(back.snapshots, t.snapshots);
        assert_eq!(back.micro_batches, if name == "t.csv" { 1 } else { 2 });
    }
    assert!(matches!(write_trace(&t, &dir.join("t.txt")), Err(TraceError::UnknownFormat { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn stats_on_fixture() {
    let (t, _) = read("smartmoe-good", &strict()).unwrap();
    let s = trace_stats(&t);
    assert_eq!(s.per_layer.len(), 2);
    assert_eq!(s.snapshots, 3);
    let f = mean_expert_fractions(&t);
    assert_eq!(f.len(), 2);
    for layer in &f {
        assert!((layer.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    let table = s.to_table();
    assert_eq!(table.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).count(), 3);
}

/// A random small trace for the round-trip property.
fn arb_trace() -> impl Strategy<Value = Trace> {
    (1usize..4, 1usize..4, 1usize..6, 1usize..5, 1usize..4).prop_flat_map(|(layers, ranks, experts, snaps, mbs)| {
        let counts = proptest::collection::vec(0u64..1_000_000, layers * ranks * experts * snaps);
        let iters = proptest::collection::btree_set(0u64..10_000, snaps);
        let ids = proptest::collection::btree_set(0u64..100, layers);
        (counts, iters, ids).prop_map(move |(counts, iters, ids)| {
            let per = ranks * experts;
            let snapshots = iters
                .into_iter()
                .enumerate()
                .map(|(s, iteration)| Snapshot {
                    iteration,
                    layers: (0..layers)
                        .map(|l| {
                            let at = (s * layers + l) * per;
                            LoadMatrix { ranks, experts, counts: counts[at..at + per].to_vec() }
                        })
                        .collect(),
                })
                .collect();
            Trace {
                source: String::new(),
                layers,
                layer_ids: ids.into_iter().collect(),
                ranks,
                experts,
                micro_batches: mbs,
                snapshots,
            }
        })
    })
}

/// Random text that looks a little like each format, to reach deeper into the parsers than random bytes.
fn arb_text() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just("0:[[".to_string()),
        Just("1.0, ".to_string()),
        Just("2".to_string()),
        Just("], [".to_string()),
        Just("]]\n".to_string()),
        Just("iter,layer,rank,e0,e1\n".to_string()),
        Just("1,0,0,3,4\n".to_string()),
        Just(",".to_string()),
        Just("\n".to_string()),
        Just("{\"iter\":1,\"layer\":0,\"rank\":0,\"counts\":[1,2]}\n".to_string()),
        Just("{\"iter\":1,".to_string()),
        Just("-1e400 ".to_string()),
        "[ -~]{0,8}",
    ];
    prop_oneof![
        proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..200),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn csv_and_jsonl_round_trip(t in arb_trace()) {
        let mut csv = Vec::new();
        write_csv(&t, &mut csv).unwrap();
        let (back, skipped) = read_csv(csv.as_slice(), "t.csv", &ReadOptions::default()).unwrap();
        prop_assert!(skipped.is_empty());
        prop_assert_eq!(&back.snapshots, &t.snapshots);
        prop_assert_eq!(&back.layer_ids, &t.layer_ids);
        prop_assert_eq!((back.layers, back.ranks, back.experts, back.micro_batches), (t.layers, t.ranks, t.experts, 1));

        let mut jsonl = Vec::new();
        write_jsonl(&t, &mut jsonl).unwrap();
        let (back, _) = read_jsonl(jsonl.as_slice(), "t.jsonl", &ReadOptions::default()).unwrap();
        prop_assert_eq!(back, Trace { source: "t.jsonl".into(), ..t.clone() });
    }

    #[test]
    fn parsers_never_panic(data in arb_text(), lenient in any::<bool>()) {
        let opts = ReadOptions { lenient, ..ReadOptions::default() };
        let _ = read_csv(data.as_slice(), "x.csv", &opts);
        let _ = read_jsonl(data.as_slice(), "x.jsonl", &opts);
        let files = vec![
            ("table_iter1_rank0.log".to_string(), data.clone()),
            ("table_iter1_rank1.log".to_string(), b"0:[[1.0, 2.0]]\n".to_vec()),
            ("table_iter2_rank0.log".to_string(), data.clone()),
        ];
        if let Ok((t, _)) = read_smartmoe_files(files, "x", &opts) {
            let s = trace_stats(&t);
            let _ = s.to_table();
            let _ = mean_expert_fractions(&t);
        }
    }
}

/// The shared SmartMoE trace, when present: shape, sums and the README's persistence figure.
#[test]
fn shared_smartmoe_trace() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/traces/smartmoe-gpt-e32-layers0-11.tar.gz");
    if !path.exists() {
        println!("note: {} is absent; skipping the shared-trace test", path.display());
        return;
    }
    let start = Instant::now();
    let (t, skipped) = read_trace(&path, &ReadOptions::default()).unwrap();
    let elapsed = start.elapsed();
    println!("loaded {} in {:.3} s", path.display(), elapsed.as_secs_f64());
    assert!(skipped.is_empty());
    assert_eq!((t.len(), t.ranks, t.experts, t.layers, t.micro_batches), (501, 16, 32, 12, 4));
    assert_eq!(t.snapshot_interval(), Some(10));
    assert_eq!(t.iterations().first(), Some(&1));
    assert_eq!(t.iterations().last(), Some(&5001));
    for s in &t.snapshots {
        for m in &s.layers {
            for r in 0..m.ranks {
                assert_eq!(m.row(r).iter().sum::<u64>(), 4 * 4096, "iteration {} rank {r}", s.iteration);
            }
        }
    }
    let stats = trace_stats(&t);
    println!("{}", stats.to_table());
    let persistence = stats.overall.hottest_persistence.unwrap();
    println!("hottest-expert persistence across a 10-iteration gap: {:.1}%", persistence * 100.0);
    assert!(persistence > 0.9, "persistence {persistence}");
}
