//! A weight server under load says busy instead of dropping streams, and
//! one peer cannot take every slot: in-process nodes on 127.0.0.1 with a
//! synthetic model.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::AsyncWriteExt;
use libp2p::StreamProtocol;
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::fetch::{fetch_chunks, fetch_manifest, FetchConfig, Need};
use nomoat_node::weights::serve::{serve_weights_with, Fault, WeightLimits};
use nomoat_protocol::{
    Hash, Manifest, ModelFormat, TensorEntry, TensorRole, WeightsRequest, WEIGHTS_PROTOCOL,
};
use rand::RngCore;
use tokio_util::sync::CancellationToken;

/// Writes a synthetic model of `blocks` blocks of `per_block` random chunks
/// of `chunk_size` bytes into `store`.
fn synthetic(store: &ChunkStore, blocks: u32, per_block: u32, chunk_size: u32) -> Result<Hash> {
    let mut rng = rand::rng();
    let mut tensors = Vec::new();
    for b in 0..blocks {
        let mut chunks = Vec::new();
        for _ in 0..per_block {
            let mut data = vec![0u8; chunk_size as usize];
            rng.fill_bytes(&mut data);
            let h = Hash::of(&data);
            store.put(&h, &data)?;
            chunks.push(h);
        }
        let bytes = u64::from(per_block) * u64::from(chunk_size);
        tensors.push(TensorEntry {
            name: format!("blk.{b}.weight"),
            role: TensorRole::Block(b),
            dtype: "F32".into(),
            shape: vec![bytes / 4],
            byte_len: bytes,
            chunks,
        });
    }
    let manifest = Manifest {
        format: ModelFormat::Gguf,
        chunk_size,
        architecture: "synthetic".into(),
        num_blocks: blocks,
        header: Vec::new(),
        tokenizer: Vec::new(),
        tokenizer_config: Vec::new(),
        tensors,
    };
    Ok(store.put_manifest(&manifest)?)
}

async fn node() -> Result<NetHandle> {
    let net = net::start(NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
        ..NetConfig::default()
    })
    .await?;
    net.wait_listening(1, Duration::from_secs(10)).await;
    Ok(net)
}

/// Fetches the whole model `id` from `seeder` into a new store under `dir`.
async fn fetch_all(
    seeder: &NetHandle,
    dir: &std::path::Path,
    id: Hash,
) -> Result<nomoat_node::weights::fetch::FetchReport> {
    let net = node().await?;
    let addr = seeder
        .listen_addrs()
        .into_iter()
        .next()
        .context("no address")?;
    let peer = net.dial(addr).await?;
    let store = ChunkStore::open(dir)?;
    let manifest = fetch_manifest(&net, &store, &id, &[peer]).await?;
    let need = Need {
        blocks: 0..manifest.num_blocks,
        head: false,
    };
    let cfg = FetchConfig {
        batch: 2,
        ..FetchConfig::default()
    }
    .with_progress(false);
    let report = fetch_chunks(&net, &store, &id, &manifest, &[peer], &need, cfg).await;
    net.shutdown().await;
    Ok(report?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_fetchers_at_once_all_complete_and_nobody_bans_the_busy_seeder() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let source = ChunkStore::open(&dir.path().join("seeder"))?;
    let id = synthetic(&source, 2, 16, 64 << 10)?;
    let seeder = node().await?;
    let shutdown = CancellationToken::new();
    // Four requests at once, two per peer: sixteen fetchers of four
    // streams each are mostly told busy.
    let limits = WeightLimits {
        streams: 4,
        streams_per_peer: 2,
    };
    tokio::spawn(serve_weights_with(
        seeder.clone(),
        source,
        Fault::None,
        limits,
        shutdown.clone(),
    ));
    let fetches = (0..16).map(|i| {
        let (seeder, dir) = (seeder.clone(), dir.path().join(format!("fetcher-{i}")));
        tokio::spawn(async move { fetch_all(&seeder, &dir, id).await })
    });
    let mut busy = 0;
    for (i, r) in futures::future::join_all(fetches)
        .await
        .into_iter()
        .enumerate()
    {
        let report = r??;
        assert_eq!(report.fetched, report.needed, "fetcher {i}: {report:?}");
        assert_eq!(report.needed, 32);
        assert!(report.banned.is_empty(), "fetcher {i} banned the seeder");
        busy += report.busy;
    }
    // The limits were reached: the seeder said busy, and was asked again.
    assert!(busy > 0, "no fetcher was ever told busy");
    shutdown.cancel();
    seeder.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_holds_only_its_own_slots() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let source = ChunkStore::open(&dir.path().join("seeder"))?;
    // 20 MiB: more than a QUIC connection's receive window, so the hog's
    // unread streams really stall the server's writes.
    let id = synthetic(&source, 1, 20, 1 << 20)?;
    let manifest = source.manifest(&id)?;
    let hashes: Vec<Hash> = manifest.tensors[0].chunks.clone();
    let seeder = node().await?;
    let shutdown = CancellationToken::new();
    let limits = WeightLimits::default();
    tokio::spawn(serve_weights_with(
        seeder.clone(),
        source,
        Fault::None,
        limits,
        shutdown.clone(),
    ));
    let addr = seeder
        .listen_addrs()
        .into_iter()
        .next()
        .context("no address")?;
    // The hog asks for every chunk on all its slots and reads nothing.
    let hog = node().await?;
    let peer = hog.dial(addr).await?;
    let mut held = Vec::new();
    let ask = WeightsRequest::Chunks {
        model_id: id,
        hashes: hashes.clone(),
    };
    // Every stream is negotiated before any asks: once chunks fill the
    // connection's window, nothing more gets through to the hog.
    let open = || async {
        hog.control()
            .open_stream(peer, StreamProtocol::new(WEIGHTS_PROTOCOL))
            .await
    };
    for _ in 0..limits.streams_per_peer {
        held.push(open().await?);
    }
    for s in &mut held {
        // An inbound stream can be dropped unanswered when several arrive
        // at once (a loaded machine): such a one is opened again, as the
        // fetcher does.
        let mut attempts = 0;
        while let Err(e) = nomoat_node::net::wire::write_frame(s, &ask.encode()).await {
            attempts += 1;
            anyhow::ensure!(
                attempts < 3,
                "the seeder dropped the hog's stream 3 times: {e}"
            );
            *s = open().await?;
        }
        s.flush().await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // (A busy answer to the hog's next stream could not reach it: its
    // connection's receive window is full of chunks it never reads.)
    // An honest fetcher gets the whole model meanwhile, banning nobody.
    let report = fetch_all(&seeder, &dir.path().join("honest"), id).await?;
    assert_eq!(report.fetched, 20);
    assert!(report.banned.is_empty());
    assert_eq!(report.busy, 0, "the hog's slots are its own");
    drop(held);
    shutdown.cancel();
    hog.shutdown().await;
    seeder.shutdown().await;
    Ok(())
}
