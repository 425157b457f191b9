//! The distributed MoE layer: route locally, send each routed row to the slot that serves it
//! (one all-to-all-v), run the local slots' experts, send the outputs back, combine. Backward
//! retraces the same exchanges in reverse.
//!
//! Every worker holds the router (replicated, its gradient all-reduced with the dense ones by
//! the trainer) and its own slots ([`SlotStore`]). A slot receives rows source by source, in
//! source-rank order and, within a source, in token order: with one replica per expert, an
//! expert computes on exactly the same rows in the same order wherever it is placed, so moving
//! it does not change a bit of the result.

use switchyard_cost::{DispatchMode, Placement};
use switchyard_kernels::{
    Compute, DispatchPlan, ExpertGrads, GateConfig, GateGrads, Routing, combine, combine_backward, gather,
    gather_backward, route, route_backward,
};

use super::exec::{ExpertDevice, ExpertRun, experts_backward, experts_forward};

use super::segments::{Segment, split_rows};
use super::slots::SlotStore;
use crate::comm::{CommExt, Communicator, as_bytes, from_bytes};
use crate::error::RuntimeError;

/// One MoE layer on one worker.
#[derive(Debug, Clone)]
pub struct DistMoeLayer {
    /// Router settings.
    pub gate: GateConfig,
    /// Router weight `[d, E]` (replicated on every worker).
    pub gate_weight: Vec<f32>,
    /// Fixed per-expert selection bias `[E]` (shifts which experts are chosen, not the gradients).
    pub expert_bias: Option<Vec<f32>>,
    /// Logical experts.
    pub experts: usize,
    /// Where every expert lives (the same on every worker).
    pub placement: Placement,
    /// This worker's slots.
    pub slots: SlotStore,
    /// The buffers of the slots before the last migration (or of a rolled-back one), reused by the next
    /// migration so that it writes into memory already touched (double buffering).
    pub spare: Option<SlotStore>,
    /// Tokens travel to the experts (all-to-all, the default) or experts to the tokens (data-centric,
    /// [`super::fetch`]).
    pub dispatch: DispatchMode,
    /// Workers per node (consecutive ranks): in the data-centric mode an expert is fetched once per node and
    /// shared inside it.
    pub workers_per_node: usize,
    /// Where the local experts' FFNs run ([`super::exec`]).
    pub device: ExpertDevice,
}

/// What the forward keeps for the backward.
#[derive(Debug, Default)]
pub struct MoeSaved {
    pub(super) routing: Routing,
    pub(super) plan: DispatchPlan,
    segments: Vec<Segment>,
    /// Rows this worker sent to each worker, in send order (for the return trip).
    sent_rows: Vec<usize>,
    /// For each source worker: the rows it sent to each local slot.
    recv_counts: Vec<Vec<usize>>,
    /// Expert input of the local slots, grouped by slot (data-centric: this worker's rows, grouped by expert).
    pub(super) input: Vec<f32>,
    pub(super) offsets: Vec<usize>,
    /// What the local experts' forward kept for their backward (on the CPU or the GPU).
    pub(super) run: ExpertRun,
    /// Expert output in this worker's grouped (dispatch) order.
    pub(super) y: Vec<f32>,
    /// The data-centric mode's plan and fetched weights.
    pub(super) fetch: Option<super::fetch::FetchSaved>,
}

impl MoeSaved {
    /// Routed assignments per logical expert on this worker before capacity (the sampler's counts).
    pub fn demand(&self) -> &[usize] {
        &self.routing.demand
    }

    /// In the data-centric mode: expert copies that travelled in the last forward, over all workers.
    pub fn fetched_copies(&self) -> Option<usize> {
        self.fetch.as_ref().map(|f| f.copies())
    }

    /// The router's auxiliary losses (already weighted): load-balancing plus z-loss.
    pub fn aux_loss(&self) -> f32 {
        self.routing.aux_loss + self.routing.z_loss
    }
}

/// Gradients of one layer on one worker.
#[derive(Debug, Default)]
pub struct MoeLayerGrads {
    /// Router gradients (this worker's tokens only: the trainer all-reduces them).
    pub gate: GateGrads,
    /// Local slots' expert gradients (summed over replicas once [`DistMoeLayer::sync_replica_grads`] ran).
    pub experts: ExpertGrads,
}

fn invalid(what: &str, reason: String) -> RuntimeError {
    RuntimeError::Invalid { what: what.into(), reason }
}

impl DistMoeLayer {
    fn d(&self) -> usize {
        self.slots.params.d_model
    }

    fn spw(&self) -> usize {
        self.placement.slots_per_gpu
    }

    /// Checks that the placement fits the communicator and the local slots.
    pub fn check(&self, comm: &dyn Communicator) -> Result<(), RuntimeError> {
        let p = &self.placement;
        if p.gpus != comm.size() || p.experts != self.experts {
            return Err(invalid(
                "placement",
                format!(
                    "covers {} workers and {} experts; the run has {} workers and {} experts",
                    p.gpus,
                    p.experts,
                    comm.size(),
                    self.experts
                ),
            ));
        }
        let mine = p.gpu_slots(comm.rank());
        if mine != self.slots.experts.as_slice() {
            return Err(invalid(
                "local slots",
                format!("hold {:?}, the placement says {:?}", self.slots.experts, mine),
            ));
        }
        Ok(())
    }

    /// Forward of `x: [T, d]` (this worker's tokens) into `out: [T, d]`; saves what backward needs.
    pub fn forward(
        &self,
        cx: &Compute,
        comm: &dyn Communicator,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        saved: &mut MoeSaved,
    ) -> Result<(), RuntimeError> {
        if self.dispatch == DispatchMode::ExpertFetch {
            return super::fetch::forward(self, cx, comm, x, tokens, out, saved);
        }
        saved.fetch = None;
        let d = self.d();
        let (w, spw) = (comm.size(), self.spw());
        route(
            cx,
            &self.gate,
            x,
            tokens,
            d,
            &self.gate_weight,
            self.experts,
            self.expert_bias.as_deref(),
            &mut saved.routing,
        )?;
        saved.plan.rebuild(&saved.routing)?;
        let mut grouped = Vec::new();
        gather(&saved.plan, x, d, &mut grouped)?;
        saved.segments = split_rows(&self.placement, &saved.plan.offsets);

        // Per destination: a header of row counts for each of its slots, then the rows slot by slot.
        let (send, sent_rows) = pack(&saved.segments, &grouped, d, w, spw);
        saved.sent_rows = sent_rows;
        let recv = exchange(comm, &send)?;
        saved.recv_counts = Vec::with_capacity(w);
        let mut parts: Vec<Vec<&[f32]>> = vec![Vec::with_capacity(w); spw];
        for (u, msg) in recv.iter().enumerate() {
            let (counts, rows) =
                unpack_header(msg, spw, d).map_err(|r| invalid("dispatch message", format!("from worker {u}: {r}")))?;
            let mut at = 0;
            for (j, &c) in counts.iter().enumerate() {
                parts[j].push(&rows[at * d..(at + c) * d]);
                at += c;
            }
            saved.recv_counts.push(counts);
        }
        saved.offsets.clear();
        saved.offsets.push(0);
        saved.input.clear();
        for slot_parts in &parts {
            for p in slot_parts {
                saved.input.extend_from_slice(p);
            }
            saved.offsets.push(saved.input.len() / d);
        }
        let mut y_local = Vec::new();
        experts_forward(
            &self.device,
            cx,
            &self.slots.params,
            &saved.input,
            &saved.offsets,
            &mut saved.run,
            &mut y_local,
        )?;

        // Return trip: rows go back to their sources in the order they came.
        let back = self.return_pack(&saved.recv_counts, &saved.offsets, &y_local, d, w);
        let got = exchange_plain(comm, &back)?;
        saved.y.clear();
        saved.y.resize(saved.plan.rows() * d, 0.0);
        unpack_returned(&saved.segments, &got, &mut saved.y, d, spw, &saved.sent_rows)?;
        combine(&saved.plan, &saved.routing.weight, &saved.y, d, out)?;
        Ok(())
    }

    /// Rows of the local slots' buffer (grouped by slot, sources in order inside) split back per source.
    fn return_pack(
        &self,
        recv_counts: &[Vec<usize>],
        offsets: &[usize],
        local: &[f32],
        d: usize,
        w: usize,
    ) -> Vec<Vec<f32>> {
        let mut back: Vec<Vec<f32>> = vec![Vec::new(); w];
        for (j, win) in offsets.windows(2).enumerate() {
            let mut at = win[0];
            for (u, counts) in recv_counts.iter().enumerate() {
                let c = counts[j];
                back[u].extend_from_slice(&local[at * d..(at + c) * d]);
                at += c;
            }
        }
        back
    }

    /// Backward: `d_out: [T, d]` is the gradient of the layer output; writes `d_x: [T, d]` (overwritten)
    /// and this worker's gradients (router on its tokens; experts of its slots on every worker's rows).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        cx: &Compute,
        comm: &dyn Communicator,
        x: &[f32],
        saved: &MoeSaved,
        d_out: &[f32],
        d_x: &mut [f32],
        grads: &mut MoeLayerGrads,
    ) -> Result<(), RuntimeError> {
        if saved.fetch.is_some() {
            return super::fetch::backward(self, cx, comm, x, saved, d_out, d_x, grads);
        }
        let d = self.d();
        let (w, spw) = (comm.size(), self.spw());
        let mut d_y = Vec::new();
        let mut d_weight = Vec::new();
        combine_backward(&saved.plan, &saved.routing.weight, &saved.y, d, d_out, &mut d_y, &mut d_weight)?;
        // The gradient rows travel the way the rows did, to the same slots in the same order.
        let (send, _) = pack(&saved.segments, &d_y, d, w, spw);
        let recv = exchange(comm, &send)?;
        let mut d_local = vec![0.0f32; saved.input.len()];
        let mut cursor: Vec<usize> = saved.offsets[..spw].to_vec();
        for (u, msg) in recv.iter().enumerate() {
            let (counts, rows) =
                unpack_header(msg, spw, d).map_err(|r| invalid("gradient message", format!("from worker {u}: {r}")))?;
            if counts != saved.recv_counts[u] {
                return Err(invalid(
                    "gradient message",
                    format!("worker {u} sent {counts:?} rows, forward had {:?}", saved.recv_counts[u]),
                ));
            }
            let mut at = 0;
            for (j, &c) in counts.iter().enumerate() {
                d_local[cursor[j] * d..(cursor[j] + c) * d].copy_from_slice(&rows[at * d..(at + c) * d]);
                cursor[j] += c;
                at += c;
            }
        }
        let mut d_in_local = Vec::new();
        experts_backward(
            cx,
            &self.slots.params,
            &saved.input,
            &saved.run,
            &d_local,
            &mut grads.experts,
            &mut d_in_local,
        )?;
        let back = self.return_pack(&saved.recv_counts, &saved.offsets, &d_in_local, d, w);
        let got = exchange_plain(comm, &back)?;
        let mut d_grouped = vec![0.0f32; saved.plan.rows() * d];
        unpack_returned(&saved.segments, &got, &mut d_grouped, d, spw, &saved.sent_rows)?;
        gather_backward(&saved.plan, &d_grouped, d, d_x, false)?;
        route_backward(cx, &self.gate, &saved.routing, x, d, &self.gate_weight, &d_weight, &mut grads.gate, d_x)?;
        Ok(())
    }

    /// Sums the expert gradients of replicated experts over their replicas, in ascending slot order, so
    /// every replica applies the same update. One all-to-all-v; nothing moves when no expert is replicated.
    pub fn sync_replica_grads(&self, comm: &dyn Communicator, grads: &mut ExpertGrads) -> Result<(), RuntimeError> {
        let p = &self.placement;
        let expert_slots = p.expert_slots();
        if expert_slots.iter().all(|s| s.len() <= 1) {
            return Ok(());
        }
        let (me, w, spw) = (comm.rank(), comm.size(), self.spw());
        let sizes = super::slots::tensor_sizes(self.slots.params.activation, self.d(), self.slots.params.d_ffn);
        let tensors = |g: &ExpertGrads| -> [Vec<f32>; 4] {
            [g.d_w_in.clone(), g.d_b_in.clone(), g.d_w_out.clone(), g.d_b_out.clone()]
        };
        let local = tensors(grads);
        let slot_grad = |j: usize, out: &mut Vec<f32>| {
            for i in 0..4 {
                out.extend_from_slice(&local[i][j * sizes[i]..(j + 1) * sizes[i]]);
            }
        };
        // Send each local replica's gradient to every other worker holding a replica of the same expert.
        let mut send: Vec<Vec<f32>> = vec![Vec::new(); w];
        for (v, buf) in send.iter_mut().enumerate() {
            if v == me {
                continue;
            }
            for (j, &e) in p.gpu_slots(me).iter().enumerate() {
                let slots = &expert_slots[e as usize];
                if slots.len() > 1 && slots.iter().any(|&s| s / spw == v) {
                    slot_grad(j, buf);
                }
            }
        }
        let got = comm.all_to_all_v_f32(&send.iter().map(|v| v.as_slice()).collect::<Vec<_>>())?;
        // Each peer's message holds its replicated slots shared with this worker, in the peer's slot order.
        let per: usize = sizes.iter().sum();
        let mut remote: Vec<Vec<(usize, &[f32])>> = vec![Vec::new(); w];
        for u in 0..w {
            if u == me {
                continue;
            }
            let mut at = 0;
            for (j, &e) in p.gpu_slots(u).iter().enumerate() {
                let slots = &expert_slots[e as usize];
                if slots.len() > 1 && slots.iter().any(|&s| s / spw == me) {
                    let part = got[u].get(at..at + per).ok_or_else(|| {
                        invalid("replica gradients", format!("worker {u} sent {} values, expected more", got[u].len()))
                    })?;
                    remote[u].push((u * spw + j, part));
                    at += per;
                }
            }
        }
        let mut summed = local.clone();
        for (j, &e) in p.gpu_slots(me).iter().enumerate() {
            let slots = &expert_slots[e as usize];
            if slots.len() <= 1 {
                continue;
            }
            let mut acc = vec![0.0f32; per];
            for &s in slots {
                let src: Vec<f32> = if s / spw == me {
                    let mut v = Vec::with_capacity(per);
                    let jj = s % spw;
                    for i in 0..4 {
                        v.extend_from_slice(&local[i][jj * sizes[i]..(jj + 1) * sizes[i]]);
                    }
                    v
                } else {
                    remote[s / spw]
                        .iter()
                        .find(|(gs, _)| *gs == s)
                        .map(|(_, g)| g.to_vec())
                        .ok_or_else(|| invalid("replica gradients", format!("no gradient of slot {s} arrived")))?
                };
                for (a, b) in acc.iter_mut().zip(&src) {
                    *a += b;
                }
            }
            let mut at = 0;
            for i in 0..4 {
                summed[i][j * sizes[i]..(j + 1) * sizes[i]].copy_from_slice(&acc[at..at + sizes[i]]);
                at += sizes[i];
            }
        }
        let [a, b, c, dd] = summed;
        grads.d_w_in = a;
        grads.d_b_in = b;
        grads.d_w_out = c;
        grads.d_b_out = dd;
        Ok(())
    }
}

/// Packs the grouped rows per destination worker: `[counts of its slots as f32 bit patterns][rows]`.
fn pack(segments: &[Segment], grouped: &[f32], d: usize, w: usize, spw: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut counts = vec![vec![0usize; spw]; w];
    let mut by_slot: Vec<Option<Segment>> = vec![None; w * spw];
    for s in segments {
        counts[s.slot / spw][s.slot % spw] = s.rows;
        by_slot[s.slot] = Some(*s);
    }
    let mut send = Vec::with_capacity(w);
    let mut sent_rows = vec![0usize; w];
    for v in 0..w {
        let rows: usize = counts[v].iter().sum();
        let mut buf = Vec::with_capacity(spw * 2 + rows * d);
        for &c in &counts[v] {
            let c = c as u64;
            buf.push(f32::from_bits(c as u32));
            buf.push(f32::from_bits((c >> 32) as u32));
        }
        for j in 0..spw {
            if let Some(s) = by_slot[v * spw + j] {
                buf.extend_from_slice(&grouped[s.start * d..(s.start + s.rows) * d]);
            }
        }
        sent_rows[v] = rows;
        send.push(buf);
    }
    (send, sent_rows)
}

fn unpack_header(msg: &[f32], spw: usize, d: usize) -> Result<(Vec<usize>, &[f32]), String> {
    if msg.len() < 2 * spw {
        return Err(format!("{} values, shorter than its {spw}-slot header", msg.len()));
    }
    let counts: Vec<usize> =
        (0..spw).map(|j| (msg[2 * j].to_bits() as u64 | ((msg[2 * j + 1].to_bits() as u64) << 32)) as usize).collect();
    let rows = &msg[2 * spw..];
    let total: usize = counts.iter().sum();
    if rows.len() != total * d {
        return Err(format!("header announces {total} rows of {d}, body has {} values", rows.len()));
    }
    Ok((counts, rows))
}

fn exchange(comm: &dyn Communicator, send: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
    let refs: Vec<&[u8]> = send.iter().map(|v| as_bytes(v.as_slice())).collect();
    Ok(comm.all_to_all_v(&refs)?.into_iter().map(|b| from_bytes::<f32>(&b)).collect())
}

fn exchange_plain(comm: &dyn Communicator, send: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, RuntimeError> {
    exchange(comm, send)
}

/// Puts returned rows (from each worker, in the order this worker sent them) back at their grouped rows.
fn unpack_returned(
    segments: &[Segment],
    got: &[Vec<f32>],
    grouped: &mut [f32],
    d: usize,
    spw: usize,
    sent_rows: &[usize],
) -> Result<(), RuntimeError> {
    for (v, msg) in got.iter().enumerate() {
        if msg.len() != sent_rows[v] * d {
            return Err(invalid(
                "returned rows",
                format!("worker {v} returned {} values, expected {}", msg.len(), sent_rows[v] * d),
            ));
        }
    }
    let mut by_slot: Vec<Option<Segment>> = vec![None; got.len() * spw];
    for s in segments {
        by_slot[s.slot] = Some(*s);
    }
    let mut cursor = vec![0usize; got.len()];
    for (slot, s) in by_slot.iter().enumerate() {
        if let Some(s) = s {
            let v = slot / spw;
            let at = cursor[v];
            grouped[s.start * d..(s.start + s.rows) * d].copy_from_slice(&got[v][at * d..(at + s.rows) * d]);
            cursor[v] += s.rows;
        }
    }
    Ok(())
}
