//! Spot checks against lying servers, in one process on 127.0.0.1 QUIC
//! with a tiny random-weight model: a liar on the route is caught, banned
//! and routed around, and the generation ends with the whole model's text;
//! honest swarms pass every check; a dispute nobody can settle bans nobody.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use libp2p::PeerId;
use nomoat_node::client::verify::{VerifyMode, VerifyOptions};
use nomoat_node::client::{generate, RemoteSession, StepError, Stepper, TokenSink};
use nomoat_node::engine::{
    GenerateOptions, Head, LocalModel, ModelFile, SamplingParams, WeightMode,
};
use nomoat_node::net::NetHandle;
use nomoat_node::server::executor::ExecutorConfig;
use nomoat_protocol::{BlockRange, Hop};
use nomoat_tests::harness::{client_net, discover_n, TestServer};
use nomoat_tests::{TinyArch, TinyModel, TinySpec};

const MODEL: &str = "tiny-verify-model";

/// The tests of this file run one at a time: each starts several servers
/// and checks their work on others, and on a small machine several at
/// once starve each other's shadows past their timeouts.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const PROMPT: [u32; 7] = [3, 17, 42, 5, 88, 1, 60];
const TOKENS: usize = 40;

fn tiny(dir: &std::path::Path) -> Result<ModelFile> {
    let spec = TinySpec {
        context: 128,
        ..TinySpec::new(TinyArch::Llama)
    };
    let path = TinyModel::generate(spec)?.write_gguf(&dir.join("tiny.gguf"), GgmlDType::F32)?;
    Ok(ModelFile::open(path)?)
}

fn greedy() -> GenerateOptions {
    GenerateOptions {
        max_tokens: TOKENS,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
    }
}

/// The whole model's greedy tokens.
fn local_tokens(file: &ModelFile) -> Result<Vec<u32>> {
    let model = LocalModel::load_whole(file, WeightMode::Fast)?;
    Ok(model.generate(&PROMPT, &greedy(), |_| Ok(true))?.0)
}

/// Honest servers 0..3, 2..5 and 3..6 (every sub-range of 2..5 has two
/// chains that share no peer), and `liar` serving 2..5 as the fault says.
async fn swarm(file: &ModelFile, liar: &str) -> Result<(Vec<TestServer>, TestServer)> {
    let c = TestServer::start(file, MODEL, 3, 6, ExecutorConfig::default(), vec![]).await?;
    let boot = vec![c.addr.clone()];
    let a = TestServer::start(file, MODEL, 0, 3, ExecutorConfig::default(), boot.clone()).await?;
    let b = TestServer::start(file, MODEL, 2, 5, ExecutorConfig::default(), boot.clone()).await?;
    let l = TestServer::start_lying(file, MODEL, 2, 5, liar, boot).await?;
    Ok((vec![a, b, c], l))
}

fn hop(s: &TestServer, start: u32, end: u32) -> Hop {
    Hop {
        peer_id: s.net.peer_id().to_bytes(),
        blocks: BlockRange { start, end },
    }
}

/// A client that knows all four servers (by info query and by gossip).
async fn client(servers: &[TestServer]) -> Result<NetHandle> {
    let net = client_net().await?;
    net.subscribe(MODEL).await;
    discover_n(&net, &[servers[2].addr.clone()], MODEL, 4).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while net.servers(MODEL).len() < 4 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the client heard {} announcements",
            net.servers(MODEL).len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(net)
}

/// Collects tokens; a rewind takes back the ones after `keep`.
#[derive(Default)]
struct Collect {
    tokens: Vec<u32>,
    rewinds: Vec<(usize, PeerId)>,
}

impl TokenSink for Collect {
    async fn token(&mut self, id: u32) -> Result<bool, StepError> {
        self.tokens.push(id);
        Ok(true)
    }

    async fn rewind(&mut self, keep: usize, liar: PeerId) -> Result<(), StepError> {
        self.tokens.truncate(keep);
        self.rewinds.push((keep, liar));
        Ok(())
    }
}

/// Generates through `route` with `mode` checks.
async fn run(
    net: &NetHandle,
    file: &ModelFile,
    route: Vec<Hop>,
    mode: VerifyMode,
) -> Result<(Stepper, Collect, Vec<u32>)> {
    let head = Arc::new(Head::load(file, WeightMode::Fast)?);
    let mut session = RemoteSession::open(net, MODEL, route, 128, Duration::from_secs(20)).await?;
    session.set_verify(VerifyOptions::new(mode));
    let mut stepper = Stepper::swarm(head, session);
    let mut sink = Collect::default();
    let (out, _) = generate(&mut stepper, &PROMPT, &greedy(), 128, &mut sink).await?;
    Ok((stepper, sink, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_liar_on_the_route_is_caught_banned_and_replaced() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let want = local_tokens(&file)?;
    for fault in ["perturb:0.5", "skip", "perturb:0.5,after=12"] {
        let (honest, liar) = swarm(&file, fault).await?;
        let net = client(&honest).await?;
        let route = vec![
            hop(&honest[0], 0, 2),
            hop(&liar, 2, 5),
            hop(&honest[2], 5, 6),
        ];
        let (stepper, sink, out) = run(&net, &file, route, VerifyMode::Async).await?;
        assert_eq!(out, want, "{fault}: the text must be the whole model's");
        assert_eq!(sink.tokens, want, "{fault}: the sink holds the right text");
        assert!(
            net.is_banned(&liar.net.peer_id()),
            "{fault}: the liar is banned"
        );
        for s in &honest {
            assert!(
                !net.is_banned(&s.net.peer_id()),
                "{fault}: an honest server was banned"
            );
        }
        let session = stepper.remote().expect("a swarm session");
        assert!(
            session
                .route()
                .iter()
                .all(|(p, _)| *p != liar.net.peer_id()),
            "{fault}: the liar is off the route: {:?}",
            session.route()
        );
        assert_eq!(session.failovers().len(), 1, "{fault}");
        // The lie was caught at or after the first lying step, and the
        // tokens it had led to were taken back.
        assert_eq!(sink.rewinds.len(), 1, "{fault}: {:?}", sink.rewinds);
        assert_eq!(sink.rewinds[0].1, liar.net.peer_id());
        if fault.contains("after=12") {
            // Steps 0..12 (the prompt and 11 tokens) were honest.
            assert!(sink.rewinds[0].0 >= 11, "{fault}: {:?}", sink.rewinds);
        }
        stepper.close().await;
        // The banned liar gets no new route.
        let found = nomoat_node::net::discover(&net, &[honest[2].addr.clone()], MODEL).await?;
        for _ in 0..20 {
            let r = nomoat_node::client::plan(&net, MODEL, 6, &found, 64)?;
            assert!(r.iter().all(|h| h.peer_id != liar.net.peer_id().to_bytes()));
        }
        for s in honest.iter().chain([&liar]) {
            s.kill().await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_sends_only_checked_tokens_and_honest_servers_pass() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let want = local_tokens(&file)?;
    let cfg = ExecutorConfig::default;
    let x = TestServer::start(&file, MODEL, 0, 6, cfg(), vec![]).await?;
    let boot = vec![x.addr.clone()];
    let y = TestServer::start(&file, MODEL, 0, 6, cfg(), boot.clone()).await?;
    let z = TestServer::start(&file, MODEL, 0, 6, cfg(), boot.clone()).await?;
    let liar = TestServer::start_lying(&file, MODEL, 0, 6, "perturb:0.5,after=20", boot).await?;
    let honest = [x, y, z];
    let net = client_net().await?;
    net.subscribe(MODEL).await;
    discover_n(&net, &[honest[0].addr.clone()], MODEL, 4).await?;
    // An honest route, every hop checked: nothing is rewound, nobody struck.
    let route = vec![hop(&honest[0], 0, 3), hop(&honest[1], 3, 6)];
    let (stepper, sink, out) = run(&net, &file, route, VerifyMode::Strict).await?;
    assert_eq!(out, want);
    assert!(sink.rewinds.is_empty());
    let c = stepper.remote().expect("swarm").check_summary();
    assert_eq!((c.checked_hops, c.hops), (2, 2));
    assert!(c.verified as usize >= PROMPT.len() + TOKENS - 1, "{c:?}");
    for s in &honest {
        let r = net.reputation(&s.net.peer_id());
        assert_eq!((r.strikes, r.banned), (0, false), "{r:?}");
    }
    stepper.close().await;
    // Through the liar, strict mode never hands out a wrong token: the
    // sink is a closure, which cannot take tokens back. (A new client: the
    // first may have caught the liar as a shadow already.)
    let net = client_net().await?;
    net.subscribe(MODEL).await;
    discover_n(&net, &[honest[0].addr.clone()], MODEL, 4).await?;
    assert!(!net.is_banned(&liar.net.peer_id()));
    let head = Arc::new(Head::load(&file, WeightMode::Fast)?);
    let route = vec![hop(&liar, 0, 6)];
    let mut session = RemoteSession::open(&net, MODEL, route, 128, Duration::from_secs(20)).await?;
    session.set_verify(VerifyOptions::new(VerifyMode::Strict));
    let mut stepper = Stepper::swarm(head.clone(), session);
    let mut got = Vec::new();
    let mut sink = |id| {
        got.push(id);
        Ok(true)
    };
    let (out, _) = generate(&mut stepper, &PROMPT, &greedy(), 128, &mut sink).await?;
    assert_eq!(out, want);
    assert_eq!(got, want);
    assert!(net.is_banned(&liar.net.peer_id()));
    stepper.close().await;
    for s in honest.iter().chain([&liar]) {
        s.kill().await;
    }
    // A server nobody else can check: strict mode holds every token back
    // and says why.
    let alone = TestServer::start(&file, MODEL, 0, 6, cfg(), vec![]).await?;
    let net = client_net().await?;
    discover_n(&net, std::slice::from_ref(&alone.addr), MODEL, 1).await?;
    let route = vec![hop(&alone, 0, 6)];
    let mut session = RemoteSession::open(&net, MODEL, route, 128, Duration::from_secs(20)).await?;
    session.set_verify(VerifyOptions::new(VerifyMode::Strict));
    let mut stepper = Stepper::swarm(head, session);
    let mut got = Vec::new();
    let mut sink = |id| {
        got.push(id);
        Ok(true)
    };
    let err = generate(&mut stepper, &PROMPT, &greedy(), 128, &mut sink)
        .await
        .expect_err("nothing could be checked");
    assert!(matches!(err, StepError::Unverified { .. }), "{err}");
    assert!(
        err.to_string().contains("no other chain runs blocks 0..6"),
        "{err}"
    );
    assert!(got.is_empty(), "{got:?}");
    stepper.close().await;
    alone.kill().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispute_nobody_can_settle_bans_nobody() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let want = local_tokens(&file)?;
    // Only the liar and one honest server hold 0..6: no third chain.
    let honest = TestServer::start(&file, MODEL, 0, 6, ExecutorConfig::default(), vec![]).await?;
    let liar =
        TestServer::start_lying(&file, MODEL, 0, 6, "perturb:0.5", vec![honest.addr.clone()])
            .await?;
    let net = client_net().await?;
    net.subscribe(MODEL).await;
    discover_n(&net, std::slice::from_ref(&honest.addr), MODEL, 2).await?;
    let (stepper, sink, out) = run(&net, &file, vec![hop(&liar, 0, 6)], VerifyMode::Async).await?;
    assert_eq!(
        out, want,
        "the session moved to the other server and went back"
    );
    assert_eq!(sink.tokens, want);
    let (l, h) = (
        net.reputation(&liar.net.peer_id()),
        net.reputation(&honest.net.peer_id()),
    );
    assert!(!l.banned && !h.banned, "unproven: {l:?} {h:?}");
    assert!(l.strikes >= 1 && h.strikes >= 1, "both struck: {l:?} {h:?}");
    stepper.close().await;
    honest.kill().await;
    liar.kill().await;
    Ok(())
}

/// The tolerance on honest outputs of the real SmolLM2: a hop's steps (a
/// 40-token prompt, then single tokens) replayed on a second load of the
/// span, as a shadow replays them, give the same rows in every wire dtype,
/// for two spans of the model; a perturbation of a tenth of a row's RMS is
/// far outside the tolerance. (The same rows computed as one batch instead
/// differ by a few percent of a row's largest value: why shadows replay
/// steps as the hop got them.)
#[test]
fn honest_real_model_outputs_stay_inside_the_tolerance() -> Result<()> {
    let _serial = SERIAL.blocking_lock();
    use nomoat_node::client::verify::{row_error, DEFAULT_TOLERANCE};
    use nomoat_node::engine::{hidden_from_frame, hidden_to_frame, Span};
    use nomoat_protocol::DType;
    let path = nomoat_node::catalog::resolve("smollm2-135m", false)?;
    let file = ModelFile::open(&path)?;
    let head = Head::load(&file, WeightMode::Fast)?;
    let width = head.config().hidden_size;
    let tokens: Vec<u32> = (0..48).map(|i| (100 + 97 * i) % 49_000).collect();
    let prompt = 40;
    // A span's outputs for `x` in the hop's steps, in `dtype`.
    let run = |span: &Span, x: &candle_core::Tensor, dtype: DType| -> Result<Vec<f32>> {
        let axis = x.rank() - 2;
        let mut cache = span.new_cache();
        let mut out = hidden_to_frame(
            &span.forward(&x.narrow(axis, 0, prompt)?, 0, &mut cache)?,
            dtype,
        )?
        .to_f32();
        for i in prompt..tokens.len() {
            let row = span.forward(&x.narrow(axis, i, 1)?, i, &mut cache)?;
            out.extend(hidden_to_frame(&row, dtype)?.to_f32());
        }
        Ok(out)
    };
    let (mut worst, mut batched_worst, mut rows) = (0f32, 0f32, 0);
    for (start, end) in [(0, 10), (10, 24)] {
        let hop = Span::load(&file, start, end, WeightMode::Fast)?;
        let shadow = Span::load(&file, start, end, WeightMode::Fast)?;
        let x = if start == 0 {
            head.embed(&tokens)?
        } else {
            let before = Span::load(&file, 0, start, WeightMode::Fast)?;
            before.forward(&head.embed(&tokens)?, 0, &mut before.new_cache())?
        };
        for dtype in [DType::F32, DType::F16, DType::Q8Block] {
            let x = hidden_from_frame(&hidden_to_frame(&x, dtype)?, width)?;
            let claimed = run(&hop, &x, dtype)?;
            let truth = run(&shadow, &x, dtype)?;
            let batched =
                hidden_to_frame(&shadow.forward(&x, 0, &mut shadow.new_cache())?, dtype)?.to_f32();
            for (i, (c, t)) in claimed.chunks(width).zip(truth.chunks(width)).enumerate() {
                worst = worst.max(row_error(c, t));
                batched_worst =
                    batched_worst.max(row_error(c, &batched[i * width..(i + 1) * width]));
                rows += 1;
            }
            let last = &truth[truth.len() - width..];
            let rms = (last.iter().map(|v| v * v).sum::<f32>() / width as f32).sqrt();
            let lie: Vec<f32> = last
                .iter()
                .enumerate()
                .map(|(k, v)| v + if k % 2 == 0 { 0.1 } else { -0.1 } * rms)
                .collect();
            assert!(
                row_error(&lie, last) > 2.0 * DEFAULT_TOLERANCE,
                "blocks {start}..{end} {dtype:?}: a lie of 0.1 RMS scores {}",
                row_error(&lie, last)
            );
        }
    }
    eprintln!(
        "{rows} honest rows replayed: worst error {worst:.5}; as one batch instead: {batched_worst:.4} (tolerance {DEFAULT_TOLERANCE})"
    );
    assert!(
        worst <= DEFAULT_TOLERANCE / 5.0,
        "an honest replayed row scored {worst}, near the tolerance {DEFAULT_TOLERANCE}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_client_learns_of_a_ban_from_the_evidence_and_false_evidence_changes_nothing(
) -> Result<()> {
    use nomoat_node::client::{recheck, watch_evidence, Recheck};
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let file = tiny(dir.path())?;
    let want = local_tokens(&file)?;
    let (honest, liar) = swarm(&file, "perturb:0.5").await?;
    // The second client only listens: it never routes through the liar.
    let watcher = client(&honest).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(watch_evidence(watcher.clone(), MODEL.into(), stop.clone()));
    let net = client(&honest).await?;
    let route = vec![
        hop(&honest[0], 0, 2),
        hop(&liar, 2, 5),
        hop(&honest[2], 5, 6),
    ];
    let (stepper, _, out) = run(&net, &file, route, VerifyMode::Async).await?;
    assert_eq!(out, want);
    assert!(net.is_banned(&liar.net.peer_id()));
    stepper.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !watcher.is_banned(&liar.net.peer_id()) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the second client did not ban the liar from the evidence within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in &honest {
        assert!(
            !watcher.is_banned(&s.net.peer_id()),
            "an honest server was banned"
        );
    }
    // The second client's own routes now avoid the liar.
    let found = nomoat_node::net::discover(&watcher, &[honest[2].addr.clone()], MODEL).await?;
    for _ in 0..20 {
        let r = nomoat_node::client::plan(&watcher, MODEL, 6, &found, 64)?;
        assert!(r.iter().all(|h| h.peer_id != liar.net.peer_id().to_bytes()));
    }

    // Evidence built from an honest server's true output is refuted by the
    // recomputation, and one whose output was altered does not hold
    // together: neither bans anyone.
    let route = vec![
        hop(&honest[0], 0, 2),
        hop(&honest[1], 2, 5),
        hop(&honest[2], 5, 6),
    ];
    let (stepper, _, _) = run(&net, &file, route, VerifyMode::Off).await?;
    let session = stepper.remote().expect("a swarm session");
    let b = honest[1].net.peer_id();
    let evidence = session
        .evidence(b, BlockRange { start: 2, end: 5 }, PROMPT.len() as u32 + 3)
        .map_err(anyhow::Error::msg)?;
    let verdict = recheck(&watcher, net.peer_id(), &evidence).await;
    assert_eq!(verdict, Recheck::Refuted { accused: b }, "{verdict:?}");
    let mut altered = evidence.clone();
    let values: Vec<f32> = altered.output.to_f32().iter().map(|v| v + 1.0).collect();
    altered.output = nomoat_protocol::TensorFrame::from_f32(
        altered.output.shape().to_vec(),
        &values,
        altered.output.dtype(),
    )?;
    assert!(altered.check().is_err());
    let verdict = recheck(&watcher, net.peer_id(), &altered).await;
    assert!(matches!(verdict, Recheck::Undecided { .. }), "{verdict:?}");
    assert!(!watcher.is_banned(&b));
    stepper.close().await;
    stop.cancel();
    for s in honest.iter().chain([&liar]) {
        s.kill().await;
    }
    Ok(())
}
