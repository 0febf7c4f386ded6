//! The `nomoat` command.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use nomoat_node::catalog;
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, LocalModel, ModelFile, SamplingParams, TextStream,
    WeightMode, DEFAULT_MAX_TOKENS, DEFAULT_SEED, DEFAULT_TOP_P,
};

/// nomoat: pool ordinary computers into one inference engine for open models.
#[derive(Debug, Parser)]
#[command(name = "nomoat", version, about, long_about = None)]
struct Cli {
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
    /// List the models nomoat can fetch by name.
    Models,
    /// Fetch a catalog model into the cache and print its path.
    Fetch {
        /// Catalog name.
        model: String,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed of the local engine.
    Engine(BenchEngineArgs),
}

#[derive(Debug, Args)]
struct ModelArgs {
    /// A catalog name (see `nomoat models`), a .gguf file, or a directory
    /// with config.json, tokenizer.json and *.safetensors.
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
    /// Random seed.
    #[arg(long, default_value_t = DEFAULT_SEED)]
    seed: u64,
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

fn generate(args: GenerateArgs) -> Result<()> {
    let (file, tokenizer, _) = open_model(&args.model)?;
    let model = LocalModel::load_whole(&file, args.model.weights)?;
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
            seed: args.seed,
            ..SamplingParams::default()
        },
        stop_ids: tokenizer.stop_ids().to_vec(),
    };
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    let (_, stats) = model.generate(&prompt, &opts, |id| {
        if let Some(piece) = stream.push(&tokenizer, id)? {
            // A closed stdout (e.g. `| head`) ends the generation quietly.
            if stdout
                .write_all(piece.as_bytes())
                .and_then(|_| stdout.flush())
                .is_err()
            {
                return Ok(false);
            }
        }
        Ok(true)
    })?;
    let _ = writeln!(stdout);
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; decode: {} tokens, {:.1} tokens/s",
        stats.prompt_tokens,
        stats.prompt_tokens_per_sec(),
        stats.generated_tokens,
        stats.decode_tokens_per_sec()
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench_engine(args: BenchEngineArgs) -> Result<()> {
    let (file, tokenizer, path) = open_model(&args.model)?;
    let t0 = Instant::now();
    let model = LocalModel::load_whole(&file, args.model.weights)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = file.config().clone();
    let bytes = model.weight_bytes_per_token();
    // A deterministic prompt of the requested length.
    let base = tokenizer.encode("The quick brown fox jumps over the lazy dog. ")?;
    let prompt: Vec<u32> = base
        .iter()
        .copied()
        .cycle()
        .take(args.prompt_tokens.max(1))
        .collect();
    let runs = args.runs.max(1);
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    for run in 0..runs {
        let mut session = model.new_session();
        let t = Instant::now();
        let mut logits = model.forward_last(&mut session, &prompt)?;
        prefill.push(prompt.len() as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            let next =
                nomoat_node::engine::Sampler::new(SamplingParams::greedy()).sample(&logits, &[]);
            logits = model.forward_last(&mut session, &[next])?;
        }
        let tps = args.decode_tokens as f64 / t.elapsed().as_secs_f64();
        decode.push(tps);
        eprintln!(
            "run {}/{runs}: prefill {:.1} tokens/s, decode {:.1} tokens/s",
            run + 1,
            prefill[run],
            tps
        );
    }
    let (p, d) = (median(prefill), median(decode));
    let gbps = bytes as f64 * d / 1e9;
    println!(
        "model: {} ({:?}, {} blocks, hidden {})",
        path.display(),
        cfg.arch,
        cfg.num_blocks,
        cfg.hidden_size
    );
    println!(
        "weights: {:?}, {:.1} MB read per token, load {:.2} s",
        args.model.weights,
        bytes as f64 / 1e6,
        load_s
    );
    println!("prefill: {p:.1} tokens/s ({} tokens)", prompt.len());
    println!(
        "decode:  {d:.1} tokens/s ({} tokens), {gbps:.2} GB/s of weights",
        args.decode_tokens
    );
    let json = serde_json::json!({
        "bench": "engine",
        "model": args.model.model,
        "weights": format!("{:?}", args.model.weights).to_lowercase(),
        "prompt_tokens": prompt.len(),
        "decode_tokens": args.decode_tokens,
        "prefill_tokens_per_s": p,
        "decode_tokens_per_s": d,
        "weight_bytes_per_token": bytes,
        "weight_gb_per_s": gbps,
        "load_s": load_s,
    });
    println!("{json}");
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
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Bench(BenchCommand::Engine(args)) => bench_engine(args),
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
