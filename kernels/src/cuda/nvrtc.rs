//! The CUDA C sources, their compilation by NVRTC, and the per-process cache of the PTX.
//!
//! The kernels live in `kernels/cuda/*.cu` and are embedded with `include_str!`. They are compiled
//! on first use for one virtual architecture (`--gpu-architecture=compute_XY`): PTX, which the
//! driver JIT-compiles for the GPU it loads on. [`compile_all`] caches the PTX per architecture for
//! the life of the process (a `OnceLock`ed map), so a second [`crate::cuda::CudaDevice::open`] costs
//! no compilation.
//!
//! Targets: on a GPU, [`arch_for`] picks the device's own compute capability, or the newest one
//! NVRTC supports below it; without a GPU (the compile test, CI) the target is
//! [`DEFAULT_ARCH`] = `compute_80` (Ampere; PTX for it runs on every later GPU). CUDA 13's NVRTC
//! supports `compute_75` and later.
//!
//! # Finding libnvrtc
//!
//! cudarc loads `libnvrtc` at run time by file name only (`libnvrtc.so`, `libnvrtc.so.13`, ...
//! through the system loader: `LD_LIBRARY_PATH`, the `ldconfig` cache, `/usr/lib`; it reads no
//! `CUDA_PATH`-like variable at run time). Two ways to point it at a library:
//!
//! * `LD_LIBRARY_PATH=<dir of libnvrtc.so.13>` (set before the process starts);
//! * `SWITCHYARD_NVRTC_LIB=/path/to/libnvrtc.so.13`: loaded here by path first and kept loaded, so
//!   the loader then finds it by its soname (`libnvrtc.so.13`) when cudarc asks.
//!
//! The `nvidia-cuda-nvrtc` wheel on PyPI ships `nvidia/cu13/lib/libnvrtc.so.13` (with its
//! `libnvrtc-builtins`, found through the library's `$ORIGIN` rpath); `.ci/run` uses it.

use crate::cuda::error::{CudaError, CudaResult};
use cudarc::nvrtc::Ptx;
use serde::Serialize;
use std::collections::HashMap;
use std::ffi::{CString, c_char};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// The environment variable naming a `libnvrtc` to load by path.
pub const NVRTC_LIB_ENV: &str = "SWITCHYARD_NVRTC_LIB";

/// The target when no GPU tells us better: `compute_80`.
pub const DEFAULT_ARCH: &str = "compute_80";

/// Threads per block of the reduction kernels; the `.cu` files `#define REDUCE_BLOCK` to the same.
pub const REDUCE_BLOCK: u32 = 256;

/// One CUDA C source file and the kernels it defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSource {
    /// File name under `kernels/cuda/`.
    pub file: &'static str,
    /// The CUDA C text.
    pub source: &'static str,
    /// The `extern "C" __global__` functions it defines.
    pub kernels: &'static [&'static str],
}

/// Every kernel source of the crate, in load order.
pub const SOURCES: [KernelSource; 4] = [
    KernelSource {
        file: "gate.cu",
        source: include_str!("../../cuda/gate.cu"),
        kernels: &["gate_softmax_topk", "gate_positions", "gate_loss_stats", "gate_backward"],
    },
    KernelSource {
        file: "dispatch.cu",
        source: include_str!("../../cuda/dispatch.cu"),
        kernels: &[
            "build_rows",
            "dispatch_gather",
            "combine_forward",
            "combine_backward_rows",
            "combine_backward_weights",
            "gather_backward",
        ],
    },
    KernelSource {
        file: "elementwise.cu",
        source: include_str!("../../cuda/elementwise.cu"),
        kernels: &[
            "bias_gelu_forward",
            "gelu_backward",
            "swiglu_forward",
            "swiglu_backward",
            "bias_fill_rows",
            "bias_grad",
            "add_inplace",
            "flag_nonfinite",
        ],
    },
    KernelSource { file: "adam.cu", source: include_str!("../../cuda/adam.cu"), kernels: &["adamw_step"] },
];

/// Number of kernels over all [`SOURCES`].
pub fn kernel_count() -> usize {
    SOURCES.iter().map(|s| s.kernels.len()).sum()
}

/// The NVRTC options for `arch` (`compute_XY`): the target and the C++ dialect. FMA contraction is
/// NVRTC's default (on), as in cuBLAS.
pub fn compile_options(arch: &str) -> Vec<String> {
    vec![format!("--gpu-architecture={arch}"), "--std=c++17".to_string()]
}

/// What was found of NVRTC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvrtcInfo {
    /// `(major, minor)` of the library.
    pub version: (i32, i32),
    /// Compute capabilities it can target, as `10 * major + minor` (e.g. `[75, 80, ..., 120]`).
    pub supported_archs: Vec<i32>,
    /// Where it came from: the path in `SWITCHYARD_NVRTC_LIB`, or `"system loader"`.
    pub source: String,
}

/// The library loaded from [`NVRTC_LIB_ENV`], kept for the life of the process (so that the
/// loader finds it again by soname), or why it could not be loaded.
fn preload() -> &'static Result<Option<PathBuf>, String> {
    static PRELOADED: OnceLock<Result<Option<PathBuf>, String>> = OnceLock::new();
    static LIBRARY: OnceLock<libloading::Library> = OnceLock::new();
    PRELOADED.get_or_init(|| {
        let Some(path) = std::env::var_os(NVRTC_LIB_ENV).filter(|p| !p.is_empty()) else {
            return Ok(None);
        };
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("{NVRTC_LIB_ENV}={}: no such file", path.display()));
        }
        // SAFETY: loading a shared library runs its initialisers; the file is the NVRTC library the
        // user named, which cudarc would load (and initialise) by name anyway.
        match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => {
                let _ = LIBRARY.set(lib);
                Ok(Some(path))
            }
            Err(e) => Err(format!("{NVRTC_LIB_ENV}={}: cannot load it: {e:?}", path.display())),
        }
    })
}

/// Finds NVRTC (after loading [`NVRTC_LIB_ENV`] when set) and asks its version and targets.
/// Never panics: a missing library or symbol is an `Err` with the reason.
pub fn nvrtc_info() -> Result<NvrtcInfo, String> {
    static INFO: OnceLock<Result<NvrtcInfo, String>> = OnceLock::new();
    INFO.get_or_init(|| {
        let source = match preload() {
            Ok(Some(path)) => path.display().to_string(),
            Ok(None) => "system loader".to_string(),
            Err(e) => return Err(e.clone()),
        };
        // SAFETY: tries to load libnvrtc by the names cudarc uses (running its initialisers), and
        // unloads it again; no symbol is called.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(format!(
                "no libnvrtc.so[.13] on the loader path (LD_LIBRARY_PATH={})",
                std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
            ));
        }
        // cudarc panics when a symbol is missing from the library; keep that an error.
        catch_unwind(AssertUnwindSafe(query_nvrtc))
            .map_err(|_| "libnvrtc lacks a symbol this build needs (too old?)".to_string())?
            .map(|(version, supported_archs)| NvrtcInfo { version, supported_archs, source })
    })
    .clone()
}

/// Version and supported targets of the loaded NVRTC.
fn query_nvrtc() -> Result<((i32, i32), Vec<i32>), String> {
    use cudarc::nvrtc::sys;
    let (mut major, mut minor, mut n) = (0i32, 0i32, 0i32);
    // SAFETY: plain NVRTC queries writing into the locals passed by pointer; the library is present
    // (checked by the caller).
    unsafe {
        sys::nvrtcVersion(&mut major, &mut minor).result().map_err(|e| format!("nvrtcVersion: {e:?}"))?;
        sys::nvrtcGetNumSupportedArchs(&mut n).result().map_err(|e| format!("nvrtcGetNumSupportedArchs: {e:?}"))?;
    }
    let mut archs = vec![0i32; n.max(0) as usize];
    if !archs.is_empty() {
        // SAFETY: `archs` has room for the `n` entries NVRTC reported.
        unsafe { sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
            .result()
            .map_err(|e| format!("nvrtcGetSupportedArchs: {e:?}"))?;
    }
    Ok(((major, minor), archs))
}

/// The target for a GPU of compute capability `(major, minor)`: `compute_<10 major + minor>`, or
/// the newest target in `supported` below it (PTX runs on later GPUs). `supported` empty (unknown):
/// the device's own. An error when the GPU is older than every target NVRTC supports.
pub fn arch_for(compute_capability: (i32, i32), supported: &[i32]) -> Result<String, String> {
    let want = 10 * compute_capability.0 + compute_capability.1;
    if supported.is_empty() {
        return Ok(format!("compute_{want}"));
    }
    match supported.iter().copied().filter(|&a| a <= want).max() {
        Some(a) => Ok(format!("compute_{a}")),
        None => Err(format!(
            "the GPU's compute capability {}.{} is older than every target of this NVRTC (oldest: {}.{})",
            compute_capability.0,
            compute_capability.1,
            supported.iter().min().copied().unwrap_or(0) / 10,
            supported.iter().min().copied().unwrap_or(0) % 10
        )),
    }
}

/// One source compiled by NVRTC.
#[derive(Debug, Clone)]
pub struct CompiledSource {
    /// The source it came from.
    pub source: KernelSource,
    /// The target (`compute_XY`).
    pub arch: String,
    /// The PTX text.
    pub ptx: String,
    /// NVRTC's log (empty when there were no warnings).
    pub log: String,
}

impl CompiledSource {
    /// The PTX as cudarc loads it.
    pub fn to_ptx(&self) -> Ptx {
        Ptx::from_src(self.ptx.clone())
    }

    /// Whether the PTX defines the kernel `name` (an `.entry`).
    pub fn defines(&self, name: &str) -> bool {
        self.ptx.lines().any(|l| {
            let l = l.trim_start();
            (l.starts_with(".entry") || l.starts_with(".visible .entry"))
                && l.split_whitespace().last().is_some_and(|w| w.trim_end_matches('(') == name)
        })
    }
}

/// Text of an NVRTC character buffer (up to its NUL).
fn c_text(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Compiles one source for `arch` (not cached). Errors carry NVRTC's log.
pub fn compile_source(source: &KernelSource, arch: &str) -> CudaResult<CompiledSource> {
    use cudarc::nvrtc::result;
    nvrtc_info().map_err(CudaError::NvrtcMissing)?;
    let fail = |log: String| CudaError::Compile { file: source.file, arch: arch.to_string(), log };
    let src = CString::new(source.source).map_err(|_| fail("source contains a NUL byte".into()))?;
    let name = CString::new(source.file).map_err(|_| fail("file name contains a NUL byte".into()))?;
    let options = compile_options(arch);
    let outcome = catch_unwind(AssertUnwindSafe(|| -> CudaResult<(String, String)> {
        let prog = result::create_program(&src, Some(&name)).map_err(|e| fail(format!("nvrtcCreateProgram: {e:?}")))?;
        // SAFETY: `prog` was created just above and is destroyed once, at the end of this block;
        // `src` and `name` outlive it; the options are NUL-free strings.
        unsafe {
            let compiled = result::compile_program(prog, &options);
            let log = result::get_program_log(prog).map(|l| c_text(&l)).unwrap_or_default();
            let ptx = compiled.and_then(|_| result::get_ptx(prog));
            let _ = result::destroy_program(prog);
            match ptx {
                Ok(p) => Ok((c_text(&p), log)),
                Err(e) => Err(fail(if log.trim().is_empty() { format!("{e:?}") } else { log })),
            }
        }
    }));
    let (ptx, log) = outcome.map_err(|_| fail("NVRTC call panicked (a symbol missing from libnvrtc?)".into()))??;
    Ok(CompiledSource { source: *source, arch: arch.to_string(), ptx, log: log.trim().to_string() })
}

/// Every source compiled for `arch`, cached for the process (the first call per `arch` compiles).
pub fn compile_all(arch: &str) -> CudaResult<Arc<Vec<CompiledSource>>> {
    static CACHE: OnceLock<Mutex<HashMap<String, Arc<Vec<CompiledSource>>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(hit) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(arch) {
        return Ok(hit.clone());
    }
    let compiled = Arc::new(SOURCES.iter().map(|s| compile_source(s, arch)).collect::<CudaResult<Vec<_>>>()?);
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    Ok(map.entry(arch.to_string()).or_insert(compiled).clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_list_every_kernel_and_share_the_block_size() {
        assert_eq!(kernel_count(), 19);
        for s in &SOURCES {
            for k in s.kernels {
                assert!(s.source.contains(&format!("__global__ void {k}(")), "{} lacks {k}", s.file);
            }
            let n = s.source.matches("__global__").count();
            assert_eq!(n, s.kernels.len(), "{}: every kernel is listed", s.file);
            if s.source.contains("REDUCE_BLOCK") {
                assert!(s.source.contains(&format!("#define REDUCE_BLOCK {REDUCE_BLOCK}\n")), "{}", s.file);
            }
        }
    }

    #[test]
    fn arch_choice() {
        let nvrtc13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120];
        assert_eq!(arch_for((9, 0), &nvrtc13).unwrap(), "compute_90");
        assert_eq!(arch_for((8, 9), &nvrtc13).unwrap(), "compute_89");
        assert_eq!(arch_for((12, 5), &nvrtc13).unwrap(), "compute_120");
        assert_eq!(arch_for((9, 0), &[]).unwrap(), "compute_90");
        let old = arch_for((7, 0), &nvrtc13).unwrap_err();
        assert!(old.contains("7.0") && old.contains("7.5"), "{old}");
    }

    #[test]
    fn ptx_entry_lookup() {
        let c = CompiledSource {
            source: SOURCES[3],
            arch: DEFAULT_ARCH.into(),
            ptx: ".visible .entry adamw_step(\n\t.param .u64 adamw_step_param_0,".into(),
            log: String::new(),
        };
        assert!(c.defines("adamw_step"));
        assert!(!c.defines("adamw"));
    }
}
