//! A server: answers `/nomoat/infer/1` streams for its span and
//! `/nomoat/info/1` queries, and announces itself every heartbeat.
//!
//! Per session, the client opens one stream to every hop (last hop first).
//! A hop that is not last opens a push stream to the next hop, so hidden
//! states go client -> hop 0 -> hop 1 -> ... -> last hop -> client, and every
//! hop sends the client a copy of its output after forwarding it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    decode_info_request, encode_info_response, Blocks, ErrorCode, ErrorFrame, Hop, InferMessage,
    OpenSession, Reroute, ServerInfo, SessionId, Step, INFER_PROTOCOL, INFO_PROTOCOL,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::executor::Executor;
use super::net::NetHandle;
use super::wire::{read_frame, read_message, write_frame, write_message};

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

/// Runs the server until `shutdown`: accepts inference and info streams and
/// announces the span every heartbeat.
pub async fn run_server(
    net: NetHandle,
    exec: Executor,
    cfg: ServerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut control = net.control();
    let mut incoming = control
        .accept(StreamProtocol::new(INFER_PROTOCOL))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
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
    let open: Vec<SessionCtx> = sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .map(|(_, c)| c)
        .collect();
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
    let max_sessions = super::executor::DEFAULT_MAX_SESSIONS.max(1) as f32;
    ServerInfo {
        peer_id: net.peer_id().to_bytes(),
        model_id: cfg.model_id.clone(),
        blocks: Blocks {
            start: span.start() as u32,
            end: span.end() as u32,
        },
        num_blocks: span.config().num_blocks as u32,
        hidden_size: span.config().hidden_size as u32,
        throughput: st.throughput,
        free_kv_tokens: st.free_kv_tokens.min(u32::MAX as usize) as u32,
        load: (st.sessions as f32 / max_sessions).min(1.0),
        active_sessions: st.sessions as u32,
        version: env!("CARGO_PKG_VERSION").to_string(),
        // Addresses, reachability and time are filled in by the network
        // actor each time it publishes.
        addrs: Vec::new(),
        reachability: nomoat_protocol::Reachability::Unknown,
        timestamp_ms: 0,
    }
}

/// Answers `/nomoat/info/1`: one request, one response with every live
/// server this node knows (itself included).
pub async fn serve_info(net: NetHandle, shutdown: CancellationToken) {
    let mut control = net.control();
    let Ok(mut incoming) = control.accept(StreamProtocol::new(INFO_PROTOCOL)) else {
        return;
    };
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = incoming.next() => next,
        };
        let Some((peer, mut stream)) = next else {
            break;
        };
        let net = net.clone();
        tokio::spawn(async move {
            let req = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read_frame(&mut stream)).await;
            let model = match req {
                Ok(Ok(Some(b))) => decode_info_request(&b),
                _ => return,
            };
            let Ok(model) = model else {
                debug!(%peer, "bad info request");
                return;
            };
            let body = encode_info_response(&net.servers(&model));
            let _ = write_frame(&mut stream, &body).await;
            let _ = futures::AsyncWriteExt::close(&mut stream).await;
        });
    }
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
    let first = match tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, read_message(&mut r)).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) | Err(_) => return,
        Ok(Err(e)) => {
            let code = match &e {
                super::wire::WireError::Message(m) => ErrorCode::from(m),
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
        } => push_stream(exec, sessions, session_id, from_hop, r, out).await,
        other => {
            let _ = out
                .send(error(
                    ErrorCode::Malformed,
                    format!(
                        "a stream must start with Open or Attach, not {}",
                        kind(&other)
                    ),
                    None,
                    0,
                    0,
                ))
                .await;
        }
    }
}

fn kind(m: &InferMessage) -> &'static str {
    match m {
        InferMessage::Open(_) => "Open",
        InferMessage::Attach { .. } => "Attach",
        InferMessage::Step(_) => "Step",
        InferMessage::Result { .. } => "Result",
        InferMessage::Copy { .. } => "Copy",
        InferMessage::Opened { .. } => "Opened",
        InferMessage::Error(_) => "Error",
        InferMessage::Close { .. } => "Close",
        InferMessage::Reroute(_) => "Reroute",
        _ => "unknown",
    }
}

#[allow(clippy::too_many_arguments)]
async fn client_stream(
    net: NetHandle,
    exec: Executor,
    cfg: ServerConfig,
    sessions: Sessions,
    peer: PeerId,
    open: OpenSession,
    mut r: ReadHalf<Stream>,
    out: mpsc::Sender<InferMessage>,
) {
    let id = open.session_id;
    let hop_index = open.hop_index;
    let span = tracing::info_span!("session", session = %id, hop = hop_index);
    async move {
        let fail = |code, msg: String| error(code, msg, Some(id), 0, hop_index);
        if open.model_id != cfg.model_id {
            let _ = out
                .send(fail(
                    ErrorCode::WrongModel,
                    format!(
                        "this server serves model {}, not {}",
                        cfg.model_id, open.model_id
                    ),
                ))
                .await;
            return;
        }
        if open.hop().peer_id != net.peer_id().to_bytes() {
            let _ = out
                .send(fail(
                    ErrorCode::Malformed,
                    "hop_index names another peer".into(),
                ))
                .await;
            return;
        }
        let blocks = open.hop().blocks;
        let (start, end) = (exec.span().start(), exec.span().end());
        if (blocks.start as usize) < start || (blocks.end as usize) > end {
            let _ = out
                .send(fail(
                    ErrorCode::WrongBlocks,
                    format!("blocks {blocks} asked, this server holds {start}..{end}"),
                ))
                .await;
            return;
        }
        let max_len = match exec
            .open(
                id,
                blocks.start as usize,
                blocks.end as usize,
                open.max_length as usize,
            )
            .await
        {
            Ok(n) => n,
            Err(e) => {
                let _ = out.send(fail(e.code, e.message)).await;
                return;
            }
        };
        // Attach the push stream to the next hop, which the client opened first.
        let push = match open.next_hop() {
            None => None,
            Some(next) => match attach_next(&net, id, hop_index, next.peer_id.clone()).await {
                Ok(tx) => Some(tx),
                Err(msg) => {
                    exec.close(id);
                    let _ = out.send(fail(ErrorCode::Internal, msg)).await;
                    return;
                }
            },
        };
        let ctx = SessionCtx {
            client: out.clone(),
            state: Arc::new(Mutex::new(HopState {
                push,
                hop_index,
                route: open.route.clone(),
                attached: false,
                epoch: 0,
            })),
        };
        sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, ctx.clone());
        let _ = out
            .send(InferMessage::Opened {
                session_id: id,
                hop_index,
                max_length: max_len as u32,
            })
            .await;
        info!(%peer, %blocks, "session open");
        loop {
            match read_message(&mut r).await {
                Ok(Some(InferMessage::Step(step))) if step.session_id == id => {
                    run_step(&exec, &ctx, step, None).await;
                }
                Ok(Some(InferMessage::Reroute(r))) if r.session_id == id => {
                    let answer = match reroute(&net, &ctx, blocks, r).await {
                        Ok(hop_index) => InferMessage::Opened {
                            session_id: id,
                            hop_index,
                            max_length: max_len as u32,
                        },
                        Err((code, msg)) => {
                            let hop = ctx.state().hop_index;
                            error(code, msg, Some(id), 0, hop)
                        }
                    };
                    let _ = out.send(answer).await;
                }
                Ok(Some(InferMessage::Close { .. })) | Ok(None) => break,
                Ok(Some(InferMessage::Step(step))) => {
                    let _ = out
                        .send(error(
                            ErrorCode::UnknownSession,
                            format!("this stream carries session {id}, not {}", step.session_id),
                            Some(step.session_id),
                            step.seq,
                            hop_index,
                        ))
                        .await;
                }
                Ok(Some(other)) => {
                    let _ = out
                        .send(fail(
                            ErrorCode::Malformed,
                            format!("unexpected {} on a session stream", kind(&other)),
                        ))
                        .await;
                }
                Err(super::wire::WireError::Message(m)) => {
                    // A body that does not decode is answered and the stream stays
                    // usable; an oversized prefix breaks the framing: answer, close.
                    let _ = out.send(fail(ErrorCode::from(&m), m.to_string())).await;
                    if matches!(m, nomoat_protocol::MessageError::TooLarge { .. }) {
                        break;
                    }
                }
                Err(e) => {
                    debug!("client stream ended: {e}");
                    break;
                }
            }
        }
        sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        exec.close(id);
        info!("session closed");
    }
    .instrument(span)
    .await
}

/// Opens the push stream to the next hop and waits for its `Opened`.
async fn attach_next(
    net: &NetHandle,
    id: SessionId,
    hop_index: u32,
    next_peer: Vec<u8>,
) -> Result<mpsc::Sender<InferMessage>, String> {
    let peer = PeerId::from_bytes(&next_peer).map_err(|e| format!("bad next hop peer id: {e}"))?;
    let mut control = net.control();
    let fut = async {
        net.connect_known(peer).await;
        let stream = control
            .open_stream(peer, StreamProtocol::new(INFER_PROTOCOL))
            .await
            .map_err(|e| format!("cannot reach the next hop {peer}: {e}"))?;
        let (mut r, mut w) = stream.split();
        write_message(
            &mut w,
            &InferMessage::Attach {
                session_id: id,
                from_hop: hop_index,
            },
        )
        .await
        .map_err(|e| format!("next hop {peer}: {e}"))?;
        match read_message(&mut r).await {
            Ok(Some(InferMessage::Opened { .. })) => {}
            Ok(Some(InferMessage::Error(e))) => {
                return Err(format!("next hop {peer} refused: {e}"))
            }
            other => return Err(format!("next hop {peer} answered {other:?}")),
        }
        // Drain whatever else the next hop sends on the push stream.
        tokio::spawn(async move { while let Ok(Some(_)) = read_message(&mut r).await {} });
        Ok(writer(w, format!("push to {peer}")))
    };
    tokio::time::timeout(PUSH_OPEN_TIMEOUT, fut)
        .await
        .map_err(|_| format!("the next hop {peer} did not attach within {PUSH_OPEN_TIMEOUT:?}"))?
}

async fn push_stream(
    exec: Executor,
    sessions: Sessions,
    id: SessionId,
    from_hop: u32,
    mut r: ReadHalf<Stream>,
    out: mpsc::Sender<InferMessage>,
) {
    let known = {
        let map = sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&id).and_then(|ctx| {
            let mut st = ctx.state();
            if st.hop_index == from_hop.wrapping_add(1) && !st.attached {
                st.attached = true;
                Some((ctx.clone(), st.epoch, st.hop_index))
            } else {
                None
            }
        })
    };
    let Some((ctx, epoch, hop_index)) = known else {
        let _ = out
            .send(error(
                ErrorCode::UnknownSession,
                format!("no session {id} expects a push from hop {from_hop}"),
                Some(id),
                0,
                from_hop + 1,
            ))
            .await;
        return;
    };
    let _ = out
        .send(InferMessage::Opened {
            session_id: id,
            hop_index,
            max_length: 0,
        })
        .await;
    loop {
        match read_message(&mut r).await {
            Ok(Some(InferMessage::Step(step))) if step.session_id == id => {
                if !run_step(&exec, &ctx, step, Some(epoch)).await {
                    debug!("push stream replaced by a reroute");
                    break;
                }
            }
            Ok(Some(InferMessage::Close { .. })) | Ok(None) => break,
            Ok(Some(other)) => warn!("unexpected {} on a push stream", kind(&other)),
            Err(e) => {
                debug!("push stream ended: {e}");
                break;
            }
        }
    }
}

/// Computes one step and sends its output on: to the next hop, or as the
/// result to the client; then a copy to the client. A replay step stops at
/// its `last_hop`. A step from a push stream attached in `epoch` is dropped
/// (and `false` returned) once a reroute has replaced that stream.
async fn run_step(exec: &Executor, ctx: &SessionCtx, step: Step, epoch: Option<u64>) -> bool {
    let (id, seq, start_pos, last_hop) = (step.session_id, step.seq, step.start_pos, step.last_hop);
    if let Some(e) = epoch {
        if ctx.state().epoch != e {
            return false;
        }
    }
    let result = exec.step(id, seq, start_pos as usize, step.hidden).await;
    let (push, hop_index) = {
        let st = ctx.state();
        (st.push.clone(), st.hop_index)
    };
    match result {
        Ok(out) => {
            let stops_here = last_hop.is_some_and(|h| h <= hop_index);
            match &push {
                _ if stops_here => {}
                Some(push) => {
                    let next = InferMessage::Step(Step {
                        session_id: id,
                        seq,
                        start_pos,
                        hidden: out.clone(),
                        last_hop,
                    });
                    if push.send(next).await.is_err() {
                        // Blame the next hop: its end of the push stream is gone.
                        let next_hop = hop_index + 1;
                        let msg =
                            format!("hop {next_hop} is unreachable: the push stream to it closed");
                        let _ = ctx
                            .client
                            .send(error(ErrorCode::Internal, msg, Some(id), seq, next_hop))
                            .await;
                    }
                }
                None => {
                    let _ = ctx
                        .client
                        .send(InferMessage::Result {
                            session_id: id,
                            seq,
                            hidden: out.clone(),
                        })
                        .await;
                }
            }
            let _ = ctx
                .client
                .send(InferMessage::Copy {
                    session_id: id,
                    seq,
                    hop_index,
                    hidden: out,
                })
                .await;
        }
        Err(e) => {
            let _ = ctx
                .client
                .send(error(e.code, e.message, Some(id), seq, hop_index))
                .await;
        }
    }
    true
}

/// Applies a new route to a session this hop stays in: attaches a push
/// stream to a new next hop, and expects a new push stream when the previous
/// hop changed. Returns the hop's new index.
async fn reroute(
    net: &NetHandle,
    ctx: &SessionCtx,
    blocks: Blocks,
    r: Reroute,
) -> Result<u32, (ErrorCode, String)> {
    if r.hop().peer_id != net.peer_id().to_bytes() {
        return Err((ErrorCode::Malformed, "hop_index names another peer".into()));
    }
    if r.hop().blocks != blocks {
        return Err((
            ErrorCode::WrongBlocks,
            format!(
                "a reroute cannot change a hop's blocks: {} asked, the session runs {blocks}",
                r.hop().blocks
            ),
        ));
    }
    let (old_prev, old_next) = {
        let st = ctx.state();
        let i = st.hop_index as usize;
        (
            i.checked_sub(1).map(|p| st.route[p].clone()),
            st.route.get(i + 1).cloned(),
        )
    };
    let new_next = r.next_hop().cloned();
    let push = if new_next != old_next {
        match &new_next {
            Some(next) => Some(
                attach_next(net, r.session_id, r.hop_index, next.peer_id.clone())
                    .await
                    .map_err(|m| (ErrorCode::Internal, m))?,
            ),
            None => None,
        }
    } else {
        ctx.state().push.clone()
    };
    let mut st = ctx.state();
    if r.prev_hop().cloned() != old_prev {
        st.attached = false;
        st.epoch += 1;
    }
    st.push = push;
    st.hop_index = r.hop_index;
    st.route = r.route;
    Ok(st.hop_index)
}
