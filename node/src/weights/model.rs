//! A model id's weights on this node: the manifest and chunks in the store,
//! fetched from peers where missing, and the model file opened from them.

use libp2p::{Multiaddr, PeerId};
use nomoat_protocol::{Hash, Manifest};

use super::fetch::{self, FetchConfig, FetchError, FetchReport, Need};
use crate::engine::{EngineError, ModelFile};
use crate::net::{self, NetConfig, NetError, NetHandle};
use crate::store::{ChunkStore, StoreError};

/// Why a stored model could not be opened or completed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The weight store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Fetching the manifest or chunks failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The stored model does not open.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The network node for the fetch did not start.
    #[error(transparent)]
    Net(#[from] NetError),
    /// Chunks are missing and there is no peer to fetch them from.
    #[error("model {0} is not (entirely) in the weight store: add --swarm PEER to fetch it, or import the model file")]
    NotStored(Hash),
}

/// A model id's weights on this node: the store, the manifest and the
/// peers that provide it (found only when something had to be fetched).
#[derive(Debug)]
pub struct StoreModel {
    /// The model id.
    pub id: Hash,
    /// The store holding it.
    pub store: ChunkStore,
    /// Its manifest.
    pub manifest: Manifest,
    providers: Vec<PeerId>,
    bootstrap: Vec<Multiaddr>,
}

impl StoreModel {
    /// Finds the manifest: in `store`, or fetched from the peers reachable
    /// through `bootstrap` and checked against the id.
    pub async fn open(
        net: &NetHandle,
        store: ChunkStore,
        id: Hash,
        bootstrap: &[Multiaddr],
    ) -> Result<Self, ModelError> {
        let (manifest, providers) = match store.manifest(&id) {
            Ok(m) => (m, Vec::new()),
            Err(StoreError::UnknownModel(_)) => {
                let providers = fetch::find_providers(net, bootstrap, &id).await;
                let m = fetch::fetch_manifest(net, &store, &id, &providers).await?;
                (m, providers)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            id,
            store,
            manifest,
            providers,
            bootstrap: bootstrap.to_vec(),
        })
    }

    /// The model as stored, if its manifest is; nothing is fetched.
    pub fn stored(store: ChunkStore, id: Hash) -> Result<Self, StoreError> {
        Ok(Self {
            id,
            manifest: store.manifest(&id)?,
            store,
            providers: Vec::new(),
            bootstrap: Vec::new(),
        })
    }

    /// Whether every chunk `need` names is stored.
    pub fn has(&self, need: &Need) -> bool {
        self.store
            .missing(&self.manifest.chunks_for(&need.blocks, need.head))
            .is_empty()
    }

    /// Fetches what `need` lacks; `None` when everything was stored already.
    pub async fn fetch(
        &mut self,
        net: &NetHandle,
        need: &Need,
        cfg: FetchConfig,
    ) -> Result<Option<FetchReport>, ModelError> {
        if self.has(need) {
            return Ok(None);
        }
        if self.providers.is_empty() {
            self.providers = fetch::find_providers(net, &self.bootstrap, &self.id).await;
        }
        let r = fetch::fetch_chunks(
            net,
            &self.store,
            &self.id,
            &self.manifest,
            &self.providers,
            need,
            cfg,
        )
        .await?;
        eprintln!(
            "fetched {} chunk(s), {:.1} MB in {:.1} s ({:.1} MB/s) from {} peer(s); \
             {} already stored; {} rejected, {} peer(s) banned",
            r.fetched,
            r.bytes as f64 / 1e6,
            r.secs,
            r.bytes as f64 / 1e6 / r.secs.max(1e-9),
            r.per_peer.len(),
            r.already,
            r.rejected,
            r.banned.len()
        );
        Ok(Some(r))
    }

    /// The model, loaded from the store.
    pub fn file(&self) -> Result<ModelFile, EngineError> {
        ModelFile::open_store(&self.store, &self.id)
    }
}

/// The model `id` for a generation: from the store, fetching what is
/// missing (the head for a swarm generation, everything for a local one,
/// i.e. when `swarm` is empty) from the swarm's peers.
pub async fn open_for_generate(
    store: ChunkStore,
    id: Hash,
    swarm: &[Multiaddr],
    net_cfg: &NetConfig,
) -> Result<ModelFile, ModelError> {
    if let Ok(model) = StoreModel::stored(store.clone(), id) {
        let blocks = if swarm.is_empty() {
            0..model.manifest.num_blocks
        } else {
            0..0
        };
        if model.has(&Need { blocks, head: true }) {
            return Ok(model.file()?);
        }
    }
    if swarm.is_empty() {
        return Err(ModelError::NotStored(id));
    }
    let net = net::start(net_cfg.clone()).await?;
    let result = async {
        let mut model = StoreModel::open(&net, store, id, swarm).await?;
        let need = Need {
            blocks: 0..0,
            head: true,
        };
        model.fetch(&net, &need, FetchConfig::default()).await?;
        Ok(model.file()?)
    }
    .await;
    net.shutdown().await;
    result
}
