//! The event loop that owns the libp2p `Swarm`: builds the transports and
//! behaviours, and turns commands and swarm events into changes of the
//! shared view.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, yamux, Multiaddr, PeerId,
    StreamProtocol, Swarm,
};
use nomoat_protocol::Reachability;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::*;

#[derive(NetworkBehaviour)]
struct Behaviour {
    /// Bounds connections overall, per peer and while pending.
    limits: libp2p::connection_limits::Behaviour,
    /// Admits only the allow-listed peers, where there is a list.
    allow: Toggle<libp2p::allow_block_list::Behaviour<libp2p::allow_block_list::AllowedPeers>>,
    relay_client: relay::client::Behaviour,
    relay_server: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    stream: libp2p_stream::Behaviour,
}

fn build_swarm(cfg: &NetConfig, key: Keypair) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let relay_server = cfg.relay_server;
    let mdns_on = cfg.mdns;
    let heartbeat = cfg.heartbeat;
    let limits = libp2p::connection_limits::ConnectionLimits::default()
        .with_max_established(Some(cfg.max_connections))
        .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
        .with_max_pending_incoming(Some(cfg.max_pending_connections));
    let swarm_key = cfg.access.swarm_key;
    let allow = (!cfg.access.allow.is_empty()).then(|| {
        let mut b =
            libp2p::allow_block_list::Behaviour::<libp2p::allow_block_list::AllowedPeers>::default(
            );
        for p in &cfg.access.allow {
            b.allow_peer(*p);
        }
        b
    });
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| access::tcp_transport(key, swarm_key))
        .map_err(|e| setup(&e))?
        .with_other_transport(|key| access::quic_transport(key, swarm_key))
        .map_err(|e| setup(&e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
                // Announcements are forwarded only once nomoat has checked
                // them (`report_message_validation_result`).
                .validate_messages()
                .max_transmit_size(1 << 20)
                .build()
                .map_err(|e| e.to_string())?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_cfg,
            )
            .map_err(|e| e.to_string())?;
            let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_cfg.set_query_timeout(Duration::from_secs(30));
            // Bootstrapped explicitly once the bootstrap peers are connected.
            kad_cfg.set_periodic_bootstrap_interval(None);
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_cfg,
            );
            kad.set_mode(Some(kad::Mode::Server));
            let mdns = if mdns_on {
                Some(
                    mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            Ok(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(limits),
                allow: allow.into(),
                relay_client,
                relay_server: relay_server
                    .then(|| {
                        // Sessions may run over a circuit until DCUtR upgrades it.
                        let cfg = relay::Config {
                            max_circuit_duration: Duration::from_secs(3600),
                            max_circuit_bytes: 1 << 30,
                            ..relay::Config::default()
                        };
                        relay::Behaviour::new(peer_id, cfg)
                    })
                    .into(),
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
                identify: identify::Behaviour::new(
                    identify::Config::new(IDENTIFY_VERSION.to_string(), key.public())
                        .with_agent_version(format!("nomoat/{}", env!("CARGO_PKG_VERSION"))),
                ),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(heartbeat)),
                kad,
                gossipsub,
                mdns: mdns.into(),
                stream: libp2p_stream::Behaviour::new(),
            })
        })
        .map_err(|e| setup(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(120)))
        .build();
    Ok(swarm)
}

/// Starts the network actor: listens, dials the bootstrap peers, and
/// returns a handle.
pub async fn start(cfg: NetConfig) -> Result<NetHandle, NetError> {
    let key = cfg
        .keypair
        .clone()
        .unwrap_or_else(Keypair::generate_ed25519);
    let peer_id = key.public().to_peer_id();
    let mut swarm = build_swarm(&cfg, key.clone())?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
    }
    for addr in &cfg.external {
        swarm.add_external_address(addr.clone());
    }
    let control = swarm.behaviour().stream.new_control();
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let view = Arc::new(Mutex::new(View::default()));
    let handle = NetHandle {
        peer_id,
        key: Arc::new(key.clone()),
        tx,
        view: view.clone(),
        control,
        expiry: cfg.heartbeat * EXPIRY_HEARTBEATS,
    };
    let actor = Actor {
        swarm,
        rx,
        view,
        pending_dials: HashMap::new(),
        pending_providers: HashMap::new(),
        subscribed: Vec::new(),
        heartbeat: cfg.heartbeat,
        relay_server: cfg.relay_server,
        expiry: handle.expiry,
        max_servers: cfg.max_known_servers.max(1),
        key,
    };
    tokio::spawn(actor.run());
    let mut joined = false;
    for addr in cfg.bootstrap {
        match handle.dial(addr.clone()).await {
            Ok(_) => joined = true,
            Err(e) => warn!(%addr, "bootstrap peer unreachable: {e}"),
        }
    }
    if joined {
        let _ = handle.tx.send(Command::Bootstrap).await;
    }
    Ok(handle)
}

/// How far ahead of this node's clock an announcement may be stamped.
const MAX_CLOCK_AHEAD_MS: u64 = 60_000;

/// Where the outcome of a dial goes.
type DialReply = oneshot::Sender<Result<PeerId, NetError>>;

struct Actor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    view: Arc<Mutex<View>>,
    /// Dials waiting for a connection, with the address each dialled.
    pending_dials: HashMap<PeerId, Vec<(Multiaddr, DialReply)>>,
    pending_providers: HashMap<kad::QueryId, (oneshot::Sender<Vec<PeerId>>, Vec<PeerId>)>,
    subscribed: Vec<String>,
    heartbeat: Duration,
    relay_server: bool,
    /// Announcements older than this are dropped.
    expiry: Duration,
    /// Most announcements held.
    max_servers: usize,
    /// The node's identity, which signs its announcements.
    key: Keypair,
}

impl Actor {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        let via = self.view().connected.get(&peer).cloned();
        for a in addrs {
            if !super::addrs::usable_from(&a, via.as_ref()) {
                continue;
            }
            let a = match a.iter().last() {
                Some(libp2p::multiaddr::Protocol::P2p(_)) => a,
                _ => a.with(libp2p::multiaddr::Protocol::P2p(peer)),
            };
            {
                let mut v = self.view();
                let book = v.book.entry(peer).or_default();
                if !book.contains(&a) {
                    if book.len() >= 16 {
                        book.remove(0);
                    }
                    book.push(a.clone());
                }
            }
            self.swarm.add_peer_address(peer, a);
        }
    }

    /// Starts a dial to `peer`; `reply` is answered when it connects or
    /// fails (`addr` names it in the error).
    fn start_dial(
        &mut self,
        peer: PeerId,
        opts: impl Into<libp2p::swarm::dial_opts::DialOpts>,
        addr: Multiaddr,
        reply: DialReply,
    ) {
        match self.swarm.dial(opts) {
            // A dial already under way answers this one too.
            Ok(()) | Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => self
                .pending_dials
                .entry(peer)
                .or_default()
                .push((addr, reply)),
            Err(e) => {
                let _ = reply.send(Err(NetError::Dial {
                    addr,
                    reason: e.to_string(),
                }));
            }
        }
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(self.heartbeat);
        loop {
            tokio::select! {
                biased;
                event = self.swarm.select_next_some() => self.on_event(event),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Shutdown) | None => break,
                    Some(cmd) => self.on_command(cmd),
                },
                _ = tick.tick() => {
                    self.sweep();
                    self.announce();
                }
            }
        }
        debug!("network actor stopped");
    }

    /// Forgets expired announcements, what was measured of peers that are
    /// neither announced nor connected, and addresses past the book's bound.
    fn sweep(&mut self) {
        let expiry = self.expiry;
        let mut v = self.view();
        v.servers.retain(|_, (_, at)| at.elapsed() <= expiry);
        let View {
            servers, signed, ..
        } = &mut *v;
        signed.retain(|p, _| servers.contains_key(p));
        let View {
            servers,
            connected,
            observed,
            rtts,
            book,
            ..
        } = &mut *v;
        let keep = |p: &PeerId| servers.contains_key(p) || connected.contains_key(p);
        observed.retain(|p, _| keep(p));
        rtts.retain(|p, _| keep(p));
        if book.len() > MAX_BOOK_PEERS {
            book.retain(|p, _| keep(p));
        }
    }

    /// Stores a valid announcement from `source`; returns whether it is new
    /// (a replayed or older one is not). At the table's bound the oldest
    /// entry makes room.
    fn store_announcement(&mut self, source: PeerId, signed: nomoat_protocol::SignedInfo) -> bool {
        let info = signed.info.clone();
        let max = self.max_servers;
        let mut v = self.view();
        if let Some((old, _)) = v.servers.get(&source) {
            if old.timestamp_ms >= info.timestamp_ms {
                return false;
            }
        } else if v.servers.len() >= max {
            let oldest = v
                .servers
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| *p);
            if let Some(p) = oldest {
                v.servers.remove(&p);
                v.signed.remove(&p);
            }
        }
        v.servers.insert(source, (info, Instant::now()));
        v.signed.insert(source, signed);
        true
    }

    /// Refreshes this node's `ServerInfo` (time, addresses, reachability)
    /// and publishes it.
    fn announce(&mut self) {
        let info = {
            let mut v = self.view();
            let all = v.listen.iter().map(|(_, a)| a).chain(&v.external).cloned();
            let addrs: Vec<Vec<u8>> = super::addrs::shareable(all)
                .iter()
                .map(|a| a.to_vec())
                .collect();
            let reachability = v.reachability.unwrap_or(Reachability::Unknown);
            let Some(info) = v.own.as_mut() else { return };
            info.timestamp_ms = now_ms();
            info.addrs = addrs;
            info.reachability = reachability;
            info.clone()
        };
        let t = topic(&info.model_id);
        let signed = super::signed::sign_info(&self.key, info);
        let payload = signed.encode();
        self.view().own_signed = Some(signed);
        if let Err(e) = self.swarm.behaviour_mut().gossipsub.publish(t, payload) {
            debug!("heartbeat not published: {e}");
        }
    }

    /// Follows `model_id`'s announcements and evidence.
    fn subscribe(&mut self, model_id: String) {
        if self.subscribed.contains(&model_id) {
            return;
        }
        let g = &mut self.swarm.behaviour_mut().gossipsub;
        for t in [topic(&model_id), super::evidence_topic(&model_id)] {
            if let Err(e) = g.subscribe(&t) {
                warn!("cannot subscribe to {t}: {e}");
            }
        }
        self.subscribed.push(model_id);
    }

    /// Takes gossiped evidence from `source` for re-checking, once it
    /// holds together: the receipt is signed by the peer it accuses, the
    /// steps and output hash to what it signs, and the model is the
    /// topic's. Each receiver re-checks it by recomputation before acting.
    fn on_evidence(
        &mut self,
        source: PeerId,
        model_id: &str,
        data: &[u8],
    ) -> gossipsub::MessageAcceptance {
        use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
        let checked = nomoat_protocol::Evidence::decode(data)
            .map_err(|e| e.to_string())
            .and_then(|e| e.check().map(|()| e).map_err(|e| e.to_string()))
            .and_then(|e| super::signed::verify_receipt(&e.receipt).map(|p| (p, e)));
        let (accused, evidence) = match checked {
            Ok(c) => c,
            Err(e) => {
                warn!(%source, "bad evidence dropped: {e}");
                return Reject;
            }
        };
        if evidence.receipt.body.model_id != model_id {
            warn!(%source, "evidence about another model dropped");
            return Reject;
        }
        let me = self.swarm.local_peer_id();
        let id = nomoat_protocol::Hash::of(&evidence.receipt.body_bytes);
        let mut v = self.view();
        if accused == *me || v.reputation.is_banned(&accused) {
            return Accept;
        }
        if v.evidence_seen.contains(&id) {
            return Ignore;
        }
        let now = Instant::now();
        let recent = v
            .accusers
            .get(&source)
            .is_some_and(|t| now.duration_since(*t) < super::EVIDENCE_PER_ACCUSER);
        if recent || v.evidence.len() >= super::MAX_PENDING_EVIDENCE {
            debug!(%source, "evidence dropped: its accuser sent some lately, or the queue is full");
            return Ignore;
        }
        if v.accusers.len() >= 4096 {
            v.accusers
                .retain(|_, t| now.duration_since(*t) < super::EVIDENCE_PER_ACCUSER);
        }
        if v.evidence_seen.len() >= 4096 {
            v.evidence_seen.clear();
        }
        v.accusers.insert(source, now);
        v.evidence_seen.insert(id);
        info!(%source, %accused, "evidence of a lie heard: re-checking it");
        v.evidence.push_back((source, evidence));
        Accept
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Dial { addr, reply } => {
                // The last /p2p/ is the target (earlier ones name a relay).
                let peer = addr
                    .iter()
                    .filter_map(|p| match p {
                        libp2p::multiaddr::Protocol::P2p(id) => Some(id),
                        _ => None,
                    })
                    .last();
                let Some(peer) = peer else {
                    let _ = reply.send(Err(NetError::Dial {
                        addr,
                        reason: "the address must end in /p2p/<peer id>".into(),
                    }));
                    return;
                };
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                self.swarm.add_peer_address(peer, addr.clone());
                self.start_dial(peer, addr.clone(), addr, reply);
            }
            Command::DialPeer { peer, reply } => {
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                let known = self.view().book.get(&peer).cloned().unwrap_or_default();
                let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                    .addresses(known)
                    .extend_addresses_through_behaviour()
                    .build();
                let addr = Multiaddr::empty().with(libp2p::multiaddr::Protocol::P2p(peer));
                self.start_dial(peer, opts, addr, reply);
            }
            Command::AddAddresses { peer, addrs, done } => {
                self.remember(peer, addrs);
                let _ = done.send(());
            }
            Command::Listen { addr, reply } => {
                let r =
                    self.swarm
                        .listen_on(addr.clone())
                        .map(|_| ())
                        .map_err(|e| NetError::Listen {
                            addr,
                            reason: e.to_string(),
                        });
                let _ = reply.send(r);
            }
            Command::Subscribe { model_id } => self.subscribe(model_id),
            Command::PublishEvidence { model_id, payload } => {
                self.subscribe(model_id.clone());
                let t = super::evidence_topic(&model_id);
                match self.swarm.behaviour_mut().gossipsub.publish(t, payload) {
                    Ok(_) => info!("evidence published to the swarm of {model_id}"),
                    Err(e) => warn!("evidence not published: {e}"),
                }
            }
            Command::Announce { info } => {
                let key = kad::RecordKey::new(&info.model_id);
                let signed = super::signed::sign_info(&self.key, info.clone());
                let previous = {
                    let mut v = self.view();
                    v.own_signed = Some(signed);
                    v.own.replace(info.clone())
                };
                if previous.map(|o| o.model_id) != Some(info.model_id.clone()) {
                    if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                        warn!("cannot announce the model in the DHT: {e}");
                    }
                    self.subscribe(info.model_id.clone());
                    // Publish a new model at once; updates go out each heartbeat.
                    self.announce();
                }
            }
            Command::Providers { model_id, reply } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(kad::RecordKey::new(&model_id));
                self.pending_providers.insert(id, (reply, Vec::new()));
            }
            Command::Provide { key } => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(kad::RecordKey::new(&key))
                {
                    warn!("cannot announce {key} in the DHT: {e}");
                }
            }
            Command::Bootstrap => {
                if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                    debug!("DHT bootstrap: {e}");
                }
            }
            Command::Shutdown => unreachable!("the event loop stops before handling Shutdown"),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                info!(%address, "listening");
                // A relay hands its addresses out in reservations, so each of
                // its interface addresses is taken as external (a relay must be
                // reachable to be one); loopback only on a relay that has
                // nothing else, for a swarm on one machine.
                if self.relay_server {
                    let lone = self
                        .view()
                        .listen
                        .iter()
                        .all(|(_, a)| super::addrs::is_loopback(a));
                    if !super::addrs::is_loopback(&address) {
                        if lone {
                            let old = self.view().listen.clone();
                            for (_, a) in old {
                                self.swarm.remove_external_address(&a);
                            }
                        }
                        self.swarm.add_external_address(address.clone());
                    } else if lone {
                        self.swarm.add_external_address(address.clone());
                    }
                }
                self.view().listen.push((listener_id, address));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.view().listen.retain(|(_, a)| a != &address);
            }
            SwarmEvent::ExternalAddrExpired { address } => {
                self.view().external.retain(|a| a != &address);
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                let mut v = self.view();
                if !v.external.contains(&address) {
                    v.external.push(address);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                debug!(%peer_id, addr = %endpoint.get_remote_address(), "connected");
                let addr = endpoint.get_remote_address().clone();
                {
                    let mut v = self.view();
                    v.connected.insert(peer_id, addr.clone());
                    if v.seen.len() >= MAX_SEEN_CONNECTIONS {
                        v.seen.remove(0);
                    }
                    v.seen.push((peer_id, addr));
                }
                for (_, reply) in self.pending_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = reply.send(Ok(peer_id));
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                let mut v = self.view();
                v.connected.remove(&peer_id);
                v.rtts.remove(&peer_id);
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error,
                ..
            } => {
                for (addr, reply) in self.pending_dials.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(NetError::Dial {
                        addr,
                        reason: error.to_string(),
                    }));
                }
            }
            SwarmEvent::Behaviour(b) => self.on_behaviour(b),
            _ => {}
        }
    }

    fn on_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. })
                if info.protocol_version == IDENTIFY_VERSION =>
            {
                let via = self.view().connected.get(&peer_id).cloned();
                for addr in info.listen_addrs {
                    if super::addrs::usable_from(&addr, via.as_ref()) {
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.view().rtts.insert(peer, rtt);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                message,
                message_id,
                propagation_source,
            }) => {
                // Strict validation checked the signature: `source` signed it.
                // Nothing is forwarded before it is checked here.
                use gossipsub::MessageAcceptance::{Accept, Ignore, Reject};
                let evidence_of = self
                    .subscribed
                    .iter()
                    .find(|m| super::evidence_topic(m).hash() == message.topic)
                    .cloned();
                if let Some(model_id) = evidence_of {
                    let verdict = match message.source {
                        None => Reject,
                        Some(source) => self.on_evidence(source, &model_id, &message.data),
                    };
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .report_message_validation_result(
                            &message_id,
                            &propagation_source,
                            verdict,
                        );
                    return;
                }
                let decoded = nomoat_protocol::SignedInfo::decode(&message.data)
                    .map_err(|e| e.to_string())
                    .and_then(|s| super::signed::verify_info(&s).map(|signer| (signer, s)));
                let verdict = match (message.source, decoded) {
                    (None, _) => Reject,
                    (Some(source), Ok((signer, signed))) if signer == source => {
                        let info = &signed.info;
                        if info.timestamp_ms > now_ms().saturating_add(MAX_CLOCK_AHEAD_MS) {
                            debug!(%source, "announcement from the future ignored");
                            Ignore
                        } else {
                            let addrs = info
                                .addrs
                                .iter()
                                .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                                .collect();
                            if self.store_announcement(source, signed) {
                                self.remember(source, addrs);
                                Accept
                            } else {
                                // A replay, or older than what is held.
                                Ignore
                            }
                        }
                    }
                    (Some(source), Ok(_)) => {
                        warn!(%source, "announcement for another peer id dropped");
                        Reject
                    }
                    (Some(source), Err(e)) => {
                        warn!(%source, "bad announcement dropped: {e}");
                        Reject
                    }
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, verdict);
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(result),
                step,
                ..
            }) => {
                if let Some((_, found)) = self.pending_providers.get_mut(&id) {
                    if let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = result {
                        found.extend(providers);
                    }
                }
                if step.last {
                    if let Some((reply, mut found)) = self.pending_providers.remove(&id) {
                        found.sort();
                        found.dedup();
                        let _ = reply.send(found);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    self.swarm.add_peer_address(peer, addr.clone());
                    self.swarm.behaviour_mut().kad.add_address(&peer, addr);
                    let _ = self.swarm.dial(peer);
                }
            }
            BehaviourEvent::Autonat(autonat::Event::StatusChanged { new, .. }) => {
                let r = match new {
                    autonat::NatStatus::Public(_) => Reachability::Public,
                    autonat::NatStatus::Private => Reachability::Private,
                    autonat::NatStatus::Unknown => Reachability::Unknown,
                };
                self.view().reachability = Some(r);
            }
            _ => {}
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
