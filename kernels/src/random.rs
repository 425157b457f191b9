//! Seeded random numbers for reproducible initialisation (ChaCha8; the same seed gives the same
//! values on every machine).

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The generator used everywhere in this crate.
pub type SeededRng = ChaCha8Rng;

/// A generator from a fixed seed.
pub fn seeded_rng(seed: u64) -> SeededRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// One standard normal sample (Box-Muller).
pub fn standard_normal(rng: &mut SeededRng) -> f64 {
    // u1 in (0, 1]: avoids ln(0).
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `n` samples of `N(0, std^2)` as `f32`.
pub fn normal_vec(rng: &mut SeededRng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (standard_normal(rng) * std as f64) as f32).collect()
}

/// `n` samples uniform in `[lo, hi)` as `f32`.
pub fn uniform_vec(rng: &mut SeededRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| lo + (hi - lo) * rng.random::<f32>()).collect()
}
