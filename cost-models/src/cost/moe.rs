//! One MoE layer under a measured load matrix and a placement: compute as the maximum over GPUs, all-to-all
//! dispatch and combine from the source-rank x expert matrix, and gradient synchronisation of replicas.
//! Also the expert-fetch (Janus, data-centric) alternative.

use serde::Serialize;

use super::comm::all_to_all_time_s;
use super::compute::{DeviceRates, elementwise_time_s, ffn_time_s};
use super::fabric::Fabric;
use crate::cluster::ModelConstants;
use crate::placement::Placement;
use crate::workload::LoadMatrix;

/// Sizes of one MoE layer's experts and the hardware numbers its terms need.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeLayerShape {
    /// Model width.
    pub d_model: u64,
    /// Expert FFN hidden width.
    pub d_ffn: u64,
    /// SwiGLU experts.
    pub gated: bool,
    /// Bytes of one activation element on the wire and in memory.
    pub act_bytes: u64,
    /// Bytes of one expert weight element (for replica gradient reduction and expert fetch).
    pub param_bytes: u64,
    /// Bytes of one expert gradient element as reduced.
    pub grad_bytes: u64,
    /// GPU peak FLOP/s for the training dtype.
    pub peak_flops: f64,
}

impl MoeLayerShape {
    /// Weights of one expert (no biases counted for gated experts; Linear biases for the GELU form).
    pub fn expert_params(&self) -> f64 {
        let mats = if self.gated { 3.0 } else { 2.0 };
        let bias = if self.gated { 0.0 } else { (self.d_ffn + self.d_model) as f64 };
        mats * self.d_model as f64 * self.d_ffn as f64 + bias
    }
}

/// The modelled time of one MoE layer (forward + backward), with the terms that make it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MoeLayerTime {
    /// Expert compute of the busiest GPU, forward + backward.
    pub compute_ms: f64,
    /// Dispatch + combine all-to-all, forward and backward (4 exchanges).
    pub all_to_all_ms: f64,
    /// Gradient all-reduce among the replicas of replicated experts (the slowest GPU's share).
    pub replica_sync_ms: f64,
    /// Fixed per-pass cost of the layer (gate, count exchange, launches), forward + backward.
    pub overhead_ms: f64,
    /// Sum of the terms.
    pub total_ms: f64,
    /// Index (within the group) of the busiest GPU.
    pub busiest_gpu: usize,
    /// Tokens each GPU's slots process.
    pub gpu_tokens: Vec<f64>,
    /// Compute time of each GPU (forward + backward), ms.
    pub gpu_compute_ms: Vec<f64>,
    /// Busiest GPU's tokens over the mean.
    pub imbalance: f64,
}

/// Tokens from source rank `s` to each GPU when every expert's tokens are split over its replicas (evenly, or by
/// the placement's shares).
pub fn traffic_tokens(load: &LoadMatrix, placement: &Placement) -> Vec<Vec<f64>> {
    let cnt = placement.replica_counts();
    let mut t = vec![vec![0.0; placement.gpus]; load.ranks];
    for (slot, &e) in placement.slots.iter().enumerate() {
        let g = placement.gpu_of_slot(slot);
        let share = placement.share(slot, &cnt);
        for (s, row) in t.iter_mut().enumerate() {
            row[g] += load.get(s, e as usize) as f64 * share;
        }
    }
    t
}

/// Models one MoE layer, forward and backward, for the load of one iteration (or micro-batch) `load` (rows:
/// source GPUs of the expert-parallel group, which are also the placement's GPUs), the placement, and where the
/// group's GPUs sit (`gpus[i]` is the global index of group GPU `i`). Errors when the shapes disagree.
pub fn moe_layer_exact(
    shape: &MoeLayerShape,
    load: &LoadMatrix,
    placement: &Placement,
    gpus: &[u32],
    fabric: &Fabric,
    c: &ModelConstants,
    hierarchical: bool,
) -> Result<MoeLayerTime, String> {
    if load.ranks != placement.gpus || gpus.len() != placement.gpus {
        return Err(format!(
            "the load matrix has {} source ranks, the placement {} GPUs and the group {} GPUs; they must agree",
            load.ranks,
            placement.gpus,
            gpus.len()
        ));
    }
    if load.experts != placement.experts {
        return Err(format!("the load matrix has {} experts, the placement {}", load.experts, placement.experts));
    }
    let d = shape.d_model as f64;
    let loads: Vec<f64> = load.expert_loads().into_iter().map(|x| x as f64).collect();
    let cnt = placement.replica_counts();
    // Compute per GPU: each slot runs its share of its expert's tokens.
    let mut gpu_time = vec![0.0; placement.gpus];
    let mut gpu_tokens = vec![0.0; placement.gpus];
    for (slot, &e) in placement.slots.iter().enumerate() {
        let g = placement.gpu_of_slot(slot);
        let tokens = loads[e as usize] * placement.share(slot, &cnt);
        if tokens <= 0.0 {
            continue;
        }
        let (f, b) = ffn_time_s(
            tokens,
            d,
            shape.d_ffn as f64,
            shape.gated,
            shape.act_bytes as f64,
            DeviceRates { peak_flops: shape.peak_flops, hbm_bytes_per_s: fabric.hbm_bytes_per_s },
            c,
        );
        gpu_time[g] += f + b + 2.0 * c.per_expert_overhead_us * 1e-6;
        gpu_tokens[g] += tokens;
    }
    // Local permutation on each source GPU: gather its tokens into per-expert buffers and scatter the results
    // back (read + write, dispatch + combine, forward + backward), memory-bound.
    for (s, t) in gpu_time.iter_mut().enumerate().take(load.ranks) {
        let own: f64 = load.row(s).iter().map(|&x| x as f64).sum();
        *t += elementwise_time_s(own * d * shape.act_bytes as f64 * 8.0, fabric.hbm_bytes_per_s);
    }
    let (busiest_gpu, compute_s) =
        gpu_time.iter().copied().enumerate().fold((0, 0.0), |acc, (i, t)| if t > acc.1 { (i, t) } else { acc });
    // Dispatch bytes s -> g and the combine's reverse; backward repeats both.
    let tokens = traffic_tokens(load, placement);
    let bytes: Vec<Vec<f64>> =
        tokens.iter().map(|r| r.iter().map(|t| t * d * shape.act_bytes as f64).collect()).collect();
    let transposed: Vec<Vec<f64>> =
        (0..placement.gpus).map(|g| (0..load.ranks).map(|s| bytes[s][g]).collect()).collect();
    let dispatch = all_to_all_time_s(&bytes, gpus, fabric, hierarchical);
    let combine = all_to_all_time_s(&transposed, gpus, fabric, hierarchical);
    let a2a_s = 2.0 * (dispatch + combine);
    // Replica gradient sync: one ring all-reduce per replicated expert, all running together. Each holder
    // sends 2 (r-1)/r of the gradient over its link; a ring that spans k nodes crosses each of them once in and
    // once out, so each spanned node's NICs carry 2 (r-1)/r of the gradient per such expert.
    let grad_bytes = shape.expert_params() * shape.grad_bytes as f64;
    let slots = placement.expert_slots();
    let mut replica_sets: Vec<Vec<u32>> = Vec::new();
    for (e, s) in slots.iter().enumerate() {
        if cnt[e] > 1 {
            let mut members: Vec<u32> = s.iter().map(|&x| gpus[placement.gpu_of_slot(x)]).collect();
            members.sort_unstable();
            members.dedup();
            replica_sets.push(members);
        }
    }
    let sync_s = replica_sync_time_s(&replica_sets, grad_bytes, fabric);
    let overhead_s = 2.0 * c.moe_layer_overhead_us * 1e-6;
    let mean = gpu_tokens.iter().sum::<f64>() / gpu_tokens.len().max(1) as f64;
    let imbalance = if mean > 0.0 { gpu_tokens.iter().copied().fold(0.0, f64::max) / mean } else { 1.0 };
    Ok(MoeLayerTime {
        compute_ms: compute_s * 1e3,
        all_to_all_ms: a2a_s * 1e3,
        replica_sync_ms: sync_s * 1e3,
        overhead_ms: overhead_s * 1e3,
        total_ms: (compute_s + a2a_s + sync_s + overhead_s) * 1e3,
        busiest_gpu,
        gpu_tokens,
        gpu_compute_ms: gpu_time.iter().map(|t| t * 1e3).collect(),
        imbalance,
    })
}

/// Time of the concurrent ring all-reduces that synchronise replicated experts: `sets[i]` are the GPUs (global
/// indices) holding expert i's replicas, each reducing `bytes` of gradient. The busiest GPU link and the busiest
/// node's NICs bound it; the ring's latency adds once per step of the longest ring.
pub fn replica_sync_time_s(sets: &[Vec<u32>], bytes: f64, fabric: &Fabric) -> f64 {
    if sets.is_empty() || bytes <= 0.0 {
        return 0.0;
    }
    let mut gpu_bytes: std::collections::HashMap<u32, f64> = std::collections::HashMap::new();
    let mut node_bytes: std::collections::HashMap<u32, f64> = std::collections::HashMap::new();
    let mut node_gpus: std::collections::HashMap<u32, std::collections::BTreeSet<u32>> =
        std::collections::HashMap::new();
    let mut longest = 0usize;
    let mut crosses = false;
    for set in sets {
        let r = set.len();
        if r < 2 {
            continue;
        }
        longest = longest.max(r);
        let share = 2.0 * (r as f64 - 1.0) / r as f64 * bytes;
        for &g in set {
            *gpu_bytes.entry(g).or_default() += share;
            node_gpus.entry(fabric.node_of(g)).or_default().insert(g);
        }
        let mut nodes: Vec<u32> = set.iter().map(|&g| fabric.node_of(g)).collect();
        nodes.sort_unstable();
        nodes.dedup();
        if nodes.len() > 1 {
            crosses = true;
            for n in nodes {
                *node_bytes.entry(n).or_default() += share;
            }
        }
    }
    if longest < 2 {
        return 0.0;
    }
    let intra = gpu_bytes
        .iter()
        .map(|(g, b)| {
            let m = node_gpus.get(&fabric.node_of(*g)).map_or(1, |s| s.len() as u32);
            b / fabric.intra_link(m).per_gpu_bytes_per_s
        })
        .fold(0.0, f64::max);
    let inter = node_bytes
        .iter()
        .map(|(n, b)| {
            let m = node_gpus.get(n).map_or(1, |s| s.len() as u32);
            b / fabric.node_inter_bytes_per_s(m)
        })
        .fold(0.0, f64::max);
    let lat = if crosses { fabric.inter_latency_s } else { fabric.intra_latency_s };
    intra.max(inter) + 2.0 * (longest as f64 - 1.0) * lat + fabric.collective_launch_s
}

/// Expert-fetch (Janus) time of one MoE layer per iteration: every node fetches the weights of the experts it
/// does not hold once (over its NICs) and shares them among its GPUs (over the intra-node fabric); backward
/// pushes the gradients back the same way. `remote_experts_per_node` and `remote_experts_per_gpu` count experts
/// held elsewhere.
pub fn expert_fetch_time_s(
    shape: &MoeLayerShape,
    remote_experts_per_node: f64,
    remote_experts_per_gpu: f64,
    fabric: &Fabric,
) -> f64 {
    let w = shape.expert_params();
    let inter = remote_experts_per_node * w * (shape.param_bytes + shape.grad_bytes) as f64
        / fabric.node_inter_bytes_per_s(fabric.gpus_per_node);
    let intra_link = fabric.intra_link(fabric.gpus_per_node).per_gpu_bytes_per_s;
    let intra = remote_experts_per_gpu * w * (shape.param_bytes + shape.grad_bytes) as f64 / intra_link;
    if remote_experts_per_gpu <= 0.0 {
        return 0.0;
    }
    inter + intra + 2.0 * fabric.collective_launch_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fabric() -> Fabric {
        Fabric::switched(2, 2, 1e3, 0.0, 1e2, 0.0, 1e30, 0.0)
    }

    fn exact_consts() -> ModelConstants {
        ModelConstants {
            gemm_max_efficiency: 1.0,
            gemm_half_efficiency_rows: 0.0,
            kernel_launch_us: 0.0,
            per_expert_overhead_us: 0.0,
            moe_layer_overhead_us: 0.0,
            ..Default::default()
        }
    }

    fn shape() -> MoeLayerShape {
        MoeLayerShape {
            d_model: 2,
            d_ffn: 4,
            gated: false,
            act_bytes: 2,
            param_bytes: 2,
            grad_bytes: 4,
            peak_flops: 1.0,
        }
    }

    #[test]
    fn busiest_gpu_sets_compute_by_hand() {
        // 2 GPUs x 1 slot, experts 0 (GPU0) and 1 (GPU1). Rank 0 sends 3 tokens to e0 and 1 to e1; rank 1 sends
        // 1 to e0 and 1 to e1. GPU0 processes 4 tokens, GPU1 2 tokens.
        let load = LoadMatrix::from_rows(&[vec![3, 1], vec![1, 1]]).unwrap();
        let p = Placement::new(2, 1, 2, vec![0, 1]).unwrap();
        let t = moe_layer_exact(&shape(), &load, &p, &[0, 1], &fabric(), &exact_consts(), false).unwrap();
        // FFN FLOPs per token: fwd 2*(2*4*2) = 32, bwd 64 -> 96 per token at 1 FLOP/s.
        assert_eq!(t.busiest_gpu, 0);
        assert!((t.compute_ms - 4.0 * 96.0 * 1e3).abs() < 1e-6, "{}", t.compute_ms);
        // Dispatch: rank0 -> GPU1 1 token, rank1 -> GPU0 1 token: 1 token * 2 elems * 2 bytes = 4 bytes / 1e3.
        // Combine the same; x2 for backward: 4 exchanges of 4e-3 s.
        assert!((t.all_to_all_ms - 16e-3 * 1e3).abs() < 1e-9, "{}", t.all_to_all_ms);
        assert_eq!(t.replica_sync_ms, 0.0);
        assert!((t.imbalance - 4.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn replicas_split_tokens_and_pay_sync() {
        // Expert 0 replicated on both GPUs; e1 on GPU1 only. 2 GPUs x 2 slots: [0, 0'] hmm: [e0, e1] [e0, e1]
        let load = LoadMatrix::from_rows(&[vec![4, 0], vec![4, 2]]).unwrap();
        let p = Placement::new(2, 2, 2, vec![0, 1, 0, 1]).unwrap();
        let t = moe_layer_exact(&shape(), &load, &p, &[0, 1], &fabric(), &exact_consts(), false).unwrap();
        assert_eq!(t.gpu_tokens, vec![5.0, 5.0]);
        // Two replicated experts, each all-reduced over the 2 GPUs of one node: expert params 2*2*4 + 6 = 22,
        // x4 bytes = 88; each ring sends 2*(1/2)*88 = 88 bytes per GPU: 176 bytes per GPU at 1e3 B/s.
        assert!((t.replica_sync_ms - 176.0).abs() < 1e-6, "{}", t.replica_sync_ms);
        // On GPUs of two nodes, each node's NIC (1e2 B/s) carries 176 bytes too: 1.76 s.
        let t2 = moe_layer_exact(&shape(), &load, &p, &[0, 2], &fabric(), &exact_consts(), false).unwrap();
        assert!((t2.replica_sync_ms - 1760.0).abs() < 1e-6, "{}", t2.replica_sync_ms);
    }

    #[test]
    fn shape_mismatch_is_an_error() {
        let load = LoadMatrix::from_rows(&[vec![1, 1]]).unwrap();
        let p = Placement::new(2, 1, 2, vec![0, 1]).unwrap();
        assert!(moe_layer_exact(&shape(), &load, &p, &[0, 1], &fabric(), &exact_consts(), false).is_err());
    }

    #[test]
    fn expert_fetch_by_hand() {
        // 3 remote experts per node and per GPU, 22 params * (2 + 4) bytes = 132 bytes each.
        let t = expert_fetch_time_s(&shape(), 3.0, 3.0, &fabric());
        assert!((t - (396.0 / 1e2 + 396.0 / 1e3)).abs() < 1e-12, "{t}");
    }

    #[test]
    fn fixed_overhead_and_permutation_by_hand() {
        // One GPU, one expert, 10 tokens: compute 10 x 96 FLOPs at 1 FLOP/s; activations 10 x 4 x 2 elements x
        // 2 bytes = 160 B forward and 240 B backward; permutation 10 tokens x 2 elements x 2 bytes x 8 = 320 B;
        // memory at 1e3 B/s; fixed overhead 2 x 50 us.
        let load = LoadMatrix::from_rows(&[vec![10]]).unwrap();
        let p = Placement::new(1, 1, 1, vec![0]).unwrap();
        let f = Fabric::switched(1, 1, 1e3, 0.0, 0.0, 0.0, 1e3, 0.0);
        let c = ModelConstants { moe_layer_overhead_us: 50.0, ..exact_consts() };
        let t = moe_layer_exact(&shape(), &load, &p, &[0], &f, &c, false).unwrap();
        let expect_s = 960.0 + 0.4 + 0.32;
        assert!((t.compute_ms - expect_s * 1e3).abs() < 1e-6, "{}", t.compute_ms);
        assert!((t.overhead_ms - 0.1).abs() < 1e-12);
        assert!((t.total_ms - (t.compute_ms + 0.1)).abs() < 1e-9);
    }
}
