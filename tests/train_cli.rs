//! End-to-end tests of `switchyard train`.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard")
}

#[test]
fn json_summary_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = dir.path().join("m.jsonl");
    let out = run(&[
        "train",
        "--workers",
        "2",
        "--experts",
        "4",
        "--top-k",
        "2",
        "--dyn",
        "2",
        "--steps",
        "8",
        "--seed",
        "7",
        "--d-model",
        "16",
        "--d-ffn",
        "32",
        "--heads",
        "2",
        "--layers",
        "1",
        "--ctx",
        "8",
        "--batch",
        "4",
        "--route-skew",
        "1.0",
        "--metrics",
        metrics.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for k in ["first_loss", "final_loss", "switches", "bytes_moved", "param_checksum"] {
        assert!(v.get(k).is_some(), "missing {k} in {last}");
    }
    assert!(v["final_loss"].as_f64().unwrap() < v["first_loss"].as_f64().unwrap());
    let lines = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(lines.lines().count(), 8);
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in ["loss", "step_ms", "imbalance", "switches", "bytes_moved", "sampler_ms"] {
        assert!(first.get(k).is_some(), "missing {k}");
    }
}

#[test]
fn bad_flags_name_the_fix() {
    for (args, needle) in [
        (vec!["train", "--workers", "3", "--batch", "16"], "--batch"),
        (vec!["train", "--experts", "4", "--top-k", "5"], "--top-k"),
        (vec!["train", "--dyn", "often"], "--dyn"),
        (vec!["train", "--device", "tpu"], "--device"),
        (vec!["train", "--comm", "nccl"], "--comm nccl"),
        // Outside mpirun (and, in the default build, without MPI at all) `--comm mpi` says how to get there.
        (vec!["train", "--comm", "mpi"], "mpirun"),
        (vec!["train", "--text", "/no/such/file.txt", "--steps", "1"], "/no/such/file.txt"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
