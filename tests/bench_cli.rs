//! End-to-end tests of `switchyard bench kernels` and `bench decision` (tiny shapes: what is checked is the
//! interface, not speed).

use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard")
}

const TINY: [&str; 14] = [
    "bench",
    "kernels",
    "--tokens",
    "64",
    "--d-model",
    "16",
    "--d-ffn",
    "32",
    "--experts",
    "4",
    "--iterations",
    "1",
    "--threads",
    "1",
];

fn with(extra: &[&str]) -> Output {
    let mut args = TINY.to_vec();
    args.extend_from_slice(extra);
    run(&args)
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&String::from_utf8_lossy(&o.stdout)).expect("one JSON document")
}

#[test]
fn kernels_json_has_the_ratio_to_gemm() {
    let v = json(&with(&["--json"]));
    for k in ["forward_ms", "fwd_bwd_ms", "expert_gemm_gflops_fwd_bwd", "plain_gemm_gflops", "fwd_bwd_ratio_to_gemm"] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    assert_eq!(v["routed_tokens"].as_u64().unwrap() + v["dropped_tokens"].as_u64().unwrap(), 128);
}

#[test]
fn kernels_device_cuda_measures_the_gpu_or_names_what_is_missing() {
    let usable = switchyard_kernels::cuda::probe().check(0).is_ok();
    let cuda = with(&["--device", "cuda", "--json"]);
    let auto = with(&["--device", "auto", "--json"]);
    let auto_json = json(&auto);
    if usable {
        let v = json(&cuda);
        assert_eq!(v["backend"], "cuda");
        assert!(v["fwd_bwd_ratio_to_gemm"].as_f64().is_some_and(|x| x > 0.0), "{v}");
        assert_eq!(auto_json["backend"], "cuda");
    } else {
        eprintln!("no usable GPU here: checking the messages of --device cuda and auto instead");
        assert!(!cuda.status.success());
        let err = String::from_utf8_lossy(&cuda.stderr);
        assert!(err.contains("--device cuda") && err.contains("--device cpu"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_ne!(auto_json["backend"], "cuda");
        assert!(String::from_utf8_lossy(&auto.stderr).contains("--device auto: no usable GPU"));
    }
    let bad = with(&["--device", "tpu"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--device tpu"));
}

#[test]
fn decision_json_reports_first_and_steady_decisions_beside_eplb() {
    let o = run(&["bench", "decision", "--experts", "16", "--gpus", "8", "--layers", "3", "--repeat", "1", "--json"]);
    let v = json(&o);
    for k in [
        "decision_median_ms",
        "decision_one_thread_median_ms",
        "steady_decision_median_ms",
        "eplb_global_median_ms",
        "eplb_hierarchical_median_ms",
        "placement_only_median_ms",
        "sampling_ms_per_iteration",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x > 0.0), "{k} in {v}");
    }
    assert_eq!(v["target_ms"].as_f64(), Some(5.0));
    assert_eq!((v["experts"].as_u64(), v["gpus"].as_u64(), v["layers"].as_u64()), (Some(16), Some(8), Some(3)));
}
