//! Where a server should sit: the window of blocks that most raises the
//! swarm's weakest block, and whether moving is worth it.
//!
//! A block's throughput is the sum of the throughputs of the servers holding
//! it (replicas share load). A joining server that fits `n` blocks takes the
//! window that maximises the swarm's minimum per-block throughput; ties go to
//! the window whose sorted per-block throughputs are lexicographically
//! largest (the next-smallest block decides), then to the lowest start.
//! A server moves only when that minimum improves by a clear margin, so a
//! stable swarm does not flap; callers add a random delay and a cooldown.

use crate::BlockRange;

/// Default relative improvement a move must bring.
pub const DEFAULT_MOVE_MARGIN: f64 = 0.2;

/// A server as placement sees it: its span and throughput (tokens/s).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placed {
    /// The blocks held.
    pub span: BlockRange,
    /// Tokens per second it serves.
    pub throughput: f64,
}

/// Per-block throughput of a swarm of `num_blocks` blocks.
pub fn block_throughput(num_blocks: u32, servers: &[Placed]) -> Vec<f64> {
    let mut t = vec![0.0; num_blocks as usize];
    for s in servers {
        let end = s.span.end.min(num_blocks) as usize;
        let start = (s.span.start as usize).min(end);
        for b in &mut t[start..end] {
            *b += s.throughput.max(0.0);
        }
    }
    t
}

fn min_of(t: &[f64]) -> f64 {
    t.iter().copied().fold(f64::INFINITY, f64::min)
}

fn sorted(t: &[f64]) -> Vec<f64> {
    let mut v = t.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

/// The best window of `n` blocks for a server of `throughput` joining
/// `servers`, and the swarm's minimum per-block throughput with it there.
pub fn choose_span(
    num_blocks: u32,
    servers: &[Placed],
    n: u32,
    throughput: f64,
) -> Option<(BlockRange, f64)> {
    if num_blocks == 0 || n == 0 {
        return None;
    }
    let n = n.min(num_blocks);
    let base = block_throughput(num_blocks, servers);
    let mut best: Option<(BlockRange, Vec<f64>)> = None;
    for start in 0..=num_blocks - n {
        let mut t = base.clone();
        for b in &mut t[start as usize..(start + n) as usize] {
            *b += throughput.max(0.0);
        }
        let key = sorted(&t);
        let better = match &best {
            None => true,
            Some((_, k)) => key
                .iter()
                .zip(k)
                .find(|(a, b)| a != b)
                .is_some_and(|(a, b)| a > b),
        };
        if better {
            best = Some((
                BlockRange {
                    start,
                    end: start + n,
                },
                key,
            ));
        }
    }
    best.map(|(r, key)| (r, key[0]))
}

/// Whether server `me` (index into `servers`) should move, and where: only
/// when moving raises the swarm's minimum per-block throughput by more than
/// `margin` (relative; a swarm with a gap always gains from covering it).
pub fn should_move(
    num_blocks: u32,
    servers: &[Placed],
    me: usize,
    margin: f64,
) -> Option<BlockRange> {
    let current = min_of(&block_throughput(num_blocks, servers));
    let others: Vec<Placed> = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != me)
        .map(|(_, s)| *s)
        .collect();
    let mine = servers.get(me)?;
    let n = mine.span.end.saturating_sub(mine.span.start);
    let (span, new_min) = choose_span(num_blocks, &others, n, mine.throughput)?;
    if span == mine.span {
        return None;
    }
    let gains = if current <= 0.0 {
        new_min > 0.0
    } else {
        new_min > current * (1.0 + margin)
    };
    gains.then_some(span)
}
