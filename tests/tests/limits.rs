//! What one peer may hold on a server: its share of the sessions and of the
//! KV budget (counted in bytes), sessions it opened but never used, and
//! streams it stopped sending on; and what a client accepts from a hop.
//! Each test plays the misbehaving peer for real over libp2p while an
//! honest client's session runs beside it and stays exact.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::quantized::GgmlDType;
use futures::{AsyncWriteExt, StreamExt};
use libp2p::{PeerId, StreamProtocol};
use nomoat_node::client::{ClientError, RemoteSession};
use nomoat_node::engine::{Head, ModelFile, WeightMode};
use nomoat_node::net::wire::{read_message, write_message};
use nomoat_node::server::executor::{kv_bytes_per_position, ExecutorConfig};
use nomoat_protocol::{
    BlockRange, ErrorCode, Hop, InferMessage, OpenSession, SessionId, TensorFrame, INFER_PROTOCOL,
};
use nomoat_tests::harness::{client_net, local_trace, remote_trace, Raw, TestServer};
use nomoat_tests::{max_abs_diff, TinyArch, TinyModel, TinySpec};

const MODEL: &str = "tiny-limits-model";
const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const DECODE: [u32; 4] = [9, 31, 77, 2];

fn tiny(dir: &std::path::Path) -> Result<ModelFile> {
    let path = TinyModel::generate(TinySpec::new(TinyArch::Llama))?
        .write_gguf(&dir.join("tiny.gguf"), GgmlDType::F32)?;
    Ok(ModelFile::open(path)?)
}

fn open_msg(id: SessionId, peer: PeerId, max_length: u32) -> InferMessage {
    InferMessage::Open(OpenSession {
        session_id: id,
        model_id: MODEL.into(),
        route: vec![Hop {
            peer_id: peer.to_bytes(),
            blocks: BlockRange { start: 0, end: 6 },
        }],
        hop_index: 0,
        max_length,
        adapter: None,
    })
}

/// Opens a one-hop session on a fresh raw stream; returns the stream and
/// the answer.
async fn raw_open(
    net: &nomoat_node::net::NetHandle,
    peer: PeerId,
    id: u8,
    max_length: u32,
) -> Result<(Raw, Option<InferMessage>)> {
    let mut raw = Raw::open(net, peer).await?;
    raw.send(&open_msg(SessionId([id; 16]), peer, max_length))
        .await?;
    let answer = raw.recv().await?;
    Ok((raw, answer))
}

fn is_busy(m: &Option<InferMessage>, needle: &str) -> bool {
    matches!(m, Some(InferMessage::Error(e))
        if e.code == Some(ErrorCode::Busy) && e.message.contains(needle))
}

/// An honest client's session through `server`, checked against the whole
/// model run locally.
async fn honest_session_is_exact(file: &ModelFile, server: &TestServer) -> Result<()> {
    let client = client_net().await?;
    client.dial(server.addr.clone()).await?;
    let route = vec![Hop {
        peer_id: server.net.peer_id().to_bytes(),
        blocks: BlockRange { start: 0, end: 6 },
    }];
    let mut session =
        RemoteSession::open(&client, MODEL, route, 32, Duration::from_secs(10)).await?;
    let head = Head::load(file, WeightMode::Fast)?;
    let got = remote_trace(&head, &mut session, &PROMPT, &DECODE).await?;
    let want = local_trace(file, &PROMPT, &DECODE)?;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let d = max_abs_diff(w, g)?;
        assert!(
            d < 1e-4,
            "step {i}: the honest session is {d} off the local model"
        );
    }
    session.close().await;
    client.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_peer_gets_only_its_share_of_sessions_and_of_the_kv_bytes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let per_position = kv_bytes_per_position(file.config(), 0, 6);
    // 100 positions in all; a peer may hold 2 of the 4 sessions and so
    // half the bytes: 50 positions.
    let cfg = ExecutorConfig {
        max_sessions: 4,
        max_sessions_per_peer: 2,
        kv_bytes: Some(100 * per_position),
        ..ExecutorConfig::default()
    };
    let server = TestServer::start(&file, MODEL, 0, 6, cfg, vec![]).await?;
    let peer = server.net.peer_id();
    let hog = client_net().await?;
    hog.dial(server.addr.clone()).await?;
    let (_a, first) = raw_open(&hog, peer, 1, 40).await?;
    assert!(
        matches!(first, Some(InferMessage::Opened { max_length: 40, .. })),
        "{first:?}"
    );
    // 40 + 20 positions are more bytes than one peer may hold.
    let (_b, over) = raw_open(&hog, peer, 2, 20).await?;
    assert!(is_busy(&over, "one peer may hold"), "{over:?}");
    let (_c, second) = raw_open(&hog, peer, 3, 10).await?;
    assert!(
        matches!(second, Some(InferMessage::Opened { .. })),
        "{second:?}"
    );
    // Two sessions: the peer's most, whatever their size.
    let (_d, third) = raw_open(&hog, peer, 4, 1).await?;
    assert!(is_busy(&third, "sessions"), "{third:?}");
    // The reservation is bytes from the model's shape, and the announced
    // free KV is what the rest of the budget holds.
    let st = server.exec.stats();
    assert_eq!(st.reserved_kv_bytes, 50 * per_position);
    assert_eq!(st.free_kv_tokens, 50);
    // A second peer may not take more than the budget has left either.
    let other = client_net().await?;
    other.dial(server.addr.clone()).await?;
    let (_e, too_big) = raw_open(&other, peer, 5, 60).await?;
    assert!(is_busy(&too_big, "are free"), "{too_big:?}");
    // Another peer still gets served, exactly.
    honest_session_is_exact(&file, &server).await?;
    server.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_opened_and_never_used_free_their_slots() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let cfg = ExecutorConfig {
        max_sessions: 2,
        max_sessions_per_peer: 2,
        open_grace: Duration::from_secs(1),
        ..ExecutorConfig::default()
    };
    let server = TestServer::start(&file, MODEL, 0, 6, cfg, vec![]).await?;
    let peer = server.net.peer_id();
    // A flood of Opens that are never stepped.
    let hog = client_net().await?;
    hog.dial(server.addr.clone()).await?;
    let mut held = Vec::new();
    for i in 0..2 {
        let (raw, a) = raw_open(&hog, peer, 10 + i, 64).await?;
        assert!(matches!(a, Some(InferMessage::Opened { .. })), "{a:?}");
        held.push(raw);
    }
    let (_x, full) = raw_open(&hog, peer, 20, 64).await?;
    assert!(is_busy(&full, "sessions"), "{full:?}");
    // Within the grace and a sweep, the slots are free again while the
    // hog's streams stay open.
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.exec.stats().sessions > 0 {
        if Instant::now() > deadline {
            bail!("unused sessions still held after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    honest_session_is_exact(&file, &server).await?;
    drop(held);
    server.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_frame_closes_its_stream_once_the_session_idles() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let cfg = ExecutorConfig {
        idle_timeout: Duration::from_secs(1),
        ..ExecutorConfig::default()
    };
    let server = TestServer::start(&file, MODEL, 0, 6, cfg, vec![]).await?;
    let peer = server.net.peer_id();
    let slow = client_net().await?;
    slow.dial(server.addr.clone()).await?;
    let (mut raw, a) = raw_open(&slow, peer, 30, 64).await?;
    assert!(matches!(a, Some(InferMessage::Opened { .. })), "{a:?}");
    // A length prefix that promises 4,000 bytes, then 10 of them.
    raw.w.write_all(&4000u32.to_le_bytes()).await?;
    raw.w.write_all(&[0u8; 10]).await?;
    raw.w.flush().await?;
    let began = Instant::now();
    let end = raw.recv().await;
    assert!(
        matches!(end, Ok(None) | Err(_)),
        "the stream should end, got {end:?}"
    );
    let waited = began.elapsed();
    assert!(waited < Duration::from_secs(10), "closed after {waited:?}");
    // The executor's sweep frees the session itself within a sweep period
    // of the stream's end (they run on timers of their own).
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.exec.stats().sessions > 0 {
        if Instant::now() > deadline {
            bail!("the idle session is still held 5 s after its stream closed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other sessions, on the same server, are served as before.
    honest_session_is_exact(&file, &server).await?;
    server.kill().await;
    Ok(())
}

/// What a fake server does with each step.
#[derive(Debug, Clone, Copy)]
enum Lie {
    /// Sends a copy four times the step's size and its own input passed
    /// off as the route's result.
    OddCopyAndResult,
    /// Reports that hop `0` (the next one) is unreachable.
    Blame(u32),
}

/// A fake server: answers `Open`, then every `Step` as `lie` says.
async fn impostor(lie: Lie) -> Result<nomoat_node::net::NetHandle> {
    let net = client_net().await?;
    let mut incoming = net.control().accept(StreamProtocol::new(INFER_PROTOCOL))?;
    tokio::spawn(async move {
        while let Some((_, stream)) = incoming.next().await {
            tokio::spawn(async move {
                let (mut r, mut w) = futures::AsyncReadExt::split(stream);
                while let Ok(Some(m)) = read_message(&mut r).await {
                    let answers = match m {
                        InferMessage::Open(o) => vec![InferMessage::Opened {
                            session_id: o.session_id,
                            hop_index: o.hop_index,
                            max_length: o.max_length,
                        }],
                        InferMessage::Step(s) if matches!(lie, Lie::Blame(_)) => {
                            let Lie::Blame(next) = lie else {
                                unreachable!()
                            };
                            vec![InferMessage::Error(nomoat_protocol::ErrorFrame::new(
                                nomoat_protocol::ErrorCode::Internal,
                                format!("hop {next} is unreachable: the push stream to it closed"),
                                Some(s.session_id),
                                s.seq,
                                next,
                            ))]
                        }
                        InferMessage::Step(s) => {
                            let big: Vec<usize> =
                                [s.hidden.shape()[0] * 4, s.hidden.shape()[1]].into();
                            let n: usize = big.iter().product();
                            let copy = TensorFrame::from_f32(big, &vec![0.25; n], s.hidden.dtype())
                                .expect("a frame");
                            vec![
                                InferMessage::Copy {
                                    session_id: s.session_id,
                                    seq: s.seq,
                                    hop_index: 0,
                                    hidden: copy,
                                },
                                InferMessage::Result {
                                    session_id: s.session_id,
                                    seq: s.seq,
                                    hidden: s.hidden,
                                },
                            ]
                        }
                        _ => break,
                    };
                    for a in answers {
                        if write_message(&mut w, &a).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(net)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_from_a_hop_that_is_not_last_is_refused_and_odd_copies_are_not_kept() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let (fake, tail, client, route) = fake_then_honest(&file, Lie::OddCopyAndResult).await?;
    let mut session =
        RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(5)).await?;
    let head = Head::load(&file, WeightMode::Fast)?;
    let frame =
        nomoat_node::engine::hidden_to_frame(&head.embed(&PROMPT)?, nomoat_protocol::DType::F32)?;
    let err = session
        .step(0, frame)
        .await
        .expect_err("the impostor's result");
    // The step fails naming the impostor (no other server holds 0..2, so
    // there is nobody to fail over to).
    assert_eq!(err.failed_hop(), Some((0, fake.peer_id())), "{err}");
    assert!(
        matches!(&err, ClientError::FailoverFailed { failure, .. }
            if failure.to_string().contains("only the last hop")),
        "{err}"
    );
    // The oversized copy was not kept as hop 1's input.
    assert!(session.history()[1].is_empty(), "an odd copy was kept");
    tail.kill().await;
    Ok(())
}

/// A route of a fake hop 0 before an honest hop 1.
async fn fake_then_honest(
    file: &ModelFile,
    lie: Lie,
) -> Result<(
    nomoat_node::net::NetHandle,
    TestServer,
    nomoat_node::net::NetHandle,
    Vec<Hop>,
)> {
    let tail = TestServer::start(file, MODEL, 2, 6, ExecutorConfig::default(), vec![]).await?;
    let fake = impostor(lie).await?;
    let fake_addrs = fake.wait_listening(1, Duration::from_secs(5)).await;
    let client = client_net().await?;
    client.dial(tail.addr.clone()).await?;
    let fake_addr = fake_addrs
        .into_iter()
        .next()
        .expect("a listen address")
        .with(libp2p::multiaddr::Protocol::P2p(fake.peer_id()));
    client.dial(fake_addr).await?;
    let route = vec![
        Hop {
            peer_id: fake.peer_id().to_bytes(),
            blocks: BlockRange { start: 0, end: 2 },
        },
        Hop {
            peer_id: tail.net.peer_id().to_bytes(),
            blocks: BlockRange { start: 2, end: 6 },
        },
    ];
    Ok((fake, tail, client, route))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hop_that_blames_a_reachable_successor_is_blamed_itself() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let head = Head::load(&file, WeightMode::Fast)?;
    // Blaming its successor (which this client reaches), then a hop it
    // cannot even know of.
    for named in [1u32, 5] {
        let (fake, tail, client, route) = fake_then_honest(&file, Lie::Blame(named)).await?;
        let mut session =
            RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(5)).await?;
        let frame = nomoat_node::engine::hidden_to_frame(
            &head.embed(&PROMPT)?,
            nomoat_protocol::DType::F32,
        )?;
        let err = session
            .step(0, frame)
            .await
            .expect_err("the fake hop fails every step");
        assert_eq!(err.failed_hop(), Some((0, fake.peer_id())), "{err}");
        assert!(
            !client.is_backed_off(&tail.net.peer_id()),
            "the honest hop was backed off on the fake's word: {err}"
        );
        assert!(client.is_backed_off(&fake.peer_id()), "{err}");
        tail.kill().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_bigger_than_any_open_is_refused_before_its_body_is_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let server = TestServer::start(&file, MODEL, 0, 6, ExecutorConfig::default(), vec![]).await?;
    let peer = server.net.peer_id();
    let big = client_net().await?;
    big.dial(server.addr.clone()).await?;
    let mut raw = Raw::open(&big, peer).await?;
    // A prefix announcing 1 MiB: fine for a step's tensor, but a stream's
    // first message is an Open or an Attach, a few hundred bytes.
    raw.w.write_all(&(1u32 << 20).to_le_bytes()).await?;
    raw.w.flush().await?;
    match raw.recv().await? {
        Some(InferMessage::Error(e)) => {
            assert_eq!(e.code, Some(ErrorCode::TooLarge), "{e}");
            assert!(
                e.message
                    .contains(&nomoat_protocol::MAX_CONTROL_BYTES.to_string()),
                "{e}"
            );
        }
        other => bail!("expected TooLarge, got {other:?}"),
    }
    honest_session_is_exact(&file, &server).await?;
    server.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_holding_info_queries_open_gets_only_its_share() -> Result<()> {
    use nomoat_node::server::MAX_INFO_STREAMS_PER_PEER;
    use nomoat_protocol::INFO_PROTOCOL;
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let server = TestServer::start(&file, MODEL, 0, 6, ExecutorConfig::default(), vec![]).await?;
    let peer = server.net.peer_id();
    // The hog opens twice its share of info streams and sends nothing on
    // them: each it is given holds a slot until the first-message timeout.
    let hog = client_net().await?;
    hog.dial(server.addr.clone()).await?;
    let mut streams = Vec::new();
    for _ in 0..2 * MAX_INFO_STREAMS_PER_PEER {
        let s = hog
            .control()
            .open_stream(peer, StreamProtocol::new(INFO_PROTOCOL))
            .await?;
        streams.push(s);
    }
    // Those past its share are dropped at once; the rest stay open.
    let outcomes = futures::future::join_all(streams.iter_mut().map(|s| async move {
        let mut b = [0u8; 1];
        tokio::time::timeout(
            Duration::from_secs(2),
            futures::AsyncReadExt::read(s, &mut b),
        )
        .await
        .is_err()
    }))
    .await;
    let held = outcomes.iter().filter(|open| **open).count();
    assert_eq!(held, MAX_INFO_STREAMS_PER_PEER, "{outcomes:?}");
    // While the hog holds its share, its own next query is not answered,
    // and everyone else's is.
    assert!(nomoat_node::net::query_servers(&hog, peer, MODEL)
        .await
        .is_err());
    let honest = client_net().await?;
    honest.dial(server.addr.clone()).await?;
    let found = nomoat_node::net::query_servers(&honest, peer, MODEL).await?;
    assert_eq!(found.len(), 1, "{found:?}");
    // Once the hog lets go, it is answered again.
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(15);
    while nomoat_node::net::query_servers(&hog, peer, MODEL)
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the hog's slots were never given back");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
