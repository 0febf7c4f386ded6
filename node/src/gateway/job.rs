//! One generation job: a session (on the swarm or the local model), the
//! token loop, stop strings, and events on a bounded channel.

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, Instrument};

use super::{ApiError, Backend, Gateway, SessionGuard};
use crate::client::{generate, plan, RemoteSession, StepError, Stepper, TokenSink};
use crate::engine::{GenerateOptions, TextStream};

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
    stopped_by_string: bool,
    tx: &'a mpsc::Sender<JobEvent>,
    guard: &'a SessionGuard,
    /// The client went away or stopped reading.
    gone: bool,
}

impl TokenSink for JobSink<'_> {
    async fn token(&mut self, id: u32) -> Result<bool, StepError> {
        self.guard.token();
        let Some(p) = self.text.push(self.tok, id)? else {
            return Ok(true);
        };
        let (emit, hit) = self.stop.push(&p);
        if !emit.is_empty() && !send_or_give_up(self.tx, JobEvent::Text(emit)).await {
            debug!("the client went away or stopped reading; stopping");
            self.gone = true;
            return Ok(false);
        }
        if hit {
            self.stopped_by_string = true;
            return Ok(false);
        }
        Ok(true)
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

    /// Adds a piece; returns the text that is safe to emit and whether a
    /// stop string was reached (the text then ends before it).
    pub(crate) fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(i) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..i].to_string();
            self.held.clear();
            return (out, true);
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
        (out, false)
    }

    /// The text held back, once no more comes.
    pub(crate) fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

impl Gateway {
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
            Backend::Local(model) => (Stepper::local(model.clone()), vec!["local".to_string()]),
            Backend::Swarm(s) => {
                let mut servers = s.servers();
                if servers.is_empty() {
                    servers = s.refresh().await?;
                }
                let n = self.inner.model.num_blocks as u32;
                let route = plan(&s.net, &s.model_id, n, &servers, max_len)?;
                let session = RemoteSession::open(
                    &s.net,
                    &s.model_id,
                    route,
                    max_len,
                    self.inner.cfg.step_timeout,
                )
                .await?;
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
            stopped_by_string: false,
            tx,
            guard,
            gone: false,
        };
        let limit = self.inner.model.max_seq_len;
        let (out, stats) = generate(stepper, &job.prompt, &job.opts, limit, &mut sink).await?;
        let JobSink {
            mut stop,
            stopped_by_string,
            gone,
            ..
        } = sink;
        if gone {
            return Ok(None);
        }
        if !stopped_by_string {
            let rest = stop.flush();
            if !rest.is_empty() {
                let _ = send_or_give_up(tx, JobEvent::Text(rest)).await;
            }
        }
        Ok(Some(Finish {
            prompt_tokens: job.prompt.len(),
            completion_tokens: out.len(),
            reason: if stats.stopped || stopped_by_string {
                "stop"
            } else {
                "length"
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (e, hit) = m.push(p);
            out.push_str(&e);
            if hit {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_strings_cut_across_pieces() {
        assert_eq!(run(&["."], &["Paris", ". Yes"]), ("Paris".into(), true));
        assert_eq!(
            run(&["END"], &["ab", "cE", "N", "Dxyz"]),
            ("abc".into(), true)
        );
        assert_eq!(run(&["END"], &["ab", "cE", "x"]), ("abcEx".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["xy", "b"], &["axyb"]), ("a".into(), true));
    }
}
