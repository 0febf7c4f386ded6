//! The weight commands of the `nomoat` binary: `import`, `verify`, the
//! model-id side of `serve` and `generate`, and `bench weights`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use nomoat_node::engine::ModelFile;
use nomoat_node::swarm::net::{self, NetConfig, NetHandle};
use nomoat_node::weights::fetch::{self, FetchConfig, FetchReport, Need};
use nomoat_node::weights::serve::{serve_weights, Fault};
use nomoat_node::weights::{self, ChunkStore};
use nomoat_protocol::{Hash, Manifest, ModelFormat, TensorEntry, TensorRole, CHUNK_SIZE};
use tokio_util::sync::CancellationToken;

/// `nomoat import`.
#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// A .gguf file, or a directory with config.json, tokenizer.json and
    /// *.safetensors.
    path: PathBuf,
}

pub(crate) fn import(args: ImportArgs) -> Result<()> {
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    let t = Instant::now();
    let r = weights::import(&store, &args.path)?;
    eprintln!(
        "imported {}: {} blocks, {} tensors, {} chunks ({} new), {:.1} MB in {:.1} s",
        args.path.display(),
        r.manifest.num_blocks,
        r.manifest.tensors.len(),
        r.chunks,
        r.new_chunks,
        r.bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    println!("{}", r.id.to_hex());
    Ok(())
}

pub(crate) fn verify(model_id: &str) -> Result<()> {
    let id = Hash::from_hex(model_id).context("a model id is 64 hex digits")?;
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    let r = store.verify(&id)?;
    println!(
        "model {}: {} chunks, {} verified, {} corrupt (deleted), {} not stored",
        id.to_hex(),
        r.total,
        r.good,
        r.bad.len(),
        r.missing
    );
    if !r.bad.is_empty() {
        bail!(
            "{} stored chunk(s) were corrupt and have been deleted; run `nomoat serve --model {} ... --bootstrap PEER` to fetch them again",
            r.bad.len(),
            id.to_hex()
        );
    }
    Ok(())
}

/// Fetch flags of `serve`.
#[derive(Debug, Args)]
pub(crate) struct FetchArgs {
    /// Cap on the download rate of weights, in MB/s (default: none).
    #[arg(long)]
    pub(crate) fetch_rate: Option<f64>,
    /// Test-only fault injection: make this node's weight server misbehave
    /// (flip-chunks, tamper-manifest, stall).
    #[arg(long, hide = true, default_value = "none")]
    fault: Fault,
}

/// A model id's weights on this node: the store, the manifest and the
/// peers that provide it (found only when something had to be fetched).
#[derive(Debug)]
pub(crate) struct StoreModel {
    pub(crate) id: Hash,
    pub(crate) store: ChunkStore,
    pub(crate) manifest: Manifest,
    providers: Vec<PeerId>,
    bootstrap: Vec<Multiaddr>,
}

impl StoreModel {
    /// Finds the manifest: in the store, or fetched from the peers reachable
    /// through `bootstrap` and checked against the id.
    pub(crate) async fn open(net: &NetHandle, id: Hash, bootstrap: &[Multiaddr]) -> Result<Self> {
        let store = ChunkStore::open(&nomoat_node::catalog::home())?;
        let (manifest, providers) = match store.manifest(&id) {
            Ok(m) => (m, Vec::new()),
            Err(weights::StoreError::UnknownModel(_)) => {
                let providers = fetch::find_providers(net, bootstrap, &id).await;
                let m = fetch::fetch_manifest(net, &store, &id, &providers).await?;
                (m, providers)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            id,
            store,
            manifest,
            providers,
            bootstrap: bootstrap.to_vec(),
        })
    }

    /// Fetches what `need` lacks; `None` when everything was stored already.
    pub(crate) async fn fetch(
        &mut self,
        net: &NetHandle,
        need: &Need,
        rate_mb_s: Option<f64>,
    ) -> Result<Option<FetchReport>> {
        let wanted = self.manifest.chunks_for(&need.blocks, need.head);
        if self.store.missing(&wanted).is_empty() {
            return Ok(None);
        }
        if self.providers.is_empty() {
            self.providers = fetch::find_providers(net, &self.bootstrap, &self.id).await;
        }
        let cfg = FetchConfig::default().with_max_rate(rate_mb_s.map(|r| r * 1e6));
        let r = fetch::fetch_chunks(
            net,
            &self.store,
            &self.id,
            &self.manifest,
            &self.providers,
            need,
            cfg,
        )
        .await?;
        eprintln!(
            "fetched {} chunk(s), {:.1} MB in {:.1} s ({:.1} MB/s) from {} peer(s); {} already stored; {} rejected, {} peer(s) banned",
            r.fetched,
            r.bytes as f64 / 1e6,
            r.secs,
            r.bytes as f64 / 1e6 / r.secs.max(1e-9),
            r.per_peer.len(),
            r.already,
            r.rejected,
            r.banned.len()
        );
        Ok(Some(r))
    }

    /// The model, loaded from the store.
    pub(crate) fn file(&self) -> Result<ModelFile> {
        Ok(ModelFile::open_store(&self.store, &self.id)?)
    }
}

/// Starts answering `/nomoat/weights/1` from the local store.
pub(crate) fn start_weight_server(
    net: &NetHandle,
    args: &FetchArgs,
    shutdown: &CancellationToken,
) -> Result<()> {
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    tokio::spawn(serve_weights(
        net.clone(),
        store,
        args.fault,
        shutdown.clone(),
    ));
    Ok(())
}

/// `generate --model MODEL_ID`: the model from the store, fetching what is
/// missing (the head for a swarm generation, everything for a local one)
/// from the swarm's peers.
pub(crate) async fn open_for_generate(id: Hash, swarm: &[Multiaddr]) -> Result<ModelFile> {
    let store = ChunkStore::open(&nomoat_node::catalog::home())?;
    if store.manifest(&id).is_ok() {
        let model = StoreModel {
            id,
            manifest: store.manifest(&id)?,
            store,
            providers: Vec::new(),
            bootstrap: Vec::new(),
        };
        let need = Need {
            blocks: if swarm.is_empty() {
                0..model.manifest.num_blocks
            } else {
                0..0
            },
            head: true,
        };
        if model
            .store
            .missing(&model.manifest.chunks_for(&need.blocks, true))
            .is_empty()
        {
            return model.file();
        }
    }
    if swarm.is_empty() {
        bail!(
            "model {} is not (entirely) in the weight store: add --swarm PEER to fetch it, or import the model file",
            id.to_hex()
        );
    }
    let net = net::start(NetConfig::default()).await?;
    let result = async {
        let mut model = StoreModel::open(&net, id, swarm).await?;
        let need = Need {
            blocks: 0..0,
            head: true,
        };
        model.fetch(&net, &need, None).await?;
        model.file()
    }
    .await;
    net.shutdown().await;
    result
}

/// `nomoat bench weights`.
#[derive(Debug, Args)]
pub(crate) struct BenchWeightsArgs {
    /// Size of the span fetched, in MiB.
    #[arg(long, default_value_t = 256)]
    mib: u32,
    /// Alternating rounds (raw, 1 provider, 2 providers); the best of each is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
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

const RAW_PROTOCOL: &str = "/nomoat/bench-raw/1";

async fn provider(store: &ChunkStore, shutdown: &CancellationToken) -> Result<NetHandle> {
    let net = net::start(NetConfig::default()).await?;
    net.wait_listening(1, Duration::from_secs(10)).await;
    tokio::spawn(serve_weights(
        net.clone(),
        store.clone(),
        Fault::None,
        shutdown.clone(),
    ));
    Ok(net)
}

pub(crate) async fn bench_weights(args: BenchWeightsArgs) -> Result<()> {
    anyhow::ensure!(args.mib > 0, "--mib must be positive");
    let root = std::env::temp_dir().join(format!("nomoat-bench-weights-{}", std::process::id()));
    let result = bench_in(&root, &args).await;
    let _ = std::fs::remove_dir_all(&root);
    result
}

async fn bench_in(root: &std::path::Path, args: &BenchWeightsArgs) -> Result<()> {
    let shutdown = CancellationToken::new();
    let source = ChunkStore::open(&root.join("source"))?;
    eprintln!("writing a synthetic {} MiB model...", args.mib);
    let (id, manifest, raw_bytes) = synthetic(&source, args.mib)?;
    let total = raw_bytes.len() as f64;
    let p1 = provider(&source, &shutdown).await?;
    let p2 = provider(&source, &shutdown).await?;
    // The raw baseline: provider 1 sends the same bytes on one stream.
    let mut raw_in = p1
        .control()
        .accept(StreamProtocol::new(RAW_PROTOCOL))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let raw_bytes = std::sync::Arc::new(raw_bytes);
    {
        let data = raw_bytes.clone();
        tokio::spawn(async move {
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
    let (mut raw, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    let (mut hash1, mut hash2) = (Vec::new(), Vec::new());
    for round in 0..args.rounds.max(1) {
        // Raw: one stream, no framing, no hashing, nothing stored.
        let t = Instant::now();
        let mut s = client
            .control()
            .open_stream(peers[0], StreamProtocol::new(RAW_PROTOCOL))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        s.write_all(&[1]).await?;
        s.flush().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0usize;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        anyhow::ensure!(got == raw_bytes.len(), "raw stream ended early");
        raw.push(total / t.elapsed().as_secs_f64() / 1e6);
        for (k, rates, hashes) in [(1usize, &mut one, &mut hash1), (2, &mut two, &mut hash2)] {
            let dir = root.join(format!("fetch-{round}-{k}"));
            let store = ChunkStore::open(&dir)?;
            store.put_manifest(&manifest)?;
            let r = fetch::fetch_chunks(
                &client,
                &store,
                &id,
                &manifest,
                &peers[..k],
                &need,
                FetchConfig::default().with_progress(false),
            )
            .await?;
            anyhow::ensure!(r.fetched == manifest.chunks_for(&need.blocks, false).len());
            rates.push(r.bytes as f64 / r.secs / 1e6);
            hashes.push(r.hash_secs / r.secs);
            drop(store);
            let _ = std::fs::remove_dir_all(&dir);
        }
        eprintln!(
            "round {}: raw {:.0} MB/s, 1 provider {:.0} MB/s, 2 providers {:.0} MB/s",
            round + 1,
            raw[round],
            one[round],
            two[round]
        );
    }
    let best = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (raw_b, one_b, two_b) = (best(&raw), best(&one), best(&two));
    let share = |h: &[f64], r: &[f64]| {
        let i = r
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        h.get(i).copied().unwrap_or(0.0)
    };
    let (h1, h2) = (share(&hash1, &one), share(&hash2, &two));
    println!(
        "{} MiB over loopback QUIC: raw stream {raw_b:.1} MB/s; 1 provider {one_b:.1} MB/s ({:.2}x raw), hashing {:.1}% of fetch time; 2 providers {two_b:.1} MB/s ({:.2}x one provider), hashing {:.1}%",
        args.mib,
        one_b / raw_b,
        h1 * 100.0,
        two_b / one_b,
        h2 * 100.0
    );
    println!(
        "{}",
        serde_json::json!({
            "bench": "weights",
            "mib": args.mib,
            "chunk_bytes": CHUNK_SIZE,
            "rounds": args.rounds,
            "raw_quic_mb_s": raw_b,
            "one_provider_mb_s": one_b,
            "two_providers_mb_s": two_b,
            "one_vs_raw": one_b / raw_b,
            "two_vs_one": two_b / one_b,
            "hash_share_one": h1,
            "hash_share_two": h2,
        })
    );
    shutdown.cancel();
    client.shutdown().await;
    p1.shutdown().await;
    p2.shutdown().await;
    Ok(())
}
