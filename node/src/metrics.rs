//! Process-wide counters, rendered in the Prometheus text format at
//! `GET /metrics`.
//!
//! [`global()`] is one [`Metrics`] per process, so any part of the node can
//! count without a handle being threaded through: the gateway counts
//! sessions, steps, tokens, step latency and hidden-state bytes; the weight
//! fetcher counts verified and rejected chunks; failover counts replacements.
//! Every counter is real and starts at zero; one that nothing has
//! incremented yet still renders as `0`.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Subtracts one (never below zero).
    pub fn dec(&self) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency histograms' buckets.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram with the fixed [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    /// Sum in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, le) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            if s <= le {
                b.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        for (b, le) in self.buckets.iter().zip(LATENCY_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{le}\"}} {}",
                b.load(Ordering::Relaxed)
            );
        }
        let count = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Every metric of a node. See the module docs for who counts what.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Inference sessions opened by this node (gateway requests).
    pub sessions_opened: Counter,
    /// Sessions open now.
    pub sessions_active: Gauge,
    /// Forward steps (one prefill or one decoded token) driven by this node.
    pub steps: Counter,
    /// Prompt tokens processed for API requests.
    pub prompt_tokens: Counter,
    /// Tokens generated for API requests.
    pub generated_tokens: Counter,
    /// API requests answered successfully.
    pub requests_ok: Counter,
    /// API requests refused or failed.
    pub requests_failed: Counter,
    /// Time of one step through the whole route, as the client sees it.
    pub step_latency: Histogram,
    /// Time of one hop (a server's span plus its leg), where measured.
    pub hop_latency: Histogram,
    /// Hidden-state bytes sent into the swarm.
    pub bytes_out: Counter,
    /// Hidden-state bytes received from the swarm.
    pub bytes_in: Counter,
    /// Weight chunks whose BLAKE3 hash matched on arrival.
    pub chunks_verified: Counter,
    /// Weight chunks rejected because their hash did not match.
    pub chunks_rejected: Counter,
    /// Failed hops replaced by another server mid-session.
    pub failovers: Counter,
}

/// This process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::default)
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, v: u64) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {v}");
}

impl Metrics {
    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let c = "counter";
        scalar(
            &mut out,
            "nomoat_sessions_total",
            c,
            "Inference sessions opened.",
            self.sessions_opened.get(),
        );
        scalar(
            &mut out,
            "nomoat_sessions_active",
            "gauge",
            "Inference sessions open now.",
            self.sessions_active.get(),
        );
        scalar(
            &mut out,
            "nomoat_steps_total",
            c,
            "Forward steps driven (prefills and decoded tokens).",
            self.steps.get(),
        );
        scalar(
            &mut out,
            "nomoat_prompt_tokens_total",
            c,
            "Prompt tokens processed for API requests.",
            self.prompt_tokens.get(),
        );
        scalar(
            &mut out,
            "nomoat_generated_tokens_total",
            c,
            "Tokens generated for API requests.",
            self.generated_tokens.get(),
        );
        scalar(
            &mut out,
            "nomoat_requests_ok_total",
            c,
            "API requests answered.",
            self.requests_ok.get(),
        );
        scalar(
            &mut out,
            "nomoat_requests_failed_total",
            c,
            "API requests refused or failed.",
            self.requests_failed.get(),
        );
        self.step_latency.render(
            &mut out,
            "nomoat_step_latency_seconds",
            "Time of one step through the whole route.",
        );
        self.hop_latency.render(
            &mut out,
            "nomoat_hop_latency_seconds",
            "Time of one hop (a span and its leg).",
        );
        scalar(
            &mut out,
            "nomoat_bytes_out_total",
            c,
            "Hidden-state bytes sent into the swarm.",
            self.bytes_out.get(),
        );
        scalar(
            &mut out,
            "nomoat_bytes_in_total",
            c,
            "Hidden-state bytes received from the swarm.",
            self.bytes_in.get(),
        );
        scalar(
            &mut out,
            "nomoat_chunks_verified_total",
            c,
            "Weight chunks verified against their BLAKE3 hash.",
            self.chunks_verified.get(),
        );
        scalar(
            &mut out,
            "nomoat_chunks_rejected_total",
            c,
            "Weight chunks rejected for a wrong hash.",
            self.chunks_rejected.get(),
        );
        scalar(
            &mut out,
            "nomoat_failovers_total",
            c,
            "Failed hops replaced mid-session.",
            self.failovers.get(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.steps.add(3);
        m.step_latency.observe(Duration::from_millis(3));
        m.step_latency.observe(Duration::from_secs(20));
        let text = m.render();
        assert!(text.contains("# TYPE nomoat_steps_total counter\nnomoat_steps_total 3\n"));
        assert!(text.contains("nomoat_step_latency_seconds_bucket{le=\"0.0025\"} 0\n"));
        assert!(text.contains("nomoat_step_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("nomoat_step_latency_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("nomoat_step_latency_seconds_count 2\n"));
        assert!(text.contains("nomoat_failovers_total 0\n"));
    }
}
