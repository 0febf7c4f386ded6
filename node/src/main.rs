//! The `nomoat` command.

mod cli_config;
mod cmd_failover;
mod cmd_gateway;
mod cmd_swarm;
mod cmd_weights;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nomoat_node::catalog;
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, LocalModel, ModelFile, SamplingParams, Span,
    TextStream, WeightMode, DEFAULT_MAX_TOKENS, DEFAULT_SEED, DEFAULT_TOP_P,
};
use nomoat_scheduler::BlockRange;

/// nomoat: pool ordinary computers into one inference engine for open models.
#[derive(Debug, Parser)]
#[command(name = "nomoat", version, about, long_about = None)]
struct Cli {
    /// A TOML file of defaults for the flags: top-level keys apply to every
    /// command with that flag, `[serve]`, `[gateway]`, `[bench.api]` ... to
    /// one command. Flags given on the command line and NOMOAT_* variables
    /// win over the file.
    #[arg(long, global = true, env = "NOMOAT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text with a model on this machine.
    Generate(GenerateArgs),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve a span of a model's blocks to the swarm.
    Serve(cmd_swarm::ServeArgs),
    /// Show which peers serve which blocks, their RTT, throughput and load.
    Status(cmd_swarm::StatusArgs),
    /// Serve the OpenAI-compatible API, the live dashboard and /metrics,
    /// running the blocks on a swarm (or the whole model here).
    Gateway(cmd_gateway::GatewayArgs),
    /// Start a local swarm of three servers and a gateway, answer a sample
    /// question, and keep serving until Ctrl-C.
    Demo(cmd_gateway::DemoArgs),
    /// List the models nomoat can fetch by name.
    Models,
    /// Fetch a catalog model into the cache and print its path.
    Fetch {
        /// Catalog name.
        model: String,
    },
    /// Import a model into the weight store and print its model id.
    Import(cmd_weights::ImportArgs),
    /// Re-hash every stored chunk of a model; corrupt chunks are deleted.
    Verify {
        /// The model id.
        model_id: String,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed of the local engine.
    Engine(BenchEngineArgs),
    /// Decode speed of local swarms of 1, 2, 3... server processes on
    /// loopback against the local engine, measured in the same run.
    Swarm(cmd_swarm::BenchSwarmArgs),
    /// Time to first token and tokens/s through the OpenAI API of a local
    /// swarm, for 1 and 4 concurrent clients, against the local engine in
    /// the same run.
    Api(cmd_gateway::BenchApiArgs),
    /// The time from a server's death to the next token: three servers and
    /// a spare on loopback, the middle one killed mid-session.
    Failover(cmd_failover::BenchFailoverArgs),
    /// Weight transfer rate over loopback from 1 and 2 providers against a
    /// raw QUIC stream, measured in the same run.
    Weights(cmd_weights::BenchWeightsArgs),
    /// Route-planning time on simulated swarms of 100, 1,000 and 10,000 servers.
    Scheduler {
        /// Blocks in the simulated model.
        #[arg(long, default_value_t = 80)]
        blocks: u32,
        /// Swarm sizes.
        #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
        servers: Vec<usize>,
        /// Plans per size (the median is reported).
        #[arg(long, default_value_t = 51)]
        runs: usize,
    },
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// A catalog name (see `nomoat models`), a .gguf file, a directory
    /// with config.json, tokenizer.json and *.safetensors, or (generate) a
    /// model id from `nomoat import`, fetched from --swarm peers if needed.
    #[arg(long, env = "NOMOAT_MODEL")]
    model: String,
    /// `fast` repacks quantized formats without a fast CPU kernel (Q4_1,
    /// Q5_x) into Q8_0 at load time; `exact` keeps the file's formats.
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
}

#[derive(Debug, Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (ChatML).
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the model's own, if any).
    #[arg(long)]
    system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = DEFAULT_MAX_TOKENS)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = DEFAULT_TOP_P)]
    top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Penalty for repeating recent tokens (1: none).
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Subtracted once from the logit of every token already generated
    /// (OpenAI's presence_penalty; 0: none).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated
    /// (OpenAI's frequency_penalty; 0: none).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Random seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
    /// Run the blocks on a swarm reached through this peer (repeatable; an
    /// address ending in /p2p/PEER_ID); the head runs here.
    #[arg(long)]
    swarm: Vec<libp2p::Multiaddr>,
    /// Seconds a swarm step may take before the failing hop is reported.
    #[arg(long, default_value_t = 30.0)]
    step_timeout: f64,
}

#[derive(Debug, Args)]
struct BenchEngineArgs {
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

fn open_model(args: &ModelArgs) -> Result<(ModelFile, ChatTokenizer, PathBuf)> {
    let path = catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let tokenizer = match (file.gguf_metadata(), file.directory()) {
        (Some(md), _) => ChatTokenizer::from_gguf(md)?,
        (None, Some(dir)) => ChatTokenizer::from_dir(dir)?,
        (None, None) => bail!("{} has no tokenizer", path.display()),
    };
    Ok((file, tokenizer, path))
}

/// The network runtime: one worker (measured faster than two for small
/// QUIC messages on loopback); compute runs on its own threads.
fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn generate(args: GenerateArgs) -> Result<()> {
    let (file, tokenizer, model_id) = match nomoat_node::weights::parse_model_id(&args.model.model)
    {
        Some(id) => {
            let file = runtime()?.block_on(cmd_weights::open_for_generate(id, &args.swarm))?;
            let tokenizer = ChatTokenizer::from_model(&file)?;
            (file, tokenizer, id.to_hex())
        }
        None => {
            let (file, tokenizer, path) = open_model(&args.model)?;
            let id = if args.swarm.is_empty() {
                String::new()
            } else {
                nomoat_node::swarm::model_file_id(&path)
                    .with_context(|| format!("hashing {}", path.display()))?
            };
            (file, tokenizer, id)
        }
    };
    let text = if args.chat {
        let mut messages = Vec::new();
        if let Some(sys) = &args.system {
            messages.push(ChatMessage::new("system", sys.clone()));
        }
        messages.push(ChatMessage::new("user", args.prompt.clone()));
        tokenizer.chat_prompt(&messages)
    } else {
        args.prompt.clone()
    };
    let prompt = tokenizer.encode(&text)?;
    let opts = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repeat_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_ids: tokenizer.stop_ids().to_vec(),
    };
    let stats = if args.swarm.is_empty() {
        generate_local(&file, &tokenizer, args.model.weights, &prompt, &opts)?
    } else {
        runtime()?.block_on(cmd_swarm::generate_swarm(
            args.swarm.clone(),
            &model_id,
            &file,
            &tokenizer,
            args.model.weights,
            prompt,
            opts,
            std::time::Duration::from_secs_f64(args.step_timeout.max(0.1)),
        ))?
    };
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; decode: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_sec(),
        stats.generated_tokens,
        stats.decode_tokens_per_sec()
    );
    Ok(())
}

fn generate_local(
    file: &ModelFile,
    tokenizer: &ChatTokenizer,
    weights: WeightMode,
    prompt: &[u32],
    opts: &GenerateOptions,
) -> Result<nomoat_node::engine::GenerationStats> {
    let model = LocalModel::load_whole(file, weights)?;
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = model.generate(prompt, opts, |id| {
        stream.write_to(tokenizer, id, &mut stdout)
    })?;
    let _ = writeln!(stdout);
    Ok(stats)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process, in bytes (Linux).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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

fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    let (file, tokenizer, path) = open_model(&args.model)?;
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

/// A deterministic simulated swarm: spans of 1..=16 blocks, throughputs,
/// RTTs and loads drawn from a fixed-seed generator.
fn simulated_swarm(blocks: u32, n: usize, seed: u64) -> Vec<nomoat_scheduler::Candidate> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=16u32.min(blocks));
            let start = rng.random_range(0..=blocks - len);
            nomoat_scheduler::Candidate {
                span: BlockRange {
                    start,
                    end: start + len,
                },
                blocks_per_s: rng.random_range(50.0..2000.0),
                rtt_s: rng.random_range(0.0005..0.2),
                load: rng.random_range(0.0..1.0),
                has_kv_room: rng.random_bool(0.9),
                backed_off: rng.random_bool(0.05),
            }
        })
        .collect()
}

fn bench_scheduler(blocks: u32, sizes: &[usize], runs: usize) -> Result<()> {
    anyhow::ensure!(blocks > 0, "--blocks must be positive");
    let mut rows = Vec::new();
    for &n in sizes {
        let swarm = simulated_swarm(blocks, n, n as u64);
        let mut times = Vec::new();
        let mut hops = 0;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            let route = nomoat_scheduler::plan_route(blocks, &swarm);
            times.push(t.elapsed().as_secs_f64());
            hops = route.map_or(0, |r| r.hops.len());
        }
        let ms = median(times) * 1e3;
        println!("{n:>6} servers, {blocks} blocks: route planned in {ms:.3} ms (median of {runs}), {hops} hops");
        rows.push(serde_json::json!({"servers": n, "plan_ms": ms, "hops": hops}));
    }
    println!(
        "{}",
        serde_json::json!({"bench": "scheduler", "blocks": blocks, "results": rows})
    );
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli_config::parse()?;
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(BenchCommand::Engine(args)) => bench_engine(args),
        Command::Bench(BenchCommand::Swarm(args)) => {
            // The local engine gets the servers' thread count (set before any
            // other thread exists).
            std::env::set_var("RAYON_NUM_THREADS", args.threads.max(1).to_string());
            runtime()?.block_on(cmd_swarm::bench_swarm(args))
        }
        Command::Bench(BenchCommand::Failover(args)) => {
            std::env::set_var("RAYON_NUM_THREADS", args.threads.max(1).to_string());
            runtime()?.block_on(cmd_failover::bench_failover(args))
        }
        Command::Bench(BenchCommand::Weights(args)) => {
            // The fetching node's runtime; each provider gets one of its own.
            runtime()?.block_on(cmd_weights::bench_weights(args))
        }
        Command::Bench(BenchCommand::Scheduler {
            blocks,
            servers,
            runs,
        }) => bench_scheduler(blocks, &servers, runs),
        Command::Serve(args) => {
            if let Some(n) = args.threads {
                // Read by candle's and rayon's thread pools when they start;
                // set before any other thread exists.
                std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
            }
            runtime()?.block_on(cmd_swarm::serve(args))
        }
        Command::Status(args) => runtime()?.block_on(cmd_swarm::status(args)),
        Command::Gateway(args) => runtime()?.block_on(cmd_gateway::run_gateway(args)),
        Command::Demo(args) => runtime()?.block_on(cmd_gateway::demo(args)),
        Command::Bench(BenchCommand::Api(args)) => {
            std::env::set_var("RAYON_NUM_THREADS", args.threads.max(1).to_string());
            runtime()?.block_on(cmd_gateway::bench_api(args))
        }
        Command::Models => {
            let home = catalog::home();
            for e in catalog::CATALOG {
                let state = if catalog::cached(e, &home).is_some() {
                    "cached"
                } else {
                    "not fetched"
                };
                println!(
                    "{:<14} {:>6.0} MB  {:<12} {}",
                    e.name,
                    e.size as f64 / 1e6,
                    state,
                    e.description
                );
            }
            Ok(())
        }
        Command::Import(args) => cmd_weights::import(args),
        Command::Verify { model_id } => cmd_weights::verify(&model_id),
        Command::Fetch { model } => {
            let entry = catalog::find(&model).with_context(|| {
                format!("`{model}` is not in the catalog; `nomoat models` lists it")
            })?;
            let path = catalog::fetch(entry, &catalog::home(), true)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
