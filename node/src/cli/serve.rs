//! `nomoat serve`: a server node, assembled by [`nomoat_node::node::Node`].

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::engine::WeightMode;
use nomoat_node::net::NetConfig;
use nomoat_node::node::{ApiConfig, BlockChoice, Node, NodeConfig};
use nomoat_node::server::executor::{
    ExecutorConfig, DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_SESSIONS, DEFAULT_OPEN_GRACE,
};
use nomoat_node::server::rebalance::RebalanceConfig;
use nomoat_node::shutdown::shutdown_signal;
use nomoat_scheduler::BlockRange;

use crate::cli::access::AccessArgs;

/// Network flags shared by every swarm command.
#[derive(Debug, Args)]
pub(crate) struct NetArgs {
    /// Address to listen on (repeatable), e.g. /ip4/0.0.0.0/udp/4001/quic-v1
    /// for a fixed port to forward. The default is QUIC and TCP on every
    /// interface, on free ports.
    #[arg(long, default_values = nomoat_node::net::DEFAULT_LISTEN)]
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
    #[command(flatten)]
    access: AccessArgs,
}

impl NetArgs {
    fn config(&self, bootstrap: Vec<Multiaddr>) -> Result<NetConfig> {
        self.access.config(
            NetConfig {
                listen: self.listen.clone(),
                bootstrap,
                mdns: self.mdns,
                relay_server: self.relay_server,
                heartbeat: Duration::from_secs_f64(self.heartbeat.max(0.1)),
                external: self.external.clone(),
                ..NetConfig::default()
            },
            true,
        )
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
    /// BlockRange to serve, e.g. 0..10, or `auto`: after a short random delay,
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
    /// Most sessions one peer may hold (default: half of --max-sessions);
    /// one peer also gets at most the same share of --kv-memory.
    #[arg(long)]
    max_sessions_per_peer: Option<usize>,
    /// Memory all sessions' KV caches may reserve, e.g. 2GiB (default: half
    /// the memory available once the span is loaded). A session reserves
    /// the bytes its longest context takes on this span.
    #[arg(long, value_parser = crate::parse_size)]
    kv_memory: Option<u64>,
    /// Most memory this server may take in all, e.g. 600MiB: the span's
    /// weights, the head with --api, a reserve for the runtime and one
    /// step's working memory, and KV caches (what is left, unless
    /// --kv-memory says less). --blocks auto then takes the most blocks
    /// (up to --max-blocks) that fit; rebalancing is off.
    #[arg(long, value_parser = crate::parse_size)]
    max_memory: Option<u64>,
    /// A LoRA adapter id (from `nomoat import-adapter`, or held by peers)
    /// to load before serving and announce (repeatable). Sessions may name
    /// other adapters too: they load on first use.
    #[arg(long)]
    adapter: Vec<String>,
    /// Seconds after which an idle session is dropped.
    #[arg(long, default_value_t = DEFAULT_IDLE_TIMEOUT.as_secs())]
    idle_timeout: u64,
    /// fast, compact, exact or f32 (see `nomoat generate --help`).
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
    fetch: crate::cli::weights::FetchArgs,
    /// Weight requests served at once to all peers; more are answered busy.
    #[arg(long, default_value_t = nomoat_node::weights::serve::MAX_INBOUND_WEIGHT_STREAMS)]
    weight_streams: usize,
    /// Weight requests served at once to one peer; more are answered busy.
    #[arg(long, default_value_t = nomoat_node::weights::serve::MAX_WEIGHT_STREAMS_PER_PEER)]
    weight_streams_per_peer: usize,
    /// The keys of the --api gateway.
    #[command(flatten)]
    keys: crate::cli::gateway::ApiKeyArgs,
    /// Test-only: lie about the span's outputs (perturb, perturb:SCALE or skip,
    /// then ,after=N ,rate=P ,client=PEER), for spot checks to catch.
    #[arg(long, hide = true)]
    fault_compute: Option<nomoat_node::server::fault::ComputeFault>,
}

/// `nomoat serve`: starts the node, prints its JSON line and serves until
/// SIGINT or SIGTERM.
pub(crate) async fn serve(args: ServeArgs) -> Result<()> {
    let blocks = if args.blocks == "auto" {
        BlockChoice::Auto {
            max_blocks: args.max_blocks,
        }
    } else {
        BlockChoice::Range(args.blocks.parse::<BlockRange>()?)
    };
    let rebalance = (args.blocks == "auto" && !args.no_rebalance).then(|| RebalanceConfig {
        period: Duration::from_secs_f64(args.rebalance_period.max(0.1)),
        cooldown: Duration::from_secs_f64(args.rebalance_cooldown.max(0.0)),
        ..RebalanceConfig::default()
    });
    let cfg = NodeConfig {
        net: args.net.config(args.bootstrap.clone())?,
        relays: args.net.relay.clone(),
        fetch: args.fetch.config(),
        fault: args.fetch.fault(),
        compute_fault: args.fault_compute.clone(),
        weight_limits: nomoat_node::weights::serve::WeightLimits {
            streams: args.weight_streams.max(1),
            streams_per_peer: args.weight_streams_per_peer.max(1),
        },
        executor: ExecutorConfig {
            max_sessions: args.max_sessions.max(1),
            max_sessions_per_peer: args
                .max_sessions_per_peer
                .unwrap_or(args.max_sessions / 2)
                .max(1),
            kv_bytes: args.kv_memory,
            idle_timeout: Duration::from_secs(args.idle_timeout),
            open_grace: DEFAULT_OPEN_GRACE.min(Duration::from_secs(args.idle_timeout.max(1))),
            max_context: None,
        },
        weights: args.weights,
        rebalance,
        api: match args.api {
            Some(addr) => {
                let api_keys = args.keys.keys()?;
                crate::cli::gateway::warn_if_open(addr, &api_keys);
                Some(ApiConfig {
                    addr,
                    name: nomoat_node::gateway::model_name(&args.model),
                    api_keys,
                })
            }
            None => None,
        },
        max_memory: args.max_memory,
        adapters: args
            .adapter
            .iter()
            .map(|a| nomoat_protocol::Hash::from_hex(a))
            .collect::<Result<_, _>>()
            .context("--adapter takes an adapter id, 64 hex digits")?,
        ..NodeConfig::new(args.model.clone(), blocks)
    };
    let node = Node::start(cfg).await?;
    println!("{}", node.hello());
    std::io::stdout().flush()?;
    shutdown_signal().await;
    eprintln!("shutting down");
    node.shutdown().await;
    Ok(())
}

/// `nomoat relay`: a node that serves no blocks, for a reachable machine
/// that helps others: a circuit relay for servers behind NAT (and the
/// rendezvous of their hole punching), and a DHT peer to bootstrap from.
#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Address to listen on (repeatable); the default is QUIC and TCP on
    /// every interface, on free ports (pick fixed ones for others to use).
    #[arg(long, default_values = nomoat_node::net::DEFAULT_LISTEN)]
    listen: Vec<Multiaddr>,
    /// Peers to join (repeatable), addresses ending in /p2p/PEER_ID.
    #[arg(long)]
    bootstrap: Vec<Multiaddr>,
    /// An address others can reach this node at (repeatable), e.g. its
    /// public IP; its interface addresses are handed out too.
    #[arg(long)]
    external: Vec<Multiaddr>,
    #[command(flatten)]
    access: AccessArgs,
}

/// `nomoat relay`: prints `{"peer_id", "listen"}` and relays until SIGINT
/// or SIGTERM.
pub(crate) async fn relay(args: RelayArgs) -> Result<()> {
    let n = args.listen.len();
    let net = nomoat_node::net::start(args.access.config(
        NetConfig {
            listen: args.listen,
            bootstrap: args.bootstrap,
            relay_server: true,
            external: args.external,
            ..NetConfig::default()
        },
        true,
    )?)
    .await?;
    let listen = net.wait_listening(n, Duration::from_secs(10)).await;
    if listen.is_empty() {
        anyhow::bail!("the relay listens nowhere; check --listen");
    }
    let hello = serde_json::json!({
        "peer_id": net.peer_id().to_string(),
        "listen": listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "relay": true,
    });
    println!("{hello}");
    std::io::stdout().flush()?;
    shutdown_signal().await;
    eprintln!("shutting down");
    net.shutdown().await;
    Ok(())
}
