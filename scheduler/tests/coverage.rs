//! Properties of the span arithmetic, checked against brute force on small models.

use std::collections::{BTreeSet, VecDeque};

use nomoat_scheduler::{all_splits, chain, coverage_gaps, even_splits, BlockRange};
use proptest::prelude::*;

/// Small models, with ranges that may overlap, repeat or stick out of the model.
fn model_and_ranges() -> impl Strategy<Value = (u32, Vec<BlockRange>)> {
    (0u32..24).prop_flat_map(|num_blocks| {
        let range = (0..num_blocks + 4, 1u32..12).prop_map(|(start, len)| BlockRange {
            start,
            end: start + len,
        });
        (Just(num_blocks), prop::collection::vec(range, 0..8))
    })
}

/// Whether any of `ranges` holds `block`.
fn covered(block: u32, ranges: &[BlockRange]) -> bool {
    ranges.iter().any(|range| range.contains_block(block))
}

/// Fewest hops through `0..num_blocks` by breadth-first search over boundaries.
fn fewest_hops(num_blocks: u32, ranges: &[BlockRange]) -> Option<usize> {
    let mut hops = vec![None; num_blocks as usize + 1];
    hops[0] = Some(0);
    let mut queue = VecDeque::from([0]);
    while let Some(boundary) = queue.pop_front() {
        if boundary == num_blocks {
            break;
        }
        for range in ranges.iter().filter(|range| range.contains_block(boundary)) {
            let next = range.end.min(num_blocks);
            if hops[next as usize].is_none() {
                hops[next as usize] = hops[boundary as usize].map(|h| h + 1);
                queue.push_back(next);
            }
        }
    }
    hops[num_blocks as usize]
}

fn binomial(n: u64, k: u64) -> u64 {
    (0..k).fold(1, |acc, i| acc * (n - i) / (i + 1))
}

/// Whether `split` cuts `0..num_blocks` into non-empty spans, each starting where the
/// previous one ends.
fn is_split_of(num_blocks: u32, split: &[BlockRange]) -> bool {
    let mut boundary = 0;
    for span in split {
        if span.start != boundary || span.is_empty() {
            return false;
        }
        boundary = span.end;
    }
    boundary == num_blocks
}

#[test]
fn all_splits_counts_are_binomial() {
    for num_blocks in 1..=10 {
        for parts in 1..=num_blocks {
            let splits = all_splits(num_blocks, parts);
            let want = binomial(u64::from(num_blocks - 1), u64::from(parts - 1));
            assert_eq!(splits.len() as u64, want, "{num_blocks} blocks in {parts}");
            for split in &splits {
                assert_eq!(split.len(), parts as usize, "{split:?}");
                assert!(is_split_of(num_blocks, split), "{split:?}");
            }
            let distinct: BTreeSet<_> = splits.iter().collect();
            assert_eq!(distinct.len(), splits.len());

            let even = even_splits(num_blocks, parts).unwrap();
            assert!(splits.contains(&even), "{even:?}");
        }
    }
}

#[test]
fn every_split_chains_in_order() {
    for num_blocks in 1..=6 {
        for parts in 1..=num_blocks {
            for split in all_splits(num_blocks, parts) {
                let want: Vec<usize> = (0..split.len()).collect();
                assert_eq!(chain(num_blocks, &split), Some(want), "{split:?}");
                assert!(coverage_gaps(num_blocks, &split).is_empty());
            }
        }
    }
}

proptest! {
    #[test]
    fn gaps_and_ranges_cover_every_block_once((num_blocks, ranges) in model_and_ranges()) {
        let gaps = coverage_gaps(num_blocks, &ranges);
        for gap in &gaps {
            prop_assert!(!gap.is_empty() && gap.end <= num_blocks, "{gap}");
        }
        for pair in gaps.windows(2) {
            // Sorted and merged: a covered block separates consecutive gaps.
            prop_assert!(pair[0].end < pair[1].start, "{} then {}", pair[0], pair[1]);
        }
        for block in 0..num_blocks {
            prop_assert_ne!(covered(block, &gaps), covered(block, &ranges), "block {}", block);
        }
    }

    #[test]
    fn chains_are_contiguous_and_cover((num_blocks, ranges) in model_and_ranges()) {
        let Some(hops) = chain(num_blocks, &ranges) else {
            return Ok(());
        };
        let mut boundary = 0;
        for &index in &hops {
            let range = ranges[index];
            prop_assert!(range.contains_block(boundary), "{range} misses {boundary}");
            boundary = range.end.min(num_blocks);
        }
        prop_assert_eq!(boundary, num_blocks);
    }

    #[test]
    fn chain_exists_iff_no_gaps((num_blocks, ranges) in model_and_ranges()) {
        let gaps = coverage_gaps(num_blocks, &ranges);
        prop_assert_eq!(chain(num_blocks, &ranges).is_none(), !gaps.is_empty(), "gaps {:?}", gaps);
    }

    #[test]
    fn chain_takes_fewest_hops((num_blocks, ranges) in model_and_ranges()) {
        let hops = chain(num_blocks, &ranges).map(|hops| hops.len());
        prop_assert_eq!(hops, fewest_hops(num_blocks, &ranges));
    }

    #[test]
    fn even_splits_are_balanced(num_blocks in 1u32..10_000, parts in 1u32..200) {
        let parts = parts.min(num_blocks);
        let split = even_splits(num_blocks, parts).unwrap();
        prop_assert_eq!(split.len(), parts as usize);
        prop_assert!(is_split_of(num_blocks, &split));
        for pair in split.windows(2) {
            let (first, second) = (pair[0].len(), pair[1].len());
            prop_assert!(first == second || first == second + 1, "{:?}", split);
        }
    }

    #[test]
    fn parsing_round_trips(start in 0..u32::MAX, len in 1..u32::MAX) {
        let range = BlockRange::new(start, start.saturating_add(len)).unwrap();
        prop_assert_eq!(range.to_string().parse::<BlockRange>(), Ok(range));
    }
}
