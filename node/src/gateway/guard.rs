//! What a request must show before the API answers it: an API key when
//! the gateway has any, and, while it listens on loopback only, a `Host`
//! and `Origin` of this machine (so a web page cannot reach it through DNS
//! rebinding or a cross-site request).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::{ApiError, Dialect};

/// The checks of one listening gateway.
#[derive(Debug, Clone)]
pub(super) struct Guard {
    keys: Arc<Vec<String>>,
    /// The bound address, when it is a loopback one.
    loopback: Option<SocketAddr>,
}

impl Guard {
    pub(super) fn new(keys: &[String], bound: SocketAddr) -> Self {
        Self {
            keys: Arc::new(keys.to_vec()),
            loopback: bound.ip().is_loopback().then_some(bound),
        }
    }
}

/// Whether `host` (a `Host` header, or an origin's host and port) names
/// this machine: `localhost`, `127.0.0.1` or `[::1]`, with or without the
/// port.
fn is_local_host(host: &str, port: u16) -> bool {
    let (name, p) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(']') || host.starts_with('[') => match p.parse::<u16>() {
            Ok(p) => (n, Some(p)),
            Err(_) => (host, None),
        },
        _ => (host, None),
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let local = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    local && p.is_none_or(|p| p == port)
}

/// Compares without an early exit, so the time taken says nothing of how
/// much of a key matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The key shown as OpenAI shows one: its start and its end.
fn masked(key: &str) -> String {
    let n = key.chars().count();
    if n <= 8 {
        return "***".into();
    }
    let head: String = key.chars().take(3).collect();
    let tail: String = key.chars().skip(n - 4).collect();
    format!("{head}***{tail}")
}

/// An error body with `status` and `code`, in the request's dialect.
fn refuse(status: StatusCode, code: &'static str, message: String, d: Dialect) -> Response {
    ApiError {
        status,
        message,
        kind: "invalid_request_error",
        param: None,
        code: Some(code),
    }
    .respond(d)
}

fn forbidden(message: String, d: Dialect) -> Response {
    refuse(StatusCode::FORBIDDEN, "forbidden", message, d)
}

fn unauthorized(message: String, d: Dialect) -> Response {
    let mut r = refuse(StatusCode::UNAUTHORIZED, "invalid_api_key", message, d);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// The middleware: the loopback checks on every route, the key on `/v1`.
pub(super) async fn guard(State(g): State<Guard>, req: Request, next: Next) -> Response {
    let dialect = Dialect::of(req.uri().path());
    if let Some(bound) = g.loopback {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if !is_local_host(host, bound.port()) {
            return forbidden(
                format!(
                    "Host `{host}` is not this machine: a gateway on {bound} answers only \
                 requests addressed to localhost (bind another address with --api to serve others)"
                ),
                dialect,
            );
        }
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or_default();
            let host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"))
                .unwrap_or("");
            if !is_local_host(host, bound.port()) {
                return forbidden(
                    format!(
                        "requests from pages of {origin} are refused: the gateway answers only \
                     its own pages while it listens on loopback"
                    ),
                    dialect,
                );
            }
        }
    }
    if !g.keys.is_empty() && req.uri().path().starts_with("/v1/") {
        // OpenAI's clients send `Authorization: Bearer KEY`, Anthropic's
        // `x-api-key: KEY`; either header is accepted on every route.
        let headers = req.headers();
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "));
        let x_api_key = headers.get("x-api-key").and_then(|h| h.to_str().ok());
        let given = bearer.or(x_api_key).map(str::trim);
        match given {
            None => {
                let message = match dialect {
                    Dialect::OpenAi => {
                        "You didn't provide an API key. You need to provide your API key in an \
                     Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                    }
                    Dialect::Anthropic => {
                        "x-api-key header is required: send the gateway's key \
                     (x-api-key: YOUR_KEY)."
                    }
                };
                return unauthorized(message.into(), dialect);
            }
            Some(k)
                if !g
                    .keys
                    .iter()
                    .any(|want| same(want.as_bytes(), k.as_bytes())) =>
            {
                return unauthorized(
                    format!(
                        "Incorrect API key provided: {}. Ask the gateway's operator for a key \
                         (nomoat gateway --api-key).",
                        masked(k)
                    ),
                    dialect,
                )
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_hosts_are_named_with_or_without_the_port() {
        for h in [
            "localhost",
            "localhost:8080",
            "LOCALHOST:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_local_host(h, 8080), "{h}");
        }
        for h in [
            "",
            "evil.example",
            "evil.example:8080",
            "localhost:8081",
            "127.0.0.1:80",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::1]:9",
        ] {
            assert!(!is_local_host(h, 8080), "{h}");
        }
    }

    #[test]
    fn keys_compare_whole_and_show_masked() {
        assert!(same(b"sk-abc", b"sk-abc"));
        assert!(!same(b"sk-abc", b"sk-abd"));
        assert!(!same(b"sk-abc", b"sk-ab"));
        assert_eq!(masked("sk-1234567890abcd"), "sk-***abcd");
        assert_eq!(masked("short"), "***");
    }
}
