//! The pool of the best plan: its slot configuration (fixed memory) and the seed placements the online stage
//! starts from and may switch among. Plans in a pool differ only in expert placement, so a switch is a
//! parameter exchange only.

use serde::Serialize;
use switchyard_cost::{ModelSpec, ParallelPlan, Placement, PlacementError, Workload};

use crate::placement::switchyard::{SwitchyardOptions, switchyard_placement};

/// The slot configuration shared by every placement of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotConfig {
    /// GPUs of one expert-parallel group.
    pub ep: u32,
    /// Slots on each GPU per MoE layer.
    pub slots_per_gpu: u32,
    /// Logical experts per MoE layer.
    pub experts: u32,
    /// Each slot holds 1/etp of an expert.
    pub etp: u32,
}

/// One seed placement of a pool.
#[derive(Debug, Clone, Serialize)]
pub struct PoolPlacement {
    /// How it was made: `static` (contiguous) or `balanced` (Switchyard's placement with token shares for the
    /// expected load of `layer`).
    pub name: String,
    /// The MoE layer whose expected load it balances (None: any layer).
    pub layer: Option<usize>,
    /// Busiest GPU's load over the mean under the expected load of that layer.
    pub expected_imbalance: f64,
    /// The placement.
    pub placement: Placement,
}

/// A pool.
#[derive(Debug, Clone, Serialize)]
pub struct Pool {
    /// The plan whose slot configuration the pool shares.
    pub plan: ParallelPlan,
    /// Slot configuration.
    pub slots: SlotConfig,
    /// Seed placements.
    pub placements: Vec<PoolPlacement>,
}

/// Builds the pool of `plan` for the expected `workload`: the static placement and one balanced placement per
/// distinct expected layer load. None for a dense model.
pub fn build_pool(model: &ModelSpec, plan: &ParallelPlan, workload: &Workload) -> Result<Option<Pool>, PlacementError> {
    let Some(m) = &model.moe else { return Ok(None) };
    let (ep, s, e) = (plan.ep as usize, plan.slots_per_gpu as usize, m.num_experts as usize);
    let mut placements = Vec::new();
    let stat = Placement::contiguous(ep, s, e)?;
    let f0 = workload.expert_fractions(0, e);
    placements.push(PoolPlacement {
        name: "static".into(),
        layer: None,
        expected_imbalance: stat.imbalance(&f0),
        placement: stat,
    });
    let layers = workload.num_distinct_layers().min(model.num_moe_layers() as usize).max(1);
    for l in 0..layers {
        let f = workload.expert_fractions(l, e);
        let opts = SwitchyardOptions { gpus_per_node: ep, ..Default::default() };
        let p = switchyard_placement(&f, None, None, ep, s, &opts)?;
        let layer = if layers > 1 { Some(l) } else { None };
        placements.push(PoolPlacement {
            name: "balanced".into(),
            layer,
            expected_imbalance: p.imbalance(&f),
            placement: p,
        });
    }
    Ok(Some(Pool {
        plan: plan.clone(),
        slots: SlotConfig { ep: plan.ep, slots_per_gpu: plan.slots_per_gpu, experts: m.num_experts, etp: plan.etp },
        placements,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_cost::{AllToAllAlgo, DispatchMode, Recompute, presets};

    #[test]
    fn pool_shares_the_slot_config() {
        let m = presets::model("gpt-moe-l8-h2048-e32").unwrap().unwrap();
        let plan = ParallelPlan {
            tp: 1,
            pp: 1,
            dp: 16,
            ep: 16,
            etp: 1,
            edp: 1,
            slots_per_gpu: 3,
            micro_batch_size: 4,
            num_micro_batches: 4,
            recompute: Recompute::None,
            distributed_optimizer: false,
            all_to_all: AllToAllAlgo::Flat,
            dispatch: DispatchMode::Token,
        };
        let pool = build_pool(&m, &plan, &Workload::Skewed { zipf_s: 1.0 }).unwrap().unwrap();
        assert_eq!(pool.placements.len(), 2);
        for p in &pool.placements {
            assert_eq!((p.placement.gpus, p.placement.slots_per_gpu, p.placement.experts), (16, 3, 32));
            p.placement.check().unwrap();
        }
        assert!(pool.placements[1].expected_imbalance < pool.placements[0].expected_imbalance);
    }
}
