//! Fetching a model from peers: the manifest (checked against the model
//! id), then only the chunks a span (or the head) needs, from several peers
//! in parallel. Every chunk is checked (length, then BLAKE3) before it is
//! stored; a peer that sends a bad chunk is penalised and, after
//! [`FetchConfig::max_faults`] faults, banned, and its chunks are fetched
//! elsewhere. Chunks already in the store are never fetched again, so a
//! killed fetch resumes where it stopped.
//!
//! The transfer goes `Providers -> Manifest -> Chunks -> Done`:
//! [`find_providers`], [`fetch_manifest`], [`fetch_chunks`].

mod chunks;
mod exchange;
mod providers;

use std::ops::Range;
use std::time::Duration;

use libp2p::PeerId;
use nomoat_protocol::Hash;

use crate::store::StoreError;

pub use chunks::{fetch_chunks, MAX_UNSTORED_BYTES};
pub use providers::{fetch_manifest, find_providers};

/// Chunks asked for in one request.
pub const DEFAULT_BATCH: usize = 16;
/// Requests in flight to one peer at once.
pub const DEFAULT_STREAMS_PER_PEER: usize = 4;
/// How long a peer may take to send the next chunk (or to answer) before
/// it counts as stalled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(20);
/// Faults (bad chunk, wrong length, stall, broken stream) after which a
/// peer is banned for the rest of the fetch.
pub const DEFAULT_MAX_FAULTS: u32 = 3;
/// Most times one chunk is asked for before the fetch gives up on it.
pub const MAX_CHUNK_ATTEMPTS: u32 = 8;
/// How long to wait for the DHT and for each peer's list of held blocks.
pub const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(5);

/// How a fetch behaves.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Chunks per request.
    pub batch: usize,
    /// Requests in flight per peer.
    pub streams_per_peer: usize,
    /// See [`DEFAULT_STALL_TIMEOUT`].
    pub stall_timeout: Duration,
    /// See [`DEFAULT_MAX_FAULTS`].
    pub max_faults: u32,
    /// Most bytes per second over all peers (`None`: as fast as they go).
    pub max_rate: Option<f64>,
    /// Show a progress bar on stderr (when it is a terminal).
    pub progress: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            batch: DEFAULT_BATCH,
            streams_per_peer: DEFAULT_STREAMS_PER_PEER,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            max_faults: DEFAULT_MAX_FAULTS,
            max_rate: None,
            progress: true,
        }
    }
}

impl FetchConfig {
    /// Caps the download rate (bytes per second).
    pub fn with_max_rate(mut self, bytes_per_s: Option<f64>) -> Self {
        self.max_rate = bytes_per_s.filter(|r| *r > 0.0);
        self
    }

    /// Turns the progress bar on or off.
    pub fn with_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No peer offers the model.
    #[error("no peer provides model {0:#}: check the --bootstrap addresses, and that a node serving this model id is running")]
    NoProviders(Hash),
    /// No peer gave a manifest that hashes to the model id.
    #[error("no peer gave a valid manifest for model {id:#} ({tried} tried; last: {last}); check the model id")]
    Manifest {
        /// The model id.
        id: Hash,
        /// Peers asked.
        tried: usize,
        /// The last failure.
        last: String,
    },
    /// Some chunks could be fetched from no peer.
    #[error("{missing} chunk(s) could not be fetched from any honest peer ({reason}); run the command again to resume, or bootstrap from other peers")]
    Incomplete {
        /// Chunks still missing.
        missing: usize,
        /// Why, for the last chunk that failed.
        reason: String,
    },
    /// The store failed (disk full, not writable).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Distinct chunks the span needs.
    pub needed: usize,
    /// Of those, already in the store at the start.
    pub already: usize,
    /// Chunks asked for (retries included).
    pub requested: usize,
    /// Chunks received, verified and stored.
    pub fetched: usize,
    /// Bytes of those.
    pub bytes: u64,
    /// Wall time of the chunk transfer.
    pub secs: f64,
    /// CPU time spent hashing received chunks.
    pub hash_secs: f64,
    /// How long the fetch went on after the last chunk arrived, waiting for
    /// the store threads to verify and write what they still held.
    pub store_tail_secs: f64,
    /// Time workers spent waiting because [`MAX_UNSTORED_BYTES`] of received
    /// chunks were waiting for the store threads (summed over workers).
    pub store_wait_secs: f64,
    /// Chunks that failed their check (wrong hash or length).
    pub rejected: usize,
    /// Chunk requests a peer answered busy (asked again later; no fault).
    pub busy: usize,
    /// Chunks stored from each peer.
    pub per_peer: Vec<(PeerId, usize)>,
    /// Peers banned for repeated faults.
    pub banned: Vec<PeerId>,
}

impl FetchReport {
    /// The report as JSON.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "needed": self.needed,
            "already": self.already,
            "requested": self.requested,
            "fetched": self.fetched,
            "bytes": self.bytes,
            "secs": self.secs,
            "hash_secs": self.hash_secs,
            "store_tail_secs": self.store_tail_secs,
            "store_wait_secs": self.store_wait_secs,
            "rejected": self.rejected,
            "busy": self.busy,
            "per_peer": self.per_peer.iter().map(|(p, n)| (p.to_string(), (*n).into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "banned": self.banned.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        })
    }
}

/// What a node needs of a model: the blocks of its span (possibly none)
/// and, for a client, the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// BlockRange to serve.
    pub blocks: Range<u32>,
    /// Whether the head (embedding, final norm, LM head, tokenizer) is needed.
    pub head: bool,
}
