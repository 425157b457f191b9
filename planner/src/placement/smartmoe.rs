//! SmartMoE's online expert-placement adjustment (Zhai et al., "SmartMoE: Efficiently Training Sparsely-Activated
//! Models through Combining Offline and Online Parallelization", USENIX ATC'23), reimplemented from the paper's
//! description and its artifact (`thu-pacman/SmartMoE-AE`, `fmoe/smartmoe/mapping.py`, the `Greedy` method):
//!
//! 1. experts by descending predicted load;
//! 2. each to the GPU with the smallest load so far among GPUs that still have a free slot (the first of equal
//!    ones), except that when the GPU the expert is on now has a free slot and its load equals that smallest
//!    load, the expert stays there;
//! 3. the new placement is accepted only if its predicted maximum GPU load is strictly lower than the current
//!    placement's; otherwise the current placement is kept.
//!
//! SmartMoE permutes experts: every expert has exactly one slot, so the slot count must equal the expert count
//! (`gpus * slots_per_gpu == experts`); other configurations are an error, not silently changed, because SmartMoE
//! itself never replicates.
//!
//! Details that follow the artifact: equal loads are visited in *descending* expert index (it reverses an
//! ascending argsort); inside a GPU experts take slots in the order they were assigned; GPU loads are sums of the
//! predicted per-expert loads (tokens), summed in assignment order.

use switchyard_cost::Placement;

use super::error::{PlacementAlgoError, check_loads};

const SMARTMOE: &str = "SmartMoE";

/// SmartMoE's proposal and whether its own acceptance rule takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct SmartMoeDecision {
    /// The placement to use: the greedy's proposal when accepted, the current placement otherwise.
    pub placement: Placement,
    /// Whether the proposal's predicted maximum GPU load is strictly lower than the current one's.
    pub accepted: bool,
    /// Predicted maximum GPU load (tokens) of the current placement.
    pub predicted_max_load_before: f64,
    /// Predicted maximum GPU load (tokens) of the greedy's proposal (whether accepted or not).
    pub predicted_max_load_after: f64,
}

/// Runs SmartMoE's greedy for predicted per-expert `loads` (finite, non-negative tokens) from the `current`
/// placement, which must be a permutation (`gpus * slots_per_gpu == experts`, one slot per expert).
pub fn smartmoe_greedy(loads: &[f64], current: &Placement) -> Result<SmartMoeDecision, PlacementAlgoError> {
    current.check()?;
    let (g, s, e) = (current.gpus, current.slots_per_gpu, current.experts);
    if g * s != e {
        return Err(PlacementAlgoError::invalid(
            SMARTMOE,
            format!(
                "SmartMoE permutes experts and never replicates: it needs exactly one slot per expert, but {g} GPUs \
                 x {s} slots = {} slots for {e} experts",
                g * s
            ),
        ));
    }
    if loads.len() != e {
        return Err(PlacementAlgoError::Length { what: "SmartMoE's loads", got: loads.len(), expected: e });
    }
    check_loads(loads)?;
    // The GPU each expert is on now (a permutation: exactly one slot each).
    let mut home = vec![0usize; e];
    for (slot, &x) in current.slots.iter().enumerate() {
        home[x as usize] = current.gpu_of_slot(slot);
    }
    let before = current.gpu_loads(loads).into_iter().fold(0.0, f64::max);

    // Descending load; equal loads in descending index (the artifact reverses an ascending argsort).
    let mut order: Vec<usize> = (0..e).collect();
    order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]).then(b.cmp(&a)));
    let mut load = vec![0.0f64; g];
    let mut bins: Vec<Vec<u32>> = vec![Vec::with_capacity(s); g];
    let mut after = 0.0f64;
    for x in order {
        // The first least-loaded GPU with a free slot; one always exists (slots == experts).
        let mut pick: Option<usize> = None;
        for q in (0..g).filter(|&q| bins[q].len() < s) {
            if pick.is_none_or(|p| load[q] < load[p]) {
                pick = Some(q);
            }
        }
        let Some(mut pick) = pick else {
            return Err(PlacementAlgoError::invalid(SMARTMOE, "no GPU has a free slot"));
        };
        // Keep-in-place tie-break.
        if bins[home[x]].len() < s && load[home[x]] == load[pick] {
            pick = home[x];
        }
        bins[pick].push(x as u32);
        load[pick] += loads[x];
        after = after.max(load[pick]);
    }
    let proposal = Placement::new(g, s, e, bins.concat())?;
    let accepted = before > after;
    Ok(SmartMoeDecision {
        placement: if accepted { proposal } else { current.clone() },
        accepted,
        predicted_max_load_before: before,
        predicted_max_load_after: after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn max_load(p: &Placement, loads: &[f64]) -> f64 {
        p.gpu_loads(loads).into_iter().fold(0.0, f64::max)
    }

    #[test]
    fn greedy_by_hand() {
        // 2 GPUs x 2 slots; loads 10, 9, 1, 1; now GPU0 = {0, 1} (load 19), GPU1 = {2, 3} (load 2).
        let cur = Placement::new(2, 2, 4, vec![0, 1, 2, 3]).unwrap();
        let d = smartmoe_greedy(&[10.0, 9.0, 1.0, 1.0], &cur).unwrap();
        // Order: 0 (10), 1 (9), 3 (1), 2 (1): equal loads in descending index.
        // 0 -> GPU0 (both empty: its home), 1 -> GPU1, 3 -> GPU1 (9 < 10; its home), 2 -> GPU0 (the only room).
        assert!(d.accepted);
        assert_eq!((d.predicted_max_load_before, d.predicted_max_load_after), (19.0, 11.0));
        assert_eq!(d.placement.slots, vec![0, 2, 1, 3]);
        // Nothing to gain: the current placement stays.
        let d2 = smartmoe_greedy(&[10.0, 9.0, 1.0, 1.0], &d.placement).unwrap();
        assert!(!d2.accepted);
        assert_eq!(d2.placement, d.placement);
        assert_eq!(d2.predicted_max_load_after, 11.0);
    }

    #[test]
    fn ties_keep_experts_in_place() {
        // Uniform load: every choice ties, so every expert that can stays where it is; max load is unchanged,
        // so the proposal is not accepted.
        let cur = Placement::new(2, 2, 4, vec![3, 1, 0, 2]).unwrap();
        let d = smartmoe_greedy(&[5.0; 4], &cur).unwrap();
        assert!(!d.accepted);
        assert_eq!(d.placement, cur);
        // Order 3, 2, 1, 0: 3 -> GPU0 (home, tie), 2 -> GPU1 (lighter), 1 -> GPU0 (home, tie), 0 -> GPU1.
        assert_eq!(d.predicted_max_load_after, 10.0);
    }

    #[test]
    fn rejects_what_smartmoe_does_not_do() {
        let replicas = Placement::new(2, 2, 3, vec![0, 1, 0, 2]).unwrap();
        assert!(matches!(smartmoe_greedy(&[1.0; 3], &replicas), Err(PlacementAlgoError::Invalid { .. })));
        let cur = Placement::new(2, 1, 2, vec![0, 1]).unwrap();
        assert!(matches!(smartmoe_greedy(&[1.0], &cur), Err(PlacementAlgoError::Length { .. })));
        assert!(matches!(smartmoe_greedy(&[1.0, f64::INFINITY], &cur), Err(PlacementAlgoError::BadLoad { .. })));
        assert!(matches!(smartmoe_greedy(&[1.0, -2.0], &cur), Err(PlacementAlgoError::BadLoad { .. })));
        let mut broken = cur.clone();
        broken.slots = vec![0, 0];
        assert!(matches!(smartmoe_greedy(&[1.0, 1.0], &broken), Err(PlacementAlgoError::Placement(_))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn a_valid_permutation_never_worse(
            (gpus, per, perm) in (1usize..9, 1usize..5).prop_flat_map(|(g, s)| {
                (Just(g), Just(s), Just((0..(g * s) as u32).collect::<Vec<_>>()).prop_shuffle())
            }),
            seed in proptest::collection::vec(0u32..50, 32),
        ) {
            let e = gpus * per;
            let loads: Vec<f64> = (0..e).map(|i| seed[i % 32] as f64).collect();
            let cur = Placement::new(gpus, per, e, perm).unwrap();
            let d = smartmoe_greedy(&loads, &cur).unwrap();
            d.placement.check().unwrap();
            prop_assert_eq!(d.placement.slots.len(), gpus * per);
            prop_assert!(d.placement.replica_counts().iter().all(|&c| c == 1));
            let total: f64 = d.placement.gpu_loads(&loads).iter().sum();
            prop_assert_eq!(total, loads.iter().sum::<f64>());
            prop_assert_eq!(d.predicted_max_load_before, max_load(&cur, &loads));
            prop_assert!(max_load(&d.placement, &loads) <= d.predicted_max_load_before);
            if d.accepted {
                prop_assert!(d.predicted_max_load_after < d.predicted_max_load_before);
                prop_assert_eq!(max_load(&d.placement, &loads), d.predicted_max_load_after);
            } else {
                prop_assert_eq!(&d.placement, &cur);
            }
        }
    }
}
