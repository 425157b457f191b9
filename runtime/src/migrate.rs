//! Migration: move experts (weights, Adam moments) to a new placement in one batched exchange,
//! verify every transferred state by checksum, and commit on all workers or roll back on all.
//!
//! Every new slot takes its expert from this worker's old slots when it already holds the expert
//! (a local copy, nothing travels); otherwise from one of the old holders (chosen round-robin by
//! destination so several new replicas of a hot expert do not all load one sender). All transfers
//! of all layers go in one all-to-all-v. After the exchange every worker votes; only when all
//! received states are intact do all of them switch, so a failure anywhere leaves every worker on
//! the old placement with its state untouched, and training goes on.

use std::time::Instant;

use serde::Serialize;
use switchyard_cost::Placement;

use crate::checksum::checksum_f32;
use crate::comm::{CommExt, Communicator, as_bytes, from_bytes};
use crate::error::RuntimeError;
use crate::moe::{DistMoeLayer, SlotStore};

/// A fault to inject into a migration (tests and `switchyard train --inject-migration-fault`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// The worker flips one bit of the first state it receives (the checksum must catch it).
    CorruptReceived {
        /// The worker that corrupts.
        rank: usize,
    },
    /// The worker fails half-way: after the exchange, before installing anything.
    FailAfterExchange {
        /// The worker that fails.
        rank: usize,
    },
}

/// What a migration did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MigrationOutcome {
    /// Whether every worker switched (false: all rolled back).
    pub committed: bool,
    /// Expert states this worker received from others.
    pub transfers_in: usize,
    /// Bytes this worker sent (headers included).
    pub bytes_sent: u64,
    /// Bytes this worker received.
    pub bytes_received: u64,
    /// Wall time on this worker, ms.
    pub ms: f64,
    /// Why it rolled back (this worker's reason, or that a peer voted no).
    pub rollback_reason: Option<String>,
}

/// Where each new slot's state comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The destination's own old slot `j`.
    Local(usize),
    /// Old global slot `s` on another worker.
    Remote(usize),
}

fn sources(old: &Placement, new: &Placement) -> Vec<Source> {
    let spw = old.slots_per_gpu;
    let holders = old.expert_slots();
    (0..new.slots.len())
        .map(|s| {
            let (v, e) = (s / spw, new.slots[s]);
            if let Some(j) = old.gpu_slots(v).iter().position(|&x| x == e) {
                Source::Local(j)
            } else {
                let h = &holders[e as usize];
                Source::Remote(h[v % h.len()])
            }
        })
        .collect()
}

const HEADER_WORDS: usize = 5; // layer, new slot, expert, checksum, length

/// Moves every layer whose placement changes to `new[layer]`; returns this worker's outcome. All
/// workers must call it with the same `new`. Errors only when the communicator fails (a peer is dead):
/// a bad transfer is a rollback, not an error.
pub fn migrate(
    comm: &dyn Communicator,
    layers: &mut [DistMoeLayer],
    new: &[Placement],
    fault: Option<Fault>,
) -> Result<MigrationOutcome, RuntimeError> {
    let t0 = Instant::now();
    let (me, w) = (comm.rank(), comm.size());
    if new.len() != layers.len() {
        return Err(RuntimeError::Invalid {
            what: "migration".into(),
            reason: format!("{} placements for {} layers", new.len(), layers.len()),
        });
    }
    let changed: Vec<usize> = (0..layers.len()).filter(|&l| layers[l].placement.slots != new[l].slots).collect();
    let mut outcome = MigrationOutcome::default();
    // Shares alone change nothing that moves: take them at once.
    for (l, layer) in layers.iter_mut().enumerate() {
        if !changed.contains(&l) {
            layer.placement = new[l].clone();
        }
    }
    if changed.is_empty() {
        outcome.committed = true;
        outcome.ms = t0.elapsed().as_secs_f64() * 1e3;
        return Ok(outcome);
    }
    let mut local_problem: Option<String> = None;
    for &l in &changed {
        let (o, n) = (&layers[l].placement, &new[l]);
        if o.gpus != n.gpus || o.slots_per_gpu != n.slots_per_gpu || o.experts != n.experts || n.check().is_err() {
            local_problem = Some(format!("layer {l}: the new placement does not fit the run"));
        }
    }
    if let Some(r) = local_problem {
        return Err(RuntimeError::Invalid { what: "migration".into(), reason: r });
    }

    // Pack the states this worker must send.
    let mut send: Vec<Vec<u64>> = vec![Vec::new(); w];
    let mut payload: Vec<Vec<f32>> = vec![Vec::new(); w];
    let mut state = Vec::new();
    for &l in &changed {
        let (old, n) = (&layers[l].placement, &new[l]);
        let spw = old.slots_per_gpu;
        for (s, src) in sources(old, n).into_iter().enumerate() {
            if let Source::Remote(from) = src
                && from / spw == me
            {
                state.clear();
                layers[l].slots.export_slot(from % spw, &mut state);
                let v = s / spw;
                send[v].extend_from_slice(&[
                    l as u64,
                    s as u64,
                    n.slots[s] as u64,
                    checksum_f32(&state),
                    state.len() as u64,
                ]);
                payload[v].extend_from_slice(&state);
            }
        }
    }
    let msgs: Vec<Vec<u8>> = (0..w)
        .map(|v| {
            let mut b = Vec::with_capacity(8 + send[v].len() * 8 + payload[v].len() * 4);
            b.extend_from_slice(&(send[v].len() as u64).to_le_bytes());
            b.extend_from_slice(as_bytes(&send[v]));
            b.extend_from_slice(as_bytes(&payload[v]));
            b
        })
        .collect();
    outcome.bytes_sent = msgs.iter().enumerate().filter(|(v, _)| *v != me).map(|(_, m)| m.len() as u64).sum();
    let got = comm.all_to_all_v(&msgs.iter().map(|m| m.as_slice()).collect::<Vec<_>>())?;
    drop(msgs);
    outcome.bytes_received = got.iter().enumerate().filter(|(u, _)| *u != me).map(|(_, m)| m.len() as u64).sum();

    // Unpack and verify.
    let mut received: std::collections::HashMap<(usize, usize), Vec<f32>> = std::collections::HashMap::new();
    let mut problem: Option<String> = None;
    let mut corrupt_pending = matches!(fault, Some(Fault::CorruptReceived { rank }) if rank == me);
    for (u, msg) in got.iter().enumerate() {
        if let Err(r) = unpack(msg, &mut received, &mut corrupt_pending) {
            problem.get_or_insert(format!("message from worker {u}: {r}"));
        }
    }
    outcome.transfers_in = received.len();
    if corrupt_pending {
        // The faulty worker received nothing to corrupt: it fails the migration instead.
        problem.get_or_insert("injected fault (no received state to corrupt)".into());
    }
    if matches!(fault, Some(Fault::FailAfterExchange { rank }) if rank == me) {
        problem.get_or_insert("injected failure after the exchange".into());
    }

    // Build the new stores (nothing installed yet).
    let mut built: Vec<(usize, SlotStore)> = Vec::new();
    if problem.is_none() {
        for &l in &changed {
            let (old, n) = (&layers[l].placement, &new[l]);
            let spw = old.slots_per_gpu;
            let srcs = sources(old, n);
            let mut states: Vec<Vec<f32>> = Vec::with_capacity(spw);
            for j in 0..spw {
                let s = me * spw + j;
                match srcs[s] {
                    Source::Local(jj) => {
                        let mut v = Vec::new();
                        layers[l].slots.export_slot(jj, &mut v);
                        states.push(v);
                    }
                    Source::Remote(_) => match received.remove(&(l, s)) {
                        Some(v) => states.push(v),
                        None => {
                            problem.get_or_insert(format!("layer {l}: the state of new slot {s} did not arrive"));
                            break;
                        }
                    },
                }
            }
            if problem.is_some() {
                break;
            }
            let refs: Vec<&[f32]> = states.iter().map(|v| v.as_slice()).collect();
            match layers[l].slots.from_states(n.gpu_slots(me).to_vec(), &refs) {
                Ok(store) => built.push((l, store)),
                Err(e) => {
                    problem.get_or_insert(format!("layer {l}: {e}"));
                    break;
                }
            }
        }
    }

    // Vote: commit everywhere or nowhere.
    let all_ok = comm.all_agree(problem.is_none())?;
    if all_ok {
        for (l, store) in built {
            layers[l].slots = store;
            layers[l].placement = new[l].clone();
        }
        outcome.committed = true;
    } else {
        outcome.rollback_reason =
            Some(problem.unwrap_or_else(|| "another worker could not install its new slots".into()));
    }
    outcome.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(outcome)
}

fn unpack(
    msg: &[u8],
    out: &mut std::collections::HashMap<(usize, usize), Vec<f32>>,
    corrupt_pending: &mut bool,
) -> Result<(), String> {
    if msg.len() < 8 {
        return Err(format!("{} bytes, shorter than its header", msg.len()));
    }
    let words = u64::from_le_bytes(msg[..8].try_into().unwrap_or_default()) as usize;
    let head_end = 8usize.saturating_add(words.saturating_mul(8));
    if !words.is_multiple_of(HEADER_WORDS) || head_end > msg.len() {
        return Err(format!("a header of {words} words does not fit {} bytes", msg.len()));
    }
    let head = from_bytes::<u64>(&msg[8..head_end]);
    let body = from_bytes::<f32>(&msg[head_end..]);
    let mut at = 0usize;
    for h in head.chunks_exact(HEADER_WORDS) {
        let (l, s, sum, len) = (h[0] as usize, h[1] as usize, h[3], h[4] as usize);
        let Some(part) = body.get(at..at.saturating_add(len)) else {
            return Err(format!("state of layer {l} slot {s} is cut short"));
        };
        let mut v = part.to_vec();
        if std::mem::take(corrupt_pending)
            && let Some(x) = v.first_mut()
        {
            *x = f32::from_bits(x.to_bits() ^ 1);
        }
        if checksum_f32(&v) != sum {
            return Err(format!("checksum mismatch in the state of layer {l} slot {s} (expert {})", h[2]));
        }
        out.insert((l, s), v);
        at += len;
    }
    if at != body.len() {
        return Err(format!("{} values left over after the announced states", body.len() - at));
    }
    Ok(())
}
