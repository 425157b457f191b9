//! Where a worker's expert FFNs run: the CPU kernels (the default), or a CUDA GPU through cuBLAS
//! (`train --device cuda`, feature `cuda`).
//!
//! The distributed layer ([`super::layer`], [`super::fetch`]) groups the rows each local expert
//! serves, then calls [`experts_forward`] and, in the backward, [`experts_backward`] with the
//! stacked weights of the experts it runs. On a GPU those two calls copy the weights and the
//! grouped rows to the device, run the kernels crate's grouped FFN (`DeviceExperts`: one cuBLAS
//! GEMM per expert and projection, the bias/activation kernels compiled by NVRTC), keep the
//! activations on the device for the backward, and copy the outputs and gradients back. Routing,
//! the token exchange, the dense model, Adam and migration stay on the host, where the slot
//! stores (the master copy of every expert's training state) live, so re-placement works the same
//! on either device.
//!
//! The weights are copied to the device at every forward (they change at every optimizer step and
//! every migration); the cost is one host-to-device copy of the local experts per layer and step.
//! GPU results match the CPU's to about 1e-5 relative (FP32 GEMMs, no TF32), not bit for bit.

#[cfg(feature = "cuda")]
use std::sync::Arc;

use switchyard_kernels::{Compute, ExpertCache, ExpertGrads, ExpertParams};

use crate::error::RuntimeError;

#[cfg(feature = "cuda")]
use switchyard_kernels::cuda::{CudaDevice, DeviceExperts, ExpertActivations};

/// The device that runs the expert FFNs of a worker.
#[derive(Debug, Clone, Default)]
pub enum ExpertDevice {
    /// The CPU kernels with the worker's [`Compute`] settings.
    #[default]
    Cpu,
    /// A CUDA GPU (one per worker, or shared by in-process workers).
    #[cfg(feature = "cuda")]
    Cuda(Arc<CudaDevice>),
}

impl ExpertDevice {
    /// `"cpu"` or `"cuda:N"`.
    pub fn label(&self) -> String {
        match self {
            ExpertDevice::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            ExpertDevice::Cuda(d) => format!("cuda:{}", d.info().ordinal),
        }
    }

    /// Whether the experts run on a GPU.
    pub fn is_gpu(&self) -> bool {
        !matches!(self, ExpertDevice::Cpu)
    }

    /// Opens CUDA device `ordinal` for a worker. [`CudaDevice::open`] checks first that the driver, the
    /// device, NVRTC and cuBLAS are there (never panics without them): an error naming what is missing and the fix.
    #[cfg(feature = "cuda")]
    pub fn open_cuda(ordinal: usize) -> Result<Self, RuntimeError> {
        Ok(ExpertDevice::Cuda(Arc::new(CudaDevice::open(ordinal).map_err(cuda_err("opening the GPU"))?)))
    }
}

/// A CUDA failure as a runtime error, naming the step.
#[cfg(feature = "cuda")]
fn cuda_err(step: &'static str) -> impl Fn(switchyard_kernels::cuda::CudaError) -> RuntimeError {
    move |e| RuntimeError::Device { step, reason: e.to_string() }
}

/// What the forward of the local experts keeps for their backward.
#[derive(Debug, Default)]
pub struct ExpertRun {
    /// The CPU kernels' saved activations.
    pub(crate) cache: ExpertCache,
    /// The device's (when the forward ran on a GPU).
    #[cfg(feature = "cuda")]
    gpu: Option<GpuRun>,
}

/// Device buffers of one forward, kept for its backward.
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct GpuRun {
    dev: Arc<CudaDevice>,
    weights: DeviceExperts,
    input: cudarc::driver::CudaSlice<f32>,
    offsets: Vec<usize>,
    offsets_dev: cudarc::driver::CudaSlice<u32>,
    acts: ExpertActivations,
}

/// Forward of the experts `params` on `input` (`[N, d]` grouped by expert, `offsets: [E + 1]`) into
/// `output` (`[N, d]`), on `device`; `run` keeps what [`experts_backward`] needs.
pub fn experts_forward(
    device: &ExpertDevice,
    cx: &Compute,
    params: &ExpertParams,
    input: &[f32],
    offsets: &[usize],
    run: &mut ExpertRun,
    output: &mut Vec<f32>,
) -> Result<(), RuntimeError> {
    // The backward runs where this forward ran: on the GPU only when it leaves its buffers here.
    #[cfg(feature = "cuda")]
    {
        run.gpu = None;
    }
    match device {
        ExpertDevice::Cpu => {
            switchyard_kernels::experts_forward(cx, params, input, offsets, &mut run.cache, output)?;
            Ok(())
        }
        #[cfg(feature = "cuda")]
        ExpertDevice::Cuda(dev) => {
            let rows = offsets.last().copied().unwrap_or(0);
            // Nothing to compute (or nothing to compute with): the CPU kernels check and size the output.
            if rows == 0 || params.experts == 0 {
                switchyard_kernels::experts_forward(cx, params, input, offsets, &mut run.cache, output)?;
                return Ok(());
            }
            params.validate()?;
            let d = params.d_model;
            crate::error::check_len("expert input", "[rows, d_model]", rows * d, input.len())?;
            if offsets.len() != params.experts + 1 {
                return Err(RuntimeError::invalid(
                    "expert offsets",
                    format!("{} offsets for {} experts (expected experts + 1)", offsets.len(), params.experts),
                ));
            }
            let err = cuda_err("expert forward on the GPU");
            let weights = DeviceExperts::from_params(dev, params).map_err(&err)?;
            let x = dev.upload(input).map_err(&err)?;
            let off32: Vec<u32> = offsets.iter().map(|&o| o as u32).collect();
            let offsets_dev = dev.upload(&off32).map_err(&err)?;
            let row_expert =
                dev.upload(&switchyard_kernels::cuda::blas::row_expert_from_offsets(offsets)).map_err(&err)?;
            let mut acts = weights.new_activations(dev).map_err(&err)?;
            let mut y = dev.zeros::<f32>(rows * d).map_err(&err)?;
            weights.forward(dev, &x, offsets, &offsets_dev, &row_expert, &mut acts, &mut y).map_err(&err)?;
            *output = dev.download(&y, rows * d).map_err(&err)?;
            run.gpu =
                Some(GpuRun { dev: dev.clone(), weights, input: x, offsets: offsets.to_vec(), offsets_dev, acts });
            Ok(())
        }
    }
}

/// Backward of [`experts_forward`]: with the forward's `params`, `input` and `run`, the output gradient
/// `d_output` (`[N, d]`) gives (overwrites) the weight gradients `grads` and the input gradient `d_input`.
/// Runs where the forward ran.
#[allow(clippy::too_many_arguments)]
pub fn experts_backward(
    cx: &Compute,
    params: &ExpertParams,
    input: &[f32],
    run: &ExpertRun,
    d_output: &[f32],
    grads: &mut ExpertGrads,
    d_input: &mut Vec<f32>,
) -> Result<(), RuntimeError> {
    #[cfg(feature = "cuda")]
    if let Some(g) = &run.gpu {
        let (dev, w) = (&g.dev, &g.weights);
        let rows = g.offsets.last().copied().unwrap_or(0);
        let d = w.d_model;
        if w.experts != params.experts || w.d_model != params.d_model || w.d_ffn != params.d_ffn {
            return Err(RuntimeError::invalid("expert backward", "the experts differ from the forward's".to_string()));
        }
        crate::error::check_len("expert input", "[rows, d_model]", rows * d, input.len())?;
        crate::error::check_len("expert output gradient", "[rows, d_model]", rows * d, d_output.len())?;
        let err = cuda_err("expert backward on the GPU");
        let dy = dev.upload(d_output).map_err(&err)?;
        let mut dg = w.new_grads(dev).map_err(&err)?;
        let mut dx = dev.zeros::<f32>(rows * d).map_err(&err)?;
        w.backward(dev, &g.input, &g.offsets, &g.offsets_dev, &g.acts, &dy, &mut dg, &mut dx).map_err(&err)?;
        *grads = dg.to_host(dev, w).map_err(&err)?;
        *d_input = dev.download(&dx, rows * d).map_err(&err)?;
        return Ok(());
    }
    switchyard_kernels::experts_backward(cx, params, input, &run.cache, d_output, grads, d_input)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_kernels::{Activation, Storage};

    fn grouped(rows: &[usize], d: usize, seed: u64) -> (Vec<f32>, Vec<usize>) {
        let mut offsets = vec![0];
        for &r in rows {
            offsets.push(offsets.last().unwrap() + r);
        }
        let n = *offsets.last().unwrap();
        let mut rng = switchyard_kernels::random::seeded_rng(seed);
        (switchyard_kernels::random::normal_vec(&mut rng, n * d, 1.0), offsets)
    }

    fn run_on(
        device: &ExpertDevice,
        p: &ExpertParams,
        x: &[f32],
        offsets: &[usize],
        dy: &[f32],
    ) -> (Vec<f32>, ExpertGrads, Vec<f32>) {
        let cx = Compute::new(1);
        let (mut run, mut y, mut g, mut dx) = (ExpertRun::default(), Vec::new(), ExpertGrads::default(), Vec::new());
        experts_forward(device, &cx, p, x, offsets, &mut run, &mut y).unwrap();
        experts_backward(&cx, p, x, &run, dy, &mut g, &mut dx).unwrap();
        (y, g, dx)
    }

    /// The CPU path through this module is the kernels' own functions (the same bits).
    #[test]
    fn cpu_device_is_the_cpu_kernels() {
        let (d, h) = (8, 12);
        let p = ExpertParams::random(Activation::Gelu, 3, d, h, Storage::F32, 5).unwrap();
        let (x, offsets) = grouped(&[4, 0, 3], d, 1);
        let (dy, _) = grouped(&[4, 0, 3], d, 2);
        let (y, g, dx) = run_on(&ExpertDevice::Cpu, &p, &x, &offsets, &dy);
        let cx = Compute::new(1);
        let (mut cache, mut y2, mut g2, mut dx2) =
            (ExpertCache::default(), Vec::new(), ExpertGrads::default(), Vec::new());
        switchyard_kernels::experts_forward(&cx, &p, &x, &offsets, &mut cache, &mut y2).unwrap();
        switchyard_kernels::experts_backward(&cx, &p, &x, &cache, &dy, &mut g2, &mut dx2).unwrap();
        assert_eq!((y, dx), (y2, dx2));
        assert_eq!(g.d_w_in, g2.d_w_in);
        assert_eq!(g.d_b_out, g2.d_b_out);
        assert_eq!(ExpertDevice::Cpu.label(), "cpu");
        assert!(!ExpertDevice::Cpu.is_gpu());
    }

    /// On a GPU: forward and backward match the CPU kernels to 1e-4 relative (GELU and SwiGLU, an expert with
    /// no rows, and no rows at all). Skipped, with the reason, where no GPU can be used.
    #[cfg(feature = "cuda")]
    #[test]
    fn gpu_experts_match_the_cpu() {
        if let Err(e) = switchyard_kernels::cuda::probe().check(0) {
            assert!(std::env::var("SWITCHYARD_REQUIRE_GPU").as_deref() != Ok("1"), "SWITCHYARD_REQUIRE_GPU=1: {e}");
            eprintln!("skipped: no usable GPU ({e})");
            return;
        }
        let gpu = ExpertDevice::open_cuda(0).unwrap();
        assert!(gpu.is_gpu());
        assert_eq!(gpu.label(), "cuda:0");
        let close = |a: &[f32], b: &[f32], what: &str| {
            assert_eq!(a.len(), b.len(), "{what}");
            let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert!((x - y).abs() <= 1e-4 * scale, "{what}[{i}]: gpu {x} cpu {y}");
            }
        };
        for act in [Activation::Gelu, Activation::SwiGlu] {
            for rows in [vec![5usize, 0, 7, 1], vec![0, 0, 0, 0]] {
                let (d, h) = (16, 24);
                let p = ExpertParams::random(act, rows.len(), d, h, Storage::F32, 9).unwrap();
                let (x, offsets) = grouped(&rows, d, 3);
                let (dy, _) = grouped(&rows, d, 4);
                let (y, g, dx) = run_on(&gpu, &p, &x, &offsets, &dy);
                let (y_c, g_c, dx_c) = run_on(&ExpertDevice::Cpu, &p, &x, &offsets, &dy);
                close(&y, &y_c, "output");
                close(&dx, &dx_c, "input gradient");
                close(&g.d_w_in, &g_c.d_w_in, "d_w_in");
                close(&g.d_w_out, &g_c.d_w_out, "d_w_out");
                close(&g.d_b_in, &g_c.d_b_in, "d_b_in");
                close(&g.d_b_out, &g_c.d_b_out, "d_b_out");
            }
        }
    }

    /// Without a usable GPU, opening one is an error naming what is missing, never a panic.
    #[cfg(feature = "cuda")]
    #[test]
    fn opening_a_missing_gpu_is_an_error() {
        match switchyard_kernels::cuda::probe().check(0) {
            Ok(()) => assert!(ExpertDevice::open_cuda(0).is_ok()),
            Err(_) => {
                let e = ExpertDevice::open_cuda(0).unwrap_err();
                assert!(matches!(e, RuntimeError::Device { .. }), "{e}");
                assert!(e.to_string().contains("GPU"), "{e}");
            }
        }
    }
}
