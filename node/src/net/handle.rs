//! [`NetHandle`]: the only way to the `Swarm`, by commands to the actor
//! and synchronous reads of the shared view.

use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use nomoat_protocol::{Reachability, ServerInfo};
use tokio::sync::oneshot;
use tracing::debug;

use super::*;

impl NetHandle {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// A stream control for opening and accepting nomoat streams.
    pub fn control(&self) -> libp2p_stream::Control {
        self.control.clone()
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The addresses other peers can reach this node at, most useful
    /// first (see [`super::addrs::shareable`]), each
    /// ending in `/p2p/PEER_ID`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let v = self.view();
        let all = v.listen.iter().map(|(_, a)| a).chain(&v.external).cloned();
        super::addrs::shareable(all)
            .into_iter()
            .map(|a| a.with_p2p(self.peer_id).unwrap_or_else(|a| a))
            .collect()
    }

    /// Waits until at least `n` of the node's listeners (each listen
    /// address asked for, each relay) have an address, or `timeout`; returns
    /// [`listen_addrs`](Self::listen_addrs).
    pub async fn wait_listening(&self, n: usize, timeout: Duration) -> Vec<Multiaddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let up = {
                let v = self.view();
                let ids: std::collections::HashSet<_> =
                    v.listen.iter().map(|(id, _)| *id).collect();
                ids.len()
            };
            if up >= n || Instant::now() >= deadline {
                return self.listen_addrs();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Connects to `addr` (which should end in `/p2p/PEER_ID`) and returns
    /// the peer's id once connected.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Dial {
                addr: addr.clone(),
                reply,
            })
            .await
            .map_err(|_| NetError::Stopped)?;
        match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(r) => r.map_err(|_| NetError::Stopped)?,
            Err(_) => Err(NetError::Dial {
                addr,
                reason: format!("no connection within {DIAL_TIMEOUT:?}"),
            }),
        }
    }

    /// Starts listening on another address (e.g. a relay circuit).
    pub async fn listen_on(&self, addr: Multiaddr) -> Result<(), NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Listen { addr, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        rx.await.map_err(|_| NetError::Stopped)?
    }

    /// Tells the swarm where a peer can be reached; returns once the swarm
    /// knows (so a stream opened next can dial them).
    pub async fn add_addresses(&self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Command::AddAddresses { peer, addrs, done })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
    }

    /// Follows the announcements of servers of `model_id` (empty: none).
    pub async fn subscribe(&self, model_id: &str) {
        let _ = self
            .tx
            .send(Command::Subscribe {
                model_id: model_id.to_string(),
            })
            .await;
    }

    /// Sets (and from now on announces every heartbeat) this node's own
    /// `ServerInfo`.
    pub async fn announce(&self, info: ServerInfo) {
        let _ = self.tx.send(Command::Announce { info }).await;
    }

    /// Live servers known from announcements (and this node's own), for
    /// `model_id` or for every model when it is empty.
    pub fn servers(&self, model_id: &str) -> Vec<ServerInfo> {
        let v = self.view();
        let mut out: Vec<ServerInfo> = v
            .servers
            .values()
            .filter(|(_, at)| at.elapsed() <= self.expiry)
            .map(|(i, _)| i.clone())
            .chain(v.own.clone())
            .filter(|i| model_id.is_empty() || i.model_id == model_id)
            .collect();
        out.sort_by(|a, b| (a.blocks.start, &a.peer_id).cmp(&(b.blocks.start, &b.peer_id)));
        out.dedup_by(|a, b| a.peer_id == b.peer_id);
        out
    }

    /// The live servers of `model_id` (every model when empty), as their
    /// servers signed them: what an info answer relays. A peer this node
    /// banned for a proven lie is not relayed.
    pub fn signed_servers(&self, model_id: &str) -> Vec<nomoat_protocol::SignedInfo> {
        let v = self.view();
        let mut out: Vec<nomoat_protocol::SignedInfo> = v
            .servers
            .iter()
            .filter(|(_, (_, at))| at.elapsed() <= self.expiry)
            .filter(|(p, _)| !v.reputation.is_banned(p))
            .filter_map(|(p, _)| v.signed.get(p).cloned())
            .chain(v.own_signed.clone())
            .filter(|s| model_id.is_empty() || s.info.model_id == model_id)
            .collect();
        out.sort_by(|a, b| {
            (&a.info.peer_id, b.info.timestamp_ms).cmp(&(&b.info.peer_id, a.info.timestamp_ms))
        });
        out.dedup_by(|a, b| a.info.peer_id == b.info.peer_id);
        out.sort_by_key(|s| std::cmp::Reverse(s.info.timestamp_ms));
        out
    }

    /// What the node holds now: announcements (expired ones until the next
    /// heartbeat's sweep) and peers in its address book. Both are bounded
    /// ([`NetConfig::max_known_servers`](super::NetConfig), [`MAX_BOOK_PEERS`]).
    pub fn table_sizes(&self) -> (usize, usize) {
        let v = self.view();
        (v.servers.len(), v.book.len())
    }

    /// The last measured round-trip time to a peer.
    pub fn rtt(&self, peer: &PeerId) -> Option<Duration> {
        self.view().rtts.get(peer).copied()
    }

    /// Records a single-token step measured through `peer`: `secs` from its
    /// input to its output, over `blocks` blocks.
    pub fn observe_step(&self, peer: PeerId, blocks: u32, secs: f64) {
        if blocks == 0 || !secs.is_finite() || secs < 0.0 {
            return;
        }
        let per_block = secs / f64::from(blocks);
        let mut v = self.view();
        let e = v.observed.entry(peer).or_insert(per_block);
        *e = 0.8 * *e + 0.2 * per_block;
    }

    /// The measured seconds per block of `peer`, if any.
    pub fn observed_secs_per_block(&self, peer: &PeerId) -> Option<f64> {
        self.view().observed.get(peer).copied()
    }

    /// Whether a connection to `peer` is open, and over which address.
    pub fn connected(&self, peer: &PeerId) -> Option<Multiaddr> {
        self.view().connected.get(peer).cloned()
    }

    /// Every peer connected now, with the address of its connection.
    pub fn connected_peers(&self) -> Vec<(PeerId, Multiaddr)> {
        let v = self.view();
        v.connected.iter().map(|(p, a)| (*p, a.clone())).collect()
    }

    /// The remote addresses of every connection to `peer` so far (recent
    /// history, oldest first): shows whether a peer was reached via a relay.
    pub fn connection_addrs(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.view()
            .seen
            .iter()
            .filter(|(p, _)| p == peer)
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Counts a session this node opened (`+1`) or closed (`-1`) through `peer`.
    pub fn count_session(&self, peer: PeerId, opened: bool) {
        let mut v = self.view();
        let n = v.own_sessions.entry(peer).or_default();
        *n = if opened { *n + 1 } else { n.saturating_sub(1) };
    }

    /// Records that `peer` failed a session (timeout, disconnect, error of
    /// its own): routes avoid it for an exponentially growing while.
    /// Returns how long.
    pub fn peer_failed(&self, peer: PeerId) -> Duration {
        let now = clock();
        let until = self.view().backoff.failed(peer, now, rand::random::<f64>());
        until.saturating_sub(now)
    }

    /// Records that `peer` served a step: its failures are forgotten.
    pub fn peer_succeeded(&self, peer: &PeerId) {
        let mut v = self.view();
        if v.backoff.failures(peer) > 0 {
            v.backoff.succeeded(peer);
        }
    }

    /// Whether routes must avoid `peer` now: backed off after failures,
    /// or banned for a proven lie.
    pub fn is_backed_off(&self, peer: &PeerId) -> bool {
        let v = self.view();
        v.backoff.is_backed_off(peer, clock()) || v.reputation.is_banned(peer)
    }

    /// The share of `peer`'s work this node's spot checks re-run (see
    /// [`nomoat_scheduler::Reputation`]).
    pub fn check_rate(&self, peer: &PeerId) -> f64 {
        self.view().reputation.check_rate(peer)
    }

    /// What this node's checks have found of `peer`.
    pub fn reputation(&self, peer: &PeerId) -> nomoat_scheduler::Record {
        self.view().reputation.record(peer)
    }

    /// A spot check of `peer`'s work agreed with a recomputation.
    pub fn check_passed(&self, peer: &PeerId) {
        self.view().reputation.passed(peer);
    }

    /// `peer` disagreed with a recomputation and no third party could say
    /// who was right: its record is lost and it is checked in full again.
    pub fn check_struck(&self, peer: &PeerId) {
        self.view().reputation.strike(peer);
    }

    /// `peer` was proven to lie: routes never use it again.
    pub fn ban(&self, peer: PeerId) {
        tracing::warn!(
            "{peer} is banned: its output disagreed with two independent recomputations"
        );
        self.view().reputation.ban(&peer);
    }

    /// Signs a receipt with this node's key.
    pub fn sign_receipt(&self, body: nomoat_protocol::ReceiptBody) -> nomoat_protocol::Receipt {
        super::signed::sign_receipt(&self.key, body)
    }

    /// Gossips evidence of a lie to the swarm of `model_id`.
    pub async fn publish_evidence(&self, model_id: &str, evidence: &nomoat_protocol::Evidence) {
        let _ = self
            .tx
            .send(Command::PublishEvidence {
                model_id: model_id.to_string(),
                payload: evidence.encode(),
            })
            .await;
    }

    /// The evidence heard and not re-checked yet, with each one's accuser.
    pub fn take_evidence(&self) -> Vec<(PeerId, nomoat_protocol::Evidence)> {
        self.view().evidence.drain(..).collect()
    }

    /// Whether `peer` was proven to lie.
    pub fn is_banned(&self, peer: &PeerId) -> bool {
        self.view().reputation.is_banned(peer)
    }

    /// Sessions this node has open through `peer`.
    pub fn own_sessions(&self, peer: &PeerId) -> usize {
        self.view().own_sessions.get(peer).copied().unwrap_or(0)
    }

    /// Connects to `peer` if not connected yet, on every address learnt for
    /// it at once (and those its behaviours know), within [`DIAL_TIMEOUT`]
    /// in all, so unreachable addresses a peer handed out cost no more than
    /// one dial. Best effort: when none answers, opening a stream still lets
    /// the swarm dial again.
    pub async fn connect_known(&self, peer: PeerId) {
        if peer == self.peer_id || self.connected(&peer).is_some() {
            return;
        }
        if let Err(e) = self.dial_peer(peer).await {
            debug!(%peer, "no known address answered: {e}");
        }
    }

    /// Dials `peer` on every known address at once; returns once one
    /// connects, or with the error of the attempt, within [`DIAL_TIMEOUT`].
    pub async fn dial_peer(&self, peer: PeerId) -> Result<PeerId, NetError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::DialPeer { peer, reply })
            .await
            .map_err(|_| NetError::Stopped)?;
        let addr = Multiaddr::empty().with(libp2p::multiaddr::Protocol::P2p(peer));
        match tokio::time::timeout(DIAL_TIMEOUT, rx).await {
            Ok(r) => r.map_err(|_| NetError::Stopped)?,
            Err(_) => Err(NetError::Dial {
                addr,
                reason: format!("no connection within {DIAL_TIMEOUT:?}"),
            }),
        }
    }

    /// What AutoNAT concluded about this node.
    pub fn reachability(&self) -> Reachability {
        self.view().reachability.unwrap_or(Reachability::Unknown)
    }

    /// Announces in the DHT that this node provides `key` (servers
    /// announce the model they serve themselves; this is for adapters).
    pub async fn provide(&self, key: &str) {
        let _ = self
            .tx
            .send(Command::Provide {
                key: key.to_string(),
            })
            .await;
    }

    /// Asks the DHT which peers provide `model_id` (servers announce a
    /// provider record for the model they serve) or an adapter id.
    pub async fn providers(&self, model_id: &str, timeout: Duration) -> Vec<PeerId> {
        let (reply, rx) = oneshot::channel();
        let cmd = Command::Providers {
            model_id: model_id.to_string(),
            reply,
        };
        if self.tx.send(cmd).await.is_err() {
            return Vec::new();
        }
        tokio::time::timeout(timeout, rx)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    }

    /// Stops the network actor.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}
