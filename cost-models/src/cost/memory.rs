//! Memory per GPU: weights, gradients, optimizer state, activations of the micro-batches in flight, all-to-all
//! buffers and the framework's reserve. The busiest pipeline stage decides.

use serde::Serialize;

use super::pipeline::in_flight_micro_batches;
use super::tables::ModelTables;
use crate::cluster::ClusterSpec;
use crate::model::{Dtype, ModelSpec, Optimizer};
use crate::plan::{DispatchMode, ParallelPlan, Recompute};

/// Bytes of the memory one GPU needs, by kind.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct MemoryBreakdown {
    /// Parameters in the training dtype.
    pub weights_bytes: f64,
    /// Gradients (fp32 main gradients under mixed precision).
    pub grads_bytes: f64,
    /// Optimizer state (fp32 master weights and moments), sharded when the plan uses a distributed optimizer.
    pub optimizer_bytes: f64,
    /// Activations kept for backward, for every micro-batch in flight.
    pub activations_bytes: f64,
    /// Dispatch and combine buffers of the all-to-all (or fetched expert weights in expert-fetch mode).
    pub comm_buffers_bytes: f64,
    /// Framework reserve (CUDA context, allocator slack).
    pub reserved_bytes: f64,
    /// Sum.
    pub total_bytes: f64,
    /// Pipeline stage that needs the most memory.
    pub stage: u32,
}

/// Bytes per parameter of (weights, gradients, optimizer state) for a dtype and optimizer.
pub fn bytes_per_param(dtype: Dtype, opt: Optimizer) -> (f64, f64, f64) {
    let weights = match dtype {
        Dtype::Fp32 => 4.0,
        // fp8 training keeps bf16 weights and casts per GEMM.
        Dtype::Fp16 | Dtype::Bf16 | Dtype::Fp8 => 2.0,
    };
    let grads = 4.0;
    let moments = match opt {
        Optimizer::Adam => 8.0,
        Optimizer::Sgd => 4.0,
    };
    let master = if dtype == Dtype::Fp32 { 0.0 } else { 4.0 };
    (weights, grads, moments + master)
}

/// Activation bytes one layer keeps per micro-batch on one GPU (Korthikanti et al., "Reducing Activation
/// Recomputation in Large Transformer Models", with sequence parallelism), scaled to the activation dtype; an MoE
/// layer's MLP part is replaced by the routed experts' activations on the busiest GPU (`moe_tokens` assignments)
/// and the shared experts'.
pub fn layer_activation_bytes(model: &ModelSpec, plan: &ParallelPlan, moe_layer: bool, moe_tokens: f64) -> f64 {
    let s = model.seq_len as f64;
    let b = plan.micro_batch_size as f64;
    let h = model.hidden_size as f64;
    let t = plan.tp as f64;
    let a = model.attention.num_heads() as f64;
    let scale = model.dtype.bytes().max(2) as f64 / 2.0;
    let sbh = s * b * h;
    // Attention block: 11 sbh + 5 a s^2 b (scores), norms 4 sbh; MLP with hidden f: sbh (2 + 4 f / h) + sbh (mask).
    let attn = 11.0 * sbh / t;
    let scores = 5.0 * a * s * s * b / t;
    let norms = 4.0 * sbh / t;
    let mlp = if moe_layer {
        let m = model.moe.as_ref().expect("moe layer of an MoE model");
        let f = m.expert_ffn_hidden as f64 / plan.etp as f64;
        let per_token = 2.0 * h + if m.gated { 6.0 * f } else { 4.0 * f } + h;
        let shared_f = m.shared_expert_ffn_hidden.unwrap_or(m.expert_ffn_hidden) as f64 * m.num_shared_experts as f64;
        let shared = if m.num_shared_experts > 0 {
            sbh / t * (3.0 + if m.gated { 6.0 } else { 4.0 } * shared_f / h)
        } else {
            0.0
        };
        moe_tokens * per_token + shared + 2.0 * sbh / t
    } else {
        let f = model.ffn_hidden as f64;
        sbh / t * (3.0 + if model.gated_ffn { 6.0 } else { 4.0 } * f / h)
    };
    let full = attn + scores + norms + mlp;
    scale
        * match plan.recompute {
            Recompute::None => full,
            Recompute::Selective => full - scores,
            Recompute::Full => 2.0 * sbh / t,
        }
}

/// Memory per GPU of the busiest stage of a plan. `moe_imbalance` is the busiest GPU's routed tokens over the
/// mean (it sizes the receive buffers and the experts' activations).
pub fn memory_per_gpu(
    model: &ModelSpec,
    tables: &ModelTables,
    cluster: &ClusterSpec,
    plan: &ParallelPlan,
    moe_imbalance: f64,
) -> MemoryBreakdown {
    let (wb, gb, ob) = bytes_per_param(model.dtype, model.optimizer);
    let tp = plan.tp as f64;
    let counts = &tables.counts;
    let inflight = in_flight_micro_batches(plan.pp, plan.num_micro_batches) as f64;
    let act_b = model.dtype.comm_bytes() as f64;
    let h = model.hidden_size as f64;
    let tokens_per_gpu = plan.seq_per_tp_rank(model) as f64;
    let (k, expert_params, experts) = match &model.moe {
        Some(m) => (m.top_k as f64, m.expert_params(model.hidden_size) as f64 / plan.etp as f64, m.num_experts as f64),
        None => (0.0, 0.0, 0.0),
    };
    let assignments = tokens_per_gpu * k * plan.etp as f64;
    let moe_tokens = match plan.dispatch {
        DispatchMode::Token => assignments * moe_imbalance.max(1.0),
        DispatchMode::ExpertFetch => tokens_per_gpu * k,
    };
    let dense_opt_shard = if plan.distributed_optimizer { plan.dp as f64 } else { 1.0 };
    let expert_opt_shard = if plan.distributed_optimizer { plan.edp as f64 } else { 1.0 };
    let act_dense = layer_activation_bytes(model, plan, false, moe_tokens);
    let act_moe = if model.moe.is_some() { layer_activation_bytes(model, plan, true, moe_tokens) } else { 0.0 };
    let mut best = MemoryBreakdown::default();
    let stages = plan.stage_layers(model.num_layers);
    let last = stages.len() - 1;
    for (si, range) in stages.into_iter().enumerate() {
        let mut dense = tables.dense_params(&range) as f64;
        let moe_layers = tables.moe_layers(&range) as f64;
        let dense_layers = range.len() as f64 - moe_layers;
        let mut act = dense_layers * act_dense + moe_layers * act_moe;
        if si == 0 {
            dense += counts.embedding as f64;
        }
        if si == last {
            dense += counts.lm_head as f64;
            // Logits of the last stage, fp32, for the micro-batch being processed.
            act += tokens_per_gpu * model.vocab_size as f64 * 4.0 / inflight;
        }
        let dense_local = dense / tp;
        let expert_local = moe_layers * plan.slots_per_gpu as f64 * expert_params;
        let params = dense_local + expert_local;
        let weights = params * wb;
        let grads = params * gb;
        let optimizer = dense_local * ob / dense_opt_shard + expert_local * ob / expert_opt_shard;
        let activations = act * inflight;
        let buffers = if moe_layers > 0.0 {
            match plan.dispatch {
                // Send and receive buffers for dispatch; combine reuses them.
                DispatchMode::Token => 2.0 * moe_tokens * h * act_b,
                // One layer's fetched experts (weights + gradient accumulators).
                DispatchMode::ExpertFetch => experts * expert_params * (wb + gb),
            }
        } else {
            0.0
        };
        let reserved = cluster.constants.reserved_memory_gib * (1u64 << 30) as f64;
        let total = weights + grads + optimizer + activations + buffers + reserved;
        if total > best.total_bytes {
            best = MemoryBreakdown {
                weights_bytes: weights,
                grads_bytes: grads,
                optimizer_bytes: optimizer,
                activations_bytes: activations,
                comm_buffers_bytes: buffers,
                reserved_bytes: reserved,
                total_bytes: total,
                stage: si as u32,
            };
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AttentionSpec, MoeSpec};
    use crate::plan::AllToAllAlgo;

    fn model() -> ModelSpec {
        ModelSpec {
            name: "t".into(),
            num_layers: 2,
            hidden_size: 8,
            attention: AttentionSpec::Mha { num_heads: 2, num_kv_heads: 2, head_dim: 4 },
            ffn_hidden: 32,
            gated_ffn: false,
            vocab_size: 16,
            tied_embeddings: true,
            seq_len: 4,
            global_batch: 2,
            dtype: Dtype::Bf16,
            optimizer: Optimizer::Adam,
            moe: Some(MoeSpec {
                num_experts: 4,
                top_k: 2,
                expert_ffn_hidden: 16,
                gated: false,
                num_shared_experts: 0,
                shared_expert_ffn_hidden: None,
                moe_layer_frequency: 2,
                first_k_dense_layers: 1,
                capacity_factor: None,
                num_expert_groups: None,
            }),
        }
    }

    fn plan() -> ParallelPlan {
        ParallelPlan {
            tp: 1,
            pp: 1,
            dp: 2,
            ep: 2,
            etp: 1,
            edp: 1,
            slots_per_gpu: 2,
            micro_batch_size: 1,
            num_micro_batches: 1,
            recompute: Recompute::Full,
            distributed_optimizer: false,
            all_to_all: AllToAllAlgo::Flat,
            dispatch: DispatchMode::Token,
        }
    }

    #[test]
    fn mixed_precision_adam_is_18_bytes_per_param() {
        let (w, g, o) = bytes_per_param(Dtype::Bf16, Optimizer::Adam);
        assert_eq!(w + g + o, 18.0);
        let (w, g, o) = bytes_per_param(Dtype::Fp32, Optimizer::Adam);
        assert_eq!(w + g + o, 16.0);
    }

    #[test]
    fn weights_by_hand() {
        let mut cluster = crate::presets::cluster("smartmoe-a100").unwrap();
        cluster.constants.reserved_memory_gib = 0.0;
        let m = model();
        let mem = memory_per_gpu(&m, &ModelTables::new(&m), &cluster, &plan(), 1.0);
        // Layer 0 dense: attention 4*8*8 = 256 (q,k,v,o with 2 heads x 4) + norms 32 + FFN 2*8*32 = 512 -> 800.
        // Layer 1 MoE: 256 + 32 + router 8*4 = 320. Embedding (tied) 128. Dense total 1248.
        // Experts: 2 slots x (2*8*16 + 16 + 8) = 2 x 280 = 560 params on each GPU. 1808 params x 2 bytes.
        assert!((mem.weights_bytes - 1808.0 * 2.0).abs() < 1e-9, "{}", mem.weights_bytes);
        assert!((mem.grads_bytes - 1808.0 * 4.0).abs() < 1e-9);
        assert!((mem.optimizer_bytes - 1808.0 * 12.0).abs() < 1e-9);
        // Full recompute: 2 layers x 2*s*b*h = 2*4*1*8 = 64 bytes each + logits 4 tokens x 16 x 4 bytes = 256.
        assert!((mem.activations_bytes - (128.0 + 256.0)).abs() < 1e-9, "{}", mem.activations_bytes);
        // A2A buffers: 4 tokens x top-2 = 8 assignments x 8 wide x 2 bytes x 2 buffers.
        assert!((mem.comm_buffers_bytes - 256.0).abs() < 1e-9);
        let mut p = plan();
        p.distributed_optimizer = true;
        let z = memory_per_gpu(&m, &ModelTables::new(&m), &cluster, &p, 1.0);
        // Dense optimizer state halves over dp 2; expert state over edp 1 stays.
        assert!((z.optimizer_bytes - (1248.0 * 6.0 + 560.0 * 12.0)).abs() < 1e-9);
    }
}
