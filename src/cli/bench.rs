//! `switchyard bench`: benchmarks of Switchyard's own components, with a peer or ceiling in the same run.

use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;
use switchyard_planner::space::for_each_plan;
use switchyard_planner::{SearchOptions, search};

use super::plan::parse_workload;
use super::specs::{load_cluster, load_model};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time the planner: enumerate and price every plan of a model on a cluster.
    Planner(PlannerBenchArgs),
    /// Time one online decision for every MoE layer of a large model (default: 256 experts on 64 GPUs, 58 layers).
    Decision(DecisionBenchArgs),
    /// Time the CPU MoE layer forward and forward+backward against one plain GEMM of the same FLOPs (and,
    /// with --torch-python, the same layer in PyTorch).
    Kernels(KernelsBenchArgs),
    /// Time expert migration on in-process workers against a plain memory copy of the same bytes.
    Runtime(super::bench_runtime::RuntimeBenchArgs),
}

/// Arguments of `switchyard bench kernels`.
#[derive(Debug, Args)]
pub struct KernelsBenchArgs {
    /// Tokens per batch.
    #[arg(long, default_value_t = 4096)]
    tokens: usize,
    /// Model width.
    #[arg(long, default_value_t = 512)]
    d_model: usize,
    /// Expert FFN width.
    #[arg(long, default_value_t = 2048)]
    d_ffn: usize,
    /// Experts.
    #[arg(long, default_value_t = 8)]
    experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 2)]
    top_k: usize,
    /// Capacity factor.
    #[arg(long, default_value_t = 1.25)]
    capacity_factor: f32,
    /// Threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// SwiGLU experts instead of GELU.
    #[arg(long)]
    swiglu: bool,
    /// Timed iterations.
    #[arg(long, default_value_t = 5)]
    iterations: usize,
    /// Python with torch installed (kernels/bench/setup_torch_venv.sh makes one): runs the same layer in PyTorch
    /// in the same run, on the same device (with --device cuda, a torch built for CUDA).
    #[arg(long)]
    torch_python: Option<std::path::PathBuf>,
    /// Device: cpu, cuda (cuda:N) or auto (the GPU when one can be used, else the CPU, and says so). On a GPU
    /// the layer runs the CUDA kernels and cuBLAS, against one cuBLAS GEMM of the same FLOPs.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print JSON (with `fwd_bwd_ratio_to_gemm`).
    #[arg(long)]
    json: bool,
}

/// Arguments of `switchyard bench decision`.
#[derive(Debug, Args)]
pub struct DecisionBenchArgs {
    /// Experts per MoE layer.
    #[arg(long, default_value_t = 256)]
    experts: usize,
    /// GPUs of the expert-parallel group.
    #[arg(long, default_value_t = 64)]
    gpus: usize,
    /// MoE layers.
    #[arg(long, default_value_t = 58)]
    layers: usize,
    /// Spare slots per GPU beyond experts / GPUs.
    #[arg(long, default_value_t = 1)]
    spare_slots: usize,
    /// Timed repetitions.
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `switchyard bench planner`.
#[derive(Debug, Args)]
pub struct PlannerBenchArgs {
    /// Model preset or file.
    #[arg(long, short, default_value = "deepseek-v3")]
    model: String,
    /// Cluster preset or file.
    #[arg(long, short, default_value = "dgx-h100")]
    cluster: String,
    /// GPUs.
    #[arg(long, default_value_t = 1024)]
    gpus: u32,
    /// Expected workload (as for `plan`).
    #[arg(long, short)]
    workload: Option<String>,
    /// Timed repetitions per thread count (a first, warm-up run is reported separately).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs a benchmark.
pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Planner(a) => planner(a),
        BenchCommand::Decision(a) => decision(a),
        BenchCommand::Kernels(a) => kernels(a),
        BenchCommand::Runtime(a) => super::bench_runtime::run(a),
    }
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn planner(a: PlannerBenchArgs) -> Result<()> {
    let model = load_model(&a.model)?;
    let cluster = load_cluster(&a.cluster, Some(a.gpus))?;
    let workload = parse_workload(a.workload.as_deref(), model.moe.as_ref().and_then(|m| m.capacity_factor))?;
    let opts = SearchOptions { top: 10, ..Default::default() };
    let repeat = a.repeat.max(1);
    // The floor: enumerating the plan space without pricing anything.
    let enum_ms = median(
        (0..repeat)
            .map(|_| {
                let t = Instant::now();
                let mut n = 0u64;
                for_each_plan(&model, &cluster, &opts.space, |p| n += u64::from(p.tp > 0));
                std::hint::black_box(n);
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    let max_threads = rayon::current_num_threads();
    let mut runs = Vec::new();
    let mut result = None;
    for threads in [1, max_threads] {
        if threads == 1 && max_threads == 1 && !runs.is_empty() {
            break;
        }
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
        let (first_ms, r) = pool.install(|| {
            let t = Instant::now();
            let r = search(&model, &cluster, &workload, &opts, &|_, _| {});
            (t.elapsed().as_secs_f64() * 1e3, r)
        });
        let times: Vec<f64> = (0..repeat)
            .map(|_| {
                pool.install(|| {
                    let t = Instant::now();
                    std::hint::black_box(search(&model, &cluster, &workload, &opts, &|_, _| {}));
                    t.elapsed().as_secs_f64() * 1e3
                })
            })
            .collect();
        let (med, min, max) = median(times);
        runs.push(
            json!({"threads": threads, "first_run_ms": first_ms, "median_ms": med, "min_ms": min, "max_ms": max}),
        );
        result = Some((r, med));
        if max_threads == 1 {
            break;
        }
    }
    let (r, med) = result.expect("at least one run");
    let single = runs[0]["median_ms"].as_f64().unwrap_or(med);
    let out = json!({
        "model": model.name, "cluster": cluster.name, "gpus": cluster.num_gpus(),
        "plans": r.enumerated, "fitting": r.fitting,
        "enumerate_only_median_ms": enum_ms.0,
        "runs": runs,
        "median_ms": med,
        "per_plan_us": med * 1e3 / r.enumerated.max(1) as f64,
        "speedup_vs_1_thread": single / med,
        "target_ms": 2000.0,
        "best_plan": r.plans.first().map(|p| p.layout.clone()),
        "best_iter_ms": r.plans.first().map(|p| p.predicted_iter_ms),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} on {} GPUs of {}: {} plans ({} fit in memory)",
        model.name,
        cluster.num_gpus(),
        cluster.name,
        r.enumerated,
        r.fitting
    );
    println!("  enumerate only (floor):   {:>8.1} ms median of {repeat}", enum_ms.0);
    for run in out["runs"].as_array().expect("runs") {
        println!(
            "  enumerate + price + rank: {:>8.1} ms median of {repeat} (min {:.1}, max {:.1}, first {:.1}) on {} thread(s)",
            run["median_ms"].as_f64().unwrap_or(0.0),
            run["min_ms"].as_f64().unwrap_or(0.0),
            run["max_ms"].as_f64().unwrap_or(0.0),
            run["first_run_ms"].as_f64().unwrap_or(0.0),
            run["threads"]
        );
    }
    println!(
        "  {:.2} us per plan; {:.2}x faster than 1 thread; {:.1}% of the 2 s target",
        med * 1e3 / r.enumerated.max(1) as f64,
        single / med,
        med / 2000.0 * 100.0
    );
    if let Some(p) = r.plans.first() {
        println!("  best: {} at {:.1} ms per iteration", p.layout, p.predicted_iter_ms);
    }
    Ok(())
}

/// Skewed routing for the decision benchmark: Zipf-like expert popularity, permuted per layer, with noise per
/// source rank; fixed seed.
fn synthetic_loads(experts: usize, gpus: usize, layer: usize, step: u64) -> switchyard_cost::LoadMatrix {
    let mut state = 0x9E37_79B9_7F4A_7C15u64 ^ (layer as u64).wrapping_mul(0x2545_F491_4F6C_DD1D) ^ step;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let perm: Vec<usize> = {
        let mut p: Vec<usize> = (0..experts).collect();
        for i in (1..experts).rev() {
            let j = ((layer * 7919 + i * 104_729) % (i + 1)).min(i);
            p.swap(i, j);
        }
        p
    };
    let tokens_per_rank = 4096.0 * 8.0;
    let rows: Vec<Vec<u64>> = (0..gpus)
        .map(|_| {
            let w: Vec<f64> =
                (0..experts).map(|e| (1.0 / (perm[e] as f64 + 1.0).powf(1.1)) * (0.8 + 0.4 * next())).collect();
            let s: f64 = w.iter().sum();
            w.iter().map(|x| (x / s * tokens_per_rank).round() as u64).collect()
        })
        .collect();
    switchyard_cost::LoadMatrix::from_rows(&rows).expect("rectangular")
}

fn decision(a: DecisionBenchArgs) -> Result<()> {
    use switchyard_cost::cost::MoeLayerShape;
    use switchyard_planner::online::{
        Algorithm, Frequency, LayerContext, PolicyConfig, PolicyState, Predictor, decide_windows,
    };
    use switchyard_planner::window::LoadWindow;
    let cluster = switchyard_cost::presets::cluster("dgx-h100")
        .expect("preset")
        .with_gpus(a.gpus as u32, &switchyard_cost::Source::Inline)?;
    let slots = a.experts.div_ceil(a.gpus) + a.spare_slots;
    // DeepSeek-V3's routed expert: 7168 -> 2048 (SwiGLU), bf16.
    let shape = MoeLayerShape {
        d_model: 7168,
        d_ffn: 2048,
        gated: true,
        act_bytes: 2,
        param_bytes: 2,
        grad_bytes: 4,
        peak_flops: 989e12,
    };
    let mut ctx1 = LayerContext::for_cluster(&cluster, shape, a.gpus, slots, 1);
    ctx1.dynamic_shares = true;
    let ctx = vec![ctx1; a.layers];
    let history: Vec<Vec<switchyard_cost::LoadMatrix>> =
        (0..a.layers).map(|l| (0..4).map(|k| synthetic_loads(a.experts, a.gpus, l, k)).collect()).collect();
    // Each layer's window as the runtime keeps it: the predictor's running sums, updated as loads are sampled.
    let predictor = Predictor::WindowMean { window: 4 };
    let windows: Vec<LoadWindow> = history
        .iter()
        .map(|h| {
            let mut w = LoadWindow::new(predictor, 8);
            for m in h {
                w.push(m);
            }
            w
        })
        .collect();
    // Sampling: one more iteration's loads into every layer's full window (one matrix in, the oldest out).
    let next: Vec<switchyard_cost::LoadMatrix> =
        (0..a.layers).map(|l| synthetic_loads(a.experts, a.gpus, l, 4)).collect();
    let (sample_ms, _, _) = median(
        (0..a.repeat.max(1))
            .map(|_| {
                let mut ws = windows.clone();
                let t = Instant::now();
                for (w, m) in ws.iter_mut().zip(&next) {
                    w.push(m);
                }
                let ms = t.elapsed().as_secs_f64() * 1e3;
                std::hint::black_box(ws);
                ms
            })
            .collect(),
    );
    let current: Vec<switchyard_cost::Placement> = (0..a.layers)
        .map(|_| switchyard_cost::Placement::contiguous(a.gpus, slots, a.experts))
        .collect::<Result<_, _>>()?;
    let cfg = PolicyConfig { algorithm: Algorithm::Switchyard, frequency: Frequency::Every { n: 10 }, predictor };
    let run = || {
        let t = Instant::now();
        let d = decide_windows(&cfg, &mut PolicyState::default(), 100, 10, &windows, &current, &ctx);
        (t.elapsed().as_secs_f64() * 1e3, d)
    };
    let (first_ms, d) = run();
    let (med, min, max) = median((0..a.repeat.max(1)).map(|_| run().0).collect());
    // The same decision on one thread: the work itself, less sensitive to other load on a shared machine than
    // the parallel time (the layers are independent, so N free cores divide it by about N).
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let (one_med, _, _) = one.install(|| median((0..a.repeat.max(1)).map(|_| run().0).collect()));
    // The next decision in steady state: the placements just decided are current, and the window has moved on
    // by one observation (the loads drift a little). Reported beside the first decision, which starts from the
    // contiguous placement and is the larger of the two.
    let mut next_windows = windows.clone();
    for (w, m) in next_windows.iter_mut().zip(&next) {
        w.push(m);
    }
    let settled = if d.switch { d.placements.clone() } else { current.clone() };
    let (steady_ms, _, _) = median(
        (0..a.repeat.max(1))
            .map(|_| {
                let t = Instant::now();
                let s = decide_windows(&cfg, &mut PolicyState::default(), 110, 10, &next_windows, &settled, &ctx);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                std::hint::black_box(s);
                ms
            })
            .collect(),
    );
    // The placement step alone, per layer, for the same predicted loads (the part EPLB's algorithm does).
    let loads: Vec<Vec<f64>> = windows
        .iter()
        .map(|w| w.sums().map_or_else(Vec::new, |s| s.expert_loads().iter().map(|v| v * w.scale()).collect()))
        .collect();
    let opts = switchyard_planner::placement::switchyard::SwitchyardOptions { gpus_per_node: 8, ..Default::default() };
    let place_ms = median(
        (0..a.repeat.max(1))
            .map(|_| {
                let t = Instant::now();
                for (l, cur) in loads.iter().zip(&current) {
                    std::hint::black_box(
                        switchyard_planner::placement::switchyard::switchyard_placement(
                            l,
                            None,
                            Some(cur),
                            a.gpus,
                            slots,
                            &opts,
                        )
                        .ok(),
                    );
                }
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    );
    // EPLB on the same loads (global and hierarchical with one group per node), all layers in one call.
    let nodes = (a.gpus / 8).max(1);
    let eplb_time = |policy, groups| {
        median(
            (0..a.repeat.max(1))
                .map(|_| {
                    let t = Instant::now();
                    std::hint::black_box(
                        switchyard_planner::placement::eplb::eplb(
                            &loads,
                            a.gpus * slots,
                            groups,
                            nodes,
                            a.gpus,
                            policy,
                        )
                        .ok(),
                    );
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let eplb_global_ms = eplb_time(switchyard_planner::placement::eplb::EplbPolicy::Global, 1);
    let eplb_hier_ms = eplb_time(switchyard_planner::placement::eplb::EplbPolicy::Hierarchical, nodes);
    let out = json!({
        "experts": a.experts, "gpus": a.gpus, "layers": a.layers, "slots_per_gpu": slots,
        "eplb_global_median_ms": eplb_global_ms.0, "eplb_hierarchical_median_ms": eplb_hier_ms.0,
        "decision_median_ms": med, "decision_min_ms": min, "decision_max_ms": max, "first_run_ms": first_ms,
        "threads": rayon::current_num_threads(), "decision_one_thread_median_ms": one_med,
        "placement_only_median_ms": place_ms.0, "switch": d.switch, "gain_ms_per_iter": d.gain_ms_per_iter,
        "migration_ms": d.migration_ms, "target_ms": 5.0, "sampling_ms_per_iteration": sample_ms,
        "steady_decision_median_ms": steady_ms,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "decision for {} layers x {} experts on {} GPUs ({} slots each): {:.2} ms median of {} (min {:.2}, max {:.2}, first {:.2}); placement alone {:.2} ms; target 5 ms",
            a.layers,
            a.experts,
            a.gpus,
            slots,
            med,
            a.repeat.max(1),
            min,
            max,
            first_ms,
            place_ms.0
        );
        println!(
            "  {} threads; on 1 thread {:.2} ms median ({:.0} us per layer)",
            rayon::current_num_threads(),
            one_med,
            one_med * 1e3 / a.layers.max(1) as f64
        );
        println!(
            "  EPLB on the same loads (placement only): global {:.2} ms, hierarchical {:.2} ms",
            eplb_global_ms.0, eplb_hier_ms.0
        );
        println!(
            "  the next decision (the placements just decided are current, the window one observation on): {steady_ms:.2} ms median"
        );
        println!(
            "  sampling (each iteration, all layers: the loads into the predictor's running sums): {sample_ms:.2} ms"
        );
        println!(
            "  predicted gain {:.2} ms per iteration against a {:.2} ms migration: switch = {}",
            d.gain_ms_per_iter, d.migration_ms, d.switch
        );
    }
    Ok(())
}

fn kernels(a: KernelsBenchArgs) -> Result<()> {
    use switchyard_kernels::{Activation, KernelBenchConfig, run_kernel_bench};
    let cfg = KernelBenchConfig {
        tokens: a.tokens,
        d_model: a.d_model,
        d_ffn: a.d_ffn,
        experts: a.experts,
        top_k: a.top_k,
        capacity_factor: a.capacity_factor,
        threads: a.threads.max(1),
        activation: if a.swiglu { Activation::SwiGlu } else { Activation::Gelu },
        iterations: a.iterations.max(1),
        torch_python: a.torch_python.clone(),
        ..KernelBenchConfig::default()
    };
    use switchyard_kernels::cuda::{Device, DeviceRequest};
    let request = super::device::parse(&a.device)?;
    let choice = super::device::choose(&a.device, request)?;
    if let Device::Cuda(n) = choice.device {
        let r = switchyard_kernels::cuda::run_cuda_bench_on(&cfg, n)
            .map_err(|e| anyhow::anyhow!("--device {}: {e}", a.device))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        println!(
            "MoE layer on {} (sm {}.{}), {} tokens, d {}, h {}, {} experts, top-{}, capacity factor {} ({} routed, {} dropped):",
            r.device,
            r.compute_capability.0,
            r.compute_capability.1,
            a.tokens,
            a.d_model,
            a.d_ffn,
            a.experts,
            a.top_k,
            a.capacity_factor,
            r.routed_tokens,
            r.dropped_tokens
        );
        println!(
            "  forward {:.3} ms ({:.0} GFLOP/s in expert GEMMs, {:.2}x a plain cuBLAS GEMM's rate)",
            r.forward_ms, r.expert_gemm_gflops_forward, r.fwd_ratio_to_gemm
        );
        println!(
            "  forward+backward {:.3} ms ({:.0} GFLOP/s, {:.2}x the plain cuBLAS GEMM's {:.0} GFLOP/s, FP32)",
            r.fwd_bwd_ms, r.expert_gemm_gflops_fwd_bwd, r.fwd_bwd_ratio_to_gemm, r.plain_gemm_gflops
        );
        if let (Some(t), Some(s)) = (&r.torch, r.speedup_vs_torch_fwd_bwd) {
            println!(
                "  PyTorch {} on {}: forward+backward {:.3} ms ({:.0} GFLOP/s); ours is {s:.2}x faster",
                t.torch_version, t.device, t.fwd_bwd_ms, t.expert_gemm_gflops_fwd_bwd
            );
        }
        return Ok(());
    }
    if request == DeviceRequest::Auto {
        let why = super::device::cpu_reason(&choice);
        eprintln!("--device auto: no usable GPU, measuring the CPU ({why})");
    }
    let r = run_kernel_bench(&cfg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "MoE layer, {} tokens, d {}, h {}, {} experts, top-{}, capacity factor {} ({} routed, {} dropped), {} thread(s), {}:",
        a.tokens,
        a.d_model,
        a.d_ffn,
        a.experts,
        a.top_k,
        a.capacity_factor,
        r.routed_tokens,
        r.dropped_tokens,
        r.threads,
        r.backend
    );
    println!(
        "  forward {:.1} ms ({:.1} GFLOP/s in expert GEMMs, {:.2}x a plain GEMM's rate)",
        r.forward_ms, r.expert_gemm_gflops_forward, r.fwd_ratio_to_gemm
    );
    println!(
        "  forward+backward {:.1} ms ({:.1} GFLOP/s, {:.2}x the plain GEMM's {:.1} GFLOP/s)",
        r.fwd_bwd_ms, r.expert_gemm_gflops_fwd_bwd, r.fwd_bwd_ratio_to_gemm, r.plain_gemm_gflops
    );
    if let Some(s) = r.speedup_vs_torch_fwd_bwd {
        println!("  {s:.2}x faster than the same layer in PyTorch (forward+backward)");
    }
    Ok(())
}
