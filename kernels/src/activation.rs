//! Elementwise activation kernels (GELU, SwiGLU) fused with bias and gradients.
//!
//! GELU is the exact (erf) form `0.5 x (1 + erf(x / sqrt 2))`; erf uses Abramowitz-Stegun
//! 7.1.26 (absolute error < 1.5e-7, the f32 rounding level) with a polynomial `exp`, written so
//! that the compiler vectorises it. On x86-64 the row kernels are compiled three times and the
//! widest the CPU runs is picked at run time: AVX-512 (16 lanes), AVX2 + FMA (8), or the baseline.
//! The source is the same and the compiler does not fuse multiply-adds on its own, so every build
//! gives the same bits.

/// Runs a row kernel through an AVX-512 or AVX2+FMA build when the CPU supports it.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn inner($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx2,fma")]
                fn avx512($($arg: $ty),*) {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the CPU supports these AVX-512 subsets, and with them AVX2 and FMA.
                    return unsafe { avx512($($arg),*) };
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) {
                    inner($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi)
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `exp(x)` for f32 with relative error ~2e-7; branch-free, vectorisable. Clamps to the
/// normal range (`exp(x)` for `x < -87` returns about `1.6e-38`, not 0).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let y = x * LOG2E + MAGIC;
    let n = y - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ni = (y.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    p * scale
}

/// `erfc(|z|)` and `exp(-z^2)` (Abramowitz-Stegun 7.1.26).
#[inline(always)]
fn erfc_abs(z: f32) -> (f32, f32) {
    const P: f32 = 0.327_591_1;
    const A1: f32 = 0.254_829_6;
    const A2: f32 = -0.284_496_74;
    const A3: f32 = 1.421_413_8;
    const A4: f32 = -1.453_152_1;
    const A5: f32 = 1.061_405_4;
    let az = z.abs();
    let t = 1.0 / (1.0 + P * az);
    let poly = t * (A1 + t * (A2 + t * (A3 + t * (A4 + t * A5))));
    let e = exp_f32(-(z * z));
    (poly * e, e)
}

/// `1 + erf(z)` without cancellation for negative `z`, and `exp(-z^2)`.
#[inline(always)]
fn one_plus_erf(z: f32) -> (f32, f32) {
    let (q, e) = erfc_abs(z);
    (if z >= 0.0 { 2.0 - q } else { q }, e)
}

/// Exact-form GELU of one value.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let (c, _) = one_plus_erf(x * FRAC_1_SQRT_2);
    0.5 * x * c
}

/// Derivative of [`gelu`]: `0.5 (1 + erf(x / sqrt 2)) + x * phi(x)`.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    let (c, e) = one_plus_erf(x * FRAC_1_SQRT_2);
    0.5 * c + x * INV_SQRT_2PI * e
}

/// Logistic sigmoid.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

simd_dispatch! {
    /// For each row of `h` (`cols` wide): `h += bias` (if any), `a = gelu(h)`.
    pub fn bias_gelu_forward(h: &mut [f32], a: &mut [f32], bias: Option<&[f32]>, cols: usize) {
        if cols == 0 {
            return;
        }
        for (hr, ar) in h.chunks_exact_mut(cols).zip(a.chunks_exact_mut(cols)) {
            match bias {
                Some(b) => {
                    for ((hv, av), &bv) in hr.iter_mut().zip(ar.iter_mut()).zip(b) {
                        let x = *hv + bv;
                        *hv = x;
                        *av = gelu(x);
                    }
                }
                None => {
                    for (hv, av) in hr.iter().zip(ar.iter_mut()) {
                        *av = gelu(*hv);
                    }
                }
            }
        }
    }
}

simd_dispatch! {
    /// `g *= gelu'(h)` elementwise over rows of `cols`, adding each column's sum of the new `g`
    /// into `col_sum` (row order).
    pub fn gelu_backward(h: &[f32], g: &mut [f32], col_sum: &mut [f32], cols: usize) {
        if cols == 0 {
            return;
        }
        for (hr, gr) in h.chunks_exact(cols).zip(g.chunks_exact_mut(cols)) {
            for ((gv, &hv), s) in gr.iter_mut().zip(hr).zip(col_sum.iter_mut()) {
                let d = *gv * gelu_grad(hv);
                *gv = d;
                *s += d;
            }
        }
    }
}

simd_dispatch! {
    /// SwiGLU forward over rows: `gu` rows are `[gate (cols) | up (cols)]`,
    /// `a = silu(gate) * up` (`cols` wide).
    pub fn swiglu_forward(gu: &[f32], a: &mut [f32], cols: usize) {
        if cols == 0 {
            return;
        }
        for (r, ar) in gu.chunks_exact(2 * cols).zip(a.chunks_exact_mut(cols)) {
            let (g, u) = r.split_at(cols);
            for ((av, &gv), &uv) in ar.iter_mut().zip(g).zip(u) {
                *av = gv * sigmoid(gv) * uv;
            }
        }
    }
}

simd_dispatch! {
    /// SwiGLU backward over rows: from `da` (`cols` wide) and the saved `gu`, writes
    /// `dgu = [da * up * silu'(gate) | da * silu(gate)]` (`2 * cols` wide).
    pub fn swiglu_backward(gu: &[f32], da: &[f32], dgu: &mut [f32], cols: usize) {
        if cols == 0 {
            return;
        }
        for ((r, dar), dr) in gu
            .chunks_exact(2 * cols)
            .zip(da.chunks_exact(cols))
            .zip(dgu.chunks_exact_mut(2 * cols))
        {
            let (g, u) = r.split_at(cols);
            let (dg, du) = dr.split_at_mut(cols);
            for i in 0..cols {
                let gv = g[i];
                let s = sigmoid(gv);
                let silu = gv * s;
                dg[i] = dar[i] * u[i] * (s * (1.0 + gv * (1.0 - s)));
                du[i] = dar[i] * silu;
            }
        }
    }
}

simd_dispatch! {
    /// Adds each column's sum of `m` (rows of `cols`) into `col_sum`, in row order.
    pub fn add_col_sums(m: &[f32], col_sum: &mut [f32], cols: usize) {
        if cols == 0 {
            return;
        }
        for r in m.chunks_exact(cols) {
            for (s, &v) in col_sum.iter_mut().zip(r) {
                *s += v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{erf64, gelu_grad64, gelu64};

    #[test]
    fn exp_matches_std() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((got - want).abs() / want);
            x += 0.01;
        }
        assert!(worst < 5e-7, "exp relative error {worst}");
    }

    #[test]
    fn gelu_and_grad_match_f64() {
        let mut x = -12.0f32;
        while x < 12.0 {
            let g = gelu(x) as f64;
            let want = gelu64(x as f64);
            assert!((g - want).abs() < 2e-7 * (1.0 + (x as f64).abs()), "gelu({x})");
            let d = gelu_grad(x) as f64;
            let want = gelu_grad64(x as f64);
            assert!((d - want).abs() < 1e-6, "gelu'({x}) = {d} vs {want}");
            x += 0.013;
        }
        assert!((erf64(0.5) - 0.520_499_877_8).abs() < 1e-9);
    }

    #[test]
    fn kernels_agree_with_scalar_loops() {
        let cols = 37;
        let rows = 3;
        let h0: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
        let b: Vec<f32> = (0..cols).map(|i| i as f32 * 0.01).collect();
        let mut h = h0.clone();
        let mut a = vec![0.0; rows * cols];
        bias_gelu_forward(&mut h, &mut a, Some(&b), cols);
        for i in 0..rows * cols {
            let x = h0[i] + b[i % cols];
            assert_eq!(h[i], x);
            assert_eq!(a[i], gelu(x));
        }
        let mut g = vec![1.0; rows * cols];
        let mut s = vec![0.0; cols];
        gelu_backward(&h, &mut g, &mut s, cols);
        for j in 0..cols {
            let want: f32 = (0..rows).map(|r| gelu_grad(h[r * cols + j])).sum();
            assert!((s[j] - want).abs() < 1e-5);
        }
        let gu: Vec<f32> = (0..rows * 2 * cols).map(|i| (i as f32 * 0.7).cos() * 3.0).collect();
        let mut a = vec![0.0; rows * cols];
        swiglu_forward(&gu, &mut a, cols);
        let x = gu[2 * cols + 5];
        let u = gu[2 * cols + cols + 5];
        assert!((a[cols + 5] - x * sigmoid(x) * u).abs() < 1e-6);
    }
}
