//! File rendezvous for ranks on one node: rank 0 publishes a small secret (the NCCL unique id) in a
//! directory the user names, every other rank reads it, and rank 0 waits until all have it. No network,
//! no MPI: enough to start one process per GPU by hand or from a shell loop.
//!
//! # Protocol (directory `D`, world size `W`)
//!
//! 1. Rank 0 removes what a dead earlier run may have left in `D` ([`ID_FILE`] and `ack-*` files), then
//!    writes [`ID_FILE`] atomically: the text goes to a temporary file in `D`, which is then renamed
//!    (a reader sees the whole file or none). The file holds the format line, the world size, a nonce
//!    (fresh for every run) and the payload in hex.
//! 2. Every other rank polls for [`ID_FILE`] until its timeout, checks the format and the world size, and
//!    writes `ack-<rank>-<nonce>` (also atomically).
//! 3. Rank 0 waits for the acknowledgements of ranks `1..W` carrying its nonce, then removes them and
//!    [`ID_FILE`], so a finished run leaves `D` empty of its files.
//!
//! Every wait ends at the timeout with an error that names the file and what to do. A rank that read a
//! stale file (left by a crashed run, before rank 0 replaced it) acknowledges a nonce rank 0 does not
//! know: rank 0 then times out naming the ranks that did not answer, and the stale rank fails in its
//! next step (NCCL's initialisation times out). Use a fresh directory per job (for example one named
//! after the job id) to rule this out.
//!
//! The world comes from flags or the environment ([`RendezvousConfig::resolve`]):
//! [`RANK_ENV`], [`WORLD_SIZE_ENV`], [`RENDEZVOUS_ENV`].

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The rank of this process (`0..world size`).
pub const RANK_ENV: &str = "SWITCHYARD_RANK";
/// The number of processes.
pub const WORLD_SIZE_ENV: &str = "SWITCHYARD_WORLD_SIZE";
/// The rendezvous directory (shared by all ranks of the job, on one node).
pub const RENDEZVOUS_ENV: &str = "SWITCHYARD_RENDEZVOUS";

/// The file rank 0 publishes in the rendezvous directory.
pub const ID_FILE: &str = "switchyard-rendezvous";

/// First line of [`ID_FILE`].
const FORMAT_LINE: &str = "switchyard rendezvous v1";

/// Longest payload accepted, in bytes (the NCCL unique id is 128).
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// Why a rendezvous failed. Every message names the file or the value and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RendezvousError {
    /// A flag or environment variable is missing or invalid.
    #[error("{what}: {reason}")]
    Config {
        /// The flag or variable.
        what: String,
        /// What is wrong and the fix.
        reason: String,
    },
    /// The directory or a file in it could not be read or written.
    #[error("rendezvous file {}: {source}; fix: make the directory exist and be writable by every rank", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Rank 0's file did not appear in time.
    #[error(
        "rank {rank}: rendezvous file {} did not appear within {timeout_ms} ms; fix: start rank 0 with the same \
         rendezvous directory (and check it is the same directory on this node), or raise the timeout",
        path.display()
    )]
    NoFile {
        /// The waiting rank.
        rank: usize,
        /// The file it waited for.
        path: PathBuf,
        /// The timeout.
        timeout_ms: u64,
    },
    /// Not every rank acknowledged within the timeout.
    #[error(
        "rank 0: ranks {missing:?} did not acknowledge the rendezvous file {} within {timeout_ms} ms; fix: start \
         them with {WORLD_SIZE_ENV}={world_size} and the same directory; if they were started before rank 0, they \
         may have read a file left by an earlier run: use a fresh directory per job",
        path.display()
    )]
    MissingAcks {
        /// The ranks that did not answer.
        missing: Vec<usize>,
        /// The published file.
        path: PathBuf,
        /// The world size.
        world_size: usize,
        /// The timeout.
        timeout_ms: u64,
    },
    /// The file is not what rank 0 writes, or was written for another world size.
    #[error("rendezvous file {}: {reason}", path.display())]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong and the fix.
        reason: String,
    },
}

/// Where and as whom this process meets the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousConfig {
    /// This process's rank.
    pub rank: usize,
    /// Number of processes.
    pub world_size: usize,
    /// The shared directory.
    pub dir: PathBuf,
}

impl RendezvousConfig {
    /// The configuration from flags, each falling back to its environment variable (read through `env`,
    /// e.g. `|k| std::env::var(k).ok()`). `Ok(None)` when neither a directory flag nor [`RENDEZVOUS_ENV`]
    /// is given (no file rendezvous wanted); an error when a directory is given but the rank or the size
    /// is missing, unparsable, or out of range.
    pub fn resolve(
        rank: Option<usize>,
        world_size: Option<usize>,
        dir: Option<PathBuf>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, RendezvousError> {
        let dir = match dir {
            Some(d) => d,
            None => match env(RENDEZVOUS_ENV).filter(|s| !s.is_empty()) {
                Some(d) => PathBuf::from(d),
                None => return Ok(None),
            },
        };
        let number = |flag: &str, var: &str, given: Option<usize>| -> Result<usize, RendezvousError> {
            if let Some(v) = given {
                return Ok(v);
            }
            let Some(text) = env(var) else {
                return Err(RendezvousError::Config {
                    what: format!("{flag} / {var}"),
                    reason: format!(
                        "missing: the rendezvous directory {} is set, so every process needs its rank and the \
                         world size; fix: pass {flag} or set {var}",
                        dir.display()
                    ),
                });
            };
            text.trim().parse::<usize>().map_err(|_| RendezvousError::Config {
                what: var.to_string(),
                reason: format!("{text:?} is not a non-negative integer; fix: e.g. {var}=0"),
            })
        };
        let rank = number("--rank", RANK_ENV, rank)?;
        let world_size = number("--world-size", WORLD_SIZE_ENV, world_size)?;
        if world_size == 0 {
            return Err(RendezvousError::Config {
                what: format!("--world-size / {WORLD_SIZE_ENV}"),
                reason: "0: fix: at least 1 process".into(),
            });
        }
        if rank >= world_size {
            return Err(RendezvousError::Config {
                what: format!("--rank / {RANK_ENV}"),
                reason: format!("{rank} is not below the world size {world_size}; fix: ranks 0..{world_size}"),
            });
        }
        Ok(Some(RendezvousConfig { rank, world_size, dir }))
    }

    /// The published file.
    pub fn id_path(&self) -> PathBuf {
        self.dir.join(ID_FILE)
    }
}

/// A fresh nonce: time, process and a per-process counter mixed (no randomness source needed; it only has
/// to differ between runs).
fn nonce() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ (u64::from(std::process::id()) << 32) ^ COUNTER.fetch_add(1, Ordering::Relaxed).rotate_left(17);
    // splitmix64 finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RendezvousError + '_ {
    move |source| RendezvousError::Io { path: path.to_path_buf(), source }
}

/// Writes `text` to `dir/name` atomically (temporary file in `dir`, then rename).
fn write_atomic(dir: &Path, name: &str, text: &str) -> Result<(), RendezvousError> {
    let tmp = dir.join(format!(".{name}.tmp.{}.{:x}", std::process::id(), nonce()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        let path = dir.join(name);
        std::fs::rename(&tmp, &path).map_err(io(&path))
    })();
    if result.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    result
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

/// The text of [`ID_FILE`].
fn encode(world_size: usize, nonce: u64, payload: &[u8]) -> String {
    format!("{FORMAT_LINE}\nworld_size {world_size}\nnonce {nonce:016x}\npayload {}\n", hex(payload))
}

/// Parses [`ID_FILE`]'s text: `(world size, nonce, payload)`.
fn decode(text: &str) -> Result<(usize, u64, Vec<u8>), String> {
    let mut lines = text.lines();
    if lines.next() != Some(FORMAT_LINE) {
        return Err(format!("the first line is not {FORMAT_LINE:?} (not written by switchyard, or another version)"));
    }
    let mut field = |name: &str| -> Result<String, String> {
        let line = lines.next().ok_or_else(|| format!("missing the {name} line"))?;
        line.strip_prefix(name)
            .and_then(|r| r.strip_prefix(' '))
            .map(str::to_string)
            .ok_or_else(|| format!("expected a {name} line, found {line:?}"))
    };
    let world_size = field("world_size")?.parse::<usize>().map_err(|e| format!("world_size: {e}"))?;
    let nonce = u64::from_str_radix(&field("nonce")?, 16).map_err(|e| format!("nonce: {e}"))?;
    let payload = unhex(&field("payload")?).ok_or("payload: not hex")?;
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(format!("payload of {} bytes is longer than {MAX_PAYLOAD_BYTES}", payload.len()));
    }
    Ok((world_size, nonce, payload))
}

fn ack_name(rank: usize, nonce: u64) -> String {
    format!("ack-{rank}-{nonce:016x}")
}

/// Sleeps a little between polls (short at first, then 20 ms).
fn pause(polls: &mut u32) {
    *polls = polls.saturating_add(1);
    std::thread::sleep(Duration::from_millis(if *polls < 50 { 2 } else { 20 }));
}

/// Runs the rendezvous: rank 0 publishes `payload` (`Some`, required there) and returns it once every rank
/// acknowledged; other ranks pass `None` and return what rank 0 published. Each wait ends after `timeout`.
pub fn exchange(cfg: &RendezvousConfig, payload: Option<&[u8]>, timeout: Duration) -> Result<Vec<u8>, RendezvousError> {
    let path = cfg.id_path();
    let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    let deadline = Instant::now().checked_add(timeout);
    let expired = || deadline.is_some_and(|d| Instant::now() >= d);
    if !cfg.dir.is_dir() {
        return Err(RendezvousError::Io {
            path: cfg.dir.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let mut polls = 0u32;
    if cfg.rank == 0 {
        let Some(payload) = payload else {
            return Err(RendezvousError::Config { what: "rendezvous".into(), reason: "rank 0 has no payload".into() });
        };
        if payload.len() > MAX_PAYLOAD_BYTES {
            return Err(RendezvousError::Config {
                what: "rendezvous payload".into(),
                reason: format!("{} bytes, at most {MAX_PAYLOAD_BYTES}", payload.len()),
            });
        }
        remove_leftovers(&cfg.dir)?;
        let n = nonce();
        write_atomic(&cfg.dir, ID_FILE, &encode(cfg.world_size, n, payload))?;
        let acks: Vec<PathBuf> = (1..cfg.world_size).map(|r| cfg.dir.join(ack_name(r, n))).collect();
        loop {
            let missing: Vec<usize> = (1..cfg.world_size).filter(|&r| !acks[r - 1].exists()).collect();
            if missing.is_empty() {
                break;
            }
            if expired() {
                std::fs::remove_file(&path).ok();
                return Err(RendezvousError::MissingAcks { missing, path, world_size: cfg.world_size, timeout_ms });
            }
            pause(&mut polls);
        }
        for a in &acks {
            std::fs::remove_file(a).map_err(io(a))?;
        }
        std::fs::remove_file(&path).map_err(io(&path))?;
        return Ok(payload.to_vec());
    }
    loop {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let (world_size, n, payload) =
                    decode(&text).map_err(|reason| RendezvousError::BadFile { path: path.clone(), reason })?;
                if world_size != cfg.world_size {
                    return Err(RendezvousError::BadFile {
                        path,
                        reason: format!(
                            "rank 0 runs a world of {world_size} ranks, this rank (rank {}) was told {}; fix: the \
                             same {WORLD_SIZE_ENV} on every rank",
                            cfg.rank, cfg.world_size
                        ),
                    });
                }
                write_atomic(&cfg.dir, &ack_name(cfg.rank, n), "ok\n")?;
                return Ok(payload);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(RendezvousError::Io { path, source: e }),
        }
        if expired() {
            return Err(RendezvousError::NoFile { rank: cfg.rank, path, timeout_ms });
        }
        pause(&mut polls);
    }
}

/// Removes [`ID_FILE`] and acknowledgements a dead run left in `dir`.
fn remove_leftovers(dir: &Path) -> Result<(), RendezvousError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == ID_FILE || name.starts_with("ack-") {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn fresh_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("switchyard-rdv-{name}-{}-{:x}", std::process::id(), nonce()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn cfg(rank: usize, world_size: usize, dir: &Path) -> RendezvousConfig {
        RendezvousConfig { rank, world_size, dir: dir.to_path_buf() }
    }

    #[test]
    fn four_threads_meet_and_leave_nothing_behind() {
        let dir = fresh_dir("four");
        let id: Vec<u8> = (0..128u8).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|r| {
                    let (dir, id) = (dir.clone(), id.clone());
                    s.spawn(move || {
                        // Other ranks may start before rank 0.
                        if r == 0 {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        let payload = (r == 0).then_some(id.as_slice());
                        exchange(&cfg(r, 4, &dir), payload, Duration::from_secs(20)).expect("rendezvous")
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).collect()
        });
        assert!(got.iter().all(|g| *g == id), "{got:?}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "files left in {}", dir.display());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_rank_without_rank_0_times_out_naming_the_file() {
        let dir = fresh_dir("alone");
        let e = exchange(&cfg(1, 2, &dir), None, Duration::from_millis(100)).unwrap_err();
        assert!(matches!(e, RendezvousError::NoFile { rank: 1, timeout_ms: 100, .. }), "{e}");
        assert!(e.to_string().contains(&dir.join(ID_FILE).display().to_string()), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn rank_0_without_peers_names_the_missing_ranks_and_cleans_up() {
        let dir = fresh_dir("nopeers");
        let e = exchange(&cfg(0, 3, &dir), Some(b"id"), Duration::from_millis(100)).unwrap_err();
        match &e {
            RendezvousError::MissingAcks { missing, world_size: 3, .. } => assert_eq!(missing, &vec![1, 2]),
            other => panic!("{other}"),
        }
        assert!(e.to_string().contains("SWITCHYARD_WORLD_SIZE=3"), "{e}");
        assert!(!dir.join(ID_FILE).exists());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_stale_file_is_replaced_by_rank_0_and_a_rank_that_read_it_is_detected() {
        let dir = fresh_dir("stale");
        // A crashed run left its file and an acknowledgement.
        std::fs::write(dir.join(ID_FILE), encode(2, 7, b"old")).unwrap();
        std::fs::write(dir.join(ack_name(1, 7)), "ok\n").unwrap();
        // Rank 1 started first reads the stale id; rank 0 then never sees an ack of its own nonce.
        let stale = exchange(&cfg(1, 2, &dir), None, Duration::from_secs(5)).unwrap();
        assert_eq!(stale, b"old");
        let e = exchange(&cfg(0, 2, &dir), Some(b"new"), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(&e, RendezvousError::MissingAcks { missing, .. } if missing == &vec![1]), "{e}");
        // Started in the other order, rank 0 replaces the stale file first and both get the new id.
        std::fs::write(dir.join(ID_FILE), encode(2, 7, b"old")).unwrap();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let zero = s.spawn(|| exchange(&cfg(0, 2, &dir), Some(b"new"), Duration::from_secs(20)));
            // Wait until rank 0 has published (the stale nonce is gone).
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::fs::read_to_string(dir.join(ID_FILE)).map_or(true, |t| decode(&t).unwrap().1 == 7) {
                assert!(Instant::now() < deadline, "rank 0 never published");
                std::thread::sleep(Duration::from_millis(1));
            }
            let one = exchange(&cfg(1, 2, &dir), None, Duration::from_secs(20)).unwrap();
            vec![zero.join().unwrap().unwrap(), one]
        });
        assert_eq!(got, vec![b"new".to_vec(), b"new".to_vec()]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_world_size_mismatch_is_reported() {
        let dir = fresh_dir("mismatch");
        std::fs::write(dir.join(ID_FILE), encode(4, 1, b"x")).unwrap();
        let e = exchange(&cfg(1, 2, &dir), None, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("world of 4 ranks"), "{e}");
        std::fs::write(dir.join(ID_FILE), "garbage\n").unwrap();
        let e = exchange(&cfg(1, 2, &dir), None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, RendezvousError::BadFile { .. }), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn file_format_round_trips() {
        let text = encode(8, 0xdead_beef, &[0, 1, 254, 255]);
        assert_eq!(decode(&text).unwrap(), (8, 0xdead_beef, vec![0, 1, 254, 255]));
        assert!(decode("switchyard rendezvous v1\nworld_size 2\nnonce zz\npayload 00\n").is_err());
        assert!(decode("switchyard rendezvous v1\nworld_size 2\nnonce 01\npayload 0\n").is_err());
    }

    #[test]
    fn config_from_flags_and_environment() {
        let env: HashMap<&str, &str> =
            [(RANK_ENV, "2"), (WORLD_SIZE_ENV, "4"), (RENDEZVOUS_ENV, "/tmp/rdv")].into_iter().collect();
        let get = |k: &str| env.get(k).map(|v| v.to_string());
        let none = |_: &str| None;
        assert_eq!(RendezvousConfig::resolve(None, None, None, none).unwrap(), None);
        let c = RendezvousConfig::resolve(None, None, None, get).unwrap().unwrap();
        assert_eq!(c, RendezvousConfig { rank: 2, world_size: 4, dir: "/tmp/rdv".into() });
        // Flags win over the environment.
        let c = RendezvousConfig::resolve(Some(1), Some(2), Some("/x".into()), get).unwrap().unwrap();
        assert_eq!(c, RendezvousConfig { rank: 1, world_size: 2, dir: "/x".into() });
        let e = RendezvousConfig::resolve(None, Some(2), Some("/x".into()), none).unwrap_err();
        assert!(e.to_string().contains("--rank") && e.to_string().contains(RANK_ENV), "{e}");
        let e = RendezvousConfig::resolve(Some(2), Some(2), Some("/x".into()), none).unwrap_err();
        assert!(e.to_string().contains("not below the world size 2"), "{e}");
        let bad = |k: &str| (k == RANK_ENV).then(|| "one".to_string());
        let e = RendezvousConfig::resolve(None, Some(2), Some("/x".into()), bad).unwrap_err();
        assert!(e.to_string().contains("\"one\""), "{e}");
    }
}
