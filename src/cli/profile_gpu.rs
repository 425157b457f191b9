//! `switchyard profile --device cuda|auto`: which GPU world this process belongs to (in-process threads, a
//! file rendezvous, MPI ranks), whether it can run, and running it (the measurements are the runtime's,
//! `switchyard_runtime::profile::cuda`).

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use switchyard_runtime::comm::nccl::bootstrap::{id_via_file, local_rank_from_env};
use switchyard_runtime::comm::nccl::{NcclComm, NcclId};
use switchyard_runtime::comm::rendezvous::RendezvousConfig;
use switchyard_runtime::profile::ProfileConfig;
use switchyard_runtime::profile::ProfileReport;
use switchyard_runtime::profile::cuda::{gpu_unavailable, profile_gpu_rank, profile_gpu_threads};

use super::train::CommMode;

/// `--device` of `switchyard profile`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProfileDevice {
    Cpu,
    Cuda,
    Auto,
}

impl std::str::FromStr for ProfileDevice {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda),
            "auto" => Ok(Self::Auto),
            _ => bail!(
                "--device {s}: unknown; fix: cpu, cuda or auto (each worker drives the GPU of its node-local rank)"
            ),
        }
    }
}

/// The GPU workers of a `profile --device cuda` run, as seen from this process.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum GpuWorld {
    /// `workers` threads of this process, GPU `r` for worker `r`.
    Threads { workers: usize },
    /// This process is one rank of a file rendezvous, driving GPU `ordinal`.
    File { rdv: RendezvousConfig, ordinal: usize },
    /// This process is one of `size` MPI ranks, driving GPU `ordinal`.
    Mpi { size: usize, ordinal: usize },
}

impl GpuWorld {
    /// Ranks of the world.
    pub(super) fn size(&self) -> usize {
        match self {
            GpuWorld::Threads { workers } => *workers,
            GpuWorld::File { rdv, .. } => rdv.world_size,
            GpuWorld::Mpi { size, .. } => *size,
        }
    }

    /// For the progress line.
    pub(super) fn describe(&self) -> String {
        match self {
            GpuWorld::Threads { .. } => "GPU workers (threads of this process)".into(),
            GpuWorld::File { rdv, ordinal } => {
                format!("GPU ranks (this is rank {}, GPU {ordinal}; rendezvous in {})", rdv.rank, rdv.dir.display())
            }
            GpuWorld::Mpi { ordinal, .. } => format!("GPU ranks over MPI (this rank drives GPU {ordinal})"),
        }
    }

    /// GPUs this node needs: every thread's, or up to this rank's ordinal.
    fn gpus_needed(&self) -> usize {
        match self {
            GpuWorld::Threads { workers } => *workers,
            GpuWorld::File { ordinal, .. } | GpuWorld::Mpi { ordinal, .. } => ordinal + 1,
        }
    }
}

fn local_rank(world_rank: usize) -> Result<usize> {
    Ok(local_rank_from_env(|k| std::env::var(k).ok()).map_err(|e| anyhow!(e))?.unwrap_or(world_rank))
}

/// Decides where the profile runs: the device's name for the progress line and, on GPUs, the world. `cuda`
/// fails with what is missing and the fix; `auto` falls back to the CPU and says why on stderr.
pub(super) fn choose(
    requested: ProfileDevice,
    mode: CommMode,
    rdv: Option<RendezvousConfig>,
    workers: Option<usize>,
) -> Result<(String, Option<GpuWorld>)> {
    if requested == ProfileDevice::Cpu {
        if let Some(r) = rdv {
            bail!(
                "the file rendezvous ({}) starts GPU ranks over NCCL, and --device is cpu; fix: --device cuda, or \
                 unset --rendezvous / SWITCHYARD_RENDEZVOUS (CPU workers run in-process or under mpirun)",
                r.dir.display()
            );
        }
        return Ok(("cpu".into(), None));
    }
    let world = match (rdv, mode) {
        (Some(_), CommMode::Mpi { .. }) => {
            bail!(
                "--rendezvous / SWITCHYARD_RENDEZVOUS under mpirun: choose one; fix: drop the rendezvous (MPI hands out the NCCL id)"
            )
        }
        (Some(rdv), CommMode::Local) => {
            let ordinal = local_rank(rdv.rank)?;
            GpuWorld::File { rdv, ordinal }
        }
        (None, CommMode::Mpi { size }) => {
            GpuWorld::Mpi { size, ordinal: local_rank(super::train::mpi_rank().unwrap_or(0))? }
        }
        (None, CommMode::Local) => GpuWorld::Threads { workers: workers.unwrap_or(1) },
    };
    if world.size() == 0 {
        bail!("--workers 0: fix: at least 1 worker");
    }
    match gpu_unavailable(world.gpus_needed(), world.size()) {
        None => Ok((format!("cuda ({} GPU worker(s))", world.size()), Some(world))),
        Some(why) if requested == ProfileDevice::Cuda => bail!("--device cuda: {why}"),
        Some(why) => {
            if let GpuWorld::File { rdv, .. } = &world {
                bail!(
                    "--device auto: no GPU run possible ({why}), and the CPU path has no file rendezvous ({}); fix: \
                     --device cpu without the rendezvous, or make the GPU run possible",
                    rdv.dir.display()
                );
            }
            eprintln!("--device auto: running on the CPU: {why}");
            Ok(("cpu".into(), None))
        }
    }
}

/// Runs the GPU profile of `world`; `Some(report)` on rank 0.
pub(super) fn run(world: &GpuWorld, cfg: &ProfileConfig, timeout: Duration) -> Result<Option<ProfileReport>> {
    match world {
        GpuWorld::Threads { workers } => Ok(Some(profile_gpu_threads(*workers, cfg, timeout)?)),
        GpuWorld::File { rdv, .. } if rdv.world_size == 1 => Ok(Some(profile_gpu_threads(1, cfg, timeout)?)),
        GpuWorld::File { rdv, ordinal } => {
            let id = id_via_file(rdv, timeout)?;
            rank_profile(*ordinal, rdv.rank, rdv.world_size, &id, cfg, timeout)
        }
        GpuWorld::Mpi { ordinal, .. } => on_mpi(*ordinal, cfg, timeout),
    }
}

fn rank_profile(
    ordinal: usize,
    rank: usize,
    size: usize,
    id: &NcclId,
    cfg: &ProfileConfig,
    timeout: Duration,
) -> Result<Option<ProfileReport>> {
    let comm = NcclComm::init(ordinal, rank, size, id, timeout)?;
    profile_gpu_rank(&comm, cfg).map_err(|e| anyhow!("GPU rank {rank} (GPU {ordinal}): profile failed: {e}"))
}

#[cfg(feature = "mpi")]
fn on_mpi(ordinal: usize, cfg: &ProfileConfig, timeout: Duration) -> Result<Option<ProfileReport>> {
    use switchyard_runtime::comm::Communicator;
    let world = switchyard_runtime::comm::mpi::init(timeout)?;
    let id = switchyard_runtime::comm::nccl::bootstrap::id_via_mpi(&world)?;
    let result = rank_profile(ordinal, world.rank(), world.size(), &id, cfg, timeout);
    if let Err(e) = &result {
        world.abort(&e.to_string());
    }
    result
}

#[cfg(not(feature = "mpi"))]
fn on_mpi(_ordinal: usize, _cfg: &ProfileConfig, _timeout: Duration) -> Result<Option<ProfileReport>> {
    bail!("--comm mpi: this switchyard was built without MPI; fix: cargo build --release --features mpi")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!("CUDA".parse::<ProfileDevice>().unwrap(), ProfileDevice::Cuda);
        assert_eq!("auto".parse::<ProfileDevice>().unwrap(), ProfileDevice::Auto);
        assert!("tpu".parse::<ProfileDevice>().unwrap_err().to_string().contains("cpu, cuda or auto"));
    }

    #[test]
    fn the_cpu_refuses_a_rendezvous() {
        let rdv = RendezvousConfig { rank: 0, world_size: 2, dir: "/tmp/x".into() };
        let e = choose(ProfileDevice::Cpu, CommMode::Local, Some(rdv), None).unwrap_err();
        assert!(e.to_string().contains("--device cuda"), "{e}");
        assert_eq!(choose(ProfileDevice::Cpu, CommMode::Local, None, Some(3)).unwrap(), ("cpu".to_string(), None));
    }
}
