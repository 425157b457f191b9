//! Helpers shared by the unit tests (fixed proptest seed, random data).

use proptest::test_runner::{Config, RngSeed};

pub(crate) use crate::random::{SeededRng, normal_vec};

/// A proptest configuration with `cases` cases and a fixed seed (reproducible runs).
pub(crate) fn config(cases: u32) -> Config {
    Config { cases, rng_seed: RngSeed::Fixed(0x5EED_5717_C4A7), failure_persistence: None, ..Config::default() }
}

/// A seeded generator.
pub(crate) fn rng(seed: u64) -> SeededRng {
    crate::random::seeded_rng(seed)
}

/// Largest relative error `|a - b| / (atol + |b|)` between two sequences.
pub(crate) fn max_rel_err(a: &[f32], b: &[f64], atol: f64) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs() / (atol + y.abs())).fold(0.0, f64::max)
}
