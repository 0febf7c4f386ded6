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
/// Retries of a session open that failed transiently.
pub const OPEN_RETRIES: u32 = 2;
/// Wait before the first retry (doubled for the second).
pub const OPEN_RETRY_DELAY: Duration = Duration::from_millis(300);
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
    /// A hop failed and no replacement could take over.
    #[error("{failure}; failover found no replacement: {reason}")]
    FailoverFailed {
        /// The hop's failure.
        failure: Box<SwarmError>,
        /// Why no replacement took over.
        reason: String,
    },
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

/// Throughput assumed for servers when none has been measured (by itself
/// or by this node), blocks per second: all unknown servers look alike, so
/// the route then minimises legs and RTT.
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
    // Blocks per second: this node's own measurement wins over what the
    // server announces; a server with neither counts as the median.
    let speeds: Vec<Option<f64>> = servers
        .iter()
        .zip(&peers)
        .map(|(s, peer)| {
            let observed = peer.and_then(|p| net.observed_secs_per_block(&p));
            let span_len = f64::from(s.blocks.end - s.blocks.start);
            match observed {
                Some(spb) => Some(1.0 / spb.max(1e-6)),
                None if s.throughput > 0.0 => Some(f64::from(s.throughput) * span_len),
                None => None,
            }
        })
        .collect();
    let mut known_speeds: Vec<f64> = speeds.iter().flatten().copied().collect();
    known_speeds.sort_by(f64::total_cmp);
    let typical_speed = known_speeds
        .get(known_speeds.len() / 2)
        .copied()
        .unwrap_or(UNKNOWN_BLOCKS_PER_S);
    let candidates: Vec<nomoat_scheduler::Candidate> = servers
        .iter()
        .zip(&rtts)
        .zip(&peers)
        .enumerate()
        .map(|(i, ((s, rtt), peer))| {
            let rtt = rtt.unwrap_or(typical);
            let blocks_per_s = speeds[i].unwrap_or(typical_speed);
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
                backed_off: peer.is_some_and(|p| net.is_backed_off(&p)),
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
        // No route: name the blocks no usable server covers.
        None => {
            let usable: Vec<ServerInfo> = servers
                .iter()
                .zip(&candidates)
                .filter(|(_, c)| !c.backed_off)
                .map(|(s, _)| s.clone())
                .collect();
            simple_route(model_id, num_blocks, &usable)
        }
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

/// Longest a decode step may take when earlier steps were fast: the
/// adaptive timeout is this many times the smoothed step latency...
pub const DECODE_TIMEOUT_FACTOR: f64 = 10.0;
/// ...but never less than this, so a loaded machine is not taken for dead.
pub const MIN_DECODE_TIMEOUT: Duration = Duration::from_secs(2);
/// Failovers one step may go through before the client gives up.
pub const MAX_FAILOVERS_PER_STEP: usize = 3;
/// How long failover waits for copies still in flight from a live hop.
pub const HISTORY_WAIT: Duration = Duration::from_secs(5);

/// What one failover did and how long each part took.
#[derive(Debug, Clone)]
pub struct FailoverReport {
    /// The hops replaced: index range in the old route.
    pub failed: std::ops::RangeInclusive<usize>,
    /// The peers replaced.
    pub failed_peers: Vec<PeerId>,
    /// The blocks they ran.
    pub blocks: Blocks,
    /// The servers that took over, with the blocks each runs.
    pub replacement: Vec<(PeerId, Blocks)>,
    /// Why: the failure that started it.
    pub cause: String,
    /// Time to find servers and plan the replacement.
    pub plan: Duration,
    /// Time to reroute the hops that stayed and open the replacement.
    pub reopen: Duration,
    /// Time to replay the history into the replacement.
    pub replay: Duration,
    /// Positions replayed.
    pub replayed_positions: u32,
    /// Replay steps sent.
    pub replayed_steps: usize,
}

/// One open stream to a hop of the route.
#[derive(Debug)]
struct HopConn {
    peer: PeerId,
    blocks: Blocks,
    writer: WriteHalf<Stream>,
    /// Tags the events read from this stream.
    conn: u64,
}

/// A step in flight or recently done, for placing hops' copies in history.
#[derive(Debug, Clone, Copy)]
struct LiveStep {
    start: u32,
    /// Positions below this are still valid (a later rewind may cut it).
    end: u32,
    /// A replay's last hop: its copy is not history (the next hop has it).
    stop: Option<usize>,
}

type Event = (u64, Option<InferMessage>);

/// One inference session along a route, with failover: when a hop fails the
/// session replaces it, replays its inputs and goes on (see the protocol
/// crate's "Failover").
#[derive(Debug)]
pub struct RemoteSession {
    id: SessionId,
    model_id: String,
    max_length: u32,
    hops: Vec<HopConn>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    next_conn: u64,
    seq: u64,
    step_timeout: Duration,
    /// Smoothed latency of single-position steps, seconds.
    decode_ema: Option<f64>,
    /// Inputs of every hop, contiguous positions from 0: `(start_pos,
    /// frame)`; what failover replays.
    history: Vec<Vec<(u32, TensorFrame)>>,
    live: std::collections::BTreeMap<u64, LiveStep>,
    failovers: Vec<FailoverReport>,
    /// Counts this session against each hop's load until dropped.
    net: NetHandle,
}

impl Drop for RemoteSession {
    fn drop(&mut self) {
        for h in &self.hops {
            self.net.count_session(h.peer, false);
        }
    }
}

fn route_peers(route: &[Hop]) -> Result<Vec<(PeerId, Blocks)>, SwarmError> {
    route
        .iter()
        .map(|h| {
            PeerId::from_bytes(&h.peer_id)
                .map(|p| (p, h.blocks))
                .map_err(|e| SwarmError::Network(format!("bad peer id in route: {e}")))
        })
        .collect()
}

/// Opens the session on hop `hop` of `route` and starts forwarding what
/// the hop sends, tagged `conn`, to `tx`.
#[allow(clippy::too_many_arguments)]
async fn open_hop(
    net: &NetHandle,
    id: SessionId,
    model_id: &str,
    route: &[Hop],
    hop: usize,
    max_length: u32,
    conn: u64,
    tx: mpsc::Sender<Event>,
) -> Result<WriteHalf<Stream>, SwarmError> {
    let (peer, blocks) = route_peers(&route[hop..=hop])?[0];
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
        route: route.to_vec(),
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
    tokio::spawn(async move {
        loop {
            match read_message(&mut r).await {
                Ok(Some(m)) => {
                    if tx.send((conn, Some(m))).await.is_err() {
                        break;
                    }
                }
                _ => {
                    let _ = tx.send((conn, None)).await;
                    break;
                }
            }
        }
    });
    Ok(w)
}

/// Drops positions `pos..` from a hop's history, cutting a chunk that
/// straddles `pos`.
fn truncate_history(h: &mut Vec<(u32, TensorFrame)>, pos: u32) {
    while let Some((start, frame)) = h.last() {
        let rows = frame.shape().first().copied().unwrap_or(0) as u32;
        if start + rows <= pos {
            break;
        }
        if *start >= pos {
            h.pop();
            continue;
        }
        let keep = (pos - start) as usize;
        match frame.narrow_rows(0, keep) {
            Some(f) => {
                let start = *start;
                *h.last_mut().expect("not empty") = (start, f);
            }
            None => {
                h.pop();
            }
        }
        break;
    }
}

/// The next position after a hop's history.
fn history_end(h: &[(u32, TensorFrame)]) -> u32 {
    h.last().map_or(0, |(s, f)| {
        s + f.shape().first().copied().unwrap_or(0) as u32
    })
}

impl SwarmError {
    /// The hop a failure is blamed on, if it is a hop's failure.
    pub fn failed_hop(&self) -> Option<(usize, PeerId)> {
        match self {
            SwarmError::Hop { hop, peer, .. } | SwarmError::HopFailed { hop, peer, .. } => {
                Some((*hop, *peer))
            }
            SwarmError::FailoverFailed { failure, .. } => failure.failed_hop(),
            _ => None,
        }
    }

    /// Whether the same route might work a moment later.
    fn transient(&self) -> bool {
        match self {
            SwarmError::HopFailed { .. } => true,
            SwarmError::Hop { code, .. } => matches!(
                code,
                Some(ErrorCode::Internal | ErrorCode::Busy | ErrorCode::UnknownSession)
            ),
            _ => false,
        }
    }

    /// Whether another server might succeed where this one failed: every
    /// transient failure, and a server that cannot run this model or range.
    fn replaceable(&self) -> bool {
        self.transient()
            || matches!(
                self,
                SwarmError::Hop {
                    code: None
                        | Some(
                            ErrorCode::WrongBlocks | ErrorCode::WrongModel | ErrorCode::Unsupported
                        ),
                    ..
                }
            )
    }
}

impl RemoteSession {
    /// Opens a session on every hop, last hop first.
    ///
    /// A transient failure (a hop that cannot reach its successor yet
    /// because announcements are still spreading, a busy or silent hop) is
    /// retried [`OPEN_RETRIES`] times, a little later each time, with a new
    /// session id; hops opened by a failed attempt drop it when its streams
    /// close.
    pub async fn open(
        net: &NetHandle,
        model_id: &str,
        route: Vec<Hop>,
        max_length: u32,
        step_timeout: Duration,
    ) -> Result<Self, SwarmError> {
        let mut attempt = 0u32;
        loop {
            match Self::open_once(net, model_id, route.clone(), max_length, step_timeout).await {
                Err(e) if e.transient() && attempt < OPEN_RETRIES => {
                    attempt += 1;
                    tracing::debug!("opening the session failed ({e}); retrying");
                    tokio::time::sleep(OPEN_RETRY_DELAY * attempt).await;
                }
                Err(e) => {
                    if let (true, Some((_, peer))) = (e.replaceable(), e.failed_hop()) {
                        net.peer_failed(peer);
                    }
                    return Err(e);
                }
                ok => return ok,
            }
        }
    }

    async fn open_once(
        net: &NetHandle,
        model_id: &str,
        route: Vec<Hop>,
        max_length: u32,
        step_timeout: Duration,
    ) -> Result<Self, SwarmError> {
        let mut id = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut id);
        let id = SessionId(id);
        let peers = route_peers(&route)?;
        let (tx, events) = mpsc::channel(256);
        let mut writers: Vec<Option<WriteHalf<Stream>>> = (0..route.len()).map(|_| None).collect();
        for hop in (0..route.len()).rev() {
            let w = open_hop(
                net,
                id,
                model_id,
                &route,
                hop,
                max_length,
                hop as u64,
                tx.clone(),
            )
            .await;
            match w {
                Ok(w) => writers[hop] = Some(w),
                Err(e) => {
                    // The hops already opened free the session at once.
                    let close = InferMessage::Close { session_id: id };
                    for w in writers.iter_mut().flatten() {
                        let _ = write_message(w, &close).await;
                    }
                    return Err(e);
                }
            }
        }
        let hops: Vec<HopConn> = peers
            .iter()
            .zip(writers)
            .enumerate()
            .map(|(i, ((peer, blocks), w))| HopConn {
                peer: *peer,
                blocks: *blocks,
                writer: w.expect("every hop opened"),
                conn: i as u64,
            })
            .collect();
        for h in &hops {
            net.count_session(h.peer, true);
        }
        Ok(Self {
            id,
            model_id: model_id.to_string(),
            max_length,
            net: net.clone(),
            history: vec![Vec::new(); hops.len()],
            next_conn: hops.len() as u64,
            hops,
            events_tx: tx,
            events,
            seq: 0,
            step_timeout,
            decode_ema: None,
            live: Default::default(),
            failovers: Vec::new(),
        })
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The route now: each hop's peer and blocks.
    pub fn route(&self) -> Vec<(PeerId, Blocks)> {
        self.hops.iter().map(|h| (h.peer, h.blocks)).collect()
    }

    fn route_hops(&self) -> Vec<Hop> {
        self.hops
            .iter()
            .map(|h| Hop {
                peer_id: h.peer.to_bytes(),
                blocks: h.blocks,
            })
            .collect()
    }

    /// The inputs each hop received, step by step.
    pub fn history(&self) -> &[Vec<(u32, TensorFrame)>] {
        &self.history
    }

    /// The failovers this session went through.
    pub fn failovers(&self) -> &[FailoverReport] {
        &self.failovers
    }

    /// Sends hidden states for positions `start_pos..` through the route
    /// and returns the last hop's output. A hop that fails is replaced (its
    /// inputs replayed to the replacement) and the step sent again, up to
    /// [`MAX_FAILOVERS_PER_STEP`] times.
    pub async fn step(
        &mut self,
        start_pos: u32,
        hidden: TensorFrame,
    ) -> Result<TensorFrame, SwarmError> {
        let t = hidden.shape().first().copied().unwrap_or(1) as u32;
        // A rewind: every hop's history forgets the positions it replaces.
        for h in &mut self.history {
            truncate_history(h, start_pos);
        }
        self.history[0].push((start_pos, hidden.clone()));
        let mut failovers = 0;
        loop {
            let started = Instant::now();
            match self.try_step(start_pos, t, hidden.clone()).await {
                Ok(out) => {
                    if t == 1 {
                        let s = started.elapsed().as_secs_f64();
                        self.decode_ema = Some(self.decode_ema.map_or(s, |e| 0.8 * e + 0.2 * s));
                    }
                    for h in &self.hops {
                        self.net.peer_succeeded(&h.peer);
                    }
                    return Ok(out);
                }
                Err(e) if e.replaceable() && failovers < MAX_FAILOVERS_PER_STEP => {
                    failovers += 1;
                    tracing::warn!("{e}; failing over");
                    match self.failover(&e, start_pos).await {
                        Ok(report) => {
                            tracing::info!(
                                "replaced hop(s) {:?} (blocks {}) in {:?}: plan {:?}, reopen {:?}, replay {:?} of {} positions",
                                report.failed,
                                report.blocks,
                                report.plan + report.reopen + report.replay,
                                report.plan,
                                report.reopen,
                                report.replay,
                                report.replayed_positions
                            );
                            self.failovers.push(report);
                        }
                        Err(reason) => {
                            return Err(SwarmError::FailoverFailed {
                                failure: Box::new(e),
                                reason: reason.to_string(),
                            })
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The index of the hop whose stream carries `conn`.
    fn hop_of(&self, conn: u64) -> Option<usize> {
        self.hops.iter().position(|h| h.conn == conn)
    }

    /// Keeps a hop's copy of its output as the next hop's input.
    fn record_copy(&mut self, hop: usize, seq: u64, hidden: TensorFrame) {
        let Some(step) = self.live.get(&seq).copied() else {
            return;
        };
        if step.stop == Some(hop) || hop + 1 >= self.history.len() || step.end <= step.start {
            return;
        }
        let Some(frame) = hidden.narrow_rows(0, (step.end - step.start) as usize) else {
            return;
        };
        let h = &mut self.history[hop + 1];
        truncate_history(h, step.start);
        if history_end(h) == step.start {
            h.push((step.start, frame));
        }
    }

    /// A new step at `start`: steps it rewinds over are forgotten.
    fn begin_step(&mut self, start: u32, t: u32, stop: Option<usize>) -> u64 {
        self.live.retain(|_, s| s.start < start);
        for s in self.live.values_mut() {
            s.end = s.end.min(start);
        }
        // Old steps' copies have long arrived.
        while self.live.len() > 1024 {
            self.live.pop_first();
        }
        self.begin_step_keep(start, t, stop)
    }

    fn decode_timeout(&self, t: u32) -> Duration {
        match (t, self.decode_ema) {
            (1, Some(ema)) => Duration::from_secs_f64(ema * DECODE_TIMEOUT_FACTOR)
                .max(MIN_DECODE_TIMEOUT)
                .min(self.step_timeout),
            _ => self.step_timeout,
        }
    }

    async fn try_step(
        &mut self,
        start_pos: u32,
        t: u32,
        hidden: TensorFrame,
    ) -> Result<TensorFrame, SwarmError> {
        let seq = self.begin_step(start_pos, t, None);
        let msg = InferMessage::Step(Step {
            session_id: self.id,
            seq,
            start_pos,
            hidden,
            last_hop: None,
        });
        let (peer0, blocks0) = (self.hops[0].peer, self.hops[0].blocks);
        write_message(&mut self.hops[0].writer, &msg)
            .await
            .map_err(|e| SwarmError::HopFailed {
                hop: 0,
                peer: peer0,
                blocks: blocks0,
                reason: e.to_string(),
            })?;
        let timeout = self.decode_timeout(t);
        let sent = Instant::now();
        let mut deadline = sent + timeout;
        let mut copies = vec![false; self.hops.len()];
        let mut arrived: Vec<Option<Instant>> = vec![None; self.hops.len()];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((conn, msg))) = tokio::time::timeout(left, self.events.recv()).await else {
                // The first hop whose output never came is the one that failed.
                let hop = copies
                    .iter()
                    .position(|c| !c)
                    .unwrap_or(self.hops.len() - 1);
                let (peer, blocks) = (self.hops[hop].peer, self.hops[hop].blocks);
                let waited = sent.elapsed();
                // A slow server beats none: past the adaptive timeout, wait
                // up to the full one when nobody could take over.
                if waited < self.step_timeout && !self.has_replacement(hop).await {
                    tracing::warn!(
                        "hop {hop} ({peer}) is slow ({waited:?}) and no other server holds {blocks}; waiting up to {:?}",
                        self.step_timeout
                    );
                    deadline = sent + self.step_timeout;
                    continue;
                }
                return Err(SwarmError::HopFailed {
                    hop,
                    peer,
                    blocks,
                    reason: format!("no answer to step {seq} within {waited:.1?}"),
                });
            };
            let Some(hop) = self.hop_of(conn) else {
                continue; // a replaced hop's stream
            };
            let (peer, blocks) = (self.hops[hop].peer, self.hops[hop].blocks);
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
                    if t == 1 {
                        let last = self.hops.len() - 1;
                        arrived[last] = Some(Instant::now());
                        self.observe(sent, &arrived);
                    }
                    return Ok(hidden);
                }
                Some(InferMessage::Copy { seq: s, hidden, .. }) => {
                    if s == seq {
                        copies[hop] = true;
                        arrived[hop].get_or_insert_with(Instant::now);
                    }
                    self.record_copy(hop, s, hidden);
                }
                Some(InferMessage::Error(e)) if e.seq == seq || e.seq == 0 => {
                    // The frame names the hop to blame (a hop reports its
                    // unreachable successor); fall back to the reporter.
                    let blamed = (e.hop_index as usize).min(self.hops.len() - 1);
                    let blamed = if blamed >= hop { blamed } else { hop };
                    let (peer, blocks) = (self.hops[blamed].peer, self.hops[blamed].blocks);
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

    /// Turns the arrival times of a single-token step's outputs into each
    /// hop's compute time: the gap since the previous hop's output less
    /// the leg into the hop (half the RTT; the whole RTT for hop 0, whose
    /// input also came from here).
    fn observe(&self, sent: Instant, arrived: &[Option<Instant>]) {
        let mut prev = Some(sent);
        for (i, (h, at)) in self.hops.iter().zip(arrived).enumerate() {
            let (Some(p), Some(at)) = (prev, *at) else {
                prev = *at;
                continue;
            };
            crate::metrics::global()
                .hop_latency
                .observe(at.saturating_duration_since(p));
            let rtt = self.net.rtt(&h.peer).unwrap_or_default().as_secs_f64();
            let leg = if i == 0 { rtt } else { rtt / 2.0 };
            let secs = (at.saturating_duration_since(p).as_secs_f64() - leg).max(0.0);
            self.net
                .observe_step(h.peer, h.blocks.end - h.blocks.start, secs);
            prev = Some(at);
        }
    }

    /// Waits for an event from `conn` that `want` accepts, recording copies
    /// meanwhile. `Err` names what went wrong.
    async fn wait_for(
        &mut self,
        conn: u64,
        timeout: Duration,
        mut want: impl FnMut(&InferMessage) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((c, msg))) = tokio::time::timeout(left, self.events.recv()).await else {
                return Err(format!("no answer within {timeout:?}"));
            };
            if let (Some(hop), Some(InferMessage::Copy { seq, hidden, .. })) =
                (self.hop_of(c), &msg)
            {
                self.record_copy(hop, *seq, hidden.clone());
            }
            if let Some(InferMessage::Error(e)) = &msg {
                if self.live.get(&e.seq).is_some_and(|s| s.stop.is_some()) {
                    return Err(format!("a replay step failed: {e}"));
                }
            }
            if c != conn {
                continue;
            }
            match msg {
                None => return Err("the connection closed".into()),
                Some(m) if want(&m) => return Ok(()),
                Some(InferMessage::Error(e)) if e.seq == 0 => return Err(e.to_string()),
                Some(_) => {}
            }
        }
    }

    /// Waits until hop `hop`'s history reaches `pos` (its predecessor's
    /// copies may still be in flight).
    async fn await_history(&mut self, hop: usize, pos: u32) -> bool {
        let deadline = Instant::now() + HISTORY_WAIT;
        while history_end(&self.history[hop]) < pos {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((c, msg))) = tokio::time::timeout(left, self.events.recv()).await else {
                return false;
            };
            if let (Some(h), Some(InferMessage::Copy { seq, hidden, .. })) = (self.hop_of(c), msg) {
                self.record_copy(h, seq, hidden);
            }
        }
        true
    }

    /// Whether another live server could run hop `hop`'s blocks now.
    async fn has_replacement(&self, hop: usize) -> bool {
        let (peer, blocks) = (self.hops[hop].peer, self.hops[hop].blocks);
        let servers = self.live_servers(&[peer]).await;
        plan_range(
            &self.net,
            &self.model_id,
            blocks.start,
            blocks.end,
            &servers,
            self.max_length,
        )
        .is_ok()
    }

    /// The live servers of the model, as the hops that stay and this node's
    /// view know them, without the peers to avoid.
    async fn live_servers(&self, avoid: &[PeerId]) -> Vec<ServerInfo> {
        let mut all = self.net.servers(&self.model_id);
        for h in &self.hops {
            if avoid.contains(&h.peer) {
                continue;
            }
            if let Ok(list) = query_servers(&self.net, h.peer, &self.model_id).await {
                all.extend(list);
                break;
            }
        }
        all.sort_by(|a, b| {
            a.peer_id
                .cmp(&b.peer_id)
                .then(b.timestamp_ms.cmp(&a.timestamp_ms))
        });
        all.dedup_by(|a, b| a.peer_id == b.peer_id);
        all.retain(|s| {
            PeerId::from_bytes(&s.peer_id)
                .is_ok_and(|p| !avoid.contains(&p) && !self.net.is_backed_off(&p))
        });
        for s in &all {
            if let Ok(peer) = PeerId::from_bytes(&s.peer_id) {
                let addrs = s
                    .addrs
                    .iter()
                    .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                    .collect();
                self.net.add_addresses(peer, addrs).await;
            }
        }
        all
    }

    /// Replaces the failed hop (widening to its neighbours when they turn
    /// out dead too), replays its history and leaves the session ready to
    /// resend the step at `pos`.
    async fn failover(
        &mut self,
        cause: &SwarmError,
        pos: u32,
    ) -> Result<FailoverReport, SwarmError> {
        let t0 = Instant::now();
        let (failed, _) = cause
            .failed_hop()
            .expect("a replaceable error names its hop");
        let (mut i, mut j) = (failed, failed);
        let mut avoid: Vec<PeerId> = vec![self.hops[failed].peer];
        self.net.peer_failed(self.hops[failed].peer);
        let mut last_err = None;
        for _attempt in 0..=2 * self.hops.len() {
            // The failed range's inputs: from the client itself, or copies
            // from the hop before it.
            if !self.await_history(i, pos).await {
                if i == 0 {
                    return Err(SwarmError::Network(format!(
                        "hop 0's input history is incomplete below position {pos}"
                    )));
                }
                i -= 1;
                avoid.push(self.hops[i].peer);
                continue;
            }
            let (a, b) = (self.hops[i].blocks.start, self.hops[j].blocks.end);
            let servers = self.live_servers(&avoid).await;
            let replacement =
                plan_range(&self.net, &self.model_id, a, b, &servers, self.max_length)?;
            let m = replacement.len();
            let mut route = self.route_hops();
            route.splice(i..=j, replacement.iter().cloned());
            let plan = t0.elapsed();
            let t1 = Instant::now();
            // 1. Hops after the failed range learn the new route.
            let mut widened = false;
            for k in j + 1..self.hops.len() {
                let new_index = k - (j + 1) + i + m;
                if let Err(e) = self.reroute(k, &route, new_index).await {
                    tracing::warn!("hop {k} ({}) failed the reroute: {e}", self.hops[k].peer);
                    self.net.peer_failed(self.hops[k].peer);
                    avoid.push(self.hops[k].peer);
                    j = k;
                    widened = true;
                    break;
                }
            }
            if widened {
                continue;
            }
            // 2. The replacement opens, last first.
            let mut opened: Vec<(usize, WriteHalf<Stream>, u64)> = Vec::new();
            let mut open_err = None;
            for r in (0..m).rev() {
                let conn = self.next_conn;
                self.next_conn += 1;
                match open_hop(
                    &self.net,
                    self.id,
                    &self.model_id,
                    &route,
                    i + r,
                    self.max_length,
                    conn,
                    self.events_tx.clone(),
                )
                .await
                {
                    Ok(w) => opened.push((r, w, conn)),
                    Err(e) => {
                        open_err = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = open_err {
                if let Some((_, peer)) = e.failed_hop() {
                    self.net.peer_failed(peer);
                    avoid.push(peer);
                }
                last_err = Some(e);
                continue;
            }
            // 3. The hop before attaches to the first replacement.
            if i > 0 {
                if let Err(e) = self.reroute(i - 1, &route, i - 1).await {
                    tracing::warn!(
                        "hop {} ({}) failed the reroute: {e}",
                        i - 1,
                        self.hops[i - 1].peer
                    );
                    self.net.peer_failed(self.hops[i - 1].peer);
                    avoid.push(self.hops[i - 1].peer);
                    i -= 1;
                    continue;
                }
            }
            // Commit the new route.
            opened.sort_by_key(|(r, _, _)| *r);
            let new_conns: Vec<HopConn> = opened
                .into_iter()
                .map(|(r, writer, conn)| {
                    let (peer, blocks) = route_peers(&route[i + r..=i + r]).expect("planned")[0];
                    HopConn {
                        peer,
                        blocks,
                        writer,
                        conn,
                    }
                })
                .collect();
            for h in &new_conns {
                self.net.count_session(h.peer, true);
            }
            let old: Vec<HopConn> = self.hops.splice(i..=j, new_conns).collect();
            let failed_peers: Vec<PeerId> = old.iter().map(|h| h.peer).collect();
            for mut h in old {
                self.net.count_session(h.peer, false);
                let _ = futures::AsyncWriteExt::close(&mut h.writer).await;
            }
            let input = std::mem::take(&mut self.history[i]);
            let mut fresh = vec![Vec::new(); m];
            fresh[0] = input;
            self.history.splice(i..=j, fresh);
            let reopen = t1.elapsed();
            // 4. Replay the range's inputs, cut as they were first sent.
            let t2 = Instant::now();
            let last = i + m - 1;
            let mut replay: Vec<(u32, TensorFrame)> = self.history[i].clone();
            // The step being retried is sent again whole.
            truncate_history(&mut replay, pos);
            let mut last_seq = None;
            for (start, frame) in &replay {
                let t = frame.shape().first().copied().unwrap_or(1) as u32;
                let seq = self.begin_step_keep(*start, t, Some(last));
                let msg = InferMessage::Step(Step {
                    session_id: self.id,
                    seq,
                    start_pos: *start,
                    hidden: frame.clone(),
                    last_hop: Some(last as u32),
                });
                write_message(&mut self.hops[i].writer, &msg)
                    .await
                    .map_err(|e| SwarmError::HopFailed {
                        hop: i,
                        peer: self.hops[i].peer,
                        blocks: self.hops[i].blocks,
                        reason: format!("replay: {e}"),
                    })?;
                last_seq = Some(seq);
            }
            if let Some(want) = last_seq {
                let conn = self.hops[last].conn;
                let timeout = self.step_timeout;
                self.wait_for(
                    conn,
                    timeout,
                    |m| matches!(m, InferMessage::Copy { seq, .. } if *seq == want),
                )
                .await
                .map_err(|reason| SwarmError::HopFailed {
                    hop: last,
                    peer: self.hops[last].peer,
                    blocks: self.hops[last].blocks,
                    reason: format!("replay: {reason}"),
                })?;
            }
            return Ok(FailoverReport {
                failed: i..=j,
                failed_peers,
                blocks: Blocks { start: a, end: b },
                replacement: self.route()[i..=last].to_vec(),
                cause: cause.to_string(),
                plan,
                reopen,
                replay: t2.elapsed(),
                replayed_positions: history_end(&replay),
                replayed_steps: replay.len(),
            });
        }
        Err(last_err
            .unwrap_or_else(|| SwarmError::Network("every replacement tried failed".into())))
    }

    /// Like [`begin_step`](Self::begin_step) but for replays, which must
    /// not cut the live steps they re-run.
    fn begin_step_keep(&mut self, start: u32, t: u32, stop: Option<usize>) -> u64 {
        self.seq += 1;
        self.live.insert(
            self.seq,
            LiveStep {
                start,
                end: start + t,
                stop,
            },
        );
        self.seq
    }

    /// Tells hop `hop` (still at its old index) the new route, in which it
    /// is `new_index`, and waits for its answer.
    async fn reroute(&mut self, hop: usize, route: &[Hop], new_index: usize) -> Result<(), String> {
        let msg = InferMessage::Reroute(nomoat_protocol::Reroute {
            session_id: self.id,
            route: route.to_vec(),
            hop_index: new_index as u32,
        });
        write_message(&mut self.hops[hop].writer, &msg)
            .await
            .map_err(|e| e.to_string())?;
        let conn = self.hops[hop].conn;
        self.wait_for(conn, PUSH_AND_OPEN_TIMEOUT, |m| {
            matches!(m, InferMessage::Opened { .. })
        })
        .await
    }

    /// Closes the session on every hop.
    pub async fn close(mut self) {
        let close = InferMessage::Close {
            session_id: self.id,
        };
        for h in &mut self.hops {
            let _ = write_message(&mut h.writer, &close).await;
        }
    }
}

/// How long a reroute may take: the hop attaches a push stream first.
const PUSH_AND_OPEN_TIMEOUT: Duration = Duration::from_secs(15);

/// The cheapest chain of `servers` covering blocks `start..end` (each may
/// run any sub-range of its span), costed as [`plan`] costs a whole route.
pub fn plan_range(
    net: &NetHandle,
    model_id: &str,
    start: u32,
    end: u32,
    servers: &[ServerInfo],
    max_length: u32,
) -> Result<Vec<Hop>, SwarmError> {
    let clipped: Vec<ServerInfo> = servers
        .iter()
        .filter(|s| s.blocks.start < end && s.blocks.end > start)
        .map(|s| {
            let mut c = s.clone();
            c.blocks = Blocks {
                start: s.blocks.start.max(start) - start,
                end: s.blocks.end.min(end) - start,
            };
            // Throughput is per token for the whole span; keep blocks/s.
            c.throughput = s.throughput * (s.blocks.end - s.blocks.start) as f32
                / (c.blocks.end - c.blocks.start) as f32;
            c
        })
        .collect();
    let hops = plan(net, model_id, end - start, &clipped, max_length).map_err(|e| match e {
        SwarmError::NoRoute { model_id, missing } => SwarmError::NoRoute {
            model_id,
            missing: shift_ranges(&missing, start),
        },
        other => other,
    })?;
    Ok(hops
        .into_iter()
        .map(|mut h| {
            h.blocks.start += start;
            h.blocks.end += start;
            h
        })
        .collect())
}

/// Shifts "a..b, c..d" by `by`.
fn shift_ranges(ranges: &str, by: u32) -> String {
    ranges
        .split(", ")
        .map(|r| match r.split_once("..") {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) => format!("{}..{}", a + by, b + by),
                _ => r.to_string(),
            },
            None => r.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
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
