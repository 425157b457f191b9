//! The time of one training iteration of a plan under an expected routing load: every stage's forward and
//! backward per micro-batch (dense layers, MoE layers with their all-to-all, tensor-parallel collectives), the
//! 1F1B pipeline with its bubble, then gradient synchronisation (dp, edp, replicas) and the optimizer step.

use serde::Serialize;

use super::comm::{all_reduce_time_s, p2p_time_s, reduce_scatter_time_s, uniform_all_to_all_time_s};
use super::compute::{DeviceRates, attention_core_time_s, elementwise_time_s, ffn_time_s, gemm_time_s};
use super::fabric::Fabric;
use super::memory::{MemoryBreakdown, bytes_per_param, memory_per_gpu};
use super::moe::{MoeLayerShape, expert_fetch_time_s};
use super::pipeline::one_f_one_b_time_s;
use super::tables::ModelTables;
use crate::cluster::ClusterSpec;
use crate::model::ModelSpec;
use crate::plan::{AllToAllAlgo, DispatchMode, ParallelPlan};

/// What the routing load does to a plan's MoE layers, as the planner derived it from the expected workload and
/// the plan's seed placement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MoeLoadProfile {
    /// Busiest GPU's routed tokens over the mean, averaged over MoE layers (1 = perfect balance).
    pub imbalance: f64,
    /// Of the slots on the busiest GPU, the share that receive tokens (idle experts skip their GEMMs).
    pub active_slot_fraction: f64,
    /// Replica slots per GPU (their gradients must be all-reduced).
    pub replicas_per_gpu: f64,
}

impl MoeLoadProfile {
    /// Perfect balance with every slot used and no replicas.
    pub const BALANCED: MoeLoadProfile =
        MoeLoadProfile { imbalance: 1.0, active_slot_fraction: 1.0, replicas_per_gpu: 0.0 };
}

/// Where the time of an iteration goes, in milliseconds. Pipeline terms are per iteration on the critical path
/// (the slowest stage times `m + pp - 1` slots); the others are added after the pipeline drains.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct TimeBreakdown {
    /// Dense compute (attention, dense FFN, shared experts, router, head) on the critical path.
    pub dense_compute_ms: f64,
    /// Routed expert compute on the busiest GPU, on the critical path.
    pub expert_compute_ms: f64,
    /// All-to-all dispatch and combine on the critical path.
    pub all_to_all_ms: f64,
    /// Tensor- and expert-tensor-parallel collectives on the critical path.
    pub tp_comm_ms: f64,
    /// Pipeline send/receive of activations on the critical path.
    pub pp_p2p_ms: f64,
    /// Idle time of the pipeline bubble.
    pub pp_bubble_ms: f64,
    /// Expert-fetch traffic (Janus mode) per iteration.
    pub expert_fetch_ms: f64,
    /// Dense gradient all-reduce over dp.
    pub dp_sync_ms: f64,
    /// Expert gradient all-reduce over edp.
    pub edp_sync_ms: f64,
    /// Gradient all-reduce among replicas of hot experts.
    pub replica_sync_ms: f64,
    /// Optimizer step.
    pub optimizer_ms: f64,
}

/// Price of a plan.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IterationCost {
    /// Modelled time of one iteration.
    pub iter_ms: f64,
    /// Its terms.
    pub breakdown: TimeBreakdown,
    /// Tokens trained per second.
    pub tokens_per_s: f64,
    /// Memory of the busiest GPU.
    pub memory: MemoryBreakdown,
    /// Whether it fits in GPU memory.
    pub fits: bool,
}

/// Per micro-batch times of one layer on one GPU, split by term.
#[derive(Debug, Clone, Copy, Default)]
struct LayerTimes {
    dense_f: f64,
    dense_b: f64,
    expert_f: f64,
    expert_b: f64,
    a2a: f64,
    tp: f64,
}

impl LayerTimes {
    fn fwd_bwd(&self) -> f64 {
        self.dense_f + self.dense_b + self.expert_f + self.expert_b + self.a2a + self.tp
    }
}

/// Contiguous placement of a group of `size` GPUs with stride `stride` in rank order: GPUs of the group that
/// share a node.
fn per_node(size: u32, stride: u32, gpus_per_node: u32) -> u32 {
    if stride >= gpus_per_node { 1 } else { size.min(gpus_per_node / stride).max(1) }
}

/// Prices one iteration of `plan` for `model` on `cluster` under `load`. The plan must satisfy
/// [`ParallelPlan::check`].
pub fn price_plan(
    model: &ModelSpec,
    tables: &ModelTables,
    cluster: &ClusterSpec,
    fabric: &Fabric,
    plan: &ParallelPlan,
    load: &MoeLoadProfile,
) -> IterationCost {
    let c = &cluster.constants;
    let peak = cluster.gpu.peak_flops(model.dtype);
    let hbm = fabric.hbm_bytes_per_s;
    let dev = DeviceRates { peak_flops: peak, hbm_bytes_per_s: hbm };
    let act_b = model.dtype.comm_bytes() as f64;
    let h = model.hidden_size as f64;
    let tp = plan.tp as f64;
    let t_full = plan.micro_batch_size as f64 * model.seq_len as f64; // tokens of a micro-batch
    let t_local = t_full / tp; // tokens held by one tp rank (sequence parallel)
    let gpn = cluster.gpus_per_node;
    let launch = fabric.collective_launch_s;
    let recompute_f = match plan.recompute {
        crate::plan::Recompute::None => 0.0,
        crate::plan::Recompute::Selective => 0.0,
        crate::plan::Recompute::Full => 1.0,
    };

    // Tensor-parallel collectives: per block, an all-gather before and a reduce-scatter after (sequence
    // parallelism), i.e. one all-reduce's volume per block forward and one backward.
    let tp_link = fabric.group_link(plan.tp, plan.tp);
    let tp_block = 2.0 * reduce_scatter_time_s(t_full * h * act_b, plan.tp, tp_link, launch);

    // Attention block, common to every layer.
    let attn_gemm = gemm_time_s(t_full, model.attention.params(model.hidden_size) as f64 / tp / h, h, peak, c);
    let attn_core =
        attention_core_time_s(t_full, model.seq_len as f64, model.attention.score_width() as f64 / tp, peak, c);
    let norms = elementwise_time_s(t_local * h * act_b * 8.0, hbm);
    let selective_extra = if plan.recompute == crate::plan::Recompute::Selective { attn_core } else { 0.0 };
    let attn_f = attn_gemm + attn_core + norms;
    let attn_b = 2.0 * attn_f + selective_extra;

    // Dense layer.
    let (ffn_f, ffn_b) = ffn_time_s(t_full, h, model.ffn_hidden as f64 / tp, model.gated_ffn, act_b, dev, c);
    let dense = LayerTimes {
        dense_f: attn_f + ffn_f,
        dense_b: attn_b + ffn_b + recompute_f * (attn_f + ffn_f),
        tp: 2.0 * 2.0 * tp_block * (1.0 + recompute_f / 2.0),
        ..Default::default()
    };

    // MoE layer.
    let mut fetch_per_layer_s = 0.0;
    let mut replica_sync_per_layer_s = 0.0;
    let mut edp_bytes_per_layer = 0.0;
    let moe = model.moe.as_ref().map(|m| {
        let shape = MoeLayerShape {
            d_model: model.hidden_size,
            d_ffn: m.expert_ffn_hidden / plan.etp as u64,
            gated: m.gated,
            act_bytes: act_b as u64,
            param_bytes: bytes_per_param(model.dtype, model.optimizer).0 as u64,
            grad_bytes: 4,
            peak_flops: peak,
        };
        let k = m.top_k as f64;
        let router = gemm_time_s(t_local, m.num_experts as f64, h, peak, c);
        let shared_h = m.shared_expert_ffn_hidden.unwrap_or(m.expert_ffn_hidden) as f64 * m.num_shared_experts as f64;
        let (sh_f, sh_b) = if m.num_shared_experts > 0 {
            ffn_time_s(t_full, h, shared_h / tp, m.gated, act_b, dev, c)
        } else {
            (0.0, 0.0)
        };
        let assignments = t_local * k; // routed by one GPU per micro-batch
        let cf_cap = m.capacity_factor.map_or(f64::INFINITY, |cf| cf.max(1.0));
        let imbalance = load.imbalance.max(1.0).min(cf_cap);
        let slots = plan.slots_per_gpu.max(1) as f64;
        let active = (slots * load.active_slot_fraction.clamp(0.0, 1.0)).max(1.0);
        let (expert_f, expert_b, a2a, etp_comm) = match plan.dispatch {
            DispatchMode::Token => {
                let busiest = assignments * plan.etp as f64 * imbalance;
                let (f, b) = ffn_time_s(busiest / active, h, shape.d_ffn as f64, m.gated, act_b, dev, c);
                let over = c.per_expert_overhead_us * 1e-6 * active;
                let send = assignments * h * act_b;
                let recv = send * imbalance;
                let ep_per_node = per_node(plan.ep, plan.etp, gpn);
                let a = uniform_all_to_all_time_s(
                    send,
                    recv,
                    plan.ep,
                    ep_per_node,
                    fabric,
                    plan.all_to_all == AllToAllAlgo::Hierarchical,
                );
                let etp_link = fabric.group_link(plan.etp, plan.etp);
                let etp = 4.0
                    * reduce_scatter_time_s(
                        busiest / plan.etp as f64 * h * act_b * plan.etp as f64,
                        plan.etp,
                        etp_link,
                        launch,
                    );
                let fixed = c.moe_layer_overhead_us * 1e-6;
                (active * f + over + fixed, active * b + over + fixed, 4.0 * a, etp)
            }
            DispatchMode::ExpertFetch => {
                // Tokens stay: every GPU runs its own assignments through all the experts it needs.
                let e = m.num_experts as f64;
                let used = e.min(assignments).max(1.0) * load.active_slot_fraction.clamp(0.0, 1.0).max(1.0 / e);
                let (f, b) = ffn_time_s(assignments / used, h, m.expert_ffn_hidden as f64, m.gated, act_b, dev, c);
                let over = c.per_expert_overhead_us * 1e-6 * used;
                let fixed = c.moe_layer_overhead_us * 1e-6;
                (used * f + over + fixed, used * b + over + fixed, 0.0, 0.0)
            }
        };
        // Per-iteration terms of one MoE layer.
        let ep_gpus = plan.ep * plan.etp;
        let node_span_gpus = gpn.min(ep_gpus);
        let local_experts = plan.slots_per_gpu as f64;
        let node_experts = (local_experts * (node_span_gpus / plan.etp.max(1)).max(1) as f64).min(m.num_experts as f64);
        if plan.dispatch == DispatchMode::ExpertFetch {
            fetch_per_layer_s = expert_fetch_time_s(
                &MoeLayerShape { d_ffn: m.expert_ffn_hidden, ..shape.clone() },
                m.num_experts as f64 - node_experts,
                (m.num_experts as f64 - local_experts).max(0.0),
                fabric,
            );
        }
        let expert_grad_bytes = shape.expert_params() * 4.0;
        if load.replicas_per_gpu > 0.0 {
            let link = fabric.group_link(plan.ep, per_node(plan.ep, plan.etp, gpn));
            replica_sync_per_layer_s = load.replicas_per_gpu * all_reduce_time_s(expert_grad_bytes, 2, link, launch);
        }
        edp_bytes_per_layer = plan.slots_per_gpu as f64 * expert_grad_bytes;
        LayerTimes {
            dense_f: attn_f + router + sh_f,
            dense_b: attn_b + 2.0 * router + sh_b + recompute_f * (attn_f + router + sh_f),
            expert_f,
            expert_b: expert_b + recompute_f * expert_f,
            a2a: a2a * (1.0 + recompute_f / 2.0),
            tp: 2.0 * 2.0 * tp_block * (1.0 + recompute_f / 2.0) + etp_comm,
        }
    });

    // Stages: count layer kinds, add the embedding and head; find the slowest.
    let stages = plan.stage_layers(model.num_layers);
    let last = stages.len() - 1;
    let head_f = gemm_time_s(t_full, model.vocab_size as f64 / tp, h, peak, c);
    let head = LayerTimes { dense_f: head_f, dense_b: 2.0 * head_f, tp: 2.0 * tp_block, ..Default::default() };
    let mut slowest = (LayerTimes::default(), 0.0f64);
    for (si, r) in stages.iter().enumerate() {
        let n_moe = tables.moe_layers(r) as f64;
        let n_dense = r.len() as f64 - n_moe;
        let mut s = LayerTimes::default();
        let mut add = |lt: &LayerTimes, n: f64| {
            s.dense_f += lt.dense_f * n;
            s.dense_b += lt.dense_b * n;
            s.expert_f += lt.expert_f * n;
            s.expert_b += lt.expert_b * n;
            s.a2a += lt.a2a * n;
            s.tp += lt.tp * n;
        };
        add(&dense, n_dense);
        if let Some(mt) = &moe {
            add(mt, n_moe);
        }
        if si == last {
            add(&head, 1.0);
        }
        let total = s.fwd_bwd();
        if total > slowest.1 {
            slowest = (s, total);
        }
    }
    let (st, stage_s) = slowest;
    let max_moe_layers = stages.iter().map(|r| tables.moe_layers(r)).max().unwrap_or(0) as f64;

    // Pipeline.
    // Neighbouring stages are tp*dp ranks apart: on different nodes once a stage fills a node.
    let pp_link = if plan.tp * plan.dp >= gpn { fabric.group_link(2, 1) } else { fabric.group_link(2, 2) };
    let p2p = if plan.pp > 1 { p2p_time_s(t_local * h * act_b, pp_link) } else { 0.0 };
    let m = plan.num_micro_batches as f64;
    let pipe_s = one_f_one_b_time_s(stage_s, 0.0, p2p, plan.pp, plan.num_micro_batches);
    let bubble_s = pipe_s - m * (stage_s + if plan.pp > 1 { 2.0 * p2p } else { 0.0 });

    // Gradient synchronisation after the pipeline drains (the busiest stage's share).
    let counts = &tables.counts;
    let dense_params_stage = stages
        .iter()
        .enumerate()
        .map(|(si, r)| {
            let mut d = tables.dense_params(r) as f64;
            if si == 0 {
                d += counts.embedding as f64;
            }
            if si == last {
                d += counts.lm_head as f64;
            }
            d
        })
        .fold(0.0, f64::max)
        / tp;
    let dp_link = fabric.group_link(plan.dp, per_node(plan.dp, plan.tp, gpn));
    let (wb, _, _) = bytes_per_param(model.dtype, model.optimizer);
    let dp_sync_s = if plan.distributed_optimizer {
        reduce_scatter_time_s(dense_params_stage * 4.0, plan.dp, dp_link, launch)
            + reduce_scatter_time_s(dense_params_stage * wb, plan.dp, dp_link, launch)
    } else {
        all_reduce_time_s(dense_params_stage * 4.0, plan.dp, dp_link, launch)
    };
    let edp_link = fabric.group_link(plan.edp, per_node(plan.edp, plan.etp * plan.ep, gpn));
    let edp_bytes = edp_bytes_per_layer * max_moe_layers;
    let edp_sync_s = if plan.distributed_optimizer {
        reduce_scatter_time_s(edp_bytes, plan.edp, edp_link, launch)
            + reduce_scatter_time_s(edp_bytes / 4.0 * wb, plan.edp, edp_link, launch)
    } else {
        all_reduce_time_s(edp_bytes, plan.edp, edp_link, launch)
    };
    let replica_sync_s = replica_sync_per_layer_s * max_moe_layers;
    let fetch_s = fetch_per_layer_s * max_moe_layers;
    // Optimizer: read and write weights, master weights and moments, read gradients: ~ 2*(w + 12) + 4 bytes.
    let local_params = dense_params_stage + edp_bytes / 4.0;
    let shard = if plan.distributed_optimizer { plan.dp as f64 } else { 1.0 };
    let optimizer_s = elementwise_time_s(local_params / shard * (2.0 * (wb + 12.0) + 4.0), hbm);

    let iter_s = pipe_s + dp_sync_s + edp_sync_s + replica_sync_s + fetch_s + optimizer_s;
    let per_mb = |x: f64| x * m * 1e3;
    let breakdown = TimeBreakdown {
        dense_compute_ms: per_mb(st.dense_f + st.dense_b),
        expert_compute_ms: per_mb(st.expert_f + st.expert_b),
        all_to_all_ms: per_mb(st.a2a),
        tp_comm_ms: per_mb(st.tp),
        pp_p2p_ms: per_mb(if plan.pp > 1 { 2.0 * p2p } else { 0.0 }),
        pp_bubble_ms: bubble_s * 1e3,
        expert_fetch_ms: fetch_s * 1e3,
        dp_sync_ms: dp_sync_s * 1e3,
        edp_sync_ms: edp_sync_s * 1e3,
        replica_sync_ms: replica_sync_s * 1e3,
        optimizer_ms: optimizer_s * 1e3,
    };
    let memory = memory_per_gpu(model, tables, cluster, plan, load.imbalance);
    let fits = memory.total_bytes <= cluster.gpu.memory_gib * (1u64 << 30) as f64;
    IterationCost {
        iter_ms: iter_s * 1e3,
        breakdown,
        tokens_per_s: model.tokens_per_iteration() as f64 / iter_s,
        memory,
        fits,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets;

    fn setup() -> (ModelSpec, ClusterSpec, Fabric, ModelTables) {
        let m = presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let c = presets::cluster("smartmoe-a100").unwrap();
        let f = Fabric::from_cluster(&c);
        let t = ModelTables::new(&m);
        (m, c, f, t)
    }

    fn plan() -> ParallelPlan {
        crate::plan::test_plan()
    }

    fn sum(b: &TimeBreakdown) -> f64 {
        b.dense_compute_ms
            + b.expert_compute_ms
            + b.all_to_all_ms
            + b.tp_comm_ms
            + b.pp_p2p_ms
            + b.pp_bubble_ms
            + b.expert_fetch_ms
            + b.dp_sync_ms
            + b.edp_sync_ms
            + b.replica_sync_ms
            + b.optimizer_ms
    }

    #[test]
    fn breakdown_adds_up_to_the_iteration() {
        let (m, c, f, t) = setup();
        for p in [plan(), ParallelPlan { pp: 1, dp: 16, edp: 2, num_micro_batches: 4, ..plan() }] {
            p.check(&m, &c).unwrap();
            let r = price_plan(&m, &t, &c, &f, &p, &MoeLoadProfile::BALANCED);
            assert!((sum(&r.breakdown) - r.iter_ms).abs() < 1e-6 * r.iter_ms, "{} vs {}", sum(&r.breakdown), r.iter_ms);
            assert!((r.tokens_per_s - 256.0 * 1024.0 / (r.iter_ms / 1e3)).abs() < 1e-6 * r.tokens_per_s);
        }
    }

    #[test]
    fn bubble_is_the_1f1b_share() {
        let (m, c, f, t) = setup();
        let r = price_plan(&m, &t, &c, &f, &plan(), &MoeLoadProfile::BALANCED);
        let b = &r.breakdown;
        let pipeline = sum(b) - b.dp_sync_ms - b.edp_sync_ms - b.replica_sync_ms - b.optimizer_ms - b.expert_fetch_ms;
        // (pp - 1) / (m + pp - 1) = 1/9 of the pipeline.
        assert!((b.pp_bubble_ms / pipeline - 1.0 / 9.0).abs() < 1e-9);
    }

    #[test]
    fn imbalance_slows_experts_and_all_to_all_only() {
        let (m, c, f, t) = setup();
        let a = price_plan(&m, &t, &c, &f, &plan(), &MoeLoadProfile::BALANCED);
        let skew = MoeLoadProfile { imbalance: 3.0, ..MoeLoadProfile::BALANCED };
        let b = price_plan(&m, &t, &c, &f, &plan(), &skew);
        assert!(b.breakdown.expert_compute_ms > 2.5 * a.breakdown.expert_compute_ms);
        assert!(b.breakdown.all_to_all_ms > a.breakdown.all_to_all_ms);
        assert_eq!(a.breakdown.dense_compute_ms, b.breakdown.dense_compute_ms);
        assert_eq!(a.breakdown.dp_sync_ms, b.breakdown.dp_sync_ms);
    }

    #[test]
    fn expert_compute_matches_the_ffn_flops_when_ideal() {
        // With an ideal GEMM (no efficiency loss, no launches), the expert compute of one iteration is the
        // FLOPs of the busiest GPU's routed tokens over the peak: 3 passes x 2 x tokens x (2 d h) per token.
        let (m, mut c, _, t) = setup();
        c.constants = crate::ModelConstants {
            gemm_max_efficiency: 1.0,
            gemm_half_efficiency_rows: 0.0,
            kernel_launch_us: 0.0,
            per_expert_overhead_us: 0.0,
            moe_layer_overhead_us: 0.0,
            hbm_efficiency: 1.0,
            ..Default::default()
        };
        c.gpu.hbm_gbyte_s = 1e12; // activations free
        let f = Fabric::from_cluster(&c);
        let p = ParallelPlan { pp: 1, dp: 16, ep: 16, slots_per_gpu: 2, num_micro_batches: 4, ..plan() };
        let r = price_plan(&m, &t, &c, &f, &p, &MoeLoadProfile::BALANCED);
        let tokens_per_gpu = 4.0 * 1024.0 * 2.0 * 4.0; // mbs x seq x top-2 x micro-batches
        let flops = 3.0 * 2.0 * tokens_per_gpu * 2.0 * 2048.0 * 4096.0 * 8.0; // 8 MoE layers
        let expect_ms = flops / 312e12 * 1e3;
        assert!(
            (r.breakdown.expert_compute_ms - expect_ms).abs() < 1e-3 * expect_ms,
            "{} vs {expect_ms}",
            r.breakdown.expert_compute_ms
        );
    }
}
