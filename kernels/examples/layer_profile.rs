//! Times each phase of the MoE layer (gate, dispatch, experts, combine and their backward) and
//! the expert GEMMs alone on the same shapes, to show where the layer loses to a plain GEMM.
//!
//! `cargo run --release -p switchyard-kernels --example layer_profile -- T D H E K C THREADS [pure-rust|blas]`

use std::time::Instant;
use switchyard_kernels::gate::GateGrads;
use switchyard_kernels::random::{normal_vec, seeded_rng};
use switchyard_kernels::*;

fn main() -> std::result::Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: usize| a.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (t, d, h, e, k) = (get(0, 4096), get(1, 512), get(2, 2048), get(3, 8), get(4, 2));
    let c: f32 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(1.25);
    let threads = get(6, 2);
    let backend = match a.get(7).map(String::as_str) {
        Some("blas") => GemmBackend::Blas,
        Some(_) => GemmBackend::PureRust,
        None => GemmBackend::default_for_build(),
    };
    let engine = Engine::new(Compute { backend, threads })?;
    let cfg = MoeConfig {
        d_model: d,
        d_ffn: h,
        experts: e,
        activation: Activation::Gelu,
        gate: GateConfig { top_k: k, capacity: CapacityPolicy::Fixed { factor: c }, ..GateConfig::default() },
        storage: Storage::F32,
    };
    let layer = MoeLayer::random(cfg, 1)?;
    let mut rng = seeded_rng(2);
    let x = normal_vec(&mut rng, t * d, 1.0);
    let g = normal_vec(&mut rng, t * d, 1.0);
    engine.run(|cx| -> std::result::Result<(), KernelError> {
        let mut routing = Routing::default();
        let mut plan = DispatchPlan::default();
        let mut buf = Vec::new();
        let mut cache = ExpertCache::default();
        let mut y = Vec::new();
        let mut out = vec![0.0f32; t * d];
        let mut dy = Vec::new();
        let mut dw = Vec::new();
        let mut eg = ExpertGrads::default();
        let mut dbuf = Vec::new();
        let mut dx = vec![0.0f32; t * d];
        let mut gg = GateGrads::default();
        let mut times = vec![0.0f64; 10];
        let names = [
            "route",
            "plan",
            "gather",
            "experts_fwd",
            "combine",
            "combine_bwd",
            "experts_bwd",
            "gather_bwd",
            "route_bwd",
            "expert GEMMs alone",
        ];
        let mut gemm_a = Vec::new();
        let mut gemm_c = Vec::new();
        for it in 0..3 {
            let mut lap = |i: usize, start: Instant| {
                if it > 0 {
                    times[i] += start.elapsed().as_secs_f64() * 1e3 / 2.0;
                }
            };
            let s = Instant::now();
            route(cx, &cfg.gate, &x, t, d, &layer.gate_weight, e, None, &mut routing)?;
            lap(0, s);
            let s = Instant::now();
            plan.rebuild(&routing)?;
            lap(1, s);
            let s = Instant::now();
            gather(&plan, &x, d, &mut buf)?;
            lap(2, s);
            let s = Instant::now();
            experts_forward(cx, &layer.experts, &buf, &plan.offsets, &mut cache, &mut y)?;
            lap(3, s);
            let s = Instant::now();
            combine(&plan, &routing.weight, &y, d, &mut out)?;
            lap(4, s);
            let s = Instant::now();
            combine_backward(&plan, &routing.weight, &y, d, &g, &mut dy, &mut dw)?;
            lap(5, s);
            let s = Instant::now();
            experts_backward(cx, &layer.experts, &buf, &cache, &dy, &mut eg, &mut dbuf)?;
            lap(6, s);
            let s = Instant::now();
            gather_backward(&plan, &dbuf, d, &mut dx, false)?;
            lap(7, s);
            let s = Instant::now();
            route_backward(cx, &cfg.gate, &routing, &x, d, &layer.gate_weight, &dw, &mut gg, &mut dx)?;
            lap(8, s);
            // The six expert GEMMs per expert, nothing else.
            let w = match &layer.experts.w_in {
                Stored::F32(v) => v.clone(),
                Stored::Bf16(_) => Vec::new(),
            };
            gemm_a.resize(plan.rows().max(1) * h, 0.5f32);
            gemm_c.resize(plan.rows().max(1) * h.max(d), 0.0f32);
            let s = Instant::now();
            for ex in 0..e {
                let n = plan.offsets[ex + 1] - plan.offsets[ex];
                let wd = &w[ex * d * h..(ex + 1) * d * h];
                let wo = &w[ex * d * h..(ex + 1) * d * h]; // same size [h, d]
                let xa = &buf[plan.offsets[ex] * d..plan.offsets[ex + 1] * d];
                let ha = &gemm_a[..n * h];
                let mut dwo = vec![0.0f32; h * d];
                sgemm(cx, Trans::No, Trans::No, n, h, d, xa, d, wd, h, &mut gemm_c[..n * h], h, false)?;
                sgemm(cx, Trans::No, Trans::No, n, d, h, ha, h, wo, d, &mut gemm_c[..n * d], d, false)?;
                sgemm(cx, Trans::Yes, Trans::No, h, d, n, ha, h, xa, d, &mut dwo, d, false)?;
                sgemm(cx, Trans::No, Trans::Yes, n, h, d, xa, d, wo, d, &mut gemm_c[..n * h], h, false)?;
                sgemm(cx, Trans::Yes, Trans::No, d, h, n, xa, d, ha, h, &mut dwo, h, false)?;
                sgemm(cx, Trans::No, Trans::Yes, n, d, h, ha, h, wd, h, &mut gemm_c[..n * d], d, false)?;
            }
            lap(9, s);
        }
        let total: f64 = times[..9].iter().sum();
        let flop = 12.0 * plan.rows() as f64 * d as f64 * h as f64;
        for (n, t) in names.iter().zip(&times) {
            println!("{n:>20}: {t:9.1} ms");
        }
        println!(
            "layer fwd+bwd {total:.1} ms = {:.1} GFLOP/s; expert GEMMs alone {:.1} GFLOP/s; non-GEMM share {:.1}%",
            flop / total / 1e6,
            flop / times[9] / 1e6,
            100.0 * (total - times[9]) / total
        );
        Ok(())
    })?;
    Ok(())
}
