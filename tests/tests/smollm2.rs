//! The real SmolLM2-135M-Instruct (fetched from the catalog on first use):
//! the engine against candle-transformers' quantized llama as an independent
//! reference, the chat answer, spans, and the tokenizer built from GGUF.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use nomoat_node::catalog;
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, LocalModel, ModelFile, SamplingParams, WeightMode,
};

fn smollm2() -> Result<PathBuf> {
    Ok(catalog::resolve("smollm2-135m", false)?)
}

fn tokenizer(file: &ModelFile) -> Result<ChatTokenizer> {
    Ok(ChatTokenizer::from_gguf(
        file.gguf_metadata().expect("a GGUF file"),
    )?)
}

fn chat_ids(tok: &ChatTokenizer, question: &str) -> Result<Vec<u32>> {
    Ok(tok.encode(&tok.chat_prompt(&[ChatMessage::new("user", question)]))?)
}

fn answer(model: &LocalModel, tok: &ChatTokenizer, question: &str) -> Result<String> {
    let opts = GenerateOptions {
        max_tokens: 48,
        sampling: SamplingParams::greedy(),
        stop_ids: tok.stop_ids().to_vec(),
    };
    let (ids, stats) = model.generate(&chat_ids(tok, question)?, &opts, |_| Ok(true))?;
    assert!(stats.stopped, "the answer should end with <|im_end|>");
    Ok(tok.decode(&ids, true)?)
}

/// Writes an F32 copy of a GGUF file: every tensor dequantized, metadata kept.
fn write_f32_copy(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    let mut reader = std::fs::File::open(src)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut tensors = Vec::new();
    for name in content.tensor_infos.keys() {
        let q = content.tensor(&mut reader, name, &Device::Cpu)?;
        let t = q.dequantize(&Device::Cpu)?;
        tensors.push((name.clone(), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    let md: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut std::fs::File::create(dst)?, &md, &ts)?;
    Ok(())
}

fn reference_logits(path: &std::path::Path, ids: &[u32]) -> Result<Vec<f32>> {
    let mut reader = std::fs::File::open(path)?;
    let content = gguf_file::Content::read(&mut reader)?;
    let mut reference = ModelWeights::from_gguf(content, &mut reader, &Device::Cpu)?;
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    Ok(reference.forward(&input, 0)?.squeeze(0)?.to_vec1::<f32>()?)
}

fn argmax(v: &[f32]) -> Option<usize> {
    v.iter()
        .enumerate()
        .max_by(|x, y| x.1.total_cmp(y.1))
        .map(|(i, _)| i)
}

/// `max |a - b| / max |b|`.
fn relative_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

#[test]
fn logits_match_candle_transformers_quantized_llama() -> Result<()> {
    let path = smollm2()?;
    let file = ModelFile::open(&path)?;
    let tok = tokenizer(&file)?;
    let prompts = [
        chat_ids(&tok, "What is the capital of France?")?,
        tok.encode("The quick brown fox jumps over the lazy dog, 1234 times.")?,
        chat_ids(&tok, "Write a haiku about the sea and explain each line.")?,
    ];

    // Same weights in f32 on both sides: independent code computing the
    // same function, so the logits agree to float rounding.
    let dir = tempfile::tempdir()?;
    let f32_path = dir.path().join("smollm2-f32.gguf");
    write_f32_copy(&path, &f32_path)?;
    let f32_file = ModelFile::open(&f32_path)?;
    let ours = LocalModel::load(&f32_file, &[10, 20, 30], WeightMode::Exact)?;
    for ids in &prompts {
        let expected = reference_logits(&f32_path, ids)?;
        let got = ours.forward_last(&mut ours.new_session(), ids)?;
        assert_eq!(got.len(), expected.len());
        let rel = relative_diff(&got, &expected);
        assert!(rel <= 1e-3, "{} tokens: relative diff {rel}", ids.len());
    }
    drop(ours);

    // The shipped Q4_1 weights: both sides quantize activations to 8 bits
    // inside the matmuls, which turns float-order differences into rounding
    // flips, so compare what the user sees: the same top token.
    let ours = LocalModel::load(&file, &[10, 20, 30], WeightMode::Exact)?;
    for ids in &prompts {
        let expected = reference_logits(&path, ids)?;
        let got = ours.forward_last(&mut ours.new_session(), ids)?;
        assert_eq!(argmax(&got), argmax(&expected), "{} tokens", ids.len());
        let rel = relative_diff(&got, &expected);
        assert!(rel <= 0.1, "{} tokens: relative diff {rel}", ids.len());
    }
    Ok(())
}

#[test]
fn answers_the_capital_of_france_whole_and_split() -> Result<()> {
    let file = ModelFile::open(smollm2()?)?;
    let tok = tokenizer(&file)?;
    let whole = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let text = answer(&whole, &tok, "What is the capital of France?")?;
    assert!(text.contains("Paris"), "answer: {text:?}");
    // Three spans as three servers would hold them: the same text.
    let split = LocalModel::load(&file, &[10, 20, 30], WeightMode::Fast)?;
    assert_eq!(
        answer(&split, &tok, "What is the capital of France?")?,
        text
    );
    // The file's own Q4_1 blocks give the same answer.
    let exact = LocalModel::load(&file, &[15, 30], WeightMode::Exact)?;
    assert!(answer(&exact, &tok, "What is the capital of France?")?.contains("Paris"));
    Ok(())
}

#[test]
fn fast_weights_track_the_file_weights() -> Result<()> {
    // Q4_1 repacked to Q8_0 is nearly lossless: the logits stay close to the
    // exact ones and the top token is the same.
    let file = ModelFile::open(smollm2()?)?;
    let tok = tokenizer(&file)?;
    let ids = chat_ids(&tok, "Name three colours of the rainbow.")?;
    let fast = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let exact = LocalModel::load_whole(&file, WeightMode::Exact)?;
    let a = fast.forward_last(&mut fast.new_session(), &ids)?;
    let b = exact.forward_last(&mut exact.new_session(), &ids)?;
    assert_eq!(argmax(&a), argmax(&b));
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 0.05 * scale, "fast vs exact: {diff} of {scale}");
    // And fast mode reads fewer bytes per token than f32 would.
    let f32_bytes = 4 * 134_515_008;
    assert!(fast.weight_bytes_per_token() < f32_bytes / 3);
    Ok(())
}

#[test]
fn tokenizer_from_gguf_matches_known_ids() -> Result<()> {
    let file = ModelFile::open(smollm2()?)?;
    let tok = tokenizer(&file)?;
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.encode("Hello world")?, vec![19556, 905]);
    // Digits are split one by one (the `smollm` pre-tokenizer).
    assert_eq!(tok.encode("12345")?, vec![33, 34, 35, 36, 37]);
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_id("<|im_end|>"), Some(2));
    assert!(tok.stop_ids().contains(&2));
    // Special tokens in text become their ids; the ChatML frame is exact.
    let ids = chat_ids(&tok, "Hi")?;
    assert_eq!(ids[..3], [1, 4093, 198]);
    assert_eq!(ids[ids.len() - 4..], [1, 520, 9531, 198]);
    for text in [
        "The capital of France is Paris.",
        "  leading spaces, tabs\tand\nnewlines",
        "naïve café, 東京, emoji 🦀, math ∑x²",
        "code: fn main() { println!(\"{}\", 42); }",
        "",
    ] {
        let ids = tok.encode(text)?;
        assert_eq!(tok.decode(&ids, false)?, text, "round trip of {text:?}");
    }
    Ok(())
}
