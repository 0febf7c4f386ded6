//! Swarms of servers in one process, on 127.0.0.1 QUIC, with a tiny
//! random-weight model: the swarm against the whole model, bad input against
//! a live server, a server that dies mid-session, and a relayed connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use libp2p::PeerId;
use nomoat_node::client::{simple_route, ClientError, RemoteSession};
use nomoat_node::engine::{hidden_from_frame, hidden_to_frame, Head, ModelFile, Span, WeightMode};
use nomoat_node::net::wire::write_frame;
use nomoat_node::server::executor::ExecutorConfig;
use nomoat_protocol::{
    BlockRange, DType, ErrorCode, Hop, InferMessage, OpenSession, SessionId, Step, TensorFrame,
    MAX_MESSAGE_BYTES,
};
use nomoat_tests::harness::{self, client_net, discover_n, Raw, TestServer};
use nomoat_tests::{max_abs_diff, TinyArch, TinyModel, TinySpec};

const MODEL: &str = "tiny-test-model";
const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const DECODE: [u32; 6] = [9, 31, 77, 2, 50, 11];

fn tiny(dir: &std::path::Path) -> Result<ModelFile> {
    let path = TinyModel::generate(TinySpec::new(TinyArch::Llama))?
        .write_gguf(&dir.join("tiny.gguf"), GgmlDType::F32)?;
    Ok(ModelFile::open(path)?)
}

/// Logits of the whole model for the prompt and then each decode token.
fn local_trace(file: &ModelFile) -> Result<Vec<Tensor>> {
    harness::local_trace(file, &PROMPT, &DECODE)
}

/// The same trace through a remote session.
async fn remote_trace(head: &Head, session: &mut RemoteSession) -> Result<Vec<Tensor>> {
    harness::remote_trace(head, session, &PROMPT, &DECODE).await
}

async fn three_servers(file: &ModelFile, cfg: ExecutorConfig) -> Result<Vec<TestServer>> {
    let s3 = TestServer::start(file, MODEL, 4, 6, cfg.clone(), vec![]).await?;
    let s2 = TestServer::start(file, MODEL, 2, 4, cfg.clone(), vec![s3.addr.clone()]).await?;
    let s1 = TestServer::start(file, MODEL, 0, 2, cfg, vec![s3.addr.clone()]).await?;
    Ok(vec![s1, s2, s3])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_give_the_whole_models_logits() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let expected = local_trace(&file)?;
    let servers = three_servers(&file, ExecutorConfig::default()).await?;
    let client = client_net().await?;
    let boot = vec![servers[2].addr.clone()];
    let found = discover_n(&client, &boot, MODEL, 3).await?;
    let route = nomoat_node::client::plan(&client, MODEL, 6, &found, 64)?;
    assert_eq!(route.len(), 3, "{route:?}");
    assert_eq!(route, simple_route(MODEL, 6, &found)?);
    // The DHT knows every server as a provider of the model.
    let mut want: Vec<PeerId> = servers.iter().map(|s| s.net.peer_id()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = client.providers(MODEL, Duration::from_secs(5)).await;
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "providers {got:?}, expected {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let head = Head::load(&file, WeightMode::Fast)?;
    let mut session =
        RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(10)).await?;
    let got = remote_trace(&head, &mut session).await?;
    for (step, (a, b)) in expected.iter().zip(&got).enumerate() {
        let d = max_abs_diff(a, b)?;
        assert!(
            d <= 1e-5,
            "step {step}: swarm differs from the whole model by {d}"
        );
    }
    // The client measured every hop's compute on the single-token steps.
    for s in &servers {
        assert!(client.observed_secs_per_block(&s.net.peer_id()).is_some());
    }
    // Every hop's input was kept: hop i+1's inputs are hop i's outputs.
    let history = session.history();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|h| h.len() == 1 + DECODE.len()));
    // A rewind: back to the prompt's end, the same tokens give the same logits.
    let frame = hidden_to_frame(&head.embed(&DECODE[..1])?, DType::F32)?;
    let h = session.step(PROMPT.len() as u32, frame).await?;
    let again = head.logits(&hidden_from_frame(&h, 64)?)?;
    assert!(max_abs_diff(&again, &expected[1])? <= 1e-5);
    session.close().await;
    for s in &servers {
        s.kill().await;
    }
    Ok(())
}

fn open_msg(id: SessionId, model: &str, peer: PeerId, blocks: BlockRange) -> InferMessage {
    InferMessage::Open(OpenSession {
        session_id: id,
        model_id: model.to_string(),
        route: vec![Hop {
            peer_id: peer.to_bytes(),
            blocks,
        }],
        hop_index: 0,
        max_length: 64,
        adapter: None,
    })
}

fn step_msg(id: SessionId, seq: u64, pos: u32, frame: TensorFrame) -> InferMessage {
    InferMessage::Step(Step {
        session_id: id,
        seq,
        start_pos: pos,
        hidden: frame,
        last_hop: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_while_a_good_session_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let expected = local_trace(&file)?;
    let cfg = ExecutorConfig {
        max_sessions: 3,
        ..ExecutorConfig::default()
    };
    // The server under attack holds 0..4; a second one holds 4..6.
    let tail = TestServer::start(&file, MODEL, 4, 6, cfg.clone(), vec![]).await?;
    let target = TestServer::start(&file, MODEL, 0, 4, cfg, vec![tail.addr.clone()]).await?;
    let peer = target.net.peer_id();
    let client = client_net().await?;
    let boot = vec![tail.addr.clone()];
    let found = discover_n(&client, &boot, MODEL, 2).await?;
    client.dial(target.addr.clone()).await?;
    let head = Arc::new(Head::load(&file, WeightMode::Fast)?);

    // The good session runs its whole trace, slowly, while the attacks go on.
    let good = {
        let (client, head, found) = (client.clone(), head.clone(), found.clone());
        tokio::spawn(async move {
            let route = simple_route(MODEL, 6, &found)?;
            let mut session =
                RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(10)).await?;
            let mut out = Vec::new();
            for _ in 0..3 {
                session
                    .step(0, hidden_to_frame(&head.embed(&PROMPT)?, DType::F32)?)
                    .await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            out.extend(remote_trace(&head, &mut session).await?);
            session.close().await;
            anyhow::Ok(out)
        })
    };

    let hidden = |tokens: &[u32]| -> Result<TensorFrame> {
        Ok(hidden_to_frame(&head.embed(tokens)?, DType::F32)?)
    };
    let id = SessionId([7; 16]);
    let mut raw = Raw::open(&client, peer).await?;
    raw.send(&open_msg(id, MODEL, peer, BlockRange { start: 0, end: 4 }))
        .await?;
    assert!(matches!(
        raw.recv().await?,
        Some(InferMessage::Opened { .. })
    ));

    // A malformed frame: answered, and the stream stays usable.
    write_frame(&mut raw.w, b"\xff\xff not protobuf").await?;
    raw.expect_error(ErrorCode::Malformed).await?;
    let input = hidden(&PROMPT)?;
    raw.send(&step_msg(id, 1, 0, input.clone())).await?;
    let Some(InferMessage::Result {
        seq: 1,
        hidden: out,
        ..
    }) = raw.recv().await?
    else {
        bail!("no result of step 1");
    };
    // The output came with the server's receipt: signed by it, naming the
    // session's input and this output.
    let receipt = raw.receipt.take().context("no receipt before the result")?;
    assert_eq!(
        nomoat_node::net::signed::verify_receipt(&receipt).map_err(anyhow::Error::msg)?,
        peer
    );
    let mut chain = nomoat_protocol::InputChain::new(id);
    chain.push(0, &input);
    assert_eq!(receipt.body.inputs, chain);
    assert_eq!(receipt.body.output, nomoat_protocol::frame_hash(&out));
    assert_eq!(
        (receipt.body.seq, receipt.body.rows),
        (1, PROMPT.len() as u32)
    );

    // Wrong hidden size.
    let narrow = TensorFrame::from_f32(vec![1, 32], &[0.5; 32], DType::F32)?;
    raw.send(&step_msg(id, 2, 7, narrow)).await?;
    raw.expect_error(ErrorCode::BadShape).await?;
    // An unknown dtype byte inside the tensor frame.
    let mut bad = hidden(&[1])?.encode();
    bad[3] = 9;
    let mut body = Vec::new();
    {
        // Step { session_id, seq: 3, start_pos: 7, hidden: bad } by hand.
        let step = [
            vec![0x0a, 16],
            id.0.to_vec(),
            vec![0x10, 3, 0x18, 7, 0x22],
            varint(bad.len()),
            bad,
        ]
        .concat();
        body.extend([0x1a]);
        body.extend(varint(step.len()));
        body.extend(step);
    }
    write_frame(&mut raw.w, &body).await?;
    raw.expect_error(ErrorCode::BadDType).await?;
    // A replayed sequence number.
    raw.send(&step_msg(id, 1, 0, hidden(&PROMPT)?)).await?;
    raw.expect_error(ErrorCode::Replayed).await?;
    // A step that would leave a gap in the positions.
    raw.send(&step_msg(id, 4, 40, hidden(&[1])?)).await?;
    raw.expect_error(ErrorCode::Malformed).await?;
    // A session this stream does not carry.
    raw.send(&step_msg(SessionId([9; 16]), 5, 0, hidden(&[1])?))
        .await?;
    raw.expect_error(ErrorCode::UnknownSession).await?;
    // After all that the session still works.
    raw.send(&step_msg(id, 6, 7, hidden(&[9])?)).await?;
    assert!(matches!(
        raw.recv().await?,
        Some(InferMessage::Result { seq: 6, .. })
    ));

    // BlockRange the server does not hold, and another model.
    let mut wrong = Raw::open(&client, peer).await?;
    wrong
        .send(&open_msg(
            SessionId([4; 16]),
            MODEL,
            peer,
            BlockRange { start: 2, end: 6 },
        ))
        .await?;
    wrong.expect_error(ErrorCode::WrongBlocks).await?;
    let mut other = Raw::open(&client, peer).await?;
    other
        .send(&open_msg(
            SessionId([5; 16]),
            "another-model",
            peer,
            BlockRange { start: 0, end: 4 },
        ))
        .await?;
    other.expect_error(ErrorCode::WrongModel).await?;
    // A frame over the size limit: answered, then the stream is closed.
    let mut big = Raw::open(&client, peer).await?;
    big.send(&open_msg(
        SessionId([6; 16]),
        MODEL,
        peer,
        BlockRange { start: 0, end: 4 },
    ))
    .await?;
    assert!(matches!(
        big.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    futures::AsyncWriteExt::write_all(&mut big.w, &((MAX_MESSAGE_BYTES + 1) as u32).to_le_bytes())
        .await?;
    futures::AsyncWriteExt::flush(&mut big.w).await?;
    big.expect_error(ErrorCode::TooLarge).await?;
    assert!(big.recv().await?.is_none(), "the stream should close");
    // Too many sessions: the good one and `id` are open; the cap is 3.
    let mut third = Raw::open(&client, peer).await?;
    third
        .send(&open_msg(
            SessionId([10; 16]),
            MODEL,
            peer,
            BlockRange { start: 0, end: 4 },
        ))
        .await?;
    assert!(matches!(
        third.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    let mut fourth = Raw::open(&client, peer).await?;
    fourth
        .send(&open_msg(
            SessionId([11; 16]),
            MODEL,
            peer,
            BlockRange { start: 0, end: 4 },
        ))
        .await?;
    match fourth.recv().await? {
        Some(InferMessage::Error(e)) => {
            assert_eq!(e.code, Some(ErrorCode::Busy));
            assert!(e.message.contains("busy"), "{e}");
        }
        other => panic!("expected busy, got {other:?}"),
    }

    // The good session was never disturbed.
    let got = good.await??;
    for (step, (a, b)) in expected.iter().zip(&got).enumerate() {
        let d = max_abs_diff(a, b)?;
        assert!(d <= 1e-5, "good session step {step} differs by {d}");
    }
    // A push stream for a session nobody opens: refused once its wait ends.
    let mut stray = Raw::open(&client, peer).await?;
    stray
        .send(&InferMessage::Attach {
            session_id: SessionId([3; 16]),
            from_hop: 0,
        })
        .await?;
    stray.expect_error(ErrorCode::UnknownSession).await?;
    target.kill().await;
    tail.kill().await;
    Ok(())
}

fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return out;
        }
        out.push(b | 0x80);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_dying_mid_session_is_named_within_the_step_timeout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let servers = three_servers(&file, ExecutorConfig::default()).await?;
    let client = client_net().await?;
    let boot = vec![servers[2].addr.clone()];
    let found = discover_n(&client, &boot, MODEL, 3).await?;
    let route = simple_route(MODEL, 6, &found)?;
    let head = Head::load(&file, WeightMode::Fast)?;
    let timeout = Duration::from_secs(3);
    let mut session = RemoteSession::open(&client, MODEL, route, 64, timeout).await?;
    session
        .step(0, hidden_to_frame(&head.embed(&PROMPT)?, DType::F32)?)
        .await?;
    let middle = servers[1].net.peer_id();
    servers[1].kill().await;
    let t = Instant::now();
    let err = session
        .step(
            PROMPT.len() as u32,
            hidden_to_frame(&head.embed(&[5])?, DType::F32)?,
        )
        .await
        .unwrap_err();
    let elapsed = t.elapsed();
    // No other server holds its blocks: failover finds no replacement.
    assert!(
        matches!(err, ClientError::FailoverFailed { .. }),
        "expected a failed failover, got {err}"
    );
    assert_eq!(err.failed_hop(), Some((1, middle)), "{err}");
    assert!(err.to_string().contains(&middle.to_string()));
    assert!(
        elapsed <= timeout + Duration::from_secs(1),
        "reported after {elapsed:?}"
    );
    // Its announcements stop; once they are stale the swarm view drops it and
    // routing names the gap.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live = nomoat_node::net::discover(&client, &boot, MODEL).await?;
        if live.len() == 2 {
            match simple_route(MODEL, 6, &live) {
                Err(e @ ClientError::NoRoute { .. }) => {
                    assert!(e.to_string().contains("2..4"), "{e}");
                    break;
                }
                other => panic!("expected no route, got {other:?}"),
            }
        }
        assert!(
            Instant::now() < deadline,
            "the dead server was never expired: {live:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    servers[0].kill().await;
    servers[2].kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_reach_each_other_through_a_relay() -> Result<()> {
    use nomoat_node::net::{start, NetConfig};
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let expected = local_trace(&file)?;
    let relay = start(NetConfig {
        relay_server: true,
        ..NetConfig::default()
    })
    .await?;
    let relay_addr = relay
        .wait_listening(1, Duration::from_secs(10))
        .await
        .remove(0);
    // The server listens only through the relay's circuit.
    let server = TestServer::start(
        &file,
        MODEL,
        0,
        6,
        ExecutorConfig::default(),
        vec![relay_addr.clone()],
    )
    .await?;
    let circuit = relay_addr
        .clone()
        .with(libp2p::multiaddr::Protocol::P2pCircuit);
    server.net.listen_on(circuit.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server
        .net
        .listen_addrs()
        .iter()
        .any(|a| a.to_string().contains("p2p-circuit"))
    {
        assert!(Instant::now() < deadline, "no relayed listen address");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = client_net().await?;
    let via_relay = circuit
        .with_p2p(server.net.peer_id())
        .map_err(|a| anyhow::anyhow!("{a}"))?;
    let peer = client.dial(via_relay).await?;
    assert_eq!(peer, server.net.peer_id());
    let first = client.connection_addrs(&peer);
    assert!(
        first
            .first()
            .is_some_and(|a| a.to_string().contains("p2p-circuit")),
        "first connection {first:?} should be relayed"
    );
    // A whole session over the relayed connection (or its DCUtR upgrade).
    let head = Head::load(&file, WeightMode::Fast)?;
    let route = vec![Hop {
        peer_id: peer.to_bytes(),
        blocks: BlockRange { start: 0, end: 6 },
    }];
    let mut session =
        RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(10)).await?;
    let got = remote_trace(&head, &mut session).await?;
    for (a, b) in expected.iter().zip(&got) {
        assert!(max_abs_diff(a, b)? <= 1e-5);
    }
    session.close().await;
    server.kill().await;
    relay.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_concurrent_sessions() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let cfg = ExecutorConfig::default();
    let a1 = TestServer::start(&file, MODEL, 3, 6, cfg.clone(), vec![]).await?;
    let boot = vec![a1.addr.clone()];
    let a2 = TestServer::start(&file, MODEL, 3, 6, cfg.clone(), boot.clone()).await?;
    let b1 = TestServer::start(&file, MODEL, 0, 3, cfg.clone(), boot.clone()).await?;
    let b2 = TestServer::start(&file, MODEL, 0, 3, cfg, boot.clone()).await?;
    let client = client_net().await?;
    let found = discover_n(&client, &boot, MODEL, 4).await?;
    let head = Head::load(&file, WeightMode::Fast)?;
    // 16 sessions planned at once, open together.
    let mut sessions = Vec::new();
    for _ in 0..16 {
        let route = nomoat_node::client::plan(&client, MODEL, 6, &found, 64)?;
        assert_eq!(route.len(), 2, "{route:?}");
        sessions
            .push(RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(10)).await?);
    }
    let expected = local_trace(&file)?;
    for s in &mut sessions {
        let frame = hidden_to_frame(&head.embed(&PROMPT)?, DType::F32)?;
        let h = s.step(0, frame).await?;
        let logits = head.logits(&hidden_from_frame(&h, 64)?)?;
        assert!(max_abs_diff(&logits, &expected[0])? <= 1e-5);
    }
    // Every replica carries sessions.
    for (name, server) in [("a1", &a1), ("a2", &a2), ("b1", &b1), ("b2", &b2)] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.exec.stats().sessions == 0 {
            assert!(
                Instant::now() < deadline,
                "replica {name} carries no session"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let total: usize = [&a1, &a2, &b1, &b2]
        .iter()
        .map(|s| s.exec.stats().sessions)
        .sum();
    assert_eq!(
        total, 32,
        "each of 16 sessions holds one range on each of 2 ranges"
    );
    for s in sessions {
        s.close().await;
    }
    for s in [&a1, &a2, &b1, &b2] {
        s.kill().await;
    }
    Ok(())
}

/// Runs the prompt and the first `before` decode tokens, stops the server at
/// `kill` in the route, then the rest: every step's logits must be the whole
/// model's, with the dead hop replaced by `spares`.
async fn failover_case(
    spans: &[(usize, usize)],
    spares: &[(usize, usize)],
    kill: usize,
    before: usize,
) -> Result<Vec<nomoat_node::client::FailoverReport>> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let expected = local_trace(&file)?;
    let cfg = ExecutorConfig::default();
    let first =
        TestServer::start(&file, MODEL, spans[0].0, spans[0].1, cfg.clone(), vec![]).await?;
    let boot = vec![first.addr.clone()];
    let mut chain = vec![first];
    for &(a, b) in &spans[1..] {
        chain.push(TestServer::start(&file, MODEL, a, b, cfg.clone(), boot.clone()).await?);
    }
    let mut spare_servers = Vec::new();
    for &(a, b) in spares {
        spare_servers.push(TestServer::start(&file, MODEL, a, b, cfg.clone(), boot.clone()).await?);
    }
    let client = client_net().await?;
    discover_n(&client, &boot, MODEL, spans.len() + spares.len()).await?;
    // Every server of the chain must know the spares before the kill: they
    // are found through a surviving hop.
    for s in &chain {
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.net.servers(MODEL).len() < spans.len() + spares.len() {
            assert!(Instant::now() < deadline, "the spares never announced");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let route: Vec<Hop> = chain
        .iter()
        .zip(spans)
        .map(|(s, &(a, b))| Hop {
            peer_id: s.net.peer_id().to_bytes(),
            blocks: BlockRange {
                start: a as u32,
                end: b as u32,
            },
        })
        .collect();
    let head = Head::load(&file, WeightMode::Fast)?;
    let mut session =
        RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(5)).await?;
    let hidden = head.config().hidden_size;
    let inputs: Vec<Vec<u32>> = std::iter::once(PROMPT.to_vec())
        .chain(DECODE.iter().map(|t| vec![*t]))
        .collect();
    let dead = chain[kill].net.peer_id();
    let mut pos = 0u32;
    for (i, tokens) in inputs.iter().enumerate() {
        if i == before + 1 {
            chain[kill].kill().await;
        }
        let frame = hidden_to_frame(&head.embed(tokens)?, DType::F32)?;
        let h = session.step(pos, frame).await?;
        let logits = head.logits(&hidden_from_frame(&h, hidden)?)?;
        let d = max_abs_diff(&logits, &expected[i])?;
        assert!(d <= 1e-5, "step {i}: the swarm differs by {d}");
        pos += tokens.len() as u32;
    }
    assert!(
        session.route().iter().all(|(p, _)| *p != dead),
        "the dead server is still routed: {:?}",
        session.route()
    );
    // Backed off: a fresh plan avoids it even while announcements linger.
    assert!(client.is_backed_off(&dead));
    // A rewind after the failover still agrees.
    let frame = hidden_to_frame(&head.embed(&DECODE[..1])?, DType::F32)?;
    let h = session.step(PROMPT.len() as u32, frame).await?;
    let again = head.logits(&hidden_from_frame(&h, hidden)?)?;
    assert!(max_abs_diff(&again, &expected[1])? <= 1e-5);
    let reports = session.failovers().to_vec();
    session.close().await;
    for s in chain.iter().chain(&spare_servers) {
        s.kill().await;
    }
    Ok(reports)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_middle_hop_is_replaced_by_a_wider_spare() -> Result<()> {
    let reports = failover_case(&[(0, 2), (2, 4), (4, 6)], &[(1, 5)], 1, 2).await?;
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert_eq!(r.failed, 1..=1);
    assert_eq!(r.blocks, BlockRange { start: 2, end: 4 });
    assert_eq!(r.replacement.len(), 1);
    assert_eq!(r.replacement[0].1, BlockRange { start: 2, end: 4 });
    // The prompt chunk and two decode steps, cut as first sent.
    assert_eq!(r.replayed_steps, 3);
    assert_eq!(r.replayed_positions, PROMPT.len() as u32 + 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_hop_is_replaced_by_two_servers() -> Result<()> {
    let reports = failover_case(&[(0, 2), (2, 4), (4, 6)], &[(2, 3), (3, 4)], 1, 1).await?;
    assert_eq!(reports.len(), 1, "{reports:?}");
    let blocks: Vec<BlockRange> = reports[0].replacement.iter().map(|(_, b)| *b).collect();
    assert_eq!(
        blocks,
        [
            BlockRange { start: 2, end: 3 },
            BlockRange { start: 3, end: 4 }
        ]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_and_the_last_hop_fail_over_too() -> Result<()> {
    for kill in [0, 1] {
        let reports = failover_case(&[(0, 3), (3, 6)], &[(0, 6)], kill, 0).await?;
        assert_eq!(reports.len(), 1, "kill hop {kill}: {reports:?}");
        assert_eq!(reports[0].failed, kill..=kill);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_server_moves_into_a_gap_drains_and_stays() -> Result<()> {
    use nomoat_node::server::rebalance::{run_rebalancer, Moves, RebalanceConfig, SpanLoader};
    let dir = tempfile::tempdir()?;
    let file = Arc::new(tiny(dir.path())?);
    let expected = local_trace(&file)?;
    let cfg = ExecutorConfig::default();
    let a = TestServer::start(&file, MODEL, 0, 2, cfg.clone(), vec![]).await?;
    let boot = vec![a.addr.clone()];
    let c = TestServer::start(&file, MODEL, 2, 4, cfg.clone(), boot.clone()).await?;
    let b = TestServer::start(&file, MODEL, 0, 2, cfg, boot.clone()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.net.servers(MODEL).len() < 3 {
        assert!(Instant::now() < deadline, "the swarm never formed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A session on b's span 0..2 opened before the move keeps running there.
    let head = Head::load(&file, WeightMode::Fast)?;
    let reference = Span::load(&file, 0, 2, WeightMode::Fast)?;
    let mut ref_cache = reference.new_cache();
    let id = SessionId([7; 16]);
    b.exec.open(id, PeerId::random(), 0, 2, 64, None).await?;
    let prompt = head.embed(&PROMPT)?;
    let out = b
        .exec
        .step(id, 1, 0, hidden_to_frame(&prompt, DType::F32)?)
        .await?;
    let want = reference.forward(&prompt, 0, &mut ref_cache)?;
    assert!(max_abs_diff(&hidden_from_frame(&out, 64)?, &want)? <= 1e-6);
    // BlockRange 4..6 have no server: b, a duplicate of a, moves there.
    let shutdown = tokio_util::sync::CancellationToken::new();
    let moves = Arc::new(Moves::default());
    let loader: SpanLoader = {
        let file = file.clone();
        Arc::new(move |s: u32, e: u32| {
            let span = Span::load(&file, s as usize, e as usize, WeightMode::Fast);
            Box::pin(async move { Ok(span?) })
        })
    };
    tokio::spawn(run_rebalancer(
        b.net.clone(),
        b.exec.clone(),
        MODEL.to_string(),
        loader,
        RebalanceConfig {
            period: Duration::from_millis(200),
            cooldown: Duration::ZERO,
            margin: 0.2,
        },
        moves.clone(),
        shutdown.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while moves.count() == 0 {
        assert!(Instant::now() < deadline, "b never moved");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!((b.exec.span().start(), b.exec.span().end()), (4, 6));
    assert_eq!(b.exec.stats().draining, 1);
    // The old session drains on the old span, still exact.
    let x = head.embed(&DECODE[..1])?;
    let out = b
        .exec
        .step(id, 2, PROMPT.len(), hidden_to_frame(&x, DType::F32)?)
        .await?;
    let want = reference.forward(&x, PROMPT.len(), &mut ref_cache)?;
    assert!(max_abs_diff(&hidden_from_frame(&out, 64)?, &want)? <= 1e-6);
    b.exec.close(id);
    // Announced: a client finds a full chain a -> c -> b and it is exact.
    let client = client_net().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let route = loop {
        let found = discover_n(&client, &boot, MODEL, 3).await?;
        if let Ok(r) = simple_route(MODEL, 6, &found) {
            break r;
        }
        assert!(Instant::now() < deadline, "the move was never announced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(route[2].peer_id, b.net.peer_id().to_bytes());
    let mut session =
        RemoteSession::open(&client, MODEL, route, 64, Duration::from_secs(10)).await?;
    let got = remote_trace(&head, &mut session).await?;
    for (x, y) in expected.iter().zip(&got) {
        assert!(max_abs_diff(x, y)? <= 1e-5);
    }
    session.close().await;
    // Balanced now: with no cooldown at all, b still does not move again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(moves.count(), 1, "b flapped");
    shutdown.cancel();
    for s in [&a, &b, &c] {
        s.kill().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_own_measurements_win_over_announcements() -> Result<()> {
    let client = client_net().await?;
    let (fast, slow) = (PeerId::random(), PeerId::random());
    let info = |peer: PeerId, throughput: f32| nomoat_protocol::ServerInfo {
        peer_id: peer.to_bytes(),
        model_id: MODEL.into(),
        blocks: BlockRange { start: 0, end: 6 },
        num_blocks: 6,
        hidden_size: 64,
        throughput,
        free_kv_tokens: 1000,
        load: 0.0,
        active_sessions: 0,
        batch_capacity: 0.0,
        version: String::new(),
        addrs: Vec::new(),
        reachability: nomoat_protocol::Reachability::Unknown,
        timestamp_ms: 0,
        adapters: Vec::new(),
    };
    // `slow` claims 1,000 tokens/s, `fast` 10; the client measured otherwise.
    let servers = [info(fast, 10.0), info(slow, 1000.0)];
    let pick = || -> Result<Vec<u8>> {
        let r = nomoat_node::client::plan(&client, MODEL, 6, &servers, 64)?;
        Ok(r[0].peer_id.clone())
    };
    for _ in 0..20 {
        assert_eq!(pick()?, slow.to_bytes(), "announcements alone");
    }
    client.observe_step(slow, 6, 0.5);
    client.observe_step(fast, 6, 0.006);
    for _ in 0..20 {
        assert_eq!(pick()?, fast.to_bytes(), "measured");
    }
    // A peer that failed is not routed while backed off.
    client.peer_failed(fast);
    for _ in 0..20 {
        assert_eq!(pick()?, slow.to_bytes(), "backed off");
    }
    client.shutdown().await;
    Ok(())
}

/// A server started with a session cap announces its load against that
/// cap: full is 1.0, so routing sees it as full, not idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_load_counts_against_the_configured_session_cap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let cfg = ExecutorConfig {
        max_sessions: 2,
        ..ExecutorConfig::default()
    };
    let server = TestServer::start(&file, MODEL, 0, 6, cfg, vec![]).await?;
    let client = client_net().await?;
    let boot = vec![server.addr.clone()];
    let load = |found: &[nomoat_protocol::ServerInfo]| found.first().map(|s| s.load);
    assert_eq!(
        load(&discover_n(&client, &boot, MODEL, 1).await?),
        Some(0.0)
    );
    for i in 0..2u8 {
        server
            .exec
            .open(SessionId([i; 16]), PeerId::random(), 0, 6, 16, None)
            .await?;
    }
    // Announcements refresh every second; wait for the full one.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = nomoat_node::net::discover(&client, &boot, MODEL).await?;
        if load(&found) == Some(1.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a server with 2 of 2 sessions open announced load {:?}",
            load(&found)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    client.shutdown().await;
    server.kill().await;
    Ok(())
}

/// A dial that fails names the address that was dialled, not a peer id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_dial_names_the_address() -> Result<()> {
    let net = client_net().await?;
    let nobody = libp2p::identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    // A closed UDP port on loopback: the handshake fails or times out.
    let addr: libp2p::Multiaddr = format!("/ip4/127.0.0.1/udp/9/quic-v1/p2p/{nobody}").parse()?;
    match net.dial(addr.clone()).await {
        Err(nomoat_node::net::NetError::Dial { addr: got, .. }) => assert_eq!(got, addr),
        other => panic!("dialling nobody gave {other:?}"),
    }
    net.shutdown().await;
    Ok(())
}
