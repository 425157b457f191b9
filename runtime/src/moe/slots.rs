//! One MoE layer's expert slots on one worker: the weights, stacked by local slot in the kernels'
//! layout, and their Adam moments in the same layout, so an expert's whole training state is a set
//! of slices that can be cut out, sent, and put back.

use switchyard_kernels::{Activation, ExpertGrads, ExpertParams, Storage, Stored};

use crate::checksum::ByteChecksum;
use crate::error::RuntimeError;
use crate::optim::{Adam, AdamState};

/// Floats copied (and checksummed) per chunk: small enough to stay in the L1/L2 cache between the copy and
/// the checksum.
const CHUNK: usize = 4096;

/// Where a new slot's state comes from in a migration.
#[derive(Debug, Clone, Copy)]
pub enum SlotSource<'a> {
    /// This worker's old slot.
    Local(usize),
    /// Slot `slot` of another worker's store in the same process, copied straight from it: each chunk is
    /// checksummed as read from the source and again as written to the destination (both while in cache),
    /// and the two must agree.
    Peer {
        /// The other worker's (old) store.
        store: &'a SlotStore,
        /// Its slot.
        slot: usize,
        /// Fault injection (tests): flip one bit of the first chunk after copying it.
        corrupt: bool,
    },
    /// Bytes transferred from another worker ([`SlotStore::append_slot_bytes`] layout) and their checksum.
    Bytes {
        /// The state.
        bytes: &'a [u8],
        /// Its checksum as the sender computed it.
        checksum: u64,
    },
}

/// The four tensors of an expert (or of a stack of experts), in the kernels' order.
pub const TENSORS: [&str; 4] = ["w_in", "b_in", "w_out", "b_out"];

/// Local slots of one layer: which expert each holds, its weights and optimizer state.
#[derive(Debug, Clone)]
pub struct SlotStore {
    /// Logical expert in each local slot.
    pub experts: Vec<u32>,
    /// Weights of the local slots (`params.experts` = slots per worker), f32.
    pub params: ExpertParams,
    /// Adam state per tensor (`TENSORS` order), stacked by slot like the weights.
    pub adam: [AdamState; 4],
}

/// Element counts of one expert's four tensors.
pub fn tensor_sizes(activation: Activation, d_model: usize, d_ffn: usize) -> [usize; 4] {
    let hin = activation.in_width(d_ffn);
    let bias = activation.has_bias();
    [d_model * hin, if bias { d_ffn } else { 0 }, d_ffn * d_model, if bias { d_model } else { 0 }]
}

impl SlotStore {
    /// Slots holding `experts`, each initialised with its logical expert's weights from
    /// `init(expert)` (the four tensors) and zero moments.
    pub fn new(
        activation: Activation,
        d_model: usize,
        d_ffn: usize,
        experts: Vec<u32>,
        mut init: impl FnMut(u32) -> [Vec<f32>; 4],
    ) -> Result<Self, RuntimeError> {
        let sizes = tensor_sizes(activation, d_model, d_ffn);
        let mut stacked: [Vec<f32>; 4] = Default::default();
        for &e in &experts {
            let t = init(e);
            for i in 0..4 {
                if t[i].len() != sizes[i] {
                    return Err(RuntimeError::Invalid {
                        what: format!("initial {} of expert {e}", TENSORS[i]),
                        reason: format!("has {} values, expected {}", t[i].len(), sizes[i]),
                    });
                }
                stacked[i].extend_from_slice(&t[i]);
            }
        }
        let [w_in, b_in, w_out, b_out] = stacked;
        let adam = std::array::from_fn(|i| AdamState::new([w_in.len(), b_in.len(), w_out.len(), b_out.len()][i]));
        let params =
            ExpertParams::new(activation, experts.len(), d_model, d_ffn, w_in, b_in, w_out, b_out, Storage::F32)?;
        Ok(Self { experts, params, adam })
    }

    /// A store of no slots with this one's shapes and step counts (holds a layer's place while its store is
    /// lent out during a migration).
    pub fn empty_like(&self) -> Result<Self, RuntimeError> {
        let p = &self.params;
        let params = ExpertParams::new(
            p.activation,
            0,
            p.d_model,
            p.d_ffn,
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Storage::F32,
        )?;
        Ok(Self { experts: Vec::new(), params, adam: self.adam.clone_steps() })
    }

    /// Number of local slots.
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    /// Whether there are no local slots.
    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    fn sizes(&self) -> [usize; 4] {
        tensor_sizes(self.params.activation, self.params.d_model, self.params.d_ffn)
    }

    /// Floats in one expert's full state (weights, then first moments, then second moments).
    pub fn state_len(&self) -> usize {
        3 * self.sizes().iter().sum::<usize>()
    }

    fn weights(&self) -> [&[f32]; 4] {
        [f32_of(&self.params.w_in), &self.params.b_in, f32_of(&self.params.w_out), &self.params.b_out]
    }

    /// Appends slot `j`'s whole state (weights, m, v; `TENSORS` order in each) to `out`.
    pub fn export_slot(&self, j: usize, out: &mut Vec<f32>) {
        let sizes = self.sizes();
        let w = self.weights();
        for i in 0..4 {
            out.extend_from_slice(&w[i][j * sizes[i]..(j + 1) * sizes[i]]);
        }
        for part in 0..2 {
            for i in 0..4 {
                let src = if part == 0 { &self.adam[i].m } else { &self.adam[i].v };
                out.extend_from_slice(&src[j * sizes[i]..(j + 1) * sizes[i]]);
            }
        }
    }

    /// Appends slot `j`'s four weight tensors (`TENSORS` order) to `out`: the expert as the data-centric mode
    /// ships it.
    pub fn slot_weights(&self, j: usize, out: &mut Vec<f32>) {
        let sizes = self.sizes();
        for (i, w) in self.weights().iter().enumerate() {
            out.extend_from_slice(&w[j * sizes[i]..(j + 1) * sizes[i]]);
        }
    }

    /// The twelve parts of slot `j`'s state in transfer order: the four weights, their first moments,
    /// their second moments (`TENSORS` order in each).
    pub fn slot_parts(&self, j: usize) -> [&[f32]; 12] {
        let sizes = self.sizes();
        let w = self.weights();
        std::array::from_fn(|p| {
            let (part, i) = (p / 4, p % 4);
            let src: &[f32] = match part {
                0 => w[i],
                1 => &self.adam[i].m,
                _ => &self.adam[i].v,
            };
            &src[j * sizes[i]..(j + 1) * sizes[i]]
        })
    }

    /// Appends slot `j`'s whole state as bytes to `out`, adding them to `sum` as it goes (one pass).
    pub fn append_slot_bytes(&self, j: usize, out: &mut Vec<u8>, sum: &mut ByteChecksum) {
        for part in self.slot_parts(j) {
            for chunk in part.chunks(CHUNK) {
                let at = out.len();
                out.extend_from_slice(bytemuck::cast_slice(chunk));
                sum.update(&out[at..]);
            }
        }
    }

    /// Builds the store of new slots holding `experts`, slot `j` taking its state from `sources[j]`: this
    /// store's slot, or transferred bytes verified against their checksum while they are copied in. Reuses
    /// the buffers of `spare` (a store no longer needed) when given, so no fresh memory is touched. Keeps
    /// the optimizer's step counts of `self`.
    pub fn build(
        &self,
        experts: Vec<u32>,
        sources: &[SlotSource<'_>],
        spare: Option<SlotStore>,
    ) -> Result<Self, RuntimeError> {
        let sizes = self.sizes();
        let per: usize = sizes.iter().sum();
        let n = experts.len();
        if sources.len() != n {
            return Err(RuntimeError::invalid("new slots", format!("{} sources for {n} slots", sources.len())));
        }
        let mut bufs: [Vec<f32>; 12] = Default::default();
        if let Some(sp) = spare {
            let SlotStore { params, adam, .. } = sp;
            let ExpertParams { w_in, b_in, w_out, b_out, .. } = params;
            let f = |s: Stored| match s {
                Stored::F32(v) => v,
                Stored::Bf16(_) => Vec::new(),
            };
            let [a0, a1, a2, a3] = adam;
            bufs = [f(w_in), b_in, f(w_out), b_out, a0.m, a1.m, a2.m, a3.m, a0.v, a1.v, a2.v, a3.v];
        }
        for (p, b) in bufs.iter_mut().enumerate() {
            b.clear();
            b.reserve(n * sizes[p % 4]);
        }
        for (j, src) in sources.iter().enumerate() {
            match *src {
                SlotSource::Local(jj) => {
                    if jj >= self.len() {
                        return Err(RuntimeError::invalid(
                            "new slots",
                            format!("slot {j} copies old slot {jj} of {}", self.len()),
                        ));
                    }
                    for (b, part) in bufs.iter_mut().zip(self.slot_parts(jj)) {
                        b.extend_from_slice(part);
                    }
                }
                SlotSource::Peer { store, slot, corrupt } => {
                    if slot >= store.len() || store.sizes() != sizes {
                        return Err(RuntimeError::invalid(
                            "new slots",
                            format!("slot {j} copies slot {slot} of a peer store of {} slots", store.len()),
                        ));
                    }
                    let (mut read, mut written) = (ByteChecksum::new(), ByteChecksum::new());
                    let mut flip = corrupt;
                    for (b, part) in bufs.iter_mut().zip(store.slot_parts(slot)) {
                        for chunk in part.chunks(CHUNK) {
                            let at = b.len();
                            b.extend_from_slice(chunk);
                            if flip && !chunk.is_empty() {
                                b[at] = f32::from_bits(b[at].to_bits() ^ 1);
                                flip = false;
                            }
                            read.update(bytemuck::cast_slice(chunk));
                            written.update(bytemuck::cast_slice(&b[at..]));
                        }
                    }
                    if read.finish() != written.finish() {
                        return Err(RuntimeError::invalid(
                            "transferred state",
                            format!("slot {j} (expert {}): checksum mismatch", experts[j]),
                        ));
                    }
                }
                SlotSource::Bytes { bytes, checksum } => {
                    if bytes.len() != 4 * 3 * per {
                        return Err(RuntimeError::invalid(
                            "transferred state",
                            format!("slot {j}: {} bytes, expected {}", bytes.len(), 12 * per),
                        ));
                    }
                    let mut sum = ByteChecksum::new();
                    let mut at = 0;
                    for (p, b) in bufs.iter_mut().enumerate() {
                        let part = &bytes[at..at + 4 * sizes[p % 4]];
                        at += part.len();
                        for chunk in part.chunks(4 * CHUNK) {
                            match bytemuck::try_cast_slice::<u8, f32>(chunk) {
                                Ok(f) => b.extend_from_slice(f),
                                Err(_) => b.extend(
                                    chunk.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4]))),
                                ),
                            }
                            sum.update(chunk);
                        }
                    }
                    if sum.finish() != checksum {
                        return Err(RuntimeError::invalid(
                            "transferred state",
                            format!("slot {j} (expert {}): checksum mismatch", experts[j]),
                        ));
                    }
                }
            }
        }
        let [w_in, b_in, w_out, b_out, m0, m1, m2, m3, v0, v1, v2, v3] = bufs;
        let p = &self.params;
        // The states were finite where they came from and arrived intact (checksums): check the shapes only.
        let params = ExpertParams {
            activation: p.activation,
            experts: n,
            d_model: p.d_model,
            d_ffn: p.d_ffn,
            w_in: Stored::F32(w_in),
            b_in,
            w_out: Stored::F32(w_out),
            b_out,
        };
        params.validate()?;
        let mut adam = self.adam.clone_steps();
        for (i, (m, v)) in [(m0, v0), (m1, v1), (m2, v2), (m3, v3)].into_iter().enumerate() {
            adam[i].m = m;
            adam[i].v = v;
        }
        Ok(Self { experts, params, adam })
    }

    /// One Adam step of every local slot with `grads` (the kernels' layout, already summed over replicas).
    pub fn adam_step(&mut self, adam: &Adam, grads: &ExpertGrads) -> Result<(), RuntimeError> {
        let p = &mut self.params;
        let (Stored::F32(w_in), Stored::F32(w_out)) = (&mut p.w_in, &mut p.w_out) else {
            return Err(RuntimeError::Invalid {
                what: "expert weights".into(),
                reason: "the runtime keeps f32 master weights; bf16 storage is not trained".into(),
            });
        };
        let params: [&mut Vec<f32>; 4] = [w_in, &mut p.b_in, w_out, &mut p.b_out];
        let g: [&Vec<f32>; 4] = [&grads.d_w_in, &grads.d_b_in, &grads.d_w_out, &grads.d_b_out];
        for (i, (param, st)) in params.into_iter().zip(self.adam.iter_mut()).enumerate() {
            if g[i].len() != param.len() {
                return Err(RuntimeError::Invalid {
                    what: format!("gradient of {}", TENSORS[i]),
                    reason: format!("has {} values, the weights {}", g[i].len(), param.len()),
                });
            }
            adam.step(param, g[i], st)?;
        }
        Ok(())
    }
}

trait CloneSteps {
    fn clone_steps(&self) -> [AdamState; 4];
}

impl CloneSteps for [AdamState; 4] {
    /// Empty moments with the same step counts.
    fn clone_steps(&self) -> [AdamState; 4] {
        std::array::from_fn(|i| AdamState { m: Vec::new(), v: Vec::new(), step: self[i].step })
    }
}

/// The f32 values of stored weights (the runtime always stores f32).
fn f32_of(s: &Stored) -> &[f32] {
    match s {
        Stored::F32(v) => v,
        Stored::Bf16(_) => &[],
    }
}
