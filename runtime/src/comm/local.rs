//! In-process communicator: one rank per worker thread, the embedded default (zero set-up).
//!
//! [`LocalWorld::new`] makes one [`LocalComm`] per rank; hand each to its own thread. [`run_local`]
//! does the spawning for you: it runs a function on `size` scoped threads and returns the per-rank
//! results, turning a panic into an error on that rank and into [`CommError::PeerFailed`] on the others.
//!
//! Messages move through per-rank mailboxes keyed by (context, source, tag): a send copies the slice
//! once into a `Vec<u8>`, the receiver takes that `Vec` (no further copy). Every wait has a deadline
//! ([`Communicator::timeout`]) and also wakes up when any rank of the world fails.
//!
//! Failure model: when a rank fails (it panicked, called [`Communicator::abort`], or its
//! [`run_local`] function returned an error), every rank of the world that must wait for a message
//! gets [`CommError::PeerFailed`] naming the first rank that failed (messages already delivered can
//! still be received). A rank whose [`run_local`] function returned `Ok` counts as exited: ranks
//! that wait for a message from it (and have none queued) get `PeerFailed` instead of a timeout.
//!
//! Collectives run over internal point-to-point messages whose tags cannot collide with user tags;
//! each sub-communicator from [`Communicator::split`] gets a fresh context so its messages never mix
//! with its parent's. The collective algorithms themselves live in the private module `algo` and are shared with the
//! MPI communicator.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::fmt::Display;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{CommError, CommResult, Communicator};

use algo::{Exchange, Op};

/// Internal tags live above every user tag (`u32`), so the two can never collide.
const INTERNAL_TAG_BASE: u64 = 1 << 32;

/// Locks a mutex, ignoring poisoning: no code in this module panics while holding a lock, and the
/// protected state stays consistent even if a panic did happen elsewhere.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The deadline of a wait that starts now (`None`: the timeout is too large to represent).
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// A timeout in whole milliseconds for [`CommError::Timeout`].
pub(crate) fn timeout_ms(timeout: Duration) -> u64 {
    u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX)
}

/// Where a message waits: context (communicator), sender's world rank, tag (user or internal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct Key {
    ctx: u64,
    src: usize,
    tag: u64,
}

/// A message: bytes, or (between ranks of one process) a shared object handed over without a copy.
enum Msg {
    Bytes(Vec<u8>),
    Shared(super::Shared),
}

/// The internal tag of [`Communicator::all_gather_shared`].
const SHARED_TAG: u64 = INTERNAL_TAG_BASE + 1000;

/// The mailbox of one world rank.
#[derive(Default)]
struct Inbox {
    queues: Mutex<HashMap<Key, VecDeque<Msg>>>,
    ready: Condvar,
}

/// Which ranks failed or exited.
struct Health {
    /// Per world rank: the reason it failed.
    failed: Vec<Option<String>>,
    /// Per world rank: its worker function returned normally.
    exited: Vec<bool>,
    /// The first rank that failed (the root cause reported to everyone).
    first_failed: Option<usize>,
}

/// A context allocated for one split: its id and how many members still have to look it up.
struct PendingContext {
    ctx: u64,
    remaining: usize,
}

/// The sub-communicator contexts handed out so far.
struct Contexts {
    /// The next unused context id (0 is the world).
    next: u64,
    /// Contexts not yet looked up by every member, keyed by (parent context, split number, color).
    table: HashMap<(u64, u64, u64), PendingContext>,
}

/// State shared by every rank of one local world.
struct World {
    inboxes: Vec<Inbox>,
    health: Mutex<Health>,
    /// True once any rank failed or exited (fast path for the waits).
    down: AtomicBool,
    /// Contexts of sub-communicators.
    contexts: Mutex<Contexts>,
    /// Ranks run under [`run_local`], which reports panics itself (with the panic message).
    managed: bool,
}

impl World {
    fn new(size: usize, managed: bool) -> World {
        World {
            inboxes: (0..size).map(|_| Inbox::default()).collect(),
            health: Mutex::new(Health { failed: vec![None; size], exited: vec![false; size], first_failed: None }),
            down: AtomicBool::new(false),
            contexts: Mutex::new(Contexts { next: 1, table: HashMap::new() }),
            managed,
        }
    }

    /// Wakes every waiter of the world so it re-checks the health of its peers.
    fn wake_all(&self) {
        self.down.store(true, Ordering::SeqCst);
        for inbox in &self.inboxes {
            // Taking the lock orders this wake-up after any check a waiter did under it.
            let _guard = lock(&inbox.queues);
            inbox.ready.notify_all();
        }
    }

    /// Marks `world_rank` failed with `reason` (the first reason wins) and wakes every waiter.
    fn mark_failed(&self, world_rank: usize, reason: String) {
        {
            let mut health = lock(&self.health);
            let Some(slot) = health.failed.get_mut(world_rank) else {
                return;
            };
            if slot.is_none() {
                *slot = Some(reason);
            }
            if health.first_failed.is_none() {
                health.first_failed = Some(world_rank);
            }
        }
        self.wake_all();
    }

    /// Marks `world_rank` exited (its work function returned) and wakes every waiter.
    fn mark_exited(&self, world_rank: usize) {
        {
            let mut health = lock(&self.health);
            let Some(slot) = health.exited.get_mut(world_rank) else {
                return;
            };
            *slot = true;
        }
        self.wake_all();
    }

    /// The context id of the sub-group `color` made by split number `seq` of context `parent`;
    /// the first member to ask allocates it, the last one removes the entry.
    fn context_for(&self, parent: u64, seq: u64, color: u64, members: usize) -> u64 {
        let mut guard = lock(&self.contexts);
        let Contexts { next, table } = &mut *guard;
        let key = (parent, seq, color);
        if let Some(entry) = table.get_mut(&key) {
            let ctx = entry.ctx;
            entry.remaining = entry.remaining.saturating_sub(1);
            if entry.remaining == 0 {
                table.remove(&key);
            }
            return ctx;
        }
        let ctx = *next;
        *next += 1;
        if members > 1 {
            table.insert(key, PendingContext { ctx, remaining: members - 1 });
        }
        ctx
    }
}

/// Builds local worlds (one communicator per worker thread).
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalWorld;

impl LocalWorld {
    /// Makes a world of `size` ranks and returns one communicator per rank, in rank order; give each
    /// to its own thread. Every blocking call waits at most `timeout`. `size == 0` gives no ranks.
    ///
    /// A thread that panics while it owns a communicator of this world marks its rank failed when
    /// the communicator is dropped during unwinding, so its peers get [`CommError::PeerFailed`]
    /// (use [`run_local`] to also get the panic message as the reason).
    #[allow(clippy::new_ret_no_self, reason = "a world is its ranks' communicators; there is no world object")]
    pub fn new(size: usize, timeout: Duration) -> Vec<LocalComm> {
        Self::build(size, timeout, false)
    }

    fn build(size: usize, timeout: Duration, managed: bool) -> Vec<LocalComm> {
        let world = Arc::new(World::new(size, managed));
        let members: Arc<[usize]> = (0..size).collect();
        (0..size)
            .map(|rank| LocalComm {
                world: Arc::clone(&world),
                ctx: 0,
                members: Arc::clone(&members),
                rank,
                timeout,
                splits: AtomicU64::new(0),
            })
            .collect()
    }
}

/// One rank's handle on a local world (or on a sub-group of it, from [`Communicator::split`]).
pub struct LocalComm {
    world: Arc<World>,
    ctx: u64,
    /// Group rank -> world rank.
    members: Arc<[usize]>,
    rank: usize,
    timeout: Duration,
    /// How many splits this communicator has done (all members agree: split is collective).
    splits: AtomicU64,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalComm")
            .field("rank", &self.rank)
            .field("size", &self.members.len())
            .field("world_rank", &self.world_rank())
            .field("context", &self.ctx)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl LocalComm {
    /// This rank's index in the whole local world (equal to [`Communicator::rank`] on the world
    /// communicator, different on a sub-group).
    pub fn world_rank(&self) -> usize {
        self.members[self.rank]
    }

    /// Changes how long blocking calls of this communicator wait (sub-groups split from it later
    /// inherit the new value).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// As [`Communicator::split`], but returns the concrete type.
    pub fn split_local(&self, color: usize, key: usize) -> CommResult<LocalComm> {
        let seq = self.splits.fetch_add(1, Ordering::Relaxed);
        let (members, rank) = algo::split_members(self, color, key)?;
        let ctx = self.world.context_for(self.ctx, seq, color as u64, members.len());
        let members: Arc<[usize]> = members.iter().map(|&r| self.members[r]).collect();
        Ok(LocalComm {
            world: Arc::clone(&self.world),
            ctx,
            members,
            rank,
            timeout: self.timeout,
            splits: AtomicU64::new(0),
        })
    }

    fn invalid(&self, op: &'static str, reason: String) -> CommError {
        CommError::Invalid { rank: self.rank, op, reason }
    }

    fn check_rank(&self, op: &'static str, what: &str, r: usize) -> CommResult<()> {
        if r < self.members.len() {
            Ok(())
        } else {
            Err(self
                .invalid(op, format!("{what} rank {r} is out of range (the group has {} ranks)", self.members.len())))
        }
    }

    /// A `PeerFailed` for world rank `world_peer`, numbered within this group when it belongs to it.
    fn peer_failed(&self, op: &'static str, world_peer: usize, reason: &str) -> CommError {
        match self.members.iter().position(|&w| w == world_peer) {
            Some(peer) => CommError::PeerFailed { rank: self.rank, peer, op, reason: reason.to_string() },
            None => CommError::PeerFailed {
                rank: self.rank,
                peer: world_peer,
                op,
                reason: format!("(world rank {world_peer}, outside this group) {reason}"),
            },
        }
    }

    /// The error to report if the world is going down: the first failed rank, or the awaited
    /// source if it exited. `None` while everything is healthy.
    fn down_error(&self, op: &'static str, awaited: Option<usize>) -> Option<CommError> {
        if !self.world.down.load(Ordering::SeqCst) {
            return None;
        }
        let health = lock(&self.world.health);
        if let Some(first) = health.first_failed {
            let reason = health.failed[first].as_deref().unwrap_or("failed");
            return Some(self.peer_failed(op, first, reason));
        }
        let src = awaited?;
        if health.exited[src] {
            return Some(self.peer_failed(op, src, "its worker function returned; it will send nothing more"));
        }
        None
    }

    /// Queues `data` for group rank `dst` under `tag` (a user tag or an internal one).
    fn post(&self, op: &'static str, dst: usize, tag: u64, data: Vec<u8>) -> CommResult<()> {
        self.post_msg(op, dst, tag, Msg::Bytes(data))
    }

    /// Queues a message of either kind.
    fn post_msg(&self, op: &'static str, dst: usize, tag: u64, data: Msg) -> CommResult<()> {
        self.check_rank(op, "destination", dst)?;
        if let Some(e) = self.down_error(op, None) {
            return Err(e);
        }
        let inbox = &self.world.inboxes[self.members[dst]];
        let key = Key { ctx: self.ctx, src: self.world_rank(), tag };
        lock(&inbox.queues).entry(key).or_default().push_back(data);
        inbox.ready.notify_all();
        Ok(())
    }

    /// Takes the next message from group rank `src` under `tag`, waiting until `deadline`.
    fn take(&self, op: &'static str, src: usize, tag: u64, deadline: Option<Instant>) -> CommResult<Vec<u8>> {
        match self.take_msg(op, src, tag, deadline)? {
            Msg::Bytes(b) => Ok(b),
            Msg::Shared(_) => Err(self.invalid(op, format!("rank {src} sent a shared object, not bytes"))),
        }
    }

    /// Takes the next message of either kind.
    fn take_msg(&self, op: &'static str, src: usize, tag: u64, deadline: Option<Instant>) -> CommResult<Msg> {
        self.check_rank(op, "source", src)?;
        let src_world = self.members[src];
        let key = Key { ctx: self.ctx, src: src_world, tag };
        let inbox = &self.world.inboxes[self.world_rank()];
        let mut queues = lock(&inbox.queues);
        loop {
            if let Some(queue) = queues.get_mut(&key) {
                let msg = queue.pop_front();
                if queue.is_empty() {
                    queues.remove(&key);
                }
                if let Some(msg) = msg {
                    return Ok(msg);
                }
            }
            if let Some(e) = self.down_error(op, Some(src_world)) {
                return Err(e);
            }
            let wait = match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(CommError::Timeout {
                            rank: self.rank,
                            peer: src,
                            op,
                            timeout_ms: timeout_ms(self.timeout),
                        });
                    }
                    d - now
                }
                None => Duration::from_secs(3600),
            };
            queues = match inbox.ready.wait_timeout(queues, wait) {
                Ok((guard, _)) => guard,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.world.managed {
            self.world.mark_failed(self.world_rank(), "its thread panicked".to_string());
        }
    }
}

impl Exchange for LocalComm {
    fn exchange(&self, op: Op, sends: Vec<(usize, Cow<'_, [u8]>)>, recvs: &[usize]) -> CommResult<Vec<Vec<u8>>> {
        let tag = INTERNAL_TAG_BASE + u64::from(op.tag());
        let deadline = deadline_after(self.timeout);
        for (dst, data) in sends {
            self.post(op.name(), dst, tag, data.into_owned())?;
        }
        recvs.iter().map(|&src| self.take(op.name(), src, tag, deadline)).collect()
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn transport(&self) -> &'static str {
        "local"
    }

    fn send(&self, dst: usize, tag: u32, data: &[u8]) -> CommResult<()> {
        self.post("send", dst, u64::from(tag), data.to_vec())
    }

    fn recv(&self, src: usize, tag: u32) -> CommResult<Vec<u8>> {
        self.take("recv", src, u64::from(tag), deadline_after(self.timeout))
    }

    fn all_to_all_v(&self, send: &[&[u8]]) -> CommResult<Vec<Vec<u8>>> {
        algo::all_to_all_v(self, send)
    }

    fn all_to_all_v_owned(&self, send: Vec<Vec<u8>>) -> CommResult<Vec<Vec<u8>>> {
        algo::all_to_all_v_owned(self, send)
    }

    fn all_gather(&self, data: &[u8]) -> CommResult<Vec<Vec<u8>>> {
        algo::all_gather(self, Op::AllGather, data)
    }

    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> CommResult<()> {
        algo::broadcast(self, root, data)
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> CommResult<()> {
        algo::all_reduce_sum(self, data)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> CommResult<()> {
        algo::all_reduce_sum(self, data)
    }

    fn barrier(&self) -> CommResult<()> {
        algo::barrier(self)
    }

    fn split(&self, color: usize, key: usize) -> CommResult<Box<dyn Communicator>> {
        Ok(Box::new(self.split_local(color, key)?))
    }

    fn all_gather_shared(&self, item: super::Shared) -> Option<CommResult<Vec<super::Shared>>> {
        const OP: &str = "all_gather_shared";
        let run = || -> CommResult<Vec<super::Shared>> {
            let deadline = deadline_after(self.timeout);
            for dst in (0..self.size()).filter(|&r| r != self.rank) {
                self.post_msg(OP, dst, SHARED_TAG, Msg::Shared(Arc::clone(&item)))?;
            }
            (0..self.size())
                .map(|src| {
                    if src == self.rank {
                        return Ok(Arc::clone(&item));
                    }
                    match self.take_msg(OP, src, SHARED_TAG, deadline)? {
                        Msg::Shared(x) => Ok(x),
                        Msg::Bytes(_) => Err(self.invalid(OP, format!("rank {src} sent bytes, not a shared object"))),
                    }
                })
                .collect()
        };
        Some(run())
    }

    fn abort(&self, reason: &str) {
        self.world.mark_failed(self.world_rank(), format!("aborted: {reason}"));
    }
}

/// Why a rank of [`run_local`] produced no value.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError<E> {
    /// The worker function returned this error.
    #[error("{0}")]
    Failed(E),
    /// The worker function panicked.
    #[error("rank {rank} panicked: {message}")]
    Panicked {
        /// The rank that panicked.
        rank: usize,
        /// The panic message.
        message: String,
    },
    /// The operating system refused to start the worker thread.
    #[error("rank {rank}: could not start its worker thread: {reason}")]
    Spawn {
        /// The rank whose thread did not start.
        rank: usize,
        /// The operating system's message.
        reason: String,
    },
}

/// The message of a panic payload (`&str` or `String`; anything else is described generically).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(a panic payload that is not a string)".to_string()
    }
}

/// Runs `f` on `size` scoped worker threads (named `local-rank-<r>`), each with its own rank's
/// communicator of a fresh local world, and returns the per-rank results in rank order.
///
/// A rank whose `f` panics gets [`WorkerError::Panicked`] with the panic message, and is marked
/// failed at once, so that peers blocked on it get [`CommError::PeerFailed`] with the panic message
/// as reason (well before the timeout). A rank whose `f` returns `Err(e)` is marked failed the same
/// way (reason: `e`), and one whose `f` returns `Ok` is marked exited (peers that still wait for a
/// message from it fail at once instead of timing out). Communicators must not outlive `f`.
pub fn run_local<T, E, F>(size: usize, timeout: Duration, f: F) -> Vec<Result<T, WorkerError<E>>>
where
    T: Send,
    E: Send + Display,
    F: Fn(LocalComm) -> Result<T, E> + Sync,
{
    let comms = LocalWorld::build(size, timeout, true);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let rank = comm.rank;
                let world = Arc::clone(&comm.world);
                let spawned = std::thread::Builder::new().name(format!("local-rank-{rank}")).spawn_scoped(scope, {
                    let world = Arc::clone(&world);
                    move || match catch_unwind(AssertUnwindSafe(|| f(comm))) {
                        Ok(Ok(value)) => {
                            world.mark_exited(rank);
                            Ok(value)
                        }
                        Ok(Err(e)) => {
                            world.mark_failed(rank, format!("returned an error: {e}"));
                            Err(WorkerError::Failed(e))
                        }
                        Err(payload) => {
                            let message = panic_message(payload.as_ref());
                            world.mark_failed(rank, format!("panicked: {message}"));
                            Err(WorkerError::Panicked { rank, message })
                        }
                    }
                });
                spawned.map_err(|e| {
                    let reason = e.to_string();
                    world.mark_failed(rank, format!("its worker thread did not start: {reason}"));
                    WorkerError::Spawn { rank, reason }
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, handle)| match handle {
                Ok(h) => h.join().unwrap_or_else(|payload| {
                    Err(WorkerError::Panicked { rank, message: panic_message(payload.as_ref()) })
                }),
                Err(e) => Err(e),
            })
            .collect()
    })
}

/// Collective algorithms over a minimal "post sends, then collect receives" primitive
/// ([`Exchange`]), shared by the local and the MPI communicators.
///
/// Every algorithm sends only to other ranks (the self-part is copied locally) and waits for each
/// peer directly, so a missing peer is named in the timeout. Reductions use reduce-scatter plus
/// all-gather: rank `k` sums chunk `k` of every rank's vector in rank order `0..n` and sends the
/// result to all, so every rank gets the same bits while each moves only `2 (n-1)/n` of the data.
pub(crate) mod algo {
    use std::borrow::Cow;

    use super::super::{CommError, CommResult, Communicator};

    /// The internal operations; each has its own tag so mismatched collectives time out rather than
    /// mix their messages.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) enum Op {
        AllToAllV,
        AllGather,
        Broadcast,
        ReduceScatter,
        ReduceGather,
        Barrier,
        Split,
    }

    impl Op {
        /// The operation's name in errors.
        pub(crate) fn name(self) -> &'static str {
            match self {
                Op::AllToAllV => "all_to_all_v",
                Op::AllGather => "all_gather",
                Op::Broadcast => "broadcast",
                Op::ReduceScatter | Op::ReduceGather => "all_reduce_sum",
                Op::Barrier => "barrier",
                Op::Split => "split",
            }
        }

        /// The internal tag (small, positive; each transport maps it into its own internal space).
        pub(crate) fn tag(self) -> u32 {
            self as u32 + 1
        }
    }

    /// The primitive under every collective.
    pub(crate) trait Exchange: Communicator {
        /// Hands over every `(dst, bytes)` of `sends` (buffered, does not wait for the receivers),
        /// then waits for one message of `op` from each source in `recvs` and returns them in that
        /// order. All waits of one call share a deadline of [`Communicator::timeout`].
        fn exchange(&self, op: Op, sends: Vec<(usize, Cow<'_, [u8]>)>, recvs: &[usize]) -> CommResult<Vec<Vec<u8>>>;
    }

    fn invalid<C: Communicator + ?Sized>(c: &C, op: Op, reason: String) -> CommError {
        CommError::Invalid { rank: c.rank(), op: op.name(), reason }
    }

    fn others<C: Communicator + ?Sized>(c: &C) -> Vec<usize> {
        (0..c.size()).filter(|&r| r != c.rank()).collect()
    }

    /// See [`Communicator::all_to_all_v`].
    pub(crate) fn all_to_all_v<C: Exchange + ?Sized>(c: &C, send: &[&[u8]]) -> CommResult<Vec<Vec<u8>>> {
        let (n, me) = (c.size(), c.rank());
        if send.len() != n {
            return Err(invalid(c, Op::AllToAllV, format!("got {} send buffers for a group of {n} ranks", send.len())));
        }
        let peers = others(c);
        let sends = peers.iter().map(|&j| (j, Cow::Borrowed(send[j]))).collect();
        let got = c.exchange(Op::AllToAllV, sends, &peers)?;
        let mut out = Vec::with_capacity(n);
        let mut got = got.into_iter();
        for j in 0..n {
            if j == me {
                out.push(send[me].to_vec());
            } else {
                out.push(got.next().unwrap_or_default());
            }
        }
        Ok(out)
    }

    /// See [`Communicator::all_to_all_v_owned`]: the buffers move to their receivers without a copy.
    pub(crate) fn all_to_all_v_owned<C: Exchange + ?Sized>(c: &C, mut send: Vec<Vec<u8>>) -> CommResult<Vec<Vec<u8>>> {
        let (n, me) = (c.size(), c.rank());
        if send.len() != n {
            return Err(invalid(c, Op::AllToAllV, format!("got {} send buffers for a group of {n} ranks", send.len())));
        }
        let peers = others(c);
        let sends = peers.iter().map(|&j| (j, Cow::Owned(std::mem::take(&mut send[j])))).collect();
        let got = c.exchange(Op::AllToAllV, sends, &peers)?;
        let mut out = Vec::with_capacity(n);
        let mut got = got.into_iter();
        for j in 0..n {
            if j == me {
                out.push(std::mem::take(&mut send[me]));
            } else {
                out.push(got.next().unwrap_or_default());
            }
        }
        Ok(out)
    }

    /// See [`Communicator::all_gather`] (`op` lets split use its own tag).
    pub(crate) fn all_gather<C: Exchange + ?Sized>(c: &C, op: Op, data: &[u8]) -> CommResult<Vec<Vec<u8>>> {
        let me = c.rank();
        let peers = others(c);
        let sends = peers.iter().map(|&j| (j, Cow::Borrowed(data))).collect();
        let mut got = c.exchange(op, sends, &peers)?;
        got.insert(me.min(got.len()), data.to_vec());
        Ok(got)
    }

    /// See [`Communicator::broadcast`].
    pub(crate) fn broadcast<C: Exchange + ?Sized>(c: &C, root: usize, data: &mut Vec<u8>) -> CommResult<()> {
        if root >= c.size() {
            return Err(invalid(
                c,
                Op::Broadcast,
                format!("root {root} is out of range (the group has {} ranks)", c.size()),
            ));
        }
        if c.rank() == root {
            let sends = others(c).into_iter().map(|j| (j, Cow::Borrowed(data.as_slice()))).collect();
            c.exchange(Op::Broadcast, sends, &[])?;
        } else {
            let mut got = c.exchange(Op::Broadcast, Vec::new(), &[root])?;
            *data = got.pop().unwrap_or_default();
        }
        Ok(())
    }

    /// See [`Communicator::barrier`]: every rank tells every other that it arrived.
    pub(crate) fn barrier<C: Exchange + ?Sized>(c: &C) -> CommResult<()> {
        let peers = others(c);
        let sends = peers.iter().map(|&j| (j, Cow::Borrowed(&[][..]))).collect();
        c.exchange(Op::Barrier, sends, &peers)?;
        Ok(())
    }

    /// Element types the reductions add.
    pub(crate) trait Summable: bytemuck::Pod + std::ops::AddAssign {}
    impl Summable for f32 {}
    impl Summable for f64 {}

    /// Values from bytes (a view when the bytes are aligned, a copy otherwise).
    fn values<T: bytemuck::Pod>(bytes: &[u8]) -> Cow<'_, [T]> {
        match bytemuck::try_cast_slice::<u8, T>(bytes) {
            Ok(v) => Cow::Borrowed(v),
            Err(_) => {
                Cow::Owned(bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect())
            }
        }
    }

    /// See [`Communicator::all_reduce_sum_f32`]: reduce-scatter (each rank sums its chunk in rank
    /// order) then all-gather of the summed chunks. Every message of the first phase carries the
    /// sender's length, so every rank sees every length and all reject unequal lengths alike.
    pub(crate) fn all_reduce_sum<T: Summable, C: Exchange + ?Sized>(c: &C, data: &mut [T]) -> CommResult<()> {
        let (n, me) = (c.size(), c.rank());
        if n <= 1 {
            return Ok(());
        }
        let len = data.len();
        let size = std::mem::size_of::<T>();
        let bound = |k: usize| ((k as u128 * len as u128) / n as u128) as usize;
        let peers = others(c);

        // Phase 1: chunk j (plus this rank's length) to rank j.
        let sends = peers
            .iter()
            .map(|&j| {
                let part: &[u8] = bytemuck::cast_slice(&data[bound(j)..bound(j + 1)]);
                let mut msg = Vec::with_capacity(part.len() + 8);
                msg.extend_from_slice(part);
                msg.extend_from_slice(&(len as u64).to_le_bytes());
                (j, Cow::Owned(msg))
            })
            .collect();
        let got = c.exchange(Op::ReduceScatter, sends, &peers)?;
        let (lo, hi) = (bound(me), bound(me + 1));
        let mut bodies: Vec<&[u8]> = Vec::with_capacity(got.len());
        let mut mismatch = None;
        for (msg, &j) in got.iter().zip(&peers) {
            let Some(split) = msg.len().checked_sub(8) else {
                return Err(invalid(
                    c,
                    Op::ReduceScatter,
                    format!("malformed message from rank {j} ({} bytes)", msg.len()),
                ));
            };
            let (body, trailer) = msg.split_at(split);
            let mut word = [0u8; 8];
            word.copy_from_slice(trailer);
            let theirs = u64::from_le_bytes(word);
            if theirs != len as u64 {
                mismatch.get_or_insert((j, theirs));
            } else if body.len() != (hi - lo) * size {
                return Err(invalid(
                    c,
                    Op::ReduceScatter,
                    format!("malformed chunk from rank {j} ({} bytes)", body.len()),
                ));
            }
            bodies.push(body);
        }
        if let Some((j, theirs)) = mismatch {
            return Err(invalid(
                c,
                Op::ReduceScatter,
                format!("lengths differ between ranks: this rank has {len} values, rank {j} has {theirs}"),
            ));
        }

        // Sum chunk `me` in rank order 0..n.
        let mut acc: Vec<T> = Vec::with_capacity(hi - lo);
        let mut bodies = bodies.into_iter();
        for j in 0..n {
            let part: Cow<'_, [T]> =
                if j == me { Cow::Borrowed(&data[lo..hi]) } else { values(bodies.next().unwrap_or_default()) };
            if j == 0 {
                acc.extend_from_slice(&part);
            } else {
                for (a, v) in acc.iter_mut().zip(part.iter()) {
                    *a += *v;
                }
            }
        }

        // Phase 2: everyone gets every summed chunk.
        let acc_bytes: &[u8] = bytemuck::cast_slice(&acc);
        let sends = peers.iter().map(|&j| (j, Cow::Borrowed(acc_bytes))).collect();
        let got = c.exchange(Op::ReduceGather, sends, &peers)?;
        for (msg, &j) in got.iter().zip(&peers) {
            let target: &mut [u8] = bytemuck::cast_slice_mut(&mut data[bound(j)..bound(j + 1)]);
            if msg.len() != target.len() {
                return Err(invalid(
                    c,
                    Op::ReduceGather,
                    format!("malformed summed chunk from rank {j} ({} bytes)", msg.len()),
                ));
            }
            target.copy_from_slice(msg);
        }
        data[lo..hi].copy_from_slice(&acc);
        Ok(())
    }

    /// The collective part of [`Communicator::split`]: all-gathers `(color, key)` and returns the
    /// members of this rank's color (ranks of `c`, ordered by `(key, rank)`) and this rank's index
    /// among them.
    pub(crate) fn split_members<C: Exchange + ?Sized>(
        c: &C,
        color: usize,
        key: usize,
    ) -> CommResult<(Vec<usize>, usize)> {
        let mut mine = Vec::with_capacity(16);
        mine.extend_from_slice(&(color as u64).to_le_bytes());
        mine.extend_from_slice(&(key as u64).to_le_bytes());
        let all = all_gather(c, Op::Split, &mine)?;
        let mut group = Vec::new();
        for (r, msg) in all.iter().enumerate() {
            if msg.len() != 16 {
                return Err(invalid(
                    c,
                    Op::Split,
                    format!("malformed split message from rank {r} ({} bytes)", msg.len()),
                ));
            }
            let mut word = [0u8; 8];
            word.copy_from_slice(&msg[..8]);
            let their_color = u64::from_le_bytes(word);
            word.copy_from_slice(&msg[8..]);
            let their_key = u64::from_le_bytes(word);
            if their_color == color as u64 {
                group.push((their_key, r));
            }
        }
        group.sort_unstable();
        let members: Vec<usize> = group.into_iter().map(|(_, r)| r).collect();
        let Some(pos) = members.iter().position(|&r| r == c.rank()) else {
            return Err(invalid(c, Op::Split, "this rank is missing from its own color".to_string()));
        };
        Ok((members, pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CommExt;
    use proptest::prelude::*;

    const T: Duration = Duration::from_secs(10);

    /// Deterministic pseudo-random numbers (splitmix64).
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    fn payload(seed: u64, src: usize, dst: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| mix(seed ^ ((src as u64) << 40) ^ ((dst as u64) << 20) ^ i as u64) as u8).collect()
    }

    fn size_of_msg(seed: u64, src: usize, dst: usize, max: usize) -> usize {
        // One in four messages is empty.
        let x = mix(seed.wrapping_mul(31) ^ ((src as u64) << 32) ^ dst as u64);
        if x.is_multiple_of(4) { 0 } else { (x >> 8) as usize % (max + 1) }
    }

    fn all_ok<T: std::fmt::Debug>(results: Vec<Result<T, WorkerError<CommError>>>) -> Vec<T> {
        results.into_iter().enumerate().map(|(r, res)| res.unwrap_or_else(|e| panic!("rank {r}: {e}"))).collect()
    }

    const SIZES: [usize; 5] = [1, 2, 3, 4, 8];

    #[test]
    fn every_collective_on_several_world_sizes() {
        for n in SIZES {
            let out = run_local(n, T, |c| {
                let (me, n) = (c.rank(), c.size());
                let seed = 7;
                // all_to_all_v
                let send: Vec<Vec<u8>> = (0..n).map(|j| payload(seed, me, j, size_of_msg(seed, me, j, 300))).collect();
                let refs: Vec<&[u8]> = send.iter().map(|v| v.as_slice()).collect();
                let got = c.all_to_all_v(&refs)?;
                for (j, g) in got.iter().enumerate() {
                    assert_eq!(*g, payload(seed, j, me, size_of_msg(seed, j, me, 300)), "all_to_all_v {j}->{me}");
                }
                // all_gather
                let mine = payload(seed + 1, me, 0, size_of_msg(seed + 1, me, 0, 50));
                let all = c.all_gather(&mine)?;
                assert_eq!(all.len(), n);
                for (j, g) in all.iter().enumerate() {
                    assert_eq!(*g, payload(seed + 1, j, 0, size_of_msg(seed + 1, j, 0, 50)));
                }
                // broadcast from every root
                for root in 0..n {
                    let mut data = if me == root { payload(seed + 2, root, 0, 33 + root) } else { vec![9; 3] };
                    c.broadcast(root, &mut data)?;
                    assert_eq!(data, payload(seed + 2, root, 0, 33 + root));
                }
                // barrier
                c.barrier()?;
                // typed helpers
                assert!(c.all_agree(true)?);
                assert!(!c.all_agree(me != n - 1)?);
                let counts = c.all_gather_u64(&[me as u64, 2 * me as u64])?;
                assert_eq!(counts[n - 1], vec![(n - 1) as u64, 2 * (n - 1) as u64]);
                Ok::<_, CommError>(())
            });
            all_ok(out);
        }
    }

    /// Values whose sum depends on the order of addition.
    fn contribution(rank: usize, len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| {
                let x = mix((rank * 1000 + i) as u64);
                let mag = [1e-3f32, 1.0, 1e4, 1e8][(x % 4) as usize];
                let sign = if (x >> 3).is_multiple_of(2) { 1.0 } else { -1.0 };
                sign * mag * (1.0 + (x >> 8) as f32 / u64::MAX as f32)
            })
            .collect()
    }

    #[test]
    fn reductions_are_bit_identical_and_in_rank_order() {
        for n in SIZES {
            for len in [0usize, 1, 5, 64, 1001] {
                let out = run_local(n, T, |c| {
                    let mut v = contribution(c.rank(), len);
                    c.all_reduce_sum_f32(&mut v)?;
                    let mut w: Vec<f64> = contribution(c.rank(), len).iter().map(|&x| f64::from(x) * 1.1).collect();
                    c.all_reduce_sum_f64(&mut w)?;
                    Ok::<_, CommError>((v, w))
                });
                let out = all_ok(out);
                // Expected: the sum in rank order 0..n, starting from rank 0's value.
                let mut expect = contribution(0, len);
                let mut expect64: Vec<f64> = expect.iter().map(|&x| f64::from(x) * 1.1).collect();
                for r in 1..n {
                    for (e, x) in expect.iter_mut().zip(contribution(r, len)) {
                        *e += x;
                    }
                    for (e, x) in expect64.iter_mut().zip(contribution(r, len)) {
                        *e += f64::from(x) * 1.1;
                    }
                }
                for (r, (v, w)) in out.iter().enumerate() {
                    let bits: Vec<u32> = v.iter().map(|x| x.to_bits()).collect();
                    let want: Vec<u32> = expect.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(bits, want, "f32 n={n} len={len} rank {r}");
                    let bits: Vec<u64> = w.iter().map(|x| x.to_bits()).collect();
                    let want: Vec<u64> = expect64.iter().map(|x| x.to_bits()).collect();
                    assert_eq!(bits, want, "f64 n={n} len={len} rank {r}");
                }
            }
        }
    }

    #[test]
    fn reduction_with_unequal_lengths_is_invalid_on_every_rank() {
        let out = run_local(3, T, |c| {
            let mut v = vec![1.0f32; 4 + usize::from(c.rank() == 2)];
            Ok::<_, CommError>(c.all_reduce_sum_f32(&mut v))
        });
        for (r, res) in all_ok(out).into_iter().enumerate() {
            assert!(matches!(res, Err(CommError::Invalid { .. })), "rank {r}: {res:?}");
        }
    }

    #[test]
    fn split_groups_are_separate_and_ordered_by_key() {
        for n in SIZES {
            let out = run_local(n, T, |c| {
                let me = c.rank();
                // Two colors; keys reverse the order inside each group.
                let sub = c.split(me % 2, n - me)?;
                let expect_members: Vec<usize> = (0..n).rev().filter(|r| r % 2 == me % 2).collect();
                assert_eq!(sub.size(), expect_members.len());
                assert_eq!(expect_members[sub.rank()], me);
                let all = sub.all_gather(&(me as u64).to_le_bytes())?;
                let got: Vec<usize> = all.iter().map(|b| b[0] as usize).collect();
                assert_eq!(got, expect_members);
                // Interleave traffic on parent and child with the same user tag.
                let right = (sub.rank() + 1) % sub.size();
                sub.send(right, 5, b"child")?;
                c.send((me + 1) % n, 5, b"parent")?;
                let left = (sub.rank() + sub.size() - 1) % sub.size();
                assert_eq!(sub.recv(left, 5)?, b"child");
                assert_eq!(c.recv((me + n - 1) % n, 5)?, b"parent");
                // A nested split and a reduction inside it.
                let one = sub.split(0, 0)?;
                let mut v = [1.0f64];
                one.all_reduce_sum_f64(&mut v)?;
                assert_eq!(v[0], sub.size() as f64);
                // Repeated splits with the same color get distinct contexts.
                let a = c.split(0, me)?;
                let b = c.split(0, me)?;
                if a.size() > 1 {
                    a.send((a.rank() + 1) % a.size(), 1, b"a")?;
                    b.send((b.rank() + 1) % b.size(), 1, b"b")?;
                    assert_eq!(b.recv((b.rank() + b.size() - 1) % b.size(), 1)?, b"b");
                    assert_eq!(a.recv((a.rank() + a.size() - 1) % a.size(), 1)?, b"a");
                }
                Ok::<_, CommError>(())
            });
            all_ok(out);
        }
    }

    #[test]
    fn point_to_point_keeps_order_per_source_and_tag() {
        let out = run_local(3, T, |c| {
            let me = c.rank();
            if me != 0 {
                for i in 0..100u32 {
                    c.send(0, i % 3, &[me as u8, i as u8])?;
                }
            } else {
                // Read tags in a different order than they were sent.
                for src in [2, 1] {
                    for tag in [2u32, 0, 1] {
                        let mut prev = None;
                        loop {
                            let expect_more = (0..100u32).filter(|i| i % 3 == tag).count();
                            let seen = prev.map_or(0, |(n, _)| n);
                            if seen == expect_more {
                                break;
                            }
                            let m = c.recv(src, tag)?;
                            assert_eq!(m[0] as usize, src);
                            assert_eq!(u32::from(m[1]) % 3, tag);
                            if let Some((_, last)) = prev {
                                assert!(m[1] > last, "out of order");
                            }
                            prev = Some((seen + 1, m[1]));
                        }
                    }
                }
            }
            // Self-send works too.
            c.send(me, 9, b"me")?;
            assert_eq!(c.recv(me, 9)?, b"me");
            Ok::<_, CommError>(())
        });
        all_ok(out);
    }

    #[test]
    fn wrong_arguments_are_invalid_not_panics() {
        let out = run_local(2, Duration::from_millis(200), |c| {
            let errs = [
                c.send(2, 0, b"x").err(),
                c.recv(5, 0).err(),
                c.all_to_all_v(&[b"x"]).err(),
                c.broadcast(7, &mut Vec::new()).err(),
            ];
            Ok::<_, CommError>(errs)
        });
        for errs in all_ok(out) {
            for e in errs {
                assert!(matches!(e, Some(CommError::Invalid { .. })), "{e:?}");
            }
        }
        assert!(LocalWorld::new(0, T).is_empty());
        assert!(run_local(0, T, |_c| Ok::<_, CommError>(())).is_empty());
    }

    #[test]
    fn a_panicking_worker_fails_its_peers_quickly() {
        let timeout = Duration::from_secs(30);
        let start = Instant::now();
        let out = run_local(4, timeout, |c| {
            if c.rank() == 2 {
                panic!("boom in rank 2");
            }
            let mut v = vec![1.0f32; 8];
            c.all_reduce_sum_f32(&mut v)?;
            Ok::<_, CommError>(())
        });
        assert!(start.elapsed() < Duration::from_secs(10), "took {:?}", start.elapsed());
        for (r, res) in out.into_iter().enumerate() {
            match res {
                Err(WorkerError::Panicked { rank, message }) => {
                    assert_eq!((r, rank), (2, 2));
                    assert!(message.contains("boom in rank 2"));
                }
                Err(WorkerError::Failed(CommError::PeerFailed { peer, reason, .. })) => {
                    assert_eq!(peer, 2, "rank {r}");
                    assert!(reason.contains("boom in rank 2"), "{reason}");
                }
                other => panic!("rank {r}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_peer_that_never_arrives_gives_timeout() {
        let timeout = Duration::from_millis(200);
        // Rank 1 never enters the barrier and stays alive until the others have their answer.
        let done = std::sync::Barrier::new(3);
        let out = run_local(3, timeout, |c| {
            if c.rank() == 1 {
                done.wait();
                return Ok(None);
            }
            let start = Instant::now();
            let res = c.barrier();
            let elapsed = start.elapsed();
            done.wait();
            Ok::<_, CommError>(Some((res, elapsed)))
        });
        for (r, res) in all_ok(out).into_iter().enumerate() {
            let Some((res, elapsed)) = res else { continue };
            assert!(matches!(res, Err(CommError::Timeout { peer: 1, timeout_ms: 200, .. })), "rank {r}: {res:?}");
            assert!(elapsed >= timeout && elapsed < timeout + Duration::from_secs(5), "rank {r}: {elapsed:?}");
        }
    }

    #[test]
    fn abort_is_seen_by_peers() {
        let out = run_local(3, Duration::from_secs(30), |c| {
            if c.rank() == 0 {
                c.abort("cannot continue");
                return Ok(None);
            }
            Ok::<_, CommError>(Some(c.recv(0, 3)))
        });
        for res in all_ok(out).into_iter().flatten() {
            match res {
                Err(CommError::PeerFailed { peer: 0, reason, .. }) => assert!(reason.contains("cannot continue")),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn threads_with_plain_local_world_report_panics_on_drop() {
        let comms = LocalWorld::new(2, Duration::from_secs(30));
        let mut it = comms.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        let start = Instant::now();
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let _keep = a;
                panic!("worker died");
            });
            let res = b.recv(0, 0);
            assert!(matches!(res, Err(CommError::PeerFailed { peer: 0, .. })), "{res:?}");
            assert!(h.join().is_err());
        });
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_finished_peer_fails_waiters_instead_of_timing_out() {
        let out = run_local(2, Duration::from_secs(30), |c| {
            if c.rank() == 0 {
                c.send(1, 0, b"last")?;
                return Ok(None);
            }
            let first = c.recv(0, 0)?;
            Ok::<_, CommError>(Some((first, c.recv(0, 0))))
        });
        let (first, second) = all_ok(out).pop().flatten().unwrap();
        assert_eq!(first, b"last");
        assert!(matches!(second, Err(CommError::PeerFailed { peer: 0, .. })), "{second:?}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

        #[test]
        fn all_to_all_v_delivers_random_sizes(n in 1usize..9, seed in any::<u64>(), max in 0usize..2000) {
            let out = run_local(n, T, |c| {
                let me = c.rank();
                let send: Vec<Vec<u8>> = (0..n).map(|j| payload(seed, me, j, size_of_msg(seed, me, j, max))).collect();
                let refs: Vec<&[u8]> = send.iter().map(|v| v.as_slice()).collect();
                let got = c.all_to_all_v(&refs)?;
                let mine = [1.5f32, me as f32];
                let f: Vec<&[f32]> = (0..n).map(|_| &mine[..]).collect();
                let got_f = c.all_to_all_v_f32(&f)?;
                Ok::<_, CommError>((got, got_f))
            });
            for (me, (got, got_f)) in all_ok(out).into_iter().enumerate() {
                for j in 0..n {
                    prop_assert_eq!(&got[j], &payload(seed, j, me, size_of_msg(seed, j, me, max)));
                    prop_assert_eq!(&got_f[j], &vec![1.5f32, j as f32]);
                }
            }
        }
    }
}
