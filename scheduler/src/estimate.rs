//! What routing assumes about servers it has not measured.
//!
//! A client knows some servers well (it pinged them, or ran steps through them)
//! and others only by their announcement, or not at all. Routing needs a number
//! for each: an unknown value counts as the median of the known ones, so a new
//! server neither attracts nor repels traffic, and as a fixed default when
//! nothing is known. [`candidates`] turns what a client knows of each server
//! (a [`ServerEstimate`]) into the [`Candidate`]s that [`plan_route`] costs,
//! with the per-session jitter that spreads clients over equal replicas.
//!
//! [`plan_route`]: crate::plan_route

use std::time::Duration;

use crate::{BlockRange, Candidate};

/// Throughput assumed for servers when none has been measured (by itself
/// or by this node), blocks per second: all unknown servers look alike, so
/// the route then minimises legs and RTT.
pub const UNKNOWN_BLOCKS_PER_S: f64 = 100.0;
/// RTT assumed for a server not yet pinged when no server has been.
pub const UNKNOWN_RTT: Duration = Duration::from_millis(50);

/// How much each server's leg cost is randomly scaled per session (up to
/// 25%): between otherwise equal replicas the choice is random, so clients
/// that plan at the same moment, on the same stale announcements, do not
/// all pick the same one. Only legs are scaled: jittered compute speeds
/// would make splitting a range across replicas look profitable.
pub const ROUTE_JITTER: f64 = 0.25;
/// Load a client adds to a server for each session it has open there
/// itself (known at once, unlike announced load).
pub const OWN_SESSION_LOAD: f64 = 0.1;

/// The most batch capacity a server's announcement is believed for: the
/// most steps a server's pass runs. A larger claim (a server boasting to
/// draw sessions) counts as this.
pub const MAX_BATCH_CAPACITY: f64 = 64.0;

/// How much slower than alone a new session's steps run on a server, as
/// the factor's excess over 1 (the `load` of a [`Candidate`]).
///
/// A server that batches steps its sessions together: with `n` sessions
/// open and a batch capacity `C` (the sessions one pass adds before its
/// time doubles), a pass takes about `1 + n / C` times one session's step.
/// `n` is the larger of the sessions it announces and this client's own
/// there (its announcement may predate them). A server that announces no
/// capacity is costed by its announced load (the share of its session
/// slots in use) plus [`OWN_SESSION_LOAD`] per own session.
pub fn session_load(s: &ServerEstimate) -> f64 {
    if s.batch_capacity > 0.0 {
        let open = f64::from(s.announced_sessions).max(s.own_sessions as f64);
        return open / f64::from(s.batch_capacity).clamp(1.0, MAX_BATCH_CAPACITY);
    }
    f64::from(s.announced_load) + OWN_SESSION_LOAD * s.own_sessions as f64
}

/// The median of `values`, or `None` when there are none.
///
/// `values` is sorted in place (by [`f64::total_cmp`]); of an even number of
/// values the upper of the two middle ones is taken, so the median is always
/// one of the values.
pub fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

/// The [`median`] of `values`, or `default` when there are none.
pub fn median_or(values: impl IntoIterator<Item = f64>, default: f64) -> f64 {
    let mut values: Vec<f64> = values.into_iter().collect();
    median(&mut values).unwrap_or(default)
}

/// `values` with each unknown replaced by the [`median`] of the known ones
/// (`default` when none is known).
pub fn fill_with_median(values: &[Option<f64>], default: f64) -> Vec<f64> {
    let typical = median_or(values.iter().flatten().copied(), default);
    values.iter().map(|v| v.unwrap_or(typical)).collect()
}

/// What a client knows of one server, measured or announced.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerEstimate {
    /// The blocks it announces.
    pub span: BlockRange,
    /// Round-trip time to it as measured by this client, seconds (`None`: not
    /// pinged yet).
    pub rtt_s: Option<f64>,
    /// Seconds per block this client measured through it (`None`: no step yet).
    pub observed_secs_per_block: Option<f64>,
    /// Its announced decode throughput over its whole span, tokens per second
    /// (0 or less: not measured).
    pub announced_throughput: f32,
    /// Its announced load, 0 (idle) ..= 1 (at its session cap).
    pub announced_load: f32,
    /// Sessions it announces open.
    pub announced_sessions: u32,
    /// Sessions it announces it can step in one batched pass before the
    /// pass takes twice one session's step (0 or less: not measured).
    pub batch_capacity: f32,
    /// Sessions this client has open on it.
    pub own_sessions: usize,
    /// KV positions it announces free.
    pub free_kv_tokens: u32,
    /// Whether this client backs off from it after failures.
    pub backed_off: bool,
}

impl ServerEstimate {
    /// An unmeasured, idle server with KV room to spare, holding `span`.
    pub fn new(span: BlockRange) -> Self {
        Self {
            span,
            rtt_s: None,
            observed_secs_per_block: None,
            announced_throughput: 0.0,
            announced_load: 0.0,
            announced_sessions: 0,
            batch_capacity: 0.0,
            own_sessions: 0,
            free_kv_tokens: u32::MAX,
            backed_off: false,
        }
    }

    /// Blocks per second, if known: this client's own measurement wins over
    /// the announcement.
    pub fn known_blocks_per_s(&self) -> Option<f64> {
        let span_len = f64::from(self.span.end.saturating_sub(self.span.start));
        match self.observed_secs_per_block {
            Some(spb) => Some(1.0 / spb.max(1e-6)),
            None if self.announced_throughput > 0.0 => {
                Some(f64::from(self.announced_throughput) * span_len)
            }
            None => None,
        }
    }
}

/// Each server's blocks per second as routing believes it: a measured speed
/// as measured; an announced one no faster than the fastest measured server
/// (or, when none is measured, than the median announcement), so a claim
/// wins no traffic a measurement has not earned; the median of these for
/// the rest.
pub fn claimed_speeds(servers: &[ServerEstimate]) -> Vec<f64> {
    let measured = servers
        .iter()
        .filter(|s| s.observed_secs_per_block.is_some())
        .filter_map(ServerEstimate::known_blocks_per_s)
        .reduce(f64::max);
    let announced: Vec<Option<f64>> = servers
        .iter()
        .map(|s| match s.observed_secs_per_block {
            Some(_) => None,
            None => s.known_blocks_per_s(),
        })
        .collect();
    let cap = measured.unwrap_or_else(|| median_or(announced.iter().flatten().copied(), f64::MAX));
    let speeds: Vec<Option<f64>> = servers
        .iter()
        .zip(&announced)
        .map(|(s, a)| match a {
            Some(a) => Some(a.min(cap)),
            None => s.known_blocks_per_s(),
        })
        .collect();
    fill_with_median(&speeds, UNKNOWN_BLOCKS_PER_S)
}

/// The routing candidates for `servers`, in the same order, for a session of
/// `max_length` positions.
///
/// - RTT: the measured one, else the median of the measured ones, else
///   [`UNKNOWN_RTT`]; scaled by `1 + ROUTE_JITTER * u` with `u` from `jitter`
///   (called once per server, in order; give it uniform values in `[0, 1)`,
///   or `|| 0.0` for none);
/// - blocks per second: [`claimed_speeds`] (measured, or announced and
///   capped), else the median of the known ones, else
///   [`UNKNOWN_BLOCKS_PER_S`];
/// - load: [`session_load`];
/// - KV room: at least `max_length` positions free.
pub fn candidates(
    servers: &[ServerEstimate],
    max_length: u32,
    mut jitter: impl FnMut() -> f64,
) -> Vec<Candidate> {
    let rtts: Vec<Option<f64>> = servers.iter().map(|s| s.rtt_s).collect();
    let rtts = fill_with_median(&rtts, UNKNOWN_RTT.as_secs_f64());
    let speeds = claimed_speeds(servers);
    servers
        .iter()
        .zip(rtts.into_iter().zip(speeds))
        .map(|(s, (rtt_s, blocks_per_s))| Candidate {
            span: s.span,
            blocks_per_s,
            rtt_s: rtt_s * (1.0 + ROUTE_JITTER * jitter()),
            load: session_load(s),
            has_kv_room: s.free_kv_tokens >= max_length,
            backed_off: s.backed_off,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn span(start: u32, end: u32) -> BlockRange {
        BlockRange { start, end }
    }

    #[test]
    fn median_takes_the_upper_middle() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0]), Some(3.0));
        assert_eq!(median(&mut [3.0, 1.0]), Some(3.0));
        assert_eq!(median(&mut [5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(3.0));
        assert_eq!(median_or([], 7.0), 7.0);
        assert_eq!(median_or([2.0, 9.0, 4.0], 7.0), 4.0);
    }

    #[test]
    fn unknowns_become_the_median_of_the_known() {
        assert_eq!(
            fill_with_median(&[Some(1.0), None, Some(5.0), Some(3.0)], 9.0),
            [1.0, 3.0, 5.0, 3.0]
        );
        assert_eq!(fill_with_median(&[None, None], 9.0), [9.0, 9.0]);
        assert!(fill_with_median(&[], 9.0).is_empty());
    }

    #[test]
    fn unmeasured_servers_look_typical() {
        let mut known = ServerEstimate::new(span(0, 4));
        known.rtt_s = Some(0.02);
        known.announced_throughput = 10.0; // 40 blocks/s over four blocks
        let mut measured = ServerEstimate::new(span(4, 8));
        measured.rtt_s = Some(0.04);
        measured.observed_secs_per_block = Some(0.01); // wins over the announcement
        measured.announced_throughput = 1.0;
        let unknown = ServerEstimate::new(span(0, 8));
        let c = candidates(&[known, measured, unknown], 64, || 0.0);
        let rtts: Vec<f64> = c.iter().map(|c| c.rtt_s).collect();
        let speeds: Vec<f64> = c.iter().map(|c| c.blocks_per_s).collect();
        assert_eq!(rtts, [0.02, 0.04, 0.04]);
        assert_eq!(speeds, [40.0, 100.0, 100.0]);

        let alone = candidates(&[ServerEstimate::new(span(0, 8))], 64, || 0.0);
        assert_eq!(alone[0].rtt_s, UNKNOWN_RTT.as_secs_f64());
        assert_eq!(alone[0].blocks_per_s, UNKNOWN_BLOCKS_PER_S);
    }

    #[test]
    fn a_claim_is_worth_no_more_than_the_fastest_measurement() {
        let mut measured = ServerEstimate::new(span(0, 8));
        measured.observed_secs_per_block = Some(0.01); // 100 blocks/s
        let mut liar = ServerEstimate::new(span(0, 8));
        liar.announced_throughput = 1e6; // 8e6 blocks/s claimed
        let mut modest = ServerEstimate::new(span(0, 8));
        modest.announced_throughput = 5.0; // 40 blocks/s claimed
        assert_eq!(
            claimed_speeds(&[measured.clone(), liar.clone(), modest.clone()]),
            [100.0, 100.0, 40.0]
        );
        // Nothing measured: no claim beats the median claim.
        let mut honest = modest.clone();
        honest.announced_throughput = 6.0;
        assert_eq!(claimed_speeds(&[liar, modest, honest]), [48.0, 40.0, 48.0]);
    }

    #[test]
    fn load_kv_room_and_backoff() {
        let mut s = ServerEstimate::new(span(0, 8));
        s.announced_load = 0.5;
        s.own_sessions = 3;
        s.free_kv_tokens = 100;
        s.backed_off = true;
        let c = &candidates(&[s.clone()], 100, || 0.0)[0];
        assert!((c.load - 0.8).abs() < 1e-9);
        assert!(c.has_kv_room);
        assert!(c.backed_off);
        assert!(!candidates(&[s], 101, || 0.0)[0].has_kv_room);
    }

    /// With a batch capacity, a busy server that batches well costs less
    /// than a quieter one that does not.
    #[test]
    fn batch_capacity_scales_the_load_by_sessions() {
        let mut batching = ServerEstimate::new(span(0, 8));
        batching.announced_sessions = 4;
        batching.announced_load = 0.5;
        batching.batch_capacity = 8.0;
        let mut serial = batching.clone();
        serial.announced_sessions = 2;
        serial.announced_load = 0.25;
        serial.batch_capacity = 1.0;
        assert!((session_load(&batching) - 0.5).abs() < 1e-9);
        assert!((session_load(&serial) - 2.0).abs() < 1e-9);
        // This client's own sessions count when the announcement lags.
        batching.own_sessions = 6;
        assert!((session_load(&batching) - 0.75).abs() < 1e-9);
        // A capacity below one session counts as one, a boast above the
        // most steps a pass runs as that.
        serial.batch_capacity = 0.25;
        assert!((session_load(&serial) - 2.0).abs() < 1e-9);
        serial.batch_capacity = 1e9;
        assert!((session_load(&serial) - 2.0 / MAX_BATCH_CAPACITY).abs() < 1e-9);
        serial.batch_capacity = 0.25;
        // No capacity announced: the share of session slots, as before.
        serial.batch_capacity = 0.0;
        assert!((session_load(&serial) - 0.25).abs() < 1e-9);
        let c = candidates(&[batching, serial], 1, || 0.0);
        assert!((c[0].load - 0.75).abs() < 1e-9 && (c[1].load - 0.25).abs() < 1e-9);
    }

    #[test]
    fn jitter_scales_legs_only_and_in_order() {
        let mut servers = vec![ServerEstimate::new(span(0, 8)); 3];
        for s in &mut servers {
            s.rtt_s = Some(0.1);
        }
        let mut u = [0.0, 0.5, 1.0].into_iter();
        let c = candidates(&servers, 1, || u.next().unwrap());
        let rtts: Vec<f64> = c.iter().map(|c| c.rtt_s).collect();
        assert_eq!(rtts, [0.1, 0.1 * 1.125, 0.1 * 1.25]);
        assert!(c.iter().all(|c| c.blocks_per_s == UNKNOWN_BLOCKS_PER_S));
    }

    proptest! {
        #[test]
        fn median_is_a_middle_value(mut values in proptest::collection::vec(-1e6f64..1e6, 1..40)) {
            let m = median(&mut values).unwrap();
            let below = values.iter().filter(|&&v| v < m).count();
            let above = values.iter().filter(|&&v| v > m).count();
            prop_assert!(below <= values.len() / 2);
            prop_assert!(above <= values.len().div_ceil(2));
            prop_assert!(values.contains(&m));
        }

        #[test]
        fn jittered_legs_stay_within_bounds(
            rtts in proptest::collection::vec(proptest::option::of(0.0f64..1.0), 1..10),
            u in 0.0f64..1.0,
        ) {
            let servers: Vec<ServerEstimate> = rtts
                .iter()
                .map(|&rtt_s| ServerEstimate { rtt_s, ..ServerEstimate::new(span(0, 4)) })
                .collect();
            let plain = candidates(&servers, 1, || 0.0);
            let jittered = candidates(&servers, 1, || u);
            for (p, j) in plain.iter().zip(&jittered) {
                prop_assert!(j.rtt_s >= p.rtt_s);
                prop_assert!(j.rtt_s <= p.rtt_s * (1.0 + ROUTE_JITTER) + 1e-12);
                prop_assert_eq!(j.blocks_per_s, p.blocks_per_s);
            }
        }
    }
}
