//! The network actor: one task owns the libp2p `Swarm`; everything else
//! talks to it through a cloneable [`NetHandle`].
//!
//! Transports: QUIC first, TCP + noise + yamux as fallback, and circuit relay
//! v2 (client always; server with `relay_server`). Behaviours: identify,
//! ping (RTT), Kademlia (bootstrap peers, provider records per model id),
//! gossipsub (signed `ServerInfo` heartbeats), mDNS (optional), DCUtR hole
//! punching, AutoNAT and raw streams for the nomoat protocols.
//!
//! * `actor`: the event loop that owns the `Swarm`; [`start`] builds it.
//! * `handle`: [`NetHandle`], commands to the actor and reads of the view.
//! * [`discover`](mod@discover): the servers of a model, by info queries.
//! * [`wire`]: length-prefixed messages on streams.
//! * [`addrs`]: which addresses are handed to, and taken from, other peers.
//! * [`access`]: lasting identities, private swarms' keys and allow-lists.

pub mod access;
mod actor;
pub mod addrs;
pub mod discover;
mod handle;
pub mod signed;
pub mod wire;

pub use actor::{now_ms, start};
pub use discover::{discover, query_servers, DiscoverError};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::identity::Keypair;
use libp2p::{gossipsub, Multiaddr, PeerId};
use nomoat_protocol::{Reachability, ServerInfo};
use tokio::sync::{mpsc, oneshot};

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
    /// Addresses to listen on. The default is every interface, on any free
    /// port, over QUIC and TCP: a node that only listens on loopback cannot
    /// dial another host (QUIC sends from its listening socket).
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
    /// Most servers' announcements held at once; past it the oldest goes.
    pub max_known_servers: usize,
    /// Most connections established at once, all peers together.
    pub max_connections: u32,
    /// Most connections established with one peer at once (a direct one,
    /// a relayed one and one per transport leave room to spare).
    pub max_connections_per_peer: u32,
    /// Most incoming connections still in their handshake at once.
    pub max_pending_connections: u32,
    /// Who may connect: a private swarm's key, an allow-list.
    pub access: access::Access,
}

/// The default of [`NetConfig::max_connections`].
pub const MAX_CONNECTIONS: u32 = 1024;
/// The default of [`NetConfig::max_connections_per_peer`].
pub const MAX_CONNECTIONS_PER_PEER: u32 = 8;
/// The default of [`NetConfig::max_pending_connections`].
pub const MAX_PENDING_CONNECTIONS: u32 = 128;

/// The default of [`NetConfig::max_known_servers`]: four info answers' worth.
pub const MAX_KNOWN_SERVERS: usize = 4 * nomoat_protocol::MAX_INFO_SERVERS;
/// Peers whose addresses the address book holds at once.
pub const MAX_BOOK_PEERS: usize = 4 * MAX_KNOWN_SERVERS;

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            keypair: None,
            listen: default_listen(),
            bootstrap: Vec::new(),
            mdns: false,
            relay_server: false,
            heartbeat: DEFAULT_HEARTBEAT,
            external: Vec::new(),
            max_known_servers: MAX_KNOWN_SERVERS,
            max_connections: MAX_CONNECTIONS,
            max_connections_per_peer: MAX_CONNECTIONS_PER_PEER,
            max_pending_connections: MAX_PENDING_CONNECTIONS,
            access: access::Access::default(),
        }
    }
}

/// The default listen addresses: QUIC and TCP on every interface, any port.
pub fn default_listen() -> Vec<Multiaddr> {
    DEFAULT_LISTEN
        .iter()
        .map(|a| a.parse().expect("valid multiaddr"))
        .collect()
}

/// [`default_listen`] as text, for command-line defaults.
pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/udp/0/quic-v1", "/ip4/0.0.0.0/tcp/0"];

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
        /// The address dialled.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The network actor has stopped.
    #[error("the network task has stopped")]
    Stopped,
}

/// What the node knows about the swarm, shared between the actor (writer)
/// and handles (readers).
#[derive(Debug, Default)]
struct View {
    servers: HashMap<PeerId, (ServerInfo, Instant)>,
    /// The signed form of each entry of `servers`, as relayed.
    signed: HashMap<PeerId, nomoat_protocol::SignedInfo>,
    rtts: HashMap<PeerId, Duration>,
    /// Seconds per block this node measured on each server's single-token
    /// steps (EMA): compute plus queueing, without the network leg.
    observed: HashMap<PeerId, f64>,
    /// Listen addresses, with the listener each belongs to.
    listen: Vec<(libp2p::core::transport::ListenerId, Multiaddr)>,
    external: Vec<Multiaddr>,
    connected: HashMap<PeerId, Multiaddr>,
    /// Sessions this node has open through each server (its own load there).
    own_sessions: HashMap<PeerId, usize>,
    /// Peers that failed this node's sessions, kept off routes for a while.
    backoff: nomoat_scheduler::Backoff<PeerId>,
    /// What this node's spot checks taught it of each peer.
    reputation: nomoat_scheduler::Reputation<PeerId>,
    /// Addresses learnt for peers (announcements, discovery), newest last.
    book: HashMap<PeerId, Vec<Multiaddr>>,
    /// Every connection's remote address, oldest first (bounded).
    seen: Vec<(PeerId, Multiaddr)>,
    own: Option<ServerInfo>,
    /// `own`, signed as last published.
    own_signed: Option<nomoat_protocol::SignedInfo>,
    reachability: Option<Reachability>,
    /// Evidence heard, waiting to be re-checked: accuser and evidence.
    evidence: std::collections::VecDeque<(PeerId, nomoat_protocol::Evidence)>,
    /// When each accuser's evidence was last taken (bounded).
    accusers: HashMap<PeerId, Instant>,
    /// Receipts already taken as evidence (bounded).
    evidence_seen: std::collections::HashSet<nomoat_protocol::Hash>,
}

enum Command {
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NetError>>,
    },
    /// Dials a peer on every address known for it at once.
    DialPeer {
        peer: PeerId,
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
    PublishEvidence {
        model_id: String,
        payload: Vec<u8>,
    },
    Announce {
        info: ServerInfo,
    },
    Bootstrap,
    Providers {
        model_id: String,
        reply: oneshot::Sender<Vec<PeerId>>,
    },
    /// Becomes a DHT provider of a key (an adapter id held here).
    Provide {
        key: String,
    },
    Shutdown,
}

/// A cloneable handle to the network actor.
#[derive(Clone)]
pub struct NetHandle {
    peer_id: PeerId,
    /// The node's identity, which signs its receipts.
    key: Arc<Keypair>,
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

/// Where evidence of lies about `model_id`'s servers is gossiped.
fn evidence_topic(model_id: &str) -> gossipsub::IdentTopic {
    gossipsub::IdentTopic::new(format!("nomoat/v1/evidence/{model_id}"))
}

/// Most pieces of evidence waiting to be re-checked.
pub const MAX_PENDING_EVIDENCE: usize = 16;
/// One piece of evidence per accuser in this long is taken; the rest are
/// dropped (re-checking costs the swarm compute).
pub const EVIDENCE_PER_ACCUSER: Duration = Duration::from_secs(60);
