//! `nomoat bench scheduler`: route planning on simulated swarms.

use std::time::Instant;

use anyhow::Result;
use nomoat_scheduler::BlockRange;

use super::median;

/// A deterministic simulated swarm: spans of 1..=16 blocks, throughputs,
/// RTTs and loads drawn from a fixed-seed generator.
fn simulated_swarm(blocks: u32, n: usize, seed: u64) -> Vec<nomoat_scheduler::Candidate> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..=16u32.min(blocks));
            let start = rng.random_range(0..=blocks - len);
            nomoat_scheduler::Candidate {
                span: BlockRange {
                    start,
                    end: start + len,
                },
                blocks_per_s: rng.random_range(50.0..2000.0),
                rtt_s: rng.random_range(0.0005..0.2),
                load: rng.random_range(0.0..1.0),
                has_kv_room: rng.random_bool(0.9),
                backed_off: rng.random_bool(0.05),
            }
        })
        .collect()
}

pub(crate) fn bench_scheduler(blocks: u32, sizes: &[usize], runs: usize) -> Result<()> {
    anyhow::ensure!(blocks > 0, "--blocks must be positive");
    let mut rows = Vec::new();
    for &n in sizes {
        let swarm = simulated_swarm(blocks, n, n as u64);
        let mut times = Vec::new();
        let mut hops = 0;
        for _ in 0..runs.max(1) {
            let t = Instant::now();
            let route = nomoat_scheduler::plan_route(blocks, &swarm);
            times.push(t.elapsed().as_secs_f64());
            hops = route.map_or(0, |r| r.hops.len());
        }
        let ms = median(times) * 1e3;
        println!("{n:>6} servers, {blocks} blocks: route planned in {ms:.3} ms (median of {runs}), {hops} hops");
        rows.push(serde_json::json!({"servers": n, "plan_ms": ms, "hops": hops}));
    }
    println!(
        "{}",
        serde_json::json!({"bench": "scheduler", "blocks": blocks, "results": rows})
    );
    Ok(())
}
