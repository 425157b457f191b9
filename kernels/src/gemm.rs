//! Single-precision GEMM backends and the thread settings every kernel runs under.
//!
//! Two backends compute `C = op(A) * op(B)` (optionally `C += ...`) on row-major buffers:
//!
//! * [`GemmBackend::PureRust`] (always available): the `gemm` crate, threaded with rayon
//!   (`gemm::Parallelism::Rayon(threads)`) inside the rayon pool of an [`Engine`]; its AVX-512
//!   micro-kernels (the crate's `x86-v4` feature) are picked at run time on CPUs that have them.
//!   A transposed right operand (`A B^T`, every backward product with a weight) is first copied out
//!   transposed (one reused buffer per thread, the size of `B`, for a `B` of up to 64 MB): the crate's own
//!   packing of it is slow.
//! * [`GemmBackend::Blas`] (feature `blas`): OpenBLAS `cblas_sgemm` from the system
//!   `libopenblas`, threaded by OpenBLAS itself (`openblas_set_num_threads`).
//!
//! No oversubscription: a kernel calls a threaded [`sgemm`] only from sequential code (one GEMM at
//! a time, the parallelism inside the GEMM); inside a parallel loop (the experts' lanes) each GEMM
//! gets one thread.

use crate::error::{KernelError, Result};
use serde::{Deserialize, Serialize};

/// Which GEMM implementation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GemmBackend {
    /// The pure-Rust `gemm` crate (rayon threads). The default without the `blas` feature.
    PureRust,
    /// OpenBLAS `cblas_sgemm` (its own threads). Needs the `blas` feature; the default with it.
    Blas,
}

impl GemmBackend {
    /// The backend used when none is named: `Blas` when the `blas` feature is on, else `PureRust`.
    pub fn default_for_build() -> Self {
        if cfg!(feature = "blas") { GemmBackend::Blas } else { GemmBackend::PureRust }
    }

    /// Whether this build can run the backend.
    pub fn is_available(self) -> bool {
        match self {
            GemmBackend::PureRust => true,
            GemmBackend::Blas => cfg!(feature = "blas"),
        }
    }

    /// A short name for reports: `"pure-rust-gemm"` or `"openblas"`.
    pub fn name(self) -> &'static str {
        match self {
            GemmBackend::PureRust => "pure-rust-gemm",
            GemmBackend::Blas => "openblas",
        }
    }
}

impl Default for GemmBackend {
    fn default() -> Self {
        Self::default_for_build()
    }
}

/// The settings every kernel runs under: the GEMM backend and the number of threads.
///
/// Kernels that take a `&Compute` assume they run inside a rayon pool of `threads` threads
/// (use [`Engine::run`]); elementwise work is split over that pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compute {
    /// The GEMM backend.
    pub backend: GemmBackend,
    /// Threads for GEMMs and elementwise work (at least 1).
    pub threads: usize,
}

impl Compute {
    /// Settings with the build's default backend.
    pub fn new(threads: usize) -> Self {
        Self { backend: GemmBackend::default_for_build(), threads: threads.max(1) }
    }

    /// Checks that the backend exists in this build and `threads >= 1`.
    pub fn validate(&self) -> Result<()> {
        if !self.backend.is_available() {
            return Err(KernelError::BackendUnavailable(self.backend.name()));
        }
        if self.threads == 0 {
            return Err(KernelError::InvalidConfig { field: "threads", reason: "must be at least 1".into() });
        }
        Ok(())
    }
}

impl Default for Compute {
    fn default() -> Self {
        Self::new(1)
    }
}

/// A [`Compute`] setting together with the rayon pool of its threads.
///
/// Build one per process (or per worker) and run kernels through [`Engine::run`].
#[derive(Debug)]
pub struct Engine {
    compute: Compute,
    pool: rayon::ThreadPool,
}

impl Engine {
    /// Builds the rayon pool of `compute.threads` threads.
    pub fn new(compute: Compute) -> Result<Self> {
        compute.validate()?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(compute.threads)
            .thread_name(|i| format!("switchyard-kernels-{i}"))
            .build()
            .map_err(|e| KernelError::ThreadPool(e.to_string()))?;
        Ok(Self { compute, pool })
    }

    /// The settings.
    pub fn compute(&self) -> Compute {
        self.compute
    }

    /// Runs `f` inside the pool (so rayon work and pure-Rust GEMMs use exactly `threads` threads).
    pub fn run<R: Send>(&self, f: impl FnOnce(&Compute) -> R + Send) -> R {
        let compute = self.compute;
        self.pool.install(move || f(&compute))
    }
}

/// Whether an operand is used as stored or transposed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trans {
    /// Use the operand as stored.
    No,
    /// Use the transpose of the stored operand.
    Yes,
}

/// Elements a row-major operand of logical shape `rows x cols` needs, stored with leading
/// dimension `ld` (transposed storage when `t == Trans::Yes`).
fn needed_len(t: Trans, rows: usize, cols: usize, ld: usize) -> Option<usize> {
    let (srows, scols) = match t {
        Trans::No => (rows, cols),
        Trans::Yes => (cols, rows),
    };
    if srows == 0 || scols == 0 {
        return Some(0);
    }
    if ld < scols {
        return None;
    }
    Some((srows - 1) * ld + scols)
}

fn check_operand(operand: &'static str, t: Trans, rows: usize, cols: usize, ld: usize, len: usize) -> Result<()> {
    match needed_len(t, rows, cols, ld) {
        Some(n) if n <= len => Ok(()),
        _ => Err(KernelError::ShapeMismatch {
            operand,
            expected: format!("{rows}x{cols} (trans {t:?}) with leading dimension {ld}"),
            actual: format!("{len} elements"),
        }),
    }
}

/// Row-major single-precision GEMM: `C[m x n] = op(A)[m x k] * op(B)[k x n]`, or
/// `C += op(A) * op(B)` when `accumulate`.
///
/// `lda`, `ldb`, `ldc` are the row strides of the buffers as stored (for a transposed operand
/// the stored matrix is the transpose). Buffer sizes are checked before any unsafe call.
/// Threads: `cx.threads` (pure Rust: the current rayon pool; BLAS: OpenBLAS's own threads).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    cx: &Compute,
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> Result<()> {
    check_operand("gemm A", ta, m, k, lda, a.len())?;
    check_operand("gemm B", tb, k, n, ldb, b.len())?;
    check_operand("gemm C", Trans::No, m, n, ldc, c.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c[i * ldc..i * ldc + n].fill(0.0);
            }
        }
        return Ok(());
    }
    match cx.backend {
        GemmBackend::PureRust => {
            pure_rust(cx.threads, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
            Ok(())
        }
        GemmBackend::Blas => blas::sgemm(cx.threads, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, accumulate),
    }
}

/// Rows of `C` from which [`pure_rust`] copies a transposed right operand out before the product: there
/// the copy costs less than the `gemm` crate's strided packing of it (measured in docs/BENCHMARKS.md).
const TRANSPOSE_B_MIN_ROWS: usize = 2;

/// Largest `B` (elements) that [`pure_rust`] copies out transposed: 64 MB of `f32`. The copy's buffer stays with
/// its thread for the next call, so a larger operand (say a big vocabulary's output layer) is left to the
/// crate's own packing rather than held twice.
const TRANSPOSE_B_MAX_ELEMENTS: usize = 1 << 24;

thread_local! {
    /// The transposed right operand of [`pure_rust`], reused between calls on one thread.
    static B_TRANSPOSED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The pure-Rust product (`gemm::gemm` on row-major operands). `C = A B^T` with two rows or more (and `B` of
/// at most [`TRANSPOSE_B_MAX_ELEMENTS`]) runs as `A (B^T)` on a transposed copy of `B` (the same products and
/// sums; the choice depends on the shape only, so results do not depend on the thread count).
#[allow(clippy::too_many_arguments)]
fn pure_rust(
    threads: usize,
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    // Taken out of the thread's slot while in use: a nested call on this thread (a rayon thread may run other
    // work while it waits inside a threaded product) finds it empty and uses its own.
    let mut copy = Vec::new();
    let (tb, b, ldb) = if tb == Trans::Yes && m >= TRANSPOSE_B_MIN_ROWS && k * n <= TRANSPOSE_B_MAX_ELEMENTS {
        copy = B_TRANSPOSED.with_borrow_mut(std::mem::take);
        if copy.len() < k * n {
            copy.resize(k * n, 0.0);
        }
        // B is stored as n rows of k (row stride ldb); op(B) is its k x n transpose.
        crate::transpose::transpose_into(b, n, k, ldb, &mut copy[..k * n]);
        (Trans::No, &copy[..k * n], n)
    } else {
        (tb, b, ldb)
    };
    let (a_rs, a_cs) = match ta {
        Trans::No => (lda as isize, 1),
        Trans::Yes => (1, lda as isize),
    };
    let (b_rs, b_cs) = match tb {
        Trans::No => (ldb as isize, 1),
        Trans::Yes => (1, ldb as isize),
    };
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: `sgemm` checked that every (row, col) addressed through these strides lies
    // inside the slices (a transposed copy of `B` is exactly k x n, row stride n); `c` is borrowed
    // mutably and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    if !copy.is_empty() {
        B_TRANSPOSED.with_borrow_mut(|slot| {
            if copy.len() > slot.len() {
                *slot = copy;
            }
        });
    }
}

#[cfg(feature = "blas")]
mod blas {
    use super::Trans;
    use crate::error::{KernelError, Result};
    use std::os::raw::c_int;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const CBLAS_ROW_MAJOR: c_int = 101;
    const CBLAS_NO_TRANS: c_int = 111;
    const CBLAS_TRANS: c_int = 112;

    #[link(name = "openblas")]
    unsafe extern "C" {
        fn cblas_sgemm(
            order: c_int,
            trans_a: c_int,
            trans_b: c_int,
            m: c_int,
            n: c_int,
            k: c_int,
            alpha: f32,
            a: *const f32,
            lda: c_int,
            b: *const f32,
            ldb: c_int,
            beta: f32,
            c: *mut f32,
            ldc: c_int,
        );
        fn openblas_set_num_threads(num_threads: c_int);
    }

    static THREADS_SET: AtomicUsize = AtomicUsize::new(0);

    fn to_int(v: usize) -> Result<c_int> {
        c_int::try_from(v).map_err(|_| KernelError::InvalidConfig {
            field: "gemm dimension",
            reason: format!("{v} exceeds the BLAS integer range"),
        })
    }

    fn flag(t: Trans) -> c_int {
        match t {
            Trans::No => CBLAS_NO_TRANS,
            Trans::Yes => CBLAS_TRANS,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm(
        threads: usize,
        ta: Trans,
        tb: Trans,
        m: usize,
        n: usize,
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) -> Result<()> {
        let (mi, ni, ki) = (to_int(m)?, to_int(n)?, to_int(k)?);
        let (lda, ldb, ldc) = (to_int(lda)?, to_int(ldb)?, to_int(ldc)?);
        let threads = threads.max(1);
        if THREADS_SET.swap(threads, Ordering::Relaxed) != threads {
            // SAFETY: plain setter of OpenBLAS's global thread count.
            unsafe { openblas_set_num_threads(to_int(threads)?) };
        }
        let beta = if accumulate { 1.0 } else { 0.0 };
        // SAFETY: the caller (`super::sgemm`) checked every buffer against its shape and
        // leading dimension; `c` does not alias `a` or `b`.
        unsafe {
            cblas_sgemm(
                CBLAS_ROW_MAJOR,
                flag(ta),
                flag(tb),
                mi,
                ni,
                ki,
                1.0,
                a.as_ptr(),
                lda,
                b.as_ptr(),
                ldb,
                beta,
                c.as_mut_ptr(),
                ldc,
            );
        }
        Ok(())
    }
}

#[cfg(not(feature = "blas"))]
mod blas {
    use super::Trans;
    use crate::error::{KernelError, Result};

    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm(
        _threads: usize,
        _ta: Trans,
        _tb: Trans,
        _m: usize,
        _n: usize,
        _k: usize,
        _a: &[f32],
        _lda: usize,
        _b: &[f32],
        _ldb: usize,
        _c: &mut [f32],
        _ldc: usize,
        _accumulate: bool,
    ) -> Result<()> {
        Err(KernelError::BackendUnavailable("openblas"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive(ta: Trans, tb: Trans, m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = match ta {
                        Trans::No => a[i * k + p],
                        Trans::Yes => a[p * m + i],
                    };
                    let bv = match tb {
                        Trans::No => b[p * n + j],
                        Trans::Yes => b[j * k + p],
                    };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s;
            }
        }
        c
    }

    proptest! {
        #![proptest_config(crate::testutil::config(24))]
        /// A transposed right operand stored with a row stride above its width (the copied-out path of the
        /// pure-Rust backend), accumulating or not, against the naive product.
        #[test]
        fn strided_transposed_b(m in 1usize..30, n in 1usize..30, k in 1usize..30, pad in 0usize..4,
                                acc in any::<bool>(), threads in 1usize..3, seed in any::<u64>()) {
            let mut rng = crate::testutil::rng(seed);
            let a = crate::testutil::normal_vec(&mut rng, m * k, 1.0);
            let ldb = k + pad;
            let b = crate::testutil::normal_vec(&mut rng, n * ldb, 1.0);
            let dense: Vec<f32> = (0..n).flat_map(|j| b[j * ldb..j * ldb + k].iter().copied()).collect();
            let c0 = crate::testutil::normal_vec(&mut rng, m * n, 1.0);
            for backend in [GemmBackend::PureRust, GemmBackend::Blas] {
                if !backend.is_available() { continue; }
                let engine = Engine::new(Compute { backend, threads }).unwrap();
                let mut c = c0.clone();
                engine.run(|cx| sgemm(cx, Trans::No, Trans::Yes, m, n, k, &a, k, &b, ldb, &mut c, n, acc)).unwrap();
                let r = naive(Trans::No, Trans::Yes, m, n, k, &a, &dense);
                for i in 0..m * n {
                    let want = r[i] + if acc { c0[i] as f64 } else { 0.0 };
                    prop_assert!((c[i] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()) * (k as f64).sqrt().max(1.0));
                }
            }
        }

        #[test]
        fn sgemm_matches_naive(m in 0usize..40, n in 0usize..40, k in 0usize..40,
                               ta in any::<bool>(), tb in any::<bool>(), acc in any::<bool>(),
                               threads in 1usize..3, seed in any::<u64>()) {
            let ta = if ta { Trans::Yes } else { Trans::No };
            let tb = if tb { Trans::Yes } else { Trans::No };
            let mut rng = crate::testutil::rng(seed);
            let a = crate::testutil::normal_vec(&mut rng, m * k, 1.0);
            let b = crate::testutil::normal_vec(&mut rng, k * n, 1.0);
            let c0 = crate::testutil::normal_vec(&mut rng, m * n, 1.0);
            let lda = if ta == Trans::No { k } else { m };
            let ldb = if tb == Trans::No { n } else { k };
            for backend in [GemmBackend::PureRust, GemmBackend::Blas] {
                if !backend.is_available() { continue; }
                let engine = Engine::new(Compute { backend, threads }).unwrap();
                let mut c = c0.clone();
                engine.run(|cx| sgemm(cx, ta, tb, m, n, k, &a, lda, &b, ldb, &mut c, n, acc)).unwrap();
                let r = naive(ta, tb, m, n, k, &a, &b);
                for i in 0..m * n {
                    let want = r[i] + if acc { c0[i] as f64 } else { 0.0 };
                    prop_assert!((c[i] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()) * (k as f64).sqrt().max(1.0));
                }
            }
        }
    }

    #[test]
    fn sgemm_rejects_short_buffers() {
        let cx = Compute::new(1);
        let mut c = vec![0.0; 4];
        let err = sgemm(&cx, Trans::No, Trans::No, 2, 2, 2, &[0.0; 3], 2, &[0.0; 4], 2, &mut c, 2, false);
        assert!(matches!(err, Err(KernelError::ShapeMismatch { .. })));
    }
}
