//! Import of Hugging Face `config.json` files into a [`crate::ModelSpec`].
//!
//! The families below are recognised from `model_type` (or, when that is absent or unknown, from
//! `architectures`); each reads the keys its `transformers` configuration class defines, with the same meaning:
//!
//! | family | experts | expert FFN | which layers are MoE | shared experts |
//! |---|---|---|---|---|
//! | `mixtral` | `num_local_experts` | `intermediate_size` | all | none |
//! | `qwen2_moe`, `qwen3_moe` | `num_experts` | `moe_intermediate_size` | `(l + 1) % decoder_sparse_step == 0` and `l` not in `mlp_only_layers` | `shared_expert_intermediate_size` (Qwen2-MoE: one shared expert of that size) |
//! | `deepseek_v2`, `deepseek_v3` | `n_routed_experts` | `moe_intermediate_size` | `l >= first_k_dense_replace` and `l % moe_layer_freq == 0` | `n_shared_experts` of `moe_intermediate_size` each |
//! | `olmoe` | `num_experts` | `intermediate_size` | all | none |
//! | GPT-style (`gpt2`, `gpt_moe`, `megatron_gpt`) | `num_experts` | `moe_ffn_hidden_size`, else `n_inner`, else `4 * n_embd` | `moe_layer_frequency` (Megatron-LM: `l % f == 0`, or a 0/1 list per layer) or `expert_interval` (Megatron-DeepSpeed: `(l + 1) % f == 0`) | none |
//!
//! Every family takes top-k from `num_experts_per_tok` (GPT-style also `top_k`, `moe_top_k`, `moe_router_topk`).
//! The expert count is also accepted under the other families' names (`transformers` 5 renamed some of them). A
//! config of any other `model_type` imports when it has the standard keys (`num_hidden_layers`, `hidden_size`,
//! `num_attention_heads`, `vocab_size`, `intermediate_size` and, for an MoE model, an expert count and
//! `num_experts_per_tok`); a config with no expert count imports as a dense model. A multimodal config whose
//! language model sits under `text_config` is read from there.
//!
//! ModelSpec describes the MoE layers as "the first k layers are dense, then every f-th layer is MoE". A config
//! whose layer pattern does not have that shape (e.g. a Qwen `mlp_only_layers` with a hole in the middle) is
//! rejected with an error naming the key, rather than silently approximated.
//!
//! Other mappings: the LLaMA-like families (all but GPT-style) have gated (SwiGLU) experts and dense FFNs whatever
//! `hidden_act` says, as their `transformers` code always has `gate_proj`/`up_proj`/`down_proj`; GPT-style and
//! unknown families are gated only for a `silu`/`swiglu` activation or `"swiglu": true`. DeepSeek uses multi-head
//! latent attention; the others (grouped-query) multi-head attention with `head_dim` or `hidden_size /
//! num_attention_heads`. Routing is dropless unless a `capacity_factor` key says otherwise. DeepSeek's
//! multi-token-prediction module (`num_nextn_predict_layers`) is not part of the spec.

// `SpecError` (error.rs) is the crate's error type for every spec; its size is error.rs's decision, and every
// function of the spec layer returns it, so clippy's `result_large_err` is silenced here rather than boxed locally.
#![allow(clippy::result_large_err)]

use std::cell::RefCell;
use std::fmt::Display;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Source, SpecError, parse_json_str};
use crate::model::{AttentionSpec, Dtype, ModelSpec, MoeSpec, Optimizer};

/// The longest sequence an import picks on its own: `max_position_embeddings` is the longest context a model
/// supports, not the length it trains on, so it is capped here unless [`HfImportOptions::seq_len`] says otherwise.
pub const DEFAULT_SEQ_LEN_CAP: u64 = 4096;

/// Sequences per iteration when [`HfImportOptions`] does not say otherwise.
pub const DEFAULT_GLOBAL_BATCH: u64 = 1024;

/// More layers than this is not a real model (and would make the layer-pattern check slow).
const MAX_LAYERS: u64 = 1 << 16;

/// Largest size (hidden, FFN, head, rank, vocabulary) accepted: 16.7M elements, far above any real model's.
const MAX_SIZE: u64 = 1 << 24;

/// Largest count (heads, experts, top-k, shared experts, groups) accepted.
const MAX_COUNT: u64 = 1 << 16;

/// More parameters than this (about 10^15, a thousand times today's largest models) is not a real model; the
/// bound also keeps every count that [`ModelSpec::param_counts`] computes far inside 64 bits.
const MAX_TOTAL_PARAMS: u128 = 1 << 50;

/// What a `config.json` does not say: the training shape and the name. [`Default`] gives: the sequence length
/// from the config capped at [`DEFAULT_SEQ_LEN_CAP`], [`DEFAULT_GLOBAL_BATCH`] sequences, the dtype from
/// `torch_dtype` (else bf16), Adam, and a name from the config or the file.
#[derive(Debug, Clone, PartialEq)]
pub struct HfImportOptions {
    /// Tokens per sequence; `None`: `max_position_embeddings` (GPT-style: `n_positions`) capped at
    /// [`DEFAULT_SEQ_LEN_CAP`], or the cap itself when the config has no such key.
    pub seq_len: Option<u64>,
    /// Sequences per iteration, summed over data-parallel replicas.
    pub global_batch: u64,
    /// Training precision; `None`: from `torch_dtype` (or `dtype`), bf16 when the config has neither.
    pub dtype: Option<Dtype>,
    /// Optimizer.
    pub optimizer: Optimizer,
    /// Name of the model; `None`: the last part of `_name_or_path`, else the file's name (its folder's name for
    /// a file called `config.json`), else the architecture.
    pub name: Option<String>,
}

impl Default for HfImportOptions {
    fn default() -> Self {
        HfImportOptions {
            seq_len: None,
            global_batch: DEFAULT_GLOBAL_BATCH,
            dtype: None,
            optimizer: Optimizer::Adam,
            name: None,
        }
    }
}

/// The model families whose `config.json` keys the importer knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HfFamily {
    /// Mistral's Mixtral (`model_type` `mixtral`).
    Mixtral,
    /// Qwen1.5-MoE / Qwen2-MoE (`qwen2_moe`).
    Qwen2Moe,
    /// Qwen3-MoE (`qwen3_moe`).
    Qwen3Moe,
    /// DeepSeek-V2 (`deepseek_v2`).
    DeepseekV2,
    /// DeepSeek-V3 / R1 (`deepseek_v3`).
    DeepseekV3,
    /// AllenAI's OLMoE (`olmoe`).
    Olmoe,
    /// A GPT-2-style model (`gpt2`, `gpt_moe`, `megatron_gpt`) with optional Megatron/DeepSpeed MoE keys.
    Gpt,
    /// Anything else: read by the standard key names.
    Generic,
}

impl HfFamily {
    /// The family of a parsed `config.json`: from `model_type` when it is a known one, else from the first
    /// known entry of `architectures`, else [`HfFamily::Generic`].
    pub fn detect(config: &Value) -> HfFamily {
        let from_type = config.get("model_type").and_then(Value::as_str).and_then(Self::from_model_type);
        let from_arch = || {
            config
                .get("architectures")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().filter_map(Value::as_str).find_map(Self::from_architecture))
        };
        from_type.or_else(from_arch).unwrap_or(HfFamily::Generic)
    }

    fn from_model_type(t: &str) -> Option<HfFamily> {
        let t = t.trim().to_ascii_lowercase().replace('-', "_");
        Some(match t.as_str() {
            "mixtral" => HfFamily::Mixtral,
            "qwen2_moe" => HfFamily::Qwen2Moe,
            "qwen3_moe" => HfFamily::Qwen3Moe,
            "deepseek_v2" => HfFamily::DeepseekV2,
            "deepseek_v3" => HfFamily::DeepseekV3,
            "olmoe" => HfFamily::Olmoe,
            "gpt2" | "gpt_moe" | "gpt2_moe" | "megatron_gpt" | "megatron_gpt_moe" => HfFamily::Gpt,
            _ => return None,
        })
    }

    fn from_architecture(a: &str) -> Option<HfFamily> {
        const PREFIXES: [(&str, HfFamily); 8] = [
            ("Mixtral", HfFamily::Mixtral),
            ("Qwen2Moe", HfFamily::Qwen2Moe),
            ("Qwen3Moe", HfFamily::Qwen3Moe),
            ("DeepseekV2", HfFamily::DeepseekV2),
            ("DeepseekV3", HfFamily::DeepseekV3),
            ("Olmoe", HfFamily::Olmoe),
            ("GPT2", HfFamily::Gpt),
            ("GPTMoE", HfFamily::Gpt),
        ];
        PREFIXES.iter().find(|(p, _)| a.starts_with(p)).map(|&(_, f)| f)
    }

    /// The family's `model_type` as written in `config.json` (`"generic"` for [`HfFamily::Generic`]).
    pub fn model_type(self) -> &'static str {
        match self {
            HfFamily::Mixtral => "mixtral",
            HfFamily::Qwen2Moe => "qwen2_moe",
            HfFamily::Qwen3Moe => "qwen3_moe",
            HfFamily::DeepseekV2 => "deepseek_v2",
            HfFamily::DeepseekV3 => "deepseek_v3",
            HfFamily::Olmoe => "olmoe",
            HfFamily::Gpt => "gpt2",
            HfFamily::Generic => "generic",
        }
    }

    /// Families that are always MoE: a missing expert count is an error, not a dense model.
    fn always_moe(self) -> bool {
        !matches!(self, HfFamily::Gpt | HfFamily::Generic)
    }

    /// Families whose `transformers` MLPs are always gated (gate_proj, up_proj, down_proj).
    fn always_gated(self) -> bool {
        !matches!(self, HfFamily::Gpt | HfFamily::Generic)
    }

    fn is_deepseek(self) -> bool {
        matches!(self, HfFamily::DeepseekV2 | HfFamily::DeepseekV3)
    }

    fn is_qwen(self) -> bool {
        matches!(self, HfFamily::Qwen2Moe | HfFamily::Qwen3Moe)
    }

    /// The family's own name for the routed-expert count (named in errors).
    fn experts_key(self) -> &'static str {
        match self {
            HfFamily::Mixtral => "num_local_experts",
            HfFamily::DeepseekV2 | HfFamily::DeepseekV3 => "n_routed_experts",
            _ => "num_experts",
        }
    }
}

/// Reads a Hugging Face `config.json` file into a [`ModelSpec`]; see [`import_hf_config`].
pub fn import_hf_file(path: &Path, opts: &HfImportOptions) -> Result<ModelSpec, SpecError> {
    let source = Source::File(path.display().to_string());
    let text =
        std::fs::read_to_string(path).map_err(|e| SpecError::Io { origin: source.clone(), reason: e.to_string() })?;
    import_hf_config(&text, &source, opts)
}

/// Converts the text of a Hugging Face `config.json` into a validated [`ModelSpec`].
///
/// `source` names the file in errors (and, for [`Source::File`], gives the default name). Errors name the key as
/// written in the config, its value, why it is wrong and how to fix it; no input makes this function panic.
pub fn import_hf_config(text: &str, source: &Source, opts: &HfImportOptions) -> Result<ModelSpec, SpecError> {
    let root: Value = parse_json_str(text, source, "Hugging Face config.json")?;
    let Value::Object(top) = &root else {
        return Err(SpecError::invalid(
            source,
            "(top level)",
            show(&root),
            format!("a config.json must be a JSON object, not {}", kind(&root)),
            "pass the model's config.json from the Hugging Face Hub, an object like {\"model_type\": \"mixtral\", ...}",
        ));
    };
    // A multimodal config keeps its language model under `text_config`.
    let nested = match top.get("text_config") {
        Some(Value::Object(inner)) if !LAYER_KEYS.iter().any(|k| top.get(*k).is_some_and(|v| !v.is_null())) => {
            Some(inner)
        }
        _ => None,
    };
    let reader = match nested {
        Some(inner) => Reader { map: inner, prefix: "text_config.", source },
        None => Reader { map: top, prefix: "", source },
    };
    let mut family = HfFamily::detect(&root);
    if family == HfFamily::Generic
        && let Some(inner) = nested
    {
        family = HfFamily::detect(&Value::Object(inner.clone()));
    }
    let fallback_name = default_name(top, source);
    Importer { r: reader, family, opts, provenance: RefCell::new(Vec::new()) }.run(fallback_name)
}

const LAYER_KEYS: [&str; 3] = ["num_hidden_layers", "n_layer", "num_layers"];
const HIDDEN_KEYS: [&str; 3] = ["hidden_size", "n_embd", "d_model"];
const HEAD_KEYS: [&str; 3] = ["num_attention_heads", "n_head", "num_heads"];
const KV_HEAD_KEYS: [&str; 3] = ["num_key_value_heads", "num_kv_heads", "num_query_groups"];
const HEAD_DIM_KEYS: [&str; 2] = ["head_dim", "kv_channels"];
const VOCAB_KEYS: [&str; 2] = ["vocab_size", "padded_vocab_size"];
const FFN_KEYS: [&str; 3] = ["intermediate_size", "n_inner", "ffn_hidden_size"];
const EXPERT_KEYS: [&str; 5] =
    ["num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts"];
const TOP_K_KEYS: [&str; 5] = ["num_experts_per_tok", "top_k", "moe_top_k", "moe_router_topk", "num_selected_experts"];
const MOE_FFN_KEYS: [&str; 3] = ["moe_intermediate_size", "moe_ffn_hidden_size", "expert_intermediate_size"];
const SEQ_KEYS: [&str; 5] = ["max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"];
const ACT_KEYS: [&str; 2] = ["hidden_act", "activation_function"];
const CAPACITY_KEYS: [&str; 3] = ["capacity_factor", "moe_capacity_factor", "moe_train_capacity_factor"];
const DTYPE_KEYS: [&str; 2] = ["torch_dtype", "dtype"];

/// The default name: `_name_or_path`'s last part, else the file (its folder for `config.json`), else the
/// architecture or model type.
fn default_name(top: &Map<String, Value>, source: &Source) -> String {
    let clean = |s: &str| -> Option<String> {
        let last = s.trim().trim_end_matches(['/', '\\']).rsplit(['/', '\\']).next().unwrap_or("").trim();
        (!last.is_empty()).then(|| last.to_string())
    };
    if let Some(n) = top.get("_name_or_path").and_then(Value::as_str).and_then(clean) {
        return n;
    }
    if let Source::File(p) = source {
        let path = Path::new(p);
        let stem = if path.file_name().and_then(|f| f.to_str()) == Some("config.json") {
            path.parent().and_then(Path::file_name).and_then(|f| f.to_str())
        } else {
            path.file_stem().and_then(|f| f.to_str())
        };
        if let Some(n) = stem.and_then(clean) {
            return n;
        }
    }
    let arch = top.get("architectures").and_then(Value::as_array).and_then(|a| a.first()).and_then(Value::as_str);
    let ty = top.get("model_type").and_then(Value::as_str);
    arch.or(ty).and_then(clean).unwrap_or_else(|| "hf-model".to_string())
}

/// A JSON value as written, shortened for an error message.
fn show(v: &Value) -> String {
    let s = serde_json::to_string(v).unwrap_or_else(|_| "?".to_string());
    if s.chars().count() > 80 { format!("{}...", s.chars().take(77).collect::<String>()) } else { s }
}

/// "a string", "an array", ... for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// "`a` (also accepted: `b`, `c`)".
fn aliases(keys: &[&str]) -> String {
    match keys {
        [] => String::new(),
        [one] => format!("`{one}`"),
        [first, rest @ ..] => {
            format!(
                "`{first}` (also accepted: {})",
                rest.iter().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", ")
            )
        }
    }
}

/// Typed access to the keys of one JSON object, with errors that name the key (prefixed by where the object
/// sits, e.g. `text_config.`).
struct Reader<'a> {
    map: &'a Map<String, Value>,
    prefix: &'static str,
    source: &'a Source,
}

impl<'a> Reader<'a> {
    fn err(&self, key: &str, value: impl Display, reason: impl Into<String>, fix: impl Into<String>) -> SpecError {
        SpecError::invalid(self.source, format!("{}{key}", self.prefix), value, reason, fix)
    }

    /// The value of `key` unless absent or null.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// The first of `keys` that is present and not null.
    fn find(&self, keys: &[&'static str]) -> Option<(&'static str, &'a Value)> {
        keys.iter().find_map(|&k| self.get(k).map(|v| (k, v)))
    }

    fn has_any(&self, keys: &[&'static str]) -> bool {
        self.find(keys).is_some()
    }

    fn missing(&self, keys: &[&'static str], what: &str) -> SpecError {
        let key = keys.first().copied().unwrap_or("?");
        self.err(
            key,
            "(missing)",
            format!("{what} is required but the key is absent or null"),
            format!(
                "add {} with the model's value, as in the model's config.json on the Hugging Face Hub",
                aliases(keys)
            ),
        )
    }

    /// A whole, non-negative number (4096 and 4096.0 both read as 4096).
    fn uint(&self, key: &str, v: &Value) -> Result<u64, SpecError> {
        let bad = |reason: &str| self.err(key, show(v), reason, format!("write a whole number, e.g. \"{key}\": 8"));
        match v {
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    return Ok(u);
                }
                match n.as_f64() {
                    Some(f) if f < 0.0 => Err(bad("must not be negative")),
                    Some(f) if f.is_finite() && f.fract() == 0.0 && f <= 9.0e15 => Ok(f as u64),
                    Some(f) if f.is_finite() && f.fract() == 0.0 => Err(bad("is too large to be a real model's size")),
                    _ => Err(bad("must be a whole number")),
                }
            }
            other => Err(bad(&format!("must be a whole number, not {}", kind(other)))),
        }
    }

    fn opt_uint(&self, keys: &[&'static str]) -> Result<Option<(&'static str, u64)>, SpecError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, v)) => Ok(Some((k, self.uint(k, v)?))),
        }
    }

    /// A whole number of at most `max` (larger is an error naming the key: no real model has it).
    fn opt_max(&self, keys: &[&'static str], what: &str, max: u64) -> Result<Option<(&'static str, u64)>, SpecError> {
        match self.opt_uint(keys)? {
            Some((k, v)) if v > max => Err(self.err(
                k,
                v,
                format!("is larger than any real model's {what} (at most {max} is accepted)"),
                "check the value: sizes are element counts, not bytes",
            )),
            other => Ok(other),
        }
    }

    /// A positive whole number of at most `max` (zero is an error naming the key).
    fn opt_pos(&self, keys: &[&'static str], what: &str, max: u64) -> Result<Option<(&'static str, u64)>, SpecError> {
        match self.opt_max(keys, what, max)? {
            Some((k, 0)) => Err(self.err(
                k,
                0,
                format!("{what} must be positive"),
                format!("set it to the model's real {what} (> 0)"),
            )),
            other => Ok(other),
        }
    }

    fn req_pos(&self, keys: &[&'static str], what: &str, max: u64) -> Result<(&'static str, u64), SpecError> {
        self.opt_pos(keys, what, max)?.ok_or_else(|| self.missing(keys, what))
    }

    /// Narrows to `u32`, naming the key when it does not fit.
    fn to_u32(&self, key: &str, v: u64) -> Result<u32, SpecError> {
        u32::try_from(v).map_err(|_| {
            self.err(key, v, "is too large to be a real model's count", "check the value: it is a count, not a size")
        })
    }

    fn opt_bool(&self, keys: &[&'static str]) -> Result<Option<(&'static str, bool)>, SpecError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, Value::Bool(b))) => Ok(Some((k, *b))),
            Some((k, v)) => Err(self.err(
                k,
                show(v),
                format!("must be true or false, not {}", kind(v)),
                format!("write \"{k}\": true or \"{k}\": false"),
            )),
        }
    }

    fn opt_str(&self, keys: &[&'static str]) -> Result<Option<(&'static str, &'a str)>, SpecError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, Value::String(s))) => Ok(Some((k, s.as_str()))),
            Some((k, v)) => Err(self.err(
                k,
                show(v),
                format!("must be a string, not {}", kind(v)),
                format!("write it in quotes, as in the model's config.json (e.g. \"{k}\": \"...\")"),
            )),
        }
    }

    fn opt_f64(&self, keys: &[&'static str]) -> Result<Option<(&'static str, f64)>, SpecError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, Value::Number(n))) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(Some((k, f))),
                _ => Err(self.err(k, show(&Value::Number(n.clone())), "must be a finite number", "write e.g. 1.25")),
            },
            Some((k, v)) => Err(self.err(k, show(v), format!("must be a number, not {}", kind(v)), "write e.g. 1.25")),
        }
    }
}

/// Which layers are MoE, as one condition per config key; a layer is MoE when all hold.
enum LayerRule {
    /// `l >= k` (DeepSeek `first_k_dense_replace`).
    AtLeast(&'static str, u64),
    /// `l % f == 0` (DeepSeek `moe_layer_freq`, Megatron-LM `moe_layer_frequency`).
    MultipleOf(&'static str, u64),
    /// `f > 0 && (l + 1) % f == 0` (Qwen `decoder_sparse_step`, Megatron-DeepSpeed `expert_interval`).
    EndsEvery(&'static str, u64),
    /// `l` not listed (Qwen `mlp_only_layers`; sorted).
    Except(&'static str, Vec<u64>),
    /// An explicit 0/1 flag per layer (Megatron-LM `--moe-layer-freq "[0,1,1,...]"`).
    Pattern(&'static str, Vec<bool>),
}

impl LayerRule {
    fn key(&self) -> &'static str {
        match self {
            LayerRule::AtLeast(k, _)
            | LayerRule::MultipleOf(k, _)
            | LayerRule::EndsEvery(k, _)
            | LayerRule::Except(k, _)
            | LayerRule::Pattern(k, _) => k,
        }
    }

    fn holds(&self, l: u64) -> bool {
        match self {
            LayerRule::AtLeast(_, k) => l >= *k,
            LayerRule::MultipleOf(_, f) => *f > 0 && l.is_multiple_of(*f),
            LayerRule::EndsEvery(_, f) => *f > 0 && (l + 1).is_multiple_of(*f),
            LayerRule::Except(_, sorted) => sorted.binary_search(&l).is_err(),
            LayerRule::Pattern(_, flags) => {
                usize::try_from(l).ok().and_then(|i| flags.get(i)).copied().unwrap_or(false)
            }
        }
    }
}

/// The MoE fields that depend on which layers are MoE.
struct LayerLayout {
    first_k_dense: u64,
    frequency: u64,
    any_dense: bool,
}

/// One import: the reader, the family, the options, and which config key each spec field came from (to name
/// the key when [`ModelSpec::validate`] rejects a field).
struct Importer<'a> {
    r: Reader<'a>,
    family: HfFamily,
    opts: &'a HfImportOptions,
    provenance: RefCell<Vec<(&'static str, &'static str)>>,
}

impl Importer<'_> {
    fn note(&self, spec_field: &'static str, key: &'static str) {
        self.provenance.borrow_mut().push((spec_field, key));
    }

    fn run(self, fallback_name: String) -> Result<ModelSpec, SpecError> {
        let r = &self.r;
        let (layers_key, num_layers) = r.req_pos(&LAYER_KEYS, "number of layers", MAX_LAYERS)?;
        let (hidden_key, hidden) = r.req_pos(&HIDDEN_KEYS, "hidden size", MAX_SIZE)?;
        let (heads_key, heads) = r.req_pos(&HEAD_KEYS, "number of attention heads", MAX_COUNT)?;
        let num_heads = r.to_u32(heads_key, heads)?;
        let (vocab_key, vocab) = r.req_pos(&VOCAB_KEYS, "vocabulary size", MAX_SIZE)?;
        self.note("num_layers", layers_key);
        self.note("hidden_size", hidden_key);
        self.note("attention.num_heads", heads_key);
        self.note("vocab_size", vocab_key);

        let attention = self.attention(hidden, num_heads, heads_key)?;
        let gated = self.gated()?;
        let (moe, any_dense) = match self.moe(num_layers, hidden, gated)? {
            Some((m, layout)) => (Some(m), layout.any_dense),
            None => (None, true),
        };
        let ffn_hidden = self.dense_ffn(hidden, hidden_key, moe.as_ref(), any_dense)?;
        let r = &self.r;
        let tied_default = self.family == HfFamily::Gpt;
        let tied_embeddings = r.opt_bool(&["tie_word_embeddings"])?.map_or(tied_default, |(_, b)| b);
        let seq_len = self.seq_len()?;
        let dtype = self.dtype()?;
        let name = self.opts.name.clone().unwrap_or(fallback_name);

        let spec = ModelSpec {
            name,
            num_layers: self.r.to_u32(layers_key, num_layers)?,
            hidden_size: hidden,
            attention,
            ffn_hidden,
            gated_ffn: gated,
            vocab_size: vocab,
            tied_embeddings,
            seq_len,
            global_batch: self.opts.global_batch,
            dtype,
            optimizer: self.opts.optimizer,
            moe,
        };
        self.check_magnitude(&spec, hidden_key)?;
        spec.validate(self.r.source).map_err(|e| self.rename(e))?;
        Ok(spec)
    }

    /// Rewrites a [`ModelSpec::validate`] error to name the config key the field came from.
    fn rename(&self, e: SpecError) -> SpecError {
        match e {
            SpecError::Invalid { origin, field, value, reason, fix } => {
                match self.provenance.borrow().iter().find(|(f, _)| *f == field) {
                    Some((spec_field, key)) => SpecError::Invalid {
                        origin,
                        field: format!("{}{key}", self.r.prefix),
                        value,
                        reason: format!("{reason} (as ModelSpec `{spec_field}`)"),
                        fix,
                    },
                    None => SpecError::Invalid { origin, field, value, reason, fix },
                }
            }
            other => other,
        }
    }

    fn attention(&self, hidden: u64, num_heads: u32, heads_key: &'static str) -> Result<AttentionSpec, SpecError> {
        let r = &self.r;
        let mla = self.family.is_deepseek() || r.has_any(&["kv_lora_rank"]);
        if mla {
            let (kv_key, kv_lora_rank) = r.req_pos(&["kv_lora_rank"], "key/value compression rank", MAX_SIZE)?;
            // DeepSeek-V2-Lite writes `"q_lora_rank": null`: no query compression.
            let q_lora_rank = r.opt_max(&["q_lora_rank"], "query compression rank", MAX_SIZE)?.map_or(0, |(_, v)| v);
            let (nope_key, qk_nope_head_dim) =
                r.req_pos(&["qk_nope_head_dim"], "non-rotary query/key head size", MAX_SIZE)?;
            let (rope_key, qk_rope_head_dim) =
                r.req_pos(&["qk_rope_head_dim"], "rotary query/key head size", MAX_SIZE)?;
            let (v_key, v_head_dim) = r.req_pos(&["v_head_dim"], "value head size", MAX_SIZE)?;
            self.note("attention.kv_lora_rank", kv_key);
            self.note("attention.qk_nope_head_dim", nope_key);
            self.note("attention.qk_rope_head_dim", rope_key);
            self.note("attention.v_head_dim", v_key);
            return Ok(AttentionSpec::Mla {
                num_heads,
                q_lora_rank,
                kv_lora_rank,
                qk_nope_head_dim,
                qk_rope_head_dim,
                v_head_dim,
            });
        }
        let num_kv_heads = match r.opt_pos(&KV_HEAD_KEYS, "number of key/value heads", MAX_COUNT)? {
            None => num_heads,
            Some((k, v)) => {
                let kv = r.to_u32(k, v)?;
                if !num_heads.is_multiple_of(kv) {
                    return Err(r.err(
                        k,
                        kv,
                        format!("must divide {heads_key} ({num_heads})"),
                        "use the model's real value: grouped-query attention shares each key/value head among an \
                         equal group of query heads",
                    ));
                }
                self.note("attention.num_kv_heads", k);
                kv
            }
        };
        let head_dim = match r.opt_pos(&HEAD_DIM_KEYS, "head size", MAX_SIZE)? {
            Some((k, d)) => {
                self.note("attention.head_dim", k);
                d
            }
            None if hidden.is_multiple_of(num_heads as u64) => hidden / num_heads as u64,
            None => {
                return Err(r.err(
                    heads_key,
                    num_heads,
                    format!("does not divide the hidden size ({hidden}) and the config has no `head_dim`"),
                    "add \"head_dim\" with the model's head size, or correct the head count",
                ));
            }
        };
        Ok(AttentionSpec::Mha { num_heads, num_kv_heads, head_dim })
    }

    /// Gated (SwiGLU) FFNs: always for the LLaMA-like families, else from the activation.
    fn gated(&self) -> Result<bool, SpecError> {
        if self.family.always_gated() {
            return Ok(true);
        }
        if let Some((_, b)) = self.r.opt_bool(&["swiglu", "gated_linear_unit"])? {
            return Ok(b);
        }
        let act = self.r.opt_str(&ACT_KEYS)?.map(|(_, a)| a.to_ascii_lowercase());
        Ok(matches!(act.as_deref(), Some("silu" | "swish" | "swiglu" | "geglu" | "reglu")))
    }

    /// The dense FFN size: `intermediate_size` (GPT-style `n_inner`, default 4 x hidden). A model whose layers are
    /// all MoE and that has no such key gets the expert size (it is then never used).
    fn dense_ffn(
        &self,
        hidden: u64,
        hidden_key: &'static str,
        moe: Option<&MoeSpec>,
        any_dense: bool,
    ) -> Result<u64, SpecError> {
        let r = &self.r;
        if let Some((k, v)) = r.opt_pos(&FFN_KEYS, "dense FFN size", MAX_SIZE)? {
            self.note("ffn_hidden", k);
            return Ok(v);
        }
        if self.family == HfFamily::Gpt {
            // GPT-2: `n_inner: null` means 4 x n_embd.
            self.note("ffn_hidden", hidden_key);
            return hidden
                .checked_mul(4)
                .ok_or_else(|| r.err(hidden_key, hidden, "is too large to be a real model's size", "check the value"));
        }
        match moe {
            Some(m) if !any_dense => Ok(m.expert_ffn_hidden),
            _ => Err(r.missing(&FFN_KEYS, "dense FFN size")),
        }
    }

    /// The MoE block, or `None` for a dense model.
    fn moe(&self, num_layers: u64, hidden: u64, gated: bool) -> Result<Option<(MoeSpec, LayerLayout)>, SpecError> {
        let r = &self.r;
        let family = self.family;
        // The family's own key first, so that a missing count is reported under its name.
        let mut expert_keys: Vec<&'static str> = vec![family.experts_key()];
        expert_keys.extend(EXPERT_KEYS.iter().copied().filter(|k| *k != family.experts_key()));
        let Some((experts_key, experts)) = r.opt_pos(&expert_keys, "number of routed experts", MAX_COUNT)? else {
            if family.always_moe() {
                return Err(
                    r.missing(&expert_keys, &format!("number of routed experts of a {} model", family.model_type()))
                );
            }
            return Ok(None);
        };
        let num_experts = r.to_u32(experts_key, experts)?;
        let (topk_key, top_k) = r.req_pos(&TOP_K_KEYS, "number of experts per token", MAX_COUNT)?;
        if top_k > experts {
            return Err(r.err(
                topk_key,
                top_k,
                format!("exceeds the number of routed experts ({experts_key} = {experts})"),
                format!("{topk_key} must be at most {experts_key}"),
            ));
        }
        let top_k = r.to_u32(topk_key, top_k)?;
        self.note("moe.num_experts", experts_key);
        self.note("moe.top_k", topk_key);

        let expert_ffn_hidden = self.expert_ffn(hidden)?;
        let r = &self.r;

        // Shared experts: DeepSeek `n_shared_experts` (each of the routed size), Qwen2-MoE
        // `shared_expert_intermediate_size` (one expert of that size).
        let n_shared = r.opt_max(&["n_shared_experts", "num_shared_experts"], "number of shared experts", MAX_COUNT)?;
        let shared_size = r.opt_max(
            &["shared_expert_intermediate_size", "shared_expert_ffn_hidden_size"],
            "shared expert FFN size",
            MAX_SIZE,
        )?;
        let shared_expert_ffn_hidden = match shared_size {
            Some((_, 0)) | None => None,
            Some((k, v)) => {
                self.note("moe.shared_expert_ffn_hidden", k);
                Some(v)
            }
        };
        let num_shared_experts = match (n_shared, shared_expert_ffn_hidden) {
            (Some((k, n)), _) => self.r.to_u32(k, n)?,
            (None, Some(_)) => 1,
            (None, None) => 0,
        };
        let r = &self.r;

        let capacity_factor = match r.opt_f64(&CAPACITY_KEYS)? {
            None => None,
            Some((k, cf)) if cf <= 0.0 => {
                return Err(r.err(k, cf, "must be a positive number", "use e.g. 1.25, or null for dropless routing"));
            }
            Some((k, cf)) => {
                self.note("moe.capacity_factor", k);
                Some(cf)
            }
        };
        let r = &self.r;

        let num_expert_groups =
            match r.opt_max(&["n_group", "num_expert_groups"], "number of expert groups", MAX_COUNT)? {
                None | Some((_, 1)) => None,
                Some((k, g)) if g == 0 || !experts.is_multiple_of(g) => {
                    return Err(r.err(
                        k,
                        g,
                        format!("must be positive and divide the number of routed experts ({experts_key} = {experts})"),
                        "use the model's real group count (DeepSeek-V3: 8), or 1 for no grouping",
                    ));
                }
                Some((k, g)) => {
                    self.note("moe.num_expert_groups", k);
                    Some(self.r.to_u32(k, g)?)
                }
            };

        let layout = self.layer_layout(num_layers)?;
        let moe = MoeSpec {
            num_experts,
            top_k,
            expert_ffn_hidden,
            gated,
            num_shared_experts,
            shared_expert_ffn_hidden,
            moe_layer_frequency: self.r.to_u32("moe_layer_freq", layout.frequency)?,
            first_k_dense_layers: self.r.to_u32("first_k_dense_replace", layout.first_k_dense)?,
            capacity_factor,
            num_expert_groups,
        };
        Ok(Some((moe, layout)))
    }

    /// The routed expert's FFN size: `moe_intermediate_size` for Qwen-MoE and DeepSeek (required), the FFN size
    /// for Mixtral and OLMoE, either for GPT-style and unknown families.
    fn expert_ffn(&self, hidden: u64) -> Result<u64, SpecError> {
        let r = &self.r;
        let family = self.family;
        let found = if family.is_qwen() || family.is_deepseek() {
            Some(r.req_pos(&["moe_intermediate_size"], "routed expert FFN size", MAX_SIZE)?)
        } else if matches!(family, HfFamily::Mixtral | HfFamily::Olmoe) {
            Some(r.req_pos(&["intermediate_size"], "expert FFN size", MAX_SIZE)?)
        } else {
            match r.opt_pos(&MOE_FFN_KEYS, "routed expert FFN size", MAX_SIZE)? {
                Some(found) => Some(found),
                None => r.opt_pos(&FFN_KEYS, "FFN size", MAX_SIZE)?,
            }
        };
        match found {
            Some((k, v)) => {
                self.note("moe.expert_ffn_hidden", k);
                Ok(v)
            }
            None if family == HfFamily::Gpt => hidden.checked_mul(4).ok_or_else(|| {
                r.err(HIDDEN_KEYS[0], hidden, "is too large to be a real model's size", "check the value")
            }),
            None => Err(r.missing(&["moe_intermediate_size", "intermediate_size"], "expert FFN size")),
        }
    }

    /// Reads the keys that say which layers are MoE and fits them to "first k dense, then every f-th".
    fn layer_layout(&self, num_layers: u64) -> Result<LayerLayout, SpecError> {
        let r = &self.r;
        let family = self.family;
        let generic = family == HfFamily::Generic;
        let mut rules: Vec<LayerRule> = Vec::new();

        if family.is_deepseek() || generic {
            if let Some((k, v)) = r.opt_uint(&["first_k_dense_replace"])?
                && v > 0
            {
                rules.push(LayerRule::AtLeast(k, v));
            }
            if let Some(rule) = self.frequency_rule("moe_layer_freq", num_layers)? {
                rules.push(rule);
            }
        }
        if family == HfFamily::Gpt || generic {
            // Generic configs read `moe_layer_freq` above already.
            let keys: &[&'static str] =
                if generic { &["moe_layer_frequency"] } else { &["moe_layer_frequency", "moe_layer_freq"] };
            for &key in keys {
                if let Some(rule) = self.frequency_rule(key, num_layers)? {
                    rules.push(rule);
                }
            }
            if let Some((k, v)) = self.r.opt_pos(&["expert_interval"], "MoE layer interval", MAX_LAYERS)? {
                rules.push(LayerRule::EndsEvery(k, v));
            }
        }
        let r = &self.r;
        if family.is_qwen() || generic {
            // Qwen: a step of 0 means no MoE layer at all (reported below).
            if let Some((k, v)) = r.opt_uint(&["decoder_sparse_step"])? {
                rules.push(LayerRule::EndsEvery(k, v));
            }
            if let Some((k, v)) = r.find(&["mlp_only_layers"]) {
                let Value::Array(items) = v else {
                    return Err(r.err(
                        k,
                        show(v),
                        format!("must be a list of layer indices, not {}", kind(v)),
                        "write e.g. \"mlp_only_layers\": [] (no dense layers) or [0, 1]",
                    ));
                };
                let mut list = Vec::with_capacity(items.len());
                for item in items {
                    list.push(r.uint(k, item)?);
                }
                list.sort_unstable();
                list.dedup();
                if !list.is_empty() {
                    rules.push(LayerRule::Except(k, list));
                }
            }
        }

        let moe_layers: Vec<u64> = (0..num_layers).filter(|&l| rules.iter().all(|rule| rule.holds(l))).collect();
        let Some(&first) = moe_layers.first() else {
            let key = rules.first().map_or("num_hidden_layers", LayerRule::key);
            return Err(r.err(
                key,
                show(r.get(key).unwrap_or(&Value::Null)),
                format!("leaves no MoE layer among the {num_layers} layers"),
                "check the value against the model's config.json; a dense model has no expert keys",
            ));
        };
        let frequency = match moe_layers.get(1) {
            Some(&second) => second - first,
            None => num_layers - first,
        };
        let fits = (0..num_layers).all(|l| {
            let theirs = rules.iter().all(|rule| rule.holds(l));
            let ours = l >= first && (l - first).is_multiple_of(frequency);
            theirs == ours
        });
        if !fits {
            // Name the key that breaks the pattern: an explicit list if there is one.
            let key = rules
                .iter()
                .find(|rule| matches!(rule, LayerRule::Except(..) | LayerRule::Pattern(..)))
                .or(rules.last())
                .map_or("num_hidden_layers", LayerRule::key);
            let shown: Vec<String> = moe_layers.iter().take(12).map(u64::to_string).collect();
            let more = if moe_layers.len() > 12 { ", ..." } else { "" };
            return Err(r.err(
                key,
                show(r.get(key).unwrap_or(&Value::Null)),
                format!(
                    "gives MoE layers [{}{more}], a pattern Switchyard does not support: a ModelSpec has the first k \
                     layers dense and then every f-th layer MoE",
                    shown.join(", ")
                ),
                "write a ModelSpec JSON by hand with the closest first_k_dense_layers / moe_layer_frequency, or \
                 ask for per-layer MoE patterns in ModelSpec",
            ));
        }
        if first > 0
            && let Some(rule) = rules.first()
        {
            self.note("moe.first_k_dense_layers", rule.key());
        }
        Ok(LayerLayout { first_k_dense: first, frequency, any_dense: moe_layers.len() as u64 != num_layers })
    }

    /// `key` as "every f-th layer from layer 0" (a number) or as one 0/1 flag per layer (a list).
    fn frequency_rule(&self, key: &'static str, num_layers: u64) -> Result<Option<LayerRule>, SpecError> {
        let r = &self.r;
        let Some(v) = r.get(key) else { return Ok(None) };
        if let Value::Array(items) = v {
            if items.len() as u64 != num_layers {
                return Err(r.err(
                    key,
                    show(v),
                    format!("lists {} layers but the model has {num_layers}", items.len()),
                    "give one 0/1 flag per layer, or a single number f for every f-th layer",
                ));
            }
            let mut flags = Vec::with_capacity(items.len());
            for item in items {
                flags.push(match item {
                    Value::Bool(b) => *b,
                    other => r.uint(key, other)? != 0,
                });
            }
            return Ok(Some(LayerRule::Pattern(key, flags)));
        }
        let f = r.uint(key, v)?;
        if f == 0 {
            return Err(r.err(key, 0, "must be positive", "use 1 for every layer, 2 for every other layer"));
        }
        self.note("moe.moe_layer_frequency", key);
        Ok((f > 1).then_some(LayerRule::MultipleOf(key, f)))
    }

    /// Tokens per sequence: the option, else the config's context length capped at [`DEFAULT_SEQ_LEN_CAP`].
    fn seq_len(&self) -> Result<u64, SpecError> {
        if let Some(s) = self.opts.seq_len {
            return Ok(s);
        }
        match self.r.opt_pos(&SEQ_KEYS, "context length", u64::MAX)? {
            Some((k, v)) => {
                self.note("seq_len", k);
                Ok(v.min(DEFAULT_SEQ_LEN_CAP))
            }
            None => Ok(DEFAULT_SEQ_LEN_CAP),
        }
    }

    /// Training precision: the option, else `torch_dtype`, else bf16.
    fn dtype(&self) -> Result<Dtype, SpecError> {
        if let Some(d) = self.opts.dtype {
            return Ok(d);
        }
        let Some((k, s)) = self.r.opt_str(&DTYPE_KEYS)? else { return Ok(Dtype::Bf16) };
        let name = s.trim().trim_start_matches("torch.").to_ascii_lowercase();
        Ok(match name.as_str() {
            "bfloat16" | "bf16" => Dtype::Bf16,
            "float16" | "fp16" | "half" => Dtype::Fp16,
            "float32" | "fp32" | "float" => Dtype::Fp32,
            n if n.starts_with("float8") || n == "fp8" => Dtype::Fp8,
            _ => {
                return Err(self.r.err(
                    k,
                    format!("\"{s}\""),
                    "is not a training precision Switchyard knows",
                    "use \"bfloat16\", \"float16\", \"float32\" or \"float8_e4m3fn\", or give the dtype in the import \
                     options",
                ));
            }
        })
    }

    /// Rejects sizes whose parameter count would be absurd, before anything multiplies them in 64 bits.
    fn check_magnitude(&self, spec: &ModelSpec, hidden_key: &'static str) -> Result<(), SpecError> {
        let total = param_bound(spec);
        if total > MAX_TOTAL_PARAMS {
            return Err(self.r.err(
                hidden_key,
                spec.hidden_size,
                format!(
                    "with the other sizes in the config this gives about {:.2e} parameters, far more than any real \
                     model",
                    total as f64
                ),
                "check the sizes: they are element counts, not bytes",
            ));
        }
        Ok(())
    }
}

/// An upper bound of [`ModelSpec::param_counts`]' total, computed without overflow.
fn param_bound(spec: &ModelSpec) -> u128 {
    let w = |x: u64| x as u128;
    let mul = |xs: &[u128]| xs.iter().fold(1u128, |acc, &x| acc.saturating_mul(x));
    let h = w(spec.hidden_size);
    let attn = match spec.attention {
        AttentionSpec::Mha { num_heads, num_kv_heads, head_dim } => {
            let n = num_heads as u128;
            let kv = num_kv_heads as u128;
            mul(&[h, n.saturating_add(kv.saturating_mul(2)).saturating_add(n), w(head_dim)])
        }
        AttentionSpec::Mla { num_heads, q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim } => {
            let n = num_heads as u128;
            let qk = w(qk_nope_head_dim).saturating_add(w(qk_rope_head_dim));
            [
                mul(&[h, w(q_lora_rank)]),
                mul(&[w(q_lora_rank), n, qk]),
                mul(&[h, n, qk]),
                mul(&[h, w(kv_lora_rank).saturating_add(w(qk_rope_head_dim))]),
                mul(&[w(kv_lora_rank), n, w(qk_nope_head_dim).saturating_add(w(v_head_dim))]),
                mul(&[n, w(v_head_dim), h]),
            ]
            .iter()
            .fold(0u128, |a, &b| a.saturating_add(b))
        }
    };
    let dense = mul(&[3, h, w(spec.ffn_hidden)]);
    let moe = spec.moe.as_ref().map_or(0u128, |m| {
        let e = w(m.expert_ffn_hidden);
        let per_expert = mul(&[3, h, e]).saturating_add(e).saturating_add(h);
        let shared =
            mul(&[m.num_shared_experts as u128, 3, h, w(m.shared_expert_ffn_hidden.unwrap_or(m.expert_ffn_hidden))]);
        mul(&[m.num_experts as u128, per_expert])
            .saturating_add(shared)
            .saturating_add(mul(&[h, m.num_experts as u128]))
    });
    let per_layer = attn.saturating_add(mul(&[4, h])).saturating_add(dense).saturating_add(moe);
    mul(&[spec.num_layers as u128, per_layer]).saturating_add(mul(&[2, w(spec.vocab_size), h]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIXTRAL: &str = include_str!("../../examples/hf/mixtral-8x7b.json");
    const QWEN3: &str = include_str!("../../examples/hf/qwen3-30b-a3b.json");
    const QWEN2: &str = include_str!("../../examples/hf/qwen2-57b-a14b.json");
    const DEEPSEEK_V3: &str = include_str!("../../examples/hf/deepseek-v3.json");
    const OLMOE: &str = include_str!("../../examples/hf/olmoe-1b-7b.json");
    const GPT_MOE: &str = include_str!("../../examples/hf/gpt-moe.json");

    fn src(file: &str) -> Source {
        Source::File(format!("examples/hf/{file}"))
    }

    fn import(text: &str, file: &str) -> ModelSpec {
        import_hf_config(text, &src(file), &HfImportOptions::default())
            .unwrap_or_else(|e| panic!("{file} should import: {e}"))
    }

    /// The config as a JSON object, `edit`ed, then imported.
    fn import_edited(text: &str, edit: impl FnOnce(&mut Map<String, Value>)) -> Result<ModelSpec, SpecError> {
        let mut v: Value = serde_json::from_str(text).unwrap();
        edit(v.as_object_mut().unwrap());
        import_hf_config(&v.to_string(), &src("edited.json"), &HfImportOptions::default())
    }

    fn moe_layers(spec: &ModelSpec) -> Vec<u32> {
        (0..spec.num_layers).filter(|&l| spec.is_moe_layer(l)).collect()
    }

    /// Asserts `got` is within `tol` (relative) of `want`.
    fn near(what: &str, got: u64, want: f64, tol: f64) {
        let err = (got as f64 - want).abs() / want;
        eprintln!(
            "{what}: {got} ({:.3e}) vs published {want:.3e}: {:+.2}%",
            got as f64,
            (got as f64 / want - 1.0) * 100.0
        );
        assert!(err <= tol, "{what}: {got} is {:.2}% away from {want:e} (tolerance {:.1}%)", err * 100.0, tol * 100.0);
    }

    /// Total and active parameters as publications count them: embeddings and output head included.
    fn published_counts(spec: &ModelSpec) -> (u64, u64) {
        let p = spec.param_counts();
        (p.total, p.active_per_token + p.embedding + p.lm_head)
    }

    fn invalid_field(e: &SpecError) -> &str {
        match e {
            SpecError::Invalid { field, .. } => field,
            other => panic!("expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn mixtral_8x7b() {
        let s = import(MIXTRAL, "mixtral-8x7b.json");
        let m = s.moe.as_ref().unwrap();
        assert_eq!(s.name, "mixtral-8x7b");
        assert_eq!((s.num_layers, s.hidden_size, s.vocab_size), (32, 4096, 32000));
        assert_eq!(s.attention, AttentionSpec::Mha { num_heads: 32, num_kv_heads: 8, head_dim: 128 });
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden), (8, 2, 14336));
        assert_eq!((m.num_shared_experts, m.shared_expert_ffn_hidden), (0, None));
        assert!(m.gated && s.gated_ffn);
        assert_eq!(moe_layers(&s), (0..32).collect::<Vec<_>>());
        assert_eq!((m.capacity_factor, m.num_expert_groups), (None, None));
        assert!(!s.tied_embeddings);
        assert_eq!(s.ffn_hidden, 14336);
        assert_eq!(s.seq_len, 4096, "32768 capped at 4096");
        assert_eq!((s.dtype, s.optimizer, s.global_batch), (Dtype::Bf16, Optimizer::Adam, 1024));
        let (total, active) = published_counts(&s);
        near("Mixtral-8x7B total", total, 46.7e9, 0.03);
        near("Mixtral-8x7B active", active, 12.9e9, 0.03);
    }

    #[test]
    fn qwen3_30b_a3b() {
        let s = import(QWEN3, "qwen3-30b-a3b.json");
        let m = s.moe.as_ref().unwrap();
        assert_eq!((s.num_layers, s.hidden_size, s.vocab_size), (48, 2048, 151936));
        // head_dim 128 x 32 heads = 4096 > hidden 2048: the explicit head_dim must be used.
        assert_eq!(s.attention, AttentionSpec::Mha { num_heads: 32, num_kv_heads: 4, head_dim: 128 });
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden), (128, 8, 768));
        assert_eq!(m.num_shared_experts, 0);
        assert!(m.gated);
        assert_eq!(moe_layers(&s), (0..48).collect::<Vec<_>>());
        assert_eq!(s.ffn_hidden, 6144);
        let (total, active) = published_counts(&s);
        near("Qwen3-30B-A3B total", total, 30.5e9, 0.03);
        near("Qwen3-30B-A3B active", active, 3.3e9, 0.03);
    }

    #[test]
    fn qwen2_57b_a14b_shared_expert() {
        let s = import(QWEN2, "qwen2-57b-a14b.json");
        let m = s.moe.as_ref().unwrap();
        assert_eq!(s.attention, AttentionSpec::Mha { num_heads: 28, num_kv_heads: 4, head_dim: 128 });
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden), (64, 8, 2560));
        assert_eq!((m.num_shared_experts, m.shared_expert_ffn_hidden), (1, Some(20480)));
        assert_eq!(moe_layers(&s), (0..28).collect::<Vec<_>>());
        let (total, active) = published_counts(&s);
        near("Qwen2-57B-A14B total", total, 57.4e9, 0.03);
        near("Qwen2-57B-A14B active", active, 14.2e9, 0.03);
    }

    #[test]
    fn deepseek_v3() {
        let s = import(DEEPSEEK_V3, "deepseek-v3.json");
        let m = s.moe.as_ref().unwrap();
        assert_eq!((s.num_layers, s.hidden_size, s.vocab_size, s.ffn_hidden), (61, 7168, 129280, 18432));
        assert_eq!(
            s.attention,
            AttentionSpec::Mla {
                num_heads: 128,
                q_lora_rank: 1536,
                kv_lora_rank: 512,
                qk_nope_head_dim: 128,
                qk_rope_head_dim: 64,
                v_head_dim: 128
            }
        );
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden), (256, 8, 2048));
        assert_eq!((m.num_shared_experts, m.shared_expert_ffn_hidden), (1, None));
        assert_eq!(m.num_expert_groups, Some(8));
        assert_eq!((m.first_k_dense_layers, m.moe_layer_frequency), (3, 1));
        assert_eq!(moe_layers(&s), (3..=60).collect::<Vec<_>>());
        assert_eq!(s.num_moe_layers(), 58);
        assert!(m.gated && s.gated_ffn && !s.tied_embeddings);
        // The published 671B counts the main model without its 14B multi-token-prediction module.
        let (total, active) = published_counts(&s);
        near("DeepSeek-V3 total", total, 671e9, 0.03);
        near("DeepSeek-V3 active", active, 37e9, 0.03);
    }

    #[test]
    fn olmoe_1b_7b() {
        let s = import(OLMOE, "olmoe-1b-7b.json");
        let m = s.moe.as_ref().unwrap();
        assert_eq!((s.num_layers, s.hidden_size, s.vocab_size), (16, 2048, 50304));
        assert_eq!(s.attention, AttentionSpec::Mha { num_heads: 16, num_kv_heads: 16, head_dim: 128 });
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden), (64, 8, 1024));
        assert_eq!(m.num_shared_experts, 0);
        assert_eq!(moe_layers(&s), (0..16).collect::<Vec<_>>());
        // The released checkpoint is stored in float32.
        assert_eq!(s.dtype, Dtype::Fp32);
        let (total, active) = published_counts(&s);
        near("OLMoE-1B-7B total", total, 6.9e9, 0.03);
        near("OLMoE-1B-7B active", active, 1.3e9, 0.03);
    }

    #[test]
    fn gpt_style_moe() {
        let s = import(GPT_MOE, "gpt-moe.json");
        let m = s.moe.as_ref().unwrap();
        assert_eq!((s.num_layers, s.hidden_size, s.vocab_size, s.ffn_hidden), (24, 2048, 50257, 8192));
        assert_eq!(s.attention, AttentionSpec::Mha { num_heads: 16, num_kv_heads: 16, head_dim: 128 });
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden), (128, 1, 8192));
        assert_eq!(m.num_shared_experts, 0);
        assert!(!m.gated && !s.gated_ffn, "gelu experts are not gated");
        assert!(s.tied_embeddings, "GPT-2 ties its embeddings");
        assert_eq!(m.capacity_factor, Some(1.0));
        assert_eq!(s.dtype, Dtype::Fp16);
        assert_eq!(s.seq_len, 2048);
        // DeepSpeed's expert_interval 2: layers 2, 4, ... counting from 1.
        assert_eq!(moe_layers(&s), (1..24).step_by(2).collect::<Vec<_>>());
        // The shape of DeepSpeed-MoE's "1.3B+MoE-128" (52B parameters, 1.3B active).
        let (total, active) = published_counts(&s);
        near("GPT-MoE 1.3B+MoE-128 total", total, 52e9, 0.03);
        near("GPT-MoE 1.3B+MoE-128 active", active, 1.3e9, 0.03);
    }

    #[test]
    fn family_detection() {
        let fam = |t: &str| HfFamily::detect(&serde_json::from_str(t).unwrap());
        assert_eq!(fam(MIXTRAL), HfFamily::Mixtral);
        assert_eq!(fam(QWEN3), HfFamily::Qwen3Moe);
        assert_eq!(fam(QWEN2), HfFamily::Qwen2Moe);
        assert_eq!(fam(DEEPSEEK_V3), HfFamily::DeepseekV3);
        assert_eq!(fam(OLMOE), HfFamily::Olmoe);
        assert_eq!(fam(GPT_MOE), HfFamily::Gpt);
        assert_eq!(fam(r#"{"architectures": ["DeepseekV2ForCausalLM"]}"#), HfFamily::DeepseekV2);
        assert_eq!(fam(r#"{"model_type": "llama"}"#), HfFamily::Generic);
        assert_eq!(fam("[]"), HfFamily::Generic);
        assert_eq!(HfFamily::DeepseekV3.model_type(), "deepseek_v3");
    }

    #[test]
    fn every_example_file_imports_from_disk() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/hf");
        for file in ["mixtral-8x7b", "qwen3-30b-a3b", "qwen2-57b-a14b", "deepseek-v3", "olmoe-1b-7b", "gpt-moe"] {
            let s = import_hf_file(&dir.join(format!("{file}.json")), &HfImportOptions::default()).unwrap();
            assert_eq!(s.name, file);
        }
        let e = import_hf_file(&dir.join("no-such-file.json"), &HfImportOptions::default()).unwrap_err();
        assert!(matches!(e, SpecError::Io { .. }));
        assert!(e.to_string().contains("no-such-file.json"));
    }

    #[test]
    fn names_and_options() {
        // config.json takes its folder's name; _name_or_path wins over the file; the option wins over both.
        let s = import_hf_config(
            MIXTRAL,
            &Source::File("/models/Mixtral-8x7B-v0.1/config.json".into()),
            &HfImportOptions::default(),
        )
        .unwrap();
        assert_eq!(s.name, "Mixtral-8x7B-v0.1");
        let s = import_edited(MIXTRAL, |m| {
            m.insert("_name_or_path".into(), "mistralai/Mixtral-8x7B-Instruct-v0.1".into());
        })
        .unwrap();
        assert_eq!(s.name, "Mixtral-8x7B-Instruct-v0.1");
        let s = import_hf_config(MIXTRAL, &Source::Inline, &HfImportOptions::default()).unwrap();
        assert_eq!(s.name, "MixtralForCausalLM");
        let opts = HfImportOptions {
            seq_len: Some(8192),
            global_batch: 64,
            dtype: Some(Dtype::Fp8),
            optimizer: Optimizer::Sgd,
            name: Some("mx".into()),
        };
        let s = import_hf_config(MIXTRAL, &src("mixtral-8x7b.json"), &opts).unwrap();
        assert_eq!((s.name.as_str(), s.seq_len, s.global_batch), ("mx", 8192, 64));
        assert_eq!((s.dtype, s.optimizer), (Dtype::Fp8, Optimizer::Sgd));
        // Short contexts are kept; a config without one gets the cap.
        let s = import_edited(MIXTRAL, |m| {
            m.insert("max_position_embeddings".into(), 2048.into());
        })
        .unwrap();
        assert_eq!(s.seq_len, 2048);
        let s = import_edited(MIXTRAL, |m| {
            m.remove("max_position_embeddings");
            m.remove("torch_dtype");
        })
        .unwrap();
        assert_eq!((s.seq_len, s.dtype), (DEFAULT_SEQ_LEN_CAP, Dtype::Bf16));
    }

    #[test]
    fn qwen_mlp_only_layers() {
        // A dense prefix fits the ModelSpec pattern.
        let s = import_edited(QWEN3, |m| {
            m.insert("mlp_only_layers".into(), serde_json::json!([0, 1, 2]));
        })
        .unwrap();
        assert_eq!(moe_layers(&s), (3..48).collect::<Vec<_>>());
        // A dense layer at the end does not.
        let e = import_edited(QWEN3, |m| {
            m.insert("mlp_only_layers".into(), serde_json::json!([47]));
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "mlp_only_layers");
        assert!(e.to_string().contains("does not support"), "{e}");
        // decoder_sparse_step 2: layers 1, 3, 5, ... as in transformers' `(l + 1) % step == 0`.
        let s = import_edited(QWEN3, |m| {
            m.insert("decoder_sparse_step".into(), 2.into());
        })
        .unwrap();
        assert_eq!(moe_layers(&s), (1..48).step_by(2).collect::<Vec<_>>());
        assert!(s.gated_ffn && s.ffn_hidden == 6144, "dense layers use intermediate_size");
        // Step 0 leaves no MoE layer.
        let e = import_edited(QWEN3, |m| {
            m.insert("decoder_sparse_step".into(), 0.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "decoder_sparse_step");
        // Not a list.
        let e = import_edited(QWEN3, |m| {
            m.insert("mlp_only_layers".into(), "0,1".into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "mlp_only_layers");
    }

    #[test]
    fn deepseek_layer_frequency_matches_transformers() {
        // transformers: MoE iff l >= first_k_dense_replace and l % moe_layer_freq == 0.
        for (k, f) in [(3u64, 2u64), (1, 2), (0, 3), (2, 1), (5, 4)] {
            let s = import_edited(DEEPSEEK_V3, |m| {
                m.insert("first_k_dense_replace".into(), k.into());
                m.insert("moe_layer_freq".into(), f.into());
            })
            .unwrap();
            let want: Vec<u32> = (0..61u32).filter(|&l| l as u64 >= k && (l as u64).is_multiple_of(f)).collect();
            assert_eq!(moe_layers(&s), want, "first_k_dense_replace {k}, moe_layer_freq {f}");
        }
        let e = import_edited(DEEPSEEK_V3, |m| {
            m.insert("moe_layer_freq".into(), 0.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "moe_layer_freq");
        let e = import_edited(DEEPSEEK_V3, |m| {
            m.insert("first_k_dense_replace".into(), 61.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "first_k_dense_replace");
    }

    #[test]
    fn deepseek_v2_lite_without_query_compression() {
        let s = import_edited(DEEPSEEK_V3, |m| {
            m.insert("model_type".into(), "deepseek_v2".into());
            m.insert("q_lora_rank".into(), Value::Null);
            m.insert("n_group".into(), 1.into());
            m.insert("n_shared_experts".into(), 2.into());
        })
        .unwrap();
        assert!(matches!(s.attention, AttentionSpec::Mla { q_lora_rank: 0, .. }));
        let m = s.moe.unwrap();
        assert_eq!((m.num_shared_experts, m.num_expert_groups), (2, None));
    }

    #[test]
    fn gpt_style_keys() {
        // Megatron-LM's moe_layer_frequency counts from layer 0.
        let s = import_edited(GPT_MOE, |m| {
            m.remove("expert_interval");
            m.insert("moe_layer_frequency".into(), 2.into());
            m.remove("top_k");
            m.insert("num_experts_per_tok".into(), 2.into());
            m.insert("n_inner".into(), Value::Null);
            m.remove("moe_ffn_hidden_size");
            m.remove("capacity_factor");
        })
        .unwrap();
        let m = s.moe.as_ref().unwrap();
        assert_eq!(moe_layers(&s), (0..24).step_by(2).collect::<Vec<_>>());
        assert_eq!((m.top_k, m.expert_ffn_hidden, s.ffn_hidden), (2, 8192, 8192), "n_inner null = 4 x n_embd");
        assert_eq!(m.capacity_factor, None);
        // A per-layer 0/1 list in Megatron's style.
        let pattern: Vec<u64> = (0..24).map(|l| u64::from(l >= 4)).collect();
        let s = import_edited(GPT_MOE, |m| {
            m.remove("expert_interval");
            m.insert("moe_layer_frequency".into(), serde_json::json!(pattern));
        })
        .unwrap();
        assert_eq!(moe_layers(&s), (4..24).collect::<Vec<_>>());
        let e = import_edited(GPT_MOE, |m| {
            m.remove("expert_interval");
            m.insert("moe_layer_frequency".into(), serde_json::json!([1, 0, 1]));
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "moe_layer_frequency");
        // Without experts a GPT-2 config is a dense model; swiglu makes it gated.
        let s = import_edited(GPT_MOE, |m| {
            m.remove("num_experts");
            m.insert("activation_function".into(), "swiglu".into());
        })
        .unwrap();
        assert!(s.moe.is_none() && s.gated_ffn);
        let e = import_edited(GPT_MOE, |m| {
            m.insert("capacity_factor".into(), (-1.0).into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "capacity_factor");
    }

    #[test]
    fn unknown_families() {
        // Standard keys: imports.
        let text = r#"{"model_type": "my_moe", "num_hidden_layers": 4, "hidden_size": 512, "num_attention_heads": 8,
            "vocab_size": 1000, "intermediate_size": 256, "num_experts": 16, "num_experts_per_tok": 2,
            "hidden_act": "silu", "first_k_dense_replace": 1}"#;
        let s = import_hf_config(text, &Source::Inline, &HfImportOptions::default()).unwrap();
        let m = s.moe.as_ref().unwrap();
        assert_eq!((m.num_experts, m.top_k, m.expert_ffn_hidden, m.first_k_dense_layers), (16, 2, 256, 1));
        assert!(m.gated);
        assert_eq!(s.name, "my_moe");
        // A dense llama imports as a dense model.
        let llama = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
            "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "intermediate_size": 14336, "hidden_act": "silu", "max_position_embeddings": 131072}"#;
        let s = import_hf_config(llama, &Source::Inline, &HfImportOptions::default()).unwrap();
        assert!(s.moe.is_none() && s.gated_ffn);
        near("Llama-3-8B total", s.param_counts().total, 8.03e9, 0.03);
        // Without the standard keys: an error naming the first missing one.
        let e =
            import_hf_config(r#"{"model_type": "mystery"}"#, &src("m.json"), &HfImportOptions::default()).unwrap_err();
        assert_eq!(invalid_field(&e), "num_hidden_layers");
    }

    #[test]
    fn text_config_is_read() {
        let inner: Value = serde_json::from_str(QWEN3).unwrap();
        let outer =
            serde_json::json!({"architectures": ["SomeVLModel"], "model_type": "some_vl", "text_config": inner});
        let s = import_hf_config(&outer.to_string(), &Source::Inline, &HfImportOptions::default()).unwrap();
        assert_eq!(s.moe.as_ref().unwrap().num_experts, 128);
        let mut broken = inner.clone();
        broken.as_object_mut().unwrap().insert("num_experts".into(), 0.into());
        let outer = serde_json::json!({"model_type": "some_vl", "text_config": broken});
        let e = import_hf_config(&outer.to_string(), &Source::Inline, &HfImportOptions::default()).unwrap_err();
        assert_eq!(invalid_field(&e), "text_config.num_experts");
    }

    #[test]
    fn error_missing_key() {
        let e = import_edited(MIXTRAL, |m| {
            m.remove("hidden_size");
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "hidden_size");
        let msg = e.to_string();
        assert!(msg.contains("edited.json") && msg.contains("hidden_size") && msg.contains("fix:"), "{msg}");
        let e = import_edited(QWEN3, |m| {
            m.remove("moe_intermediate_size");
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "moe_intermediate_size");
        let e = import_edited(DEEPSEEK_V3, |m| {
            m.remove("n_routed_experts");
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "n_routed_experts");
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_experts_per_tok".into(), Value::Null);
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_experts_per_tok");
        let e = import_edited(DEEPSEEK_V3, |m| {
            m.remove("kv_lora_rank");
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "kv_lora_rank");
    }

    #[test]
    fn error_wrong_type() {
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_local_experts".into(), "8".into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_local_experts");
        let msg = e.to_string();
        assert!(msg.contains("\"8\"") && msg.contains("not a string"), "{msg}");
        for (key, value) in [
            ("hidden_size", serde_json::json!(4096.5)),
            ("hidden_size", serde_json::json!(-4096)),
            ("num_hidden_layers", serde_json::json!([32])),
            ("tie_word_embeddings", serde_json::json!("no")),
            ("torch_dtype", serde_json::json!(16)),
            ("torch_dtype", serde_json::json!("int4")),
            ("intermediate_size", serde_json::json!(true)),
            ("vocab_size", serde_json::json!(1e300)),
        ] {
            let e = import_edited(MIXTRAL, |m| {
                m.insert(key.into(), value.clone());
            })
            .unwrap_err();
            assert_eq!(invalid_field(&e), key, "{key} = {value}: {e}");
        }
        // A whole number written as a float is accepted.
        let s = import_edited(MIXTRAL, |m| {
            m.insert("hidden_size".into(), serde_json::json!(4096.0));
        })
        .unwrap();
        assert_eq!(s.hidden_size, 4096);
    }

    #[test]
    fn error_zero_experts_and_top_k() {
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_local_experts".into(), 0.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_local_experts");
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_experts_per_tok".into(), 9.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_experts_per_tok");
        assert!(e.to_string().contains("num_local_experts = 8"), "{e}");
        let e = import_edited(OLMOE, |m| {
            m.insert("num_experts_per_tok".into(), 0.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_experts_per_tok");
        let e = import_edited(DEEPSEEK_V3, |m| {
            m.insert("n_group".into(), 7.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "n_group");
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_key_value_heads".into(), 5.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_key_value_heads");
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_attention_heads".into(), 3.into());
            m.remove("num_key_value_heads");
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_attention_heads");
    }

    #[test]
    fn error_too_large() {
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_hidden_layers".into(), 1_000_000_000u64.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_hidden_layers");
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_local_experts".into(), u64::MAX.into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "num_local_experts");
        // Validation errors of the built spec name the config key.
        let e = import_edited(MIXTRAL, |m| {
            m.insert("hidden_size".into(), (1u64 << 30).into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "hidden_size");
        let e = import_edited(MIXTRAL, |m| {
            m.insert("head_dim".into(), (1u64 << 40).into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "head_dim");
        // Each size plausible, together absurd (~10^16 parameters).
        let e = import_edited(MIXTRAL, |m| {
            m.insert("num_local_experts".into(), 65536.into());
            m.insert("intermediate_size".into(), (1u64 << 24).into());
        })
        .unwrap_err();
        assert_eq!(invalid_field(&e), "hidden_size", "the magnitude check names the hidden size: {e}");
        assert!(e.to_string().contains("parameters"), "{e}");
    }

    #[test]
    fn error_not_an_object_or_not_json() {
        for text in ["[1, 2]", "42", "null", "\"config\"", "true"] {
            let e = import_hf_config(text, &src("bad.json"), &HfImportOptions::default()).unwrap_err();
            assert_eq!(invalid_field(&e), "(top level)", "{text}");
            assert!(e.to_string().contains("bad.json"));
        }
        for text in ["", "{", "{\"a\": }", "not json"] {
            let e = import_hf_config(text, &src("bad.json"), &HfImportOptions::default()).unwrap_err();
            assert!(matches!(e, SpecError::Parse { .. }), "{text}: {e:?}");
        }
    }

    mod never_panics {
        use super::*;
        use proptest::prelude::*;

        const KEYS: &[&str] = &[
            "architectures",
            "model_type",
            "num_hidden_layers",
            "n_layer",
            "hidden_size",
            "n_embd",
            "num_attention_heads",
            "n_head",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "intermediate_size",
            "n_inner",
            "moe_intermediate_size",
            "moe_ffn_hidden_size",
            "num_local_experts",
            "num_experts",
            "n_routed_experts",
            "num_experts_per_tok",
            "top_k",
            "n_shared_experts",
            "shared_expert_intermediate_size",
            "first_k_dense_replace",
            "moe_layer_freq",
            "moe_layer_frequency",
            "expert_interval",
            "decoder_sparse_step",
            "mlp_only_layers",
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_group",
            "tie_word_embeddings",
            "max_position_embeddings",
            "torch_dtype",
            "hidden_act",
            "activation_function",
            "capacity_factor",
            "text_config",
            "_name_or_path",
        ];

        fn number() -> impl Strategy<Value = Value> {
            prop_oneof![
                (0u64..10).prop_map(Value::from),
                (0u64..5000).prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                prop::num::f64::NORMAL.prop_map(Value::from),
                Just(Value::from(u32::MAX)),
                Just(Value::from(1u64 << 32)),
            ]
        }

        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                number(),
                prop_oneof![
                    Just("mixtral"),
                    Just("qwen2_moe"),
                    Just("qwen3_moe"),
                    Just("deepseek_v2"),
                    Just("deepseek_v3"),
                    Just("olmoe"),
                    Just("gpt2"),
                    Just("silu"),
                    Just("bfloat16"),
                    Just("float8_e4m3fn"),
                    Just("MixtralForCausalLM"),
                    Just("a/b/"),
                    Just(""),
                ]
                .prop_map(Value::from),
                ".{0,12}".prop_map(Value::from),
            ]
        }

        fn json() -> impl Strategy<Value = Value> {
            leaf().prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    prop::collection::vec((prop::sample::select(KEYS), inner), 0..6)
                        .prop_map(|kv| { Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()) }),
                ]
            })
        }

        /// An object with a random subset of the known keys, each with a random value.
        fn config() -> impl Strategy<Value = Value> {
            prop::collection::vec((prop::sample::select(KEYS), json()), 0..KEYS.len())
                .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
        }

        /// A real config with some keys replaced by random values or removed.
        fn mutated() -> impl Strategy<Value = Value> {
            let bases = [MIXTRAL, QWEN3, QWEN2, DEEPSEEK_V3, OLMOE, GPT_MOE];
            (
                prop::sample::select(bases.to_vec()),
                prop::collection::vec((prop::sample::select(KEYS), prop::option::of(json())), 1..6),
            )
                .prop_map(|(base, edits)| {
                    let mut v: Value = serde_json::from_str(base).unwrap();
                    let m = v.as_object_mut().unwrap();
                    for (k, val) in edits {
                        match val {
                            Some(val) => m.insert(k.to_string(), val),
                            None => m.remove(k),
                        };
                    }
                    v
                })
        }

        /// Imports and, when the import succeeds, checks the spec is valid and countable.
        fn check(text: &str) {
            if let Ok(spec) = import_hf_config(text, &Source::Inline, &HfImportOptions::default()) {
                spec.validate(&Source::Inline).unwrap();
                let p = spec.param_counts();
                assert!(p.total >= p.active_per_token);
                assert!(spec.num_moe_layers() <= spec.num_layers);
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn random_json_values(v in json()) {
                check(&v.to_string());
            }

            #[test]
            fn random_key_subsets(v in config()) {
                check(&v.to_string());
            }

            #[test]
            fn mutated_real_configs(v in mutated()) {
                check(&v.to_string());
            }

            #[test]
            fn random_text(s in ".{0,64}") {
                check(&s);
            }
        }
    }
}
