//! The swarm commands of the `nomoat` binary: serve, status, and the swarm
//! side of generate.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use libp2p::{Multiaddr, PeerId};
use nomoat_node::engine::{
    ChatTokenizer, GenerateOptions, GenerationStats, Head, ModelFile, Span, TextStream, WeightMode,
};
use nomoat_node::swarm::client::{discover, generate_remote, plan, RemoteSession};
use nomoat_node::swarm::executor::{
    Executor, ExecutorConfig, DEFAULT_IDLE_TIMEOUT, DEFAULT_KV_TOKENS, DEFAULT_MAX_SESSIONS,
};
use nomoat_node::swarm::model_file_id;
use nomoat_node::swarm::net::{self, NetConfig};
use nomoat_node::swarm::rebalance::{run_rebalancer, RebalanceConfig, SpanLoader};
use nomoat_node::swarm::server::{run_server, ServerConfig};
use nomoat_protocol::ServerInfo;
use nomoat_scheduler::{coverage_gaps, BlockRange};
use tokio_util::sync::CancellationToken;

/// Network flags shared by every swarm command.
#[derive(Debug, Args)]
pub(crate) struct NetArgs {
    /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/udp/4001/quic-v1.
    #[arg(long, default_value = "/ip4/127.0.0.1/udp/0/quic-v1")]
    listen: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    mdns: bool,
    /// Relay traffic for peers that cannot be reached directly.
    #[arg(long)]
    relay_server: bool,
    /// Listen through this relay too (a relay's address ending in /p2p/PEER_ID),
    /// for nodes behind NAT.
    #[arg(long)]
    relay: Vec<Multiaddr>,
    /// Seconds between announcements.
    #[arg(long, default_value_t = 2.0)]
    heartbeat: f64,
    /// An address others can reach this node at (repeatable), e.g. a public
    /// IP or a forwarded port.
    #[arg(long)]
    external: Vec<Multiaddr>,
}

impl NetArgs {
    fn config(&self, bootstrap: Vec<Multiaddr>) -> NetConfig {
        NetConfig {
            listen: self.listen.clone(),
            bootstrap,
            mdns: self.mdns,
            relay_server: self.relay_server,
            heartbeat: Duration::from_secs_f64(self.heartbeat.max(0.1)),
            external: self.external.clone(),
            ..NetConfig::default()
        }
    }
}

/// `nomoat serve`.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// A catalog name, a .gguf file, a safetensors directory, or a model id
    /// from `nomoat import`: the span's weights are then fetched from the
    /// --bootstrap peers (and the peers they know) unless already stored.
    #[arg(long, env = "NOMOAT_MODEL")]
    model: String,
    /// Blocks to serve, e.g. 0..10, or `auto`: after a short random delay,
    /// take the window of `--max-blocks` that most raises the swarm's weakest
    /// block (an empty swarm: from block 0).
    #[arg(long)]
    blocks: String,
    /// With `--blocks auto`, how many blocks this server holds.
    #[arg(long, default_value_t = 8)]
    max_blocks: u32,
    /// With `--blocks auto`, stay on the first window chosen instead of
    /// moving to where the swarm is weakest as servers come and go.
    #[arg(long)]
    no_rebalance: bool,
    /// Seconds between looks at the swarm for rebalancing (each wait is
    /// lengthened by up to half, at random).
    #[arg(long, default_value_t = 30.0)]
    rebalance_period: f64,
    /// Seconds after a move before the server may move again.
    #[arg(long, default_value_t = 300.0)]
    rebalance_cooldown: f64,
    /// Peers to join (repeatable), addresses ending in /p2p/PEER_ID.
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    #[command(flatten)]
    net: NetArgs,
    /// Most sessions at once.
    #[arg(long, default_value_t = DEFAULT_MAX_SESSIONS)]
    max_sessions: usize,
    /// KV-cache budget, in positions over all sessions.
    #[arg(long, default_value_t = DEFAULT_KV_TOKENS)]
    kv_tokens: usize,
    /// Seconds after which an idle session is dropped.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout: u64,
    /// fast, exact or f32 (see `nomoat generate --help`).
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
    /// Compute threads (default: every core). Several servers on one
    /// machine should share the cores rather than each take all of them.
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    /// Also serve the OpenAI-compatible API, dashboard and /metrics on this
    /// address (e.g. 127.0.0.1:8080), generating through the swarm.
    #[arg(long)]
    api: Option<std::net::SocketAddr>,
    #[command(flatten)]
    fetch: crate::cmd_weights::FetchArgs,
}

pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// `--blocks auto`: waits a random moment (so servers starting together do
/// not all pick the same window), looks at the swarm and takes the window
/// that most raises its weakest block.
async fn auto_blocks(
    net: &net::NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
    num_blocks: u32,
    max_blocks: u32,
) -> Result<BlockRange> {
    anyhow::ensure!(max_blocks > 0, "--max-blocks must be positive");
    let delay = rand::random::<u64>() % 1000;
    tokio::time::sleep(Duration::from_millis(delay)).await;
    net.subscribe(model_id).await;
    let servers = if bootstrap.is_empty() {
        Vec::new()
    } else {
        discover(net, bootstrap, model_id).await?
    };
    let placed = nomoat_node::swarm::rebalance::placed(&servers);
    // A joining server is assumed typical too.
    let mine = nomoat_node::swarm::rebalance::typical_throughput(&servers);
    let (span, min) = nomoat_scheduler::choose_span(num_blocks, &placed, max_blocks, mine)
        .context("the model has no blocks")?;
    eprintln!(
        "placement: {} server(s) known; taking blocks {span} (weakest block then at {min:.1} tokens/s)",
        servers.len()
    );
    Ok(span)
}

/// Loads blocks `a..b` of `file` on a blocking thread.
async fn load_span(
    file: Arc<ModelFile>,
    a: u32,
    b: u32,
    weights: WeightMode,
) -> Result<nomoat_node::engine::Span> {
    Ok(tokio::task::spawn_blocking(move || {
        nomoat_node::engine::Span::load(&file, a as usize, b as usize, weights)
    })
    .await??)
}

pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let store_id = nomoat_node::weights::parse_model_id(&args.model);
    let file = match store_id {
        Some(_) => None,
        None => Some(ModelFile::open(nomoat_node::catalog::resolve(
            &args.model,
            true,
        )?)?),
    };
    let net = net::start(args.net.config(args.bootstrap.clone())).await?;
    for relay in &args.net.relay {
        net.dial(relay.clone()).await?;
        net.listen_on(relay.clone().with(libp2p::multiaddr::Protocol::P2pCircuit))
            .await?;
    }
    // Peers may fetch from this node's store while it fetches itself.
    let shutdown = CancellationToken::new();
    crate::cmd_weights::start_weight_server(&net, &args.fetch, &shutdown)?;
    let mut stored = match store_id {
        Some(id) => Some(crate::cmd_weights::StoreModel::open(&net, id, &args.bootstrap).await?),
        None => None,
    };
    let (n, model_id) = match (&stored, &file) {
        (Some(m), _) => (m.manifest.num_blocks, m.id.to_hex()),
        (None, Some(f)) => (
            f.config().num_blocks as u32,
            model_file_id(f.path()).with_context(|| format!("hashing {}", f.path().display()))?,
        ),
        (None, None) => bail!("no model"),
    };
    let blocks = if args.blocks == "auto" {
        auto_blocks(&net, &args.bootstrap, &model_id, n, args.max_blocks).await?
    } else {
        let b: BlockRange = args.blocks.parse()?;
        b.check_within(n)
            .with_context(|| format!("the model has blocks 0..{n}"))?;
        b
    };
    let mut fetched = None;
    let file = Arc::new(match (&mut stored, file) {
        (Some(m), _) => {
            let need = nomoat_node::weights::fetch::Need {
                blocks: blocks.start..blocks.end,
                head: false,
            };
            fetched = m.fetch(&net, &need, args.fetch.config()).await?;
            m.file()?
        }
        (None, Some(f)) => f,
        (None, None) => bail!("no model"),
    });
    let span = Arc::new(Span::load(
        &file,
        blocks.start as usize,
        blocks.end as usize,
        args.weights,
    )?);
    let exec = Executor::start(
        span,
        ExecutorConfig {
            max_sessions: args.max_sessions,
            kv_tokens: args.kv_tokens,
            idle_timeout: Duration::from_secs(args.idle_timeout),
        },
    )?;
    let listen = net
        .wait_listening(
            args.net.listen.len() + args.net.relay.len(),
            Duration::from_secs(10),
        )
        .await;
    if listen.is_empty() {
        bail!("could not listen on {:?}", args.net.listen);
    }
    let mut hello = serde_json::json!({
        "peer_id": net.peer_id().to_string(),
        "listen": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "model_id": model_id,
        "blocks": blocks.to_string(),
    });
    if let Some(r) = &fetched {
        hello["fetch"] = r.to_json();
    }
    let api = match args.api {
        Some(addr) => Some(
            crate::cmd_gateway::serve_api(
                addr,
                &args.model,
                &file,
                &net,
                &args.net.listen,
                &args.bootstrap,
                &model_id,
                args.weights,
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    if let Some((addr, _)) = &api {
        hello["api"] = format!("http://{addr}/v1").into();
        hello["dashboard"] = format!("http://{addr}/").into();
    }
    println!("{hello}");
    std::io::stdout().flush()?;
    if args.blocks == "auto" && !args.no_rebalance {
        let weights = args.weights;
        // A move loads the new span from the file, or fetches its chunks
        // from peers first when the model lives in the store.
        let loader: SpanLoader = match stored {
            Some(m) => {
                let m = Arc::new(tokio::sync::Mutex::new(m));
                let (net, fetch_cfg) = (net.clone(), args.fetch.config());
                Arc::new(move |a: u32, b: u32| {
                    let (m, net, fetch_cfg) = (m.clone(), net.clone(), fetch_cfg.clone());
                    Box::pin(async move {
                        let mut m = m.lock().await;
                        let need = nomoat_node::weights::fetch::Need {
                            blocks: a..b,
                            head: false,
                        };
                        m.fetch(&net, &need, fetch_cfg).await?;
                        let file = m.file()?;
                        drop(m);
                        load_span(Arc::new(file), a, b, weights).await
                    })
                })
            }
            None => {
                let file = file.clone();
                Arc::new(move |a: u32, b: u32| Box::pin(load_span(file.clone(), a, b, weights)))
            }
        };
        tokio::spawn(run_rebalancer(
            net.clone(),
            exec.clone(),
            model_id.clone(),
            loader,
            RebalanceConfig {
                period: Duration::from_secs_f64(args.rebalance_period.max(0.1)),
                cooldown: Duration::from_secs_f64(args.rebalance_cooldown.max(0.0)),
                ..RebalanceConfig::default()
            },
            Arc::default(),
            shutdown.clone(),
        ));
    }
    let server = tokio::spawn(run_server(
        net.clone(),
        exec.clone(),
        ServerConfig { model_id },
        shutdown.clone(),
    ));
    shutdown_signal().await;
    eprintln!("shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    exec.shutdown();
    if let Some((_, api_net)) = api {
        api_net.shutdown().await;
    }
    net.shutdown().await;
    Ok(())
}

/// Generates through the swarm: the head here, the blocks on servers.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn generate_swarm(
    bootstrap: Vec<Multiaddr>,
    model_id: &str,
    file: &ModelFile,
    tokenizer: &ChatTokenizer,
    weights: WeightMode,
    prompt: Vec<u32>,
    opts: GenerateOptions,
    step_timeout: Duration,
) -> Result<GenerationStats> {
    let head = Arc::new(Head::load(file, weights)?);
    let net = net::start(NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
        ..NetConfig::default()
    })
    .await?;
    net.subscribe(model_id).await;
    let servers = discover(&net, &bootstrap, model_id).await?;
    let n = file.config().num_blocks as u32;
    let max_len = file
        .config()
        .max_seq_len
        .min(prompt.len() + opts.max_tokens + 1) as u32;
    let route = plan(&net, model_id, n, &servers, max_len)?;
    let mut session = RemoteSession::open(&net, model_id, route, max_len, step_timeout).await?;
    eprintln!("route: {}", describe_route(&session.route()));
    let mut stream = TextStream::default();
    let mut stdout = std::io::stdout().lock();
    let result = generate_remote(head, &mut session, &prompt, &opts, |id| {
        Ok(stream.write_to(tokenizer, id, &mut stdout)?)
    })
    .await;
    let _ = writeln!(stdout);
    drop(stdout);
    for f in session.failovers() {
        eprintln!(
            "failover: hop {:?} ({}, blocks {}) replaced by {} after {}; took {:.0} ms \
             (plan {:.0} ms, reopen {:.0} ms, replay of {} positions in {} steps {:.0} ms)",
            f.failed,
            f.failed_peers
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            f.blocks,
            describe_route(&f.replacement),
            f.cause,
            (f.plan + f.reopen + f.replay).as_secs_f64() * 1e3,
            f.plan.as_secs_f64() * 1e3,
            f.reopen.as_secs_f64() * 1e3,
            f.replayed_positions,
            f.replayed_steps,
            f.replay.as_secs_f64() * 1e3,
        );
    }
    session.close().await;
    net.shutdown().await;
    Ok(result?.1)
}

/// `peer (a..b) -> peer (b..c) -> ...`
pub(crate) fn describe_route(route: &[(PeerId, nomoat_protocol::Blocks)]) -> String {
    route
        .iter()
        .map(|(p, b)| format!("{p} ({b})"))
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// `nomoat status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// A peer of the swarm (repeatable), ending in /p2p/PEER_ID.
    #[arg(long, required = true)]
    swarm: Vec<Multiaddr>,
    /// Only this model id.
    #[arg(long, default_value = "")]
    model_id: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn status(args: StatusArgs) -> Result<()> {
    let net = net::start(NetConfig::default()).await?;
    let servers = discover(&net, &args.swarm, &args.model_id).await?;
    // Connect to each server so ping measures its RTT.
    let mut rows = Vec::new();
    for s in &servers {
        let Ok(peer) = PeerId::from_bytes(&s.peer_id) else {
            continue;
        };
        let addr = s
            .addrs
            .iter()
            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
            .next();
        if let Some(addr) = addr {
            let _ = net.dial(addr.with_p2p(peer).unwrap_or_else(|a| a)).await;
        }
        rows.push((peer, s.clone()));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline && rows.iter().any(|(p, _)| net.rtt(p).is_none()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut models: Vec<(String, u32)> = servers
        .iter()
        .map(|s| (s.model_id.clone(), s.num_blocks))
        .collect();
    models.sort();
    models.dedup();
    let gaps = |model: &str, n: u32| -> Vec<BlockRange> {
        let ranges: Vec<BlockRange> = servers
            .iter()
            .filter(|s| s.model_id == model)
            .map(|s| BlockRange {
                start: s.blocks.start,
                end: s.blocks.end,
            })
            .collect();
        coverage_gaps(n, &ranges)
    };
    if args.json {
        let json = serde_json::json!({
            "servers": rows.iter().map(|(p, s)| server_json(p, s, net.rtt(p))).collect::<Vec<_>>(),
            "models": models.iter().map(|(m, n)| serde_json::json!({
                "model_id": m,
                "num_blocks": n,
                "gaps": gaps(m, *n).iter().map(|g| g.to_string()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{json}");
    } else {
        if rows.is_empty() {
            println!("no servers known to {:?}", args.swarm);
        }
        for (m, n) in &models {
            let g = gaps(m, *n);
            let cover = if g.is_empty() {
                "all blocks covered".to_string()
            } else {
                format!(
                    "GAPS: blocks {} not served",
                    g.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            println!("model {} ({n} blocks): {cover}", short(m));
            println!(
                "  {:<54} {:>8} {:>9} {:>10} {:>6} {:>9}",
                "peer", "blocks", "rtt ms", "tokens/s", "load", "sessions"
            );
            for (p, s) in rows.iter().filter(|(_, s)| &s.model_id == m) {
                let rtt = net
                    .rtt(p)
                    .map(|d| format!("{:.2}", d.as_secs_f64() * 1e3))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "  {:<54} {:>8} {:>9} {:>10.1} {:>6.2} {:>9}",
                    p.to_string(),
                    s.blocks.to_string(),
                    rtt,
                    s.throughput,
                    s.load,
                    s.active_sessions
                );
            }
        }
    }
    net.shutdown().await;
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(16)]
}

fn server_json(peer: &PeerId, s: &ServerInfo, rtt: Option<Duration>) -> serde_json::Value {
    serde_json::json!({
        "peer_id": peer.to_string(),
        "model_id": s.model_id,
        "blocks": s.blocks.to_string(),
        "num_blocks": s.num_blocks,
        "rtt_ms": rtt.map(|d| d.as_secs_f64() * 1e3),
        "throughput": s.throughput,
        "load": s.load,
        "active_sessions": s.active_sessions,
        "free_kv_tokens": s.free_kv_tokens,
        "version": s.version,
        "reachability": format!("{:?}", s.reachability).to_lowercase(),
        "addrs": s.addrs.iter().filter_map(|a| Multiaddr::try_from(a.clone()).ok()).map(|a| a.to_string()).collect::<Vec<_>>(),
    })
}

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
    /// fast, exact or f32.
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
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Decode step times (seconds) through a remote session, greedy from `prompt`.
async fn swarm_decode(
    head: &Arc<Head>,
    session: &mut RemoteSession,
    prompt: &[u32],
    tokens: usize,
) -> Result<(Vec<f64>, Vec<u32>)> {
    use nomoat_node::engine::{hidden_from_frame, hidden_to_frame, Sampler, SamplingParams};
    let hidden = head.config().hidden_size;
    let greedy = |l: &[f32]| Sampler::new(SamplingParams::greedy()).sample(l, &[]);
    let h = session
        .step(0, hidden_to_frame(&head.embed(prompt)?)?)
        .await?;
    let mut next = greedy(&head.last_logits(&hidden_from_frame(&h, hidden)?)?);
    let mut times = Vec::with_capacity(tokens);
    let mut out = vec![next];
    for pos in (prompt.len() as u32..).take(tokens) {
        let t = std::time::Instant::now();
        let frame = hidden_to_frame(&head.embed(&[next])?)?;
        let h = session.step(pos, frame).await?;
        next = greedy(&head.last_logits(&hidden_from_frame(&h, hidden)?)?);
        times.push(t.elapsed().as_secs_f64());
        out.push(next);
    }
    Ok((times, out))
}

/// Starts `nomoat serve` for a benchmark: blocks `blocks` of the model at
/// `model`, announcing every half second, on `threads` compute threads.
pub(crate) fn bench_server(
    bin: &std::path::Path,
    model: &str,
    blocks: BlockRange,
    weights: &str,
    threads: &str,
    bootstrap: Option<&str>,
) -> Result<nomoat_node::swarm::process::ServeProcess> {
    let blocks = blocks.to_string();
    let mut a = vec![
        "--model",
        model,
        "--blocks",
        blocks.as_str(),
        "--weights",
        weights,
        "--heartbeat",
        "0.5",
        "--threads",
        threads,
    ];
    if let Some(b) = bootstrap {
        a.extend(["--bootstrap", b]);
    }
    nomoat_node::swarm::process::ServeProcess::spawn(bin, &a, Duration::from_secs(120))
}

/// Waits (30 s at most) until at least `n` servers of `model_id` are known.
pub(crate) async fn discover_at_least(
    net: &net::NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
    n: usize,
) -> Result<Vec<ServerInfo>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = discover(net, bootstrap, model_id).await?;
        if found.len() >= n {
            return Ok(found);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} servers announced",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub(crate) async fn bench_swarm(args: BenchSwarmArgs) -> Result<()> {
    use nomoat_node::engine::{LocalModel, Sampler, SamplingParams};
    use nomoat_node::swarm::process::ServeProcess;
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let tokenizer = match (file.gguf_metadata(), file.directory()) {
        (Some(md), _) => ChatTokenizer::from_gguf(md).ok(),
        (None, Some(dir)) => ChatTokenizer::from_dir(dir).ok(),
        _ => None,
    };
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
    let local = LocalModel::load_whole(&file, args.weights)?;
    let local_run = || -> Result<(Vec<f64>, Vec<u32>)> {
        let greedy = |l: &[f32]| Sampler::new(SamplingParams::greedy()).sample(l, &[]);
        let mut s = local.new_session();
        let mut next = greedy(&local.forward_last(&mut s, &prompt)?);
        let mut tokens = vec![next];
        let mut times = Vec::new();
        for _ in 0..args.tokens {
            let t = std::time::Instant::now();
            next = greedy(&local.forward_last(&mut s, &[next])?);
            times.push(t.elapsed().as_secs_f64());
            tokens.push(next);
        }
        Ok((times, tokens))
    };
    let (first_times, local_tokens) = local_run()?;
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
            let (t, _) = local_run()?;
            local_times.extend(t);
            let mut session = RemoteSession::open(
                &net,
                &model_id,
                route.clone(),
                max_len,
                Duration::from_secs(30),
            )
            .await?;
            let (t, tokens) = swarm_decode(&head, &mut session, &prompt, args.tokens).await?;
            session.close().await;
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
