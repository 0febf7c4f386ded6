//! The chunks of a span from many peers at once: workers per peer take
//! batches from the scheduler's [`ChunkQueue`], received chunks are
//! verified and written on the store threads, and the outcome is booked
//! back in the queue.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use libp2p::PeerId;
use nomoat_protocol::{
    ChunkRef, ErrorCode, Hash, Have, Manifest, TensorRole, WeightsRequest, WeightsResponse,
};
use nomoat_scheduler::{ChunkQueue, Penalty, Take};
use tokio::sync::Notify;
use tracing::{debug, info, warn, Instrument};

use super::exchange::{ask, busy_backoff, is_busy, Exchange, PeerError};
use super::providers::blocking;
use super::{FetchConfig, FetchError, FetchReport, Need, DISCOVERY_TIMEOUT, MAX_CHUNK_ATTEMPTS};
use crate::net::NetHandle;
use crate::store::{ChunkStore, StoreError};

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

/// The fetch's bookkeeping, behind one lock: the chunk queue, and what the
/// report and the error need.
#[derive(Debug)]
struct Book {
    /// Which chunk goes to which peer next; faults and bans.
    queue: ChunkQueue<PeerId>,
    /// The last peer failure, for the error when chunks stay missing.
    last_failure: String,
    /// A store error that stops the fetch (the disk is full).
    fatal: Option<StoreError>,
    /// When the latest chunk arrived.
    last_received: Option<Instant>,
    /// Bytes, hashing and store-wait times, rejections.
    report: FetchReport,
}

/// What every worker of one fetch shares.
struct FetchState {
    chunks: Vec<ChunkRef>,
    peers: Vec<PeerId>,
    book: Mutex<Book>,
    wake: Notify,
    /// Permits (one per KiB) for received chunks not yet stored.
    unstored: Arc<tokio::sync::Semaphore>,
    store: ChunkStore,
    model_id: Hash,
    cfg: FetchConfig,
    started: Instant,
    bar: indicatif::ProgressBar,
}

impl FetchState {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes up to a batch of chunks this peer can serve, rarest first (so
    /// chunks that several peers hold stay for whichever of them is free).
    fn take(&self, peer: &PeerId) -> Take {
        self.book().queue.take(peer, self.cfg.batch)
    }

    /// A chunk came back unfetched: queue it again, unless it has been
    /// tried too often; `fault` names a peer to exclude for it.
    fn requeue(&self, i: usize, fault: Option<(&PeerId, String)>) {
        let mut b = self.book();
        b.queue.requeue(i, fault.as_ref().map(|(p, _)| *p));
        if let Some((peer, why)) = fault {
            b.last_failure = format!("{peer}: {why}");
        }
        drop(b);
        self.wake.notify_waiters();
    }

    /// Penalises a peer; returns whether it is now banned.
    fn penalise(&self, peer: &PeerId, why: &str) -> bool {
        let Penalty { faults: n, banned } = self.book().queue.penalise(peer);
        if banned {
            warn!(%peer, "peer banned after {n} faults (last: {why})");
        } else {
            warn!(%peer, "peer penalised ({n}/{}): {why}", self.cfg.max_faults);
        }
        banned
    }

    fn done(&self, peer: &PeerId, len: u64, hash_time: Duration) {
        let mut b = self.book();
        b.queue.done(peer);
        b.report.bytes += len;
        b.report.hash_secs += hash_time.as_secs_f64();
        drop(b);
        self.bar.inc(len);
        self.wake.notify_waiters();
    }

    /// Sleeps as long as the rate cap needs.
    async fn pace(&self) {
        let Some(rate) = self.cfg.max_rate else {
            return;
        };
        let bytes = self.book().report.bytes as f64;
        let due = Duration::from_secs_f64(bytes / rate);
        let elapsed = self.started.elapsed();
        if due > elapsed {
            tokio::time::sleep(due - elapsed).await;
        }
    }
}

/// One worker: takes batches this peer can serve and fetches them.
async fn worker(shared: Arc<FetchState>, net: NetHandle, peer: PeerId) {
    // Each iteration handles a batch or waits for one; bounded by the total
    // attempts of all chunks, and every wait by the stall timeout.
    let max_rounds = shared.chunks.len() * MAX_CHUNK_ATTEMPTS as usize + 1;
    let (mut refused, mut busy) = (0u32, 0u32);
    for _ in 0..max_rounds {
        let batch = match shared.take(&peer) {
            Take::Chunks(b) => b,
            Take::Wait => {
                let _ =
                    tokio::time::timeout(Duration::from_millis(200), shared.wake.notified()).await;
                continue;
            }
            Take::Finished => return,
        };
        match fetch_batch(&shared, &net, peer, &batch).await {
            Batch::Done => (refused, busy) = (0, 0),
            Batch::Stop => return,
            Batch::Busy => {
                // The peer said so: wait and ask again, no fault. Bounded
                // by the rounds, each wait by `busy_backoff`'s cap.
                busy += 1;
                tokio::time::sleep(busy_backoff(busy)).await;
            }
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
    /// The peer answered `Busy`; the batch went back to the queue untried.
    Busy,
}

/// Fetches one batch from `peer`. Received chunks are verified and written
/// on the low-priority store threads ([`crate::store::background`]) while the next
/// ones arrive.
async fn fetch_batch(
    shared: &Arc<FetchState>,
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
            shared.book().queue.refused(batch);
            shared.wake.notify_waiters();
            return Batch::Refused(e.to_string());
        }
    };
    let mut banned = false;
    for (k, &i) in batch.iter().enumerate() {
        let want = shared.chunks[i];
        let next = ex.next().await;
        if k == 0 && next.as_ref().is_err_and(PeerError::unanswered) {
            // Dropped unanswered (a busy peer's stream queue drops bursts):
            // a refusal, which counts as a fault only repeated.
            shared.book().queue.refused(batch);
            shared.wake.notify_waiters();
            let why = next.err().map(|e| e.to_string()).unwrap_or_default();
            return Batch::Refused(why);
        }
        if next.as_ref().is_ok_and(is_busy) {
            // Not a fault: the rest of the batch goes back untried.
            {
                let mut b = shared.book();
                b.queue.refused(&batch[k..]);
                b.report.busy += 1;
            }
            shared.wake.notify_waiters();
            ex.close().await;
            return Batch::Busy;
        }
        let fault = match next {
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
                shared.book().queue.lacks(&peer, i);
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
async fn store_chunk(shared: &Arc<FetchState>, peer: PeerId, i: usize, data: Bytes) {
    let want = shared.chunks[i];
    let kib = (data.len() as u32).div_ceil(1024).max(1);
    let arrived = Instant::now();
    let Ok(permit) = shared.unstored.clone().acquire_many_owned(kib).await else {
        unreachable!("the fetch never closes its own semaphore");
    };
    {
        let mut b = shared.book();
        b.last_received = b.last_received.max(Some(arrived));
        b.report.store_wait_secs += arrived.elapsed().as_secs_f64();
    }
    let store = shared.store.clone();
    let job = crate::store::background::spawn(move || store.put_timed(&want.hash, &data));
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
                shared.book().report.rejected += 1;
                let why = format!("chunk {} hashes to {got}: corrupt, dropped", want.hash);
                shared.requeue(i, Some((&peer, why.clone())));
                shared.penalise(&peer, &why);
            }
            Err(e) => {
                // Disk full or unwritable: nothing else will succeed.
                let mut b = shared.book();
                b.queue.halt();
                b.fatal.get_or_insert(e);
                drop(b);
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
    // Ask every peer what it holds (a busy one again, for up to a stall).
    let mut holds = HashMap::new();
    let patience = cfg.stall_timeout;
    let asks = peers.iter().map(|&peer| async move {
        let r = async {
            let req = WeightsRequest::Have { model_id: *id };
            match ask(net, peer, &req, DISCOVERY_TIMEOUT, patience).await? {
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
    let mut peers: Vec<PeerId> = holds.keys().copied().collect();
    peers.sort();
    let queue = ChunkQueue::new(
        n,
        holds.iter().map(|(p, h)| {
            let serves: Vec<usize> = (0..n).filter(|&i| h.serves(&chunk_roles[i])).collect();
            (*p, serves)
        }),
        MAX_CHUNK_ATTEMPTS,
        cfg.max_faults,
    );
    let shared = Arc::new(FetchState {
        chunks: missing,
        peers,
        book: Mutex::new(Book {
            queue,
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
        peers = shared.peers.len(),
        "fetching"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for &peer in &shared.peers {
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
        .book()
        .last_received
        .map_or(0.0, |t| t.elapsed().as_secs_f64());
    shared.bar.finish_and_clear();
    let last = {
        let mut b = shared.book();
        if let Some(e) = b.fatal.take() {
            return Err(e.into());
        }
        let r = std::mem::take(&mut b.report);
        report.requested = b.queue.requested();
        report.fetched = b.queue.delivered();
        report.bytes = r.bytes;
        report.hash_secs = r.hash_secs;
        report.store_tail_secs = tail;
        report.store_wait_secs = r.store_wait_secs;
        report.rejected = r.rejected;
        report.busy = r.busy;
        report.secs = shared.started.elapsed().as_secs_f64();
        report.per_peer = b.queue.per_peer();
        report.banned = b.queue.banned().to_vec();
        b.last_failure.clone()
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
