//! Whole plans: the cheapest route when there is one, else the blocks that no
//! usable server covers, over a whole model or a sub-range of it.
//!
//! A client plans a whole route for a new session, and a sub-range of one when a
//! hop fails and its blocks must be run by others ([`plan_servers_within`]): servers that
//! overlap the range run only its part of their span, and the result is in the
//! model's block numbering. When no route exists the caller gets the gaps as
//! typed ranges, ready to be named in an error ([`join_ranges`]).

use crate::{candidates, chain, coverage_gaps, plan_route, BlockRange, Candidate, RouteHop};
use crate::{Route, ServerEstimate};

/// A chain of spans through blocks `0..num_blocks` (see [`chain`]): for each
/// hop, the index into `spans` and the blocks it runs, from the boundary it
/// enters at to the end of its span (cut to the model).
///
/// # Errors
///
/// The blocks no span covers ([`coverage_gaps`]), when there are any.
pub fn chain_route(
    num_blocks: u32,
    spans: &[BlockRange],
) -> Result<Vec<(usize, BlockRange)>, Vec<BlockRange>> {
    let Some(order) = chain(num_blocks, spans) else {
        return Err(coverage_gaps(num_blocks, spans));
    };
    let mut at = 0;
    Ok(order
        .into_iter()
        .map(|i| {
            let end = spans[i].end.min(num_blocks);
            let hop = (i, BlockRange { start: at, end });
            at = end;
            hop
        })
        .collect())
}

/// The cheapest route through `0..num_blocks` ([`plan_route`]); when it finds
/// none, the fewest-hops chain ([`chain_route`]) over the candidates that are
/// not backed off.
///
/// # Errors
///
/// The blocks that no candidate which is not backed off covers.
pub fn route_or_gaps(
    num_blocks: u32,
    candidates: &[Candidate],
) -> Result<Vec<RouteHop>, Vec<BlockRange>> {
    if let Some(Route { hops, .. }) = plan_route(num_blocks, candidates) {
        return Ok(hops);
    }
    let usable: Vec<usize> = (0..candidates.len())
        .filter(|&i| !candidates[i].backed_off)
        .collect();
    let spans: Vec<BlockRange> = usable.iter().map(|&i| candidates[i].span).collect();
    Ok(chain_route(num_blocks, &spans)?
        .into_iter()
        .map(|(k, blocks)| RouteHop {
            server: usable[k],
            blocks,
        })
        .collect())
}

/// The route for a session of `max_length` positions through a model of
/// `num_blocks` blocks served by `servers`: [`candidates`] (with `jitter`,
/// once per server) planned by [`route_or_gaps`]. Hops index `servers`.
///
/// # Errors
///
/// The blocks that no server which is not backed off covers.
pub fn plan_servers(
    num_blocks: u32,
    servers: &[ServerEstimate],
    max_length: u32,
    jitter: impl FnMut() -> f64,
) -> Result<Vec<RouteHop>, Vec<BlockRange>> {
    route_or_gaps(num_blocks, &candidates(servers, max_length, jitter))
}

/// Like [`plan_servers`], but through blocks `range` only: each server overlapping it
/// may run any sub-range of its span within `range`, and the others are left
/// out (of the medians too). Hops index `servers` and name blocks in the
/// model's numbering, within `range`. `jitter` is called once per
/// overlapping server, in order.
///
/// A server keeps the blocks per second of its whole span (an announced
/// throughput is per token over the span, so it is converted before the span
/// is cut).
///
/// # Errors
///
/// The blocks of `range` that no overlapping server which is not backed off
/// covers, in the model's numbering. An empty `range` needs no hop: `Ok(vec![])`.
pub fn plan_servers_within(
    range: BlockRange,
    servers: &[ServerEstimate],
    max_length: u32,
    jitter: impl FnMut() -> f64,
) -> Result<Vec<RouteHop>, Vec<BlockRange>> {
    let (from, to) = (range.start, range.end);
    if from >= to {
        return Ok(Vec::new());
    }
    let inside: Vec<usize> = (0..servers.len())
        .filter(|&i| {
            let s = servers[i].span;
            s.start < s.end && s.start < to && s.end > from
        })
        .collect();
    let overlapping: Vec<ServerEstimate> = inside.iter().map(|&i| servers[i].clone()).collect();
    let mut clipped = candidates(&overlapping, max_length, jitter);
    for (c, s) in clipped.iter_mut().zip(&overlapping) {
        c.span = BlockRange {
            start: s.span.start.max(from) - from,
            end: s.span.end.min(to) - from,
        };
    }
    let shift = |b: BlockRange| BlockRange {
        start: b.start + from,
        end: b.end + from,
    };
    match route_or_gaps(to - from, &clipped) {
        Ok(hops) => Ok(hops
            .into_iter()
            .map(|h| RouteHop {
                server: inside[h.server],
                blocks: shift(h.blocks),
            })
            .collect()),
        Err(gaps) => Err(gaps.into_iter().map(shift).collect()),
    }
}

/// `ranges` as `a..b, c..d` (empty for none), the form errors name gaps in.
pub fn join_ranges(ranges: &[BlockRange]) -> String {
    ranges
        .iter()
        .map(|r| format!("{}..{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn span(start: u32, end: u32) -> BlockRange {
        BlockRange { start, end }
    }

    fn server(start: u32, end: u32, rtt_s: Option<f64>) -> ServerEstimate {
        ServerEstimate {
            rtt_s,
            ..ServerEstimate::new(span(start, end))
        }
    }

    #[test]
    fn chain_route_runs_each_span_from_the_boundary() {
        let spans = [span(0, 4), span(2, 8), span(6, 12)];
        assert_eq!(
            chain_route(10, &spans),
            Ok(vec![(0, span(0, 4)), (1, span(4, 8)), (2, span(8, 10))])
        );
        assert_eq!(chain_route(0, &spans), Ok(vec![]));
        assert_eq!(
            chain_route(12, &[span(0, 4), span(6, 10)]),
            Err(vec![span(4, 6), span(10, 12)])
        );
    }

    #[test]
    fn falls_back_to_a_chain_of_servers_not_backed_off() {
        // An infinite load makes every route infinitely dear: the cheapest
        // route finds none.
        let mut c = candidates(&[server(0, 4, None), server(4, 8, None)], 1, || 0.0);
        c[0].load = f64::INFINITY;
        assert_eq!(plan_route(8, &c), None);
        assert_eq!(
            route_or_gaps(8, &c),
            Ok(vec![
                RouteHop {
                    server: 0,
                    blocks: span(0, 4)
                },
                RouteHop {
                    server: 1,
                    blocks: span(4, 8)
                },
            ])
        );
        c[1].backed_off = true;
        assert_eq!(route_or_gaps(8, &c), Err(vec![span(4, 8)]));
    }

    #[test]
    fn backed_off_servers_are_skipped_in_the_gaps() {
        let mut servers = vec![server(0, 4, None), server(4, 8, None), server(0, 8, None)];
        servers[2].backed_off = true;
        servers[1].backed_off = true;
        assert_eq!(plan_servers(8, &servers, 1, || 0.0), Err(vec![span(4, 8)]));
        servers[1].backed_off = false;
        let hops = plan_servers(8, &servers, 1, || 0.0).unwrap();
        assert_eq!(hops.iter().map(|h| h.server).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn a_sub_range_is_planned_in_place() {
        // The failed hop ran 8..16; the servers left overlap it in part.
        let servers = [
            server(0, 10, Some(0.01)),
            server(20, 32, Some(0.01)),
            server(10, 24, Some(0.01)),
        ];
        let hops = plan_servers_within(span(8, 16), &servers, 1, || 0.0).unwrap();
        assert_eq!(
            hops,
            [
                RouteHop {
                    server: 0,
                    blocks: span(8, 10)
                },
                RouteHop {
                    server: 2,
                    blocks: span(10, 16)
                },
            ]
        );
        // Without the third server, 10..16 is missing, in the model's numbering.
        assert_eq!(
            plan_servers_within(span(8, 16), &servers[..2], 1, || 0.0),
            Err(vec![span(10, 16)])
        );
        assert_eq!(
            plan_servers_within(span(5, 5), &servers, 1, || 0.0),
            Ok(vec![])
        );
    }

    #[test]
    fn servers_outside_the_range_do_not_set_the_medians() {
        // Two replicas of 4..8, the unpinged one ten times faster. Two far
        // servers outside the range, pinged at 10 s, would make the median RTT
        // (and so the unpinged replica's leg) 10 s if they counted.
        let far = server(0, 4, Some(10.0));
        let mut pinged = server(4, 8, Some(0.1));
        pinged.observed_secs_per_block = Some(0.01);
        let mut unpinged = server(4, 8, None);
        unpinged.observed_secs_per_block = Some(0.001);
        let servers = [far.clone(), far, pinged, unpinged];
        let mut calls = 0;
        let hops = plan_servers_within(span(4, 8), &servers, 1, || {
            calls += 1;
            0.0
        })
        .unwrap();
        assert_eq!(calls, 2, "jitter is drawn for the overlapping servers only");
        assert_eq!(
            hops,
            [RouteHop {
                server: 3,
                blocks: span(4, 8)
            }]
        );
        // Over the whole model the far servers count, and the pinged replica wins.
        let whole = plan_servers(8, &servers, 1, || 0.0).unwrap();
        assert_eq!(
            whole[1],
            RouteHop {
                server: 2,
                blocks: span(4, 8)
            }
        );
    }

    #[test]
    fn announced_throughput_is_converted_before_cutting() {
        // 10 tokens/s over 8 blocks is 80 blocks/s whatever part of it runs.
        let mut slow = server(0, 8, Some(0.01));
        slow.announced_throughput = 10.0;
        let mut fast = server(2, 4, Some(0.01));
        fast.announced_throughput = 30.0; // 60 blocks/s
        let servers = [slow, fast];
        let hops = plan_servers_within(span(2, 4), &servers, 1, || 0.0).unwrap();
        assert_eq!(
            hops,
            [RouteHop {
                server: 0,
                blocks: span(2, 4)
            }]
        );
    }

    #[test]
    fn ranges_join_as_errors_name_them() {
        assert_eq!(join_ranges(&[]), "");
        assert_eq!(join_ranges(&[span(0, 3), span(5, 9)]), "0..3, 5..9");
    }

    fn servers_strategy() -> impl Strategy<Value = Vec<ServerEstimate>> {
        let one = (
            0u32..16,
            1u32..8,
            proptest::option::of(0.0f64..0.2),
            any::<bool>(),
            0.0f32..20.0,
        )
            .prop_map(|(start, len, rtt_s, backed_off, announced_throughput)| {
                ServerEstimate {
                    rtt_s,
                    backed_off,
                    announced_throughput,
                    ..ServerEstimate::new(span(start, (start + len).min(16)))
                }
            });
        proptest::collection::vec(one, 0..8)
    }

    proptest! {
        #[test]
        fn sub_range_plans_chain_the_range_or_name_its_gaps(
            servers in servers_strategy(),
            from in 0u32..16,
            len in 1u32..16,
        ) {
            let range = span(from, (from + len).min(16));
            prop_assume!(range.start < range.end);
            match plan_servers_within(range, &servers, 1, || 0.5) {
                Ok(hops) => {
                    let mut at = range.start;
                    for h in &hops {
                        let s = &servers[h.server];
                        prop_assert!(!s.backed_off);
                        prop_assert_eq!(h.blocks.start, at);
                        prop_assert!(h.blocks.start < h.blocks.end);
                        prop_assert!(s.span.contains(&h.blocks));
                        at = h.blocks.end;
                    }
                    prop_assert_eq!(at, range.end);
                }
                Err(gaps) => {
                    prop_assert!(!gaps.is_empty());
                    for g in &gaps {
                        prop_assert!(range.contains(g));
                        for s in servers.iter().filter(|s| !s.backed_off) {
                            prop_assert!(!s.span.overlaps(g), "{:?} covers part of {:?}", s.span, g);
                        }
                    }
                }
            }
        }
    }
}
