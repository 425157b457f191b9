//! Built-in specs: the clusters and models of the SmartMoE paper (ATC'23), a current 8x H100 node, and the
//! models imported from the Hugging Face configs in `examples/hf/`.

use crate::cluster::{ClusterSpec, GpuSpec, InterNodeSpec, IntraNodeKind, IntraNodeSpec, ModelConstants};
use crate::error::{Source, SpecError};
use crate::hf::{HfImportOptions, import_hf_config};
use crate::model::{AttentionSpec, Dtype, ModelSpec, MoeSpec, Optimizer};

fn a100_80g() -> GpuSpec {
    GpuSpec {
        name: "A100-SXM4-80GB".into(),
        memory_gib: 80.0,
        peak_tflops_fp16: 312.0,
        peak_tflops_bf16: Some(312.0),
        peak_tflops_fp32: 156.0,
        peak_tflops_fp8: None,
        hbm_gbyte_s: 2039.0,
    }
}

fn v100(name: &str, fp16: f64, fp32: f64) -> GpuSpec {
    GpuSpec {
        name: name.into(),
        memory_gib: 32.0,
        peak_tflops_fp16: fp16,
        peak_tflops_bf16: None,
        peak_tflops_fp32: fp32,
        peak_tflops_fp8: None,
        hbm_gbyte_s: 900.0,
    }
}

/// Names of the built-in clusters.
pub const CLUSTER_NAMES: [&str; 4] = ["smartmoe-a100", "smartmoe-v100-sxm", "smartmoe-v100-pcie", "dgx-h100"];

/// A built-in cluster by name (see [`CLUSTER_NAMES`]). Node counts are defaults; `--gpus` resizes.
pub fn cluster(name: &str) -> Option<ClusterSpec> {
    let c = match name {
        // SmartMoE testbed A: 8x A100-SXM 80 GB per node, NVSwitch (NVLink 3: 300 GB/s per GPU per direction),
        // one 200 Gb/s HDR InfiniBand NIC per node.
        "smartmoe-a100" => ClusterSpec {
            name: name.into(),
            nodes: 2,
            gpus_per_node: 8,
            gpu: a100_80g(),
            intra_node: IntraNodeSpec { kind: IntraNodeKind::Nvswitch, bandwidth_gbyte_s: 300.0, latency_us: 3.0 },
            inter_node: InterNodeSpec { nics_per_node: 1, nic_gbit_s: 200.0, latency_us: 5.0 },
            constants: ModelConstants::default(),
        },
        // SmartMoE testbed B: 4x V100-SXM2 32 GB per node, NVLink (150 GB/s per GPU per direction),
        // 100 Gb/s EDR InfiniBand.
        "smartmoe-v100-sxm" => ClusterSpec {
            name: name.into(),
            nodes: 4,
            gpus_per_node: 4,
            gpu: v100("V100-SXM2-32GB", 125.0, 15.7),
            intra_node: IntraNodeSpec { kind: IntraNodeKind::Nvlink, bandwidth_gbyte_s: 150.0, latency_us: 3.0 },
            inter_node: InterNodeSpec { nics_per_node: 1, nic_gbit_s: 100.0, latency_us: 5.0 },
            constants: ModelConstants::default(),
        },
        // SmartMoE testbed C: 8x V100-PCIe 32 GB per node on PCIe 3.0 x16 (16 GB/s per direction),
        // 50 Gb/s network.
        "smartmoe-v100-pcie" => ClusterSpec {
            name: name.into(),
            nodes: 2,
            gpus_per_node: 8,
            gpu: v100("V100-PCIe-32GB", 112.0, 14.0),
            intra_node: IntraNodeSpec { kind: IntraNodeKind::Pcie, bandwidth_gbyte_s: 16.0, latency_us: 5.0 },
            inter_node: InterNodeSpec { nics_per_node: 1, nic_gbit_s: 50.0, latency_us: 8.0 },
            constants: ModelConstants::default(),
        },
        // A DGX-H100-class node: 8x H100-SXM 80 GB, NVSwitch (NVLink 4: 450 GB/s per GPU per direction),
        // 8x 400 Gb/s NDR InfiniBand NICs (one per GPU).
        "dgx-h100" => ClusterSpec {
            name: name.into(),
            nodes: 1,
            gpus_per_node: 8,
            gpu: GpuSpec {
                name: "H100-SXM5-80GB".into(),
                memory_gib: 80.0,
                peak_tflops_fp16: 989.0,
                peak_tflops_bf16: Some(989.0),
                peak_tflops_fp32: 494.0,
                peak_tflops_fp8: Some(1979.0),
                hbm_gbyte_s: 3350.0,
            },
            intra_node: IntraNodeSpec { kind: IntraNodeKind::Nvswitch, bandwidth_gbyte_s: 450.0, latency_us: 3.0 },
            inter_node: InterNodeSpec { nics_per_node: 8, nic_gbit_s: 400.0, latency_us: 5.0 },
            constants: ModelConstants::default(),
        },
        _ => return None,
    };
    Some(c)
}

/// A GPT-MoE model of the SmartMoE paper: `layers` layers of width `hidden`, every layer MoE with `experts`
/// top-2 experts whose FFN is twice the width (as the measured layer in `../shared/calibration`: d 2048,
/// hidden 4096), GPT-2 vocabulary, sequence 1024.
fn smartmoe_gpt(name: &str, layers: u32, hidden: u64, experts: u32) -> ModelSpec {
    let heads = (hidden / 128).max(1) as u32;
    ModelSpec {
        name: name.into(),
        num_layers: layers,
        hidden_size: hidden,
        attention: AttentionSpec::Mha { num_heads: heads, num_kv_heads: heads, head_dim: hidden / heads as u64 },
        ffn_hidden: 4 * hidden,
        gated_ffn: false,
        vocab_size: 50257,
        tied_embeddings: true,
        seq_len: 1024,
        global_batch: 256,
        dtype: Dtype::Fp16,
        optimizer: Optimizer::Adam,
        moe: Some(MoeSpec {
            num_experts: experts,
            top_k: 2,
            expert_ffn_hidden: 2 * hidden,
            gated: false,
            num_shared_experts: 0,
            shared_expert_ffn_hidden: None,
            moe_layer_frequency: 1,
            first_k_dense_layers: 0,
            capacity_factor: None,
            num_expert_groups: None,
        }),
    }
}

/// The Hugging Face configs shipped in `examples/hf/`, as (preset name, file name, text).
const HF_CONFIGS: [(&str, &str, &str); 5] = [
    ("mixtral-8x7b", "examples/hf/mixtral-8x7b.json", include_str!("../../examples/hf/mixtral-8x7b.json")),
    ("qwen3-30b-a3b", "examples/hf/qwen3-30b-a3b.json", include_str!("../../examples/hf/qwen3-30b-a3b.json")),
    ("deepseek-v3", "examples/hf/deepseek-v3.json", include_str!("../../examples/hf/deepseek-v3.json")),
    ("olmoe-1b-7b", "examples/hf/olmoe-1b-7b.json", include_str!("../../examples/hf/olmoe-1b-7b.json")),
    ("gpt-moe", "examples/hf/gpt-moe.json", include_str!("../../examples/hf/gpt-moe.json")),
];

/// Names of the built-in models.
pub fn model_names() -> Vec<&'static str> {
    let mut v = vec!["gpt-moe-l16-h2560-e16", "gpt-moe-l16-h2560-e32", "gpt-moe-l8-h2048-e32", "gpt-moe-l16-h1536-e64"];
    v.extend(HF_CONFIGS.iter().map(|c| c.0));
    v
}

/// A built-in model by name (see [`model_names`]).
pub fn model(name: &str) -> Option<Result<ModelSpec, SpecError>> {
    let m = match name {
        "gpt-moe-l16-h2560-e16" => smartmoe_gpt(name, 16, 2560, 16),
        "gpt-moe-l16-h2560-e32" => smartmoe_gpt(name, 16, 2560, 32),
        "gpt-moe-l8-h2048-e32" => smartmoe_gpt(name, 8, 2048, 32),
        "gpt-moe-l16-h1536-e64" => smartmoe_gpt(name, 16, 1536, 64),
        _ => {
            let (n, file, text) = HF_CONFIGS.iter().find(|c| c.0 == name)?;
            let opts = HfImportOptions { name: Some((*n).to_string()), ..HfImportOptions::default() };
            return Some(import_hf_config(text, &Source::Preset((*file).to_string()), &opts));
        }
    };
    Some(Ok(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_is_valid() {
        for n in CLUSTER_NAMES {
            let c = cluster(n).unwrap();
            c.validate(&Source::Preset(n.into())).unwrap();
        }
        for n in model_names() {
            let m = model(n).unwrap().unwrap();
            m.validate(&Source::Preset(n.into())).unwrap();
            assert_eq!(m.name, n);
        }
        assert!(cluster("nope").is_none());
        assert!(model("nope").is_none());
    }

    #[test]
    fn smartmoe_model_sizes() {
        // L8-H2048-E32: per layer, 32 experts x (2*2048*4096 + 4096 + 2048) params.
        let m = model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let p = m.param_counts();
        assert_eq!(p.experts, 8 * 32 * (2 * 2048 * 4096 + 6144));
        assert_eq!(m.num_moe_layers(), 8);
    }
}
