//! `nomoat bench verify`: how spot checks fare against lying servers, what
//! they cost honest ones, and what a server gains by boasting.
//!
//! Five server processes on loopback share the model: A, B and C (one
//! thread each) cut it in three overlapping spans, D (two threads) holds
//! it whole, and L serves B's span and lies as each scenario says. A trial
//! is one greedy generation through A, L and C by a client that has never
//! met L (so L is on probation), or with every hop checked at a fixed rate
//! (the floor a long honest record falls to).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use libp2p::{Multiaddr, PeerId};
use nomoat_node::client::verify::{VerifyMode, VerifyOptions};
use nomoat_node::client::{generate, plan, RemoteSession, StepError, Stepper, TokenSink};
use nomoat_node::engine::{
    GenerateOptions, Head, LocalModel, ModelFile, SamplingParams, WeightMode,
};
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_node::process::ServeProcess;
use nomoat_node::weights::model_file_id;
use nomoat_protocol::{BlockRange, Hop, ServerInfo};

/// `nomoat bench verify`.
#[derive(Debug, Args)]
pub(crate) struct BenchVerifyArgs {
    /// A catalog name, a .gguf file or a safetensors directory.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Trials per lie and rate.
    #[arg(long, default_value_t = 5)]
    trials: usize,
    /// Tokens generated per trial.
    #[arg(long, default_value_t = 100)]
    tokens: usize,
    /// The lies to try, separated by `;` (see the serve flag
    /// --fault-compute: perturb, perturb:SCALE or skip, then ,after=N ,rate=P).
    #[arg(
        long,
        default_value = "perturb:0.5;perturb:0.5,rate=0.05;perturb:0.5,after=50;skip"
    )]
    lies: String,
    /// Fixed check rates to try besides a new client's (probation).
    #[arg(long, value_delimiter = ',', default_value = "0.25")]
    rates: Vec<f64>,
    /// Honest generations with every hop checked (for false positives)
    /// and the same number with checks off and at the default floor rate
    /// (for the cost), alternating.
    #[arg(long, default_value_t = 4)]
    honest: usize,
    /// fast, compact, exact or f32.
    #[arg(long, default_value = "fast")]
    weights: WeightMode,
}

/// The benchmark's swarm: A, B, C, D and L (L is replaced per lie).
struct Swarm {
    procs: Vec<ServeProcess>,
    peers: Vec<PeerId>,
    boot: Vec<Multiaddr>,
}

const SPANS: [(u32, u32); 4] = [(0, 16), (8, 24), (14, 30), (0, 30)];

fn spans(n: u32) -> Vec<BlockRange> {
    // The 30-block layout, scaled to the model's blocks.
    SPANS
        .iter()
        .map(|&(a, b)| BlockRange {
            start: a * n / 30,
            end: (b * n / 30).max(a * n / 30 + 1),
        })
        .collect()
}

fn start(
    bin: &std::path::Path,
    model: &str,
    r: BlockRange,
    weights: &str,
    threads: &str,
    boot: Option<&str>,
    fault: Option<&str>,
) -> Result<ServeProcess> {
    let extra: Vec<&str> = fault
        .map(|f| vec!["--fault-compute", f])
        .unwrap_or_default();
    crate::cli::bench::bench_server_with(bin, model, r, weights, threads, boot, &extra)
}

/// Collects tokens and when each rewind came.
#[derive(Default)]
struct Sink {
    tokens: Vec<u32>,
    /// (tokens kept, tokens handed out before it).
    rewinds: Vec<(usize, usize)>,
    handed: usize,
}

impl TokenSink for Sink {
    async fn token(&mut self, id: u32) -> Result<bool, StepError> {
        self.tokens.push(id);
        self.handed += 1;
        Ok(true)
    }

    async fn rewind(&mut self, keep: usize, _liar: PeerId) -> Result<(), StepError> {
        self.rewinds.push((keep, self.handed));
        self.tokens.truncate(keep);
        Ok(())
    }
}

struct Run {
    tokens: Vec<u32>,
    sink: Sink,
    secs: f64,
    summary: nomoat_node::client::verify::CheckSummary,
    main_positions: u64,
}

#[allow(clippy::too_many_arguments)]
async fn run_once(
    net: &NetHandle,
    model_id: &str,
    head: &Arc<Head>,
    route: Vec<Hop>,
    prompt: &[u32],
    tokens: usize,
    verify: VerifyOptions,
) -> Result<Run> {
    let max_len = (prompt.len() + tokens + 2) as u32;
    let mut session = RemoteSession::open(net, model_id, route, max_len, Duration::from_secs(60))
        .await
        .context("opening a session")?;
    session.set_verify(verify);
    let mut stepper = Stepper::swarm(head.clone(), session);
    let opts = GenerateOptions {
        max_tokens: tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    };
    let mut sink = Sink::default();
    let t = Instant::now();
    let (out, _) = generate(&mut stepper, prompt, &opts, max_len as usize, &mut sink).await?;
    let secs = t.elapsed().as_secs_f64();
    let remote = stepper.remote().context("a swarm session")?;
    let summary = remote.check_summary();
    let route_now = remote.route();
    let blocks: u64 = route_now
        .iter()
        .map(|(_, b)| u64::from(b.end - b.start))
        .sum();
    let main_positions = (prompt.len() + out.len()) as u64 * blocks;
    stepper.close().await;
    Ok(Run {
        tokens: out,
        sink,
        secs,
        summary,
        main_positions,
    })
}

fn hop(peer: PeerId, start: u32, end: u32) -> Hop {
    Hop {
        peer_id: peer.to_bytes(),
        blocks: BlockRange { start, end },
    }
}

async fn client(
    boot: &[Multiaddr],
    model_id: &str,
    n: usize,
) -> Result<(NetHandle, Vec<ServerInfo>)> {
    let net = net::start(NetConfig::default()).await?;
    net.subscribe(model_id).await;
    let found = crate::cli::bench::discover_at_least(&net, boot, model_id, n).await?;
    Ok((net, found))
}

pub(crate) async fn bench_verify(args: BenchVerifyArgs) -> Result<()> {
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let cfg = file.config().clone();
    let n = cfg.num_blocks as u32;
    anyhow::ensure!(n >= 6, "the model needs at least 6 blocks");
    let model_id = model_file_id(&path)?;
    let path_str = path.to_string_lossy().to_string();
    let weights = format!("{:?}", args.weights).to_lowercase();
    let bin = std::env::current_exe()?;
    let tok = nomoat_node::engine::ChatTokenizer::from_model(&file)?;
    let prompt = tok.encode(&tok.chat_prompt(&[nomoat_node::engine::ChatMessage::new(
        "user",
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    )]))?;
    let s = spans(n);
    let (a, b, c) = (s[0], s[1], s[2]);
    eprintln!(
        "starting A {a}, B {b}, C {c} (1 thread each) and D {} (2 threads)",
        s[3]
    );
    let mut swarm = Swarm {
        procs: Vec::new(),
        peers: Vec::new(),
        boot: Vec::new(),
    };
    for (i, r) in s.iter().enumerate() {
        let boot = swarm.procs.first().map(|p| p.addr());
        let threads = if i == 3 { "2" } else { "1" };
        let p = start(
            &bin,
            &path_str,
            *r,
            &weights,
            threads,
            boot.as_deref(),
            None,
        )?;
        swarm.peers.push(p.peer_id().parse()?);
        swarm.procs.push(p);
    }
    swarm.boot = vec![swarm.procs[0].addr().parse()?];
    let head = Arc::new(Head::load(&file, args.weights)?);
    // The whole model's text, which every trial must end with.
    let local = LocalModel::load_whole(&file, args.weights)?;
    let opts = GenerateOptions {
        max_tokens: args.tokens,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    };
    let want = local.generate(&prompt, &opts, |_| Ok(true))?.0;
    drop(local);
    let [pa, pb, pc, _pd] = [
        swarm.peers[0],
        swarm.peers[1],
        swarm.peers[2],
        swarm.peers[3],
    ];
    let honest_route = || {
        vec![
            hop(pa, a.start, b.start),
            hop(pb, b.start, c.start),
            hop(pc, c.start, n),
        ]
    };

    // 1. Honest servers: every hop checked (false positives), then checks
    //    off against the floor rate, alternating (the cost).
    let (net, _) = client(&swarm.boot, &model_id, 4).await?;
    let (mut rows, mut disagreements, mut equal) = (0u64, 0u64, 0usize);
    let (mut off_secs, mut floor_secs, mut shadow, mut main) = (Vec::new(), Vec::new(), 0u64, 0u64);
    for i in 0..args.honest {
        let strict = VerifyOptions::new(VerifyMode::Strict);
        let r = run_once(
            &net,
            &model_id,
            &head,
            honest_route(),
            &prompt,
            args.tokens,
            strict,
        )
        .await?;
        rows += r.summary.agreed_rows;
        disagreements += r.summary.disagreements;
        equal += usize::from(r.tokens == want);
        let off = VerifyOptions::new(VerifyMode::Off);
        let floor = VerifyOptions {
            fixed_rate: Some(nomoat_scheduler::DEFAULT_CHECK_FLOOR),
            ..VerifyOptions::new(VerifyMode::Async)
        };
        let order = if i % 2 == 0 {
            [off, floor]
        } else {
            [floor, off]
        };
        for o in order {
            let r = run_once(
                &net,
                &model_id,
                &head,
                honest_route(),
                &prompt,
                args.tokens,
                o,
            )
            .await?;
            if o.mode == VerifyMode::Off {
                off_secs.push(r.secs);
            } else {
                floor_secs.push(r.secs);
                shadow += r.summary.shadow_positions * u64::from(n) / r.summary.hops.max(1) as u64;
                main += r.main_positions;
            }
        }
        eprintln!("honest round {} of {}", i + 1, args.honest);
    }
    let med = |v: &[f64]| crate::cli::bench::median(v.to_vec());
    println!("honest servers (A, B, C at 1 thread; shadows on D at 2 threads or the overlaps):");
    println!(
        "  strict checks: {rows} outputs compared, {disagreements} disagreements; text equal to the whole model's in {equal} of {}",
        args.honest
    );
    println!(
        "  checks at the floor rate {}: generation {:.2} s vs {:.2} s off (median, alternating): {:.2}x the time; shadows re-ran {:.1}% of the block-positions",
        nomoat_scheduler::DEFAULT_CHECK_FLOOR,
        med(&floor_secs),
        med(&off_secs),
        med(&floor_secs) / med(&off_secs).max(1e-9),
        100.0 * shadow as f64 / main.max(1) as f64,
    );
    net.shutdown().await;

    // 2. Each lie: trials by new clients (probation), then at fixed rates.
    let lies: Vec<&str> = args.lies.split(';').filter(|l| !l.is_empty()).collect();
    println!(
        "lying replica L of {b}, on the route A {}..{} -> L {}..{} -> C {}..{n}:",
        a.start, b.start, b.start, c.start, c.start
    );
    for lie in &lies {
        let boot = Some(swarm.procs[0].addr());
        let spec = format!("{lie},boast=1000");
        let liar = start(
            &bin,
            &path_str,
            b,
            &weights,
            "1",
            boot.as_deref(),
            Some(&spec),
        )?;
        let pl: PeerId = liar.peer_id().parse()?;
        let route = || {
            vec![
                hop(pa, a.start, b.start),
                hop(pl, b.start, c.start),
                hop(pc, c.start, n),
            ]
        };
        let mut rates: Vec<Option<f64>> = vec![None];
        rates.extend(args.rates.iter().map(|r| Some(*r)));
        for rate in rates {
            let (mut caught, mut right, mut at, mut failed) = (0usize, 0usize, Vec::new(), 0usize);
            for _ in 0..args.trials {
                let (net, _) = client(&swarm.boot, &model_id, 5).await?;
                let v = VerifyOptions {
                    fixed_rate: rate,
                    ..VerifyOptions::new(VerifyMode::Async)
                };
                let r = match run_once(&net, &model_id, &head, route(), &prompt, args.tokens, v)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("a trial failed: {e:#}");
                        failed += 1;
                        net.shutdown().await;
                        continue;
                    }
                };
                if net.is_banned(&pl) {
                    caught += 1;
                    // Tokens handed out when the first rewind came.
                    at.extend(r.sink.rewinds.first().map(|(_, handed)| *handed as f64));
                }
                right += usize::from(r.tokens == want && r.sink.tokens == want);
                net.shutdown().await;
            }
            let what = rate.map_or("new client (probation)".to_string(), |r| {
                format!("check rate {r}")
            });
            println!(
                "  {lie:<28} {what:<24} caught in {caught} of {} trials (median {:.0} tokens in); final text equal to the whole model's in {right} of {}; {failed} failed",
                args.trials,
                med(&at),
                args.trials,
            );
        }
        // 3. Routing: L announces 1000x its throughput. A client that has
        //    measured A, B and C routes through it only on its probing share,
        //    and never once it has caught it.
        let (net, found) = client(&swarm.boot, &model_id, 5).await?;
        let r = run_once(
            &net,
            &model_id,
            &head,
            honest_route(),
            &prompt,
            4,
            VerifyOptions::new(VerifyMode::Off),
        )
        .await?;
        drop(r);
        let share = |net: &NetHandle, found: &[ServerInfo]| -> Result<f64> {
            let mut via = 0;
            for _ in 0..1000 {
                let r = plan(net, &model_id, n, found, 64)?;
                via += usize::from(r.iter().any(|h| h.peer_id == pl.to_bytes()));
            }
            Ok(via as f64 / 1000.0)
        };
        let before = share(&net, &found)?;
        let v = VerifyOptions::new(VerifyMode::Async);
        let _ = run_once(
            &net,
            &model_id,
            &head,
            route(),
            &prompt,
            args.tokens.min(30),
            v,
        )
        .await?;
        let after = share(&net, &found)?;
        println!(
            "  {lie:<28} boasting 1000x: {:.1}% of planned routes use L before it is measured or checked, {:.1}% once caught (banned: {})",
            100.0 * before,
            100.0 * after,
            net.is_banned(&pl)
        );
        net.shutdown().await;
        drop(liar);
    }
    drop(swarm);
    Ok(())
}
