//! `switchyard profile` end to end: measures, fits, writes a profile that `validate` and `train` read.

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard")
}

#[test]
fn profile_writes_a_profile_that_validate_and_train_read() {
    let dir = std::env::temp_dir().join(format!("switchyard-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prof = dir.join("p.json");
    let samples = dir.join("s.jsonl");
    let (p, s) = (prof.to_str().unwrap(), samples.to_str().unwrap());
    let small = [
        "--workers",
        "2",
        "--d-model",
        "32",
        "--d-ffn",
        "64",
        "--experts",
        "4",
        "--tokens",
        "64",
        "--samples",
        "3",
        "--repeats",
        "1",
    ];
    let mut args = vec!["profile"];
    args.extend(small);
    args.extend(["--out", p, "--samples-out", s, "--json"]);
    let out = run(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["workers"], 2);
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["samples"].as_array().unwrap().len(), 3);
    assert_eq!(v["gemm"].as_array().unwrap().len(), 4);
    assert!(v["profile"]["fit"]["mape_percent"].as_f64().unwrap().is_finite());
    assert!(v["all_to_all_fit"]["bandwidth_gbyte_s"].as_f64().unwrap() > 0.0);
    // The profile and the samples are what validate reads.
    let out = run(&["validate", "--samples", s, "--profile", p, "--json", "--plot", dir.join("v").to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["mape_percent"].as_f64().is_some(), "{v}");
    // And train prices placements with it.
    let out = run(&["train", "--workers", "2", "--experts", "4", "--steps", "3", "--profile", p, "--json", "--quiet"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_flags_name_the_fix() {
    for (args, needle) in [
        (vec!["profile", "--workers", "3", "--experts", "8"], "--experts 8"),
        (vec!["profile", "--samples", "0"], "--samples 0"),
        (vec!["profile", "--comm", "mpi"], "mpirun"),
        (vec!["train", "--profile", "/no/such/profile.json", "--steps", "1"], "/no/such/profile.json"),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

const SMALL: [&str; 14] = [
    "--workers",
    "2",
    "--d-model",
    "32",
    "--d-ffn",
    "64",
    "--experts",
    "4",
    "--tokens",
    "64",
    "--samples",
    "2",
    "--repeats",
    "1",
];

#[test]
fn device_cuda_without_a_driver_names_what_is_missing() {
    let p = switchyard_kernels::cuda::probe();
    if p.driver_found {
        eprintln!("skipped: a CUDA driver is installed here ({})", p.summary());
        return;
    }
    for workers in ["1", "2"] {
        let out = run(&["profile", "--device", "cuda", "--workers", workers]);
        assert!(!out.status.success(), "--device cuda succeeded without a driver");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--device cuda: no CUDA driver (libcuda.so) found"), "{err}");
        assert!(err.contains("install the NVIDIA driver or use --device cpu"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn device_auto_falls_back_to_the_cpu_and_says_why() {
    let p = switchyard_kernels::cuda::probe();
    let mut args = vec!["profile", "--device", "auto", "--json"];
    args.extend(SMALL);
    if p.check(0).is_ok() {
        eprintln!("skipped: this machine has a usable GPU ({}), auto would use it", p.summary());
        return;
    }
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("--device auto: running on the CPU: "), "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["workers"], 2);
    assert_eq!(v["comm"].as_array().unwrap().len(), 12);
}

#[test]
fn device_and_rendezvous_flags_are_checked() {
    for (args, needle) in [
        (vec!["profile", "--device", "tpu"], "cpu, cuda or auto"),
        (vec!["profile", "--rendezvous", "/tmp/sy-rdv", "--rank", "0", "--world-size", "2"], "--device cuda"),
        (vec!["profile", "--device", "cuda", "--rendezvous", "/tmp/sy-rdv", "--world-size", "2"], "SWITCHYARD_RANK"),
        (
            vec!["profile", "--device", "cuda", "--rendezvous", "/tmp/sy-rdv", "--rank", "2", "--world-size", "2"],
            "not below",
        ),
    ] {
        let out = run(&args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}
