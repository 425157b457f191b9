//! Pipeline terms: the 1F1B schedule's time with its bubble.

/// Time of one iteration of a 1F1B pipeline with `pp` stages and `m` micro-batches, where the slowest stage
/// takes `fwd_s` + `bwd_s` per micro-batch and each stage boundary costs `p2p_s` per direction per micro-batch:
/// `(m + pp - 1) * (fwd + bwd + 2 p2p)` for `pp > 1` (the bubble is the `pp - 1` extra slots), `m * (fwd + bwd)`
/// without a pipeline.
pub fn one_f_one_b_time_s(fwd_s: f64, bwd_s: f64, p2p_s: f64, pp: u32, m: u32) -> f64 {
    if pp <= 1 {
        return m as f64 * (fwd_s + bwd_s);
    }
    (m as f64 + pp as f64 - 1.0) * (fwd_s + bwd_s + 2.0 * p2p_s)
}

/// The bubble's share of the iteration: `(pp - 1) / (m + pp - 1)`.
pub fn bubble_fraction(pp: u32, m: u32) -> f64 {
    if pp <= 1 { 0.0 } else { (pp as f64 - 1.0) / (m as f64 + pp as f64 - 1.0) }
}

/// Micro-batches whose activations a stage keeps at once under 1F1B: the first stage holds `min(pp, m)`.
pub fn in_flight_micro_batches(pp: u32, m: u32) -> u32 {
    pp.min(m).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn by_hand() {
        // 4 stages, 8 micro-batches, 1 + 2 s per micro-batch, 0.1 s p2p: 11 * 3.2.
        assert!((one_f_one_b_time_s(1.0, 2.0, 0.1, 4, 8) - 35.2).abs() < 1e-12);
        assert!((one_f_one_b_time_s(1.0, 2.0, 0.1, 1, 8) - 24.0).abs() < 1e-12);
        assert!((bubble_fraction(4, 8) - 3.0 / 11.0).abs() < 1e-12);
        assert_eq!(in_flight_micro_batches(4, 8), 4);
        assert_eq!(in_flight_micro_batches(8, 2), 2);
    }
}
