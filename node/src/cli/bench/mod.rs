//! `nomoat bench ...`: commands that print figures, side by side in one run.

pub(crate) mod adapter;
pub(crate) mod api;
pub(crate) mod batch;
pub(crate) mod engine;
pub(crate) mod failover;
pub(crate) mod overload;
pub(crate) mod scheduler;
pub(crate) mod swarm;
pub(crate) mod verify;
#[cfg(target_os = "linux")]
pub(crate) mod wan;
pub(crate) mod weights;

use std::time::{Duration, Instant};

use anyhow::Result;
use libp2p::Multiaddr;
use nomoat_node::client::{generate, Stepper};
use nomoat_node::engine::{GenerateOptions, SamplingParams};
use nomoat_node::net::{discover, NetHandle};
use nomoat_protocol::{BlockRange, ServerInfo};

/// The median of `v` (0 for none).
pub(crate) fn median(v: Vec<f64>) -> f64 {
    nomoat_scheduler::median_or(v, 0.0)
}

/// Peak resident memory of this process, bytes (Linux).
pub(crate) fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Greedy decoding of `tokens` tokens after `prompt` through the one token
/// loop, stop tokens ignored; returns each decode step's time (embed, the
/// blocks, logits and sampling) in seconds, and the tokens.
pub(crate) async fn timed_greedy(
    stepper: &mut Stepper,
    prompt: &[u32],
    tokens: usize,
    limit: usize,
) -> Result<(Vec<f64>, Vec<u32>)> {
    let opts = GenerateOptions {
        max_tokens: tokens + 1,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    };
    let mut times = Vec::with_capacity(tokens);
    let mut last: Option<Instant> = None;
    let mut clock = |_| {
        let now = Instant::now();
        if let Some(l) = last {
            times.push(now.duration_since(l).as_secs_f64());
        }
        last = Some(now);
        Ok(true)
    };
    let (out, _) = generate(stepper, prompt, &opts, limit, &mut clock).await?;
    Ok((times, out))
}

/// Starts `nomoat serve` for a benchmark: blocks `blocks` of the model at
/// `model`, announcing every half second, on `threads` compute threads.
pub(crate) fn bench_server(
    bin: &std::path::Path,
    model: &str,
    blocks: BlockRange,
    weights: &str,
    threads: &str,
    bootstrap: Option<&str>,
) -> Result<nomoat_node::process::ServeProcess> {
    bench_server_with(bin, model, blocks, weights, threads, bootstrap, &[])
}

/// [`bench_server`] with `extra` flags.
pub(crate) fn bench_server_with(
    bin: &std::path::Path,
    model: &str,
    blocks: BlockRange,
    weights: &str,
    threads: &str,
    bootstrap: Option<&str>,
    extra: &[&str],
) -> Result<nomoat_node::process::ServeProcess> {
    let blocks = blocks.to_string();
    let mut a = vec![
        "--model",
        model,
        "--blocks",
        blocks.as_str(),
        "--weights",
        weights,
        "--heartbeat",
        "0.5",
        "--threads",
        threads,
    ];
    if let Some(b) = bootstrap {
        a.extend(["--bootstrap", b]);
    }
    a.extend(extra);
    Ok(nomoat_node::process::ServeProcess::spawn(
        bin,
        &a,
        Duration::from_secs(120),
    )?)
}

/// Waits (30 s at most) until at least `n` servers of `model_id` are known.
pub(crate) async fn discover_at_least(
    net: &NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
    n: usize,
) -> Result<Vec<ServerInfo>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let found = discover(net, bootstrap, model_id).await?;
        if found.len() >= n {
            return Ok(found);
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} of {n} servers announced",
            found.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
