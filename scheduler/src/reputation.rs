//! What a node has learnt of each peer's honesty from the spot checks it
//! ran, and how often it checks each peer next.
//!
//! The rules, so that a record cannot saturate:
//!
//! - a peer nothing is known of is checked every time (its probation);
//! - each passed check lowers its check rate a little, as
//!   `probation / (probation + passed)`, but never below `floor`, however
//!   long the record: a liar that waits for trust is still checked;
//! - an unresolved disagreement (a check two parties disagree on that no
//!   third could settle) is a strike: all credit is lost at once, so one
//!   strike outweighs any number of passed checks;
//! - a proven lie (two independent recomputations agree against the
//!   peer's output) bans the peer for good.
//!
//! Only this node's own checks count: what others say of a peer changes
//! nothing until this node has checked it for itself.

use std::collections::HashMap;
use std::hash::Hash;

/// Checks of a new peer before its rate begins to fall.
pub const DEFAULT_PROBATION: u32 = 4;
/// The lowest check rate of any peer.
pub const DEFAULT_CHECK_FLOOR: f64 = 0.25;
/// Peers a node keeps records of; past this the least informative
/// (fewest checks, never banned) are forgotten.
pub const MAX_RECORDS: usize = 4096;

/// One peer's record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Record {
    /// Checks passed since the last strike.
    pub passed: u32,
    /// Unresolved disagreements so far.
    pub strikes: u32,
    /// Proven to have lied.
    pub banned: bool,
}

/// Per-peer records and the check rates they give.
#[derive(Debug, Clone)]
pub struct Reputation<K> {
    records: HashMap<K, Record>,
    probation: u32,
    floor: f64,
}

impl<K: Hash + Eq + Clone> Default for Reputation<K> {
    fn default() -> Self {
        Self::new(DEFAULT_PROBATION, DEFAULT_CHECK_FLOOR)
    }
}

impl<K: Hash + Eq + Clone> Reputation<K> {
    /// Records with `probation` checks at full rate and a rate `floor`
    /// (clamped to `0..=1`).
    pub fn new(probation: u32, floor: f64) -> Self {
        Self {
            records: HashMap::new(),
            probation: probation.max(1),
            floor: floor.clamp(0.0, 1.0),
        }
    }

    /// The record of `peer` (empty when nothing is known).
    pub fn record(&self, peer: &K) -> Record {
        self.records.get(peer).copied().unwrap_or_default()
    }

    /// The share of `peer`'s work to check: 1 on probation, falling with
    /// passed checks to the floor, never below it.
    pub fn check_rate(&self, peer: &K) -> f64 {
        let r = self.record(peer);
        let p = f64::from(self.probation);
        (p / (p + f64::from(r.passed))).clamp(self.floor, 1.0)
    }

    /// Whether to check `peer` this time, for `u` uniform in `[0, 1)`.
    pub fn should_check(&self, peer: &K, u: f64) -> bool {
        u < self.check_rate(peer)
    }

    /// A check of `peer` passed.
    pub fn passed(&mut self, peer: &K) {
        let r = self.entry(peer);
        r.passed = r.passed.saturating_add(1);
    }

    /// `peer` was party to a disagreement no third party could settle.
    pub fn strike(&mut self, peer: &K) {
        let r = self.entry(peer);
        r.passed = 0;
        r.strikes = r.strikes.saturating_add(1);
    }

    /// `peer` was proven to lie: banned for good.
    pub fn ban(&mut self, peer: &K) {
        let r = self.entry(peer);
        r.passed = 0;
        r.banned = true;
    }

    /// Whether `peer` is banned.
    pub fn is_banned(&self, peer: &K) -> bool {
        self.record(peer).banned
    }

    /// The banned peers.
    pub fn banned(&self) -> impl Iterator<Item = &K> {
        self.records
            .iter()
            .filter(|(_, r)| r.banned)
            .map(|(k, _)| k)
    }

    fn entry(&mut self, peer: &K) -> &mut Record {
        if !self.records.contains_key(peer) && self.records.len() >= MAX_RECORDS {
            let forget = self
                .records
                .iter()
                .filter(|(_, r)| !r.banned)
                .min_by_key(|(_, r)| (r.strikes, r.passed))
                .map(|(k, _)| k.clone());
            match forget {
                Some(k) => {
                    self.records.remove(&k);
                }
                // Every record is a ban: the oldest are as good as any.
                None => {
                    let k = self.records.keys().next().cloned();
                    if let Some(k) = k {
                        self.records.remove(&k);
                    }
                }
            }
        }
        self.records.entry(peer.clone()).or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_peers_are_always_checked_and_trust_never_reaches_zero() {
        let mut r = Reputation::new(4, 0.25);
        assert_eq!(r.check_rate(&1), 1.0);
        for _ in 0..4 {
            r.passed(&1);
        }
        assert_eq!(r.check_rate(&1), 0.5);
        for _ in 0..1_000_000 {
            r.passed(&1);
        }
        assert_eq!(r.check_rate(&1), 0.25);
        assert!(r.should_check(&1, 0.24) && !r.should_check(&1, 0.25));
    }

    #[test]
    fn one_strike_outweighs_any_record_and_a_lie_bans() {
        let mut r = Reputation::new(4, 0.1);
        for _ in 0..10_000 {
            r.passed(&1);
        }
        r.strike(&1);
        assert_eq!(r.check_rate(&1), 1.0);
        assert_eq!(r.record(&1).strikes, 1);
        assert!(!r.is_banned(&1));
        r.ban(&2);
        assert!(r.is_banned(&2));
        assert_eq!(r.banned().collect::<Vec<_>>(), [&2]);
    }

    #[test]
    fn records_are_bounded_and_bans_outlast_the_rest() {
        let mut r = Reputation::default();
        r.ban(&0usize);
        for k in 1..MAX_RECORDS + 100 {
            r.passed(&k);
        }
        assert!(r.records.len() <= MAX_RECORDS);
        assert!(r.is_banned(&0));
    }

    proptest! {
        #[test]
        fn the_rate_stays_within_floor_and_one(
            events in proptest::collection::vec(0u8..3, 0..200),
            floor in 0.0f64..1.0,
        ) {
            let mut r = Reputation::new(4, floor);
            for e in events {
                match e {
                    0 => r.passed(&7),
                    1 => r.strike(&7),
                    _ => r.passed(&8),
                }
                let rate = r.check_rate(&7);
                prop_assert!(rate >= floor && rate <= 1.0);
            }
        }
    }
}
