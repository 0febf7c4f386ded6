//! A minimal HTTP/1.1 client for the gateway's own API: what `nomoat demo`,
//! `nomoat bench api` and the tests use to talk to a gateway on loopback.
//! One request per connection (`Connection: close`), `Content-Length` or
//! chunked bodies, server-sent events read as they arrive.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response (headers and body) read.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Largest header block read.
pub const MAX_HEADER_BYTES: usize = 64 << 10;

/// A failed request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HttpError {
    /// Connecting, writing or reading failed.
    #[error("HTTP to {addr}: {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No complete answer within the timeout.
    #[error("HTTP to {addr}: no complete answer within {timeout:?}")]
    Timeout {
        /// The server.
        addr: SocketAddr,
        /// The limit.
        timeout: Duration,
    },
    /// The answer is not HTTP/1.1 as this client reads it.
    #[error("HTTP to {addr}: malformed answer: {reason}")]
    Malformed {
        /// The server.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// The status code.
    pub status: u16,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_default()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request with an optional JSON body and reads the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpResponse, HttpError> {
    let mut all = Vec::new();
    let status = exchange(addr, method, path, body, timeout, |b| {
        all.extend_from_slice(b);
        true
    })
    .await?;
    Ok(HttpResponse {
        status: status.0,
        headers: status.1,
        body: all,
    })
}

/// Sends a request and calls `on_data` with each `data:` payload of the
/// server-sent events in the answer, as they arrive, until it returns
/// `false` or the stream ends. Returns the status and, for a non-SSE
/// answer (an error), its body.
pub async fn stream_events(
    addr: SocketAddr,
    path: &str,
    body: &[u8],
    timeout: Duration,
    mut on_data: impl FnMut(&str) -> bool,
) -> Result<(u16, String), HttpError> {
    let mut buf = Vec::new();
    let mut raw = Vec::new();
    let mut go_on = true;
    let (status, headers) = exchange(addr, "POST", path, Some(body), timeout, |b| {
        raw.extend_from_slice(b);
        buf.extend_from_slice(b);
        while let Some(end) = find(&buf, b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            for line in String::from_utf8_lossy(&event).lines() {
                if let Some(data) = line.strip_prefix("data:") {
                    go_on &= on_data(data.trim_start());
                }
            }
        }
        go_on
    })
    .await?;
    let sse = headers
        .iter()
        .any(|(n, v)| n == "content-type" && v.starts_with("text/event-stream"));
    let text = if sse {
        String::new()
    } else {
        String::from_utf8_lossy(&raw).into_owned()
    };
    Ok((status, text))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

type Head = (u16, Vec<(String, String)>);

/// Writes the request, parses the head and feeds body bytes to `on_body`
/// until it returns `false` or the body ends.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
    on_body: impl FnMut(&[u8]) -> bool,
) -> Result<Head, HttpError> {
    match tokio::time::timeout(timeout, exchange_inner(addr, method, path, body, on_body)).await {
        Ok(r) => r,
        Err(_) => Err(HttpError::Timeout { addr, timeout }),
    }
}

async fn exchange_inner(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    mut on_body: impl FnMut(&[u8]) -> bool,
) -> Result<Head, HttpError> {
    let io = |source| HttpError::Io { addr, source };
    let bad = |reason: &str| HttpError::Malformed {
        addr,
        reason: reason.to_string(),
    };
    let mut s = TcpStream::connect(addr).await.map_err(io)?;
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.map_err(io)?;
    s.write_all(body).await.map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEADER_BYTES {
            return Err(bad("header block too large"));
        }
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad("connection closed before the headers ended"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head_text = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head_text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let length: Option<usize> = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok());
    let mut rest: Vec<u8> = buf[head_end + 4..].to_vec();
    let mut total = rest.len();
    if !chunked {
        let mut seen = 0;
        loop {
            if !rest.is_empty() {
                let take = length.map_or(rest.len(), |l| rest.len().min(l - seen));
                seen += take;
                if !on_body(&rest[..take]) {
                    break;
                }
                rest.clear();
            }
            if length.is_some_and(|l| seen >= l) {
                break;
            }
            let n = s.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                break;
            }
            total += n;
            if total > MAX_RESPONSE_BYTES {
                return Err(bad("response too large"));
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        return Ok((status, headers));
    }
    // Chunked: `SIZE\r\nDATA\r\n` ... `0\r\n\r\n`.
    loop {
        if let Some(line_end) = find(&rest, b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..line_end]).into_owned();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            if size == 0 {
                return Ok((status, headers));
            }
            let need = line_end + 2 + size + 2;
            if rest.len() >= need {
                let data: Vec<u8> = rest[line_end + 2..line_end + 2 + size].to_vec();
                rest.drain(..need);
                if !on_body(&data) {
                    return Ok((status, headers));
                }
                continue;
            }
        }
        let n = s.read(&mut chunk).await.map_err(io)?;
        if n == 0 {
            return Err(bad("connection closed inside a chunked body"));
        }
        total += n;
        if total > MAX_RESPONSE_BYTES {
            return Err(bad("response too large"));
        }
        rest.extend_from_slice(&chunk[..n]);
    }
}
