//! One generation job: a session (on the swarm or the local model), the
//! token loop, stop strings, and events on a bounded channel.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use super::{ApiError, Backend, Gateway, SessionGuard, DEFAULT_API_MAX_TOKENS};
use crate::client::{generate, plan, RemoteSession, StepError, Stepper, TokenSink};
use crate::engine::{GenerateOptions, SamplingParams, TextStream};

/// Events buffered between a job and its HTTP response.
pub const EVENT_QUEUE: usize = 64;

/// What to generate.
#[derive(Debug, Clone)]
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Sampling, token limit and stop tokens.
    pub opts: GenerateOptions,
    /// Strings that end the text (not included).
    pub stops: Vec<String>,
    /// The LoRA adapter to run with.
    pub adapter: Option<nomoat_protocol::Hash>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Finish {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// `stop` (a stop token or string) or `length` (the token limit or the
    /// context).
    pub reason: &'static str,
    /// The stop string that ended the text, if one did.
    pub stop_sequence: Option<String>,
}

/// What a job reports, in order: text pieces, then `Done` or `Failed`.
#[derive(Debug, Clone)]
pub enum JobEvent {
    /// The next piece of text.
    Text(String),
    /// The job ended.
    Done(Finish),
    /// The job failed after it started.
    Failed(String),
    /// A spot check caught a server lying: the text after the first `keep`
    /// bytes sent was wrong, and the right text follows. A client that has
    /// shown it (a stream) cannot take it back and ends the answer.
    Retract {
        /// Bytes of the text sent so far that stand.
        keep: usize,
        /// The liar.
        liar: String,
    },
}

/// How long a job waits for its client to take the next event: a client
/// that stops reading (a stalled stream) frees its generation slot after
/// this.
pub const CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `event` to the job's client; `false` when the client went away or
/// read nothing for [`CLIENT_STALL_TIMEOUT`].
async fn send_or_give_up(tx: &mpsc::Sender<JobEvent>, event: JobEvent) -> bool {
    matches!(
        tokio::time::timeout(CLIENT_STALL_TIMEOUT, tx.send(event)).await,
        Ok(Ok(()))
    )
}

/// Turns a job's tokens into text events, cut at stop strings.
struct JobSink<'a> {
    tok: &'a crate::engine::ChatTokenizer,
    text: TextStream,
    stop: StopMatcher,
    stopped_by: Option<String>,
    tx: &'a mpsc::Sender<JobEvent>,
    guard: &'a SessionGuard,
    /// The client went away or stopped reading.
    gone: bool,
    /// The tokens handed in, and the bytes of text sent for them.
    ids: Vec<u32>,
    sent: usize,
}

impl TokenSink for JobSink<'_> {
    async fn token(&mut self, id: u32) -> Result<bool, StepError> {
        self.guard.token();
        self.ids.push(id);
        let Some(p) = self.text.push(self.tok, id)? else {
            return Ok(true);
        };
        let (emit, hit) = self.stop.push(&p);
        self.sent += emit.len();
        if !emit.is_empty() && !send_or_give_up(self.tx, JobEvent::Text(emit)).await {
            debug!("the client went away or stopped reading; stopping");
            self.gone = true;
            return Ok(false);
        }
        if let Some(s) = hit {
            self.stopped_by = Some(s);
            return Ok(false);
        }
        Ok(true)
    }

    /// Rebuilds the text state of the first `keep` tokens and tells the
    /// client how much of what it got stands.
    async fn rewind(&mut self, keep: usize, liar: libp2p::PeerId) -> Result<(), StepError> {
        self.ids.truncate(keep);
        self.text = TextStream::default();
        self.stop = StopMatcher::new(std::mem::take(&mut self.stop.stops));
        self.stopped_by = None;
        self.sent = 0;
        for &id in &self.ids {
            if let Some(p) = self.text.push(self.tok, id)? {
                self.sent += self.stop.push(&p).0.len();
            }
        }
        let retract = JobEvent::Retract {
            keep: self.sent,
            liar: liar.to_string(),
        };
        if !send_or_give_up(self.tx, retract).await {
            self.gone = true;
        }
        Ok(())
    }
}

/// Holds back text that may be the start of a stop string, and cuts the
/// text at the first stop string.
#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds a piece; returns the text that is safe to emit and the stop
    /// string reached, if one was (the text then ends before it).
    pub(crate) fn push(&mut self, piece: &str) -> (String, Option<String>) {
        self.held.push_str(piece);
        if let Some((i, s)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s)))
            .min_by_key(|(i, _)| *i)
        {
            let out = self.held[..i].to_string();
            let stop = s.clone();
            self.held.clear();
            return (out, Some(stop));
        }
        let mut keep = 0;
        for s in &self.stops {
            for k in (1..s.len().min(self.held.len() + 1)).rev() {
                if s.is_char_boundary(k) && self.held.ends_with(&s[..k]) {
                    keep = keep.max(k);
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, None)
    }

    /// The text held back, once no more comes.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// What a request asks for, in either API's dialect, with the checks that
/// need no model done.
#[derive(Debug)]
pub(super) struct Ask<'a> {
    /// The model the request names.
    pub(super) model: &'a str,
    /// The token limit the request gives, if any.
    pub(super) max_tokens: Option<usize>,
    /// Sampling, checked.
    pub(super) sampling: SamplingParams,
    /// Stop strings.
    pub(super) stops: Vec<String>,
}

impl Gateway {
    /// Checks the model name and token limit against the model and turns
    /// the request into a job for `prompt`.
    pub(super) fn job(&self, ask: Ask<'_>, prompt: Vec<u32>) -> Result<Job, ApiError> {
        let adapter = self.check_model(ask.model)?;
        let context = self.model_config().max_seq_len;
        if prompt.is_empty() {
            return Err(ApiError::invalid(
                Some("messages"),
                "the prompt is empty: send some text",
            ));
        }
        if prompt.len() >= context {
            return Err(ApiError::invalid(
                Some("messages"),
                format!(
                    "the prompt is {} tokens, but the model's context is {context}: shorten it",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        let room = context - prompt.len();
        let max_tokens = match ask.max_tokens {
            Some(0) => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    "max_tokens must be at least 1",
                ))
            }
            Some(n) if n > room => {
                return Err(ApiError::invalid(
                    Some("max_tokens"),
                    format!(
                        "max_tokens {n} plus the prompt's {} tokens exceeds the model's context of {context} tokens: ask for at most {room}",
                        prompt.len()
                    ),
                )
                .with_code("context_length_exceeded"))
            }
            Some(n) => n,
            None => DEFAULT_API_MAX_TOKENS.min(room),
        };
        Ok(Job {
            prompt,
            opts: GenerateOptions {
                max_tokens,
                sampling: ask.sampling,
                stop_ids: self.tokenizer().stop_ids().to_vec(),
            },
            stops: ask.stops,
            adapter,
        })
    }

    /// Starts a job: plans a route and opens a session (errors here become
    /// the HTTP status: 503 for a coverage gap), then generates in a task
    /// that reports on the returned channel. Dropping the receiver stops the
    /// generation at the next token.
    pub async fn start_job(&self, job: Job) -> Result<mpsc::Receiver<JobEvent>, ApiError> {
        let limit = self.inner.cfg.max_concurrent;
        let permit = self
            .inner
            .permits
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::busy(limit))?;
        let max_seq = self.inner.model.max_seq_len;
        let max_len = max_seq.min(job.prompt.len() + job.opts.max_tokens + 1) as u32;
        let (stepper, route) = match &self.inner.backend {
            Backend::Local(model) => {
                let stepper = match job.adapter {
                    Some(id) => {
                        let parts = self.local_parts(id).await?;
                        Stepper::local_session(model.clone(), model.new_session_with(parts))
                    }
                    None => Stepper::local(model.clone()),
                };
                (stepper, vec!["local".to_string()])
            }
            Backend::Swarm(s) => {
                let mut servers = s.servers();
                if servers.is_empty() {
                    servers = s.refresh().await?;
                }
                let n = self.inner.model.num_blocks as u32;
                let route = plan(&s.net, &s.model_id, n, &servers, max_len)?;
                if job.adapter.is_some() {
                    self.serve_store();
                }
                let mut session = RemoteSession::open_with(
                    &s.net,
                    &s.model_id,
                    route,
                    max_len,
                    self.inner.cfg.step_timeout,
                    job.adapter,
                )
                .await?;
                session.set_verify(crate::client::verify::VerifyOptions::new(
                    self.inner.cfg.verify,
                ));
                let names = session
                    .route()
                    .iter()
                    .map(|(p, b)| format!("{p} {b}"))
                    .collect();
                let stepper = Stepper::swarm(s.head.clone(), session)
                    .with_wire_dtype(self.inner.cfg.wire_dtype)
                    .map_err(|e| ApiError::internal(format!("--wire-dtype: {e}")))?;
                (stepper, names)
            }
        };
        let guard = self.track(job.prompt.len(), route);
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let gw = self.clone();
        let span = tracing::info_span!("session", id = guard.id, prompt = job.prompt.len());
        tokio::spawn(
            async move {
                let mut stepper = stepper;
                let result = gw.drive(&mut stepper, &job, &tx, &guard).await;
                stepper.close().await;
                drop(guard);
                // The slot is free before the last event waits for its reader.
                drop(permit);
                let m = crate::metrics::global();
                let event = match result {
                    // The client went away or stopped reading: nobody is
                    // left to tell.
                    Ok(None) => return,
                    Ok(Some(fin)) => {
                        m.requests_ok.inc();
                        m.prompt_tokens.add(fin.prompt_tokens as u64);
                        m.generated_tokens.add(fin.completion_tokens as u64);
                        JobEvent::Done(fin)
                    }
                    Err(e) => {
                        // Counted as failed where the response reports it.
                        debug!("generation failed: {e}");
                        JobEvent::Failed(e.to_string())
                    }
                };
                let _ = send_or_give_up(&tx, event).await;
            }
            .instrument(span),
        );
        Ok(rx)
    }

    async fn drive(
        &self,
        stepper: &mut Stepper,
        job: &Job,
        tx: &mpsc::Sender<JobEvent>,
        guard: &SessionGuard,
    ) -> Result<Option<Finish>, StepError> {
        let mut sink = JobSink {
            tok: &self.inner.tokenizer,
            text: TextStream::default(),
            stop: StopMatcher::new(job.stops.clone()),
            stopped_by: None,
            tx,
            guard,
            gone: false,
            ids: Vec::new(),
            sent: 0,
        };
        let limit = self.inner.model.max_seq_len;
        let (out, stats) = generate(stepper, &job.prompt, &job.opts, limit, &mut sink).await?;
        let JobSink {
            mut stop,
            stopped_by,
            gone,
            ..
        } = sink;
        if gone {
            return Ok(None);
        }
        if stopped_by.is_none() {
            let rest = stop.flush();
            if !rest.is_empty() {
                let _ = send_or_give_up(tx, JobEvent::Text(rest)).await;
            }
        }
        Ok(Some(Finish {
            prompt_tokens: job.prompt.len(),
            completion_tokens: out.len(),
            reason: if stats.stopped || stopped_by.is_some() {
                "stop"
            } else {
                "length"
            },
            stop_sequence: stopped_by,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (e, hit) = m.push(p);
            out.push_str(&e);
            if hit.is_some() {
                return (out, hit);
            }
        }
        out.push_str(&m.flush());
        (out, None)
    }

    fn hit(s: &str) -> Option<String> {
        Some(s.to_string())
    }

    #[test]
    fn stop_strings_cut_across_pieces() {
        assert_eq!(run(&["."], &["Paris", ". Yes"]), ("Paris".into(), hit(".")));
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), hit("END"))
        );
        assert_eq!(run(&["END"], &["ab", "cE", "x"]), ("abcEx".into(), None));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), None));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), None));
        // The earliest stop in the text wins, whatever its place in the list.
        assert_eq!(run(&["b", "xy"], &["axyb"]), ("a".into(), hit("xy")));
    }
}
