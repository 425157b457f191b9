//! The trainer: a small GPT-style MoE language model ([`crate::dense::GptDense`] with a
//! [`crate::experts::ExpertRuntime`] FFN in every block) trained data-parallel over the workers of
//! a communicator, experts spread over their slots and re-placed by the online policy.
//!
//! [`train_local`] runs it on in-process worker threads; [`worker_main`] is one worker's loop on
//! any communicator (MPI runs call it once per process).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use switchyard_cost::cost::moe::MoeLayerShape;
use switchyard_cost::{ClusterSpec, DispatchMode, Placement};
use switchyard_kernels::{Activation, CapacityPolicy, Compute, Engine, GateConfig};
use switchyard_planner::online::{Algorithm, Frequency, LayerContext, PolicyConfig, Predictor};

use crate::checksum::Checksum;
use crate::comm::local::WorkerError;
use crate::comm::{CommError, Communicator};
use crate::data::{Batcher, Corpus};
use crate::dense::model::{BatchShape, GptConfig, GptDense, GptSaved, weight_decay_applies};
use crate::error::RuntimeError;
use crate::experts::{ExpertRuntime, MoeShape};
use crate::machine::{LocalRates, cpu_cluster, measure_local};
use crate::migrate::Fault;
use crate::optim::{Adam, AdamState};

/// Everything a training run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Workers (in-process threads, or MPI ranks).
    pub workers: usize,
    /// Compute threads per worker.
    pub threads_per_worker: usize,
    /// Logical experts per MoE layer.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Slots per worker (default `experts / workers`, rounded up: permutation only when it divides).
    pub slots_per_worker: usize,
    /// Model width.
    pub d_model: usize,
    /// Expert hidden width.
    pub d_ffn: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Transformer blocks (each with an MoE FFN).
    pub n_layers: usize,
    /// Sequence length.
    pub ctx: usize,
    /// Sequences per step over all workers (a multiple of `workers`).
    pub global_batch: usize,
    /// Steps.
    pub steps: u64,
    /// Seed of weights, data and corpus.
    pub seed: u64,
    /// Learning rate.
    pub lr: f32,
    /// Decoupled weight decay of matrices.
    pub weight_decay: f32,
    /// Expert FFN form.
    pub activation: Activation,
    /// Capacity policy of the router (dropless by default: results do not depend on the worker count).
    pub capacity: CapacityPolicy,
    /// Load-balancing loss weight (0: off).
    pub aux_loss_weight: f32,
    /// Skew of the routing: a fixed selection bias `-skew * ln(rank + 1)` on expert `rank` (0: none). It
    /// changes which experts are chosen, not the gradients, and makes the load skewed like real traces.
    pub route_skew: f32,
    /// Placement algorithm of the online policy.
    pub algorithm: Algorithm,
    /// dyn.N / dyn.auto / never.
    pub frequency: Frequency,
    /// Load predictor.
    pub predictor: Predictor,
    /// A text file to train on instead of the generated corpus.
    pub text: Option<PathBuf>,
    /// Timeout of every collective, seconds.
    pub timeout_s: f64,
    /// The cluster the policy prices placements on (a profile written by `switchyard profile`, resized to the
    /// workers); `None`: a quick measurement of this machine at start-up ([`measure_local`]).
    #[serde(default)]
    pub cluster: Option<ClusterSpec>,
    /// Injected faults (tests).
    pub faults: Faults,
    /// How each MoE layer meets its tokens: empty (all token all-to-all), one mode for every layer, or one per
    /// layer ([`DispatchMode::ExpertFetch`]: the data-centric, Janus-style mode).
    #[serde(default)]
    pub dispatch: Vec<DispatchMode>,
    /// Workers per node (consecutive ranks) for the data-centric mode's once-per-node fetch; 0: all workers on
    /// one node.
    #[serde(default)]
    pub workers_per_node: usize,
    /// Expert-data-parallel groups: the workers form this many expert-parallel groups of consecutive ranks,
    /// each holding every expert (`slots_per_worker` slots per worker over its own group); expert gradients are
    /// summed over the groups. 0 or 1: one group of all workers.
    #[serde(default)]
    pub edp: usize,
    /// Where the expert FFNs run ([`TrainDevice`]); the CPU by default.
    #[serde(default)]
    pub device: TrainDevice,
}

/// Where a training run's expert FFNs run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrainDevice {
    /// The CPU kernels (the embedded default).
    #[default]
    Cpu,
    /// CUDA GPUs: worker `r` uses GPU `r mod (GPUs on the machine)` for its experts' GEMMs (cuBLAS) and
    /// activations (NVRTC kernels); the dense model, routing, the token exchange, Adam and migration stay on
    /// the host ([`crate::moe::exec`]). An error naming what is missing when no GPU can be used.
    Cuda,
}

/// Faults to inject (tests and demonstrations).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Faults {
    /// Corrupt or fail the first migration.
    pub migration: Option<FaultSpec>,
    /// `(worker, step)`: that worker panics at that step.
    pub panic_at: Option<(usize, u64)>,
    /// `(worker, step)`: that worker stops answering at that step (sleeps past the timeout).
    pub stall_at: Option<(usize, u64)>,
}

/// A migration fault as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultSpec {
    /// Worker `rank` corrupts a received state.
    Corrupt(usize),
    /// Worker `rank` fails after the exchange.
    Fail(usize),
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            workers: 4,
            threads_per_worker: 1,
            experts: 16,
            top_k: 2,
            slots_per_worker: 4,
            d_model: 64,
            d_ffn: 128,
            n_heads: 4,
            n_layers: 2,
            ctx: 32,
            global_batch: 16,
            steps: 200,
            seed: 7,
            lr: 3e-3,
            weight_decay: 0.0,
            activation: Activation::Gelu,
            capacity: CapacityPolicy::Dropless,
            aux_loss_weight: 0.0,
            route_skew: 0.0,
            algorithm: Algorithm::Switchyard,
            frequency: Frequency::Every { n: 10 },
            predictor: Predictor::WindowMean { window: 4 },
            text: None,
            timeout_s: 30.0,
            cluster: None,
            faults: Faults::default(),
            dispatch: Vec::new(),
            workers_per_node: 0,
            edp: 1,
            device: TrainDevice::Cpu,
        }
    }
}

/// Per-step metrics (one JSON line each in `--metrics`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepMetrics {
    /// Step (0-based).
    pub step: u64,
    /// Mean cross-entropy over the global batch, nats per token.
    pub loss: f64,
    /// Wall time of the step on worker 0, ms.
    pub step_ms: f64,
    /// Forward (dense + MoE with its exchanges), ms.
    pub forward_ms: f64,
    /// Backward, ms.
    pub backward_ms: f64,
    /// Dense gradient all-reduce and optimizer, ms.
    pub dense_update_ms: f64,
    /// Router / replica gradient reduction and expert optimizer, ms.
    pub expert_update_ms: f64,
    /// Load sampling, ms.
    pub sampler_ms: f64,
    /// Policy and decision broadcast, ms.
    pub decide_ms: f64,
    /// Migration, ms.
    pub migrate_ms: f64,
    /// Busiest worker's routed rows over the mean (averaged over layers).
    pub imbalance: f64,
    /// Modelled MoE time of this step under its placement, ms (the performance model's view).
    pub modelled_moe_ms: f64,
    /// Switches committed so far.
    pub switches: u64,
    /// Migrations rolled back so far.
    pub rollbacks: u64,
    /// Bytes moved by migrations so far (all workers).
    pub bytes_moved: u64,
    /// Bytes of expert weights fetched to the tokens this step by data-centric layers (all workers; their
    /// gradients travel back as many bytes).
    pub fetched_bytes: u64,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Loss of the first step.
    pub first_loss: f64,
    /// Loss of the last step.
    pub final_loss: f64,
    /// Steps run.
    pub steps: u64,
    /// Workers.
    pub workers: usize,
    /// Switches committed.
    pub switches: u64,
    /// Migrations rolled back.
    pub rollbacks: u64,
    /// Bytes moved by migrations (all workers).
    pub bytes_moved: u64,
    /// Hash of every parameter and optimizer state (dense, routers, every logical expert), as 16 hex digits.
    pub param_checksum: String,
    /// Mean step time, ms (worker 0).
    pub mean_step_ms: f64,
    /// Mean imbalance over steps.
    pub mean_imbalance: f64,
    /// Mean sampler time over mean step time.
    pub sampler_fraction: f64,
    /// The rates the policy priced placements with.
    pub rates: Option<LocalRates>,
    /// Where this worker's expert FFNs ran (`cpu` or `cuda:N`).
    pub device: String,
}

/// The final state of one worker (for tests: compare runs).
#[derive(Debug, Clone)]
pub struct WorkerResult {
    /// The summary (the same on every worker except timings).
    pub summary: TrainSummary,
    /// Dense parameters, in `params_flat` order.
    pub dense: Vec<(String, Vec<f32>)>,
    /// Every logical expert's weights per layer.
    pub experts: Vec<Vec<Vec<f32>>>,
    /// Metrics of every step.
    pub metrics: Vec<StepMetrics>,
}

impl TrainConfig {
    /// The dispatch mode of MoE layer `layer`.
    pub fn dispatch_of(&self, layer: usize) -> DispatchMode {
        match self.dispatch.as_slice() {
            [] => DispatchMode::Token,
            [one] => *one,
            many => many.get(layer).copied().unwrap_or(DispatchMode::Token),
        }
    }

    /// Checks the sizes; the error names the flag.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let bad = |what: &str, reason: String| Err(RuntimeError::invalid(what, reason));
        if self.workers == 0 {
            return bad("--workers", "must be at least 1".into());
        }
        if self.experts == 0 || self.top_k == 0 || self.top_k > self.experts {
            return bad("--top-k", format!("must be in 1..={} (the expert count), got {}", self.experts, self.top_k));
        }
        let edp = self.edp.max(1);
        if !self.workers.is_multiple_of(edp) {
            return bad("--edp", format!("{edp} groups do not divide --workers {}", self.workers));
        }
        let ep = self.workers / edp;
        if ep * self.slots_per_worker < self.experts {
            return bad(
                "--slots",
                format!(
                    "{} workers{} x {} slots cannot hold {} experts: use --slots {} or more",
                    ep,
                    if edp > 1 { format!(" per expert-parallel group (--edp {edp})") } else { String::new() },
                    self.slots_per_worker,
                    self.experts,
                    self.experts.div_ceil(ep)
                ),
            );
        }
        if self.global_batch == 0 || !self.global_batch.is_multiple_of(self.workers) {
            return bad(
                "--batch",
                format!(
                    "the global batch {} must be a positive multiple of --workers {}",
                    self.global_batch, self.workers
                ),
            );
        }
        if !(self.timeout_s > 0.0 && self.timeout_s.is_finite()) {
            return bad("--timeout-s", format!("must be > 0, got {}", self.timeout_s));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("--lr", format!("must be > 0, got {}", self.lr));
        }
        GptConfig { vocab: 256, d_model: self.d_model, n_heads: self.n_heads, n_layers: self.n_layers, ctx: self.ctx }
            .validate()?;
        if self.d_ffn == 0 {
            return bad("--d-ffn", "must be at least 1".into());
        }
        if self.dispatch.len() > 1 && self.dispatch.len() != self.n_layers {
            return bad(
                "--dispatch",
                format!(
                    "{} modes for {} layers: give one mode for every layer or one per layer",
                    self.dispatch.len(),
                    self.n_layers
                ),
            );
        }
        if self.workers_per_node > 0 && !ep.is_multiple_of(self.workers_per_node) {
            return bad(
                "--workers-per-node",
                format!(
                    "{} does not divide the {ep} workers of an expert-parallel group (--workers {} / --edp {edp})",
                    self.workers_per_node, self.workers
                ),
            );
        }
        Ok(())
    }

    fn gate(&self) -> GateConfig {
        GateConfig {
            top_k: self.top_k,
            capacity: self.capacity,
            aux_loss_weight: self.aux_loss_weight,
            ..GateConfig::default()
        }
    }

    /// The MoE layers' shape.
    pub fn moe_shape(&self) -> MoeShape {
        MoeShape {
            layers: self.n_layers,
            d_model: self.d_model,
            d_ffn: self.d_ffn,
            experts: self.experts,
            slots_per_worker: self.slots_per_worker,
            activation: self.activation,
            gate: self.gate(),
        }
    }
}

/// Runs the training on `cfg.workers` in-process worker threads; `on_step` sees worker 0's metrics as
/// they come. Returns every worker's result, or the first error of each failed worker.
pub fn train_local(
    cfg: &TrainConfig,
    on_step: &(dyn Fn(&StepMetrics) + Sync),
) -> Result<Vec<WorkerResult>, Vec<(usize, RuntimeError)>> {
    if let Err(e) = cfg.validate() {
        return Err(vec![(0, e)]);
    }
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    let results = crate::comm::local::run_local(cfg.workers, timeout, |comm| worker_main(&comm, cfg, on_step));
    split_results(results.into_iter().enumerate().map(|(rank, r)| {
        r.map_err(|e| match e {
            WorkerError::Failed(e) => e,
            e => RuntimeError::Worker { rank, reason: e.to_string() },
        })
    }))
}

/// Every worker's result in rank order, or the error of each failed worker.
fn split_results(
    results: impl Iterator<Item = Result<WorkerResult, RuntimeError>>,
) -> Result<Vec<WorkerResult>, Vec<(usize, RuntimeError)>> {
    let mut ok = Vec::new();
    let mut errs = Vec::new();
    for (rank, r) in results.enumerate() {
        match r {
            Ok(v) => ok.push(v),
            Err(e) => errs.push((rank, e)),
        }
    }
    if errs.is_empty() { Ok(ok) } else { Err(errs) }
}

/// Runs the training on `cfg.workers` in-process threads, one per GPU, exchanging through NCCL
/// ([`crate::comm::nccl::NcclComm`]): worker `r` drives GPU `r` and runs its experts there (`cfg.device` must be
/// [`TrainDevice::Cuda`]). The same loop as [`train_local`] on another communicator; its rank-ordered sums give
/// the same bits as the other transports, the expert GEMMs on the GPU the usual ~1e-5. Returns every worker's
/// result, or the first error of each failed worker (e.g. what is missing: driver, GPUs, libnccl).
#[cfg(feature = "cuda")]
pub fn train_nccl_threads(
    cfg: &TrainConfig,
    on_step: &(dyn Fn(&StepMetrics) + Sync),
) -> Result<Vec<WorkerResult>, Vec<(usize, RuntimeError)>> {
    if let Err(e) = cfg.validate() {
        return Err(vec![(0, e)]);
    }
    if cfg.device != TrainDevice::Cuda {
        let reason = "NCCL moves data between GPUs: the experts must run on them; fix: --device cuda";
        return Err(vec![(0, RuntimeError::invalid("--comm nccl", reason))]);
    }
    // A missing libnccl or GPU: every worker's error says which (the NCCL id or communicator cannot be made).
    let timeout = Duration::from_secs_f64(cfg.timeout_s);
    split_results(
        crate::comm::nccl::run_threads(cfg.workers, timeout, |comm| worker_main(&comm, cfg, on_step)).into_iter(),
    )
}

/// Runs the training as one MPI rank of a job started by `mpirun -np N` (N = `cfg.workers`); `on_step` sees
/// rank 0's metrics as they come. Returns this rank's number and result. A rank whose own work fails (not a
/// peer's failure) tells every other rank at once, so the whole job ends with the error instead of waiting out
/// the timeout. The collectives are the same algorithms as in-process, so with the same configuration the
/// parameters end bit for bit as with `cfg.workers` in-process workers.
#[cfg(feature = "mpi")]
pub fn train_mpi(
    cfg: &TrainConfig,
    on_step: &(dyn Fn(&StepMetrics) + Sync),
) -> Result<(usize, WorkerResult), RuntimeError> {
    cfg.validate()?;
    let comm = crate::comm::mpi::init(Duration::from_secs_f64(cfg.timeout_s))?;
    let me = comm.rank();
    if comm.size() != cfg.workers {
        return Err(RuntimeError::invalid(
            "--workers",
            format!(
                "{} but mpirun started {} ranks; fix: --workers {} or mpirun -np {}",
                cfg.workers,
                comm.size(),
                comm.size(),
                cfg.workers
            ),
        ));
    }
    match worker_main(&comm, cfg, on_step) {
        Ok(r) => Ok((me, r)),
        Err(e) => {
            if !is_comm_failure(&e) {
                comm.abort(&e.to_string());
            }
            Err(e)
        }
    }
}

/// The device of worker `rank`'s experts: with CUDA, GPU `rank mod count`.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn expert_device(device: TrainDevice, rank: usize) -> Result<crate::moe::ExpertDevice, RuntimeError> {
    match device {
        TrainDevice::Cpu => Ok(crate::moe::ExpertDevice::Cpu),
        #[cfg(feature = "cuda")]
        TrainDevice::Cuda => {
            // With no GPU, opening GPU 0 reports what is missing (driver, device) and the fix.
            let n = switchyard_kernels::cuda::probe().device_count();
            crate::moe::ExpertDevice::open_cuda(rank % n.max(1))
        }
        #[cfg(not(feature = "cuda"))]
        TrainDevice::Cuda => Err(RuntimeError::Device {
            step: "choosing the GPU",
            reason: "this build has no GPU path (built without the `cuda` feature); fix: rebuild with default features or use --device cpu".into(),
        }),
    }
}

fn skew_bias(experts: usize, skew: f32) -> Option<Vec<f32>> {
    (skew > 0.0).then(|| (0..experts).map(|e| -skew * ((e + 1) as f32).ln()).collect())
}

/// One worker's training loop on any communicator.
pub fn worker_main(
    comm: &dyn Communicator,
    cfg: &TrainConfig,
    on_step: &(dyn Fn(&StepMetrics) + Sync),
) -> Result<WorkerResult, RuntimeError> {
    cfg.validate()?;
    let (me, w) = (comm.rank(), comm.size());
    if w != cfg.workers {
        return Err(RuntimeError::invalid("--workers", format!("{} but the communicator has {w} ranks", cfg.workers)));
    }
    let engine = Engine::new(Compute::new(cfg.threads_per_worker.max(1)))?;
    let corpus = match &cfg.text {
        Some(p) => Corpus::from_file(p, cfg.ctx)?,
        None => Corpus::synthetic(cfg.seed, 400_000),
    };
    let batcher = Batcher::new(&corpus, cfg.ctx, cfg.global_batch, cfg.seed)?;
    let gcfg =
        GptConfig { vocab: 256, d_model: cfg.d_model, n_heads: cfg.n_heads, n_layers: cfg.n_layers, ctx: cfg.ctx };
    let mut dense = GptDense::random(gcfg, cfg.seed)?;
    let mut dgrads = dense.zeros_like();
    let mut dense_adam: Vec<AdamState> = dense.params_flat().iter().map(|(_, t)| AdamState::new(t.len())).collect();
    let adam = Adam { lr: cfg.lr, weight_decay: 0.0, ..Adam::default() };
    let adam_decay = Adam { weight_decay: cfg.weight_decay, ..adam };

    // Placement and policy.
    let shape = cfg.moe_shape();
    // With expert-data parallelism every expert-parallel group holds the experts under the same placement, over
    // its own `ep` workers.
    let edp = cfg.edp.max(1);
    let ep = w / edp;
    let start = Placement::contiguous(ep, cfg.slots_per_worker, cfg.experts)
        .map_err(|e| RuntimeError::invalid("initial placement", e.to_string()))?;
    let mut rates = None;
    // Worker 0 prices every step with the performance model (and, unless static, decides).
    let policy = if me == 0 {
        let (cluster, peak_flops) = match &cfg.cluster {
            Some(c) => {
                let c = switchyard_cost::calibrate::cluster_for(c, w)
                    .map_err(|e| RuntimeError::invalid("--profile", format!("cannot resize to {w} workers: {e}")))?;
                let peak = c.gpu.peak_tflops_fp32 * 1e12;
                (c, peak)
            }
            None => {
                let r = measure_local(cfg.threads_per_worker)?;
                rates = Some(r);
                (cpu_cluster(w, r), r.gemm_gflops * 1e9)
            }
        };
        let layer_shape = MoeLayerShape {
            d_model: cfg.d_model as u64,
            d_ffn: cfg.d_ffn as u64,
            gated: cfg.activation == Activation::SwiGlu,
            act_bytes: 4,
            param_bytes: 4,
            grad_bytes: 4,
            peak_flops,
        };
        let ctx = LayerContext::for_cluster(&cluster, layer_shape, ep, cfg.slots_per_worker, 1);
        Some((
            PolicyConfig { algorithm: cfg.algorithm, frequency: cfg.frequency, predictor: cfg.predictor },
            vec![ctx; cfg.n_layers],
        ))
    } else {
        None
    };
    let mut moe = ExpertRuntime::with_edp(comm, edp, shape, vec![start; cfg.n_layers], cfg.seed, adam, policy)?;
    let bias = skew_bias(cfg.experts, cfg.route_skew);
    for (i, l) in moe.layers.iter_mut().enumerate() {
        l.expert_bias = bias.clone();
        l.dispatch = cfg.dispatch_of(i);
        l.workers_per_node = if cfg.workers_per_node == 0 { ep } else { cfg.workers_per_node };
    }
    moe.set_device(expert_device(cfg.device, me)?);
    let mut first_fault = cfg.faults.migration.map(|f| match f {
        FaultSpec::Corrupt(rank) => Fault::CorruptReceived { rank },
        FaultSpec::Fail(rank) => Fault::FailAfterExchange { rank },
    });

    let global_tokens = (cfg.global_batch * cfg.ctx) as f64;
    let mut saved = GptSaved::new(&gcfg);
    let mut metrics = Vec::with_capacity(cfg.steps as usize);
    let (mut x, mut u, mut m, mut d_x, mut d_u) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut moe_in: Vec<Vec<f32>> = vec![Vec::new(); cfg.n_layers];
    let mut bytes_all = 0u64;
    for step in 0..cfg.steps {
        if cfg.faults.panic_at == Some((me, step)) {
            panic!("injected panic on worker {me} at step {step}");
        }
        if cfg.faults.stall_at == Some((me, step)) {
            std::thread::sleep(Duration::from_secs_f64(cfg.timeout_s * 2.0 + 0.5));
            return Err(RuntimeError::invalid("worker", format!("worker {me} stalled at step {step} (injected)")));
        }
        if moe.next_fault.is_none() {
            moe.next_fault = first_fault;
        }
        let t0 = Instant::now();
        let batch = batcher.shard(step, me, w)?;
        let bshape: BatchShape = batch.shape;
        let tokens = bshape.tokens();
        let d = cfg.d_model;
        // Forward.
        let loss = engine.run(|cx| -> Result<crate::dense::lm_head::LossSum, RuntimeError> {
            dense.embed_forward(&batch.inputs, bshape, &mut saved.embed, &mut x)?;
            for (l, saved_in) in moe_in.iter_mut().enumerate() {
                dense.attn_sublayer_forward(cx, l, &mut x, bshape, &mut saved.layers[l].attn)?;
                dense.pre_ffn_forward(l, &x, bshape, &mut saved.layers[l].pre_ffn, &mut u)?;
                m.clear();
                m.resize(tokens * d, 0.0);
                moe.forward(cx, comm, l, &u, tokens, &mut m)?;
                saved_in.clone_from(&u);
                for (a, b) in x.iter_mut().zip(&m) {
                    *a += b;
                }
            }
            dense.head_forward(cx, &x, &batch.targets, bshape, &mut saved.head)
        })?;
        let t_fwd = t0.elapsed().as_secs_f64() * 1e3;
        // Backward.
        let t1 = Instant::now();
        engine.run(|cx| -> Result<(), RuntimeError> {
            dense.head_backward(cx, &mut saved.head, (1.0 / global_tokens) as f32, &mut d_x, &mut dgrads)?;
            for l in (0..cfg.n_layers).rev() {
                d_u.clear();
                d_u.resize(tokens * d, 0.0);
                moe.backward(cx, comm, l, &moe_in[l], &d_x, &mut d_u)?;
                dense.pre_ffn_backward(l, &saved.layers[l].pre_ffn, &d_u, &mut d_x, &mut dgrads)?;
                dense.attn_sublayer_backward(cx, l, &mut saved.layers[l].attn, &mut d_x, &mut dgrads)?;
            }
            dense.embed_backward(&saved.embed, &d_x, &mut dgrads)
        })?;
        let t_bwd = t1.elapsed().as_secs_f64() * 1e3;
        // Dense gradients: one all-reduce (with the loss), then Adam.
        let t2 = Instant::now();
        let mut flat: Vec<f32> = Vec::with_capacity(dense.param_count());
        for (_, g) in dgrads.params_flat() {
            flat.extend_from_slice(g);
        }
        comm.all_reduce_sum_f32(&mut flat)?;
        let mut lsum = [loss.sum, loss.count as f64];
        comm.all_reduce_sum_f64(&mut lsum)?;
        let mut at = 0;
        let mut i = 0;
        let mut step_err = None;
        dense.visit_mut(|name, p| {
            let n = p.len();
            let opt = if weight_decay_applies(name) { &adam_decay } else { &adam };
            if let Err(e) = opt.step(p, &flat[at..at + n], &mut dense_adam[i]) {
                step_err.get_or_insert(e);
            }
            at += n;
            i += 1;
        });
        if let Some(e) = step_err {
            return Err(e);
        }
        let t_dense = t2.elapsed().as_secs_f64() * 1e3;
        // Experts: reduce, update, sample, decide, migrate.
        let placed = moe.placements();
        let rep = moe.finish_step(comm, step)?;
        if rep.migration.is_some() {
            first_fault = None;
            moe.next_fault = None;
        }
        let mut moved = [rep.migration.as_ref().map_or(0.0, |m| m.bytes_sent as f64)];
        if rep.migration.is_some() {
            comm.all_reduce_sum_f64(&mut moved)?;
        }
        bytes_all += moved[0] as u64;
        let modelled_moe_ms = moe.modelled_ms(&rep.loads, &placed).unwrap_or(0.0);
        let sm = StepMetrics {
            step,
            loss: lsum[0] / lsum[1].max(1.0),
            step_ms: t0.elapsed().as_secs_f64() * 1e3,
            forward_ms: t_fwd,
            backward_ms: t_bwd,
            dense_update_ms: t_dense,
            expert_update_ms: rep.update_ms,
            sampler_ms: rep.sampler_ms,
            decide_ms: rep.decide_ms,
            migrate_ms: rep.migrate_ms,
            imbalance: rep.imbalance,
            modelled_moe_ms,
            switches: moe.switches,
            rollbacks: moe.rollbacks,
            bytes_moved: bytes_all,
            fetched_bytes: moe.fetched_bytes(),
        };
        if me == 0 {
            on_step(&sm);
        }
        metrics.push(sm);
    }

    // Final checksum over every parameter and optimizer state.
    let mut sum = Checksum::new();
    for ((_, p), st) in dense.params_flat().iter().zip(&dense_adam) {
        sum.update_f32(p);
        sum.update_f32(&st.m);
        sum.update_f32(&st.v);
    }
    moe.checksum(comm, &mut sum)?;
    let experts = moe.gather_experts(comm)?;
    let n = metrics.len().max(1) as f64;
    let mean_step_ms = metrics.iter().map(|m| m.step_ms).sum::<f64>() / n;
    let summary = TrainSummary {
        first_loss: metrics.first().map_or(f64::NAN, |m| m.loss),
        final_loss: metrics.last().map_or(f64::NAN, |m| m.loss),
        steps: cfg.steps,
        workers: w,
        switches: moe.switches,
        rollbacks: moe.rollbacks,
        bytes_moved: bytes_all,
        param_checksum: format!("{:016x}", sum.finish()),
        mean_step_ms,
        mean_imbalance: metrics.iter().map(|m| m.imbalance).sum::<f64>() / n,
        sampler_fraction: metrics.iter().map(|m| m.sampler_ms).sum::<f64>() / n / mean_step_ms.max(1e-12),
        rates,
        device: moe.device().label(),
    };
    Ok(WorkerResult {
        summary,
        dense: dense.params_flat().into_iter().map(|(n, t)| (n, t.to_vec())).collect(),
        experts,
        metrics,
    })
}

/// Whether an error is a communication failure (a peer died or stalled).
pub fn is_comm_failure(e: &RuntimeError) -> bool {
    matches!(e, RuntimeError::Comm(CommError::Timeout { .. } | CommError::PeerFailed { .. }))
}
