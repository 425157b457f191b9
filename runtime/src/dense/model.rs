//! [`GptDense`]: every dense parameter of a GPT-style MoE language model, called sub-layer by
//! sub-layer so that the trainer can put its distributed MoE FFN between the pieces.
//!
//! The model (pre-norm, as GPT-2): `x = embed(tokens)`; per layer `h = x + attn(ln1(x))`,
//! `x = h + moe(ln2(h))`; `loss = cross_entropy(head(ln_f(x)), targets)`. The MoE FFN is not here.
//!
//! ## Composing a training step
//!
//! The residual stream `x` (forward) and its gradient `d_x` (backward) are one buffer each,
//! updated in place; `u`/`d_u` are the MoE input and its gradient. `N` is the number of tokens the
//! loss is averaged over (all workers, all micro-batches).
//!
//! ```text
//! embed_forward(tokens, shape, &mut s.embed, &mut x)
//! for l in 0..L:
//!     attn_sublayer_forward(cx, l, &mut x, shape, &mut s.layers[l].attn)   // x <- x + attn(ln1(x))
//!     pre_ffn_forward(l, &x, shape, &mut s.layers[l].pre_ffn, &mut u)      // u = ln2(x)
//!     m = moe.forward(u);  x += m                                          // the trainer's MoE
//! loss = head_forward(cx, &x, targets, shape, &mut s.head)                // LossSum
//!
//! head_backward(cx, &mut s.head, 1.0 / N, &mut d_x, &mut g)               // d_x = dL/dx (overwritten)
//! for l in (0..L).rev():
//!     d_u = moe.backward(d_x)                                              // the trainer's MoE (d_m = d_x)
//!     pre_ffn_backward(l, &s.layers[l].pre_ffn, &d_u, &mut d_x, &mut g)    // d_x += ln2'(d_u)
//!     attn_sublayer_backward(cx, l, &mut s.layers[l].attn, &mut d_x, &mut g) // d_x <- d_x + ln1'(attn'(d_x))
//! embed_backward(&s.embed, &d_x, &mut g)
//! ```
//!
//! A full backward pass overwrites every parameter gradient in `g` exactly once (no zeroing
//! needed between steps; accumulate micro-batches outside).

use super::attention::{AttentionCache, CausalSelfAttention};
use super::embedding::Embedding;
use super::layer_norm::{LayerNorm, LayerNormCache};
use super::lm_head::{LmHead, LmHeadCache, LossSum};
use super::resized;
use crate::error::{Result, RuntimeError, check_len};
use serde::{Deserialize, Serialize};
use switchyard_kernels::Compute;
use switchyard_kernels::random::seeded_rng;

/// `eps` of every layer norm.
pub const LN_EPS: f32 = 1e-5;
/// Standard deviation of the initial weights (GPT-2).
pub const INIT_STD: f32 = 0.02;

/// The shape of a batch of token sequences: `batch` sequences of `seq` tokens, stored as rows
/// `b * seq + s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct BatchShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
}

impl BatchShape {
    /// `batch * seq`.
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }
}

/// The size of the dense model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GptConfig {
    /// Token ids `0..vocab` (256 for bytes).
    pub vocab: usize,
    /// Model width.
    pub d_model: usize,
    /// Attention heads (divides `d_model`).
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Longest sequence (positions).
    pub ctx: usize,
}

impl GptConfig {
    /// Checks that every size is at least 1 and that `n_heads` divides `d_model`.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("n_heads", self.n_heads),
            ("n_layers", self.n_layers),
            ("ctx", self.ctx),
        ] {
            if v == 0 {
                return Err(RuntimeError::invalid(format!("GptConfig.{field}"), "must be at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_heads) {
            return Err(RuntimeError::invalid(
                "GptConfig.n_heads",
                format!("{} does not divide d_model {}", self.n_heads, self.d_model),
            ));
        }
        Ok(())
    }

    /// Width of one head, `d_model / n_heads`.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads.max(1)
    }
}

/// The dense parts of one transformer block (its MoE FFN lives elsewhere).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptLayer {
    /// Norm before attention.
    pub ln1: LayerNorm,
    /// Causal self-attention.
    pub attn: CausalSelfAttention,
    /// Norm before the MoE FFN.
    pub ln2: LayerNorm,
}

/// Every dense parameter of the model. Also the gradient storage: see [`GptGrads`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptDense {
    /// The size.
    pub config: GptConfig,
    /// Token and position embeddings.
    pub embedding: Embedding,
    /// One per block.
    pub layers: Vec<GptLayer>,
    /// Final norm.
    pub ln_f: LayerNorm,
    /// Untied output projection.
    pub head: LmHead,
}

/// Gradients have the parameters' type and shape ([`GptDense::zeros_like`]), so that both walk
/// their tensors in the same order ([`GptDense::visit_with_grads`]).
pub type GptGrads = GptDense;

/// Saved by [`GptDense::embed_forward`].
#[derive(Debug, Clone, Default)]
pub struct EmbedSaved {
    /// The input tokens, `[batch, seq]`.
    pub tokens: Vec<u32>,
    /// Their shape.
    pub shape: BatchShape,
}

/// Saved by [`GptDense::attn_sublayer_forward`].
#[derive(Debug, Clone, Default)]
pub struct AttnSublayerSaved {
    /// The first norm's cache.
    pub ln1: LayerNormCache,
    /// `ln1(x)`, the attention input, `[tokens, d]`.
    pub ln1_out: Vec<f32>,
    /// The attention's cache.
    pub attn: AttentionCache,
    scratch: Vec<f32>,
}

/// Saved by [`GptDense::pre_ffn_forward`].
#[derive(Debug, Clone, Default)]
pub struct PreFfnSaved {
    /// The second norm's cache.
    pub ln2: LayerNormCache,
}

/// Saved by [`GptDense::head_forward`].
#[derive(Debug, Clone, Default)]
pub struct HeadSaved {
    /// The batch shape.
    pub shape: BatchShape,
    /// Targets, `[batch, seq]`.
    pub targets: Vec<u32>,
    /// The final norm's cache.
    pub ln_f: LayerNormCache,
    /// `ln_f(x)`, `[tokens, d]`.
    pub ln_f_out: Vec<f32>,
    /// The head's cache (probabilities).
    pub head: LmHeadCache,
    scratch: Vec<f32>,
}

/// The saved activations of one block's dense parts.
#[derive(Debug, Clone, Default)]
pub struct LayerSaved {
    /// Attention sub-layer.
    pub attn: AttnSublayerSaved,
    /// Second norm.
    pub pre_ffn: PreFfnSaved,
}

/// All saved activations of one forward pass, reusable from step to step.
#[derive(Debug, Clone, Default)]
pub struct GptSaved {
    /// Embedding.
    pub embed: EmbedSaved,
    /// One per block.
    pub layers: Vec<LayerSaved>,
    /// Final norm and head.
    pub head: HeadSaved,
}

impl GptSaved {
    /// Empty buffers for a model of `config` (one [`LayerSaved`] per layer).
    pub fn new(config: &GptConfig) -> Self {
        Self { layers: vec![LayerSaved::default(); config.n_layers], ..Self::default() }
    }
}

/// Whether decoupled weight decay should apply to the tensor of this name: matrices
/// (`*.weight`, the embedding tables) yes; biases and norm gains/shifts no.
pub fn weight_decay_applies(name: &str) -> bool {
    !(name.ends_with(".bias") || name.ends_with(".gamma") || name.ends_with(".beta"))
}

impl GptDense {
    /// A model with GPT-2 initialisation, deterministic from `seed` (ChaCha8): weights
    /// `N(0, 0.02^2)`, attention output projections `N(0, (0.02 / sqrt(2 n_layers))^2)`, position
    /// table `N(0, 0.01^2)`, biases 0, norms identity. Drawn in order: embedding, layers, head.
    pub fn random(config: GptConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let GptConfig { vocab, d_model: d, n_heads, n_layers, ctx } = config;
        let mut rng = seeded_rng(seed);
        let embedding = Embedding::random(vocab, d, ctx, INIT_STD, INIT_STD / 2.0, &mut rng);
        let proj_std = INIT_STD / (2.0 * n_layers as f32).sqrt();
        let layers = (0..n_layers)
            .map(|_| {
                Ok(GptLayer {
                    ln1: LayerNorm::new(d, LN_EPS),
                    attn: CausalSelfAttention::random(d, n_heads, INIT_STD, proj_std, &mut rng)?,
                    ln2: LayerNorm::new(d, LN_EPS),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = LmHead::random(d, vocab, INIT_STD, &mut rng);
        Ok(Self { config, embedding, layers, ln_f: LayerNorm::new(d, LN_EPS), head })
    }

    /// The same shapes with every value zero: gradient storage.
    pub fn zeros_like(&self) -> GptGrads {
        Self {
            config: self.config,
            embedding: self.embedding.zeros_like(),
            layers: self
                .layers
                .iter()
                .map(|l| GptLayer { ln1: l.ln1.zeros_like(), attn: l.attn.zeros_like(), ln2: l.ln2.zeros_like() })
                .collect(),
            ln_f: self.ln_f.zeros_like(),
            head: self.head.zeros_like(),
        }
    }

    /// Every tensor with its name, in the fixed order: `embed.token`, `embed.position`, then per
    /// layer `l`: `layers.l.ln1.{gamma,beta}`, `layers.l.attn.qkv.{weight,bias}`,
    /// `layers.l.attn.proj.{weight,bias}`, `layers.l.ln2.{gamma,beta}`; then `ln_f.{gamma,beta}`,
    /// `head.weight`.
    pub fn params_flat(&self) -> Vec<(String, &[f32])> {
        let mut out = Vec::new();
        self.embedding.tensors("embed", &mut out);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.ln1.tensors(&format!("layers.{l}.ln1"), &mut out);
            layer.attn.tensors(&format!("layers.{l}.attn"), &mut out);
            layer.ln2.tensors(&format!("layers.{l}.ln2"), &mut out);
        }
        self.ln_f.tensors("ln_f", &mut out);
        self.head.tensors("head", &mut out);
        out
    }

    /// Mutable form of [`GptDense::params_flat`] (same order).
    pub fn params_flat_mut(&mut self) -> Vec<(String, &mut [f32])> {
        let mut out = Vec::new();
        self.embedding.tensors_mut("embed", &mut out);
        for (l, layer) in self.layers.iter_mut().enumerate() {
            layer.ln1.tensors_mut(&format!("layers.{l}.ln1"), &mut out);
            layer.attn.tensors_mut(&format!("layers.{l}.attn"), &mut out);
            layer.ln2.tensors_mut(&format!("layers.{l}.ln2"), &mut out);
        }
        self.ln_f.tensors_mut("ln_f", &mut out);
        self.head.tensors_mut("head", &mut out);
        out
    }

    /// Calls `f(name, tensor)` for every tensor in [`GptDense::params_flat`] order.
    pub fn visit(&self, mut f: impl FnMut(&str, &[f32])) {
        for (name, t) in self.params_flat() {
            f(&name, t);
        }
    }

    /// Calls `f(name, tensor)` for every tensor, mutably, in [`GptDense::params_flat`] order.
    pub fn visit_mut(&mut self, mut f: impl FnMut(&str, &mut [f32])) {
        for (name, t) in self.params_flat_mut() {
            f(&name, t);
        }
    }

    /// Calls `f(name, param, grad)` for every tensor in [`GptDense::params_flat`] order (the
    /// optimizer step); an error unless `grads` has this model's shapes.
    pub fn visit_with_grads(&mut self, grads: &GptGrads, mut f: impl FnMut(&str, &mut [f32], &[f32])) -> Result<()> {
        let gs = grads.params_flat();
        let ps = self.params_flat_mut();
        if ps.len() != gs.len() || ps.iter().zip(&gs).any(|((pn, p), (gn, g))| pn != gn || p.len() != g.len()) {
            return Err(RuntimeError::invalid(
                "gradients",
                "tensors differ from the model's; build the gradient storage with zeros_like".to_string(),
            ));
        }
        for ((name, p), (_, g)) in ps.into_iter().zip(gs) {
            f(&name, p, g);
        }
        Ok(())
    }

    /// Number of parameters.
    pub fn param_count(&self) -> usize {
        self.params_flat().iter().map(|(_, t)| t.len()).sum()
    }

    fn layer(&self, layer: usize) -> Result<&GptLayer> {
        self.layers.get(layer).ok_or_else(|| {
            RuntimeError::invalid("layer", format!("index {layer} out of range (the model has {})", self.layers.len()))
        })
    }

    fn layer_grads<'g>(&self, layer: usize, grads: &'g mut GptGrads) -> Result<&'g mut GptLayer> {
        let n = grads.layers.len();
        if n != self.layers.len() {
            return Err(RuntimeError::invalid(
                "gradients",
                format!("{n} layers, the model has {}; build them with zeros_like", self.layers.len()),
            ));
        }
        grads.layers.get_mut(layer).ok_or_else(|| RuntimeError::invalid("layer", format!("index {layer} out of range")))
    }

    fn width_check(&self, what: &str, buf: usize, shape: BatchShape) -> Result<()> {
        let d = self.config.d_model;
        check_len(what, &format!("[{}, {d}]", shape.tokens()), shape.tokens() * d, buf)
    }

    /// `x = embed(tokens)`: `tokens: [batch, seq]`, `x` resized to `[batch * seq, d]`.
    pub fn embed_forward(
        &self,
        tokens: &[u32],
        shape: BatchShape,
        saved: &mut EmbedSaved,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let x = resized(x, shape.tokens() * self.config.d_model);
        self.embedding.forward(tokens, shape, x)?;
        saved.tokens.clear();
        saved.tokens.extend_from_slice(tokens);
        saved.shape = shape;
        Ok(())
    }

    /// In place on the residual stream: `x <- x + attn(ln1(x))` for block `layer`.
    pub fn attn_sublayer_forward(
        &self,
        cx: &Compute,
        layer: usize,
        x: &mut [f32],
        shape: BatchShape,
        saved: &mut AttnSublayerSaved,
    ) -> Result<()> {
        let p = self.layer(layer)?;
        self.width_check("residual stream", x.len(), shape)?;
        let n = x.len();
        let t = shape.tokens();
        let a_in = resized(&mut saved.ln1_out, n);
        p.ln1.forward(x, t, a_in, &mut saved.ln1)?;
        let a_out = resized(&mut saved.scratch, n);
        p.attn.forward(cx, a_in, shape, a_out, &mut saved.attn)?;
        for (xi, ai) in x.iter_mut().zip(a_out.iter()) {
            *xi += ai;
        }
        Ok(())
    }

    /// `u = ln2(x)` for block `layer` (`u` resized to `x`'s shape): the MoE FFN input.
    pub fn pre_ffn_forward(
        &self,
        layer: usize,
        x: &[f32],
        shape: BatchShape,
        saved: &mut PreFfnSaved,
        u: &mut Vec<f32>,
    ) -> Result<()> {
        let p = self.layer(layer)?;
        self.width_check("residual stream", x.len(), shape)?;
        let u = resized(u, x.len());
        p.ln2.forward(x, shape.tokens(), u, &mut saved.ln2)
    }

    /// The summed cross-entropy of `targets: [batch, seq]` under `head(ln_f(x))`.
    pub fn head_forward(
        &self,
        cx: &Compute,
        x: &[f32],
        targets: &[u32],
        shape: BatchShape,
        saved: &mut HeadSaved,
    ) -> Result<LossSum> {
        self.width_check("residual stream", x.len(), shape)?;
        let t = shape.tokens();
        let h = resized(&mut saved.ln_f_out, x.len());
        self.ln_f.forward(x, t, h, &mut saved.ln_f)?;
        let loss = self.head.forward(cx, h, t, targets, &mut saved.head)?;
        saved.shape = shape;
        saved.targets.clear();
        saved.targets.extend_from_slice(targets);
        Ok(loss)
    }

    /// Logits `head(ln_f(x))` for `rows` rows into `logits` (resized to `[rows, vocab]`), saving
    /// nothing (evaluation, sampling).
    pub fn head_logits(&self, cx: &Compute, x: &[f32], rows: usize, logits: &mut Vec<f32>) -> Result<()> {
        let d = self.config.d_model;
        check_len("residual stream", &format!("[{rows}, {d}]"), rows * d, x.len())?;
        let mut h = vec![0.0; x.len()];
        self.ln_f.forward(x, rows, &mut h, &mut LayerNormCache::default())?;
        let logits = resized(logits, rows * self.config.vocab);
        self.head.logits(cx, &h, rows, logits)
    }

    /// Backward of [`GptDense::head_forward`] for the loss `loss_scale * sum` (pass `1 / N`, `N` the
    /// tokens the mean is over across workers and micro-batches): `d_x` is resized and overwritten
    /// with the gradient at the final residual stream; overwrites the `ln_f` and `head` gradients.
    pub fn head_backward(
        &self,
        cx: &Compute,
        saved: &mut HeadSaved,
        loss_scale: f32,
        d_x: &mut Vec<f32>,
        grads: &mut GptGrads,
    ) -> Result<()> {
        let n = saved.shape.tokens() * self.config.d_model;
        check_len("saved final norm output", "[tokens, d]", n, saved.ln_f_out.len())?;
        let d_h = resized(&mut saved.scratch, n);
        self.head.backward(cx, &saved.ln_f_out, &saved.targets, &mut saved.head, loss_scale, d_h, &mut grads.head)?;
        let d_x = resized(d_x, n);
        self.ln_f.backward(&saved.ln_f, d_h, d_x, false, &mut grads.ln_f)
    }

    /// Backward of [`GptDense::pre_ffn_forward`]: adds `ln2`'s input gradient for `d_u` (the MoE
    /// input gradient) to the residual-stream gradient `d_x`; overwrites the `ln2` gradients.
    pub fn pre_ffn_backward(
        &self,
        layer: usize,
        saved: &PreFfnSaved,
        d_u: &[f32],
        d_x: &mut [f32],
        grads: &mut GptGrads,
    ) -> Result<()> {
        let p = self.layer(layer)?;
        let g = self.layer_grads(layer, grads)?;
        p.ln2.backward(&saved.ln2, d_u, d_x, true, &mut g.ln2)
    }

    /// Backward of [`GptDense::attn_sublayer_forward`], in place on the residual-stream gradient:
    /// `d_x <- d_x + ln1'(attn'(d_x))`; overwrites the block's `ln1` and attention gradients.
    pub fn attn_sublayer_backward(
        &self,
        cx: &Compute,
        layer: usize,
        saved: &mut AttnSublayerSaved,
        d_x: &mut [f32],
        grads: &mut GptGrads,
    ) -> Result<()> {
        let p = self.layer(layer)?;
        let g = self.layer_grads(layer, grads)?;
        let n = d_x.len();
        let d_a_in = resized(&mut saved.scratch, n);
        p.attn.backward(cx, &saved.ln1_out, &mut saved.attn, d_x, d_a_in, &mut g.attn)?;
        p.ln1.backward(&saved.ln1, d_a_in, d_x, true, &mut g.ln1)
    }

    /// Backward of [`GptDense::embed_forward`]: overwrites the embedding gradients from `d_x`.
    pub fn embed_backward(&self, saved: &EmbedSaved, d_x: &[f32], grads: &mut GptGrads) -> Result<()> {
        self.embedding.backward(&saved.tokens, saved.shape, d_x, &mut grads.embedding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dense::reference::{self as r, assert_close, engine, to64};
    use switchyard_kernels::random::{SeededRng, normal_vec};

    const TINY: GptConfig = GptConfig { vocab: 11, d_model: 8, n_heads: 2, n_layers: 2, ctx: 6 };

    /// A dense stand-in for the MoE FFN: `m = u F_l` with a fixed `[d, d]` matrix per layer.
    struct LinearFfn {
        d: usize,
        mats: Vec<Vec<f32>>,
    }

    impl LinearFfn {
        fn new(config: &GptConfig, seed: u64) -> Self {
            let mut rng = seeded_rng(seed);
            let d = config.d_model;
            Self { d, mats: (0..config.n_layers).map(|_| normal_vec(&mut rng, d * d, 0.5)).collect() }
        }
        fn forward(&self, l: usize, u: &[f32]) -> Vec<f32> {
            let m = to64(&self.mats[l]);
            r::linear(&to64(u), u.len() / self.d, &m, None, self.d, self.d).iter().map(|&v| v as f32).collect()
        }
        fn backward(&self, l: usize, d_m: &[f32]) -> Vec<f32> {
            let (d, m) = (self.d, &self.mats[l]);
            let mut d_u = vec![0.0; d_m.len()];
            for (du, dm) in d_u.chunks_mut(d).zip(d_m.chunks(d)) {
                for i in 0..d {
                    du[i] = (0..d).map(|j| m[i * d + j] * dm[j]).sum();
                }
            }
            d_u
        }
    }

    /// One forward and backward pass in the documented call sequence.
    fn step(
        model: &GptDense,
        ffn: &LinearFfn,
        tokens: &[u32],
        targets: &[u32],
        shape: BatchShape,
        s: &mut GptSaved,
        g: &mut GptGrads,
    ) -> Result<LossSum> {
        engine().run(|cx| {
            let mut x = Vec::new();
            let mut u = Vec::new();
            model.embed_forward(tokens, shape, &mut s.embed, &mut x)?;
            for l in 0..model.config.n_layers {
                model.attn_sublayer_forward(cx, l, &mut x, shape, &mut s.layers[l].attn)?;
                model.pre_ffn_forward(l, &x, shape, &mut s.layers[l].pre_ffn, &mut u)?;
                for (xi, mi) in x.iter_mut().zip(ffn.forward(l, &u)) {
                    *xi += mi;
                }
            }
            let loss = model.head_forward(cx, &x, targets, shape, &mut s.head)?;
            let mut d_x = Vec::new();
            model.head_backward(cx, &mut s.head, 1.0 / shape.tokens() as f32, &mut d_x, g)?;
            for l in (0..model.config.n_layers).rev() {
                let d_u = ffn.backward(l, &d_x);
                model.pre_ffn_backward(l, &s.layers[l].pre_ffn, &d_u, &mut d_x, g)?;
                model.attn_sublayer_backward(cx, l, &mut s.layers[l].attn, &mut d_x, g)?;
            }
            model.embed_backward(&s.embed, &d_x, g)?;
            Ok(loss)
        })
    }

    /// A model with non-trivial norms and biases (the initial ones are identity / zero).
    fn perturbed(config: GptConfig, seed: u64) -> GptDense {
        let mut model = GptDense::random(config, seed).unwrap();
        let mut rng = seeded_rng(seed + 1);
        model.visit_mut(|name, t| {
            let noise = normal_vec(&mut rng, t.len(), 0.3);
            for (v, n) in t.iter_mut().zip(noise) {
                *v += if name.ends_with("gamma") { n } else { n * 0.5 };
            }
        });
        model
    }

    #[test]
    fn full_model_gradients_match_finite_differences() {
        let config = TINY;
        let model = perturbed(config, 50);
        let ffn = LinearFfn::new(&config, 51);
        let shape = BatchShape { batch: 2, seq: 5 };
        let mut rng = seeded_rng(52);
        let ids = |rng: &mut SeededRng| -> Vec<u32> {
            normal_vec(rng, shape.tokens(), 1.0).iter().map(|v| (v.abs() * 7.0) as u32 % config.vocab as u32).collect()
        };
        let tokens = ids(&mut rng);
        let targets = ids(&mut rng);
        let mut saved = GptSaved::new(&config);
        let mut grads = model.zeros_like();
        let loss = step(&model, &ffn, &tokens, &targets, shape, &mut saved, &mut grads).unwrap();

        let ffn64 = |l: usize, u: &[f64], rows: usize| r::linear(u, rows, &to64(&ffn.mats[l]), None, 8, 8);
        let reference = |m: &GptDense| r::gpt_loss(m, &tokens, &targets, shape, &ffn64);
        let want = reference(&model);
        assert!((loss.mean() - want).abs() < 1e-5 * want, "loss {} vs {want}", loss.mean());

        // Every parameter tensor, every element, against central differences of the f64 model.
        let names: Vec<String> = model.params_flat().into_iter().map(|(n, _)| n).collect();
        let analytic: Vec<Vec<f32>> = grads.params_flat().into_iter().map(|(_, g)| g.to_vec()).collect();
        for (ti, name) in names.iter().enumerate() {
            let base = model.params_flat()[ti].1.to_vec();
            let mut probe = model.clone();
            let fd = r::fd_grad(&base, |p| {
                probe.params_flat_mut()[ti].1.copy_from_slice(p);
                reference(&probe)
            });
            assert_close(name, &analytic[ti], &fd, 2e-4);
        }
    }

    #[test]
    fn init_is_deterministic_and_params_walk_in_a_fixed_order() {
        let a = GptDense::random(TINY, 7).unwrap();
        let b = GptDense::random(TINY, 7).unwrap();
        let c = GptDense::random(TINY, 8).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let names: Vec<String> = a.params_flat().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 2 + 2 * 8 + 3);
        assert_eq!(names[0], "embed.token");
        assert_eq!(names[4], "layers.0.attn.qkv.weight");
        assert_eq!(names.last().unwrap(), "head.weight");
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len());
        let (v, d, c) = (11, 8, 6);
        let per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d;
        assert_eq!(a.param_count(), v * d + c * d + 2 * per_layer + 2 * d + d * v);
        assert!(weight_decay_applies("layers.0.attn.qkv.weight") && weight_decay_applies("embed.token"));
        assert!(!weight_decay_applies("layers.0.attn.qkv.bias") && !weight_decay_applies("ln_f.gamma"));

        let mut p = a.clone();
        let g = a.zeros_like();
        let mut seen = 0;
        p.visit_with_grads(&g, |_, p, g| {
            assert_eq!(p.len(), g.len());
            seen += 1;
        })
        .unwrap();
        assert_eq!(seen, names.len());
        let other = GptDense::random(GptConfig { n_layers: 1, ..TINY }, 7).unwrap();
        assert!(p.visit_with_grads(&other, |_, _, _| {}).is_err());
    }

    #[test]
    fn same_bits_on_repeat_and_errors_on_bad_input() {
        let model = perturbed(TINY, 60);
        let ffn = LinearFfn::new(&TINY, 61);
        let shape = BatchShape { batch: 2, seq: 6 };
        let tokens: Vec<u32> = (0..12).map(|i| i % 11).collect();
        let targets: Vec<u32> = (0..12).map(|i| (i + 1) % 11).collect();
        let run = || {
            let mut s = GptSaved::new(&TINY);
            let mut g = model.zeros_like();
            let loss = step(&model, &ffn, &tokens, &targets, shape, &mut s, &mut g).unwrap();
            (loss, g)
        };
        assert_eq!(run(), run());

        let mut s = GptSaved::new(&TINY);
        let mut g = model.zeros_like();
        let bad_shape = BatchShape { batch: 1, seq: 12 }; // seq > ctx
        assert!(step(&model, &ffn, &tokens, &targets, bad_shape, &mut s, &mut g).is_err());
        let mut bad = tokens.clone();
        bad[3] = 11;
        assert!(step(&model, &ffn, &bad, &targets, shape, &mut s, &mut g).is_err());
        let mut x = vec![0.0; 12 * 8];
        let e = engine();
        assert!(e.run(|cx| model.attn_sublayer_forward(cx, 2, &mut x, shape, &mut s.layers[0].attn)).is_err());
        assert!(e.run(|cx| model.attn_sublayer_forward(cx, 0, &mut x[..90], shape, &mut s.layers[0].attn)).is_err());
        assert!(GptDense::random(GptConfig { n_heads: 3, ..TINY }, 1).is_err());
        assert!(GptDense::random(GptConfig { vocab: 0, ..TINY }, 1).is_err());

        let mut logits = Vec::new();
        e.run(|cx| model.head_logits(cx, &x, 12, &mut logits)).unwrap();
        assert_eq!(logits.len(), 12 * 11);
    }

    #[test]
    fn a_tiny_model_learns_the_synthetic_text() {
        use crate::data::{BYTE_VOCAB, Batcher, Corpus};
        use crate::optim::{Adam, AdamState};
        let config = GptConfig { vocab: BYTE_VOCAB, d_model: 32, n_heads: 2, n_layers: 1, ctx: 16 };
        let mut model = GptDense::random(config, 3).unwrap();
        // Identity "FFN": block output = h + ln2(h).
        let ffn = LinearFfn { d: 32, mats: vec![(0..32 * 32).map(|i| if i % 33 == 0 { 1.0 } else { 0.0 }).collect()] };
        let batcher = Batcher::new(&Corpus::synthetic(1, 20_000), 16, 8, 2).unwrap();
        let adam = Adam { lr: 1e-2, ..Adam::default() };
        let mut states: Vec<AdamState> = model.params_flat().iter().map(|(_, t)| AdamState::new(t.len())).collect();
        let (mut saved, mut grads) = (GptSaved::new(&config), model.zeros_like());
        let mut losses = Vec::new();
        for step_no in 0..40 {
            let b = batcher.batch(step_no);
            let loss = step(&model, &ffn, &b.inputs, &b.targets, b.shape, &mut saved, &mut grads).unwrap();
            losses.push(loss.mean());
            let mut i = 0;
            model
                .visit_with_grads(&grads, |_, p, g| {
                    adam.step(p, g, &mut states[i]).unwrap();
                    i += 1;
                })
                .unwrap();
        }
        let first = losses[0];
        let last = losses[30..].iter().sum::<f64>() / 10.0;
        assert!((first - (BYTE_VOCAB as f64).ln()).abs() < 0.1, "initial loss {first}");
        assert!(last < 2.6, "loss {first:.3} -> {last:.3}");
    }
}
