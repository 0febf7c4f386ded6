//! Opening a session along a route, stepping it and measuring its hops.

use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use futures::AsyncReadExt;
use libp2p::{PeerId, Stream, StreamProtocol};
use nomoat_protocol::{
    BlockRange, Hop, InferMessage, OpenSession, SessionId, Step, TensorFrame, INFER_PROTOCOL,
};
use tokio::sync::mpsc;

use super::history::{history_end, truncate_history};
use super::{
    route_peers, ClientError, Event, FailoverReport, HopConn, LiveStep, RemoteSession,
    DECODE_TIMEOUT_FACTOR, MAX_FAILOVERS_PER_STEP, MIN_DECODE_TIMEOUT, OPEN_RETRIES,
    OPEN_RETRY_DELAY, OPEN_TIMEOUT,
};
use crate::net::wire::{read_message, write_message};
use crate::net::NetHandle;

/// Opens the session on hop `hop` of `route` and starts forwarding what
/// the hop sends, tagged `conn`, to `tx`.
#[allow(clippy::too_many_arguments)]
pub(super) async fn open_hop(
    net: &NetHandle,
    id: SessionId,
    model_id: &str,
    route: &[Hop],
    hop: usize,
    max_length: u32,
    adapter: Option<nomoat_protocol::Hash>,
    conn: u64,
    tx: mpsc::Sender<Event>,
) -> Result<WriteHalf<Stream>, ClientError> {
    let (peer, blocks) = route_peers(&route[hop..=hop])?[0];
    let failed = |reason: String| ClientError::HopFailed {
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
        adapter,
    };
    let fut = async {
        net.connect_known(peer).await;
        // A server drops an inbound stream unanswered when several reach it
        // at once (libp2p-stream queues one at a time): open it again.
        for attempt in 1.. {
            let stream = control
                .open_stream(peer, StreamProtocol::new(INFER_PROTOCOL))
                .await
                .map_err(|e| failed(e.to_string()))?;
            let (mut r, mut w) = stream.split();
            // A stream dropped unanswered fails the write (the server
            // stopped it) or ends before the answer: both are tried again.
            let answer = match write_message(&mut w, &InferMessage::Open(open.clone())).await {
                Ok(()) => read_message(&mut r).await,
                Err(e) => Err(e),
            };
            return match answer {
                Ok(Some(InferMessage::Opened { .. })) => Ok((r, w)),
                Ok(Some(InferMessage::Error(e))) => Err(ClientError::Hop {
                    hop,
                    peer,
                    blocks,
                    code: e.code,
                    message: e.message,
                }),
                Ok(None) | Err(crate::net::wire::WireError::Io(_))
                    if attempt < UNANSWERED_STREAM_ATTEMPTS =>
                {
                    tracing::debug!("hop {hop} ({peer}) dropped the stream unanswered; again");
                    tokio::time::sleep(UNANSWERED_STREAM_DELAY * attempt).await;
                    continue;
                }
                Ok(other) => Err(failed(format!("unexpected answer {other:?}"))),
                Err(e) => Err(failed(e.to_string())),
            };
        }
        unreachable!("the loop returns")
    };
    let (mut r, w) = tokio::time::timeout(OPEN_TIMEOUT, fut)
        .await
        .map_err(|_| failed(format!("no answer within {OPEN_TIMEOUT:?}")))??;
    let model_id = model_id.to_string();
    tokio::spawn(async move {
        loop {
            match read_message(&mut r).await {
                Ok(Some(InferMessage::Receipt(receipt))) => {
                    // Checked here, off the session's path: a receipt that
                    // is not this hop's, for this session and its blocks,
                    // fails the hop.
                    let m = match receipt_fault(&receipt, peer, id, &model_id, blocks) {
                        None => InferMessage::Receipt(receipt),
                        Some(why) => InferMessage::Error(nomoat_protocol::ErrorFrame::new(
                            nomoat_protocol::ErrorCode::Malformed,
                            format!("its receipt of step {}: {why}", receipt.body.seq),
                            Some(id),
                            0,
                            u32::MAX,
                        )),
                    };
                    if tx.send((conn, Some(m))).await.is_err() {
                        break;
                    }
                }
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

/// What is wrong with a receipt from hop `peer` (running `blocks` of
/// session `id`), if anything.
fn receipt_fault(
    r: &nomoat_protocol::Receipt,
    peer: PeerId,
    id: SessionId,
    model_id: &str,
    blocks: BlockRange,
) -> Option<String> {
    match crate::net::signed::verify_receipt(r) {
        Err(e) => Some(e),
        Ok(signer) if signer != peer => Some(format!("signed by {signer}, not by the hop")),
        Ok(_) if r.body.session_id != id => Some("for another session".into()),
        Ok(_) if r.body.model_id != model_id => Some("for another model".into()),
        Ok(_) if r.body.blocks != blocks => Some(format!(
            "for blocks {}, not the hop's {blocks}",
            r.body.blocks
        )),
        Ok(_) => None,
    }
}

/// Receipts a session with checks keeps, for evidence (the oldest steps'
/// go first).
pub(crate) const MAX_RECEIPTS: usize = 8192;
/// Receipts a session without checks keeps: each is needed only until
/// the output it signs has come.
pub(crate) const MAX_RECEIPTS_UNCHECKED: usize = 256;

impl RemoteSession {
    /// The next message from the hops within `left`, receipts kept on the
    /// way.
    pub(super) async fn next_event(&mut self, left: Duration) -> Option<super::Event> {
        let deadline = tokio::time::Instant::now() + left;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some((conn, Some(InferMessage::Receipt(r))))) => {
                    self.receipts.insert((r.body.seq, conn), r);
                    let max = if self.checks.is_some() {
                        MAX_RECEIPTS
                    } else {
                        MAX_RECEIPTS_UNCHECKED
                    };
                    while self.receipts.len() > max {
                        self.receipts.pop_first();
                    }
                }
                Ok(Some(e)) => return Some(e),
                _ => return None,
            }
        }
    }

    /// Whether hop stream `conn` signed `frame` as its output of step
    /// `seq`.
    pub(super) fn signed_output(&self, conn: u64, seq: u64, frame: &TensorFrame) -> bool {
        self.receipts.get(&(seq, conn)).is_some_and(|r| {
            r.body.output == nomoat_protocol::frame_hash(frame)
                && frame.shape().first() == Some(&(r.body.rows as usize))
        })
    }

    /// The receipt hop stream `conn` signed for the latest step that
    /// computed position `pos`.
    pub(crate) fn receipt_at(&self, conn: u64, pos: u32) -> Option<&nomoat_protocol::Receipt> {
        self.receipts
            .iter()
            .rev()
            .find(|((_, c), r)| {
                *c == conn
                    && r.body.start_pos <= pos
                    && pos < r.body.start_pos.saturating_add(r.body.rows)
            })
            .map(|(_, r)| r)
    }

    /// Finds the model's servers through `bootstrap` (and the announcements
    /// heard), plans the cheapest route over its `num_blocks` blocks and
    /// opens a session along it, with `adapter` if one is given.
    pub async fn discover_and_open(
        net: &NetHandle,
        bootstrap: &[libp2p::Multiaddr],
        model_id: &str,
        num_blocks: u32,
        max_length: u32,
        step_timeout: Duration,
        adapter: Option<nomoat_protocol::Hash>,
    ) -> Result<Self, ClientError> {
        net.subscribe(model_id).await;
        let servers = crate::net::discover(net, bootstrap, model_id).await?;
        let route = super::plan(net, model_id, num_blocks, &servers, max_length)?;
        Self::open_with(net, model_id, route, max_length, step_timeout, adapter).await
    }

    /// Opens a session on every hop, all at once.
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
    ) -> Result<Self, ClientError> {
        Self::open_with(net, model_id, route, max_length, step_timeout, None).await
    }

    /// [`open`](Self::open) for a session that runs with a LoRA adapter
    /// (every hop loads its part, fetching it from peers if needed).
    pub async fn open_with(
        net: &NetHandle,
        model_id: &str,
        route: Vec<Hop>,
        max_length: u32,
        step_timeout: Duration,
        adapter: Option<nomoat_protocol::Hash>,
    ) -> Result<Self, ClientError> {
        let mut attempt = 0u32;
        loop {
            let once = Self::open_once(
                net,
                model_id,
                route.clone(),
                max_length,
                step_timeout,
                adapter,
            );
            match once.await {
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

    pub(super) async fn open_once(
        net: &NetHandle,
        model_id: &str,
        route: Vec<Hop>,
        max_length: u32,
        step_timeout: Duration,
        adapter: Option<nomoat_protocol::Hash>,
    ) -> Result<Self, ClientError> {
        let mut id = [0u8; 16];
        rand::Rng::fill(&mut rand::rng(), &mut id);
        let id = SessionId(id);
        let peers = route_peers(&route)?;
        let (tx, events) = mpsc::channel(256);
        // Every hop opens at once: a hop answers before its push stream to
        // the next hop has attached, and an early push stream waits there
        // for the session, so opening costs one round trip to the farthest
        // hop whatever the route's length.
        let opens = (0..route.len()).map(|hop| {
            open_hop(
                net,
                id,
                model_id,
                &route,
                hop,
                max_length,
                adapter,
                hop as u64,
                tx.clone(),
            )
        });
        let mut writers = Vec::with_capacity(route.len());
        let mut failed = None;
        for w in futures::future::join_all(opens).await {
            match w {
                Ok(w) => writers.push(w),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        if let Some(e) = failed {
            // The hops that opened free the session at once.
            let close = InferMessage::Close { session_id: id };
            for w in &mut writers {
                let _ = write_message(w, &close).await;
            }
            return Err(e);
        }
        let hops: Vec<HopConn> = peers
            .iter()
            .zip(writers)
            .enumerate()
            .map(|(i, ((peer, blocks), w))| HopConn {
                peer: *peer,
                blocks: *blocks,
                writer: w,
                conn: i as u64,
                joined: 0,
            })
            .collect();
        for h in &hops {
            net.count_session(h.peer, true);
        }
        Ok(Self {
            id,
            model_id: model_id.to_string(),
            max_length,
            adapter,
            net: net.clone(),
            history: vec![Vec::new(); hops.len()],
            outputs: Vec::new(),
            receipts: Default::default(),
            checks: None,
            avoid: Vec::new(),
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
    pub fn route(&self) -> Vec<(PeerId, BlockRange)> {
        self.hops.iter().map(|h| (h.peer, h.blocks)).collect()
    }

    pub(super) fn route_hops(&self) -> Vec<Hop> {
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
    ) -> Result<TensorFrame, ClientError> {
        let t = hidden.shape().first().copied().unwrap_or(1) as u32;
        // A rewind: every hop's history forgets the positions it replaces.
        for h in &mut self.history {
            truncate_history(h, start_pos);
        }
        truncate_history(&mut self.outputs, start_pos);
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
                    if history_end(&self.outputs) == start_pos {
                        self.outputs.push((start_pos, out.clone()));
                    }
                    self.feed_checks(false);
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
                            crate::metrics::global().failovers.inc();
                            self.failovers.push(report);
                        }
                        Err(reason) => {
                            return Err(ClientError::FailoverFailed {
                                failure: Box::new(e),
                                reason: Box::new(reason),
                            })
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The index of the hop whose stream carries `conn`.
    pub(super) fn hop_of(&self, conn: u64) -> Option<usize> {
        self.hops.iter().position(|h| h.conn == conn)
    }

    /// Keeps a hop's copy of its output as the next hop's input.
    pub(super) fn record_copy(&mut self, hop: usize, seq: u64, hidden: TensorFrame) {
        let Some(step) = self.live.get(&seq).copied() else {
            return;
        };
        if step.stop == Some(hop) || hop + 1 >= self.history.len() || step.end <= step.start {
            return;
        }
        // A hop's output has its input's shape. Anything else is dropped
        // here, so a hop cannot make the client keep more than the step's
        // rows (nor poison what a failover replays).
        if hidden.shape() != step.shape {
            tracing::warn!(
                "hop {hop} sent a copy of shape {:?} for step {seq} of shape {:?}; ignored",
                hidden.shape(),
                step.shape
            );
            return;
        }
        if !self.signed_output(self.hops[hop].conn, seq, &hidden) {
            tracing::warn!(
                "hop {hop} sent a copy of step {seq} without its signed receipt; ignored"
            );
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
    pub(super) fn begin_step(
        &mut self,
        start: u32,
        input: &TensorFrame,
        stop: Option<usize>,
    ) -> u64 {
        self.live.retain(|_, s| s.start < start);
        for s in self.live.values_mut() {
            s.end = s.end.min(start);
        }
        // Old steps' copies have long arrived.
        while self.live.len() > 1024 {
            self.live.pop_first();
        }
        self.begin_step_keep(start, input, stop)
    }

    pub(super) fn decode_timeout(&self, t: u32) -> Duration {
        match (t, self.decode_ema) {
            (1, Some(ema)) => Duration::from_secs_f64(ema * DECODE_TIMEOUT_FACTOR)
                .max(MIN_DECODE_TIMEOUT)
                .min(self.step_timeout),
            _ => self.step_timeout,
        }
    }

    pub(super) async fn try_step(
        &mut self,
        start_pos: u32,
        t: u32,
        hidden: TensorFrame,
    ) -> Result<TensorFrame, ClientError> {
        let seq = self.begin_step(start_pos, &hidden, None);
        let shape = hidden.shape().to_vec();
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
            .map_err(|e| ClientError::HopFailed {
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
            let Some((conn, msg)) = self.next_event(left).await else {
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
                return Err(ClientError::HopFailed {
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
                    return Err(ClientError::HopFailed {
                        hop,
                        peer,
                        blocks,
                        reason: "the connection closed".into(),
                    })
                }
                Some(InferMessage::Result { seq: s, hidden, .. }) if s == seq => {
                    // Only the last hop's output is the result: an earlier
                    // hop that sends one would skip the hops after it.
                    let last = self.hops.len() - 1;
                    let fault = if hop != last {
                        Some(format!(
                            "hop {hop} sent the result of step {seq}, which only the last hop (hop {last}) sends"
                        ))
                    } else if hidden.shape() != shape.as_slice() {
                        Some(format!(
                            "the result of step {seq} has shape {:?}, not the step's {shape:?}",
                            hidden.shape()
                        ))
                    } else if !self.signed_output(conn, seq, &hidden) {
                        Some(format!(
                            "the result of step {seq} came without the hop's signed receipt of it"
                        ))
                    } else {
                        None
                    };
                    if let Some(reason) = fault {
                        return Err(ClientError::HopFailed {
                            hop,
                            peer,
                            blocks,
                            reason,
                        });
                    }
                    if t == 1 {
                        let last = self.hops.len() - 1;
                        arrived[last] = Some(Instant::now());
                        self.observe(sent, &arrived);
                    }
                    self.await_copies(seq, &shape, &mut copies).await;
                    return Ok(hidden);
                }
                Some(InferMessage::Copy { seq: s, hidden, .. }) => {
                    if s == seq && hidden.shape() == shape.as_slice() {
                        copies[hop] = true;
                        arrived[hop].get_or_insert_with(Instant::now);
                    }
                    self.record_copy(hop, s, hidden);
                }
                Some(InferMessage::Error(e)) if e.seq == seq || e.seq == 0 => {
                    let blamed = self.blame(hop, e.hop_index as usize).await;
                    let (peer, blocks) = (self.hops[blamed].peer, self.hops[blamed].blocks);
                    let message = if blamed == hop && e.hop_index as usize != hop {
                        format!(
                            "{} (hop {hop} blamed hop {}, which this client still reaches: the claim falls on hop {hop})",
                            e.message, e.hop_index
                        )
                    } else {
                        e.message
                    };
                    return Err(ClientError::Hop {
                        hop: blamed,
                        peer,
                        blocks,
                        code: e.code,
                        message,
                    });
                }
                Some(_) => {} // late answers of earlier steps
            }
        }
    }

    /// Whom an error from hop `reporter` that names hop `named` blames. A
    /// hop knows no hop but itself and its successor, whose push stream it
    /// holds, so it may blame only that one, and only when this client can
    /// confirm it: the successor does not answer an info query within
    /// [`BLAME_PROBE_TIMEOUT`]. Any other claim falls on the reporter, so a
    /// lying hop cannot get an honest one backed off and replaced. (An
    /// honest reporter that cannot reach a successor this client reaches
    /// is replaced too: either way the link between them is broken.)
    async fn blame(&self, reporter: usize, named: usize) -> usize {
        if named != reporter + 1 || named >= self.hops.len() {
            return reporter;
        }
        let peer = self.hops[named].peer;
        let probe = crate::net::discover::query_servers(&self.net, peer, &self.model_id);
        match tokio::time::timeout(BLAME_PROBE_TIMEOUT, probe).await {
            Ok(Ok(_)) => reporter,
            _ => named,
        }
    }

    /// The earlier hops' copies of step `seq` travel on other streams than
    /// the last hop's result and may come just after it: waits for them a
    /// little ([`COPY_GRACE`]), so the history that failover replays holds
    /// the step. A copy later still is recorded when it comes.
    async fn await_copies(&mut self, seq: u64, shape: &[usize], copies: &mut [bool]) {
        let last = self.hops.len() - 1;
        let until = Instant::now() + COPY_GRACE;
        while copies[..last].contains(&false) {
            let left = until.saturating_duration_since(Instant::now());
            let Some((conn, msg)) = self.next_event(left).await else {
                return;
            };
            let Some(hop) = self.hop_of(conn) else {
                continue;
            };
            match msg {
                Some(InferMessage::Copy { seq: s, hidden, .. }) => {
                    if s == seq && hidden.shape() == shape {
                        copies[hop] = true;
                    }
                    self.record_copy(hop, s, hidden);
                }
                // Anything else (a closed stream, an error) is the next
                // step's business: queued again, and the wait ends.
                other => {
                    let _ = self.events_tx.try_send((conn, other));
                    return;
                }
            }
        }
    }

    /// Turns the arrival times of a single-token step's outputs into each
    /// hop's compute time: the gap since the previous hop's output less
    /// the leg into the hop (half the RTT; the whole RTT for hop 0, whose
    /// input also came from here).
    pub(super) fn observe(&self, sent: Instant, arrived: &[Option<Instant>]) {
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

    /// Like [`begin_step`](Self::begin_step) but for replays, which must
    /// not cut the live steps they re-run.
    pub(super) fn begin_step_keep(
        &mut self,
        start: u32,
        input: &TensorFrame,
        stop: Option<usize>,
    ) -> u64 {
        let shape = match input.shape() {
            &[rows, width] => [rows, width],
            other => [other.first().copied().unwrap_or(1), 0],
        };
        self.seq += 1;
        self.live.insert(
            self.seq,
            LiveStep {
                start,
                end: start + shape[0] as u32,
                shape,
                stop,
            },
        );
        self.seq
    }

    /// Tells hop `hop` (still at its old index) the new route, in which it
    /// is `new_index`, and waits for its answer.
    pub(super) async fn reroute(
        &mut self,
        hop: usize,
        route: &[Hop],
        new_index: usize,
    ) -> Result<(), String> {
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

/// How long a step's result waits for the earlier hops' copies that have
/// not come yet.
pub(crate) const COPY_GRACE: Duration = Duration::from_millis(200);

/// How long the successor a hop calls unreachable has to answer this
/// client before the claim is taken as confirmed.
pub(crate) const BLAME_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Times a stream a server dropped unanswered is opened, in all.
pub(crate) const UNANSWERED_STREAM_ATTEMPTS: u32 = 3;
/// The wait before opening such a stream again, times the attempt.
pub(crate) const UNANSWERED_STREAM_DELAY: Duration = Duration::from_millis(20);

/// How long a reroute may take: the hop attaches a push stream first.
pub(super) const PUSH_AND_OPEN_TIMEOUT: Duration = Duration::from_secs(15);
