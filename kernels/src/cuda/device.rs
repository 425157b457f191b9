//! Which device runs the layer: the probe of the CUDA pieces, device selection, and the opened
//! device (context, stream, cuBLAS handle, loaded kernels).
//!
//! Everything here is safe to call on a machine without a GPU: [`probe`] checks that each library
//! can be loaded *before* cudarc touches it (cudarc panics when a library is missing), and wraps
//! the driver queries so that a missing symbol is a reason string, not a panic.

use crate::cuda::error::{CudaError, CudaResult, cublas, driver};
use crate::cuda::launch::Kernels;
use crate::cuda::nvrtc::{NvrtcInfo, arch_for, compile_all, nvrtc_info};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use serde::{Deserialize, Serialize};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

/// What the user asked for (`--device cpu|cuda|cuda:N|auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceRequest {
    /// The CPU kernels.
    Cpu,
    /// CUDA device `N` (`cuda` alone is device 0); an error when it cannot be used.
    Cuda(usize),
    /// CUDA device 0 when everything it needs is there, else the CPU (with the reason).
    #[default]
    Auto,
}

impl std::str::FromStr for DeviceRequest {
    type Err = String;

    /// Parses `cpu`, `cuda`, `cuda:N` or `auto` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, String> {
        let l = s.trim().to_ascii_lowercase();
        match l.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            "auto" => Ok(Self::Auto),
            _ => match l.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!("unknown device {s:?}: expected cpu, cuda, cuda:N or auto")),
            },
        }
    }
}

impl std::fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => write!(f, "auto"),
        }
    }
}

/// Where the layer runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// The CPU kernels of this crate.
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One GPU the driver reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name (e.g. `NVIDIA H200`).
    pub name: String,
    /// `(major, minor)`.
    pub compute_capability: (i32, i32),
    /// Device memory.
    pub total_memory_bytes: usize,
}

/// What is there of CUDA on this machine. Each `*_reason` says why a piece is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceProbe {
    /// Whether `libcuda.so` (the driver) could be loaded.
    pub driver_found: bool,
    /// The CUDA version the driver supports (`cuDriverGetVersion`, e.g. `13000`).
    pub driver_version: Option<i32>,
    /// Why the driver is unusable (`None` when it loaded).
    pub driver_reason: Option<String>,
    /// The GPUs (empty when none).
    pub devices: Vec<GpuInfo>,
    /// Why there are no GPUs (`None` when there are).
    pub devices_reason: Option<String>,
    /// NVRTC, when found.
    pub nvrtc: Option<NvrtcInfo>,
    /// Why NVRTC is unusable.
    pub nvrtc_reason: Option<String>,
    /// Whether `libcublas` could be loaded.
    pub cublas_found: bool,
    /// Why cuBLAS is unusable.
    pub cublas_reason: Option<String>,
}

impl DeviceProbe {
    /// Number of GPUs.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// `Ok` when CUDA device `ordinal` can run the layer, else the first missing piece (driver,
    /// device, NVRTC, cuBLAS) as the error [`select`] returns.
    pub fn check(&self, ordinal: usize) -> CudaResult<()> {
        if !self.driver_found {
            return Err(CudaError::NoDriver(self.driver_reason.clone().unwrap_or_default()));
        }
        if self.devices.is_empty() {
            return Err(CudaError::NoDevice(
                self.devices_reason.clone().unwrap_or_else(|| "the driver reports 0 devices".into()),
            ));
        }
        if ordinal >= self.devices.len() {
            return Err(CudaError::BadOrdinal { ordinal, count: self.devices.len() });
        }
        if self.nvrtc.is_none() {
            return Err(CudaError::NvrtcMissing(self.nvrtc_reason.clone().unwrap_or_default()));
        }
        if !self.cublas_found {
            return Err(CudaError::CublasMissing(self.cublas_reason.clone().unwrap_or_default()));
        }
        Ok(())
    }

    /// One line for people: the devices and libraries found, or why not.
    pub fn summary(&self) -> String {
        let driver = match (self.driver_found, self.driver_version) {
            (true, Some(v)) => format!("driver CUDA {}.{}", v / 1000, (v % 1000) / 10),
            (true, None) => "driver found".to_string(),
            (false, _) => format!("no driver ({})", self.driver_reason.as_deref().unwrap_or("not found")),
        };
        let devices = if self.devices.is_empty() {
            format!("no GPU ({})", self.devices_reason.as_deref().unwrap_or("none reported"))
        } else {
            let names: Vec<String> = self
                .devices
                .iter()
                .map(|g| format!("{}: {} (sm_{}{})", g.ordinal, g.name, g.compute_capability.0, g.compute_capability.1))
                .collect();
            names.join(", ")
        };
        let nvrtc = match &self.nvrtc {
            Some(n) => format!("NVRTC {}.{}", n.version.0, n.version.1),
            None => format!("no NVRTC ({})", self.nvrtc_reason.as_deref().unwrap_or("not found")),
        };
        let cublas = if self.cublas_found {
            "cuBLAS found".to_string()
        } else {
            format!("no cuBLAS ({})", self.cublas_reason.as_deref().unwrap_or("not found"))
        };
        format!("{driver}; {devices}; {nvrtc}; {cublas}")
    }
}

/// Looks for the driver, the GPUs, NVRTC and cuBLAS. Never panics and creates no context.
pub fn probe() -> DeviceProbe {
    let mut p = DeviceProbe {
        driver_found: false,
        driver_version: None,
        driver_reason: None,
        devices: Vec::new(),
        devices_reason: None,
        nvrtc: None,
        nvrtc_reason: None,
        cublas_found: false,
        cublas_reason: None,
    };
    // SAFETY: tries to load libcuda by the names cudarc uses (running its initialisers) and unloads
    // it again; no symbol is called.
    p.driver_found = unsafe { cudarc::driver::sys::is_culib_present() };
    if p.driver_found {
        match catch_unwind(query_driver) {
            Ok((version, Ok(devices))) => {
                p.driver_version = version;
                if devices.is_empty() {
                    p.devices_reason = Some("the driver reports 0 devices".into());
                }
                p.devices = devices;
            }
            Ok((version, Err(reason))) => {
                p.driver_version = version;
                p.devices_reason = Some(reason);
            }
            Err(_) => p.devices_reason = Some("libcuda lacks a symbol this build needs (driver too old?)".into()),
        }
    } else {
        p.driver_reason = Some("libcuda.so[.1] is not on the loader path".into());
        p.devices_reason = Some("no driver".into());
    }
    match nvrtc_info() {
        Ok(info) => p.nvrtc = Some(info),
        Err(reason) => p.nvrtc_reason = Some(reason),
    }
    // SAFETY: as for the driver: loads and unloads libcublas, calls nothing.
    p.cublas_found = unsafe { cudarc::cublas::sys::is_culib_present() };
    if !p.cublas_found {
        p.cublas_reason = Some("libcublas.so[.13] is not on the loader path".into());
    }
    p
}

/// The driver's CUDA version and its GPUs (the driver library is present).
fn query_driver() -> (Option<i32>, Result<Vec<GpuInfo>, String>) {
    use cudarc::driver::{result, sys};
    let mut v = 0i32;
    // SAFETY: writes the version into the local; callable before cuInit.
    let version = unsafe { sys::cuDriverGetVersion(&mut v) }.result().ok().map(|_| v);
    let devices = (|| -> Result<Vec<GpuInfo>, String> {
        result::init().map_err(|e| format!("cuInit failed: {e:?}"))?;
        let count = result::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e:?}"))?;
        let mut out = Vec::new();
        for i in 0..count.max(0) {
            let dev = result::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e:?}"))?;
            let name = result::device::get_name(dev).unwrap_or_else(|_| "unknown".into());
            let attr = |a: sys::CUdevice_attribute| {
                // SAFETY: `dev` is a valid device handle from cuDeviceGet.
                unsafe { result::device::get_attribute(dev, a) }.unwrap_or(0)
            };
            let major = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR);
            let minor = attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR);
            // SAFETY: as above.
            let total_memory_bytes = unsafe { result::device::total_mem(dev) }.unwrap_or(0);
            out.push(GpuInfo { ordinal: i as usize, name, compute_capability: (major, minor), total_memory_bytes });
        }
        Ok(out)
    })();
    (version, devices)
}

/// The outcome of [`select`]: the device, and a line the caller can print.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSelection {
    /// Where to run.
    pub device: Device,
    /// Why (e.g. `"cuda:0: NVIDIA H200"` or, for `auto` without a GPU, what is missing).
    pub reason: String,
}

/// Picks the device for `request`. `Cpu` is always granted; `Cuda(n)` is an error naming the
/// missing piece and the fix (e.g. "no CUDA driver (libcuda.so) found: install the NVIDIA driver or
/// use --device cpu"); `Auto` takes CUDA device 0 when usable and otherwise the CPU, with the
/// reason.
pub fn select(request: DeviceRequest) -> CudaResult<DeviceSelection> {
    match request {
        DeviceRequest::Cpu => Ok(DeviceSelection { device: Device::Cpu, reason: "requested --device cpu".into() }),
        DeviceRequest::Cuda(n) => {
            let p = probe();
            p.check(n)?;
            Ok(DeviceSelection { device: Device::Cuda(n), reason: format!("cuda:{n}: {}", p.devices[n].name) })
        }
        DeviceRequest::Auto => {
            let p = probe();
            match p.check(0) {
                Ok(()) => {
                    Ok(DeviceSelection { device: Device::Cuda(0), reason: format!("cuda:0: {}", p.devices[0].name) })
                }
                Err(e) => Ok(DeviceSelection { device: Device::Cpu, reason: format!("running on the CPU: {e}") }),
            }
        }
    }
}

/// An opened CUDA device: context, the stream every operation of this crate runs on, a cuBLAS
/// handle on that stream, and the kernels (compiled once per process, loaded into this context).
///
/// All work is queued on one stream, in order; reading a result back to the host waits for it.
pub struct CudaDevice {
    info: GpuInfo,
    arch: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    /// One float, passed for an optional pointer argument the kernel does not read.
    dummy: CudaSlice<f32>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("info", &self.info).field("arch", &self.arch).finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Opens CUDA device `ordinal`: checks the libraries ([`DeviceProbe::check`]), compiles the
    /// kernels for its architecture (cached per process), creates the context, loads the kernels.
    pub fn open(ordinal: usize) -> CudaResult<Self> {
        let p = probe();
        p.check(ordinal)?;
        let info = p.devices[ordinal].clone();
        let nvrtc = p.nvrtc.clone().ok_or_else(|| CudaError::NvrtcMissing("not found".into()))?;
        let arch = arch_for(info.compute_capability, &nvrtc.supported_archs).map_err(CudaError::Unsupported)?;
        let compiled = compile_all(&arch)?;
        let opened = catch_unwind(AssertUnwindSafe(|| -> CudaResult<Self> {
            let ctx = CudaContext::new(ordinal).map_err(driver("creating the context"))?;
            let stream = ctx.default_stream();
            let blas = CudaBlas::new(stream.clone()).map_err(cublas("creating the cuBLAS handle"))?;
            let mut modules = Vec::with_capacity(compiled.len());
            for c in compiled.iter() {
                let module = ctx.load_module(c.to_ptx()).map_err(|e| CudaError::Driver {
                    op: "loading the kernels",
                    detail: format!(
                        "{} ({arch}, NVRTC {}.{}, driver CUDA {}): {e:?}{}",
                        c.source.file,
                        nvrtc.version.0,
                        nvrtc.version.1,
                        p.driver_version.map_or("?".to_string(), |v| format!("{}.{}", v / 1000, (v % 1000) / 10)),
                        if format!("{e:?}").contains("UNSUPPORTED_PTX_VERSION") {
                            "; the NVRTC is newer than the driver: use a libnvrtc of the driver's CUDA version \
                             or update the driver"
                        } else {
                            ""
                        }
                    ),
                })?;
                modules.push((c.source, module));
            }
            let kernels = Kernels::load(&modules)?;
            let dummy = stream.alloc_zeros::<f32>(1).map_err(driver("allocating device memory"))?;
            Ok(Self { info: info.clone(), arch: arch.clone(), ctx, stream, blas, kernels, dummy })
        }));
        opened.map_err(|_| CudaError::Driver {
            op: "opening the device",
            detail: "cudarc panicked (a CUDA library lacks a symbol this build needs?)".into(),
        })?
    }

    /// The GPU.
    pub fn info(&self) -> &GpuInfo {
        &self.info
    }

    /// The NVRTC target the kernels were compiled for (`compute_XY`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// The stream all work of this device runs on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    pub(crate) fn dummy(&self) -> &CudaSlice<f32> {
        &self.dummy
    }

    /// Copies `host` to a new device buffer (at least one element long: an empty `host` gives one
    /// zero, so that no zero-byte allocation is made).
    pub fn upload<T: DeviceRepr + ValidAsZeroBits + Default + Clone>(&self, host: &[T]) -> CudaResult<CudaSlice<T>> {
        if host.is_empty() {
            return self.zeros(1);
        }
        self.stream.clone_htod(host).map_err(driver("copying to the device"))
    }

    /// A device buffer of `len` zeros (at least one element).
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> CudaResult<CudaSlice<T>> {
        self.stream.alloc_zeros(len.max(1)).map_err(driver("allocating device memory"))
    }

    /// The first `len` elements of `buf`, copied to the host (waits for the queued work).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>, len: usize) -> CudaResult<Vec<T>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        if len > buf.len() {
            return Err(crate::error::KernelError::ShapeMismatch {
                operand: "download",
                expected: format!("at least {len} elements"),
                actual: format!("{} elements", buf.len()),
            }
            .into());
        }
        let mut out = vec![T::default(); len];
        self.stream.memcpy_dtoh(&buf.slice(..len), &mut out).map_err(driver("copying to the host"))?;
        self.synchronize()?;
        Ok(out)
    }

    /// Copies `host` into the start of `buf` (which must be long enough).
    pub fn copy_to<T: DeviceRepr>(&self, host: &[T], buf: &mut CudaSlice<T>) -> CudaResult<()> {
        if host.is_empty() {
            return Ok(());
        }
        if host.len() > buf.len() {
            return Err(crate::error::KernelError::ShapeMismatch {
                operand: "upload",
                expected: format!("at most {} elements", buf.len()),
                actual: format!("{} elements", host.len()),
            }
            .into());
        }
        let mut dst = buf.slice_mut(..host.len());
        self.stream.memcpy_htod(host, &mut dst).map_err(driver("copying to the device"))
    }

    /// Makes `buf` hold at least `len` elements (reallocating, contents lost, when it is shorter).
    pub fn ensure<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &mut CudaSlice<T>, len: usize) -> CudaResult<()> {
        if buf.len() < len {
            *buf = self.zeros(len)?;
        }
        Ok(())
    }

    /// Sets the first `len` elements of `buf` to zero.
    pub fn fill_zero<T: DeviceRepr + ValidAsZeroBits>(&self, buf: &mut CudaSlice<T>, len: usize) -> CudaResult<()> {
        if len == 0 {
            return Ok(());
        }
        let len = len.min(buf.len());
        let mut v = buf.slice_mut(..len);
        self.stream.memset_zeros(&mut v).map_err(driver("zeroing device memory"))
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.stream.synchronize().map_err(driver("synchronising the stream"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CudaDevice>();
        send_sync::<crate::cuda::CudaMoeLayer>();
        send_sync::<crate::cuda::CudaMoeState>();
        send_sync::<crate::cuda::CudaMoeGrads>();
    }

    #[test]
    fn requests_parse_and_print() {
        assert_eq!("cpu".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cpu);
        assert_eq!("CUDA".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceRequest>().unwrap(), DeviceRequest::Cuda(3));
        assert_eq!("auto".parse::<DeviceRequest>().unwrap(), DeviceRequest::Auto);
        assert!("tpu".parse::<DeviceRequest>().is_err());
        assert!("cuda:x".parse::<DeviceRequest>().is_err());
        assert_eq!(DeviceRequest::Cuda(2).to_string(), "cuda:2");
        assert_eq!(Device::Cuda(1).to_string(), "cuda:1");
    }

    #[test]
    fn probe_never_panics_and_select_agrees_with_it() {
        let p = probe();
        let summary = p.summary();
        assert!(!summary.is_empty());
        assert_eq!(select(DeviceRequest::Cpu).unwrap().device, Device::Cpu);
        let auto = select(DeviceRequest::Auto).unwrap();
        match p.check(0) {
            Ok(()) => assert_eq!(auto.device, Device::Cuda(0)),
            Err(e) => {
                assert_eq!(auto.device, Device::Cpu);
                assert!(auto.reason.contains(&e.to_string()));
                assert_eq!(select(DeviceRequest::Cuda(0)).unwrap_err(), e);
            }
        }
        if !p.driver_found {
            let e = select(DeviceRequest::Cuda(0)).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("no CUDA driver (libcuda.so) found: install the NVIDIA driver or use --device cpu")
            );
        }
    }

    #[test]
    fn missing_pieces_are_reported_in_order() {
        let mut p = DeviceProbe {
            driver_found: true,
            driver_version: Some(13000),
            driver_reason: None,
            devices: vec![GpuInfo {
                ordinal: 0,
                name: "Test GPU".into(),
                compute_capability: (9, 0),
                total_memory_bytes: 1 << 30,
            }],
            devices_reason: None,
            nvrtc: Some(NvrtcInfo { version: (13, 0), supported_archs: vec![80, 90], source: "test".into() }),
            nvrtc_reason: None,
            cublas_found: true,
            cublas_reason: None,
        };
        assert!(p.check(0).is_ok());
        assert!(matches!(p.check(1), Err(CudaError::BadOrdinal { ordinal: 1, count: 1 })));
        assert!(p.summary().contains("Test GPU (sm_90)"));
        p.cublas_found = false;
        assert!(matches!(p.check(0), Err(CudaError::CublasMissing(_))));
        p.nvrtc = None;
        assert!(matches!(p.check(0), Err(CudaError::NvrtcMissing(_))));
        p.devices.clear();
        assert!(matches!(p.check(0), Err(CudaError::NoDevice(_))));
        p.driver_found = false;
        assert!(matches!(p.check(0), Err(CudaError::NoDriver(_))));
    }
}
