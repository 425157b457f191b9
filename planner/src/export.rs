//! Launch arguments of a plan for Megatron-LM (Megatron-Core MoE) and DeepSpeed (Megatron-DeepSpeed MoE).

use switchyard_cost::{AttentionSpec, Dtype, ModelSpec, ParallelPlan, Recompute};

/// Target framework of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportTarget {
    /// Megatron-LM `pretrain_gpt.py` arguments.
    Megatron,
    /// Megatron-DeepSpeed arguments plus the DeepSpeed JSON config.
    Deepspeed,
}

/// Lines of notes on what the framework cannot express (e.g. replica slots), prefixed with `#`.
fn notes(model: &ModelSpec, plan: &ParallelPlan) -> Vec<String> {
    let mut v = Vec::new();
    if plan.spare_slots_per_gpu(model) > 0 {
        v.push(format!(
            "# note: the plan holds {} spare expert slot(s) per GPU for replicas of hot experts; the framework \
             places one copy per expert, so run with Switchyard's runtime to use them",
            plan.spare_slots_per_gpu(model)
        ));
    }
    if plan.dispatch == switchyard_cost::DispatchMode::ExpertFetch {
        v.push(
            "# note: expert fetch (data-centric MoE) is not available in the framework; token dispatch is exported"
                .into(),
        );
    }
    v
}

/// The launch arguments, one `--flag value` per line (shell continuation style), preceded by notes.
pub fn export(model: &ModelSpec, plan: &ParallelPlan, target: ExportTarget) -> String {
    let mut a: Vec<String> = Vec::new();
    let mut flag = |f: &str, v: Option<String>| {
        a.push(match v {
            Some(v) => format!("--{f} {v}"),
            None => format!("--{f}"),
        })
    };
    let heads = model.attention.num_heads();
    flag("num-layers", Some(model.num_layers.to_string()));
    flag("hidden-size", Some(model.hidden_size.to_string()));
    flag("num-attention-heads", Some(heads.to_string()));
    if let AttentionSpec::Mha { num_kv_heads, num_heads, .. } = model.attention
        && num_kv_heads != num_heads
    {
        flag("group-query-attention", None);
        flag("num-query-groups", Some(num_kv_heads.to_string()));
    }
    flag("ffn-hidden-size", Some(model.ffn_hidden.to_string()));
    flag("seq-length", Some(model.seq_len.to_string()));
    flag("max-position-embeddings", Some(model.seq_len.to_string()));
    flag("micro-batch-size", Some(plan.micro_batch_size.to_string()));
    flag("global-batch-size", Some(model.global_batch.to_string()));
    flag("tensor-model-parallel-size", Some(plan.tp.to_string()));
    flag("pipeline-model-parallel-size", Some(plan.pp.to_string()));
    if plan.tp > 1 {
        flag("sequence-parallel", None);
    }
    match model.dtype {
        Dtype::Bf16 | Dtype::Fp8 => flag("bf16", None),
        Dtype::Fp16 => flag("fp16", None),
        Dtype::Fp32 => {}
    }
    match plan.recompute {
        Recompute::None => {}
        Recompute::Selective => flag("recompute-granularity", Some("selective".into())),
        Recompute::Full => {
            flag("recompute-granularity", Some("full".into()));
            flag("recompute-method", Some("uniform".into()));
            flag("recompute-num-layers", Some("1".into()));
        }
    }
    if let Some(m) = &model.moe {
        match target {
            ExportTarget::Megatron => {
                flag("num-experts", Some(m.num_experts.to_string()));
                flag("moe-router-topk", Some(m.top_k.to_string()));
                flag("moe-ffn-hidden-size", Some(m.expert_ffn_hidden.to_string()));
                flag("expert-model-parallel-size", Some(plan.ep.to_string()));
                flag("expert-tensor-parallel-size", Some(plan.etp.to_string()));
                flag("moe-token-dispatcher-type", Some("alltoall".into()));
                if m.num_shared_experts > 0 {
                    let h = m.shared_expert_ffn_hidden.unwrap_or(m.expert_ffn_hidden) * m.num_shared_experts as u64;
                    flag("moe-shared-expert-intermediate-size", Some(h.to_string()));
                }
                if m.first_k_dense_layers > 0 || m.moe_layer_frequency > 1 {
                    let pattern: Vec<&str> =
                        (0..model.num_layers).map(|l| if model.is_moe_layer(l) { "1" } else { "0" }).collect();
                    flag("moe-layer-freq", Some(format!("'([{}])'", pattern.join(","))));
                }
                if let Some(cf) = m.capacity_factor {
                    flag("moe-expert-capacity-factor", Some(cf.to_string()));
                    flag("moe-pad-expert-input-to-capacity", None);
                }
                if plan.distributed_optimizer {
                    flag("use-distributed-optimizer", None);
                }
            }
            ExportTarget::Deepspeed => {
                flag("num-experts", Some(m.num_experts.to_string()));
                flag("moe-expert-parallel-size", Some(plan.ep.to_string()));
                flag("topk", Some(m.top_k.to_string()));
                if let Some(cf) = m.capacity_factor {
                    flag("moe-train-capacity-factor", Some(cf.to_string()));
                } else {
                    flag("moe-min-capacity", Some("0".into()));
                    flag("disable-moe-token-dropping", None);
                }
            }
        }
    }
    if model.gated_ffn || model.moe.as_ref().is_some_and(|m| m.gated) {
        flag("swiglu", None);
    }
    let mut out = notes(model, plan);
    out.push(format!("# {}", plan.label()));
    let body = a.join(" \\\n  ");
    out.push(match target {
        ExportTarget::Megatron => format!("pretrain_gpt.py \\\n  {body}"),
        ExportTarget::Deepspeed => {
            format!("pretrain_gpt.py \\\n  {body} \\\n  --deepspeed --deepspeed_config ds_config.json")
        }
    });
    if target == ExportTarget::Deepspeed {
        let precision = match model.dtype {
            Dtype::Bf16 | Dtype::Fp8 => "\"bf16\": {\"enabled\": true}",
            Dtype::Fp16 => "\"fp16\": {\"enabled\": true}",
            Dtype::Fp32 => "\"fp16\": {\"enabled\": false}",
        };
        out.push(format!(
            "# ds_config.json\n{{\n  \"train_batch_size\": {},\n  \"train_micro_batch_size_per_gpu\": {},\n  \"gradient_accumulation_steps\": {},\n  \"zero_optimization\": {{\"stage\": {}}},\n  {precision}\n}}",
            model.global_batch,
            plan.micro_batch_size,
            plan.num_micro_batches,
            u8::from(plan.distributed_optimizer)
        ));
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cost::{AllToAllAlgo, DispatchMode, presets};

    #[test]
    fn megatron_args_carry_the_layout() {
        let m = presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let plan = ParallelPlan {
            tp: 2,
            pp: 2,
            dp: 4,
            ep: 8,
            etp: 1,
            edp: 1,
            slots_per_gpu: 5,
            micro_batch_size: 2,
            num_micro_batches: 32,
            recompute: Recompute::Selective,
            distributed_optimizer: true,
            all_to_all: AllToAllAlgo::Flat,
            dispatch: DispatchMode::Token,
        };
        let s = export(&m, &plan, ExportTarget::Megatron);
        for f in [
            "--tensor-model-parallel-size 2",
            "--pipeline-model-parallel-size 2",
            "--expert-model-parallel-size 8",
            "--num-experts 32",
            "--moe-router-topk 2",
            "--micro-batch-size 2",
            "--global-batch-size 256",
            "--recompute-granularity selective",
            "--use-distributed-optimizer",
            "--sequence-parallel",
            "--fp16",
        ] {
            assert!(s.contains(f), "missing {f} in\n{s}");
        }
        assert!(s.contains("spare expert slot"), "{s}");
        let d = export(&m, &plan, ExportTarget::Deepspeed);
        assert!(d.contains("--moe-expert-parallel-size 8") && d.contains("\"gradient_accumulation_steps\": 32"), "{d}");
    }
}
