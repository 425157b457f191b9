//! The whole MoE layer on one GPU, mirroring [`crate::layer::MoeLayer`]: the same parameters
//! (copied to the device), the same routing rules, the same outputs and gradients within f32
//! rounding.
//!
//! ```text
//! forward:  logits = x Wg (cuBLAS) [+ noise drawn on the host with the CPU's generator]
//!           gate_softmax_topk -> probs, top-k, weights, demand
//!           demand -> host: capacity (CapacityPolicy::capacity), kept, offsets   (one small read)
//!           gate_positions (arrival or batch-prioritised order), build_rows
//!           dispatch_gather -> experts (cuBLAS per expert + bias/activation kernels) -> combine
//!           aux / z losses from gate_loss_stats (read back only when their weights are > 0)
//! backward: combine_backward_{rows,weights} -> experts backward -> gather_backward
//!           gate_backward -> d_logits; d_Wg = x^T d_logits, d_x += d_logits Wg^T (cuBLAS)
//! ```
//!
//! The one read-back in the forward (the demand per expert) is what the per-expert GEMMs need on
//! the host anyway (their row counts). Everything else stays on the device.

use crate::cuda::blas::{DeviceExpertGrads, DeviceExperts, ExpertActivations, sgemm};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaResult;
use crate::cuda::launch::{GateBuffers, RowMaps};
use crate::error::{KernelError, check_finite, check_len};
use crate::gate::{DropPolicy, GateGrads, Routing};
use crate::gemm::Trans;
use crate::layer::{MoeConfig, MoeGrads, MoeLayer};
use crate::random::{seeded_rng, standard_normal};
use cudarc::driver::CudaSlice;
use std::sync::Arc;

/// The parameters of one MoE layer on a GPU.
#[derive(Debug)]
pub struct CudaMoeLayer {
    dev: Arc<CudaDevice>,
    config: MoeConfig,
    /// Router weight `Wg`, `[d, E]`.
    pub gate_weight: CudaSlice<f32>,
    /// Selection bias (loss-free balancing), `[E]`, with its host copy.
    expert_bias: Option<(Vec<f32>, CudaSlice<f32>)>,
    /// The experts.
    pub experts: DeviceExperts,
}

/// What the forward produced and saved for the backward (device buffers reused between calls;
/// they may be longer than the last batch needs).
#[derive(Debug)]
pub struct CudaMoeState {
    /// Tokens of the last forward.
    pub tokens: usize,
    /// The capacity applied.
    pub capacity: usize,
    /// Assignments per expert before capacity.
    pub demand: Vec<usize>,
    /// Assignments per expert kept.
    pub kept: Vec<usize>,
    /// Row ranges of the experts in the grouped buffer, `[E + 1]`.
    pub offsets: Vec<usize>,
    /// Load-balancing loss (with its weight).
    pub aux_loss: f32,
    /// Router z-loss (with its weight).
    pub z_loss: f32,
    /// Logits after noise, `[T, E]`.
    pub logits: CudaSlice<f32>,
    /// Router outputs.
    pub gate: GateBuffers,
    /// Position of each assignment, -1 when dropped, `[T * k]`.
    pub position: CudaSlice<i32>,
    /// Token <-> row maps.
    pub maps: RowMaps,
    /// `offsets` on the device.
    pub offsets_dev: CudaSlice<u32>,
    /// Gathered inputs, `[N, d]`.
    pub dispatched: CudaSlice<f32>,
    /// Saved expert activations.
    pub activations: ExpertActivations,
    /// Expert outputs, `[N, d]`.
    pub expert_output: CudaSlice<f32>,
    /// Layer output, `[T, d]`.
    pub output: CudaSlice<f32>,
    order: CudaSlice<u32>,
    noise: CudaSlice<f32>,
    stats: CudaSlice<f64>,
}

/// Gradients of the layer on the device (overwritten by each backward).
#[derive(Debug)]
pub struct CudaMoeGrads {
    /// `d loss / d x`, `[T, d]`.
    pub d_x: CudaSlice<f32>,
    /// `d loss / d logits`, `[T, E]`.
    pub d_logits: CudaSlice<f32>,
    /// `d loss / d Wg`, `[d, E]`.
    pub d_gate_weight: CudaSlice<f32>,
    /// Expert gradients.
    pub experts: DeviceExpertGrads,
    d_expert_output: CudaSlice<f32>,
    d_dispatched: CudaSlice<f32>,
    d_weight: CudaSlice<f32>,
    aux_coef: CudaSlice<f32>,
    status: CudaSlice<u32>,
}

impl CudaMoeLayer {
    /// Copies a CPU layer's parameters to `dev` (bf16-stored expert weights are widened to f32;
    /// the GPU keeps its saved activations in f32).
    pub fn from_layer(dev: Arc<CudaDevice>, layer: &MoeLayer) -> CudaResult<Self> {
        layer.validate()?;
        let gate_weight = dev.upload(&layer.gate_weight)?;
        let experts = DeviceExperts::from_params(&dev, &layer.experts)?;
        let mut out = Self { dev, config: layer.config, gate_weight, expert_bias: None, experts };
        out.set_expert_bias(layer.expert_bias.as_deref())?;
        Ok(out)
    }

    /// The configuration.
    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Replaces the selection bias (`[E]`, finite) or removes it.
    pub fn set_expert_bias(&mut self, bias: Option<&[f32]>) -> CudaResult<()> {
        self.expert_bias = match bias {
            None => None,
            Some(b) => {
                check_len("expert_bias", &[self.config.experts], b.len())?;
                check_finite("expert_bias", b)?;
                Some((b.to_vec(), self.dev.upload(b)?))
            }
        };
        Ok(())
    }

    /// Fresh forward state (buffers grow on use).
    pub fn new_state(&self) -> CudaResult<CudaMoeState> {
        let dev = &self.dev;
        let c = &self.config;
        Ok(CudaMoeState {
            tokens: 0,
            capacity: 0,
            demand: vec![0; c.experts],
            kept: vec![0; c.experts],
            offsets: vec![0; c.experts + 1],
            aux_loss: 0.0,
            z_loss: 0.0,
            logits: dev.zeros(1)?,
            gate: GateBuffers::new(dev, 0, c.experts, c.gate.top_k)?,
            position: dev.zeros(1)?,
            maps: RowMaps::new(dev, 0, 0)?,
            offsets_dev: dev.zeros(c.experts + 1)?,
            dispatched: dev.zeros(1)?,
            activations: self.experts.new_activations(dev)?,
            expert_output: dev.zeros(1)?,
            output: dev.zeros(1)?,
            order: dev.zeros(1)?,
            noise: dev.zeros(1)?,
            stats: dev.zeros(c.experts + 1)?,
        })
    }

    /// Fresh gradients.
    pub fn new_grads(&self) -> CudaResult<CudaMoeGrads> {
        let dev = &self.dev;
        let c = &self.config;
        Ok(CudaMoeGrads {
            d_x: dev.zeros(1)?,
            d_logits: dev.zeros(1)?,
            d_gate_weight: dev.zeros(c.d_model * c.experts)?,
            experts: self.experts.new_grads(dev)?,
            d_expert_output: dev.zeros(1)?,
            d_dispatched: dev.zeros(1)?,
            d_weight: dev.zeros(1)?,
            aux_coef: dev.zeros(c.experts)?,
            status: dev.zeros(1)?,
        })
    }

    /// Forward on `x: [tokens, d]` (device); the output is `state.output` (`[tokens, d]`).
    /// Reads the demand per expert back to the host (and, for batch-prioritised dropping, the
    /// top-1 probabilities; for nonzero loss weights, the loss sums).
    pub fn forward(&self, x: &CudaSlice<f32>, tokens: usize, st: &mut CudaMoeState) -> CudaResult<()> {
        let dev = &*self.dev;
        let c = &self.config;
        c.validate()?;
        let (d, e_n, k) = (c.d_model, c.experts, c.gate.top_k);
        let td = tokens
            .checked_mul(d)
            .ok_or(KernelError::InvalidConfig { field: "tokens", reason: "tokens x d_model overflows".into() })?;
        if x.len() < td {
            return Err(KernelError::ShapeMismatch {
                operand: "x",
                expected: format!("[{tokens}, {d}] ({td} elements)"),
                actual: format!("{} elements", x.len()),
            }
            .into());
        }
        let te = tokens * e_n;
        let tk = tokens * k;
        st.tokens = tokens;

        // 1. logits (+ noise, drawn on the host exactly as the CPU path draws it)
        dev.ensure(&mut st.logits, te)?;
        sgemm(dev, Trans::No, Trans::No, tokens, e_n, d, x, d, &self.gate_weight, e_n, 0.0, &mut st.logits, e_n)?;
        if c.gate.noise_std > 0.0 && te > 0 {
            let mut rng = seeded_rng(c.gate.noise_seed);
            let noise: Vec<f32> =
                (0..te).map(|_| (standard_normal(&mut rng) * c.gate.noise_std as f64) as f32).collect();
            dev.ensure(&mut st.noise, te)?;
            dev.copy_to(&noise, &mut st.noise)?;
            dev.add_inplace(&mut st.logits, &st.noise, te)?;
        }

        // 2.-4. softmax, top-k, weights, demand
        st.gate.ensure(dev, tokens, e_n, k)?;
        let bias = self.expert_bias.as_ref().map(|(_, b)| b);
        dev.gate_softmax_topk(&st.logits, tokens, e_n, k, bias, c.gate.renormalize, &mut st.gate)?;
        let mut head = dev.download(&st.gate.demand, e_n)?;
        head.extend(dev.download(&st.gate.status, 1)?);
        if head[e_n] != 0 {
            let logits = dev.download(&st.logits, te)?;
            let index = logits.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(KernelError::NonFinite { operand: "gate logits", index }.into());
        }

        // 5. capacity (on the host, the CPU's rule) and positions
        st.demand = head[..e_n].iter().map(|&v| v as usize).collect();
        st.capacity = c.gate.capacity.capacity(tokens, k, e_n, &st.demand)?;
        st.kept = st.demand.iter().map(|&v| v.min(st.capacity)).collect();
        st.offsets.clear();
        st.offsets.push(0);
        for &kept in &st.kept {
            let last = *st.offsets.last().unwrap_or(&0);
            st.offsets.push(last + kept);
        }
        let n = st.offsets[e_n];
        let order = match c.gate.drop_policy {
            DropPolicy::ArrivalOrder => None,
            DropPolicy::BatchPrioritized => {
                let top1 = dev.download(&st.gate.top1, tokens)?;
                let mut o: Vec<u32> = (0..tokens as u32).collect();
                // Highest top-1 probability first; ties keep token order (stable), as on the CPU.
                o.sort_by(|&a, &b| top1[b as usize].total_cmp(&top1[a as usize]));
                dev.ensure(&mut st.order, tokens)?;
                dev.copy_to(&o, &mut st.order)?;
                Some(&st.order)
            }
        };
        dev.ensure(&mut st.position, tk)?;
        dev.gate_positions(&st.gate.expert_index, order, tokens, k, e_n, st.capacity, &mut st.position)?;
        let offsets_u32: Vec<u32> = st.offsets.iter().map(|&o| o as u32).collect();
        dev.ensure(&mut st.offsets_dev, e_n + 1)?;
        dev.copy_to(&offsets_u32, &mut st.offsets_dev)?;
        st.maps.ensure(dev, tk, n)?;
        dev.build_rows(&st.gate.expert_index, &st.position, &st.offsets_dev, tokens, k, e_n, n, &mut st.maps)?;

        // 6. losses
        st.aux_loss = 0.0;
        st.z_loss = 0.0;
        if tokens > 0 && (c.gate.aux_loss_weight > 0.0 || c.gate.z_loss_weight > 0.0) {
            dev.gate_loss_stats(&st.gate.probs, &st.gate.logsumexp, tokens, e_n, &mut st.stats)?;
            let sums = dev.download(&st.stats, e_n + 1)?;
            if c.gate.aux_loss_weight > 0.0 {
                let mut s = 0.0f64;
                for (&demand, &p) in st.demand.iter().zip(&sums) {
                    s += demand as f64 / tk as f64 * (p / tokens as f64);
                }
                st.aux_loss = (c.gate.aux_loss_weight as f64 * e_n as f64 * s) as f32;
            }
            if c.gate.z_loss_weight > 0.0 {
                st.z_loss = (c.gate.z_loss_weight as f64 * sums[e_n] / tokens as f64) as f32;
            }
        }

        // dispatch -> experts -> combine
        dev.ensure(&mut st.dispatched, n * d)?;
        dev.dispatch_gather(x, &st.maps.row_token, tokens, n, d, &mut st.dispatched)?;
        self.experts.forward(
            dev,
            &st.dispatched,
            &st.offsets,
            &st.offsets_dev,
            &st.maps.row_expert,
            &mut st.activations,
            &mut st.expert_output,
        )?;
        dev.ensure(&mut st.output, td)?;
        dev.combine_forward(
            &st.maps.assignment_row,
            &st.gate.weight,
            &st.expert_output,
            tokens,
            k,
            n,
            d,
            &mut st.output,
        )
    }

    /// Backward from `d_output = d loss / d output` (`[tokens, d]`, device) and the state of the
    /// forward on the same `x`; includes the gradients of the aux and z losses (weight 1), as
    /// [`MoeLayer::backward`]. Checks `d_output` for NaN / infinity (one small read-back).
    pub fn backward(
        &self,
        x: &CudaSlice<f32>,
        st: &CudaMoeState,
        d_output: &CudaSlice<f32>,
        g: &mut CudaMoeGrads,
    ) -> CudaResult<()> {
        let dev = &*self.dev;
        let c = &self.config;
        let (d, e_n, k) = (c.d_model, c.experts, c.gate.top_k);
        let tokens = st.tokens;
        let (td, te, tk) = (tokens * d, tokens * e_n, tokens * k);
        let n = st.offsets.last().copied().unwrap_or(0);
        if x.len() < td || d_output.len() < td {
            return Err(KernelError::ShapeMismatch {
                operand: if x.len() < td { "x" } else { "d_output" },
                expected: format!("[{tokens}, {d}] ({td} elements)"),
                actual: format!("{} elements", x.len().min(d_output.len())),
            }
            .into());
        }
        if dev.any_nonfinite(d_output, td, &mut g.status)? {
            let host = dev.download(d_output, td)?;
            let index = host.iter().position(|v| !v.is_finite()).unwrap_or(0);
            return Err(KernelError::NonFinite { operand: "d_output", index }.into());
        }

        // combine backward
        dev.ensure(&mut g.d_expert_output, n * d)?;
        dev.ensure(&mut g.d_weight, tk)?;
        dev.combine_backward_rows(
            &st.maps.row_assignment,
            &st.gate.weight,
            d_output,
            tokens,
            k,
            n,
            d,
            &mut g.d_expert_output,
        )?;
        dev.combine_backward_weights(
            &st.maps.assignment_row,
            &st.expert_output,
            d_output,
            tokens,
            k,
            n,
            d,
            &mut g.d_weight,
        )?;

        // experts backward, gather backward
        dev.ensure(&mut g.d_dispatched, n * d)?;
        self.experts.backward(
            dev,
            &st.dispatched,
            &st.offsets,
            &st.offsets_dev,
            &st.activations,
            &g.d_expert_output,
            &mut g.experts,
            &mut g.d_dispatched,
        )?;
        dev.ensure(&mut g.d_x, td)?;
        dev.gather_backward(&st.maps.assignment_row, &g.d_dispatched, tokens, k, n, d, false, &mut g.d_x)?;

        // router backward (the CPU's coefficients, computed on the host)
        let aux_coef: Vec<f32> = if c.gate.aux_loss_weight > 0.0 && tokens > 0 {
            st.demand
                .iter()
                .map(|&dm| {
                    let f = dm as f64 / tk as f64;
                    (c.gate.aux_loss_weight as f64 * e_n as f64 * f / tokens as f64) as f32
                })
                .collect()
        } else {
            vec![0.0; e_n]
        };
        let z_coef = if tokens > 0 { 2.0 * c.gate.z_loss_weight / tokens as f32 } else { 0.0 };
        dev.ensure(&mut g.aux_coef, e_n)?;
        dev.copy_to(&aux_coef, &mut g.aux_coef)?;
        dev.ensure(&mut g.d_logits, te)?;
        dev.gate_backward(
            &st.gate.probs,
            &st.gate.expert_index,
            &g.d_weight,
            &st.gate.logsumexp,
            &g.aux_coef,
            tokens,
            e_n,
            k,
            c.gate.renormalize,
            z_coef,
            &mut g.d_logits,
        )?;
        // d Wg = x^T d_logits ; d x += d_logits Wg^T
        dev.ensure(&mut g.d_gate_weight, d * e_n)?;
        if tokens == 0 {
            dev.fill_zero(&mut g.d_gate_weight, d * e_n)?;
            return Ok(());
        }
        sgemm(dev, Trans::Yes, Trans::No, d, e_n, tokens, x, d, &g.d_logits, e_n, 0.0, &mut g.d_gate_weight, e_n)?;
        sgemm(dev, Trans::No, Trans::Yes, tokens, d, e_n, &g.d_logits, e_n, &self.gate_weight, e_n, 1.0, &mut g.d_x, d)
    }

    /// Forward and backward from host buffers, returning the output and the gradients on the
    /// host (a convenience for tests and small runs).
    pub fn forward_backward_host(
        &self,
        x: &[f32],
        tokens: usize,
        d_output: &[f32],
    ) -> CudaResult<(Vec<f32>, Routing, MoeGrads)> {
        let d = self.config.d_model;
        check_len("x", &[tokens, d], x.len())?;
        check_len("d_output", &[tokens, d], d_output.len())?;
        let xd = self.dev.upload(x)?;
        let gd = self.dev.upload(d_output)?;
        let mut st = self.new_state()?;
        let mut g = self.new_grads()?;
        self.forward(&xd, tokens, &mut st)?;
        self.backward(&xd, &st, &gd, &mut g)?;
        Ok((st.output_host(&self.dev, d)?, st.routing_host(self)?, g.to_host(self, tokens)?))
    }
}

impl CudaMoeState {
    /// Rows through the experts (kept assignments) `N`.
    pub fn rows(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Assignments dropped by capacity.
    pub fn dropped(&self, top_k: usize) -> usize {
        self.tokens * top_k - self.rows()
    }

    /// The layer output (`[tokens, d]`) on the host.
    pub fn output_host(&self, dev: &CudaDevice, d_model: usize) -> CudaResult<Vec<f32>> {
        dev.download(&self.output, self.tokens * d_model)
    }

    /// The routing of the last forward on the host, as the CPU's [`Routing`].
    pub fn routing_host(&self, layer: &CudaMoeLayer) -> CudaResult<Routing> {
        let dev = &*layer.dev;
        let (t, e, k) = (self.tokens, layer.config.experts, layer.config.gate.top_k);
        let position = dev.download(&self.position, t * k)?;
        Ok(Routing {
            tokens: t,
            experts: e,
            top_k: k,
            capacity: self.capacity,
            logits: dev.download(&self.logits, t * e)?,
            probs: dev.download(&self.gate.probs, t * e)?,
            logsumexp: dev.download(&self.gate.logsumexp, t)?,
            expert_index: dev.download(&self.gate.expert_index, t * k)?,
            weight: dev.download(&self.gate.weight, t * k)?,
            position: position.iter().map(|&p| u32::try_from(p).ok()).collect(),
            demand: self.demand.clone(),
            kept: self.kept.clone(),
            aux_loss: self.aux_loss,
            z_loss: self.z_loss,
        })
    }
}

impl CudaMoeGrads {
    /// The gradients on the host, as the CPU's [`MoeGrads`] (for a batch of `tokens` tokens).
    pub fn to_host(&self, layer: &CudaMoeLayer, tokens: usize) -> CudaResult<MoeGrads> {
        let dev = &*layer.dev;
        let c = &layer.config;
        let mut out = MoeGrads::default();
        out.d_x = dev.download(&self.d_x, tokens * c.d_model)?;
        out.gate = GateGrads {
            d_logits: dev.download(&self.d_logits, tokens * c.experts)?,
            d_gate_weight: dev.download(&self.d_gate_weight, c.d_model * c.experts)?,
        };
        out.experts = self.experts.to_host(dev, &layer.experts)?;
        Ok(out)
    }
}
