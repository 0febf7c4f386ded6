//! The executor: compute on its own thread, never on the network runtime.
//!
//! It owns the span's weights and every session's KV cache. Requests come
//! through a bounded queue; a full queue is a clear "busy" rather than an
//! unbounded backlog. Sessions idle for longer than the timeout are dropped,
//! and the sum of the positions sessions may hold is capped (the KV budget).

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nomoat_protocol::{ErrorCode, SessionId, TensorFrame};
use tokio::sync::oneshot;

use crate::engine::{hidden_from_frame, hidden_to_frame, EngineError, Span, SpanCache};

/// Default cap on concurrent sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 64;
/// Default KV budget, in positions summed over sessions.
pub const DEFAULT_KV_TOKENS: usize = 262_144;
/// Default idle timeout of a session.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Capacity of the request queue.
pub const EXECUTOR_QUEUE: usize = 256;

/// Limits of the executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Most positions all sessions together may reserve.
    pub kv_tokens: usize,
    /// Sessions unused for this long are dropped.
    pub idle_timeout: Duration,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MAX_SESSIONS,
            kv_tokens: DEFAULT_KV_TOKENS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
        }
    }
}

/// Why a request failed, with its wire code.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ExecError {
    /// The wire code.
    pub code: ErrorCode,
    /// For people.
    pub message: String,
}

impl ExecError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<EngineError> for ExecError {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::BadHidden(_) => ErrorCode::BadShape,
            EngineError::ContextFull { .. } => ErrorCode::ContextFull,
            EngineError::BadSpan { .. } => ErrorCode::WrongBlocks,
            EngineError::BadRollback { .. } => ErrorCode::Malformed,
            EngineError::Frame(t) => ErrorCode::from(t),
            _ => ErrorCode::Internal,
        };
        Self::new(code, e.to_string())
    }
}

/// Live figures of the executor, read by announcements and status.
#[derive(Debug, Clone, Default)]
pub struct ExecutorStats {
    /// Sessions open.
    pub sessions: usize,
    /// Positions reserved by open sessions.
    pub reserved_kv_tokens: usize,
    /// Positions still free in the budget.
    pub free_kv_tokens: usize,
    /// Decode throughput of the span (EMA over one-token steps), tokens/s.
    pub throughput: f32,
    /// Steps computed.
    pub steps: u64,
    /// Sessions still running on a span the server moved away from.
    pub draining: usize,
    /// The most sessions it holds at once (`--max-sessions`).
    pub max_sessions: usize,
}

impl ExecutorStats {
    /// The share of session slots in use, 0 to 1: what the server announces
    /// as its load.
    pub fn load(&self) -> f32 {
        (self.sessions as f32 / self.max_sessions.max(1) as f32).min(1.0)
    }
}

enum Job {
    Open {
        id: SessionId,
        start: usize,
        end: usize,
        max_len: usize,
        reply: oneshot::Sender<Result<usize, ExecError>>,
    },
    Step {
        id: SessionId,
        seq: u64,
        start_pos: usize,
        hidden: TensorFrame,
        reply: oneshot::Sender<Result<TensorFrame, ExecError>>,
    },
    Close {
        id: SessionId,
    },
    Move {
        span: Arc<Span>,
    },
    Shutdown,
}

struct Session {
    /// The span the session was opened on: after a move, old sessions
    /// finish on the old span (it is freed with the last of them).
    span: Arc<Span>,
    cache: SpanCache,
    last_seq: u64,
    reserved: usize,
    last_used: Instant,
}

/// A cloneable handle to the executor thread.
#[derive(Clone)]
pub struct Executor {
    tx: SyncSender<Job>,
    stats: Arc<Mutex<ExecutorStats>>,
    span: Arc<Mutex<Arc<Span>>>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let span = self.span();
        f.debug_struct("Executor")
            .field("blocks", &(span.start()..span.end()))
            .finish()
    }
}

impl Executor {
    /// Starts the executor thread for a span.
    pub fn start(span: Arc<Span>, cfg: ExecutorConfig) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Job>(EXECUTOR_QUEUE);
        let stats = Arc::new(Mutex::new(ExecutorStats {
            free_kv_tokens: cfg.kv_tokens,
            max_sessions: cfg.max_sessions,
            ..Default::default()
        }));
        let worker = Worker {
            span: span.clone(),
            cfg,
            sessions: HashMap::new(),
            stats: stats.clone(),
            ema: None,
        };
        std::thread::Builder::new()
            .name("nomoat-executor".into())
            .spawn(move || worker.run(rx))?;
        Ok(Self {
            tx,
            stats,
            span: Arc::new(Mutex::new(span)),
        })
    }

    /// The span new sessions open on.
    pub fn span(&self) -> Arc<Span> {
        self.span.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Moves the server to another span: new sessions open on `span` at
    /// once; sessions already open finish on the old one, which is freed
    /// when the last of them closes or expires.
    pub fn move_to(&self, span: Arc<Span>) -> Result<(), ExecError> {
        *self.span.lock().unwrap_or_else(|p| p.into_inner()) = span.clone();
        self.tx
            .send(Job::Move { span })
            .map_err(|_| ExecError::new(ErrorCode::Internal, "executor stopped"))
    }

    /// Current figures.
    pub fn stats(&self) -> ExecutorStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn submit(&self, job: Job) -> Result<(), ExecError> {
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => {
                ExecError::new(ErrorCode::Busy, "server busy: compute queue full")
            }
            TrySendError::Disconnected(_) => {
                ExecError::new(ErrorCode::Internal, "executor stopped")
            }
        })
    }

    /// Opens a session running blocks `[start, end)`; returns the positions
    /// it may hold.
    pub async fn open(
        &self,
        id: SessionId,
        start: usize,
        end: usize,
        max_len: usize,
    ) -> Result<usize, ExecError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Open {
            id,
            start,
            end,
            max_len,
            reply,
        })?;
        rx.await
            .map_err(|_| ExecError::new(ErrorCode::Internal, "executor stopped"))?
    }

    /// Runs one step; returns the span's output frame.
    pub async fn step(
        &self,
        id: SessionId,
        seq: u64,
        start_pos: usize,
        hidden: TensorFrame,
    ) -> Result<TensorFrame, ExecError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Step {
            id,
            seq,
            start_pos,
            hidden,
            reply,
        })?;
        rx.await
            .map_err(|_| ExecError::new(ErrorCode::Internal, "executor stopped"))?
    }

    /// Drops a session (unknown ids are ignored).
    pub fn close(&self, id: SessionId) {
        // A full queue delays the close to the idle sweep; never blocks.
        let _ = self.tx.try_send(Job::Close { id });
    }

    /// Stops the thread after the queued requests.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Job::Shutdown);
    }
}

struct Worker {
    span: Arc<Span>,
    cfg: ExecutorConfig,
    sessions: HashMap<SessionId, Session>,
    stats: Arc<Mutex<ExecutorStats>>,
    ema: Option<f32>,
}

impl Worker {
    fn run(mut self, rx: std::sync::mpsc::Receiver<Job>) {
        let sweep =
            (self.cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        loop {
            match rx.recv_timeout(sweep) {
                Ok(Job::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(job) => self.handle(job),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.expire();
            self.publish_stats();
        }
    }

    fn reserved(&self) -> usize {
        self.sessions.values().map(|s| s.reserved).sum()
    }

    fn expire(&mut self) {
        let timeout = self.cfg.idle_timeout;
        self.sessions.retain(|id, s| {
            let keep = s.last_used.elapsed() < timeout;
            if !keep {
                tracing::info!(session = %id, "session expired after {timeout:?} idle");
            }
            keep
        });
    }

    fn publish_stats(&self) {
        let reserved = self.reserved();
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        st.sessions = self.sessions.len();
        st.max_sessions = self.cfg.max_sessions;
        st.draining = self
            .sessions
            .values()
            .filter(|s| !Arc::ptr_eq(&s.span, &self.span))
            .count();
        st.reserved_kv_tokens = reserved;
        st.free_kv_tokens = self.cfg.kv_tokens.saturating_sub(reserved);
        if let Some(e) = self.ema {
            st.throughput = e;
        }
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Open {
                id,
                start,
                end,
                max_len,
                reply,
            } => {
                let _ = reply.send(self.open(id, start, end, max_len));
            }
            Job::Step {
                id,
                seq,
                start_pos,
                hidden,
                reply,
            } => {
                let r = self.step(id, seq, start_pos, &hidden);
                if r.is_ok() {
                    self.stats.lock().unwrap_or_else(|p| p.into_inner()).steps += 1;
                }
                let _ = reply.send(r);
            }
            Job::Close { id } => {
                self.sessions.remove(&id);
            }
            Job::Move { span } => {
                tracing::info!(
                    "moved to blocks {}..{}; {} session(s) finish on {}..{}",
                    span.start(),
                    span.end(),
                    self.sessions.len(),
                    self.span.start(),
                    self.span.end()
                );
                // The same speed per block until the new span measures itself.
                let (old, new) = (
                    self.span.end() - self.span.start(),
                    span.end() - span.start(),
                );
                self.ema = self.ema.map(|e| e * old as f32 / new.max(1) as f32);
                self.span = span;
            }
            Job::Shutdown => unreachable!("the worker stops before handling Shutdown"),
        }
    }

    fn open(
        &mut self,
        id: SessionId,
        start: usize,
        end: usize,
        max_len: usize,
    ) -> Result<usize, ExecError> {
        if self.sessions.contains_key(&id) {
            return Err(ExecError::new(
                ErrorCode::Malformed,
                format!("session {id} is already open"),
            ));
        }
        if self.sessions.len() >= self.cfg.max_sessions {
            return Err(ExecError::new(
                ErrorCode::Busy,
                format!(
                    "server busy: {} sessions open, the limit is {}",
                    self.sessions.len(),
                    self.cfg.max_sessions
                ),
            ));
        }
        let cache = self.span.new_cache_range(start, end, max_len)?;
        let reserve = cache.max_len();
        let free = self.cfg.kv_tokens.saturating_sub(self.reserved());
        if reserve > free {
            return Err(ExecError::new(
                ErrorCode::Busy,
                format!(
                    "server busy: the session needs {reserve} cache positions, {free} are free"
                ),
            ));
        }
        self.sessions.insert(
            id,
            Session {
                span: self.span.clone(),
                cache,
                last_seq: 0,
                reserved: reserve,
                last_used: Instant::now(),
            },
        );
        Ok(reserve)
    }

    fn step(
        &mut self,
        id: SessionId,
        seq: u64,
        start_pos: usize,
        hidden: &TensorFrame,
    ) -> Result<TensorFrame, ExecError> {
        let s = self.sessions.get_mut(&id).ok_or_else(|| {
            ExecError::new(ErrorCode::UnknownSession, format!("unknown session {id}"))
        })?;
        if seq <= s.last_seq {
            return Err(ExecError::new(
                ErrorCode::Replayed,
                format!("step {seq} already processed (last was {})", s.last_seq),
            ));
        }
        let x = hidden_from_frame(hidden, s.span.config().hidden_size)?;
        let t = x.dim(1).map_err(EngineError::from)?;
        if start_pos > s.cache.len() {
            return Err(ExecError::new(
                ErrorCode::Malformed,
                format!(
                    "step starts at position {start_pos} but the session holds {}",
                    s.cache.len()
                ),
            ));
        }
        if start_pos < s.cache.len() {
            s.cache.rollback(start_pos)?;
        }
        let began = Instant::now();
        let out = s.span.forward(&x, start_pos, &mut s.cache)?;
        s.last_seq = seq;
        // Only a step that ran keeps the session alive: malformed ones
        // refresh nothing.
        s.last_used = Instant::now();
        if t == 1 && Arc::ptr_eq(&s.span, &self.span) {
            let tps = 1.0 / began.elapsed().as_secs_f32().max(1e-6);
            self.ema = Some(match self.ema {
                Some(e) => 0.9 * e + 0.1 * tps,
                None => tps,
            });
        }
        // The output travels in the dtype the input came in.
        Ok(hidden_to_frame(&out, hidden.dtype())?)
    }
}
