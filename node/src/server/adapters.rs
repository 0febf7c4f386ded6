//! The LoRA adapters a server holds for its span, loaded on a session's
//! first use: from the store when they are there, else fetched from peers
//! (the manifest, then only the chunks of the span's blocks, each checked
//! against its hash), with no restart. A held adapter is announced (in the
//! server's `ServerInfo` and as a DHT provider record) so others fetch it
//! from here.
//!
//! Bounds: at most [`MAX_HELD_ADAPTERS`] are held (the least recently used
//! one no session runs with is dropped for a new one), one load runs at a
//! time, each within [`ADAPTER_LOAD_TIMEOUT`], and an id that failed to
//! load is not tried again for [`FAILED_RETRY_AFTER`] (so a peer naming
//! made-up ids costs one search each, not one per session).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use nomoat_protocol::{ErrorCode, Hash};

use super::executor::ExecError;
use crate::engine::{ModelConfig, SpanAdapter};
use crate::net::NetHandle;
use crate::store::ChunkStore;
use crate::weights::adapter::{adapter_meta, open_adapter};
use crate::weights::fetch::{self, FetchConfig, Need};

/// Most adapters a server holds at once.
pub const MAX_HELD_ADAPTERS: usize = 16;
/// How long loading one adapter (search, manifest, chunks) may take.
pub const ADAPTER_LOAD_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an adapter that failed to load is refused before it is tried
/// again.
pub const FAILED_RETRY_AFTER: Duration = Duration::from_secs(30);
/// Most failed ids remembered.
const MAX_FAILED: usize = 256;
/// How long the DHT is asked for an adapter's providers.
const PROVIDERS_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Held {
    span: (usize, usize),
    adapter: Arc<SpanAdapter>,
    used: Instant,
}

#[derive(Debug, Default)]
struct State {
    held: HashMap<Hash, Held>,
    failed: HashMap<Hash, (Instant, String)>,
    stats: AdapterStats,
}

/// What a server's adapter loads did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdapterStats {
    /// Adapters loaded.
    pub loaded: u64,
    /// Loads that failed.
    pub failed: u64,
    /// Chunks fetched from peers.
    pub fetched_chunks: u64,
    /// Chunks from peers that failed their hash check (and were fetched
    /// again elsewhere).
    pub rejected_chunks: u64,
}

/// The adapters of one server.
#[derive(Debug, Clone)]
pub struct Adapters {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    net: NetHandle,
    store: Option<ChunkStore>,
    model_id: String,
    config: ModelConfig,
    bootstrap: Vec<Multiaddr>,
    fetch: FetchConfig,
    state: Mutex<State>,
    loading: tokio::sync::Mutex<()>,
}

impl Adapters {
    /// No adapter held yet; `store` keeps fetched ones (without a store a
    /// server runs only adapters it cannot have, so none).
    pub fn new(
        net: NetHandle,
        store: Option<ChunkStore>,
        model_id: String,
        config: ModelConfig,
        bootstrap: Vec<Multiaddr>,
        fetch: FetchConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                net,
                store,
                model_id,
                config,
                bootstrap,
                fetch,
                state: Mutex::new(State::default()),
                loading: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What the loads so far did.
    pub fn stats(&self) -> AdapterStats {
        self.state().stats
    }

    /// The adapters held for blocks `[start, end)`, for announcements.
    pub fn held(&self, start: usize, end: usize) -> Vec<Hash> {
        let mut ids: Vec<Hash> = self
            .state()
            .held
            .iter()
            .filter(|(_, h)| h.span == (start, end))
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids.truncate(nomoat_protocol::MAX_ANNOUNCED_ADAPTERS);
        ids
    }

    fn cached(&self, id: &Hash, span: (usize, usize)) -> Option<Arc<SpanAdapter>> {
        let mut st = self.state();
        let h = st.held.get_mut(id).filter(|h| h.span == span)?;
        h.used = Instant::now();
        Some(h.adapter.clone())
    }

    /// Adapter `id` for blocks `[start, end)` (the server's span): held, or
    /// loaded now from the store or from peers, `asker` (the peer whose
    /// session names it) first.
    pub async fn get(
        &self,
        id: Hash,
        start: usize,
        end: usize,
        asker: Option<PeerId>,
    ) -> Result<Arc<SpanAdapter>, ExecError> {
        let span = (start, end);
        if let Some(a) = self.cached(&id, span) {
            return Ok(a);
        }
        if let Some((when, why)) = self.state().failed.get(&id) {
            if when.elapsed() < FAILED_RETRY_AFTER {
                return Err(unavailable(id, why));
            }
        }
        let _one_at_a_time = self.inner.loading.lock().await;
        // Another session may have loaded it meanwhile.
        if let Some(a) = self.cached(&id, span) {
            return Ok(a);
        }
        let loaded = tokio::time::timeout(ADAPTER_LOAD_TIMEOUT, self.load(id, start, end, asker))
            .await
            .unwrap_or_else(|_| Err(format!("not loaded within {ADAPTER_LOAD_TIMEOUT:?}")));
        match loaded {
            Ok(adapter) => {
                let adapter = Arc::new(adapter);
                {
                    let mut st = self.state();
                    st.failed.remove(&id);
                    if st.held.len() >= MAX_HELD_ADAPTERS && !st.held.contains_key(&id) {
                        // The least recently used one no session holds.
                        let idle = st
                            .held
                            .iter()
                            .filter(|(_, h)| Arc::strong_count(&h.adapter) == 1)
                            .min_by_key(|(_, h)| h.used)
                            .map(|(k, _)| *k);
                        match idle {
                            Some(k) => {
                                st.held.remove(&k);
                            }
                            None => {
                                return Err(ExecError::new(
                                    ErrorCode::Busy,
                                    format!("server busy: {MAX_HELD_ADAPTERS} adapters in use"),
                                ))
                            }
                        }
                    }
                    st.stats.loaded += 1;
                    st.held.insert(
                        id,
                        Held {
                            span,
                            adapter: adapter.clone(),
                            used: Instant::now(),
                        },
                    );
                }
                self.inner.net.provide(&id.to_hex()).await;
                Ok(adapter)
            }
            Err(why) => {
                let mut st = self.state();
                st.stats.failed += 1;
                if st.failed.len() >= MAX_FAILED {
                    st.failed
                        .retain(|_, (t, _)| t.elapsed() < FAILED_RETRY_AFTER);
                    if st.failed.len() >= MAX_FAILED {
                        st.failed.clear();
                    }
                }
                st.failed.insert(id, (Instant::now(), why.clone()));
                Err(unavailable(id, &why))
            }
        }
    }

    /// Loads an adapter from the store, fetching its manifest and the
    /// span's chunks from peers first where they are missing.
    async fn load(
        &self,
        id: Hash,
        start: usize,
        end: usize,
        asker: Option<PeerId>,
    ) -> Result<SpanAdapter, String> {
        let inner = &self.inner;
        let store = inner
            .store
            .clone()
            .ok_or("this server keeps no weight store to put adapters in")?;
        let blocks = start as u32..end as u32;
        let began = Instant::now();
        let manifest = match store.manifest(&id) {
            Ok(m) => m,
            Err(_) => {
                let peers = self.providers(&id, asker).await;
                fetch::fetch_manifest(&inner.net, &store, &id, &peers)
                    .await
                    .map_err(|e| e.to_string())?
            }
        };
        let meta = adapter_meta(&id, &manifest).map_err(|e| e.to_string())?;
        meta.check_base(&inner.model_id, &inner.config)
            .map_err(|e| e.to_string())?;
        let need = Need {
            blocks: blocks.clone(),
            head: false,
        };
        if !store
            .missing(&manifest.chunks_for(&need.blocks, false))
            .is_empty()
        {
            let peers = self.providers(&id, asker).await;
            let r = fetch::fetch_chunks(
                &inner.net,
                &store,
                &id,
                &manifest,
                &peers,
                &need,
                inner.fetch.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut st = self.state();
            st.stats.fetched_chunks += r.fetched as u64;
            st.stats.rejected_chunks += r.rejected as u64;
            if r.rejected > 0 {
                tracing::warn!(adapter = %id, "{} adapter chunk(s) failed their hash check", r.rejected);
            }
        }
        let (model_id, config) = (inner.model_id.clone(), inner.config.clone());
        let adapter = tokio::task::spawn_blocking(move || {
            let w = open_adapter(&store, &id, &config, &model_id, Some(blocks))
                .map_err(|e| e.to_string())?;
            w.span(start, end).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        tracing::info!(adapter = %id, "adapter loaded for blocks {start}..{end} in {:?}", began.elapsed());
        Ok(adapter)
    }

    /// Peers that may hold adapter `id`: the asker, servers of this model
    /// announcing it, DHT providers, and the bootstrap peers.
    async fn providers(&self, id: &Hash, asker: Option<PeerId>) -> Vec<PeerId> {
        let inner = &self.inner;
        let mut peers: Vec<PeerId> = asker.into_iter().collect();
        peers.extend(
            inner
                .net
                .servers(&inner.model_id)
                .iter()
                .filter(|s| s.adapters.contains(id))
                .filter_map(|s| PeerId::from_bytes(&s.peer_id).ok()),
        );
        peers.extend(inner.net.providers(&id.to_hex(), PROVIDERS_TIMEOUT).await);
        for addr in &inner.bootstrap {
            if let Ok(p) = inner.net.dial(addr.clone()).await {
                peers.push(p);
            }
        }
        let me = inner.net.peer_id();
        peers.retain(|p| *p != me);
        let mut seen = std::collections::HashSet::new();
        peers.retain(|p| seen.insert(*p));
        peers
    }
}

fn unavailable(id: Hash, why: &str) -> ExecError {
    ExecError::new(
        ErrorCode::NotFound,
        format!("adapter {id} is not available on this server: {why}"),
    )
}
