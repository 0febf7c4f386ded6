//! Continuous batching in a server's executor: sessions stepping at the
//! same time share passes, a long prompt goes in by pieces between their
//! decode steps, and every session's outputs are bit for bit those of its
//! steps run alone on the span.

use std::sync::Arc;

use anyhow::Result;
use candle_core::quantized::GgmlDType;
use candle_core::Tensor;
use libp2p::PeerId;
use nomoat_node::engine::{hidden_from_frame, hidden_to_frame, ModelFile, Span, WeightMode};
use nomoat_node::server::executor::{Executor, ExecutorConfig};
use nomoat_protocol::{DType, SessionId};
use nomoat_tests::{TinyArch, TinyModel, TinySpec};

fn hidden(h: usize, t: usize, seed: usize) -> Result<Tensor> {
    let v: Vec<f32> = (0..t * h)
        .map(|i| ((((i + 37 * seed) * 7919) % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (1, t, h), &candle_core::Device::Cpu)?)
}

/// The steps of session `s`: a prompt of `prompt` positions, then `decode`
/// one-position steps.
fn steps(h: usize, s: usize, prompt: usize, decode: usize) -> Result<Vec<Tensor>> {
    let mut out = vec![hidden(h, prompt, 100 * s)?];
    for i in 0..decode {
        out.push(hidden(h, 1, 100 * s + i + 1)?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sessions_share_passes_and_get_exactly_their_own_outputs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut spec = TinySpec::new(TinyArch::Llama);
    spec.context = 1024;
    let path =
        TinyModel::generate(spec)?.write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::Q4_1)?;
    let file = ModelFile::open(path)?;
    let h = file.config().hidden_size;
    let span = Arc::new(Span::load(&file, 0, 6, WeightMode::Fast)?);
    // Eight sessions with short prompts, and one with a prompt longer than
    // a piece, which the executor cuts and runs between the others' steps.
    let mut plans: Vec<Vec<Tensor>> = (0..8)
        .map(|s| steps(h, s, 3 + s, 12))
        .collect::<Result<_>>()?;
    plans.push(steps(h, 8, 600, 3)?);
    // Each alone, on the span directly.
    let mut want = Vec::new();
    for plan in &plans {
        let mut cache = span.new_cache_range(0, 6, 1024)?;
        let mut outs = Vec::new();
        for x in plan {
            let pos = cache.len();
            outs.push(
                span.forward(x, pos, &mut cache)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
            );
        }
        want.push(outs);
    }
    let exec = Executor::start(
        span.clone(),
        ExecutorConfig {
            kv_bytes: Some(256 << 20),
            ..Default::default()
        },
    )?;
    let peer = PeerId::random();
    let tasks: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(s, plan)| {
            let exec = exec.clone();
            tokio::spawn(async move {
                let id = SessionId([s as u8 + 1; 16]);
                exec.open(id, peer, 0, 6, 1024, None).await?;
                let mut outs = Vec::new();
                let mut pos = 0;
                for (seq, x) in plan.iter().enumerate() {
                    let frame = hidden_to_frame(x, DType::F32)?;
                    let out = exec.step(id, seq as u64 + 1, pos, frame).await?;
                    pos += x.dim(1)?;
                    let out = hidden_from_frame(&out, x.dim(2)?)?;
                    outs.push(out.flatten_all()?.to_vec1::<f32>()?);
                }
                exec.close(id);
                anyhow::Ok(outs)
            })
        })
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await??);
    }
    for (s, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len());
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert!(
                a == b,
                "session {s} step {i}: batched output differs from the step alone"
            );
        }
    }
    let st = exec.stats();
    assert!(st.max_batch > 1, "no pass ran two sessions: {st:?}");
    // Every step answered once; the long prompt went in by pieces (600
    // positions, at most 256 a pass, fewer while others decode).
    let total_steps: u64 = 8 * 13 + 4;
    assert_eq!(st.steps, total_steps);
    assert!(st.passes >= 3, "{st:?}");
    exec.shutdown();
    Ok(())
}

/// Runs `plan` as session `id` on `exec`, step by step.
async fn run_session(exec: Executor, id: SessionId, plan: Vec<Tensor>) -> Result<()> {
    exec.open(id, PeerId::random(), 0, 6, 1024, None).await?;
    let mut pos = 0;
    for (seq, x) in plan.iter().enumerate() {
        let frame = hidden_to_frame(x, DType::F32)?;
        exec.step(id, seq as u64 + 1, pos, frame).await?;
        pos += x.dim(1)?;
    }
    exec.close(id);
    Ok(())
}

/// A server measures its batch capacity (what it announces, and what
/// routing divides its sessions by) before its first session, and keeps
/// measuring it on its decode passes: at least one session and at most a
/// pass's steps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_executor_measures_its_batch_capacity() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = TinyModel::generate(TinySpec::new(TinyArch::Llama))?
        .write_gguf(&dir.path().join("tiny.gguf"), GgmlDType::Q4_1)?;
    let file = ModelFile::open(path)?;
    let h = file.config().hidden_size;
    let span = Arc::new(Span::load(&file, 0, 6, WeightMode::Fast)?);
    let exec = Executor::start(span, ExecutorConfig::default())?;
    let max = nomoat_node::server::executor::MAX_BATCH_STEPS as f32;
    let probed = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let cap = exec.stats().batch_capacity;
            if cap > 0.0 {
                return cap;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await?;
    assert!((1.0..=max).contains(&probed), "{probed}");
    // The probe opened no session and ran no step that counts.
    let st = exec.stats();
    assert_eq!((st.sessions, st.steps, st.passes), (0, 0, 0), "{st:?}");
    // One session alone, single steps.
    run_session(exec.clone(), SessionId([1; 16]), steps(h, 1, 4, 8)?).await?;
    // Eight at once: passes of several steps.
    let tasks: Vec<_> = (0..8u8)
        .map(|s| {
            let plan = steps(h, s as usize + 2, 4, 24);
            let exec = exec.clone();
            tokio::spawn(async move { run_session(exec, SessionId([s + 2; 16]), plan?).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let st = exec.stats();
    assert!(st.max_batch > 1, "no pass ran two sessions: {st:?}");
    assert!((1.0..=max).contains(&st.batch_capacity), "{st:?}");
    exec.shutdown();
    Ok(())
}
