//! Fetching a model from peers: the manifest (checked against the model
//! id), then only the chunks a span (or the head) needs, from several peers
//! in parallel. Every chunk is checked (length, then BLAKE3) before it is
//! stored; a peer that sends a bad chunk is penalised and, after
//! [`FetchConfig::max_faults`] faults, banned, and its chunks are fetched
//! elsewhere. Chunks already in the store are never fetched again, so a
//! killed fetch resumes where it stopped.
//!
//! The transfer goes `Providers -> Manifest -> Chunks -> Done`:
//! [`find_providers`], [`fetch_manifest`], [`fetch_chunks`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use nomoat_protocol::{
    ChunkRef, ErrorCode, Hash, Have, Manifest, MessageError, TensorRole, WeightsRequest,
    WeightsResponse, WEIGHTS_PROTOCOL,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn, Instrument};

use super::store::{ChunkStore, StoreError};
use crate::swarm::net::NetHandle;
use crate::swarm::wire::{read_frame, write_frame, WireError};

/// Chunks asked for in one request.
pub const DEFAULT_BATCH: usize = 16;
/// Requests in flight to one peer at once.
pub const DEFAULT_STREAMS_PER_PEER: usize = 4;
/// How long a peer may take to send the next chunk (or to answer) before
/// it counts as stalled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Faults (bad chunk, wrong length, stall, broken stream) after which a
/// peer is banned for the rest of the fetch.
pub const DEFAULT_MAX_FAULTS: u32 = 3;
/// Most times one chunk is asked for before the fetch gives up on it.
pub const MAX_CHUNK_ATTEMPTS: u32 = 8;
/// How long to wait for the DHT and for each peer's list of held blocks.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How a fetch behaves.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Chunks per request.
    pub batch: usize,
    /// Requests in flight per peer.
    pub streams_per_peer: usize,
    /// See [`DEFAULT_STALL_TIMEOUT`].
    pub stall_timeout: Duration,
    /// See [`DEFAULT_MAX_FAULTS`].
    pub max_faults: u32,
    /// Most bytes per second over all peers (`None`: as fast as they go).
    pub max_rate: Option<f64>,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            batch: DEFAULT_BATCH,
            streams_per_peer: DEFAULT_STREAMS_PER_PEER,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            max_faults: DEFAULT_MAX_FAULTS,
            max_rate: None,
            progress: true,
        }
    }
}

impl FetchConfig {
    /// Caps the download rate (bytes per second).
    pub fn with_max_rate(mut self, bytes_per_s: Option<f64>) -> Self {
        self.max_rate = bytes_per_s.filter(|r| *r > 0.0);
        self
    }

    /// Turns the progress bar on or off.
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No peer offers the model.
    #[error("no peer provides model {0:#}: check the --bootstrap addresses, and that a node serving this model id is running")]
    NoProviders(Hash),
    /// No peer gave a manifest that hashes to the model id.
    #[error("no peer gave a valid manifest for model {id:#} ({tried} tried; last: {last}); check the model id")]
    Manifest {
        /// The model id.
        id: Hash,
        /// Peers asked.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// Some chunks could be fetched from no peer.
    #[error("{missing} chunk(s) could not be fetched from any honest peer ({reason}); run the command again to resume, or bootstrap from other peers")]
    Incomplete {
        /// Chunks still missing.
        missing: usize,
        /// Why, for the last chunk that failed.
        reason: String,
    },
    /// The store failed (disk full, not writable).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Distinct chunks the span needs.
    pub needed: usize,
    /// Of those, already in the store at the start.
    pub already: usize,
    /// Chunks asked for (retries included).
    pub requested: usize,
    /// Chunks received, verified and stored.
    pub fetched: usize,
    /// Bytes of those.
    pub bytes: u64,
    /// Wall time of the chunk transfer.
    pub secs: f64,
    /// CPU time spent hashing received chunks.
    pub hash_secs: f64,
    /// How long the fetch went on after the last chunk arrived, waiting for
    /// the store threads to verify and write what they still held.
    pub store_tail_secs: f64,
    /// Time workers spent waiting because [`MAX_UNSTORED_BYTES`] of received
    /// chunks were waiting for the store threads (summed over workers).
    pub store_wait_secs: f64,
    /// Chunks that failed their check (wrong hash or length).
    pub rejected: usize,
    /// Chunks stored from each peer.
    pub per_peer: Vec<(PeerId, usize)>,
    /// Peers banned for repeated faults.
    pub banned: Vec<PeerId>,
}

impl FetchReport {
    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "needed": self.needed,
            "already": self.already,
            "requested": self.requested,
            "fetched": self.fetched,
            "bytes": self.bytes,
            "secs": self.secs,
            "hash_secs": self.hash_secs,
            "store_tail_secs": self.store_tail_secs,
            "store_wait_secs": self.store_wait_secs,
            "rejected": self.rejected,
            "per_peer": self.per_peer.iter().map(|(p, n)| (p.to_string(), (*n).into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "banned": self.banned.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        })
    }
}

/// Why one request to one peer failed.
#[derive(Debug, thiserror::Error)]
enum PeerError {
    #[error("cannot open a stream: {0}")]
    Open(String),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("stalled: nothing within {0:?}")]
    Stalled(Duration),
    #[error("closed the stream early")]
    Closed,
    #[error("invalid answer: {0}")]
    Message(#[from] MessageError),
    #[error("answered {0}")]
    Refused(String),
    #[error("unexpected answer")]
    Unexpected,
}

/// One request-answer exchange; for `Chunks`, the answers come one by one
/// through [`Exchange::next`].
struct Exchange {
    stream: libp2p::Stream,
    stall: Duration,
}

impl Exchange {
    async fn open(
        net: &NetHandle,
        peer: PeerId,
        req: &WeightsRequest,
        stall: Duration,
    ) -> Result<Self, PeerError> {
        let fut = async {
            net.connect_known(peer).await;
            let mut stream = net
                .control()
                .open_stream(peer, StreamProtocol::new(WEIGHTS_PROTOCOL))
                .await
                .map_err(|e| PeerError::Open(e.to_string()))?;
            write_frame(&mut stream, &req.encode()).await?;
            Ok::<_, PeerError>(stream)
        };
        let stream = tokio::time::timeout(stall, fut)
            .await
            .map_err(|_| PeerError::Stalled(stall))??;
        Ok(Self { stream, stall })
    }

    async fn next(&mut self) -> Result<WeightsResponse, PeerError> {
        let frame = tokio::time::timeout(self.stall, read_frame(&mut self.stream))
            .await
            .map_err(|_| PeerError::Stalled(self.stall))??
            .ok_or(PeerError::Closed)?;
        Ok(WeightsResponse::decode_bytes(Bytes::from(frame))?)
    }

    async fn close(mut self) {
        let _ = self.stream.close().await;
    }
}

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
    if let Ok(servers) = crate::swarm::client::discover(net, bootstrap, &hex).await {
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
            let mut ex = Exchange::open(
                net,
                peer,
                &WeightsRequest::Manifest { model_id: id },
                DEFAULT_STALL_TIMEOUT,
            )
            .await?;
            let r = ex.next().await;
            ex.close().await;
            match r? {
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

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// What a peer holds, as the groups a chunk may belong to.
#[derive(Debug, Clone, Default)]
struct Holds {
    blocks: HashSet<u32>,
    head: bool,
}

impl Holds {
    fn from_have(h: Have) -> Self {
        Self {
            blocks: h.blocks.into_iter().collect(),
            head: h.head,
        }
    }

    fn any(&self) -> bool {
        self.head || !self.blocks.is_empty()
    }

    fn serves(&self, roles: &[TensorRole]) -> bool {
        roles.iter().any(|r| match r {
            TensorRole::Block(b) => self.blocks.contains(b),
            TensorRole::Shared => self.any(),
            r if r.is_head() => self.head,
            _ => false,
        })
    }
}

struct Sched {
    queue: VecDeque<usize>,
    in_flight: usize,
    attempts: Vec<u32>,
    excluded: Vec<HashSet<PeerId>>,
    faults: HashMap<PeerId, u32>,
    banned: Vec<PeerId>,
    per_peer: HashMap<PeerId, usize>,
    failed: usize,
    last_failure: String,
    fatal: Option<StoreError>,
    /// When the latest chunk arrived.
    last_received: Option<Instant>,
    report: FetchReport,
}

struct Shared {
    chunks: Vec<ChunkRef>,
    roles: Vec<Vec<TensorRole>>,
    /// How many peers hold each chunk.
    holders: Vec<usize>,
    holds: HashMap<PeerId, Holds>,
    sched: Mutex<Sched>,
    wake: Notify,
    /// Permits (one per KiB) for received chunks not yet stored.
    unstored: Arc<tokio::sync::Semaphore>,
    store: ChunkStore,
    model_id: Hash,
    cfg: FetchConfig,
    started: Instant,
    bar: indicatif::ProgressBar,
}

impl Shared {
    fn sched(&self) -> std::sync::MutexGuard<'_, Sched> {
        self.sched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn can_serve(&self, peer: &PeerId, i: usize, s: &Sched) -> bool {
        !s.excluded[i].contains(peer) && self.holds[peer].serves(&self.roles[i])
    }

    /// Takes up to a batch of chunks this peer can serve, rarest first (so
    /// chunks that several peers hold stay for whichever of them is free);
    /// `Err(true)` when there is nothing left for it now but may be later,
    /// `Err(false)` when it is done.
    fn take(&self, peer: &PeerId) -> Result<Vec<usize>, bool> {
        let mut s = self.sched();
        if s.banned.contains(peer) || s.fatal.is_some() {
            return Err(false);
        }
        let mut mine: Vec<usize> = s
            .queue
            .iter()
            .copied()
            .filter(|&i| self.can_serve(peer, i, &s))
            .collect();
        // Stable: queue order among chunks of equal rarity.
        mine.sort_by_key(|&i| self.holders[i]);
        mine.truncate(self.cfg.batch);
        if mine.is_empty() {
            // Chunks in flight elsewhere may come back to the queue.
            return Err(s.in_flight > 0);
        }
        let taken: HashSet<usize> = mine.iter().copied().collect();
        s.queue.retain(|i| !taken.contains(i));
        s.in_flight += mine.len();
        s.report.requested += mine.len();
        Ok(mine)
    }

    /// A chunk came back unfetched: queue it again, unless it has been
    /// tried too often; `fault` names a peer to penalise and exclude.
    fn requeue(&self, i: usize, fault: Option<(&PeerId, String)>) {
        let mut s = self.sched();
        s.in_flight -= 1;
        s.attempts[i] += 1;
        if let Some((peer, why)) = fault {
            s.excluded[i].insert(*peer);
            s.last_failure = format!("{peer}: {why}");
        }
        if s.attempts[i] >= MAX_CHUNK_ATTEMPTS {
            s.failed += 1;
        } else {
            s.queue.push_back(i);
        }
        drop(s);
        self.wake.notify_waiters();
    }

    /// Penalises a peer; returns whether it is now banned.
    fn penalise(&self, peer: &PeerId, why: &str) -> bool {
        let mut s = self.sched();
        let n = {
            let f = s.faults.entry(*peer).or_default();
            *f += 1;
            *f
        };
        let ban = n >= self.cfg.max_faults && !s.banned.contains(peer);
        if ban {
            s.banned.push(*peer);
        }
        drop(s);
        if ban {
            warn!(%peer, "peer banned after {n} faults (last: {why})");
        } else {
            warn!(%peer, "peer penalised ({n}/{}): {why}", self.cfg.max_faults);
        }
        ban
    }

    fn done(&self, peer: &PeerId, len: u64, hash_time: Duration) {
        let mut s = self.sched();
        s.in_flight -= 1;
        s.report.fetched += 1;
        s.report.bytes += len;
        s.report.hash_secs += hash_time.as_secs_f64();
        *s.per_peer.entry(*peer).or_default() += 1;
        drop(s);
        self.bar.inc(len);
        self.wake.notify_waiters();
    }

    /// Sleeps as long as the rate cap needs.
    async fn pace(&self) {
        let Some(rate) = self.cfg.max_rate else {
            return;
        };
        let bytes = self.sched().report.bytes as f64;
        let due = Duration::from_secs_f64(bytes / rate);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// One worker: takes batches this peer can serve and fetches them.
async fn worker(shared: Arc<Shared>, net: NetHandle, peer: PeerId) {
    // Each iteration handles a batch or waits for one; bounded by the total
    // attempts of all chunks, and every wait by the stall timeout.
    let max_rounds = shared.chunks.len() * MAX_CHUNK_ATTEMPTS as usize + 1;
    let mut refused = 0u32;
    for _ in 0..max_rounds {
        let batch = match shared.take(&peer) {
            Ok(b) => b,
            Err(true) => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), shared.wake.notified()).await;
                continue;
            }
            Err(false) => return,
        };
        match fetch_batch(&shared, &net, peer, &batch).await {
            Batch::Done => refused = 0,
            Batch::Stop => return,
            Batch::Refused(why) => {
                // A busy peer may refuse a stream: back off and retry; only
                // refusals in a row count as a fault.
                refused += 1;
                if refused >= OPEN_RETRIES {
                    refused = 0;
                    if shared.penalise(&peer, &why) {
                        return;
                    }
                }
                let jitter = rand::random::<u64>() % 50;
                let backoff = 25u64 << refused.min(6);
                tokio::time::sleep(Duration::from_millis(backoff + jitter)).await;
            }
        }
        shared.pace().await;
    }
}

/// Stream refusals in a row that count as one fault.
const OPEN_RETRIES: u32 = 3;

/// How one batch went.
enum Batch {
    /// Fetched (some chunks may have gone back to the queue).
    Done,
    /// The peer is banned, or the fetch must stop.
    Stop,
    /// The peer did not take the request; the batch went back to the queue.
    Refused(String),
}

/// Fetches one batch from `peer`. Received chunks are verified and written
/// on the low-priority store threads ([`super::background`]) while the next
/// ones arrive.
async fn fetch_batch(
    shared: &Arc<Shared>,
    net: &NetHandle,
    peer: PeerId,
    batch: &[usize],
) -> Batch {
    let hashes = batch.iter().map(|&i| shared.chunks[i].hash).collect();
    let req = WeightsRequest::Chunks {
        model_id: shared.model_id,
        hashes,
    };
    let mut ex = match Exchange::open(net, peer, &req, shared.cfg.stall_timeout).await {
        Ok(ex) => ex,
        Err(e @ PeerError::Stalled(_)) => {
            for &i in batch {
                shared.requeue(i, Some((&peer, e.to_string())));
            }
            return if shared.penalise(&peer, &e.to_string()) {
                Batch::Stop
            } else {
                Batch::Done
            };
        }
        Err(e) => {
            debug!(%peer, "request refused: {e}");
            let mut s = shared.sched();
            s.in_flight -= batch.len();
            s.report.requested -= batch.len();
            s.queue.extend(batch.iter().copied());
            drop(s);
            shared.wake.notify_waiters();
            return Batch::Refused(e.to_string());
        }
    };
    let mut banned = false;
    for (k, &i) in batch.iter().enumerate() {
        let want = shared.chunks[i];
        let fault = match ex.next().await {
            Ok(WeightsResponse::Chunk { hash, .. }) if hash != want.hash => {
                Some(format!("sent chunk {hash} where {} was asked", want.hash))
            }
            Ok(WeightsResponse::Chunk { data, .. }) if data.len() != want.len as usize => {
                Some(format!(
                    "chunk {} has {} bytes, the manifest says {}",
                    want.hash,
                    data.len(),
                    want.len
                ))
            }
            Ok(WeightsResponse::Chunk { data, .. }) => {
                store_chunk(shared, peer, i, data).await;
                None
            }
            Ok(WeightsResponse::Error(e)) if e.code == Some(ErrorCode::NotFound) => {
                // Not a fault: the peer just lacks it.
                let mut s = shared.sched();
                s.excluded[i].insert(peer);
                s.in_flight -= 1;
                s.queue.push_back(i);
                drop(s);
                shared.wake.notify_waiters();
                continue;
            }
            Ok(other) => Some(format!("answered {other:?} to a chunk request")),
            Err(e) => {
                // The stream is unusable: the rest of the batch goes back.
                let why = e.to_string();
                for &j in &batch[k..] {
                    shared.requeue(j, Some((&peer, why.clone())));
                }
                banned = shared.penalise(&peer, &why);
                break;
            }
        };
        if let Some(why) = fault {
            shared.requeue(i, Some((&peer, why.clone())));
            if shared.penalise(&peer, &why) {
                for &j in &batch[k + 1..] {
                    shared.requeue(j, None);
                }
                banned = true;
                break;
            }
        }
    }
    ex.close().await;
    if banned {
        Batch::Stop
    } else {
        Batch::Done
    }
}

/// Hands a received chunk to the store threads, which verify and write it
/// while the worker goes on receiving (and asks for its next batch); the
/// outcome is booked when they finish. Waits first while
/// [`MAX_UNSTORED_BYTES`] of received chunks are still waiting for them.
async fn store_chunk(shared: &Arc<Shared>, peer: PeerId, i: usize, data: Bytes) {
    let want = shared.chunks[i];
    let kib = (data.len() as u32).div_ceil(1024).max(1);
    let arrived = Instant::now();
    let Ok(permit) = shared.unstored.clone().acquire_many_owned(kib).await else {
        unreachable!("the fetch never closes its own semaphore");
    };
    {
        let mut s = shared.sched();
        s.last_received = s.last_received.max(Some(arrived));
        s.report.store_wait_secs += arrived.elapsed().as_secs_f64();
    }
    let store = shared.store.clone();
    let job = super::background::spawn(move || store.put_timed(&want.hash, &data));
    let shared = shared.clone();
    tokio::spawn(async move {
        let result = job.await;
        match result {
            Ok((_, hash_time)) => {
                crate::metrics::global().chunks_verified.inc();
                shared.done(&peer, u64::from(want.len), hash_time)
            }
            Err(StoreError::WrongHash { got, .. }) => {
                crate::metrics::global().chunks_rejected.inc();
                shared.sched().report.rejected += 1;
                let why = format!("chunk {} hashes to {got}: corrupt, dropped", want.hash);
                shared.requeue(i, Some((&peer, why.clone())));
                shared.penalise(&peer, &why);
            }
            Err(e) => {
                // Disk full or unwritable: nothing else will succeed.
                let mut s = shared.sched();
                s.in_flight -= 1;
                s.fatal.get_or_insert(e);
                drop(s);
                shared.wake.notify_waiters();
            }
        }
        drop(permit);
    });
}

/// Most bytes of received chunks that may wait for the store threads; a
/// worker that would exceed it waits before reading on.
pub const MAX_UNSTORED_BYTES: usize = 128 << 20;

/// [`MAX_UNSTORED_BYTES`] as semaphore permits of one KiB.
const UNSTORED_PERMITS: u32 = (MAX_UNSTORED_BYTES >> 10) as u32;

/// What a node needs of a model: the blocks of its span (possibly none)
/// and, for a client, the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// Blocks to serve.
    pub blocks: Range<u32>,
    /// Whether the head (embedding, final norm, LM head, tokenizer) is needed.
    pub head: bool,
}

/// Fetches the chunks of `need` that the store lacks, from `peers`, and
/// stores them verified.
pub async fn fetch_chunks(
    net: &NetHandle,
    store: &ChunkStore,
    id: &Hash,
    manifest: &Manifest,
    peers: &[PeerId],
    need: &Need,
    cfg: FetchConfig,
) -> Result<FetchReport, FetchError> {
    let (blocks, head) = (need.blocks.clone(), need.head);
    let wanted = manifest.chunks_for(&blocks, head);
    let needed = wanted.len();
    let s = store.clone();
    let missing = blocking(move || s.missing(&wanted)).await;
    let mut report = FetchReport {
        needed,
        already: needed - missing.len(),
        ..FetchReport::default()
    };
    if missing.is_empty() {
        return Ok(report);
    }
    // Which tensors (roles) each missing chunk belongs to.
    let mut roles: HashMap<Hash, Vec<TensorRole>> = HashMap::new();
    for t in manifest.tensors_for(&blocks, head) {
        for h in &t.chunks {
            roles.entry(*h).or_default().push(t.role);
        }
    }
    // Ask every peer what it holds.
    let mut holds = HashMap::new();
    let asks = peers.iter().map(|&peer| async move {
        let r = async {
            let mut ex = Exchange::open(
                net,
                peer,
                &WeightsRequest::Have { model_id: *id },
                DISCOVERY_TIMEOUT,
            )
            .await?;
            let r = ex.next().await;
            ex.close().await;
            match r? {
                WeightsResponse::Have(h) => Ok(h),
                WeightsResponse::Error(e) => Err(PeerError::Refused(e.to_string())),
                _ => Err(PeerError::Unexpected),
            }
        }
        .await;
        (peer, r)
    });
    for (peer, r) in futures::future::join_all(asks).await {
        match r {
            Ok(h) if !h.blocks.is_empty() || h.head => {
                debug!(%peer, blocks = h.blocks.len(), head = h.head, "peer holds");
                holds.insert(peer, Holds::from_have(h));
            }
            Ok(_) => debug!(%peer, "peer holds nothing of the model"),
            Err(e) => debug!(%peer, "peer did not say what it holds: {e}"),
        }
    }
    if holds.is_empty() {
        return Err(FetchError::NoProviders(*id));
    }
    let total_bytes: u64 = missing.iter().map(|c| u64::from(c.len)).sum();
    let bar = if cfg.progress {
        let bar = indicatif::ProgressBar::new(total_bytes);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "fetching {bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let n = missing.len();
    let chunk_roles: Vec<Vec<TensorRole>> = missing
        .iter()
        .map(|c| roles.get(&c.hash).cloned().unwrap_or_default())
        .collect();
    let holders = chunk_roles
        .iter()
        .map(|r| holds.values().filter(|h| h.serves(r)).count())
        .collect();
    let shared = Arc::new(Shared {
        roles: chunk_roles,
        holders,
        chunks: missing,
        holds,
        sched: Mutex::new(Sched {
            queue: (0..n).collect(),
            in_flight: 0,
            attempts: vec![0; n],
            excluded: vec![HashSet::new(); n],
            faults: HashMap::new(),
            banned: Vec::new(),
            per_peer: HashMap::new(),
            failed: 0,
            last_failure: String::new(),
            fatal: None,
            last_received: None,
            report: FetchReport::default(),
        }),
        wake: Notify::new(),
        unstored: Arc::new(tokio::sync::Semaphore::new(UNSTORED_PERMITS as usize)),
        store: store.clone(),
        model_id: *id,
        cfg: cfg.clone(),
        started: Instant::now(),
        bar,
    });
    info!(
        chunks = n,
        bytes = total_bytes,
        peers = shared.holds.len(),
        "fetching"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for &peer in shared.holds.keys() {
        for _ in 0..cfg.streams_per_peer.max(1) {
            tasks.spawn(
                worker(shared.clone(), net.clone(), peer)
                    .instrument(tracing::debug_span!("fetch", %peer)),
            );
        }
    }
    while tasks.join_next().await.is_some() {}
    // Chunks handed to the store threads are booked before the report.
    let _stored = shared.unstored.acquire_many(UNSTORED_PERMITS).await;
    let tail = shared
        .sched()
        .last_received
        .map_or(0.0, |t| t.elapsed().as_secs_f64());
    shared.bar.finish_and_clear();
    let last = {
        let mut s = shared.sched();
        if let Some(e) = s.fatal.take() {
            return Err(e.into());
        }
        let r = std::mem::take(&mut s.report);
        report.requested = r.requested;
        report.fetched = r.fetched;
        report.bytes = r.bytes;
        report.hash_secs = r.hash_secs;
        report.store_tail_secs = tail;
        report.store_wait_secs = r.store_wait_secs;
        report.rejected = r.rejected;
        report.secs = shared.started.elapsed().as_secs_f64();
        report.per_peer = s.per_peer.iter().map(|(p, n)| (*p, *n)).collect();
        report.per_peer.sort();
        report.banned = s.banned.clone();
        s.last_failure.clone()
    };
    let wanted = manifest.chunks_for(&blocks, head);
    let s = store.clone();
    let still = blocking(move || s.missing(&wanted)).await.len();
    if still > 0 {
        return Err(FetchError::Incomplete {
            missing: still,
            reason: if last.is_empty() {
                "no peer holds them".into()
            } else {
                last
            },
        });
    }
    Ok(report)
}
