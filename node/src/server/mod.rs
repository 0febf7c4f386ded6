//! A server: answers `/nomoat/infer/1` streams for its span and
//! `/nomoat/info/1` queries, and announces itself every heartbeat.
//!
//! Per session, the client opens one stream to every hop (last hop first).
//! A hop that is not last opens a push stream to the next hop, so hidden
//! states go client -> hop 0 -> hop 1 -> ... -> last hop -> client, and every
//! hop sends the client a copy of its output after forwarding it.
//!
//! * `accept`: [`run_server`] accepts streams and announces the span.
//! * `hop`: one session's streams, steps and reroutes.
//! * [`executor`]: the compute thread that owns the span and KV caches.
//! * [`rebalance`]: moving to where the swarm is weakest.

mod accept;
pub mod executor;
mod hop;
pub mod rebalance;

pub use accept::{run_server, serve_info, server_info};

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
/// Queue of messages waiting to be written to one stream.
pub const STREAM_QUEUE: usize = 64;
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
}

#[derive(Debug, Clone)]
struct SessionCtx {
    client: mpsc::Sender<InferMessage>,
    state: Arc<Mutex<HopState>>,
}

impl SessionCtx {
    fn state(&self) -> std::sync::MutexGuard<'_, HopState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Sessions = Arc<Mutex<HashMap<SessionId, SessionCtx>>>;

/// What a server is.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The model served.
    pub model_id: String,
}

/// Spawns a task that writes queued messages to a stream's write half;
/// returns the queue. The task ends when the queue closes or a write fails.
fn writer(mut w: WriteHalf<Stream>, what: String) -> mpsc::Sender<InferMessage> {
    let (tx, mut rx) = mpsc::channel::<InferMessage>(STREAM_QUEUE);
    tokio::spawn(
        async move {
            while let Some(msg) = rx.recv().await {
                if let Err(e) = write_message(&mut w, &msg).await {
                    debug!("write failed: {e}");
                    break;
                }
            }
            let _ = futures::AsyncWriteExt::close(&mut w).await;
        }
        .instrument(tracing::debug_span!("writer", stream = %what)),
    );
    tx
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
