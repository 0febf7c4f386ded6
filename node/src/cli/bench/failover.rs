//! `nomoat bench failover`: the time from a server's death to the next
//! token, and what it is spent on.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::client::{plan, RemoteSession, Stepper};
use nomoat_node::engine::{Head, LocalModel, ModelFile, Sampler, SamplingParams, WeightMode};
use nomoat_node::net::{self, NetConfig};
use nomoat_node::process::ServeProcess;
use nomoat_node::weights::model_file_id;

/// `nomoat bench failover`.
#[derive(Debug, Args)]
pub(crate) struct BenchFailoverArgs {
    /// A catalog name, a .gguf file or a safetensors directory.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Positions in the session when the server dies (sent as one prompt).
    #[arg(long, default_value_t = 500)]
    context: usize,
    /// Tokens decoded before the death (they are replayed too).
    #[arg(long, default_value_t = 5)]
    decoded: usize,
    /// How the server dies: `kill` (SIGKILL, noticed by timeout) and/or
    /// `term` (SIGTERM, the server says so).
    #[arg(long, value_delimiter = ',', default_value = "kill,term")]
    signals: Vec<String>,
    /// fast, compact, exact or f32.
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
    /// Compute threads of every participant.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) async fn bench_failover(args: BenchFailoverArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let cfg = file.config().clone();
    anyhow::ensure!(
        cfg.num_blocks >= 3,
        "the model needs at least 3 blocks for a chain of 3 servers"
    );
    anyhow::ensure!(
        args.context + args.decoded + 8 <= cfg.max_seq_len,
        "--context plus --decoded must leave room in the model's {} positions",
        cfg.max_seq_len
    );
    let model_id = model_file_id(&path)?;
    let path_str = path.to_string_lossy().to_string();
    let weights = format!("{:?}", args.weights).to_lowercase();
    let threads = args.threads.max(1).to_string();
    // A fixed prompt of ordinary token ids (timing does not depend on them).
    let prompt: Vec<u32> = (0..args.context)
        .map(|i| (1000 + 37 * i as u32) % cfg.vocab_size as u32)
        .collect();
    let after = 4usize;
    let greedy = |l: &[f32]| Sampler::new(SamplingParams::greedy()).sample(l, &[]);
    // The tokens the whole model gives, to check the swarm after failover.
    let local = Arc::new(LocalModel::load_whole(&file, args.weights)?);
    let expected: Vec<u32> = {
        let mut stepper = Stepper::local(local);
        let mut next = greedy(&stepper.step(0, prompt.clone()).await?);
        let mut out = vec![next];
        for pos in (prompt.len() as u32..).take(args.decoded + after) {
            next = greedy(&stepper.step(pos, vec![next]).await?);
            out.push(next);
        }
        out
    };
    let head = Arc::new(Head::load(&file, args.weights)?);
    let splits = nomoat_scheduler::even_splits(cfg.num_blocks as u32, 3)?;
    let bin = std::env::current_exe()?;
    let mut rows = Vec::new();
    for signal in &args.signals {
        anyhow::ensure!(
            signal == "kill" || signal == "term",
            "--signals takes kill and/or term, not {signal:?}"
        );
        // Three servers and a spare for the middle range.
        let mut procs: Vec<ServeProcess> = Vec::new();
        let ranges = [splits[2], splits[1], splits[0], splits[1]];
        for r in ranges {
            let boot = procs.first().map(|p| p.addr());
            procs.push(crate::cli::bench::bench_server(
                &bin,
                &path_str,
                r,
                &weights,
                &threads,
                boot.as_deref(),
            )?);
        }
        let boot: Vec<Multiaddr> = vec![procs[0].addr().parse()?];
        let client = net::start(NetConfig::default()).await?;
        let servers = crate::cli::bench::discover_at_least(&client, &boot, &model_id, 4).await?;
        // Every server must know the spare before the death.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let max_len = (args.context + args.decoded + after + 2) as u32;
        let route = plan(&client, &model_id, cfg.num_blocks as u32, &servers, max_len)?;
        let session =
            RemoteSession::open(&client, &model_id, route, max_len, Duration::from_secs(60))
                .await?;
        let victim_id = session.route()[1].0.to_string();
        let mut stepper = Stepper::swarm(head.clone(), session);
        let t = Instant::now();
        let logits = stepper.step(0, prompt.clone()).await?;
        let prefill = t.elapsed();
        let mut next = greedy(&logits);
        let mut got = vec![next];
        let mut pos = prompt.len() as u32;
        let mut decode = Vec::new();
        for _ in 0..args.decoded {
            let t = Instant::now();
            let logits = stepper.step(pos, vec![next]).await?;
            decode.push(t.elapsed());
            next = greedy(&logits);
            got.push(next);
            pos += 1;
        }
        decode.sort();
        let decode_step = decode.get(decode.len() / 2).copied().unwrap_or_default();
        // Kill hop 1, whichever of the two it is.
        let victim = procs
            .iter_mut()
            .find(|p| p.peer_id() == victim_id)
            .context("hop 1 is not one of the servers started")?;
        let died = Instant::now();
        if signal == "kill" {
            victim.kill();
        } else {
            std::process::Command::new("kill")
                .args(["-TERM", &victim.child.id().to_string()])
                .status()?;
        }
        let logits = stepper.step(pos, vec![next]).await?;
        let total = died.elapsed();
        next = greedy(&logits);
        got.push(next);
        pos += 1;
        for _ in 1..after {
            next = greedy(&stepper.step(pos, vec![next]).await?);
            got.push(next);
            pos += 1;
        }
        let report = stepper
            .remote()
            .context("a swarm session")?
            .failovers()
            .first()
            .cloned()
            .context("the session did not fail over")?;
        stepper.close().await;
        client.shutdown().await;
        drop(procs);
        let work = report.plan + report.reopen + report.replay;
        let detect = total.saturating_sub(work + decode_step);
        let same = got == expected;
        println!(
            "{signal}: next token {:.0} ms after the death = detection {:.0} + plan {:.0} + reopen {:.0} + replay {:.0} ({} positions in {} steps) + the step again {:.0} (a decode step); prefill of the {} positions took {:.0} ms; tokens match the whole model: {same}",
            ms(total),
            ms(detect),
            ms(report.plan),
            ms(report.reopen),
            ms(report.replay),
            report.replayed_positions,
            report.replayed_steps,
            ms(decode_step),
            args.context,
            ms(prefill),
        );
        rows.push(serde_json::json!({
            "signal": signal,
            "death_to_next_token_ms": ms(total),
            "detection_ms": ms(detect),
            "plan_ms": ms(report.plan),
            "reopen_ms": ms(report.reopen),
            "replay_ms": ms(report.replay),
            "replayed_positions": report.replayed_positions,
            "replayed_steps": report.replayed_steps,
            "decode_step_ms": ms(decode_step),
            "prefill_ms": ms(prefill),
            "tokens_match_whole_model": same,
        }));
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "failover",
            "model": args.model,
            "context": args.context,
            "decoded_before": args.decoded,
            "threads_per_process": args.threads,
            "results": rows,
        })
    );
    Ok(())
}
