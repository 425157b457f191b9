//! The model spec: a transformer with optional Mixture-of-Experts FFN blocks, and the parameter, FLOP and
//! activation counts that the performance model needs. Sizes are element counts; bytes and times carry units in
//! their names.

use serde::{Deserialize, Serialize};

use crate::error::{Source, SpecError};

/// Numeric format of weights and activations during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// IEEE single precision.
    Fp32,
    /// IEEE half precision.
    Fp16,
    /// bfloat16.
    Bf16,
    /// 8-bit floating point (E4M3/E5M2) GEMMs, bf16 elsewhere.
    Fp8,
}

impl Dtype {
    /// Bytes of one element as stored for weights and activations.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::Fp32 => 4,
            Dtype::Fp16 | Dtype::Bf16 => 2,
            Dtype::Fp8 => 1,
        }
    }

    /// Bytes of one element of an activation sent over the network (fp8 training still exchanges bf16 in
    /// combine; dispatch may be fp8: we charge the larger, bf16).
    pub fn comm_bytes(self) -> u64 {
        match self {
            Dtype::Fp8 => 2,
            d => d.bytes(),
        }
    }
}

/// Optimizer, which fixes the bytes of state kept per parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    /// Adam/AdamW: fp32 master weights (unless training in fp32) and two fp32 moments.
    Adam,
    /// SGD with momentum: fp32 master weights (unless fp32) and one fp32 moment.
    Sgd,
}

/// Self-attention block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum AttentionSpec {
    /// Multi-head (or grouped-query when `num_kv_heads` < `num_heads`) attention.
    Mha {
        /// Query heads.
        num_heads: u32,
        /// Key/value heads (= num_heads for plain multi-head attention).
        num_kv_heads: u32,
        /// Dimension of one head (usually hidden_size / num_heads).
        head_dim: u64,
    },
    /// DeepSeek's multi-head latent attention.
    Mla {
        /// Heads.
        num_heads: u32,
        /// Rank of the query compression (0 = no compression).
        q_lora_rank: u64,
        /// Rank of the key/value compression.
        kv_lora_rank: u64,
        /// Per-head query/key dimension without rotary embedding.
        qk_nope_head_dim: u64,
        /// Per-head query/key dimension with rotary embedding.
        qk_rope_head_dim: u64,
        /// Per-head value dimension.
        v_head_dim: u64,
    },
}

impl AttentionSpec {
    /// Query heads.
    pub fn num_heads(&self) -> u32 {
        match self {
            AttentionSpec::Mha { num_heads, .. } | AttentionSpec::Mla { num_heads, .. } => *num_heads,
        }
    }

    /// Weights of one attention block (projections only, no norms) for hidden size `h`.
    pub fn params(&self, h: u64) -> u64 {
        match *self {
            AttentionSpec::Mha { num_heads, num_kv_heads, head_dim } => {
                let q = h * num_heads as u64 * head_dim;
                let kv = 2 * h * num_kv_heads as u64 * head_dim;
                let o = num_heads as u64 * head_dim * h;
                q + kv + o
            }
            AttentionSpec::Mla {
                num_heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let n = num_heads as u64;
                let qk = qk_nope_head_dim + qk_rope_head_dim;
                let q = if q_lora_rank == 0 { h * n * qk } else { h * q_lora_rank + q_lora_rank * n * qk };
                let kv_down = h * (kv_lora_rank + qk_rope_head_dim);
                let kv_up = kv_lora_rank * n * (qk_nope_head_dim + v_head_dim);
                let o = n * v_head_dim * h;
                q + kv_down + kv_up + o
            }
        }
    }

    /// Width of the attention scores computation: heads x (query-key dim + value dim), used for the
    /// `QK^T` and `softmax(QK^T) V` FLOPs.
    pub fn score_width(&self) -> u64 {
        match *self {
            AttentionSpec::Mha { num_heads, head_dim, .. } => num_heads as u64 * 2 * head_dim,
            AttentionSpec::Mla { num_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, .. } => {
                num_heads as u64 * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)
            }
        }
    }
}

/// The Mixture-of-Experts part of a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    /// Routed experts per MoE layer.
    pub num_experts: u32,
    /// Experts each token is routed to.
    pub top_k: u32,
    /// Hidden size of one routed expert's FFN.
    pub expert_ffn_hidden: u64,
    /// Gated FFN (SwiGLU: three matrices) instead of Linear-GELU-Linear (two).
    #[serde(default)]
    pub gated: bool,
    /// Shared experts every token passes through (DeepSeek, Qwen2-MoE).
    #[serde(default)]
    pub num_shared_experts: u32,
    /// Hidden size of one shared expert (default: `expert_ffn_hidden`).
    #[serde(default)]
    pub shared_expert_ffn_hidden: Option<u64>,
    /// Every `moe_layer_frequency`-th layer (counting after the dense prefix) is an MoE layer.
    #[serde(default = "one")]
    pub moe_layer_frequency: u32,
    /// The first `first_k_dense_layers` layers are dense.
    #[serde(default)]
    pub first_k_dense_layers: u32,
    /// Expert capacity as a multiple of the mean tokens per expert; `null` means dropless.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Expert groups for group-limited routing (DeepSeek-V3: 8); EPLB's hierarchical policy packs them on nodes.
    #[serde(default)]
    pub num_expert_groups: Option<u32>,
}

fn one() -> u32 {
    1
}

impl MoeSpec {
    /// Weights of one routed expert.
    pub fn expert_params(&self, hidden: u64) -> u64 {
        let mats = if self.gated { 3 } else { 2 };
        let bias = if self.gated { 0 } else { self.expert_ffn_hidden + hidden };
        mats * hidden * self.expert_ffn_hidden + bias
    }

    /// Weights of all shared experts of one layer.
    pub fn shared_params(&self, hidden: u64) -> u64 {
        let h = self.shared_expert_ffn_hidden.unwrap_or(self.expert_ffn_hidden);
        let mats = if self.gated { 3 } else { 2 };
        self.num_shared_experts as u64 * mats * hidden * h
    }

    /// Router weights of one layer.
    pub fn router_params(&self, hidden: u64) -> u64 {
        hidden * self.num_experts as u64
    }
}

/// Largest model `validate` accepts: 2^50 (about 1.1e15) parameters.
pub const MAX_PARAMS: f64 = (1u64 << 50) as f64;

/// A transformer language model, dense or MoE.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Name shown in tables.
    pub name: String,
    /// Transformer layers.
    pub num_layers: u32,
    /// Model (residual stream) width.
    pub hidden_size: u64,
    /// The attention block.
    pub attention: AttentionSpec,
    /// Hidden size of the dense FFN (used by dense layers).
    pub ffn_hidden: u64,
    /// The dense FFN is gated (SwiGLU).
    #[serde(default)]
    pub gated_ffn: bool,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Input and output embeddings share weights.
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Tokens per sequence.
    pub seq_len: u64,
    /// Sequences per iteration, summed over data-parallel replicas.
    pub global_batch: u64,
    /// Training precision.
    pub dtype: Dtype,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// The MoE block; absent for a dense model.
    #[serde(default)]
    pub moe: Option<MoeSpec>,
}

/// Parameter counts of a model, split the way parallelism splits them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamCounts {
    /// Input embedding.
    pub embedding: u64,
    /// Output head (0 when tied).
    pub lm_head: u64,
    /// Attention + norms + dense FFN + shared experts + router, summed over layers: replicated by dp, split by tp.
    pub dense_layers: u64,
    /// Routed expert weights summed over all MoE layers and experts: split by ep.
    pub experts: u64,
    /// Total.
    pub total: u64,
    /// Parameters touched per token by the transformer layers: dense + top_k experts per MoE layer. Embedding and
    /// output head are excluded (published "active" figures include them: add `embedding + lm_head`).
    pub active_per_token: u64,
}

impl ModelSpec {
    /// Whether layer `l` (0-based) is an MoE layer.
    pub fn is_moe_layer(&self, l: u32) -> bool {
        match &self.moe {
            None => false,
            Some(m) => {
                l >= m.first_k_dense_layers && (l - m.first_k_dense_layers).is_multiple_of(m.moe_layer_frequency.max(1))
            }
        }
    }

    /// Number of MoE layers.
    pub fn num_moe_layers(&self) -> u32 {
        (0..self.num_layers).filter(|&l| self.is_moe_layer(l)).count() as u32
    }

    /// Weights of one dense FFN.
    pub fn dense_ffn_params(&self) -> u64 {
        let mats = if self.gated_ffn { 3 } else { 2 };
        mats * self.hidden_size * self.ffn_hidden
    }

    /// Weights of one layer that every tensor-parallel group replicates (everything but routed experts).
    pub fn layer_dense_params(&self, l: u32) -> u64 {
        let h = self.hidden_size;
        let norms = 4 * h;
        let attn = self.attention.params(h);
        let ffn = match (&self.moe, self.is_moe_layer(l)) {
            (Some(m), true) => m.shared_params(h) + m.router_params(h),
            _ => self.dense_ffn_params(),
        };
        attn + norms + ffn
    }

    /// Routed expert weights of layer `l` (0 for a dense layer).
    pub fn layer_expert_params(&self, l: u32) -> u64 {
        match (&self.moe, self.is_moe_layer(l)) {
            (Some(m), true) => m.num_experts as u64 * m.expert_params(self.hidden_size),
            _ => 0,
        }
    }

    /// Parameter counts.
    pub fn param_counts(&self) -> ParamCounts {
        let embedding = self.vocab_size * self.hidden_size;
        let lm_head = if self.tied_embeddings { 0 } else { embedding };
        let mut dense = 0;
        let mut experts = 0;
        let mut active = 0;
        for l in 0..self.num_layers {
            dense += self.layer_dense_params(l);
            experts += self.layer_expert_params(l);
            active += self.layer_dense_params(l);
            if let (Some(m), true) = (&self.moe, self.is_moe_layer(l)) {
                active += m.top_k as u64 * m.expert_params(self.hidden_size);
            }
        }
        ParamCounts {
            embedding,
            lm_head,
            dense_layers: dense,
            experts,
            total: embedding + lm_head + dense + experts,
            active_per_token: active,
        }
    }

    /// Total parameters computed in `f64` (no overflow whatever the sizes): the guard `validate` uses before
    /// anything multiplies sizes in integers.
    pub fn approx_total_params(&self) -> f64 {
        let h = self.hidden_size as f64;
        let attn = match self.attention {
            AttentionSpec::Mha { num_heads, num_kv_heads, head_dim } => {
                h * head_dim as f64 * (2.0 * num_heads as f64 + 2.0 * num_kv_heads as f64)
            }
            AttentionSpec::Mla {
                num_heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            } => {
                let n = num_heads as f64;
                let qk = (qk_nope_head_dim + qk_rope_head_dim) as f64;
                h * (q_lora_rank as f64 + n * qk)
                    + q_lora_rank as f64 * n * qk
                    + h * (kv_lora_rank + qk_rope_head_dim) as f64
                    + kv_lora_rank as f64 * n * (qk_nope_head_dim + v_head_dim) as f64
                    + n * v_head_dim as f64 * h
            }
        };
        let ffn = 3.0 * h * self.ffn_hidden as f64;
        let moe = self.moe.as_ref().map_or(0.0, |m| {
            let shared = m.shared_expert_ffn_hidden.unwrap_or(m.expert_ffn_hidden) as f64 * m.num_shared_experts as f64;
            3.0 * h * (m.expert_ffn_hidden as f64 * m.num_experts as f64 + shared) + h * m.num_experts as f64
        });
        self.num_layers as f64 * (attn + ffn + moe + 4.0 * h) + 2.0 * self.vocab_size as f64 * h
    }

    /// Tokens per iteration.
    pub fn tokens_per_iteration(&self) -> u64 {
        self.global_batch * self.seq_len
    }

    /// Checks every field; the error names the field, its value, why and how to fix it.
    pub fn validate(&self, source: &Source) -> Result<(), SpecError> {
        let pos = |field: &str, v: u64| -> Result<(), SpecError> {
            if v == 0 {
                Err(SpecError::invalid(source, field, v, "must be positive", "set it to the model's real size (> 0)"))
            } else {
                Ok(())
            }
        };
        if self.name.trim().is_empty() {
            return Err(SpecError::invalid(source, "name", "\"\"", "must not be empty", "give the model a name"));
        }
        pos("num_layers", self.num_layers as u64)?;
        if self.num_layers > 10_000 {
            return Err(SpecError::invalid(
                source,
                "num_layers",
                self.num_layers,
                "more than 10,000 layers is not a real model",
                "check the value",
            ));
        }
        pos("hidden_size", self.hidden_size)?;
        pos("ffn_hidden", self.ffn_hidden)?;
        pos("vocab_size", self.vocab_size)?;
        pos("seq_len", self.seq_len)?;
        pos("global_batch", self.global_batch)?;
        match self.attention {
            AttentionSpec::Mha { num_heads, num_kv_heads, head_dim } => {
                pos("attention.num_heads", num_heads as u64)?;
                pos("attention.num_kv_heads", num_kv_heads as u64)?;
                pos("attention.head_dim", head_dim)?;
                if num_heads % num_kv_heads != 0 {
                    return Err(SpecError::invalid(
                        source,
                        "attention.num_kv_heads",
                        num_kv_heads,
                        format!("must divide num_heads ({num_heads})"),
                        "use a divisor of num_heads (grouped-query attention shares each KV head among equal groups)",
                    ));
                }
            }
            AttentionSpec::Mla { num_heads, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, .. } => {
                pos("attention.num_heads", num_heads as u64)?;
                pos("attention.kv_lora_rank", kv_lora_rank)?;
                pos("attention.qk_nope_head_dim", qk_nope_head_dim)?;
                pos("attention.qk_rope_head_dim", qk_rope_head_dim)?;
                pos("attention.v_head_dim", v_head_dim)?;
            }
        }
        if let Some(m) = &self.moe {
            pos("moe.num_experts", m.num_experts as u64)?;
            pos("moe.top_k", m.top_k as u64)?;
            pos("moe.expert_ffn_hidden", m.expert_ffn_hidden)?;
            pos("moe.moe_layer_frequency", m.moe_layer_frequency as u64)?;
            if m.top_k > m.num_experts {
                return Err(SpecError::invalid(
                    source,
                    "moe.top_k",
                    m.top_k,
                    format!("exceeds moe.num_experts ({})", m.num_experts),
                    "top_k must be at most the number of routed experts",
                ));
            }
            if let Some(h) = m.shared_expert_ffn_hidden {
                pos("moe.shared_expert_ffn_hidden", h)?;
            }
            if let Some(cf) = m.capacity_factor
                && (!cf.is_finite() || cf <= 0.0)
            {
                return Err(SpecError::invalid(
                    source,
                    "moe.capacity_factor",
                    cf,
                    "must be a positive number",
                    "use e.g. 1.25, or null for dropless routing",
                ));
            }
            if let Some(g) = m.num_expert_groups
                && (g == 0 || m.num_experts % g != 0)
            {
                return Err(SpecError::invalid(
                    source,
                    "moe.num_expert_groups",
                    g,
                    format!("must be positive and divide moe.num_experts ({})", m.num_experts),
                    "use a divisor of num_experts, or omit it",
                ));
            }
            if m.first_k_dense_layers >= self.num_layers {
                return Err(SpecError::invalid(
                    source,
                    "moe.first_k_dense_layers",
                    m.first_k_dense_layers,
                    format!("leaves no MoE layer among num_layers ({})", self.num_layers),
                    "make it smaller than num_layers, or drop the moe block for a dense model",
                ));
            }
        }
        for (field, v) in [("seq_len", self.seq_len), ("global_batch", self.global_batch)] {
            if v > 1 << 24 {
                return Err(SpecError::invalid(
                    source,
                    field,
                    v,
                    "is larger than 16,777,216, beyond any real training run",
                    "check the value (global_batch counts sequences, seq_len tokens)",
                ));
            }
        }
        // Every later count is a product of sizes: bound the total in floating point, where nothing overflows.
        let total = self.approx_total_params();
        if !total.is_finite() || total > MAX_PARAMS {
            return Err(SpecError::invalid(
                source,
                "hidden_size",
                self.hidden_size,
                format!("the sizes give {total:.3e} parameters, more than any real model (limit {MAX_PARAMS:.0e})"),
                "check the units: sizes are element counts, not bytes",
            ));
        }
        Ok(())
    }
}
