//! Replication-aware balanced placement: give spare slots to the experts with the highest load per replica,
//! then pack the replicas longest-first onto the least-loaded GPU with a free slot, never two replicas of one
//! expert on one GPU when another GPU has room. This seeds the planner's pools and prices plans under an
//! expected workload.

use std::collections::BinaryHeap;

use switchyard_cost::{Placement, PlacementError};

/// Replica counts for `slots` slots: every expert gets one, then each spare slot goes to the expert whose load
/// per replica is highest (ties to the lower index). Counts sum to `slots` when `slots >= loads.len()`.
pub fn replica_counts_for(loads: &[f64], slots: usize) -> Vec<u32> {
    let e = loads.len();
    let mut cnt = vec![1u32; e];
    if slots <= e || e == 0 {
        return cnt;
    }
    // Each expert's current load per replica and index as one integer that orders like (`total_cmp` of the
    // load, the lower index first): a max-heap of plain integers pops the same experts in the same order.
    let key = |v: f64, i: usize| -> u128 {
        let b = v.to_bits();
        let ordered = if b >> 63 == 1 { !b } else { b | 1 << 63 };
        (ordered as u128) << 64 | (u64::MAX - i as u64) as u128
    };
    let mut heap: BinaryHeap<u128> = loads.iter().enumerate().map(|(i, &l)| key(l.max(0.0), i)).collect();
    for _ in 0..slots - e {
        let Some(mut top) = heap.peek_mut() else { break };
        let i = (u64::MAX - *top as u64) as usize;
        cnt[i] += 1;
        // Replacing the top and sifting it down: the heap of a pop and a push.
        *top = key(loads[i].max(0.0) / cnt[i] as f64, i);
    }
    cnt
}

/// A balanced placement of `loads.len()` experts on `gpus` GPUs with `slots_per_gpu` slots each.
pub fn balanced_placement(loads: &[f64], gpus: usize, slots_per_gpu: usize) -> Result<Placement, PlacementError> {
    let e = loads.len();
    let total = gpus * slots_per_gpu;
    if total < e || e == 0 {
        return Err(PlacementError::TooFewSlots { slots: total, experts: e });
    }
    let cnt = replica_counts_for(loads, total);
    // Replicas, heaviest first (ties: lower expert first, stable).
    let mut items: Vec<(f64, u32)> = Vec::with_capacity(total);
    for (i, &c) in cnt.iter().enumerate() {
        for _ in 0..c {
            items.push((loads[i].max(0.0) / c as f64, i as u32));
        }
    }
    items.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut gpu_load = vec![0.0f64; gpus];
    let mut gpu_slots: Vec<Vec<u32>> = vec![Vec::with_capacity(slots_per_gpu); gpus];
    for (w, ex) in items {
        // Least-loaded GPU with room that does not hold this expert yet; fall back to any GPU with room.
        let pick = |avoid_dup: bool| {
            (0..gpus)
                .filter(|&g| gpu_slots[g].len() < slots_per_gpu && (!avoid_dup || !gpu_slots[g].contains(&ex)))
                .min_by(|&a, &b| gpu_load[a].total_cmp(&gpu_load[b]).then(gpu_slots[a].len().cmp(&gpu_slots[b].len())))
        };
        let g = pick(true).or_else(|| pick(false)).expect("total slots >= replicas");
        gpu_load[g] += w;
        gpu_slots[g].push(ex);
    }
    Placement::new(gpus, slots_per_gpu, e, gpu_slots.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn hot_expert_gets_the_spare_slots() {
        assert_eq!(replica_counts_for(&[100.0, 10.0, 10.0, 10.0], 6), vec![3, 1, 1, 1]);
        assert_eq!(replica_counts_for(&[100.0, 90.0], 4), vec![2, 2]);
    }

    #[test]
    fn balances_better_than_contiguous() {
        let loads = [50.0, 40.0, 5.0, 5.0, 1.0, 1.0, 1.0, 1.0];
        let b = balanced_placement(&loads, 4, 2).unwrap();
        let c = Placement::contiguous(4, 2, 8).unwrap();
        assert!(b.imbalance(&loads) < c.imbalance(&loads));
        // With one spare slot per GPU the hottest experts are replicated.
        let r = balanced_placement(&loads, 4, 3).unwrap();
        assert!(r.replica_counts()[0] >= 2);
        assert!(r.imbalance(&loads) < b.imbalance(&loads));
    }

    proptest! {
        #[test]
        fn every_expert_placed_and_slots_full(
            loads in proptest::collection::vec(0.0f64..1000.0, 1..64),
            gpus in 1usize..17,
            extra in 0usize..4,
        ) {
            let slots = loads.len().div_ceil(gpus) + extra;
            let p = balanced_placement(&loads, gpus, slots).unwrap();
            p.check().unwrap();
            prop_assert_eq!(p.slots.len(), gpus * slots);
            let cnt = p.replica_counts();
            prop_assert!(cnt.iter().all(|&c| c >= 1));
            // Load is conserved when split over replicas.
            let total: f64 = p.gpu_loads(&loads).iter().sum();
            prop_assert!((total - loads.iter().sum::<f64>()).abs() < 1e-6 * (1.0 + total));
        }
    }
}

/// Replica counts against their first version (a heap of (load, index) items ordered by `total_cmp`): the same
/// counts, including for loads that are NaN, infinite, negative or signed zeros.
#[cfg(test)]
mod counts_equal_reference {
    use std::cmp::Ordering;
    use std::collections::BinaryHeap;

    use proptest::prelude::*;

    use super::*;

    fn reference_counts(loads: &[f64], slots: usize) -> Vec<u32> {
        let e = loads.len();
        let mut cnt = vec![1u32; e];
        if slots <= e || e == 0 {
            return cnt;
        }
        #[derive(PartialEq)]
        struct Item(f64, usize);
        impl Eq for Item {}
        impl PartialOrd for Item {
            fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Item {
            fn cmp(&self, o: &Self) -> Ordering {
                self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
            }
        }
        let mut heap: BinaryHeap<Item> = loads.iter().enumerate().map(|(i, &l)| Item(l.max(0.0), i)).collect();
        for _ in 0..slots - e {
            let Some(Item(_, i)) = heap.pop() else { break };
            cnt[i] += 1;
            heap.push(Item(loads[i].max(0.0) / cnt[i] as f64, i));
        }
        cnt
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn same_counts(
            loads in proptest::collection::vec(
                prop_oneof![
                    4 => (0u32..8).prop_map(|x| x as f64 * 10.0),
                    4 => 0.0f64..1000.0,
                    1 => prop_oneof![
                        Just(0.0), Just(-0.0), Just(f64::NAN), Just(f64::INFINITY), Just(-1.0), Just(5e-324)
                    ],
                ],
                0..48,
            ),
            extra in 0usize..100,
        ) {
            let slots = (loads.len() + extra).saturating_sub(2);
            prop_assert_eq!(replica_counts_for(&loads, slots), reference_counts(&loads, slots));
        }
    }
}
