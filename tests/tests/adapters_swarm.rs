//! LoRA adapters through a swarm of servers in one process (127.0.0.1
//! QUIC, a tiny random-weight model): servers that have never seen an
//! adapter fetch their span's part of it from peers when a session names
//! it, with no restart; the session gives the logits of the model with the
//! adapter merged in while a session without it runs on the same servers
//! at once; servers announce what they hold; a corrupted adapter chunk is
//! rejected and fetched again from an honest peer.
//!
//! Tolerances: against the local engine running the same adapter per
//! session, 1e-5 (the same computation, cut into spans); against the merged
//! model, 1e-3 (see tests/adapters.rs).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use candle_core::quantized::GgmlDType;
use nomoat_node::client::RemoteSession;
use nomoat_node::engine::{Head, LocalModel, ModelFile, WeightMode};
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::import_adapter;
use nomoat_node::weights::serve::{serve_weights, Fault};
use nomoat_protocol::Hash;
use nomoat_tests::harness::{self, client_net, discover_n, TestServer};
use nomoat_tests::lora::TestLora;
use nomoat_tests::{TinyArch, TinyModel, TinySpec};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "tiny-adapter-model";
const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const DECODE: [u32; 5] = [9, 31, 77, 2, 50];
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Waits until every one of `servers` announces `adapter`.
async fn wait_announced(
    client: &nomoat_node::net::NetHandle,
    boot: &[libp2p::Multiaddr],
    servers: usize,
    adapter: Hash,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found = nomoat_node::net::discover(client, boot, MODEL).await?;
        let holding = found
            .iter()
            .filter(|s| s.adapters.contains(&adapter))
            .count();
        if holding >= servers {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{holding} of {servers} servers announce the adapter"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_fetch_an_adapter_on_first_use_and_run_it_beside_the_base() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let base = TinyModel::generate(TinySpec::new(TinyArch::Llama))?;
    let lora = TestLora::random(&base, 4, 8.0, 5, &[])?;
    let path = base.write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::F32)?;
    let file = ModelFile::open(&path)?;
    let merged_path = lora
        .merged(&base)?
        .write_gguf(&dir.path().join("merged.gguf"), GgmlDType::F32)?;
    let merged = LocalModel::load_whole(&ModelFile::open(&merged_path)?, WeightMode::Fast)?;
    let want_merged = harness::session_trace(&merged, merged.new_session(), &PROMPT, &DECODE)?;
    let want_plain = harness::local_trace(&file, &PROMPT, &DECODE)?;

    // The adapter lives only in the client's store, which it serves.
    let client_store = ChunkStore::open(&dir.path().join("client"))?;
    let peft = lora.write_peft(&dir.path().join("peft"))?;
    let adapter = import_adapter(&client_store, &peft, file.config(), MODEL)?.id;
    let whole = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let w =
        nomoat_node::weights::open_adapter(&client_store, &adapter, file.config(), MODEL, None)?;
    let want_adapted = harness::session_trace(
        &whole,
        whole.new_session_with(whole.adapter_parts(&w)?),
        &PROMPT,
        &DECODE,
    )?;
    assert!(harness::worst_diff(&want_adapted, &want_merged)? < 1e-3);

    let s3 =
        TestServer::start_with_store(&file, MODEL, 4, 6, vec![], &dir.path().join("s3")).await?;
    let boot = vec![s3.addr.clone()];
    let s2 = TestServer::start_with_store(&file, MODEL, 2, 4, boot.clone(), &dir.path().join("s2"))
        .await?;
    let s1 = TestServer::start_with_store(&file, MODEL, 0, 2, boot.clone(), &dir.path().join("s1"))
        .await?;
    let servers = [&s1, &s2, &s3];
    let client = client_net().await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(serve_weights(
        client.clone(),
        client_store.clone(),
        Fault::None,
        shutdown.clone(),
    ));
    let found = discover_n(&client, &boot, MODEL, 3).await?;
    assert!(found.iter().all(|s| s.adapters.is_empty()));
    let route = nomoat_node::client::plan(&client, MODEL, 6, &found, 64)?;
    assert_eq!(route.len(), 3, "{route:?}");
    let head = Head::load(&file, WeightMode::Fast)?;

    // First use: every hop fetches its part while the session opens.
    let began = Instant::now();
    let mut adapted = RemoteSession::open_with(
        &client,
        MODEL,
        route.clone(),
        64,
        STEP_TIMEOUT,
        Some(adapter),
    )
    .await?;
    let opened_in = began.elapsed();
    let mut plain = RemoteSession::open(&client, MODEL, route, 64, STEP_TIMEOUT).await?;
    let (got_adapted, got_plain) = tokio::join!(
        harness::remote_trace(&head, &mut adapted, &PROMPT, &DECODE),
        harness::remote_trace(&head, &mut plain, &PROMPT, &DECODE),
    );
    let (got_adapted, got_plain) = (got_adapted?, got_plain?);
    let d = harness::worst_diff(&got_adapted, &want_adapted)?;
    assert!(d <= 1e-5, "adapter session vs local adapter run: {d}");
    let d = harness::worst_diff(&got_adapted, &want_merged)?;
    assert!(d < 1e-3, "adapter session vs merged model: {d}");
    let d = harness::worst_diff(&got_plain, &want_plain)?;
    assert!(d <= 1e-5, "plain session vs the base: {d}");
    for s in servers {
        let st = s.adapters().stats();
        assert_eq!(
            (st.loaded, st.failed, st.rejected_chunks),
            (1, 0, 0),
            "{st:?}"
        );
        assert!(st.fetched_chunks > 0, "{st:?}");
    }
    println!("adapter fetched and loaded by 3 servers while opening: {opened_in:?}");
    wait_announced(&client, &boot, 3, adapter).await?;

    // Each server stored only its own blocks' part.
    for (s, blocks) in servers.iter().zip([0..2u32, 2..4, 4..6]) {
        let store = ChunkStore::open(&dir.path().join(match blocks.start {
            0 => "s1",
            2 => "s2",
            _ => "s3",
        }))?;
        let m = store.manifest(&adapter)?;
        for t in &m.tensors {
            let nomoat_protocol::TensorRole::Block(b) = t.role else {
                continue;
            };
            let stored = store
                .missing(&t.chunk_refs(m.chunk_size).collect::<Vec<_>>())
                .is_empty();
            assert_eq!(
                stored,
                blocks.contains(&b),
                "{}: {}",
                s.net.peer_id(),
                t.name
            );
        }
    }

    // A new server whose first provider serves corrupted chunks: the bad
    // chunks are rejected and the honest servers' copies used. It asks for
    // one chunk at a time over one stream per peer: with whole batches the
    // honest servers' workers can take every chunk before the liar's first
    // request, and the check below would test nothing.
    let liar_store = ChunkStore::open(&dir.path().join("liar"))?;
    import_adapter(&liar_store, &peft, file.config(), MODEL)?;
    let liar = client_net().await?;
    tokio::spawn(serve_weights(
        liar.clone(),
        liar_store,
        Fault::FlipChunks,
        shutdown.clone(),
    ));
    let s4 = TestServer::start_fetching_one_by_one(
        &file,
        MODEL,
        (0, 6),
        boot.clone(),
        &dir.path().join("s4"),
    )
    .await?;
    liar.dial(s4.addr.clone()).await?;
    discover_n(&liar, &boot, MODEL, 4).await?;
    let only_s4 = vec![nomoat_protocol::Hop {
        peer_id: s4.net.peer_id().to_bytes(),
        blocks: nomoat_protocol::BlockRange::new(0, 6)?,
    }];
    let mut session =
        RemoteSession::open_with(&liar, MODEL, only_s4, 64, STEP_TIMEOUT, Some(adapter)).await?;
    let got = harness::remote_trace(&head, &mut session, &PROMPT, &DECODE).await?;
    assert!(harness::worst_diff(&got, &want_adapted)? <= 1e-5);
    let st = s4.adapters().stats();
    assert!(
        st.rejected_chunks > 0,
        "no corrupted chunk was seen: {st:?}"
    );
    assert_eq!(st.loaded, 1, "{st:?}");

    // An adapter nobody holds: the session is refused with a clear error,
    // and the server keeps serving.
    let nobody = Hash::of(b"no such adapter");
    let route = vec![nomoat_protocol::Hop {
        peer_id: s4.net.peer_id().to_bytes(),
        blocks: nomoat_protocol::BlockRange::new(0, 6)?,
    }];
    let Err(e) = RemoteSession::open_with(
        &client,
        MODEL,
        route.clone(),
        64,
        STEP_TIMEOUT,
        Some(nobody),
    )
    .await
    else {
        panic!("an unknown adapter was accepted");
    };
    assert!(e.to_string().contains("not available"), "{e}");
    let mut session = RemoteSession::open(&client, MODEL, route, 64, STEP_TIMEOUT).await?;
    let got = harness::remote_trace(&head, &mut session, &PROMPT, &DECODE).await?;
    assert!(harness::worst_diff(&got, &want_plain)? <= 1e-5);
    shutdown.cancel();
    Ok(())
}
