//! Engine equivalence on tiny random-weight models: any split into spans
//! computes what the whole model computes; the KV cache equals recomputation.

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use nomoat_node::engine::{
    GenerateOptions, LocalModel, ModelFile, SamplingParams, Span, WeightMode,
};
use nomoat_scheduler::all_splits;
use nomoat_tests::{cuts_of, max_abs_diff, TinyArch, TinyModel, TinySpec};

const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const DECODE: [u32; 5] = [9, 31, 77, 2, 50];

/// Every file format a tiny model is written in.
#[derive(Debug, Clone, Copy)]
enum Format {
    Gguf(GgmlDType),
    Safetensors,
}

fn write(dir: &std::path::Path, arch: TinyArch, format: Format) -> Result<ModelFile> {
    let model = TinyModel::generate(TinySpec::new(arch))?;
    let path = match format {
        Format::Gguf(dtype) => {
            model.write_gguf(&dir.join(format!("{arch:?}-{dtype:?}.gguf")), dtype)?
        }
        Format::Safetensors => model.write_safetensors(&dir.join(format!("{arch:?}-st")))?,
    };
    Ok(ModelFile::open(path)?)
}

/// Logits of the prompt (every position) then of each decode step.
fn trace(model: &LocalModel) -> Result<Vec<Tensor>> {
    let mut session = model.new_session();
    let mut out = vec![model.forward_logits(&mut session, &PROMPT)?];
    for &t in &DECODE {
        out.push(model.forward_logits(&mut session, &[t])?);
    }
    Ok(out)
}

fn every_split(num_blocks: u32) -> Vec<Vec<usize>> {
    (1..=4)
        .flat_map(|parts| all_splits(num_blocks, parts))
        .map(|s| cuts_of(&s))
        .collect()
}

#[test]
fn every_split_matches_the_whole_model_f32() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        for format in [Format::Gguf(GgmlDType::F32), Format::Safetensors] {
            let file = write(dir.path(), arch, format)?;
            let whole = trace(&LocalModel::load_whole(&file, WeightMode::Fast)?)?;
            let splits = every_split(file.config().num_blocks as u32);
            assert_eq!(
                splits.len(),
                1 + 5 + 10 + 10,
                "6 blocks cut into 1..=4 spans"
            );
            for cuts in splits {
                let split = trace(&LocalModel::load(&file, &cuts, WeightMode::Fast)?)?;
                for (step, (a, b)) in whole.iter().zip(&split).enumerate() {
                    let d = max_abs_diff(a, b)?;
                    assert!(
                        d <= 1e-5,
                        "{arch:?} {format:?} cuts {cuts:?} step {step}: max abs diff {d}"
                    );
                }
            }
        }
    }
    Ok(())
}

#[test]
fn every_split_generates_the_same_tokens_quantized() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let opts = GenerateOptions {
        max_tokens: 32,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        // Q4_1 is repacked to Q8_0 in fast mode and kept in exact mode.
        for (dtype, mode) in [
            (GgmlDType::Q8_0, WeightMode::Fast),
            (GgmlDType::Q4_1, WeightMode::Fast),
            (GgmlDType::Q4_1, WeightMode::Exact),
            (GgmlDType::Q4_0, WeightMode::Fast),
        ] {
            let file = write(dir.path(), arch, Format::Gguf(dtype))?;
            let (whole, stats) =
                LocalModel::load_whole(&file, mode)?.generate(&PROMPT, &opts, |_| Ok(true))?;
            assert_eq!(whole.len(), 32);
            assert_eq!(stats.generated_tokens, 32);
            let distinct: std::collections::HashSet<_> = whole.iter().collect();
            assert!(distinct.len() > 3, "degenerate tiny model output {whole:?}");
            for cuts in every_split(file.config().num_blocks as u32) {
                let model = LocalModel::load(&file, &cuts, mode)?;
                let (tokens, _) = model.generate(&PROMPT, &opts, |_| Ok(true))?;
                assert_eq!(tokens, whole, "{arch:?} {dtype:?} {mode:?} cuts {cuts:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn gguf_and_safetensors_of_the_same_weights_agree() -> Result<()> {
    // The GGUF llama file has permuted Q/K rows and uses interleaved RoPE; the
    // safetensors file has Hugging Face rows and half-split RoPE. Same model.
    let dir = tempfile::tempdir()?;
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let g = trace(&LocalModel::load_whole(
            &write(dir.path(), arch, Format::Gguf(GgmlDType::F32))?,
            WeightMode::Fast,
        )?)?;
        let s = trace(&LocalModel::load_whole(
            &write(dir.path(), arch, Format::Safetensors)?,
            WeightMode::Fast,
        )?)?;
        for (a, b) in g.iter().zip(&s) {
            let d = max_abs_diff(a, b)?;
            assert!(d <= 1e-4, "{arch:?}: gguf vs safetensors differ by {d}");
        }
    }
    Ok(())
}

#[test]
fn incremental_decode_equals_full_recompute() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let file = write(dir.path(), arch, Format::Gguf(GgmlDType::F32))?;
        let model = LocalModel::load_whole(&file, WeightMode::Fast)?;
        let all: Vec<u32> = PROMPT.iter().chain(&DECODE).copied().collect();
        let full = model.forward_logits(&mut model.new_session(), &all)?;
        // Prompt in one prefill, then one token at a time.
        let mut session = model.new_session();
        let mut rows = vec![model.forward_logits(&mut session, &PROMPT)?];
        for &t in &DECODE {
            rows.push(model.forward_logits(&mut session, &[t])?);
        }
        let incremental = Tensor::cat(&rows, 0)?;
        let d = max_abs_diff(&full, &incremental)?;
        assert!(d <= 1e-4, "{arch:?}: incremental vs full differ by {d}");
        // Chunked prefill (3 + 4 + 5 tokens) too.
        let mut session = model.new_session();
        let chunks = [&all[..3], &all[3..7], &all[7..]];
        let rows = chunks
            .iter()
            .map(|c| model.forward_logits(&mut session, c))
            .collect::<Result<Vec<_>, _>>()?;
        let d = max_abs_diff(&full, &Tensor::cat(&rows, 0)?)?;
        assert!(d <= 1e-4, "{arch:?}: chunked prefill differs by {d}");
    }
    Ok(())
}

#[test]
fn rollback_then_decode_equals_a_fresh_run() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), TinyArch::Llama, Format::Gguf(GgmlDType::F32))?;
    let model = LocalModel::load(&file, &[2, 6], WeightMode::Fast)?;
    let mut session = model.new_session();
    model.forward_logits(&mut session, &PROMPT)?;
    for &t in &DECODE {
        model.forward_logits(&mut session, &[t])?;
    }
    assert_eq!(session.len(), PROMPT.len() + DECODE.len());
    // Rewind to just after the prompt's 4th token and take another path.
    session.rollback(4)?;
    assert_eq!(session.len(), 4);
    let other = [70u32, 71, 72];
    let after = model.forward_logits(&mut session, &other)?;
    let mut fresh = model.new_session();
    let fresh_tokens: Vec<u32> = PROMPT[..4].iter().chain(&other).copied().collect();
    let expected = model
        .forward_logits(&mut fresh, &fresh_tokens)?
        .narrow(0, 4, 3)?;
    let d = max_abs_diff(&after, &expected)?;
    assert!(d <= 1e-4, "rollback differs from a fresh run by {d}");
    // A rollback past the end is an error, not a silent no-op.
    assert!(session.rollback(100).is_err());
    Ok(())
}

#[test]
fn sessions_share_weights_and_run_concurrently() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), TinyArch::Qwen2, Format::Gguf(GgmlDType::Q8_0))?;
    let model = LocalModel::load(&file, &[3, 6], WeightMode::Fast)?;
    let opts = GenerateOptions {
        max_tokens: 16,
        sampling: SamplingParams::greedy(),
        stop_ids: vec![],
    };
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![i + 1, 2 * i + 3, 40 + i]).collect();
    let sequential: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.generate(p, &opts, |_| Ok(true)).map(|r| r.0))
        .collect::<Result<_, _>>()?;
    let concurrent: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .map(|p| s.spawn(|| model.generate(p, &opts, |_| Ok(true)).map(|r| r.0)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("generation thread panicked"))
            .collect::<Result<_, _>>()
    })?;
    assert_eq!(sequential, concurrent);
    // Interleaved sessions on one thread do not disturb each other.
    let mut a = model.new_session();
    let mut b = model.new_session();
    let la = model.forward_logits(&mut a, &prompts[0])?;
    let lb = model.forward_logits(&mut b, &prompts[1])?;
    let la2 = model.forward_logits(&mut model.new_session(), &prompts[0])?;
    let lb2 = model.forward_logits(&mut model.new_session(), &prompts[1])?;
    assert_eq!(max_abs_diff(&la, &la2)?, 0.0);
    assert_eq!(max_abs_diff(&lb, &lb2)?, 0.0);
    Ok(())
}

#[test]
fn a_span_loads_only_its_blocks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = write(dir.path(), TinyArch::Llama, Format::Gguf(GgmlDType::Q8_0))?;
    let whole = Span::load(&file, 0, 6, WeightMode::Fast)?.weight_bytes();
    for (a, b) in [(0, 2), (2, 5), (5, 6)] {
        let part = Span::load(&file, a, b, WeightMode::Fast)?.weight_bytes();
        assert_eq!(part * 6, whole * (b - a), "span {a}..{b}");
    }
    Ok(())
}

/// Hidden states of `t` positions, different for every `seed`.
fn hidden(hidden: usize, t: usize, seed: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * hidden)
        .map(|i| ((((i + 31 * seed) * 7919) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(
        v,
        (1, t, hidden),
        &candle_core::Device::Cpu,
    )?)
}

/// Several sessions' steps stacked into one pass give each session
/// exactly, bit for bit, what its steps give run alone, on the quantized
/// formats (float weights: to f32 rounding): prompts of different
/// lengths, then decode steps, then a pass mixing a decode step with a
/// short prompt.
#[test]
fn a_batched_pass_equals_each_step_alone_bit_for_bit() -> Result<()> {
    use nomoat_node::engine::BatchStep;
    let dir = tempfile::tempdir()?;
    for dtype in [
        GgmlDType::F32,
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
    ] {
        let file = write(dir.path(), TinyArch::Llama, Format::Gguf(dtype))?;
        let h = file.config().hidden_size;
        let span = Span::load(&file, 1, 5, WeightMode::Fast)?;
        // Each session's steps: rows per pass (0: no step in that pass).
        let passes: [[usize; 3]; 4] = [[7, 3, 12], [1, 1, 1], [1, 5, 0], [1, 1, 1]];
        let mut alone: Vec<_> = (0..3).map(|_| span.new_cache()).collect();
        let mut batched: Vec<_> = (0..3).map(|_| span.new_cache()).collect();
        for (p, rows) in passes.iter().enumerate() {
            let xs: Vec<(usize, Tensor)> = rows
                .iter()
                .enumerate()
                .filter(|(_, &t)| t > 0)
                .map(|(s, &t)| Ok((s, hidden(h, t, 10 * p + s)?)))
                .collect::<Result<_>>()?;
            let want: Vec<Tensor> = xs
                .iter()
                .map(|(s, x)| {
                    let pos = alone[*s].len();
                    span.forward(x, pos, &mut alone[*s])
                })
                .collect::<Result<_, _>>()?;
            let mut steps: Vec<BatchStep<'_>> = batched
                .iter_mut()
                .enumerate()
                .filter(|(s, _)| rows[*s] > 0)
                .zip(&xs)
                .map(|((_, cache), (_, x))| BatchStep {
                    x,
                    pos: cache.len(),
                    cache,
                })
                .collect();
            let got = span.forward_batch(&mut steps, None)?;
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                let (g, w) = (
                    g.flatten_all()?.to_vec1::<f32>()?,
                    w.flatten_all()?.to_vec1::<f32>()?,
                );
                if dtype == GgmlDType::F32 {
                    // Float weights go through candle's gemm, whose order of
                    // summation depends on the number of rows: f32 rounding.
                    let scale = w.iter().fold(1f32, |m, v| m.max(v.abs()));
                    let diff = g
                        .iter()
                        .zip(&w)
                        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                    assert!(diff <= 1e-5 * scale, "F32 pass {p}: {diff} of {scale}");
                } else {
                    assert!(
                        g == w,
                        "{dtype:?} pass {p}: batched output differs from the step alone"
                    );
                }
            }
        }
        for (a, b) in alone.iter().zip(&batched) {
            assert_eq!(a.len(), b.len());
        }
        // Steps of caches on different blocks cannot share a pass.
        let x = hidden(h, 1, 99)?;
        let mut c1 = span.new_cache();
        let mut c2 = span.new_cache_range(2, 5, 64)?;
        let mut steps = vec![
            BatchStep {
                x: &x,
                pos: 0,
                cache: &mut c1,
            },
            BatchStep {
                x: &x,
                pos: 0,
                cache: &mut c2,
            },
        ];
        assert!(span.forward_batch(&mut steps, None).is_err());
    }
    Ok(())
}
