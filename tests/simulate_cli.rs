//! End-to-end: `trace stats`, `simulate` and `report` on a small trace the test writes.

use std::fmt::Write as _;
use std::process::{Command, Output};

fn switchyard(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard")).args(args).output().expect("run switchyard")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// 4 ranks, 8 experts, 2 layers, 40 snapshots 10 iterations apart; one hot expert that moves every 10 snapshots.
fn trace_csv() -> String {
    let mut s = String::from("iter,layer,rank");
    for e in 0..8 {
        write!(s, ",e{e}").unwrap();
    }
    s.push('\n');
    for i in 0..40u64 {
        let hot = (i / 10) as usize % 8;
        for layer in 0..2 {
            for rank in 0..4 {
                write!(s, "{},{layer},{rank}", 1 + 10 * i).unwrap();
                for e in 0..8 {
                    let c = if e == (hot + layer) % 8 { 2000 + 10 * rank } else { 200 + (e as u64 * 7 + i) % 50 };
                    write!(s, ",{c}").unwrap();
                }
                s.push('\n');
            }
        }
    }
    s
}

#[test]
fn stats_simulate_and_report() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("trace.csv");
    std::fs::write(&t, trace_csv()).unwrap();
    let t = t.to_str().unwrap();

    let v = json(&switchyard(&["trace", "stats", t, "--json"]));
    assert_eq!(v["stats"]["snapshots"], 40);
    assert_eq!(v["stats"]["experts"], 8);

    let sim = |alg: &str, extra: &[&str]| {
        let mut args = vec![
            "simulate",
            "--trace",
            t,
            "--gpus",
            "4",
            "--gpus-per-node",
            "2",
            "--algorithm",
            alg,
            "--dyn",
            "10",
            "--json",
        ];
        args.extend_from_slice(extra);
        json(&switchyard(&args))
    };
    let st = sim("static", &["--slots", "3"]);
    let sy = sim("switchyard", &["--slots", "3"]);
    let s = &st["summary"];
    let y = &sy["summary"];
    assert_eq!(s["switches"], 0);
    assert!(y["switches"].as_u64().unwrap() >= 1, "{y}");
    assert!(y["mean_imbalance"].as_f64().unwrap() < s["mean_imbalance"].as_f64().unwrap(), "{y} vs {s}");
    assert!(y["mean_iter_ms"].as_f64().unwrap() < s["mean_iter_ms"].as_f64().unwrap());
    assert_eq!(y["snapshot_interval"], 10);
    // Every baseline runs on the same trace; EPLB's replicas beat static placement.
    let b = sim("eplb", &["--slots", "3"]);
    assert!(b["summary"]["mean_imbalance"].as_f64().unwrap() <= s["mean_imbalance"].as_f64().unwrap() + 1e-9, "{b}");
    let h = sim("eplb-hierarchical", &["--slots", "3"]);
    assert!(h["summary"]["switches"].as_u64().unwrap() > 0);
    let f = sim("fastermoe", &["--slots", "3"]);
    assert!(
        f["summary"]["mean_iter_ms"].as_f64().unwrap().is_finite() && f["summary"]["decisions"].as_u64().unwrap() > 0
    );
    let sm = sim("smartmoe", &["--slots", "2"]);
    assert!(sm["summary"]["mean_imbalance"].as_f64().unwrap() >= 1.0);
    // An oracle decides with the load about to be played: no worse than past loads.
    let o = sim("switchyard", &["--slots", "3", "--oracle"]);
    assert!(o["summary"]["mean_imbalance"].as_f64().unwrap() <= y["mean_imbalance"].as_f64().unwrap() + 1e-9);

    let out = dir.path().join("report");
    let r = switchyard(&[
        "report",
        "--trace",
        t,
        "--gpus",
        "4",
        "--gpus-per-node",
        "2",
        "--slots",
        "3",
        "--dyn",
        "10,auto",
        "--algorithms",
        "static,switchyard",
        "--out",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| switchyard | dyn.auto |") && md.contains("| static | dyn.10 |"), "{md}");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(j["runs"].as_array().unwrap().len(), 4);
    for f in ["time-static.png", "time-switchyard.svg", "imbalance-per-layer.png"] {
        assert!(out.join(f).metadata().unwrap().len() > 500, "{f}");
    }
}

#[test]
fn broken_traces_and_bad_flags_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("bad.csv");
    let mut text = trace_csv();
    text.push_str("401,0,0,1,2\n");
    std::fs::write(&t, text).unwrap();
    let o = switchyard(&["simulate", "--trace", t.to_str().unwrap(), "--gpus", "4", "--gpus-per-node", "2"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bad.csv") && e.contains("322"), "{e}");
    let good = dir.path().join("good.csv");
    std::fs::write(&good, trace_csv()).unwrap();
    let g = good.to_str().unwrap();
    let o = switchyard(&["simulate", "--trace", g, "--gpus", "8", "--gpus-per-node", "2"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--gpus 4"));
    let o = switchyard(&["simulate", "--trace", g, "--gpus", "4", "--gpus-per-node", "2", "--algorithm", "magic"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("switchyard"));
    let o = switchyard(&["simulate", "--trace", g, "--gpus", "4", "--gpus-per-node", "2", "--slots", "1"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--slots 2"));
}

#[test]
fn place_reproduces_eplb_and_exports_placements() {
    let dir = tempfile::tempdir().unwrap();
    let loads = dir.path().join("loads.json");
    std::fs::write(&loads, "[[90,132,40,61,104,165,39,4,73,56,183,86],[20,107,104,64,19,197,187,157,172,86,16,27]]")
        .unwrap();
    let l = loads.to_str().unwrap();
    // DeepSeek's published EPLB example: 16 physical slots, 4 groups, 2 nodes (of 4 GPUs), 8 GPUs.
    let v = json(&switchyard(&[
        "place",
        "--loads",
        l,
        "--cluster",
        "smartmoe-v100-sxm",
        "--gpus",
        "8",
        "--slots",
        "2",
        "--algorithm",
        "eplb-hierarchical",
        "--groups",
        "4",
        "--eplb-json",
    ]));
    assert_eq!(
        v["phy2log"],
        serde_json::json!([
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]
        ])
    );
    assert_eq!(v["logcnt"][0].as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).sum::<i64>(), 16);
    let p = json(&switchyard(&[
        "place",
        "--loads",
        l,
        "--gpus",
        "8",
        "--slots",
        "2",
        "--algorithm",
        "switchyard",
        "--json",
    ]));
    let placements = p["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2);
    assert_eq!(placements[0]["slots"].as_array().unwrap().len(), 16);
    let o = switchyard(&["place", "--loads", l, "--gpus", "8", "--slots", "2", "--algorithm", "smartmoe"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("permutes experts"));
}
