//! A whole server node assembled from its parts: the network, the weight
//! store (served to peers, completed from them), the span on its executor
//! thread, announcements, rebalancing and an optional gateway.
//!
//! [`Node::start`] is the one place a server is put together: `nomoat
//! serve`, `nomoat demo` (through its server processes) and the in-process
//! test harness all call it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use libp2p::Multiaddr;
use nomoat_scheduler::{BlockRange, RangeError};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::catalog::CatalogError;
use crate::engine::{EngineError, ModelFile, Span, WeightMode};
use crate::gateway::LaunchError;
use crate::net::{self, DiscoverError, NetConfig, NetError, NetHandle};
use crate::server::executor::{Executor, ExecutorConfig};
use crate::server::rebalance::{
    self, run_rebalancer, LoadError, Moves, RebalanceConfig, SpanLoader,
};
use crate::server::{run_server, ServerConfig};
use crate::store::{ChunkStore, StoreError};
use crate::weights::fetch::{FetchConfig, FetchReport, Need};
use crate::weights::serve::{serve_weights_with, Fault, WeightLimits};
use crate::weights::{ModelError, StoreModel};

/// How long [`Node::start`] waits for its listeners.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Node::shutdown`] lets the server task finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Which blocks a node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockChoice {
    /// Exactly these.
    Range(BlockRange),
    /// The window of `max_blocks` that most raises the swarm's weakest
    /// block, chosen after a short random delay.
    Auto {
        /// BlockRange the node holds.
        max_blocks: u32,
    },
}

/// The gateway a node runs in its own process.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// The HTTP address.
    pub addr: SocketAddr,
    /// The name the model is served under.
    pub name: String,
    /// Keys a request to `/v1` must bear; none: the API is open.
    pub api_keys: Vec<String>,
}

/// Everything a server node needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// A catalog name, a model file or directory, or a model id from
    /// `nomoat import` (then fetched from `net.bootstrap` where missing).
    pub model: String,
    /// The swarm's model id to serve under; by default the model id, or the
    /// BLAKE3 hash of the model file.
    pub model_id: Option<String>,
    /// The blocks to serve.
    pub blocks: BlockChoice,
    /// The network node.
    pub net: NetConfig,
    /// Relays to listen through (for nodes behind NAT).
    pub relays: Vec<Multiaddr>,
    /// The weight store's directory; `None` for no store (a node serving a
    /// model file and sharing no weights).
    pub store: Option<PathBuf>,
    /// How chunks are fetched.
    pub fetch: FetchConfig,
    /// Test-only misbehaviour of the weight server.
    pub fault: Fault,
    /// Test-only lies about the span's outputs.
    pub compute_fault: Option<crate::server::fault::ComputeFault>,
    /// How many weight requests the node serves at once.
    pub weight_limits: WeightLimits,
    /// Sessions, KV budget and idle timeout.
    pub executor: ExecutorConfig,
    /// How weights are held in memory.
    pub weights: WeightMode,
    /// Rebalancing; only with [`BlockChoice::Auto`].
    pub rebalance: Option<RebalanceConfig>,
    /// A gateway in the node's process.
    pub api: Option<ApiConfig>,
    /// Most memory the whole process may take (weights, KV caches,
    /// working memory); `None`: no limit, KV gets a share of what is free.
    pub max_memory: Option<u64>,
    /// LoRA adapters to load (from the store or from peers) before
    /// serving, and announce; others load on a session's first use.
    pub adapters: Vec<nomoat_protocol::Hash>,
}

impl NodeConfig {
    /// Serves `blocks` of `model` with every other setting at its default.
    pub fn new(model: impl Into<String>, blocks: BlockChoice) -> Self {
        Self {
            model: model.into(),
            model_id: None,
            blocks,
            net: NetConfig::default(),
            relays: Vec::new(),
            store: Some(crate::catalog::home()),
            fetch: FetchConfig::default(),
            fault: Fault::default(),
            compute_fault: None,
            weight_limits: WeightLimits::default(),
            executor: ExecutorConfig::default(),
            weights: WeightMode::Fast,
            rebalance: None,
            api: None,
            max_memory: None,
            adapters: Vec::new(),
        }
    }
}

/// Why a node did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The network node failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The swarm could not be asked where to go (`--blocks auto`).
    #[error(transparent)]
    Discover(#[from] DiscoverError),
    /// The model is not in the catalog or could not be fetched.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The weight store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The model's weights could not be found or fetched.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The span could not be loaded.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The blocks asked for do not fit the model.
    #[error("{source}: the model has blocks 0..{num_blocks}")]
    BadBlocks {
        /// What is wrong with them.
        #[source]
        source: RangeError,
        /// The model's blocks.
        num_blocks: u32,
    },
    /// A model id's blocks were asked for without a weight store.
    #[error("a model id needs a weight store to fetch into")]
    NoStore,
    /// The model file could not be hashed.
    #[error("hashing {path}: {source}")]
    Hash {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The executor thread did not start.
    #[error("starting the executor: {0}")]
    Executor(std::io::Error),
    /// The node listens nowhere.
    #[error("could not listen on {0:?}")]
    NotListening(Vec<Multiaddr>),
    /// The gateway did not start.
    #[error(transparent)]
    Api(#[from] LaunchError),
    /// An adapter given with `--adapter` could not be loaded.
    #[error("{0}")]
    Adapter(String),
    /// The span does not fit `--max-memory`.
    #[error(transparent)]
    Memory(#[from] crate::server::memory::MemoryError),
    /// A compute task panicked.
    #[error("loading the span: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// A running server node.
#[derive(Debug)]
pub struct Node {
    /// Its network handle.
    pub net: NetHandle,
    /// Its executor.
    pub exec: Executor,
    /// The model id it serves under.
    pub model_id: String,
    /// The blocks it serves now (a rebalanced node moves).
    pub blocks: BlockRange,
    /// Its listen addresses, each ending in `/p2p/PEER_ID`.
    pub listen: Vec<Multiaddr>,
    /// What it fetched before serving, if anything.
    pub fetched: Option<FetchReport>,
    /// The gateway's HTTP address, with `api`.
    pub api: Option<SocketAddr>,
    /// Moves made by rebalancing.
    pub moves: Arc<Moves>,
    /// The LoRA adapters it holds.
    pub adapters: crate::server::adapters::Adapters,
    shutdown: CancellationToken,
    server: std::sync::Mutex<Option<JoinHandle<Result<(), libp2p_stream::AlreadyRegistered>>>>,
    api_net: Option<NetHandle>,
}

/// Loads blocks `a..b` of `file` on a blocking thread.
async fn load_span(
    file: Arc<ModelFile>,
    a: u32,
    b: u32,
    weights: WeightMode,
) -> Result<Span, NodeError> {
    Ok(
        tokio::task::spawn_blocking(move || Span::load(&file, a as usize, b as usize, weights))
            .await??,
    )
}

/// `--blocks auto`: waits a random moment (so servers starting together do
/// not all pick the same window), looks at the swarm and takes the window
/// that most raises its weakest block.
async fn auto_blocks(
    net: &NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
    num_blocks: u32,
    max_blocks: u32,
) -> Result<BlockRange, NodeError> {
    let delay = rand::random::<u64>() % 1000;
    tokio::time::sleep(Duration::from_millis(delay)).await;
    net.subscribe(model_id).await;
    let servers = if bootstrap.is_empty() {
        Vec::new()
    } else {
        net::discover(net, bootstrap, model_id).await?
    };
    let placed = rebalance::placed(&servers);
    // A joining server is assumed typical too.
    let mine = rebalance::typical_throughput(&servers);
    let (span, min) = nomoat_scheduler::choose_span(num_blocks, &placed, max_blocks.max(1), mine)
        .ok_or(NodeError::BadBlocks {
        source: RangeError::Empty { start: 0, end: 0 },
        num_blocks,
    })?;
    eprintln!(
        "placement: {} server(s) known; taking blocks {span} (weakest block then at {min:.1} tokens/s)",
        servers.len()
    );
    Ok(span)
}

impl Node {
    /// Starts a server node: joins the swarm, fetches the span's missing
    /// chunks from peers (serving its own store meanwhile), loads the span,
    /// and serves it (and the gateway, with `api`) until [`shutdown`](Self::shutdown).
    pub async fn start(mut cfg: NodeConfig) -> Result<Self, NodeError> {
        if cfg.max_memory.is_some() && cfg.weights == WeightMode::Fast {
            // Under a limit no weight may be held twice.
            cfg.weights = WeightMode::Compact;
        }
        let store_id = crate::weights::parse_model_id(&cfg.model);
        let file = match store_id {
            Some(_) => None,
            None => Some(ModelFile::open(crate::catalog::resolve(&cfg.model, true)?)?),
        };
        let bootstrap = cfg.net.bootstrap.clone();
        let mut net_cfg = cfg.net.clone();
        let key = net_cfg
            .keypair
            .get_or_insert_with(libp2p::identity::Keypair::generate_ed25519)
            .clone();
        if cfg.api.is_some() && !net_cfg.access.allow.is_empty() {
            // The server's own API node is always let in.
            let api = net::access::api_identity(&key).public().to_peer_id();
            net_cfg.access.allow.push(api);
        }
        let cfg = NodeConfig {
            net: net_cfg,
            ..cfg
        };
        let net = net::start(cfg.net.clone()).await?;
        let shutdown = CancellationToken::new();
        let result = Self::assemble(&cfg, file, store_id, &net, &bootstrap, &shutdown).await;
        if result.is_err() {
            shutdown.cancel();
            net.shutdown().await;
        }
        result
    }

    async fn assemble(
        cfg: &NodeConfig,
        file: Option<ModelFile>,
        store_id: Option<nomoat_protocol::Hash>,
        net: &NetHandle,
        bootstrap: &[Multiaddr],
        shutdown: &CancellationToken,
    ) -> Result<Self, NodeError> {
        for relay in &cfg.relays {
            net.dial(relay.clone()).await?;
            net.listen_on(relay.clone().with(libp2p::multiaddr::Protocol::P2pCircuit))
                .await?;
        }
        // Peers may fetch from this node's store while it fetches itself.
        let store = cfg.store.as_deref().map(ChunkStore::open).transpose()?;
        if let Some(store) = &store {
            tokio::spawn(serve_weights_with(
                net.clone(),
                store.clone(),
                cfg.fault,
                cfg.weight_limits,
                shutdown.clone(),
            ));
        }
        let mut stored = match (store_id, &store) {
            (Some(id), Some(store)) => {
                Some(StoreModel::open(net, store.clone(), id, bootstrap).await?)
            }
            (Some(_), None) => return Err(NodeError::NoStore),
            (None, _) => None,
        };
        let (n, file_id) = match (&stored, &file) {
            (Some(m), _) => (m.manifest.num_blocks, m.id.to_hex()),
            (None, Some(f)) => (
                f.config().num_blocks as u32,
                crate::weights::model_file_id(f.path()).map_err(|source| NodeError::Hash {
                    path: f.path().to_path_buf(),
                    source,
                })?,
            ),
            (None, None) => unreachable!("a model is a file or a model id"),
        };
        let model_id = cfg.model_id.clone().unwrap_or(file_id);
        // With a memory limit: what each block and the head take once
        // loaded, known from the header before anything is fetched.
        let sizes = match cfg.max_memory {
            Some(limit) => {
                let opened;
                let f = match (&stored, &file) {
                    (Some(m), _) => {
                        opened = m.file()?;
                        &opened
                    }
                    (None, Some(f)) => f,
                    (None, None) => unreachable!("a model is a file or a model id"),
                };
                let tensors = f.stored_tensors();
                let head = if cfg.api.is_some() {
                    crate::engine::head_bytes(&tensors, cfg.weights)
                } else {
                    0
                };
                let per_block = crate::engine::block_bytes(&tensors, n, cfg.weights);
                Some((limit, f.config().clone(), per_block, head))
            }
            None => None,
        };
        let blocks = match &cfg.blocks {
            BlockChoice::Auto { max_blocks } => {
                let mut max_blocks = *max_blocks;
                if let Some((limit, mcfg, per_block, head)) = &sizes {
                    let fit =
                        crate::server::memory::blocks_that_fit(*limit, mcfg, per_block, *head);
                    if fit < max_blocks {
                        eprintln!(
                            "memory: --max-memory {} MiB holds at most {fit} blocks; taking {fit} rather than {max_blocks}",
                            limit >> 20
                        );
                    }
                    max_blocks = max_blocks.min(fit);
                    if max_blocks == 0 {
                        // The budget's error says what one block needs.
                        crate::server::memory::budget(
                            *limit,
                            mcfg,
                            per_block,
                            BlockRange::new(0, 1).map_err(|source| NodeError::BadBlocks {
                                source,
                                num_blocks: n,
                            })?,
                            *head,
                            None,
                        )?;
                    }
                }
                auto_blocks(net, bootstrap, &model_id, n, max_blocks).await?
            }
            BlockChoice::Range(b) => {
                b.check_within(n).map_err(|source| NodeError::BadBlocks {
                    source,
                    num_blocks: n,
                })?;
                *b
            }
        };
        let mut executor = cfg.executor.clone();
        if let Some((limit, mcfg, per_block, head)) = &sizes {
            let b = crate::server::memory::budget(
                *limit,
                mcfg,
                per_block,
                blocks,
                *head,
                cfg.executor.kv_bytes,
            )?;
            eprintln!(
                "memory: --max-memory {} MiB: weights {} MiB, head {} MiB, reserve {} MiB, KV caches {} MiB",
                b.limit >> 20,
                b.weights >> 20,
                b.head >> 20,
                b.reserve >> 20,
                b.kv >> 20
            );
            executor.kv_bytes = Some(b.kv);
            // The reserve holds the working memory of sessions this long.
            executor.max_context = Some(crate::server::memory::RESERVE_CONTEXT as usize);
        }
        let mut fetched = None;
        let file = Arc::new(match (&mut stored, file) {
            (Some(m), _) => {
                let need = Need {
                    blocks: blocks.start..blocks.end,
                    head: false,
                };
                fetched = m.fetch(net, &need, cfg.fetch.clone()).await?;
                m.file()?
            }
            (None, Some(f)) => f,
            (None, None) => unreachable!("a model is a file or a model id"),
        });
        let span = Arc::new(load_span(file.clone(), blocks.start, blocks.end, cfg.weights).await?);
        let exec = Executor::start(span, executor).map_err(NodeError::Executor)?;
        let listen = net
            .wait_listening(cfg.net.listen.len() + cfg.relays.len(), LISTEN_TIMEOUT)
            .await;
        if listen.is_empty() {
            exec.shutdown();
            return Err(NodeError::NotListening(cfg.net.listen.clone()));
        }
        let (api, api_net) = match &cfg.api {
            Some(a) => {
                let (addr, api_net) = crate::gateway::serve_in_process(
                    a.addr,
                    crate::gateway::GatewayConfig::new(a.name.clone())
                        .with_api_keys(a.api_keys.clone()),
                    &file,
                    net,
                    &cfg.net,
                    bootstrap,
                    &model_id,
                    cfg.weights,
                    shutdown.clone(),
                )
                .await?;
                (Some(addr), Some(api_net))
            }
            None => (None, None),
        };
        let moves = Arc::new(Moves::default());
        let rebalance = match (&cfg.rebalance, cfg.max_memory) {
            (Some(_), Some(_)) => {
                eprintln!("rebalance: off under --max-memory (a move holds two spans at once)");
                None
            }
            (r, _) => r.as_ref(),
        };
        if let (BlockChoice::Auto { .. }, Some(rcfg)) = (&cfg.blocks, rebalance) {
            let weights = cfg.weights;
            // A move loads the new span from the file, or fetches its
            // chunks from peers first when the model lives in the store.
            let loader: SpanLoader = match stored {
                Some(m) => {
                    let m = Arc::new(tokio::sync::Mutex::new(m));
                    let (net, fetch_cfg) = (net.clone(), cfg.fetch.clone());
                    Arc::new(move |a: u32, b: u32| {
                        let (m, net, fetch_cfg) = (m.clone(), net.clone(), fetch_cfg.clone());
                        Box::pin(async move {
                            let mut m = m.lock().await;
                            let need = Need {
                                blocks: a..b,
                                head: false,
                            };
                            m.fetch(&net, &need, fetch_cfg).await?;
                            let file = m.file()?;
                            drop(m);
                            Ok::<_, LoadError>(load_span(Arc::new(file), a, b, weights).await?)
                        })
                    })
                }
                None => {
                    let file = file.clone();
                    Arc::new(move |a: u32, b: u32| {
                        let file = file.clone();
                        Box::pin(async move {
                            Ok::<_, LoadError>(load_span(file, a, b, weights).await?)
                        })
                    })
                }
            };
            tokio::spawn(run_rebalancer(
                net.clone(),
                exec.clone(),
                model_id.clone(),
                loader,
                rcfg.clone(),
                moves.clone(),
                shutdown.clone(),
            ));
        }
        let adapters = crate::server::adapters::Adapters::new(
            net.clone(),
            store.clone(),
            model_id.clone(),
            file.config().clone(),
            bootstrap.to_vec(),
            cfg.fetch.clone(),
        );
        for id in &cfg.adapters {
            let a = adapters
                .get(*id, blocks.start as usize, blocks.end as usize, None)
                .await
                .map_err(|e| NodeError::Adapter(e.message))?;
            eprintln!("adapter {id} loaded for blocks {}..{}", a.start(), a.end());
        }
        tokio::spawn(crate::client::watch_evidence(
            net.clone(),
            model_id.clone(),
            shutdown.clone(),
        ));
        let server = tokio::spawn(run_server(
            net.clone(),
            exec.clone(),
            ServerConfig {
                model_id: model_id.clone(),
                adapters: Some(adapters.clone()),
                fault: cfg.compute_fault.clone(),
            },
            shutdown.clone(),
        ));
        Ok(Self {
            net: net.clone(),
            exec,
            model_id,
            blocks,
            listen,
            fetched,
            api,
            moves,
            adapters,
            shutdown: shutdown.clone(),
            server: std::sync::Mutex::new(Some(server)),
            api_net,
        })
    }

    /// The first listen address, with `/p2p/PEER_ID`: what others
    /// bootstrap from.
    pub fn addr(&self) -> Option<&Multiaddr> {
        self.listen.first()
    }

    /// The line `nomoat serve` prints once it serves: peer id, listen
    /// addresses, model id, blocks, and what it fetched and where its API
    /// is when it did and has one.
    pub fn hello(&self) -> serde_json::Value {
        let mut hello = serde_json::json!({
            "peer_id": self.net.peer_id().to_string(),
            "listen": self.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "model_id": self.model_id,
            "blocks": self.blocks.to_string(),
        });
        if let Some(r) = &self.fetched {
            hello["fetch"] = r.to_json();
        }
        if let Some(addr) = &self.api {
            hello["api"] = format!("http://{addr}/v1").into();
            hello["dashboard"] = format!("http://{addr}/").into();
        }
        hello
    }

    /// Stops serving: open sessions end, peers see the connections drop.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        let server = self.server.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(server) = server {
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, server).await;
        }
        self.exec.shutdown();
        if let Some(api_net) = &self.api_net {
            api_net.shutdown().await;
        }
        self.net.shutdown().await;
    }
}
