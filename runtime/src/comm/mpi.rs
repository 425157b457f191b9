//! MPI communicator (cargo feature `mpi`; needs a system MPI, e.g. Open MPI's `libopenmpi-dev`).
//!
//! [`init`] initialises MPI once per process and returns the world communicator; [`Communicator::split`]
//! makes sub-groups. MPI is finalised when the last communicator of the process is dropped, so drop
//! them all before `main` returns. Launch with `mpirun -np N <binary>`.
//!
//! # How it works
//!
//! Every communicator holds two duplicates of its MPI group: one for user point-to-point messages
//! (user tags map 1:1 to MPI tags and must not exceed the library's `MPI_TAG_UB`), one for the
//! collectives (internal tags), so the two never match each other's messages. The collectives are
//! the same algorithms as the local communicator's (`local::algo`), over non-blocking MPI:
//!
//! - Sends are immediate (`MPI_Isend`) from a private copy of the data, so a call returns as soon
//!   as everything it must receive arrived ("buffered" semantics, as in the local transport); sends
//!   still in flight are completed by later calls or when the communicator is dropped (dropping
//!   waits up to one timeout for them, unless a failure is known; what is left is leaked, not freed
//!   under MPI's feet).
//! - Receives poll `MPI_Improbe` per awaited source and receive a matched message with `MPI_Mrecv`.
//!   The size of each message comes with it, so all-to-all-v needs no separate size exchange, and no
//!   receive request is ever left pending when a wait gives up.
//! - Every poll loop has a deadline ([`Communicator::timeout`]): a dead or stuck peer becomes
//!   [`CommError::Timeout`] rather than a hang. After a timeout the communicator is unusable (its
//!   message streams are out of step); end the run.
//! - Messages longer than [`MpiComm::max_message_bytes`] (default 1 GiB, MPI counts are `int`) travel
//!   in pieces; a piece shorter than the limit (possibly empty) ends a message. All ranks must use
//!   the same limit.
//!
//! # Failures and `abort`
//!
//! [`Communicator::abort`] does **not** call `MPI_Abort`: it prints the reason to stderr, marks
//! this rank failed and sends a failure notice (on a dedicated duplicate of the world communicator)
//! to every other rank; a peer that is waiting in any call of any communicator, now or later, returns
//! [`CommError::PeerFailed`] with the reason. The caller must then end the process with a non-zero
//! status (for example `std::process::exit(1)`), which makes `mpirun` end the job. To end the whole
//! job at once instead, call [`MpiComm::abort_job`] (that is `MPI_Abort`).
//!
//! Thread safety: MPI is initialised with `MPI_THREAD_MULTIPLE` where offered (at least
//! `MPI_THREAD_SERIALIZED` is required) and every MPI call made here holds one process-wide lock,
//! so a communicator may be shared between threads.
//!
//! Caveats: [`Communicator::split`] checks with a timed all-gather that every rank arrived before
//! it calls the blocking `MPI_Comm_split`; a rank that times out in that all-gather while the
//! others already passed it leaves them blocked in `MPI_Comm_split`. A matched message is received
//! with a blocking `MPI_Mrecv` (the sender is known to be sending it). MPI errors use the library's
//! default handler (`MPI_ERRORS_ARE_FATAL`), so [`CommError::Transport`] only reports set-up
//! problems.

use std::borrow::Cow;
use std::os::raw::c_int;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mpi::Threading;
use mpi::attribute::{AttributeKey, CommAttribute};
use mpi::environment::Universe;
use mpi::point_to_point::{Destination as _, MatchedReceiveVec as _, Source as _};
use mpi::request::{Request, StaticScope};
use mpi::topology::{AnyCommunicator as _, Color, Communicator as _, Rank, SimpleCommunicator};

use super::local::algo::{self, Exchange, Op};
use super::local::{deadline_after, timeout_ms};
use super::{CommError, CommResult, Communicator};

/// Default [`MpiComm::max_message_bytes`]: 1 GiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1 << 30;

/// Tag of failure notices on the notice communicator.
const NOTICE_TAG: c_int = 1;

/// Longest failure reason sent to peers, in bytes.
const MAX_REASON_BYTES: usize = 4096;

/// Serialises every MPI call made by this module.
static MPI_LOCK: Mutex<()> = Mutex::new(());

fn mpi_lock() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Spins briefly, then sleeps between polls.
fn backoff(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    if *polls < 1000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The predefined attribute `MPI_TAG_UB` (the largest valid tag).
#[repr(C)]
#[derive(Clone)]
struct TagUb(c_int);

impl CommAttribute for TagUb {
    fn get_key() -> AttributeKey {
        // SAFETY: MPI_TAG_UB is the predefined key of a system attribute whose value is an `int`,
        // which `TagUb` (repr(C) around a c_int) reads.
        unsafe { AttributeKey::new_unchecked(mpi::ffi::MPI_TAG_UB as i32) }
    }
}

/// One message being sent: a private copy of the bytes and the requests of its pieces.
struct OutMsg {
    /// From `Box::into_raw`; freed in `Drop` once no request reads it any more.
    buf: *mut [u8],
    reqs: Vec<Request<'static, [u8], StaticScope>>,
}

impl OutMsg {
    /// Posts immediate sends of `data` to `dst` in pieces of at most `piece` bytes; a piece shorter
    /// than `piece` (possibly empty) ends the message. Call with the MPI lock held; `dst` must be a
    /// rank of `comm` and `piece` must be in `1..=i32::MAX` unless `data` is shorter than it.
    fn post(comm: &SimpleCommunicator, dst: usize, tag: c_int, data: Vec<u8>, piece: usize) -> OutMsg {
        let buf: *mut [u8] = Box::into_raw(data.into_boxed_slice());
        // SAFETY: `buf` comes from `Box::into_raw`; it stays allocated and unwritten until `Drop`,
        // which frees it only when every request reading it has completed (and leaks it otherwise).
        let bytes: &'static [u8] = unsafe { &*buf };
        let process = comm.process_at_rank(dst as Rank);
        let mut reqs = Vec::with_capacity(1);
        let mut offset = 0usize;
        loop {
            let end = offset.saturating_add(piece).min(bytes.len());
            reqs.push(process.immediate_send_with_tag(StaticScope, &bytes[offset..end], tag));
            if end - offset < piece {
                break;
            }
            offset = end;
        }
        OutMsg { buf, reqs }
    }

    /// Tests the pieces still in flight; true once all completed. Call with the MPI lock held.
    fn progress(&mut self) -> bool {
        let mut still = Vec::new();
        for req in self.reqs.drain(..) {
            if let Err(req) = req.test() {
                still.push(req);
            }
        }
        self.reqs = still;
        self.reqs.is_empty()
    }
}

impl Drop for OutMsg {
    fn drop(&mut self) {
        if self.reqs.is_empty() {
            // SAFETY: no request reads the buffer any more, and `buf` came from `Box::into_raw`.
            drop(unsafe { Box::from_raw(self.buf) });
        } else {
            // MPI may still read the buffer: leak it with its requests. This happens only after a
            // timeout or a failure, when the run is ending.
            for req in self.reqs.drain(..) {
                std::mem::forget(req);
            }
        }
    }
}

/// Receives every piece of `src`'s current message on `comm` that has arrived; true once the
/// message is complete (in `acc`). Call with the MPI lock held; `src` must be a rank of `comm`.
fn poll_message(comm: &SimpleCommunicator, src: usize, tag: c_int, piece: usize, acc: &mut Option<Vec<u8>>) -> bool {
    while let Some(matched) = comm.process_at_rank(src as Rank).immediate_matched_probe_with_tag(tag) {
        let (part, _status) = matched.matched_receive_vec::<u8>();
        let last = part.len() < piece;
        match acc {
            Some(a) => a.extend_from_slice(&part),
            None => *acc = Some(part),
        }
        if last {
            return true;
        }
    }
    false
}

/// State shared by every communicator of the process.
struct Shared {
    /// Duplicate of the world communicator that carries failure notices.
    notice: Option<SimpleCommunicator>,
    /// Dropped last: `MPI_Finalize`.
    universe: Option<Universe>,
    world_rank: usize,
    world_size: usize,
    tag_ub: u32,
    /// The first failure this process learnt of: (world rank, reason).
    failed: Mutex<Option<(usize, String)>>,
}

// SAFETY: the MPI handles inside are process-wide values, not tied to a thread; they are used and
// freed only while holding the process-wide `MPI_LOCK` (MPI runs at MPI_THREAD_SERIALIZED or above).
unsafe impl Send for Shared {}
// SAFETY: as for `Send`; the only other state is behind a mutex.
unsafe impl Sync for Shared {}

impl Drop for Shared {
    fn drop(&mut self) {
        let _guard = mpi_lock();
        drop(self.notice.take());
        drop(self.universe.take());
    }
}

/// Initialises MPI (once per process) and returns the world communicator, whose blocking calls
/// wait at most `timeout`. Fails with [`CommError::Invalid`] if MPI was already initialised and with
/// [`CommError::Transport`] if the library does not offer at least `MPI_THREAD_SERIALIZED`.
pub fn init(timeout: Duration) -> CommResult<MpiComm> {
    let _guard = mpi_lock();
    let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Multiple) else {
        return Err(CommError::Invalid {
            rank: 0,
            op: "mpi init",
            reason: "MPI is already initialised in this process; call comm::mpi::init once and split the \
                     communicator it returns"
                .to_string(),
        });
    };
    if threading < Threading::Serialized {
        return Err(CommError::Transport {
            rank: 0,
            op: "mpi init",
            reason: format!("the MPI library offers thread level {threading:?}; Serialized or Multiple is needed"),
        });
    }
    let world = universe.world();
    let (world_rank, world_size) = (world.rank() as usize, world.size() as usize);
    let tag_ub = world.get_attr::<TagUb>().map_or(32767, |t| u32::try_from(t.0).unwrap_or(32767));
    let notice = world.duplicate();
    let user = world.duplicate();
    let coll = world.duplicate();
    let shared = Arc::new(Shared {
        notice: Some(notice),
        universe: Some(universe),
        world_rank,
        world_size,
        tag_ub,
        failed: Mutex::new(None),
    });
    Ok(MpiComm {
        user: Some(user),
        coll: Some(coll),
        rank: world_rank,
        size: world_size,
        world_ranks: (0..world_size).collect(),
        timeout,
        max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        pending: Mutex::new(Vec::new()),
        shared,
    })
}

/// A group of MPI processes (the world from [`init`], or a sub-group from [`Communicator::split`]).
pub struct MpiComm {
    /// For user point-to-point messages (`None` only while dropping).
    user: Option<SimpleCommunicator>,
    /// For the collectives (`None` only while dropping).
    coll: Option<SimpleCommunicator>,
    rank: usize,
    size: usize,
    /// Group rank -> world rank.
    world_ranks: Vec<usize>,
    timeout: Duration,
    max_message_bytes: usize,
    /// Sends still in flight after the call that posted them returned.
    pending: Mutex<Vec<OutMsg>>,
    shared: Arc<Shared>,
}

// SAFETY: the MPI handles inside are process-wide values, not tied to the thread that made them.
// MPI was initialised with at least MPI_THREAD_SERIALIZED, and every MPI call made through this type
// (including freeing its communicators) holds the process-wide `MPI_LOCK`, so MPI is never entered
// concurrently through it. The raw buffers of sends in flight are owned by this value and only
// touched under the `pending` mutex (and the MPI lock).
unsafe impl Send for MpiComm {}
// SAFETY: as for `Send`: all shared access goes through `MPI_LOCK` and the `pending` mutex.
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("world_rank", &self.world_rank())
            .field("timeout", &self.timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .finish()
    }
}

impl MpiComm {
    /// This process's rank in the MPI world.
    pub fn world_rank(&self) -> usize {
        self.shared.world_rank
    }

    /// The largest user tag [`Communicator::send`] accepts (the library's `MPI_TAG_UB`).
    pub fn max_tag(&self) -> u32 {
        self.shared.tag_ub
    }

    /// Changes how long blocking calls wait (sub-groups split later inherit it).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The largest piece one MPI message carries; longer payloads travel in several pieces.
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// Sets [`MpiComm::max_message_bytes`] (`1..=i32::MAX`; the same value on every rank of the
    /// group, set while no message is in flight; sub-groups split later inherit it).
    pub fn set_max_message_bytes(&mut self, bytes: usize) -> CommResult<()> {
        if bytes == 0 || bytes > i32::MAX as usize {
            return Err(self.invalid("set_max_message_bytes", format!("{bytes} is not in 1..={}", i32::MAX)));
        }
        self.max_message_bytes = bytes;
        Ok(())
    }

    /// Ends the whole MPI job now with `code` (`MPI_Abort` on the world communicator), after
    /// printing `reason` to stderr.
    pub fn abort_job(&self, code: i32, reason: &str) -> ! {
        eprintln!("switchyard mpi: world rank {}: aborting the job: {reason}", self.world_rank());
        let _guard = mpi_lock();
        SimpleCommunicator::world().abort(code)
    }

    /// As [`Communicator::split`], but returns the concrete type.
    pub fn split_mpi(&self, color: usize, key: usize) -> CommResult<MpiComm> {
        let (members, pos) = algo::split_members(self, color, key)?;
        // Any value shared by the group and unique to it will do: its lowest parent rank.
        let mpi_color = members.iter().copied().min().unwrap_or(self.rank);
        let (Ok(mpi_color), Ok(mpi_key)) = (c_int::try_from(mpi_color), c_int::try_from(pos)) else {
            return Err(self.invalid("split", "the group is too large for MPI".to_string()));
        };
        let coll = self.comm("split", &self.coll)?;
        let _guard = mpi_lock();
        let Some(new) = coll.split_by_color_with_key(Color::with_value(mpi_color), mpi_key) else {
            return Err(self.transport("split", "MPI_Comm_split returned no communicator".to_string()));
        };
        if new.rank() as usize != pos || new.size() as usize != members.len() {
            return Err(self.transport(
                "split",
                format!(
                    "MPI_Comm_split gave rank {} of {}, expected {pos} of {}",
                    new.rank(),
                    new.size(),
                    members.len()
                ),
            ));
        }
        let user = new.duplicate();
        Ok(MpiComm {
            user: Some(user),
            coll: Some(new),
            rank: pos,
            size: members.len(),
            world_ranks: members.iter().map(|&r| self.world_ranks[r]).collect(),
            timeout: self.timeout,
            max_message_bytes: self.max_message_bytes,
            pending: Mutex::new(Vec::new()),
            shared: Arc::clone(&self.shared),
        })
    }

    fn invalid(&self, op: &'static str, reason: String) -> CommError {
        CommError::Invalid { rank: self.rank, op, reason }
    }

    fn transport(&self, op: &'static str, reason: String) -> CommError {
        CommError::Transport { rank: self.rank, op, reason }
    }

    fn timeout_error(&self, op: &'static str, peer: usize) -> CommError {
        CommError::Timeout { rank: self.rank, peer, op, timeout_ms: timeout_ms(self.timeout) }
    }

    fn comm<'a>(&self, op: &'static str, c: &'a Option<SimpleCommunicator>) -> CommResult<&'a SimpleCommunicator> {
        c.as_ref().ok_or_else(|| self.transport(op, "the communicator was already freed".to_string()))
    }

    fn check_rank(&self, op: &'static str, what: &str, r: usize) -> CommResult<()> {
        if r < self.size {
            Ok(())
        } else {
            Err(self.invalid(op, format!("{what} rank {r} is out of range (the group has {} ranks)", self.size)))
        }
    }

    fn user_tag(&self, op: &'static str, tag: u32) -> CommResult<c_int> {
        match c_int::try_from(tag) {
            Ok(t) if tag <= self.shared.tag_ub => Ok(t),
            _ => Err(self.invalid(op, format!("tag {tag} is above the MPI library's limit {}", self.shared.tag_ub))),
        }
    }

    /// A `PeerFailed` for world rank `world_peer`, numbered within this group when it belongs to it.
    fn peer_failed(&self, op: &'static str, world_peer: usize, reason: &str) -> CommError {
        match self.world_ranks.iter().position(|&w| w == world_peer) {
            Some(peer) => CommError::PeerFailed { rank: self.rank, peer, op, reason: reason.to_string() },
            None => CommError::PeerFailed {
                rank: self.rank,
                peer: world_peer,
                op,
                reason: format!("(world rank {world_peer}, outside this group) {reason}"),
            },
        }
    }

    /// Fails if a failure is known or a failure notice arrived. Call with the MPI lock held.
    fn check_health(&self, op: &'static str) -> CommResult<()> {
        if let Some((w, reason)) = lock(&self.shared.failed).clone() {
            return Err(self.peer_failed(op, w, &reason));
        }
        let Some(notice) = self.shared.notice.as_ref() else {
            return Ok(());
        };
        if let Some(matched) = notice.any_process().immediate_matched_probe_with_tag(NOTICE_TAG) {
            let (bytes, status) = matched.matched_receive_vec::<u8>();
            let from = usize::try_from(status.source_rank()).unwrap_or(usize::MAX);
            let reason = String::from_utf8_lossy(&bytes).into_owned();
            let (w, reason) = lock(&self.shared.failed).get_or_insert((from, reason)).clone();
            return Err(self.peer_failed(op, w, &reason));
        }
        Ok(())
    }

    /// Tests the sends still in flight, freeing the finished ones. Call with the MPI lock held.
    fn progress_pending(&self) {
        lock(&self.pending).retain_mut(|m| !m.progress());
    }

    /// Polls until `poll` reports every awaited message complete (`None`) or the deadline passes
    /// (`Some(peer)` names the peer still awaited). `poll` runs with the MPI lock held. Messages
    /// that arrived are taken before failures are checked, so a call whose messages are all there
    /// succeeds even if a peer failed afterwards.
    fn wait_for(&self, op: &'static str, mut poll: impl FnMut() -> Option<usize>) -> CommResult<()> {
        let deadline = deadline_after(self.timeout);
        let mut polls = 0u32;
        loop {
            let waiting_on = {
                let _guard = mpi_lock();
                let w = poll();
                self.progress_pending();
                if w.is_some() {
                    self.check_health(op)?;
                }
                w
            };
            let Some(peer) = waiting_on else {
                return Ok(());
            };
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(self.timeout_error(op, peer));
            }
            backoff(&mut polls);
        }
    }
}

impl Exchange for MpiComm {
    fn exchange(&self, op: Op, sends: Vec<(usize, Cow<'_, [u8]>)>, recvs: &[usize]) -> CommResult<Vec<Vec<u8>>> {
        let name = op.name();
        let tag = op.tag() as c_int;
        for &(dst, _) in &sends {
            self.check_rank(name, "destination", dst)?;
        }
        for &src in recvs {
            self.check_rank(name, "source", src)?;
        }
        let coll = self.comm(name, &self.coll)?;
        let mut outs = Vec::with_capacity(sends.len());
        {
            let _guard = mpi_lock();
            self.check_health(name)?;
            for (dst, data) in sends {
                outs.push(OutMsg::post(coll, dst, tag, data.into_owned(), self.max_message_bytes));
            }
        }
        let mut got: Vec<Option<Vec<u8>>> = vec![None; recvs.len()];
        let mut done = vec![false; recvs.len()];
        let result = self.wait_for(name, || {
            outs.retain_mut(|m| !m.progress());
            for (i, &src) in recvs.iter().enumerate() {
                if !done[i] {
                    done[i] = poll_message(coll, src, tag, self.max_message_bytes, &mut got[i]);
                }
            }
            done.iter().position(|d| !d).map(|i| recvs[i])
        });
        // Sends still in flight finish later (or when this communicator is dropped).
        lock(&self.pending).append(&mut outs);
        result?;
        Ok(got.into_iter().map(Option::unwrap_or_default).collect())
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn transport(&self) -> &'static str {
        "mpi"
    }

    fn send(&self, dst: usize, tag: u32, data: &[u8]) -> CommResult<()> {
        self.check_rank("send", "destination", dst)?;
        let tag = self.user_tag("send", tag)?;
        let user = self.comm("send", &self.user)?;
        let _guard = mpi_lock();
        self.check_health("send")?;
        let mut msg = OutMsg::post(user, dst, tag, data.to_vec(), self.max_message_bytes);
        if !msg.progress() {
            lock(&self.pending).push(msg);
        }
        self.progress_pending();
        Ok(())
    }

    fn recv(&self, src: usize, tag: u32) -> CommResult<Vec<u8>> {
        self.check_rank("recv", "source", src)?;
        let tag = self.user_tag("recv", tag)?;
        let user = self.comm("recv", &self.user)?;
        let mut got = None;
        self.wait_for("recv", || {
            let done = poll_message(user, src, tag, self.max_message_bytes, &mut got);
            (!done).then_some(src)
        })?;
        Ok(got.unwrap_or_default())
    }

    fn all_to_all_v(&self, send: &[&[u8]]) -> CommResult<Vec<Vec<u8>>> {
        algo::all_to_all_v(self, send)
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
        Ok(Box::new(self.split_mpi(color, key)?))
    }

    fn abort(&self, reason: &str) {
        let world_rank = self.world_rank();
        eprintln!("switchyard mpi: world rank {world_rank}: abort: {reason}");
        let mut text = format!("aborted: {reason}");
        if text.len() > MAX_REASON_BYTES {
            let mut cut = MAX_REASON_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        lock(&self.shared.failed).get_or_insert((world_rank, text.clone()));
        let Some(notice) = self.shared.notice.as_ref() else {
            return;
        };
        let _guard = mpi_lock();
        for peer in (0..self.shared.world_size).filter(|&p| p != world_rank) {
            let mut msg = OutMsg::post(notice, peer, NOTICE_TAG, text.as_bytes().to_vec(), usize::MAX);
            if !msg.progress() {
                lock(&self.pending).push(msg);
            }
        }
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        // Give sends in flight up to one timeout to finish (unless the run is failing anyway).
        let deadline = deadline_after(self.timeout);
        let mut polls = 0u32;
        loop {
            let finished = {
                let _guard = mpi_lock();
                self.progress_pending();
                lock(&self.pending).is_empty()
            };
            let failing = lock(&self.shared.failed).is_some();
            if finished || failing || deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
            backoff(&mut polls);
        }
        // What is still in flight is leaked (MPI may still read it), see `OutMsg::drop`.
        lock(&self.pending).clear();
        let _guard = mpi_lock();
        drop(self.user.take());
        drop(self.coll.take());
    }
}
