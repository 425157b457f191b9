//! Expert FFNs on cuBLAS: a row-major GEMM over cuBLAS's column-major one, and the grouped
//! expert forward and backward over uneven token counts (one GEMM per non-empty expert, each on
//! the rows `offsets[e]..offsets[e + 1]` of the grouped buffer).
//!
//! Row-major vs column-major: a row-major `C = op(A) op(B)` buffer, read column-major, is `C^T`,
//! and `C^T = op(B)^T op(A)^T`; a row-major buffer read column-major is the transpose of what it
//! holds. So the row-major product is cuBLAS's product with the operands swapped (B first), the
//! transposes kept, `m` and `n` swapped, and each leading dimension the row stride.
//!
//! GEMMs run in plain FP32 (cuBLAS's default math mode: no TF32), so the results stay within f32
//! rounding of the CPU kernels. The layouts are the CPU ones (`kernels/src/experts.rs`): GELU
//! `W_in: [E, d, h]`, `b_in: [E, h]`, `W_out: [E, h, d]`, `b_out: [E, d]`; SwiGLU `W_in = [W1 | W3]:
//! [E, d, 2h]`, `W_out: [E, h, d]`, no biases.

use crate::bf16::Stored;
use crate::cuda::device::CudaDevice;
use crate::cuda::error::{CudaResult, cublas};
use crate::error::KernelError;
use crate::experts::{Activation, ExpertGrads, ExpertParams};
use crate::gemm::Trans;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

/// Elements a row-major operand of logical shape `rows x cols` needs with row stride `ld`
/// (stored transposed when `t == Trans::Yes`); `None` when `ld` is too small.
fn needed_len(t: Trans, rows: usize, cols: usize, ld: usize) -> Option<usize> {
    let (srows, scols) = match t {
        Trans::No => (rows, cols),
        Trans::Yes => (cols, rows),
    };
    if srows == 0 || scols == 0 {
        return Some(0);
    }
    if ld < scols {
        return None;
    }
    srows.checked_sub(1)?.checked_mul(ld)?.checked_add(scols)
}

fn check_operand(operand: &'static str, t: Trans, rows: usize, cols: usize, ld: usize, len: usize) -> CudaResult<()> {
    match needed_len(t, rows, cols, ld) {
        Some(n) if n <= len => Ok(()),
        _ => Err(KernelError::ShapeMismatch {
            operand,
            expected: format!("{rows}x{cols} (trans {t:?}) with leading dimension {ld}"),
            actual: format!("{len} elements"),
        }
        .into()),
    }
}

fn int(field: &'static str, v: usize) -> CudaResult<i32> {
    i32::try_from(v)
        .map_err(|_| KernelError::InvalidConfig { field, reason: format!("{v} exceeds cuBLAS's int") }.into())
}

fn op(t: Trans) -> cublasOperation_t {
    match t {
        Trans::No => cublasOperation_t::CUBLAS_OP_N,
        Trans::Yes => cublasOperation_t::CUBLAS_OP_T,
    }
}

/// Row-major FP32 GEMM on the device's stream: `C[m x n] = op(A)[m x k] op(B)[k x n] + beta C`
/// (`beta` 0 overwrites, 1 accumulates; with `k = 0`, `C = beta C` as in BLAS). `lda`, `ldb`,
/// `ldc` are the row strides as stored. Every operand's length is checked before cuBLAS runs.
#[allow(clippy::too_many_arguments)]
pub fn sgemm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
    dev: &CudaDevice,
    ta: Trans,
    tb: Trans,
    m: usize,
    n: usize,
    k: usize,
    a: &A,
    lda: usize,
    b: &B,
    ldb: usize,
    beta: f32,
    c: &mut C,
    ldc: usize,
) -> CudaResult<()> {
    check_operand("gemm A", ta, m, k, lda, a.len())?;
    check_operand("gemm B", tb, k, n, ldb, b.len())?;
    check_operand("gemm C", Trans::No, m, n, ldc, c.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 && beta == 1.0 {
        return Ok(());
    }
    let cfg = GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: int("gemm n", n)?,
        n: int("gemm m", m)?,
        k: int("gemm k", k)?,
        alpha: 1.0f32,
        lda: int("gemm ldb", ldb.max(1))?,
        ldb: int("gemm lda", lda.max(1))?,
        beta,
        ldc: int("gemm ldc", ldc.max(1))?,
    };
    // SAFETY: row-major operands read column-major (see the module docs): cuBLAS reads B as an
    // (n x k) or (k x n) column-major matrix with leading dimension ldb, A likewise with lda, and
    // writes C as (n x m) with ldc; the lengths checked above cover exactly those extents.
    unsafe { dev.blas().gemm(cfg, b, a, c) }.map_err(cublas("sgemm"))
}

/// `buf[range]` as a view, an error (not a panic) when out of range.
pub(crate) fn view<'a>(
    buf: &'a CudaSlice<f32>,
    operand: &'static str,
    start: usize,
    end: usize,
) -> CudaResult<CudaView<'a, f32>> {
    buf.try_slice(start..end).ok_or_else(|| {
        KernelError::ShapeMismatch {
            operand,
            expected: format!("at least {end} elements"),
            actual: format!("{} elements", buf.len()),
        }
        .into()
    })
}

/// `buf[range]` as a mutable view, an error when out of range.
pub(crate) fn view_mut<'a>(
    buf: &'a mut CudaSlice<f32>,
    operand: &'static str,
    start: usize,
    end: usize,
) -> CudaResult<CudaViewMut<'a, f32>> {
    let len = buf.len();
    buf.try_slice_mut(start..end).ok_or_else(|| {
        KernelError::ShapeMismatch {
            operand,
            expected: format!("at least {end} elements"),
            actual: format!("{len} elements"),
        }
        .into()
    })
}

/// Expert weights on the device (f32; bf16-stored CPU weights are widened).
#[derive(Debug)]
pub struct DeviceExperts {
    /// FFN form.
    pub activation: Activation,
    /// Experts `E`.
    pub experts: usize,
    /// Model width `d`.
    pub d_model: usize,
    /// FFN width `h`.
    pub d_ffn: usize,
    /// `[E, d, in_width]`.
    pub w_in: CudaSlice<f32>,
    /// `[E, h]` (GELU; one unused element for SwiGLU).
    pub b_in: CudaSlice<f32>,
    /// `[E, h, d]`.
    pub w_out: CudaSlice<f32>,
    /// `[E, d]` (GELU; one unused element for SwiGLU).
    pub b_out: CudaSlice<f32>,
}

/// Saved activations of the expert forward (`pre: [N, in_width]` after the bias, `post: [N, h]`).
#[derive(Debug)]
pub struct ExpertActivations {
    /// First-projection output with bias (GELU: `H`; SwiGLU: `[G | U]`).
    pub pre: CudaSlice<f32>,
    /// Activation output `A`.
    pub post: CudaSlice<f32>,
}

/// Gradients of [`DeviceExperts`] (same layouts) plus backward scratch.
#[derive(Debug)]
pub struct DeviceExpertGrads {
    /// `[E, d, in_width]`.
    pub d_w_in: CudaSlice<f32>,
    /// `[E, h]` (GELU).
    pub d_b_in: CudaSlice<f32>,
    /// `[E, h, d]`.
    pub d_w_out: CudaSlice<f32>,
    /// `[E, d]` (GELU).
    pub d_b_out: CudaSlice<f32>,
    grad_post: CudaSlice<f32>,
    grad_pre: CudaSlice<f32>,
}

impl DeviceExperts {
    /// Copies CPU expert parameters to the device.
    pub fn from_params(dev: &CudaDevice, p: &ExpertParams) -> CudaResult<Self> {
        p.validate()?;
        let widen = |s: &Stored| s.to_f32_vec();
        Ok(Self {
            activation: p.activation,
            experts: p.experts,
            d_model: p.d_model,
            d_ffn: p.d_ffn,
            w_in: dev.upload(&widen(&p.w_in))?,
            b_in: dev.upload(&p.b_in)?,
            w_out: dev.upload(&widen(&p.w_out))?,
            b_out: dev.upload(&p.b_out)?,
        })
    }

    /// Width of the first projection (`h`, or `2h` for SwiGLU).
    pub fn in_width(&self) -> usize {
        self.activation.in_width(self.d_ffn)
    }

    /// Empty activations, grown by [`DeviceExperts::forward`].
    pub fn new_activations(&self, dev: &CudaDevice) -> CudaResult<ExpertActivations> {
        Ok(ExpertActivations { pre: dev.zeros(1)?, post: dev.zeros(1)? })
    }

    /// Zeroed gradients of the right sizes.
    pub fn new_grads(&self, dev: &CudaDevice) -> CudaResult<DeviceExpertGrads> {
        let (e, d, h) = (self.experts, self.d_model, self.d_ffn);
        let bias = self.activation.has_bias();
        Ok(DeviceExpertGrads {
            d_w_in: dev.zeros(e * d * self.in_width())?,
            d_b_in: dev.zeros(if bias { e * h } else { 1 })?,
            d_w_out: dev.zeros(e * h * d)?,
            d_b_out: dev.zeros(if bias { e * d } else { 1 })?,
            grad_post: dev.zeros(1)?,
            grad_pre: dev.zeros(1)?,
        })
    }

    fn check_offsets(&self, offsets: &[usize], offsets_dev: &CudaSlice<u32>) -> CudaResult<usize> {
        let e = self.experts;
        crate::error::check_len("offsets", &[e + 1], offsets.len())?;
        let n = offsets.last().copied().unwrap_or(0);
        if offsets.first() != Some(&0) || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(KernelError::InvalidConfig { field: "offsets", reason: "must rise from 0".into() }.into());
        }
        if offsets_dev.len() < e + 1 {
            return Err(KernelError::ShapeMismatch {
                operand: "offsets (device)",
                expected: format!("at least {} elements", e + 1),
                actual: format!("{} elements", offsets_dev.len()),
            }
            .into());
        }
        Ok(n)
    }

    /// Forward of all experts on the grouped `input` (`[N, d]`): `output` (`[N, d]`, grown) and
    /// the saved activations. `offsets` (`[E + 1]`) on the host decide the GEMM shapes;
    /// `offsets_dev` (the same values) and `row_expert` (`[N]`, the expert of each row) serve the
    /// bias kernels. Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        dev: &CudaDevice,
        input: &CudaSlice<f32>,
        offsets: &[usize],
        offsets_dev: &CudaSlice<u32>,
        row_expert: &CudaSlice<u32>,
        acts: &mut ExpertActivations,
        output: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let n = self.check_offsets(offsets, offsets_dev)?;
        let (e_n, d, h, hin) = (self.experts, self.d_model, self.d_ffn, self.in_width());
        dev.ensure(&mut acts.pre, n * hin)?;
        dev.ensure(&mut acts.post, n * h)?;
        dev.ensure(output, n * d)?;
        if n == 0 {
            return Ok(());
        }
        for e in 0..e_n {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            if r1 == r0 {
                continue;
            }
            let x_e = view(input, "expert input", r0 * d, r1 * d)?;
            let w_e = view(&self.w_in, "w_in", e * d * hin, (e + 1) * d * hin)?;
            let mut pre_e = view_mut(&mut acts.pre, "pre-activation", r0 * hin, r1 * hin)?;
            sgemm(dev, Trans::No, Trans::No, r1 - r0, hin, d, &x_e, d, &w_e, hin, 0.0, &mut pre_e, hin)?;
        }
        let has_bias = self.activation.has_bias();
        match self.activation {
            Activation::Gelu => {
                dev.bias_gelu_forward(&mut acts.pre, &mut acts.post, Some(&self.b_in), row_expert, n, h, e_n)?;
                dev.bias_fill_rows(output, &self.b_out, row_expert, n, d, e_n)?;
            }
            Activation::SwiGlu => dev.swiglu_forward(&acts.pre, &mut acts.post, n, h)?,
        }
        for e in 0..e_n {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            if r1 == r0 {
                continue;
            }
            let a_e = view(&acts.post, "activation", r0 * h, r1 * h)?;
            let w_e = view(&self.w_out, "w_out", e * h * d, (e + 1) * h * d)?;
            let mut y_e = view_mut(output, "expert output", r0 * d, r1 * d)?;
            let beta = if has_bias { 1.0 } else { 0.0 };
            sgemm(dev, Trans::No, Trans::No, r1 - r0, d, h, &a_e, h, &w_e, d, beta, &mut y_e, d)?;
        }
        Ok(())
    }

    /// Backward of [`DeviceExperts::forward`] with the same `input`, offsets and activations:
    /// writes (overwrites) every gradient in `grads` and `d_input` (`[N, d]`, grown). Does not
    /// wait.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dev: &CudaDevice,
        input: &CudaSlice<f32>,
        offsets: &[usize],
        offsets_dev: &CudaSlice<u32>,
        acts: &ExpertActivations,
        d_output: &CudaSlice<f32>,
        grads: &mut DeviceExpertGrads,
        d_input: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let n = self.check_offsets(offsets, offsets_dev)?;
        let (e_n, d, h, hin) = (self.experts, self.d_model, self.d_ffn, self.in_width());
        let has_bias = self.activation.has_bias();
        dev.ensure(&mut grads.d_w_in, e_n * d * hin)?;
        dev.ensure(&mut grads.d_w_out, e_n * h * d)?;
        if has_bias {
            dev.ensure(&mut grads.d_b_in, e_n * h)?;
            dev.ensure(&mut grads.d_b_out, e_n * d)?;
        }
        dev.ensure(&mut grads.grad_post, n * h)?;
        if self.activation == Activation::SwiGlu {
            dev.ensure(&mut grads.grad_pre, n * hin)?;
        }
        dev.ensure(d_input, n * d)?;

        // d W_out = A^T dY ; dA = dY W_out^T (per expert); d b_out = column sums of dY.
        for e in 0..e_n {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            let mut dw_out = view_mut(&mut grads.d_w_out, "d_w_out", e * h * d, (e + 1) * h * d)?;
            if r1 == r0 {
                dev.stream().memset_zeros(&mut dw_out).map_err(crate::cuda::error::driver("zeroing d_w_out"))?;
                continue;
            }
            let rows = r1 - r0;
            let a_e = view(&acts.post, "saved activation", r0 * h, r1 * h)?;
            let dy_e = view(d_output, "d_expert_output", r0 * d, r1 * d)?;
            sgemm(dev, Trans::Yes, Trans::No, h, d, rows, &a_e, h, &dy_e, d, 0.0, &mut dw_out, d)?;
            let w_e = view(&self.w_out, "w_out", e * h * d, (e + 1) * h * d)?;
            let mut gp_e = view_mut(&mut grads.grad_post, "d_activation", r0 * h, r1 * h)?;
            sgemm(dev, Trans::No, Trans::Yes, rows, h, d, &dy_e, d, &w_e, d, 0.0, &mut gp_e, h)?;
        }
        if has_bias {
            dev.bias_grad(d_output, offsets_dev, e_n, n, d, &mut grads.d_b_out)?;
        }
        // d pre-activation
        match self.activation {
            Activation::Gelu => {
                dev.gelu_backward(&acts.pre, &mut grads.grad_post, n, h)?;
                dev.bias_grad(&grads.grad_post, offsets_dev, e_n, n, h, &mut grads.d_b_in)?;
            }
            Activation::SwiGlu => dev.swiglu_backward(&acts.pre, &grads.grad_post, &mut grads.grad_pre, n, h)?,
        }
        let grad_pre = match self.activation {
            Activation::Gelu => &grads.grad_post,
            Activation::SwiGlu => &grads.grad_pre,
        };
        // d W_in = X^T dPre ; dX = dPre W_in^T (per expert).
        for e in 0..e_n {
            let (r0, r1) = (offsets[e], offsets[e + 1]);
            let mut dw_in = view_mut(&mut grads.d_w_in, "d_w_in", e * d * hin, (e + 1) * d * hin)?;
            if r1 == r0 {
                dev.stream().memset_zeros(&mut dw_in).map_err(crate::cuda::error::driver("zeroing d_w_in"))?;
                continue;
            }
            let rows = r1 - r0;
            let x_e = view(input, "expert input", r0 * d, r1 * d)?;
            let gpre_e = view(grad_pre, "d_pre-activation", r0 * hin, r1 * hin)?;
            sgemm(dev, Trans::Yes, Trans::No, d, hin, rows, &x_e, d, &gpre_e, hin, 0.0, &mut dw_in, hin)?;
            let w_e = view(&self.w_in, "w_in", e * d * hin, (e + 1) * d * hin)?;
            let mut dx_e = view_mut(d_input, "d_expert_input", r0 * d, r1 * d)?;
            sgemm(dev, Trans::No, Trans::Yes, rows, d, hin, &gpre_e, hin, &w_e, hin, 0.0, &mut dx_e, d)?;
        }
        Ok(())
    }
}

impl DeviceExpertGrads {
    /// The gradients copied to the host, as the CPU kernels return them.
    pub fn to_host(&self, dev: &CudaDevice, experts: &DeviceExperts) -> CudaResult<ExpertGrads> {
        let (e, d, h) = (experts.experts, experts.d_model, experts.d_ffn);
        let mut g = ExpertGrads::default();
        g.d_w_in = dev.download(&self.d_w_in, e * d * experts.in_width())?;
        g.d_w_out = dev.download(&self.d_w_out, e * h * d)?;
        if experts.activation.has_bias() {
            g.d_b_in = dev.download(&self.d_b_in, e * h)?;
            g.d_b_out = dev.download(&self.d_b_out, e * d)?;
        }
        Ok(g)
    }
}

/// The expert of each grouped row for `offsets` (`[E + 1]`): what [`DeviceExperts::forward`]
/// takes as `row_expert` when the rows do not come from a routing.
pub fn row_expert_from_offsets(offsets: &[usize]) -> Vec<u32> {
    let mut out = Vec::with_capacity(offsets.last().copied().unwrap_or(0));
    for (e, w) in offsets.windows(2).enumerate() {
        out.extend(std::iter::repeat_n(e as u32, w[1].saturating_sub(w[0])));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operand_lengths() {
        assert_eq!(needed_len(Trans::No, 3, 4, 4), Some(12));
        assert_eq!(needed_len(Trans::Yes, 3, 4, 3), Some(12));
        assert_eq!(needed_len(Trans::No, 3, 4, 3), None);
        assert_eq!(needed_len(Trans::No, 0, 4, 0), Some(0));
        assert_eq!(needed_len(Trans::No, 2, 2, 5), Some(7));
    }

    #[test]
    fn rows_of_experts() {
        assert_eq!(row_expert_from_offsets(&[0, 2, 2, 5]), vec![0, 0, 2, 2, 2]);
        assert!(row_expert_from_offsets(&[0]).is_empty());
    }
}
