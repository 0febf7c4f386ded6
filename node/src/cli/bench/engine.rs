//! `nomoat bench engine`: prefill and decode speed of the span engine, and
//! (`--vs-llama-cpp`) llama.cpp's on the same file in the same run.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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
    /// Compute threads (default: every core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Also measure llama.cpp on the same GGUF file, threads, prompt and
    /// token counts, alternating run by run with nomoat, and print the
    /// ratios. Needs `llama-cpp-python` for `--python` (a benchmark
    /// dependency only: `pip install llama-cpp-python`, which builds
    /// llama.cpp from source and needs cmake).
    #[arg(long)]
    vs_llama_cpp: bool,
    /// The Python that has llama-cpp-python.
    #[arg(long, env = "NOMOAT_BENCH_PYTHON", default_value = "python3")]
    python: String,
}

/// llama.cpp's side of the comparison, `scripts/llama_cpp_bench.py`.
const LLAMA_CPP_SCRIPT: &str = include_str!("../../../../scripts/llama_cpp_bench.py");

/// Longest wait for one answer of the llama.cpp process (load or run).
const LLAMA_CPP_WAIT: Duration = Duration::from_secs(600);

/// One run of either engine.
#[derive(Debug, Clone)]
struct Run {
    prefill: f64,
    decode: f64,
    tokens: Vec<u32>,
}

/// A llama-cpp-python process holding the model, answering runs.
struct LlamaCpp {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<std::io::Result<String>>,
    version: String,
}

impl LlamaCpp {
    fn start(python: &str, model: &std::path::Path, threads: usize, n_ctx: usize) -> Result<Self> {
        let mut child = Command::new(python)
            .args(["-c", LLAMA_CPP_SCRIPT])
            .arg(model)
            .arg(threads.to_string())
            .arg(n_ctx.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {python} for llama.cpp (see --python)"))?;
        let stdin = child.stdin.take().context("llama.cpp stdin")?;
        let stdout = child.stdout.take().context("llama.cpp stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut me = Self {
            child,
            stdin,
            lines,
            version: String::new(),
        };
        let ready = me.answer()?;
        me.version = ready["version"].as_str().unwrap_or("?").to_string();
        Ok(me)
    }

    /// The next JSON line, or why there is none.
    fn answer(&mut self) -> Result<serde_json::Value> {
        let line = match self.lines.recv_timeout(LLAMA_CPP_WAIT) {
            Ok(line) => line.context("reading from llama.cpp")?,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                anyhow::bail!("llama.cpp gave no answer in {LLAMA_CPP_WAIT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                anyhow::bail!("the llama.cpp process ended ({status:?}); its errors are above")
            }
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("llama.cpp said {line:?}"))?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            anyhow::bail!("{e} (the Python is --python)");
        }
        Ok(v)
    }

    fn run(&mut self, prompt: &[u32], decode: usize) -> Result<Run> {
        let req = serde_json::json!({ "prompt": prompt, "decode": decode });
        writeln!(self.stdin, "{req}").context("writing to llama.cpp")?;
        self.stdin.flush()?;
        let v = self.answer()?;
        let tokens = v["tokens"]
            .as_array()
            .context("llama.cpp sent no tokens")?
            .iter()
            .filter_map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
            .collect();
        Ok(Run {
            prefill: v["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            decode: v["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
            tokens,
        })
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One prefill of `prompt` and `decode` greedy steps after it.
fn run_once(model: &LocalModel, prompt: &[u32], decode: usize) -> Result<Run> {
    let mut sampler = nomoat_node::engine::Sampler::new(SamplingParams::greedy());
    let mut session = model.new_session();
    let t = Instant::now();
    let mut logits = model.forward_last(&mut session, prompt)?;
    let prefill = prompt.len() as f64 / t.elapsed().as_secs_f64();
    let mut tokens = Vec::with_capacity(decode);
    let t = Instant::now();
    for _ in 0..decode {
        let tok = sampler.sample(&logits, &[]);
        tokens.push(tok);
        logits = model.forward_last(&mut session, &[tok])?;
    }
    let decode_s = t.elapsed().as_secs_f64();
    Ok(Run {
        prefill,
        decode: if decode > 0 {
            decode as f64 / decode_s
        } else {
            0.0
        },
        tokens,
    })
}

/// nomoat and llama.cpp alternating, `runs` pairs; prints each pair and
/// the medians and ratios, and returns them as JSON.
fn versus_llama_cpp(
    args: &BenchEngineArgs,
    path: &std::path::Path,
    model: &LocalModel,
    prompt: &[u32],
) -> Result<serde_json::Value> {
    anyhow::ensure!(
        path.extension().is_some_and(|e| e == "gguf"),
        "--vs-llama-cpp needs a GGUF file (llama.cpp reads no safetensors)"
    );
    let threads = args
        .threads
        .unwrap_or_else(candle_core::utils::get_num_threads);
    let n_ctx = prompt.len() + args.decode_tokens + 16;
    let mut llama = LlamaCpp::start(&args.python, path, threads, n_ctx)?;
    println!(
        "llama.cpp: llama-cpp-python {}, {threads} threads; alternating with nomoat, {} pairs",
        llama.version, args.runs
    );
    // One warm-up each, not counted (page cache, first-use allocations).
    run_once(model, prompt, 4)?;
    llama.run(prompt, 4)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..args.runs.max(1) {
        let a = run_once(model, prompt, args.decode_tokens)?;
        let b = llama.run(prompt, args.decode_tokens)?;
        println!(
            "pair {}: nomoat prefill {:.1} decode {:.1} tokens/s | llama.cpp prefill {:.1} decode {:.1} | ratio {:.2}x {:.2}x",
            i + 1,
            a.prefill,
            a.decode,
            b.prefill,
            b.decode,
            a.prefill / b.prefill,
            a.decode / b.decode
        );
        ours.push(a);
        theirs.push(b);
    }
    let med = |runs: &[Run], f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let (op, od) = (med(&ours, |r| r.prefill), med(&ours, |r| r.decode));
    let (tp, td) = (med(&theirs, |r| r.prefill), med(&theirs, |r| r.decode));
    // Greedy tokens in common from the start: equal weights and arithmetic
    // give the same text until a near-tie between two tokens.
    let same = ours[0]
        .tokens
        .iter()
        .zip(&theirs[0].tokens)
        .take_while(|(a, b)| a == b)
        .count();
    println!(
        "median: nomoat prefill {op:.1} decode {od:.1} tokens/s; llama.cpp prefill {tp:.1} decode {td:.1}"
    );
    println!(
        "ratio nomoat / llama.cpp: prefill {:.2}x, decode {:.2}x; greedy tokens equal for the first {same} of {}",
        op / tp,
        od / td,
        args.decode_tokens
    );
    Ok(serde_json::json!({
        "llama_cpp_version": llama.version,
        "threads": threads,
        "pairs": args.runs.max(1),
        "nomoat_prefill_tokens_per_s": op,
        "nomoat_decode_tokens_per_s": od,
        "llama_cpp_prefill_tokens_per_s": tp,
        "llama_cpp_decode_tokens_per_s": td,
        "prefill_ratio": op / tp,
        "decode_ratio": od / td,
        "greedy_tokens_equal": same,
    }))
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
        if args.vs_llama_cpp {
            let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!(
                "weights: {mode:?}, {:.1} MB read per token (the file is {:.1} MB), load {load_s:.2} s",
                bytes as f64 / 1e6,
                file_bytes as f64 / 1e6
            );
            json["weight_bytes_per_token"] = bytes.into();
            json["file_bytes"] = file_bytes.into();
            json["vs_llama_cpp"] = versus_llama_cpp(&args, &path, &model, &prompt)?;
            if let Some(rss) = peak_rss() {
                // Both engines' processes are separate: this is nomoat's alone.
                println!("nomoat peak RSS: {:.1} MiB", rss as f64 / (1024.0 * 1024.0));
                json["peak_rss_bytes"] = rss.into();
            }
            println!("{json}");
            return Ok(());
        }
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
