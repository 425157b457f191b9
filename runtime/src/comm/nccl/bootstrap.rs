//! How every rank gets the NCCL unique id (rank 0 creates it; NCCL needs the same 128 bytes on all ranks
//! before the communicator exists) and which GPU a rank drives.
//!
//! - In-process threads: shared directly ([`super::run_threads`]).
//! - One node, processes started by hand or by a script: the file rendezvous ([`crate::comm::rendezvous`]),
//!   world rank and size from `--rank` / `--world-size` or `SWITCHYARD_RANK` / `SWITCHYARD_WORLD_SIZE`,
//!   the directory from `--rendezvous` or `SWITCHYARD_RENDEZVOUS` ([`id_via_file`]).
//! - MPI (feature `mpi`): rank 0 creates the id and broadcasts it over MPI ([`id_via_mpi`]).
//!
//! A rank drives GPU `local rank`: the rank on its node ([`local_rank_from_env`]).

use std::time::Duration;

use cudarc::nccl::sys::ncclUniqueId;

use super::library::{NCCL_FIX, nccl};
use crate::comm::rendezvous::{self, RendezvousConfig};
use crate::comm::{CommError, CommResult};

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// The identity of one NCCL group: 128 opaque bytes made by rank 0 (`ncclGetUniqueId`, which also starts
/// NCCL's bootstrap listener in that process) and handed to every rank.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct NcclId([u8; ID_BYTES]);

impl std::fmt::Debug for NcclId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclId(..)")
    }
}

impl NcclId {
    /// A fresh id (call on rank 0 only, once per group). Fails when libnccl is not usable.
    pub fn new() -> CommResult<NcclId> {
        let op = "nccl unique id";
        let lib = nccl().map_err(|e| CommError::Transport {
            rank: 0,
            op,
            reason: format!("libnccl is not usable: {e}; fix: {NCCL_FIX}"),
        })?;
        let mut raw = ncclUniqueId { internal: [0; ID_BYTES] };
        // SAFETY: writes the 128-byte id into `raw`.
        let code = unsafe { (lib.fns.get_unique_id)(&mut raw) };
        if code != super::library::NCCL_SUCCESS {
            return Err(CommError::Transport { rank: 0, op, reason: lib.describe(code, None) });
        }
        let mut bytes = [0u8; ID_BYTES];
        for (b, c) in bytes.iter_mut().zip(raw.internal) {
            *b = c as u8;
        }
        Ok(NcclId(bytes))
    }

    /// The id from its bytes (as another rank sent them); `None` unless exactly [`ID_BYTES`] long.
    pub fn from_bytes(bytes: &[u8]) -> Option<NcclId> {
        <[u8; ID_BYTES]>::try_from(bytes).ok().map(NcclId)
    }

    /// The id's bytes (to send to the other ranks).
    pub fn as_bytes(&self) -> &[u8; ID_BYTES] {
        &self.0
    }

    pub(crate) fn raw(&self) -> ncclUniqueId {
        let mut internal = [0; ID_BYTES];
        for (c, b) in internal.iter_mut().zip(self.0) {
            *c = b as _;
        }
        ncclUniqueId { internal }
    }
}

/// The id through the file rendezvous: rank 0 creates and publishes it, the others read it (each wait at
/// most `timeout`).
pub fn id_via_file(cfg: &RendezvousConfig, timeout: Duration) -> CommResult<NcclId> {
    let op = "nccl rendezvous";
    let mine = if cfg.rank == 0 { Some(NcclId::new()?) } else { None };
    let bytes = rendezvous::exchange(cfg, mine.as_ref().map(|id| id.as_bytes().as_slice()), timeout)
        .map_err(|e| CommError::Transport { rank: cfg.rank, op, reason: e.to_string() })?;
    NcclId::from_bytes(&bytes).ok_or_else(|| CommError::Transport {
        rank: cfg.rank,
        op,
        reason: format!(
            "the rendezvous file {} holds {} bytes, not an NCCL id of {ID_BYTES}",
            cfg.id_path().display(),
            bytes.len()
        ),
    })
}

/// The id through MPI: rank 0 of `world` creates it and broadcasts it (a collective of `world`).
#[cfg(feature = "mpi")]
pub fn id_via_mpi(world: &crate::comm::mpi::MpiComm) -> CommResult<NcclId> {
    use crate::comm::Communicator;
    let mut bytes = if world.rank() == 0 { NcclId::new()?.as_bytes().to_vec() } else { Vec::new() };
    world.broadcast(0, &mut bytes)?;
    NcclId::from_bytes(&bytes).ok_or_else(|| CommError::Transport {
        rank: world.rank(),
        op: "nccl id over mpi",
        reason: format!("rank 0 sent {} bytes, not an NCCL id of {ID_BYTES}", bytes.len()),
    })
}

/// Environment variables launchers set to the rank within the node, in the order they are read.
pub const LOCAL_RANK_VARS: [&str; 4] =
    ["SWITCHYARD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"];

/// The rank within this node from the launcher's environment (read through `env`), if one set it; an error
/// when a variable is set but is not a number.
pub fn local_rank_from_env(env: impl Fn(&str) -> Option<String>) -> Result<Option<usize>, String> {
    for var in LOCAL_RANK_VARS {
        if let Some(v) = env(var).filter(|v| !v.trim().is_empty()) {
            return v.trim().parse::<usize>().map(Some).map_err(|_| {
                format!("{var}={v:?} is not a non-negative integer; fix: unset it or set the node-local rank")
            });
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_bytes() {
        let bytes: Vec<u8> = (0..128u8).map(|b| b.wrapping_mul(3)).collect();
        let id = NcclId::from_bytes(&bytes).unwrap();
        assert_eq!(id.as_bytes().as_slice(), bytes.as_slice());
        let raw = id.raw();
        assert_eq!(raw.internal.iter().map(|&c| c as u8).collect::<Vec<_>>(), bytes);
        assert!(NcclId::from_bytes(&bytes[..127]).is_none());
    }

    #[test]
    fn local_rank_comes_from_the_first_variable_set() {
        let env = |k: &str| match k {
            "OMPI_COMM_WORLD_LOCAL_RANK" => Some("3".to_string()),
            "SLURM_LOCALID" => Some("1".to_string()),
            _ => None,
        };
        assert_eq!(local_rank_from_env(env), Ok(Some(3)));
        assert_eq!(local_rank_from_env(|_| None), Ok(None));
        let bad = local_rank_from_env(|k| (k == "SLURM_LOCALID").then(|| "x".to_string())).unwrap_err();
        assert!(bad.contains("SLURM_LOCALID"), "{bad}");
    }

    #[test]
    fn the_file_rendezvous_without_nccl_names_the_fix() {
        if super::super::probe().found {
            eprintln!("skipped: libnccl is present here, so the id would be created");
            return;
        }
        let dir = std::env::temp_dir().join(format!("switchyard-nccl-rdv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = RendezvousConfig { rank: 0, world_size: 2, dir: dir.clone() };
        let e = id_via_file(&cfg, Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("SWITCHYARD_NCCL_LIB"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ranks_get_rank_0s_id_through_the_file_rendezvous() {
        // Needs libnccl (ncclGetUniqueId), not a GPU.
        if let Err(e) = super::super::probe().check() {
            eprintln!("skipped: {e}");
            return;
        }
        let dir = std::env::temp_dir().join(format!("switchyard-nccl-rdv3-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ids: Vec<CommResult<NcclId>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|rank| {
                    let cfg = RendezvousConfig { rank, world_size: 3, dir: dir.clone() };
                    s.spawn(move || id_via_file(&cfg, Duration::from_secs(20)))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        std::fs::remove_dir_all(&dir).ok();
        if let Err(e) = &ids[0] {
            eprintln!("skipped: this libnccl cannot create an id here: {e}");
            return;
        }
        let first = ids[0].as_ref().unwrap();
        assert!(first.as_bytes().iter().any(|&b| b != 0));
        for id in &ids {
            assert_eq!(id.as_ref().unwrap(), first);
        }
    }
}
