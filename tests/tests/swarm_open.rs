//! Opening sessions with every hop at once, and hidden states in each wire
//! dtype: servers in this process on a tiny random-weight model.
//!
//! A hop answers `Open` before its push stream to the next hop attaches, so
//! a push stream can reach the next hop before the client's `Open` does:
//! it waits there, bounded in time and count, and only the route's previous
//! hop may attach.

use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use libp2p::PeerId;
use nomoat_node::client::RemoteSession;
use nomoat_node::engine::{
    hidden_from_frame, hidden_to_frame, Head, LocalModel, ModelFile, WeightMode,
};
use nomoat_node::server::executor::ExecutorConfig;
use nomoat_node::server::{ATTACH_WAIT_TIMEOUT, MAX_WAITING_ATTACH_PER_PEER};
use nomoat_protocol::{
    BlockRange, DType, ErrorCode, Hop, InferMessage, OpenSession, SessionId, Step, TensorFrame,
};
use nomoat_tests::harness::{client_net, discover_n, Raw, TestServer};
use nomoat_tests::{max_abs_diff, TinyArch, TinyModel, TinySpec};

const MODEL: &str = "tiny-open-model";
const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const DECODE: [u32; 4] = [9, 31, 77, 2];

fn tiny(dir: &std::path::Path) -> Result<ModelFile> {
    let path = TinyModel::generate(TinySpec::new(TinyArch::Llama))?
        .write_gguf(&dir.join("tiny.gguf"), GgmlDType::F32)?;
    Ok(ModelFile::open(path)?)
}

fn attach(id: SessionId) -> InferMessage {
    InferMessage::Attach {
        session_id: id,
        from_hop: 0,
    }
}

/// Opens hop 1 of a route whose hop 0 is `prev` (blocks 0..2) and whose hop
/// 1 is the server (blocks 2..6).
fn open_second(id: SessionId, prev: PeerId, server: PeerId) -> InferMessage {
    InferMessage::Open(OpenSession {
        session_id: id,
        model_id: MODEL.into(),
        route: vec![
            Hop {
                peer_id: prev.to_bytes(),
                blocks: BlockRange { start: 0, end: 2 },
            },
            Hop {
                peer_id: server.to_bytes(),
                blocks: BlockRange { start: 2, end: 6 },
            },
        ],
        hop_index: 1,
        max_length: 64,
        adapter: None,
    })
}

fn step(id: SessionId, seq: u64, frame: TensorFrame) -> InferMessage {
    InferMessage::Step(Step {
        session_id: id,
        seq,
        start_pos: 0,
        hidden: frame,
        last_hop: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_push_stream_waits_for_its_open_and_only_the_previous_hop_attaches() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let server = TestServer::start(&file, MODEL, 2, 6, ExecutorConfig::default(), vec![]).await?;
    let peer = server.net.peer_id();
    // The client plays hop 0; a stranger tries to attach too.
    let client = client_net().await?;
    let stranger = client_net().await?;
    client.dial(server.addr.clone()).await?;
    stranger.dial(server.addr.clone()).await?;
    let me = client.peer_id();
    let head = Head::load(&file, WeightMode::Fast)?;
    let frame = hidden_to_frame(&head.embed(&PROMPT)?, DType::F32)?;

    // 1. The push stream comes first and waits; the Open arrives 300 ms later.
    let id = SessionId([1; 16]);
    let mut push = Raw::open(&client, peer).await?;
    push.send(&attach(id)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ctl = Raw::open(&client, peer).await?;
    ctl.send(&open_second(id, me, peer)).await?;
    assert!(matches!(
        ctl.recv().await?,
        Some(InferMessage::Opened { hop_index: 1, .. })
    ));
    assert!(matches!(
        push.recv().await?,
        Some(InferMessage::Opened { hop_index: 1, .. })
    ));
    // Steps on the held stream run, and the result comes back on the client's.
    push.send(&step(id, 1, frame.clone())).await?;
    match ctl.recv().await? {
        Some(InferMessage::Result { seq: 1, hidden, .. }) => assert_eq!(hidden.shape(), [7, 64]),
        other => panic!("expected the result, got {other:?}"),
    }
    // The server is the last hop: the result was its copy, nothing else came.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), ctl.recv())
            .await
            .is_err(),
        "the last hop sent more than its result"
    );

    // 2. A stranger is not the route's previous hop: refused at once, and the
    //    real previous hop still attaches after it.
    let id2 = SessionId([2; 16]);
    let mut ctl2 = Raw::open(&client, peer).await?;
    ctl2.send(&open_second(id2, me, peer)).await?;
    assert!(matches!(
        ctl2.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    let mut bad = Raw::open(&stranger, peer).await?;
    let t = Instant::now();
    bad.send(&attach(id2)).await?;
    bad.expect_error(ErrorCode::UnknownSession).await?;
    assert!(
        t.elapsed() < ATTACH_WAIT_TIMEOUT,
        "a known session's refusal waited"
    );
    let mut good = Raw::open(&client, peer).await?;
    good.send(&attach(id2)).await?;
    assert!(matches!(
        good.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    // A second attach of the same hop is refused: one push stream per session.
    let mut twice = Raw::open(&client, peer).await?;
    twice.send(&attach(id2)).await?;
    twice.expect_error(ErrorCode::UnknownSession).await?;

    // 3. Nobody opens the session: the wait ends at its bound.
    let t = Instant::now();
    let mut stray = Raw::open(&stranger, peer).await?;
    stray.send(&attach(SessionId([3; 16]))).await?;
    stray.expect_error(ErrorCode::UnknownSession).await?;
    assert!(t.elapsed() >= ATTACH_WAIT_TIMEOUT - Duration::from_millis(200));

    // 4. One peer may hold only so many early streams; past that, Busy at once.
    let mut waiting = Vec::new();
    for i in 0..MAX_WAITING_ATTACH_PER_PEER {
        let mut s = Raw::open(&stranger, peer).await?;
        s.send(&attach(SessionId([10 + i as u8; 16]))).await?;
        waiting.push(s);
        // One stream at a time: the server takes each before the next.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = Raw::open(&stranger, peer).await?;
    over.send(&attach(SessionId([99; 16]))).await?;
    let t = Instant::now();
    over.expect_error(ErrorCode::Busy).await?;
    assert!(t.elapsed() < ATTACH_WAIT_TIMEOUT);
    // Another peer is not held back by the stranger's streams.
    let id4 = SessionId([4; 16]);
    let mut early = Raw::open(&client, peer).await?;
    early.send(&attach(id4)).await?;
    let mut ctl4 = Raw::open(&client, peer).await?;
    ctl4.send(&open_second(id4, me, peer)).await?;
    assert!(matches!(
        ctl4.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    assert!(matches!(
        early.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    // The stranger's waits all end, refused.
    for mut s in waiting {
        s.expect_error(ErrorCode::UnknownSession).await?;
    }
    server.kill().await;
    Ok(())
}

/// Three servers of the tiny model.
async fn three_servers(file: &ModelFile) -> Result<Vec<TestServer>> {
    let cfg = ExecutorConfig::default();
    let s3 = TestServer::start(file, MODEL, 4, 6, cfg.clone(), vec![]).await?;
    let s2 = TestServer::start(file, MODEL, 2, 4, cfg.clone(), vec![s3.addr.clone()]).await?;
    let s1 = TestServer::start(file, MODEL, 0, 2, cfg, vec![s3.addr.clone()]).await?;
    Ok(vec![s1, s2, s3])
}

/// The largest difference between `a` and `b` over the largest magnitude of `a`.
fn relative(a: &Tensor, b: &Tensor) -> Result<f32> {
    let scale = a.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    Ok(max_abs_diff(a, b)? / scale)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_wire_dtype_travels_the_whole_route_close_to_f32() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let model = LocalModel::load_whole(&file, WeightMode::Fast)?;
    let servers = three_servers(&file).await?;
    let client = client_net().await?;
    let boot = vec![servers[2].addr.clone()];
    let found = discover_n(&client, &boot, MODEL, 3).await?;
    let route = nomoat_node::client::plan(&client, MODEL, 6, &found, 64)?;
    assert_eq!(route.len(), 3);
    let head = Head::load(&file, WeightMode::Fast)?;
    let hidden = head.config().hidden_size;
    // The whole model's logits, prompt then each decode token.
    let mut local = model.new_session();
    let mut expected = vec![model.forward_logits(&mut local, &PROMPT)?];
    for t in DECODE {
        expected.push(model.forward_logits(&mut local, &[t])?);
    }
    // Each dtype's bound on the logits' error, relative to their largest
    // magnitude: f16 keeps 11 bits, bf16 8, q8 7 per block.
    for (dtype, bound) in [
        (DType::F32, 1e-5),
        (DType::F16, 4e-3),
        (DType::BF16, 3e-2),
        (DType::Q8Block, 1e-1),
    ] {
        let mut session =
            RemoteSession::open(&client, MODEL, route.clone(), 64, Duration::from_secs(10)).await?;
        let inputs = std::iter::once(PROMPT.to_vec()).chain(DECODE.iter().map(|t| vec![*t]));
        let mut pos = 0;
        let mut worst = 0f32;
        for (i, tokens) in inputs.enumerate() {
            let frame = hidden_to_frame(&head.embed(&tokens)?, dtype)?;
            assert_eq!(frame.dtype(), dtype);
            let out = session.step(pos, frame).await?;
            // Every hop answered in the dtype it was sent.
            assert_eq!(out.dtype(), dtype, "result of step {i}");
            let logits = head.logits(&hidden_from_frame(&out, hidden)?)?;
            worst = worst.max(relative(&expected[i], &logits)?);
            pos += tokens.len() as u32;
        }
        for (hop, h) in session.history().iter().enumerate() {
            assert!(
                h.iter().all(|(_, f)| f.dtype() == dtype),
                "hop {hop}'s inputs were not all {dtype}"
            );
        }
        println!("{dtype}: logits within {worst:.2e} of f32, relative");
        assert!(worst <= bound, "{dtype}: error {worst} over {bound}");
        session.close().await;
    }
    for s in &servers {
        s.kill().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_steps_do_not_keep_an_idle_session_alive() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let cfg = ExecutorConfig {
        idle_timeout: Duration::from_secs(1),
        ..ExecutorConfig::default()
    };
    let server = TestServer::start(&file, MODEL, 0, 6, cfg, vec![]).await?;
    let peer = server.net.peer_id();
    let client = client_net().await?;
    client.dial(server.addr.clone()).await?;
    let id = SessionId([5; 16]);
    let mut raw = Raw::open(&client, peer).await?;
    raw.send(&InferMessage::Open(OpenSession {
        session_id: id,
        model_id: MODEL.into(),
        route: vec![Hop {
            peer_id: peer.to_bytes(),
            blocks: BlockRange { start: 0, end: 6 },
        }],
        hop_index: 0,
        max_length: 64,
        adapter: None,
    }))
    .await?;
    assert!(matches!(
        raw.recv().await?,
        Some(InferMessage::Opened { .. })
    ));
    // Steps of the wrong width, every 200 ms for up to 3 s: each is
    // refused, and none counts as use, so the session expires and its
    // stream closes.
    let narrow = TensorFrame::from_f32(vec![1, 32], &[0.5; 32], DType::F32)?;
    let mut seq = 1;
    let t = Instant::now();
    let mut closed = false;
    while t.elapsed() < Duration::from_secs(3) {
        if raw.send(&step(id, seq, narrow.clone())).await.is_err() {
            closed = true;
            break;
        }
        match raw.recv().await {
            Ok(Some(InferMessage::Error(e))) => {
                // Refused for its shape while the session lives, then as
                // unknown once it has expired.
                let code = e.code.expect("a known code");
                assert!(
                    matches!(code, ErrorCode::BadShape | ErrorCode::UnknownSession),
                    "{e}"
                );
            }
            Ok(None) | Err(_) => {
                closed = true;
                break;
            }
            other => panic!("expected an error, got {other:?}"),
        }
        seq += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(closed, "the idle session's stream stayed open for 3 s");
    // The executor dropped it: nothing the steps did kept it.
    assert_eq!(server.exec.stats().sessions, 0);
    server.kill().await;
    Ok(())
}
