//! `switchyard place --exact`: the exact optimum beside the algorithm's placement, its gap, and clear refusals.

use std::process::{Command, Output};

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

/// Asserts a failure with exit code 1, one `error:` line, and every fragment in the message.
fn assert_fails_with(o: &Output, fragments: &[&str]) {
    assert_eq!(o.status.code(), Some(1), "expected exit 1; stdout {} stderr {}", stdout(o), stderr(o));
    let e = stderr(o);
    assert!(e.starts_with("error: "), "{e}");
    assert!(!e.contains("panicked"), "{e}");
    for f in fragments {
        assert!(e.contains(f), "missing `{f}` in: {e}");
    }
}

/// Two layers of 8 experts, skewed, for 4 GPUs.
const LOADS: &str = "[[900,40,35,30,20,15,10,5],[120,500,80,60,300,20,10,200]]";

#[test]
fn exact_reports_the_optimum_and_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loads.json");
    std::fs::write(&path, LOADS).unwrap();
    let l = path.to_str().unwrap();
    for alg in ["switchyard", "eplb", "static"] {
        let base = ["place", "--loads", l, "--gpus", "4", "--slots", "3", "--algorithm", alg];
        let plain = json(&switchyard(&[&base[..], &["--json"]].concat()));
        let v = json(&switchyard(&[&base[..], &["--json", "--exact", "--exact-solver", "microlp"]].concat()));
        // Every existing field is unchanged; `exact` has one entry per layer.
        for k in ["algorithm", "gpus", "slots_per_gpu", "placements"] {
            assert_eq!(v[k], plain[k], "{alg}: {k}");
        }
        let exact = v["exact"].as_array().unwrap();
        assert_eq!(exact.len(), 2);
        for (layer, x) in exact.iter().enumerate() {
            let f = |k: &str| x[k].as_f64().unwrap_or_else(|| panic!("{alg}: {k} in {x}"));
            let (opt, heur, lb) = (f("max_load"), f("heuristic_max_load"), f("lower_bound"));
            assert!(x["optimal"].as_bool().unwrap(), "{alg} layer {layer}: {x}");
            assert_eq!(x["solver"], "microlp");
            assert_eq!(x["layer"], layer);
            assert!(f("solve_ms") >= 0.0);
            assert!(lb <= opt + 1e-3 && opt <= heur + 1e-6, "{alg} layer {layer}: {lb} <= {opt} <= {heur}");
            assert!(opt <= f("heuristic_max_load_with_shares") + 1e-6);
            assert!((f("gap_pct") - (heur - opt) / opt * 100.0).abs() < 1e-9);
            // The exact placement is a valid placement of the layer: 4 GPUs x 3 slots, every expert placed.
            let slots: Vec<u64> =
                x["placement"]["slots"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
            assert_eq!(slots.len(), 12);
            assert!((0..8).all(|e| slots.contains(&e)), "{slots:?}");
        }
        // Layer 0: expert 0 (900 of 1055 tokens) on 4 GPUs carries the mean, 263.75: the optimum is the mean.
        assert!((exact[0]["max_load"].as_f64().unwrap() - 263.75).abs() < 0.01, "{}", exact[0]);
    }
    // The text output adds the columns.
    let o = switchyard(&["place", "--loads", l, "--gpus", "4", "--slots", "3", "--exact"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("exact") && text.contains("gap %") && text.contains("optimal"), "{text}");
}

#[test]
fn exact_refuses_big_instances_and_bad_flags() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loads.json");
    let loads: Vec<u32> = (0..128).map(|i| 1 + i % 7).collect();
    std::fs::write(&path, serde_json::to_string(&vec![loads]).unwrap()).unwrap();
    let l = path.to_str().unwrap();
    let o =
        switchyard(&["place", "--loads", l, "--gpus", "32", "--slots", "4", "--exact", "--exact-solver", "microlp"]);
    assert_fails_with(&o, &["128 experts x 32 GPUs", "limit", "fix:", "--gpus"]);
    let o = switchyard(&["place", "--loads", l, "--gpus", "32", "--slots", "4", "--exact-time-limit", "5"]);
    assert!(!o.status.success() && stderr(&o).contains("--exact"), "{}", stderr(&o));
    std::fs::write(&path, LOADS).unwrap();
    let o = switchyard(&["place", "--loads", l, "--gpus", "4", "--exact", "--exact-solver", "cplex"]);
    assert_fails_with(&o, &["--exact-solver cplex", "fix:"]);
    let o = switchyard(&["place", "--loads", l, "--gpus", "4", "--exact", "--exact-time-limit", "0"]);
    assert_fails_with(&o, &["--exact-time-limit", "positive"]);
    if !cfg!(feature = "highs") {
        let o = switchyard(&["place", "--loads", l, "--gpus", "4", "--exact", "--exact-solver", "highs"]);
        assert_fails_with(&o, &["not in this build", "--features highs"]);
    }
}
