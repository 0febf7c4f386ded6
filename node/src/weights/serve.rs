//! Answers `/nomoat/weights/1` from the local weight store: manifests,
//! chunks by hash, and which blocks this node holds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    chunk_frame_header, ErrorCode, Hash, WeightsRequest, WeightsResponse, WEIGHTS_PROTOCOL,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use crate::net::wire::read_frame_max;
use crate::net::NetHandle;
use crate::store::ChunkStore;

/// Most weight requests served at once, all peers together.
pub const MAX_INBOUND_WEIGHT_STREAMS: usize = 64;
/// Most weight requests served at once for one peer (a fetcher opens
/// [`DEFAULT_STREAMS_PER_PEER`](super::fetch::DEFAULT_STREAMS_PER_PEER) and
/// may ask what this node holds meanwhile).
pub const MAX_WEIGHT_STREAMS_PER_PEER: usize = 8;
/// How long a peer may take to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one write (a chunk, a manifest, an answer) may take: a peer
/// that stops reading loses its stream, and its slot, after this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// `Busy` answers under way at once; past them a stream is dropped.
const MAX_BUSY_ANSWERS: usize = 256;
/// How long the `Busy` answer to a stream past the limits may take.
const BUSY_ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// How many weight requests a node serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightLimits {
    /// All peers together.
    pub streams: usize,
    /// One peer.
    pub streams_per_peer: usize,
}

impl Default for WeightLimits {
    fn default() -> Self {
        Self {
            streams: MAX_INBOUND_WEIGHT_STREAMS,
            streams_per_peer: MAX_WEIGHT_STREAMS_PER_PEER,
        }
    }
}

/// Who holds how many of the slots.
#[derive(Debug, Default)]
struct Slots {
    total: usize,
    per_peer: HashMap<PeerId, usize>,
}

/// One slot, given back when dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    peer: PeerId,
}

impl Slot {
    fn take(slots: &Arc<Mutex<Slots>>, peer: PeerId, limits: WeightLimits) -> Option<Self> {
        let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
        let mine = s.per_peer.get(&peer).copied().unwrap_or(0);
        if s.total >= limits.streams || mine >= limits.streams_per_peer {
            return None;
        }
        s.total += 1;
        *s.per_peer.entry(peer).or_default() += 1;
        Some(Self {
            slots: slots.clone(),
            peer,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total -= 1;
        if let Some(n) = s.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Closes `stream` (flushing it) within [`WRITE_TIMEOUT`].
async fn close_timed(stream: &mut Stream) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.close())
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "closing timed out"))?
}

/// Writes `bytes` within [`WRITE_TIMEOUT`].
async fn write_timed(stream: &mut Stream, bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(bytes))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the peer read nothing for {WRITE_TIMEOUT:?}"),
            )
        })?
}
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

/// Serves `/nomoat/weights/1` until `shutdown`, within the default
/// [`WeightLimits`].
pub async fn serve_weights(
    net: NetHandle,
    store: ChunkStore,
    fault: Fault,
    shutdown: CancellationToken,
) {
    serve_weights_with(net, store, fault, WeightLimits::default(), shutdown).await
}

/// Serves `/nomoat/weights/1` until `shutdown`. A stream past `limits` is
/// answered `Busy` (the fetcher backs off and asks again, counting no
/// fault), never dropped unanswered.
pub async fn serve_weights_with(
    net: NetHandle,
    store: ChunkStore,
    fault: Fault,
    limits: WeightLimits,
    shutdown: CancellationToken,
) {
    let mut control = net.control();
    let Ok(mut incoming) = control.accept(StreamProtocol::new(WEIGHTS_PROTOCOL)) else {
        return;
    };
    let slots: Arc<Mutex<Slots>> = Arc::default();
    // The Busy answers themselves are bounded: past this many at once a
    // stream is dropped, as a last resort.
    let busy_answers = Arc::new(Semaphore::new(MAX_BUSY_ANSWERS));
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = incoming.next() => next,
        };
        let Some((peer, mut stream)) = next else {
            break;
        };
        let Some(slot) = Slot::take(&slots, peer, limits) else {
            debug!(%peer, "weight request refused: busy");
            let Ok(permit) = busy_answers.clone().try_acquire_owned() else {
                continue;
            };
            tokio::spawn(async move {
                let reply = WeightsResponse::error(
                    ErrorCode::Busy,
                    format!(
                        "busy: {} weight requests at once at most, {} per peer; retry later",
                        limits.streams, limits.streams_per_peer
                    ),
                );
                // The request is read first, so the fetcher's write does
                // not fail on a stream already answered.
                let _ = tokio::time::timeout(BUSY_ANSWER_TIMEOUT, async {
                    if let Ok(Some(_)) =
                        read_frame_max(&mut stream, nomoat_protocol::MAX_CONTROL_BYTES).await
                    {
                        let _ = stream.write_all(&reply.encode_framed()).await;
                        let _ = stream.close().await;
                    }
                })
                .await;
                drop(permit);
            });
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
                drop(slot);
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
    let body = tokio::time::timeout(
        REQUEST_TIMEOUT,
        read_frame_max(&mut stream, nomoat_protocol::MAX_CONTROL_BYTES),
    )
    .await
    .map_err(|_| "no request in time")??
    .ok_or("stream closed before a request")?;
    let request = match WeightsRequest::decode(&body) {
        Ok(r) => r,
        Err(e) => {
            let reply = WeightsResponse::error(ErrorCode::from(&e), e.to_string());
            write_timed(&mut stream, &reply.encode_framed()).await?;
            close_timed(&mut stream).await?;
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
            write_timed(&mut stream, &reply.encode_framed()).await?;
        }
        WeightsRequest::Have { model_id } => {
            let s = store.clone();
            let have = blocking(move || s.manifest(&model_id).map(|m| s.have(&m))).await?;
            let reply = match have {
                Ok(h) => WeightsResponse::Have(h),
                Err(_) => not_found(format!("no manifest {model_id}")),
            };
            write_timed(&mut stream, &reply.encode_framed()).await?;
        }
        WeightsRequest::Chunks { model_id, hashes } => {
            if fault == Fault::Stall {
                tokio::time::sleep(STALL).await;
                return Ok(());
            }
            if !store.manifest_path(&model_id).is_file() {
                let reply = not_found(format!("no manifest {model_id}"));
                write_timed(&mut stream, &reply.encode_framed()).await?;
            } else {
                send_chunks(&store, fault, &hashes, &mut stream).await?;
            }
        }
        _ => {
            let reply = WeightsResponse::error(ErrorCode::Unsupported, "unknown request");
            write_timed(&mut stream, &reply.encode_framed()).await?;
        }
    }
    debug!(%peer, "weight request answered");
    close_timed(&mut stream).await?;
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
                write_timed(stream, &chunk_frame_header(hash, data.len())).await?;
                write_timed(stream, &data).await?;
            }
            None => {
                let reply = WeightsResponse::error(ErrorCode::NotFound, format!("no chunk {hash}"));
                write_timed(stream, &reply.encode_framed()).await?;
            }
        }
    }
    tokio::time::timeout(WRITE_TIMEOUT, stream.flush())
        .await
        .map_err(|_| "the peer read nothing in time")??;
    Ok(())
}
