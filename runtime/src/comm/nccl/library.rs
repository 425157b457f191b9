//! Finding libnccl and calling it: the library is loaded here by path or name and every function the
//! communicator uses is resolved *before* any call, so a missing library or symbol is a reason string
//! ([`NcclProbe`]), never a panic (cudarc's own dynamic loader panics on both). The argument types come from
//! cudarc's NCCL bindings (`cudarc::nccl::sys`, NCCL 2.30 headers); results are read as plain integers.
//!
//! Where the library is looked for, in order: the path in [`NCCL_LIB_ENV`], then `libnccl.so` and
//! `libnccl.so.2` through the system loader (`LD_LIBRARY_PATH`, the `ldconfig` cache). The PyPI wheels
//! `nvidia-nccl-cu12` / `nvidia-nccl-cu13` ship `nvidia/nccl/lib/libnccl.so.2`: point [`NCCL_LIB_ENV`] at it.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclDataType_t, ncclRedOp_t, ncclUniqueId};
use serde::Serialize;

/// The environment variable naming a `libnccl` to load by path.
pub const NCCL_LIB_ENV: &str = "SWITCHYARD_NCCL_LIB";

/// Names tried through the system loader when [`NCCL_LIB_ENV`] is not set.
const SYSTEM_NAMES: [&str; 2] = ["libnccl.so", "libnccl.so.2"];

/// Oldest NCCL this communicator uses (`ncclCommSplit` and non-blocking communicators: 2.18).
pub const MIN_NCCL_VERSION: (i32, i32) = (2, 18);

/// `ncclSuccess`.
pub(crate) const NCCL_SUCCESS: c_int = 0;
/// `ncclInProgress` (non-blocking communicators).
pub(crate) const NCCL_IN_PROGRESS: c_int = 7;
/// `NCCL_CONFIG_UNDEF_INT`.
const CONFIG_UNDEF_INT: c_int = i32::MIN;
/// `NCCL_API_MAGIC`, the `magic` of an initialised `ncclConfig_t`.
const CONFIG_MAGIC: u32 = 0xcafe_beef;
/// The header version the `ncclConfig_t` layout of cudarc's bindings comes from (2.30.0). Older libraries
/// read the prefix they know (they copy `min(size, their size)` bytes).
const CONFIG_VERSION: u32 = 2 * 10000 + 30 * 100;

/// The fix printed with every "libnccl not usable" message.
pub const NCCL_FIX: &str = "install NCCL (e.g. `pip install nvidia-nccl-cu13`) and set \
    SWITCHYARD_NCCL_LIB=/path/to/nvidia/nccl/lib/libnccl.so.2, or add its directory to LD_LIBRARY_PATH with a \
    libnccl.so link; or run a single rank / use --device cpu";

macro_rules! nccl_fns {
    ($($field:ident = $sym:literal : fn($($arg:ty),*);)*) => {
        /// The NCCL functions the communicator calls, resolved once.
        pub(crate) struct Fns {
            $(pub(crate) $field: unsafe extern "C" fn($($arg),*) -> c_int,)*
        }

        impl Fns {
            /// Resolves every function in `lib`; the first missing symbol is the error.
            ///
            /// # Safety
            /// `lib` must be libnccl: each symbol is given the type of its declaration in `nccl.h`.
            unsafe fn resolve(lib: &libloading::Library) -> Result<Fns, String> {
                Ok(Fns {
                    $($field: {
                        // SAFETY: the symbol's C type is the declared one (see the caller's contract).
                        let f = unsafe { lib.get::<unsafe extern "C" fn($($arg),*) -> c_int>(concat!($sym, "\0").as_bytes()) }
                            .map_err(|e| format!("symbol {} missing: {e}", $sym))?;
                        *f
                    },)*
                })
            }
        }
    };
}

nccl_fns! {
    get_version = "ncclGetVersion": fn(*mut c_int);
    get_unique_id = "ncclGetUniqueId": fn(*mut ncclUniqueId);
    comm_init_rank_config = "ncclCommInitRankConfig": fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t);
    comm_split = "ncclCommSplit": fn(ncclComm_t, c_int, c_int, *mut ncclComm_t, *mut ncclConfig_t);
    comm_get_async_error = "ncclCommGetAsyncError": fn(ncclComm_t, *mut c_int);
    comm_finalize = "ncclCommFinalize": fn(ncclComm_t);
    comm_destroy = "ncclCommDestroy": fn(ncclComm_t);
    comm_abort = "ncclCommAbort": fn(ncclComm_t);
    group_start = "ncclGroupStart": fn();
    group_end = "ncclGroupEnd": fn();
    send = "ncclSend": fn(*const c_void, usize, ncclDataType_t, c_int, ncclComm_t, *mut c_void);
    recv = "ncclRecv": fn(*mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, *mut c_void);
    all_gather = "ncclAllGather": fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclComm_t, *mut c_void);
    all_reduce = "ncclAllReduce": fn(*const c_void, *mut c_void, usize, ncclDataType_t, ncclRedOp_t, ncclComm_t, *mut c_void);
    broadcast = "ncclBroadcast": fn(*const c_void, *mut c_void, usize, ncclDataType_t, c_int, ncclComm_t, *mut c_void);
}

/// The loaded library (kept for the life of the process) and its functions.
pub(crate) struct Nccl {
    _lib: libloading::Library,
    pub(crate) fns: Fns,
    /// `(major, minor, patch)`.
    pub(crate) version: (i32, i32, i32),
    /// Where it came from.
    pub(crate) source: String,
    /// `ncclGetErrorString`, when the library has it.
    error_string: Option<unsafe extern "C" fn(c_int) -> *const c_char>,
    /// `ncclGetLastError`, when the library has it.
    last_error: Option<unsafe extern "C" fn(ncclComm_t) -> *const c_char>,
}

/// What is there of NCCL on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NcclProbe {
    /// Whether a usable libnccl was loaded (the library, every symbol, a recent enough version).
    pub found: bool,
    /// The library's version, `(major, minor, patch)`, when it loaded.
    pub version: Option<(i32, i32, i32)>,
    /// The path in [`NCCL_LIB_ENV`] or the name the system loader resolved.
    pub source: Option<String>,
    /// Why NCCL is unusable (`None` when it is usable).
    pub reason: Option<String>,
}

impl NcclProbe {
    /// One line for people.
    pub fn summary(&self) -> String {
        match (&self.reason, self.version, &self.source) {
            (None, Some((a, b, c)), Some(s)) => format!("NCCL {a}.{b}.{c} ({s})"),
            (reason, _, _) => format!("no NCCL ({})", reason.as_deref().unwrap_or("not found")),
        }
    }

    /// `Ok` when the communicator can be used, else the error message with the fix.
    pub fn check(&self) -> Result<(), String> {
        match &self.reason {
            None if self.found => Ok(()),
            reason => {
                Err(format!("libnccl is not usable: {}; fix: {NCCL_FIX}", reason.as_deref().unwrap_or("not found")))
            }
        }
    }
}

/// Loads `libnccl` (once per process) and resolves its functions.
pub(crate) fn nccl() -> Result<&'static Nccl, String> {
    static NCCL: OnceLock<Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Looks for a usable libnccl without calling anything but `ncclGetVersion`. Never panics.
pub fn probe() -> NcclProbe {
    match nccl() {
        Ok(n) => NcclProbe { found: true, version: Some(n.version), source: Some(n.source.clone()), reason: None },
        Err(reason) => NcclProbe { found: false, version: None, source: None, reason: Some(reason) },
    }
}

fn load() -> Result<Nccl, String> {
    let (lib, source) = match std::env::var_os(NCCL_LIB_ENV).filter(|p| !p.is_empty()) {
        Some(path) => {
            let shown = std::path::PathBuf::from(&path).display().to_string();
            if !std::path::Path::new(&path).is_file() {
                return Err(format!("{NCCL_LIB_ENV}={shown}: no such file"));
            }
            // SAFETY: loading a shared library runs its initialisers; the file is the NCCL library the user named.
            let lib = unsafe { libloading::Library::new(&path) }
                .map_err(|e| format!("{NCCL_LIB_ENV}={shown}: cannot load it: {e:?}"))?;
            (lib, shown)
        }
        None => {
            let mut errors = Vec::new();
            let mut found = None;
            for name in SYSTEM_NAMES {
                // SAFETY: as above, for the system's libnccl.
                match unsafe { libloading::Library::new(name) } {
                    Ok(lib) => {
                        found = Some((lib, name.to_string()));
                        break;
                    }
                    Err(e) => errors.push(format!("{name}: {e:?}")),
                }
            }
            found.ok_or_else(|| {
                format!(
                    "{} not on the loader path and {NCCL_LIB_ENV} not set ({})",
                    SYSTEM_NAMES.join(" / "),
                    errors.join("; ")
                )
            })?
        }
    };
    // SAFETY: `lib` is libnccl (loaded by its name, or named by the user as such).
    let fns = unsafe { Fns::resolve(&lib) }.map_err(|e| format!("{source}: {e} (NCCL too old?)"))?;
    let mut code: c_int = 0;
    // SAFETY: writes the version into the local.
    let r = unsafe { (fns.get_version)(&mut code) };
    if r != NCCL_SUCCESS {
        return Err(format!("{source}: ncclGetVersion failed with code {r}"));
    }
    let version = split_version(code);
    if (version.0, version.1) < MIN_NCCL_VERSION {
        return Err(format!(
            "{source} is NCCL {}.{}.{}; this communicator needs {}.{} or newer",
            version.0, version.1, version.2, MIN_NCCL_VERSION.0, MIN_NCCL_VERSION.1
        ));
    }
    // SAFETY: the declared types are those of nccl.h; absence is allowed.
    let error_string =
        unsafe { lib.get::<unsafe extern "C" fn(c_int) -> *const c_char>(b"ncclGetErrorString\0") }.ok().map(|f| *f);
    // SAFETY: as above.
    let last_error =
        unsafe { lib.get::<unsafe extern "C" fn(ncclComm_t) -> *const c_char>(b"ncclGetLastError\0") }.ok().map(|f| *f);
    Ok(Nccl { _lib: lib, fns, version, source, error_string, last_error })
}

/// `ncclGetVersion`'s code as `(major, minor, patch)` (codes from 2.9 on are `major * 10000 + minor * 100 +
/// patch`; older ones `major * 1000 + minor * 100 + patch`).
pub(crate) fn split_version(code: c_int) -> (i32, i32, i32) {
    if code >= 10000 {
        (code / 10000, (code % 10000) / 100, code % 100)
    } else {
        (code / 1000, (code % 1000) / 100, code % 100)
    }
}

impl Nccl {
    /// NCCL's text for a result code, and the last error message of `comm` when there is one.
    pub(crate) fn describe(&self, code: c_int, comm: Option<ncclComm_t>) -> String {
        let text = |p: *const c_char| -> Option<String> {
            // SAFETY: NCCL returns NUL-terminated static (or per-thread) strings, or null.
            (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
        };
        // SAFETY: both functions only read their argument.
        let what = self.error_string.and_then(|f| text(unsafe { f(code) })).unwrap_or_else(|| "unknown".into());
        let last = match (self.last_error, comm) {
            // SAFETY: as above; `comm` is a live communicator or null.
            (Some(f), Some(c)) => text(unsafe { f(c) }).filter(|s| !s.is_empty()),
            _ => None,
        };
        match last {
            Some(l) => format!("NCCL error {code} ({what}): {l}"),
            None => format!("NCCL error {code} ({what})"),
        }
    }

    /// A config for a non-blocking communicator (`NCCL_CONFIG_INITIALIZER` with `blocking = 0`): every call
    /// returns at once and is completed by polling `ncclCommGetAsyncError`, so no call can hang.
    pub(crate) fn nonblocking_config() -> ncclConfig_t {
        ncclConfig_t {
            size: std::mem::size_of::<ncclConfig_t>(),
            magic: CONFIG_MAGIC,
            version: CONFIG_VERSION,
            blocking: 0,
            cgaClusterSize: CONFIG_UNDEF_INT,
            minCTAs: CONFIG_UNDEF_INT,
            maxCTAs: CONFIG_UNDEF_INT,
            netName: std::ptr::null(),
            splitShare: CONFIG_UNDEF_INT,
            trafficClass: CONFIG_UNDEF_INT,
            commName: std::ptr::null(),
            collnetEnable: CONFIG_UNDEF_INT,
            CTAPolicy: CONFIG_UNDEF_INT,
            shrinkShare: CONFIG_UNDEF_INT,
            nvlsCTAs: CONFIG_UNDEF_INT,
            nChannelsPerNetPeer: CONFIG_UNDEF_INT,
            nvlinkCentricSched: CONFIG_UNDEF_INT,
            graphUsageMode: CONFIG_UNDEF_INT,
            numRmaCtx: CONFIG_UNDEF_INT,
            maxP2pPeers: CONFIG_UNDEF_INT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_split_both_encodings() {
        assert_eq!(split_version(22703), (2, 27, 3));
        assert_eq!(split_version(23000), (2, 30, 0));
        assert_eq!(split_version(2804), (2, 8, 4));
    }

    #[test]
    fn probe_never_panics_and_explains_itself() {
        let p = probe();
        assert_eq!(p.found, p.reason.is_none());
        assert_eq!(p.check().is_ok(), p.found);
        if let Err(e) = p.check() {
            assert!(e.contains("SWITCHYARD_NCCL_LIB"), "{e}");
            eprintln!("no NCCL here: {e}");
        } else {
            assert!(p.summary().starts_with("NCCL 2."), "{}", p.summary());
        }
    }

    #[test]
    fn a_named_library_that_is_not_there_is_reported() {
        // Only the loader is exercised (in a child process, so the probe of this process is not disturbed).
        let exe = std::env::current_exe().unwrap();
        if std::env::var_os("SWITCHYARD_NCCL_PROBE_CHILD").is_some() {
            let p = probe();
            assert!(!p.found);
            let reason = p.reason.unwrap();
            assert!(reason.contains("/no/such/libnccl.so.2: no such file"), "{reason}");
            return;
        }
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "comm::nccl::library::tests::a_named_library_that_is_not_there_is_reported",
                "--nocapture",
            ])
            .env("SWITCHYARD_NCCL_PROBE_CHILD", "1")
            .env(NCCL_LIB_ENV, "/no/such/libnccl.so.2")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "{}", String::from_utf8_lossy(&out.stdout));
    }

    #[test]
    fn the_config_is_marked_initialised_and_non_blocking() {
        let c = Nccl::nonblocking_config();
        assert_eq!(c.magic, 0xcafe_beef);
        assert_eq!(c.blocking, 0);
        assert_eq!(c.size, std::mem::size_of::<ncclConfig_t>());
        assert_eq!(c.minCTAs, i32::MIN);
    }
}
