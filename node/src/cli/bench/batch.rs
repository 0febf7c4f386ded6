//! `nomoat bench batch`: a server's executor with 1, 4, 8... sessions
//! decoding at once (aggregate tokens/s against one session, measured in
//! the same run), the running sessions' step times while a long prompt is
//! prefilled beside them against idle, and the memory of the span.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use libp2p::PeerId;
use nomoat_node::engine::{hidden_to_frame, ModelFile, Span};
use nomoat_node::server::executor::{Executor, ExecutorConfig};
use nomoat_protocol::{DType, SessionId};
use nomoat_scheduler::BlockRange;

use super::{median, peak_rss};
use crate::ModelArgs;

#[derive(Debug, Args)]
pub(crate) struct BenchBatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The blocks the server holds (default: all).
    #[arg(long)]
    blocks: Option<BlockRange>,
    /// Numbers of sessions decoding at once.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    sessions: Vec<usize>,
    /// Decode steps each session runs per measurement.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// Length of the prompt prefilled beside running sessions.
    #[arg(long, default_value_t = 2000)]
    prefill: usize,
    /// Compute threads (default: every core).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
}

fn hidden(h: usize, t: usize, seed: usize) -> Result<candle_core::Tensor> {
    let v: Vec<f32> = (0..t * h)
        .map(|i| ((((i + 31 * seed) * 7919) % 1000) as f32 / 1000.0) - 0.5)
        .collect();
    Ok(candle_core::Tensor::from_vec(
        v,
        (1, t, h),
        &candle_core::Device::Cpu,
    )?)
}

/// Opens `n` sessions with a 16-position prompt each.
async fn open_sessions(
    exec: &Executor,
    h: usize,
    blocks: (usize, usize),
    n: usize,
    base: u8,
    max_len: usize,
) -> Result<Vec<(SessionId, usize)>> {
    let peer = PeerId::random();
    let mut out = Vec::new();
    for i in 0..n {
        let id = SessionId([base.wrapping_add(i as u8); 16]);
        exec.open(id, peer, blocks.0, blocks.1, max_len, None)
            .await?;
        let x = hidden(h, 16, i)?;
        exec.step(id, 1, 0, hidden_to_frame(&x, DType::F32)?)
            .await?;
        out.push((id, 16));
    }
    Ok(out)
}

/// Every session decodes `steps` steps at once; returns each step's time.
async fn decode_all(
    exec: &Executor,
    h: usize,
    sessions: &[(SessionId, usize)],
    steps: usize,
) -> Result<Vec<f64>> {
    decode_all_from(exec, h, sessions, steps, 2).await
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

pub(crate) async fn bench_batch(args: BenchBatchArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model.model, true)?;
    let file = ModelFile::open(&path)?;
    let cfg = file.config().clone();
    let range = args.blocks.unwrap_or(BlockRange {
        start: 0,
        end: cfg.num_blocks as u32,
    });
    let (a, b) = (range.start as usize, range.end as usize);
    let rss0 = peak_rss().unwrap_or(0);
    let span = Arc::new(Span::load(&file, a, b, args.model.weights)?);
    let weights = span.weight_bytes() as u64;
    let h = cfg.hidden_size;
    let max_len = args.prefill + args.steps + 64;
    let exec = Executor::start(
        span.clone(),
        ExecutorConfig {
            kv_bytes: Some(4 << 30),
            max_sessions: 256,
            max_sessions_per_peer: 256,
            max_context: Some(max_len),
            ..Default::default()
        },
    )
    .context("starting the executor")?;
    let all_blocks: u64 = nomoat_node::engine::block_bytes(
        &file.stored_tensors(),
        cfg.num_blocks as u32,
        args.model.weights,
    )
    .iter()
    .sum();
    println!(
        "model: {} ({} blocks); server holds {range} ({:.1} MB of weights, {:.0}% of the blocks' {:.1} MB)",
        path.display(),
        cfg.num_blocks,
        weights as f64 / 1e6,
        100.0 * weights as f64 / all_blocks.max(1) as f64,
        all_blocks as f64 / 1e6
    );
    let mut json = serde_json::json!({
        "bench": "batch",
        "model": args.model.model,
        "blocks": range.to_string(),
        "weight_bytes": weights,
    });
    // Aggregate decode speed by number of sessions, in rounds so noise hits
    // every count alike.
    let mut base = 1u8;
    // The most KV cache the open sessions reserved at once (their
    // max_length on these blocks; sampled when each measurement ends).
    let mut kv_peak = 0u64;
    let mut results: Vec<(usize, Vec<f64>)> =
        args.sessions.iter().map(|&n| (n, Vec::new())).collect();
    for _round in 0..2 {
        for (n, agg) in results.iter_mut() {
            let sessions = open_sessions(&exec, h, (a, b), *n, base, max_len).await?;
            base = base.wrapping_add(*n as u8);
            let t = Instant::now();
            decode_all(&exec, h, &sessions, args.steps).await?;
            agg.push((*n * args.steps) as f64 / t.elapsed().as_secs_f64());
            kv_peak = kv_peak.max(exec.stats().reserved_kv_bytes);
            for (id, _) in sessions {
                exec.close(id);
            }
        }
    }
    let one = results
        .first()
        .map(|(_, v)| median(v.clone()))
        .unwrap_or(0.0);
    let mut rows = Vec::new();
    for (n, agg) in &results {
        let m = median(agg.clone());
        println!(
            "{n} session(s) decoding: {m:.1} tokens/s in all, {:.1} each, {:.2}x one session",
            m / *n as f64,
            m / one.max(1e-9)
        );
        rows.push(
            serde_json::json!({"sessions": n, "tokens_per_s": m, "vs_one": m / one.max(1e-9)}),
        );
    }
    json["decode"] = rows.into();
    // Step times of 4 running sessions, idle and while a long prompt goes in.
    let running = open_sessions(&exec, h, (a, b), 4, base, max_len).await?;
    base = base.wrapping_add(4);
    let idle = decode_all(&exec, h, &running, args.steps).await?;
    let running: Vec<_> = running
        .iter()
        .map(|&(id, p)| (id, p + args.steps))
        .collect();
    let newcomer = SessionId([base; 16]);
    exec.open(newcomer, PeerId::random(), a, b, max_len, None)
        .await?;
    let prompt = hidden(h, args.prefill, 3)?;
    let exec2 = exec.clone();
    let frame = hidden_to_frame(&prompt, DType::F32)?;
    let t_prefill = Instant::now();
    let prefill = tokio::spawn(async move { exec2.step(newcomer, 1, 0, frame).await });
    // Decode while the prompt is in (bounded: the prompt's steps at most).
    let mut busy = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut k = 0usize;
    while !prefill.is_finished() && Instant::now() < deadline && k < 4096 {
        let shifted: Vec<_> = running.iter().map(|&(id, p)| (id, p + k)).collect();
        let times = decode_all_from(&exec, h, &shifted, 1, 2 + (args.steps + k) as u64).await?;
        busy.extend(times);
        k += 1;
        if k + args.steps + 70 >= max_len {
            break;
        }
    }
    prefill.await??;
    let prefill_s = t_prefill.elapsed().as_secs_f64();
    kv_peak = kv_peak.max(exec.stats().reserved_kv_bytes);
    let (i50, i99) = (pct(idle.clone(), 0.5), pct(idle, 0.99));
    let (b50, b99) = (pct(busy.clone(), 0.5), pct(busy.clone(), 0.99));
    println!(
        "4 sessions' decode steps: idle p50 {:.1} ms p99 {:.1} ms; while a {}-position prompt is prefilled ({prefill_s:.1} s, {:.0} positions/s): p50 {:.1} ms p99 {:.1} ms ({} steps), p99 {:.2}x idle",
        i50 * 1e3,
        i99 * 1e3,
        args.prefill,
        args.prefill as f64 / prefill_s,
        b50 * 1e3,
        b99 * 1e3,
        busy.len(),
        b99 / i99.max(1e-9)
    );
    json["idle_p99_ms"] = (i99 * 1e3).into();
    json["prefill_p99_ms"] = (b99 * 1e3).into();
    json["p99_vs_idle"] = (b99 / i99.max(1e-9)).into();
    json["prefill_s"] = prefill_s.into();
    let st = exec.stats();
    println!(
        "executor: {} steps in {} passes, at most {} steps in one; batch capacity {:.1} sessions (announced: what one pass adds before it takes twice one step)",
        st.steps, st.passes, st.max_batch, st.batch_capacity
    );
    json["batch_capacity"] = st.batch_capacity.into();
    if let Some(rss) = peak_rss() {
        // The KV caches: 9 sessions of up to max_len positions, allocated
        // as they grew.
        println!(
            "peak RSS {:.1} MiB (weights {:.1} MiB, {:.1} MiB before loading)",
            rss as f64 / 1048576.0,
            weights as f64 / 1048576.0,
            rss0 as f64 / 1048576.0
        );
        json["peak_rss_bytes"] = rss.into();
        // The memory a server of k of the model's L blocks may take: k/L
        // of the blocks' weights, the KV its sessions reserved, 100 MiB more.
        let (k, l) = (b - a, cfg.num_blocks.max(1));
        let share = all_blocks as f64 * k as f64 / l as f64;
        let budget = share + kv_peak as f64 + 100.0 * 1048576.0;
        println!(
            "memory for {k} of {l} blocks: peak RSS {:.1} MiB against {:.1} MiB ({k}/{l} of the blocks' weights {:.1} + KV reserved {:.1} + 100): {}",
            rss as f64 / 1048576.0,
            budget / 1048576.0,
            share / 1048576.0,
            kv_peak as f64 / 1048576.0,
            if (rss as f64) <= budget { "within" } else { "OVER" }
        );
        json["kv_peak_bytes"] = kv_peak.into();
        json["memory_budget_bytes"] = (budget as u64).into();
    }
    exec.shutdown();
    println!("{json}");
    Ok(())
}

/// One decode step of every session at once, with step numbers from `seq`.
async fn decode_all_from(
    exec: &Executor,
    h: usize,
    sessions: &[(SessionId, usize)],
    steps: usize,
    seq: u64,
) -> Result<Vec<f64>> {
    let tasks: Vec<_> = sessions
        .iter()
        .map(|&(id, pos)| {
            let exec = exec.clone();
            tokio::spawn(async move {
                let x = hidden(h, 1, 7)?;
                let mut times = Vec::with_capacity(steps);
                for i in 0..steps {
                    let t = Instant::now();
                    exec.step(
                        id,
                        seq + i as u64,
                        pos + i,
                        hidden_to_frame(&x, DType::F32)?,
                    )
                    .await?;
                    times.push(t.elapsed().as_secs_f64());
                }
                anyhow::Ok(times)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}
