//! Spot checks: a share of each hop's work re-run on other servers, from
//! the inputs and output copies the client keeps anyway.
//!
//! For a hop chosen for checking (at its peer's check rate, see
//! [`nomoat_scheduler::Reputation`]), a *shadow* session opens on a chain
//! of other servers covering the hop's blocks. Every [`VerifyOptions::window`]
//! positions the hop's new inputs go to the shadow, cut into the steps the
//! hop got them in (a prompt as one step, then single tokens: a batch and a
//! single row take different kernels, whose rounding differs by up to a few
//! percent of a row's largest value, while the same steps give the same
//! bits), and the shadow's outputs are compared with the hop's row by row
//! ([`row_error`]). Every position of a checked hop is re-run, so a lie
//! cannot hide by being rare or by starting late; which hops are checked is
//! drawn per session, so a server cannot tell a checked session from
//! another.
//!
//! A disagreement is settled by a third computation, on a chain that
//! shares no peer with the hop or the first shadow, fed the whole prefix:
//! when it sides with the shadow, the hop's lie is proven (two independent
//! recomputations agree against it) and the peer is banned; when it sides
//! with the hop, the shadow's chain is the liar; when no such chain exists,
//! both sides get a strike and nobody is banned.

use std::collections::HashMap;
use std::time::Duration;

use libp2p::PeerId;
use nomoat_protocol::{BlockRange, TensorFrame};
use tokio::sync::mpsc;

use super::history::{chunks, history_end, rows, truncate_history};
use super::RemoteSession;
use crate::net::NetHandle;

/// How the client checks the swarm's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum VerifyMode {
    /// No checks.
    Off,
    /// Tokens go out as they are made; checks run beside the generation,
    /// and a proven lie rewinds it to the first wrong position (the sink
    /// is told to drop what came after).
    #[default]
    Async,
    /// Every hop is checked, and a token goes out only once every hop's
    /// output that led to it agreed with a recomputation.
    Strict,
}

impl std::fmt::Display for VerifyMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifyMode::Off => "off",
            VerifyMode::Async => "async",
            VerifyMode::Strict => "strict",
        })
    }
}

/// Positions a checked hop runs between two shadow steps.
pub const DEFAULT_WINDOW: u32 = 16;
/// The largest error [`row_error`] allows an honest row: honest servers
/// replaying the same steps differ at most by float rounding and the wire
/// dtype's (q8: 1/254 of a block's largest value each way).
pub const DEFAULT_TOLERANCE: f32 = 0.02;
/// Times a hop's shadow is started again after one ended without a
/// verdict (its chain failed, or it had to make way after its chain lied).
pub const MAX_SHADOW_RESTARTS: u32 = 3;
/// How long the end of a generation waits for its checks.
pub const CHECK_WAIT: Duration = Duration::from_secs(60);

/// The client's checking policy.
#[derive(Debug, Clone, Copy)]
pub struct VerifyOptions {
    /// Off, async or strict.
    pub mode: VerifyMode,
    /// Positions between two shadow steps (1 in strict mode).
    pub window: u32,
    /// See [`DEFAULT_TOLERANCE`].
    pub tolerance: f32,
    /// Checks every hop at this rate instead of its peer's (benchmarks).
    pub fixed_rate: Option<f64>,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self::new(VerifyMode::default())
    }
}

impl VerifyOptions {
    /// The defaults of `mode`.
    pub fn new(mode: VerifyMode) -> Self {
        Self {
            mode,
            window: if mode == VerifyMode::Strict {
                1
            } else {
                DEFAULT_WINDOW
            },
            tolerance: DEFAULT_TOLERANCE,
            fixed_rate: None,
        }
    }
}

/// How far a claimed row is from a recomputed one: the largest difference
/// of an element, over the largest magnitude of its 32-element block in
/// the recomputation (the scale q8 rounds to), or over a thousandth of the
/// row's RMS where that is larger. A non-finite claimed element is
/// infinitely far.
pub fn row_error(claimed: &[f32], truth: &[f32]) -> f32 {
    if claimed.len() != truth.len() {
        return f32::INFINITY;
    }
    let n = truth.len().max(1) as f32;
    let rms = (truth.iter().map(|v| v * v).sum::<f32>() / n).sqrt();
    let floor = 1e-3 * rms + 1e-6;
    let mut worst = 0f32;
    for (c, t) in claimed.chunks(32).zip(truth.chunks(32)) {
        let scale = t.iter().fold(0f32, |m, v| m.max(v.abs())).max(floor);
        for (a, b) in c.iter().zip(t) {
            if !a.is_finite() {
                return f32::INFINITY;
            }
            worst = worst.max((a - b).abs() / scale);
        }
    }
    worst
}

/// The first row (from `skip`) where `claimed` is past `tolerance` from
/// `truth`, with its error.
pub fn first_mismatch(
    claimed: &TensorFrame,
    truth: &TensorFrame,
    skip: usize,
    tolerance: f32,
) -> Option<(usize, f32)> {
    if claimed.shape() != truth.shape() {
        return Some((skip, f32::INFINITY));
    }
    let width = claimed.shape().get(1).copied().unwrap_or(1).max(1);
    let (c, t) = (claimed.to_f32(), truth.to_f32());
    c.chunks(width)
        .zip(t.chunks(width))
        .enumerate()
        .skip(skip)
        .map(|(i, (a, b))| (i, row_error(a, b)))
        .find(|(_, e)| e.is_nan() || *e > tolerance)
}

/// A hop as checks know it: its peer and blocks.
pub type HopKey = (PeerId, BlockRange);

/// What a check found.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The hop's outputs below `end` agreed with the recomputation.
    Agree {
        /// The hop.
        key: HopKey,
        /// Positions checked, from its first.
        end: u32,
    },
    /// Two independent recomputations agree against the hop's output at
    /// `pos`: the peer lied.
    Lie {
        /// The hop.
        key: HopKey,
        /// Its first wrong position.
        pos: u32,
        /// How far off it was ([`row_error`]).
        error: f32,
    },
    /// The hop was right and the first recomputation's chain was not.
    VerifierLied {
        /// The hop checked.
        key: HopKey,
        /// The chain that computed wrong.
        peers: Vec<PeerId>,
    },
    /// The hop and the recomputation disagree at `pos`, and no third
    /// chain could settle it.
    Unresolved {
        /// The hop.
        key: HopKey,
        /// The first position they disagree on.
        pos: u32,
        /// The recomputation's chain.
        peers: Vec<PeerId>,
    },
    /// The check could not run (no other server holds the blocks, or the
    /// shadow failed); nothing is known.
    Inconclusive {
        /// The hop.
        key: HopKey,
        /// Why.
        reason: String,
    },
}

/// A proven or suspected lie the session acted on: the generation must
/// go back to `pos`.
#[derive(Debug, Clone)]
pub struct Detected {
    /// The first position whose output was wrong (or in dispute).
    pub pos: u32,
    /// The peer whose output it was.
    pub peer: PeerId,
    /// Whether the lie was proven (the peer is banned) or only disputed.
    pub proven: bool,
    /// The blocks the peer ran.
    pub blocks: BlockRange,
}

/// One shadow step: the hop's inputs and outputs for `start..`, compared
/// from `compare_from` on.
#[derive(Debug)]
struct Job {
    /// Names the job's verdict: one that comes after its job was given up
    /// (a rewind) is ignored.
    ticket: u64,
    start: u32,
    /// The hop's inputs from `start`, cut into the steps it got them in.
    steps: Vec<(u32, TensorFrame)>,
    claimed: TensorFrame,
    compare_from: u32,
}

#[derive(Debug)]
struct Shadow {
    jobs: mpsc::Sender<Job>,
    /// Positions sent so far.
    fed: u32,
}

/// What the checks of one session know and run.
#[derive(Debug)]
pub(crate) struct Checks {
    opts: VerifyOptions,
    /// Per hop: its shadow, or `None` when the draw left it unchecked.
    shadows: HashMap<HopKey, Option<Shadow>>,
    /// Per checked hop, positions verified so far.
    verified: HashMap<HopKey, u32>,
    verdicts_tx: mpsc::Sender<(u64, Verdict)>,
    verdicts: mpsc::Receiver<(u64, Verdict)>,
    /// Tickets of the jobs sent whose verdict has not come, with the hop
    /// each checks.
    pending: HashMap<u64, HopKey>,
    /// Shadows started again per hop after one ended without a verdict
    /// (bounded by [`MAX_SHADOW_RESTARTS`]).
    restarts: HashMap<HopKey, u32>,
    next_ticket: u64,
    /// Positions sent to shadows, all hops together (the checks' cost).
    pub(crate) shadow_positions: u64,
    /// Why the last check that could not run could not.
    trouble: Option<String>,
    agreed_rows: u64,
    disagreements: u64,
    /// Both sides of every unsettled dispute: no shadow of this session
    /// runs on them again.
    disputed: Vec<PeerId>,
}

impl Checks {
    pub(crate) fn new(opts: VerifyOptions) -> Self {
        let (verdicts_tx, verdicts) = mpsc::channel(64);
        Self {
            opts,
            shadows: HashMap::new(),
            verified: HashMap::new(),
            verdicts_tx,
            verdicts,
            pending: HashMap::new(),
            restarts: HashMap::new(),
            next_ticket: 0,
            shadow_positions: 0,
            trouble: None,
            agreed_rows: 0,
            disagreements: 0,
            disputed: Vec::new(),
        }
    }
}

/// What checks of a session found so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckSummary {
    /// Hops of the route now that are checked.
    pub checked_hops: usize,
    /// Hops of the route now.
    pub hops: usize,
    /// Positions every hop of the route has had checked; 0 when some hop
    /// is unchecked.
    pub verified: u32,
    /// Positions the shadows ran, all hops together.
    pub shadow_positions: u64,
    /// Hop outputs (rows) a recomputation agreed with.
    pub agreed_rows: u64,
    /// Checks that found a disagreement (proven or not).
    pub disagreements: u64,
}

impl RemoteSession {
    /// Turns on spot checks for the rest of the session.
    pub fn set_verify(&mut self, opts: VerifyOptions) {
        self.checks = (opts.mode != VerifyMode::Off).then(|| Checks::new(opts));
    }

    /// The checking policy, if checks are on.
    pub fn verify_options(&self) -> Option<VerifyOptions> {
        self.checks.as_ref().map(|c| c.opts)
    }

    /// Why the last check that could not run could not.
    pub fn check_trouble(&self) -> Option<String> {
        self.checks.as_ref().and_then(|c| c.trouble.clone())
    }

    /// What the checks found so far.
    pub fn check_summary(&self) -> CheckSummary {
        let Some(c) = &self.checks else {
            return CheckSummary {
                hops: self.hops.len(),
                ..Default::default()
            };
        };
        let keys: Vec<HopKey> = self.hops.iter().map(|h| (h.peer, h.blocks)).collect();
        let checked = keys
            .iter()
            .filter(|k| c.shadows.get(k).is_some_and(Option::is_some))
            .count();
        let verified = keys
            .iter()
            .map(|k| c.verified.get(k).copied().unwrap_or(0))
            .min()
            .unwrap_or(0);
        CheckSummary {
            checked_hops: checked,
            hops: keys.len(),
            verified: if checked == keys.len() { verified } else { 0 },
            shadow_positions: c.shadow_positions,
            agreed_rows: c.agreed_rows,
            disagreements: c.disagreements,
        }
    }

    /// Sends each checked hop's new positions to its shadow once a window
    /// of them (or, with `all`, any) has gathered. Hops met for the first
    /// time are drawn for checking at their peer's rate (every hop in
    /// strict mode).
    pub(crate) fn feed_checks(&mut self, all: bool) {
        let Some(mut c) = self.checks.take() else {
            return;
        };
        let last = self.hops.len() - 1;
        for (i, h) in self.hops.iter().enumerate() {
            let key = (h.peer, h.blocks);
            if !c.shadows.contains_key(&key) {
                let rate = c
                    .opts
                    .fixed_rate
                    .unwrap_or_else(|| self.net.check_rate(&h.peer));
                let check = c.opts.mode == VerifyMode::Strict || rate > rand::random::<f64>();
                let shadow = check.then(|| Shadow {
                    jobs: spawn_shadow(self, key, &c, c.verdicts_tx.clone()),
                    fed: 0,
                });
                c.shadows.insert(key, shadow);
            }
            let Some(Some(shadow)) = c.shadows.get_mut(&key) else {
                continue;
            };
            let outputs = if i == last {
                &self.outputs
            } else {
                &self.history[i + 1]
            };
            let end = history_end(&self.history[i]).min(history_end(outputs));
            if end <= shadow.fed || (!all && end - shadow.fed < c.opts.window) {
                continue;
            }
            let steps = chunks(&self.history[i], shadow.fed, end);
            let Some(claimed) = rows(outputs, shadow.fed, end) else {
                continue;
            };
            c.next_ticket += 1;
            let ticket = c.next_ticket;
            let job = Job {
                ticket,
                start: shadow.fed,
                steps,
                claimed,
                compare_from: h.joined,
            };
            if shadow.jobs.try_send(job).is_ok() {
                c.shadow_positions += u64::from(end - shadow.fed);
                shadow.fed = end;
                c.pending.insert(ticket, key);
            }
        }
        self.checks = Some(c);
    }

    /// Takes the verdicts that have come (with `wait`, every outstanding
    /// one, up to [`CHECK_WAIT`]), records them in the reputations, and
    /// acts on the first lie: the liar is banned (or, when unproven,
    /// struck), every history is cut back to its first wrong position and
    /// its hop is replaced. The caller then resumes the generation from
    /// the returned position.
    ///
    /// # Errors
    ///
    /// As failover: no server could take the liar's place.
    pub(crate) async fn take_verdicts(
        &mut self,
        wait: bool,
    ) -> Result<Option<Detected>, super::ClientError> {
        let mut rounds = 0;
        loop {
            let found = self.take_verdicts_once(wait).await?;
            rounds += 1;
            if found.is_some() || !wait || rounds > MAX_SHADOW_RESTARTS as usize {
                return Ok(found);
            }
            // Shadows started again while waiting have been fed nothing.
            self.feed_checks(true);
            if self.checks.as_ref().is_none_or(|c| c.pending.is_empty()) {
                return Ok(None);
            }
        }
    }

    async fn take_verdicts_once(
        &mut self,
        wait: bool,
    ) -> Result<Option<Detected>, super::ClientError> {
        let Some(mut c) = self.checks.take() else {
            return Ok(None);
        };
        let deadline = tokio::time::Instant::now() + CHECK_WAIT;
        let mut found = None;
        while !c.pending.is_empty() && found.is_none() {
            let v = if wait {
                match tokio::time::timeout_at(deadline, c.verdicts.recv()).await {
                    Ok(Some(v)) => v,
                    _ => {
                        tracing::warn!(
                            "{} spot checks did not finish within {CHECK_WAIT:?}",
                            c.pending.len()
                        );
                        break;
                    }
                }
            } else {
                match c.verdicts.try_recv() {
                    Ok(v) => v,
                    Err(_) => break,
                }
            };
            let (ticket, v) = v;
            if c.pending.remove(&ticket).is_none() {
                continue; // a job given up at a rewind
            }
            found = self.record_verdict(&mut c, v);
        }
        let detected = match found {
            Some(d) => {
                // The jobs in flight are given up: every shadow is fed
                // again from what it had verified (at most the rewind).
                for v in c.verified.values_mut() {
                    *v = (*v).min(d.pos);
                }
                for (key, s) in c.shadows.iter_mut() {
                    if let Some(s) = s {
                        s.fed = c.verified.get(key).copied().unwrap_or(0);
                    }
                }
                c.pending.clear();
                while c.verdicts.try_recv().is_ok() {}
                Some(d)
            }
            None => None,
        };
        self.checks = Some(c);
        if let Some(d) = &detected {
            if d.proven {
                // Before the rewind cuts the histories it is built from.
                match self.evidence(d.peer, d.blocks, d.pos) {
                    Ok(e) => self.net.publish_evidence(&self.model_id, &e).await,
                    Err(why) => tracing::info!("the lie of {} is not published: {why}", d.peer),
                }
            }
            self.rewind_after_lie(d).await?;
        }
        Ok(detected)
    }

    /// Evidence that hop `(peer, blocks)` lied at `pos`: its receipt of the
    /// step, the step's inputs from position 0 as the hop got them, and the
    /// output it signed.
    ///
    /// # Errors
    ///
    /// Why none can be built: the hop's receipt is gone, its inputs were
    /// rewound (a recomputation could not repeat them exactly), or it is
    /// too large to gossip.
    pub fn evidence(
        &self,
        peer: PeerId,
        blocks: BlockRange,
        pos: u32,
    ) -> Result<nomoat_protocol::Evidence, String> {
        let i = self
            .hops
            .iter()
            .position(|h| h.peer == peer && h.blocks == blocks)
            .ok_or("the hop has left the route")?;
        let receipt = self
            .receipt_at(self.hops[i].conn, pos)
            .ok_or("no receipt of the step is kept")?
            .clone();
        let start = receipt.body.start_pos;
        let steps: Vec<(u32, TensorFrame)> = self.history[i]
            .iter()
            .take_while(|(s, _)| *s <= start)
            .cloned()
            .collect();
        let outputs = if i + 1 == self.hops.len() {
            &self.outputs
        } else {
            &self.history[i + 1]
        };
        let output = outputs
            .iter()
            .find(|(s, _)| *s == start)
            .map(|(_, f)| f.clone())
            .ok_or("the step's output is not kept")?;
        let e = nomoat_protocol::Evidence {
            receipt,
            steps,
            output,
            position: pos,
        };
        e.check().map_err(|e| e.to_string())?;
        let len = e.encode().len();
        if len > nomoat_protocol::MAX_EVIDENCE_BYTES {
            return Err(format!(
                "it would take {len} bytes, more than a gossip message holds"
            ));
        }
        Ok(e)
    }

    fn record_verdict(&mut self, c: &mut Checks, v: Verdict) -> Option<Detected> {
        match v {
            Verdict::Agree { key, end } => {
                self.net.check_passed(&key.0);
                let e = c.verified.entry(key).or_default();
                c.agreed_rows += u64::from(end.saturating_sub(*e));
                *e = (*e).max(end);
                None
            }
            Verdict::Lie { key, pos, error } => {
                c.disagreements += 1;
                tracing::warn!(
                    "spot check: {} (blocks {}) lied at position {pos} (error {error:.3}); banned",
                    key.0,
                    key.1
                );
                self.net.ban(key.0);
                c.shadows.remove(&key);
                Some(Detected {
                    pos,
                    peer: key.0,
                    proven: true,
                    blocks: key.1,
                })
            }
            Verdict::VerifierLied { key, peers } => {
                c.disagreements += 1;
                self.net.check_passed(&key.0);
                match peers.as_slice() {
                    [one] => self.net.ban(*one),
                    many => many.iter().for_each(|p| self.net.check_struck(p)),
                }
                // The hop stays checked, by a new shadow from its first
                // position.
                self.restart_shadow(c, key);
                None
            }
            Verdict::Unresolved { key, pos, peers } => {
                c.disagreements += 1;
                tracing::warn!(
                    "spot check: {} (blocks {}) and a recomputation on {peers:?} disagree from position {pos}, and no third chain could settle it",
                    key.0,
                    key.1
                );
                self.net.check_struck(&key.0);
                for p in &peers {
                    self.net.check_struck(p);
                }
                c.disputed.push(key.0);
                c.disputed.extend(peers);
                c.shadows.remove(&key);
                Some(Detected {
                    pos,
                    peer: key.0,
                    proven: false,
                    blocks: key.1,
                })
            }
            Verdict::Inconclusive { key, reason } => {
                tracing::debug!("spot check of {} (blocks {}): {reason}", key.0, key.1);
                c.trouble = Some(format!("blocks {}: {reason}", key.1));
                // The positions it had taken would go unchecked.
                self.restart_shadow(c, key);
                None
            }
        }
    }

    /// Replaces hop `key`'s shadow by a new one, fed from position 0 (its
    /// chain holds nothing yet), up to [`MAX_SHADOW_RESTARTS`] times; then
    /// the hop stays unchecked. The old shadow's jobs still out are given
    /// up.
    fn restart_shadow(&self, c: &mut Checks, key: HopKey) {
        c.pending.retain(|_, k| *k != key);
        let restarts = c.restarts.entry(key).or_default();
        *restarts += 1;
        let on_route = self.hops.iter().any(|h| (h.peer, h.blocks) == key);
        let shadow = (on_route && *restarts <= MAX_SHADOW_RESTARTS).then(|| Shadow {
            jobs: spawn_shadow(self, key, c, c.verdicts_tx.clone()),
            fed: 0,
        });
        c.shadows.insert(key, shadow);
    }

    /// Cuts every history back to `d.pos` and moves the session off the
    /// peer whose output there was wrong.
    async fn rewind_after_lie(&mut self, d: &Detected) -> Result<(), super::ClientError> {
        for h in &mut self.history {
            truncate_history(h, d.pos);
        }
        truncate_history(&mut self.outputs, d.pos);
        let Some(hop) = self.hops.iter().position(|h| h.peer == d.peer) else {
            return Ok(());
        };
        let cause = super::ClientError::Hop {
            hop,
            peer: d.peer,
            blocks: self.hops[hop].blocks,
            code: None,
            message: if d.proven {
                "its output disagreed with two independent recomputations".into()
            } else {
                "its output disagreed with a recomputation".into()
            },
        };
        // A server outside every dispute of the session takes over when
        // one can: the other side of an unsettled dispute is as likely to
        // be the liar, and no shadow of this session checks it any more.
        let base = self.avoid.clone();
        if let Some(c) = &self.checks {
            let disputed = c.disputed.iter().filter(|p| !base.contains(p));
            self.avoid.extend(disputed.copied().collect::<Vec<_>>());
        }
        let mut moved = self.failover(&cause, d.pos).await;
        if moved.is_err() && self.avoid.len() > base.len() {
            self.avoid = base.clone();
            moved = self.failover(&cause, d.pos).await;
        }
        self.avoid = base;
        match moved {
            Ok(report) => {
                crate::metrics::global().failovers.inc();
                self.failovers.push(report);
                Ok(())
            }
            // Unproven, and nobody else can take over: the hop stays, and
            // the positions in dispute are computed again on it.
            Err(e) if !d.proven => {
                tracing::warn!("no other server can take over the disputed hop ({e}); it stays");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// Starts the shadow of hop `key` of `session`; returns its job queue.
fn spawn_shadow(
    session: &RemoteSession,
    key: HopKey,
    checks: &Checks,
    verdicts: mpsc::Sender<(u64, Verdict)>,
) -> mpsc::Sender<Job> {
    let mut avoid = vec![key.0];
    avoid.extend(checks.disputed.iter().copied());
    let (tx, rx) = mpsc::channel(256);
    let ctx = ShadowCtx {
        net: session.net.clone(),
        model_id: session.model_id.clone(),
        max_length: session.max_length,
        adapter: session.adapter,
        step_timeout: session.step_timeout,
        key,
        tolerance: checks.opts.tolerance,
        ask: session.hops.iter().map(|h| h.peer).collect(),
        avoid,
    };
    tokio::spawn(async move { ctx.run(rx, verdicts).await });
    tx
}

struct ShadowCtx {
    net: NetHandle,
    model_id: String,
    max_length: u32,
    adapter: Option<nomoat_protocol::Hash>,
    step_timeout: Duration,
    key: HopKey,
    tolerance: f32,
    /// Peers to ask for the model's servers (the session's hops).
    ask: Vec<PeerId>,
    /// Peers the shadow must not run on: the hop, and disputed peers.
    avoid: Vec<PeerId>,
}

impl ShadowCtx {
    async fn run(self, mut jobs: mpsc::Receiver<Job>, verdicts: mpsc::Sender<(u64, Verdict)>) {
        let key = self.key;
        let mut inputs: Vec<(u32, TensorFrame)> = Vec::new();
        let mut session: Option<RemoteSession> = None;
        while let Some(job) = jobs.recv().await {
            truncate_history(&mut inputs, job.start);
            inputs.extend(job.steps.iter().cloned());
            let verdict = match self.step(&mut session, &job).await {
                Err(reason) => Verdict::Inconclusive { key, reason },
                Ok(truth) => {
                    let skip = job.compare_from.saturating_sub(job.start) as usize;
                    match first_mismatch(&job.claimed, &truth, skip, self.tolerance) {
                        None => Verdict::Agree {
                            key,
                            end: job.start + rows_of(&job.claimed),
                        },
                        Some((row, error)) => {
                            let peers: Vec<PeerId> = session
                                .as_ref()
                                .map(|s| s.route().iter().map(|(p, _)| *p).collect())
                                .unwrap_or_default();
                            self.settle(&inputs, &job, &truth, row, error, peers).await
                        }
                    }
                }
            };
            let done = !matches!(verdict, Verdict::Agree { .. });
            if verdicts.send((job.ticket, verdict)).await.is_err() || done {
                break;
            }
        }
        // Every job sent gets a verdict, so the session's count of those
        // it waits for stays true.
        jobs.close();
        while let Ok(job) = jobs.try_recv() {
            let reason = "the shadow had ended".to_string();
            let v = Verdict::Inconclusive { key, reason };
            if verdicts.send((job.ticket, v)).await.is_err() {
                break;
            }
        }
        if let Some(s) = session {
            s.close().await;
        }
    }

    /// Opens a chain over the hop's blocks that avoids `avoid`.
    async fn open_chain(&self, avoid: &[PeerId]) -> Result<RemoteSession, String> {
        let mut servers = self.net.servers(&self.model_id);
        // The session's hops first, then any peer this node is connected
        // to (a bootstrap peer); peers the chain must avoid last: answers
        // hold only what servers signed, so even they cannot plant one.
        let connected = self.net.connected_peers().into_iter().map(|(p, _)| p);
        let mut ask: Vec<PeerId> = self.ask.iter().copied().chain(connected).collect();
        let mut seen = std::collections::HashSet::new();
        ask.retain(|p| seen.insert(*p));
        ask.sort_by_key(|p| avoid.contains(p));
        for peer in ask.iter().take(4) {
            let asked = crate::net::discover::query_servers(&self.net, *peer, &self.model_id);
            if let Ok(list) = asked.await {
                servers.extend(list);
                break;
            }
        }
        let mut servers = crate::net::discover::merge_servers(servers);
        crate::net::discover::learn_addresses(&self.net, &servers).await;
        servers.retain(|s| {
            PeerId::from_bytes(&s.peer_id)
                .is_ok_and(|p| !avoid.contains(&p) && p != self.net.peer_id())
        });
        let (a, b) = (self.key.1.start, self.key.1.end);
        // As few peers as possible: one server holding every block when
        // there is one, so that a disagreement leaves the most peers for
        // the chain that settles it (it must share none with either side).
        let whole: Vec<_> = servers
            .iter()
            .filter(|s| s.blocks.start <= a && b <= s.blocks.end)
            .cloned()
            .collect();
        let route =
            super::plan::plan_range(&self.net, &self.model_id, a, b, &whole, self.max_length)
                .or_else(|_| {
                    super::plan::plan_range(
                        &self.net,
                        &self.model_id,
                        a,
                        b,
                        &servers,
                        self.max_length,
                    )
                })
                .map_err(|e| format!("no other chain runs blocks {}: {e}", self.key.1))?;
        let mut s = RemoteSession::open_with(
            &self.net,
            &self.model_id,
            route,
            self.max_length,
            self.step_timeout,
            self.adapter,
        )
        .await
        .map_err(|e| e.to_string())?;
        s.avoid = avoid.to_vec();
        Ok(s)
    }

    /// Runs a job on the shadow (opened at the first job): the hop's steps
    /// replayed as they came, their outputs joined.
    async fn step(
        &self,
        session: &mut Option<RemoteSession>,
        job: &Job,
    ) -> Result<TensorFrame, String> {
        if session.is_none() {
            *session = Some(self.open_chain(&self.avoid).await?);
        }
        let s = session.as_mut().expect("opened");
        replay(s, &job.steps).await
    }

    /// The hop and the shadow disagree at `row` of `job`: a third chain,
    /// sharing no peer with either, is fed the whole prefix and decides.
    async fn settle(
        &self,
        inputs: &[(u32, TensorFrame)],
        job: &Job,
        truth: &TensorFrame,
        row: usize,
        error: f32,
        shadow_peers: Vec<PeerId>,
    ) -> Verdict {
        let key = self.key;
        let pos = job.start + row as u32;
        let mut avoid = shadow_peers.clone();
        avoid.extend(self.avoid.iter().copied());
        let unresolved = Verdict::Unresolved {
            key,
            pos,
            peers: shadow_peers.clone(),
        };
        let Ok(mut third) = self.open_chain(&avoid).await else {
            return unresolved;
        };
        let end = job.start + rows_of(&job.claimed);
        let replayed = replay(&mut third, &chunks(inputs, 0, end)).await;
        third.close().await;
        let Ok(all) = replayed else { return unresolved };
        let (r, n) = ((pos - job.start) as usize, (end - pos) as usize);
        let (Some(third_rows), Some(claimed), Some(shadow)) = (
            all.narrow_rows(pos as usize, n),
            job.claimed.narrow_rows(r, n),
            truth.narrow_rows(r, n),
        ) else {
            return unresolved;
        };
        let sides_with_shadow = first_mismatch(&shadow, &third_rows, 0, self.tolerance).is_none();
        let sides_with_hop = first_mismatch(&claimed, &third_rows, 0, self.tolerance).is_none();
        match (sides_with_shadow, sides_with_hop) {
            (true, false) => Verdict::Lie { key, pos, error },
            (false, true) => Verdict::VerifierLied {
                key,
                peers: shadow_peers,
            },
            _ => unresolved,
        }
    }
}

/// What re-checking a piece of evidence found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recheck {
    /// Two recomputations on chains this node chose, sharing no peer with
    /// the accused, the accuser or each other, agree against the output
    /// the accused signed: it is banned here.
    Proven {
        /// The peer that lied.
        accused: PeerId,
    },
    /// A recomputation agreed with the signed output: the accusation was
    /// false, and nothing changes.
    Refuted {
        /// The peer accused.
        accused: PeerId,
    },
    /// Nothing could be decided (no independent chain, a failure), and
    /// nothing changes.
    Undecided {
        /// The peer accused.
        accused: PeerId,
        /// Why.
        reason: String,
    },
}

/// How long one re-check of evidence may take.
pub const RECHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Re-checks evidence from `accuser` by recomputing its steps on servers
/// of this node's choosing (never the accused's nor the accuser's), with
/// the same settling rule as a spot check; bans the accused when the lie
/// is proven. An accusation alone changes nothing.
pub async fn recheck(
    net: &NetHandle,
    accuser: PeerId,
    evidence: &nomoat_protocol::Evidence,
) -> Recheck {
    let accused = match crate::net::signed::verify_receipt(&evidence.receipt) {
        Ok(p) => p,
        Err(reason) => {
            return Recheck::Undecided {
                accused: accuser,
                reason,
            }
        }
    };
    let undecided = |reason: String| Recheck::Undecided { accused, reason };
    if let Err(e) = evidence.check() {
        return undecided(e.to_string());
    }
    if net.is_banned(&accused) {
        return Recheck::Proven { accused };
    }
    let body = &evidence.receipt.body;
    let end = body.start_pos + body.rows;
    let ctx = ShadowCtx {
        net: net.clone(),
        model_id: body.model_id.clone(),
        max_length: end.max(1),
        adapter: body.adapter,
        step_timeout: Duration::from_secs(30),
        key: (accused, body.blocks),
        tolerance: DEFAULT_TOLERANCE,
        ask: Vec::new(),
        avoid: vec![accused, accuser],
    };
    let run = async {
        let mut chain = ctx.open_chain(&ctx.avoid).await?;
        let peers: Vec<PeerId> = chain.route().iter().map(|(p, _)| *p).collect();
        let all = replay(&mut chain, &evidence.steps).await;
        chain.close().await;
        let truth = all?
            .narrow_rows(body.start_pos as usize, body.rows as usize)
            .ok_or("the recomputation is short")?;
        Ok::<_, String>((truth, peers))
    };
    let (truth, peers) = match run.await {
        Ok(t) => t,
        Err(reason) => return undecided(reason),
    };
    let Some((row, error)) = first_mismatch(&evidence.output, &truth, 0, ctx.tolerance) else {
        return Recheck::Refuted { accused };
    };
    let job = Job {
        ticket: 0,
        start: body.start_pos,
        steps: Vec::new(),
        claimed: evidence.output.clone(),
        compare_from: body.start_pos,
    };
    match ctx
        .settle(&evidence.steps, &job, &truth, row, error, peers)
        .await
    {
        Verdict::Lie { .. } => {
            net.ban(accused);
            Recheck::Proven { accused }
        }
        Verdict::VerifierLied { .. } => Recheck::Refuted { accused },
        _ => undecided("the recomputations disagree, and no third chain could settle it".into()),
    }
}

/// Re-checks the evidence this node hears about `model_id`'s servers
/// (see [`recheck`]) until `shutdown`, one piece at a time.
pub async fn watch_evidence(
    net: NetHandle,
    model_id: String,
    shutdown: tokio_util::sync::CancellationToken,
) {
    net.subscribe(&model_id).await;
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        for (accuser, evidence) in net.take_evidence() {
            let checked = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(RECHECK_TIMEOUT, recheck(&net, accuser, &evidence)) => r,
            };
            match checked {
                Ok(Recheck::Proven { accused }) => {
                    tracing::warn!("evidence from {accuser} re-checked: {accused} lied, banned")
                }
                Ok(Recheck::Refuted { accused }) => tracing::warn!(
                    "evidence from {accuser} against {accused} re-checked: the output was right"
                ),
                Ok(Recheck::Undecided { accused, reason }) => {
                    tracing::info!("evidence from {accuser} against {accused} undecided: {reason}")
                }
                Err(_) => tracing::info!(
                    "evidence from {accuser}: not re-checked within {RECHECK_TIMEOUT:?}"
                ),
            }
        }
    }
}

/// Steps `session` through `steps` and joins the outputs' rows.
async fn replay(
    session: &mut RemoteSession,
    steps: &[(u32, TensorFrame)],
) -> Result<TensorFrame, String> {
    let mut outs = Vec::with_capacity(steps.len());
    for (start, frame) in steps {
        let out = session
            .step(*start, frame.clone())
            .await
            .map_err(|e| format!("the shadow failed: {e}"))?;
        outs.push((*start, out));
    }
    let (from, to) = match (steps.first(), steps.last()) {
        (Some((a, _)), Some((b, f))) => (*a, b + rows_of(f)),
        _ => return Err("nothing to run".into()),
    };
    rows(&outs, from, to).ok_or_else(|| "the shadow's outputs do not join".to_string())
}

fn rows_of(f: &TensorFrame) -> u32 {
    f.shape().first().copied().unwrap_or(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use nomoat_protocol::DType;

    #[test]
    fn honest_rounding_passes_and_lies_do_not() {
        let truth: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.3)
            .collect();
        assert_eq!(row_error(&truth, &truth), 0.0);
        // The wire's q8 rounding, both ways, stays well inside.
        let q = TensorFrame::from_f32(vec![1, 64], &truth, DType::Q8Block).unwrap();
        assert!(row_error(&q.to_f32(), &truth) < DEFAULT_TOLERANCE / 4.0);
        // Noise of a fifth of the RMS does not.
        let rms = (truth.iter().map(|v| v * v).sum::<f32>() / 64.0).sqrt();
        let lie: Vec<f32> = truth
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 2 == 0 { 0.2 } else { -0.2 } * rms)
            .collect();
        assert!(row_error(&lie, &truth) > DEFAULT_TOLERANCE);
        let mut nan = truth.clone();
        nan[3] = f32::NAN;
        assert_eq!(row_error(&nan, &truth), f32::INFINITY);
        assert_eq!(row_error(&truth[..32], &truth), f32::INFINITY);
    }

    #[test]
    fn the_first_bad_row_is_found_from_the_skip() {
        let good = vec![1.0f32; 8];
        let mut bad = good.clone();
        bad[5] = 3.0; // row 2 of 4-wide rows... row 1
        let t = TensorFrame::from_f32(vec![2, 4], &good, DType::F32).unwrap();
        let c = TensorFrame::from_f32(vec![2, 4], &bad, DType::F32).unwrap();
        assert_eq!(first_mismatch(&c, &t, 0, 0.05).map(|m| m.0), Some(1));
        assert_eq!(first_mismatch(&c, &t, 2, 0.05), None);
        assert_eq!(first_mismatch(&t, &t, 0, 0.05), None);
    }
}
