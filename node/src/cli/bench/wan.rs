//! `nomoat bench wan`: a swarm of server processes on separate hosts of the
//! network test bed, the client in this process on a host of its own, for a
//! range of one-way link delays (and a loss setting) in one run.
//!
//! For each setting it measures decode tokens/s and the time to first token
//! split into discovery, dialling, opening the session and prefill, cold (a
//! new client node) and warm (the next generation on the same node). From
//! the delays it fits the network legs per token (the slope of time per
//! token against the one-way delay: k+1 for k servers when servers push to
//! each other, 2k when a client relays every hop) and sets each figure
//! against its ceiling: decode at most `1 / ((k+1) d + compute)`, warm time
//! to first token at least `(k+1) d + 2 d + compute`, compute taken from
//! the zero-delay row.
//!
//! Needs root (the bed's namespaces). The last line is one JSON object.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use libp2p::Multiaddr;
use nomoat_node::client::{generate, plan, RemoteSession, Stepper};
use nomoat_node::engine::{
    ChatMessage, ChatTokenizer, GenerateOptions, Head, ModelFile, SamplingParams,
};
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_node::netbed::{Bed, Link};
use nomoat_node::process::ServeProcess;
use nomoat_node::weights::model_file_id;
use nomoat_protocol::DType;

use super::{discover_at_least, median};

/// `nomoat bench wan`.
#[derive(Debug, Args)]
pub(crate) struct BenchWanArgs {
    /// A catalog name or a .gguf file.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// Servers (hosts), each holding an even share of the blocks.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// One-way delays of every link to measure, in milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,10,25,50")]
    delays: Vec<u64>,
    /// A loss setting measured at the `--loss-delay` delay (0: none).
    #[arg(long, default_value_t = 0.01)]
    loss: f64,
    /// The delay of the loss row, in milliseconds.
    #[arg(long, default_value_t = 25)]
    loss_delay: u64,
    /// Tokens decoded per generation.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Warm generations per setting (after the cold one).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Compute threads of each server.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// The dtype hidden states travel in for the delay and loss rows.
    #[arg(long, default_value = "f32", value_parser = crate::parse_wire_dtype)]
    wire_dtype: DType,
    /// Tokens of the long prompt whose prefill is timed in each wire dtype
    /// over rate-limited links (0: skip those rows).
    #[arg(long, default_value_t = 1000)]
    prefill_tokens: usize,
    /// The rate of every link for the prefill rows, in Mbit/s.
    #[arg(long, default_value_t = 20.0)]
    prefill_rate: f64,
    /// The one-way delay of the prefill rows, in milliseconds.
    #[arg(long, default_value_t = 10)]
    prefill_delay: u64,
    /// Wire dtypes of the prefill rows, each against f32 in alternating rounds.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,q8", value_parser = crate::parse_wire_dtype)]
    prefill_dtypes: Vec<DType>,
}

/// One generation's timings, in seconds.
#[derive(Debug, Clone, Default)]
struct Timing {
    discover: f64,
    dial: f64,
    open: f64,
    /// From the first step sent to the first token (prefill and its legs).
    prefill: f64,
    /// Each decode step.
    steps: Vec<f64>,
}

impl Timing {
    fn ttft(&self) -> f64 {
        self.discover + self.dial + self.open + self.prefill
    }
}

/// One generation through the swarm on `net`: discovers, dials the route,
/// opens, then decodes greedily.
#[allow(clippy::too_many_arguments)]
async fn one_generation(
    net: &NetHandle,
    boot: &[Multiaddr],
    model_id: &str,
    head: &Arc<Head>,
    prompt: &[u32],
    tokens: usize,
    n_blocks: u32,
    limit: usize,
    wire: DType,
) -> Result<(Timing, Vec<u32>)> {
    let mut t = Timing::default();
    let start = Instant::now();
    let servers = net::discover(net, boot, model_id).await?;
    t.discover = start.elapsed().as_secs_f64();
    let max_len = (prompt.len() + tokens + 2) as u32;
    let route = plan(net, model_id, n_blocks, &servers, max_len)?;
    let start = Instant::now();
    let peers: Vec<_> = route
        .iter()
        .filter_map(|h| libp2p::PeerId::from_bytes(&h.peer_id).ok())
        .collect();
    futures::future::join_all(peers.iter().map(|p| net.connect_known(*p))).await;
    t.dial = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let session =
        RemoteSession::open(net, model_id, route, max_len, Duration::from_secs(30)).await?;
    t.open = start.elapsed().as_secs_f64();
    let mut stepper = Stepper::swarm(head.clone(), session).with_wire_dtype(wire)?;
    let opts = GenerateOptions {
        max_tokens: tokens + 1,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    };
    let begin = Instant::now();
    let mut last: Option<Instant> = None;
    let (mut prefill, mut steps) = (0.0, Vec::with_capacity(tokens));
    let mut clock = |_| {
        let now = Instant::now();
        match last {
            None => prefill = now.duration_since(begin).as_secs_f64(),
            Some(l) => steps.push(now.duration_since(l).as_secs_f64()),
        }
        last = Some(now);
        Ok(true)
    };
    let result = generate(&mut stepper, prompt, &opts, limit, &mut clock).await;
    stepper.close().await;
    let (out, _) = result?;
    t.prefill = prefill;
    t.steps = steps;
    Ok((t, out))
}

/// Least-squares slope and intercept of `y` against `x`.
fn fit(points: &[(f64, f64)]) -> (f64, f64) {
    let n = points.len() as f64;
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in points {
        num += (x - mx) * (y - my);
        den += (x - mx) * (x - mx);
    }
    let slope = if den > 0.0 { num / den } else { 0.0 };
    (slope, my - slope * mx)
}

/// `nomoat bench wan`: builds the bed and starts the servers here (as
/// root), then moves this thread into the client's host before the
/// network runtime starts, so every socket of the client is on that host.
pub(crate) fn bench_wan(args: BenchWanArgs) -> Result<()> {
    anyhow::ensure!(
        args.servers >= 1 && !args.delays.is_empty(),
        "need at least one server and one delay"
    );
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let n_blocks = file.config().num_blocks as u32;
    let model_id = model_file_id(&path)?;
    let names: Vec<String> = (1..=args.servers).map(|i| format!("s{i}")).collect();
    let mut hosts: Vec<&str> = names.iter().map(String::as_str).collect();
    hosts.push("client");
    let bed = Bed::builder().hosts(&hosts).build()?;
    let bin = std::env::current_exe()?;
    let bin = bin.to_str().context("binary path")?.to_string();
    let path_str = path.to_str().context("model path")?.to_string();
    let splits = nomoat_scheduler::even_splits(n_blocks, args.servers as u32)?;
    let threads = args.threads.max(1).to_string();
    let mut procs: Vec<ServeProcess> = Vec::new();
    let mut boot: Option<String> = None;
    for (name, r) in names.iter().zip(&splits).rev() {
        let ns = bed.host(name).ns.clone();
        let blocks = r.to_string();
        let mut a = vec![
            "netns",
            "exec",
            &ns,
            &bin,
            "serve",
            "--model",
            &path_str,
            "--blocks",
            &blocks,
            "--heartbeat",
            "0.5",
            "--threads",
            &threads,
        ];
        if let Some(b) = &boot {
            a.extend(["--bootstrap", b]);
        }
        let p = ServeProcess::spawn_command(
            std::path::Path::new("ip"),
            &a,
            &[],
            Duration::from_secs(120),
        )?;
        eprintln!("started {name} on {}: blocks {r}", bed.ip(name));
        if boot.is_none() {
            let ip = format!("/ip4/{}/", bed.ip(name));
            boot = p.hello["listen"]
                .as_array()
                .and_then(|l| {
                    l.iter()
                        .filter_map(|a| a.as_str())
                        .find(|a| a.starts_with(&ip) && a.contains("quic"))
                })
                .map(String::from);
        }
        procs.push(p);
    }
    let boot: Vec<Multiaddr> = vec![boot.context("the first server's address")?.parse()?];
    bed.enter("client")?;
    let rt = crate::runtime()?;
    let result = rt.block_on(measure(&args, &bed, &file, &model_id, &boot, n_blocks));
    drop(procs);
    result
}

async fn measure(
    args: &BenchWanArgs,
    bed: &Bed,
    file: &ModelFile,
    model_id: &str,
    boot: &[Multiaddr],
    n_blocks: u32,
) -> Result<()> {
    let tokenizer = ChatTokenizer::from_model(file)?;
    let prompt = tokenizer.encode(&tokenizer.chat_prompt(&[ChatMessage::new(
        "user",
        "Tell me about the history of Paris.",
    )]))?;
    let head = Arc::new(Head::load(file, nomoat_node::engine::WeightMode::Fast)?);
    let limit = file.config().max_seq_len;
    let k = args.servers as f64;
    {
        // Wait until every server is heard, on ideal links.
        let net = net::start(NetConfig::default()).await?;
        discover_at_least(&net, boot, model_id, args.servers).await?;
        net.shutdown().await;
    }
    let mut settings: Vec<(u64, f64)> = args.delays.iter().map(|&d| (d, 0.0)).collect();
    if args.loss > 0.0 {
        settings.push((args.loss_delay, args.loss));
    }
    let mut rows = Vec::new();
    let mut reference: Option<Vec<u32>> = None;
    let mut fit_points = Vec::new();
    let (mut compute_step, mut compute_prefill) = (None, None);
    for (delay, loss) in settings {
        bed.set_all_links(Link::delay_ms(delay).loss(loss));
        let d = delay as f64 / 1e3;
        let net = net::start(NetConfig::default()).await?;
        net.subscribe(model_id).await;
        let mut runs = Vec::new();
        let mut same = true;
        for _ in 0..=args.rounds {
            let (t, out) = one_generation(
                &net,
                boot,
                model_id,
                &head,
                &prompt,
                args.tokens,
                n_blocks,
                limit,
                args.wire_dtype,
            )
            .await?;
            same &= reference.get_or_insert_with(|| out.clone()) == &out;
            runs.push(t);
        }
        net.shutdown().await;
        let cold = runs[0].clone();
        let warm = &runs[1..];
        let step = median(runs.iter().flat_map(|t| t.steps.clone()).collect());
        let warm_of = |f: fn(&Timing) -> f64| median(warm.iter().map(f).collect());
        let (w_dial, w_open, w_prefill) = (
            warm_of(|t| t.dial),
            warm_of(|t| t.open),
            warm_of(|t| t.prefill),
        );
        let w_ttft = w_open + w_prefill;
        if loss == 0.0 {
            fit_points.push((d, step));
            if delay == 0 {
                compute_step = Some(step);
                compute_prefill = Some(w_prefill);
            }
        }
        let step_ceiling = compute_step.map(|c| (k + 1.0) * d + c);
        let ttft_floor = compute_prefill.map(|c| (k + 1.0) * d + 2.0 * d + c);
        let ms = |s: f64| (s * 1e4).round() / 10.0;
        println!(
            "delay {delay} ms, loss {:.1}%: decode {:.1} tokens/s{}; first token cold {:.0} ms \
             (discover {:.0}, dial {:.0}, open {:.0}, prefill {:.0}), warm {:.0} ms (open {:.0}, \
             prefill {:.0}){}; tokens match: {same}",
            loss * 100.0,
            1.0 / step,
            step_ceiling
                .map(|c| format!(" = {:.2}x the k+1 ceiling {:.1}", c / step, 1.0 / c))
                .unwrap_or_default(),
            cold.ttft() * 1e3,
            cold.discover * 1e3,
            cold.dial * 1e3,
            cold.open * 1e3,
            cold.prefill * 1e3,
            w_ttft * 1e3,
            w_open * 1e3,
            w_prefill * 1e3,
            ttft_floor
                .map(|f| format!(" vs floor {:.0} ms", f * 1e3))
                .unwrap_or_default(),
        );
        rows.push(serde_json::json!({
            "one_way_delay_ms": delay,
            "loss": loss,
            "decode_tokens_per_s": 1.0 / step,
            "step_ms": ms(step),
            "ceiling_tokens_per_s": step_ceiling.map(|c| 1.0 / c),
            "ratio_vs_ceiling": step_ceiling.map(|c| c / step),
            "cold": {
                "ttft_ms": ms(cold.ttft()),
                "discover_ms": ms(cold.discover),
                "dial_ms": ms(cold.dial),
                "open_ms": ms(cold.open),
                "prefill_ms": ms(cold.prefill),
            },
            "warm": {
                "ttft_ms": ms(w_ttft),
                "dial_ms": ms(w_dial),
                "open_ms": ms(w_open),
                "prefill_ms": ms(w_prefill),
                "floor_ms": ttft_floor.map(ms),
                "ratio_vs_floor": ttft_floor.map(|f| w_ttft / f),
            },
            "tokens_match": same,
        }));
    }
    let prefill = if args.prefill_tokens > 0 {
        prefill_rows(args, bed, file, model_id, boot, n_blocks, &head).await?
    } else {
        serde_json::Value::Null
    };
    let (legs, intercept) = fit(&fit_points);
    if fit_points.len() >= 2 {
        println!(
            "network legs per token: {legs:.2} (k+1 = {}, a client relaying every hop: 2k = {}); \
             compute per token {:.1} ms",
            args.servers + 1,
            2 * args.servers,
            intercept * 1e3
        );
    } else {
        println!("network legs per token: not fitted (give --delays two values or more)");
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "wan",
            "model": args.model,
            "servers": args.servers,
            "tokens": args.tokens,
            "wire_dtype": args.wire_dtype.name(),
            "prompt_tokens": prompt.len(),
            "legs_per_token": legs,
            "legs_expected": args.servers + 1,
            "legs_ratio": legs / (k + 1.0),
            "compute_per_token_ms": intercept * 1e3,
            "rows": rows,
            "prefill": prefill,
        })
    );
    Ok(())
}

/// Times the prefill of a long prompt over rate-limited links in each wire
/// dtype, rounds alternating the dtypes on one client node and one route.
/// Each dtype's first token is compared with f32's.
#[allow(clippy::too_many_arguments)]
async fn prefill_rows(
    args: &BenchWanArgs,
    bed: &Bed,
    file: &ModelFile,
    model_id: &str,
    boot: &[Multiaddr],
    n_blocks: u32,
    head: &Arc<Head>,
) -> Result<serde_json::Value> {
    let vocab = file.config().vocab_size as u32;
    let n = args.prefill_tokens.min(file.config().max_seq_len - 2);
    // Ordinary text ids, deterministic: a long document's worth.
    let prompt: Vec<u32> = (0..n as u32)
        .map(|i| 100 + (i * 7919) % (vocab - 200))
        .collect();
    let link = Link::delay_ms(args.prefill_delay).rate_mbit(args.prefill_rate);
    bed.set_all_links(link);
    let net = net::start(NetConfig::default()).await?;
    net.subscribe(model_id).await;
    let servers = net::discover(&net, boot, model_id).await?;
    let max_len = (n + 2) as u32;
    let route = plan(&net, model_id, n_blocks, &servers, max_len)?;
    let mut dtypes = args.prefill_dtypes.clone();
    if !dtypes.contains(&DType::F32) {
        dtypes.insert(0, DType::F32);
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); dtypes.len()];
    let mut firsts: Vec<Option<u32>> = vec![None; dtypes.len()];
    eprintln!(
        "prefill of {n} tokens at {} Mbit/s, {} ms one way: {} rounds of {}",
        args.prefill_rate,
        args.prefill_delay,
        args.rounds.max(1),
        dtypes
            .iter()
            .map(|d| d.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // One unmeasured pass warms the connections' congestion windows.
    for round in 0..=args.rounds.max(1) {
        for (i, &dtype) in dtypes.iter().enumerate() {
            let session = RemoteSession::open(
                &net,
                model_id,
                route.clone(),
                max_len,
                Duration::from_secs(120),
            )
            .await?;
            let mut stepper = Stepper::swarm(head.clone(), session).with_wire_dtype(dtype)?;
            let start = Instant::now();
            let logits = stepper.step(0, prompt.clone()).await;
            let secs = start.elapsed().as_secs_f64();
            stepper.close().await;
            let logits = logits?;
            let top = logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(id, _)| id as u32);
            firsts[i] = top;
            if round > 0 {
                times[i].push(secs);
            }
        }
    }
    // The same prefill on ideal links: compute and framing alone.
    bed.set_all_links(Link::IDEAL);
    let mut ideal = Vec::new();
    for _ in 0..2 {
        let session = RemoteSession::open(
            &net,
            model_id,
            route.clone(),
            max_len,
            Duration::from_secs(120),
        )
        .await?;
        let mut stepper = Stepper::swarm(head.clone(), session);
        let start = Instant::now();
        let r = stepper.step(0, prompt.clone()).await;
        ideal.push(start.elapsed().as_secs_f64());
        stepper.close().await;
        r?;
    }
    let ideal = median(ideal);
    println!(
        "prefill {n} tokens on ideal links (compute alone): {:.0} ms",
        ideal * 1e3
    );
    net.shutdown().await;
    let hidden = file.config().hidden_size;
    let f32_time = median(times[0].clone());
    // The links' share: the prefill less the same prefill on ideal links.
    let f32_net = (f32_time - ideal).max(1e-3);
    let mut rows = Vec::new();
    for (i, &dtype) in dtypes.iter().enumerate() {
        let t = median(times[i].clone());
        let net = (t - ideal).max(1e-3);
        let bytes_per_leg = n / dtype.block_len() * hidden * dtype.block_bytes();
        let same = firsts[i] == firsts[0];
        println!(
            "prefill {n} tokens over {} Mbit/s, {} ms one way, wire {dtype}: {:.0} ms, \
             {:.2}x f32; the links' share {:.0} ms, {:.2}x f32's; {:.2} MB per leg; \
             first token matches f32: {same}",
            args.prefill_rate,
            args.prefill_delay,
            t * 1e3,
            f32_time / t,
            net * 1e3,
            f32_net / net,
            bytes_per_leg as f64 / 1e6,
        );
        rows.push(serde_json::json!({
            "dtype": dtype.name(),
            "prefill_ms": (t * 1e4).round() / 10.0,
            "speedup_vs_f32": f32_time / t,
            "links_share_ms": (net * 1e4).round() / 10.0,
            "links_share_speedup_vs_f32": f32_net / net,
            "bytes_per_leg": bytes_per_leg,
            "first_token_matches_f32": same,
        }));
    }
    Ok(serde_json::json!({
        "tokens": n,
        "rate_mbit": args.prefill_rate,
        "one_way_delay_ms": args.prefill_delay,
        "ideal_links_ms": (ideal * 1e4).round() / 10.0,
        "rows": rows,
    }))
}
