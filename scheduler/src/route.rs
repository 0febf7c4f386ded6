//! Cheapest routes over block boundaries.
//!
//! A route carries one token through blocks `0..num_blocks`: a sequence of
//! hops, each a server running a sub-range of the span it holds. The cost of
//! a route is its expected per-token latency:
//!
//! - a leg into each hop (`rtt / 2`, measured; the previous hop pushes to it).
//!   The leg from the last hop back to the client is left out: every route
//!   has exactly one, and charging it by the last server's RTT to the client
//!   (a noisy proxy) would reward ending a route on whichever replica
//!   happens to measure nearest, splitting ranges for nothing;
//! - compute: blocks run / the server's throughput (blocks per second),
//!   scaled by `1 + load` (how much slower than alone a session's steps
//!   run there: [`session_load`](crate::session_load));
//! - a fixed penalty on a server without room in its KV cache.
//!
//! Backed-off servers are never used. The search is a dynamic programme over
//! boundaries: being "inside" server `s` at boundary `i` either continues in
//! `s` (no new leg) or enters `s` after the best arrival at `i` (one leg), so
//! it costs `O(sum of span lengths)`, not a pass per sub-range.

use crate::BlockRange;

/// Extra cost (seconds) of a server that lacks KV room for the session.
pub const NO_KV_PENALTY_S: f64 = 1.0;

/// What routing needs to know about one server.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The blocks it holds.
    pub span: BlockRange,
    /// Blocks it computes per second for one token.
    pub blocks_per_s: f64,
    /// Measured round-trip time to it, seconds.
    pub rtt_s: f64,
    /// Load: how much slower than alone a session's steps run there, as
    /// the excess over 1 (0: idle).
    pub load: f64,
    /// Whether it has KV room for the session.
    pub has_kv_room: bool,
    /// Whether it is backed off after failures (never routed to).
    pub backed_off: bool,
}

impl Candidate {
    fn usable(&self) -> bool {
        !self.backed_off && self.blocks_per_s > 0.0 && self.span.start < self.span.end
    }

    fn leg(&self) -> f64 {
        self.rtt_s.max(0.0) / 2.0
            + if self.has_kv_room {
                0.0
            } else {
                NO_KV_PENALTY_S
            }
    }

    fn per_block(&self) -> f64 {
        (1.0 + self.load.max(0.0)) / self.blocks_per_s
    }
}

/// One hop of a route: a candidate (by index) and the blocks it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteHop {
    /// Index into the candidates.
    pub server: usize,
    /// Blocks this hop runs, within the server's span.
    pub blocks: BlockRange,
}

/// A route and its expected per-token latency.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The hops, in order; their blocks chain `0..num_blocks`.
    pub hops: Vec<RouteHop>,
    /// Expected seconds per token.
    pub cost_s: f64,
}

/// Cost of a given sequence of hops (for tests and for comparing routes).
pub fn route_cost(candidates: &[Candidate], hops: &[RouteHop]) -> f64 {
    let mut cost = 0.0;
    for h in hops {
        let c = &candidates[h.server];
        cost += c.leg() + f64::from(h.blocks.end - h.blocks.start) * c.per_block();
    }
    cost
}

/// The cheapest route through blocks `0..num_blocks`, or `None` when the
/// usable candidates leave a gap.
pub fn plan_route(num_blocks: u32, candidates: &[Candidate]) -> Option<Route> {
    let n = num_blocks as usize;
    if n == 0 {
        return None;
    }
    // Servers covering each block.
    let mut covering: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (s, c) in candidates.iter().enumerate() {
        if c.usable() {
            let end = (c.span.end as usize).min(n);
            let start = (c.span.start as usize).min(end);
            for blocks in &mut covering[start..end] {
                blocks.push(s);
            }
        }
    }
    // best[i]: cheapest arrival at boundary i with a hop ending there.
    // inside[s]: cheapest arrival at the current boundary while inside s,
    // and where that stay in s began.
    let inf = f64::INFINITY;
    let mut best = vec![inf; n + 1];
    let mut best_from: Vec<Option<(usize, usize)>> = vec![None; n + 1]; // (server, hop start)
    best[0] = 0.0;
    let mut inside: Vec<(f64, usize)> = vec![(inf, 0); candidates.len()];
    for i in 0..n {
        let mut next_inside = Vec::with_capacity(covering[i].len());
        for &s in &covering[i] {
            let c = &candidates[s];
            let (stay, stay_start) = inside[s];
            let enter = best[i] + c.leg();
            let (cost, start) = if stay <= enter {
                (stay, stay_start)
            } else {
                (enter, i)
            };
            let cost = cost + c.per_block();
            next_inside.push((s, cost, start));
        }
        // Servers not covering block i cannot be "inside" past it.
        for &s in &covering[i] {
            inside[s] = (inf, 0);
        }
        if i > 0 {
            for &s in &covering[i - 1] {
                inside[s] = (inf, 0);
            }
        }
        for (s, cost, start) in next_inside {
            inside[s] = (cost, start);
            // Ending the hop at boundary i + 1 (the return leg is added at the end).
            if cost < best[i + 1] {
                best[i + 1] = cost;
                best_from[i + 1] = Some((s, start));
            }
        }
    }
    let final_cost = best[n];
    let (mut s, mut start) = best_from[n]?;
    if !final_cost.is_finite() {
        return None;
    }
    let mut hops = vec![RouteHop {
        server: s,
        blocks: BlockRange {
            start: start as u32,
            end: n as u32,
        },
    }];
    while start > 0 {
        let end = start;
        (s, start) = best_from[end]?;
        hops.push(RouteHop {
            server: s,
            blocks: BlockRange {
                start: start as u32,
                end: end as u32,
            },
        });
    }
    hops.reverse();
    Some(Route {
        hops,
        cost_s: final_cost,
    })
}
