//! Decode speed of nomoat's engine against candle-transformers' quantized
//! llama on the same model, measured in the same run.
//!
//! `cargo bench -p nomoat-tests --bench engine_vs_candle [-- TOKENS]`
//!
//! candle-transformers runs SmolLM2 twice: on the shipped Q4_1 file, and on
//! an f32 copy (every weight dequantized, what one does when Q4_1 is slow).
//! nomoat runs the shipped file with `WeightMode::Fast`. The last line is
//! one JSON object.

use std::time::Instant;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use nomoat_node::catalog;
use nomoat_node::engine::{LocalModel, ModelFile, Sampler, SamplingParams, WeightMode};

const PROMPT: &[u32] = &[
    1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198,
];

fn argmax(v: &[f32]) -> u32 {
    Sampler::new(SamplingParams::greedy()).sample(v, &[])
}

fn candle_decode(path: &std::path::Path, tokens: usize) -> Result<f64> {
    let mut reader = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut model = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
    let input = Tensor::new(PROMPT, &Device::Cpu)?.unsqueeze(0)?;
    let mut logits = model.forward(&input, 0)?.squeeze(0)?.to_vec1::<f32>()?;
    let t = Instant::now();
    for i in 0..tokens {
        let next = Tensor::new(&[argmax(&logits)], &Device::Cpu)?.unsqueeze(0)?;
        logits = model
            .forward(&next, PROMPT.len() + i)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

fn nomoat_decode(path: &std::path::Path, tokens: usize) -> Result<f64> {
    let file = ModelFile::open(path)?;
    let model = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let mut session = model.new_session();
    let mut logits = model.forward_last(&mut session, PROMPT)?;
    let t = Instant::now();
    for _ in 0..tokens {
        logits = model.forward_last(&mut session, &[argmax(&logits)])?;
    }
    Ok(tokens as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let tokens: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(64);
    let path = catalog::resolve("smollm2-135m", true)?;
    let dir = tempfile::tempdir()?;
    let f32_path = dir.path().join("smollm2-f32.gguf");
    {
        let mut reader = std::fs::File::open(&path)?;
        let content = gguf_file::Content::read(&mut reader)?;
        let mut tensors = Vec::new();
        for name in content.tensor_infos.keys() {
            let t = content
                .tensor(&mut reader, name, &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            tensors.push((name.clone(), QTensor::quantize(&t, GgmlDType::F32)?));
        }
        let md: Vec<_> = content
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let ts: Vec<_> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut std::fs::File::create(&f32_path)?, &md, &ts)?;
    }
    let mut rows = Vec::new();
    for round in 0..2 {
        let ours = nomoat_decode(&path, tokens)?;
        let f32_ref = candle_decode(&f32_path, tokens)?;
        let q41_ref = candle_decode(&path, tokens)?;
        println!(
            "round {}: nomoat fast {ours:.1} tok/s, candle-transformers f32 {f32_ref:.1} tok/s, candle-transformers Q4_1 {q41_ref:.1} tok/s",
            round + 1
        );
        rows.push((ours, f32_ref, q41_ref));
    }
    let best = |f: fn(&(f64, f64, f64)) -> f64| rows.iter().map(f).fold(0f64, f64::max);
    let (ours, f32_ref, q41_ref) = (best(|r| r.0), best(|r| r.1), best(|r| r.2));
    println!(
        "best of 2: nomoat {ours:.1} tok/s = {:.2}x candle-transformers f32, {:.2}x candle-transformers Q4_1",
        ours / f32_ref,
        ours / q41_ref
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "engine_vs_candle",
            "decode_tokens": tokens,
            "nomoat_fast_tokens_per_s": ours,
            "candle_f32_tokens_per_s": f32_ref,
            "candle_q4_1_tokens_per_s": q41_ref,
            "ratio_vs_candle_f32": ours / f32_ref,
            "ratio_vs_candle_q4_1": ours / q41_ref,
        })
    );
    Ok(())
}
