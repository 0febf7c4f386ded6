//! Answers `/nomoat/weights/1` from the local weight store: manifests,
//! chunks by hash, and which blocks this node holds.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    chunk_frame_header, ErrorCode, Hash, WeightsRequest, WeightsResponse, WEIGHTS_PROTOCOL,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use crate::net::wire::read_frame;
use crate::net::NetHandle;
use crate::store::ChunkStore;

/// Most weight requests served at once; more are refused by closing them.
pub const MAX_INBOUND_WEIGHT_STREAMS: usize = 32;
/// How long a peer may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stalling test peer ([`Fault::Stall`]) holds a request.
const STALL: Duration = Duration::from_secs(3600);

/// Deliberate misbehaviour, for tests of the fetcher's defences only
/// (`nomoat serve --fault ...`, a hidden flag). Never use it otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Fault {
    /// Behave.
    #[default]
    None,
    /// Flip a byte in every chunk sent.
    FlipChunks,
    /// Flip a byte in every manifest sent.
    TamperManifest,
    /// Accept chunk requests and never answer them.
    Stall,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "flip-chunks" => Ok(Self::FlipChunks),
            "tamper-manifest" => Ok(Self::TamperManifest),
            "stall" => Ok(Self::Stall),
            other => Err(format!(
                "unknown fault `{other}`: none, flip-chunks, tamper-manifest or stall"
            )),
        }
    }
}

/// Serves `/nomoat/weights/1` until `shutdown`.
pub async fn serve_weights(
    net: NetHandle,
    store: ChunkStore,
    fault: Fault,
    shutdown: CancellationToken,
) {
    let mut control = net.control();
    let Ok(mut incoming) = control.accept(StreamProtocol::new(WEIGHTS_PROTOCOL)) else {
        return;
    };
    let slots = Arc::new(Semaphore::new(MAX_INBOUND_WEIGHT_STREAMS));
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = incoming.next() => next,
        };
        let Some((peer, stream)) = next else { break };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "weight request refused: too many at once");
            continue;
        };
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(
            async move {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    r = answer(store, fault, peer, stream) => {
                        if let Err(e) = r {
                            debug!("weight request failed: {e}");
                        }
                    }
                }
                drop(permit);
            }
            .instrument(tracing::debug_span!("weights", %peer)),
        );
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, std::io::Error> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(std::io::Error::other)
}

async fn answer(
    store: ChunkStore,
    fault: Fault,
    peer: PeerId,
    mut stream: Stream,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let body = tokio::time::timeout(REQUEST_TIMEOUT, read_frame(&mut stream))
        .await
        .map_err(|_| "no request in time")??
        .ok_or("stream closed before a request")?;
    let request = match WeightsRequest::decode(&body) {
        Ok(r) => r,
        Err(e) => {
            let reply = WeightsResponse::error(ErrorCode::from(&e), e.to_string());
            stream.write_all(&reply.encode_framed()).await?;
            stream.close().await?;
            return Ok(());
        }
    };
    let not_found = |what: String| WeightsResponse::error(ErrorCode::NotFound, what);
    match request {
        WeightsRequest::Manifest { model_id } => {
            let s = store.clone();
            let reply = match blocking(move || s.manifest_bytes(&model_id)).await?? {
                Some(mut bytes) => {
                    if fault == Fault::TamperManifest {
                        let i = bytes.len() / 2;
                        bytes[i] ^= 0x40;
                    }
                    WeightsResponse::Manifest(bytes.into())
                }
                None => not_found(format!("no manifest {model_id}")),
            };
            stream.write_all(&reply.encode_framed()).await?;
        }
        WeightsRequest::Have { model_id } => {
            let s = store.clone();
            let have = blocking(move || s.manifest(&model_id).map(|m| s.have(&m))).await?;
            let reply = match have {
                Ok(h) => WeightsResponse::Have(h),
                Err(_) => not_found(format!("no manifest {model_id}")),
            };
            stream.write_all(&reply.encode_framed()).await?;
        }
        WeightsRequest::Chunks { model_id, hashes } => {
            if fault == Fault::Stall {
                tokio::time::sleep(STALL).await;
                return Ok(());
            }
            if !store.manifest_path(&model_id).is_file() {
                let reply = not_found(format!("no manifest {model_id}"));
                stream.write_all(&reply.encode_framed()).await?;
            } else {
                send_chunks(&store, fault, &hashes, &mut stream).await?;
            }
        }
        _ => {
            let reply = WeightsResponse::error(ErrorCode::Unsupported, "unknown request");
            stream.write_all(&reply.encode_framed()).await?;
        }
    }
    debug!(%peer, "weight request answered");
    stream.close().await?;
    Ok(())
}

/// Sends each chunk (or NotFound) in request order; the next chunk is read
/// from disk while the current one is written.
async fn send_chunks(
    store: &ChunkStore,
    fault: Fault,
    hashes: &[Hash],
    stream: &mut Stream,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let read = |h: Hash| {
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.get(&h))
    };
    let mut next = hashes.first().map(|h| read(*h));
    for (i, hash) in hashes.iter().enumerate() {
        let data = match next.take() {
            Some(j) => j.await??,
            None => None,
        };
        next = hashes.get(i + 1).map(|h| read(*h));
        match data {
            Some(mut data) => {
                if fault == Fault::FlipChunks && !data.is_empty() {
                    let j = data.len() / 2;
                    data[j] ^= 0x01;
                }
                stream
                    .write_all(&chunk_frame_header(hash, data.len()))
                    .await?;
                stream.write_all(&data).await?;
            }
            None => {
                let reply = WeightsResponse::error(ErrorCode::NotFound, format!("no chunk {hash}"));
                stream.write_all(&reply.encode_framed()).await?;
            }
        }
    }
    stream.flush().await?;
    Ok(())
}
