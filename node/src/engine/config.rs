use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use serde::Deserialize;

use super::{EngineError, Result};

/// Largest context nomoat allocates rotary tables for, whatever a model claims.
pub const MAX_CONTEXT: usize = 32_768;
/// Largest hidden size a model file may declare.
pub const MAX_HIDDEN: usize = 1 << 16;
/// Most blocks a model file may declare.
pub const MAX_BLOCKS: usize = 1024;
/// Most attention heads a model file may declare.
pub const MAX_HEADS: usize = 1024;
/// Largest head dimension a model file may declare.
pub const MAX_HEAD_DIM: usize = 1024;
/// Largest MLP size a model file may declare.
pub const MAX_INTERMEDIATE: usize = 1 << 20;
/// Largest vocabulary a model file may declare.
pub const MAX_VOCAB: usize = 1 << 22;

/// The decoder families the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Arch {
    /// Llama: RMSNorm, RoPE, grouped-query attention, SwiGLU.
    Llama,
    /// Qwen2: llama plus biases on the Q, K and V projections.
    Qwen2,
}

impl Arch {
    /// Parses a GGUF `general.architecture` or a config.json `model_type`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "llama" | "mistral" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(EngineError::UnsupportedArch(other.to_string())),
        }
    }

    /// The GGUF metadata prefix of this architecture.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// Whether Q, K and V projections carry biases.
    pub fn qkv_bias(self) -> bool {
        matches!(self, Self::Qwen2)
    }
}

/// How rotary frequencies are stretched for long contexts.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// The divisor.
        factor: f32,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Overall factor.
        factor: f32,
        /// Low-frequency factor.
        low_freq_factor: f32,
        /// High-frequency factor.
        high_freq_factor: f32,
        /// The context the model was trained with.
        original_max_position_embeddings: usize,
    },
    /// Per-dimension frequency divisors (GGUF `rope_freqs.weight`).
    Factors(Vec<f32>),
}

/// A validated model configuration: everything the engine needs to shape
/// tensors and caches.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Decoder family.
    pub arch: Arch,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_blocks: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Inner width of the MLP.
    pub intermediate_size: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether RoPE rotates interleaved pairs (GGUF llama, whose Q/K rows are
    /// permuted by the converter) or the two halves of each head (Hugging Face
    /// layout, GGUF qwen2).
    pub rope_interleaved: bool,
    /// Longest sequence the model supports (capped at [`MAX_CONTEXT`]).
    pub max_seq_len: usize,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
}

impl ModelConfig {
    /// Checks the invariants the engine relies on.
    pub fn validate(self) -> Result<Self> {
        let c = &self;
        let bad = |what: String| Err(EngineError::Config(what));
        if c.hidden_size == 0 || c.num_blocks == 0 || c.num_heads == 0 || c.num_kv_heads == 0 {
            return bad(format!(
                "hidden size {}, blocks {}, heads {}, kv heads {} must all be positive",
                c.hidden_size, c.num_blocks, c.num_heads, c.num_kv_heads
            ));
        }
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return bad(format!(
                "{} heads are not a multiple of {} kv heads",
                c.num_heads, c.num_kv_heads
            ));
        }
        if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
            return bad(format!("head dim {} must be even and positive", c.head_dim));
        }
        if c.intermediate_size == 0 || c.vocab_size == 0 || c.max_seq_len == 0 {
            return bad("intermediate size, vocabulary and context must be positive".into());
        }
        // Files and peers' manifests are untrusted: sizes past these are no
        // real model, and would only make the loader allocate without end.
        for (what, v, most) in [
            ("hidden size", c.hidden_size, MAX_HIDDEN),
            ("blocks", c.num_blocks, MAX_BLOCKS),
            ("heads", c.num_heads, MAX_HEADS),
            ("head dim", c.head_dim, MAX_HEAD_DIM),
            ("intermediate size", c.intermediate_size, MAX_INTERMEDIATE),
            ("vocabulary", c.vocab_size, MAX_VOCAB),
        ] {
            if v > most {
                return bad(format!("{what} {v} is over the most supported, {most}"));
            }
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0) {
            return bad(format!("rms norm eps {} must be positive", c.rms_norm_eps));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
            return bad(format!("rope theta {} must be positive", c.rope_theta));
        }
        let finite_positive = |x: f32| x.is_finite() && x > 0.0;
        match &c.rope_scaling {
            RopeScaling::Linear { factor } if !finite_positive(*factor) => {
                return bad(format!("rope scaling factor {factor} must be positive"));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                ..
            } if ![*factor, *low_freq_factor, *high_freq_factor]
                .into_iter()
                .all(finite_positive)
                || low_freq_factor >= high_freq_factor =>
            {
                return bad(format!(
                    "llama3 rope scaling factors {factor}, {low_freq_factor}, {high_freq_factor} must be positive, low below high"
                ));
            }
            _ => {}
        }
        if let RopeScaling::Factors(f) = &c.rope_scaling {
            if f.len() != c.head_dim / 2 {
                return bad(format!(
                    "rope_freqs has {} entries, expected {}",
                    f.len(),
                    c.head_dim / 2
                ));
            }
        }
        Ok(self)
    }

    /// Reads the config from GGUF metadata (`general.architecture` and the
    /// `{arch}.*` keys). `vocab_hint` is the token embedding's row count.
    pub fn from_gguf(md: &HashMap<String, Value>, vocab_hint: Option<usize>) -> Result<Self> {
        let arch_name = md
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .ok_or_else(|| EngineError::Config("missing general.architecture".into()))?;
        let arch = Arch::parse(arch_name)?;
        let p = arch.name();
        let get_usize = |key: &str| -> Result<usize> {
            let full = format!("{p}.{key}");
            md.get(&full)
                .and_then(value_as_u64)
                .map(|v| v as usize)
                .ok_or(EngineError::Config(format!(
                    "missing or non-integer {full}"
                )))
        };
        let get_f32 = |key: &str| -> Option<f32> {
            md.get(&format!("{p}.{key}"))
                .and_then(value_as_f64)
                .map(|v| v as f32)
        };
        let hidden_size = get_usize("embedding_length")?;
        let num_heads = get_usize("attention.head_count")?;
        let num_kv_heads = get_usize("attention.head_count_kv").unwrap_or(num_heads);
        let head_dim = get_usize("attention.key_length")
            .or_else(|_| get_usize("rope.dimension_count"))
            .unwrap_or(hidden_size.checked_div(num_heads).unwrap_or(0));
        let vocab_size = match get_usize("vocab_size") {
            Ok(v) => v,
            Err(_) => vocab_hint
                .or_else(|| match md.get("tokenizer.ggml.tokens") {
                    Some(Value::Array(a)) => Some(a.len()),
                    _ => None,
                })
                .ok_or(EngineError::Config(
                    "cannot tell the vocabulary size".into(),
                ))?,
        };
        let rope_scaling = match md
            .get(&format!("{p}.rope.scaling.type"))
            .and_then(|v| v.to_string().ok())
            .map(|s| s.as_str())
        {
            Some("linear") => RopeScaling::Linear {
                factor: get_f32("rope.scaling.factor").unwrap_or(1.0),
            },
            Some("none") | None => RopeScaling::None,
            Some(other) => {
                return Err(EngineError::Config(format!(
                    "unsupported rope scaling `{other}`"
                )))
            }
        };
        ModelConfig {
            arch,
            hidden_size,
            num_blocks: get_usize("block_count")?,
            num_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: get_usize("feed_forward_length")?,
            vocab_size,
            rms_norm_eps: get_f32("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
            rope_theta: get_f32("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: arch == Arch::Llama,
            max_seq_len: get_usize("context_length").unwrap_or(4096).min(MAX_CONTEXT),
            tie_word_embeddings: false,
        }
        .validate()
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let raw: RawHfConfig = serde_json::from_str(text)
            .map_err(|e| EngineError::Config(format!("config.json: {e}")))?;
        let arch_name = raw
            .model_type
            .clone()
            .or_else(|| {
                raw.architectures
                    .as_ref()
                    .and_then(|a| a.first())
                    .map(|a| a.trim_end_matches("ForCausalLM").to_ascii_lowercase())
            })
            .ok_or(EngineError::Config(
                "config.json names no model_type".into(),
            ))?;
        let arch = Arch::parse(&arch_name)?;
        let rope_scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.or(s.kind).as_deref() {
                Some("linear") => RopeScaling::Linear {
                    factor: s.factor.unwrap_or(1.0),
                },
                Some("llama3") => RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(1.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(8192),
                },
                Some("default") | None => RopeScaling::None,
                Some(other) => {
                    return Err(EngineError::Config(format!(
                        "unsupported rope scaling `{other}`"
                    )))
                }
            },
        };
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        let head_dim = raw.head_dim.unwrap_or(
            raw.hidden_size
                .checked_div(raw.num_attention_heads)
                .unwrap_or(0),
        );
        ModelConfig {
            arch,
            hidden_size: raw.hidden_size,
            num_blocks: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            intermediate_size: raw.intermediate_size,
            vocab_size: raw.vocab_size,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-5),
            rope_theta: raw.rope_theta.unwrap_or(10_000.0),
            rope_scaling,
            rope_interleaved: false,
            max_seq_len: raw.max_position_embeddings.unwrap_or(4096).min(MAX_CONTEXT),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
        }
        .validate()
    }

    /// Per-dimension inverse frequencies of the rotary embedding.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base: Vec<f32> = (0..half)
            .map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f32 / self.head_dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Factors(div) => base.iter().zip(div).map(|(f, d)| f / d).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f32;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f32>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RawHfConfig {
    model_type: Option<String>,
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_hidden_layers: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f32>,
    rope_scaling: Option<RawRopeScaling>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
}

pub(crate) fn value_as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::U8(x) => Some(*x as u64),
        Value::U16(x) => Some(*x as u64),
        Value::U32(x) => Some(*x as u64),
        Value::U64(x) => Some(*x),
        Value::I8(x) => u64::try_from(*x).ok(),
        Value::I16(x) => u64::try_from(*x).ok(),
        Value::I32(x) => u64::try_from(*x).ok(),
        Value::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

pub(crate) fn value_as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(x) => Some(*x as f64),
        Value::F64(x) => Some(*x),
        other => value_as_u64(other).map(|x| x as f64),
    }
}
