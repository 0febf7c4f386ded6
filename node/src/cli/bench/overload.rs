//! `nomoat bench overload`: one server process filled to its session
//! capacity, then asked for ten times as many sessions, and then flooded
//! with fresh identities announcing themselves. Prints what newcomers got,
//! the open sessions' step times before and during the flood, and the
//! server's memory against what it was configured to use.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use nomoat_node::client::RemoteSession;
use nomoat_node::engine::{hidden_to_frame, Head, ModelFile, WeightMode};
use nomoat_node::net::wire::{read_message, write_message};
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_protocol::{
    BlockRange, DType, ErrorCode, Hop, InferMessage, OpenSession, Reachability, ServerInfo,
    SessionId, INFER_PROTOCOL,
};

use super::discover_at_least;

/// `nomoat bench overload`.
#[derive(Debug, Args)]
pub(crate) struct BenchOverloadArgs {
    /// A catalog name, a .gguf file or a safetensors directory.
    #[arg(long, default_value = "smollm2-135m")]
    model: String,
    /// The server's session capacity (--max-sessions); that many sessions
    /// are opened and kept stepping.
    #[arg(long, default_value_t = 8)]
    sessions: usize,
    /// Newcomers asking for a session at once, as a multiple of the
    /// capacity.
    #[arg(long, default_value_t = 10)]
    factor: usize,
    /// Decode steps each open session runs per phase.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// The server's --kv-memory.
    #[arg(long, default_value = "256MiB", value_parser = crate::parse_size)]
    kv_memory: u64,
    /// Positions each session reserves.
    #[arg(long, default_value_t = 512)]
    max_length: u32,
    /// The server's compute threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Fresh identities that then announce themselves to the server, a
    /// batch at a time (0: skip that part).
    #[arg(long, default_value_t = 10_000)]
    identities: usize,
    /// Identities alive at once during the announcement flood.
    #[arg(long, default_value_t = 100)]
    batch: usize,
}

/// Resident and peak memory of a process, bytes (Linux).
fn rss(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// The `q`-quantile of `v` (sorted in place), seconds.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// What the newcomers got.
#[derive(Debug, Default)]
struct Outcomes {
    busy: AtomicU64,
    opened: AtomicU64,
    other: AtomicU64,
    message: std::sync::Mutex<Option<String>>,
    /// The first answer that was neither busy nor opened.
    other_example: std::sync::Mutex<Option<String>>,
}

/// One attempt to open a session, as a client's first message: `Open` on
/// a new stream, and the server's answer.
async fn try_open(net: &NetHandle, server: PeerId, model_id: &str, n: u32, out: &Outcomes) {
    let attempt = async {
        let mut s = net
            .control()
            .open_stream(server, StreamProtocol::new(INFER_PROTOCOL))
            .await
            .ok()?;
        let open = InferMessage::Open(OpenSession {
            session_id: SessionId(rand::random()),
            model_id: model_id.to_string(),
            route: vec![Hop {
                peer_id: server.to_bytes(),
                blocks: BlockRange { start: 0, end: n },
            }],
            hop_index: 0,
            max_length: 64,
            adapter: None,
        });
        write_message(&mut s, &open).await.ok()?;
        read_message(&mut s).await.ok()?
    };
    match tokio::time::timeout(Duration::from_secs(10), attempt).await {
        Ok(Some(InferMessage::Error(e))) if e.code == Some(ErrorCode::Busy) => {
            out.busy.fetch_add(1, Ordering::Relaxed);
            let mut m = out.message.lock().unwrap_or_else(|p| p.into_inner());
            m.get_or_insert(e.message);
        }
        Ok(Some(InferMessage::Opened { .. })) => {
            out.opened.fetch_add(1, Ordering::Relaxed);
        }
        other => {
            out.other.fetch_add(1, Ordering::Relaxed);
            let mut m = out.other_example.lock().unwrap_or_else(|p| p.into_inner());
            m.get_or_insert_with(|| match other {
                Ok(Some(msg)) => format!("{msg:?}"),
                Ok(None) => "no answer".into(),
                Err(_) => "no answer within 10 s".into(),
            });
        }
    };
}

/// Steps every session `steps` times at once; returns each step's time.
async fn step_all(
    sessions: Vec<(RemoteSession, u32)>,
    head: &Head,
    steps: usize,
) -> Result<(Vec<f64>, Vec<(RemoteSession, u32)>)> {
    let frame = hidden_to_frame(&head.embed(&[42])?, DType::F32)?;
    let tasks = sessions.into_iter().map(|(mut s, mut pos)| {
        let frame = frame.clone();
        async move {
            let mut times = Vec::with_capacity(steps);
            for _ in 0..steps {
                let t = Instant::now();
                s.step(pos, frame.clone()).await?;
                times.push(t.elapsed().as_secs_f64());
                pos += 1;
            }
            anyhow::Ok((times, (s, pos)))
        }
    });
    let mut all = Vec::new();
    let mut back = Vec::new();
    for r in futures::future::join_all(tasks).await {
        let (t, s) = r?;
        all.extend(t);
        back.push(s);
    }
    Ok((all, back))
}

pub(crate) async fn bench_overload(args: BenchOverloadArgs) -> Result<()> {
    anyhow::ensure!(args.sessions >= 1, "--sessions must be at least 1");
    let path = nomoat_node::catalog::resolve(&args.model, true)?;
    let file = ModelFile::open(&path)?;
    let n = file.config().num_blocks as u32;
    let hidden = file.config().hidden_size as u32;
    let model_id = nomoat_node::weights::model_file_id(&path)?;
    let bin = std::env::current_exe()?;
    let blocks = format!("0..{n}");
    let cap = args.sessions.to_string();
    let kv = args.kv_memory.to_string();
    let threads = args.threads.max(1).to_string();
    let path_str = path.to_string_lossy().to_string();
    let server = nomoat_node::process::ServeProcess::spawn(
        &bin,
        &[
            "--model",
            &path_str,
            "--blocks",
            &blocks,
            "--max-sessions",
            &cap,
            "--max-sessions-per-peer",
            &cap,
            "--kv-memory",
            &kv,
            "--threads",
            &threads,
            "--heartbeat",
            "0.5",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
        ],
        Duration::from_secs(120),
    )?;
    let pid = server.child.id();
    let boot: Multiaddr = server.addr().parse()?;
    let server_peer: PeerId = server.peer_id().parse()?;
    eprintln!("server {server_peer}: {blocks}, capacity {cap} sessions, --kv-memory {kv} bytes");

    let client = net::start(NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
        ..NetConfig::default()
    })
    .await?;
    discover_at_least(&client, std::slice::from_ref(&boot), &model_id, 1).await?;
    let head = Head::load(&file, WeightMode::Fast)?;
    let route = vec![Hop {
        peer_id: server_peer.to_bytes(),
        blocks: BlockRange { start: 0, end: n },
    }];
    let mut sessions = Vec::new();
    for _ in 0..args.sessions {
        let s = RemoteSession::open(
            &client,
            &model_id,
            route.clone(),
            args.max_length,
            Duration::from_secs(30),
        )
        .await?;
        sessions.push((s, 0u32));
    }
    // Warm up (prefill one position each), then the idle phase.
    let (_, sessions) = step_all(sessions, &head, 1).await?;
    let (rss_loaded, _) = rss(pid).context("the server's /proc status")?;
    let (mut idle, sessions) = step_all(sessions, &head, args.steps).await?;

    // Newcomers: factor x capacity at once, from several peers, each
    // asking again as soon as it is answered, while the sessions step.
    let newcomers = args.sessions * args.factor.max(1);
    let peers = 10.min(newcomers);
    let mut nets = Vec::new();
    for _ in 0..peers {
        let n = net::start(NetConfig {
            listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
            ..NetConfig::default()
        })
        .await?;
        n.dial(boot.clone()).await?;
        nets.push(n);
    }
    let outcomes = Arc::new(Outcomes::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for i in 0..newcomers {
        let (net, out, stop, id) = (
            nets[i % peers].clone(),
            outcomes.clone(),
            stop.clone(),
            model_id.clone(),
        );
        flood.push(tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                try_open(&net, server_peer, &id, n, &out).await;
            }
        }));
    }
    let peak_sampler = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut peak = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Some((now, _)) = rss(pid) {
                    peak = peak.max(now);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flood_start = Instant::now();
    let (mut busy_times, sessions) = step_all(sessions, &head, args.steps).await?;
    let flood_secs = flood_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for f in flood {
        let _ = f.await;
    }
    let peak_flood = peak_sampler.await.unwrap_or(0);
    for n in nets {
        n.shutdown().await;
    }
    let busy = outcomes.busy.load(Ordering::Relaxed);
    let opened = outcomes.opened.load(Ordering::Relaxed);
    let other = outcomes.other.load(Ordering::Relaxed);
    let message = outcomes
        .message
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    let (p50_idle, p99_idle) = (quantile(&mut idle, 0.5), quantile(&mut idle, 0.99));
    let (p50_busy, p99_busy) = (
        quantile(&mut busy_times, 0.5),
        quantile(&mut busy_times, 0.99),
    );
    println!(
        "sessions at capacity: {}; newcomers at once: {newcomers} ({}x) from {peers} peers",
        args.sessions, args.factor
    );
    let other_example = outcomes
        .other_example
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default();
    println!(
        "newcomers' answers in {flood_secs:.1} s: {busy} busy, {opened} opened, {other} other; busy says: {message:?}"
    );
    if other > 0 {
        println!("the first other answer: {other_example}");
    }
    println!(
        "open sessions' decode step: idle p50 {:.1} ms p99 {:.1} ms; under the flood p50 {:.1} ms p99 {:.1} ms: p99 {:.2}x idle",
        p50_idle * 1e3,
        p99_idle * 1e3,
        p50_busy * 1e3,
        p99_busy * 1e3,
        p99_busy / p99_idle.max(1e-9)
    );
    println!(
        "server memory: {:.0} MiB with the sessions open, {:.0} MiB at most under the flood ({:+.1} MiB); its KV budget is {:.0} MiB",
        mib(rss_loaded),
        mib(peak_flood),
        mib(peak_flood) - mib(rss_loaded),
        mib(args.kv_memory)
    );
    if opened > 0 {
        bail!("{opened} newcomers were given a session past the server's capacity");
    }

    let mut identities_report = serde_json::Value::Null;
    if args.identities > 0 {
        let (before, _) = rss(pid).context("the server's /proc status")?;
        let t = Instant::now();
        let (mut announced, mut failed) = (0usize, 0usize);
        let mut peak = before;
        let mut done = 0usize;
        while done < args.identities {
            let k = args.batch.max(1).min(args.identities - done);
            let batch = futures::future::join_all((0..k).map(|i| {
                let (boot, id) = (boot.clone(), model_id.clone());
                async move { fake_identity(boot, &id, n, hidden, i as u32).await }
            }))
            .await;
            for r in batch {
                match r {
                    Ok(net) => {
                        announced += 1;
                        net.shutdown().await;
                    }
                    Err(_) => failed += 1,
                }
            }
            done += k;
            if let Some((now, _)) = rss(pid) {
                peak = peak.max(now);
            }
            if done % 1000 < k {
                eprintln!("{done} identities so far; server RSS {:.0} MiB", mib(peak));
            }
        }
        // The table the flood fed, as a client sees it now.
        let known = net::discover(&client, std::slice::from_ref(&boot), &model_id)
            .await
            .map(|v| v.len())
            .unwrap_or(0);
        let (after, _) = rss(pid).unwrap_or((0, 0));
        println!(
            "{} fresh identities ({announced} announced, {failed} could not connect) in {:.0} s: server RSS {:.0} MiB before, at most {:.0} MiB ({:+.1} MiB), {:.0} MiB after; it answers with {known} servers (at most {} by design)",
            args.identities,
            t.elapsed().as_secs_f64(),
            mib(before),
            mib(peak),
            mib(peak) - mib(before),
            mib(after),
            nomoat_protocol::MAX_INFO_SERVERS
        );
        identities_report = serde_json::json!({
            "identities": args.identities,
            "announced": announced,
            "failed": failed,
            "rss_before_mib": mib(before),
            "rss_peak_mib": mib(peak),
            "rss_after_mib": mib(after),
            "servers_answered": known,
        });
    }
    // The open sessions still work after all of it.
    let (_, sessions) = step_all(sessions, &head, 1).await?;
    for (s, _) in sessions {
        s.close().await;
    }
    client.shutdown().await;
    drop(server);
    println!(
        "{}",
        serde_json::json!({
            "sessions": args.sessions,
            "newcomers": newcomers,
            "busy": busy,
            "opened": opened,
            "other": other,
            "step_ms": {"idle_p50": p50_idle * 1e3, "idle_p99": p99_idle * 1e3,
                        "flood_p50": p50_busy * 1e3, "flood_p99": p99_busy * 1e3},
            "p99_ratio": p99_busy / p99_idle.max(1e-9),
            "rss_mib": {"loaded": mib(rss_loaded), "flood_peak": mib(peak_flood)},
            "kv_memory_mib": mib(args.kv_memory),
            "identity_flood": identities_report,
        })
    );
    Ok(())
}

/// A node with a fresh identity that joins through `boot` and announces
/// itself as a server of one block of `model_id`; returned once the
/// announcement has had time to reach the server.
async fn fake_identity(
    boot: Multiaddr,
    model_id: &str,
    n: u32,
    hidden: u32,
    i: u32,
) -> Result<NetHandle> {
    let net = net::start(NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
        bootstrap: vec![boot],
        heartbeat: Duration::from_millis(300),
        ..NetConfig::default()
    })
    .await?;
    let joined = async {
        net.subscribe(model_id).await;
        let start = i % n;
        net.announce(ServerInfo {
            peer_id: net.peer_id().to_bytes(),
            model_id: model_id.to_string(),
            blocks: BlockRange {
                start,
                end: start + 1,
            },
            num_blocks: n,
            hidden_size: hidden,
            throughput: 1e6,
            free_kv_tokens: u32::MAX,
            load: 0.0,
            active_sessions: 0,
            batch_capacity: 0.0,
            version: env!("CARGO_PKG_VERSION").into(),
            addrs: net.listen_addrs().iter().map(|a| a.to_vec()).collect(),
            reachability: Reachability::Public,
            timestamp_ms: net::now_ms(),
            adapters: Vec::new(),
        })
        .await;
        // A gossip heartbeat or two for the mesh to form and carry it.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        anyhow::Ok(())
    };
    match joined.await {
        Ok(()) => Ok(net),
        Err(e) => {
            net.shutdown().await;
            Err(e)
        }
    }
}
