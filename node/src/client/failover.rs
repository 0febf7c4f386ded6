//! Replacing a failed hop: plan a replacement for its blocks, reroute the
//! hops that stay, open the replacement and replay its inputs.

use std::time::{Duration, Instant};

use futures::io::WriteHalf;
use libp2p::{PeerId, Stream};
use nomoat_protocol::{BlockRange, InferMessage, ServerInfo, Step, TensorFrame};

use super::history::{history_end, truncate_history};
use super::plan::plan_range;
use super::session::open_hop;
use super::{route_peers, ClientError, FailoverReport, HopConn, RemoteSession, HISTORY_WAIT};
use crate::net::discover::{learn_addresses, merge_servers, query_servers};
use crate::net::wire::write_message;

impl RemoteSession {
    /// Waits for an event from `conn` that `want` accepts, recording copies
    /// meanwhile. `Err` names what went wrong.
    pub(super) async fn wait_for(
        &mut self,
        conn: u64,
        timeout: Duration,
        mut want: impl FnMut(&InferMessage) -> bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((c, msg)) = self.next_event(left).await else {
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
    pub(super) async fn await_history(&mut self, hop: usize, pos: u32) -> bool {
        let deadline = Instant::now() + HISTORY_WAIT;
        while history_end(&self.history[hop]) < pos {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some((c, msg)) = self.next_event(left).await else {
                return false;
            };
            if let (Some(h), Some(InferMessage::Copy { seq, hidden, .. })) = (self.hop_of(c), msg) {
                self.record_copy(h, seq, hidden);
            }
        }
        true
    }

    /// Whether another live server could run hop `hop`'s blocks now.
    pub(super) async fn has_replacement(&self, hop: usize) -> bool {
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
    pub(super) async fn live_servers(&self, avoid: &[PeerId]) -> Vec<ServerInfo> {
        let mut all = self.net.servers(&self.model_id);
        // The hops that stay first, then any other peer this node is
        // connected to (a bootstrap peer, when the failed hop was alone).
        let connected = self.net.connected_peers().into_iter().map(|(p, _)| p);
        let ask: Vec<PeerId> = self.hops.iter().map(|h| h.peer).chain(connected).collect();
        for peer in ask.iter().filter(|p| !avoid.contains(p)).take(4) {
            if let Ok(list) = query_servers(&self.net, *peer, &self.model_id).await {
                all.extend(list);
                break;
            }
        }
        let mut all = merge_servers(all);
        all.retain(|s| {
            PeerId::from_bytes(&s.peer_id)
                .is_ok_and(|p| !avoid.contains(&p) && !self.net.is_backed_off(&p))
        });
        learn_addresses(&self.net, &all).await;
        all
    }

    /// Replaces the failed hop (widening to its neighbours when they turn
    /// out dead too), replays its history and leaves the session ready to
    /// resend the step at `pos`.
    pub(super) async fn failover(
        &mut self,
        cause: &ClientError,
        pos: u32,
    ) -> Result<FailoverReport, ClientError> {
        let t0 = Instant::now();
        let (failed, _) = cause
            .failed_hop()
            .expect("a replaceable error names its hop");
        let (mut i, mut j) = (failed, failed);
        let mut avoid: Vec<PeerId> = vec![self.hops[failed].peer];
        avoid.extend(self.avoid.iter().copied());
        self.net.peer_failed(self.hops[failed].peer);
        let mut last_err = None;
        for _attempt in 0..=2 * self.hops.len() {
            // The failed range's inputs: from the client itself, or copies
            // from the hop before it.
            if !self.await_history(i, pos).await {
                if i == 0 {
                    return Err(ClientError::HistoryIncomplete { hop: 0, pos });
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
            // 2. The replacement's hops open, all at once.
            let conns: Vec<u64> = (0..m as u64).map(|r| self.next_conn + r).collect();
            self.next_conn += m as u64;
            let opens = conns.iter().enumerate().map(|(r, &conn)| {
                open_hop(
                    &self.net,
                    self.id,
                    &self.model_id,
                    &route,
                    i + r,
                    self.max_length,
                    self.adapter,
                    conn,
                    self.events_tx.clone(),
                )
            });
            let mut opened: Vec<(usize, WriteHalf<Stream>, u64)> = Vec::new();
            let mut open_err = None;
            for (r, w) in futures::future::join_all(opens)
                .await
                .into_iter()
                .enumerate()
            {
                match w {
                    Ok(w) => opened.push((r, w, conns[r])),
                    Err(e) => {
                        open_err.get_or_insert(e);
                    }
                }
            }
            if open_err.is_some() {
                let close = InferMessage::Close {
                    session_id: self.id,
                };
                for (_, w, _) in &mut opened {
                    let _ = write_message(w, &close).await;
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
                        joined: pos,
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
                let seq = self.begin_step_keep(*start, frame, Some(last));
                let msg = InferMessage::Step(Step {
                    session_id: self.id,
                    seq,
                    start_pos: *start,
                    hidden: frame.clone(),
                    last_hop: Some(last as u32),
                });
                write_message(&mut self.hops[i].writer, &msg)
                    .await
                    .map_err(|e| ClientError::HopFailed {
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
                .map_err(|reason| ClientError::HopFailed {
                    hop: last,
                    peer: self.hops[last].peer,
                    blocks: self.hops[last].blocks,
                    reason: format!("replay: {reason}"),
                })?;
            }
            return Ok(FailoverReport {
                failed: i..=j,
                failed_peers,
                blocks: BlockRange { start: a, end: b },
                replacement: self.route()[i..=last].to_vec(),
                cause: cause.to_string(),
                plan,
                reopen,
                replay: t2.elapsed(),
                replayed_positions: history_end(&replay),
                replayed_steps: replay.len(),
            });
        }
        Err(last_err.unwrap_or(ClientError::NoReplacement))
    }
}
