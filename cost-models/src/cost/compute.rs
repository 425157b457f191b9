//! Compute terms: GEMMs on an efficiency curve, FFN blocks, attention, memory-bound elementwise work.

use crate::cluster::ModelConstants;

/// Time of one GEMM with `tokens` rows (the token dimension, which is the small one in training GEMMs),
/// `n` x `k` weights: `2*tokens*n*k` FLOPs at `gemm_max_efficiency * tokens / (tokens + gemm_half_efficiency_rows)`
/// of the peak, plus one kernel launch. Zero when any dimension is zero (nothing is launched).
pub fn gemm_time_s(tokens: f64, n: f64, k: f64, peak_flops: f64, c: &ModelConstants) -> f64 {
    if tokens <= 0.0 || n <= 0.0 || k <= 0.0 {
        return 0.0;
    }
    let flops = 2.0 * tokens * n * k;
    let eff = c.gemm_max_efficiency * tokens / (tokens + c.gemm_half_efficiency_rows);
    flops / (peak_flops * eff) + c.kernel_launch_us * 1e-6
}

/// Time of memory-bound work touching `bytes` bytes at `hbm_bytes_per_s` (already efficiency-scaled).
pub fn elementwise_time_s(bytes: f64, hbm_bytes_per_s: f64) -> f64 {
    if bytes <= 0.0 { 0.0 } else { bytes / hbm_bytes_per_s }
}

/// What a GPU computes with: peak GEMM throughput and efficiency-scaled memory bandwidth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeviceRates {
    /// Peak FLOP/s for the training dtype.
    pub peak_flops: f64,
    /// Memory bandwidth reached by memory-bound kernels, bytes/s.
    pub hbm_bytes_per_s: f64,
}

/// Forward and backward time of one FFN (Linear -> activation -> Linear, or SwiGLU's three matrices) over
/// `tokens` rows with model width `d` and hidden width `h`; `act_bytes` is the element size of activations.
/// Backward runs two GEMMs (input and weight gradients) for each forward GEMM.
pub fn ffn_time_s(
    tokens: f64,
    d: f64,
    h: f64,
    gated: bool,
    act_bytes: f64,
    dev: DeviceRates,
    c: &ModelConstants,
) -> (f64, f64) {
    let DeviceRates { peak_flops, hbm_bytes_per_s } = dev;
    if tokens <= 0.0 {
        return (0.0, 0.0);
    }
    let up = gemm_time_s(tokens, h, d, peak_flops, c) * if gated { 2.0 } else { 1.0 };
    let down = gemm_time_s(tokens, d, h, peak_flops, c);
    // Activation reads its input(s) and writes its output; backward reads more.
    let act_elems = tokens * h * if gated { 3.0 } else { 2.0 };
    let act = elementwise_time_s(act_elems * act_bytes, hbm_bytes_per_s);
    let fwd = up + down + act;
    let bwd = 2.0 * (up + down) + 1.5 * act;
    (fwd, bwd)
}

/// Forward time of causal attention scores and the weighted sum (`QK^T`, softmax, `PV`) for `tokens` query
/// tokens of sequences of `seq_len`, `score_width` = heads x (qk dim + v dim) split over `tp`: `2 * tokens *
/// seq_len * score_width / 2` FLOPs (causal masking halves the work), as fused attention kernels run it.
pub fn attention_core_time_s(tokens: f64, seq_len: f64, score_width: f64, peak_flops: f64, c: &ModelConstants) -> f64 {
    if tokens <= 0.0 {
        return 0.0;
    }
    // A fused kernel over (tokens x seq_len) scores: the sequence is the long dimension.
    gemm_time_s(tokens, seq_len / 2.0, score_width, peak_flops, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consts() -> ModelConstants {
        ModelConstants {
            gemm_max_efficiency: 0.5,
            gemm_half_efficiency_rows: 100.0,
            kernel_launch_us: 10.0,
            ..Default::default()
        }
    }

    #[test]
    fn gemm_by_hand() {
        // 2*100*200*300 = 12e6 FLOPs; efficiency 0.5 * 100/200 = 0.25; peak 1e12 -> 48 us + 10 us launch.
        let t = gemm_time_s(100.0, 200.0, 300.0, 1e12, &consts());
        assert!((t - 58e-6).abs() < 1e-12, "{t}");
        assert_eq!(gemm_time_s(0.0, 200.0, 300.0, 1e12, &consts()), 0.0);
    }

    #[test]
    fn gemm_efficiency_rises_with_rows() {
        let c = consts();
        let per_row = |m: f64| (gemm_time_s(m, 1024.0, 1024.0, 1e12, &c) - 10e-6) / m;
        assert!(per_row(10.0) > per_row(1000.0));
        assert!(per_row(1000.0) > per_row(100000.0));
    }

    #[test]
    fn ffn_by_hand() {
        let c = ModelConstants {
            gemm_max_efficiency: 1.0,
            gemm_half_efficiency_rows: 0.0,
            kernel_launch_us: 0.0,
            ..Default::default()
        };
        // tokens 10, d 4, h 8, not gated: up 2*10*8*4 = 640, down 640 FLOPs at 1e3 FLOP/s = 1.28 s;
        // activation: 10*8*2 elements * 2 bytes = 320 bytes at 1e3 B/s = 0.32 s.
        let (f, b) = ffn_time_s(10.0, 4.0, 8.0, false, 2.0, DeviceRates { peak_flops: 1e3, hbm_bytes_per_s: 1e3 }, &c);
        assert!((f - 1.60).abs() < 1e-9, "{f}");
        assert!((b - (2.56 + 0.48)).abs() < 1e-9, "{b}");
        // Gated: two up projections and 3 activation tensors.
        let (fg, _) = ffn_time_s(10.0, 4.0, 8.0, true, 2.0, DeviceRates { peak_flops: 1e3, hbm_bytes_per_s: 1e3 }, &c);
        assert!((fg - (1.92 + 0.48)).abs() < 1e-9, "{fg}");
    }

    #[test]
    fn attention_by_hand() {
        let c = ModelConstants {
            gemm_max_efficiency: 1.0,
            gemm_half_efficiency_rows: 0.0,
            kernel_launch_us: 0.0,
            ..Default::default()
        };
        // 2 * 1024 tokens * 512 (half of 1024) * 256 = 268,435,456 FLOPs at 1e12.
        let t = attention_core_time_s(1024.0, 1024.0, 256.0, 1e12, &c);
        assert!((t - 268_435_456.0 / 1e12).abs() < 1e-15);
    }
}
