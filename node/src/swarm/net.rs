//! The network actor: one task owns the libp2p `Swarm`; everything else
//! talks to it through a cloneable [`NetHandle`].
//!
//! Transports: QUIC first, TCP + noise + yamux as fallback, and circuit relay
//! v2 (client always; server with `relay_server`). Behaviours: identify,
//! ping (RTT), Kademlia (bootstrap peers, provider records per model id),
//! gossipsub (signed `ServerInfo` heartbeats), mDNS (optional), DCUtR hole
//! punching, AutoNAT and raw streams for the nomoat protocols.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{
    autonat, dcutr, gossipsub, identify, kad, mdns, noise, ping, relay, tcp, yamux, Multiaddr,
    PeerId, StreamProtocol, Swarm,
};
use nomoat_protocol::{Reachability, ServerInfo};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// How often a server announces itself.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// A `ServerInfo` older than this many heartbeats is dropped.
pub const EXPIRY_HEARTBEATS: u32 = 4;
/// Capacity of the actor's command queue.
pub const COMMAND_QUEUE: usize = 256;
/// How long a dial waits for the connection.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How many past connections the view remembers.
const MAX_SEEN_CONNECTIONS: usize = 256;
/// The Kademlia protocol of nomoat's DHT.
const KAD_PROTOCOL: &str = "/nomoat/kad/1";
/// The identify protocol version string.
const IDENTIFY_VERSION: &str = "/nomoat/1";

/// Network settings of a node.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Identity; a fresh one when `None`.
    pub keypair: Option<Keypair>,
    /// Addresses to listen on.
    pub listen: Vec<Multiaddr>,
    /// Peers to connect to at start (with `/p2p/PEER_ID`).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Act as a circuit relay for peers behind NAT.
    pub relay_server: bool,
    /// Heartbeat interval of `ServerInfo` announcements.
    pub heartbeat: Duration,
    /// Addresses others can reach this node at (a public IP, a port
    /// forward); a relay must have one to hand out reservations.
    pub external: Vec<Multiaddr>,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            keypair: None,
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr")],
            bootstrap: Vec::new(),
            mdns: false,
            relay_server: false,
            heartbeat: DEFAULT_HEARTBEAT,
            external: Vec::new(),
        }
    }
}

/// Why a network operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The transport or behaviours could not be built.
    #[error("network setup: {0}")]
    Setup(String),
    /// Listening on an address failed.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// A dial failed.
    #[error("cannot reach {addr}: {reason}")]
    Dial {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The network actor has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

#[derive(NetworkBehaviour)]
struct Behaviour {
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

/// What the node knows about the swarm, shared between the actor (writer)
/// and handles (readers).
#[derive(Debug, Default)]
struct View {
    servers: HashMap<PeerId, (ServerInfo, Instant)>,
    rtts: HashMap<PeerId, Duration>,
    /// Seconds per block this node measured on each server's single-token
    /// steps (EMA): compute plus queueing, without the network leg.
    observed: HashMap<PeerId, f64>,
    listen: Vec<Multiaddr>,
    external: Vec<Multiaddr>,
    connected: HashMap<PeerId, Multiaddr>,
    /// Sessions this node has open through each server (its own load there).
    own_sessions: HashMap<PeerId, usize>,
    /// Peers that failed this node's sessions, kept off routes for a while.
    backoff: nomoat_scheduler::Backoff<PeerId>,
    /// Addresses learnt for peers (announcements, discovery), newest last.
    book: HashMap<PeerId, Vec<Multiaddr>>,
    /// Every connection's remote address, oldest first (bounded).
    seen: Vec<(PeerId, Multiaddr)>,
    own: Option<ServerInfo>,
    reachability: Option<Reachability>,
}

enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    },
    AddAddresses {
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        done: oneshot::Sender<()>,
    },
    Listen {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Subscribe {
        model_id: String,
    },
    Announce {
        info: ServerInfo,
    },
    Bootstrap,
    Providers {
        model_id: String,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    Shutdown,
}

/// A cloneable handle to the network actor.
#[derive(Clone)]
pub struct NetHandle {
    peer_id: PeerId,
    tx: mpsc::Sender<Command>,
    view: Arc<Mutex<View>>,
    control: libp2p_stream::Control,
    expiry: Duration,
}

impl std::fmt::Debug for NetHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetHandle")
            .field("peer_id", &self.peer_id)
            .finish()
    }
}

/// Monotonic time since the first call, the backoff's clock.
fn clock() -> Duration {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(std::time::Instant::now).elapsed()
}

fn topic(model_id: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("nomoat/v1/servers/{model_id}"))
}

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

    /// Addresses the node listens on, each ending in `/p2p/PEER_ID`.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let v = self.view();
        v.listen
            .iter()
            .chain(&v.external)
            .map(|a| a.clone().with_p2p(self.peer_id).unwrap_or_else(|a| a))
            .collect()
    }

    /// Waits until the node listens on at least `n` addresses (or `timeout`).
    pub async fn wait_listening(&self, n: usize, timeout: Duration) -> Vec<Multiaddr> {
        let deadline = Instant::now() + timeout;
        loop {
            let addrs = self.listen_addrs();
            if addrs.len() >= n || Instant::now() >= deadline {
                return addrs;
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
                addr: addr.to_string(),
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

    /// Whether routes must avoid `peer` now.
    pub fn is_backed_off(&self, peer: &PeerId) -> bool {
        self.view().backoff.is_backed_off(peer, clock())
    }

    /// Sessions this node has open through `peer`.
    pub fn own_sessions(&self, peer: &PeerId) -> usize {
        self.view().own_sessions.get(peer).copied().unwrap_or(0)
    }

    /// Connects to `peer` if not connected yet, trying the addresses learnt
    /// for it (most recent first). Best effort: when none is known or none
    /// answers, opening a stream still lets the swarm dial what its
    /// behaviours (Kademlia, identify) know.
    pub async fn connect_known(&self, peer: PeerId) {
        if peer == self.peer_id || self.connected(&peer).is_some() {
            return;
        }
        let addrs: Vec<Multiaddr> = self.view().book.get(&peer).cloned().unwrap_or_default();
        for a in addrs.into_iter().rev() {
            match self.dial(a).await {
                Ok(_) => return,
                Err(e) => debug!(%peer, "known address failed: {e}"),
            }
        }
    }

    /// What AutoNAT concluded about this node.
    pub fn reachability(&self) -> Reachability {
        self.view().reachability.unwrap_or(Reachability::Unknown)
    }

    /// Asks the DHT which peers provide `model_id` (servers announce a
    /// provider record for the model they serve).
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

fn build_swarm(cfg: &NetConfig, key: Keypair) -> Result<Swarm<Behaviour>, NetError> {
    let setup = |e: &dyn std::fmt::Display| NetError::Setup(e.to_string());
    let relay_server = cfg.relay_server;
    let mdns_on = cfg.mdns;
    let heartbeat = cfg.heartbeat;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| setup(&e))?
        .with_quic()
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| setup(&e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let gossip_cfg = gossipsub::ConfigBuilder::default()
                .heartbeat_interval(Duration::from_millis(500))
                .validation_mode(gossipsub::ValidationMode::Strict)
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
    let mut swarm = build_swarm(&cfg, key)?;
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

struct Actor {
    swarm: Swarm<Behaviour>,
    rx: mpsc::Receiver<Command>,
    view: Arc<Mutex<View>>,
    pending_dials: HashMap<PeerId, Vec<oneshot::Sender<Result<PeerId, NetError>>>>,
    pending_providers: HashMap<kad::QueryId, (oneshot::Sender<Vec<PeerId>>, Vec<PeerId>)>,
    subscribed: Vec<String>,
    heartbeat: Duration,
    relay_server: bool,
}

impl Actor {
    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&mut self, peer: PeerId, addrs: Vec<Multiaddr>) {
        for a in addrs {
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
                _ = tick.tick() => self.announce(),
            }
        }
        debug!("network actor stopped");
    }

    /// Refreshes this node's `ServerInfo` (time, addresses, reachability)
    /// and publishes it.
    fn announce(&mut self) {
        let info = {
            let mut v = self.view();
            let addrs: Vec<Vec<u8>> = v
                .listen
                .iter()
                .chain(&v.external)
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
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(t, info.encode())
        {
            debug!("heartbeat not published: {e}");
        }
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
                        addr: addr.to_string(),
                        reason: "the address must end in /p2p/<peer id>".into(),
                    }));
                    return;
                };
                if self.swarm.is_connected(&peer) {
                    let _ = reply.send(Ok(peer));
                    return;
                }
                self.swarm.add_peer_address(peer, addr.clone());
                match self.swarm.dial(addr.clone()) {
                    Ok(()) => self.pending_dials.entry(peer).or_default().push(reply),
                    Err(e) => {
                        let _ = reply.send(Err(NetError::Dial {
                            addr: addr.to_string(),
                            reason: e.to_string(),
                        }));
                    }
                }
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
            Command::Subscribe { model_id } => {
                if !self.subscribed.contains(&model_id) {
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .subscribe(&topic(&model_id))
                    {
                        warn!("cannot subscribe to {model_id}: {e}");
                    }
                    self.subscribed.push(model_id);
                }
            }
            Command::Announce { info } => {
                let key = kad::RecordKey::new(&info.model_id);
                let previous = self.view().own.replace(info.clone());
                if previous.map(|o| o.model_id) != Some(info.model_id.clone()) {
                    if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(key) {
                        warn!("cannot announce the model in the DHT: {e}");
                    }
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .subscribe(&topic(&info.model_id));
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
            Command::Bootstrap => {
                if let Err(e) = self.swarm.behaviour_mut().kad.bootstrap() {
                    debug!("DHT bootstrap: {e}");
                }
            }
            Command::Shutdown => {}
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                info!(%address, "listening");
                // A relay hands its addresses out in reservations: a specific
                // (not wildcard) listen address of a relay is taken as external.
                let wildcard = address.iter().any(|p| {
                    matches!(p, libp2p::multiaddr::Protocol::Ip4(ip) if ip.is_unspecified())
                        || matches!(p, libp2p::multiaddr::Protocol::Ip6(ip) if ip.is_unspecified())
                });
                if self.relay_server && !wildcard {
                    self.swarm.add_external_address(address.clone());
                }
                self.view().listen.push(address);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.view().listen.retain(|a| a != &address);
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
                for reply in self.pending_dials.remove(&peer_id).unwrap_or_default() {
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
                for reply in self.pending_dials.remove(&peer).unwrap_or_default() {
                    let _ = reply.send(Err(NetError::Dial {
                        addr: peer.to_string(),
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
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.view().rtts.insert(peer, rtt);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message { message, .. }) => {
                // Strict validation checked the signature: `source` signed it.
                let Some(source) = message.source else { return };
                match ServerInfo::decode(&message.data) {
                    Ok(info) if PeerId::from_bytes(&info.peer_id).ok() == Some(source) => {
                        let addrs = info
                            .addrs
                            .iter()
                            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
                            .collect();
                        self.remember(source, addrs);
                        self.view().servers.insert(source, (info, Instant::now()));
                    }
                    Ok(_) => warn!(%source, "announcement for another peer id dropped"),
                    Err(e) => warn!(%source, "bad announcement dropped: {e}"),
                }
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
