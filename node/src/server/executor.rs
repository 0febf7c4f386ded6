//! The executor: compute on its own thread, never on the network runtime.
//!
//! It owns the span's weights and every session's KV cache. Requests come
//! through a bounded queue; a full queue is a clear "busy" rather than an
//! unbounded backlog. Sessions idle for longer than the timeout are dropped,
//! and so are sessions that never ran a step within a short grace. The KV
//! caches sessions may grow to are reserved in bytes, from the model's shape,
//! against a budget (by default a share of the machine's free memory), and
//! one peer may hold only its share of the sessions and of the budget.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::PeerId;
use nomoat_protocol::{ErrorCode, SessionId, TensorFrame};
use tokio::sync::oneshot;

use crate::engine::{
    hidden_from_frame, hidden_to_frame, BatchStep, EngineError, Span, SpanAdapter, SpanCache,
};

/// Default cap on concurrent sessions.
pub const DEFAULT_MAX_SESSIONS: usize = 64;
/// Default cap on one peer's concurrent sessions: half the sessions (one
/// gateway serves many users through one peer id).
pub const DEFAULT_MAX_SESSIONS_PER_PEER: usize = DEFAULT_MAX_SESSIONS / 2;
/// The share of the machine's available memory the default KV budget takes,
/// measured when the executor starts (after the span's weights are loaded).
pub const DEFAULT_KV_MEMORY_SHARE: f64 = 0.5;
/// The KV budget when the available memory cannot be read.
pub const FALLBACK_KV_BYTES: u64 = 2 << 30;
/// Default idle timeout of a session.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A session that has run no step this long after opening is dropped, so
/// `Open` alone cannot hold a reservation.
pub const DEFAULT_OPEN_GRACE: Duration = Duration::from_secs(30);
/// Capacity of the request queue.
pub const EXECUTOR_QUEUE: usize = 256;
/// Most steps one batched pass takes: the queue is drained up to this
/// many, and the rest wait for the next pass.
pub const MAX_BATCH_STEPS: usize = 64;
/// Most positions a long step (a prompt) adds to one pass when no session
/// is decoding; while sessions decode its pieces adapt to their steps'
/// time (see DESIGN.md, continuous batching).
pub const MAX_PIECE: usize = crate::engine::PREFILL_CHUNK;
/// One-token steps of the start-up probe's batched passes.
const PROBE_BATCH: usize = 4;
/// Rounds of the start-up probe, each a pass of one step and a pass of
/// [`PROBE_BATCH`], after one unmeasured warm-up pass.
const PROBE_ROUNDS: usize = 3;
/// Steps of at most this many positions are decode steps: they run whole
/// in every pass; longer ones are prompts, cut into pieces.
const DECODE_ROWS: usize = 8;
/// The piece a prompt starts with while sessions decode; it then adapts.
const FIRST_PIECE: usize = 8;
/// Sessions that decoded within this long count as decoding: a prompt then
/// goes in by adaptive pieces rather than whole [`MAX_PIECE`]s.
const DECODING_RECENTLY: Duration = Duration::from_millis(500);
/// Longest a pass waits for the next steps of the sessions the previous
/// pass answered (a quarter of that pass's time, at most this).
const MAX_GATHER: Duration = Duration::from_millis(2);

/// Limits of the executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Most sessions at once.
    pub max_sessions: usize,
    /// Most sessions one peer may hold at once. The same share of the KV
    /// budget (`kv_bytes * max_sessions_per_peer / max_sessions`) is that
    /// peer's most.
    pub max_sessions_per_peer: usize,
    /// Bytes of KV cache all sessions together may reserve; `None` is
    /// [`DEFAULT_KV_MEMORY_SHARE`] of the memory available at start.
    pub kv_bytes: Option<u64>,
    /// Sessions unused for this long are dropped.
    pub idle_timeout: Duration,
    /// Sessions that ran no step this long after opening are dropped.
    pub open_grace: Duration,
    /// Most positions one session may hold (its `max_length` is cut to
    /// this); `None`: the model's context.
    pub max_context: Option<usize>,
}

impl Default for ExecutorConfig {
    fn default() -> Self {
        Self {
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_sessions_per_peer: DEFAULT_MAX_SESSIONS_PER_PEER,
            kv_bytes: None,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            open_grace: DEFAULT_OPEN_GRACE,
            max_context: None,
        }
    }
}

impl ExecutorConfig {
    /// The KV budget in bytes: the configured figure, or a share of the
    /// memory available now.
    pub fn resolved_kv_bytes(&self) -> u64 {
        self.kv_bytes.unwrap_or_else(|| match available_memory() {
            Some(m) => (m as f64 * DEFAULT_KV_MEMORY_SHARE) as u64,
            None => FALLBACK_KV_BYTES,
        })
    }
}

/// Memory this process may still take: the kernel's `MemAvailable`, or what
/// the cgroup's limit leaves if that is less. `None` where neither can be
/// read.
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let read = |p: &str| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0)));
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Bytes of KV cache one position of blocks `[start, end)` takes: keys and
/// values in f32 for every kv head.
pub fn kv_bytes_per_position(cfg: &crate::engine::ModelConfig, start: usize, end: usize) -> u64 {
    (end.saturating_sub(start) * 2 * cfg.num_kv_heads * cfg.head_dim * 4) as u64
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
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Self {
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
    /// The KV budget, bytes.
    pub kv_bytes: u64,
    /// Bytes of KV cache reserved by open sessions.
    pub reserved_kv_bytes: u64,
    /// Positions of the whole span the free part of the budget still holds:
    /// what the server announces as its free KV.
    pub free_kv_tokens: usize,
    /// Decode throughput of the span (EMA over one-token steps), tokens/s.
    pub throughput: f32,
    /// Steps computed.
    pub steps: u64,
    /// Batched passes run (each runs one or more sessions' steps or pieces).
    pub passes: u64,
    /// The most steps one pass has run together.
    pub max_batch: usize,
    /// Sessions one decode pass adds before it takes twice one session's
    /// step ([`BatchCost::capacity`]); 0 until measured.
    pub batch_capacity: f32,
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

/// What a decode pass costs by the number of its steps: about
/// `single + (b - 1) * extra` seconds for `b` one-token steps, both terms
/// averaged (EMA) over the passes that measure them. The capacity the
/// server announces is `single / extra`: the sessions a pass adds before
/// it takes twice one step alone. A server that batches well (its
/// products bound by reading weights) has a large one; one bound by
/// arithmetic, a small one.
#[derive(Debug, Clone, Default)]
pub struct BatchCost {
    single: Option<f64>,
    extra: Option<f64>,
}

impl BatchCost {
    /// Weight of a new pass in the averages.
    const NEW: f64 = 0.1;

    fn ema(old: Option<f64>, new: f64) -> f64 {
        old.map_or(new, |o| (1.0 - Self::NEW) * o + Self::NEW * new)
    }

    /// A decode pass of `steps` one-token steps took `secs`.
    pub fn observe(&mut self, steps: usize, secs: f64) {
        if steps == 0 || !secs.is_finite() || secs <= 0.0 {
            return;
        }
        if steps == 1 {
            self.single = Some(Self::ema(self.single, secs));
        } else if let Some(one) = self.single {
            let extra = ((secs - one) / (steps - 1) as f64).max(0.0);
            self.extra = Some(Self::ema(self.extra, extra));
        }
    }

    /// Sessions a pass adds before it takes twice one step alone, once
    /// both terms are measured: at least 1, at most [`MAX_BATCH_STEPS`].
    pub fn capacity(&self) -> Option<f64> {
        let (one, extra) = (self.single?, self.extra?);
        let max = MAX_BATCH_STEPS as f64;
        Some(if extra * max <= one {
            max
        } else {
            (one / extra).clamp(1.0, max)
        })
    }

    /// What one step alone would have taken, from a pass of `steps` that
    /// took `secs` (`secs` itself until the capacity is known).
    pub fn alone(&self, steps: usize, secs: f64) -> f64 {
        match self.capacity() {
            Some(c) if steps > 1 => secs / (1.0 + (steps - 1) as f64 / c),
            _ => secs,
        }
    }

    /// The span changed length by `factor`: both terms scale with it.
    fn rescale(&mut self, factor: f64) {
        self.single = self.single.map(|t| t * factor);
        self.extra = self.extra.map(|t| t * factor);
    }
}

enum Job {
    Open {
        id: SessionId,
        peer: PeerId,
        start: usize,
        end: usize,
        max_len: usize,
        adapter: Option<Arc<SpanAdapter>>,
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
    peer: PeerId,
    last_seq: u64,
    /// Bytes of KV cache reserved.
    reserved: u64,
    last_used: Instant,
    /// Whether a step has run.
    stepped: bool,
    /// The LoRA adapter the session runs with.
    adapter: Option<Arc<SpanAdapter>>,
}

/// A cloneable handle to the executor thread.
#[derive(Clone)]
pub struct Executor {
    tx: SyncSender<Job>,
    stats: Arc<Mutex<ExecutorStats>>,
    span: Arc<Mutex<Arc<Span>>>,
    idle_timeout: Duration,
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
        let kv_bytes = cfg.resolved_kv_bytes();
        let per_position = kv_bytes_per_position(span.config(), span.start(), span.end()).max(1);
        tracing::info!(
            "KV budget {} MiB: {} positions of blocks {}..{}",
            kv_bytes >> 20,
            kv_bytes / per_position,
            span.start(),
            span.end()
        );
        let stats = Arc::new(Mutex::new(ExecutorStats {
            kv_bytes,
            free_kv_tokens: (kv_bytes / per_position) as usize,
            max_sessions: cfg.max_sessions,
            ..Default::default()
        }));
        let idle_timeout = cfg.idle_timeout;
        let worker = Worker {
            span: span.clone(),
            kv_bytes,
            cfg,
            sessions: HashMap::new(),
            stats: stats.clone(),
            ema: None,
            batch_cost: BatchCost::default(),
            running: Vec::new(),
            decode_pass: None,
            piece: FIRST_PIECE,
            last_decode: None,
            expected: Vec::new(),
            last_pass: 0.0,
        };
        std::thread::Builder::new()
            .name("nomoat-executor".into())
            .spawn(move || worker.run(rx))?;
        Ok(Self {
            tx,
            stats,
            span: Arc::new(Mutex::new(span)),
            idle_timeout,
        })
    }

    /// How long a session may sit unused: streams that carry nothing for
    /// this long are closed too.
    pub fn idle_timeout(&self) -> Duration {
        self.idle_timeout
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

    /// Opens a session of `peer` running blocks `[start, end)`; returns the
    /// positions it may hold.
    pub async fn open(
        &self,
        id: SessionId,
        peer: PeerId,
        start: usize,
        end: usize,
        max_len: usize,
        adapter: Option<Arc<SpanAdapter>>,
    ) -> Result<usize, ExecError> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Open {
            id,
            peer,
            start,
            end,
            max_len,
            adapter,
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
    /// The KV budget, bytes.
    kv_bytes: u64,
    sessions: HashMap<SessionId, Session>,
    stats: Arc<Mutex<ExecutorStats>>,
    ema: Option<f32>,
    /// What a decode pass costs by the number of its steps.
    batch_cost: BatchCost,
    /// Steps admitted and not yet finished, in arrival order: a long one
    /// runs a piece per pass.
    running: Vec<Running>,
    /// Seconds of a pass of decode steps alone (EMA), the yardstick for
    /// how much of a prompt a pass may add.
    decode_pass: Option<f64>,
    /// Positions of a prompt a pass takes while sessions are decoding.
    piece: usize,
    /// When a pass last ran a decode step.
    last_decode: Option<Instant>,
    /// Sessions whose decode step the last pass answered: their next steps
    /// are likely on their way, and the next pass waits a moment for them.
    expected: Vec<SessionId>,
    /// Seconds the last pass took.
    last_pass: f64,
}

/// A step on its way: checked, its input decoded, `done` of its positions
/// computed.
struct Running {
    id: SessionId,
    seq: u64,
    start_pos: usize,
    x: candle_core::Tensor,
    dtype: nomoat_protocol::DType,
    done: usize,
    outs: Vec<candle_core::Tensor>,
    /// Taken when the step is answered; an answered step leaves the
    /// running ones after the pass.
    reply: Option<oneshot::Sender<Result<TensorFrame, ExecError>>>,
}

impl Running {
    fn rows(&self) -> usize {
        self.x.dim(1).unwrap_or(0)
    }

    fn answer(&mut self, result: Result<TensorFrame, ExecError>) {
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result);
        }
    }
}

impl Worker {
    /// Takes jobs until shutdown. Steps are not run one by one: every
    /// pass takes all the steps waiting (up to [`MAX_BATCH_STEPS`]) and
    /// runs them together, so sessions that step at the same time share
    /// one read of the weights. A long step runs a piece per pass, so it
    /// never holds up the others' decode steps for long.
    fn run(mut self, rx: std::sync::mpsc::Receiver<Job>) {
        self.probe();
        self.publish_stats();
        let sweep =
            (self.cfg.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut stop = false;
        while !stop {
            // Wait only when nothing is running.
            let first = if self.running.is_empty() {
                rx.recv_timeout(sweep)
            } else {
                rx.try_recv().map_err(|e| match e {
                    std::sync::mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    std::sync::mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            };
            match first {
                Ok(Job::Shutdown) | Err(RecvTimeoutError::Disconnected) => stop = true,
                Ok(job) => self.take(job),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Everything already queued joins this pass, and the sessions
            // the last pass answered get a moment to send their next steps,
            // so that sessions decoding together stay in one pass.
            let gather = Duration::from_secs_f64(self.last_pass / 4.0).min(MAX_GATHER);
            let until = Instant::now() + gather;
            while !stop && self.running.len() < MAX_BATCH_STEPS {
                match rx.try_recv() {
                    Ok(Job::Shutdown) => stop = true,
                    Ok(job) => self.take(job),
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => break,
                    Err(std::sync::mpsc::TryRecvError::Empty) => {
                        let missing = self
                            .expected
                            .iter()
                            .any(|id| !self.running.iter().any(|r| r.id == *id));
                        let now = Instant::now();
                        if !missing || now >= until || self.running.is_empty() {
                            break;
                        }
                        match rx.recv_timeout(until - now) {
                            Ok(Job::Shutdown) => stop = true,
                            Ok(job) => self.take(job),
                            Err(_) => break,
                        }
                    }
                }
            }
            if !self.running.is_empty() {
                self.pass();
            }
            self.expire();
            self.publish_stats();
        }
        // Steps admitted before the shutdown still get their answers.
        while !self.running.is_empty() {
            self.pass();
        }
    }

    /// Measures the batch cost before the first session, so that the
    /// server announces a batch capacity from the start: on scratch caches,
    /// a warm-up pass, then [`PROBE_ROUNDS`] rounds of a pass of one
    /// one-token step and one of [`PROBE_BATCH`]. A failure only leaves the
    /// cost to be measured on traffic.
    fn probe(&mut self) {
        let span = self.span.clone();
        let pass = |steps: usize| -> crate::engine::Result<f64> {
            let h = span.config().hidden_size;
            let x = candle_core::Tensor::zeros(
                (1, 1, h),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            let mut caches = (0..steps)
                .map(|_| span.new_cache_range(span.start(), span.end(), 1))
                .collect::<crate::engine::Result<Vec<_>>>()?;
            let mut batch: Vec<BatchStep<'_>> = caches
                .iter_mut()
                .map(|cache| BatchStep {
                    x: &x,
                    pos: 0,
                    cache,
                })
                .collect();
            let began = Instant::now();
            span.forward_batch(&mut batch, None)?;
            Ok(began.elapsed().as_secs_f64())
        };
        let began = Instant::now();
        let mut measure = || -> crate::engine::Result<()> {
            pass(PROBE_BATCH)?;
            for _ in 0..PROBE_ROUNDS {
                self.batch_cost.observe(1, pass(1)?);
                self.batch_cost.observe(PROBE_BATCH, pass(PROBE_BATCH)?);
            }
            Ok(())
        };
        match measure() {
            Ok(()) => tracing::debug!(
                "batch capacity {:.1} sessions (probed in {:?})",
                self.batch_cost.capacity().unwrap_or(0.0),
                began.elapsed()
            ),
            Err(e) => tracing::warn!("the batch probe failed ({e}); measuring on traffic instead"),
        }
    }

    /// A job from the queue: a step joins the running ones (after its
    /// checks), anything else is done at once.
    fn take(&mut self, job: Job) {
        match job {
            Job::Step {
                id,
                seq,
                start_pos,
                hidden,
                reply,
            } => match self.admit(id, seq, &hidden) {
                Ok(x) => self.running.push(Running {
                    id,
                    seq,
                    start_pos,
                    x,
                    dtype: hidden.dtype(),
                    done: 0,
                    outs: Vec::new(),
                    reply: Some(reply),
                }),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            other => self.handle(other),
        }
    }

    fn reserved(&self) -> u64 {
        self.sessions.values().map(|s| s.reserved).sum()
    }

    fn expire(&mut self) {
        let (timeout, grace) = (self.cfg.idle_timeout, self.cfg.open_grace);
        let running = &self.running;
        self.sessions.retain(|id, s| {
            // A session whose step is still going in (a long prompt, piece
            // by piece) is in use.
            if running.iter().any(|r| r.id == *id) {
                s.last_used = Instant::now();
                return true;
            }
            let idle = s.last_used.elapsed();
            if !s.stepped && idle >= grace {
                tracing::info!(session = %id, peer = %s.peer, "session dropped: no step within {grace:?} of opening");
                return false;
            }
            let keep = idle < timeout;
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
        st.kv_bytes = self.kv_bytes;
        st.reserved_kv_bytes = reserved;
        let per_position =
            kv_bytes_per_position(self.span.config(), self.span.start(), self.span.end()).max(1);
        st.free_kv_tokens = (self.kv_bytes.saturating_sub(reserved) / per_position) as usize;
        if let Some(e) = self.ema {
            st.throughput = e;
        }
        st.batch_capacity = self.batch_cost.capacity().unwrap_or(0.0) as f32;
    }

    fn handle(&mut self, job: Job) {
        match job {
            Job::Open {
                id,
                peer,
                start,
                end,
                max_len,
                adapter,
                reply,
            } => {
                let _ = reply.send(self.open(id, peer, start, end, max_len, adapter));
            }
            Job::Step { .. } => self.take(job),
            Job::Close { id } => {
                self.sessions.remove(&id);
                // A step of it still running is answered now.
                let (gone, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.running)
                    .into_iter()
                    .partition(|r| r.id == id);
                self.running = kept;
                for mut r in gone {
                    r.answer(Err(ExecError::new(
                        ErrorCode::UnknownSession,
                        format!("session {id} closed"),
                    )));
                }
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
                self.batch_cost.rescale(new as f64 / old.max(1) as f64);
                self.span = span;
            }
            Job::Shutdown => unreachable!("the worker stops before handling Shutdown"),
        }
    }

    fn open(
        &mut self,
        id: SessionId,
        peer: PeerId,
        start: usize,
        end: usize,
        max_len: usize,
        adapter: Option<Arc<SpanAdapter>>,
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
        let per_peer = self
            .cfg
            .max_sessions_per_peer
            .clamp(1, self.cfg.max_sessions.max(1));
        let (mine, mine_bytes) = self
            .sessions
            .values()
            .filter(|s| s.peer == peer)
            .fold((0, 0u64), |(n, b), s| (n + 1, b + s.reserved));
        if mine >= per_peer {
            return Err(ExecError::new(
                ErrorCode::Busy,
                format!("server busy: this peer holds {mine} sessions, the most one peer may hold"),
            ));
        }
        if let Some(a) = &adapter {
            if a.start() > start || a.end() < end {
                return Err(ExecError::new(
                    ErrorCode::Internal,
                    format!(
                        "the adapter is loaded for blocks {}..{}, the session asks {start}..{end}",
                        a.start(),
                        a.end()
                    ),
                ));
            }
        }
        let max_len = max_len.min(self.cfg.max_context.unwrap_or(usize::MAX));
        let cache = self.span.new_cache_range(start, end, max_len)?;
        let positions = cache.max_len();
        let reserve = positions as u64 * kv_bytes_per_position(self.span.config(), start, end);
        let free = self.kv_bytes.saturating_sub(self.reserved());
        if reserve > free {
            return Err(ExecError::new(
                ErrorCode::Busy,
                format!(
                    "server busy: the session's {positions} positions need {} KiB of KV cache, {} KiB are free",
                    reserve.div_ceil(1024),
                    free / 1024
                ),
            ));
        }
        let peer_budget = (self.kv_bytes as u128 * per_peer as u128
            / self.cfg.max_sessions.max(1) as u128) as u64;
        if mine_bytes + reserve > peer_budget {
            return Err(ExecError::new(
                ErrorCode::Busy,
                format!(
                    "server busy: this peer's sessions already reserve {} KiB of the {} KiB one peer may hold",
                    mine_bytes / 1024,
                    peer_budget / 1024
                ),
            ));
        }
        self.sessions.insert(
            id,
            Session {
                span: self.span.clone(),
                cache,
                peer,
                last_seq: 0,
                reserved: reserve,
                last_used: Instant::now(),
                stepped: false,
                adapter,
            },
        );
        Ok(positions)
    }

    /// The checks of a step that need no compute, and its input.
    fn admit(
        &mut self,
        id: SessionId,
        seq: u64,
        hidden: &TensorFrame,
    ) -> Result<candle_core::Tensor, ExecError> {
        let s = self.sessions.get(&id).ok_or_else(|| {
            ExecError::new(ErrorCode::UnknownSession, format!("unknown session {id}"))
        })?;
        if seq <= s.last_seq || self.running.iter().any(|r| r.id == id && r.seq >= seq) {
            return Err(ExecError::new(
                ErrorCode::Replayed,
                format!("step {seq} already processed (last was {})", s.last_seq),
            ));
        }
        let x = hidden_from_frame(hidden, s.span.config().hidden_size)?;
        x.dim(1).map_err(EngineError::from)?;
        Ok(x)
    }

    /// The positions of a long step a pass with decode steps in it takes:
    /// halved when such a pass took more than 1.5x a pass of decode steps
    /// alone, one more when it took less than 1.25x. Running sessions then
    /// see their steps slowed by at most about 1.5x while a prompt goes
    /// in, and the prompt gets what is left.
    fn adapt_piece(&mut self, secs: f64, mixed: bool, decode_only: bool) {
        // `mixed`: decode steps and a prompt's piece; `decode_only`: decode
        // steps and nothing else.
        if decode_only {
            self.decode_pass = Some(match self.decode_pass {
                Some(e) => 0.9 * e + 0.1 * secs,
                None => secs,
            });
        } else if mixed {
            if let Some(base) = self.decode_pass {
                if secs > 1.5 * base {
                    self.piece = (self.piece / 2).max(1);
                } else if secs < 1.25 * base {
                    self.piece = (self.piece + 1).min(MAX_PIECE);
                }
            }
        }
    }

    /// One pass: the next piece of every running step that can run now,
    /// grouped by span, blocks and adapter, each group as one batched
    /// forward.
    fn pass(&mut self) {
        // A session's steps run in order: only its first running step takes
        // part in this pass.
        let mut chosen: Vec<usize> = Vec::new();
        for (i, r) in self.running.iter().enumerate() {
            if !chosen.iter().any(|&j| self.running[j].id == r.id) {
                chosen.push(i);
            }
        }
        let decodes = chosen
            .iter()
            .filter(|&&i| self.running[i].rows() <= DECODE_ROWS)
            .count();
        let decoding = decodes > 0
            || self
                .last_decode
                .is_some_and(|t| t.elapsed() < DECODING_RECENTLY);
        let piece = if decoding { self.piece } else { MAX_PIECE };
        // Pieces of long steps: the first one gets `piece` rows, later ones
        // wait (one prompt at a time keeps the decode steps' slowdown bounded).
        let mut plan: Vec<(usize, usize)> = Vec::new(); // (running index, rows)
        let mut prompt_taken = false;
        for &i in &chosen {
            let r = &self.running[i];
            let left = r.rows() - r.done;
            let adapted = self
                .sessions
                .get(&r.id)
                .is_some_and(|s| s.adapter.is_some());
            if left <= DECODE_ROWS || adapted {
                // An adapter's low-rank products are f32 matmuls, whose bits
                // depend on the number of rows: its steps run whole and
                // alone (below), exactly as they would on an idle server.
                plan.push((i, left));
            } else if !prompt_taken {
                prompt_taken = true;
                plan.push((i, left.min(piece)));
            }
        }
        // Checks that may have changed since admission (a close, a
        // rollback), and the rollback itself at a step's first piece.
        let mut failed: Vec<(usize, ExecError)> = Vec::new();
        for &(i, _) in &plan {
            let r = &self.running[i];
            let Some(s) = self.sessions.get_mut(&r.id) else {
                failed.push((
                    i,
                    ExecError::new(
                        ErrorCode::UnknownSession,
                        format!("unknown session {}", r.id),
                    ),
                ));
                continue;
            };
            if r.done == 0 {
                if r.start_pos > s.cache.len() {
                    failed.push((
                        i,
                        ExecError::new(
                            ErrorCode::Malformed,
                            format!(
                                "step starts at position {} but the session holds {}",
                                r.start_pos,
                                s.cache.len()
                            ),
                        ),
                    ));
                    continue;
                }
                if r.start_pos < s.cache.len() {
                    if let Err(e) = s.cache.rollback(r.start_pos) {
                        failed.push((i, e.into()));
                    }
                }
            }
        }
        let plan: Vec<(usize, usize)> = plan
            .into_iter()
            .filter(|(i, _)| !failed.iter().any(|(j, _)| j == i))
            .collect();
        // Groups that can share a forward.
        type Key = (usize, (usize, usize), usize);
        let mut groups: Vec<(Key, Vec<(usize, usize)>)> = Vec::new();
        for &(i, rows) in &plan {
            let s = &self.sessions[&self.running[i].id];
            // A session with an adapter is a group of its own.
            let key = (
                Arc::as_ptr(&s.span) as usize,
                s.cache.blocks(),
                s.adapter.as_ref().map_or(0, |_| i + 1),
            );
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, g)) => g.push((i, rows)),
                None => groups.push((key, vec![(i, rows)])),
            }
        }
        let began = Instant::now();
        let mut results: Vec<(usize, usize, Result<candle_core::Tensor, ExecError>)> = Vec::new();
        for (_, group) in groups {
            for (i, rows, r) in self.forward_group(&group) {
                results.push((i, rows, r));
            }
        }
        let secs = began.elapsed().as_secs_f64();
        {
            let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
            st.passes += 1;
            st.max_batch = st.max_batch.max(plan.len());
        }
        let decode_only = !plan.is_empty()
            && plan
                .iter()
                .all(|&(i, rows)| rows == self.running[i].rows() && rows <= DECODE_ROWS);
        let prompt_piece = plan
            .iter()
            .any(|&(i, _)| self.running[i].rows() > DECODE_ROWS);
        self.adapt_piece(secs, decodes > 0 && prompt_piece, decode_only);
        // Apply the results: finished steps answer, failed ones too.
        for (i, e) in failed {
            self.running[i].answer(Err(e));
        }
        let one_token_steps = plan
            .iter()
            .filter(|&&(i, rows)| rows == 1 && self.running[i].rows() == 1)
            .count();
        for (i, rows, out) in results {
            let r = &mut self.running[i];
            match out {
                Ok(t) => {
                    r.outs.push(t);
                    r.done += rows;
                    if r.done == r.rows() {
                        let out = if r.outs.len() == 1 {
                            Ok(r.outs.remove(0))
                        } else {
                            candle_core::Tensor::cat(&r.outs, 1)
                        };
                        let frame = out
                            .map_err(|e| ExecError::from(EngineError::from(e)))
                            .and_then(|o| Ok(hidden_to_frame(&o, r.dtype)?));
                        if let Some(s) = self.sessions.get_mut(&r.id) {
                            s.last_seq = r.seq;
                            // Only a step that ran keeps the session alive:
                            // malformed ones refresh nothing.
                            s.last_used = Instant::now();
                            s.stepped = true;
                        }
                        if frame.is_ok() {
                            self.stats.lock().unwrap_or_else(|p| p.into_inner()).steps += 1;
                        }
                        r.answer(frame);
                    }
                }
                Err(e) => r.answer(Err(e)),
            }
        }
        self.expected = plan
            .iter()
            .filter(|&&(i, rows)| rows <= DECODE_ROWS && rows == self.running[i].rows())
            .map(|&(i, _)| self.running[i].id)
            .collect();
        if !self.expected.is_empty() {
            self.last_decode = Some(Instant::now());
        }
        self.last_pass = secs;
        self.running.retain(|r| r.reply.is_some());
        // Decode speed of the span for one session alone: a pass of `b`
        // one-token steps gives each of them a token in `secs`, which is
        // `1 + (b - 1) / capacity` times one step alone.
        if one_token_steps > 0 && decode_only && secs > 0.0 {
            if one_token_steps == plan.len() {
                self.batch_cost.observe(one_token_steps, secs);
            }
            let alone = self.batch_cost.alone(one_token_steps, secs);
            let tps = (1.0 / alone) as f32;
            self.ema = Some(match self.ema {
                Some(e) => 0.9 * e + 0.1 * tps,
                None => tps,
            });
        }
    }

    /// One batched forward of the pieces `group` names (running index,
    /// rows), all on one span, blocks and adapter.
    fn forward_group(
        &mut self,
        group: &[(usize, usize)],
    ) -> Vec<(usize, usize, Result<candle_core::Tensor, ExecError>)> {
        let xs: Result<Vec<candle_core::Tensor>, _> = group
            .iter()
            .map(|&(i, rows)| {
                let r = &self.running[i];
                if r.done == 0 && rows == r.rows() {
                    Ok(r.x.clone())
                } else {
                    r.x.narrow(1, r.done, rows)
                }
            })
            .collect();
        let xs = match xs {
            Ok(xs) => xs,
            Err(e) => {
                let e = ExecError::from(EngineError::from(e));
                return group
                    .iter()
                    .map(|&(i, rows)| (i, rows, Err(e.clone())))
                    .collect();
            }
        };
        let ids: Vec<SessionId> = group.iter().map(|&(i, _)| self.running[i].id).collect();
        let first_pos: Vec<usize> = group
            .iter()
            .map(|&(i, _)| self.running[i].start_pos + self.running[i].done)
            .collect();
        // Take the sessions' caches out for the pass.
        let mut sessions: Vec<(SessionId, Session)> = ids
            .iter()
            .filter_map(|id| self.sessions.remove(id).map(|s| (*id, s)))
            .collect();
        let span = sessions[0].1.span.clone();
        let adapter = sessions[0].1.adapter.clone();
        let result = {
            let mut steps: Vec<BatchStep<'_>> = sessions
                .iter_mut()
                .zip(&xs)
                .zip(&first_pos)
                .map(|(((_, s), x), &pos)| BatchStep {
                    x,
                    pos,
                    cache: &mut s.cache,
                })
                .collect();
            match steps.as_mut_slice() {
                // Alone: the very path of an idle server, any length.
                [one] => span
                    .forward_with(one.x, one.pos, one.cache, adapter.as_deref())
                    .map(|o| vec![o]),
                all => span.forward_batch(all, adapter.as_deref()),
            }
        };
        for (id, s) in sessions {
            self.sessions.insert(id, s);
        }
        match result {
            Ok(outs) => group
                .iter()
                .zip(outs)
                .map(|(&(i, rows), o)| (i, rows, Ok(o)))
                .collect(),
            Err(e) if group.len() == 1 => vec![(group[0].0, group[0].1, Err(e.into()))],
            Err(_) => {
                // One bad step must not fail the others: run each alone.
                group
                    .iter()
                    .map(|&(i, rows)| {
                        let r = self.forward_group(&[(i, rows)]);
                        r.into_iter().next().unwrap_or((
                            i,
                            rows,
                            Err(ExecError::new(ErrorCode::Internal, "no result")),
                        ))
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::BatchCost;

    #[test]
    fn batch_cost_measures_what_each_further_step_adds() {
        let mut c = BatchCost::default();
        assert_eq!(c.capacity(), None);
        // Passes of several steps before any single one say nothing yet.
        c.observe(4, 0.010);
        assert_eq!(c.capacity(), None);
        assert_eq!(c.alone(4, 0.010), 0.010);
        for _ in 0..50 {
            c.observe(1, 0.004);
            c.observe(4, 0.0085); // 1.5 ms per further step
        }
        let cap = c.capacity().expect("both terms measured");
        assert!((cap - 4.0 / 1.5).abs() < 0.05, "{cap}");
        // A pass of four is 1 + 3 / capacity times one step alone.
        assert!((c.alone(4, 0.0085) - 0.004).abs() < 1e-4);
        assert_eq!(c.alone(1, 0.004), 0.004);
        // Free further steps: the most a pass runs.
        let mut free = BatchCost::default();
        free.observe(1, 0.004);
        free.observe(8, 0.003);
        assert_eq!(free.capacity(), Some(super::MAX_BATCH_STEPS as f64));
        // Steps that cost more than one alone each: at least 1.
        let mut serial = BatchCost::default();
        serial.observe(1, 0.004);
        serial.observe(3, 0.020);
        assert_eq!(serial.capacity(), Some(1.0));
        // Nonsense times are ignored.
        serial.observe(2, f64::NAN);
        serial.observe(2, -1.0);
        assert_eq!(serial.capacity(), Some(1.0));
    }
}
