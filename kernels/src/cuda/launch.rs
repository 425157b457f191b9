//! Launchers of the CUDA kernels (`kernels/cuda/*.cu`): one method of [`CudaDevice`] per kernel.
//!
//! Every launcher checks, before the launch, that each buffer holds at least the elements the
//! kernel will touch for the given shape, and that each size fits the kernel's `unsigned int`;
//! a mismatch is a [`KernelError::ShapeMismatch`] / [`KernelError::InvalidConfig`]. Buffers may
//! be longer than needed (reused scratch): only the leading elements are used. Index arrays read by
//! a kernel (expert indices, rows, tokens) are bounds-checked inside the kernel, so arbitrary
//! index values cannot make a kernel read or write outside its buffers. These two facts are what
//! make each `unsafe` launch sound.
//!
//! Launches are queued on the device's stream and return at once, except where a launcher says it
//! reads a result back.

use crate::cuda::device::CudaDevice;
use crate::cuda::error::{CudaError, CudaResult, driver};
use crate::cuda::nvrtc::{KernelSource, REDUCE_BLOCK};
use crate::error::KernelError;
use cudarc::driver::{CudaFunction, CudaModule, CudaSlice, LaunchConfig, PushKernelArg};
use std::collections::HashMap;
use std::sync::Arc;

/// Largest grid this crate launches along x (the kernels loop over the rest).
const MAX_GRID: usize = 1 << 16;
/// Threads per block of the elementwise kernels.
const ELEMENTWISE_BLOCK: u32 = 256;
/// Threads per block of the thread-per-token router kernels.
const TOKEN_BLOCK: u32 = 128;

/// The loaded kernels of one context, by name.
pub(crate) struct Kernels {
    functions: HashMap<&'static str, CudaFunction>,
}

impl Kernels {
    /// Loads every kernel each module's source lists.
    pub(crate) fn load(modules: &[(KernelSource, Arc<CudaModule>)]) -> CudaResult<Self> {
        let mut functions = HashMap::new();
        for (source, module) in modules {
            for &name in source.kernels {
                let f = module.load_function(name).map_err(driver("loading a kernel function"))?;
                functions.insert(name, f);
            }
        }
        Ok(Self { functions })
    }

    fn get(&self, name: &'static str) -> CudaResult<&CudaFunction> {
        self.functions.get(name).ok_or_else(|| CudaError::Unsupported(format!("kernel {name} is not loaded")))
    }
}

/// Queues kernel `$name` with `$cfg` and the arguments in order (each a reference: `&CudaSlice`,
/// `&mut CudaSlice`, or `&scalar` whose type matches the kernel's parameter).
///
/// The caller states, in a `// SAFETY:` comment, that the buffers are long enough for the shape
/// and the scalars have the kernel's types (the checks are made just before).
macro_rules! launch {
    ($dev:expr, $name:literal, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let f = $dev.kernels().get($name)?;
        let mut b = $dev.stream().launch_builder(f);
        $( b.arg($arg); )*
        // SAFETY: the argument list matches the kernel's C signature (kernels/cuda/*.cu) in order
        // and type, every buffer holds the elements the kernel touches for the shape passed (checked
        // by the caller just before), and indices read from memory are bounds-checked in the
        // kernel. Results are read back only after the stream has run the kernel.
        unsafe { b.launch($cfg) }.map(|_| ()).map_err(driver($name))
    }};
}

/// `Err` unless `buf` holds at least `needed` elements.
fn need<T>(operand: &'static str, buf: &CudaSlice<T>, needed: usize) -> CudaResult<()> {
    if buf.len() >= needed {
        Ok(())
    } else {
        Err(KernelError::ShapeMismatch {
            operand,
            expected: format!("at least {needed} elements"),
            actual: format!("{} elements", buf.len()),
        }
        .into())
    }
}

/// `v` as the kernels' `unsigned int` (below `i32::MAX` too, as rows are also `int` indices).
fn u32_of(field: &'static str, v: usize) -> CudaResult<u32> {
    if v <= i32::MAX as usize {
        Ok(v as u32)
    } else {
        Err(KernelError::InvalidConfig {
            field,
            reason: format!("{v} is too large for the GPU kernels (max 2^31 - 1)"),
        }
        .into())
    }
}

/// `a * b`, an error on overflow.
fn prod(field: &'static str, a: usize, b: usize) -> CudaResult<usize> {
    a.checked_mul(b).ok_or_else(|| KernelError::InvalidConfig { field, reason: format!("{a} x {b} overflows") }.into())
}

fn blocks(n: usize, block: u32) -> u32 {
    n.div_ceil(block as usize).clamp(1, MAX_GRID) as u32
}

/// Grid-stride elementwise launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks(n, ELEMENTWISE_BLOCK), 1, 1),
        block_dim: (ELEMENTWISE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One thread per token.
fn per_token(tokens: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks(tokens, TOKEN_BLOCK), 1, 1), block_dim: (TOKEN_BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row (block-stride), threads over `cols` columns.
fn per_row(rows: usize, cols: usize) -> LaunchConfig {
    let threads = (cols.next_power_of_two()).clamp(32, 256) as u32;
    LaunchConfig { grid_dim: (rows.clamp(1, MAX_GRID) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// One block of [`REDUCE_BLOCK`] threads per item (block-stride).
fn per_item_reduce(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.clamp(1, MAX_GRID) as u32, 1, 1),
        block_dim: (REDUCE_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Router outputs on the device (see [`CudaDevice::gate_softmax_topk`]).
#[derive(Debug)]
pub struct GateBuffers {
    /// Probabilities, `[T, E]`.
    pub probs: CudaSlice<f32>,
    /// `logsumexp` of each token's logits, `[T]`.
    pub logsumexp: CudaSlice<f32>,
    /// Selected experts, `[T, k]`, descending score.
    pub expert_index: CudaSlice<u32>,
    /// Combine weights, `[T, k]`.
    pub weight: CudaSlice<f32>,
    /// Probability of each token's first choice, `[T]` (the batch-prioritised drop order).
    pub top1: CudaSlice<f32>,
    /// Assignments per expert before capacity, `[E]`.
    pub demand: CudaSlice<u32>,
    /// `[1]`: bit 0 set when a logit was not finite.
    pub status: CudaSlice<u32>,
}

impl GateBuffers {
    /// Buffers for `tokens` tokens, `experts` experts, `top_k` choices.
    pub fn new(dev: &CudaDevice, tokens: usize, experts: usize, top_k: usize) -> CudaResult<Self> {
        let mut b = Self {
            probs: dev.zeros(1)?,
            logsumexp: dev.zeros(1)?,
            expert_index: dev.zeros(1)?,
            weight: dev.zeros(1)?,
            top1: dev.zeros(1)?,
            demand: dev.zeros(1)?,
            status: dev.zeros(1)?,
        };
        b.ensure(dev, tokens, experts, top_k)?;
        Ok(b)
    }

    /// Grows the buffers to hold a batch of this shape.
    pub fn ensure(&mut self, dev: &CudaDevice, tokens: usize, experts: usize, top_k: usize) -> CudaResult<()> {
        let te = prod("tokens x experts", tokens, experts)?;
        let tk = prod("tokens x top_k", tokens, top_k)?;
        dev.ensure(&mut self.probs, te)?;
        dev.ensure(&mut self.logsumexp, tokens)?;
        dev.ensure(&mut self.expert_index, tk)?;
        dev.ensure(&mut self.weight, tk)?;
        dev.ensure(&mut self.top1, tokens)?;
        dev.ensure(&mut self.demand, experts)?;
        Ok(())
    }
}

/// Token <-> grouped-row maps on the device (see [`CudaDevice::build_rows`]).
#[derive(Debug)]
pub struct RowMaps {
    /// Row of each assignment, -1 when dropped, `[T * k]`.
    pub assignment_row: CudaSlice<i32>,
    /// Token of each row, `[N]`.
    pub row_token: CudaSlice<u32>,
    /// Assignment of each row, `[N]`.
    pub row_assignment: CudaSlice<u32>,
    /// Expert of each row, `[N]`.
    pub row_expert: CudaSlice<u32>,
}

impl RowMaps {
    /// Maps for `assignments` (`T * k`) assignments and `rows` kept rows.
    pub fn new(dev: &CudaDevice, assignments: usize, rows: usize) -> CudaResult<Self> {
        let mut m = Self {
            assignment_row: dev.zeros(1)?,
            row_token: dev.zeros(1)?,
            row_assignment: dev.zeros(1)?,
            row_expert: dev.zeros(1)?,
        };
        m.ensure(dev, assignments, rows)?;
        Ok(m)
    }

    /// Grows the maps.
    pub fn ensure(&mut self, dev: &CudaDevice, assignments: usize, rows: usize) -> CudaResult<()> {
        dev.ensure(&mut self.assignment_row, assignments)?;
        dev.ensure(&mut self.row_token, rows)?;
        dev.ensure(&mut self.row_assignment, rows)?;
        dev.ensure(&mut self.row_expert, rows)
    }
}

/// AdamW hyper-parameters, as the runtime's `Adam` (`runtime/src/optim.rs`); the formula is at
/// [`CudaDevice::adamw_step`] and in `kernels/cuda/adam.cu`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate (>= 0).
    pub lr: f32,
    /// First-moment decay (0 <= beta1 < 1).
    pub beta1: f32,
    /// Second-moment decay (0 <= beta2 < 1).
    pub beta2: f32,
    /// Denominator term (> 0).
    pub eps: f32,
    /// Decoupled weight decay (>= 0).
    pub weight_decay: f32,
}

impl Default for AdamW {
    /// The runtime's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    fn default() -> Self {
        Self { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl AdamW {
    /// Checks the ranges (the runtime's rules).
    pub fn validate(&self) -> CudaResult<()> {
        let bad = |field: &'static str, v: f32, need: &str| -> CudaResult<()> {
            Err(KernelError::InvalidConfig { field, reason: format!("{v} is out of range (need {need})") }.into())
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "finite, >= 0");
        }
        for (field, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(field, b, "0 <= beta < 1");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad("eps", self.eps, "finite, > 0");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "finite, >= 0");
        }
        Ok(())
    }
}

impl CudaDevice {
    /// Softmax, top-k, combine weights, top-1 probability and demand of `tokens` rows of `logits`
    /// (`[T, E]`), with the selection bias `bias` (`[E]`) when given; see `kernels/cuda/gate.cu`.
    /// Zeroes `out.demand` and `out.status` first. Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_softmax_topk(
        &self,
        logits: &CudaSlice<f32>,
        tokens: usize,
        experts: usize,
        top_k: usize,
        bias: Option<&CudaSlice<f32>>,
        renormalize: bool,
        out: &mut GateBuffers,
    ) -> CudaResult<()> {
        if experts == 0 || top_k == 0 || top_k > experts {
            return Err(KernelError::InvalidTopK { top_k, experts }.into());
        }
        let te = prod("tokens x experts", tokens, experts)?;
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, e, k) = (u32_of("tokens", tokens)?, u32_of("experts", experts)?, u32_of("top_k", top_k)?);
        u32_of("tokens x top_k", tk)?;
        need("logits", logits, te)?;
        if let Some(b) = bias {
            need("expert_bias", b, experts)?;
        }
        need("probs", &out.probs, te)?;
        need("logsumexp", &out.logsumexp, tokens)?;
        need("expert_index", &out.expert_index, tk)?;
        need("weight", &out.weight, tk)?;
        need("top1", &out.top1, tokens)?;
        need("demand", &out.demand, experts)?;
        need("status", &out.status, 1)?;
        self.fill_zero(&mut out.demand, experts)?;
        self.fill_zero(&mut out.status, 1)?;
        if tokens == 0 {
            return Ok(());
        }
        let (has_bias, renorm) = (bias.is_some() as i32, renormalize as i32);
        let bias = bias.unwrap_or(logits);
        // SAFETY: lengths checked above; `bias` is read only when `has_bias`.
        launch!(
            self,
            "gate_softmax_topk",
            per_token(tokens),
            [
                logits,
                bias,
                &t,
                &e,
                &k,
                &has_bias,
                &renorm,
                &mut out.probs,
                &mut out.logsumexp,
                &mut out.expert_index,
                &mut out.weight,
                &mut out.top1,
                &mut out.demand,
                &mut out.status,
            ]
        )
    }

    /// Capacity positions (`[T * k]`, -1 when dropped): choice rank first, then token order, which
    /// is `order` (`[T]`, a permutation of the tokens) when given, else arrival order. Assignments
    /// beyond `capacity` per expert are dropped. Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_positions(
        &self,
        expert_index: &CudaSlice<u32>,
        order: Option<&CudaSlice<u32>>,
        tokens: usize,
        top_k: usize,
        experts: usize,
        capacity: usize,
        position: &mut CudaSlice<i32>,
    ) -> CudaResult<()> {
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, k) = (u32_of("tokens", tokens)?, u32_of("top_k", top_k)?);
        u32_of("tokens x top_k", tk)?;
        let cap = capacity.min(u32::MAX as usize) as u32;
        need("expert_index", expert_index, tk)?;
        need("position", position, tk)?;
        if let Some(o) = order {
            need("order", o, tokens)?;
        }
        if tk == 0 || experts == 0 {
            return Ok(());
        }
        u32_of("experts", experts)?;
        let has_order = order.is_some() as i32;
        let order = order.unwrap_or(expert_index);
        let cfg = LaunchConfig {
            grid_dim: (experts.min(MAX_GRID) as u32, 1, 1),
            block_dim: (REDUCE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        if experts > MAX_GRID {
            return Err(KernelError::InvalidConfig {
                field: "experts",
                reason: format!("at most {MAX_GRID} on the GPU"),
            }
            .into());
        }
        // SAFETY: lengths checked above; `order` is read only when `has_order`, its entries are
        // bounds-checked in the kernel.
        launch!(self, "gate_positions", cfg, [expert_index, order, &t, &k, &cap, &has_order, position])
    }

    /// Column sums of `probs` (`[T, E]`) and the sum of `logsumexp^2`, in `f64`, into `out`
    /// (`[E + 1]`). Does not wait.
    pub fn gate_loss_stats(
        &self,
        probs: &CudaSlice<f32>,
        logsumexp: &CudaSlice<f32>,
        tokens: usize,
        experts: usize,
        out: &mut CudaSlice<f64>,
    ) -> CudaResult<()> {
        let te = prod("tokens x experts", tokens, experts)?;
        let (t, e) = (u32_of("tokens", tokens)?, u32_of("experts", experts)?);
        need("probs", probs, te)?;
        need("logsumexp", logsumexp, tokens)?;
        need("loss stats", out, experts + 1)?;
        if experts + 1 > MAX_GRID {
            return Err(KernelError::InvalidConfig {
                field: "experts",
                reason: format!("at most {MAX_GRID} on the GPU"),
            }
            .into());
        }
        let cfg = LaunchConfig { grid_dim: (e + 1, 1, 1), block_dim: (REDUCE_BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: lengths checked above; one block per output element.
        launch!(self, "gate_loss_stats", cfg, [probs, logsumexp, &t, &e, out])
    }

    /// `d_logits` (`[T, E]`) of the router from the gradient of the combine weights `d_weight`
    /// (`[T, k]`), the per-expert aux-loss coefficients `aux_coef` (`[E]`) and the z-loss
    /// coefficient `z_coef` (the same terms as `gate::route_backward`). Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn gate_backward(
        &self,
        probs: &CudaSlice<f32>,
        expert_index: &CudaSlice<u32>,
        d_weight: &CudaSlice<f32>,
        logsumexp: &CudaSlice<f32>,
        aux_coef: &CudaSlice<f32>,
        tokens: usize,
        experts: usize,
        top_k: usize,
        renormalize: bool,
        z_coef: f32,
        d_logits: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let te = prod("tokens x experts", tokens, experts)?;
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, e, k) = (u32_of("tokens", tokens)?, u32_of("experts", experts)?, u32_of("top_k", top_k)?);
        need("probs", probs, te)?;
        need("expert_index", expert_index, tk)?;
        need("d_weight", d_weight, tk)?;
        need("logsumexp", logsumexp, tokens)?;
        need("aux_coef", aux_coef, experts)?;
        need("d_logits", d_logits, te)?;
        if tokens == 0 {
            return Ok(());
        }
        let renorm = renormalize as i32;
        // SAFETY: lengths checked above; expert indices are bounds-checked in the kernel.
        launch!(
            self,
            "gate_backward",
            per_token(tokens),
            [probs, expert_index, d_weight, logsumexp, aux_coef, &t, &e, &k, &renorm, &z_coef, d_logits,]
        )
    }

    /// The token <-> row maps from the experts, positions and row `offsets` (`[E + 1]`, rising
    /// from 0 to `rows`). Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn build_rows(
        &self,
        expert_index: &CudaSlice<u32>,
        position: &CudaSlice<i32>,
        offsets: &CudaSlice<u32>,
        tokens: usize,
        top_k: usize,
        experts: usize,
        rows: usize,
        maps: &mut RowMaps,
    ) -> CudaResult<()> {
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, k, e, n) =
            (u32_of("tokens", tokens)?, u32_of("top_k", top_k)?, u32_of("experts", experts)?, u32_of("rows", rows)?);
        u32_of("tokens x top_k", tk)?;
        need("expert_index", expert_index, tk)?;
        need("position", position, tk)?;
        need("offsets", offsets, experts + 1)?;
        need("assignment_row", &maps.assignment_row, tk)?;
        need("row_token", &maps.row_token, rows)?;
        need("row_assignment", &maps.row_assignment, rows)?;
        need("row_expert", &maps.row_expert, rows)?;
        if tk == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above; experts, offsets and positions are bounds-checked in the
        // kernel (a row is written only when it is below `rows` and inside its expert's range).
        launch!(
            self,
            "build_rows",
            elementwise(tk),
            [
                expert_index,
                position,
                offsets,
                &t,
                &k,
                &e,
                &n,
                &mut maps.assignment_row,
                &mut maps.row_token,
                &mut maps.row_assignment,
                &mut maps.row_expert,
            ]
        )
    }

    /// `buf[row] = x[row_token[row]]` (`x: [T, d]`, `buf: [N, d]`). Does not wait.
    pub fn dispatch_gather(
        &self,
        x: &CudaSlice<f32>,
        row_token: &CudaSlice<u32>,
        tokens: usize,
        rows: usize,
        d: usize,
        buf: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let (t, n, dd) = (u32_of("tokens", tokens)?, u32_of("rows", rows)?, u32_of("d_model", d)?);
        need("x", x, prod("tokens x d", tokens, d)?)?;
        need("row_token", row_token, rows)?;
        need("dispatched", buf, prod("rows x d", rows, d)?)?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above; row tokens are bounds-checked in the kernel.
        launch!(self, "dispatch_gather", per_row(rows, d), [x, row_token, &t, &n, &dd, buf])
    }

    /// `out[t] = sum_j weight[t, j] y[row(t, j)]` (`y: [N, d]`, `out: [T, d]`, overwritten;
    /// deterministic: one block per token, choices in order). Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_forward(
        &self,
        assignment_row: &CudaSlice<i32>,
        weight: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        tokens: usize,
        top_k: usize,
        rows: usize,
        d: usize,
        out: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, k, n, dd) =
            (u32_of("tokens", tokens)?, u32_of("top_k", top_k)?, u32_of("rows", rows)?, u32_of("d_model", d)?);
        need("assignment_row", assignment_row, tk)?;
        need("combine weight", weight, tk)?;
        need("expert output", y, prod("rows x d", rows, d)?)?;
        need("output", out, prod("tokens x d", tokens, d)?)?;
        if tokens == 0 || d == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above; rows are bounds-checked in the kernel.
        launch!(self, "combine_forward", per_row(tokens, d), [assignment_row, weight, y, &t, &k, &n, &dd, out])
    }

    /// `d_y[row] = weight[a] d_out[t]` for each kept row (`d_y: [N, d]`). Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_backward_rows(
        &self,
        row_assignment: &CudaSlice<u32>,
        weight: &CudaSlice<f32>,
        d_out: &CudaSlice<f32>,
        tokens: usize,
        top_k: usize,
        rows: usize,
        d: usize,
        d_y: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, k, n, dd) =
            (u32_of("tokens", tokens)?, u32_of("top_k", top_k)?, u32_of("rows", rows)?, u32_of("d_model", d)?);
        need("row_assignment", row_assignment, rows)?;
        need("combine weight", weight, tk)?;
        need("d_output", d_out, prod("tokens x d", tokens, d)?)?;
        need("d_expert_output", d_y, prod("rows x d", rows, d)?)?;
        if rows == 0 || d == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above; assignments are bounds-checked in the kernel.
        launch!(self, "combine_backward_rows", per_row(rows, d), [row_assignment, weight, d_out, &t, &k, &n, &dd, d_y])
    }

    /// `d_weight[t, j] = d_out[t] . y[row(t, j)]` (0 when dropped; `[T, k]`). Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn combine_backward_weights(
        &self,
        assignment_row: &CudaSlice<i32>,
        y: &CudaSlice<f32>,
        d_out: &CudaSlice<f32>,
        tokens: usize,
        top_k: usize,
        rows: usize,
        d: usize,
        d_weight: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, k, n, dd) =
            (u32_of("tokens", tokens)?, u32_of("top_k", top_k)?, u32_of("rows", rows)?, u32_of("d_model", d)?);
        need("assignment_row", assignment_row, tk)?;
        need("expert output", y, prod("rows x d", rows, d)?)?;
        need("d_output", d_out, prod("tokens x d", tokens, d)?)?;
        need("d_weight", d_weight, tk)?;
        if tk == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above; rows are bounds-checked in the kernel; the block size is
        // the kernel's REDUCE_BLOCK.
        launch!(
            self,
            "combine_backward_weights",
            per_item_reduce(tokens),
            [assignment_row, y, d_out, &t, &k, &n, &dd, d_weight,]
        )
    }

    /// `d_x[t] (+)= sum_j d_buf[row(t, j)]` (`d_buf: [N, d]`, `d_x: [T, d]`; overwritten unless
    /// `accumulate`). Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_backward(
        &self,
        assignment_row: &CudaSlice<i32>,
        d_buf: &CudaSlice<f32>,
        tokens: usize,
        top_k: usize,
        rows: usize,
        d: usize,
        accumulate: bool,
        d_x: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let tk = prod("tokens x top_k", tokens, top_k)?;
        let (t, k, n, dd) =
            (u32_of("tokens", tokens)?, u32_of("top_k", top_k)?, u32_of("rows", rows)?, u32_of("d_model", d)?);
        need("assignment_row", assignment_row, tk)?;
        need("d_dispatched", d_buf, prod("rows x d", rows, d)?)?;
        need("d_x", d_x, prod("tokens x d", tokens, d)?)?;
        if tokens == 0 || d == 0 {
            return Ok(());
        }
        let acc = accumulate as i32;
        // SAFETY: lengths checked above; rows are bounds-checked in the kernel.
        launch!(self, "gather_backward", per_row(tokens, d), [assignment_row, d_buf, &t, &k, &n, &dd, &acc, d_x])
    }

    /// `h += bias[row_expert]` (when `bias` is given) and `a = gelu(h)` (exact erf form) over
    /// `rows x cols`. Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn bias_gelu_forward(
        &self,
        h: &mut CudaSlice<f32>,
        a: &mut CudaSlice<f32>,
        bias: Option<&CudaSlice<f32>>,
        row_expert: &CudaSlice<u32>,
        rows: usize,
        cols: usize,
        experts: usize,
    ) -> CudaResult<()> {
        let n = prod("rows x cols", rows, cols)?;
        let (r, c, e) = (u32_of("rows", rows)?, u32_of("cols", cols)?, u32_of("experts", experts)?);
        need("pre-activation", h, n)?;
        need("activation", a, n)?;
        need("row_expert", row_expert, rows)?;
        if let Some(b) = bias {
            need("b_in", b, prod("experts x cols", experts, cols)?)?;
        }
        if n == 0 {
            return Ok(());
        }
        let has_bias = bias.is_some() as i32;
        let bias = bias.unwrap_or(self.dummy());
        // SAFETY: lengths checked above; `bias` is read only when `has_bias`; experts are
        // bounds-checked in the kernel.
        launch!(self, "bias_gelu_forward", elementwise(n), [h, a, bias, row_expert, &r, &c, &e, &has_bias])
    }

    /// `g *= gelu'(h)` over `rows x cols`. Does not wait.
    pub fn gelu_backward(
        &self,
        h: &CudaSlice<f32>,
        g: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> CudaResult<()> {
        let n = prod("rows x cols", rows, cols)?;
        let (r, c) = (u32_of("rows", rows)?, u32_of("cols", cols)?);
        need("pre-activation", h, n)?;
        need("d_activation", g, n)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above.
        launch!(self, "gelu_backward", elementwise(n), [h, g, &r, &c])
    }

    /// SwiGLU forward: `a = silu(gate) * up` from rows `[gate | up]` of `gu` (`[rows, 2 cols]`).
    /// Does not wait.
    pub fn swiglu_forward(
        &self,
        gu: &CudaSlice<f32>,
        a: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> CudaResult<()> {
        let n = prod("rows x cols", rows, cols)?;
        let (r, c) = (u32_of("rows", rows)?, u32_of("cols", cols)?);
        need("gate|up", gu, prod("rows x 2 cols", n, 2)?)?;
        need("activation", a, n)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above.
        launch!(self, "swiglu_forward", elementwise(n), [gu, a, &r, &c])
    }

    /// SwiGLU backward: `dgu = [da up silu'(gate) | da silu(gate)]` (`[rows, 2 cols]`). Does not wait.
    pub fn swiglu_backward(
        &self,
        gu: &CudaSlice<f32>,
        da: &CudaSlice<f32>,
        dgu: &mut CudaSlice<f32>,
        rows: usize,
        cols: usize,
    ) -> CudaResult<()> {
        let n = prod("rows x cols", rows, cols)?;
        let (r, c) = (u32_of("rows", rows)?, u32_of("cols", cols)?);
        need("gate|up", gu, prod("rows x 2 cols", n, 2)?)?;
        need("d_activation", da, n)?;
        need("d_gate|up", dgu, prod("rows x 2 cols", n, 2)?)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above.
        launch!(self, "swiglu_backward", elementwise(n), [gu, da, dgu, &r, &c])
    }

    /// `y[r] = bias[row_expert[r]]` over `rows x cols` (the output bias the second GEMM adds onto).
    /// Does not wait.
    pub fn bias_fill_rows(
        &self,
        y: &mut CudaSlice<f32>,
        bias: &CudaSlice<f32>,
        row_expert: &CudaSlice<u32>,
        rows: usize,
        cols: usize,
        experts: usize,
    ) -> CudaResult<()> {
        let n = prod("rows x cols", rows, cols)?;
        let (r, c, e) = (u32_of("rows", rows)?, u32_of("cols", cols)?, u32_of("experts", experts)?);
        need("output", y, n)?;
        need("bias", bias, prod("experts x cols", experts, cols)?)?;
        need("row_expert", row_expert, rows)?;
        if n == 0 {
            return Ok(());
        }
        // SAFETY: lengths checked above; experts are bounds-checked in the kernel.
        launch!(self, "bias_fill_rows", elementwise(n), [y, bias, row_expert, &r, &c, &e])
    }

    /// Per-expert column sums: `out[e] = sum of g's rows offsets[e]..offsets[e + 1]` (`g: [rows,
    /// cols]`, `out: [E, cols]`, every expert written, zeros for an empty one). Does not wait.
    pub fn bias_grad(
        &self,
        g: &CudaSlice<f32>,
        offsets: &CudaSlice<u32>,
        experts: usize,
        rows: usize,
        cols: usize,
        out: &mut CudaSlice<f32>,
    ) -> CudaResult<()> {
        let (e, r, c) = (u32_of("experts", experts)?, u32_of("rows", rows)?, u32_of("cols", cols)?);
        need("gradient", g, prod("rows x cols", rows, cols)?)?;
        need("offsets", offsets, experts + 1)?;
        need("bias gradient", out, prod("experts x cols", experts, cols)?)?;
        if experts == 0 || cols == 0 {
            return Ok(());
        }
        if experts > 65_535 {
            return Err(
                KernelError::InvalidConfig { field: "experts", reason: "at most 65535 on the GPU".into() }.into()
            );
        }
        let cfg = LaunchConfig {
            grid_dim: (cols.div_ceil(ELEMENTWISE_BLOCK as usize) as u32, e, 1),
            block_dim: (ELEMENTWISE_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: lengths checked above; offsets are clamped to `rows` in the kernel; the grid
        // covers every (column, expert).
        launch!(self, "bias_grad", cfg, [g, offsets, &e, &r, &c, out])
    }

    /// `x[i] += y[i]` for `i < n`. Does not wait.
    pub fn add_inplace(&self, x: &mut CudaSlice<f32>, y: &CudaSlice<f32>, n: usize) -> CudaResult<()> {
        need("x", x, n)?;
        need("y", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        // SAFETY: lengths checked above.
        launch!(self, "add_inplace", elementwise(n), [x, y, &n64])
    }

    /// Whether any of the first `n` elements of `x` is NaN or infinite, using `status` (`[1]`) as
    /// scratch. Waits for the result.
    pub fn any_nonfinite(&self, x: &CudaSlice<f32>, n: usize, status: &mut CudaSlice<u32>) -> CudaResult<bool> {
        need("x", x, n)?;
        need("status", status, 1)?;
        if n == 0 {
            return Ok(false);
        }
        self.fill_zero(status, 1)?;
        let n64 = n as u64;
        // SAFETY: lengths checked above.
        launch!(self, "flag_nonfinite", elementwise(n), [x, &n64, &mut *status])?;
        Ok(self.download(status, 1)?[0] != 0)
    }

    /// One AdamW step (`step` = 1, 2, ...: the count after this step) on the first `n`
    /// elements, in place on `params`, `m`, `v`, with the runtime's formula and arithmetic:
    ///
    /// ```text
    /// p <- p (1 - lr wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
    /// p <- p - lr (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps)
    /// ```
    ///
    /// Does not wait.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        n: usize,
        cfg: &AdamW,
        step: u64,
    ) -> CudaResult<()> {
        cfg.validate()?;
        if step == 0 {
            return Err(KernelError::InvalidConfig { field: "step", reason: "AdamW steps count from 1".into() }.into());
        }
        need("params", params, n)?;
        need("grads", grads, n)?;
        need("adam m", m, n)?;
        need("adam v", v, n)?;
        if n == 0 {
            return Ok(());
        }
        let t = step.min(i32::MAX as u64) as i32;
        let c1 = 1.0 - (cfg.beta1 as f64).powi(t);
        let c2 = 1.0 - (cfg.beta2 as f64).powi(t);
        let step_size = (cfg.lr as f64 / c1) as f32;
        let inv_sqrt_c2 = (1.0 / c2.sqrt()) as f32;
        let decay = 1.0 - cfg.lr * cfg.weight_decay;
        let n64 = n as u64;
        // SAFETY: lengths checked above.
        launch!(
            self,
            "adamw_step",
            elementwise(n),
            [params, grads, m, v, &n64, &cfg.beta1, &cfg.beta2, &cfg.eps, &decay, &step_size, &inv_sqrt_c2,]
        )
    }
}
