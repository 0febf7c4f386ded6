//! `nomoat demo`: a whole local swarm with a gateway in one command.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::engine::{ModelFile, WeightMode};
use nomoat_node::gateway::{
    self, http, model_name, swarm_gateway, wait_covered, Gateway, GatewayConfig,
};
use nomoat_node::net::NetHandle;
use nomoat_node::process::ServeProcess;
use nomoat_node::shutdown::shutdown_signal;
use nomoat_node::store::ChunkStore;
use tokio_util::sync::CancellationToken;

/// The question the demo asks.
pub(crate) const DEMO_QUESTION: &str = "What is the capital of France?";
/// How long the demo and the API bench wait for the swarm to cover the model.
pub(crate) const COVERAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// A gateway on loopback in front of the local servers `procs` (the demo's
/// and `bench api`'s), for the model imported as `model_id`.
pub(crate) async fn local_swarm_gateway(
    path: &Path,
    name: String,
    procs: &[ServeProcess],
    model_id: &str,
    shutdown: &CancellationToken,
) -> Result<(Gateway, NetHandle)> {
    let boot: Multiaddr = procs.first().context("no server")?.addr().parse()?;
    let file = ModelFile::open(path)?;
    Ok(swarm_gateway(
        &file,
        model_id.to_string(),
        GatewayConfig::new(name),
        vec![boot],
        nomoat_node::net::NetConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
            ..Default::default()
        },
        WeightMode::Fast,
        shutdown.clone(),
    )
    .await?)
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
        // The demo is one machine: its servers stay off the network.
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
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
pub(crate) fn remove_peer_homes(servers: usize) {
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
pub(crate) fn start_servers(
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
