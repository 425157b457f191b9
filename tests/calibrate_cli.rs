//! End-to-end: `switchyard calibrate` fits a profile on a sample file the test writes, `validate` reads it back on
//! held-out samples and writes its plots, and `plan` accepts the profile as a cluster.

use std::fmt::Write as _;
use std::process::{Command, Output};

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard")
}

/// A CSV in the shared calibration format: 2 GPUs x 4 experts, 2 micro-batches per sample, measured times
/// following a made-up but physical law (fixed cost + time proportional to the busiest GPU's tokens).
fn sample_csv() -> String {
    let mut s = String::from("sample_index,iter,layer,microbatch,real_ms,smartmoe_est_ms");
    for r in 0..2 {
        for e in 0..4 {
            write!(s, ",r{r}_e{e}").unwrap();
        }
    }
    s.push('\n');
    for i in 0..24u64 {
        let hot = 1000 + 300 * (i % 7);
        let rows = [[hot, 200, 300, 748 - (hot - 1000) / 3], [400, hot / 2, 600, 500]];
        let busiest =
            (rows[0][0] + rows[1][0] + rows[0][1] + rows[1][1]).max(rows[0][2] + rows[1][2] + rows[0][3] + rows[1][3]);
        let real = 1.0 + busiest as f64 * 0.0002;
        for mb in 0..2 {
            write!(s, "{i},{},0,{mb},{real},{}", 101 + 100 * i, real * 1.1).unwrap();
            for r in rows {
                for c in r {
                    write!(s, ",{c}").unwrap();
                }
            }
            s.push('\n');
        }
    }
    s
}

#[test]
fn calibrate_then_validate_then_plan() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("samples.csv");
    std::fs::write(&csv, sample_csv()).unwrap();
    let profile = dir.path().join("profile.json");
    let o = switchyard(&[
        "calibrate",
        "--samples",
        csv.to_str().unwrap(),
        "--cluster",
        "smartmoe-a100",
        "--layer",
        "d_model=1024,d_ffn=2048,dtype=fp16",
        "--select",
        "even",
        "--out",
        profile.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["fit"]["mape_percent"].as_f64().unwrap() < 10.0, "{v}");
    let p: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&profile).unwrap()).unwrap();
    assert_eq!(p["cluster"]["gpus_per_node"], 2, "resized to the samples' 2 GPUs");
    assert_eq!(p["layer"]["d_model"], 1024);
    assert_eq!(p["fitted_on"]["selection"], "even");

    let stem = dir.path().join("scatter");
    let o = switchyard(&[
        "validate",
        "--samples",
        csv.to_str().unwrap(),
        "--profile",
        profile.to_str().unwrap(),
        "--select",
        "odd",
        "--plot",
        stem.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["samples"], 12);
    assert!(v["mape_percent"].as_f64().unwrap().is_finite());
    assert!(v["pearson_r"].as_f64().unwrap() > 0.5, "{v}");
    assert!((v["reference"]["mape_percent"].as_f64().unwrap() - 10.0).abs() < 1e-6);
    assert!(dir.path().join("scatter.png").metadata().unwrap().len() > 1000);
    assert!(std::fs::read_to_string(dir.path().join("scatter.svg")).unwrap().contains("<svg"));

    // The profile is a cluster: plan accepts it (resized with --gpus).
    let o = switchyard(&[
        "plan",
        "--model",
        "gpt-moe-l8-h2048-e32",
        "--cluster",
        profile.to_str().unwrap(),
        "--gpus",
        "8",
        "--top",
        "1",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn broken_samples_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("bad.csv");
    let mut text = sample_csv();
    text.push_str("99,9999,0,0,12\n");
    std::fs::write(&csv, text).unwrap();
    let o = switchyard(&[
        "calibrate",
        "--samples",
        csv.to_str().unwrap(),
        "--out",
        dir.path().join("p.json").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.csv:50") && e.contains("fix:"), "{e}");
    let o = switchyard(&["calibrate", "--samples", csv.to_str().unwrap(), "--layer", "d_model=x", "--out", "p.json"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("d_model"));
}
