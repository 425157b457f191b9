//! NCCL communicator (feature `cuda`, on by default): one process (or thread) per GPU, the collectives on
//! NVIDIA's library through libnccl loaded at run time.
//!
//! | file | job |
//! | --- | --- |
//! | `mod.rs` | [`NcclComm`]: the [`Communicator`] over NCCL, and device-buffer collectives for the GPU path |
//! | [`library`] | finding libnccl ([`NCCL_LIB_ENV`]), resolving its functions before any call, [`probe`] |
//! | [`framing`] | the header that carries tags and lengths, the plans of variable-size exchanges (pure) |
//! | [`bootstrap`] | the NCCL unique id to every rank: in-process, file rendezvous, MPI; the GPU of a rank |
//!
//! # How it works
//!
//! - Every communicator holds two NCCL communicators on one CUDA stream of its GPU: one for user
//!   point-to-point messages, one for the collectives, so the two never match each other's messages.
//! - Both are **non-blocking** NCCL communicators: every NCCL call returns at once; the call then polls
//!   `ncclCommGetAsyncError` and the completion of the stream until [`Communicator::timeout`]. When the time
//!   is up the NCCL communicators are aborted (`ncclCommAbort`) and the call returns [`CommError::Timeout`]:
//!   no call can hang. NCCL does not say which rank is late in a collective; the `peer` of a collective's
//!   timeout is then this rank's successor `(rank + 1) % size`. After a timeout or a transport error the
//!   communicator is unusable (every later call fails); end the run.
//! - Host payloads (`&[u8]`) are staged through device buffers on the stream: uploaded, exchanged, downloaded.
//! - [`Communicator::all_to_all_v`]: an NCCL all-gather of the `n x n` size matrix (`u64`), then one group of
//!   `ncclSend` / `ncclRecv` (NCCL has no all-to-all-v). [`Communicator::all_gather`] of variable sizes:
//!   all-gather of the sizes, then `ncclAllGather` when they are equal, grouped send/receive otherwise.
//!   [`Communicator::broadcast`]: the root's length, then the bytes (`ncclBroadcast`).
//! - [`Communicator::all_reduce_sum_f32`] / `_f64` are **rank-ordered**, as the trait promises: they run
//!   the very algorithm of the local and MPI communicators (a reduce-scatter whose chunks are summed on the
//!   host in rank order 0, 1, ..., n-1, then an all-gather) over NCCL point-to-point exchanges, so every rank
//!   gets the same bits as with the other transports. NCCL's own all-reduce (ring or tree order, faster, not
//!   rank-ordered: the bits can differ with the world size and the algorithm NCCL picks) is offered apart:
//!   [`NcclComm::all_reduce_sum_f32_unordered`], [`NcclComm::all_reduce_sum_device`].
//! - [`Communicator::send`] / [`Communicator::recv`]: NCCL has no tags, so every message is a 16-byte header
//!   (tag, length; [`framing::Header`]) and then the payload. A receive takes the next message from its
//!   source; one with another tag is kept for a later receive, so messages are matched by (source, tag) in
//!   the order they were sent, per peer. **Unlike the local and MPI transports, a send is synchronous**: it
//!   returns once the receiver has taken the message (NCCL sends wait for the matching receive), so two
//!   ranks that both send to each other before receiving time out instead of exchanging; use
//!   [`Communicator::all_to_all_v`] for exchanges. A send to this rank itself is kept on the host.
//! - [`Communicator::split`]: the members are agreed as in the other transports, then `ncclCommSplit`
//!   (both NCCL communicators), polled with the timeout.
//! - [`Communicator::abort`]: aborts the NCCL communicators of this rank (`ncclCommAbort`); later calls on
//!   it fail with [`CommError::PeerFailed`] naming this rank. NCCL cannot tell the peers: they fail at their
//!   timeout. Under MPI, end the job through MPI as well.
//!
//! The device methods ([`NcclComm::all_to_all_v_device`], [`NcclComm::all_reduce_sum_device`],
//! [`NcclComm::send_device`], [`NcclComm::recv_device`]) exchange `CudaSlice` buffers without staging, for
//! the GPU path and for measuring the links (`switchyard profile --device cuda`).

pub mod bootstrap;
pub mod framing;
pub mod library;

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_int, c_void};
use std::panic::catch_unwind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits};
use cudarc::nccl::sys::{ncclComm_t, ncclDataType_t, ncclRedOp_t};

pub use bootstrap::{NcclId, local_rank_from_env};
pub use library::{NCCL_LIB_ENV, NcclProbe, probe};

use self::framing::{HEADER_BYTES, Header, Layout};
use self::library::{NCCL_IN_PROGRESS, NCCL_SUCCESS, Nccl, nccl};
use super::local::algo::{self, Exchange, Op};
use super::local::{deadline_after, timeout_ms};
use super::{CommError, CommResult, Communicator};

/// Tags of the collectives' internal headers carry this bit (user tags never reach the collectives'
/// NCCL communicator, the bit only makes dumps readable).
const INTERNAL_TAG: u32 = 1 << 31;

/// Element types the device methods exchange.
pub trait NcclElement: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// NCCL's name of the type.
    fn nccl_type() -> ncclDataType_t;
}

impl NcclElement for u8 {
    fn nccl_type() -> ncclDataType_t {
        ncclDataType_t::ncclUint8
    }
}
impl NcclElement for u64 {
    fn nccl_type() -> ncclDataType_t {
        ncclDataType_t::ncclUint64
    }
}
impl NcclElement for f32 {
    fn nccl_type() -> ncclDataType_t {
        ncclDataType_t::ncclFloat32
    }
}
impl NcclElement for f64 {
    fn nccl_type() -> ncclDataType_t {
        ncclDataType_t::ncclFloat64
    }
}

/// The raw handles of the two NCCL communicators (null once aborted or destroyed).
struct Handles {
    user: ncclComm_t,
    coll: ncclComm_t,
}

/// State behind the communicator's lock: every NCCL call on it is made with the lock held.
struct Io {
    handles: Handles,
    /// Messages received while waiting for another tag: per source, in arrival order.
    stash: HashMap<usize, VecDeque<(u32, Vec<u8>)>>,
    /// Why the communicator is unusable (a timeout, a transport error, an abort).
    broken: Option<CommError>,
}

/// A group of GPUs talking through NCCL (see the module documentation).
pub struct NcclComm {
    nccl: &'static Nccl,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    ordinal: usize,
    timeout: Duration,
    io: Mutex<Io>,
    /// Set by [`Communicator::abort`] (possibly from another thread while a call is in flight).
    abort_requested: AtomicBool,
    abort_reason: Mutex<Option<String>>,
}

// SAFETY: the NCCL handles are process-wide objects, not tied to a thread; every NCCL call made through
// this type holds the `io` lock, so a communicator is never entered concurrently (NCCL communicators are not
// thread-safe). The CUDA stream is cudarc's `Arc<CudaStream>` (Send + Sync).
unsafe impl Send for NcclComm {}
// SAFETY: as for `Send`: all access to the handles goes through the `io` mutex.
unsafe impl Sync for NcclComm {}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclComm")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("gpu", &self.ordinal)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn backoff(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    if *polls < 1000 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn to_int(rank: usize, op: &'static str, what: &str, v: usize) -> CommResult<c_int> {
    c_int::try_from(v).map_err(|_| CommError::Invalid {
        rank,
        op,
        reason: format!("{what} {v} does not fit NCCL's int"),
    })
}

/// `ptr + offset` as NCCL's pointer type.
fn at(ptr: u64, offset_bytes: usize) -> *mut c_void {
    (ptr as usize + offset_bytes) as *mut c_void
}

impl NcclComm {
    /// Joins the NCCL group `id` as `rank` of `size` on CUDA device `ordinal` (every rank must call it with
    /// the same id and size, each with its own rank). Checks the driver, the device and libnccl first (an
    /// error with the fix, never a panic), then creates the context's stream and the NCCL communicators,
    /// waiting at most `timeout` for the others.
    pub fn init(ordinal: usize, rank: usize, size: usize, id: &NcclId, timeout: Duration) -> CommResult<NcclComm> {
        let op = "nccl init";
        let transport = |reason: String| CommError::Transport { rank, op, reason };
        if size == 0 || rank >= size {
            return Err(CommError::Invalid { rank, op, reason: format!("rank {rank} of a group of {size}") });
        }
        let nccl = nccl().map_err(|e| transport(format!("libnccl is not usable: {e}; fix: {}", library::NCCL_FIX)))?;
        let devices = switchyard_kernels::cuda::probe();
        if !devices.driver_found || ordinal >= devices.device_count() {
            return Err(transport(format!(
                "CUDA device {ordinal} is not usable ({}); fix: one rank per GPU, ranks numbered from 0 on each node",
                devices.summary()
            )));
        }
        let stream = catch_unwind(|| -> Result<Arc<CudaStream>, String> {
            let ctx = CudaContext::new(ordinal).map_err(|e| format!("creating the CUDA context: {e:?}"))?;
            ctx.new_stream().map_err(|e| format!("creating a stream: {e:?}"))
        })
        .map_err(|_| transport("cudarc panicked opening the device (a CUDA library lacks a symbol?)".into()))?
        .map_err(transport)?;
        let n = to_int(rank, op, "world size", size)?;
        let r = to_int(rank, op, "rank", rank)?;
        let deadline = deadline_after(timeout);
        let comm = NcclComm {
            nccl,
            stream,
            rank,
            size,
            ordinal,
            timeout,
            io: Mutex::new(Io {
                handles: Handles { user: std::ptr::null_mut(), coll: std::ptr::null_mut() },
                stash: HashMap::new(),
                broken: None,
            }),
            abort_requested: AtomicBool::new(false),
            abort_reason: Mutex::new(None),
        };
        {
            let mut io = lock(&comm.io);
            comm.bind(op)?;
            let mut config = Nccl::nonblocking_config();
            let mut coll: ncclComm_t = std::ptr::null_mut();
            // SAFETY: `coll` and `config` are valid for writes/reads; `id` is the group's 128-byte id.
            let code = unsafe { (nccl.fns.comm_init_rank_config)(&mut coll, n, id.raw(), r, &mut config) };
            io.handles.coll = coll;
            comm.check_code(&mut io, op, code, coll)?;
            comm.wait_ready(&mut io, op, &[coll], deadline, (rank + 1) % size)?;
            // The user communicator: a copy of the group (same color, same order).
            let user = comm.split_raw(&mut io, op, coll, 0, r, deadline)?;
            io.handles.user = user;
        }
        Ok(comm)
    }

    /// The CUDA device of this rank.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The stream every operation of this communicator runs on. Device buffers passed to the device methods
    /// should be written on it (or synchronised with it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Changes how long blocking calls wait (sub-groups split later inherit it).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The loaded NCCL's version, `(major, minor, patch)`.
    pub fn nccl_version(&self) -> (i32, i32, i32) {
        self.nccl.version
    }

    fn transport_err(&self, op: &'static str, reason: String) -> CommError {
        CommError::Transport { rank: self.rank, op, reason }
    }

    fn invalid(&self, op: &'static str, reason: String) -> CommError {
        CommError::Invalid { rank: self.rank, op, reason }
    }

    fn check_rank(&self, op: &'static str, what: &str, r: usize) -> CommResult<()> {
        if r < self.size {
            Ok(())
        } else {
            Err(self.invalid(op, format!("{what} rank {r} is out of range (the group has {} ranks)", self.size)))
        }
    }

    /// Makes the device's context current on this thread (NCCL and cudarc use the current device).
    fn bind(&self, op: &'static str) -> CommResult<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.transport_err(op, format!("binding the CUDA context: {e:?}")))
    }

    /// Aborts both NCCL communicators (once) and records why the communicator is unusable.
    fn fail(&self, io: &mut Io, err: CommError) -> CommError {
        for h in [&mut io.handles.user, &mut io.handles.coll] {
            if !h.is_null() {
                // SAFETY: a live communicator of this object, aborted once and then forgotten.
                unsafe { (self.nccl.fns.comm_abort)(*h) };
                *h = std::ptr::null_mut();
            }
        }
        io.broken.get_or_insert_with(|| err.clone());
        err
    }

    /// Fails when the communicator is unusable or an abort was requested.
    fn check_usable(&self, io: &mut Io, op: &'static str) -> CommResult<()> {
        if self.abort_requested.load(Ordering::Acquire) && io.broken.is_none() {
            let reason = lock(&self.abort_reason).clone().unwrap_or_default();
            let e = CommError::PeerFailed { rank: self.rank, peer: self.rank, op, reason };
            self.fail(io, e);
        }
        match &io.broken {
            Some(CommError::PeerFailed { peer, reason, .. }) => {
                Err(CommError::PeerFailed { rank: self.rank, peer: *peer, op, reason: reason.clone() })
            }
            Some(e) => {
                Err(self.transport_err(op, format!("the communicator is unusable after an earlier failure: {e}")))
            }
            None => Ok(()),
        }
    }

    /// Maps an NCCL result: success and in-progress pass, anything else aborts the communicator.
    fn check_code(&self, io: &mut Io, op: &'static str, code: c_int, comm: ncclComm_t) -> CommResult<()> {
        if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
            return Ok(());
        }
        let detail = self.nccl.describe(code, (!comm.is_null()).then_some(comm));
        Err(self.fail(io, self.transport_err(op, detail)))
    }

    fn timeout_error(&self, io: &mut Io, op: &'static str, peer: usize) -> CommError {
        let e = CommError::Timeout { rank: self.rank, peer, op, timeout_ms: timeout_ms(self.timeout) };
        self.fail(io, e)
    }

    /// Polls `ncclCommGetAsyncError` of `comms` until none is in progress (an error or the deadline aborts).
    fn wait_ready(
        &self,
        io: &mut Io,
        op: &'static str,
        comms: &[ncclComm_t],
        deadline: Option<Instant>,
        peer: usize,
    ) -> CommResult<()> {
        let mut polls = 0u32;
        loop {
            let mut pending = false;
            for &c in comms {
                let mut state: c_int = NCCL_SUCCESS;
                // SAFETY: `c` is a live communicator of this object; `state` is a valid out-pointer.
                let code = unsafe { (self.nccl.fns.comm_get_async_error)(c, &mut state) };
                self.check_code(io, op, code, c)?;
                if state == NCCL_IN_PROGRESS {
                    pending = true;
                } else {
                    self.check_code(io, op, state, c)?;
                }
            }
            if !pending {
                return Ok(());
            }
            self.check_usable(io, op)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(self.timeout_error(io, op, peer));
            }
            backoff(&mut polls);
        }
    }

    /// Runs one group of NCCL calls: `enqueue` issues them (between `ncclGroupStart` and `ncclGroupEnd`,
    /// on `comm`, this object's stream), then waits until NCCL queued them and the stream finished them, or
    /// the deadline passes (abort, [`CommError::Timeout`] naming `peer`).
    fn run_group(
        &self,
        io: &mut Io,
        op: &'static str,
        comm: ncclComm_t,
        deadline: Option<Instant>,
        peer: usize,
        enqueue: impl FnOnce(&library::Fns, *mut c_void) -> c_int,
    ) -> CommResult<()> {
        self.check_usable(io, op)?;
        if comm.is_null() {
            return Err(self.transport_err(op, "the NCCL communicator was already freed".into()));
        }
        self.bind(op)?;
        let fns = &self.nccl.fns;
        let stream = self.stream.cu_stream() as *mut c_void;
        // SAFETY: group calls take no arguments; every call made by `enqueue` is on live buffers that the
        // caller keeps alive until this function returns (it waits for the stream below).
        let start = unsafe { (fns.group_start)() };
        self.check_code(io, op, start, comm)?;
        let issued = enqueue(fns, stream);
        // SAFETY: closes the group opened above (also after a failed call, as NCCL requires).
        let end = unsafe { (fns.group_end)() };
        self.check_code(io, op, issued, comm)?;
        self.check_code(io, op, end, comm)?;
        self.wait_ready(io, op, &[comm], deadline, peer)?;
        let event = self
            .stream
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| self.fail(io, self.transport_err(op, format!("recording a CUDA event: {e:?}"))))?;
        let mut polls = 0u32;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(io, self.transport_err(op, format!("CUDA error while waiting: {e:?}")))),
            }
            // Errors NCCL found while the kernels run (a peer's network failure, ...).
            let mut state: c_int = NCCL_SUCCESS;
            // SAFETY: as in `wait_ready`.
            let code = unsafe { (fns.comm_get_async_error)(comm, &mut state) };
            self.check_code(io, op, code, comm)?;
            if state != NCCL_IN_PROGRESS {
                self.check_code(io, op, state, comm)?;
            }
            self.check_usable(io, op)?;
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(self.timeout_error(io, op, peer));
            }
            backoff(&mut polls);
        }
    }

    /// `ncclCommSplit` of `parent`, polled to completion.
    fn split_raw(
        &self,
        io: &mut Io,
        op: &'static str,
        parent: ncclComm_t,
        color: c_int,
        key: c_int,
        deadline: Option<Instant>,
    ) -> CommResult<ncclComm_t> {
        let mut config = Nccl::nonblocking_config();
        let mut child: ncclComm_t = std::ptr::null_mut();
        // SAFETY: `parent` is live; `child` and `config` are valid for writes/reads.
        let code = unsafe { (self.nccl.fns.comm_split)(parent, color, key, &mut child, &mut config) };
        self.check_code(io, op, code, parent)?;
        if child.is_null() {
            return Err(self.fail(io, self.transport_err(op, "ncclCommSplit returned no communicator".into())));
        }
        if let Err(e) = self.wait_ready(io, op, &[parent, child], deadline, (self.rank + 1) % self.size) {
            // SAFETY: the child was created above and is not used again.
            unsafe { (self.nccl.fns.comm_abort)(child) };
            return Err(e);
        }
        Ok(child)
    }

    fn upload<T: NcclElement>(&self, io: &mut Io, op: &'static str, host: &[T]) -> CommResult<CudaSlice<T>> {
        let r = if host.is_empty() { self.stream.alloc_zeros::<T>(1) } else { self.stream.clone_htod(host) };
        r.map_err(|e| self.fail(io, self.transport_err(op, format!("copying to the device: {e:?}"))))
    }

    fn zeros<T: NcclElement>(&self, io: &mut Io, op: &'static str, len: usize) -> CommResult<CudaSlice<T>> {
        self.stream.alloc_zeros::<T>(len.max(1)).map_err(|e| {
            self.fail(io, self.transport_err(op, format!("allocating {len} elements on the device: {e:?}")))
        })
    }

    /// The first `len` elements of `buf` (the NCCL work on it has completed).
    fn download<T: NcclElement>(
        &self,
        io: &mut Io,
        op: &'static str,
        buf: &CudaSlice<T>,
        len: usize,
    ) -> CommResult<Vec<T>> {
        let mut out = vec![T::default(); len];
        if len == 0 {
            return Ok(out);
        }
        let r = self.stream.memcpy_dtoh(&buf.slice(..len), &mut out).and_then(|()| self.stream.synchronize());
        r.map_err(|e| self.fail(io, self.transport_err(op, format!("copying to the host: {e:?}"))))?;
        Ok(out)
    }

    /// Every rank's `values` (`k` each), on the collectives' communicator.
    fn all_gather_u64(
        &self,
        io: &mut Io,
        op: &'static str,
        values: &[u64],
        deadline: Option<Instant>,
    ) -> CommResult<Vec<u64>> {
        let k = values.len();
        let send = self.upload(io, op, values)?;
        let mut recv = self.zeros::<u64>(io, op, k * self.size)?;
        let coll = io.handles.coll;
        {
            let (src, _r) = send.device_ptr(&self.stream);
            let (dst, _w) = recv.device_ptr_mut(&self.stream);
            self.run_group(io, op, coll, deadline, (self.rank + 1) % self.size, |f, s| {
                // SAFETY: `send` holds k values and `recv` k * size, both alive until the group completed.
                unsafe {
                    (f.all_gather)(src as *const c_void, dst as *mut c_void, k, ncclDataType_t::ncclUint64, coll, s)
                }
            })?;
        }
        self.download(io, op, &recv, k * self.size)
    }

    /// One group of sends and receives of bytes between device buffers on `comm`: `sends` are
    /// `(peer, offset, len)` into `src`, `recvs` into `dst`; empty parts are skipped.
    #[allow(clippy::too_many_arguments)]
    fn exchange_bytes(
        &self,
        io: &mut Io,
        op: &'static str,
        comm: ncclComm_t,
        src: &CudaSlice<u8>,
        sends: &[(usize, usize, usize)],
        dst: &mut CudaSlice<u8>,
        recvs: &[(usize, usize, usize)],
        deadline: Option<Instant>,
        peer: usize,
    ) -> CommResult<()> {
        let mut peers = Vec::with_capacity(sends.len() + recvs.len());
        for &(p, _, _) in sends.iter().chain(recvs) {
            peers.push(to_int(self.rank, op, "peer", p)?);
        }
        let (sp, _r) = src.device_ptr(&self.stream);
        let (dp, _w) = dst.device_ptr_mut(&self.stream);
        self.run_group(io, op, comm, deadline, peer, |f, s| {
            let u8t = ncclDataType_t::ncclUint8;
            let mut worst = NCCL_SUCCESS;
            for (&(_, off, len), &p) in sends.iter().zip(&peers) {
                if len > 0 {
                    // SAFETY: `off + len` lies inside `src` (the callers' layouts), alive until completion.
                    let c = unsafe { (f.send)(at(sp, off), len, u8t, p, comm, s) };
                    if c != NCCL_SUCCESS && c != NCCL_IN_PROGRESS {
                        return c;
                    }
                }
            }
            for (&(_, off, len), &p) in recvs.iter().zip(&peers[sends.len()..]) {
                if len > 0 {
                    // SAFETY: as above, inside `dst`.
                    let c = unsafe { (f.recv)(at(dp, off), len, u8t, p, comm, s) };
                    if c != NCCL_SUCCESS && c != NCCL_IN_PROGRESS {
                        worst = c;
                        break;
                    }
                }
            }
            worst
        })
    }

    /// The collectives' exchange ([`Exchange`]) with the lock held: headers (tag, length) first, then the
    /// payloads, each one NCCL group.
    fn exchange_locked(
        &self,
        io: &mut Io,
        op: Op,
        sends: &[(usize, Cow<'_, [u8]>)],
        recvs: &[usize],
    ) -> CommResult<Vec<Vec<u8>>> {
        let name = op.name();
        let deadline = deadline_after(self.timeout);
        let coll = io.handles.coll;
        let tag = INTERNAL_TAG | op.tag();
        let late = recvs.first().copied().unwrap_or((self.rank + 1) % self.size);
        // Round 1: headers.
        let mut hdr = Vec::with_capacity(sends.len() * HEADER_BYTES);
        for (_, data) in sends {
            hdr.extend_from_slice(&Header { tag, len_bytes: data.len() as u64 }.encode());
        }
        let hsend = self.upload(io, name, &hdr)?;
        let mut hrecv = self.zeros::<u8>(io, name, recvs.len() * HEADER_BYTES)?;
        let s: Vec<(usize, usize, usize)> =
            sends.iter().enumerate().map(|(i, (d, _))| (*d, i * HEADER_BYTES, HEADER_BYTES)).collect();
        let r: Vec<(usize, usize, usize)> =
            recvs.iter().enumerate().map(|(i, &src)| (src, i * HEADER_BYTES, HEADER_BYTES)).collect();
        self.exchange_bytes(io, name, coll, &hsend, &s, &mut hrecv, &r, deadline, late)?;
        let got = self.download(io, name, &hrecv, recvs.len() * HEADER_BYTES)?;
        let mut lens = Vec::with_capacity(recvs.len());
        for (i, &src) in recvs.iter().enumerate() {
            let h = Header::decode(&got[i * HEADER_BYTES..(i + 1) * HEADER_BYTES])
                .map_err(|e| self.fail(io, self.transport_err(name, format!("from rank {src}: {e}"))))?;
            if h.tag != tag {
                let e = self.invalid(
                    name,
                    format!("rank {src} is in another collective (tag {:#x}, this rank {tag:#x}): the ranks call collectives in different orders", h.tag),
                );
                return Err(self.fail(io, e));
            }
            let len = usize::try_from(h.len_bytes).map_err(|_| {
                self.fail(io, self.transport_err(name, format!("rank {src} announces {} bytes", h.len_bytes)))
            })?;
            lens.push(len);
        }
        // Round 2: payloads.
        let send_sizes: Vec<usize> = sends.iter().map(|(_, d)| d.len()).collect();
        let too_big = |what: &str| self.invalid(name, format!("the {what} of this exchange add up to more than usize"));
        let out_layout = Layout::packed(&send_sizes).ok_or_else(|| too_big("sends"))?;
        let in_layout = Layout::packed(&lens).ok_or_else(|| too_big("receives"))?;
        if out_layout.total == 0 && in_layout.total == 0 {
            return Ok(lens.iter().map(|_| Vec::new()).collect());
        }
        let mut packed = Vec::with_capacity(out_layout.total);
        for (_, d) in sends {
            packed.extend_from_slice(d);
        }
        let psend = self.upload(io, name, &packed)?;
        let mut precv = self.zeros::<u8>(io, name, in_layout.total)?;
        let s: Vec<(usize, usize, usize)> =
            sends.iter().enumerate().map(|(i, (d, _))| (*d, out_layout.offsets[i], out_layout.sizes[i])).collect();
        let r: Vec<(usize, usize, usize)> =
            recvs.iter().enumerate().map(|(i, &src)| (src, in_layout.offsets[i], in_layout.sizes[i])).collect();
        self.exchange_bytes(io, name, coll, &psend, &s, &mut precv, &r, deadline, late)?;
        let all = self.download(io, name, &precv, in_layout.total)?;
        Ok((0..recvs.len()).map(|i| all[in_layout.range(i)].to_vec()).collect())
    }

    /// Element-wise sum over ranks with NCCL's own all-reduce, staged through the device: faster than
    /// [`Communicator::all_reduce_sum_f32`] but **not rank-ordered** (NCCL's ring or tree order: the bits can
    /// differ from the other transports' and between world sizes). The lengths must be equal on all ranks.
    pub fn all_reduce_sum_f32_unordered(&self, data: &mut [f32]) -> CommResult<()> {
        let op = "all_reduce_sum_unordered";
        let mut io = lock(&self.io);
        let mut buf = self.upload(&mut io, op, data)?;
        drop(io);
        self.all_reduce_sum_device(&mut buf, data.len())?;
        let mut io = lock(&self.io);
        let got = self.download(&mut io, op, &buf, data.len())?;
        data.copy_from_slice(&got);
        Ok(())
    }

    /// NCCL's all-reduce (sum) in place on the first `len` elements of a device buffer: **not rank-ordered**
    /// (see [`NcclComm::all_reduce_sum_f32_unordered`]). Every rank must pass the same `len`.
    pub fn all_reduce_sum_device<T: NcclElement>(&self, buf: &mut CudaSlice<T>, len: usize) -> CommResult<()> {
        let op = "all_reduce_sum_device";
        if len > buf.len() {
            return Err(self.invalid(op, format!("{len} elements asked of a buffer of {}", buf.len())));
        }
        if len == 0 {
            return Ok(());
        }
        let mut io = lock(&self.io);
        let coll = io.handles.coll;
        let (p, _w) = buf.device_ptr_mut(&self.stream);
        self.run_group(&mut io, op, coll, deadline_after(self.timeout), (self.rank + 1) % self.size, |f, s| {
            // SAFETY: in place on `len <= buf.len()` elements, alive until completion.
            unsafe {
                (f.all_reduce)(p as *const c_void, p as *mut c_void, len, T::nccl_type(), ncclRedOp_t::ncclSum, coll, s)
            }
        })
    }

    /// All-to-all with per-peer counts on device buffers, without host staging: `send` holds, packed in rank
    /// order, `send_counts[j]` elements for rank `j` (this rank included). Exchanges the counts first (an
    /// all-gather), then one group of sends and receives. Returns the received elements, packed in source
    /// order, and how many came from each rank.
    pub fn all_to_all_v_device<T: NcclElement>(
        &self,
        send: &CudaSlice<T>,
        send_counts: &[usize],
    ) -> CommResult<(CudaSlice<T>, Vec<usize>)> {
        let op = "all_to_all_v_device";
        if send_counts.len() != self.size {
            return Err(self.invalid(op, format!("{} counts for a group of {} ranks", send_counts.len(), self.size)));
        }
        let total: usize = send_counts.iter().try_fold(0usize, |a, &c| a.checked_add(c)).unwrap_or(usize::MAX);
        if total > send.len() {
            return Err(self.invalid(op, format!("the counts add up to {total}, the send buffer holds {}", send.len())));
        }
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        let row: Vec<u64> = send_counts.iter().map(|&c| c as u64).collect();
        let matrix = self.all_gather_u64(&mut io, op, &row, deadline)?;
        let (out, inn) = framing::all_to_all_plan(self.rank, self.size, &matrix)
            .map_err(|e| self.fail(&mut io, self.invalid(op, e)))?;
        let mut recv = self.zeros::<T>(&mut io, op, inn.total)?;
        let coll = io.handles.coll;
        let peers: Vec<c_int> = (0..self.size).map(|j| j as c_int).collect();
        let elem = std::mem::size_of::<T>();
        {
            let (sp, _r) = send.device_ptr(&self.stream);
            let (dp, _w) = recv.device_ptr_mut(&self.stream);
            self.run_group(&mut io, op, coll, deadline, (self.rank + 1) % self.size, |f, s| {
                for (j, &peer) in peers.iter().enumerate() {
                    if out.sizes[j] > 0 {
                        // SAFETY: inside `send` (checked above), alive until completion.
                        let c = unsafe {
                            (f.send)(at(sp, out.offsets[j] * elem), out.sizes[j], T::nccl_type(), peer, coll, s)
                        };
                        if c != NCCL_SUCCESS && c != NCCL_IN_PROGRESS {
                            return c;
                        }
                    }
                    if inn.sizes[j] > 0 {
                        // SAFETY: inside `recv` (allocated to the plan's total).
                        let c = unsafe {
                            (f.recv)(at(dp, inn.offsets[j] * elem), inn.sizes[j], T::nccl_type(), peer, coll, s)
                        };
                        if c != NCCL_SUCCESS && c != NCCL_IN_PROGRESS {
                            return c;
                        }
                    }
                }
                NCCL_SUCCESS
            })?;
        }
        Ok((recv, inn.sizes))
    }

    /// Sends the first `len` elements of a device buffer to `dst`, untagged, on the point-to-point
    /// communicator; returns once `dst` received them with [`NcclComm::recv_device`] of the same `len`. Do not
    /// interleave with tagged [`Communicator::send`] to the same peer.
    pub fn send_device<T: NcclElement>(&self, dst: usize, buf: &CudaSlice<T>, len: usize) -> CommResult<()> {
        let op = "send_device";
        let Some(peer) = self.p2p_check(op, dst, len, buf.len())? else {
            return Ok(());
        };
        let mut io = lock(&self.io);
        let user = io.handles.user;
        let (p, _r) = buf.device_ptr(&self.stream);
        self.run_group(&mut io, op, user, deadline_after(self.timeout), dst, |f, s| {
            // SAFETY: `len <= buf.len()`, alive until completion.
            unsafe { (f.send)(p as *const c_void, len, T::nccl_type(), peer, user, s) }
        })
    }

    /// Receives `len` elements from `src` into the start of a device buffer (see [`NcclComm::send_device`]).
    pub fn recv_device<T: NcclElement>(&self, src: usize, buf: &mut CudaSlice<T>, len: usize) -> CommResult<()> {
        let op = "recv_device";
        let Some(peer) = self.p2p_check(op, src, len, buf.len())? else {
            return Ok(());
        };
        let mut io = lock(&self.io);
        let user = io.handles.user;
        let (p, _w) = buf.device_ptr_mut(&self.stream);
        self.run_group(&mut io, op, user, deadline_after(self.timeout), src, |f, s| {
            // SAFETY: `len <= buf.len()`, alive until completion.
            unsafe { (f.recv)(p as *mut c_void, len, T::nccl_type(), peer, user, s) }
        })
    }

    /// Checks a device point-to-point call: the peer as NCCL's int, `None` when there is nothing to move.
    fn p2p_check(&self, op: &'static str, peer: usize, len: usize, cap: usize) -> CommResult<Option<c_int>> {
        self.check_rank(op, "peer", peer)?;
        let p = to_int(self.rank, op, "peer", peer)?;
        if peer == self.rank {
            return Err(self.invalid(op, "a device send or receive to this rank itself".into()));
        }
        if len > cap {
            return Err(self.invalid(op, format!("{len} elements asked of a buffer of {cap}")));
        }
        Ok((len > 0).then_some(p))
    }

    /// As [`Communicator::split`], returning the concrete type.
    pub fn split_nccl(&self, color: usize, key: usize) -> CommResult<NcclComm> {
        let op = "split";
        let (members, pos) = algo::split_members(self, color, key)?;
        // A value shared by the group and unique to it: its lowest parent rank (as the MPI transport).
        let group_color = to_int(self.rank, op, "color", members.iter().copied().min().unwrap_or(self.rank))?;
        let group_key = to_int(self.rank, op, "key", pos)?;
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        self.check_usable(&mut io, op)?;
        self.bind(op)?;
        let (coll, user) = (io.handles.coll, io.handles.user);
        let new_coll = self.split_raw(&mut io, op, coll, group_color, group_key, deadline)?;
        let new_user = match self.split_raw(&mut io, op, user, group_color, group_key, deadline) {
            Ok(u) => u,
            Err(e) => {
                // SAFETY: created above, not used again.
                unsafe { (self.nccl.fns.comm_abort)(new_coll) };
                return Err(e);
            }
        };
        Ok(NcclComm {
            nccl: self.nccl,
            stream: Arc::clone(&self.stream),
            rank: pos,
            size: members.len(),
            ordinal: self.ordinal,
            timeout: self.timeout,
            io: Mutex::new(Io {
                handles: Handles { user: new_user, coll: new_coll },
                stash: HashMap::new(),
                broken: None,
            }),
            abort_requested: AtomicBool::new(false),
            abort_reason: Mutex::new(None),
        })
    }

    /// Receives one framed message (header, then payload) from `src` on the point-to-point communicator.
    fn recv_message(&self, io: &mut Io, src: usize, deadline: Option<Instant>) -> CommResult<(u32, Vec<u8>)> {
        let op = "recv";
        let user = io.handles.user;
        let hsend = self.zeros::<u8>(io, op, 1)?;
        let mut hrecv = self.zeros::<u8>(io, op, HEADER_BYTES)?;
        self.exchange_bytes(io, op, user, &hsend, &[], &mut hrecv, &[(src, 0, HEADER_BYTES)], deadline, src)?;
        let h = self.download(io, op, &hrecv, HEADER_BYTES)?;
        let h =
            Header::decode(&h).map_err(|e| self.fail(io, self.transport_err(op, format!("from rank {src}: {e}"))))?;
        let len = usize::try_from(h.len_bytes).map_err(|_| {
            self.fail(io, self.transport_err(op, format!("rank {src} announces {} bytes", h.len_bytes)))
        })?;
        if len == 0 {
            return Ok((h.tag, Vec::new()));
        }
        let mut precv = self.zeros::<u8>(io, op, len)?;
        self.exchange_bytes(io, op, user, &hsend, &[], &mut precv, &[(src, 0, len)], deadline, src)?;
        Ok((h.tag, self.download(io, op, &precv, len)?))
    }
}

impl Exchange for NcclComm {
    fn exchange(&self, op: Op, sends: Vec<(usize, Cow<'_, [u8]>)>, recvs: &[usize]) -> CommResult<Vec<Vec<u8>>> {
        let name = op.name();
        for &(dst, _) in &sends {
            self.check_rank(name, "destination", dst)?;
        }
        for &src in recvs {
            self.check_rank(name, "source", src)?;
        }
        let mut io = lock(&self.io);
        self.exchange_locked(&mut io, op, &sends, recvs)
    }
}

impl Communicator for NcclComm {
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
        "nccl"
    }

    fn send(&self, dst: usize, tag: u32, data: &[u8]) -> CommResult<()> {
        let op = "send";
        self.check_rank(op, "destination", dst)?;
        let mut io = lock(&self.io);
        self.check_usable(&mut io, op)?;
        if dst == self.rank {
            io.stash.entry(dst).or_default().push_back((tag, data.to_vec()));
            return Ok(());
        }
        let mut msg = Vec::with_capacity(HEADER_BYTES + data.len());
        msg.extend_from_slice(&Header { tag, len_bytes: data.len() as u64 }.encode());
        msg.extend_from_slice(data);
        let buf = self.upload(&mut io, op, &msg)?;
        let mut none = self.zeros::<u8>(&mut io, op, 1)?;
        let user = io.handles.user;
        // Header and payload: two sends in one group (in order on this peer's channel), so the receiver can
        // post the payload's receive once it read the length.
        let mut parts = vec![(dst, 0, HEADER_BYTES)];
        if !data.is_empty() {
            parts.push((dst, HEADER_BYTES, data.len()));
        }
        self.exchange_bytes(&mut io, op, user, &buf, &parts, &mut none, &[], deadline_after(self.timeout), dst)
    }

    fn recv(&self, src: usize, tag: u32) -> CommResult<Vec<u8>> {
        let op = "recv";
        self.check_rank(op, "source", src)?;
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        self.check_usable(&mut io, op)?;
        if let Some(q) = io.stash.get_mut(&src)
            && let Some(i) = q.iter().position(|(t, _)| *t == tag)
        {
            return Ok(q.remove(i).map(|(_, d)| d).unwrap_or_default());
        }
        if src == self.rank {
            return Err(self.invalid(op, format!("no message with tag {tag} was sent by this rank to itself")));
        }
        loop {
            let (t, data) = self.recv_message(&mut io, src, deadline)?;
            if t == tag {
                return Ok(data);
            }
            io.stash.entry(src).or_default().push_back((t, data));
        }
    }

    fn all_to_all_v(&self, send: &[&[u8]]) -> CommResult<Vec<Vec<u8>>> {
        let op = "all_to_all_v";
        let (n, me) = (self.size, self.rank);
        if send.len() != n {
            return Err(self.invalid(op, format!("got {} send buffers for a group of {n} ranks", send.len())));
        }
        if n == 1 {
            return Ok(vec![send[0].to_vec()]);
        }
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        let row: Vec<u64> = (0..n).map(|j| if j == me { 0 } else { send[j].len() as u64 }).collect();
        let matrix = self.all_gather_u64(&mut io, op, &row, deadline)?;
        let (out, inn) =
            framing::all_to_all_plan(me, n, &matrix).map_err(|e| self.fail(&mut io, self.invalid(op, e)))?;
        let mut packed = Vec::with_capacity(out.total);
        for (j, s) in send.iter().enumerate() {
            if j != me {
                packed.extend_from_slice(s);
            }
        }
        let sbuf = self.upload(&mut io, op, &packed)?;
        let mut rbuf = self.zeros::<u8>(&mut io, op, inn.total)?;
        let peers: Vec<usize> = (0..n).filter(|&j| j != me).collect();
        let s: Vec<(usize, usize, usize)> = peers.iter().map(|&j| (j, out.offsets[j], out.sizes[j])).collect();
        let r: Vec<(usize, usize, usize)> = peers.iter().map(|&j| (j, inn.offsets[j], inn.sizes[j])).collect();
        let coll = io.handles.coll;
        self.exchange_bytes(&mut io, op, coll, &sbuf, &s, &mut rbuf, &r, deadline, (me + 1) % n)?;
        let all = self.download(&mut io, op, &rbuf, inn.total)?;
        Ok((0..n).map(|j| if j == me { send[me].to_vec() } else { all[inn.range(j)].to_vec() }).collect())
    }

    fn all_gather(&self, data: &[u8]) -> CommResult<Vec<Vec<u8>>> {
        let op = "all_gather";
        let (n, me) = (self.size, self.rank);
        if n == 1 {
            return Ok(vec![data.to_vec()]);
        }
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        let sizes = self.all_gather_u64(&mut io, op, &[data.len() as u64], deadline)?;
        let layout = framing::all_gather_plan(&sizes).map_err(|e| self.fail(&mut io, self.invalid(op, e)))?;
        if layout.total == 0 {
            return Ok(vec![Vec::new(); n]);
        }
        let sbuf = self.upload(&mut io, op, data)?;
        let mut rbuf = self.zeros::<u8>(&mut io, op, layout.total)?;
        let coll = io.handles.coll;
        if layout.sizes.iter().all(|&s| s == data.len()) {
            let len = data.len();
            let (sp, _r) = sbuf.device_ptr(&self.stream);
            let (dp, _w) = rbuf.device_ptr_mut(&self.stream);
            self.run_group(&mut io, op, coll, deadline, (me + 1) % n, |f, s| {
                // SAFETY: `sbuf` holds `len` bytes, `rbuf` `n * len`, alive until completion.
                unsafe {
                    (f.all_gather)(sp as *const c_void, dp as *mut c_void, len, ncclDataType_t::ncclUint8, coll, s)
                }
            })?;
        } else {
            let peers: Vec<usize> = (0..n).filter(|&j| j != me).collect();
            let s: Vec<(usize, usize, usize)> = peers.iter().map(|&j| (j, 0, data.len())).collect();
            let r: Vec<(usize, usize, usize)> =
                peers.iter().map(|&j| (j, layout.offsets[j], layout.sizes[j])).collect();
            self.exchange_bytes(&mut io, op, coll, &sbuf, &s, &mut rbuf, &r, deadline, (me + 1) % n)?;
        }
        let all = self.download(&mut io, op, &rbuf, layout.total)?;
        Ok((0..n).map(|j| if j == me { data.to_vec() } else { all[layout.range(j)].to_vec() }).collect())
    }

    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> CommResult<()> {
        let op = "broadcast";
        self.check_rank(op, "root", root)?;
        if self.size == 1 {
            return Ok(());
        }
        let root_int = to_int(self.rank, op, "root", root)?;
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        let coll = io.handles.coll;
        // The root's length first.
        let mut len_buf = self.upload(&mut io, op, &[data.len() as u64])?;
        {
            let (p, _w) = len_buf.device_ptr_mut(&self.stream);
            self.run_group(&mut io, op, coll, deadline, root, |f, s| {
                // SAFETY: one u64 in place, alive until completion.
                unsafe {
                    (f.broadcast)(
                        p as *const c_void,
                        p as *mut c_void,
                        1,
                        ncclDataType_t::ncclUint64,
                        root_int,
                        coll,
                        s,
                    )
                }
            })?;
        }
        let len = self.download(&mut io, op, &len_buf, 1)?[0];
        let len = usize::try_from(len)
            .map_err(|_| self.fail(&mut io, self.transport_err(op, format!("root announces {len} bytes"))))?;
        if len == 0 {
            data.clear();
            return Ok(());
        }
        let mut buf =
            if self.rank == root { self.upload(&mut io, op, data)? } else { self.zeros::<u8>(&mut io, op, len)? };
        {
            let (p, _w) = buf.device_ptr_mut(&self.stream);
            self.run_group(&mut io, op, coll, deadline, root, |f, s| {
                // SAFETY: `len` bytes in place (the root's buffer holds its data, the others `len` zeros).
                unsafe {
                    (f.broadcast)(
                        p as *const c_void,
                        p as *mut c_void,
                        len,
                        ncclDataType_t::ncclUint8,
                        root_int,
                        coll,
                        s,
                    )
                }
            })?;
        }
        if self.rank != root {
            *data = self.download(&mut io, op, &buf, len)?;
        }
        Ok(())
    }

    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> CommResult<()> {
        algo::all_reduce_sum(self, data)
    }

    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> CommResult<()> {
        algo::all_reduce_sum(self, data)
    }

    fn barrier(&self) -> CommResult<()> {
        if self.size == 1 {
            return Ok(());
        }
        let op = "barrier";
        let deadline = deadline_after(self.timeout);
        let mut io = lock(&self.io);
        let mut one = self.upload(&mut io, op, &[1.0f32])?;
        let coll = io.handles.coll;
        let (p, _w) = one.device_ptr_mut(&self.stream);
        self.run_group(&mut io, op, coll, deadline, (self.rank + 1) % self.size, |f, s| {
            // SAFETY: one float in place, alive until completion.
            unsafe {
                (f.all_reduce)(
                    p as *const c_void,
                    p as *mut c_void,
                    1,
                    ncclDataType_t::ncclFloat32,
                    ncclRedOp_t::ncclSum,
                    coll,
                    s,
                )
            }
        })
    }

    fn split(&self, color: usize, key: usize) -> CommResult<Box<dyn Communicator>> {
        Ok(Box::new(self.split_nccl(color, key)?))
    }

    fn abort(&self, reason: &str) {
        eprintln!("switchyard nccl: rank {} (GPU {}): abort: {reason}", self.rank, self.ordinal);
        lock(&self.abort_reason).get_or_insert_with(|| format!("aborted: {reason}"));
        self.abort_requested.store(true, Ordering::Release);
        // Abort now unless a call in flight holds the lock: it sees the request at its next poll.
        if let Ok(mut io) = self.io.try_lock() {
            let _ = self.check_usable(&mut io, "abort");
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let io = self.io.get_mut().unwrap_or_else(PoisonError::into_inner);
        let healthy = io.broken.is_none();
        let deadline = deadline_after(self.timeout);
        let _ = self.stream.context().bind_to_thread();
        for h in [io.handles.user, io.handles.coll] {
            if h.is_null() {
                continue;
            }
            let fns = &self.nccl.fns;
            let mut finalized = false;
            if healthy {
                // SAFETY: a live communicator of this object, finalised then destroyed once.
                let code = unsafe { (fns.comm_finalize)(h) };
                if code == NCCL_SUCCESS || code == NCCL_IN_PROGRESS {
                    let mut polls = 0u32;
                    loop {
                        let mut state = NCCL_SUCCESS;
                        // SAFETY: as above.
                        let c = unsafe { (fns.comm_get_async_error)(h, &mut state) };
                        if c != NCCL_SUCCESS || state != NCCL_IN_PROGRESS {
                            finalized = c == NCCL_SUCCESS && state == NCCL_SUCCESS;
                            break;
                        }
                        if deadline.is_some_and(|d| Instant::now() >= d) {
                            break;
                        }
                        backoff(&mut polls);
                    }
                }
            }
            // SAFETY: as above; abort frees a communicator in any state.
            unsafe {
                if finalized {
                    (fns.comm_destroy)(h);
                } else {
                    (fns.comm_abort)(h);
                }
            }
        }
        io.handles = Handles { user: std::ptr::null_mut(), coll: std::ptr::null_mut() };
    }
}

/// Runs `f` on `workers` in-process threads, each with an [`NcclComm`] of one group (rank `r` on GPU `r`):
/// the in-process form of one process per GPU. This thread creates the id. Returns each rank's result in rank
/// order; a rank whose communicator cannot be created returns that error, a rank whose thread panicked a
/// [`CommError::PeerFailed`].
pub fn run_threads<T, E, F>(workers: usize, timeout: Duration, f: F) -> Vec<Result<T, E>>
where
    T: Send,
    E: From<CommError> + Send,
    F: Fn(NcclComm) -> Result<T, E> + Sync,
{
    let id = match NcclId::new() {
        Ok(id) => id,
        Err(e) => return (0..workers).map(|_| Err(E::from(e.clone()))).collect(),
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|r| {
                let f = &f;
                s.spawn(move || f(NcclComm::init(r, r, workers, &id, timeout)?))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(E::from(CommError::PeerFailed {
                        rank: r,
                        peer: r,
                        op: "nccl worker",
                        reason: "the worker thread panicked".into(),
                    }))
                })
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CommExt;

    /// Why the NCCL tests cannot run here (`None`: two GPUs and libnccl are there).
    fn skip_reason(gpus: usize) -> Option<String> {
        let p = probe();
        if let Err(e) = p.check() {
            return Some(e);
        }
        let d = switchyard_kernels::cuda::probe();
        if d.device_count() < gpus {
            return Some(format!("{gpus} GPUs needed: {}", d.summary()));
        }
        None
    }

    #[test]
    fn two_gpus_agree_with_the_local_transport() {
        if let Some(why) = skip_reason(2) {
            eprintln!("skipped: {why}");
            return;
        }
        let out = run_threads(2, Duration::from_secs(60), |c| -> CommResult<()> {
            let me = c.rank();
            // all-to-all-v of uneven sizes
            let send: Vec<Vec<u8>> = (0..2).map(|j| vec![(10 * me + j) as u8; 3 + 5 * j + me]).collect();
            let refs: Vec<&[u8]> = send.iter().map(|v| v.as_slice()).collect();
            let got = c.all_to_all_v(&refs)?;
            for (j, g) in got.iter().enumerate() {
                assert_eq!(g, &vec![(10 * j + me) as u8; 3 + 5 * me + j]);
            }
            // rank-ordered sums: the same bits as adding in rank order by hand
            let mut v = vec![0.1f32 * (me as f32 + 1.0), 1e-8, -3.5];
            c.all_reduce_sum_f32(&mut v)?;
            let want = [0.1f32 + 0.2f32, 1e-8 + 1e-8, -7.0];
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            // variable all-gather, broadcast, tagged messages out of order
            let all = c.all_gather(&vec![me as u8; me + 1])?;
            assert_eq!(all, vec![vec![0u8], vec![1u8, 1]]);
            let mut b = if me == 1 { b"from one".to_vec() } else { Vec::new() };
            c.broadcast(1, &mut b)?;
            assert_eq!(b, b"from one");
            if me == 0 {
                c.send(1, 7, b"seven")?;
                c.send(1, 8, b"")?;
            } else {
                assert_eq!(c.recv(0, 8)?, b"");
                assert_eq!(c.recv(0, 7)?, b"seven");
            }
            c.barrier()?;
            let sub = c.split(me % 2, 0)?;
            assert_eq!(sub.size(), 1);
            let mut u = vec![1.0f32; 4];
            c.all_reduce_sum_f32_unordered(&mut u)?;
            assert_eq!(u, vec![2.0; 4]);
            let agree = c.all_agree(true)?;
            assert!(agree);
            Ok(())
        });
        for r in out {
            r.expect("rank ok");
        }
    }

    #[test]
    fn a_missing_peer_times_out_instead_of_hanging() {
        if let Some(why) = skip_reason(2) {
            eprintln!("skipped: {why}");
            return;
        }
        let out = run_threads(2, Duration::from_secs(5), |c| -> CommResult<()> {
            if c.rank() == 0 {
                let t = Instant::now();
                let e = c.recv(1, 3).unwrap_err();
                assert!(matches!(e, CommError::Timeout { peer: 1, .. }), "{e}");
                assert!(t.elapsed() < Duration::from_secs(15));
                // The communicator is unusable afterwards, with a clear error.
                assert!(c.barrier().is_err());
            }
            Ok(())
        });
        for r in out {
            r.expect("rank ok");
        }
    }
}
