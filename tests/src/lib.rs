//! Test harness for nomoat: tiny random-weight models written in the test,
//! and helpers shared by the end-to-end tests.
//!
//! A tiny model has the real architecture (llama or qwen2) at toy sizes, with
//! weights drawn from a fixed seed, so every test builds the same model. It
//! can be written as GGUF (any ggml type for the matrices, f32 for norms and
//! biases, Q/K rows permuted for llama as llama.cpp's converter does) and as a
//! Hugging Face safetensors directory with `config.json`.

pub mod fuzz;
pub mod harness;
pub mod lora;
pub mod web;

/// The multi-host test bed, from the node crate (`nomoat bench wan` runs on it too).
#[cfg(target_os = "linux")]
pub use nomoat_node::netbed;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Which architecture a tiny model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    /// Llama: tied embeddings, interleaved RoPE in GGUF.
    Llama,
    /// Qwen2: QKV biases, an untied output head.
    Qwen2,
}

/// Sizes of a tiny model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// Architecture.
    pub arch: TinyArch,
    /// Residual width.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub ffn: usize,
    /// BlockRange.
    pub blocks: usize,
    /// Vocabulary.
    pub vocab: usize,
    /// Context length.
    pub context: usize,
    /// Seed of the weights.
    pub seed: u64,
}

impl TinySpec {
    /// The default tiny model of an architecture: 6 blocks, hidden 64,
    /// 4 heads over 2 kv heads, context 64.
    pub fn new(arch: TinyArch) -> Self {
        Self {
            arch,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ffn: 128,
            blocks: 6,
            vocab: 96,
            context: 64,
            seed: 42,
        }
    }

    fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    fn arch_name(&self) -> &'static str {
        match self.arch {
            TinyArch::Llama => "llama",
            TinyArch::Qwen2 => "qwen2",
        }
    }
}

/// Tiny model weights in Hugging Face layout, keyed by GGUF tensor name.
#[derive(Debug)]
pub struct TinyModel {
    /// The sizes.
    pub spec: TinySpec,
    weights: Vec<(String, Tensor)>,
}

fn uniform(rng: &mut StdRng, shape: &[usize], scale: f32, offset: f32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| offset + scale * (rng.random::<f32>() * 2.0 - 1.0))
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

impl TinyModel {
    /// Draws the weights of `spec` from its seed.
    pub fn generate(spec: TinySpec) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let (h, f, v) = (spec.hidden, spec.ffn, spec.vocab);
        let hd = spec.head_dim();
        let (q_out, kv_out) = (spec.heads * hd, spec.kv_heads * hd);
        let lin = |rng: &mut StdRng, out: usize, inp: usize| {
            uniform(rng, &[out, inp], 3.0 / (inp as f32).sqrt(), 0.0)
        };
        let mut w = vec![(
            "token_embd.weight".to_string(),
            uniform(&mut rng, &[v, h], 0.3, 0.0)?,
        )];
        for b in 0..spec.blocks {
            let p = format!("blk.{b}");
            w.push((
                format!("{p}.attn_norm.weight"),
                uniform(&mut rng, &[h], 0.1, 1.0)?,
            ));
            w.push((format!("{p}.attn_q.weight"), lin(&mut rng, q_out, h)?));
            w.push((format!("{p}.attn_k.weight"), lin(&mut rng, kv_out, h)?));
            w.push((format!("{p}.attn_v.weight"), lin(&mut rng, kv_out, h)?));
            if spec.arch == TinyArch::Qwen2 {
                w.push((
                    format!("{p}.attn_q.bias"),
                    uniform(&mut rng, &[q_out], 0.2, 0.0)?,
                ));
                w.push((
                    format!("{p}.attn_k.bias"),
                    uniform(&mut rng, &[kv_out], 0.2, 0.0)?,
                ));
                w.push((
                    format!("{p}.attn_v.bias"),
                    uniform(&mut rng, &[kv_out], 0.2, 0.0)?,
                ));
            }
            w.push((format!("{p}.attn_output.weight"), lin(&mut rng, h, q_out)?));
            w.push((
                format!("{p}.ffn_norm.weight"),
                uniform(&mut rng, &[h], 0.1, 1.0)?,
            ));
            w.push((format!("{p}.ffn_gate.weight"), lin(&mut rng, f, h)?));
            w.push((format!("{p}.ffn_up.weight"), lin(&mut rng, f, h)?));
            w.push((format!("{p}.ffn_down.weight"), lin(&mut rng, h, f)?));
        }
        w.push((
            "output_norm.weight".to_string(),
            uniform(&mut rng, &[h], 0.1, 1.0)?,
        ));
        if spec.arch == TinyArch::Qwen2 {
            w.push(("output.weight".to_string(), lin(&mut rng, v, h)?));
        }
        Ok(Self { spec, weights: w })
    }

    /// The same model with every weight passed through `f(name, weight)`.
    pub fn map_weights(&self, f: impl Fn(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            spec: self.spec.clone(),
            weights: self
                .weights
                .iter()
                .map(|(n, w)| Ok((n.clone(), f(n, w)?)))
                .collect::<Result<_>>()?,
        })
    }

    /// Names of the tensors, in file order.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.weights.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn is_matrix(name: &str) -> bool {
        name.ends_with(".weight") && !name.contains("norm")
    }

    /// GGUF metadata of this model; `arch_override` replaces
    /// `general.architecture` (for error tests).
    fn metadata(&self, arch_override: Option<&str>) -> Vec<(String, Value)> {
        let s = &self.spec;
        let a = s.arch_name();
        vec![
            (
                "general.architecture".into(),
                Value::String(arch_override.unwrap_or(a).to_string()),
            ),
            (format!("{a}.block_count"), Value::U32(s.blocks as u32)),
            (format!("{a}.embedding_length"), Value::U32(s.hidden as u32)),
            (format!("{a}.feed_forward_length"), Value::U32(s.ffn as u32)),
            (
                format!("{a}.attention.head_count"),
                Value::U32(s.heads as u32),
            ),
            (
                format!("{a}.attention.head_count_kv"),
                Value::U32(s.kv_heads as u32),
            ),
            (
                format!("{a}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
            (format!("{a}.rope.freq_base"), Value::F32(10_000.0)),
            (format!("{a}.context_length"), Value::U32(s.context as u32)),
            (format!("{a}.vocab_size"), Value::U32(s.vocab as u32)),
        ]
    }

    /// Writes a GGUF file with matrices stored as `dtype`.
    pub fn write_gguf(&self, path: &Path, dtype: GgmlDType) -> Result<PathBuf> {
        self.write_gguf_with(path, dtype, None, &|_| true)
    }

    /// Writes a GGUF file with options for error tests: another
    /// architecture name, and a filter on which tensors to write.
    pub fn write_gguf_with(
        &self,
        path: &Path,
        dtype: GgmlDType,
        arch_override: Option<&str>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<PathBuf> {
        let s = &self.spec;
        let mut tensors = Vec::new();
        for (name, t) in &self.weights {
            if !keep(name) {
                continue;
            }
            let mut t = t.clone();
            // llama.cpp's converter permutes Q/K rows so that RoPE rotates
            // interleaved pairs; qwen2 keeps the Hugging Face layout.
            if s.arch == TinyArch::Llama {
                if name.ends_with("attn_q.weight") {
                    t = permute_for_interleaved_rope(&t, s.heads)?;
                } else if name.ends_with("attn_k.weight") {
                    t = permute_for_interleaved_rope(&t, s.kv_heads)?;
                }
            }
            let ty = if Self::is_matrix(name) {
                dtype
            } else {
                GgmlDType::F32
            };
            tensors.push((name.clone(), QTensor::quantize(&t, ty)?));
        }
        let md = self.metadata(arch_override);
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path)?;
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(path.to_path_buf())
    }

    /// Writes a Hugging Face directory: `config.json` and `model.safetensors`
    /// with the weights in f32.
    pub fn write_safetensors(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let s = &self.spec;
        let mut map = HashMap::new();
        for (name, t) in &self.weights {
            map.insert(hf_name(name), t.clone());
        }
        candle_core::safetensors::save(&map, dir.join("model.safetensors"))?;
        let config = serde_json::json!({
            "architectures": [match s.arch { TinyArch::Llama => "LlamaForCausalLM", TinyArch::Qwen2 => "Qwen2ForCausalLM" }],
            "model_type": s.arch_name(),
            "hidden_size": s.hidden,
            "intermediate_size": s.ffn,
            "num_attention_heads": s.heads,
            "num_key_value_heads": s.kv_heads,
            "num_hidden_layers": s.blocks,
            "vocab_size": s.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": s.context,
            "tie_word_embeddings": s.arch == TinyArch::Llama,
        });
        std::fs::write(
            dir.join("config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        Ok(dir.to_path_buf())
    }
}

/// Reorders the rows of a Q or K projection from Hugging Face's half-split
/// RoPE layout to the interleaved layout of GGUF llama files.
pub fn permute_for_interleaved_rope(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    Ok(w.reshape((heads, 2, out / heads / 2, inp))?
        .transpose(1, 2)?
        .reshape((out, inp))?)
}

/// The Hugging Face name of a GGUF tensor name. Kept apart from the
/// engine's own mapping on purpose: the test writer is an independent
/// converter, so a wrong mapping in the engine fails the GGUF-vs-safetensors
/// test instead of being mirrored by it.
pub fn hf_name(name: &str) -> String {
    let block = |rest: &str| -> String {
        match rest {
            "attn_norm.weight" => "input_layernorm.weight",
            "attn_q.weight" => "self_attn.q_proj.weight",
            "attn_q.bias" => "self_attn.q_proj.bias",
            "attn_k.weight" => "self_attn.k_proj.weight",
            "attn_k.bias" => "self_attn.k_proj.bias",
            "attn_v.weight" => "self_attn.v_proj.weight",
            "attn_v.bias" => "self_attn.v_proj.bias",
            "attn_output.weight" => "self_attn.o_proj.weight",
            "ffn_norm.weight" => "post_attention_layernorm.weight",
            "ffn_gate.weight" => "mlp.gate_proj.weight",
            "ffn_up.weight" => "mlp.up_proj.weight",
            "ffn_down.weight" => "mlp.down_proj.weight",
            other => other,
        }
        .to_string()
    };
    match name {
        "token_embd.weight" => "model.embed_tokens.weight".into(),
        "output_norm.weight" => "model.norm.weight".into(),
        "output.weight" => "lm_head.weight".into(),
        _ => match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((i, rest)) => format!("model.layers.{i}.{}", block(rest)),
            None => name.to_string(),
        },
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The cut points (span ends) of a split, as `LocalModel::load` takes them.
pub fn cuts_of(split: &[nomoat_scheduler::BlockRange]) -> Vec<usize> {
    split.iter().map(|r| r.end as usize).collect()
}
