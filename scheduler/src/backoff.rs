//! Exponential backoff of failed peers, sans-IO: time is a parameter.
//!
//! A peer that fails (timeout, disconnect, error frame) is not routed to
//! until `now + base * 2^(failures - 1)` (capped, with up to 25% jitter drawn
//! from a caller-supplied value so tests stay deterministic). A success
//! resets it.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

/// First backoff after a failure.
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest backoff.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    until: Duration,
}

/// Backoff state per peer. `now` is any monotonic clock reading, as a
/// duration since an arbitrary origin.
#[derive(Debug, Clone)]
pub struct Backoff<P> {
    base: Duration,
    max: Duration,
    peers: HashMap<P, Entry>,
}

impl<P: Eq + Hash + Clone> Default for Backoff<P> {
    fn default() -> Self {
        Self::new(DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX)
    }
}

impl<P: Eq + Hash + Clone> Backoff<P> {
    /// Backoff starting at `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max,
            peers: HashMap::new(),
        }
    }

    /// Records a failure at `now`; `jitter` in `0..1` lengthens the wait by
    /// up to 25%. Returns when the peer may be used again.
    pub fn failed(&mut self, peer: P, now: Duration, jitter: f64) -> Duration {
        let e = self.peers.entry(peer).or_insert(Entry {
            failures: 0,
            until: now,
        });
        e.failures = e.failures.saturating_add(1);
        let exp = self
            .base
            .saturating_mul(1u32 << (e.failures - 1).min(20))
            .min(self.max);
        let wait = exp.mul_f64(1.0 + 0.25 * jitter.clamp(0.0, 1.0));
        e.until = now + wait;
        e.until
    }

    /// Records a success: the peer's failures are forgotten.
    pub fn succeeded(&mut self, peer: &P) {
        self.peers.remove(peer);
    }

    /// Whether `peer` must not be used at `now`.
    pub fn is_backed_off(&self, peer: &P, now: Duration) -> bool {
        self.peers.get(peer).is_some_and(|e| now < e.until)
    }

    /// Consecutive failures of `peer`.
    pub fn failures(&self, peer: &P) -> u32 {
        self.peers.get(peer).map_or(0, |e| e.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn waits_double_up_to_the_cap_and_reset_on_success() {
        let mut b = Backoff::new(S(1), S(10));
        let mut now = S(100);
        let mut waits = Vec::new();
        for _ in 0..6 {
            let until = b.failed("p", now, 0.0);
            waits.push((until - now).as_secs());
            assert!(b.is_backed_off(&"p", now));
            assert!(!b.is_backed_off(&"p", until));
            now = until;
        }
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert!(!b.is_backed_off(&"q", now));
        b.succeeded(&"p");
        assert_eq!(b.failures(&"p"), 0);
        assert_eq!(b.failed("p", now, 0.0) - now, S(1));
    }

    #[test]
    fn jitter_lengthens_by_at_most_a_quarter() {
        let mut b = Backoff::new(S(4), S(100));
        let until = b.failed(1u8, S(0), 1.0);
        assert_eq!(until, S(5));
        let mut c = Backoff::new(S(4), S(100));
        assert_eq!(c.failed(1u8, S(0), 7.0), S(5), "jitter is clamped");
    }
}
