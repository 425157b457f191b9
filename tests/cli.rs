//! End-to-end tests of the `switchyard` binary: outputs people and scripts rely on, and clear failures on bad
//! input.

use std::path::PathBuf;
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

fn temp_file(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(name);
    std::fs::write(&p, text).unwrap();
    (dir, p)
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

#[test]
fn presets_json_lists_models_and_clusters() {
    let v = json(&switchyard(&["presets", "--json"]));
    let models: Vec<&str> = v["models"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    let clusters: Vec<&str> = v["clusters"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    for m in ["gpt-moe-l16-h2560-e16", "gpt-moe-l16-h2560-e32", "gpt-moe-l8-h2048-e32", "gpt-moe-l16-h1536-e64"] {
        assert!(models.contains(&m), "{m}");
    }
    for m in ["mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v3", "olmoe-1b-7b", "gpt-moe"] {
        assert!(models.contains(&m), "{m}");
    }
    for c in ["smartmoe-a100", "smartmoe-v100-sxm", "smartmoe-v100-pcie", "dgx-h100"] {
        assert!(clusters.contains(&c), "{c}");
    }
    let text = stdout(&switchyard(&["presets"]));
    assert!(text.contains("deepseek-v3") && text.contains("dgx-h100"), "{text}");
}

#[test]
fn plan_json_is_ranked_best_first() {
    let v = json(&switchyard(&[
        "plan",
        "--model",
        "gpt-moe-l8-h2048-e32",
        "--cluster",
        "smartmoe-a100",
        "--gpus",
        "16",
        "--top",
        "5",
        "--json",
    ]));
    let plans = v["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 5);
    let times: Vec<f64> = plans.iter().map(|p| p["predicted_iter_ms"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    assert!(times[0] > 0.0);
    for p in plans {
        assert!(p["memory_gib_per_gpu"].as_f64().unwrap() <= 80.0);
        let plan = &p["plan"];
        let product = plan["tp"].as_u64().unwrap() * plan["pp"].as_u64().unwrap() * plan["dp"].as_u64().unwrap();
        assert_eq!(product, 16);
    }
    assert_eq!(v["gpus"], 16);
    assert!(v["pool"]["placements"].as_array().unwrap().len() >= 2);
}

#[test]
fn plan_table_shows_the_columns() {
    let o = switchyard(&["plan", "--model", "gpt-moe-l8-h2048-e32", "--cluster", "smartmoe-a100", "--top", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = stdout(&o);
    for h in ["rank", "layout", "slots", "ms/iter", "GiB/GPU", "tokens/s", "pool of #1"] {
        assert!(t.contains(h), "missing {h}: {t}");
    }
}

#[test]
fn plan_reads_a_hugging_face_config_and_a_skewed_workload() {
    let cfg = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/hf/mixtral-8x7b.json");
    let v = json(&switchyard(&[
        "plan",
        "--model",
        cfg,
        "--cluster",
        "dgx-h100",
        "--gpus",
        "32",
        "--workload",
        "zipf:1.0",
        "--json",
        "--top",
        "1",
    ]));
    assert!(v["workload"].as_str().unwrap().starts_with("zipf"));
    assert_eq!(v["plans"].as_array().unwrap().len(), 1);
}

#[test]
fn export_prints_megatron_and_deepspeed_arguments() {
    let o =
        switchyard(&["plan", "--model", "gpt-moe-l8-h2048-e32", "--cluster", "smartmoe-a100", "--export", "megatron"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = stdout(&o);
    assert!(s.contains("--expert-model-parallel-size") && s.contains("--num-experts 32"), "{s}");
    let o =
        switchyard(&["plan", "--model", "gpt-moe-l8-h2048-e32", "--cluster", "smartmoe-a100", "--export", "deepspeed"]);
    assert!(stdout(&o).contains("train_micro_batch_size_per_gpu"), "{}", stdout(&o));
}

#[test]
fn malformed_json_names_the_file_and_line() {
    let (_d, p) = temp_file("model.json", "{\"name\": \"x\", \"num_layers\": 4,\n  \"hidden_size\": ");
    let o = switchyard(&["plan", "--model", p.to_str().unwrap(), "--cluster", "smartmoe-a100"]);
    assert_fails_with(&o, &["model.json", "line 2", "fix:"]);
}

#[test]
fn unknown_and_missing_fields_are_named() {
    let mut v = serde_json::to_value(json(&switchyard(&["presets", "--json"]))["models"][0].clone()).unwrap();
    v["hidden_sise"] = serde_json::json!(4);
    let (_d, p) = temp_file("m.json", &v.to_string());
    assert_fails_with(
        &switchyard(&["plan", "--model", p.to_str().unwrap(), "--cluster", "smartmoe-a100"]),
        &["m.json", "hidden_sise"],
    );
    let mut v = json(&switchyard(&["presets", "--json"]))["models"][0].clone();
    v.as_object_mut().unwrap().remove("seq_len");
    let (_d, p) = temp_file("m2.json", &v.to_string());
    assert_fails_with(
        &switchyard(&["plan", "--model", p.to_str().unwrap(), "--cluster", "smartmoe-a100"]),
        &["m2.json", "seq_len"],
    );
}

#[test]
fn zero_and_negative_sizes_are_rejected() {
    let mut v = json(&switchyard(&["presets", "--json"]))["models"][0].clone();
    v["hidden_size"] = serde_json::json!(0);
    let (_d, p) = temp_file("zero.json", &v.to_string());
    assert_fails_with(
        &switchyard(&["plan", "--model", p.to_str().unwrap(), "--cluster", "smartmoe-a100"]),
        &["zero.json", "hidden_size", "= 0", "must be positive", "fix:"],
    );
    let mut c = json(&switchyard(&["presets", "--json"]))["clusters"][0].clone();
    c["gpu"]["memory_gib"] = serde_json::json!(-80.0);
    let (_d, p) = temp_file("neg.json", &c.to_string());
    assert_fails_with(
        &switchyard(&["plan", "--model", "gpt-moe-l8-h2048-e32", "--cluster", p.to_str().unwrap()]),
        &["neg.json", "gpu.memory_gib", "-80", "fix:"],
    );
}

#[test]
fn gpu_count_must_be_a_multiple_of_the_node() {
    assert_fails_with(
        &switchyard(&["plan", "--model", "gpt-moe-l8-h2048-e32", "--cluster", "smartmoe-a100", "--gpus", "12"]),
        &["--gpus", "12", "multiple of the node size", "fix:"],
    );
}

#[test]
fn a_model_that_fits_nowhere_says_how_far_off() {
    assert_fails_with(
        &switchyard(&["plan", "--model", "deepseek-v3", "--cluster", "dgx-h100", "--gpus", "8"]),
        &["fits no layout", "GiB per GPU", "fix:"],
    );
}

#[test]
fn unknown_preset_and_workload_are_explained() {
    assert_fails_with(&switchyard(&["plan", "--model", "gpt-9", "--cluster", "smartmoe-a100"]), &["gpt-9", "preset"]);
    assert_fails_with(
        &switchyard(&[
            "plan",
            "--model",
            "gpt-moe-l8-h2048-e32",
            "--cluster",
            "smartmoe-a100",
            "--workload",
            "zipf:abc",
        ]),
        &["--workload", "abc"],
    );
}

#[test]
fn example_specs_match_the_presets() {
    // examples/ holds the presets as files: a user's starting point must stay in sync with the built-ins.
    let v = json(&switchyard(&["presets", "--json"]));
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    for c in v["clusters"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let text = std::fs::read_to_string(format!("{dir}/clusters/{name}.json")).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(&file, c, "examples/clusters/{name}.json differs from the preset");
    }
    for m in v["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        if let Ok(text) = std::fs::read_to_string(format!("{dir}/models/{name}.json")) {
            let file: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(&file, m, "examples/models/{name}.json differs from the preset");
        }
    }
    // And a spec file plans like its preset.
    let a = json(&switchyard(&[
        "plan",
        "--model",
        &format!("{dir}/models/gpt-moe-l8-h2048-e32.json"),
        "--cluster",
        &format!("{dir}/clusters/smartmoe-a100.json"),
        "--json",
        "--top",
        "1",
    ]));
    let b = json(&switchyard(&[
        "plan",
        "--model",
        "gpt-moe-l8-h2048-e32",
        "--cluster",
        "smartmoe-a100",
        "--json",
        "--top",
        "1",
    ]));
    assert_eq!(a["plans"][0]["predicted_iter_ms"], b["plans"][0]["predicted_iter_ms"]);
}
