//! The plan space: every valid (tp, pp, dp, ep, etp, edp, slots, micro-batch, recomputation, optimizer
//! sharding, dispatch) for a model on a cluster.

use serde::{Deserialize, Serialize};
use switchyard_cost::{AllToAllAlgo, ClusterSpec, DispatchMode, ModelSpec, ParallelPlan, Recompute};

/// Limits of the enumeration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpaceOptions {
    /// Spare (replica) slots per GPU to consider beyond the experts' even share: 0..=max_spare_slots.
    pub max_spare_slots: u32,
    /// Largest micro-batch size (sequences) to consider.
    pub max_micro_batch_size: u32,
    /// Also consider expert tensor parallelism (etp = tp).
    pub expert_tp: bool,
    /// Also consider expert fetch (Janus, data-centric) for MoE layers.
    pub expert_fetch: bool,
}

impl Default for SpaceOptions {
    fn default() -> Self {
        SpaceOptions { max_spare_slots: 3, max_micro_batch_size: 16, expert_tp: true, expert_fetch: true }
    }
}

fn divisors(n: u64) -> Vec<u64> {
    let mut d: Vec<u64> = (1..=n.isqrt()).filter(|i| n.is_multiple_of(*i)).flat_map(|i| [i, n / i]).collect();
    d.sort_unstable();
    d.dedup();
    d
}

/// Calls `f` for every valid plan (each satisfies [`ParallelPlan::check`]). Returns how many there were.
pub fn for_each_plan(
    model: &ModelSpec,
    cluster: &ClusterSpec,
    opts: &SpaceOptions,
    mut f: impl FnMut(ParallelPlan),
) -> u64 {
    let n = cluster.num_gpus() as u64;
    let gpn = cluster.gpus_per_node as u64;
    let heads = model.attention.num_heads() as u64;
    let mut count = 0;
    for tp in divisors(gpn) {
        if !heads.is_multiple_of(tp) || !n.is_multiple_of(tp) {
            continue;
        }
        for pp in divisors(n / tp) {
            if pp > model.num_layers as u64 {
                continue;
            }
            let dp = n / (tp * pp);
            if !model.global_batch.is_multiple_of(dp) {
                continue;
            }
            let per_dp = model.global_batch / dp;
            for mbs in divisors(per_dp) {
                if mbs > opts.max_micro_batch_size as u64 || mbs * model.seq_len < tp {
                    continue;
                }
                let m = per_dp / mbs;
                for moe in moe_layouts(model, tp, dp, gpn, opts) {
                    for recompute in [Recompute::None, Recompute::Selective, Recompute::Full] {
                        for zero in [false, true] {
                            if zero && dp == 1 && moe.edp == 1 {
                                continue;
                            }
                            let plan = ParallelPlan {
                                tp: tp as u32,
                                pp: pp as u32,
                                dp: dp as u32,
                                ep: moe.ep,
                                etp: moe.etp,
                                edp: moe.edp,
                                slots_per_gpu: moe.slots,
                                micro_batch_size: mbs as u32,
                                num_micro_batches: m as u32,
                                recompute,
                                distributed_optimizer: zero,
                                all_to_all: moe.a2a,
                                dispatch: moe.dispatch,
                            };
                            debug_assert!(plan.check(model, cluster).is_ok(), "{:?}", plan.check(model, cluster));
                            count += 1;
                            f(plan);
                        }
                    }
                }
            }
        }
    }
    count
}

#[derive(Clone, Copy)]
struct MoeLayout {
    ep: u32,
    etp: u32,
    edp: u32,
    slots: u32,
    a2a: AllToAllAlgo,
    dispatch: DispatchMode,
}

fn moe_layouts(model: &ModelSpec, tp: u64, dp: u64, gpn: u64, opts: &SpaceOptions) -> Vec<MoeLayout> {
    let stage_gpus = tp * dp;
    let Some(m) = &model.moe else {
        return vec![MoeLayout {
            ep: 1,
            etp: 1,
            edp: stage_gpus as u32,
            slots: 0,
            a2a: AllToAllAlgo::Flat,
            dispatch: DispatchMode::Token,
        }];
    };
    let e = m.num_experts as u64;
    let mut etps = vec![1];
    if opts.expert_tp && tp > 1 && m.expert_ffn_hidden % tp == 0 {
        etps.push(tp);
    }
    let mut out = Vec::new();
    for etp in etps {
        for ep in divisors(e) {
            if !stage_gpus.is_multiple_of(ep * etp) {
                continue;
            }
            let edp = stage_gpus / (ep * etp);
            let base = e / ep;
            let spare = if ep > 1 { opts.max_spare_slots as u64 } else { 0 };
            let spans_nodes = ep * etp > gpn;
            for slots in base..=base + spare {
                let mut push = |a2a, dispatch| {
                    out.push(MoeLayout {
                        ep: ep as u32,
                        etp: etp as u32,
                        edp: edp as u32,
                        slots: slots as u32,
                        a2a,
                        dispatch,
                    })
                };
                push(AllToAllAlgo::Flat, DispatchMode::Token);
                if spans_nodes {
                    push(AllToAllAlgo::Hierarchical, DispatchMode::Token);
                }
                if opts.expert_fetch && ep > 1 && slots == base && etp == 1 {
                    push(AllToAllAlgo::Flat, DispatchMode::ExpertFetch);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cost::presets;

    #[test]
    fn divisors_by_hand() {
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(1), vec![1]);
        assert_eq!(divisors(61), vec![1, 61]);
    }

    #[test]
    fn every_enumerated_plan_is_valid_and_distinct() {
        let model = presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let cluster = presets::cluster("smartmoe-a100").unwrap();
        let mut seen = std::collections::HashSet::new();
        let n = for_each_plan(&model, &cluster, &SpaceOptions::default(), |p| {
            p.check(&model, &cluster).unwrap();
            assert!(seen.insert(p));
        });
        assert_eq!(n as usize, seen.len());
        assert!(n > 100, "{n}");
        // Spot-check: the SmartMoE layout (pure data + expert parallelism over 16 GPUs, 2 experts per GPU).
        assert!(seen.iter().any(|p| p.tp == 1 && p.pp == 1 && p.dp == 16 && p.ep == 16 && p.slots_per_gpu == 2));
    }
}
