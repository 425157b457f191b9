//! Property test: random specs, valid or not, fed to the parsers and the planner never panic; every rejection
//! is a `SpecError` that names a field.

use proptest::prelude::*;
use serde_json::{Value, json};
use switchyard_cost::error::{Source, parse_json_str};
use switchyard_cost::{ClusterSpec, ModelSpec, Workload, presets};
use switchyard_planner::{SearchOptions, SpaceOptions, search};

fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u64..5000).prop_map(Value::from),
        prop_oneof![Just(0.0f64), Just(-1.0), Just(1e300), Just(0.5), Just(1.25)].prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::from),
        Just(json!([1, 2])),
        Just(json!({"kind": "mha"})),
    ]
}

fn model_fields() -> Vec<&'static str> {
    vec![
        "name",
        "num_layers",
        "hidden_size",
        "ffn_hidden",
        "vocab_size",
        "seq_len",
        "global_batch",
        "dtype",
        "optimizer",
        "gated_ffn",
        "tied_embeddings",
        "attention",
        "moe",
        "unknown_field",
    ]
}

fn small_model() -> Value {
    json!({
        "name": "tiny", "num_layers": 4, "hidden_size": 256,
        "attention": {"kind": "mha", "num_heads": 4, "num_kv_heads": 4, "head_dim": 64},
        "ffn_hidden": 1024, "vocab_size": 1000, "seq_len": 128, "global_batch": 32,
        "dtype": "bf16", "optimizer": "adam",
        "moe": {"num_experts": 8, "top_k": 2, "expert_ffn_hidden": 512}
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_model_fields_never_panic(field in proptest::sample::select(model_fields()), v in any_json(),
                                       moe_field in proptest::sample::select(vec!["num_experts", "top_k", "expert_ffn_hidden", "capacity_factor", "num_expert_groups", "first_k_dense_layers", "moe_layer_frequency"]),
                                       mv in any_json()) {
        let mut m = small_model();
        m[field] = v;
        if m["moe"].is_object() {
            m["moe"][moe_field] = mv;
        }
        let src = Source::File("random.json".into());
        match parse_json_str::<ModelSpec>(&m.to_string(), &src, "model spec") {
            Err(e) => prop_assert!(e.to_string().contains("random.json")),
            Ok(model) => match model.validate(&src) {
                Err(e) => prop_assert!(e.to_string().contains("random.json") && e.to_string().contains("fix:")),
                Ok(()) => {
                    let cluster = presets::cluster("smartmoe-a100").unwrap();
                    let opts = SearchOptions { top: 3, space: SpaceOptions { max_spare_slots: 1, ..Default::default() } };
                    let r = search(&model, &cluster, &Workload::Skewed { zipf_s: 1.0 }, &opts, &|_, _| {});
                    for p in &r.plans {
                        prop_assert!(p.predicted_iter_ms.is_finite() && p.predicted_iter_ms > 0.0);
                    }
                }
            },
        }
    }

    #[test]
    fn random_clusters_never_panic(nodes in 0u32..5, gpn in 0u32..10, mem in -10.0f64..100.0, bw in -1.0f64..500.0,
                                   nics in 0u32..4, eff in -0.5f64..1.5) {
        let mut c = serde_json::to_value(presets::cluster("smartmoe-a100").unwrap()).unwrap();
        c["nodes"] = json!(nodes);
        c["gpus_per_node"] = json!(gpn);
        c["gpu"]["memory_gib"] = json!(mem);
        c["intra_node"]["bandwidth_gbyte_s"] = json!(bw);
        c["inter_node"]["nics_per_node"] = json!(nics);
        c["constants"]["gemm_max_efficiency"] = json!(eff);
        let src = Source::File("cluster.json".into());
        let cluster: ClusterSpec = parse_json_str(&c.to_string(), &src, "cluster spec").unwrap();
        match cluster.validate(&src) {
            Err(e) => prop_assert!(e.to_string().contains("cluster.json")),
            Ok(()) => {
                let model = parse_json_str::<ModelSpec>(&small_model().to_string(), &src, "m").unwrap();
                let opts = SearchOptions { top: 2, ..Default::default() };
                let r = search(&model, &cluster, &Workload::Uniform, &opts, &|_, _| {});
                for p in &r.plans {
                    prop_assert!(p.predicted_iter_ms.is_finite() && p.predicted_iter_ms > 0.0);
                }
            }
        }
    }
}
