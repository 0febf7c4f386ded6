//! `nomoat bench weights`: a span fetched from 1 and 2 providers over
//! loopback QUIC against one raw QUIC stream, in the same run.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::fetch::{self, FetchConfig, Need};
use nomoat_node::weights::serve::{serve_weights, Fault};
use nomoat_protocol::{Hash, Manifest, ModelFormat, TensorEntry, TensorRole, CHUNK_SIZE};
use tokio_util::sync::CancellationToken;

/// `nomoat bench weights`.
#[derive(Debug, Args)]
pub(crate) struct BenchWeightsArgs {
    /// Size of the span fetched, in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u32,
    /// Alternating rounds (raw, 1 provider, 2 providers); the best of each is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Requests in flight per provider.
    #[arg(long, default_value_t = fetch::DEFAULT_STREAMS_PER_PEER)]
    streams_per_peer: usize,
    /// Chunks per request.
    #[arg(long, default_value_t = fetch::DEFAULT_BATCH)]
    batch: usize,
}

/// A synthetic model of `mib` one-MiB chunks of random data, 16 per block.
fn synthetic(store: &ChunkStore, mib: u32) -> Result<(Hash, Manifest, Vec<u8>)> {
    use rand::RngCore;
    let per_block = 16u32;
    let blocks = mib.div_ceil(per_block).max(1);
    let mut rng = rand::rng();
    let mut all = Vec::with_capacity(mib as usize * CHUNK_SIZE as usize);
    let mut tensors = Vec::new();
    for b in 0..blocks {
        let n = per_block.min(mib - b * per_block);
        let mut chunks = Vec::new();
        for _ in 0..n {
            let mut data = vec![0u8; CHUNK_SIZE as usize];
            rng.fill_bytes(&mut data);
            let h = Hash::of(&data);
            store.put(&h, &data)?;
            chunks.push(h);
            all.extend_from_slice(&data);
        }
        tensors.push(TensorEntry {
            name: format!("blk.{b}.weight"),
            role: TensorRole::Block(b),
            dtype: "F32".into(),
            shape: vec![u64::from(n) * u64::from(CHUNK_SIZE) / 4],
            byte_len: u64::from(n) * u64::from(CHUNK_SIZE),
            chunks,
        });
    }
    let manifest = Manifest {
        format: ModelFormat::Gguf,
        chunk_size: CHUNK_SIZE,
        architecture: "synthetic".into(),
        num_blocks: blocks,
        header: Vec::new(),
        tokenizer: Vec::new(),
        tokenizer_config: Vec::new(),
        tensors,
    };
    let id = store.put_manifest(&manifest)?;
    Ok((id, manifest, all))
}

/// Busy CPU time of the whole machine (all cores, kernel threads included),
/// from `/proc/stat`; `None` where that file does not exist.
fn machine_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle) / 100.0)
}

/// UDP datagrams the machine's kernel dropped for want of socket buffer
/// space (`RcvbufErrors` in `/proc/net/snmp`); each one is a loss that QUIC's
/// congestion control answers by slowing down.
fn udp_drops() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp: "));
    let names: Vec<&str> = udp.next()?.split_whitespace().collect();
    let values: Vec<&str> = udp.next()?.split_whitespace().collect();
    let i = names.iter().position(|n| *n == "RcvbufErrors")?;
    values.get(i)?.parse().ok()
}

/// Wall time, machine CPU time and UDP drops of one measured phase.
struct Phase {
    t: Instant,
    cpu: Option<f64>,
    drops: Option<u64>,
}

/// What one phase measured.
#[derive(Debug, Clone, Copy)]
struct PhaseStats {
    secs: f64,
    /// Cores busy on average (NaN where unknown).
    cores: f64,
    /// UDP datagrams dropped (0 where unknown).
    drops: u64,
}

impl Phase {
    fn start() -> Self {
        Self {
            t: Instant::now(),
            cpu: machine_cpu_secs(),
            drops: udp_drops(),
        }
    }

    fn end(&self) -> PhaseStats {
        let secs = self.t.elapsed().as_secs_f64();
        let cores = match (self.cpu, machine_cpu_secs()) {
            (Some(a), Some(b)) => (b - a) / secs.max(1e-9),
            _ => f64::NAN,
        };
        let drops = match (self.drops, udp_drops()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => 0,
        };
        PhaseStats { secs, cores, drops }
    }
}

impl PhaseStats {
    /// Milliseconds of machine CPU per MiB when the phase moved `mib` MiB.
    fn cpu_ms_per(&self, mib: f64) -> f64 {
        self.cores * self.secs * 1e3 / mib
    }
}

const RAW_PROTOCOL: &str = "/nomoat/bench-raw/1";

/// A node of its own, as a `nomoat serve` process would be: its network
/// runs on its own runtime with the one worker thread `serve` gives it.
fn node_runtime(name: &str) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name(name)
        .enable_all()
        .build()?)
}

/// A provider serving `store`, on runtime `rt`.
async fn provider(
    rt: &tokio::runtime::Runtime,
    store: &ChunkStore,
    shutdown: &CancellationToken,
) -> Result<NetHandle> {
    let (store, shutdown) = (store.clone(), shutdown.clone());
    rt.spawn(async move {
        let net = net::start(NetConfig::default()).await?;
        net.wait_listening(1, Duration::from_secs(10)).await;
        tokio::spawn(serve_weights(net.clone(), store, Fault::None, shutdown));
        Ok(net)
    })
    .await?
}

pub(crate) async fn bench_weights(args: BenchWeightsArgs) -> Result<()> {
    anyhow::ensure!(args.mib > 0, "--mib must be positive");
    let root = std::env::temp_dir().join(format!("nomoat-bench-weights-{}", std::process::id()));
    let result = bench_in(&root, &args).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

/// What storing costs on this machine, per MiB, measured before the
/// transfers: the work a fetch must do on top of what a raw stream does.
#[derive(Debug, Clone, Copy)]
struct StoreCosts {
    /// BLAKE3 over the chunks, CPU time of one thread.
    hash_ms: f64,
    /// Writing the chunks durably (temporary file, fdatasync, rename), the
    /// whole machine's CPU time (kernel writeback included), hashing excluded.
    write_ms: f64,
    /// Reading the chunks back from the store (the provider's side).
    read_ms: f64,
}

/// Measures [`StoreCosts`] with the synthetic model's chunks in a scratch
/// store under `root` (removed with `root` at the end).
fn store_costs(
    root: &std::path::Path,
    source: &ChunkStore,
    manifest: &Manifest,
) -> Result<StoreCosts> {
    let hashes: Vec<Hash> = manifest
        .tensors
        .iter()
        .flat_map(|t| t.chunks.iter().copied())
        .collect();
    let chunks: Vec<Vec<u8>> = hashes
        .iter()
        .map(|h| source.get(h)?.context("a synthetic chunk is missing"))
        .collect::<Result<_>>()?;
    let mib = chunks.iter().map(Vec::len).sum::<usize>() as f64 / f64::from(1u32 << 20);
    let cpu = || {
        nomoat_node::store::background::thread_cpu_time()
            .unwrap_or_default()
            .as_secs_f64()
    };
    let t = cpu();
    for c in &chunks {
        std::hint::black_box(Hash::of(c));
    }
    let hash_ms = (cpu() - t) * 1e3 / mib;
    let dir = root.join("scratch");
    let scratch = ChunkStore::open(&dir)?;
    let phase = Phase::start();
    for (h, c) in hashes.iter().zip(&chunks) {
        scratch.put(h, c)?;
    }
    let write_ms = (phase.end().cpu_ms_per(mib) - hash_ms).max(0.0);
    let phase = Phase::start();
    for h in &hashes {
        std::hint::black_box(source.get(h)?);
    }
    let read_ms = phase.end().cpu_ms_per(mib);
    Ok(StoreCosts {
        hash_ms,
        write_ms,
        read_ms,
    })
}

async fn bench_in(root: &std::path::Path, args: &BenchWeightsArgs) -> Result<()> {
    let shutdown = CancellationToken::new();
    let source = ChunkStore::open(&root.join("source"))?;
    eprintln!("writing a synthetic {} MiB model...", args.mib);
    let (id, manifest, raw_bytes) = synthetic(&source, args.mib)?;
    let total = raw_bytes.len() as f64;
    let mib = total / f64::from(1u32 << 20);
    eprintln!("measuring what hashing, writing and reading chunks cost here...");
    let costs = {
        let (root, source, manifest) = (root.to_path_buf(), source.clone(), manifest.clone());
        tokio::task::spawn_blocking(move || store_costs(&root, &source, &manifest)).await??
    };
    let runtimes = [
        node_runtime("nomoat-provider-1")?,
        node_runtime("nomoat-provider-2")?,
    ];
    let p1 = provider(&runtimes[0], &source, &shutdown).await?;
    let p2 = provider(&runtimes[1], &source, &shutdown).await?;
    // The raw baseline: provider 1 sends the same bytes on one stream.
    let mut raw_in = p1
        .control()
        .accept(StreamProtocol::new(RAW_PROTOCOL))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let raw_bytes = std::sync::Arc::new(raw_bytes);
    {
        let data = raw_bytes.clone();
        runtimes[0].spawn(async move {
            while let Some((_, mut s)) = raw_in.next().await {
                let mut go = [0u8; 1];
                if s.read_exact(&mut go).await.is_ok() {
                    let _ = s.write_all(&data).await;
                    let _ = s.close().await;
                }
            }
        });
    }
    let client = net::start(NetConfig::default()).await?;
    let peers: Vec<PeerId> = [&p1, &p2].iter().map(|p| p.peer_id()).collect();
    for p in [&p1, &p2] {
        let addr = p.listen_addrs().into_iter().next().context("no address")?;
        client.dial(addr).await?;
    }
    let need = Need {
        blocks: 0..manifest.num_blocks,
        head: false,
    };
    // Per round: raw, 1 provider, 2 providers.
    let mut rounds: Vec<[Measured; 3]> = Vec::new();
    for round in 0..args.rounds.max(1) {
        // Raw: one stream, no framing, no hashing, nothing stored; read by a
        // task on the node's runtime, as the fetch's workers are.
        let phase = Phase::start();
        let mut control = client.control();
        let provider = peers[0];
        let got = tokio::spawn(async move {
            let mut s = control
                .open_stream(provider, StreamProtocol::new(RAW_PROTOCOL))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            s.write_all(&[1]).await?;
            s.flush().await?;
            let mut buf = vec![0u8; 1 << 20];
            let mut got = 0usize;
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return Ok::<_, anyhow::Error>(got);
                }
                got += n;
            }
        })
        .await??;
        anyhow::ensure!(got == raw_bytes.len(), "raw stream ended early");
        let st = phase.end();
        let raw = Measured {
            mb_s: total / st.secs / 1e6,
            hash_share: 0.0,
            tail_share: 0.0,
            wait_secs: 0.0,
            phase: st,
        };
        let mut fetched = Vec::new();
        for k in [1usize, 2] {
            let dir = root.join(format!("fetch-{round}-{k}"));
            let store = ChunkStore::open(&dir)?;
            store.put_manifest(&manifest)?;
            let phase = Phase::start();
            let r = fetch::fetch_chunks(
                &client,
                &store,
                &id,
                &manifest,
                &peers[..k],
                &need,
                FetchConfig {
                    streams_per_peer: args.streams_per_peer.max(1),
                    batch: args.batch.clamp(1, nomoat_protocol::MAX_CHUNKS_PER_REQUEST),
                    ..FetchConfig::default().with_progress(false)
                },
            )
            .await?;
            let st = phase.end();
            anyhow::ensure!(r.fetched == manifest.chunks_for(&need.blocks, false).len());
            fetched.push(Measured {
                mb_s: r.bytes as f64 / r.secs / 1e6,
                hash_share: r.hash_secs / r.secs,
                tail_share: r.store_tail_secs / r.secs,
                wait_secs: r.store_wait_secs,
                phase: st,
            });
            // Kept until the end, as a node keeps what it fetched (deleting
            // files here would make the next round's file creation slower).
            drop(store);
        }
        let m = [raw, fetched[0], fetched[1]];
        eprintln!(
            "round {}: raw {}; 1 provider {}; 2 providers {}",
            round + 1,
            m[0],
            m[1],
            m[2]
        );
        rounds.push(m);
    }
    // The best round of each kind.
    let best = |k: usize| {
        rounds
            .iter()
            .map(|r| r[k])
            .max_by(|a, b| a.mb_s.total_cmp(&b.mb_s))
            .expect("at least one round")
    };
    let (raw, one, two) = (best(0), best(1), best(2));
    let raw_ms = raw.phase.cpu_ms_per(mib);
    let extra_ms = costs.hash_ms + costs.write_ms + costs.read_ms;
    let ceiling = raw_ms / (raw_ms + extra_ms);
    println!(
        "{} MiB over loopback QUIC: raw stream {:.1} MB/s; 1 provider {:.1} MB/s ({:.2}x raw), hashing {:.1}% of fetch time; 2 providers {:.1} MB/s ({:.2}x one provider), hashing {:.1}%",
        args.mib,
        raw.mb_s,
        one.mb_s,
        one.mb_s / raw.mb_s,
        one.hash_share * 100.0,
        two.mb_s,
        two.mb_s / one.mb_s,
        two.hash_share * 100.0
    );
    println!(
        "verifying and storing run beside the transfer: after the last chunk arrived the fetch waited {:.1}% (1 provider) and {:.1}% (2 providers) of its time for the store threads, and before that workers waited {:.0} and {:.0} ms for them",
        one.tail_share * 100.0,
        two.tail_share * 100.0,
        one.wait_secs * 1e3,
        two.wait_secs * 1e3
    );
    println!(
        "CPU per MiB here: raw stream {raw_ms:.2} ms (all cores), BLAKE3 {:.2} ms, durable write {:.2} ms, read {:.2} ms; with every core busy a fetch that hashes, writes and reads each byte reaches at most {ceiling:.2}x the raw rate",
        costs.hash_ms, costs.write_ms, costs.read_ms
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "weights",
            "mib": args.mib,
            "chunk_bytes": CHUNK_SIZE,
            "rounds": args.rounds,
            "streams_per_peer": args.streams_per_peer,
            "batch": args.batch,
            "raw_quic_mb_s": raw.mb_s,
            "one_provider_mb_s": one.mb_s,
            "two_providers_mb_s": two.mb_s,
            "one_vs_raw": one.mb_s / raw.mb_s,
            "two_vs_one": two.mb_s / one.mb_s,
            "hash_share_one": one.hash_share,
            "hash_share_two": two.hash_share,
            "store_tail_share": {"one": one.tail_share, "two": two.tail_share},
            "store_wait_secs": {"one": one.wait_secs, "two": two.wait_secs},
            "cores_busy": {"raw": raw.phase.cores, "one": one.phase.cores, "two": two.phase.cores},
            "udp_drops": {"raw": raw.phase.drops, "one": one.phase.drops, "two": two.phase.drops},
            "cpu_ms_per_mib": {
                "raw_stream": raw_ms,
                "blake3": costs.hash_ms,
                "durable_write": costs.write_ms,
                "read": costs.read_ms,
            },
            "cpu_bound_ceiling_vs_raw": ceiling,
        })
    );
    shutdown.cancel();
    client.shutdown().await;
    p1.shutdown().await;
    p2.shutdown().await;
    for rt in runtimes {
        rt.shutdown_background();
    }
    Ok(())
}

/// One transfer's figures.
#[derive(Debug, Clone, Copy)]
struct Measured {
    mb_s: f64,
    /// Hashing CPU time over the transfer's wall time.
    hash_share: f64,
    /// The part of the transfer's wall time after the last chunk arrived
    /// (the store threads finishing).
    tail_share: f64,
    /// Seconds workers waited for the store threads (summed).
    wait_secs: f64,
    phase: PhaseStats,
}

impl std::fmt::Display for Measured {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.0} MB/s ({:.2} cores busy, {} UDP drops)",
            self.mb_s, self.phase.cores, self.phase.drops
        )
    }
}
