//! The whole MoE layer: gate -> dispatch -> experts -> combine, and its backward.
//!
//! ```text
//! forward:  routing = route(x, Wg)               (gate)
//!           buf     = gather(x)                  (dispatch, [N, d])
//!           y       = experts(buf)               (grouped FFNs, [N, d])
//!           out     = combine(y, weights)        ([T, d])
//! backward: d_y, d_w = combine_backward(d_out)
//!           d_buf, expert grads = experts_backward(d_y)
//!           d_x  = gather_backward(d_buf) + route_backward(d_w)   (+ aux/z-loss gradients)
//! ```
//!
//! Buffers live in [`MoeState`] and [`MoeGrads`] and are reused from call to call.

use crate::bf16::Storage;
use crate::dispatch::{DispatchPlan, combine, combine_backward, gather, gather_backward};
use crate::error::{KernelError, Result, check_finite, check_len};
use crate::experts::{Activation, ExpertCache, ExpertGrads, ExpertParams, experts_backward, experts_forward};
use crate::gate::{GateConfig, GateGrads, Routing, route, route_backward};
use crate::gemm::Compute;
use crate::random::{normal_vec, seeded_rng};
use crate::tensor::set_len;
use serde::{Deserialize, Serialize};

/// Shape and options of one MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// Model width `d`.
    pub d_model: usize,
    /// Expert FFN width `h`.
    pub d_ffn: usize,
    /// Number of experts `E`.
    pub experts: usize,
    /// Expert FFN form.
    pub activation: Activation,
    /// Router settings (top-k, capacity, losses, noise).
    pub gate: GateConfig,
    /// Storage of expert weights and saved activations.
    pub storage: Storage,
}

impl MoeConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.d_model == 0 || self.d_ffn == 0 {
            return Err(KernelError::InvalidConfig { field: "d_model/d_ffn", reason: "must be at least 1".into() });
        }
        self.gate.validate(self.experts)
    }
}

/// Parameters of one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeLayer {
    /// The configuration.
    pub config: MoeConfig,
    /// Router weight `Wg`, `[d, E]`.
    pub gate_weight: Vec<f32>,
    /// Per-expert selection bias for loss-free balancing, `[E]` (see
    /// [`crate::gate::update_balance_bias`]).
    pub expert_bias: Option<Vec<f32>>,
    /// The experts.
    pub experts: ExpertParams,
}

/// What the forward produced and saved for the backward (reused between calls).
#[derive(Debug, Clone, Default)]
pub struct MoeState {
    /// Tokens of the last forward.
    pub tokens: usize,
    /// Router decisions (with `aux_loss` and `z_loss`).
    pub routing: Routing,
    /// Token <-> expert-row maps.
    pub plan: DispatchPlan,
    /// Gathered inputs, `[N, d]`.
    pub dispatched: Vec<f32>,
    /// Expert outputs, `[N, d]`.
    pub expert_output: Vec<f32>,
    /// Layer output, `[T, d]`.
    pub output: Vec<f32>,
    cache: ExpertCache,
}

/// Gradients of the layer (reused between calls; overwritten by each backward).
#[derive(Debug, Clone, Default)]
pub struct MoeGrads {
    /// `d loss / d x`, `[T, d]`.
    pub d_x: Vec<f32>,
    /// Router gradients (`d_gate_weight: [d, E]`, `d_logits: [T, E]`).
    pub gate: GateGrads,
    /// Expert weight gradients.
    pub experts: ExpertGrads,
    d_expert_output: Vec<f32>,
    d_dispatched: Vec<f32>,
    d_weight: Vec<f32>,
}

impl MoeLayer {
    /// Wraps parameters, checking every shape against `config`.
    pub fn new(
        config: MoeConfig,
        gate_weight: Vec<f32>,
        expert_bias: Option<Vec<f32>>,
        experts: ExpertParams,
    ) -> Result<Self> {
        let layer = Self { config, gate_weight, expert_bias, experts };
        layer.validate()?;
        layer.experts.validate_finite()?;
        Ok(layer)
    }

    /// Seeded initialisation (`Wg ~ N(0, 1/d)`, experts as [`ExpertParams::random`]).
    pub fn random(config: MoeConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = seeded_rng(seed);
        let gate_weight = normal_vec(&mut rng, config.d_model * config.experts, 1.0 / (config.d_model as f32).sqrt());
        let experts = ExpertParams::random(
            config.activation,
            config.experts,
            config.d_model,
            config.d_ffn,
            config.storage,
            seed.wrapping_add(1),
        )?;
        Self::new(config, gate_weight, None, experts)
    }

    /// Checks parameters against the configuration.
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        check_len("gate_weight", &[c.d_model, c.experts], self.gate_weight.len())?;
        check_finite("gate_weight", &self.gate_weight)?;
        if let Some(b) = &self.expert_bias {
            check_len("expert_bias", &[c.experts], b.len())?;
        }
        let p = &self.experts;
        if p.activation != c.activation
            || p.experts != c.experts
            || p.d_model != c.d_model
            || p.d_ffn != c.d_ffn
            || p.storage() != c.storage
        {
            return Err(KernelError::InvalidConfig {
                field: "experts",
                reason: "expert parameters do not match the layer configuration".into(),
            });
        }
        p.validate()
    }

    /// Forward on `x: [tokens, d]`; the output is `state.output` (`[tokens, d]`).
    pub fn forward(&self, cx: &Compute, x: &[f32], tokens: usize, state: &mut MoeState) -> Result<()> {
        let c = &self.config;
        let d = c.d_model;
        check_len("x", &[tokens, d], x.len())?;
        state.tokens = tokens;
        route(
            cx,
            &c.gate,
            x,
            tokens,
            d,
            &self.gate_weight,
            c.experts,
            self.expert_bias.as_deref(),
            &mut state.routing,
        )?;
        state.plan.rebuild(&state.routing)?;
        gather(&state.plan, x, d, &mut state.dispatched)?;
        experts_forward(
            cx,
            &self.experts,
            &state.dispatched,
            &state.plan.offsets,
            &mut state.cache,
            &mut state.expert_output,
        )?;
        set_len(&mut state.output, tokens * d);
        combine(&state.plan, &state.routing.weight, &state.expert_output, d, &mut state.output)
    }

    /// Backward: from `d_output = d loss / d output` (`[tokens, d]`) and the state of the
    /// forward on the same `x`, writes every gradient into `grads`. The gradients include those
    /// of the auxiliary losses (`aux_loss + z_loss` enter the loss with weight 1).
    pub fn backward(
        &self,
        cx: &Compute,
        x: &[f32],
        state: &MoeState,
        d_output: &[f32],
        grads: &mut MoeGrads,
    ) -> Result<()> {
        let c = &self.config;
        let d = c.d_model;
        let tokens = state.tokens;
        check_len("x", &[tokens, d], x.len())?;
        check_len("d_output", &[tokens, d], d_output.len())?;
        check_finite("d_output", d_output)?;
        combine_backward(
            &state.plan,
            &state.routing.weight,
            &state.expert_output,
            d,
            d_output,
            &mut grads.d_expert_output,
            &mut grads.d_weight,
        )?;
        experts_backward(
            cx,
            &self.experts,
            &state.dispatched,
            &state.cache,
            &grads.d_expert_output,
            &mut grads.experts,
            &mut grads.d_dispatched,
        )?;
        set_len(&mut grads.d_x, tokens * d);
        gather_backward(&state.plan, &grads.d_dispatched, d, &mut grads.d_x, false)?;
        route_backward(
            cx,
            &c.gate,
            &state.routing,
            x,
            d,
            &self.gate_weight,
            &grads.d_weight,
            &mut grads.gate,
            &mut grads.d_x,
        )
    }

    /// FLOPs of the expert GEMMs in the last forward of `state` (kept tokens only).
    pub fn expert_forward_flops(&self, state: &MoeState) -> f64 {
        self.config.activation.forward_flops(state.plan.rows(), self.config.d_model, self.config.d_ffn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gate::{CapacityPolicy, DropPolicy};
    use crate::gemm::Engine;
    use crate::reference::RefLayer;
    use crate::testutil::{config, max_rel_err, normal_vec, rng};
    use proptest::prelude::*;

    fn capacity(sel: u8, factor: f32) -> CapacityPolicy {
        match sel % 3 {
            0 => CapacityPolicy::Fixed { factor },
            1 => CapacityPolicy::Dropless,
            _ => CapacityPolicy::CappedDynamic { max_factor: factor },
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn make_layer(
        tokens_hint: usize,
        experts: usize,
        k: usize,
        d: usize,
        h: usize,
        swiglu: bool,
        sel: u8,
        factor: f32,
        bpr: bool,
        renorm: bool,
        bias: bool,
        seed: u64,
    ) -> MoeLayer {
        let _ = tokens_hint;
        let cfg = MoeConfig {
            d_model: d,
            d_ffn: h,
            experts,
            activation: if swiglu { Activation::SwiGlu } else { Activation::Gelu },
            gate: GateConfig {
                top_k: k,
                renormalize: renorm,
                capacity: capacity(sel, factor),
                drop_policy: if bpr { DropPolicy::BatchPrioritized } else { DropPolicy::ArrivalOrder },
                aux_loss_weight: 0.05,
                z_loss_weight: 0.01,
                noise_std: 0.0,
                noise_seed: 0,
            },
            storage: Storage::F32,
        };
        let mut layer = MoeLayer::random(cfg, seed).unwrap();
        if bias {
            let mut r = rng(seed ^ 0xb1a5);
            layer.expert_bias = Some(normal_vec(&mut r, experts, 0.05));
        }
        layer
    }

    proptest! {
        #![proptest_config(config(32))]
        /// Whole-layer forward vs the f64 reference, on random shapes including dropping.
        #[test]
        fn layer_forward_matches_reference(
            tokens in prop_oneof![Just(0usize), Just(1usize), 0usize..2000],
            experts in 1usize..64,
            k_frac in 0.0f64..1.0,
            d in 1usize..5,
            h in 1usize..5,
            swiglu in any::<bool>(),
            sel in any::<u8>(),
            factor in 0.1f32..1.5,
            bpr in any::<bool>(),
            renorm in any::<bool>(),
            bias in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let k = 1 + ((experts as f64 * k_frac) as usize).min(experts - 1);
            let layer = make_layer(tokens, experts, k, d, h, swiglu, sel, factor, bpr, renorm, bias, seed);
            let mut r = rng(seed ^ 7);
            let x = normal_vec(&mut r, tokens * d, 1.0);
            let mut state = MoeState::default();
            layer.forward(&Compute::new(1), &x, tokens, &mut state).unwrap();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let want = RefLayer::from_layer(&layer).forward(&x64, tokens, Some(&state.routing.probs));
            prop_assert_eq!(&state.routing.position, &want.routing.position);
            prop_assert!(max_rel_err(&state.output, &want.output, 1e-3) < 1e-4);
        }

        /// Every gradient (x, gate weight, expert weights and biases) vs central finite
        /// differences of the f64 reference loss `sum(out * r) + aux + z`.
        #[test]
        fn layer_gradients_match_finite_differences(
            tokens in 1usize..14,
            experts in 1usize..6,
            k_frac in 0.0f64..1.0,
            d in 1usize..4,
            h in 1usize..4,
            swiglu in any::<bool>(),
            sel in any::<u8>(),
            factor in 0.3f32..1.5,
            bpr in any::<bool>(),
            renorm in any::<bool>(),
            bias in any::<bool>(),
            threads in 1usize..3,
            seed in any::<u64>(),
        ) {
            let k = 1 + ((experts as f64 * k_frac) as usize).min(experts - 1);
            let layer = make_layer(tokens, experts, k, d, h, swiglu, sel, factor, bpr, renorm, bias, seed);
            let mut rg = rng(seed ^ 11);
            let x = normal_vec(&mut rg, tokens * d, 1.0);
            let rr = normal_vec(&mut rg, tokens * d, 1.0);
            let engine = Engine::new(Compute::new(threads)).unwrap();
            let mut state = MoeState::default();
            let mut grads = MoeGrads::default();
            engine.run(|cx| {
                layer.forward(cx, &x, tokens, &mut state)?;
                layer.backward(cx, &x, &state, &rr, &mut grads)
            }).unwrap();

            let reference = RefLayer::from_layer(&layer);
            let r64: Vec<f64> = rr.iter().map(|&v| v as f64).collect();
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let eps = 1e-6;
            let check = |name: &str, analytic: &[f32], fd: &[f64]| -> std::result::Result<(), TestCaseError> {
                let scale = fd.iter().fold(1e-2f64, |m, v| m.max(v.abs()));
                for (i, (&a, &f)) in analytic.iter().zip(fd).enumerate() {
                    prop_assert!((a as f64 - f).abs() <= 2e-3 * scale,
                        "{}[{}]: analytic {} vs finite difference {} (scale {})", name, i, a, f, scale);
                }
                Ok(())
            };
            // d x
            let fd_x: Vec<f64> = (0..x64.len()).map(|i| {
                let mut p = x64.clone();
                p[i] += eps;
                let up = reference.loss(&p, tokens, &r64);
                p[i] -= 2.0 * eps;
                let down = reference.loss(&p, tokens, &r64);
                (up - down) / (2.0 * eps)
            }).collect();
            check("d_x", &grads.d_x, &fd_x)?;
            // parameters
            macro_rules! fd_param {
                ($($field:ident).+) => {{
                    let n = reference.$($field).+.len();
                    (0..n).map(|i| {
                        let mut p = reference.clone();
                        p.$($field).+[i] += eps;
                        let up = p.loss(&x64, tokens, &r64);
                        p.$($field).+[i] -= 2.0 * eps;
                        let down = p.loss(&x64, tokens, &r64);
                        (up - down) / (2.0 * eps)
                    }).collect::<Vec<f64>>()
                }};
            }
            check("d_gate_weight", &grads.gate.d_gate_weight, &fd_param!(gate_weight))?;
            check("d_w_in", &grads.experts.d_w_in, &fd_param!(experts.w_in))?;
            check("d_w_out", &grads.experts.d_w_out, &fd_param!(experts.w_out))?;
            check("d_b_in", &grads.experts.d_b_in, &fd_param!(experts.b_in))?;
            check("d_b_out", &grads.experts.d_b_out, &fd_param!(experts.b_out))?;
        }
    }

    #[test]
    fn results_do_not_depend_on_thread_count() {
        let layer = make_layer(300, 8, 2, 16, 24, false, 0, 1.0, true, true, false, 5);
        let mut r = rng(9);
        let x = normal_vec(&mut r, 300 * 16, 1.0);
        let g = normal_vec(&mut r, 300 * 16, 1.0);
        let run = |threads: usize| {
            let engine = Engine::new(Compute::new(threads)).unwrap();
            let mut s = MoeState::default();
            let mut gr = MoeGrads::default();
            engine
                .run(|cx| {
                    layer.forward(cx, &x, 300, &mut s)?;
                    layer.backward(cx, &x, &s, &g, &mut gr)
                })
                .unwrap();
            (s.output, gr.d_x, gr.experts.d_w_in, gr.gate.d_gate_weight)
        };
        assert_eq!(run(1), run(1));
        let (o1, dx1, _, _) = run(1);
        let (o2, dx2, _, _) = run(2);
        // Reduction order inside the GEMMs may differ across thread counts: compare closely.
        for (a, b) in o1.iter().zip(&o2).chain(dx1.iter().zip(&dx2)) {
            assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()));
        }
    }

    #[test]
    fn bf16_storage_layer_is_within_bf16_tolerance() {
        for swiglu in [false, true] {
            let mut layer = make_layer(0, 6, 2, 16, 24, swiglu, 1, 1.0, false, true, false, 4);
            let f32_layer = layer.clone();
            layer.config.storage = Storage::Bf16;
            layer.experts = ExpertParams::new(
                layer.experts.activation,
                6,
                16,
                24,
                layer.experts.w_in.to_f32_vec(),
                layer.experts.b_in.clone(),
                layer.experts.w_out.to_f32_vec(),
                layer.experts.b_out.clone(),
                Storage::Bf16,
            )
            .unwrap();
            layer.validate().unwrap();
            f32_layer.validate().unwrap();
            let tokens = 200;
            let mut r = rng(21);
            let x = normal_vec(&mut r, tokens * 16, 1.0);
            let g = normal_vec(&mut r, tokens * 16, 1.0);
            let cx = Compute::new(1);
            let run = |l: &MoeLayer| {
                let mut s = MoeState::default();
                let mut gr = MoeGrads::default();
                l.forward(&cx, &x, tokens, &mut s).unwrap();
                l.backward(&cx, &x, &s, &g, &mut gr).unwrap();
                (s.output, gr)
            };
            let (o16, g16) = run(&layer);
            let (o32, g32) = run(&f32_layer);
            let close = |a: &[f32], b: &[f32]| {
                let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 0.03 * scale)
            };
            assert!(close(&o16, &o32));
            assert!(close(&g16.d_x, &g32.d_x));
            assert!(close(&g16.experts.d_w_in, &g32.experts.d_w_in));
            assert!(close(&g16.experts.d_w_out, &g32.experts.d_w_out));
            assert!(close(&g16.gate.d_gate_weight, &g32.gate.d_gate_weight));
        }
    }

    #[test]
    fn empty_and_single_token_batches() {
        let layer = make_layer(0, 4, 2, 3, 5, true, 1, 1.0, false, true, true, 2);
        let cx = Compute::new(1);
        for tokens in [0usize, 1] {
            let x = vec![0.3f32; tokens * 3];
            let mut state = MoeState::default();
            let mut grads = MoeGrads::default();
            layer.forward(&cx, &x, tokens, &mut state).unwrap();
            layer.backward(&cx, &x, &state, &x, &mut grads).unwrap();
            assert_eq!(state.output.len(), tokens * 3);
            assert_eq!(grads.d_x.len(), tokens * 3);
            assert_eq!(grads.gate.d_gate_weight.len(), 3 * 4);
            assert!(grads.experts.d_w_in.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let layer = make_layer(10, 4, 2, 3, 5, false, 0, 1.0, false, false, false, 1);
        let cx = Compute::new(1);
        let mut state = MoeState::default();
        let x = vec![0.1f32; 10 * 3];
        assert!(matches!(
            layer.forward(&cx, &x[..29], 10, &mut state),
            Err(KernelError::ShapeMismatch { operand: "x", .. })
        ));
        let mut bad = x.clone();
        bad[4] = f32::INFINITY;
        assert!(matches!(layer.forward(&cx, &bad, 10, &mut state), Err(KernelError::NonFinite { .. })));
        layer.forward(&cx, &x, 10, &mut state).unwrap();
        let mut grads = MoeGrads::default();
        assert!(layer.backward(&cx, &x, &state, &x[..3], &mut grads).is_err());
        let mut cfg = layer.config;
        cfg.gate.top_k = 5;
        assert!(matches!(MoeLayer::random(cfg, 1), Err(KernelError::InvalidTopK { top_k: 5, experts: 4 })));
        let mut wrong = layer.clone();
        wrong.gate_weight.pop();
        assert!(wrong.forward(&cx, &x, 10, &mut state).is_err());
    }
}
