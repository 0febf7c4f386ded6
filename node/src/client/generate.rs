//! The one token loop: embed, step the blocks (on the swarm or on this
//! machine), take the logits, sample, repeat.
//!
//! `nomoat generate`, the gateway and every bench drive generation through
//! [`generate`] or [`Stepper::step`]. The head's work (embedding, final
//! norm and LM head) and local blocks run on blocking threads, never on the
//! network runtime.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use nomoat_protocol::{DType, TensorError};

use super::verify::{Detected, VerifyMode};
use super::{ClientError, RemoteSession};
use crate::engine::{
    hidden_from_frame, hidden_to_frame, EngineError, GenerateOptions, GenerationStats, Head,
    LocalModel, LocalSession, Sampler, TokenLoop,
};

/// Why a generation step failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StepError {
    /// The swarm failed the step.
    #[error(transparent)]
    Client(Box<ClientError>),
    /// Local computation failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A compute task panicked or was cancelled.
    #[error("a compute task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// Writing the output failed.
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
    /// An earlier step failed while it held the local KV cache.
    #[error("the session's KV cache was lost in an earlier failed step; send the request again")]
    CacheLost,
    /// A spot check caught a server lying after tokens it led to were
    /// handed out, and the sink cannot take them back.
    #[error(
        "a server was caught lying ({peer}): the text after token {keep} was wrong and has \
         already been sent; send the request again (with verification strict, only \
         checked text is sent)"
    )]
    Retracted {
        /// Tokens that were right.
        keep: usize,
        /// The liar.
        peer: libp2p::PeerId,
    },
    /// Strict verification could not check every hop's work.
    #[error(
        "{unchecked} tokens could not be checked, so strict verification holds them back: {reason}"
    )]
    Unverified {
        /// Tokens held back.
        unchecked: usize,
        /// Why the checks could not run.
        reason: String,
    },
    /// A spot check caught lies again and again.
    #[error("spot checks caught lies {0} times in one generation; giving up")]
    TooManyLies(usize),
}

impl From<ClientError> for StepError {
    fn from(e: ClientError) -> Self {
        StepError::Client(Box::new(e))
    }
}

/// Runs the blocks of one session: the whole model here, or a session
/// along a route of servers with the head here.
#[derive(Debug)]
pub enum Stepper {
    /// Every block on this machine.
    Local {
        /// The model.
        model: Arc<LocalModel>,
        /// Its KV cache; `None` only while a step holds it.
        session: Option<LocalSession>,
    },
    /// The blocks on the swarm, the head here.
    Swarm {
        /// Embedding, final norm and LM head.
        head: Arc<Head>,
        /// The session along the route.
        session: Box<RemoteSession>,
        /// The dtype hidden states travel in; every hop answers in it.
        wire: DType,
    },
}

impl Stepper {
    /// A new session of the local model.
    pub fn local(model: Arc<LocalModel>) -> Self {
        let session = Some(model.new_session());
        Stepper::Local { model, session }
    }

    /// Steps a given session of the local model (e.g. one with an adapter).
    pub fn local_session(model: Arc<LocalModel>, session: crate::engine::LocalSession) -> Self {
        Stepper::Local {
            model,
            session: Some(session),
        }
    }

    /// Steps `session` with `head` computed here; hidden states travel as
    /// f32 until [`with_wire_dtype`](Self::with_wire_dtype) says otherwise.
    pub fn swarm(head: Arc<Head>, session: RemoteSession) -> Self {
        Stepper::Swarm {
            head,
            session: Box::new(session),
            wire: DType::F32,
        }
    }

    /// Sends hidden states in `dtype` (f16 halves the bytes, `q8` nearly
    /// quarters them); the hops answer in it. No effect on a local stepper.
    ///
    /// # Errors
    ///
    /// [`TensorError::NotBlockAligned`] when a blockwise `dtype` does not
    /// divide the model's hidden size.
    pub fn with_wire_dtype(mut self, dtype: DType) -> Result<Self, TensorError> {
        if let Stepper::Swarm { wire, head, .. } = &mut self {
            let hidden = head.config().hidden_size;
            if hidden % dtype.block_len() != 0 {
                return Err(TensorError::NotBlockAligned {
                    dtype,
                    dim: hidden,
                    block: dtype.block_len(),
                });
            }
            *wire = dtype;
        }
        Ok(self)
    }

    /// The remote session, when the blocks run on the swarm.
    pub fn remote(&self) -> Option<&RemoteSession> {
        match self {
            Stepper::Swarm { session, .. } => Some(session),
            Stepper::Local { .. } => None,
        }
    }

    /// Feeds `tokens` at positions `pos..` and returns the last position's
    /// logits.
    ///
    /// # Cancel safety
    ///
    /// Not cancel safe: a cancelled local step loses the KV cache
    /// ([`StepError::CacheLost`] afterwards), a cancelled swarm step leaves
    /// the session's streams mid-step.
    pub async fn step(&mut self, pos: u32, tokens: Vec<u32>) -> Result<Vec<f32>, StepError> {
        let m = crate::metrics::global();
        let t = Instant::now();
        let logits = match self {
            Stepper::Local { model, session } => {
                let model = model.clone();
                let mut s = session.take().ok_or(StepError::CacheLost)?;
                let (s, r) = tokio::task::spawn_blocking(move || {
                    let r = model.forward_last(&mut s, &tokens);
                    (s, r)
                })
                .await?;
                *session = Some(s);
                r?
            }
            Stepper::Swarm {
                head,
                session,
                wire,
            } => {
                let (h, wire) = (head.clone(), *wire);
                let frame =
                    tokio::task::spawn_blocking(move || hidden_to_frame(&h.embed(&tokens)?, wire))
                        .await??;
                m.bytes_out.add(frame.data().len() as u64);
                let out = session.step(pos, frame).await?;
                m.bytes_in.add(out.data().len() as u64);
                let hidden = head.config().hidden_size;
                let x = hidden_from_frame(&out, hidden)?;
                // With the other sessions stepping now: one LM-head product.
                head.last_logits_shared(&x).await?
            }
        };
        m.steps.inc();
        m.step_latency.observe(t.elapsed());
        Ok(logits)
    }

    /// The swarm session's checking mode (`Off` for a local stepper).
    pub fn verify_mode(&self) -> VerifyMode {
        self.remote()
            .and_then(RemoteSession::verify_options)
            .map_or(VerifyMode::Off, |o| o.mode)
    }

    /// Why a check could not run, if one could not.
    fn check_trouble(&self) -> String {
        self.remote()
            .and_then(RemoteSession::check_trouble)
            .unwrap_or_else(|| "the checks did not finish in time".into())
    }

    /// Sends every checked hop's positions not yet checked to its shadow.
    fn flush_checks(&mut self) {
        if let Stepper::Swarm { session, .. } = self {
            session.feed_checks(true);
        }
    }

    /// The verdicts of the swarm session's checks (see
    /// [`RemoteSession::take_verdicts`]); a lie found rewinds the session.
    async fn verdicts(&mut self, wait: bool) -> Result<Option<Detected>, StepError> {
        match self {
            Stepper::Swarm { session, .. } => Ok(session.take_verdicts(wait).await?),
            Stepper::Local { .. } => Ok(None),
        }
    }

    /// Ends the session (on every hop, for a swarm session).
    pub async fn close(self) {
        if let Stepper::Swarm { session, .. } = self {
            (*session).close().await;
        }
    }
}

/// Where generated tokens go, one at a time, as they are sampled: a
/// terminal, an HTTP stream, a benchmark's clock. A plain
/// `FnMut(u32) -> Result<bool, StepError>` is one.
pub trait TokenSink: Send {
    /// Takes the next token; `Ok(false)` stops the generation after it.
    fn token(&mut self, id: u32) -> impl Future<Output = Result<bool, StepError>> + Send;

    /// Takes back every token after the first `keep`: a spot check found
    /// them built on a lie, and the generation goes on from there. A sink
    /// that cannot take text back fails with [`StepError::Retracted`],
    /// which is what this default does.
    fn rewind(
        &mut self,
        keep: usize,
        liar: libp2p::PeerId,
    ) -> impl Future<Output = Result<(), StepError>> + Send {
        std::future::ready(Err(StepError::Retracted { keep, peer: liar }))
    }
}

impl<F> TokenSink for F
where
    F: FnMut(u32) -> Result<bool, StepError> + Send,
{
    fn token(&mut self, id: u32) -> impl Future<Output = Result<bool, StepError>> + Send {
        std::future::ready(self(id))
    }
}

/// Times one generation may go back after a caught lie.
pub const MAX_REWINDS: usize = 8;

/// Generates after `prompt` within a context of `limit` positions, handing
/// each new token to `sink` as it is sampled; the sink returns `false` to
/// stop. Returns the tokens and the figures.
///
/// The same prompt, options and model give the same tokens whether
/// `stepper` runs here or on the swarm.
pub async fn generate(
    stepper: &mut Stepper,
    prompt: &[u32],
    opts: &GenerateOptions,
    limit: usize,
    sink: &mut impl TokenSink,
) -> Result<(Vec<u32>, GenerationStats), StepError> {
    let mode = stepper.verify_mode();
    let strict = mode == VerifyMode::Strict;
    let mut tokens = TokenLoop::new(prompt, opts, limit)?;
    // Each generated token, and the sampler as it was before it (kept
    // only when checks may send the generation back).
    let mut generated: Vec<u32> = Vec::new();
    let mut samplers: Vec<Sampler> = Vec::new();
    let mut emitted = 0;
    let mut sink_done = false;
    let mut rewinds = 0;
    let mut logits = stepper.step(0, prompt.to_vec()).await?;
    let mut pos = prompt.len() as u32;
    loop {
        if mode != VerifyMode::Off {
            samplers.push(tokens.sampler().clone());
        }
        let mut sampled = None;
        let next = match tokens.next(&logits, &mut |id| {
            sampled = Some(id);
            Ok::<_, std::convert::Infallible>(true)
        }) {
            Ok(next) => next,
            Err(never) => match never {},
        };
        generated.extend(sampled);
        if !strict && !sink_done {
            sink_done = !release(sink, &generated, &mut emitted, generated.len()).await?;
        }
        let finishing = next.is_none() || sink_done;
        let detected = match next {
            Some(next) if !finishing => {
                logits = stepper.step(pos, vec![next]).await?;
                pos += 1;
                stepper.verdicts(false).await?
            }
            _ => {
                stepper.flush_checks();
                stepper.verdicts(true).await?
            }
        };
        if let Some(d) = detected {
            rewinds += 1;
            if rewinds > MAX_REWINDS {
                return Err(StepError::TooManyLies(rewinds));
            }
            // Positions up to `d.pos` hold right inputs; the token that was
            // fed at `d.pos` (if generated) stays, the rest is sampled again.
            let p = d.pos as usize;
            let keep = (p + 1).saturating_sub(prompt.len()).min(generated.len());
            tracing::warn!(
                "going back to position {p}: {keep} of {} generated tokens stand",
                generated.len()
            );
            tokens.rewind(keep, samplers[keep].clone());
            samplers.truncate(keep);
            generated.truncate(keep);
            if emitted > keep {
                sink.rewind(keep, d.peer).await?;
                emitted = keep;
            }
            sink_done = false;
            logits = if keep == 0 {
                pos = prompt.len() as u32;
                stepper.step(p as u32, prompt[p..].to_vec()).await?
            } else {
                pos = p as u32 + 1;
                stepper.step(p as u32, vec![generated[keep - 1]]).await?
            };
            continue;
        }
        if strict && !sink_done {
            let ready = verified_tokens(stepper, prompt.len());
            sink_done = !release(sink, &generated, &mut emitted, ready).await?;
            if finishing && !sink_done && emitted < generated.len() {
                return Err(StepError::Unverified {
                    unchecked: generated.len() - emitted,
                    reason: stepper.check_trouble(),
                });
            }
        }
        if finishing {
            break;
        }
    }
    let (mut out, stats) = tokens.finish();
    out.truncate(emitted);
    Ok((out, stats))
}

/// Hands `generated[*emitted..ready]` to the sink; `false` once it stops.
async fn release(
    sink: &mut impl TokenSink,
    generated: &[u32],
    emitted: &mut usize,
    ready: usize,
) -> Result<bool, StepError> {
    while *emitted < ready.min(generated.len()) {
        let id = generated[*emitted];
        *emitted += 1;
        if !sink.token(id).await? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Generated tokens every hop's checked outputs vouch for: token `k`
/// came from the logits of position `prompt + k - 1`.
fn verified_tokens(stepper: &Stepper, prompt: usize) -> usize {
    let Some(session) = stepper.remote() else {
        return usize::MAX;
    };
    let verified = session.check_summary().verified as usize;
    (verified + 1).saturating_sub(prompt)
}
