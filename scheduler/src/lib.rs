//! nomoat's sans-IO scheduler.
//!
//! A nomoat model of `num_blocks` transformer blocks is served by many peers, each
//! running one contiguous span of blocks. The scheduler decides which peers a
//! request passes through and which span a new peer should take. It performs no I/O
//! and reads no clock: its inputs are plain values (and, later, events and `now`),
//! its outputs are decisions, so every choice it makes can be tested
//! deterministically.
//!
//! Routing ([`plan_route`]: the cheapest chain of servers by expected per-token
//! latency) and placement ([`choose_span`], [`should_move`]: the window that most
//! raises the weakest block, moving only for a clear gain) are here, with what
//! routing assumes of servers it has not measured ([`candidates`], [`median`]),
//! what spot checks taught a node of each peer ([`Reputation`]),
//! whole plans over a model or a sub-range of it, gaps included
//! ([`plan_servers`], [`plan_servers_within`]), and the chunk queue of a
//! many-peer weights fetch ([`ChunkQueue`]). The span arithmetic they build on:
//!
//! - [`BlockRange`]: a non-empty, half-open span of blocks `start..end` (the
//!   protocol's type, re-exported: a hop's blocks and a server's span are the
//!   same value here);
//! - [`coverage_gaps`]: which blocks no span covers;
//! - [`chain`]: a sequence of spans that carries a request through every block;
//! - [`even_splits`] and [`all_splits`]: ways to cut a model into spans.
//!
//! # Example
//!
//! ```
//! use nomoat_scheduler::{chain, coverage_gaps, BlockRange, RangeError};
//!
//! // Three peers advertise their spans of a 32-block model.
//! let spans: Vec<BlockRange> = ["0..12", "8..24", "20..32"]
//!     .into_iter()
//!     .map(str::parse)
//!     .collect::<Result<_, RangeError>>()?;
//! assert!(coverage_gaps(32, &spans).is_empty());
//!
//! // A request runs 0..12 on the first peer, 12..24 on the second, 24..32 on the third.
//! assert_eq!(chain(32, &spans), Some(vec![0, 1, 2]));
//!
//! // Without the middle peer, blocks 12..20 are served by no one.
//! let partial = [spans[0], spans[2]];
//! assert_eq!(coverage_gaps(32, &partial), [BlockRange::new(12, 20)?]);
//! assert_eq!(chain(32, &partial), None);
//! # Ok::<(), RangeError>(())
//! ```

mod backoff;
mod chunks;
mod coverage;
mod estimate;
mod placement;
mod plan;
mod reputation;
mod route;

pub use backoff::{Backoff, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX};
pub use chunks::{ChunkQueue, Penalty, Requeued, Take};
pub use coverage::{all_splits, chain, coverage_gaps, even_splits};
pub use estimate::{
    candidates, claimed_speeds, fill_with_median, median, median_or, session_load, ServerEstimate,
    MAX_BATCH_CAPACITY, OWN_SESSION_LOAD, ROUTE_JITTER, UNKNOWN_BLOCKS_PER_S, UNKNOWN_RTT,
};
pub use nomoat_protocol::{BlockRange, RangeError};
pub use placement::{block_throughput, choose_span, should_move, Placed, DEFAULT_MOVE_MARGIN};
pub use plan::{chain_route, join_ranges, plan_servers, plan_servers_within, route_or_gaps};
pub use reputation::{Record, Reputation, DEFAULT_CHECK_FLOOR, DEFAULT_PROBATION, MAX_RECORDS};
pub use route::{plan_route, route_cost, Candidate, Route, RouteHop, NO_KV_PENALTY_S};
