//! The client side: choose a route, open a session along it and drive
//! generation with the head held locally.
//!
//! * [`plan`](mod@plan): routes from announcements and this node's
//!   measurements, through the scheduler.
//! * `session`: [`RemoteSession`]: open, step, observe, close.
//! * `failover`: replacing a failed hop and replaying its inputs.
//! * `history`: each hop's inputs, as failover replays them.
//! * [`generate`](mod@generate): the one token loop, over the swarm or the
//!   local model.

mod failover;
pub mod generate;
mod history;
pub mod plan;
mod session;
pub mod verify;

pub use generate::{generate, StepError, Stepper, TokenSink};
pub use plan::{plan, plan_range, simple_route};
pub(crate) use session::{UNANSWERED_STREAM_ATTEMPTS, UNANSWERED_STREAM_DELAY};
pub use verify::{recheck, watch_evidence, Recheck};

use std::time::Duration;

use futures::io::WriteHalf;
use libp2p::{PeerId, Stream};
use nomoat_protocol::{BlockRange, ErrorCode, Hop, InferMessage, SessionId, TensorFrame};
use tokio::sync::mpsc;

use crate::net::NetHandle;

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
pub enum ClientError {
    /// No chain of live servers covers every block.
    #[error(
        "no route: blocks {} of model {model_id} are not served by any live server",
        ranges_text(missing)
    )]
    NoRoute {
        /// The model.
        model_id: String,
        /// The uncovered blocks.
        missing: Vec<BlockRange>,
    },
    /// A hop answered with an error frame.
    #[error("hop {hop} ({peer}, blocks {blocks}) refused: {message} [{code:?}]")]
    Hop {
        /// Index in the route.
        hop: usize,
        /// The server.
        peer: PeerId,
        /// Its blocks.
        blocks: BlockRange,
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
        blocks: BlockRange,
        /// What happened.
        reason: String,
    },
    /// Finding the model's servers failed.
    #[error(transparent)]
    Discover(Box<crate::net::DiscoverError>),
    /// A route named a peer id that does not parse.
    #[error("bad peer id in route: {0}")]
    BadPeerId(#[from] libp2p::identity::ParseError),
    /// Failover needs a hop's inputs that never arrived.
    #[error("hop {hop}'s input history is incomplete below position {pos}")]
    HistoryIncomplete {
        /// The hop.
        hop: usize,
        /// The position its history should reach.
        pos: u32,
    },
    /// Every replacement failover tried failed, and none said why.
    #[error("every replacement tried failed")]
    NoReplacement,
    /// A hop failed and no replacement could take over.
    #[error("{failure}; failover found no replacement: {reason}")]
    FailoverFailed {
        /// The hop's failure.
        failure: Box<ClientError>,
        /// Why no replacement took over.
        reason: Box<ClientError>,
    },
    /// Local computation failed.
    #[error(transparent)]
    Engine(#[from] crate::engine::EngineError),
}

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
    pub blocks: BlockRange,
    /// The servers that took over, with the blocks each runs.
    pub replacement: Vec<(PeerId, BlockRange)>,
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
    blocks: BlockRange,
    writer: WriteHalf<Stream>,
    /// Tags the events read from this stream.
    conn: u64,
    /// The first position this hop computed (a replacement's earlier
    /// outputs came from the hop it replaced).
    joined: u32,
}

/// A step in flight or recently done, for placing hops' copies in history.
#[derive(Debug, Clone, Copy)]
struct LiveStep {
    start: u32,
    /// Positions below this are still valid (a later rewind may cut it).
    end: u32,
    /// The shape of the step's input, `[rows, hidden]`: every hop's output
    /// has it too, and a copy or result of another shape is refused.
    shape: [usize; 2],
    /// A replay's last hop: its copy is not history (the next hop has it).
    stop: Option<usize>,
}

pub(crate) type Event = (u64, Option<InferMessage>);

/// One inference session along a route, with failover: when a hop fails the
/// session replaces it, replays its inputs and goes on (see the protocol
/// crate's "Failover").
#[derive(Debug)]
pub struct RemoteSession {
    id: SessionId,
    model_id: String,
    max_length: u32,
    /// The LoRA adapter every hop runs the session with.
    adapter: Option<nomoat_protocol::Hash>,
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
    /// The last hop's outputs, as `history` keeps the others'.
    outputs: Vec<(u32, TensorFrame)>,
    /// The receipts the hops signed, by step and hop stream (bounded by
    /// [`session::MAX_RECEIPTS`], or [`session::MAX_RECEIPTS_UNCHECKED`]
    /// without checks).
    receipts: std::collections::BTreeMap<(u64, u64), nomoat_protocol::Receipt>,
    /// Spot checks, when on.
    checks: Option<verify::Checks>,
    /// Peers failover must never pick (a shadow avoids the hop it checks).
    avoid: Vec<PeerId>,
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

fn route_peers(route: &[Hop]) -> Result<Vec<(PeerId, BlockRange)>, ClientError> {
    route
        .iter()
        .map(|h| {
            PeerId::from_bytes(&h.peer_id)
                .map(|p| (p, h.blocks))
                .map_err(ClientError::from)
        })
        .collect()
}

impl From<crate::net::DiscoverError> for ClientError {
    fn from(e: crate::net::DiscoverError) -> Self {
        ClientError::Discover(Box::new(e))
    }
}

/// Ranges as `a..b, c..d`.
pub fn ranges_text(ranges: &[BlockRange]) -> String {
    ranges
        .iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl ClientError {
    /// The hop a failure is blamed on, if it is a hop's failure.
    pub fn failed_hop(&self) -> Option<(usize, PeerId)> {
        match self {
            ClientError::Hop { hop, peer, .. } | ClientError::HopFailed { hop, peer, .. } => {
                Some((*hop, *peer))
            }
            ClientError::FailoverFailed { failure, .. } => failure.failed_hop(),
            _ => None,
        }
    }

    /// Whether the same route might work a moment later.
    pub(crate) fn transient(&self) -> bool {
        match self {
            ClientError::HopFailed { .. } => true,
            ClientError::Hop { code, .. } => matches!(
                code,
                Some(ErrorCode::Internal | ErrorCode::Busy | ErrorCode::UnknownSession)
            ),
            _ => false,
        }
    }

    /// Whether another server might succeed where this one failed: every
    /// transient failure, and a server that cannot run this model or range.
    pub(crate) fn replaceable(&self) -> bool {
        self.transient()
            || matches!(
                self,
                ClientError::Hop {
                    code: None
                        | Some(
                            ErrorCode::WrongBlocks | ErrorCode::WrongModel | ErrorCode::Unsupported
                        ),
                    ..
                }
            )
    }
}
