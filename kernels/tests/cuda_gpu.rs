//! The CUDA kernels and the GPU layer against the CPU kernels and the f64 references.
//!
//! Needs a CUDA driver, a GPU, libnvrtc and libcublas; without them each test prints
//! `skipped: <reason>` and passes (unless `SWITCHYARD_REQUIRE_GPU=1`, which makes that a failure).
//!
//! Routing decisions are compared against the reference *given the GPU's probabilities* (as the
//! CPU tests do with the CPU's): the GPU's `expf` and the CPU's `exp` may differ in the last bit,
//! which can flip the order of two experts whose probabilities tie to within that bit.
#![cfg(feature = "cuda")]

use std::sync::Arc;
use switchyard_kernels::cuda::blas::{DeviceExperts, row_expert_from_offsets, sgemm};
use switchyard_kernels::cuda::{AdamW, CudaDevice, CudaError, CudaMoeLayer, GateBuffers, RowMaps, probe};
use switchyard_kernels::random::{normal_vec, seeded_rng, uniform_vec};
use switchyard_kernels::reference::{self, RefLayer};
use switchyard_kernels::{
    Activation, CapacityPolicy, Compute, DispatchPlan, DropPolicy, ExpertCache, ExpertGrads, ExpertParams, GateConfig,
    GateGrads, KernelError, MoeConfig, MoeGrads, MoeLayer, MoeState, Routing, Storage, Trans, combine,
    combine_backward, experts_backward, experts_forward, gather, gather_backward, route, route_backward,
    sgemm as cpu_sgemm,
};

/// The GPU, or `None` (after printing why) when this machine has none.
fn gpu() -> Option<Arc<CudaDevice>> {
    let required = std::env::var("SWITCHYARD_REQUIRE_GPU").is_ok_and(|v| v == "1");
    match probe().check(0) {
        Ok(()) => Some(Arc::new(CudaDevice::open(0).unwrap_or_else(|e| panic!("a GPU is present but: {e}")))),
        Err(e) => {
            assert!(!required, "SWITCHYARD_REQUIRE_GPU=1 but: {e}");
            println!("skipped: {e}");
            None
        }
    }
}

/// Largest `|a - b| / (|b| + 0.1 max|b| + atol)`: relative to each element, with a slack of a
/// tenth of the largest magnitude for elements that are sums cancelling to near zero (two f32
/// summation orders differ there by the rounding of the terms, not of the result).
fn rel_err64(a: &[f32], b: &[f64], atol: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(&x, &y)| (x as f64 - y).abs() / (y.abs() + 0.1 * scale + atol)).fold(0.0, f64::max)
}

fn rel_err(a: &[f32], b: &[f32], atol: f64) -> f64 {
    rel_err64(a, &b.iter().map(|&v| v as f64).collect::<Vec<_>>(), atol)
}

/// Asserts [`rel_err`] below 1e-4.
fn assert_close(name: &str, gpu: &[f32], cpu: &[f32], atol: f64) {
    let e = rel_err(gpu, cpu, atol);
    assert!(e < 1e-4, "{name}: relative error {e:e}");
}

#[test]
fn gemm_every_transpose_matches_cpu() {
    let Some(dev) = gpu() else { return };
    let cx = Compute::new(1);
    let mut r = seeded_rng(1);
    for (i, &(m, n, k)) in [(1, 1, 1), (7, 5, 3), (33, 17, 65), (64, 128, 40)].iter().enumerate() {
        for ta in [Trans::No, Trans::Yes] {
            for tb in [Trans::No, Trans::Yes] {
                for beta in [0.0f32, 1.0] {
                    let (lda, ldb) = (if ta == Trans::No { k } else { m }, if tb == Trans::No { n } else { k });
                    let a = normal_vec(&mut r, m * k, 1.0);
                    let b = normal_vec(&mut r, k * n, 1.0);
                    let c0 = normal_vec(&mut r, m * n, 1.0);
                    let mut want = c0.clone();
                    cpu_sgemm(&cx, ta, tb, m, n, k, &a, lda, &b, ldb, &mut want, n, beta == 1.0).unwrap();
                    let (da, db) = (dev.upload(&a).unwrap(), dev.upload(&b).unwrap());
                    let mut dc = dev.upload(&c0).unwrap();
                    sgemm(&dev, ta, tb, m, n, k, &da, lda, &db, ldb, beta, &mut dc, n).unwrap();
                    let got = dev.download(&dc, m * n).unwrap();
                    assert_close(&format!("gemm case {i} {ta:?} {tb:?} beta {beta}"), &got, &want, 1e-3);
                }
            }
        }
    }
    let (a, b) = (dev.zeros::<f32>(4).unwrap(), dev.zeros::<f32>(4).unwrap());
    let mut c = dev.zeros::<f32>(4).unwrap();
    let e = sgemm(&dev, Trans::No, Trans::No, 3, 3, 3, &a, 3, &b, 3, 0.0, &mut c, 3).unwrap_err();
    assert!(matches!(e, CudaError::Kernel(KernelError::ShapeMismatch { operand: "gemm A", .. })), "{e}");
}

fn gate_config(k: usize, renormalize: bool, capacity: CapacityPolicy, drop_policy: DropPolicy) -> GateConfig {
    GateConfig {
        top_k: k,
        renormalize,
        capacity,
        drop_policy,
        aux_loss_weight: 0.01,
        z_loss_weight: 0.001,
        noise_std: 0.0,
        noise_seed: 0,
    }
}

/// Router kernels (softmax/top-k, positions, row maps, loss sums, backward) vs the CPU router and
/// the reference; then dispatch and combine (both directions) on the resulting maps vs the CPU.
#[test]
fn gate_and_dispatch_kernels_match_cpu() {
    let Some(dev) = gpu() else { return };
    let cases = [
        (1usize, 1usize, 1usize, false, false, CapacityPolicy::Fixed { factor: 1.0 }, DropPolicy::ArrivalOrder, 3usize),
        (37, 8, 2, true, true, CapacityPolicy::Fixed { factor: 1.0 }, DropPolicy::ArrivalOrder, 5),
        (300, 16, 16, false, true, CapacityPolicy::Fixed { factor: 0.5 }, DropPolicy::BatchPrioritized, 3),
        (513, 7, 3, true, false, CapacityPolicy::Dropless, DropPolicy::BatchPrioritized, 9),
        (2000, 64, 5, true, true, CapacityPolicy::CappedDynamic { max_factor: 0.3 }, DropPolicy::ArrivalOrder, 2),
        (1500, 8, 2, false, false, CapacityPolicy::Fixed { factor: 1.25 }, DropPolicy::ArrivalOrder, 16),
    ];
    let cx = Compute::new(1);
    for (case, &(t_n, e_n, k, renorm, use_bias, capacity, drop, d)) in cases.iter().enumerate() {
        let cfg = gate_config(k, renorm, capacity, drop);
        let mut r = seeded_rng(100 + case as u64);
        let x = normal_vec(&mut r, t_n * d, 1.0);
        let wg = normal_vec(&mut r, d * e_n, 1.0);
        let bias = normal_vec(&mut r, e_n, 0.05);
        let bias = use_bias.then_some(&bias[..]);
        let mut cpu = Routing::default();
        route(&cx, &cfg, &x, t_n, d, &wg, e_n, bias, &mut cpu).unwrap();

        // softmax + top-k on the CPU's logits
        let logits = dev.upload(&cpu.logits).unwrap();
        let bias_dev = bias.map(|b| dev.upload(b).unwrap());
        let mut gb = GateBuffers::new(&dev, t_n, e_n, k).unwrap();
        dev.gate_softmax_topk(&logits, t_n, e_n, k, bias_dev.as_ref(), renorm, &mut gb).unwrap();
        let probs = dev.download(&gb.probs, t_n * e_n).unwrap();
        let lse = dev.download(&gb.logsumexp, t_n).unwrap();
        let idx = dev.download(&gb.expert_index, t_n * k).unwrap();
        let weight = dev.download(&gb.weight, t_n * k).unwrap();
        let demand: Vec<usize> = dev.download(&gb.demand, e_n).unwrap().iter().map(|&v| v as usize).collect();
        assert_eq!(dev.download(&gb.status, 1).unwrap(), vec![0], "case {case}: status");
        assert_close(&format!("case {case} probs"), &probs, &cpu.probs, 1e-6);
        assert_close(&format!("case {case} logsumexp"), &lse, &cpu.logsumexp, 1e-6);
        let want = reference::route(&cfg, &x, t_n, d, &wg, e_n, bias, Some(&probs));
        assert_eq!(idx, want.expert_index, "case {case}: expert choices");
        assert!(rel_err64(&weight, &want.weight, 1e-6) < 1e-4, "case {case}: weights");
        let mut want_demand = vec![0usize; e_n];
        for &e in &idx {
            want_demand[e as usize] += 1;
        }
        assert_eq!(demand, want_demand, "case {case}: demand");

        // positions and row maps
        let cap = cfg.capacity.capacity(t_n, k, e_n, &demand).unwrap();
        assert_eq!(cap, want.capacity, "case {case}: capacity");
        let order_dev = if drop == DropPolicy::BatchPrioritized {
            let top1 = dev.download(&gb.top1, t_n).unwrap();
            let mut o: Vec<u32> = (0..t_n as u32).collect();
            o.sort_by(|&a, &b| top1[b as usize].total_cmp(&top1[a as usize]));
            Some(dev.upload(&o).unwrap())
        } else {
            None
        };
        let mut position = dev.zeros::<i32>(t_n * k).unwrap();
        dev.gate_positions(&gb.expert_index, order_dev.as_ref(), t_n, k, e_n, cap, &mut position).unwrap();
        let pos: Vec<Option<u32>> =
            dev.download(&position, t_n * k).unwrap().iter().map(|&p| u32::try_from(p).ok()).collect();
        assert_eq!(pos, want.position, "case {case}: positions");
        let kept: Vec<usize> = demand.iter().map(|&v| v.min(cap)).collect();
        let routing = Routing {
            tokens: t_n,
            experts: e_n,
            top_k: k,
            capacity: cap,
            logits: cpu.logits.clone(),
            probs: probs.clone(),
            logsumexp: lse.clone(),
            expert_index: idx.clone(),
            weight: weight.clone(),
            position: pos.clone(),
            demand: demand.clone(),
            kept: kept.clone(),
            aux_loss: 0.0,
            z_loss: 0.0,
        };
        let plan = DispatchPlan::from_routing(&routing).unwrap();
        let n = plan.rows();
        let offsets: Vec<u32> = plan.offsets.iter().map(|&o| o as u32).collect();
        let offsets_dev = dev.upload(&offsets).unwrap();
        let mut maps = RowMaps::new(&dev, t_n * k, n).unwrap();
        dev.build_rows(&gb.expert_index, &position, &offsets_dev, t_n, k, e_n, n, &mut maps).unwrap();
        let arow: Vec<Option<u32>> =
            dev.download(&maps.assignment_row, t_n * k).unwrap().iter().map(|&v| u32::try_from(v).ok()).collect();
        assert_eq!(arow, plan.assignment_row, "case {case}: assignment rows");
        assert_eq!(dev.download(&maps.row_token, n).unwrap(), plan.row_token, "case {case}: row tokens");
        assert_eq!(dev.download(&maps.row_assignment, n).unwrap(), plan.row_assignment, "case {case}: row assignments");
        assert_eq!(dev.download(&maps.row_expert, n).unwrap(), row_expert_from_offsets(&plan.offsets));

        // loss sums
        let mut stats = dev.zeros::<f64>(e_n + 1).unwrap();
        dev.gate_loss_stats(&gb.probs, &gb.logsumexp, t_n, e_n, &mut stats).unwrap();
        let stats = dev.download(&stats, e_n + 1).unwrap();
        for e in 0..=e_n {
            let want: f64 =
                (0..t_n).map(|t| if e < e_n { probs[t * e_n + e] as f64 } else { (lse[t] as f64).powi(2) }).sum();
            assert!((stats[e] - want).abs() <= 1e-9 * (1.0 + want.abs()), "case {case}: loss sum {e}");
        }

        // gate backward vs the CPU's route_backward on the same routing
        let d_weight = normal_vec(&mut r, t_n * k, 1.0);
        let mut cpu_grads = GateGrads::default();
        let mut cpu_dx = vec![0.0f32; t_n * d];
        route_backward(&cx, &cfg, &routing, &x, d, &wg, &d_weight, &mut cpu_grads, &mut cpu_dx).unwrap();
        let aux_coef: Vec<f32> = demand
            .iter()
            .map(|&dm| (cfg.aux_loss_weight as f64 * e_n as f64 * (dm as f64 / (t_n * k) as f64) / t_n as f64) as f32)
            .collect();
        let z_coef = 2.0 * cfg.z_loss_weight / t_n as f32;
        let mut d_logits = dev.zeros::<f32>(t_n * e_n).unwrap();
        dev.gate_backward(
            &gb.probs,
            &gb.expert_index,
            &dev.upload(&d_weight).unwrap(),
            &gb.logsumexp,
            &dev.upload(&aux_coef).unwrap(),
            t_n,
            e_n,
            k,
            renorm,
            z_coef,
            &mut d_logits,
        )
        .unwrap();
        let got = dev.download(&d_logits, t_n * e_n).unwrap();
        assert_close(&format!("case {case} d_logits"), &got, &cpu_grads.d_logits, 1e-4);

        // dispatch / combine, both directions
        let xd = dev.upload(&x).unwrap();
        let y = normal_vec(&mut r, n * d, 1.0);
        let g = normal_vec(&mut r, t_n * d, 1.0);
        let (yd, gd) = (dev.upload(&y).unwrap(), dev.upload(&g).unwrap());
        let mut buf = dev.zeros::<f32>(n * d).unwrap();
        dev.dispatch_gather(&xd, &maps.row_token, t_n, n, d, &mut buf).unwrap();
        let mut cpu_buf = Vec::new();
        gather(&plan, &x, d, &mut cpu_buf).unwrap();
        assert_eq!(dev.download(&buf, n * d).unwrap(), cpu_buf, "case {case}: gather");
        let mut out = dev.zeros::<f32>(t_n * d).unwrap();
        dev.combine_forward(&maps.assignment_row, &gb.weight, &yd, t_n, k, n, d, &mut out).unwrap();
        let mut cpu_out = vec![0.0f32; t_n * d];
        combine(&plan, &weight, &y, d, &mut cpu_out).unwrap();
        assert_close(&format!("case {case} combine"), &dev.download(&out, t_n * d).unwrap(), &cpu_out, 1e-5);
        let (mut dy, mut dw) = (dev.zeros::<f32>(n * d).unwrap(), dev.zeros::<f32>(t_n * k).unwrap());
        dev.combine_backward_rows(&maps.row_assignment, &gb.weight, &gd, t_n, k, n, d, &mut dy).unwrap();
        dev.combine_backward_weights(&maps.assignment_row, &yd, &gd, t_n, k, n, d, &mut dw).unwrap();
        let (mut cpu_dy, mut cpu_dw) = (Vec::new(), Vec::new());
        combine_backward(&plan, &weight, &y, d, &g, &mut cpu_dy, &mut cpu_dw).unwrap();
        assert_close(&format!("case {case} d_y"), &dev.download(&dy, n * d).unwrap(), &cpu_dy, 1e-6);
        assert_close(&format!("case {case} d_weight"), &dev.download(&dw, t_n * k).unwrap(), &cpu_dw, 1e-4);
        for accumulate in [false, true] {
            let base = normal_vec(&mut r, t_n * d, 1.0);
            let mut dx = dev.upload(&base).unwrap();
            dev.gather_backward(&maps.assignment_row, &yd, t_n, k, n, d, accumulate, &mut dx).unwrap();
            let mut cpu_dx = base.clone();
            gather_backward(&plan, &y, d, &mut cpu_dx, accumulate).unwrap();
            assert_close(&format!("case {case} gather backward"), &dev.download(&dx, t_n * d).unwrap(), &cpu_dx, 1e-5);
        }
    }
}

fn random_offsets(r: &mut switchyard_kernels::random::SeededRng, experts: usize, total: usize) -> Vec<usize> {
    let mut cuts: Vec<usize> = uniform_vec(r, experts.saturating_sub(1), 0.0, total as f32 + 0.999)
        .iter()
        .map(|&v| (v as usize).min(total))
        .collect();
    cuts.sort_unstable();
    let mut off = vec![0];
    off.extend(cuts);
    off.push(total);
    off
}

/// Grouped expert FFNs (GELU with biases, SwiGLU; empty experts, uneven counts) vs the CPU.
#[test]
fn experts_match_cpu() {
    let Some(dev) = gpu() else { return };
    let cx = Compute::new(1);
    for (case, &(e_n, rows, d, h, act)) in [
        (1usize, 1usize, 1usize, 1usize, Activation::Gelu),
        (4, 50, 8, 12, Activation::Gelu),
        (4, 50, 8, 12, Activation::SwiGlu),
        (11, 300, 33, 65, Activation::Gelu),
        (11, 300, 33, 65, Activation::SwiGlu),
        (3, 0, 4, 4, Activation::Gelu),
    ]
    .iter()
    .enumerate()
    {
        let mut r = seeded_rng(200 + case as u64);
        let params = ExpertParams::random(act, e_n, d, h, Storage::F32, case as u64).unwrap();
        let mut offsets = random_offsets(&mut r, e_n, rows);
        if e_n > 2 {
            offsets[2] = offsets[1]; // an empty expert
        }
        let x = normal_vec(&mut r, rows * d, 1.0);
        let dy = normal_vec(&mut r, rows * d, 1.0);
        let (mut cache, mut y, mut grads, mut dx) =
            (ExpertCache::default(), Vec::new(), ExpertGrads::default(), Vec::new());
        experts_forward(&cx, &params, &x, &offsets, &mut cache, &mut y).unwrap();
        experts_backward(&cx, &params, &x, &cache, &dy, &mut grads, &mut dx).unwrap();

        let de = DeviceExperts::from_params(&dev, &params).unwrap();
        let off_u32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
        let off_dev = dev.upload(&off_u32).unwrap();
        let row_expert = dev.upload(&row_expert_from_offsets(&offsets)).unwrap();
        let (xd, dyd) = (dev.upload(&x).unwrap(), dev.upload(&dy).unwrap());
        let mut acts = de.new_activations(&dev).unwrap();
        let mut yd = dev.zeros::<f32>(1).unwrap();
        de.forward(&dev, &xd, &offsets, &off_dev, &row_expert, &mut acts, &mut yd).unwrap();
        let mut g = de.new_grads(&dev).unwrap();
        let mut dxd = dev.zeros::<f32>(1).unwrap();
        de.backward(&dev, &xd, &offsets, &off_dev, &acts, &dyd, &mut g, &mut dxd).unwrap();
        let gh = g.to_host(&dev, &de).unwrap();
        let name = |what: &str| format!("case {case} ({act:?}) {what}");
        assert_close(&name("output"), &dev.download(&yd, rows * d).unwrap(), &y, 1e-3);
        assert_close(&name("d_input"), &dev.download(&dxd, rows * d).unwrap(), &dx, 1e-3);
        assert_close(&name("d_w_in"), &gh.d_w_in, &grads.d_w_in, 1e-3);
        assert_close(&name("d_w_out"), &gh.d_w_out, &grads.d_w_out, 1e-3);
        assert_close(&name("d_b_in"), &gh.d_b_in, &grads.d_b_in, 1e-3);
        assert_close(&name("d_b_out"), &gh.d_b_out, &grads.d_b_out, 1e-3);
    }
}

/// GELU (exact erf form) and SwiGLU elementwise kernels vs the f64 formulas over a wide range.
#[test]
fn activations_match_f64() {
    let Some(dev) = gpu() else { return };
    let (rows, cols) = (3usize, 2001usize);
    let h: Vec<f32> = (0..rows * cols).map(|i| -12.0 + 24.0 * i as f32 / (rows * cols) as f32).collect();
    let bias = vec![0.25f32; 2 * cols];
    let row_expert = dev.upload(&[0u32, 1, 0]).unwrap();
    let mut hd = dev.upload(&h).unwrap();
    let mut ad = dev.zeros::<f32>(rows * cols).unwrap();
    dev.bias_gelu_forward(&mut hd, &mut ad, Some(&dev.upload(&bias).unwrap()), &row_expert, rows, cols, 2).unwrap();
    let a = dev.download(&ad, rows * cols).unwrap();
    for (i, &v) in a.iter().enumerate() {
        let x = h[i] as f64 + 0.25;
        assert!((v as f64 - reference::gelu64(x)).abs() < 2e-6 * (1.0 + x.abs()), "gelu({x}) = {v}");
    }
    let mut gd = dev.upload(&vec![1.0f32; rows * cols]).unwrap();
    dev.gelu_backward(&hd, &mut gd, rows, cols).unwrap();
    for (i, &v) in dev.download(&gd, rows * cols).unwrap().iter().enumerate() {
        let x = h[i] as f64 + 0.25;
        assert!((v as f64 - reference::gelu_grad64(x)).abs() < 2e-6, "gelu'({x}) = {v}");
    }
    let gu: Vec<f32> = (0..rows * 2 * cols).map(|i| ((i as f32) * 0.37).sin() * 6.0).collect();
    let da: Vec<f32> = (0..rows * cols).map(|i| ((i as f32) * 0.11).cos()).collect();
    let gud = dev.upload(&gu).unwrap();
    let mut a = dev.zeros::<f32>(rows * cols).unwrap();
    let mut dgu = dev.zeros::<f32>(rows * 2 * cols).unwrap();
    dev.swiglu_forward(&gud, &mut a, rows, cols).unwrap();
    dev.swiglu_backward(&gud, &dev.upload(&da).unwrap(), &mut dgu, rows, cols).unwrap();
    let (a, dgu) = (dev.download(&a, rows * cols).unwrap(), dev.download(&dgu, rows * 2 * cols).unwrap());
    for r in 0..rows {
        for c in 0..cols {
            let (g, u, dav) =
                (gu[r * 2 * cols + c] as f64, gu[r * 2 * cols + cols + c] as f64, da[r * cols + c] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            let close = |got: f32, want: f64| (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs());
            assert!(close(a[r * cols + c], g * s * u));
            assert!(close(dgu[r * 2 * cols + c], dav * u * s * (1.0 + g * (1.0 - s))));
            assert!(close(dgu[r * 2 * cols + cols + c], dav * g * s));
        }
    }
}

#[test]
fn adamw_matches_the_formula() {
    let Some(dev) = gpu() else { return };
    let n = 10_007;
    let mut r = seeded_rng(9);
    let p0 = normal_vec(&mut r, n, 1.0);
    let g = normal_vec(&mut r, n, 1.0);
    let cfg = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    let (mut p, mut m, mut v) = (dev.upload(&p0).unwrap(), dev.zeros::<f32>(n).unwrap(), dev.zeros::<f32>(n).unwrap());
    let gd = dev.upload(&g).unwrap();
    let (mut ph, mut mh, mut vh) = (p0.iter().map(|&x| x as f64).collect::<Vec<_>>(), vec![0.0f64; n], vec![0.0f64; n]);
    for step in 1..=3u64 {
        dev.adamw_step(&mut p, &gd, &mut m, &mut v, n, &cfg, step).unwrap();
        let (b1, b2) = (cfg.beta1 as f64, cfg.beta2 as f64);
        for i in 0..n {
            let gi = g[i] as f64;
            ph[i] -= cfg.lr as f64 * cfg.weight_decay as f64 * ph[i];
            mh[i] = b1 * mh[i] + (1.0 - b1) * gi;
            vh[i] = b2 * vh[i] + (1.0 - b2) * gi * gi;
            let (mhat, vhat) = (mh[i] / (1.0 - b1.powi(step as i32)), vh[i] / (1.0 - b2.powi(step as i32)));
            ph[i] -= cfg.lr as f64 * mhat / (vhat.sqrt() + cfg.eps as f64);
        }
    }
    let got = dev.download(&p, n).unwrap();
    assert!(rel_err64(&got, &ph, 1e-3) < 1e-4);
    assert!(dev.adamw_step(&mut p, &gd, &mut m, &mut v, n, &cfg, 0).is_err());
    assert!(dev.adamw_step(&mut p, &gd, &mut m, &mut v, n + 1, &cfg, 1).is_err());
    let bad = AdamW { eps: 0.0, ..cfg };
    assert!(dev.adamw_step(&mut p, &gd, &mut m, &mut v, n, &bad, 1).is_err());
}

#[allow(clippy::too_many_arguments)]
fn make_layer(
    experts: usize,
    k: usize,
    d: usize,
    h: usize,
    act: Activation,
    capacity: CapacityPolicy,
    drop: DropPolicy,
    renorm: bool,
    bias: bool,
    noise: bool,
    seed: u64,
) -> MoeLayer {
    let config = MoeConfig {
        d_model: d,
        d_ffn: h,
        experts,
        activation: act,
        gate: GateConfig {
            top_k: k,
            renormalize: renorm,
            capacity,
            drop_policy: drop,
            aux_loss_weight: 0.05,
            z_loss_weight: 0.01,
            noise_std: if noise { 0.3 } else { 0.0 },
            noise_seed: seed,
        },
        storage: Storage::F32,
    };
    let mut layer = MoeLayer::random(config, seed).unwrap();
    if bias {
        let mut r = seeded_rng(seed ^ 0xb1a5);
        layer.expert_bias = Some(normal_vec(&mut r, experts, 0.05));
    }
    layer
}

fn cpu_run(layer: &MoeLayer, x: &[f32], tokens: usize, d_out: &[f32]) -> (MoeState, MoeGrads) {
    let cx = Compute::new(1);
    let (mut st, mut g) = (MoeState::default(), MoeGrads::default());
    layer.forward(&cx, x, tokens, &mut st).unwrap();
    layer.backward(&cx, x, &st, d_out, &mut g).unwrap();
    (st, g)
}

/// The whole GPU layer vs the CPU layer and the f64 reference: output, routing, losses, and every
/// gradient, over shapes, activations, capacities, drop orders, bias, noise, and empty batches.
#[test]
fn layer_matches_cpu() {
    let Some(dev) = gpu() else { return };
    use Activation::{Gelu, SwiGlu};
    use CapacityPolicy::{CappedDynamic, Dropless, Fixed};
    use DropPolicy::{ArrivalOrder as Arrival, BatchPrioritized as Prio};
    let cases = [
        (0usize, 4usize, 2usize, 8usize, 16usize, Gelu, Fixed { factor: 1.25 }, Arrival, false, false, false),
        (1, 4, 2, 8, 16, SwiGlu, Dropless, Arrival, true, false, false),
        (64, 8, 2, 16, 32, Gelu, Fixed { factor: 1.0 }, Arrival, false, false, false),
        (200, 8, 2, 16, 24, SwiGlu, Fixed { factor: 0.75 }, Prio, true, true, false),
        (333, 16, 4, 12, 20, Gelu, CappedDynamic { max_factor: 1.1 }, Arrival, true, true, true),
        (256, 6, 6, 10, 10, SwiGlu, Dropless, Prio, false, false, true),
        (1024, 32, 8, 32, 48, Gelu, Fixed { factor: 1.0 }, Prio, true, false, false),
    ];
    for (case, &(t_n, e_n, k, d, h, act, cap, drop, renorm, bias, noise)) in cases.iter().enumerate() {
        let layer = make_layer(e_n, k, d, h, act, cap, drop, renorm, bias, noise, 300 + case as u64);
        let mut r = seeded_rng(400 + case as u64);
        let x = normal_vec(&mut r, t_n * d, 1.0);
        let d_out = normal_vec(&mut r, t_n * d, 1.0);
        let gpu_layer = CudaMoeLayer::from_layer(dev.clone(), &layer).unwrap();
        let (out, routing, grads) = gpu_layer.forward_backward_host(&x, t_n, &d_out).unwrap();
        let name = |what: &str| format!("case {case} ({act:?}, {cap:?}, {drop:?}) {what}");

        // Forward against the f64 reference, choosing with the GPU's probabilities (the
        // reference has no router noise: noisy cases are compared with the CPU layer only).
        if !noise {
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let want = RefLayer::from_layer(&layer).forward(&x64, t_n, Some(&routing.probs));
            assert_eq!(routing.expert_index, want.routing.expert_index, "{}", name("expert choices"));
            assert_eq!(routing.position, want.routing.position, "{}", name("positions"));
            assert_eq!(routing.capacity, want.routing.capacity, "{}", name("capacity"));
            assert!(rel_err64(&out, &want.output, 1e-3) < 1e-4, "{}", name("output"));
            let close = |got: f32, want: f64| ((got as f64) - want).abs() <= 1e-4 * (1e-6 + want.abs());
            assert!(close(routing.aux_loss, want.routing.aux_loss), "{}", name("aux loss"));
            assert!(close(routing.z_loss, want.routing.z_loss), "{}", name("z loss"));
        }

        // Gradients against the CPU layer, when both made the same choices (they do unless two
        // probabilities tie to the last bit).
        let (cpu_st, cpu_g) = cpu_run(&layer, &x, t_n, &d_out);
        if cpu_st.routing.expert_index != routing.expert_index || cpu_st.routing.position != routing.position {
            println!("{}: CPU and GPU routing differ at a near tie; gradients not compared", name("note"));
            continue;
        }
        assert_close(&name("output vs CPU"), &out, &cpu_st.output, 1e-3);
        assert_close(&name("logits vs CPU"), &routing.logits, &cpu_st.routing.logits, 1e-4);
        assert_eq!(routing.capacity, cpu_st.routing.capacity, "{}", name("capacity vs CPU"));
        let close = |got: f32, want: f32| (got - want).abs() <= 1e-4 * (1e-6 + want.abs());
        assert!(close(routing.aux_loss, cpu_st.routing.aux_loss), "{}", name("aux loss vs CPU"));
        assert!(close(routing.z_loss, cpu_st.routing.z_loss), "{}", name("z loss vs CPU"));
        assert_close(&name("d_x"), &grads.d_x, &cpu_g.d_x, 1e-3);
        assert_close(&name("d_logits"), &grads.gate.d_logits, &cpu_g.gate.d_logits, 1e-4);
        assert_close(&name("d_gate_weight"), &grads.gate.d_gate_weight, &cpu_g.gate.d_gate_weight, 1e-3);
        assert_close(&name("d_w_in"), &grads.experts.d_w_in, &cpu_g.experts.d_w_in, 1e-3);
        assert_close(&name("d_w_out"), &grads.experts.d_w_out, &cpu_g.experts.d_w_out, 1e-3);
        assert_close(&name("d_b_in"), &grads.experts.d_b_in, &cpu_g.experts.d_b_in, 1e-3);
        assert_close(&name("d_b_out"), &grads.experts.d_b_out, &cpu_g.experts.d_b_out, 1e-3);
    }
}

/// Same inputs, same bits: no float atomics anywhere.
#[test]
fn layer_is_deterministic() {
    let Some(dev) = gpu() else { return };
    let layer = make_layer(
        16,
        2,
        64,
        128,
        Activation::Gelu,
        CapacityPolicy::Fixed { factor: 1.25 },
        DropPolicy::ArrivalOrder,
        false,
        false,
        false,
        5,
    );
    let mut r = seeded_rng(6);
    let t_n = 2048;
    let x = normal_vec(&mut r, t_n * 64, 1.0);
    let d_out = normal_vec(&mut r, t_n * 64, 1.0);
    let gpu_layer = CudaMoeLayer::from_layer(dev, &layer).unwrap();
    let a = gpu_layer.forward_backward_host(&x, t_n, &d_out).unwrap();
    let b = gpu_layer.forward_backward_host(&x, t_n, &d_out).unwrap();
    assert_eq!(a.0, b.0);
    assert_eq!(a.2.d_x, b.2.d_x);
    assert_eq!(a.2.gate.d_gate_weight, b.2.gate.d_gate_weight);
    assert_eq!(a.2.experts.d_w_in, b.2.experts.d_w_in);
    assert_eq!(a.2.experts.d_b_out, b.2.experts.d_b_out);
}

#[test]
fn bad_input_is_an_error() {
    let Some(dev) = gpu() else { return };
    let layer = make_layer(
        4,
        2,
        8,
        8,
        Activation::Gelu,
        CapacityPolicy::Dropless,
        DropPolicy::ArrivalOrder,
        false,
        false,
        false,
        1,
    );
    let gpu_layer = CudaMoeLayer::from_layer(dev.clone(), &layer).unwrap();
    let mut x = vec![0.5f32; 10 * 8];
    let d_out = vec![1.0f32; 10 * 8];
    assert!(matches!(
        gpu_layer.forward_backward_host(&x[..79], 10, &d_out),
        Err(CudaError::Kernel(KernelError::ShapeMismatch { operand: "x", .. }))
    ));
    x[17] = f32::NAN; // token 2: all of its logits, from index 2 * 4 = 8, are NaN
    assert!(matches!(
        gpu_layer.forward_backward_host(&x, 10, &d_out),
        Err(CudaError::Kernel(KernelError::NonFinite { operand: "gate logits", index: 8 }))
    ));
    x[17] = 0.5;
    let mut bad_out = d_out.clone();
    bad_out[33] = f32::INFINITY;
    assert!(matches!(
        gpu_layer.forward_backward_host(&x, 10, &bad_out),
        Err(CudaError::Kernel(KernelError::NonFinite { operand: "d_output", index: 33 }))
    ));
    let mut status = dev.zeros::<u32>(1).unwrap();
    assert!(dev.any_nonfinite(&dev.upload(&bad_out).unwrap(), 80, &mut status).unwrap());
    assert!(!dev.any_nonfinite(&dev.upload(&d_out).unwrap(), 80, &mut status).unwrap());
}

#[test]
fn bench_runs_on_a_gpu() {
    let Some(_dev) = gpu() else { return };
    let cfg = switchyard_kernels::KernelBenchConfig {
        tokens: 512,
        d_model: 64,
        d_ffn: 128,
        experts: 8,
        top_k: 2,
        warmup: 1,
        iterations: 3,
        ..Default::default()
    };
    let r = switchyard_kernels::cuda::run_cuda_bench(&cfg).unwrap();
    assert_eq!(r.routed_tokens + r.dropped_tokens, 512 * 2);
    assert!(r.fwd_bwd_ms_min > 0.0 && r.plain_gemm_gflops > 0.0);
    println!("{}", serde_json::to_string(&r).unwrap());
}
