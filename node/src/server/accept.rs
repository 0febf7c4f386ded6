//! Accepting streams: `/nomoat/infer/1` sessions, `/nomoat/info/1`
//! queries, and the heartbeat announcement.

use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    decode_info_request, encode_info_response, BlockRange, ErrorCode, ErrorFrame, InferMessage,
    ServerInfo, INFER_PROTOCOL, INFO_PROTOCOL,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use super::executor::Executor;
use crate::net::wire::{read_frame_max, read_message_max, write_frame};
use crate::net::NetHandle;

use super::hop::{client_stream, push_stream};
use super::*;

/// Runs the server until `shutdown`: accepts inference and info streams and
/// announces the span every heartbeat.
pub async fn run_server(
    net: NetHandle,
    exec: Executor,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), libp2p_stream::AlreadyRegistered> {
    let mut control = net.control();
    let mut incoming = control.accept(StreamProtocol::new(INFER_PROTOCOL))?;
    tokio::spawn(serve_info(net.clone(), shutdown.clone()));
    net.subscribe(&cfg.model_id).await;
    let sessions: Sessions = Arc::default();
    let announce = {
        let (net, exec, cfg, shutdown) = (net.clone(), exec.clone(), cfg.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => net.announce(server_info(&net, &exec, &cfg)).await,
                }
            }
        })
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = incoming.next() => {
                let Some((peer, stream)) = next else { break };
                let (net, exec, cfg, sessions) = (net.clone(), exec.clone(), cfg.clone(), sessions.clone());
                tokio::spawn(
                    async move { handle_stream(net, exec, cfg, sessions, peer, stream).await }
                        .instrument(tracing::info_span!("stream", %peer)),
                );
            }
        }
    }
    announce.abort();
    // Tell every client its session ends here.
    let open: Vec<SessionCtx> = sessions.lock().drain().map(|(_, c)| c).collect();
    for ctx in open {
        let hop_index = ctx.state().hop_index;
        let _ = ctx
            .client
            .send(InferMessage::Error(ErrorFrame::new(
                ErrorCode::Internal,
                "server shutting down",
                None,
                0,
                hop_index,
            )))
            .await;
    }
    Ok(())
}

/// The `ServerInfo` this server announces now.
pub fn server_info(net: &NetHandle, exec: &Executor, cfg: &ServerConfig) -> ServerInfo {
    let span = exec.span();
    let st = exec.stats();
    ServerInfo {
        peer_id: net.peer_id().to_bytes(),
        model_id: cfg.model_id.clone(),
        blocks: BlockRange {
            start: span.start() as u32,
            end: span.end() as u32,
        },
        num_blocks: span.config().num_blocks as u32,
        hidden_size: span.config().hidden_size as u32,
        throughput: cfg
            .fault
            .as_ref()
            .map_or(st.throughput, |f| f.announced(st.throughput)),
        free_kv_tokens: st.free_kv_tokens.min(u32::MAX as usize) as u32,
        load: st.load(),
        active_sessions: st.sessions as u32,
        batch_capacity: st.batch_capacity,
        version: env!("CARGO_PKG_VERSION").to_string(),
        // Addresses, reachability and time are filled in by the network
        // actor each time it publishes.
        addrs: Vec::new(),
        reachability: nomoat_protocol::Reachability::Unknown,
        timestamp_ms: 0,
        adapters: cfg
            .adapters
            .as_ref()
            .map(|a| a.held(span.start(), span.end()))
            .unwrap_or_default(),
    }
}

/// Answers `/nomoat/info/1`: one request, one response with every live
/// server this node knows (itself included).
pub async fn serve_info(net: NetHandle, shutdown: CancellationToken) {
    let mut control = net.control();
    let Ok(mut incoming) = control.accept(StreamProtocol::new(INFO_PROTOCOL)) else {
        return;
    };
    let slots = Arc::new(InfoSlots::default());
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = incoming.next() => next,
        };
        let Some((peer, mut stream)) = next else {
            break;
        };
        // A peer that asks and never reads holds a task and an answer's
        // buffer: a few per peer, a bounded number in all; past that the
        // stream is dropped unanswered (askers retry).
        let Some(slot) = slots.take(peer) else {
            debug!(%peer, "too many info queries at once: dropping one");
            continue;
        };
        let net = net.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let req = tokio::time::timeout(
                FIRST_MESSAGE_TIMEOUT,
                read_frame_max(&mut stream, nomoat_protocol::MAX_CONTROL_BYTES),
            )
            .await;
            let model = match req {
                Ok(Ok(Some(b))) => decode_info_request(&b),
                _ => return,
            };
            let Ok(model) = model else {
                debug!(%peer, "bad info request");
                return;
            };
            // At most one answer's worth, the freshest first.
            let mut servers = net.signed_servers(&model);
            servers.truncate(nomoat_protocol::MAX_INFO_SERVERS);
            let body = encode_info_response(&servers);
            let answer = async {
                if write_frame(&mut stream, &body).await.is_ok() {
                    let _ = futures::AsyncWriteExt::close(&mut stream).await;
                }
            };
            if tokio::time::timeout(WRITE_TIMEOUT, answer).await.is_err() {
                debug!(%peer, "an info answer went unread for {WRITE_TIMEOUT:?}: dropped");
            }
        });
    }
}

/// Info queries one peer may have in flight at once.
pub const MAX_INFO_STREAMS_PER_PEER: usize = 4;
/// Info queries in flight at once, all peers together.
pub const MAX_INFO_STREAMS: usize = 256;

/// Counts the info queries in flight, per peer and in all.
#[derive(Debug, Default)]
struct InfoSlots {
    held: std::sync::Mutex<(usize, std::collections::HashMap<PeerId, usize>)>,
}

/// One info query's slot, given back when dropped.
#[derive(Debug)]
struct InfoSlot {
    slots: Arc<InfoSlots>,
    peer: PeerId,
}

impl InfoSlots {
    fn take(self: &Arc<Self>, peer: PeerId) -> Option<InfoSlot> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per) = &mut *held;
        let mine = per.get(&peer).copied().unwrap_or(0);
        if *total >= MAX_INFO_STREAMS || mine >= MAX_INFO_STREAMS_PER_PEER {
            return None;
        }
        *total += 1;
        per.insert(peer, mine + 1);
        Some(InfoSlot {
            slots: self.clone(),
            peer,
        })
    }
}

impl Drop for InfoSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(|p| p.into_inner());
        let (total, per) = &mut *held;
        *total = total.saturating_sub(1);
        if let Some(n) = per.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.peer);
            }
        }
    }
}

async fn handle_stream(
    net: NetHandle,
    exec: Executor,
    cfg: ServerConfig,
    sessions: Sessions,
    peer: PeerId,
    stream: Stream,
) {
    let (mut r, w) = stream.split();
    let out = writer(w, format!("to {peer}"));
    // The first message is `Open` or `Attach`: control-sized, never a tensor.
    let first_read = read_message_max(&mut r, nomoat_protocol::MAX_CONTROL_BYTES);
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, first_read).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => {
            let code = match &e {
                crate::net::wire::WireError::Message(m) => ErrorCode::from(m),
                _ => ErrorCode::Malformed,
            };
            let _ = out.send(error(code, e.to_string(), None, 0, 0)).await;
            return;
        }
    };
    match first {
        InferMessage::Open(open) => {
            client_stream(net, exec, cfg, sessions, peer, open, r, out).await
        }
        InferMessage::Attach {
            session_id,
            from_hop,
        } => push_stream(exec, sessions, peer, session_id, from_hop, r, out).await,
        other => {
            let _ = out
                .send(error(
                    ErrorCode::Malformed,
                    format!(
                        "a stream must start with Open or Attach, not {}",
                        other.name()
                    ),
                    None,
                    0,
                    0,
                ))
                .await;
        }
    }
}
