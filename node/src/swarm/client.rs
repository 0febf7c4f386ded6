//! The client side: find servers, choose a route, open a session along it
//! and drive generation with the head held locally.

use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use futures::AsyncReadExt;
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    decode_info_response, encode_info_request, Blocks, ErrorCode, Hop, InferMessage, OpenSession,
    ServerInfo, SessionId, Step, TensorFrame, INFER_PROTOCOL, INFO_PROTOCOL,
};
use nomoat_scheduler::{chain, BlockRange};
use tokio::sync::mpsc;

use super::net::NetHandle;
use super::wire::{read_frame, read_message, write_frame, write_message};
use crate::engine::{
    hidden_from_frame, hidden_to_frame, GenerateOptions, GenerationStats, Head, TokenLoop,
};

/// Default time a step may take end to end before the client gives up.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long opening a session on one hop may take.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// What went wrong on the swarm side of a generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SwarmError {
    /// No chain of live servers covers every block.
    #[error("no route: blocks {missing} of model {model_id} are not served by any live server")]
    NoRoute {
        /// The model.
        model_id: String,
        /// The uncovered blocks, e.g. `10..20, 25..30`.
        missing: String,
    },
    /// A hop answered with an error frame.
    #[error("hop {hop} ({peer}, blocks {blocks}) refused: {message} [{code:?}]")]
    Hop {
        /// Index in the route.
        hop: usize,
        /// The server.
        peer: PeerId,
        /// Its blocks.
        blocks: Blocks,
        /// The wire code.
        code: Option<ErrorCode>,
        /// The server's message.
        message: String,
    },
    /// A hop stopped answering or its stream closed.
    #[error("hop {hop} ({peer}, blocks {blocks}) failed: {reason}")]
    HopFailed {
        /// Index in the route.
        hop: usize,
        /// The server.
        peer: PeerId,
        /// Its blocks.
        blocks: Blocks,
        /// What happened.
        reason: String,
    },
    /// Could not talk to a peer at all.
    #[error("{0}")]
    Network(String),
    /// Local computation failed.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

/// Asks a peer for the servers it knows (`/nomoat/info/1`).
pub async fn query_servers(
    net: &NetHandle,
    peer: PeerId,
    model_id: &str,
) -> Result<Vec<ServerInfo>, SwarmError> {
    let mut control = net.control();
    let fut = async {
        let mut s = control
            .open_stream(peer, StreamProtocol::new(INFO_PROTOCOL))
            .await
            .map_err(|e| SwarmError::Network(format!("{peer}: {e}")))?;
        write_frame(&mut s, &encode_info_request(model_id))
            .await
            .map_err(|e| SwarmError::Network(format!("{peer}: {e}")))?;
        let body = read_frame(&mut s)
            .await
            .map_err(|e| SwarmError::Network(format!("{peer}: {e}")))?
            .ok_or_else(|| SwarmError::Network(format!("{peer} closed the info stream")))?;
        decode_info_response(&body).map_err(|e| SwarmError::Network(format!("{peer}: {e}")))
    };
    tokio::time::timeout(OPEN_TIMEOUT, fut)
        .await
        .map_err(|_| SwarmError::Network(format!("{peer} did not answer the info query")))?
}

/// Connects to a bootstrap address and collects the live servers of
/// `model_id` it and the swarm's announcements know.
pub async fn discover(
    net: &NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
) -> Result<Vec<ServerInfo>, SwarmError> {
    let mut all: Vec<ServerInfo> = Vec::new();
    let mut last_err = None;
    for addr in bootstrap {
        match net.dial(addr.clone()).await {
            Ok(peer) => match query_servers(net, peer, model_id).await {
                Ok(list) => all.extend(list),
                Err(e) => last_err = Some(e),
            },
            Err(e) => last_err = Some(SwarmError::Network(e.to_string())),
        }
    }
    all.extend(net.servers(model_id));
    all.sort_by(|a, b| {
        a.peer_id
            .cmp(&b.peer_id)
            .then(b.timestamp_ms.cmp(&a.timestamp_ms))
    });
    all.dedup_by(|a, b| a.peer_id == b.peer_id);
    if all.is_empty() {
        if let Some(e) = last_err {
            return Err(e);
        }
    }
    for s in &all {
        if let Ok(peer) = PeerId::from_bytes(&s.peer_id) {
            let addrs = s
                .addrs
                .iter()
                .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                .collect();
            net.add_addresses(peer, addrs).await;
        }
    }
    Ok(all)
}

/// Throughput assumed for a server that has not measured itself yet,
/// blocks per second: all unknown servers look alike, so the route then
/// minimises legs and RTT.
pub const UNKNOWN_BLOCKS_PER_S: f64 = 100.0;
/// RTT assumed for a server not yet pinged when no server has been.
pub const UNKNOWN_RTT: Duration = Duration::from_millis(50);

/// How much each server's leg cost is randomly scaled per session (up to
/// 25%): between otherwise equal replicas the choice is random, so clients
/// that plan at the same moment, on the same stale announcements, do not
/// all pick the same one. Only legs are scaled: jittered compute speeds
/// would make splitting a range across replicas look profitable.
pub const ROUTE_JITTER: f64 = 0.25;
/// Load a client adds to a server for each session it has open there
/// itself (known at once, unlike announced load).
pub const OWN_SESSION_LOAD: f64 = 0.1;

/// The cheapest route by expected per-token latency (see
/// [`nomoat_scheduler::plan_route`]): measured RTTs, announced throughput and
/// load (plus this client's own sessions there), and a penalty on servers
/// without KV room for `max_length` positions; legs scaled by a random
/// factor up to [`ROUTE_JITTER`].
pub fn plan(
    net: &NetHandle,
    model_id: &str,
    num_blocks: u32,
    servers: &[ServerInfo],
    max_length: u32,
) -> Result<Vec<Hop>, SwarmError> {
    let peers: Vec<Option<PeerId>> = servers
        .iter()
        .map(|s| PeerId::from_bytes(&s.peer_id).ok())
        .collect();
    let rtts: Vec<Option<Duration>> = peers.iter().map(|p| p.and_then(|p| net.rtt(&p))).collect();
    // A server not pinged yet is assumed typical: the median of the known RTTs.
    let mut known: Vec<Duration> = rtts.iter().flatten().copied().collect();
    known.sort();
    let typical = known.get(known.len() / 2).copied().unwrap_or(UNKNOWN_RTT);
    let candidates: Vec<nomoat_scheduler::Candidate> = servers
        .iter()
        .zip(&rtts)
        .zip(&peers)
        .map(|((s, rtt), peer)| {
            let rtt = rtt.unwrap_or(typical);
            let span_len = f64::from(s.blocks.end - s.blocks.start);
            let blocks_per_s = if s.throughput > 0.0 {
                f64::from(s.throughput) * span_len
            } else {
                UNKNOWN_BLOCKS_PER_S
            };
            let jitter = 1.0 + ROUTE_JITTER * rand::random::<f64>();
            nomoat_scheduler::Candidate {
                span: BlockRange {
                    start: s.blocks.start,
                    end: s.blocks.end,
                },
                blocks_per_s,
                rtt_s: rtt.as_secs_f64() * jitter,
                load: f64::from(s.load)
                    + OWN_SESSION_LOAD * peer.map_or(0, |p| net.own_sessions(&p)) as f64,
                has_kv_room: s.free_kv_tokens >= max_length,
                backed_off: false,
            }
        })
        .collect();
    match nomoat_scheduler::plan_route(num_blocks, &candidates) {
        Some(route) => Ok(route
            .hops
            .iter()
            .map(|h| Hop {
                peer_id: servers[h.server].peer_id.clone(),
                blocks: Blocks {
                    start: h.blocks.start,
                    end: h.blocks.end,
                },
            })
            .collect()),
        None => simple_route(model_id, num_blocks, servers),
    }
}

/// Picks a chain of servers that covers blocks `0..num_blocks`: at each
/// boundary the server that reaches furthest. Returns the hops, or
/// [`SwarmError::NoRoute`] naming the uncovered blocks.
pub fn simple_route(
    model_id: &str,
    num_blocks: u32,
    servers: &[ServerInfo],
) -> Result<Vec<Hop>, SwarmError> {
    let ranges: Vec<BlockRange> = servers
        .iter()
        .map(|s| BlockRange {
            start: s.blocks.start,
            end: s.blocks.end,
        })
        .collect();
    let Some(order) = chain(num_blocks, &ranges) else {
        let gaps = nomoat_scheduler::coverage_gaps(num_blocks, &ranges);
        return Err(SwarmError::NoRoute {
            model_id: model_id.to_string(),
            missing: gaps
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let mut at = 0;
    Ok(order
        .into_iter()
        .map(|i| {
            let s = &servers[i];
            let hop = Hop {
                peer_id: s.peer_id.clone(),
                blocks: Blocks {
                    start: at,
                    end: s.blocks.end,
                },
            };
            at = s.blocks.end;
            hop
        })
        .collect())
}

/// One inference session along a route.
#[derive(Debug)]
pub struct RemoteSession {
    id: SessionId,
    route: Vec<(PeerId, Blocks)>,
    first: WriteHalf<Stream>,
    writers: Vec<WriteHalf<Stream>>,
    events: mpsc::Receiver<(usize, Option<InferMessage>)>,
    seq: u64,
    step_timeout: Duration,
    /// Inputs of every hop, per step: `(start_pos, frame)`; what failover
    /// replays and verification recomputes.
    history: Vec<Vec<(u32, TensorFrame)>>,
    /// Counts this session against each hop's load until dropped.
    net: NetHandle,
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        for (peer, _) in &self.route {
            self.net.count_session(*peer, false);
        }
    }
}

impl RemoteSession {
    /// Opens a session on every hop, last hop first.
    pub async fn open(
        net: &NetHandle,
        model_id: &str,
        route: Vec<Hop>,
        max_length: u32,
        step_timeout: Duration,
    ) -> Result<Self, SwarmError> {
        let mut id = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut id);
        let id = SessionId(id);
        let peers: Vec<(PeerId, Blocks)> = route
            .iter()
            .map(|h| {
                PeerId::from_bytes(&h.peer_id)
                    .map(|p| (p, h.blocks))
                    .map_err(|e| SwarmError::Network(format!("bad peer id in route: {e}")))
            })
            .collect::<Result<_, _>>()?;
        let (tx, events) = mpsc::channel(256);
        let mut writers: Vec<Option<WriteHalf<Stream>>> = (0..route.len()).map(|_| None).collect();
        for hop in (0..route.len()).rev() {
            let (peer, blocks) = peers[hop];
            let failed = |reason: String| SwarmError::HopFailed {
                hop,
                peer,
                blocks,
                reason,
            };
            let mut control = net.control();
            let open = OpenSession {
                session_id: id,
                model_id: model_id.to_string(),
                route: route.clone(),
                hop_index: hop as u32,
                max_length,
            };
            let fut = async {
                net.connect_known(peer).await;
                let stream = control
                    .open_stream(peer, StreamProtocol::new(INFER_PROTOCOL))
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                let (mut r, mut w) = stream.split();
                write_message(&mut w, &InferMessage::Open(open))
                    .await
                    .map_err(|e| failed(e.to_string()))?;
                match read_message(&mut r).await {
                    Ok(Some(InferMessage::Opened { .. })) => Ok((r, w)),
                    Ok(Some(InferMessage::Error(e))) => Err(SwarmError::Hop {
                        hop,
                        peer,
                        blocks,
                        code: e.code,
                        message: e.message,
                    }),
                    Ok(other) => Err(failed(format!("unexpected answer {other:?}"))),
                    Err(e) => Err(failed(e.to_string())),
                }
            };
            let (mut r, w) = tokio::time::timeout(OPEN_TIMEOUT, fut)
                .await
                .map_err(|_| failed(format!("no answer within {OPEN_TIMEOUT:?}")))??;
            writers[hop] = Some(w);
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    match read_message(&mut r).await {
                        Ok(Some(m)) => {
                            if tx.send((hop, Some(m))).await.is_err() {
                                break;
                            }
                        }
                        _ => {
                            let _ = tx.send((hop, None)).await;
                            break;
                        }
                    }
                }
            });
        }
        let mut writers: Vec<WriteHalf<Stream>> = writers
            .into_iter()
            .map(|w| w.expect("every hop opened"))
            .collect();
        let first = writers.remove(0);
        for (peer, _) in &peers {
            net.count_session(*peer, true);
        }
        Ok(Self {
            id,
            net: net.clone(),
            history: vec![Vec::new(); peers.len()],
            route: peers,
            first,
            writers,
            events,
            seq: 0,
            step_timeout,
        })
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The route: each hop's peer and blocks.
    pub fn route(&self) -> &[(PeerId, Blocks)] {
        &self.route
    }

    /// Sends hidden states for positions `start_pos..` through the route
    /// and returns the last hop's output.
    pub async fn step(
        &mut self,
        start_pos: u32,
        hidden: TensorFrame,
    ) -> Result<TensorFrame, SwarmError> {
        self.seq += 1;
        let seq = self.seq;
        self.history[0].push((start_pos, hidden.clone()));
        let msg = InferMessage::Step(Step {
            session_id: self.id,
            seq,
            start_pos,
            hidden,
        });
        let (peer0, blocks0) = self.route[0];
        write_message(&mut self.first, &msg)
            .await
            .map_err(|e| SwarmError::HopFailed {
                hop: 0,
                peer: peer0,
                blocks: blocks0,
                reason: e.to_string(),
            })?;
        let deadline = Instant::now() + self.step_timeout;
        let mut copies = vec![false; self.route.len()];
        // Per-hop latency: the time between successive hops' outputs.
        let mut last_output = Instant::now();
        let hop_latency = |last: &mut Instant| {
            let now = Instant::now();
            crate::metrics::global()
                .hop_latency
                .observe(now.saturating_duration_since(*last));
            *last = now;
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match tokio::time::timeout(left, self.events.recv()).await {
                Ok(Some(e)) => e,
                Ok(None) => (0, None),
                Err(_) => {
                    // The first hop whose output never came is the one that failed.
                    let hop = copies
                        .iter()
                        .position(|c| !c)
                        .unwrap_or(self.route.len() - 1);
                    let (peer, blocks) = self.route[hop];
                    return Err(SwarmError::HopFailed {
                        hop,
                        peer,
                        blocks,
                        reason: format!("no answer to step {seq} within {:?}", self.step_timeout),
                    });
                }
            };
            let (hop, msg) = event;
            let (peer, blocks) = self.route[hop];
            match msg {
                None => {
                    return Err(SwarmError::HopFailed {
                        hop,
                        peer,
                        blocks,
                        reason: "the connection closed".into(),
                    })
                }
                Some(InferMessage::Result { seq: s, hidden, .. }) if s == seq => {
                    hop_latency(&mut last_output);
                    return Ok(hidden);
                }
                Some(InferMessage::Copy {
                    seq: s,
                    hop_index,
                    hidden,
                    ..
                }) if s == seq => {
                    let h = hop_index as usize;
                    if h < copies.len() {
                        if !copies[h] && h + 1 < copies.len() {
                            hop_latency(&mut last_output);
                        }
                        copies[h] = true;
                        if h + 1 < self.history.len() {
                            self.history[h + 1].push((start_pos, hidden));
                        }
                    }
                }
                Some(InferMessage::Error(e)) if e.seq == seq || e.seq == 0 => {
                    // The frame names the hop to blame (a hop reports its
                    // unreachable successor); fall back to the reporter.
                    let blamed = (e.hop_index as usize).min(self.route.len() - 1);
                    let blamed = if blamed >= hop { blamed } else { hop };
                    let (peer, blocks) = self.route[blamed];
                    return Err(SwarmError::Hop {
                        hop: blamed,
                        peer,
                        blocks,
                        code: e.code,
                        message: e.message,
                    });
                }
                Some(_) => {} // late answers of earlier steps
            }
        }
    }

    /// The inputs each hop received, step by step.
    pub fn history(&self) -> &[Vec<(u32, TensorFrame)>] {
        &self.history
    }

    /// Closes the session on every hop.
    pub async fn close(mut self) {
        let close = InferMessage::Close {
            session_id: self.id,
        };
        let _ = write_message(&mut self.first, &close).await;
        for w in &mut self.writers {
            let _ = write_message(w, &close).await;
        }
    }
}

/// Generates through a remote session with the head computed locally (on a
/// blocking thread, off the network runtime). Mirrors
/// [`crate::engine::LocalModel::generate`].
pub async fn generate_remote(
    head: std::sync::Arc<Head>,
    session: &mut RemoteSession,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> anyhow::Result<bool>,
) -> anyhow::Result<(Vec<u32>, GenerationStats)> {
    let hidden_size = head.config().hidden_size;
    let mut tokens = TokenLoop::new(prompt, opts, head.config().max_seq_len)?;
    let embed = |head: std::sync::Arc<Head>, tokens: Vec<u32>| async move {
        tokio::task::spawn_blocking(move || -> anyhow::Result<TensorFrame> {
            Ok(hidden_to_frame(&head.embed(&tokens)?)?)
        })
        .await?
    };
    let logits = |head: std::sync::Arc<Head>, frame: TensorFrame| async move {
        tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f32>> {
            let h = hidden_from_frame(&frame, hidden_size)?;
            Ok(head.last_logits(&h)?)
        })
        .await?
    };
    let h = session
        .step(0, embed(head.clone(), prompt.to_vec()).await?)
        .await?;
    let mut pos = prompt.len() as u32;
    let mut l = logits(head.clone(), h).await?;
    while let Some(next) = tokens.next(&l, &mut on_token)? {
        let h = session
            .step(pos, embed(head.clone(), vec![next]).await?)
            .await?;
        pos += 1;
        l = logits(head.clone(), h).await?;
    }
    Ok(tokens.finish())
}
