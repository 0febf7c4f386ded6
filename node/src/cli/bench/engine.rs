//! `nomoat bench engine`: prefill and decode speed of the span engine.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use nomoat_node::engine::{ChatTokenizer, LocalModel, ModelFile, SamplingParams, Span, WeightMode};
use nomoat_scheduler::BlockRange;

use super::{median, peak_rss};
use crate::ModelArgs;

#[derive(Debug, Args)]
pub(crate) struct BenchEngineArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Prompt length for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Repetitions (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measure one span alone (e.g. `0..10`) on synthetic hidden states,
    /// as a server holding those blocks would run it.
    #[arg(long)]
    blocks: Option<BlockRange>,
    /// Also measure the same model with every weight dequantized to f32
    /// (the baseline), in the same run.
    #[arg(long)]
    baseline: bool,
}

/// Prefill and decode tokens/s (medians over `runs`).
#[derive(Debug, Clone, Copy)]
struct Speed {
    prefill: f64,
    decode: f64,
}

fn measure(
    runs: usize,
    mut prefill: impl FnMut() -> Result<f64>,
    mut decode: impl FnMut() -> Result<f64>,
    label: &str,
) -> Result<Speed> {
    let (mut p, mut d) = (Vec::new(), Vec::new());
    for run in 0..runs.max(1) {
        p.push(prefill()?);
        d.push(decode()?);
        eprintln!(
            "{label} run {}/{}: prefill {:.1} tokens/s, decode {:.1} tokens/s",
            run + 1,
            runs.max(1),
            p[run],
            d[run]
        );
    }
    Ok(Speed {
        prefill: median(p),
        decode: median(d),
    })
}

fn bench_model(
    model: &LocalModel,
    prompt: &[u32],
    decode_tokens: usize,
    runs: usize,
    label: &str,
) -> Result<Speed> {
    let greedy = |logits: &[f32]| {
        nomoat_node::engine::Sampler::new(SamplingParams::greedy()).sample(logits, &[])
    };
    let cell = std::cell::RefCell::new(None);
    measure(
        runs,
        || {
            let mut session = model.new_session();
            let t = Instant::now();
            let logits = model.forward_last(&mut session, prompt)?;
            let tps = prompt.len() as f64 / t.elapsed().as_secs_f64();
            *cell.borrow_mut() = Some((session, logits));
            Ok(tps)
        },
        || {
            let (mut session, mut logits) =
                cell.borrow_mut().take().context("prefill ran first")?;
            let t = Instant::now();
            for _ in 0..decode_tokens {
                logits = model.forward_last(&mut session, &[greedy(&logits)])?;
            }
            Ok(decode_tokens as f64 / t.elapsed().as_secs_f64())
        },
        label,
    )
}

fn bench_span(
    span: &Span,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
) -> Result<Speed> {
    let hidden = span.config().hidden_size;
    let input = |t: usize, seed: usize| {
        let v: Vec<f32> = (0..t * hidden)
            .map(|i| (((i + seed) * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        candle_core::Tensor::from_vec(v, (1, t, hidden), &candle_core::Device::Cpu)
    };
    let cell = std::cell::RefCell::new(None);
    measure(
        runs,
        || {
            let mut cache = span.new_cache();
            let x = input(prompt_tokens, 0)?;
            let t = Instant::now();
            span.forward(&x, 0, &mut cache)?;
            let tps = prompt_tokens as f64 / t.elapsed().as_secs_f64();
            *cell.borrow_mut() = Some(cache);
            Ok(tps)
        },
        || {
            let mut cache = cell.borrow_mut().take().context("prefill ran first")?;
            let steps: Vec<_> = (0..decode_tokens)
                .map(|i| input(1, i + 1))
                .collect::<Result<_, _>>()?;
            let t = Instant::now();
            for x in &steps {
                let pos = cache.len();
                span.forward(x, pos, &mut cache)?;
            }
            Ok(decode_tokens as f64 / t.elapsed().as_secs_f64())
        },
        "span",
    )
}

pub(crate) fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model.model, true)?;
    let file = ModelFile::open(&path)?;
    let tokenizer = ChatTokenizer::from_model(&file)?;
    let cfg = file.config().clone();
    let mode = args.model.weights;
    let runs = args.runs.max(1);
    println!(
        "model: {} ({:?}, {} blocks, hidden {})",
        path.display(),
        cfg.arch,
        cfg.num_blocks,
        cfg.hidden_size
    );
    let mut json = serde_json::json!({
        "bench": "engine",
        "model": args.model.model,
        "weights": format!("{mode:?}").to_lowercase(),
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
    });
    if let Some(range) = args.blocks {
        let t0 = Instant::now();
        let span = Span::load(&file, range.start as usize, range.end as usize, mode)?;
        let load_s = t0.elapsed().as_secs_f64();
        let bytes = span.weight_bytes();
        let s = bench_span(&span, args.prompt_tokens, args.decode_tokens, runs)?;
        let gbps = bytes as f64 * s.decode / 1e9;
        println!(
            "span {range}: {:.1} MB of weights, load {load_s:.2} s",
            bytes as f64 / 1e6
        );
        println!(
            "prefill: {:.1} tokens/s; decode: {:.1} tokens/s, {gbps:.2} GB/s of weights",
            s.prefill, s.decode
        );
        json["blocks"] = range.to_string().into();
        json["prefill_tokens_per_s"] = s.prefill.into();
        json["decode_tokens_per_s"] = s.decode.into();
        json["weight_bytes_per_token"] = bytes.into();
        json["weight_gb_per_s"] = gbps.into();
        json["load_s"] = load_s.into();
    } else {
        // A deterministic prompt of the requested length.
        let base = tokenizer.encode("The quick brown fox jumps over the lazy dog. ")?;
        let prompt: Vec<u32> = base
            .iter()
            .copied()
            .cycle()
            .take(args.prompt_tokens.max(1))
            .collect();
        let t0 = Instant::now();
        let model = LocalModel::load_whole(&file, mode)?;
        let load_s = t0.elapsed().as_secs_f64();
        let bytes = model.weight_bytes_per_token();
        let s = bench_model(&model, &prompt, args.decode_tokens, runs, "engine")?;
        drop(model);
        let gbps = bytes as f64 * s.decode / 1e9;
        println!(
            "weights: {mode:?}, {:.1} MB read per token, load {load_s:.2} s",
            bytes as f64 / 1e6
        );
        println!(
            "prefill: {:.1} tokens/s ({} tokens)",
            s.prefill,
            prompt.len()
        );
        println!(
            "decode:  {:.1} tokens/s ({} tokens), {gbps:.2} GB/s of weights",
            s.decode, args.decode_tokens
        );
        json["prefill_tokens_per_s"] = s.prefill.into();
        json["decode_tokens_per_s"] = s.decode.into();
        json["weight_bytes_per_token"] = bytes.into();
        json["weight_gb_per_s"] = gbps.into();
        json["load_s"] = load_s.into();
        if args.baseline {
            let base_model = LocalModel::load_whole(&file, WeightMode::F32)?;
            let b = bench_model(
                &base_model,
                &prompt,
                args.decode_tokens,
                runs,
                "f32 baseline",
            )?;
            println!(
                "f32 baseline: prefill {:.1} tokens/s, decode {:.1} tokens/s; speedup {:.2}x decode",
                b.prefill,
                b.decode,
                s.decode / b.decode
            );
            json["f32_prefill_tokens_per_s"] = b.prefill.into();
            json["f32_decode_tokens_per_s"] = b.decode.into();
            json["decode_speedup_vs_f32"] = (s.decode / b.decode).into();
        }
    }
    if let Some(rss) = peak_rss() {
        println!("peak RSS: {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
        json["peak_rss_bytes"] = rss.into();
    }
    println!("{json}");
    Ok(())
}
