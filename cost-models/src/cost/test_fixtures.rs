//! Fixtures shared by the layer-model tests ([`super::moe`], [`super::summed`]).

use super::moe::MoeLayerShape;
use crate::placement::Placement;

/// Sizes that are not powers of two, so that a change in the order of operations changes the roundings.
pub(super) fn shape() -> MoeLayerShape {
    MoeLayerShape {
        d_model: 1000,
        d_ffn: 1408,
        gated: true,
        act_bytes: 3,
        param_bytes: 2,
        grad_bytes: 4,
        peak_flops: 989e12,
    }
}

/// A xorshift generator from a seed: `next(n)` draws from `0..n`.
pub(super) fn rng(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n.max(1) as u64) as usize
    }
}

/// The token shares a random placement is given.
#[derive(Clone, Copy)]
pub(super) enum Shares {
    /// None (even splits).
    Even,
    /// A random weight per slot.
    Random,
    /// A random weight per slot, about a quarter of them zero (some slots receive nothing); even splits when no
    /// shares can be set.
    SomeZero,
}

/// A placement of `experts` on `gpus` GPUs with `slots` slots from a seed: every expert once, the rest at random
/// (repeats on one GPU allowed), shuffled, with `shares`.
pub(super) fn placement(gpus: usize, slots: usize, experts: usize, seed: u64, shares: Shares) -> Placement {
    let mut next = rng(seed);
    let mut v: Vec<u32> = (0..experts as u32).collect();
    while v.len() < gpus * slots {
        v.push(next(experts) as u32);
    }
    for i in (1..v.len()).rev() {
        v.swap(i, next(i + 1));
    }
    let p = Placement::new(gpus, slots, experts, v).unwrap();
    match shares {
        Shares::Even => p,
        Shares::Random => {
            let f: Vec<f64> = (0..p.slots.len()).map(|_| next(1000) as f64).collect();
            p.with_shares(&f).unwrap()
        }
        Shares::SomeZero => {
            let f: Vec<f64> =
                (0..p.slots.len()).map(|_| next(4).saturating_sub(1) as f64 * next(1000) as f64).collect();
            p.clone().with_shares(&f).unwrap_or(p)
        }
    }
}
