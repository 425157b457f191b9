//! FasterMoE's dynamic shadowing (He et al., "FasterMoE: Modeling and Optimizing Training of Large-Scale Dynamic
//! Pre-Trained Models", PPoPP'22), reimplemented from the paper and its released policy (`fmoe/fastermoe/
//! shadow_policy.py`, `global_policy`, as shipped in FastMoE and in the SmartMoE artifact).
//!
//! FasterMoE *shadows* the hottest experts: their parameters are broadcast to every worker, each worker computes
//! its own tokens for them locally, and their gradients are reduced back. Its policy sorts the experts by load,
//! descending, and considers shadowing the first 1, 2, ... of them, pricing each prefix with its roofline
//! performance model; it stops at the first prefix whose predicted time is not lower than the time without
//! shadowing, and shadows the prefix with the lowest predicted time among those seen. It never considers
//! shadowing every expert (the model needs a next-hottest expert as the remaining bottleneck).
//!
//! In Switchyard's slot model:
//! - every expert has a *home* GPU (contiguous by default, as FasterMoE's workers own `experts / workers` experts
//!   each); shadowing expert `x` gives it a slot on every other GPU, so it needs one spare slot on each of them;
//!   when a prefix does not fit, the scan stops there;
//! - the performance model is Switchyard's exact layer model ([`LayerCostInputs`], `moe_layer_exact`: busiest
//!   GPU's compute, all-to-all, replica gradient all-reduce) instead of FasterMoE's closed-form roofline;
//! - *approximation*: a shadowed expert's tokens are split evenly over its replicas (each GPU computes 1/G of
//!   them), which reproduces shadowing's balancing of compute, whereas real shadowing keeps each source GPU's
//!   tokens local (no all-to-all for them, and each GPU computes exactly its own share). The model therefore
//!   still charges all-to-all traffic for shadowed experts;
//! - spare slots left after shadowing hold an *idle copy* of the GPU's hottest home expert with a token share of
//!   zero ([`Placement::shares`]): FasterMoE has no such slots, and an idle copy on the GPU that already holds the
//!   expert adds no compute, no traffic and no gradient synchronisation to the model. Placements with idle
//!   copies carry shares (real replicas split evenly, idle copies zero); without spare slots they carry none.

use switchyard_cost::{LoadMatrix, Placement};

use super::cost_inputs::LayerCostInputs;
use super::error::PlacementAlgoError;

const FASTERMOE: &str = "FasterMoE";

/// FasterMoE's shadowing decision for one layer.
#[derive(Debug, Clone, PartialEq)]
pub struct FasterMoeResult {
    /// Home experts, one replica of each shadowed expert on every GPU, idle copies in the spare slots.
    pub placement: Placement,
    /// Shadowed experts, hottest first.
    pub shadowed: Vec<u32>,
    /// Modelled layer time (ms) of `placement` under the load.
    pub time_ms: f64,
    /// Modelled layer time (ms) without shadowing (the home placement with idle copies).
    pub unshadowed_time_ms: f64,
}

/// FasterMoE's shadowing of one layer under `load` (rows: the group's GPUs as source ranks), with `slots_per_gpu`
/// slots per GPU and experts homed contiguously (expert `e` on GPU `e * gpus / experts`, as
/// [`Placement::contiguous`] places them). Needs at least as many experts as GPUs.
pub fn fastermoe_shadow(
    load: &LoadMatrix,
    slots_per_gpu: usize,
    cost: &LayerCostInputs,
) -> Result<FasterMoeResult, PlacementAlgoError> {
    let gpus = cost.gpus.len();
    if gpus == 0 {
        return Err(PlacementAlgoError::invalid(FASTERMOE, "the group has no GPUs"));
    }
    let homes: Vec<usize> = (0..load.experts).map(|e| e * gpus / load.experts).collect();
    fastermoe_shadow_with_homes(load, &homes, slots_per_gpu, cost)
}

/// [`fastermoe_shadow`] with the home GPU of each expert given (`homes[e]`, e.g. the GPU an expert lives on in the
/// current placement). Every GPU must be home to at least one expert and to no more than `slots_per_gpu`.
pub fn fastermoe_shadow_with_homes(
    load: &LoadMatrix,
    homes: &[usize],
    slots_per_gpu: usize,
    cost: &LayerCostInputs,
) -> Result<FasterMoeResult, PlacementAlgoError> {
    let gpus = cost.gpus.len();
    let experts = load.experts;
    if load.counts.len() != load.ranks * load.experts {
        return Err(PlacementAlgoError::Length {
            what: "the load matrix's counts",
            got: load.counts.len(),
            expected: load.ranks * load.experts,
        });
    }
    if load.ranks != gpus {
        return Err(PlacementAlgoError::Length {
            what: "the load matrix's source ranks",
            got: load.ranks,
            expected: gpus,
        });
    }
    if homes.len() != experts {
        return Err(PlacementAlgoError::Length { what: "FasterMoE's home GPUs", got: homes.len(), expected: experts });
    }
    if experts == 0 || gpus == 0 {
        return Err(PlacementAlgoError::invalid(FASTERMOE, "needs at least one expert and one GPU"));
    }
    let mut home_count = vec![0usize; gpus];
    for (e, &h) in homes.iter().enumerate() {
        if h >= gpus {
            return Err(PlacementAlgoError::invalid(
                FASTERMOE,
                format!("expert {e}'s home GPU {h} is not in 0..{gpus}"),
            ));
        }
        home_count[h] += 1;
    }
    if let Some(g) = home_count.iter().position(|&c| c == 0 || c > slots_per_gpu) {
        return Err(PlacementAlgoError::invalid(
            FASTERMOE,
            format!(
                "GPU {g} is home to {} experts; every GPU must own at least one and at most its {slots_per_gpu} slots",
                home_count[g]
            ),
        ));
    }
    let loads: Vec<f64> = load.expert_loads().into_iter().map(|x| x as f64).collect();
    let build = |shadowed: &[usize]| shadow_placement(homes, shadowed, &loads, gpus, slots_per_gpu);

    let base = build(&[])?;
    let base_ms = cost.layer_time_ms(load, &base)?;
    let mut best = (0usize, base_ms, base);
    // Experts by load, descending (stable: equal loads in index order, as `torch.sort` on CPU).
    let mut order: Vec<usize> = (0..experts).collect();
    order.sort_by(|&a, &b| loads[b].total_cmp(&loads[a]));
    let mut spare: Vec<usize> = home_count.iter().map(|&c| slots_per_gpu - c).collect();
    let mut shadowed: Vec<usize> = Vec::new();
    // The released policy stops before the last expert.
    for &x in order.iter().take(experts - 1) {
        if (0..gpus).any(|g| g != homes[x] && spare[g] == 0) {
            break;
        }
        for (g, s) in spare.iter_mut().enumerate() {
            if g != homes[x] {
                *s -= 1;
            }
        }
        shadowed.push(x);
        let candidate = build(&shadowed)?;
        let ms = cost.layer_time_ms(load, &candidate)?;
        // As released: compared with the time without shadowing; the best prefix seen is kept.
        if ms >= base_ms {
            break;
        }
        if ms < best.1 {
            best = (shadowed.len(), ms, candidate);
        }
    }
    let (k, time_ms, placement) = best;
    Ok(FasterMoeResult {
        placement,
        shadowed: shadowed[..k].iter().map(|&x| x as u32).collect(),
        time_ms,
        unshadowed_time_ms: base_ms,
    })
}

/// The placement with experts at `homes`, `shadowed` on every GPU, and idle copies (share 0) of each GPU's hottest
/// home expert in its remaining slots.
fn shadow_placement(
    homes: &[usize],
    shadowed: &[usize],
    loads: &[f64],
    gpus: usize,
    slots_per_gpu: usize,
) -> Result<Placement, PlacementAlgoError> {
    let experts = homes.len();
    let mut slots: Vec<u32> = Vec::with_capacity(gpus * slots_per_gpu);
    let mut fraction: Vec<f64> = Vec::with_capacity(gpus * slots_per_gpu);
    let mut idle = false;
    for g in 0..gpus {
        let own: Vec<usize> = (0..experts).filter(|&e| homes[e] == g).collect();
        let mine: Vec<usize> = own.iter().copied().chain(shadowed.iter().copied().filter(|&x| homes[x] != g)).collect();
        if mine.len() > slots_per_gpu || own.is_empty() {
            return Err(PlacementAlgoError::invalid(FASTERMOE, format!("GPU {g}'s experts do not fit its slots")));
        }
        // The hottest home expert (the first of equal ones).
        let hottest = own.iter().copied().fold(own[0], |b, e| if loads[e] > loads[b] { e } else { b });
        for j in 0..slots_per_gpu {
            match mine.get(j) {
                Some(&e) => {
                    slots.push(e as u32);
                    fraction.push(1.0);
                }
                None => {
                    slots.push(hottest as u32);
                    fraction.push(0.0);
                    idle = true;
                }
            }
        }
    }
    let p = Placement::new(gpus, slots_per_gpu, experts, slots)?;
    Ok(if idle { p.with_shares(&fraction)? } else { p })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::cost_inputs::tests::a100_inputs;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn inputs16() -> &'static LayerCostInputs {
        static C: OnceLock<LayerCostInputs> = OnceLock::new();
        C.get_or_init(|| a100_inputs(16))
    }

    /// 16 GPUs, 32 experts; every GPU sends `per_rank` tokens with the given weights (one hot expert or uniform).
    fn matrix(weights: &[f64], per_rank: u64) -> LoadMatrix {
        let sum: f64 = weights.iter().sum();
        let f: Vec<f64> = weights.iter().map(|w| w / sum).collect();
        LoadMatrix::from_fractions(16, &f, per_rank)
    }

    fn check_valid(r: &FasterMoeResult, load: &LoadMatrix, slots: usize) {
        let p = &r.placement;
        p.check().unwrap();
        assert_eq!((p.gpus, p.slots_per_gpu, p.slots.len()), (16, slots, 16 * slots));
        assert!(p.replica_counts().iter().all(|&c| c >= 1));
        let loads: Vec<f64> = load.expert_loads().into_iter().map(|x| x as f64).collect();
        let total: f64 = p.gpu_loads(&loads).iter().sum();
        let want: f64 = loads.iter().sum();
        assert!((total - want).abs() <= 1e-6 * (1.0 + want), "{total} vs {want}");
        for &x in &r.shadowed {
            for g in 0..16 {
                assert!(p.gpu_slots(g).contains(&x), "shadowed {x} missing on GPU {g}");
            }
        }
        assert!(r.time_ms <= r.unshadowed_time_ms);
        assert_eq!(r.time_ms, inputs16().layer_time_ms(load, p).unwrap());
    }

    #[test]
    fn shadows_a_hot_expert_when_it_pays() {
        // Expert 5 takes half of all tokens: its home GPU computes half the layer's work.
        let mut w = vec![1.0; 32];
        w[5] = 31.0;
        let load = matrix(&w, 16384);
        let r = fastermoe_shadow(&load, 3, inputs16()).unwrap();
        check_valid(&r, &load, 3);
        assert_eq!(r.shadowed.first(), Some(&5));
        assert!(r.time_ms < 0.7 * r.unshadowed_time_ms, "{} vs {}", r.time_ms, r.unshadowed_time_ms);
        // With one spare slot per GPU at most one expert can be shadowed.
        assert_eq!(r.shadowed, vec![5]);
        // No spare slots: nothing can be shadowed; the home placement has no idle copies.
        let r = fastermoe_shadow(&load, 2, inputs16()).unwrap();
        assert!(r.shadowed.is_empty());
        assert_eq!(r.placement, Placement::contiguous(16, 2, 32).unwrap());
    }

    #[test]
    fn does_not_shadow_under_uniform_load() {
        // Balanced load: shadowing only adds gradient synchronisation.
        let load = matrix(&[1.0; 32], 16384);
        let r = fastermoe_shadow(&load, 4, inputs16()).unwrap();
        check_valid(&r, &load, 4);
        assert!(r.shadowed.is_empty());
        assert_eq!(r.time_ms, r.unshadowed_time_ms);
        // The spare slots hold idle copies that change nothing in the model: same time as without spare slots.
        let plain = Placement::contiguous(16, 2, 32).unwrap();
        let t = inputs16().layer_time_ms(&load, &plain).unwrap();
        assert!((t - r.time_ms).abs() <= 1e-9 * t, "{t} vs {}", r.time_ms);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let c = inputs16();
        let load = matrix(&[1.0; 32], 1024);
        assert!(matches!(fastermoe_shadow(&load, 1, c), Err(PlacementAlgoError::Invalid { .. })));
        let wrong = LoadMatrix::from_fractions(8, &[1.0 / 32.0; 32], 1024);
        assert!(matches!(fastermoe_shadow(&wrong, 2, c), Err(PlacementAlgoError::Length { .. })));
        let few = LoadMatrix::from_fractions(16, &[0.125; 8], 1024);
        assert!(fastermoe_shadow(&few, 2, c).is_err());
        let mut broken = load.clone();
        broken.counts.pop();
        assert!(matches!(fastermoe_shadow(&broken, 2, c), Err(PlacementAlgoError::Length { .. })));
        assert!(fastermoe_shadow_with_homes(&load, &[0; 32], 32, c).is_err());
        assert!(fastermoe_shadow_with_homes(&load, &[16; 32], 2, c).is_err());
        assert!(fastermoe_shadow_with_homes(&load, &[0; 31], 2, c).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn valid_and_never_slower(
            w in proptest::collection::vec(0.0f64..1.0, 32),
            hot in 0usize..32,
            heat in 0.0f64..40.0,
            spare in 0usize..3,
            per_rank in 1024u64..16384,
        ) {
            let mut w = w;
            w[hot] += heat;
            w[0] += 1e-3;
            let load = matrix(&w, per_rank);
            let r = fastermoe_shadow(&load, 2 + spare, inputs16()).unwrap();
            check_valid(&r, &load, 2 + spare);
            prop_assert!(r.shadowed.len() <= spare);
        }
    }
}
