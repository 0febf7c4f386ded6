//! The `nomoat` command: flags in, library calls out. The command files
//! live in `cli/` (and `cli/bench/`); nodes are assembled by the library.

mod cli;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nomoat_node::catalog;
use nomoat_node::engine::WeightMode;

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
    Generate(cli::generate::GenerateArgs),
    /// Measure performance.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Serve a span of a model's blocks to the swarm.
    Serve(Box<cli::serve::ServeArgs>),
    /// Relay for peers behind NAT (and be a peer to bootstrap from),
    /// serving no blocks.
    Relay(cli::serve::RelayArgs),
    /// Show which peers serve which blocks, their RTT, throughput and load.
    Status(cli::status::StatusArgs),
    /// Serve the OpenAI-compatible API, the live dashboard and /metrics,
    /// running the blocks on a swarm (or the whole model here).
    Gateway(cli::gateway::GatewayArgs),
    /// Start a local swarm of three servers and a gateway, answer a sample
    /// question, and keep serving until Ctrl-C.
    Demo(cli::demo::DemoArgs),
    /// List the models nomoat can fetch by name.
    Models,
    /// Fetch a catalog model into the cache and print its path.
    Fetch {
        /// Catalog name.
        model: String,
    },
    /// Import a model into the weight store and print its model id.
    Import(cli::weights::ImportArgs),
    /// Import a LoRA adapter (a PEFT directory or a GGUF LoRA file) of a
    /// base model into the weight store and print its adapter id.
    ImportAdapter(cli::weights::ImportAdapterArgs),
    /// Re-hash every stored chunk of a model; corrupt chunks are deleted.
    Verify {
        /// The model id.
        model_id: String,
    },
    /// Make a new private swarm's key file (mode 0600) and print its
    /// fingerprint; every member then runs with `--swarm-key FILE`.
    SwarmKey {
        /// Where to write it (an existing file is never overwritten).
        file: PathBuf,
    },
    /// Print the peer id of an identity file (made if missing), the id
    /// others name in `--allow-peer`.
    PeerId {
        /// The identity file (default: $NOMOAT_HOME/node.key, which
        /// `nomoat serve` uses).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Prefill and decode speed of the local engine.
    Engine(cli::bench::engine::BenchEngineArgs),
    /// Decode speed of local swarms of 1, 2, 3... server processes on
    /// loopback against the local engine, measured in the same run.
    Swarm(cli::bench::swarm::BenchSwarmArgs),
    /// Time to first token and tokens/s through the OpenAI API of a local
    /// swarm, for 1 and 4 concurrent clients, against the local engine in
    /// the same run.
    Api(cli::bench::api::BenchApiArgs),
    /// The time from a server's death to the next token: three servers and
    /// a spare on loopback, the middle one killed mid-session.
    Failover(cli::bench::failover::BenchFailoverArgs),
    /// Decode speed and time to first token of a swarm on separate hosts
    /// of the network test bed, for one-way delays of 0 to 50 ms and a
    /// lossy setting, with the fitted network legs per token (needs root).
    #[cfg(target_os = "linux")]
    Wan(cli::bench::wan::BenchWanArgs),
    /// Weight transfer rate over loopback from 1 and 2 providers against a
    /// raw QUIC stream, measured in the same run.
    Weights(cli::bench::weights::BenchWeightsArgs),
    /// One server at its session capacity asked for ten times as many,
    /// then flooded with fresh identities: busy answers, the open
    /// sessions' step times and the server's memory.
    Overload(cli::bench::overload::BenchOverloadArgs),
    /// Spot checks against lying servers: how often and how soon a liar
    /// is caught, whether the text ends right, false positives and cost on
    /// honest servers, and the routes a boasting server draws.
    Verify(cli::bench::verify::BenchVerifyArgs),
    /// Decode speed with a LoRA adapter against without, and the time a
    /// running server takes to load a new one.
    Adapter(cli::bench::adapter::BenchAdapterArgs),
    /// A server's executor with 1, 4, 8 sessions decoding at once
    /// (continuous batching), its sessions' step times while a long prompt
    /// is prefilled beside them, and its memory.
    Batch(cli::bench::batch::BenchBatchArgs),
    /// Route-planning time on simulated swarms of 100, 1,000 and 10,000 servers.
    Scheduler {
        /// BlockRange in the simulated model.
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
pub(crate) struct ModelArgs {
    /// A catalog name (see `nomoat models`), a .gguf file, a directory
    /// with config.json, tokenizer.json and *.safetensors, or (generate) a
    /// model id from `nomoat import`, fetched from --swarm peers if needed.
    #[arg(long, env = "NOMOAT_MODEL")]
    pub(crate) model: String,
    /// `fast` repacks quantized formats without a fast CPU kernel (Q5_1,
    /// Q5_K) into Q8_0 at load time; `compact` loads as `fast` and never
    /// holds a second, repacked copy of a weight (what `serve --max-memory`
    /// uses); `exact` keeps the file's formats.
    #[arg(long, default_value = "fast")]
    pub(crate) weights: WeightMode,
}

/// Reads `--wire-dtype`: `f32`, `f16`, `bf16` or `q8`.
pub(crate) fn parse_wire_dtype(s: &str) -> Result<nomoat_protocol::DType, String> {
    nomoat_protocol::DType::from_name(s).ok_or_else(|| {
        let names: Vec<_> = nomoat_protocol::DType::ALL
            .iter()
            .map(|d| d.name())
            .collect();
        format!("unknown wire dtype {s:?}: use one of {}", names.join(", "))
    })
}

/// Parses a size in bytes: a number with an optional unit, `B`, `KB`,
/// `MB`, `GB`, `TB` (powers of 1000) or `KiB`, `MiB`, `GiB`, `TiB` (powers of
/// 1024), e.g. `512MiB`, `1.5GB`, `4096`.
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size: give a number and a unit, e.g. 512MiB"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?}: use B, KB, MB, GB, KiB, MiB or GiB"
            ))
        }
    };
    let bytes = n * scale;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

/// The network runtime: one worker (measured faster than two for small
/// QUIC messages on loopback); compute runs on its own threads.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?)
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::config::parse()?;
    match cli.command {
        Command::Generate(args) => cli::generate::generate(args),
        Command::Bench(BenchCommand::Engine(args)) => {
            if let Some(n) = args.threads {
                std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
            }
            cli::bench::engine::bench_engine(args)
        }
        Command::Bench(BenchCommand::Swarm(args)) => {
            // The local engine gets the servers' thread count (set before any
            // other thread exists).
            std::env::set_var("RAYON_NUM_THREADS", args.threads.max(1).to_string());
            runtime()?.block_on(cli::bench::swarm::bench_swarm(args))
        }
        #[cfg(target_os = "linux")]
        Command::Bench(BenchCommand::Wan(args)) => cli::bench::wan::bench_wan(args),
        Command::Bench(BenchCommand::Failover(args)) => {
            std::env::set_var("RAYON_NUM_THREADS", args.threads.max(1).to_string());
            runtime()?.block_on(cli::bench::failover::bench_failover(args))
        }
        Command::Bench(BenchCommand::Adapter(args)) => cli::bench::adapter::bench_adapter(args),
        Command::Bench(BenchCommand::Verify(args)) => {
            runtime()?.block_on(cli::bench::verify::bench_verify(args))
        }
        Command::Bench(BenchCommand::Batch(args)) => {
            if let Some(n) = args.threads {
                std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
            }
            runtime()?.block_on(cli::bench::batch::bench_batch(args))
        }
        Command::Bench(BenchCommand::Overload(args)) => {
            runtime()?.block_on(cli::bench::overload::bench_overload(args))
        }
        Command::Bench(BenchCommand::Weights(args)) => {
            // The fetching node's runtime; each provider gets one of its own.
            runtime()?.block_on(cli::bench::weights::bench_weights(args))
        }
        Command::Bench(BenchCommand::Scheduler {
            blocks,
            servers,
            runs,
        }) => cli::bench::scheduler::bench_scheduler(blocks, &servers, runs),
        Command::Serve(args) => {
            if let Some(n) = args.threads {
                // Read by candle's and rayon's thread pools when they start;
                // set before any other thread exists.
                std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
            }
            runtime()?.block_on(cli::serve::serve(*args))
        }
        Command::Status(args) => runtime()?.block_on(cli::status::status(args)),
        Command::Relay(args) => runtime()?.block_on(cli::serve::relay(args)),
        Command::Gateway(args) => runtime()?.block_on(cli::gateway::run_gateway(args)),
        Command::Demo(args) => runtime()?.block_on(cli::demo::demo(args)),
        Command::Bench(BenchCommand::Api(args)) => {
            std::env::set_var("RAYON_NUM_THREADS", args.threads.max(1).to_string());
            runtime()?.block_on(cli::bench::api::bench_api(args))
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
        Command::Import(args) => cli::weights::import(args),
        Command::ImportAdapter(args) => cli::weights::import_adapter(args),
        Command::Verify { model_id } => cli::weights::verify(&model_id),
        Command::SwarmKey { file } => cli::access::swarm_key(&file),
        Command::PeerId { identity, json } => cli::access::peer_id(identity, json),
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("2 gib"), Ok(2 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("1e30TiB").is_err());
    }
}
