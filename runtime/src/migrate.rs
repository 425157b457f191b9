//! Migration: move experts (weights, Adam moments) to a new placement in one batched exchange,
//! verify every transferred state by checksum, and commit on all workers or roll back on all.
//!
//! Every new slot takes its expert from this worker's old slots when it already holds the expert
//! (a local copy, nothing travels); otherwise from one of the old holders (chosen round-robin by
//! destination so several new replicas of a hot expert do not all load one sender). Workers of one
//! process (the in-process transport) lend each other their old stores and copy every new slot once,
//! straight from the store that holds it, checksummed as read and as written; workers in separate
//! processes (MPI) send all transfers of all layers in one all-to-all-v, checksummed by the sender
//! and verified by the receiver. After the exchange every worker votes; only when all
//! received states are intact do all of them switch, so a failure anywhere leaves every worker on
//! the old placement with its state untouched, and training goes on.

use std::time::Instant;

use serde::Serialize;
use switchyard_cost::Placement;

use crate::checksum::ByteChecksum;
use crate::comm::{CommExt, Communicator, as_bytes, from_bytes};
use crate::error::RuntimeError;
use crate::moe::slots::SlotSource;
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
/// workers must call it with the same `new`. The states travel over `comm` (the expert-parallel group); the
/// commit-or-roll-back vote runs over `vote` (every worker whose placements must stay the same: the world when
/// several expert-data-parallel groups each move their copy). `pool` holds message buffers kept from earlier migrations
/// (reused so that no fresh memory is touched; received buffers are returned to it). Errors only when the communicator fails (a peer is dead):
/// a bad transfer is a rollback, not an error.
pub fn migrate(
    comm: &dyn Communicator,
    vote: &dyn Communicator,
    layers: &mut [DistMoeLayer],
    new: &[Placement],
    fault: Option<Fault>,
    pool: &mut Vec<Vec<u8>>,
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

    if let Some(done) = migrate_shared(comm, vote, layers, new, &changed, fault, t0) {
        return done;
    }

    // Pack the states this worker must send straight into the messages, checksumming while copying (one
    // pass over each state). Message layout: [states][header words][number of header words, u64].
    let mut msgs: Vec<Vec<u8>> = vec![Vec::new(); w];
    let mut heads: Vec<Vec<u64>> = vec![Vec::new(); w];
    // Exact sizes first, so that a reused buffer never grows (growth would touch fresh memory).
    let mut need = vec![8usize; w];
    for &l in &changed {
        let (old, n) = (&layers[l].placement, &new[l]);
        let spw = old.slots_per_gpu;
        for (s, src) in sources(old, n).into_iter().enumerate() {
            if let Source::Remote(from) = src
                && from / spw == me
            {
                need[s / spw] += 4 * layers[l].slots.state_len() + 8 * HEADER_WORDS;
            }
        }
    }
    // The largest kept buffers go to the largest messages.
    pool.sort_by_key(|b| b.capacity());
    let mut order: Vec<usize> = (0..w).collect();
    order.sort_by_key(|&v| std::cmp::Reverse(need[v]));
    for v in order {
        let mut m = pool.pop().unwrap_or_default();
        m.clear();
        m.reserve(need[v]);
        msgs[v] = m;
    }
    for &l in &changed {
        let (old, n) = (&layers[l].placement, &new[l]);
        let spw = old.slots_per_gpu;
        for (s, src) in sources(old, n).into_iter().enumerate() {
            if let Source::Remote(from) = src
                && from / spw == me
            {
                let v = s / spw;
                let start = msgs[v].len();
                let mut sum = ByteChecksum::new();
                layers[l].slots.append_slot_bytes(from % spw, &mut msgs[v], &mut sum);
                let len = (msgs[v].len() - start) as u64;
                heads[v].extend_from_slice(&[l as u64, s as u64, n.slots[s] as u64, sum.finish(), len]);
            }
        }
    }
    for (m, h) in msgs.iter_mut().zip(&heads) {
        m.extend_from_slice(as_bytes(h));
        m.extend_from_slice(&(h.len() as u64).to_le_bytes());
    }
    outcome.bytes_sent = msgs.iter().enumerate().filter(|(v, _)| *v != me).map(|(_, m)| m.len() as u64).sum();
    let got = comm.all_to_all_v_owned(msgs)?;
    outcome.bytes_received = got.iter().enumerate().filter(|(u, _)| *u != me).map(|(_, m)| m.len() as u64).sum();

    // Index the received states (verified while they are copied in).
    let mut received: std::collections::HashMap<(usize, usize), (usize, std::ops::Range<usize>, u64)> =
        std::collections::HashMap::new();
    let mut problem: Option<String> = None;
    for (u, msg) in got.iter().enumerate() {
        if let Err(r) = index(u, msg, &mut received) {
            problem.get_or_insert(format!("message from worker {u}: {r}"));
        }
    }
    outcome.transfers_in = received.len();
    let mut corrupt = matches!(fault, Some(Fault::CorruptReceived { rank }) if rank == me);
    let mut got = got;
    if corrupt && let Some((u, range, _)) = received.values().min_by_key(|(u, r, _)| (*u, r.start)).cloned() {
        // Flip one bit of the first received state: the checksum must catch it.
        if let Some(b) = got[u].get_mut(range.start) {
            *b ^= 1;
            corrupt = false;
        }
    }
    if corrupt {
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
            let mut slot_sources = Vec::with_capacity(spw);
            for j in 0..spw {
                let s = me * spw + j;
                match srcs[s] {
                    Source::Local(jj) => slot_sources.push(SlotSource::Local(jj)),
                    Source::Remote(_) => match received.get(&(l, s)) {
                        Some((u, range, sum)) => {
                            slot_sources.push(SlotSource::Bytes { bytes: &got[*u][range.clone()], checksum: *sum })
                        }
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
            let spare = layers[l].spare.take();
            match layers[l].slots.build(n.gpu_slots(me).to_vec(), &slot_sources, spare) {
                Ok(store) => built.push((l, store)),
                Err(e) => {
                    problem.get_or_insert(format!("layer {l}: {e}"));
                    break;
                }
            }
        }
    }
    pool.extend(got);

    // Vote: commit everywhere or nowhere.
    let all_ok = vote.all_agree(problem.is_none())?;
    if all_ok {
        for (l, store) in built {
            let old = std::mem::replace(&mut layers[l].slots, store);
            layers[l].spare = Some(old);
            layers[l].placement = new[l].clone();
        }
        outcome.committed = true;
    } else {
        for (l, store) in built {
            layers[l].spare = Some(store);
        }
        outcome.rollback_reason =
            Some(problem.unwrap_or_else(|| "another worker could not install its new slots".into()));
    }
    outcome.ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok(outcome)
}

/// The old stores of the changed layers, lent to the other workers of the process during a migration.
struct Lent {
    stores: Vec<SlotStore>,
}

/// The migration between workers of one process ([`Communicator::all_gather_shared`]): each worker lends the
/// old stores of the changed layers to the others, every new slot is copied once, straight from the store that
/// holds it (checksummed as read and as written, while in cache), the borrowed stores are handed back, then the
/// same vote as the message path. `None` where the workers do not share memory (the message path follows).
fn migrate_shared(
    comm: &dyn Communicator,
    vote: &dyn Communicator,
    layers: &mut [DistMoeLayer],
    new: &[Placement],
    changed: &[usize],
    fault: Option<Fault>,
    t0: Instant,
) -> Option<Result<MigrationOutcome, RuntimeError>> {
    let me = comm.rank();
    // Lend the old stores (their places hold empty stores until they come back).
    let mut stores = Vec::with_capacity(changed.len());
    for &l in changed {
        let empty = match layers[l].slots.empty_like() {
            Ok(e) => e,
            Err(e) => {
                // Put back what was taken.
                for (&l, s) in changed.iter().zip(stores) {
                    layers[l].slots = s;
                }
                return Some(Err(e));
            }
        };
        stores.push(std::mem::replace(&mut layers[l].slots, empty));
    }
    let mine: std::sync::Arc<Lent> = std::sync::Arc::new(Lent { stores });
    let shared: crate::comm::Shared = mine.clone();
    let gathered = match comm.all_gather_shared(shared) {
        None => {
            gathered_none_restore(layers, changed, mine);
            return None;
        }
        Some(Err(e)) => {
            gathered_none_restore(layers, changed, mine);
            return Some(Err(e.into()));
        }
        Some(Ok(g)) => g,
    };
    let peers: Vec<Option<std::sync::Arc<Lent>>> = gathered.into_iter().map(|x| x.downcast::<Lent>().ok()).collect();
    let mut outcome = MigrationOutcome::default();
    let mut problem: Option<String> = None;
    if peers.iter().any(|p| p.is_none()) {
        problem = Some("a peer lent something that is not a slot store".into());
    }
    if matches!(fault, Some(Fault::FailAfterExchange { rank }) if rank == me) {
        problem.get_or_insert("injected failure after the exchange".into());
    }
    let mut corrupt = matches!(fault, Some(Fault::CorruptReceived { rank }) if rank == me);
    let mut built: Vec<(usize, SlotStore)> = Vec::new();
    if problem.is_none() {
        for (i, &l) in changed.iter().enumerate() {
            let (old, n) = (&layers[l].placement, &new[l]);
            let spw = old.slots_per_gpu;
            let srcs = sources(old, n);
            let own = &mine.stores[i];
            let mut slot_sources = Vec::with_capacity(spw);
            for j in 0..spw {
                let s = me * spw + j;
                slot_sources.push(match srcs[s] {
                    Source::Local(jj) => SlotSource::Local(jj),
                    Source::Remote(from) => {
                        outcome.transfers_in += 1;
                        outcome.bytes_received += 4 * own.state_len() as u64;
                        let store = peers[from / spw].as_ref().map(|p| &p.stores[i]).unwrap_or(own);
                        let c = std::mem::take(&mut corrupt);
                        SlotSource::Peer { store, slot: from % spw, corrupt: c }
                    }
                });
            }
            // What the others copy from this worker counts as sent.
            for (s, src) in srcs.iter().enumerate() {
                if let Source::Remote(from) = *src
                    && from / spw == me
                    && s / spw != me
                {
                    outcome.bytes_sent += 4 * own.state_len() as u64;
                }
            }
            let spare = layers[l].spare.take();
            match own.build(n.gpu_slots(me).to_vec(), &slot_sources, spare) {
                Ok(store) => built.push((l, store)),
                Err(e) => {
                    problem.get_or_insert(format!("layer {l}: {e}"));
                    break;
                }
            }
        }
    }
    if corrupt && problem.is_none() {
        // The faulty worker received nothing to corrupt: it fails the migration instead.
        problem = Some("injected fault (no received state to corrupt)".into());
    }
    // Hand the borrowed stores back before voting: once the vote is over every peer has done so.
    drop(peers);
    let all_ok = vote.all_agree(problem.is_none());
    // Take this worker's stores back (a peer that failed before dropping its share would still hold one:
    // then copy them out).
    let lent = std::sync::Arc::try_unwrap(mine).unwrap_or_else(|arc| Lent { stores: arc.stores.clone() });
    let all_ok = match all_ok {
        Ok(v) => v,
        Err(e) => {
            for (&l, s) in changed.iter().zip(lent.stores) {
                layers[l].slots = s;
            }
            return Some(Err(e.into()));
        }
    };
    if all_ok {
        for ((l, store), old) in built.into_iter().zip(lent.stores) {
            layers[l].slots = store;
            layers[l].spare = Some(old);
            layers[l].placement = new[l].clone();
        }
        // Layers whose build was not reached cannot exist when everyone agreed.
        outcome.committed = true;
    } else {
        for (&l, s) in changed.iter().zip(lent.stores) {
            layers[l].slots = s;
        }
        for (l, store) in built {
            layers[l].spare = Some(store);
        }
        outcome.rollback_reason =
            Some(problem.unwrap_or_else(|| "another worker could not install its new slots".into()));
    }
    outcome.ms = t0.elapsed().as_secs_f64() * 1e3;
    Some(Ok(outcome))
}

/// Puts lent stores back into their layers (nothing was shared, or the sharing failed).
fn gathered_none_restore(layers: &mut [DistMoeLayer], changed: &[usize], mine: std::sync::Arc<Lent>) {
    let lent = std::sync::Arc::try_unwrap(mine).unwrap_or_else(|arc| Lent { stores: arc.stores.clone() });
    for (&l, s) in changed.iter().zip(lent.stores) {
        layers[l].slots = s;
    }
}

/// Reads a message's header: where each state lies in it.
fn index(
    u: usize,
    msg: &[u8],
    out: &mut std::collections::HashMap<(usize, usize), (usize, std::ops::Range<usize>, u64)>,
) -> Result<(), String> {
    if msg.len() < 8 {
        return Err(format!("{} bytes, shorter than its trailer", msg.len()));
    }
    let words = u64::from_le_bytes(msg[msg.len() - 8..].try_into().unwrap_or_default()) as usize;
    let head_bytes = words.saturating_mul(8);
    if !words.is_multiple_of(HEADER_WORDS) || head_bytes > msg.len() - 8 {
        return Err(format!("a header of {words} words does not fit {} bytes", msg.len()));
    }
    let body_end = msg.len() - 8 - head_bytes;
    let head = from_bytes::<u64>(&msg[body_end..msg.len() - 8]);
    let mut at = 0usize;
    for h in head.chunks_exact(HEADER_WORDS) {
        let (l, s, sum, len) = (h[0] as usize, h[1] as usize, h[3], h[4] as usize);
        let end = at.saturating_add(len);
        if end > body_end {
            return Err(format!("state of layer {l} slot {s} is cut short"));
        }
        out.insert((l, s), (u, at..end, sum));
        at = end;
    }
    if at != body_end {
        return Err(format!("{} bytes left over after the announced states", body_end - at));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checksum::Checksum;
    use crate::comm::local::run_local;
    use crate::experts::{ExpertRuntime, MoeShape};
    use crate::optim::Adam;
    use proptest::prelude::*;
    use std::time::Duration;
    use switchyard_kernels::{Activation, GateConfig};

    fn shape(spw: usize) -> MoeShape {
        MoeShape {
            layers: 2,
            d_model: 8,
            d_ffn: 12,
            experts: 6,
            slots_per_worker: spw,
            activation: Activation::Gelu,
            gate: GateConfig { top_k: 1, ..GateConfig::default() },
        }
    }

    fn sum(rt: &ExpertRuntime, comm: &dyn Communicator) -> u64 {
        let mut c = Checksum::new();
        rt.checksum(comm, &mut c).unwrap();
        c.finish()
    }

    /// Runs one migration from `from` to `to` on 3 workers; returns (committed, checksum before, after,
    /// slots after) of every worker.
    /// A communicator that hides the in-process sharing of the one it wraps: migrations take the message
    /// path (the one MPI ranks take).
    struct MessagesOnly<'a>(&'a dyn Communicator);

    impl Communicator for MessagesOnly<'_> {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn size(&self) -> usize {
            self.0.size()
        }
        fn timeout(&self) -> Duration {
            self.0.timeout()
        }
        fn transport(&self) -> &'static str {
            self.0.transport()
        }
        fn send(&self, dst: usize, tag: u32, data: &[u8]) -> crate::comm::CommResult<()> {
            self.0.send(dst, tag, data)
        }
        fn recv(&self, src: usize, tag: u32) -> crate::comm::CommResult<Vec<u8>> {
            self.0.recv(src, tag)
        }
        fn all_to_all_v(&self, send: &[&[u8]]) -> crate::comm::CommResult<Vec<Vec<u8>>> {
            self.0.all_to_all_v(send)
        }
        fn all_to_all_v_owned(&self, send: Vec<Vec<u8>>) -> crate::comm::CommResult<Vec<Vec<u8>>> {
            self.0.all_to_all_v_owned(send)
        }
        fn all_gather(&self, data: &[u8]) -> crate::comm::CommResult<Vec<Vec<u8>>> {
            self.0.all_gather(data)
        }
        fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> crate::comm::CommResult<()> {
            self.0.broadcast(root, data)
        }
        fn all_reduce_sum_f32(&self, data: &mut [f32]) -> crate::comm::CommResult<()> {
            self.0.all_reduce_sum_f32(data)
        }
        fn all_reduce_sum_f64(&self, data: &mut [f64]) -> crate::comm::CommResult<()> {
            self.0.all_reduce_sum_f64(data)
        }
        fn barrier(&self) -> crate::comm::CommResult<()> {
            self.0.barrier()
        }
        fn split(&self, color: usize, key: usize) -> crate::comm::CommResult<Box<dyn Communicator>> {
            self.0.split(color, key)
        }
        fn abort(&self, reason: &str) {
            self.0.abort(reason)
        }
    }

    /// One migration on 3 workers, in-process sharing on or off: (committed, checksum before, after, slots
    /// after, rollback reason) of every worker.
    type Outcome = (bool, u64, u64, Vec<u32>, Option<String>);

    fn migrate_once(from: &Placement, to: &Placement, fault: Option<Fault>) -> Vec<(bool, u64, u64, Vec<u32>)> {
        let shared = migrate_with(from, to, fault, true);
        let messages = migrate_with(from, to, fault, false);
        for (a, b) in shared.iter().zip(&messages) {
            assert_eq!((a.0, a.1, a.2, &a.3), (b.0, b.1, b.2, &b.3), "the two paths disagree");
        }
        shared.into_iter().map(|(c, b, a, s, _)| (c, b, a, s)).collect()
    }

    fn migrate_with(from: &Placement, to: &Placement, fault: Option<Fault>, share: bool) -> Vec<Outcome> {
        let spw = from.slots_per_gpu;
        run_local(3, Duration::from_secs(10), |local| -> Result<_, RuntimeError> {
            let wrapped = MessagesOnly(&local);
            let comm: &dyn Communicator = if share { &local } else { &wrapped };
            let mut rt = ExpertRuntime::new(comm, shape(spw), vec![from.clone(); 2], 3, Adam::default(), None)?;
            // Non-trivial moments, different per expert.
            for l in rt.layers.iter_mut() {
                for (j, &e) in l.slots.experts.clone().iter().enumerate() {
                    for st in l.slots.adam.iter_mut() {
                        let per = st.m.len() / spw;
                        for x in &mut st.m[j * per..(j + 1) * per] {
                            *x = e as f32 * 0.5 + 1.0;
                        }
                    }
                }
            }
            let before = sum(&rt, comm);
            rt.next_fault = fault;
            let out = rt.migrate_to(comm, &[to.clone(), to.clone()])?;
            let after = sum(&rt, comm);
            Ok((out.committed, before, after, rt.layers[0].slots.experts.clone(), out.rollback_reason))
        })
        .into_iter()
        .map(|r| r.unwrap_or_else(|e| panic!("{e}")))
        .collect()
    }

    fn placement_strategy() -> impl Strategy<Value = (Placement, Placement)> {
        // 3 workers x 3 slots for 6 experts: two random valid placements.
        let one = Just((0u32..6).collect::<Vec<_>>()).prop_shuffle().prop_flat_map(|base| {
            proptest::collection::vec(0u32..6, 3).prop_map(move |extra| {
                let mut all = base.clone();
                all.extend(extra);
                all
            })
        });
        (one.clone().prop_shuffle(), one.prop_shuffle())
            .prop_map(|(a, b)| (Placement::new(3, 3, 6, a).unwrap(), Placement::new(3, 3, 6, b).unwrap()))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        #[test]
        fn migration_preserves_every_byte((from, to) in placement_strategy()) {
            for (rank, (committed, before, after, slots)) in migrate_once(&from, &to, None).into_iter().enumerate() {
                prop_assert!(committed);
                prop_assert_eq!(before, after, "worker {}: an expert's state changed in transit", rank);
                prop_assert_eq!(slots.as_slice(), to.gpu_slots(rank));
            }
        }
    }

    #[test]
    fn a_failed_migration_rolls_back_on_every_worker() {
        let from = Placement::contiguous(3, 2, 6).unwrap();
        let to = Placement::new(3, 2, 6, vec![2, 3, 4, 5, 0, 1]).unwrap();
        for fault in [Fault::CorruptReceived { rank: 1 }, Fault::FailAfterExchange { rank: 2 }] {
            for (rank, (committed, before, after, slots)) in
                migrate_once(&from, &to, Some(fault)).into_iter().enumerate()
            {
                assert!(!committed, "{fault:?}: worker {rank} committed");
                assert_eq!(before, after, "{fault:?}: worker {rank} lost state");
                assert_eq!(slots.as_slice(), from.gpu_slots(rank), "{fault:?}: worker {rank} moved");
            }
        }
        // The corrupted bit is caught by the checksum on both paths.
        for share in [true, false] {
            let out = migrate_with(&from, &to, Some(Fault::CorruptReceived { rank: 1 }), share);
            let reason = out[1].4.clone().unwrap_or_default();
            assert!(reason.contains("checksum mismatch"), "shared {share}: {reason}");
        }
    }
}
