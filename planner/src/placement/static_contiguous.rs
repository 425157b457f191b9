//! The static baseline: the placement expert-parallel frameworks start from and never change (GShard, FastMoE,
//! Megatron-LM, DeepSpeed-MoE): expert `e` on GPU `e * gpus / experts`, contiguous runs of experts per GPU. Slots
//! beyond one per expert hold replicas in round-robin expert order (load-oblivious), as
//! [`Placement::contiguous`] builds it.

use switchyard_cost::Placement;

use super::error::PlacementAlgoError;

/// The static contiguous placement of `experts` experts on `gpus` GPUs with `slots_per_gpu` slots each. Needs at
/// least one slot per expert.
pub fn static_contiguous(experts: usize, gpus: usize, slots_per_gpu: usize) -> Result<Placement, PlacementAlgoError> {
    if gpus == 0 || slots_per_gpu == 0 {
        return Err(PlacementAlgoError::invalid("static", "needs at least one GPU and one slot per GPU"));
    }
    Ok(Placement::contiguous(gpus, slots_per_gpu, experts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn by_hand_and_errors() {
        assert_eq!(static_contiguous(4, 2, 2).unwrap().slots, vec![0, 1, 2, 3]);
        assert_eq!(static_contiguous(4, 2, 3).unwrap().slots, vec![0, 1, 0, 2, 3, 1]);
        assert!(static_contiguous(5, 2, 2).is_err());
        assert!(static_contiguous(0, 2, 2).is_err());
        assert!(static_contiguous(2, 0, 2).is_err());
        assert!(static_contiguous(2, 2, 0).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn valid_and_conserving(
            loads in proptest::collection::vec(0u32..1000, 1..40),
            gpus in 1usize..9,
            extra in 0usize..3,
        ) {
            let loads: Vec<f64> = loads.into_iter().map(f64::from).collect();
            let slots = loads.len().div_ceil(gpus) + extra;
            let p = static_contiguous(loads.len(), gpus, slots).unwrap();
            p.check().unwrap();
            prop_assert_eq!(p.slots.len(), gpus * slots);
            prop_assert!(p.replica_counts().iter().all(|&c| c >= 1));
            let total: f64 = p.gpu_loads(&loads).iter().sum();
            prop_assert!((total - loads.iter().sum::<f64>()).abs() <= 1e-9 * (1.0 + total));
        }
    }
}
