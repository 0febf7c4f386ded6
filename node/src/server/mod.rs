//! A server: answers `/nomoat/infer/1` streams for its span and
//! `/nomoat/info/1` queries, and announces itself every heartbeat.
//!
//! Per session, the client opens one stream to every hop, all at once. A hop
//! that is not last answers `Opened` at once and opens a push stream to the
//! next hop meanwhile, so hidden states go client -> hop 0 -> hop 1 -> ... ->
//! last hop -> client, and every hop sends the client a copy of its output
//! after forwarding it. A push stream that reaches the next hop before the
//! client's `Open` does waits there for it, bounded in time and count.
//!
//! * `accept`: [`run_server`] accepts streams and announces the span.
//! * `hop`: one session's streams, steps and reroutes.
//! * [`executor`]: the compute thread that owns the span and KV caches.
//! * [`rebalance`]: moving to where the swarm is weakest.
//! * [`memory`]: fitting span, KV and working memory into `--max-memory`.
//! * [`adapters`]: the LoRA adapters held for the span, loaded on first use.

mod accept;
pub mod adapters;
pub mod executor;
pub mod fault;
mod hop;
pub mod memory;
pub mod rebalance;

pub use accept::{
    run_server, serve_info, server_info, MAX_INFO_STREAMS, MAX_INFO_STREAMS_PER_PEER,
};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::WriteHalf;
use libp2p::Stream;
use nomoat_protocol::{ErrorCode, ErrorFrame, Hop, InferMessage, SessionId};
use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use crate::net::wire::write_message;

/// How long a hop waits for the next hop to accept a push stream.
pub const PUSH_OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an `Attach` that came before its session's `Open` waits for it.
pub const ATTACH_WAIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Early `Attach` streams one peer may have waiting at once.
pub const MAX_WAITING_ATTACH_PER_PEER: usize = 32;
/// Early `Attach` streams waiting at once, all peers together.
pub const MAX_WAITING_ATTACH: usize = 256;
/// Queue of messages waiting to be written to one stream.
pub const STREAM_QUEUE: usize = 64;
/// How long one message may take to write: a peer that stops reading loses
/// its stream after this.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server waits for the first message of a new stream.
pub const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a session's hop sits in its route; changed by `Reroute`.
#[derive(Debug)]
struct HopState {
    push: Option<mpsc::Sender<InferMessage>>,
    hop_index: u32,
    route: Vec<Hop>,
    /// Whether the previous hop's push stream is attached.
    attached: bool,
    /// Counts attachments: a push stream runs steps only while the epoch it
    /// attached in is current, so a replaced previous hop is ignored.
    epoch: u64,
    /// When the session last ran a step (or opened): its streams close
    /// once it has been idle for the executor's idle timeout.
    last_active: std::time::Instant,
    /// Steps run so far (what a test-only fault counts).
    steps: u64,
    /// The session's inputs on this hop, as its receipts sign them.
    chain: nomoat_protocol::InputChain,
}

#[derive(Debug, Clone)]
struct SessionCtx {
    client: mpsc::Sender<InferMessage>,
    state: Arc<Mutex<HopState>>,
    /// The peer that opened the session.
    opener: libp2p::PeerId,
    /// The test-only lie this server tells, if any.
    fault: Option<Arc<fault::ComputeFault>>,
    /// Signs the receipts.
    net: crate::net::NetHandle,
    /// The model, blocks and adapter the receipts name.
    model_id: Arc<str>,
    blocks: nomoat_protocol::BlockRange,
    adapter: Option<nomoat_protocol::Hash>,
}

impl SessionCtx {
    fn state(&self) -> std::sync::MutexGuard<'_, HopState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The sessions open on this server, and the early push streams waiting
/// for one to open.
#[derive(Debug, Default)]
struct SessionTable {
    map: Mutex<HashMap<SessionId, SessionCtx>>,
    /// Woken each time a session opens.
    opened: tokio::sync::Notify,
    /// Early `Attach` streams waiting, per peer.
    waiting: Mutex<HashMap<libp2p::PeerId, usize>>,
}

impl SessionTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, SessionCtx>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: SessionId, ctx: SessionCtx) {
        self.lock().insert(id, ctx);
        self.opened.notify_waiters();
    }

    /// Books a waiting slot for `peer`; `None` past the per-peer or total
    /// limit. The slot frees when the guard drops.
    fn wait_slot(&self, peer: libp2p::PeerId) -> Option<WaitSlot<'_>> {
        let mut w = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = w.values().sum();
        let mine = w.entry(peer).or_default();
        if *mine >= MAX_WAITING_ATTACH_PER_PEER || total >= MAX_WAITING_ATTACH {
            return None;
        }
        *mine += 1;
        Some(WaitSlot { table: self, peer })
    }
}

struct WaitSlot<'a> {
    table: &'a SessionTable,
    peer: libp2p::PeerId,
}

impl Drop for WaitSlot<'_> {
    fn drop(&mut self) {
        let mut w = self.table.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = w.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                w.remove(&self.peer);
            }
        }
    }
}

type Sessions = Arc<SessionTable>;

/// What a server is.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model served.
    pub model_id: String,
    /// The LoRA adapters sessions may run with; `None`: sessions naming
    /// one are refused.
    pub adapters: Option<adapters::Adapters>,
    /// Test-only: how this server lies about its outputs.
    pub fault: Option<fault::ComputeFault>,
}

/// Spawns a task that writes queued messages to a stream's write half;
/// returns the queue. The task ends when the queue closes or a write fails.
fn writer(mut w: WriteHalf<Stream>, what: String) -> mpsc::Sender<InferMessage> {
    let (tx, mut rx) = mpsc::channel::<InferMessage>(STREAM_QUEUE);
    tokio::spawn(
        async move { drain_to(&mut w, &mut rx).await }
            .instrument(tracing::debug_span!("writer", stream = %what)),
    );
    tx
}

/// Writes `rx`'s messages to `w` until the queue closes, a write fails or
/// one takes longer than [`WRITE_TIMEOUT`] (the peer stopped reading); then
/// closes `w`.
async fn drain_to(w: &mut WriteHalf<Stream>, rx: &mut mpsc::Receiver<InferMessage>) {
    while let Some(msg) = rx.recv().await {
        match tokio::time::timeout(WRITE_TIMEOUT, write_message(w, &msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!("write failed: {e}");
                break;
            }
            Err(_) => {
                debug!("peer read nothing for {WRITE_TIMEOUT:?}: dropping the stream");
                break;
            }
        }
    }
    let _ = futures::AsyncWriteExt::close(w).await;
}

fn error(
    code: ErrorCode,
    msg: impl Into<String>,
    session: Option<SessionId>,
    seq: u64,
    hop: u32,
) -> InferMessage {
    InferMessage::Error(ErrorFrame::new(code, msg, session, seq, hop))
}
