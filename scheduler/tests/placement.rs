//! Placement and rebalancing on simulated swarms with a virtual clock.

use nomoat_scheduler::{
    block_throughput, choose_span, coverage_gaps, should_move, BlockRange, Placed,
    DEFAULT_MOVE_MARGIN,
};

/// A tiny deterministic generator (the tests need no real randomness).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

#[test]
fn thirty_servers_joining_an_empty_swarm_cover_every_block() {
    let mut rng = Lcg(7);
    let mut swarm: Vec<Placed> = Vec::new();
    for _ in 0..30 {
        let n = rng.range(4, 12) as u32;
        let tput = rng.range(5, 50) as f64;
        let (span, _) = choose_span(80, &swarm, n, tput).expect("a window");
        swarm.push(Placed {
            span,
            throughput: tput,
        });
    }
    let spans: Vec<BlockRange> = swarm.iter().map(|s| s.span).collect();
    assert!(coverage_gaps(80, &spans).is_empty(), "{spans:?}");
}

#[test]
fn a_joining_server_fills_the_weakest_blocks() {
    let swarm = [
        Placed {
            span: BlockRange { start: 0, end: 10 },
            throughput: 10.0,
        },
        Placed {
            span: BlockRange { start: 10, end: 20 },
            throughput: 2.0,
        },
        Placed {
            span: BlockRange { start: 20, end: 30 },
            throughput: 10.0,
        },
    ];
    let (span, min) = choose_span(30, &swarm, 10, 5.0).expect("a window");
    assert_eq!(span, BlockRange { start: 10, end: 20 });
    assert_eq!(min, 7.0);
}

/// A swarm of 1,000 servers over 80 blocks with joins, departures and
/// throughput changes, simulated in rounds of a virtual clock. Servers
/// rebalance after a cooldown; returns the moves per round.
fn simulate(rounds: usize, churn_until: usize) -> (Vec<usize>, Vec<Placed>) {
    let mut rng = Lcg(42);
    let mut swarm: Vec<Placed> = Vec::new();
    let mut last_move: Vec<usize> = Vec::new();
    let cooldown = 5;
    let mut moves = Vec::new();
    for round in 0..rounds {
        if round < churn_until {
            // Joins: placed where the swarm is weakest.
            for _ in 0..if round == 0 { 1000 } else { 20 } {
                let n = rng.range(4, 16) as u32;
                let t = rng.range(5, 100) as f64;
                let (span, _) = choose_span(80, &swarm, n, t).expect("a window");
                swarm.push(Placed {
                    span,
                    throughput: t,
                });
                last_move.push(round);
            }
            // Leaves and throughput changes.
            for _ in 0..20 {
                let i = rng.range(0, swarm.len() as u64) as usize;
                swarm.swap_remove(i);
                last_move.swap_remove(i);
            }
            for _ in 0..20 {
                let i = rng.range(0, swarm.len() as u64) as usize;
                swarm[i].throughput = rng.range(5, 100) as f64;
            }
        }
        // Rebalancing: a random tenth of the servers look each round (the
        // random delay), each at most once per cooldown.
        let mut moved = 0;
        for _ in 0..swarm.len() / 10 {
            let i = rng.range(0, swarm.len() as u64) as usize;
            if round < last_move[i] + cooldown {
                continue;
            }
            if let Some(span) = should_move(80, &swarm, i, DEFAULT_MOVE_MARGIN) {
                swarm[i].span = span;
                last_move[i] = round;
                moved += 1;
            }
        }
        moves.push(moved);
    }
    (moves, swarm)
}

#[test]
fn a_churning_swarm_stays_covered_and_a_stable_one_stops_moving() {
    let (moves, swarm) = simulate(120, 40);
    let spans: Vec<BlockRange> = swarm.iter().map(|s| s.span).collect();
    assert!(coverage_gaps(80, &spans).is_empty(), "coverage lost");
    // After churn stops, moves die out: none in the last 40 rounds.
    let tail: usize = moves[80..].iter().sum();
    assert_eq!(tail, 0, "still moving in a stable swarm: {moves:?}");
    // The weakest block is not starved: within 3x of the mean.
    let t = block_throughput(80, &swarm);
    let min = t.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = t.iter().sum::<f64>() / t.len() as f64;
    assert!(min * 3.0 >= mean, "min {min}, mean {mean}");
}

#[test]
fn departures_are_repaired_by_rebalancing() {
    // Two servers each cover half; a third duplicates the first half. When
    // the second leaves, the duplicate moves to the gap.
    let mut swarm = vec![
        Placed {
            span: BlockRange { start: 0, end: 10 },
            throughput: 10.0,
        },
        Placed {
            span: BlockRange { start: 0, end: 10 },
            throughput: 10.0,
        },
        Placed {
            span: BlockRange { start: 10, end: 20 },
            throughput: 10.0,
        },
    ];
    assert_eq!(should_move(20, &swarm, 1, DEFAULT_MOVE_MARGIN), None);
    swarm.pop();
    assert_eq!(
        should_move(20, &swarm, 1, DEFAULT_MOVE_MARGIN),
        Some(BlockRange { start: 10, end: 20 })
    );
}
