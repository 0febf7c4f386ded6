//! Assembling a gateway: over a swarm reached through bootstrap peers, or
//! inside a server's process on a node of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libp2p::Multiaddr;
use nomoat_scheduler::BlockRange;
use tokio_util::sync::CancellationToken;

use super::{ApiBindError, Backend, Gateway, GatewayConfig, SwarmBackend};
use crate::catalog::CatalogError;
use crate::client::{ranges_text, ClientError};
use crate::engine::{ChatTokenizer, EngineError, Head, ModelFile, WeightMode};
use crate::net::{self, NetConfig, NetError, NetHandle};
use crate::store::{ChunkStore, StoreError};
use crate::weights::ModelError;

/// Why a gateway could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LaunchError {
    /// The model is not in the catalog or could not be fetched.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The model file does not open.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The model id's head could not be fetched or opened.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The weight store did not open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The gateway's network node did not start.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The HTTP address could not be bound.
    #[error(transparent)]
    Bind(#[from] ApiBindError),
    /// The model file could not be hashed into a model id.
    #[error("hashing {path}: {source}")]
    Hash {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The swarm did not serve every block in time.
    #[error(
        "the swarm did not cover the model within {timeout:?}: {why}; \
         check the servers' logs (RUST_LOG=info)"
    )]
    NotCovered {
        /// How long it waited.
        timeout: Duration,
        /// The blocks unserved, or why the swarm could not be asked.
        why: String,
    },
}

/// The name a model is served under: a catalog name as given, a file by
/// its stem.
pub fn model_name(model: &str) -> String {
    let p = Path::new(model);
    if p.exists() {
        p.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| model.to_string())
    } else {
        model.to_string()
    }
}

/// A `--model` argument opened: the file and, for a swarm, its model id. A
/// model id from `nomoat import` opens from the weight store, its head
/// fetched through `bootstrap` when missing (everything, when `bootstrap` is
/// empty); a catalog name or a path opens the file, whose BLAKE3 hash is the
/// id, computed only when there is a swarm (`bootstrap` not empty) to name
/// the model to.
pub async fn open_model(
    model: &str,
    bootstrap: &[Multiaddr],
    net_cfg: &NetConfig,
) -> Result<(ModelFile, Option<String>), LaunchError> {
    match crate::weights::parse_model_id(model) {
        Some(id) => {
            let store = ChunkStore::open(&crate::catalog::home())?;
            let file = crate::weights::open_for_generate(store, id, bootstrap, net_cfg).await?;
            Ok((file, Some(id.to_hex())))
        }
        None => {
            let path = crate::catalog::resolve(model, true)?;
            let id = if bootstrap.is_empty() {
                None
            } else {
                let id =
                    crate::weights::model_file_id(&path).map_err(|source| LaunchError::Hash {
                        path: path.clone(),
                        source,
                    })?;
                Some(id)
            };
            Ok((ModelFile::open(&path)?, id))
        }
    }
}

/// A gateway over the swarm reached through `bootstrap`, on a new network
/// node listening on `listen`; returns it with the node. `model_id`
/// overrides the swarm's model id when `file` is only the source of the
/// head (the demo's servers serve the imported model).
pub async fn swarm_gateway(
    file: &ModelFile,
    model_id: String,
    cfg: GatewayConfig,
    bootstrap: Vec<Multiaddr>,
    net_cfg: NetConfig,
    weights: WeightMode,
    shutdown: CancellationToken,
) -> Result<(Gateway, NetHandle), LaunchError> {
    let tokenizer = ChatTokenizer::from_model(file)?;
    let head = Arc::new(Head::load(file, weights)?);
    // Adapters imported here are offered to the swarm.
    let cfg = match (&cfg.adapters, ChunkStore::open(&crate::catalog::home())) {
        (None, Ok(store)) => cfg.with_adapters(store, model_id.clone()),
        _ => cfg,
    };
    let net = net::start(net_cfg).await?;
    net.subscribe(&model_id).await;
    let backend = Backend::Swarm(SwarmBackend::new(net.clone(), bootstrap, model_id, head));
    let gw = Gateway::new(cfg, backend, tokenizer, file.config().clone(), shutdown);
    Ok((gw, net))
}

/// The gateway of `nomoat serve --api ADDR`, in the server's process. It
/// runs its own peer-to-peer node (a node cannot open streams to itself),
/// listening like the server but on any free port, and joins the swarm
/// through the server. Returns the bound HTTP address and its node.
#[allow(clippy::too_many_arguments)]
pub async fn serve_in_process(
    addr: SocketAddr,
    cfg: GatewayConfig,
    file: &ModelFile,
    server: &NetHandle,
    server_net: &NetConfig,
    bootstrap: &[Multiaddr],
    model_id: &str,
    weights: WeightMode,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, NetHandle), LaunchError> {
    use libp2p::multiaddr::Protocol;
    let any_port: Vec<Multiaddr> = server_net
        .listen
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
    let mut boot = server.listen_addrs();
    boot.extend(bootstrap.iter().cloned());
    let net_cfg = NetConfig {
        listen: any_port,
        keypair: server_net.keypair.as_ref().map(net::access::api_identity),
        access: server_net.access.clone(),
        ..NetConfig::default()
    };
    let (gw, net) = swarm_gateway(
        file,
        model_id.to_string(),
        cfg,
        boot,
        net_cfg,
        weights,
        shutdown.clone(),
    )
    .await?;
    let (listener, local) = super::bind(addr).await?;
    tokio::spawn(super::serve(gw, listener, shutdown));
    Ok((local, net))
}

/// Polls the swarm until every block is served (bounded by `timeout`).
pub async fn wait_covered(gw: &Gateway, timeout: Duration) -> Result<(), LaunchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let gaps: Result<Vec<BlockRange>, ClientError> = gw.refresh().await;
        match &gaps {
            Ok(g) if g.is_empty() => return Ok(()),
            _ if Instant::now() > deadline => {
                let why = match gaps {
                    Ok(g) => format!("blocks {} are not served", ranges_text(&g)),
                    Err(e) => e.to_string(),
                };
                return Err(LaunchError::NotCovered { timeout, why });
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
