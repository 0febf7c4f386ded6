//! The user-facing commands of the `nomoat` binary: `gateway` (the
//! OpenAI-compatible API and dashboard), `demo` (a whole local swarm with a
//! gateway in one command) and `bench api`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, Head, LocalModel, ModelFile, SamplingParams,
    WeightMode,
};
use nomoat_node::gateway::{
    self, http, Backend, Gateway, GatewayConfig, SwarmBackend, DEFAULT_API_ADDR,
    DEFAULT_MAX_CONCURRENT,
};
use nomoat_node::swarm::model_file_id;
use nomoat_node::swarm::net::{self, NetConfig, NetHandle};
use nomoat_node::swarm::process::ServeProcess;
use nomoat_node::weights::ChunkStore;
use tokio_util::sync::CancellationToken;

use crate::cmd_swarm::shutdown_signal;

/// The question the demo asks.
pub(crate) const DEMO_QUESTION: &str = "What is the capital of France?";
/// How long the demo and the API bench wait for the swarm to cover the model.
const COVERAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// `nomoat gateway`.
#[derive(Debug, Args)]
pub(crate) struct GatewayArgs {
    /// A catalog name, a .gguf file or a safetensors directory: the gateway
    /// holds its tokenizer and head (the whole model without --swarm).
    #[arg(long, env = "NOMOAT_MODEL")]
    model: String,
    /// Run the blocks on the swarm reached through this peer (repeatable;
    /// an address ending in /p2p/PEER_ID). Without it the gateway runs the
    /// whole model itself.
    #[arg(long)]
    swarm: Vec<Multiaddr>,
    /// Address of the HTTP API and dashboard (port 0: any free port).
    #[arg(long, default_value = DEFAULT_API_ADDR)]
    api: SocketAddr,
    /// The model name clients use (default: the --model value, or the file's
    /// name without extension).
    #[arg(long)]
    name: Option<String>,
    /// fast, exact or f32 (see `nomoat generate --help`).
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
    /// Requests generating at once; more get 429.
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT)]
    max_concurrent: usize,
    /// Seconds a swarm step may take before the failing hop is reported.
    #[arg(long, default_value_t = 30.0)]
    step_timeout: f64,
    /// Address of the gateway's own peer-to-peer node (repeatable); use a
    /// routable one, e.g. /ip4/0.0.0.0/udp/0/quic-v1, to reach other machines.
    #[arg(long, default_value = "/ip4/127.0.0.1/udp/0/quic-v1")]
    listen: Vec<Multiaddr>,
}

/// The name a model is served under: a catalog name as given, a file by
/// its stem.
pub(crate) fn model_name(model: &str) -> String {
    let p = Path::new(model);
    if p.exists() {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.to_string())
    } else {
        model.to_string()
    }
}

fn tokenizer_of(file: &ModelFile, path: &Path) -> Result<ChatTokenizer> {
    Ok(match (file.gguf_metadata(), file.directory()) {
        (Some(md), _) => ChatTokenizer::from_gguf(md)?,
        (None, Some(dir)) => ChatTokenizer::from_dir(dir)?,
        (None, None) => bail!("{} has no tokenizer", path.display()),
    })
}

/// A gateway on loopback in front of the local servers `procs` (the demo's
/// and `bench api`'s), for the model imported as `model_id`.
async fn local_swarm_gateway(
    path: &Path,
    name: String,
    procs: &[ServeProcess],
    model_id: &str,
    shutdown: &CancellationToken,
) -> Result<(Gateway, NetHandle)> {
    let boot: Multiaddr = procs.first().context("no server")?.addr().parse()?;
    swarm_gateway(
        &path.to_string_lossy(),
        name,
        vec![boot],
        vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
        WeightMode::Fast,
        |c| c,
        shutdown.clone(),
        Some(model_id.to_string()),
    )
    .await
}

/// A gateway over the swarm reached through `bootstrap`, on a new network
/// node; returns it with the node. `model` is a catalog name, a file or a
/// model id from `nomoat import`; `model_id_override` names the swarm's
/// model when the file is only the source of the head (the demo's servers
/// serve the imported model).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn swarm_gateway(
    model: &str,
    name: String,
    bootstrap: Vec<Multiaddr>,
    listen: Vec<Multiaddr>,
    weights: WeightMode,
    cfg: impl FnOnce(GatewayConfig) -> GatewayConfig,
    shutdown: CancellationToken,
    model_id_override: Option<String>,
) -> Result<(Gateway, NetHandle)> {
    // A model id from `nomoat import`: the head and tokenizer come from the
    // store, fetched from the swarm's peers when missing.
    let (file, model_id) = match nomoat_node::weights::parse_model_id(model) {
        Some(id) => (
            crate::cmd_weights::open_for_generate(id, &bootstrap).await?,
            id.to_hex(),
        ),
        None => {
            let path = nomoat_node::catalog::resolve(model, true)?;
            let id = model_file_id(&path).with_context(|| format!("hashing {}", path.display()))?;
            (ModelFile::open(&path)?, id)
        }
    };
    let model_id = model_id_override.unwrap_or(model_id);
    let tokenizer = tokenizer_of(&file, Path::new(model))?;
    let head = Arc::new(Head::load(&file, weights)?);
    let net = net::start(NetConfig {
        listen,
        ..NetConfig::default()
    })
    .await?;
    net.subscribe(&model_id).await;
    let backend = Backend::Swarm(SwarmBackend::new(net.clone(), bootstrap, model_id, head));
    let gw = Gateway::new(
        cfg(GatewayConfig::new(name)),
        backend,
        tokenizer,
        file.config().clone(),
        shutdown,
    );
    Ok((gw, net))
}

/// Polls the swarm until every block is served (bounded by `timeout`).
pub(crate) async fn wait_covered(gw: &Gateway, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let gaps = gw.refresh().await;
        match &gaps {
            Ok(g) if g.is_empty() => return Ok(()),
            _ if Instant::now() > deadline => {
                let what = match gaps {
                    Ok(g) => format!(
                        "blocks {} are not served",
                        g.iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Err(e) => e.to_string(),
                };
                bail!("the swarm did not cover the model within {timeout:?}: {what}; check the servers' logs (RUST_LOG=info)");
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn print_urls(addr: SocketAddr, model: &str) -> Result<()> {
    let hello = serde_json::json!({
        "api": format!("http://{addr}/v1"),
        "dashboard": format!("http://{addr}/"),
        "metrics": format!("http://{addr}/metrics"),
        "model": model,
    });
    println!("{hello}");
    std::io::stdout().flush()?;
    Ok(())
}

pub(crate) async fn run_gateway(args: GatewayArgs) -> Result<()> {
    let name = args.name.clone().unwrap_or_else(|| model_name(&args.model));
    let shutdown = CancellationToken::new();
    let cfg = |c: GatewayConfig| {
        c.with_max_concurrent(args.max_concurrent)
            .with_step_timeout(Duration::from_secs_f64(args.step_timeout.max(0.1)))
    };
    let (gw, net) = if args.swarm.is_empty() {
        let file = match nomoat_node::weights::parse_model_id(&args.model) {
            Some(id) => crate::cmd_weights::open_for_generate(id, &[]).await?,
            None => ModelFile::open(nomoat_node::catalog::resolve(&args.model, true)?)?,
        };
        let tokenizer = tokenizer_of(&file, Path::new(&args.model))?;
        let model = Arc::new(LocalModel::load_whole(&file, args.weights)?);
        let gw = Gateway::new(
            cfg(GatewayConfig::new(name.clone())),
            Backend::Local(model),
            tokenizer,
            file.config().clone(),
            shutdown.clone(),
        );
        (gw, None)
    } else {
        let (gw, net) = swarm_gateway(
            &args.model,
            name.clone(),
            args.swarm.clone(),
            args.listen.clone(),
            args.weights,
            cfg,
            shutdown.clone(),
            None,
        )
        .await?;
        match gw.refresh().await {
            Ok(g) if g.is_empty() => eprintln!("the swarm covers every block"),
            Ok(g) => eprintln!(
                "the swarm does not serve blocks {} yet: requests get 503 until it does",
                g.iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Err(e) => eprintln!("the swarm did not answer yet ({e}); retrying in the background"),
        }
        (gw, Some(net))
    };
    let (listener, addr) = gateway::bind(args.api).await?;
    print_urls(addr, &name)?;
    let server = tokio::spawn(gateway::serve(gw, listener, shutdown.clone()));
    shutdown_signal().await;
    eprintln!("shutting down");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
    if let Some(net) = net {
        net.shutdown().await;
    }
    Ok(())
}

/// The arguments of a demo server serving `blocks` of the imported model
/// `model_id`.
fn demo_server_args(
    model_id: &str,
    blocks: &str,
    bootstrap: Option<&str>,
    threads: usize,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--model",
        model_id,
        "--blocks",
        blocks,
        "--heartbeat",
        "0.5",
        "--threads",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(threads.max(1).to_string());
    if let Some(b) = bootstrap {
        a.extend(["--bootstrap".to_string(), b.to_string()]);
    }
    a
}

/// The weight store of demo server `index` (0-based) after the first: a
/// directory of its own under the data directory, emptied before it starts
/// so that it fetches its span from its peers.
fn peer_home(index: usize) -> PathBuf {
    nomoat_node::catalog::home()
        .join("demo")
        .join(format!("server-{}", index + 1))
}

/// Removes the demo servers' own weight stores.
fn remove_peer_homes(servers: usize) {
    for i in 1..servers {
        let _ = std::fs::remove_dir_all(peer_home(i));
    }
    // The parent only if nothing else is in it.
    let _ = std::fs::remove_dir(nomoat_node::catalog::home().join("demo"));
}

/// Imports the model into this node's weight store and starts `servers`
/// `nomoat serve` processes that split its blocks evenly. Only the first
/// holds the weights (it serves from this store and is everyone's
/// bootstrap); the others start with empty stores and fetch their spans'
/// chunks from their peers. Returns the model id and the processes.
fn start_servers(
    model_path: &Path,
    servers: usize,
    threads: usize,
) -> Result<(String, Vec<ServeProcess>)> {
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    let report = nomoat_node::weights::import(&store, model_path)?;
    let id = report.id.to_hex();
    println!(
        "imported: model id {} ({} chunks, {} new)",
        &id[..16],
        report.chunks,
        report.new_chunks
    );
    let n = report.manifest.num_blocks;
    let splits = nomoat_scheduler::even_splits(n, servers as u32)
        .with_context(|| format!("cannot split {n} blocks over {servers} servers"))?;
    let bin = std::env::current_exe()?;
    let mut procs: Vec<ServeProcess> = Vec::new();
    for (i, r) in splits.iter().enumerate() {
        let boot = procs.first().map(ServeProcess::addr);
        let args = demo_server_args(&id, &r.to_string(), boot.as_deref(), threads);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let timeout = Duration::from_secs(300);
        let p = if i == 0 {
            ServeProcess::spawn(&bin, &argv, timeout)?
        } else {
            let home = peer_home(i);
            let _ = std::fs::remove_dir_all(&home);
            std::fs::create_dir_all(&home)
                .with_context(|| format!("creating {}", home.display()))?;
            ServeProcess::spawn_env(&bin, &argv, &[("NOMOAT_HOME", home.as_os_str())], timeout)?
        };
        let what = if i == 0 {
            "holds the weights".to_string()
        } else {
            let f = &p.hello["fetch"];
            format!(
                "fetched {} chunks ({:.1} MB) from its peers",
                f["fetched"].as_u64().unwrap_or(0),
                f["bytes"].as_f64().unwrap_or(0.0) / 1e6
            )
        };
        println!(
            "server {} (pid {}): blocks {r}, {what}",
            i + 1,
            p.child.id()
        );
        procs.push(p);
    }
    std::io::stdout().flush()?;
    Ok((id, procs))
}

/// Asks one chat question through the API, streaming the answer to
/// stdout; returns the answer.
async fn ask(addr: SocketAddr, model: &str, question: &str) -> Result<String> {
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "stream": true,
        "temperature": 0,
        "max_tokens": 128,
    });
    let mut answer = String::new();
    let mut failure = None;
    let mut out = std::io::stdout();
    let (status, err) = http::stream_events(
        addr,
        "/v1/chat/completions",
        body.to_string().as_bytes(),
        Duration::from_secs(300),
        |data| {
            if data == "[DONE]" {
                return false;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(e) = v.get("error") {
                failure = Some(e["message"].as_str().unwrap_or_default().to_string());
                return false;
            }
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                answer.push_str(t);
                let _ = out.write_all(t.as_bytes()).and_then(|_| out.flush());
            }
            true
        },
    )
    .await?;
    println!();
    if status != 200 {
        bail!("the API answered {status}: {err}");
    }
    if let Some(f) = failure {
        bail!("the generation failed: {f}");
    }
    Ok(answer)
}

/// `nomoat demo`.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Port of the API and dashboard on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Answer the sample question, then stop everything and exit.
    #[arg(long)]
    once: bool,
    /// The model (a catalog name is fetched on first use).
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// The sample question.
    #[arg(long, default_value = DEMO_QUESTION)]
    question: String,
    /// Server processes in the local swarm.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Compute threads per server.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

pub(crate) async fn demo(args: DemoArgs) -> Result<()> {
    println!(
        "nomoat demo: a local swarm of {} servers and an OpenAI-compatible gateway",
        args.servers
    );
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    println!("model {}: {}", args.model, path.display());
    let servers = args.servers.max(1);
    let result = match start_servers(&path, servers, args.threads) {
        Ok((id, procs)) => {
            let r = demo_with(&args, &path, &id, &procs).await;
            // Every server is killed and reaped, whatever happened.
            drop(procs);
            r
        }
        Err(e) => Err(e),
    };
    remove_peer_homes(servers);
    result
}

async fn demo_with(
    args: &DemoArgs,
    path: &Path,
    model_id: &str,
    procs: &[ServeProcess],
) -> Result<()> {
    let shutdown = CancellationToken::new();
    let name = model_name(&args.model);
    let (gw, net) = local_swarm_gateway(path, name.clone(), procs, model_id, &shutdown).await?;
    let result = async {
        wait_covered(&gw, COVERAGE_TIMEOUT).await?;
        let (listener, addr) =
            gateway::bind(SocketAddr::from(([127, 0, 0, 1], args.port))).await?;
        tokio::spawn(gateway::serve(gw.clone(), listener, shutdown.clone()));
        println!("dashboard: http://{addr}/");
        println!("API:       http://{addr}/v1  (model \"{name}\")");
        println!("metrics:   http://{addr}/metrics");
        println!("Q: {}", args.question);
        print!("A: ");
        std::io::stdout().flush()?;
        ask(addr, &name, &args.question).await?;
        if !args.once {
            println!(
                "try: curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' \
                 -d '{{\"model\":\"{name}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'"
            );
            println!("running; Ctrl-C stops the gateway and every server");
            shutdown_signal().await;
        }
        anyhow::Ok(())
    }
    .await;
    shutdown.cancel();
    net.shutdown().await;
    println!("stopped");
    result
}

/// `nomoat bench api`.
#[derive(Debug, Args)]
pub(crate) struct BenchApiArgs {
    /// The model.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Numbers of concurrent clients to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    clients: Vec<usize>,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Server processes in the local swarm.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Compute threads of every participant (each server and the local
    /// engine).
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
    /// The chat question each client asks.
    #[arg(long, default_value = "Tell me about the history of Paris.")]
    prompt: String,
}

/// One client's figures: time to first token, tokens, decode tokens/s.
#[derive(Debug, Clone, Copy)]
struct ClientRun {
    ttft_s: f64,
    tokens: usize,
    decode_tps: f64,
    start: Instant,
    end: Instant,
}

async fn api_client(addr: SocketAddr, body: String) -> Result<ClientRun> {
    let start = Instant::now();
    let mut first = None;
    let mut last = start;
    let mut tokens = 0usize;
    let (status, err) = http::stream_events(
        addr,
        "/v1/chat/completions",
        body.as_bytes(),
        Duration::from_secs(600),
        |data| {
            if data == "[DONE]" {
                return false;
            }
            let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
            if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                if !t.is_empty() {
                    first.get_or_insert_with(Instant::now);
                    last = Instant::now();
                }
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            true
        },
    )
    .await?;
    anyhow::ensure!(status == 200, "the API answered {status}: {err}");
    let first = first.context("no text came back")?;
    Ok(ClientRun {
        ttft_s: (first - start).as_secs_f64(),
        tokens,
        decode_tps: tokens.saturating_sub(1) as f64 / (last - first).as_secs_f64().max(1e-9),
        start,
        end: last,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(crate) async fn bench_api(args: BenchApiArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let tokenizer = tokenizer_of(&file, &path)?;
    let name = model_name(&args.model);
    let prompt = tokenizer
        .encode(&tokenizer.chat_prompt(&[ChatMessage::new("user", args.prompt.clone())]))?;
    let opts = GenerateOptions {
        max_tokens: args.tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: tokenizer.stop_ids().to_vec(),
    };
    // The local engine first, in this process, with the same prompt.
    let local = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let local_run = || -> Result<(f64, f64, usize)> {
        let (out, stats) = local.generate(&prompt, &opts, |_| Ok(true))?;
        Ok((
            stats.prompt_time.as_secs_f64(),
            stats.decode_tokens_per_sec(),
            out.len(),
        ))
    };
    // Warm-up (first touches of the weights, thread pools), then measured.
    local_run()?;
    let (l1_ttft, l1_tps, local_tokens) = local_run()?;
    eprintln!(
        "local: time to first token {:.1} ms, {l1_tps:.1} tokens/s ({local_tokens} tokens)",
        l1_ttft * 1e3
    );
    let servers = args.servers.max(1);
    let (model_id, procs) = start_servers(&path, servers, args.threads)?;
    let shutdown = CancellationToken::new();
    let (gw, net) = local_swarm_gateway(&path, name.clone(), &procs, &model_id, &shutdown).await?;
    let result = async {
        wait_covered(&gw, COVERAGE_TIMEOUT).await?;
        let (listener, addr) = gateway::bind("127.0.0.1:0".parse()?).await?;
        tokio::spawn(gateway::serve(gw.clone(), listener, shutdown.clone()));
        let body = serde_json::json!({
            "model": name,
            "messages": [{"role": "user", "content": args.prompt}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "temperature": 0,
            "max_tokens": args.tokens,
        })
        .to_string();
        // Warm-up: connections, routes and caches.
        api_client(addr, body.clone()).await?;
        let mut rows = Vec::new();
        for &c in &args.clients {
            let c = c.max(1);
            let runs: Vec<ClientRun> = futures::future::try_join_all(
                (0..c).map(|_| api_client(addr, body.clone())),
            )
            .await?;
            let t0 = runs.iter().map(|r| r.start).min().context("a client")?;
            let t1 = runs.iter().map(|r| r.end).max().context("a client")?;
            let total: usize = runs.iter().map(|r| r.tokens).sum();
            let ttft = median(runs.iter().map(|r| r.ttft_s).collect());
            let per_client = median(runs.iter().map(|r| r.decode_tps).collect());
            let aggregate = total as f64 / (t1 - t0).as_secs_f64().max(1e-9);
            println!(
                "API, {c} client(s): time to first token {:.1} ms (median), {per_client:.1} tokens/s per client, {aggregate:.1} tokens/s in all ({total} tokens)",
                ttft * 1e3
            );
            rows.push(serde_json::json!({
                "clients": c,
                "ttft_ms_median": ttft * 1e3,
                "decode_tokens_per_s_per_client": per_client,
                "tokens_per_s_aggregate": aggregate,
                "tokens": total,
            }));
        }
        anyhow::Ok(rows)
    }
    .await;
    shutdown.cancel();
    net.shutdown().await;
    drop(procs);
    remove_peer_homes(servers);
    let rows = result?;
    // The local engine again, so that machine noise hits both alike.
    let (l2_ttft, l2_tps, _) = local_run()?;
    let (l_ttft, l_tps) = ((l1_ttft + l2_ttft) / 2.0, (l1_tps + l2_tps) / 2.0);
    println!(
        "local generate: time to first token {:.1} ms, {l_tps:.1} tokens/s (mean of a run before and after)",
        l_ttft * 1e3
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "api",
            "model": args.model,
            "servers": args.servers,
            "threads_per_process": args.threads,
            "max_tokens": args.tokens,
            "local": {"ttft_ms": l_ttft * 1e3, "decode_tokens_per_s": l_tps, "tokens": local_tokens},
            "api": rows,
        })
    );
    Ok(())
}

/// `nomoat serve --api ADDR`: a gateway in the server's process. It runs
/// its own peer-to-peer node (a node cannot open streams to itself),
/// listening like the server but on any free port, and joins the swarm
/// through the server. Returns the bound HTTP address.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn serve_api(
    addr: SocketAddr,
    model: &str,
    file: &ModelFile,
    server: &NetHandle,
    listen: &[Multiaddr],
    bootstrap: &[Multiaddr],
    model_id: &str,
    weights: WeightMode,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, NetHandle)> {
    use libp2p::multiaddr::Protocol;
    let tokenizer = tokenizer_of(file, Path::new(model))?;
    let head = Arc::new(Head::load(file, weights)?);
    let any_port: Vec<Multiaddr> = listen
        .iter()
        .map(|a| {
            a.iter()
                .map(|p| match p {
                    Protocol::Udp(_) => Protocol::Udp(0),
                    Protocol::Tcp(_) => Protocol::Tcp(0),
                    p => p,
                })
                .collect()
        })
        .collect();
    let net = net::start(NetConfig {
        listen: any_port,
        ..NetConfig::default()
    })
    .await?;
    net.subscribe(model_id).await;
    let mut boot = server.listen_addrs();
    boot.extend(bootstrap.iter().cloned());
    let backend = Backend::Swarm(SwarmBackend::new(
        net.clone(),
        boot,
        model_id.to_string(),
        head,
    ));
    let gw = Gateway::new(
        GatewayConfig::new(model_name(model)),
        backend,
        tokenizer,
        file.config().clone(),
        shutdown.clone(),
    );
    let (listener, local) = gateway::bind(addr).await?;
    tokio::spawn(gateway::serve(gw, listener, shutdown));
    Ok((local, net))
}
