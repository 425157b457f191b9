//! Communicators: the collectives the distributed MoE layer, the migrator and the trainer use.
//!
//! [`Communicator`] is the one interface; implementations live beside it:
//! [`local`] (in-process worker threads, the embedded default), `mpi` (feature `mpi`) and `nccl`
//! (feature `cuda`, on by default: one process or thread per GPU over NVIDIA's NCCL, loaded at run time;
//! its bootstrap uses [`rendezvous`], a file rendezvous for one node, or MPI). A
//! communicator covers a group of ranks; [`Communicator::split`] makes sub-groups (intra-node,
//! expert-data-parallel, replica groups) and [`hierarchical`] builds the 2D all-to-all from them.
//!
//! Payloads are bytes; [`CommExt`] adds typed helpers for `f32`, `f64` and `u64` slices.
//! Every blocking call waits at most [`Communicator::timeout`]: a dead or stuck peer becomes a
//! [`CommError`] on every rank that waits for it, never a hang.
//!
//! Determinism: reductions add contributions in rank order (0, 1, ..., n-1) on every rank, so
//! every rank gets the same bits and a run is reproducible for a given world size. The NCCL
//! communicator keeps this (its `all_reduce_sum_*` run the same rank-ordered algorithm over NCCL
//! point-to-point) and offers NCCL's faster, not rank-ordered all-reduce as separate methods.
//!
//! Sends: the local and MPI transports buffer them (a send returns before the receive); NCCL's are
//! synchronous (a send returns once the peer received), so code meant for every transport pairs each
//! send with a receive the peer posts without sending first, or uses the collectives.

use std::time::Duration;

pub mod hierarchical;
pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;

/// What went wrong in a collective. Every variant names the rank that saw it.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CommError {
    /// A peer did not answer within the timeout.
    #[error(
        "rank {rank}: {op} timed out after {timeout_ms} ms waiting for rank {peer}; the peer is dead or stuck (raise --timeout-s if it is only slow)"
    )]
    Timeout {
        /// The rank that waited.
        rank: usize,
        /// The peer it waited for.
        peer: usize,
        /// The operation.
        op: &'static str,
        /// The timeout that expired.
        timeout_ms: u64,
    },
    /// A peer failed (panicked, aborted, or its process ended); the whole group stops.
    #[error("rank {rank}: {op} stopped because rank {peer} failed: {reason}")]
    PeerFailed {
        /// The rank that saw the failure.
        rank: usize,
        /// The rank that failed.
        peer: usize,
        /// The operation in progress.
        op: &'static str,
        /// What the failed rank reported.
        reason: String,
    },
    /// The caller passed arguments that do not fit the group (wrong number of buffers, rank out of range,
    /// sizes that differ between ranks).
    #[error("rank {rank}: {op}: {reason}")]
    Invalid {
        /// The rank that saw it.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The transport itself failed (MPI error, NCCL error).
    #[error("rank {rank}: {op}: transport error: {reason}")]
    Transport {
        /// The rank that saw it.
        rank: usize,
        /// The operation.
        op: &'static str,
        /// The transport's message.
        reason: String,
    },
}

/// Result of a collective.
pub type CommResult<T> = std::result::Result<T, CommError>;

/// An object shared between the ranks of one process ([`Communicator::all_gather_shared`]).
pub type Shared = std::sync::Arc<dyn std::any::Any + Send + Sync>;

/// A group of ranks that exchange bytes. All ranks of the group must call the same collectives in
/// the same order (as with MPI). Point-to-point messages are matched by (source, tag) in order.
pub trait Communicator: Send + Sync {
    /// This rank's index in the group, `0..size()`.
    fn rank(&self) -> usize;
    /// Number of ranks in the group.
    fn size(&self) -> usize;
    /// How long any blocking call waits for a peer before it fails with [`CommError::Timeout`].
    fn timeout(&self) -> Duration;
    /// A short name of the transport ("local", "mpi", "nccl") for logs and benchmarks.
    fn transport(&self) -> &'static str;

    /// Sends `data` to `dst` with a tag; returns once the data is handed over (buffered).
    fn send(&self, dst: usize, tag: u32, data: &[u8]) -> CommResult<()>;
    /// Receives the next message from `src` with `tag`.
    fn recv(&self, src: usize, tag: u32) -> CommResult<Vec<u8>>;

    /// All-to-all with per-peer sizes: `send[i]` goes to rank `i` (including this rank);
    /// returns `recv` with `recv[j]` the bytes rank `j` sent here. `send.len()` must be `size()`.
    fn all_to_all_v(&self, send: &[&[u8]]) -> CommResult<Vec<Vec<u8>>>;
    /// As [`Communicator::all_to_all_v`], taking ownership of the buffers: transports that can hand a
    /// buffer over without copying it (the in-process one) do so. `send[rank]` comes back as `recv[rank]`.
    fn all_to_all_v_owned(&self, send: Vec<Vec<u8>>) -> CommResult<Vec<Vec<u8>>> {
        let refs: Vec<&[u8]> = send.iter().map(|v| v.as_slice()).collect();
        self.all_to_all_v(&refs)
    }
    /// Every rank's `data`, in rank order (sizes may differ between ranks).
    fn all_gather(&self, data: &[u8]) -> CommResult<Vec<Vec<u8>>>;
    /// Replaces `data` on every rank with `root`'s.
    fn broadcast(&self, root: usize, data: &mut Vec<u8>) -> CommResult<()>;
    /// Element-wise sum over ranks, added in rank order so every rank gets the same bits.
    /// The lengths must be equal on all ranks.
    fn all_reduce_sum_f32(&self, data: &mut [f32]) -> CommResult<()>;
    /// As [`Communicator::all_reduce_sum_f32`] for `f64`.
    fn all_reduce_sum_f64(&self, data: &mut [f64]) -> CommResult<()>;
    /// Returns when every rank of the group has entered.
    fn barrier(&self) -> CommResult<()>;

    /// Collective: splits the group by `color`; ranks with the same color form a sub-group, ordered
    /// by `(key, rank)`. Every rank of this group must call it.
    fn split(&self, color: usize, key: usize) -> CommResult<Box<dyn Communicator>>;

    /// Ranks that share one address space (the in-process transport) hand objects over without copying them:
    /// every rank's `item` reaches every rank, in rank order (an all-gather of shared references). `None` where
    /// the ranks are separate processes (MPI): callers then send bytes. Collective where it is `Some`.
    fn all_gather_shared(&self, item: Shared) -> Option<CommResult<Vec<Shared>>> {
        let _ = item;
        None
    }

    /// Marks this rank failed with a reason, so that peers blocked on it (now or later) get
    /// [`CommError::PeerFailed`] instead of waiting for the timeout, where the transport allows.
    fn abort(&self, reason: &str);
}

/// Typed helpers over [`Communicator`] (little-endian host layout; all ranks share the architecture).
pub trait CommExt: Communicator {
    /// All-to-all of `f32` buffers: `send[i]` to rank `i`; returns what each rank sent here.
    fn all_to_all_v_f32(&self, send: &[&[f32]]) -> CommResult<Vec<Vec<f32>>> {
        let bytes: Vec<&[u8]> = send.iter().map(|s| as_bytes(s)).collect();
        Ok(self.all_to_all_v(&bytes)?.into_iter().map(|b| from_bytes::<f32>(&b)).collect())
    }
    /// All-gather of `u64` values (counts, sizes, checksums).
    fn all_gather_u64(&self, data: &[u64]) -> CommResult<Vec<Vec<u64>>> {
        Ok(self.all_gather(as_bytes(data))?.into_iter().map(|b| from_bytes::<u64>(&b)).collect())
    }
    /// All-gather of `f32` values.
    fn all_gather_f32(&self, data: &[f32]) -> CommResult<Vec<Vec<f32>>> {
        Ok(self.all_gather(as_bytes(data))?.into_iter().map(|b| from_bytes::<f32>(&b)).collect())
    }
    /// Sends `f32` values.
    fn send_f32(&self, dst: usize, tag: u32, data: &[f32]) -> CommResult<()> {
        self.send(dst, tag, as_bytes(data))
    }
    /// Receives `f32` values.
    fn recv_f32(&self, src: usize, tag: u32) -> CommResult<Vec<f32>> {
        Ok(from_bytes::<f32>(&self.recv(src, tag)?))
    }
    /// Broadcast of `f32` values from `root` into `data` (same length on every rank).
    fn broadcast_f32(&self, root: usize, data: &mut [f32]) -> CommResult<()> {
        let mut bytes = if self.rank() == root { as_bytes(data).to_vec() } else { Vec::new() };
        self.broadcast(root, &mut bytes)?;
        let got = from_bytes::<f32>(&bytes);
        if got.len() != data.len() {
            return Err(CommError::Invalid {
                rank: self.rank(),
                op: "broadcast",
                reason: format!("root sent {} values, this rank expects {}", got.len(), data.len()),
            });
        }
        data.copy_from_slice(&got);
        Ok(())
    }
    /// True on every rank iff `flag` is true on every rank (a vote: commit or roll back).
    fn all_agree(&self, flag: bool) -> CommResult<bool> {
        let mut v = [if flag { 0.0f64 } else { 1.0 }];
        self.all_reduce_sum_f64(&mut v)?;
        Ok(v[0] == 0.0)
    }
}

impl<C: Communicator + ?Sized> CommExt for C {}

/// Plain-old-data element types that travel as bytes.
pub trait Pod: bytemuck::Pod {}
impl<T: bytemuck::Pod> Pod for T {}

/// Views a slice of plain values as bytes (no copy).
pub fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// Copies bytes into a vector of plain values; trailing bytes that do not fill a value are ignored
/// (senders always send whole values).
pub fn from_bytes<T: Pod>(b: &[u8]) -> Vec<T> {
    let n = b.len() / std::mem::size_of::<T>();
    let mut out = vec![T::zeroed(); n];
    bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(&b[..n * std::mem::size_of::<T>()]);
    out
}
