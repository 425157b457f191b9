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
        (vec!["train", "--dispatch", "teleport"], "--dispatch"),
        (vec!["train", "--layers", "3", "--dispatch", "fetch,token"], "--dispatch"),
        (vec!["train", "--workers", "4", "--workers-per-node", "3"], "--workers-per-node"),
        (vec!["train", "--workers-per-node", "0"], "--workers-per-node"),
        (vec!["train", "--workers", "4", "--edp", "3"], "--edp"),
        (vec!["train", "--edp", "0"], "--edp"),
        (vec!["train", "--workers", "4", "--edp", "2", "--slots", "2", "--experts", "8"], "--slots"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn data_centric_mode_matches_the_token_mode() {
    let common = [
        "train",
        "--workers",
        "4",
        "--experts",
        "8",
        "--slots",
        "3",
        "--dyn",
        "3",
        "--steps",
        "10",
        "--d-model",
        "16",
        "--d-ffn",
        "32",
        "--heads",
        "2",
        "--layers",
        "2",
        "--ctx",
        "8",
        "--batch",
        "8",
        "--route-skew",
        "1.0",
        "--json",
        "--quiet",
    ];
    let dir = tempfile::tempdir().unwrap();
    let summary = |extra: &[&str], metrics: Option<&std::path::Path>| -> serde_json::Value {
        let mut args: Vec<&str> = common.to_vec();
        args.extend_from_slice(extra);
        let m;
        if let Some(p) = metrics {
            m = p.to_str().unwrap().to_string();
            args.extend_from_slice(&["--metrics", &m]);
        }
        let out = run(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        let stdout = String::from_utf8(out.stdout).unwrap();
        serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
    };
    let token = summary(&[], None);
    let metrics = dir.path().join("fetch.jsonl");
    let fetch = summary(&["--dispatch", "fetch,token", "--workers-per-node", "2"], Some(&metrics));
    let (a, b) = (token["final_loss"].as_f64().unwrap(), fetch["final_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * a.abs(), "final loss {a} (token) against {b} (fetch)");
    assert_eq!(token["switches"], fetch["switches"]);
    // The first layer fetches experts every step.
    let lines = std::fs::read_to_string(&metrics).unwrap();
    for l in lines.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v["fetched_bytes"].as_u64().unwrap() > 0, "{l}");
    }
}

/// Whether this machine can run the GPU path (driver, device, NVRTC, cuBLAS).
fn gpu_usable() -> bool {
    switchyard_kernels::cuda::probe().check(0).is_ok()
}

#[test]
fn device_cuda_trains_on_the_gpu_or_names_what_is_missing() {
    let small = [
        "train",
        "--workers",
        "2",
        "--experts",
        "4",
        "--steps",
        "3",
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
        "--json",
        "--quiet",
    ];
    let with = |device: &str| {
        let mut args = small.to_vec();
        args.extend(["--device", device]);
        run(&args)
    };
    let cuda = with("cuda");
    let auto = with("auto");
    let mut nccl_args = small.to_vec();
    nccl_args.extend(["--device", "cuda", "--comm", "nccl"]);
    let nccl = run(&nccl_args);
    let nccl_err = String::from_utf8_lossy(&nccl.stderr);
    assert!(!nccl_err.contains("panicked"), "{nccl_err}");
    let err = String::from_utf8_lossy(&cuda.stderr);
    let summary = |o: &Output| -> serde_json::Value {
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap_or("")).unwrap()
    };
    assert!(auto.status.success(), "{}", String::from_utf8_lossy(&auto.stderr));
    if gpu_usable() {
        assert!(cuda.status.success(), "{err}");
        assert_eq!(summary(&cuda)["device"], "cuda:0");
        assert_eq!(summary(&auto)["device"], "cuda:0");
    } else {
        eprintln!("no usable GPU here: checking the messages of --device cuda and auto instead of a GPU run");
        assert!(!cuda.status.success(), "--device cuda succeeded without a GPU");
        assert!(!nccl.status.success(), "--comm nccl succeeded without a GPU");
        assert!(nccl_err.contains("--device cuda"), "{nccl_err}");
        assert!(err.contains("--device cuda") && (err.contains("fix") || err.contains("--device cpu")), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(summary(&auto)["device"], "cpu");
        let note = String::from_utf8_lossy(&auto.stderr);
        assert!(note.contains("--device auto: no usable GPU"), "{note}");
    }
}
