//! Embedding Switchyard's runtime in your own training loop.
//!
//! Four in-process workers train one MoE layer on a toy regression task (learn `y = sin(W x)`), with
//! their own loss and their own loop; the runtime owns the experts: it routes and exchanges tokens
//! (forward / backward), reduces gradients over replicas, steps Adam, samples the load every step and
//! moves experts when the online policy says it pays.
//!
//! ```sh
//! cargo run --release -p switchyard-runtime --example embed
//! ```

use std::time::Duration;

use switchyard_cost::Placement;
use switchyard_kernels::{Activation, CapacityPolicy, Compute, Engine, GateConfig};
use switchyard_planner::online::{Algorithm, Frequency, LayerContext, PolicyConfig, Predictor};
use switchyard_runtime::comm::Communicator;
use switchyard_runtime::comm::local::run_local;
use switchyard_runtime::error::RuntimeError;
use switchyard_runtime::experts::{ExpertRuntime, MoeShape};
use switchyard_runtime::machine::{cpu_cluster, measure_local};
use switchyard_runtime::optim::Adam;

const WORKERS: usize = 4;
const D: usize = 16;
const TOKENS: usize = 64; // per worker per step

fn main() {
    let results = run_local(WORKERS, Duration::from_secs(30), |comm| train(&comm));
    for (rank, r) in results.into_iter().enumerate() {
        match r {
            Ok(line) if rank == 0 => println!("{line}"),
            Ok(_) => {}
            Err(e) => eprintln!("worker {rank}: {e}"),
        }
    }
}

fn train(comm: &dyn Communicator) -> Result<String, RuntimeError> {
    let shape = MoeShape {
        layers: 1,
        d_model: D,
        d_ffn: 32,
        experts: 8,
        slots_per_worker: 3, // 12 slots for 8 experts: 4 spare slots hold replicas of hot experts
        activation: Activation::Gelu,
        gate: GateConfig { top_k: 2, capacity: CapacityPolicy::Dropless, ..GateConfig::default() },
    };
    let start = Placement::contiguous(WORKERS, shape.slots_per_worker, shape.experts)
        .map_err(|e| RuntimeError::invalid("placement", e.to_string()))?;
    // Worker 0 runs the policy: price placements with this machine's measured rates, decide every 5 steps.
    let policy = if comm.rank() == 0 {
        let rates = measure_local(1)?;
        let layer = switchyard_cost::cost::moe::MoeLayerShape {
            d_model: D as u64,
            d_ffn: 32,
            gated: false,
            act_bytes: 4,
            param_bytes: 4,
            grad_bytes: 4,
            peak_flops: rates.gemm_gflops * 1e9,
        };
        let ctx = LayerContext::for_cluster(&cpu_cluster(WORKERS, rates), layer, WORKERS, shape.slots_per_worker, 1);
        let cfg = PolicyConfig {
            algorithm: Algorithm::Switchyard,
            frequency: Frequency::Every { n: 5 },
            predictor: Predictor::WindowMean { window: 3 },
        };
        Some((cfg, vec![ctx]))
    } else {
        None
    };
    let mut rt = ExpertRuntime::new(comm, shape, vec![start], 42, Adam { lr: 1e-2, ..Adam::default() }, policy)?;
    // Skew the routing so that re-placement has something to do.
    rt.layers[0].expert_bias = Some((0..8).map(|e| -1.5 * ((e + 1) as f32).ln()).collect());

    let engine = Engine::new(Compute::new(1))?;
    let mut rng = switchyard_kernels::random::seeded_rng(1000 + comm.rank() as u64);
    let (mut out, mut d_x) = (vec![0.0f32; TOKENS * D], vec![0.0f32; TOKENS * D]);
    let mut first = None;
    let mut last = 0.0;
    for step in 0..60u64 {
        // Your data.
        let x: Vec<f32> =
            (0..TOKENS * D).map(|_| switchyard_kernels::random::standard_normal(&mut rng) as f32).collect();
        let target: Vec<f32> = x.iter().map(|v| (1.5 * v).sin()).collect();
        // Your forward and loss; the runtime's MoE layer in the middle.
        let loss = engine.run(|cx| -> Result<f64, RuntimeError> {
            rt.forward(cx, comm, 0, &x, TOKENS, &mut out)?;
            let mut loss = 0.0f64;
            let mut d_out = vec![0.0f32; out.len()];
            for ((o, t), g) in out.iter().zip(&target).zip(d_out.iter_mut()) {
                let e = o - t;
                loss += (e * e) as f64;
                *g = 2.0 * e / (TOKENS * D * WORKERS) as f32;
            }
            rt.backward(cx, comm, 0, &x, &d_out, &mut d_x)?;
            Ok(loss)
        })?;
        // Your own reductions; then let the runtime update, sample, decide and migrate.
        let mut l = [loss, (TOKENS * D) as f64];
        comm.all_reduce_sum_f64(&mut l)?;
        let report = rt.finish_step(comm, step)?;
        let mse = l[0] / l[1];
        first.get_or_insert(mse);
        last = mse;
        if comm.rank() == 0 && report.switched {
            println!("step {step}: moved experts (imbalance was {:.2})", report.imbalance);
        }
    }
    Ok(format!(
        "mse {:.4} -> {:.4}; {} switches, {} rollbacks; placement now {:?}",
        first.unwrap_or(f64::NAN),
        last,
        rt.switches,
        rt.rollbacks,
        rt.placements()[0].slots
    ))
}
