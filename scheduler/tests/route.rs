//! Routing properties: routes chain every block in order, never use a
//! backed-off server, and cost what a brute-force search finds best.

use nomoat_scheduler::{plan_route, route_cost, BlockRange, Candidate, RouteHop};
use proptest::prelude::*;

fn candidate(start: u32, end: u32, blocks_per_s: f64, rtt_ms: f64) -> Candidate {
    Candidate {
        span: BlockRange { start, end },
        blocks_per_s,
        rtt_s: rtt_ms / 1e3,
        load: 0.0,
        has_kv_room: true,
        backed_off: false,
    }
}

/// Every route by exhaustive search: the cheapest cost.
fn brute_force(n: u32, cs: &[Candidate]) -> Option<f64> {
    fn go(at: u32, n: u32, cs: &[Candidate], hops: &mut Vec<RouteHop>, best: &mut Option<f64>) {
        if at == n {
            let c = route_cost(cs, hops);
            if best.is_none_or(|b| c < b) {
                *best = Some(c);
            }
            return;
        }
        for (s, c) in cs.iter().enumerate() {
            if c.backed_off || c.span.start > at || c.span.end <= at {
                continue;
            }
            for end in at + 1..=c.span.end.min(n) {
                hops.push(RouteHop {
                    server: s,
                    blocks: BlockRange { start: at, end },
                });
                go(end, n, cs, hops, best);
                hops.pop();
            }
        }
    }
    let mut best = None;
    go(0, n, cs, &mut Vec::new(), &mut best);
    best
}

fn swarm() -> impl Strategy<Value = (u32, Vec<Candidate>)> {
    (2u32..7).prop_flat_map(|n| {
        let server = (
            0..n,
            1..=n,
            1.0f64..100.0,
            0.0f64..50.0,
            0.0f64..1.0,
            any::<bool>(),
            prop::bool::weighted(0.15),
        )
            .prop_map(move |(a, len, tput, rtt, load, kv, off)| {
                let start = a;
                let end = (a + len).min(n).max(a + 1);
                Candidate {
                    span: BlockRange { start, end },
                    blocks_per_s: tput,
                    rtt_s: rtt / 1e3,
                    load,
                    has_kv_room: kv,
                    backed_off: off,
                }
            });
        (Just(n), prop::collection::vec(server, 1..6))
    })
}

proptest! {
    #[test]
    fn routes_are_optimal_contiguous_and_avoid_backed_off((n, cs) in swarm()) {
        let planned = plan_route(n, &cs);
        let brute = brute_force(n, &cs);
        prop_assert_eq!(planned.is_some(), brute.is_some());
        if let (Some(route), Some(best)) = (planned, brute) {
            let mut at = 0;
            for h in &route.hops {
                prop_assert_eq!(h.blocks.start, at);
                prop_assert!(h.blocks.end > h.blocks.start);
                let c = &cs[h.server];
                prop_assert!(!c.backed_off);
                prop_assert!(c.span.start <= h.blocks.start && h.blocks.end <= c.span.end);
                at = h.blocks.end;
            }
            prop_assert_eq!(at, n);
            let cost = route_cost(&cs, &route.hops);
            prop_assert!((cost - route.cost_s).abs() <= 1e-9 * cost.max(1.0), "{} vs {}", cost, route.cost_s);
            prop_assert!((cost - best).abs() <= 1e-9 * best.max(1.0), "planned {} vs best {}", cost, best);
        }
    }
}

#[test]
fn a_fast_server_is_worth_an_extra_hop_and_a_slow_one_is_not() {
    // 0..8 on a slow server, or 0..4 there and 4..8 on a fast one.
    let slow = candidate(0, 8, 10.0, 1.0);
    let fast = candidate(4, 8, 1000.0, 1.0);
    let r = plan_route(8, &[slow.clone(), fast]).expect("a route");
    assert_eq!(r.hops.len(), 2);
    assert_eq!(r.hops[1].blocks, BlockRange { start: 4, end: 8 });
    // A far-away fast server (2 s RTT: 1 s in and 1 s back) saves 0.4 s of
    // compute and is not worth it.
    let far = candidate(4, 8, 1000.0, 2000.0);
    let r = plan_route(8, &[slow, far]).expect("a route");
    assert_eq!(r.hops.len(), 1);
}

#[test]
fn gaps_and_backed_off_servers_leave_no_route() {
    let mut a = candidate(0, 4, 10.0, 1.0);
    let b = candidate(4, 8, 10.0, 1.0);
    assert!(plan_route(8, &[a.clone(), b.clone()]).is_some());
    a.backed_off = true;
    assert!(plan_route(8, &[a, b.clone()]).is_none());
    assert!(plan_route(8, &[b]).is_none());
}

#[test]
fn planning_is_fast_on_a_large_swarm() {
    // 10,000 servers of 1..=16 blocks over 80 blocks: a smoke check that the
    // planner is linear in the spans (timing is measured by the bench).
    let cs: Vec<Candidate> = (0..10_000u32)
        .map(|i| {
            let start = (i * 7) % 80;
            let len = 1 + (i * 13) % 16;
            candidate(
                start,
                (start + len).min(80),
                5.0 + f64::from(i % 50),
                f64::from(i % 40),
            )
        })
        .collect();
    let r = plan_route(80, &cs).expect("covered");
    assert_eq!(r.hops.last().map(|h| h.blocks.end), Some(80));
}
