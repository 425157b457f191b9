//! Measures the GEMM backend on the shapes the MoE layer uses (GFLOP/s per shape/transpose).
//!
//! `cargo run --release -p switchyard-kernels --example gemm_probe -- THREADS M K N [pure-rust|blas]`

use std::time::Instant;
use switchyard_kernels::{Compute, Engine, GemmBackend, Trans, sgemm};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let threads = get(0, 2);
    let (m, k, n) = (get(1, 1024), get(2, 512), get(3, 2048));
    let backend = match a.get(4).map(String::as_str) {
        Some("blas") => GemmBackend::Blas,
        Some(_) => GemmBackend::PureRust,
        None => GemmBackend::default_for_build(),
    };
    let engine = Engine::new(Compute { backend, threads })?;
    let buf_a = vec![0.5f32; m.max(k) * k.max(n).max(m)];
    let buf_b = vec![0.25f32; k.max(n) * n.max(k).max(m)];
    let mut c = vec![0.0f32; m * n];
    for (ta, tb) in [(Trans::No, Trans::No), (Trans::Yes, Trans::No), (Trans::No, Trans::Yes)] {
        let lda = if ta == Trans::No { k } else { m };
        let ldb = if tb == Trans::No { n } else { k };
        let best = engine.run(|cx| -> Result<f64, switchyard_kernels::KernelError> {
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                sgemm(cx, ta, tb, m, n, k, &buf_a, lda, &buf_b, ldb, &mut c, n, false)?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            Ok(best)
        })?;
        println!(
            "{:?} m={m} k={k} n={n} ta={ta:?} tb={tb:?}: {:.1} GFLOP/s ({:.2} ms)",
            backend,
            2.0 * (m * n * k) as f64 / best / 1e9,
            best * 1e3
        );
    }
    Ok(())
}
