//! Span arithmetic: which blocks are covered, a chain of spans through the model,
//! and the ways to split a model into spans.
//!
//! Ranges that stick out of the model are cut to it here, and empty ranges are
//! ignored; check advertised ranges with [`BlockRange::check_within`] before
//! trusting them.

use crate::{BlockRange, RangeError};

/// The blocks of `0..num_blocks` that no range in `ranges` covers, as maximal
/// ranges in ascending order.
///
/// The result and the (clipped) input together cover every block of the model, and
/// no gap touches a covered block. An empty model has no gaps.
pub fn coverage_gaps(num_blocks: u32, ranges: &[BlockRange]) -> Vec<BlockRange> {
    let mut covered: Vec<BlockRange> = ranges
        .iter()
        .filter_map(|&range| clip(range, num_blocks))
        .collect();
    covered.sort_unstable();

    let mut gaps = Vec::new();
    let mut covered_to = 0;
    for range in covered {
        if range.start > covered_to {
            gaps.push(BlockRange {
                start: covered_to,
                end: range.start,
            });
        }
        covered_to = covered_to.max(range.end);
    }
    if covered_to < num_blocks {
        gaps.push(BlockRange {
            start: covered_to,
            end: num_blocks,
        });
    }
    gaps
}

/// Indices into `ranges` of a chain of spans that carries a request through every
/// block of `0..num_blocks`, or `None` if some block is not covered.
///
/// The chain starts at block 0. At each boundary it takes, among the ranges that
/// contain the boundary, the one that reaches furthest (the lowest index on a tie),
/// runs it from the boundary to its end, and continues from there. A range may thus
/// start before the boundary: its peer runs only the part it is asked for. Greedy
/// furthest reach uses the fewest hops possible.
///
/// `chain` is `None` exactly when [`coverage_gaps`] is non-empty. An empty model
/// needs no hop: `Some(vec![])`.
pub fn chain(num_blocks: u32, ranges: &[BlockRange]) -> Option<Vec<usize>> {
    let mut by_start: Vec<(BlockRange, usize)> = ranges
        .iter()
        .enumerate()
        .filter_map(|(index, &range)| Some((clip(range, num_blocks)?, index)))
        .collect();
    by_start.sort_unstable_by_key(|&(range, index)| (range.start, index));
    let mut unseen = by_start.into_iter().peekable();

    let mut hops = Vec::new();
    let mut boundary = 0;
    while boundary < num_blocks {
        // Ranges seen in earlier rounds end at or before the boundary (it is the
        // furthest end among them), so only the newly reachable ones can extend it.
        let mut best: Option<(u32, usize)> = None;
        while let Some((range, index)) = unseen.next_if(|(range, _)| range.start <= boundary) {
            let better = best.is_none_or(|(end, best_index)| {
                range.end > end || (range.end == end && index < best_index)
            });
            if range.end > boundary && better {
                best = Some((range.end, index));
            }
        }
        let (end, index) = best?;
        hops.push(index);
        boundary = end;
    }
    Some(hops)
}

/// Cuts `0..num_blocks` into `parts` contiguous spans whose lengths differ by at most
/// one, the longer spans first.
///
/// # Errors
///
/// [`RangeError::BadSplit`] when `parts` is zero or more than `num_blocks`.
pub fn even_splits(num_blocks: u32, parts: u32) -> Result<Vec<BlockRange>, RangeError> {
    if parts == 0 || parts > num_blocks {
        return Err(RangeError::BadSplit { num_blocks, parts });
    }
    let (base, longer) = (num_blocks / parts, num_blocks % parts);
    let mut start = 0;
    Ok((0..parts)
        .map(|part| {
            let end = start + base + u32::from(part < longer);
            let span = BlockRange { start, end };
            start = end;
            span
        })
        .collect())
}

/// Every way to cut `0..num_blocks` into exactly `parts` non-empty contiguous spans,
/// in lexicographic order of the cut points.
///
/// There are `binomial(num_blocks - 1, parts - 1)` of them: this is combinatorial
/// and meant for tests over small models, not for scheduling. Impossible requests
/// (`parts` zero or above `num_blocks`) give no split, except that an empty model
/// has one split into zero spans.
pub fn all_splits(num_blocks: u32, parts: u32) -> Vec<Vec<BlockRange>> {
    let mut splits = Vec::new();
    let mut current = Vec::with_capacity(parts as usize);
    push_splits(0, num_blocks, parts, &mut current, &mut splits);
    splits
}

/// Pushes onto `splits` every completion of `current` that cuts `start..num_blocks`
/// into `parts_left` non-empty spans.
fn push_splits(
    start: u32,
    num_blocks: u32,
    parts_left: u32,
    current: &mut Vec<BlockRange>,
    splits: &mut Vec<Vec<BlockRange>>,
) {
    match parts_left {
        0 => {
            if start == num_blocks {
                splits.push(current.clone());
            }
        }
        1 => {
            if start < num_blocks {
                current.push(BlockRange {
                    start,
                    end: num_blocks,
                });
                splits.push(current.clone());
                current.pop();
            }
        }
        _ => {
            // Leave at least one block for each later span.
            let Some(last_end) = num_blocks.checked_sub(parts_left - 1) else {
                return;
            };
            for end in start + 1..=last_end {
                current.push(BlockRange { start, end });
                push_splits(end, num_blocks, parts_left - 1, current, splits);
                current.pop();
            }
        }
    }
}

/// `range` cut to `0..num_blocks`; `None` if no block is left.
fn clip(range: BlockRange, num_blocks: u32) -> Option<BlockRange> {
    let end = range.end.min(num_blocks);
    (range.start < end).then_some(BlockRange {
        start: range.start,
        end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `"0..4 6..9"` into ranges, for compact tables.
    fn spans(text: &str) -> Vec<BlockRange> {
        text.split_whitespace()
            .map(|span| span.parse().unwrap())
            .collect()
    }

    #[test]
    fn gaps() {
        let cases = [
            (0, "", ""),
            (0, "0..3", ""),
            (8, "", "0..8"),
            (8, "0..8", ""),
            (8, "0..3", "3..8"),
            (8, "5..8", "0..5"),
            (8, "2..4 6..7", "0..2 4..6 7..8"),
            (8, "0..4 4..8", ""),
            (8, "4..8 0..5", ""),
            (8, "0..3 1..2 2..5", "5..8"),
            (8, "0..2 0..2 6..20", "2..6"),
            (8, "9..12", "0..8"),
        ];
        for (num_blocks, given, want) in cases {
            assert_eq!(
                coverage_gaps(num_blocks, &spans(given)),
                spans(want),
                "{num_blocks} blocks, {given:?}"
            );
        }
    }

    #[test]
    fn empty_ranges_cover_nothing() {
        let ranges = [
            BlockRange { start: 3, end: 3 },
            BlockRange { start: 5, end: 2 },
        ];
        assert_eq!(coverage_gaps(6, &ranges), spans("0..6"));
        assert_eq!(chain(6, &ranges), None);
    }

    #[test]
    fn chains() {
        let cases: [(u32, &str, Option<&[usize]>); 11] = [
            (0, "", Some(&[])),
            (8, "", None),
            (8, "0..8", Some(&[0])),
            (8, "0..4 4..8", Some(&[0, 1])),
            (8, "4..8 0..4", Some(&[1, 0])),
            (8, "0..4 5..8", None),
            (8, "1..8", None),
            // Overlaps: the third range runs 4..8, skipping the second.
            (8, "0..4 2..6 3..8", Some(&[0, 2])),
            // Overlaps: the second range runs 4..6, the third 6..8.
            (8, "0..4 2..6 5..8", Some(&[0, 1, 2])),
            // Furthest reach wins, then the lowest index.
            (8, "0..3 0..5 0..5 3..8 5..8", Some(&[1, 3])),
            // Ranges past the model are cut to it.
            (8, "0..6 6..12", Some(&[0, 1])),
        ];
        for (num_blocks, given, want) in cases {
            assert_eq!(
                chain(num_blocks, &spans(given)).as_deref(),
                want,
                "{num_blocks} blocks, {given:?}"
            );
        }
    }

    #[test]
    fn even() {
        let cases = [
            (1, 1, "0..1"),
            (8, 1, "0..8"),
            (8, 2, "0..4 4..8"),
            (10, 3, "0..4 4..7 7..10"),
            (5, 5, "0..1 1..2 2..3 3..4 4..5"),
            (32, 3, "0..11 11..22 22..32"),
        ];
        for (num_blocks, parts, want) in cases {
            assert_eq!(
                even_splits(num_blocks, parts),
                Ok(spans(want)),
                "{num_blocks} blocks in {parts}"
            );
        }
        for (num_blocks, parts) in [(0, 0), (0, 1), (8, 0), (3, 4)] {
            assert_eq!(
                even_splits(num_blocks, parts),
                Err(RangeError::BadSplit { num_blocks, parts })
            );
        }
    }

    #[test]
    fn all() {
        assert_eq!(all_splits(3, 1), [spans("0..3")]);
        assert_eq!(
            all_splits(4, 2),
            [spans("0..1 1..4"), spans("0..2 2..4"), spans("0..3 3..4")]
        );
        assert_eq!(all_splits(3, 3), [spans("0..1 1..2 2..3")]);
        assert_eq!(all_splits(0, 0), [Vec::<BlockRange>::new()]);
        for (num_blocks, parts) in [(3, 4), (3, 0), (0, 1)] {
            assert!(
                all_splits(num_blocks, parts).is_empty(),
                "{num_blocks} in {parts}"
            );
        }
    }
}
