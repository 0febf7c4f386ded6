//! Swarm harness: servers in this process on 127.0.0.1 QUIC, and real
//! `nomoat` processes started and killed by tests.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use libp2p::Multiaddr;
use nomoat_node::engine::ModelFile;
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_node::node::{BlockChoice, Node, NodeConfig};
use nomoat_node::server::executor::{Executor, ExecutorConfig};
use nomoat_node::weights::fetch::FetchConfig;
use nomoat_protocol::{BlockRange, ServerInfo};

/// A server running in this process, assembled by [`Node::start`] as
/// `nomoat serve` assembles one.
#[derive(Debug)]
pub struct TestServer {
    /// Its network handle.
    pub net: NetHandle,
    /// Its executor.
    pub exec: Executor,
    /// Its first listen address, with `/p2p/PEER_ID`.
    pub addr: Multiaddr,
    node: Node,
}

impl TestServer {
    /// Starts a server of blocks `[start, end)` of `file` on 127.0.0.1 QUIC,
    /// serving under `model_id`, with no weight store.
    pub async fn start(
        file: &ModelFile,
        model_id: &str,
        start: usize,
        end: usize,
        exec_cfg: ExecutorConfig,
        bootstrap: Vec<Multiaddr>,
    ) -> Result<Self> {
        Self::start_node(file, model_id, start, end, exec_cfg, bootstrap, None).await
    }

    /// [`start`](Self::start) with a weight store in `store` (where the
    /// server keeps the adapters it fetches, and which it serves).
    pub async fn start_with_store(
        file: &ModelFile,
        model_id: &str,
        start: usize,
        end: usize,
        bootstrap: Vec<Multiaddr>,
        store: &std::path::Path,
    ) -> Result<Self> {
        let exec_cfg = ExecutorConfig::default();
        let store = Some(store.to_path_buf());
        Self::start_node(file, model_id, start, end, exec_cfg, bootstrap, store).await
    }

    /// [`start_with_store`](Self::start_with_store) for a server that
    /// fetches one chunk per request over one stream per peer, so that every
    /// provider it knows is asked for some chunk.
    pub async fn start_fetching_one_by_one(
        file: &ModelFile,
        model_id: &str,
        (start, end): (usize, usize),
        bootstrap: Vec<Multiaddr>,
        store: &std::path::Path,
    ) -> Result<Self> {
        let fetch = FetchConfig {
            batch: 1,
            streams_per_peer: 1,
            progress: false,
            ..FetchConfig::default()
        };
        Self::start_full(
            file,
            model_id,
            (start, end),
            ExecutorConfig::default(),
            bootstrap,
            Some(store.to_path_buf()),
            |cfg| cfg.fetch = fetch,
        )
        .await
    }

    /// [`start`](Self::start) for a server that lies about its outputs
    /// as `fault` says (see `nomoat_node::server::fault`).
    pub async fn start_lying(
        file: &ModelFile,
        model_id: &str,
        start: usize,
        end: usize,
        fault: &str,
        bootstrap: Vec<Multiaddr>,
    ) -> Result<Self> {
        let fault = fault.parse().map_err(anyhow::Error::msg)?;
        Self::start_full(
            file,
            model_id,
            (start, end),
            ExecutorConfig::default(),
            bootstrap,
            None,
            |cfg| cfg.compute_fault = Some(fault),
        )
        .await
    }

    async fn start_node(
        file: &ModelFile,
        model_id: &str,
        start: usize,
        end: usize,
        exec_cfg: ExecutorConfig,
        bootstrap: Vec<Multiaddr>,
        store: Option<std::path::PathBuf>,
    ) -> Result<Self> {
        Self::start_full(
            file,
            model_id,
            (start, end),
            exec_cfg,
            bootstrap,
            store,
            |_| {},
        )
        .await
    }

    async fn start_full(
        file: &ModelFile,
        model_id: &str,
        (start, end): (usize, usize),
        exec_cfg: ExecutorConfig,
        bootstrap: Vec<Multiaddr>,
        store: Option<std::path::PathBuf>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<Self> {
        let blocks = BlockRange::new(start as u32, end as u32)?;
        let mut cfg = NodeConfig {
            model_id: Some(model_id.to_string()),
            net: NetConfig {
                bootstrap,
                heartbeat: Duration::from_millis(500),
                ..NetConfig::default()
            },
            store,
            executor: exec_cfg,
            ..NodeConfig::new(file.path().to_string_lossy(), BlockChoice::Range(blocks))
        };
        tweak(&mut cfg);
        let node = Node::start(cfg).await?;
        Ok(Self {
            net: node.net.clone(),
            exec: node.exec.clone(),
            addr: node.addr().context("server not listening")?.clone(),
            node,
        })
    }

    /// The server's adapters.
    pub fn adapters(&self) -> &nomoat_node::server::adapters::Adapters {
        &self.node.adapters
    }

    /// Stops the server and its network: its peers see the connection drop.
    pub async fn kill(&self) {
        self.node.shutdown().await;
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
        let found = nomoat_node::net::discover(net, bootstrap, model_id).await?;
        if found.len() >= n {
            return Ok(found);
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} servers announced themselves", found.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `nomoat` binary cargo built for the calling test: a test of the
/// package that owns the binary gets its path from cargo, so
/// `cargo test` always runs the binary of the code under test.
#[macro_export]
macro_rules! nomoat_bin {
    () => {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_nomoat"))
    };
}

/// Defines, in the calling test file, `nomoat_bin()` (the binary cargo
/// built for it, see [`nomoat_bin!`](crate::nomoat_bin)) and `serve(ARGS)`
/// (starts `nomoat serve ARGS` and waits for its first stdout line).
#[macro_export]
macro_rules! process_helpers {
    () => {
        /// The `nomoat` binary cargo built for this test.
        #[allow(dead_code)]
        fn nomoat_bin() -> anyhow::Result<std::path::PathBuf> {
            Ok($crate::nomoat_bin!())
        }

        /// Starts `nomoat serve ARGS` and waits for its first stdout line.
        #[allow(dead_code)]
        fn serve(args: &[&str]) -> anyhow::Result<$crate::harness::Proc> {
            $crate::harness::serve(&nomoat_bin()?, args)
        }

        /// Starts `nomoat serve` of SmolLM2's blocks `blocks`, announcing
        /// every half second, bootstrapping from `bootstrap`, with `extra`
        /// arguments.
        #[allow(dead_code)]
        fn smollm2_serve(
            blocks: &str,
            bootstrap: Option<&str>,
            extra: &[&str],
        ) -> anyhow::Result<$crate::harness::Proc> {
            let mut args = vec![
                "--model",
                "smollm2-135m",
                "--blocks",
                blocks,
                "--heartbeat",
                "0.5",
            ];
            if let Some(b) = bootstrap {
                args.extend(["--bootstrap", b]);
            }
            args.extend(extra);
            serve(&args)
        }
    };
}

/// The greedy chat answer of `BIN generate` to `prompt`, at most
/// `max_tokens` long, with `extra` flags (`--swarm`, `--adapter`) and
/// `env`; fails with its stderr when it fails.
pub fn greedy_text(
    bin: &std::path::Path,
    model: &str,
    prompt: &str,
    max_tokens: usize,
    extra: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<String> {
    let out = std::process::Command::new(bin)
        .args(["generate", "--model", model, "--chat", "--temperature", "0"])
        .args(["--max-tokens", &max_tokens.to_string(), "--prompt", prompt])
        .args(extra)
        .envs(env.iter().copied())
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Waits (up to `timeout`) until `BIN status --swarm BOOT` shows `servers`
/// servers and no block uncovered; gives that status.
pub fn wait_swarm_covered(
    bin: &std::path::Path,
    boot: &str,
    servers: usize,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let out = std::process::Command::new(bin)
            .args(["status", "--swarm", boot, "--json"])
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let n = status["servers"].as_array().map_or(0, Vec::len);
        let gaps = status["models"][0]["gaps"].as_array().map_or(1, Vec::len);
        if n == servers && gaps == 0 {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the swarm never covered every block: {status}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A `nomoat serve` process, killed when dropped.
pub type Proc = nomoat_node::process::ServeProcess;

/// Starts `BIN serve ARGS` and waits for its first stdout line.
pub fn serve(bin: &std::path::Path, args: &[&str]) -> Result<Proc> {
    Ok(Proc::spawn(bin, args, Duration::from_secs(60))?)
}

/// A raw `/nomoat/infer/1` stream to a server, for tests that play a peer
/// message by message (bad input, early push streams).
#[derive(Debug)]
pub struct Raw {
    /// The read half.
    pub r: futures::io::ReadHalf<libp2p::Stream>,
    /// The write half.
    pub w: futures::io::WriteHalf<libp2p::Stream>,
    /// The last receipt [`recv`](Self::recv) passed over.
    pub receipt: Option<nomoat_protocol::Receipt>,
}

impl Raw {
    /// Opens a stream from `net` to `peer`.
    pub async fn open(net: &NetHandle, peer: libp2p::PeerId) -> Result<Self> {
        use futures::AsyncReadExt;
        let s = net
            .control()
            .open_stream(
                peer,
                libp2p::StreamProtocol::new(nomoat_protocol::INFER_PROTOCOL),
            )
            .await?;
        let (r, w) = s.split();
        Ok(Self {
            r,
            w,
            receipt: None,
        })
    }

    /// Sends one message.
    pub async fn send(&mut self, m: &nomoat_protocol::InferMessage) -> Result<()> {
        Ok(nomoat_node::net::wire::write_message(&mut self.w, m).await?)
    }

    /// The next message but receipts (kept in [`receipt`](Self::receipt)),
    /// waiting up to 15 s (`None` at the stream's end).
    pub async fn recv(&mut self) -> Result<Option<nomoat_protocol::InferMessage>> {
        loop {
            let read = nomoat_node::net::wire::read_message(&mut self.r);
            match tokio::time::timeout(Duration::from_secs(15), read).await?? {
                Some(nomoat_protocol::InferMessage::Receipt(r)) => self.receipt = Some(r),
                other => return Ok(other),
            }
        }
    }

    /// Expects an error frame with `code`.
    pub async fn expect_error(&mut self, code: nomoat_protocol::ErrorCode) -> Result<()> {
        match self.recv().await? {
            Some(nomoat_protocol::InferMessage::Error(e)) => {
                anyhow::ensure!(e.code == Some(code), "expected a {code:?} error, got {e}");
                Ok(())
            }
            other => bail!("expected a {code:?} error, got {other:?}"),
        }
    }
}

/// The whole model's logits for `prompt`, then for each token of `decode`.
pub fn local_trace(
    file: &nomoat_node::engine::ModelFile,
    prompt: &[u32],
    decode: &[u32],
) -> Result<Vec<candle_core::Tensor>> {
    use nomoat_node::engine::{LocalModel, WeightMode};
    let model = LocalModel::load_whole(file, WeightMode::Fast)?;
    session_trace(&model, model.new_session(), prompt, decode)
}

/// The logits of `prompt` and then of each `decode` token, one at a time,
/// through `session` of `model` (e.g. one with an adapter).
pub fn session_trace(
    model: &nomoat_node::engine::LocalModel,
    mut session: nomoat_node::engine::LocalSession,
    prompt: &[u32],
    decode: &[u32],
) -> Result<Vec<candle_core::Tensor>> {
    let mut out = vec![model.forward_logits(&mut session, prompt)?];
    for t in decode {
        out.push(model.forward_logits(&mut session, &[*t])?);
    }
    Ok(out)
}

/// The largest difference between two traces, step by step.
pub fn worst_diff(a: &[candle_core::Tensor], b: &[candle_core::Tensor]) -> Result<f32> {
    let mut w = 0f32;
    for (x, y) in a.iter().zip(b) {
        w = w.max(crate::max_abs_diff(x, y)?);
    }
    Ok(w)
}

/// The same trace as [`local_trace`] through a remote session.
pub async fn remote_trace(
    head: &nomoat_node::engine::Head,
    session: &mut nomoat_node::client::RemoteSession,
    prompt: &[u32],
    decode: &[u32],
) -> Result<Vec<candle_core::Tensor>> {
    use nomoat_node::engine::{hidden_from_frame, hidden_to_frame};
    let hidden = head.config().hidden_size;
    let mut pos = 0u32;
    let mut out = Vec::new();
    let inputs = std::iter::once(prompt.to_vec()).chain(decode.iter().map(|t| vec![*t]));
    for tokens in inputs {
        let frame = hidden_to_frame(&head.embed(&tokens)?, nomoat_protocol::DType::F32)?;
        let h = session.step(pos, frame).await?;
        out.push(head.logits(&hidden_from_frame(&h, hidden)?)?);
        pos += tokens.len() as u32;
    }
    Ok(out)
}
