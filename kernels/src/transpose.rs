//! Out-of-place transpose of a row-major `f32` matrix, in 8 x 8 blocks (AVX where the CPU has it).
//!
//! Why: the `gemm` crate packs a transposed right-hand operand (`C = A B^T`, as in every backward
//! product with a weight) with a strided gather, ~3 ms per million elements on these machines; copying
//! `B^T` out in 8 x 8 register blocks takes 0.36-0.5 ms, after which the product is a plain one (the
//! pure-Rust backend in [`crate::gemm`] does so; docs/BENCHMARKS.md).

/// `dst[c * rows + r] = src[r * ld + c]` for `r < rows`, `c < cols`: the `cols x rows` transpose of the
/// `rows x cols` matrix stored in `src` with row stride `ld >= cols`. `dst` must hold `rows * cols`
/// elements and `src` `(rows - 1) * ld + cols` (checked by the caller; this panics otherwise).
pub(crate) fn transpose_into(src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [f32]) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(ld >= cols && src.len() >= (rows - 1) * ld + cols && dst.len() >= rows * cols);
    // The grid of whole 8 x 8 blocks (none without AVX).
    let (r8, c8) = if avx() { (rows / 8 * 8, cols / 8 * 8) } else { (0, 0) };
    #[cfg(target_arch = "x86_64")]
    if r8 > 0 && c8 > 0 {
        // SAFETY: the CPU supports AVX (`avx()`), the grid lies inside the matrix and the bounds were
        // asserted above.
        unsafe { blocks_avx(src, rows, ld, dst, r8, c8) };
    }
    edges(src, rows, cols, ld, dst, r8, c8);
}

/// Whether the CPU runs AVX.
fn avx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The elements outside the `r8 x c8` block grid: columns from `c8` in every row, then rows from `r8` in
/// the first `c8` columns.
fn edges(src: &[f32], rows: usize, cols: usize, ld: usize, dst: &mut [f32], r8: usize, c8: usize) {
    for r in 0..rows {
        for c in c8..cols {
            dst[c * rows + r] = src[r * ld + c];
        }
    }
    for r in r8..rows {
        for c in 0..c8 {
            dst[c * rows + r] = src[r * ld + c];
        }
    }
}

/// The 8 x 8 blocks of the `r8 x c8` grid: eight rows loaded as vectors, transposed in registers, stored as
/// eight rows of `dst`; in tiles of 128 x 128 elements (64 KB read and written: matrices whose rows are a power of two
/// apart would otherwise evict each other's lines), down each tile's block columns.
///
/// # Safety
/// The CPU must support AVX, `r8 <= rows` and `c8 <= ld` multiples of 8 with `src.len() >= (rows - 1) * ld +
/// c8` and `dst.len() >= rows * c8`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn blocks_avx(src: &[f32], rows: usize, ld: usize, dst: &mut [f32], r8: usize, c8: usize) {
    use std::arch::x86_64::*;
    const TILE: usize = 128;
    for (ct, rt) in (0..c8).step_by(TILE).flat_map(|ct| (0..r8).step_by(TILE).map(move |rt| (ct, rt))) {
        for c0 in (ct..(ct + TILE).min(c8)).step_by(8) {
            for r0 in (rt..(rt + TILE).min(r8)).step_by(8) {
                // SAFETY: rows r0..r0 + 8 <= r8 and columns c0..c0 + 8 <= c8 are inside `src` (row stride ld)
                // and their transpose inside `dst` (row stride rows), by the caller's bounds.
                unsafe {
                    let p = src.as_ptr().add(r0 * ld + c0);
                    let r = [0, 1, 2, 3, 4, 5, 6, 7].map(|k| _mm256_loadu_ps(p.add(k * ld)));
                    // Pairs of rows interleaved, then groups of four, then the 128-bit halves exchanged.
                    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                    let o = [
                        _mm256_permute2f128_ps::<0x20>(s0, s4),
                        _mm256_permute2f128_ps::<0x20>(s1, s5),
                        _mm256_permute2f128_ps::<0x20>(s2, s6),
                        _mm256_permute2f128_ps::<0x20>(s3, s7),
                        _mm256_permute2f128_ps::<0x31>(s0, s4),
                        _mm256_permute2f128_ps::<0x31>(s1, s5),
                        _mm256_permute2f128_ps::<0x31>(s2, s6),
                        _mm256_permute2f128_ps::<0x31>(s3, s7),
                    ];
                    let q = dst.as_mut_ptr().add(c0 * rows + r0);
                    for (k, v) in o.into_iter().enumerate() {
                        _mm256_storeu_ps(q.add(k * rows), v);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(crate::testutil::config(64))]
        /// Every element lands where the definition puts it, for any shape (block multiples and
        /// remainders) and row stride.
        #[test]
        fn transpose_is_the_definition(rows in 0usize..40, cols in 0usize..40, pad in 0usize..5, seed in any::<u32>()) {
            let ld = cols + pad;
            let src: Vec<f32> = (0..rows * ld).map(|i| (i as u32 ^ seed) as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_into(&src, rows, cols, ld, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    prop_assert_eq!(dst[c * rows + r].to_bits(), src[r * ld + c].to_bits());
                }
            }
        }
    }

    #[test]
    fn empty_and_large() {
        transpose_into(&[], 0, 5, 5, &mut []);
        let (rows, cols) = (203, 517);
        let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let mut dst = vec![0.0; rows * cols];
        transpose_into(&src, rows, cols, cols, &mut dst);
        assert!((0..rows).all(|r| (0..cols).all(|c| dst[c * rows + r] == src[r * cols + c])));
    }
}
