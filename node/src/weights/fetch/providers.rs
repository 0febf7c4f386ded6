//! The first two steps of a fetch: the peers that may hold a model, and
//! its manifest, checked against the model id.

use std::collections::HashSet;

use libp2p::{Multiaddr, PeerId};
use nomoat_protocol::{Hash, Manifest, WeightsRequest, WeightsResponse};
use tracing::{debug, info, warn};

use super::exchange::{ask, PeerError};
use super::{FetchError, DEFAULT_STALL_TIMEOUT, DISCOVERY_TIMEOUT};
use crate::net::NetHandle;
use crate::store::ChunkStore;

/// Peers that may hold model `id`: the bootstrap peers, the servers they
/// know of, and the DHT's providers.
pub async fn find_providers(net: &NetHandle, bootstrap: &[Multiaddr], id: &Hash) -> Vec<PeerId> {
    let hex = id.to_hex();
    let mut peers = Vec::new();
    for addr in bootstrap {
        if let Ok(p) = net.dial(addr.clone()).await {
            peers.push(p);
        }
    }
    if let Ok(servers) = crate::net::discover(net, bootstrap, &hex).await {
        peers.extend(
            servers
                .iter()
                .filter_map(|s| PeerId::from_bytes(&s.peer_id).ok()),
        );
    }
    peers.extend(net.providers(&hex, DISCOVERY_TIMEOUT).await);
    peers.retain(|p| *p != net.peer_id());
    let mut seen = HashSet::new();
    peers.retain(|p| seen.insert(*p));
    peers
}

/// The manifest of `id`: from the store, or from the first peer whose
/// answer hashes to `id` (which is then stored). A manifest that does not
/// hash to its id is refused and the next peer asked.
pub async fn fetch_manifest(
    net: &NetHandle,
    store: &ChunkStore,
    id: &Hash,
    peers: &[PeerId],
) -> Result<Manifest, FetchError> {
    let s = store.clone();
    let id = *id;
    if let Ok(m) = blocking(move || s.manifest(&id)).await {
        return Ok(m);
    }
    if peers.is_empty() {
        return Err(FetchError::NoProviders(id));
    }
    let mut last = String::new();
    for &peer in peers {
        let got = async {
            let req = WeightsRequest::Manifest { model_id: id };
            match ask(
                net,
                peer,
                &req,
                DEFAULT_STALL_TIMEOUT,
                DEFAULT_STALL_TIMEOUT,
            )
            .await?
            {
                WeightsResponse::Manifest(bytes) => Ok(bytes),
                WeightsResponse::Error(e) => Err(PeerError::Refused(e.to_string())),
                _ => Err(PeerError::Unexpected),
            }
        }
        .await;
        match got {
            Ok(bytes) => match Manifest::decode_verified(&bytes, &id) {
                Ok(m) => {
                    let s = store.clone();
                    let m2 = m.clone();
                    blocking(move || s.put_manifest(&m2)).await?;
                    info!(%peer, "manifest of {id} fetched and verified");
                    return Ok(m);
                }
                Err(e) => {
                    warn!(%peer, "manifest refused: {e}");
                    last = format!("{peer}: {e}");
                }
            },
            Err(e) => {
                debug!(%peer, "no manifest: {e}");
                last = format!("{peer}: {e}");
            }
        }
    }
    Err(FetchError::Manifest {
        id,
        tried: peers.len(),
        last,
    })
}

pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}
