//! Random low-rank adapters of tiny models, written in the test as PEFT
//! directories and GGUF LoRA files, and the tiny model with the adapter
//! merged into its weights (the reference an adapter run is checked
//! against).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::{permute_for_interleaved_rope, TinyArch, TinyModel, TinySpec};

/// Targets by GGUF name, with the PEFT module path of each.
const TARGETS: [(&str, &str); 7] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// A random adapter of a tiny model, in Hugging Face layout.
#[derive(Debug)]
pub struct TestLora {
    /// Rank.
    pub rank: usize,
    /// PEFT's `lora_alpha`.
    pub alpha: f32,
    /// `(block, GGUF target, A (rank × in), B (out × rank))`.
    pub pairs: Vec<(usize, &'static str, Tensor, Tensor)>,
    arch: TinyArch,
    heads: usize,
    kv_heads: usize,
}

impl TestLora {
    /// Draws an adapter of `rank` for every target of every block of
    /// `model` (those in `targets`, GGUF names; empty: all) from `seed`.
    pub fn random(
        model: &TinyModel,
        rank: usize,
        alpha: f32,
        seed: u64,
        targets: &[&str],
    ) -> Result<Self> {
        Self::random_for(&model.spec, rank, alpha, seed, targets)
    }

    /// [`random`](Self::random) for a model of sizes `s` (a real model's,
    /// e.g. SmolLM2's, for tests that run it).
    pub fn random_for(
        s: &TinySpec,
        rank: usize,
        alpha: f32,
        seed: u64,
        targets: &[&str],
    ) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let hd = s.hidden / s.heads;
        let (q, kv) = (s.heads * hd, s.kv_heads * hd);
        let mut pairs = Vec::new();
        for b in 0..s.blocks {
            for (t, _) in TARGETS {
                if !targets.is_empty() && !targets.contains(&t) {
                    continue;
                }
                let (out, inp) = match t {
                    "attn_q" => (q, s.hidden),
                    "attn_k" | "attn_v" => (kv, s.hidden),
                    "attn_output" => (s.hidden, q),
                    "ffn_gate" | "ffn_up" => (s.ffn, s.hidden),
                    _ => (s.hidden, s.ffn),
                };
                let mut draw = |rows: usize, cols: usize, scale: f32| -> Result<Tensor> {
                    let v: Vec<f32> = (0..rows * cols)
                        .map(|_| scale * (rng.random::<f32>() * 2.0 - 1.0))
                        .collect();
                    Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
                };
                let a = draw(rank, inp, 1.0 / (inp as f32).sqrt())?;
                let bm = draw(out, rank, 0.5 / (rank as f32).sqrt())?;
                pairs.push((b, t, a, bm));
            }
        }
        Ok(Self {
            rank,
            alpha,
            pairs,
            arch: s.arch,
            heads: s.heads,
            kv_heads: s.kv_heads,
        })
    }

    /// The update's factor, `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Writes a PEFT directory: `adapter_config.json` and
    /// `adapter_model.safetensors` (f32).
    pub fn write_peft(&self, dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let mut map = HashMap::new();
        for (b, t, a, bm) in &self.pairs {
            let module = TARGETS
                .iter()
                .find(|(g, _)| g == t)
                .map(|(_, m)| *m)
                .unwrap_or_default();
            let p = format!("base_model.model.model.layers.{b}.{module}");
            map.insert(format!("{p}.lora_A.weight"), a.clone());
            map.insert(format!("{p}.lora_B.weight"), bm.clone());
        }
        candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors"))?;
        let mut modules: Vec<&str> = self
            .pairs
            .iter()
            .filter_map(|(_, t, _, _)| TARGETS.iter().find(|(g, _)| g == t))
            .map(|(_, m)| m.rsplit('.').next().unwrap_or_default())
            .collect();
        modules.sort();
        modules.dedup();
        let config = serde_json::json!({
            "peft_type": "LORA",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_rslora": false,
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": "tiny",
        });
        std::fs::write(
            dir.join("adapter_config.json"),
            serde_json::to_string_pretty(&config)?,
        )?;
        Ok(dir.to_path_buf())
    }

    /// Writes a GGUF LoRA file as llama.cpp's converter does: `B` of Q and
    /// K permuted for a llama base, `general.type = adapter`.
    pub fn write_gguf(&self, path: &Path, arch_name: &str) -> Result<PathBuf> {
        let mut tensors = Vec::new();
        for (b, t, a, bm) in &self.pairs {
            let bm = match (self.arch, *t) {
                (TinyArch::Llama, "attn_q") => permute_for_interleaved_rope(bm, self.heads)?,
                (TinyArch::Llama, "attn_k") => permute_for_interleaved_rope(bm, self.kv_heads)?,
                _ => bm.clone(),
            };
            tensors.push((
                format!("blk.{b}.{t}.weight.lora_a"),
                QTensor::quantize(a, GgmlDType::F32)?,
            ));
            tensors.push((
                format!("blk.{b}.{t}.weight.lora_b"),
                QTensor::quantize(&bm, GgmlDType::F32)?,
            ));
        }
        let md = [
            ("general.architecture", Value::String(arch_name.to_string())),
            ("general.type", Value::String("adapter".into())),
            ("adapter.type", Value::String("lora".into())),
            ("adapter.lora.alpha", Value::F32(self.alpha)),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let mut f = std::fs::File::create(path)?;
        gguf_file::write(&mut f, &md_refs, &t_refs)?;
        Ok(path.to_path_buf())
    }

    /// `model` with this adapter merged into its weights: `W + scale·B·A`.
    pub fn merged(&self, model: &TinyModel) -> Result<TinyModel> {
        let scale = f64::from(self.scale());
        model.map_weights(|name, w| {
            let hit = self
                .pairs
                .iter()
                .find(|(b, t, _, _)| name == format!("blk.{b}.{t}.weight"));
            Ok(match hit {
                Some((_, _, a, bm)) => (w + (bm.matmul(a)? * scale)?)?,
                None => w.clone(),
            })
        })
    }
}
