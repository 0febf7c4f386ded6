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
//! whole plans over a model or a sub-range of it, gaps included
//! ([`plan_servers`], [`plan_servers_within`]), and the chunk queue of a
//! many-peer weights fetch ([`ChunkQueue`]). The span arithmetic they build on:
//!
//! - [`BlockRange`]: a non-empty, half-open span of blocks `start..end`;
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
mod route;

use std::{fmt, str::FromStr};

pub use backoff::{Backoff, DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX};
pub use chunks::{ChunkQueue, Penalty, Requeued, Take};
pub use coverage::{all_splits, chain, coverage_gaps, even_splits};
pub use estimate::{
    candidates, fill_with_median, median, median_or, ServerEstimate, OWN_SESSION_LOAD,
    ROUTE_JITTER, UNKNOWN_BLOCKS_PER_S, UNKNOWN_RTT,
};
pub use placement::{block_throughput, choose_span, should_move, Placed, DEFAULT_MOVE_MARGIN};
pub use plan::{chain_route, join_ranges, plan_servers, plan_servers_within, route_or_gaps};
pub use route::{plan_route, route_cost, Candidate, Route, RouteHop, NO_KV_PENALTY_S};

/// A half-open span of transformer blocks, `start..end`.
///
/// Ranges built with [`new`](Self::new) or parsed are never empty. The fields are
/// public for pattern matching and literals; a range built by hand with
/// `start >= end` is empty, and the functions of this crate ignore it.
///
/// Ranges order by `start`, then `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockRange {
    /// First block of the span.
    pub start: u32,
    /// One past the last block of the span.
    pub end: u32,
}

impl BlockRange {
    /// The span `start..end`.
    ///
    /// # Errors
    ///
    /// [`RangeError::Empty`] unless `start < end`.
    pub fn new(start: u32, end: u32) -> Result<Self, RangeError> {
        if start < end {
            Ok(Self { start, end })
        } else {
            Err(RangeError::Empty { start, end })
        }
    }

    /// Number of blocks in the span (0 for a hand-built empty range).
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the span holds no block; never true for a range from [`new`](Self::new).
    pub fn is_empty(&self) -> bool {
        self.start >= self.end
    }

    /// Whether block `block` lies in the span.
    pub fn contains_block(&self, block: u32) -> bool {
        self.start <= block && block < self.end
    }

    /// Whether every block of `other` lies in this span.
    pub fn contains(&self, other: &BlockRange) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    /// Whether the two spans share at least one block.
    pub fn overlaps(&self, other: &BlockRange) -> bool {
        self.start < other.end && other.start < self.end
    }

    /// Checks that the span is non-empty and lies within a model of `num_blocks` blocks.
    ///
    /// # Errors
    ///
    /// [`RangeError::Empty`] for an empty range, [`RangeError::OutOfModel`] when the
    /// span ends past `num_blocks`.
    pub fn check_within(self, num_blocks: u32) -> Result<(), RangeError> {
        if self.is_empty() {
            return Err(RangeError::Empty {
                start: self.start,
                end: self.end,
            });
        }
        if self.end > num_blocks {
            return Err(RangeError::OutOfModel {
                range: self,
                num_blocks,
            });
        }
        Ok(())
    }
}

/// Writes `start..end`, the form [`FromStr`] reads.
impl fmt::Display for BlockRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..{}", self.start, self.end)
    }
}

/// Reads `start..end`, e.g. `0..10`; spaces around either number are allowed.
impl FromStr for BlockRange {
    type Err = RangeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let parse_error =
            |why: &str| RangeError::Parse(format!("expected A..B like 0..10, got {text:?}{why}"));
        let (start, end) = text.split_once("..").ok_or_else(|| parse_error(""))?;
        let block = |part: &str| {
            part.trim()
                .parse::<u32>()
                .map_err(|_| parse_error(&format!(" ({:?} is not a block index)", part.trim())))
        };
        Self::new(block(start)?, block(end)?)
    }
}

/// Why a block range is invalid, or a model cannot be split as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RangeError {
    /// The range `start..end` holds no block: `start` must be below `end`.
    #[error("empty block range {start}..{end}: start must be below end")]
    Empty { start: u32, end: u32 },
    /// The text is not a block range; the message says what was expected.
    #[error("invalid block range: {0}")]
    Parse(String),
    /// The range ends past the last block of a model of `num_blocks` blocks.
    #[error("block range {range} exceeds the model's {num_blocks} blocks")]
    OutOfModel { range: BlockRange, num_blocks: u32 },
    /// `num_blocks` blocks cannot be cut into `parts` non-empty spans.
    #[error("cannot split {num_blocks} blocks into {parts} non-empty spans")]
    BadSplit { num_blocks: u32, parts: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u32, end: u32) -> BlockRange {
        BlockRange { start, end }
    }

    #[test]
    fn new_rejects_empty_ranges() {
        assert_eq!(BlockRange::new(0, 1), Ok(range(0, 1)));
        assert_eq!(
            BlockRange::new(3, 3),
            Err(RangeError::Empty { start: 3, end: 3 })
        );
        assert_eq!(
            BlockRange::new(4, 2),
            Err(RangeError::Empty { start: 4, end: 2 })
        );
    }

    #[test]
    fn len_and_membership() {
        let span = range(4, 8);
        assert_eq!(span.len(), 4);
        assert!(!span.is_empty());
        assert!(range(8, 4).is_empty());
        assert_eq!(range(8, 4).len(), 0);

        for (block, inside) in [(3, false), (4, true), (7, true), (8, false)] {
            assert_eq!(span.contains_block(block), inside, "block {block}");
        }
        let cases = [
            // (other, contains, overlaps)
            (range(4, 8), true, true),
            (range(5, 7), true, true),
            (range(0, 4), false, false),
            (range(8, 9), false, false),
            (range(3, 5), false, true),
            (range(7, 12), false, true),
            (range(0, 12), false, true),
        ];
        for (other, contains, overlaps) in cases {
            assert_eq!(span.contains(&other), contains, "{span} contains {other}");
            assert_eq!(span.overlaps(&other), overlaps, "{span} overlaps {other}");
            assert_eq!(other.overlaps(&span), overlaps, "{other} overlaps {span}");
        }
    }

    #[test]
    fn check_within_the_model() {
        assert_eq!(range(0, 32).check_within(32), Ok(()));
        assert_eq!(
            range(30, 33).check_within(32),
            Err(RangeError::OutOfModel {
                range: range(30, 33),
                num_blocks: 32
            })
        );
        assert_eq!(
            range(5, 5).check_within(32),
            Err(RangeError::Empty { start: 5, end: 5 })
        );
    }

    #[test]
    fn display_and_parse_round_trip() {
        for span in [range(0, 1), range(0, 10), range(7, 32), range(0, u32::MAX)] {
            let text = span.to_string();
            assert_eq!(text.parse(), Ok(span), "{text}");
        }
        assert_eq!(" 3 .. 9 ".parse(), Ok(range(3, 9)));
    }

    #[test]
    fn parse_errors_say_what_was_expected() {
        let cases = [
            (
                "",
                r#"invalid block range: expected A..B like 0..10, got """#,
            ),
            (
                "0-10",
                r#"invalid block range: expected A..B like 0..10, got "0-10""#,
            ),
            (
                "0..x",
                r#"invalid block range: expected A..B like 0..10, got "0..x" ("x" is not a block index)"#,
            ),
            (
                "-1..3",
                r#"invalid block range: expected A..B like 0..10, got "-1..3" ("-1" is not a block index)"#,
            ),
            (
                "0..=10",
                r#"invalid block range: expected A..B like 0..10, got "0..=10" ("=10" is not a block index)"#,
            ),
            ("5..5", "empty block range 5..5: start must be below end"),
        ];
        for (text, message) in cases {
            let err = text.parse::<BlockRange>().unwrap_err();
            assert_eq!(err.to_string(), message, "{text:?}");
        }
    }
}
