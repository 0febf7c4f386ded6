//! `nomoat bench adapter`: what a LoRA adapter costs. Decode speed of the
//! whole model with a random adapter of `--rank` on every projection
//! against the same model without it, alternating in one run; then the
//! time a running server takes to load an adapter it has never seen
//! (fetching its chunks from the client over loopback QUIC, checking them,
//! building its parts) when a session names it, against opening a session
//! without one on the same server.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use nomoat_node::client::RemoteSession;
use nomoat_node::engine::{LocalModel, LocalSession, ModelFile, Sampler, SamplingParams};
use nomoat_node::net::{self, NetConfig};
use nomoat_node::node::{BlockChoice, Node, NodeConfig};
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::adapter::random_adapter;
use nomoat_node::weights::serve::{serve_weights, Fault};
use nomoat_node::weights::store_adapter;
use nomoat_protocol::BlockRange;
use tokio_util::sync::CancellationToken;

use super::median;
use crate::ModelArgs;

#[derive(Debug, Args)]
pub(crate) struct BenchAdapterArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rank of the adapter the decode speed is measured with.
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// Tokens decoded per measurement.
    #[arg(long, default_value_t = 48)]
    tokens: usize,
    /// Measurements of each (alternating; the medians are compared).
    #[arg(long, default_value_t = 5)]
    pairs: usize,
    /// Rank of the adapters loaded into the running server.
    #[arg(long, default_value_t = 8)]
    load_rank: usize,
    /// Adapters loaded (each new to the server).
    #[arg(long, default_value_t = 3)]
    loads: usize,
}

fn decode(model: &LocalModel, mut session: LocalSession, prompt: &[u32], n: usize) -> Result<f64> {
    let mut sampler = Sampler::new(SamplingParams::greedy());
    let mut logits = model.forward_last(&mut session, prompt)?;
    let t = Instant::now();
    for _ in 0..n {
        let next = sampler.sample(&logits, &[]);
        logits = model.forward_last(&mut session, &[next])?;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

pub(crate) fn bench_adapter(args: BenchAdapterArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model.model, true)?;
    let file = ModelFile::open(&path)?;
    let cfg = file.config().clone();
    let base_id = nomoat_node::weights::model_file_id(&path)?;
    let model = LocalModel::load_whole(&file, args.model.weights)?;
    let w = random_adapter(&cfg, &base_id, args.rank.max(1), 1)?;
    let parts = model.adapter_parts(&w)?;
    println!(
        "model: {} ({} blocks); adapter: rank {}, {} targets, {:.1} MB",
        path.display(),
        cfg.num_blocks,
        args.rank,
        w.meta.targets.len(),
        w.bytes() as f64 / 1e6
    );
    let prompt: Vec<u32> = (0..16)
        .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
        .collect();
    let (mut plain, mut adapted) = (Vec::new(), Vec::new());
    for pair in 0..args.pairs.max(1) {
        plain.push(decode(&model, model.new_session(), &prompt, args.tokens)?);
        adapted.push(decode(
            &model,
            model.new_session_with(parts.clone()),
            &prompt,
            args.tokens,
        )?);
        eprintln!(
            "pair {}/{}: without {:.1} tokens/s, with {:.1} tokens/s",
            pair + 1,
            args.pairs.max(1),
            plain[pair],
            adapted[pair]
        );
    }
    let (p, a) = (median(plain), median(adapted));
    println!(
        "decode: without an adapter {p:.1} tokens/s, with rank {} {a:.1} tokens/s: {:.2}x",
        args.rank,
        a / p.max(1e-9)
    );
    drop(model);

    let rt = crate::runtime()?;
    let root = std::env::temp_dir().join(format!("nomoat-bench-adapter-{}", std::process::id()));
    let loads = rt.block_on(load_times(
        &root,
        &path,
        &cfg,
        &base_id,
        args.load_rank,
        args.loads,
    ));
    let _ = std::fs::remove_dir_all(&root);
    let loads = loads?;
    let mut json = serde_json::json!({
        "bench": "adapter",
        "model": args.model.model,
        "rank": args.rank,
        "decode_tokens_per_s": p,
        "decode_tokens_per_s_with_adapter": a,
        "ratio": a / p.max(1e-9),
    });
    let secs: Vec<f64> = loads.iter().map(|l| l.1).collect();
    for (mb, s, open) in &loads {
        println!("load into a running server: {mb:.1} MB adapter in {s:.3} s (a plain open took {open:.3} s)");
    }
    json["load_mb"] = loads.first().map_or(0.0, |l| l.0).into();
    json["load_s"] = secs.clone().into();
    json["load_s_median"] = median(secs).into();
    println!("{json}");
    Ok(())
}

/// For each of `n` fresh adapters: (MB, seconds a session naming it took
/// to open beyond a plain open, the plain open's seconds).
async fn load_times(
    root: &std::path::Path,
    path: &std::path::Path,
    cfg: &nomoat_node::engine::ModelConfig,
    base_id: &str,
    rank: usize,
    n: usize,
) -> Result<Vec<(f64, f64, f64)>> {
    let blocks = BlockRange::new(0, cfg.num_blocks as u32)?;
    let loopback = || NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse().expect("a multiaddr")],
        ..NetConfig::default()
    };
    let server = Node::start(NodeConfig {
        store: Some(root.join("server")),
        net: loopback(),
        ..NodeConfig::new(path.to_string_lossy(), BlockChoice::Range(blocks))
    })
    .await?;
    let client = net::start(loopback()).await?;
    let store = ChunkStore::open(&root.join("client"))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_weights(
        client.clone(),
        store.clone(),
        Fault::None,
        shutdown.clone(),
    ));
    client
        .dial(server.addr().context("server address")?.clone())
        .await?;
    let route = vec![nomoat_protocol::Hop {
        peer_id: server.net.peer_id().to_bytes(),
        blocks,
    }];
    let timeout = Duration::from_secs(60);
    let mut out = Vec::new();
    for i in 0..n.max(1) {
        let w = random_adapter(cfg, base_id, rank.max(1), 100 + i as u64)?;
        let mb = w.bytes() as f64 / 1e6;
        let id = store_adapter(&store, w)?.id;
        let t = Instant::now();
        drop(RemoteSession::open(&client, &server.model_id, route.clone(), 64, timeout).await?);
        let plain = t.elapsed().as_secs_f64();
        let t = Instant::now();
        drop(
            RemoteSession::open_with(
                &client,
                &server.model_id,
                route.clone(),
                64,
                timeout,
                Some(id),
            )
            .await?,
        );
        let with = t.elapsed().as_secs_f64();
        out.push((mb, (with - plain).max(0.0), plain));
    }
    shutdown.cancel();
    server.shutdown().await;
    client.shutdown().await;
    Ok(out)
}
