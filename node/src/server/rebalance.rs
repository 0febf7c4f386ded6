//! Rebalancing: a running server moves to where the swarm is weakest.
//!
//! Every period (with jitter) the server looks at the swarm's announcements
//! and asks [`nomoat_scheduler::should_move`] whether another window of the
//! same length would raise the swarm's minimum per-block throughput by more
//! than the margin. If so it waits a random moment and asks again (another
//! server may have moved meanwhile), then loads the new span, switches new
//! sessions to it and announces it; sessions already open finish on the old
//! span, which is freed with the last of them. After a move the server waits
//! out a cooldown, so a swarm settles instead of flapping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nomoat_protocol::ServerInfo;
use nomoat_scheduler::{BlockRange, Placed};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::executor::Executor;
use crate::engine::Span;
use crate::net::NetHandle;

/// Loads blocks `start..end` of the served model (fetching them first if
/// they are not here).
pub type SpanLoader = Arc<
    dyn Fn(u32, u32) -> futures::future::BoxFuture<'static, Result<Span, LoadError>> + Send + Sync,
>;

/// Why a [`SpanLoader`] could not load a span.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// When and how eagerly a server moves.
#[derive(Debug, Clone)]
pub struct RebalanceConfig {
    /// How often the swarm is looked at (each wait is lengthened by up to
    /// half, at random).
    pub period: Duration,
    /// No move within this long of the last one.
    pub cooldown: Duration,
    /// Relative gain of the weakest block a move must bring.
    pub margin: f64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(30),
            cooldown: Duration::from_secs(300),
            margin: nomoat_scheduler::DEFAULT_MOVE_MARGIN,
        }
    }
}

/// The swarm as placement sees it. Servers that have not measured their
/// throughput count as the median of those that have (1 token/s when none
/// has), so a new server neither attracts nor repels placements.
pub fn placed(servers: &[ServerInfo]) -> Vec<Placed> {
    let measured: Vec<Option<f64>> = servers.iter().map(measured_throughput).collect();
    nomoat_scheduler::fill_with_median(&measured, 1.0)
        .into_iter()
        .zip(servers)
        .map(|(throughput, s)| Placed {
            span: s.blocks,
            throughput,
        })
        .collect()
}

/// The throughput a server announces, if it has measured itself.
fn measured_throughput(s: &ServerInfo) -> Option<f64> {
    (s.throughput > 0.0).then(|| f64::from(s.throughput))
}

/// The median measured throughput of `servers`, tokens/s (1 when none has
/// measured itself).
pub fn typical_throughput(servers: &[ServerInfo]) -> f64 {
    nomoat_scheduler::median_or(servers.iter().filter_map(measured_throughput), 1.0)
}

/// Where the server `me` (peer id bytes) should move among `servers`, if
/// anywhere (see [`placed`] for unmeasured servers).
pub fn decide(
    servers: &[ServerInfo],
    me: &[u8],
    num_blocks: u32,
    margin: f64,
) -> Option<BlockRange> {
    let i = servers.iter().position(|s| s.peer_id == me)?;
    nomoat_scheduler::should_move(num_blocks, &placed(servers), i, margin)
}

/// Moves of one server so far (for status and tests).
#[derive(Debug, Default)]
pub struct Moves {
    count: std::sync::atomic::AtomicUsize,
}

impl Moves {
    /// Moves made.
    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Runs until `shutdown`, moving the server when the swarm gains from it.
pub async fn run_rebalancer(
    net: NetHandle,
    exec: Executor,
    model_id: String,
    loader: SpanLoader,
    cfg: RebalanceConfig,
    moves: Arc<Moves>,
    shutdown: CancellationToken,
) {
    let me = net.peer_id().to_bytes();
    let num_blocks = exec.span().config().num_blocks as u32;
    let mut last_move: Option<Instant> = None;
    let jittered = |d: Duration| d.mul_f64(1.0 + 0.5 * rand::random::<f64>());
    // The swarm as announced, with this server where it really is now (its
    // own announcement may lag a move by a heartbeat).
    let look = |net: &NetHandle| {
        let mut servers = net.servers(&model_id);
        let span = exec.span();
        for s in servers.iter_mut().filter(|s| s.peer_id == me) {
            s.blocks.start = span.start() as u32;
            s.blocks.end = span.end() as u32;
        }
        decide(&servers, &me, num_blocks, cfg.margin)
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered(cfg.period)) => {}
        }
        if last_move.is_some_and(|t| t.elapsed() < cfg.cooldown) || look(&net).is_none() {
            continue;
        }
        // Others saw the same swarm: wait a random moment and look again.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.period.mul_f64(0.5 * rand::random::<f64>())) => {}
        }
        let Some(target) = look(&net) else { continue };
        let from = exec.span();
        match loader(target.start, target.end).await {
            Ok(span) => {
                if let Err(e) = exec.move_to(Arc::new(span)) {
                    warn!("rebalance: {e}");
                    return;
                }
                info!(
                    "rebalance: moved from blocks {}..{} to {target}; open sessions finish on the old span",
                    from.start(),
                    from.end()
                );
                eprintln!(
                    "rebalance: moving from blocks {}..{} to {target}",
                    from.start(),
                    from.end()
                );
                moves
                    .count
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                last_move = Some(Instant::now());
            }
            Err(e) => warn!("rebalance: cannot load blocks {target}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomoat_protocol::{BlockRange, Reachability};

    fn info(peer: u8, start: u32, end: u32, throughput: f32) -> ServerInfo {
        ServerInfo {
            peer_id: vec![peer],
            model_id: "m".into(),
            blocks: BlockRange { start, end },
            num_blocks: 6,
            hidden_size: 8,
            throughput,
            free_kv_tokens: 100,
            load: 0.0,
            active_sessions: 0,
            batch_capacity: 0.0,
            version: String::new(),
            addrs: Vec::new(),
            reachability: Reachability::Unknown,
            timestamp_ms: 0,
            adapters: Vec::new(),
        }
    }

    #[test]
    fn a_duplicate_moves_into_a_gap_and_then_stays() {
        let swarm = [
            info(1, 0, 2, 10.0),
            info(2, 0, 2, 10.0),
            info(3, 2, 4, 10.0),
        ];
        let target = decide(&swarm, &[2], 6, 0.2).expect("the gap 4..6 pulls");
        assert_eq!(target, BlockRange { start: 4, end: 6 });
        // BlockRange 2..6 are each held once: no move gains 20%.
        let moved = [
            info(1, 0, 2, 10.0),
            info(2, 4, 6, 10.0),
            info(3, 2, 4, 10.0),
        ];
        for me in 1..=3 {
            assert_eq!(decide(&moved, &[me], 6, 0.2), None, "server {me}");
        }
    }

    #[test]
    fn unmeasured_servers_count_as_typical_and_unknown_peers_stay() {
        let swarm = [info(1, 0, 3, 0.0), info(2, 3, 6, 0.0)];
        assert_eq!(decide(&swarm, &[1], 6, 0.2), None);
        assert_eq!(decide(&swarm, &[9], 6, 0.2), None);
    }
}
