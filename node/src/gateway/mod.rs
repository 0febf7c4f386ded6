//! The HTTP gateway: OpenAI- and Anthropic-compatible APIs, a live swarm dashboard and
//! Prometheus metrics, on axum.
//!
//! The gateway holds the head (token embedding, final norm, LM head) and
//! the tokenizer, and runs every API request as its own inference session:
//! over the swarm (a [`RemoteSession`](crate::client::RemoteSession) along a planned route) or, with no
//! swarm, on a whole model in this process. The HTTP layer is a thin
//! adapter: it validates a request, starts a generation job that reports
//! through a bounded channel, and turns the events into one JSON answer or a
//! stream of server-sent events.
//!
//! Routes: `GET /` (dashboard), `GET /api/swarm` (the dashboard's JSON),
//! `GET /metrics`, `GET /v1/models`, `POST /v1/chat/completions`,
//! `POST /v1/completions` (OpenAI's), `POST /v1/messages` and
//! `POST /v1/messages/count_tokens` (Anthropic's).

mod anthropic;
mod error;
mod guard;
pub mod http;
mod job;
mod launch;
mod models;
mod openai;
mod sse;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use libp2p::{Multiaddr, PeerId};
use nomoat_protocol::ServerInfo;
use nomoat_scheduler::{coverage_gaps, BlockRange};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, Instrument};

use crate::client::{ClientError, DEFAULT_STEP_TIMEOUT};
use crate::engine::{ChatTokenizer, Head, LocalModel, ModelConfig};
use crate::net::discover::{discover, merge_servers, server_addrs};
use crate::net::NetHandle;

pub use anthropic::{check_messages_body, MAX_STOP_SEQUENCES};
pub use error::{ApiError, Dialect};
pub use job::{Finish, Job, JobEvent, CLIENT_STALL_TIMEOUT, EVENT_QUEUE};
pub use launch::{
    model_name, open_model, serve_in_process, swarm_gateway, wait_covered, LaunchError,
};
pub use openai::{check_body, MAX_STOPS};

/// Default address of the API and dashboard.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
/// Default number of requests generating at once; more get a 429.
pub const DEFAULT_MAX_CONCURRENT: usize = 16;
/// Default `max_tokens` of a request that gives none (capped by the context).
pub const DEFAULT_API_MAX_TOKENS: usize = 256;
/// How often the gateway refreshes its view of the swarm.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one refresh of the swarm view may take.
pub const REFRESH_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Settings of a gateway.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The model name `/v1/models` lists and requests must name.
    pub model_name: String,
    /// Requests generating at once.
    pub max_concurrent: usize,
    /// Time a swarm step may take before the hop is reported failed.
    pub step_timeout: Duration,
    /// The dtype hidden states travel in to and from the swarm.
    pub wire_dtype: nomoat_protocol::DType,
    /// Keys a request to `/v1` must bear (`Authorization: Bearer KEY`);
    /// none: the API is open.
    pub api_keys: Vec<String>,
    /// Where LoRA adapters named as `MODEL:ADAPTER_ID` are found here; none:
    /// only adapters the swarm's servers announce (a local model then
    /// runs none).
    pub adapters: Option<AdapterSource>,
    /// How swarm sessions are spot-checked (async by default).
    pub verify: crate::client::verify::VerifyMode,
}

/// The weight store a gateway finds adapters in, and the id of the base
/// model they must be for.
#[derive(Debug, Clone)]
pub struct AdapterSource {
    /// The store.
    pub store: crate::store::ChunkStore,
    /// The base model's id, as the swarm knows it.
    pub base_id: String,
}

impl GatewayConfig {
    /// Defaults for a model name.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            step_timeout: DEFAULT_STEP_TIMEOUT,
            wire_dtype: nomoat_protocol::DType::F32,
            api_keys: Vec::new(),
            adapters: None,
            verify: crate::client::verify::VerifyMode::default(),
        }
    }

    /// Sets how swarm sessions are spot-checked.
    pub fn with_verify(mut self, mode: crate::client::verify::VerifyMode) -> Self {
        self.verify = mode;
        self
    }

    /// Sets where adapters are found (the store, and the base's id).
    pub fn with_adapters(mut self, store: crate::store::ChunkStore, base_id: String) -> Self {
        self.adapters = Some(AdapterSource { store, base_id });
        self
    }

    /// Sets the keys a request to `/v1` must bear; empty: the API is open.
    pub fn with_api_keys(mut self, keys: Vec<String>) -> Self {
        self.api_keys = keys.into_iter().filter(|k| !k.trim().is_empty()).collect();
        self
    }

    /// Sets the dtype hidden states travel in to and from the swarm.
    pub fn with_wire_dtype(mut self, dtype: nomoat_protocol::DType) -> Self {
        self.wire_dtype = dtype;
        self
    }

    /// Sets the number of requests generating at once.
    pub fn with_max_concurrent(mut self, n: usize) -> Self {
        self.max_concurrent = n.max(1);
        self
    }

    /// Sets the step timeout.
    pub fn with_step_timeout(mut self, d: Duration) -> Self {
        self.step_timeout = d;
        self
    }
}

/// Where the blocks run.
// One per gateway, held in an `Arc`: the variants' sizes cost nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Backend {
    /// The whole model in this process.
    Local(Arc<LocalModel>),
    /// The swarm; the head runs here.
    Swarm(SwarmBackend),
}

/// The swarm side of a gateway.
#[derive(Debug)]
pub struct SwarmBackend {
    net: NetHandle,
    bootstrap: Vec<Multiaddr>,
    model_id: String,
    head: Arc<Head>,
    known: Mutex<Vec<ServerInfo>>,
}

impl SwarmBackend {
    /// A swarm backend over a started network node; `bootstrap` may be
    /// empty when `net` already follows the model's announcements.
    pub fn new(
        net: NetHandle,
        bootstrap: Vec<Multiaddr>,
        model_id: String,
        head: Arc<Head>,
    ) -> Self {
        Self {
            net,
            bootstrap,
            model_id,
            head,
            known: Mutex::new(Vec::new()),
        }
    }

    /// Asks the swarm which servers are live now, remembers the answer and
    /// connects to those not connected yet (so their RTT gets measured).
    /// When the bootstrap peers do not answer, the view falls back to the
    /// announcements heard (which expire), so dead servers drop out.
    async fn refresh(&self) -> Result<Vec<ServerInfo>, ClientError> {
        let found = discover(&self.net, &self.bootstrap, &self.model_id).await;
        *self.known.lock().unwrap_or_else(|p| p.into_inner()) =
            found.as_ref().cloned().unwrap_or_default();
        let servers = found?;
        for s in &servers {
            if let Ok(peer) = PeerId::from_bytes(&s.peer_id) {
                if peer != self.net.peer_id() && self.net.connected(&peer).is_none() {
                    self.net.connect_known(peer).await;
                }
            }
        }
        Ok(servers)
    }

    /// The servers from the last refresh, plus fresher announcements.
    fn servers(&self) -> Vec<ServerInfo> {
        let mut all = self.known.lock().unwrap_or_else(|p| p.into_inner()).clone();
        all.extend(self.net.servers(&self.model_id));
        let mut all = merge_servers(all);
        all.sort_by_key(|s| (s.blocks.start, s.blocks.end));
        all
    }
}

/// What the dashboard shows of one session.
#[derive(Debug, Clone)]
struct SessionView {
    started: Instant,
    first_token: Option<Instant>,
    prompt_tokens: usize,
    generated: usize,
    route: Vec<String>,
}

#[derive(Debug)]
struct Inner {
    cfg: GatewayConfig,
    backend: Backend,
    tokenizer: ChatTokenizer,
    model: ModelConfig,
    sessions: Mutex<BTreeMap<u64, SessionView>>,
    next_session: AtomicU64,
    permits: Arc<Semaphore>,
    started: Instant,
    /// A local model's adapter parts, by adapter id (at most
    /// [`MAX_LOCAL_ADAPTERS`]).
    local_adapters: Mutex<BTreeMap<nomoat_protocol::Hash, Vec<Arc<crate::engine::SpanAdapter>>>>,
    /// Whether this gateway's store is served to the swarm (once an
    /// adapter of its own is used there).
    serving_store: std::sync::Once,
    shutdown: CancellationToken,
}

/// Most adapters a gateway on a local model keeps loaded.
pub const MAX_LOCAL_ADAPTERS: usize = 8;

/// A running gateway's state; cheap to clone (the HTTP handlers' state).
#[derive(Debug, Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

impl Gateway {
    /// A gateway over `backend`. With a swarm backend, a task refreshes the
    /// view of the swarm every [`REFRESH_INTERVAL`] until `shutdown`.
    pub fn new(
        cfg: GatewayConfig,
        backend: Backend,
        tokenizer: ChatTokenizer,
        model: ModelConfig,
        shutdown: CancellationToken,
    ) -> Self {
        let gw = Self {
            inner: Arc::new(Inner {
                permits: Arc::new(Semaphore::new(cfg.max_concurrent.max(1))),
                cfg,
                backend,
                tokenizer,
                model,
                sessions: Mutex::new(BTreeMap::new()),
                next_session: AtomicU64::new(1),
                started: Instant::now(),
                local_adapters: Mutex::new(BTreeMap::new()),
                serving_store: std::sync::Once::new(),
                shutdown: shutdown.clone(),
            }),
        };
        if let Backend::Swarm(s) = &gw.inner.backend {
            tokio::spawn(crate::client::watch_evidence(
                s.net.clone(),
                s.model_id.clone(),
                shutdown.clone(),
            ));
        }
        if matches!(gw.inner.backend, Backend::Swarm(_)) {
            let this = gw.clone();
            tokio::spawn(
                async move {
                    let mut tick = tokio::time::interval(REFRESH_INTERVAL);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            _ = tick.tick() => {}
                        }
                        if let Backend::Swarm(s) = &this.inner.backend {
                            match tokio::time::timeout(REFRESH_TIMEOUT, s.refresh()).await {
                                Ok(Ok(list)) => {
                                    debug!(servers = list.len(), "swarm view refreshed")
                                }
                                Ok(Err(e)) => debug!("swarm refresh failed: {e}"),
                                Err(_) => debug!("swarm refresh timed out"),
                            }
                        }
                    }
                }
                .instrument(tracing::info_span!("swarm_view")),
            );
        }
        gw
    }

    /// The model name requests must use.
    pub fn model_name(&self) -> &str {
        &self.inner.cfg.model_name
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.inner.tokenizer
    }

    /// Tokenizes `text` on a blocking thread: a large prompt does not stall
    /// the network runtime (its one worker also runs libp2p).
    pub async fn encode(&self, text: String) -> Result<Vec<u32>, ApiError> {
        let gw = self.clone();
        tokio::task::spawn_blocking(move || gw.inner.tokenizer.encode(&text))
            .await
            .map_err(|e| ApiError::internal(format!("tokenizing: {e}")))?
            .map_err(|e| ApiError::internal(e.to_string()))
    }

    /// The model's configuration.
    pub fn model_config(&self) -> &ModelConfig {
        &self.inner.model
    }

    /// Refreshes the swarm view now (no-op for a local model); returns the
    /// uncovered blocks.
    pub async fn refresh(&self) -> Result<Vec<BlockRange>, ClientError> {
        let n = self.inner.model.num_blocks as u32;
        match &self.inner.backend {
            Backend::Local(_) => Ok(Vec::new()),
            Backend::Swarm(s) => {
                let servers = s.refresh().await?;
                Ok(coverage_gaps(n, &ranges(&servers)))
            }
        }
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(dashboard))
            .route("/api/swarm", get(swarm_json))
            .route("/metrics", get(metrics))
            .route("/v1/models", get(models::models))
            .route("/v1/models/{id}", get(models::model))
            .route("/v1/chat/completions", post(openai::chat_completions))
            .route("/v1/completions", post(openai::completions))
            .route("/v1/messages", post(anthropic::messages))
            .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
            .fallback(not_found)
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.clone())
    }

    fn track(&self, prompt_tokens: usize, route: Vec<String>) -> SessionGuard {
        let id = self.inner.next_session.fetch_add(1, Ordering::Relaxed);
        self.sessions().insert(
            id,
            SessionView {
                started: Instant::now(),
                first_token: None,
                prompt_tokens,
                generated: 0,
                route,
            },
        );
        crate::metrics::global().sessions_opened.inc();
        crate::metrics::global().sessions_active.inc();
        SessionGuard {
            gw: self.clone(),
            id,
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SessionView>> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The dashboard's view: the swarm map, the peers and the sessions.
    pub fn swarm_view(&self) -> serde_json::Value {
        let n = self.inner.model.num_blocks as u32;
        let (mode, model_id, peers, gaps) = match &self.inner.backend {
            Backend::Local(_) => {
                let peer = serde_json::json!({
                    "peer_id": "local",
                    "addrs": [],
                    "blocks": format!("0..{n}"),
                    "start": 0,
                    "end": n,
                    "throughput": null,
                    "rtt_ms": null,
                    "load": null,
                    "active_sessions": self.sessions().len(),
                    "connection": "in-process",
                });
                ("local", String::new(), vec![peer], Vec::new())
            }
            Backend::Swarm(s) => {
                let servers = s.servers();
                let peers = servers.iter().map(|i| peer_json(&s.net, i)).collect();
                let gaps = coverage_gaps(n, &ranges(&servers));
                ("swarm", s.model_id.clone(), peers, gaps)
            }
        };
        let now = Instant::now();
        let sessions: Vec<serde_json::Value> = self
            .sessions()
            .iter()
            .map(|(id, v)| {
                let tps = v.first_token.map_or(0.0, |t| {
                    v.generated.saturating_sub(1) as f64 / (now - t).as_secs_f64().max(1e-3)
                });
                serde_json::json!({
                    "id": id,
                    "age_s": (now - v.started).as_secs_f64(),
                    "prompt_tokens": v.prompt_tokens,
                    "generated_tokens": v.generated,
                    "tokens_per_s": tps,
                    "route": v.route,
                })
            })
            .collect();
        let total_tps = sessions
            .iter()
            .filter_map(|s| s["tokens_per_s"].as_f64())
            .fold(0.0, |a, b| a + b);
        let m = crate::metrics::global();
        serde_json::json!({
            "mode": mode,
            "model": self.inner.cfg.model_name,
            "model_id": model_id,
            "num_blocks": n,
            "peers": peers,
            "gaps": gaps.iter().map(|g| serde_json::json!({"start": g.start, "end": g.end})).collect::<Vec<_>>(),
            "covered": gaps.is_empty(),
            "sessions": sessions,
            "tokens_per_s": total_tps,
            "uptime_s": self.inner.started.elapsed().as_secs_f64(),
            "totals": {
                "sessions": m.sessions_opened.get(),
                "steps": m.steps.get(),
                "generated_tokens": m.generated_tokens.get(),
                "failovers": m.failovers.get(),
            },
        })
    }
}

/// Removes a session from the dashboard's view when the job ends.
#[derive(Debug)]
struct SessionGuard {
    gw: Gateway,
    id: u64,
}

impl SessionGuard {
    fn token(&self) {
        if let Some(v) = self.gw.sessions().get_mut(&self.id) {
            v.generated += 1;
            v.first_token.get_or_insert_with(Instant::now);
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.gw.sessions().remove(&self.id);
        crate::metrics::global().sessions_active.dec();
    }
}

fn ranges(servers: &[ServerInfo]) -> Vec<BlockRange> {
    servers.iter().map(|s| s.blocks).collect()
}

fn peer_json(net: &NetHandle, s: &ServerInfo) -> serde_json::Value {
    let peer = PeerId::from_bytes(&s.peer_id).ok();
    let is_self = peer == Some(net.peer_id());
    let conn = peer.and_then(|p| net.connected(&p));
    let connection = if is_self {
        "this node".to_string()
    } else {
        match &conn {
            Some(a)
                if a.iter()
                    .any(|p| matches!(p, libp2p::multiaddr::Protocol::P2pCircuit)) =>
            {
                "relayed".to_string()
            }
            Some(_) => "direct".to_string(),
            None => "not connected".to_string(),
        }
    };
    serde_json::json!({
        "peer_id": peer.map(|p| p.to_string()).unwrap_or_default(),
        "addrs": server_addrs(s).iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "blocks": s.blocks.to_string(),
        "start": s.blocks.start,
        "end": s.blocks.end,
        "throughput": s.throughput,
        "rtt_ms": peer.and_then(|p| net.rtt(&p)).map(|d| d.as_secs_f64() * 1e3),
        "banned": peer.is_some_and(|p| net.is_banned(&p)),
        "load": s.load,
        "active_sessions": s.active_sessions,
        "batch_capacity": s.batch_capacity,
        "free_kv_tokens": s.free_kv_tokens,
        "reachability": format!("{:?}", s.reachability).to_lowercase(),
        "connection": connection,
        "connected_via": conn.map(|a| a.to_string()),
    })
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn swarm_json(State(gw): State<Gateway>) -> Response {
    axum::Json(gw.swarm_view()).into_response()
}

async fn metrics() -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::global().render(),
    )
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::not_found(format!(
        "no route {uri}: the API is under /v1 (models, chat/completions, completions, messages)"
    ))
    .respond(Dialect::of(uri.path()))
}

/// Serves the gateway on `listener` until `shutdown`.
pub async fn serve(
    gw: Gateway,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let bound = listener.local_addr()?;
    let guard = guard::Guard::new(&gw.inner.cfg.api_keys, bound);
    let app = gw
        .router()
        .layer(axum::middleware::from_fn(read_body_in_time))
        .layer(axum::middleware::from_fn_with_state(guard, guard::guard));
    // hyper directly rather than `axum::serve`, for a header read timeout
    // (slowloris) and a cap on connections.
    let service = hyper_util::service::TowerToHyperService::new(app);
    let connections = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    http.http2().timer(hyper_util::rt::TokioTimer::new());
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        let (tcp, from) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: wait rather than spin.
                tracing::warn!("accepting an API connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%from, "{MAX_HTTP_CONNECTIONS} API connections open: refusing one");
            drop(tcp);
            continue;
        };
        // Unsent bytes wait in the kernel only up to SEND_LOWAT, so a
        // client that stops reading blocks its stream's writes (and then
        // its generation, see CLIENT_STALL_TIMEOUT) after kilobytes, not
        // after megabytes of autotuned send buffer.
        #[cfg(target_os = "linux")]
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_notsent_lowat(SEND_LOWAT) {
            tracing::debug!(%from, "TCP_NOTSENT_LOWAT: {e}");
        }
        let conn =
            http.serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service.clone());
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(%from, "API connection: {e}");
            }
        });
    }
    // Requests in flight finish (bounded: a stalled client's generation
    // gives up after its stall timeout).
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    Ok(())
}

/// Most unsent bytes an API socket queues in the kernel (Linux's
/// `TCP_NOTSENT_LOWAT`); bytes in flight are bounded by the client's
/// receive window.
pub const SEND_LOWAT: u32 = 16 * 1024;

/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to send a request's body.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// API connections open at once; more are closed at once.
pub const MAX_HTTP_CONNECTIONS: usize = 512;

/// Reads the whole body (at most [`MAX_BODY_BYTES`]) within
/// [`BODY_READ_TIMEOUT`], so a client that sends it slowly holds nothing for
/// long: 408 past the time, 413 past the size.
async fn read_body_in_time(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let dialect = Dialect::of(req.uri().path());
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, MAX_BODY_BYTES);
    let bytes = match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return ApiError::too_large(format!(
                "the request body is over {MAX_BODY_BYTES} bytes, or was cut off"
            ))
            .respond(dialect)
        }
        Err(_) => {
            return ApiError::timeout(format!(
                "the request body did not arrive within {BODY_READ_TIMEOUT:?}"
            ))
            .respond(dialect)
        }
    };
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Binds `addr` (port 0 picks a free port) and returns the listener and
/// the bound address.
pub async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), ApiBindError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ApiBindError { addr, source: e })?;
    let local = listener
        .local_addr()
        .map_err(|e| ApiBindError { addr, source: e })?;
    Ok((listener, local))
}

/// The API address could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}; pick another address with --api (or --port), e.g. 127.0.0.1:0 for any free port")]
pub struct ApiBindError {
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: std::io::Error,
}
