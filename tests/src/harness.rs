//! Swarm harness: servers in this process on 127.0.0.1 QUIC, and real
//! `nomoat` processes started and killed by tests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libp2p::Multiaddr;
use nomoat_node::engine::{ModelFile, Span, WeightMode};
use nomoat_node::swarm::executor::{Executor, ExecutorConfig};
use nomoat_node::swarm::net::{self, NetConfig, NetHandle};
use nomoat_node::swarm::server::{run_server, ServerConfig};
use nomoat_protocol::ServerInfo;
use tokio_util::sync::CancellationToken;

/// A server running in this process.
#[derive(Debug)]
pub struct TestServer {
    /// Its network handle.
    pub net: NetHandle,
    /// Its executor.
    pub exec: Executor,
    /// Cancels its server task.
    pub shutdown: CancellationToken,
    /// Its first listen address, with `/p2p/PEER_ID`.
    pub addr: Multiaddr,
}

impl TestServer {
    /// Starts a server of blocks `[start, end)` on 127.0.0.1 QUIC.
    pub async fn start(
        file: &ModelFile,
        model_id: &str,
        start: usize,
        end: usize,
        exec_cfg: ExecutorConfig,
        bootstrap: Vec<Multiaddr>,
    ) -> Result<Self> {
        let span = Arc::new(Span::load(file, start, end, WeightMode::Fast)?);
        let exec = Executor::start(span, exec_cfg)?;
        let net = net::start(NetConfig {
            bootstrap,
            heartbeat: Duration::from_millis(500),
            ..NetConfig::default()
        })
        .await?;
        let addr = net
            .wait_listening(1, Duration::from_secs(10))
            .await
            .into_iter()
            .next()
            .context("server not listening")?;
        let shutdown = CancellationToken::new();
        tokio::spawn(run_server(
            net.clone(),
            exec.clone(),
            ServerConfig {
                model_id: model_id.to_string(),
            },
            shutdown.clone(),
        ));
        Ok(Self {
            net,
            exec,
            shutdown,
            addr,
        })
    }

    /// Stops the server and its network: its peers see the connection drop.
    pub async fn kill(&self) {
        self.shutdown.cancel();
        self.net.shutdown().await;
        self.exec.shutdown();
    }
}

/// A client network node on 127.0.0.1.
pub async fn client_net() -> Result<NetHandle> {
    Ok(net::start(NetConfig {
        heartbeat: Duration::from_millis(500),
        ..NetConfig::default()
    })
    .await?)
}

/// Polls `discover` until `n` servers of `model_id` are known (10 s at most).
pub async fn discover_n(
    net: &NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
    n: usize,
) -> Result<Vec<ServerInfo>> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = nomoat_node::swarm::client::discover(net, bootstrap, model_id).await?;
        if found.len() >= n {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} servers announced themselves", found.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `nomoat` binary built next to the test executable.
pub fn nomoat_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no parent")?;
    let bin = dir.join(format!("nomoat{}", std::env::consts::EXE_SUFFIX));
    if !bin.exists() {
        bail!("{} not found: build it with `cargo build -p nomoat-node` (cargo test --workspace does)", bin.display());
    }
    Ok(bin)
}

/// A `nomoat serve` process, killed when dropped.
pub type Proc = nomoat_node::swarm::process::ServeProcess;

/// Starts `nomoat serve ARGS` and waits for its first stdout line.
pub fn serve(args: &[&str]) -> Result<Proc> {
    Proc::spawn(&nomoat_bin()?, args, Duration::from_secs(60))
}
