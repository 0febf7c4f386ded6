//! One hop of a session: the client's stream, the push stream from the
//! previous hop, steps and reroutes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::io::{ReadHalf, WriteHalf};
use futures::AsyncReadExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    BlockRange, ErrorCode, InferMessage, OpenSession, Reroute, SessionId, Step, INFER_PROTOCOL,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn, Instrument};

use super::executor::Executor;
use crate::client::{UNANSWERED_STREAM_ATTEMPTS, UNANSWERED_STREAM_DELAY};
use crate::net::wire::{read_message, write_message};
use crate::net::NetHandle;

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn client_stream(
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
        let adapter = match (open.adapter, &cfg.adapters) {
            (None, _) => None,
            (Some(a), None) => {
                let _ = out
                    .send(fail(
                        ErrorCode::NotFound,
                        format!("adapter {a}: this server runs no adapters"),
                    ))
                    .await;
                return;
            }
            (Some(a), Some(registry)) => match registry.get(a, start, end, Some(peer)).await {
                Ok(adapter) => Some(adapter),
                Err(e) => {
                    let _ = out.send(fail(e.code, e.message)).await;
                    return;
                }
            },
        };
        let max_len = match exec
            .open(
                id,
                peer,
                blocks.start as usize,
                blocks.end as usize,
                open.max_length as usize,
                adapter,
            )
            .await
        {
            Ok(n) => n,
            Err(e) => {
                let _ = out.send(fail(e.code, e.message)).await;
                return;
            }
        };
        // The push stream to the next hop attaches while the client hears
        // `Opened`; steps wait in its queue until it has.
        let push = open
            .next_hop()
            .map(|next| spawn_push(&net, id, hop_index, next.peer_id.clone(), Some(out.clone())).0);
        let ctx = SessionCtx {
            client: out.clone(),
            state: Arc::new(Mutex::new(HopState {
                push,
                hop_index,
                route: open.route.clone(),
                attached: false,
                epoch: 0,
                last_active: std::time::Instant::now(),
                steps: 0,
                chain: nomoat_protocol::InputChain::new(id),
            })),
            opener: peer,
            fault: cfg.fault.clone().map(Arc::new),
            net: net.clone(),
            model_id: cfg.model_id.as_str().into(),
            blocks,
            adapter: open.adapter,
        };
        sessions.insert(id, ctx.clone());
        let _ = out
            .send(InferMessage::Opened {
                session_id: id,
                hop_index,
                max_length: max_len as u32,
            })
            .await;
        info!(%peer, %blocks, "session open");
        // Once the session has run nothing for as long as it may idle, its
        // stream closes too, even in the middle of a half-sent frame.
        let idle = exec.idle_timeout();
        loop {
            let Some(next) = read_while_active(&mut r, &ctx, idle).await else {
                info!("session idle for {idle:?}: closing its stream");
                break;
            };
            match next {
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
                            format!("unexpected {} on a session stream", other.name()),
                        ))
                        .await;
                }
                Err(crate::net::wire::WireError::Message(m)) => {
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
        sessions.lock().remove(&id);
        exec.close(id);
        info!("session closed");
    }
    .instrument(span)
    .await
}

/// Starts the push stream to the next hop: returns its queue at once, and a
/// receiver of the attachment's outcome. Messages queued before the next hop
/// answers `Opened` are written after it has; if it refuses or cannot be
/// reached, the queue closes and `client`, when given, hears why (blaming
/// the next hop).
pub(super) fn spawn_push(
    net: &NetHandle,
    id: SessionId,
    hop_index: u32,
    next_peer: Vec<u8>,
    client: Option<mpsc::Sender<InferMessage>>,
) -> (
    mpsc::Sender<InferMessage>,
    oneshot::Receiver<Result<(), String>>,
) {
    let (tx, mut rx) = mpsc::channel::<InferMessage>(STREAM_QUEUE);
    let (ready_tx, ready) = oneshot::channel();
    let net = net.clone();
    let next_hop = hop_index + 1;
    tokio::spawn(
        async move {
            let attached = tokio::time::timeout(
                PUSH_OPEN_TIMEOUT,
                attach_next(&net, id, hop_index, &next_peer),
            )
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "the next hop did not attach within {PUSH_OPEN_TIMEOUT:?}"
                ))
            });
            let mut w = match attached {
                Ok(w) => {
                    let _ = ready_tx.send(Ok(()));
                    w
                }
                Err(msg) => {
                    debug!("push stream: {msg}");
                    let _ = ready_tx.send(Err(msg.clone()));
                    rx.close();
                    if let Some(client) = client {
                        let _ = client
                            .send(error(
                                ErrorCode::Internal,
                                format!("hop {next_hop} is unreachable: {msg}"),
                                Some(id),
                                0,
                                next_hop,
                            ))
                            .await;
                    }
                    return;
                }
            };
            drain_to(&mut w, &mut rx).await;
        }
        .instrument(tracing::debug_span!("push", session = %id, to = next_hop)),
    );
    (tx, ready)
}

/// Opens the push stream to the next hop and waits for its `Opened`. A
/// stream the next hop drops unanswered (an inbound stream can be dropped
/// when several arrive at once) is opened again, a little later, up to
/// [`UNANSWERED_STREAM_ATTEMPTS`] times in all.
async fn attach_next(
    net: &NetHandle,
    id: SessionId,
    hop_index: u32,
    next_peer: &[u8],
) -> Result<WriteHalf<Stream>, String> {
    let peer = PeerId::from_bytes(next_peer).map_err(|e| format!("bad next hop peer id: {e}"))?;
    let mut control = net.control();
    // In a swarm that has just started, this hop may not have heard the
    // next hop's announcement (its addresses) yet: keep trying a little.
    let patience = tokio::time::Instant::now() + NEXT_HOP_DIAL_PATIENCE;
    for attempt in 1..=UNANSWERED_STREAM_ATTEMPTS {
        let stream = loop {
            net.connect_known(peer).await;
            match control
                .open_stream(peer, StreamProtocol::new(INFER_PROTOCOL))
                .await
            {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= patience => {
                    return Err(format!("cannot reach the next hop {peer}: {e}"))
                }
                Err(e) => {
                    debug!("next hop {peer} not reachable yet ({e}); trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let (mut r, mut w) = stream.split();
        let attach = InferMessage::Attach {
            session_id: id,
            from_hop: hop_index,
        };
        // A stream dropped unanswered fails the write (the peer stopped
        // it) or the read (it ended): both are tried again.
        let answer = match write_message(&mut w, &attach).await {
            Ok(()) => read_message(&mut r).await,
            Err(e) => Err(e),
        };
        match answer {
            Ok(Some(InferMessage::Opened { .. })) => {
                // Drain whatever else the next hop sends on the push stream.
                tokio::spawn(async move { while let Ok(Some(_)) = read_message(&mut r).await {} });
                return Ok(w);
            }
            Ok(Some(InferMessage::Error(e))) => {
                return Err(format!("next hop {peer} refused: {e}"))
            }
            Ok(None) | Err(_) if attempt < UNANSWERED_STREAM_ATTEMPTS => {
                debug!("next hop {peer} dropped the push stream unanswered; opening it again");
                tokio::time::sleep(UNANSWERED_STREAM_DELAY * attempt).await;
            }
            other => return Err(format!("next hop {peer} answered {other:?}")),
        }
    }
    unreachable!("the last attempt returns")
}

/// How long a hop keeps trying to reach its next hop before it reports it
/// unreachable.
const NEXT_HOP_DIAL_PATIENCE: Duration = Duration::from_secs(3);

/// A push stream from the previous hop. One that comes before the client's
/// `Open` of its session waits up to [`ATTACH_WAIT_TIMEOUT`] for it; only the
/// route's previous hop may attach.
pub(super) async fn push_stream(
    exec: Executor,
    sessions: Sessions,
    peer: PeerId,
    id: SessionId,
    from_hop: u32,
    mut r: ReadHalf<Stream>,
    out: mpsc::Sender<InferMessage>,
) {
    let refuse = |code, msg: String| error(code, msg, Some(id), 0, from_hop.saturating_add(1));
    let claim = || {
        let map = sessions.lock();
        let ctx = map.get(&id)?;
        let mut st = ctx.state();
        let prev = (st.hop_index as usize)
            .checked_sub(1)
            .and_then(|p| st.route.get(p));
        let from_prev = prev.is_some_and(|h| h.peer_id == peer.to_bytes());
        if st.hop_index == from_hop.wrapping_add(1) && from_prev && !st.attached {
            st.attached = true;
            Some(Ok((ctx.clone(), st.epoch, st.hop_index)))
        } else {
            Some(Err(()))
        }
    };
    let deadline = tokio::time::Instant::now() + ATTACH_WAIT_TIMEOUT;
    let mut slot = None;
    let claimed = loop {
        let opened = sessions.opened.notified();
        tokio::pin!(opened);
        opened.as_mut().enable();
        match claim() {
            Some(c) => break c,
            None if slot.is_none() => match sessions.wait_slot(peer) {
                Some(s) => slot = Some(s),
                None => {
                    let msg =
                        "too many push streams wait for sessions to open; retry later".to_string();
                    let _ = out.send(refuse(ErrorCode::Busy, msg)).await;
                    return;
                }
            },
            None => {}
        }
        if tokio::time::timeout_at(deadline, opened).await.is_err() {
            break Err(());
        }
    };
    drop(slot);
    let Ok((ctx, epoch, hop_index)) = claimed else {
        let msg = format!("no session {id} expects a push from hop {from_hop} ({peer})");
        let _ = out.send(refuse(ErrorCode::UnknownSession, msg)).await;
        return;
    };
    let _ = out
        .send(InferMessage::Opened {
            session_id: id,
            hop_index,
            max_length: 0,
        })
        .await;
    let idle = exec.idle_timeout();
    loop {
        let Some(next) = read_while_active(&mut r, &ctx, idle).await else {
            debug!("session idle for {idle:?}: closing the push stream");
            break;
        };
        match next {
            Ok(Some(InferMessage::Step(step))) if step.session_id == id => {
                if !run_step(&exec, &ctx, step, Some(epoch)).await {
                    debug!("push stream replaced by a reroute");
                    break;
                }
            }
            Ok(Some(InferMessage::Close { .. })) | Ok(None) => break,
            Ok(Some(other)) => warn!("unexpected {} on a push stream", other.name()),
            Err(e) => {
                debug!("push stream ended: {e}");
                break;
            }
        }
    }
}

/// The next message of a session's stream, or `None` once the session has
/// run no step for `idle` (a partly read frame is abandoned with the
/// stream). Steps on the session's other streams count as activity: a hop's
/// client stream carries no steps once its push stream runs them.
async fn read_while_active(
    r: &mut ReadHalf<Stream>,
    ctx: &SessionCtx,
    idle: Duration,
) -> Option<Result<Option<InferMessage>, crate::net::wire::WireError>> {
    let read = read_message(r);
    tokio::pin!(read);
    loop {
        let wait = idle.saturating_sub(ctx.state().last_active.elapsed());
        if wait.is_zero() {
            return None;
        }
        tokio::select! {
            m = &mut read => return Some(m),
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Computes one step and sends its output on: to the next hop, or as the
/// result to the client; then a copy to the client. A replay step stops at
/// its `last_hop`. A step from a push stream attached in `epoch` is dropped
/// (and `false` returned) once a reroute has replaced that stream.
pub(super) async fn run_step(
    exec: &Executor,
    ctx: &SessionCtx,
    step: Step,
    epoch: Option<u64>,
) -> bool {
    let (id, seq, start_pos, last_hop) = (step.session_id, step.seq, step.start_pos, step.last_hop);
    if let Some(e) = epoch {
        if ctx.state().epoch != e {
            return false;
        }
    }
    let input = ctx.fault.as_ref().map(|_| step.hidden.clone());
    let input_hash = nomoat_protocol::frame_hash(&step.hidden);
    let result = exec.step(id, seq, start_pos as usize, step.hidden).await;
    let (push, hop_index, steps) = {
        let mut st = ctx.state();
        if result.is_ok() {
            st.last_active = std::time::Instant::now();
            st.steps += 1;
        }
        (st.push.clone(), st.hop_index, st.steps)
    };
    let result = match (result, &ctx.fault, input) {
        (Ok(out), Some(f), Some(input)) if f.lies(steps - 1, &ctx.opener) => {
            Ok(f.apply(&input, out))
        }
        (r, _, _) => r,
    };
    match result {
        Ok(out) => {
            // The receipt goes first, so the client holds it when the
            // output comes.
            let body = {
                let mut st = ctx.state();
                st.chain.push_hash(start_pos, input_hash);
                nomoat_protocol::ReceiptBody {
                    model_id: ctx.model_id.to_string(),
                    session_id: id,
                    seq,
                    blocks: ctx.blocks,
                    start_pos,
                    rows: out.shape().first().copied().unwrap_or(0) as u32,
                    inputs: st.chain,
                    output: nomoat_protocol::frame_hash(&out),
                    adapter: ctx.adapter,
                }
            };
            let receipt = InferMessage::Receipt(ctx.net.sign_receipt(body));
            let _ = ctx.client.send(receipt).await;
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
                    // The result is the last hop's copy too: no need to
                    // send the same bytes twice.
                    let _ = ctx
                        .client
                        .send(InferMessage::Result {
                            session_id: id,
                            seq,
                            hidden: out,
                        })
                        .await;
                    return true;
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
pub(super) async fn reroute(
    net: &NetHandle,
    ctx: &SessionCtx,
    blocks: BlockRange,
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
            Some(next) => {
                let (push, ready) =
                    spawn_push(net, r.session_id, r.hop_index, next.peer_id.clone(), None);
                match ready.await {
                    Ok(Ok(())) => Some(push),
                    Ok(Err(m)) => return Err((ErrorCode::Internal, m)),
                    Err(_) => return Err((ErrorCode::Internal, "the push stream ended".into())),
                }
            }
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
