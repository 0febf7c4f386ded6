//! The chunk queue of a many-peer fetch: who gets which chunk, and what
//! happens to chunks that come back unfetched.

use std::collections::{BTreeMap, BTreeSet};

use nomoat_scheduler::{ChunkQueue, Penalty, Requeued, Take};
use proptest::prelude::*;

/// A queue over `len` chunks where peer `p` holds `holds[p]`.
fn queue(len: usize, holds: &[&[usize]], max_attempts: u32, max_faults: u32) -> ChunkQueue<u8> {
    ChunkQueue::new(
        len,
        holds
            .iter()
            .enumerate()
            .map(|(p, chunks)| (p as u8, chunks.to_vec())),
        max_attempts,
        max_faults,
    )
}

fn chunks(take: Take) -> Vec<usize> {
    match take {
        Take::Chunks(c) => c,
        other => panic!("expected chunks, got {other:?}"),
    }
}

#[test]
fn rarest_chunks_go_first_in_queue_order() {
    // Chunk 3 only peer 0 holds, chunks 1 and 4 two peers, the rest all three.
    let mut q = queue(
        6,
        &[&[0, 1, 2, 3, 4, 5], &[0, 1, 2, 4, 5], &[0, 2, 5]],
        8,
        3,
    );
    assert_eq!(
        (0..6).map(|i| q.holders(i)).collect::<Vec<_>>(),
        [3, 2, 3, 1, 2, 3]
    );
    assert_eq!(chunks(q.take(&0, 3)), [3, 1, 4]);
    assert_eq!(chunks(q.take(&0, 10)), [0, 2, 5]);
    assert_eq!((q.queued(), q.in_flight(), q.requested()), (0, 6, 6));
}

#[test]
fn a_peer_never_gets_a_chunk_it_lacks() {
    let mut q = queue(6, &[&[1, 3], &[0, 2, 4, 5]], 8, 3);
    assert_eq!(chunks(q.take(&0, 10)), [1, 3]);
    // Nothing else for peer 0, but its chunks may come back.
    assert_eq!(q.take(&0, 10), Take::Wait);
    assert_eq!(chunks(q.take(&1, 10)), [0, 2, 4, 5]);
    // A peer the queue does not know holds nothing.
    assert_eq!(q.take(&9, 10), Take::Wait);
    for _ in 0..2 {
        q.done(&0);
    }
    for _ in 0..4 {
        q.done(&1);
    }
    assert_eq!(q.take(&0, 10), Take::Finished);
    assert!(q.is_finished());
    assert_eq!(q.per_peer(), [(0, 2), (1, 4)]);
}

#[test]
fn a_chunk_a_peer_failed_goes_to_another() {
    let mut q = queue(2, &[&[0, 1], &[0, 1]], 8, 3);
    assert_eq!(chunks(q.take(&0, 1)), [0]);
    assert_eq!(q.requeue(0, Some(&0)), Requeued::Queued);
    assert_eq!(q.attempts(0), 1);
    assert!(!q.can_serve(&0, 0));
    // Peer 0 gets chunk 1 only; chunk 0 waits for peer 1, at the queue's end.
    assert_eq!(chunks(q.take(&0, 10)), [1]);
    assert_eq!(chunks(q.take(&1, 10)), [0]);
}

#[test]
fn a_peer_that_lacks_a_chunk_is_not_asked_again_and_no_try_is_counted() {
    let mut q = queue(1, &[&[0], &[0]], 1, 3);
    assert_eq!(chunks(q.take(&0, 1)), [0]);
    q.lacks(&0, 0);
    assert_eq!(q.attempts(0), 0);
    assert_eq!(q.take(&0, 1), Take::Finished);
    assert_eq!(chunks(q.take(&1, 1)), [0]);
}

#[test]
fn a_refused_request_returns_its_chunks_untouched() {
    let mut q = queue(3, &[&[0, 1, 2]], 8, 3);
    assert_eq!(chunks(q.take(&0, 2)), [0, 1]);
    q.refused(&[0, 1]);
    assert_eq!((q.in_flight(), q.requested(), q.attempts(0)), (0, 0, 0));
    // Back at the end of the queue.
    assert_eq!(chunks(q.take(&0, 3)), [2, 0, 1]);
}

#[test]
fn a_chunk_is_given_up_after_its_tries() {
    let mut q = queue(1, &[&[0]], 3, 100);
    for _ in 0..2 {
        assert_eq!(chunks(q.take(&0, 1)), [0]);
        assert_eq!(q.requeue(0, None), Requeued::Queued);
    }
    assert_eq!(chunks(q.take(&0, 1)), [0]);
    assert_eq!(q.requeue(0, None), Requeued::GaveUp);
    assert_eq!(q.gave_up(), 1);
    assert_eq!(q.take(&0, 1), Take::Finished);
    assert!(q.is_finished());
}

#[test]
fn a_banned_peer_gets_nothing() {
    let mut q = queue(4, &[&[0, 1, 2, 3], &[0, 1, 2, 3]], 8, 2);
    assert_eq!(
        q.penalise(&0),
        Penalty {
            faults: 1,
            banned: false
        }
    );
    assert_eq!(
        q.penalise(&0),
        Penalty {
            faults: 2,
            banned: true
        }
    );
    // Banned once: later faults are counted but ban no more.
    assert_eq!(
        q.penalise(&0),
        Penalty {
            faults: 3,
            banned: false
        }
    );
    assert!(q.is_banned(&0));
    assert_eq!(q.banned(), [0]);
    assert_eq!(q.take(&0, 10), Take::Finished);
    assert_eq!(chunks(q.take(&1, 10)), [0, 1, 2, 3]);
}

#[test]
fn a_halted_fetch_hands_out_nothing() {
    let mut q = queue(4, &[&[0, 1, 2, 3], &[0, 1, 2, 3]], 8, 2);
    assert_eq!(chunks(q.take(&0, 1)), [0]);
    q.halt();
    assert!(q.is_halted() && q.is_finished());
    assert_eq!(q.take(&1, 10), Take::Finished);
}

/// What the simulated peer does with one chunk in flight.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Done,
    Fault,
    Lacks,
    Refused,
    Retry,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => Just(Outcome::Done),
        1 => Just(Outcome::Fault),
        1 => Just(Outcome::Lacks),
        1 => Just(Outcome::Refused),
        1 => Just(Outcome::Retry),
    ]
}

proptest! {
    /// Peers take batches and the answers come back in any order and any
    /// way; at every step each chunk is in exactly one place, and in the end
    /// every chunk is delivered exactly once unless it was given up or no
    /// peer that may serve it is left.
    #[test]
    fn every_chunk_is_delivered_once_and_in_flight_is_bounded(
        len in 1usize..24,
        holds in proptest::collection::vec(proptest::collection::btree_set(0usize..24, 0..24), 1..5),
        max in 1usize..6,
        steps in proptest::collection::vec((any::<bool>(), any::<prop::sample::Index>(), outcome()), 0..200),
    ) {
        let peers = holds.len() as u8;
        let mut q = ChunkQueue::new(len, holds.iter().enumerate().map(|(p, c)| (p as u8, c.clone())), 3, 3);
        let mut flying: BTreeMap<usize, u8> = BTreeMap::new();
        let mut delivered: BTreeSet<usize> = BTreeSet::new();
        let mut gave_up: BTreeSet<usize> = BTreeSet::new();
        let check = |q: &mut ChunkQueue<u8>, flying: &BTreeMap<usize, u8>, delivered: &BTreeSet<usize>, gave_up: &BTreeSet<usize>| {
            prop_assert_eq!(q.queued() + q.in_flight() + q.delivered() + q.gave_up(), len);
            prop_assert_eq!(q.in_flight(), flying.len());
            prop_assert_eq!(q.delivered(), delivered.len());
            prop_assert_eq!(q.gave_up(), gave_up.len());
            Ok(())
        };
        let take = |q: &mut ChunkQueue<u8>, peer: u8, flying: &mut BTreeMap<usize, u8>, delivered: &BTreeSet<usize>| -> Result<bool, TestCaseError> {
            match q.take(&peer, max) {
                Take::Chunks(got) => {
                    prop_assert!(!got.is_empty() && got.len() <= max);
                    prop_assert!(!q.is_banned(&peer));
                    for &i in &got {
                        prop_assert!(holds[peer as usize].contains(&i), "peer {} lacks {}", peer, i);
                        prop_assert!(!delivered.contains(&i), "chunk {} again", i);
                        prop_assert!(flying.insert(i, peer).is_none(), "chunk {} twice in flight", i);
                    }
                    Ok(true)
                }
                Take::Wait => { prop_assert!(!flying.is_empty()); Ok(false) }
                Take::Finished => Ok(false),
            }
        };
        let resolve = |q: &mut ChunkQueue<u8>, i: usize, peer: u8, how: Outcome, delivered: &mut BTreeSet<usize>, gave_up: &mut BTreeSet<usize>| {
            match how {
                Outcome::Done => { q.done(&peer); delivered.insert(i); }
                Outcome::Fault => {
                    if q.requeue(i, Some(&peer)) == Requeued::GaveUp { gave_up.insert(i); }
                    q.penalise(&peer);
                }
                Outcome::Lacks => q.lacks(&peer, i),
                Outcome::Refused => q.refused(&[i]),
                Outcome::Retry => if q.requeue(i, None) == Requeued::GaveUp { gave_up.insert(i); },
            }
        };
        for (is_take, pick, how) in steps {
            if is_take || flying.is_empty() {
                take(&mut q, pick.index(peers as usize) as u8, &mut flying, &delivered)?;
            } else {
                let i = *flying.keys().nth(pick.index(flying.len())).unwrap();
                let peer = flying.remove(&i).unwrap();
                resolve(&mut q, i, peer, how, &mut delivered, &mut gave_up);
            }
            check(&mut q, &flying, &delivered, &gave_up)?;
        }
        // Drain: from now on every request succeeds.
        let mut rounds = 0;
        loop {
            rounds += 1;
            prop_assert!(rounds < 10 * len + 10, "the fetch does not end");
            for (i, peer) in std::mem::take(&mut flying) {
                resolve(&mut q, i, peer, Outcome::Done, &mut delivered, &mut gave_up);
            }
            let mut any = false;
            for peer in 0..peers {
                any |= take(&mut q, peer, &mut flying, &delivered)?;
            }
            check(&mut q, &flying, &delivered, &gave_up)?;
            if !any && flying.is_empty() { break; }
        }
        prop_assert!(q.is_finished() || q.queued() > 0);
        for i in 0..len {
            let left = !delivered.contains(&i) && !gave_up.contains(&i);
            if left {
                // Still queued: no peer left may serve it.
                prop_assert!((0..peers).all(|p| q.is_banned(&p) || !q.can_serve(&p, i)), "chunk {} stranded", i);
            }
            prop_assert!(!(delivered.contains(&i) && gave_up.contains(&i)));
        }
    }
}
