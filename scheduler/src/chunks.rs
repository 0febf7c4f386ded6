//! The chunk queue of a fetch from many peers.
//!
//! A node fetching a model's weights asks several peers at once, each for the
//! chunks it holds. The queue decides which chunks a peer is asked for next and
//! books what comes back:
//!
//! - a peer takes only chunks it holds and has not failed, rarest first, so
//!   chunks several peers hold stay for whichever of them is free;
//! - a chunk that comes back unfetched is queued again, for another peer when
//!   this one was at fault, until it has been tried too often;
//! - a peer is banned after too many faults, and then gets nothing;
//! - a fatal error (the disk is full) stops the whole fetch.
//!
//! The queue performs no I/O and keeps no clock: the caller runs the requests,
//! keeps its own report (bytes, times, reasons) and holds the queue behind
//! whatever lock its workers share.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

/// Which chunks one call of [`ChunkQueue::take`] hands a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Take {
    /// These chunks, now in flight; never empty.
    Chunks(Vec<usize>),
    /// Nothing for this peer now, but chunks in flight may come back.
    Wait,
    /// Nothing for this peer ever again: it is banned, the fetch stopped, or
    /// nothing it could serve is left.
    Finished,
}

/// How a chunk that came back unfetched was booked ([`ChunkQueue::requeue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requeued {
    /// Back at the end of the queue.
    Queued,
    /// Tried too often: given up.
    GaveUp,
}

/// A fault booked against a peer ([`ChunkQueue::penalise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Penalty {
    /// The peer's faults so far, this one included.
    pub faults: u32,
    /// Whether this fault banned it (false when it already was).
    pub banned: bool,
}

/// The chunks `0..len` of a fetch: queued, in flight, delivered or given up,
/// and the peers that may serve them. `P` identifies a peer.
#[derive(Debug, Clone)]
pub struct ChunkQueue<P> {
    /// Chunks each peer holds.
    holds: HashMap<P, HashSet<usize>>,
    /// How many peers hold each chunk.
    holders: Vec<usize>,
    queue: VecDeque<usize>,
    in_flight: usize,
    attempts: Vec<u32>,
    /// Peers that failed each chunk, or said they lack it.
    excluded: Vec<HashSet<P>>,
    faults: HashMap<P, u32>,
    banned: Vec<P>,
    per_peer: HashMap<P, usize>,
    requested: usize,
    delivered: usize,
    gave_up: usize,
    halted: bool,
    max_attempts: u32,
    max_faults: u32,
}

impl<P: Clone + Eq + Hash + Ord> ChunkQueue<P> {
    /// A queue of chunks `0..len`, all queued in order, served by `holds`
    /// (each peer with the chunks it holds; indices from `len` on are
    /// ignored). A chunk is given up after `max_attempts` failed tries, a peer
    /// banned after `max_faults` faults.
    pub fn new<C: IntoIterator<Item = usize>>(
        len: usize,
        holds: impl IntoIterator<Item = (P, C)>,
        max_attempts: u32,
        max_faults: u32,
    ) -> Self {
        let mut holders = vec![0; len];
        let mut by_peer: HashMap<P, HashSet<usize>> = HashMap::new();
        for (peer, chunks) in holds {
            by_peer
                .entry(peer)
                .or_default()
                .extend(chunks.into_iter().filter(|&i| i < len));
        }
        for chunks in by_peer.values() {
            for &i in chunks {
                holders[i] += 1;
            }
        }
        Self {
            holds: by_peer,
            holders,
            queue: (0..len).collect(),
            in_flight: 0,
            attempts: vec![0; len],
            excluded: vec![HashSet::new(); len],
            faults: HashMap::new(),
            banned: Vec::new(),
            per_peer: HashMap::new(),
            requested: 0,
            delivered: 0,
            gave_up: 0,
            halted: false,
            max_attempts,
            max_faults,
        }
    }

    /// Whether `peer` may be asked for `chunk`: it holds it and has neither
    /// failed it nor said it lacks it.
    pub fn can_serve(&self, peer: &P, chunk: usize) -> bool {
        self.holds.get(peer).is_some_and(|h| h.contains(&chunk))
            && !self.excluded.get(chunk).is_some_and(|e| e.contains(peer))
    }

    /// Up to `max` queued chunks `peer` can serve, rarest first (queue order
    /// among equally rare ones), taken off the queue and counted in flight
    /// and requested.
    pub fn take(&mut self, peer: &P, max: usize) -> Take {
        if self.halted || self.banned.contains(peer) {
            return Take::Finished;
        }
        let mut mine: Vec<usize> = self
            .queue
            .iter()
            .copied()
            .filter(|&i| self.can_serve(peer, i))
            .collect();
        // Stable: queue order among chunks of equal rarity.
        mine.sort_by_key(|&i| self.holders[i]);
        mine.truncate(max);
        if mine.is_empty() {
            return if self.in_flight > 0 {
                Take::Wait
            } else {
                Take::Finished
            };
        }
        let taken: HashSet<usize> = mine.iter().copied().collect();
        self.queue.retain(|i| !taken.contains(i));
        self.in_flight += mine.len();
        self.requested += mine.len();
        Take::Chunks(mine)
    }

    /// Chunk `chunk`, in flight, came back unfetched: it counts as a try and
    /// goes back to the end of the queue, unless it has been tried
    /// `max_attempts` times. `fault` names a peer that failed it, which is
    /// never asked for it again (penalise the peer with [`penalise`](Self::penalise)).
    pub fn requeue(&mut self, chunk: usize, fault: Option<&P>) -> Requeued {
        self.in_flight -= 1;
        self.attempts[chunk] += 1;
        if let Some(peer) = fault {
            self.excluded[chunk].insert(peer.clone());
        }
        if self.attempts[chunk] >= self.max_attempts {
            self.gave_up += 1;
            Requeued::GaveUp
        } else {
            self.queue.push_back(chunk);
            Requeued::Queued
        }
    }

    /// `peer` said it lacks `chunk`, in flight: not a fault and not a try; it
    /// goes back to the end of the queue for the other peers.
    pub fn lacks(&mut self, peer: &P, chunk: usize) {
        self.excluded[chunk].insert(peer.clone());
        self.in_flight -= 1;
        self.queue.push_back(chunk);
    }

    /// `peer` refused a request for `chunks`, in flight: they go back to the
    /// end of the queue as if never taken (no try, not requested).
    pub fn refused(&mut self, chunks: &[usize]) {
        self.in_flight -= chunks.len();
        self.requested -= chunks.len();
        self.queue.extend(chunks.iter().copied());
    }

    /// Books a fault against `peer`, banning it at `max_faults` faults.
    pub fn penalise(&mut self, peer: &P) -> Penalty {
        let faults = self.faults.entry(peer.clone()).or_default();
        *faults += 1;
        let faults = *faults;
        let banned = faults >= self.max_faults && !self.banned.contains(peer);
        if banned {
            self.banned.push(peer.clone());
        }
        Penalty { faults, banned }
    }

    /// A chunk in flight from `peer` arrived and was stored.
    pub fn done(&mut self, peer: &P) {
        self.in_flight -= 1;
        self.delivered += 1;
        *self.per_peer.entry(peer.clone()).or_default() += 1;
    }

    /// A chunk in flight failed in a way nothing else will mend (the disk is
    /// full): it leaves flight and no peer gets anything more.
    pub fn halt(&mut self) {
        self.in_flight -= 1;
        self.halted = true;
    }

    /// Whether [`halt`](Self::halt) stopped the fetch.
    pub fn is_halted(&self) -> bool {
        self.halted
    }

    /// Whether nothing is queued or in flight (every chunk delivered or given
    /// up), or the fetch is halted with nothing in flight.
    pub fn is_finished(&self) -> bool {
        self.in_flight == 0 && (self.queue.is_empty() || self.halted)
    }

    /// Chunks waiting in the queue.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Chunks taken and not yet booked.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Chunks taken so far, less those refused.
    pub fn requested(&self) -> usize {
        self.requested
    }

    /// Chunks delivered.
    pub fn delivered(&self) -> usize {
        self.delivered
    }

    /// Chunks given up after `max_attempts` tries.
    pub fn gave_up(&self) -> usize {
        self.gave_up
    }

    /// Failed tries of `chunk` so far.
    pub fn attempts(&self, chunk: usize) -> u32 {
        self.attempts[chunk]
    }

    /// How many peers hold `chunk`.
    pub fn holders(&self, chunk: usize) -> usize {
        self.holders[chunk]
    }

    /// The peers the queue knows, each holding at least one chunk or none.
    pub fn peers(&self) -> impl Iterator<Item = &P> {
        self.holds.keys()
    }

    /// Faults booked against `peer`.
    pub fn faults(&self, peer: &P) -> u32 {
        self.faults.get(peer).copied().unwrap_or(0)
    }

    /// Whether `peer` is banned.
    pub fn is_banned(&self, peer: &P) -> bool {
        self.banned.contains(peer)
    }

    /// The banned peers, in the order they were banned.
    pub fn banned(&self) -> &[P] {
        &self.banned
    }

    /// Chunks each peer delivered, by peer (peers that delivered none left out).
    pub fn per_peer(&self) -> Vec<(P, usize)> {
        let mut all: Vec<(P, usize)> = self.per_peer.iter().map(|(p, n)| (p.clone(), *n)).collect();
        all.sort();
        all
    }
}
