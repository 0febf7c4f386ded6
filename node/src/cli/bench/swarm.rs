//! `nomoat bench swarm`: local swarms of server processes against the local
//! engine, rounds alternating in one run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::client::{plan, RemoteSession, Stepper};
use nomoat_node::engine::{ChatTokenizer, Head, LocalModel, ModelFile, WeightMode};
use nomoat_node::net::{self, NetConfig};
use nomoat_node::weights::model_file_id;

use super::{bench_server, discover_at_least, median, timed_greedy};

/// `nomoat bench swarm`.
#[derive(Debug, Args)]
pub(crate) struct BenchSwarmArgs {
    /// A catalog name, a .gguf file or a safetensors directory.
    #[arg(long)]
    model: String,
    /// Swarm sizes to measure, e.g. 1,2,3.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    nodes: Vec<usize>,
    /// Tokens to decode per measurement.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// fast, compact, exact or f32.
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
    /// Alternating rounds of local and swarm decoding per swarm size.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Compute threads of every participant: the local engine and each
    /// server get the same, as separate machines would get the same cores.
    /// On one small machine, more threads per process oversubscribe it.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// The dtype hidden states travel in: f32, f16, bf16 or q8.
    #[arg(long, default_value = "f32", value_parser = crate::parse_wire_dtype)]
    wire_dtype: nomoat_protocol::DType,
}

pub(crate) async fn bench_swarm(args: BenchSwarmArgs) -> Result<()> {
    use nomoat_node::process::ServeProcess;
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let tokenizer = ChatTokenizer::from_model(&file).ok();
    // A chat prompt, or fixed ids for a model without a tokenizer.
    let prompt = match &tokenizer {
        Some(t) => t.encode(&t.chat_prompt(&[nomoat_node::engine::ChatMessage::new(
            "user",
            "Tell me about the history of Paris.",
        )]))?,
        None => (1..17)
            .map(|i| i % file.config().vocab_size as u32)
            .collect(),
    };
    let n_blocks = file.config().num_blocks;
    let model_id = model_file_id(&path)?;
    let path_str = path.to_string_lossy().to_string();
    let weights = format!("{:?}", args.weights).to_lowercase();

    // The local engine, in this process, same prompt and tokens; measured
    // alternately with each swarm so that machine noise hits both alike.
    let local = Arc::new(LocalModel::load_whole(&file, args.weights)?);
    let limit = file.config().max_seq_len;
    let local_run = || {
        let local = local.clone();
        let prompt = prompt.clone();
        async move {
            let mut stepper = Stepper::local(local);
            timed_greedy(&mut stepper, &prompt, args.tokens, limit).await
        }
    };
    let (first_times, local_tokens) = local_run().await?;
    let mut all_local = first_times;
    let head = Arc::new(Head::load(&file, args.weights)?);
    let bin = std::env::current_exe()?;
    let mut rows = Vec::new();
    for &n in &args.nodes {
        anyhow::ensure!(
            n >= 1 && n <= n_blocks,
            "--nodes must be between 1 and {n_blocks}"
        );
        let splits = nomoat_scheduler::even_splits(n_blocks as u32, n as u32)?;
        let threads = args.threads.max(1).to_string();
        let mut procs: Vec<ServeProcess> = Vec::new();
        for (i, r) in splits.iter().enumerate().rev() {
            let boot = procs.first().map(|p| p.addr());
            let p = bench_server(&bin, &path_str, *r, &weights, &threads, boot.as_deref())?;
            eprintln!("started server {} of {n}: blocks {r}", i + 1);
            procs.insert(0, p);
        }
        let boot: Vec<Multiaddr> = vec![procs.last().context("a server")?.addr().parse()?];
        let net = net::start(NetConfig::default()).await?;
        let servers = discover_at_least(&net, &boot, &model_id, n).await?;
        let max_len = (prompt.len() + args.tokens + 2) as u32;
        let route = plan(&net, &model_id, n_blocks as u32, &servers, max_len)?;
        let hops = route.len();
        let (mut swarm_times, mut local_times, mut same) = (Vec::new(), Vec::new(), true);
        for _ in 0..args.rounds.max(1) {
            let (t, _) = local_run().await?;
            local_times.extend(t);
            let session = RemoteSession::open(
                &net,
                &model_id,
                route.clone(),
                max_len,
                Duration::from_secs(30),
            )
            .await?;
            let mut stepper =
                Stepper::swarm(head.clone(), session).with_wire_dtype(args.wire_dtype)?;
            let (t, tokens) = timed_greedy(&mut stepper, &prompt, args.tokens, limit).await?;
            stepper.close().await;
            swarm_times.extend(t);
            same &= tokens == local_tokens;
        }
        net.shutdown().await;
        drop(procs);
        let step = median(swarm_times);
        all_local.extend(&local_times);
        let local_step = median(local_times);
        let overhead_us = (step - local_step) / hops as f64 * 1e6;
        println!(
            "{n} node(s), {hops} hop(s): {:.1} tokens/s, local {:.1} tokens/s: {:.3}x local; per-hop overhead {:.0} us; tokens match local: {same}",
            1.0 / step,
            1.0 / local_step,
            local_step / step,
            overhead_us
        );
        rows.push(serde_json::json!({
            "nodes": n,
            "hops": hops,
            "local_decode_tokens_per_s": 1.0 / local_step,
            "decode_tokens_per_s": 1.0 / step,
            "ratio_vs_local": local_step / step,
            "per_hop_overhead_us": overhead_us,
            "tokens_match_local": same,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "swarm",
            "model": args.model,
            "weights": weights,
            "decode_tokens": args.tokens,
            "threads_per_process": args.threads,
            "local_decode_tokens_per_s": 1.0 / median(all_local),
            "swarms": rows,
        })
    );
    Ok(())
}
