//! [`ExpertRuntime`]: the MoE layers of one worker plus everything that keeps them balanced: the
//! sampler (per-layer load matrices), the switcher (the planner's online policy) and the migrator.
//! This is the API a user's own training loop embeds: call [`ExpertRuntime::forward`] /
//! [`ExpertRuntime::backward`] per MoE layer, then [`ExpertRuntime::finish_step`] once per
//! iteration (after the dense gradients are reduced, before or after the dense optimizer step).

use std::time::Instant;

use serde::{Deserialize, Serialize};
use switchyard_cost::{LoadMatrix, Placement};
use switchyard_kernels::{Activation, Compute, ExpertParams, GateConfig, Storage};
use switchyard_planner::online::LayerContext;

use crate::checksum::Checksum;
use crate::comm::{CommExt, Communicator};
use crate::error::RuntimeError;
use crate::migrate::{Fault, MigrationOutcome, migrate};
use crate::moe::{DistMoeLayer, MoeLayerGrads, MoeSaved, SlotStore};
use crate::optim::{Adam, AdamState};
use crate::switcher::Switcher;
use switchyard_planner::online::PolicyConfig;

/// Shape of the MoE layers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeShape {
    /// MoE layers.
    pub layers: usize,
    /// Model width.
    pub d_model: usize,
    /// Expert hidden width.
    pub d_ffn: usize,
    /// Logical experts per layer.
    pub experts: usize,
    /// Slots per worker (workers x slots >= experts; spare slots hold replicas).
    pub slots_per_worker: usize,
    /// Expert FFN form.
    pub activation: Activation,
    /// Router settings.
    pub gate: GateConfig,
}

/// What one [`ExpertRuntime::finish_step`] did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StepReport {
    /// Per layer, this iteration's load (source worker x expert), the same on every worker.
    #[serde(skip)]
    pub loads: Vec<LoadMatrix>,
    /// Busiest worker's routed rows over the mean, averaged over layers (under the placement that served them).
    pub imbalance: f64,
    /// Whether the policy was asked this step.
    pub decided: bool,
    /// Whether the placement changed (migration committed).
    pub switched: bool,
    /// The migration, when one ran.
    pub migration: Option<MigrationOutcome>,
    /// Time to sample the loads, ms: packing this worker's counts into the router-gradient all-reduce and
    /// unpacking the matrices (the counts add a few hundred floats to that all-reduce).
    pub sampler_ms: f64,
    /// Time to reduce replica / router gradients and step the optimizer, ms.
    pub update_ms: f64,
    /// Time of the policy (on worker 0) and the broadcast of its decision, ms.
    pub decide_ms: f64,
    /// Migration time, ms.
    pub migrate_ms: f64,
}

/// The MoE layers of one worker and their balancing machinery.
pub struct ExpertRuntime {
    /// The layers.
    pub layers: Vec<DistMoeLayer>,
    saved: Vec<MoeSaved>,
    grads: Vec<MoeLayerGrads>,
    gate_adam: Vec<AdamState>,
    adam: Adam,
    switcher: Option<Switcher>,
    /// Fault to inject into the next migration (tests).
    pub next_fault: Option<Fault>,
    /// Switches committed so far.
    pub switches: u64,
    /// Migrations rolled back so far.
    pub rollbacks: u64,
    /// Bytes this worker has sent in migrations.
    pub bytes_moved: u64,
    /// Message buffers kept between migrations.
    pool: Vec<Vec<u8>>,
    /// Expert-data-parallel groups, when the workers hold more than one copy of the experts.
    groups: Option<EdpGroups>,
}

/// The sub-groups of an expert-data-parallel layout: `edp` expert-parallel groups of consecutive ranks, each
/// holding every expert (the same placement), and the groups of ranks at the same position in each.
struct EdpGroups {
    /// This worker's expert-parallel group (placements, token exchange, replicas, migration).
    ep: Box<dyn Communicator>,
    /// The workers at this worker's position in every expert-parallel group (expert gradient all-reduce).
    edp: Box<dyn Communicator>,
}

/// Seeded initial weights of logical expert `e` of layer `l` (independent of where it is placed).
pub fn expert_init(shape: &MoeShape, seed: u64, layer: usize, e: u32) -> Result<[Vec<f32>; 4], RuntimeError> {
    let s = seed ^ 0x5eed_e4be_0000_0000 ^ ((layer as u64) << 32) ^ e as u64;
    let p = ExpertParams::random(shape.activation, 1, shape.d_model, shape.d_ffn, Storage::F32, s)?;
    let f = |w: &switchyard_kernels::Stored| w.to_f32_vec();
    Ok([f(&p.w_in), p.b_in.clone(), f(&p.w_out), p.b_out.clone()])
}

impl ExpertRuntime {
    /// Builds worker `comm.rank()`'s layers: placements (one per layer, the same on every worker),
    /// seeded weights. `policy` with `contexts` enables re-placement (only worker 0 needs real contexts;
    /// pass `None` for a static run).
    pub fn new(
        comm: &dyn Communicator,
        shape: MoeShape,
        placements: Vec<Placement>,
        seed: u64,
        adam: Adam,
        policy: Option<(PolicyConfig, Vec<LayerContext>)>,
    ) -> Result<Self, RuntimeError> {
        Self::build(comm, comm, shape, placements, seed, adam, policy)
    }

    /// As [`ExpertRuntime::new`] with expert-data parallelism: the `world`'s workers form `edp` expert-parallel
    /// groups of `world.size() / edp` consecutive ranks; each group holds every expert under the same placements
    /// (over its own ranks: `placements[l].gpus` is the group size), its tokens go to its own experts, and the
    /// expert gradients are summed over the groups before the optimizer step. Collective over `world`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_edp(
        world: &dyn Communicator,
        edp: usize,
        shape: MoeShape,
        placements: Vec<Placement>,
        seed: u64,
        adam: Adam,
        policy: Option<(PolicyConfig, Vec<LayerContext>)>,
    ) -> Result<Self, RuntimeError> {
        let w = world.size();
        if edp == 0 || !w.is_multiple_of(edp) {
            return Err(RuntimeError::invalid(
                "expert-data-parallel groups",
                format!("{edp} groups do not divide {w} workers"),
            ));
        }
        if edp == 1 {
            return Self::new(world, shape, placements, seed, adam, policy);
        }
        let ep_size = w / edp;
        let me = world.rank();
        let ep = world.split(me / ep_size, me % ep_size)?;
        let edp_comm = world.split(me % ep_size, me / ep_size)?;
        let groups = EdpGroups { ep, edp: edp_comm };
        let rt = Self::build(world, groups.ep.as_ref(), shape, placements, seed, adam, policy)?;
        Ok(Self { groups: Some(groups), ..rt })
    }

    /// The expert-parallel group of this worker: its own group with expert-data parallelism, else `world`.
    pub fn ep_comm<'a>(&'a self, world: &'a dyn Communicator) -> &'a dyn Communicator {
        self.groups.as_ref().map_or(world, |g| g.ep.as_ref())
    }

    /// Number of expert-data-parallel groups (1: every worker holds its own share of one copy of the experts).
    pub fn edp(&self) -> usize {
        self.groups.as_ref().map_or(1, |g| g.edp.size())
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        world: &dyn Communicator,
        comm: &dyn Communicator,
        shape: MoeShape,
        placements: Vec<Placement>,
        seed: u64,
        adam: Adam,
        policy: Option<(PolicyConfig, Vec<LayerContext>)>,
    ) -> Result<Self, RuntimeError> {
        shape.gate.validate(shape.experts)?;
        if placements.len() != shape.layers {
            return Err(RuntimeError::invalid(
                "placements",
                format!("{} for {} layers", placements.len(), shape.layers),
            ));
        }
        let mut layers = Vec::with_capacity(shape.layers);
        for (l, p) in placements.into_iter().enumerate() {
            if p.gpus != comm.size() || p.slots_per_gpu != shape.slots_per_worker || p.experts != shape.experts {
                return Err(RuntimeError::invalid(
                    "placement",
                    format!(
                        "layer {l}: {} workers x {} slots for {} experts; the run has {} x {} for {}",
                        p.gpus,
                        p.slots_per_gpu,
                        p.experts,
                        comm.size(),
                        shape.slots_per_worker,
                        shape.experts
                    ),
                ));
            }
            let mine = p.gpu_slots(comm.rank()).to_vec();
            let mut init_err = None;
            let slots = SlotStore::new(shape.activation, shape.d_model, shape.d_ffn, mine, |e| {
                expert_init(&shape, seed, l, e).unwrap_or_else(|err| {
                    init_err = Some(err);
                    Default::default()
                })
            });
            if let Some(e) = init_err {
                return Err(e);
            }
            let mut rng = switchyard_kernels::random::seeded_rng(seed ^ 0x9a7e ^ ((l as u64) << 20));
            let std = 1.0 / (shape.d_model as f64).sqrt();
            let gate_weight: Vec<f32> = (0..shape.d_model * shape.experts)
                .map(|_| (switchyard_kernels::random::standard_normal(&mut rng) * std) as f32)
                .collect();
            layers.push(DistMoeLayer {
                gate: shape.gate,
                gate_weight,
                expert_bias: None,
                experts: shape.experts,
                placement: p,
                slots: slots?,
                spare: None,
                dispatch: switchyard_cost::DispatchMode::Token,
                workers_per_node: comm.size(),
                device: crate::moe::ExpertDevice::Cpu,
            });
        }
        let switcher = policy.filter(|_| world.rank() == 0).map(|(cfg, ctx)| Switcher::new(cfg, ctx));
        Ok(Self {
            saved: (0..shape.layers).map(|_| MoeSaved::default()).collect(),
            grads: (0..shape.layers).map(|_| MoeLayerGrads::default()).collect(),
            gate_adam: (0..shape.layers).map(|_| AdamState::new(shape.d_model * shape.experts)).collect(),
            layers,
            adam,
            switcher,
            next_fault: None,
            switches: 0,
            rollbacks: 0,
            bytes_moved: 0,
            pool: Vec::new(),
            groups: None,
        })
    }

    /// Moves to `placements` now (collective: every worker must call it with the same placements), as a
    /// decision of the policy would; returns this worker's outcome.
    pub fn migrate_to(
        &mut self,
        comm: &dyn Communicator,
        placements: &[Placement],
    ) -> Result<MigrationOutcome, RuntimeError> {
        let ep = self.groups.as_ref().map_or(comm, |g| g.ep.as_ref());
        migrate(ep, comm, &mut self.layers, placements, self.next_fault.take(), &mut self.pool)
    }

    /// The current placements.
    pub fn placements(&self) -> Vec<Placement> {
        self.layers.iter().map(|l| l.placement.clone()).collect()
    }

    /// Runs the local experts' FFNs of every layer on `device` from now on (the CPU by default). The weights and
    /// optimizer state stay on the host, so placements, migrations and checksums are unchanged.
    pub fn set_device(&mut self, device: crate::moe::ExpertDevice) {
        for l in &mut self.layers {
            l.device = device.clone();
        }
    }

    /// Where the local experts' FFNs run.
    pub fn device(&self) -> crate::moe::ExpertDevice {
        self.layers.first().map(|l| l.device.clone()).unwrap_or_default()
    }

    /// Forward of MoE layer `layer` on this worker's `tokens` rows of `x` into `out`.
    pub fn forward(
        &mut self,
        cx: &Compute,
        comm: &dyn Communicator,
        layer: usize,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
    ) -> Result<(), RuntimeError> {
        let l =
            self.layers.get(layer).ok_or_else(|| RuntimeError::invalid("layer", format!("{layer} out of range")))?;
        let ep = self.groups.as_ref().map_or(comm, |g| g.ep.as_ref());
        l.forward(cx, ep, x, tokens, out, &mut self.saved[layer])
    }

    /// Backward of MoE layer `layer`: `x` is the forward's input, `d_out` the output gradient; writes `d_x`.
    pub fn backward(
        &mut self,
        cx: &Compute,
        comm: &dyn Communicator,
        layer: usize,
        x: &[f32],
        d_out: &[f32],
        d_x: &mut [f32],
    ) -> Result<(), RuntimeError> {
        let l =
            self.layers.get(layer).ok_or_else(|| RuntimeError::invalid("layer", format!("{layer} out of range")))?;
        let ep = self.groups.as_ref().map_or(comm, |g| g.ep.as_ref());
        l.backward(cx, ep, x, &self.saved[layer], d_out, d_x, &mut self.grads[layer])
    }

    /// Bytes of expert weights that travelled to the tokens in the last forward of the data-centric layers, over
    /// all workers (the backward sends as many gradient bytes back); 0 when every layer dispatches tokens.
    pub fn fetched_bytes(&self) -> u64 {
        self.saved
            .iter()
            .zip(&self.layers)
            .map(|(s, l)| {
                let p = &l.slots.params;
                let per: usize = crate::moe::slots::tensor_sizes(p.activation, p.d_model, p.d_ffn).iter().sum();
                (s.fetched_copies().unwrap_or(0) * per * 4) as u64
            })
            .sum()
    }

    /// This worker's expert gradients of MoE layer `layer` from its last backward (local slots' layout, before the
    /// replica sum).
    pub fn expert_grads(&self, layer: usize) -> &switchyard_kernels::ExpertGrads {
        &self.grads[layer].experts
    }

    /// Modelled MoE time (ms, all layers) of one iteration under `loads` and `placements`, as the policy
    /// prices it; `None` on workers that do not run the policy.
    pub fn modelled_ms(&self, loads: &[LoadMatrix], placements: &[Placement]) -> Option<f64> {
        self.switcher.as_ref().map(|s| s.modelled_ms(loads, placements))
    }

    /// The router's weighted auxiliary losses of this worker's last forward, summed over layers.
    pub fn aux_loss(&self) -> f32 {
        self.saved.iter().map(|s| s.aux_loss()).sum()
    }

    /// Ends an iteration: reduces router gradients over workers and expert gradients over replicas,
    /// steps the optimizer, samples the loads, and (at `iteration`) lets the policy decide and the
    /// migrator move experts. Every worker must call it.
    pub fn finish_step(&mut self, comm: &dyn Communicator, iteration: u64) -> Result<StepReport, RuntimeError> {
        let mut rep = StepReport::default();
        let t0 = Instant::now();
        let (me, w) = (comm.rank(), comm.size());
        let e = self.layers.first().map_or(0, |l| l.experts);
        let nl = self.layers.len();
        // Router gradients and the sampler's counts ride one all-reduce: each worker writes its per-layer,
        // per-expert counts into its own segment of a zero block, so the sum is the whole load matrix. Counts
        // are integers below 2^24 (checked), exact in f32, so sampling costs a few hundred floats, not a collective.
        let gate_len: usize = self.layers.iter().map(|l| l.gate_weight.len()).sum();
        let mut flat: Vec<f32> = Vec::with_capacity(gate_len + w * nl * e);
        for g in &self.grads {
            flat.extend_from_slice(&g.gate.d_gate_weight);
        }
        if flat.len() != gate_len {
            return Err(RuntimeError::invalid(
                "router gradients",
                format!("{} values, expected {gate_len}", flat.len()),
            ));
        }
        let ts = Instant::now();
        flat.resize(gate_len + w * nl * e, 0.0);
        for (l, s) in self.saved.iter().enumerate() {
            for (x, &c) in s.demand().iter().enumerate().take(e) {
                if c >= 1 << 24 {
                    return Err(RuntimeError::invalid("sampled loads", format!("count {c} exceeds 2^24")));
                }
                flat[gate_len + (me * nl + l) * e + x] = c as f32;
            }
        }
        let mut sampler_s = ts.elapsed().as_secs_f64();
        comm.all_reduce_sum_f32(&mut flat)?;
        let mut at = 0;
        for (l, layer) in self.layers.iter_mut().enumerate() {
            let n = layer.gate_weight.len();
            self.adam.step(&mut layer.gate_weight, &flat[at..at + n], &mut self.gate_adam[l])?;
            at += n;
            let mut eg = std::mem::take(&mut self.grads[l].experts);
            let ep = self.groups.as_ref().map_or(comm, |g| g.ep.as_ref());
            layer.sync_replica_grads(ep, &mut eg)?;
            if let Some(g) = &self.groups {
                // Every expert-parallel group trained its copy on its own tokens: sum over the groups (in group
                // order, the same bits everywhere).
                let mut all: Vec<f32> =
                    [&eg.d_w_in, &eg.d_b_in, &eg.d_w_out, &eg.d_b_out].iter().flat_map(|v| v.iter().copied()).collect();
                g.edp.all_reduce_sum_f32(&mut all)?;
                let mut at = 0;
                for v in [&mut eg.d_w_in, &mut eg.d_b_in, &mut eg.d_w_out, &mut eg.d_b_out] {
                    let n = v.len();
                    v.copy_from_slice(&all[at..at + n]);
                    at += n;
                }
            }
            layer.slots.adam_step(&self.adam, &eg)?;
            self.grads[l].experts = eg;
        }

        // Sampler: unpack the load matrices.
        let ts = Instant::now();
        // With expert-data parallelism the groups' sources are folded onto their positions in a group (the
        // placement spans one group): source p's row sums the rows of every group's worker p.
        let ep_size = w / self.edp();
        for l in 0..nl {
            let mut counts = vec![0u64; ep_size * e];
            for r in 0..w {
                let base = gate_len + (r * nl + l) * e;
                let row = &mut counts[(r % ep_size) * e..(r % ep_size + 1) * e];
                for (c, &x) in row.iter_mut().zip(&flat[base..base + e]) {
                    *c += x as u64;
                }
            }
            rep.loads.push(LoadMatrix { ranks: ep_size, experts: e, counts });
        }
        rep.imbalance = rep
            .loads
            .iter()
            .zip(&self.layers)
            .map(|(m, layer)| {
                let loads: Vec<f64> = m.expert_loads().iter().map(|&x| x as f64).collect();
                layer.placement.imbalance(&loads)
            })
            .sum::<f64>()
            / nl.max(1) as f64;
        // The predictor's running sums take this iteration's loads in (part of sampling, not of the decision).
        if let Some(sw) = self.switcher.as_mut() {
            sw.record(&rep.loads);
        }
        sampler_s += ts.elapsed().as_secs_f64();
        rep.sampler_ms = sampler_s * 1e3;
        rep.update_ms = t0.elapsed().as_secs_f64() * 1e3 - rep.sampler_ms;

        // Policy on worker 0, decision broadcast.
        let t2 = Instant::now();
        let mut msg = Vec::new();
        if let Some(sw) = self.switcher.as_mut() {
            let current = self.layers.iter().map(|l| l.placement.clone()).collect::<Vec<_>>();
            let d = sw.decide(iteration, &current);
            let payload = Broadcast {
                decided: d.evaluated,
                switch: d.switch,
                placements: if d.switch { d.placements } else { Vec::new() },
            };
            msg = serde_json::to_vec(&payload).map_err(|e| RuntimeError::invalid("decision", e.to_string()))?;
        }
        comm.broadcast(0, &mut msg)?;
        let b: Broadcast = if msg.is_empty() {
            Broadcast::default()
        } else {
            serde_json::from_slice(&msg).map_err(|e| RuntimeError::invalid("decision from worker 0", e.to_string()))?
        };
        rep.decided = b.decided;
        rep.decide_ms = t2.elapsed().as_secs_f64() * 1e3;
        if b.switch {
            let t3 = Instant::now();
            let ep = self.groups.as_ref().map_or(comm, |g| g.ep.as_ref());
            let out = migrate(ep, comm, &mut self.layers, &b.placements, self.next_fault.take(), &mut self.pool)?;
            rep.switched = out.committed;
            if out.committed {
                self.switches += 1;
            } else {
                self.rollbacks += 1;
            }
            self.bytes_moved += out.bytes_sent;
            rep.migration = Some(out);
            rep.migrate_ms = t3.elapsed().as_secs_f64() * 1e3;
        }
        Ok(rep)
    }

    /// Checksums of every logical expert's state and every router's state (weights and Adam moments),
    /// in logical order, taken from each expert's first slot. Collective; the same on every worker.
    pub fn checksum(&self, comm: &dyn Communicator, into: &mut Checksum) -> Result<(), RuntimeError> {
        // With expert-data parallelism the first group's copy stands for all (the gradient sum keeps them equal).
        let (me, first_group) = match &self.groups {
            Some(g) => (g.ep.rank(), g.edp.rank() == 0),
            None => (comm.rank(), true),
        };
        let mut mine: Vec<u64> = Vec::new(); // (layer, expert, checksum) triples
        let mut buf = Vec::new();
        for (l, layer) in self.layers.iter().enumerate() {
            let spw = layer.placement.slots_per_gpu;
            for (e, slots) in layer.placement.expert_slots().iter().enumerate() {
                if let Some(&s) = slots.first()
                    && s / spw == me
                    && first_group
                {
                    buf.clear();
                    layer.slots.export_slot(s % spw, &mut buf);
                    mine.extend_from_slice(&[l as u64, e as u64, crate::checksum::checksum_f32(&buf)]);
                }
            }
        }
        let all = comm.all_gather_u64(&mine)?;
        let mut table: Vec<(u64, u64, u64)> =
            all.iter().flat_map(|v| v.chunks_exact(3).map(|c| (c[0], c[1], c[2]))).collect();
        table.sort_unstable();
        for (l, layer) in self.layers.iter().enumerate() {
            into.update_f32(&layer.gate_weight);
            into.update_f32(&self.gate_adam[l].m);
            into.update_f32(&self.gate_adam[l].v);
        }
        for (l, e, c) in table {
            into.update_u64(l);
            into.update_u64(e);
            into.update_u64(c);
        }
        Ok(())
    }

    /// Every logical expert's weights (four tensors concatenated), per layer, in logical order, on every
    /// worker (collective). For tests and checkpoints.
    pub fn gather_experts(&self, comm: &dyn Communicator) -> Result<Vec<Vec<Vec<f32>>>, RuntimeError> {
        // With expert-data parallelism: this worker's group's copy.
        let comm = self.ep_comm(comm);
        let me = comm.rank();
        let mut out = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let spw = layer.placement.slots_per_gpu;
            let mut mine: Vec<f32> = Vec::new();
            let mut state = Vec::new();
            let per = layer.slots.state_len() / 3;
            for slots in layer.placement.expert_slots() {
                if let Some(&s) = slots.first()
                    && s / spw == me
                {
                    state.clear();
                    layer.slots.export_slot(s % spw, &mut state);
                    mine.extend_from_slice(&state[..per]);
                }
            }
            let all = comm.all_gather_f32(&mine)?;
            let mut cursor = vec![0usize; comm.size()];
            let mut experts = Vec::with_capacity(layer.experts);
            for slots in layer.placement.expert_slots() {
                let s = *slots.first().ok_or_else(|| RuntimeError::invalid("placement", "an expert without a slot"))?;
                let u = s / spw;
                let part = all[u]
                    .get(cursor[u]..cursor[u] + per)
                    .ok_or_else(|| RuntimeError::invalid("gathered experts", format!("worker {u} sent too little")))?;
                experts.push(part.to_vec());
                cursor[u] += per;
            }
            out.push(experts);
        }
        Ok(out)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Broadcast {
    decided: bool,
    switch: bool,
    placements: Vec<Placement>,
}
