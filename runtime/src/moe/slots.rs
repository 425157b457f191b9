//! One MoE layer's expert slots on one worker: the weights, stacked by local slot in the kernels'
//! layout, and their Adam moments in the same layout, so an expert's whole training state is a set
//! of slices that can be cut out, sent, and put back.

use switchyard_kernels::{Activation, ExpertGrads, ExpertParams, Storage, Stored};

use crate::error::RuntimeError;
use crate::optim::{Adam, AdamState};

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

    /// Builds a store from exported states (one per slot, in slot order), keeping the optimizer's step
    /// count and hyper-state of `self`.
    pub fn from_states(&self, experts: Vec<u32>, states: &[&[f32]]) -> Result<Self, RuntimeError> {
        let sizes = self.sizes();
        let per: usize = sizes.iter().sum();
        let mut w: [Vec<f32>; 4] = Default::default();
        let mut m: [Vec<f32>; 4] = Default::default();
        let mut v: [Vec<f32>; 4] = Default::default();
        for (j, s) in states.iter().enumerate() {
            if s.len() != 3 * per {
                return Err(RuntimeError::Invalid {
                    what: format!("state of slot {j}"),
                    reason: format!("has {} values, expected {}", s.len(), 3 * per),
                });
            }
            let mut at = 0;
            for dst in [&mut w, &mut m, &mut v] {
                for i in 0..4 {
                    dst[i].extend_from_slice(&s[at..at + sizes[i]]);
                    at += sizes[i];
                }
            }
        }
        let p = &self.params;
        let [w_in, b_in, w_out, b_out] = w;
        let params =
            ExpertParams::new(p.activation, experts.len(), p.d_model, p.d_ffn, w_in, b_in, w_out, b_out, Storage::F32)?;
        let mut adam = self.adam.clone();
        for i in 0..4 {
            adam[i].m = std::mem::take(&mut m[i]);
            adam[i].v = std::mem::take(&mut v[i]);
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

/// The f32 values of stored weights (the runtime always stores f32).
fn f32_of(s: &Stored) -> &[f32] {
    match s {
        Stored::F32(v) => v,
        Stored::Bf16(_) => &[],
    }
}
