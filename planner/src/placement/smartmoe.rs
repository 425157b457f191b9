//! SmartMoE's online placement adjustment (Zhai et al., ATC'23), from its published description: experts by
//! descending predicted load, each to the least-loaded GPU that still has a free slot, a tie keeping the GPU the
//! expert is on now; the new placement is accepted only if the predicted maximum GPU load improves. SmartMoE
//! permutes experts (one copy each): it needs exactly `experts` slots.

use switchyard_cost::{Placement, PlacementError};

/// SmartMoE's proposal and whether its own rule accepts it.
#[derive(Debug, Clone, PartialEq)]
pub struct SmartMoeDecision {
    /// The placement to use (the current one when not accepted).
    pub placement: Placement,
    /// Whether the predicted maximum GPU load improves.
    pub accepted: bool,
    /// Predicted maximum GPU load before.
    pub max_load_before: f64,
    /// Predicted maximum GPU load of the proposal.
    pub max_load_after: f64,
}

/// Runs SmartMoE's greedy for predicted `loads` from `current`.
pub fn smartmoe_greedy(loads: &[f64], current: &Placement) -> Result<SmartMoeDecision, PlacementError> {
    let (g, s, e) = (current.gpus, current.slots_per_gpu, current.experts);
    if g * s != e || loads.len() != e {
        return Err(PlacementError::SlotCount { got: e, gpus: g, slots_per_gpu: s, expected: g * s });
    }
    let home: Vec<usize> = {
        let mut h = vec![0usize; e];
        for (slot, &x) in current.slots.iter().enumerate() {
            h[x as usize] = current.gpu_of_slot(slot);
        }
        h
    };
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(a.cmp(&b)));
    let mut load = vec![0.0f64; g];
    let mut bins: Vec<Vec<u32>> = vec![Vec::with_capacity(s); g];
    for x in order {
        let least = (0..g).filter(|&q| bins[q].len() < s).map(|q| load[q]).fold(f64::INFINITY, f64::min);
        let pick = if bins[home[x]].len() < s && load[home[x]] <= least {
            home[x]
        } else {
            (0..g)
                .filter(|&q| bins[q].len() < s)
                .min_by(|&a, &b| load[a].total_cmp(&load[b]).then(a.cmp(&b)))
                .unwrap_or(0)
        };
        bins[pick].push(x as u32);
        load[pick] += loads[x].max(0.0);
    }
    // Keep experts in their current slot index when they stay on their GPU.
    for (q, bin) in bins.iter_mut().enumerate() {
        let cur = current.gpu_slots(q);
        bin.sort_by_key(|x| cur.iter().position(|c| c == x).unwrap_or(usize::MAX));
    }
    let proposal = Placement::new(g, s, e, bins.concat())?;
    let before = current.gpu_loads(loads).into_iter().fold(0.0, f64::max);
    let after = proposal.gpu_loads(loads).into_iter().fold(0.0, f64::max);
    let accepted = after < before;
    Ok(SmartMoeDecision {
        placement: if accepted { proposal } else { current.clone() },
        accepted,
        max_load_before: before,
        max_load_after: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greedy_by_hand() {
        // 2 GPUs x 2 slots; loads 10, 9, 1, 1 with GPU0 = {0, 1}: the greedy puts 0 and 1 apart.
        let cur = Placement::new(2, 2, 4, vec![0, 1, 2, 3]).unwrap();
        let d = smartmoe_greedy(&[10.0, 9.0, 1.0, 1.0], &cur).unwrap();
        assert!(d.accepted);
        assert_eq!(d.max_load_after, 11.0);
        // Expert 2 ties onto its home GPU 1 (load 9 = the least), so 3 goes to GPU 0.
        assert_eq!(d.placement.gpu_slots(0), &[0, 3]);
        // Nothing to gain: the current placement stays.
        let d2 = smartmoe_greedy(&[10.0, 9.0, 1.0, 1.0], &d.placement).unwrap();
        assert!(!d2.accepted && d2.placement == d.placement);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn accepted_never_worse(loads in proptest::collection::vec(0.0f64..100.0, 8), shift in 0usize..8) {
            let mut slots: Vec<u32> = (0..8).collect();
            slots.rotate_left(shift);
            let cur = Placement::new(4, 2, 8, slots).unwrap();
            let d = smartmoe_greedy(&loads, &cur).unwrap();
            d.placement.check().unwrap();
            prop_assert!(d.placement.replica_counts().iter().all(|&c| c == 1));
            let now = d.placement.gpu_loads(&loads).into_iter().fold(0.0, f64::max);
            prop_assert!(now <= d.max_load_before + 1e-9);
        }
    }
}
