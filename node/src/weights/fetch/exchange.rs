//! One request-answer exchange with one peer on `/nomoat/weights/1`.

use std::time::Duration;

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use nomoat_protocol::{ErrorCode, MessageError, WeightsRequest, WeightsResponse, WEIGHTS_PROTOCOL};

use tracing::debug;

use crate::net::wire::{read_frame, write_frame, WireError};
use crate::net::NetHandle;

/// Why one request to one peer failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum PeerError {
    #[error("cannot open a stream: {0}")]
    Open(String),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("stalled: nothing within {0:?}")]
    Stalled(Duration),
    #[error("closed the stream early")]
    Closed,
    #[error("invalid answer: {0}")]
    Message(#[from] MessageError),
    #[error("answered {0}")]
    Refused(String),
    #[error("unexpected answer")]
    Unexpected,
}

/// One request-answer exchange; for `Chunks`, the answers come one by one
/// through [`Exchange::next`].
pub(super) struct Exchange {
    stream: libp2p::Stream,
    stall: Duration,
}

impl Exchange {
    pub(super) async fn open(
        net: &NetHandle,
        peer: PeerId,
        req: &WeightsRequest,
        stall: Duration,
    ) -> Result<Self, PeerError> {
        let fut = async {
            net.connect_known(peer).await;
            let mut stream = net
                .control()
                .open_stream(peer, StreamProtocol::new(WEIGHTS_PROTOCOL))
                .await
                .map_err(|e| PeerError::Open(e.to_string()))?;
            write_frame(&mut stream, &req.encode()).await?;
            Ok::<_, PeerError>(stream)
        };
        let stream = tokio::time::timeout(stall, fut)
            .await
            .map_err(|_| PeerError::Stalled(stall))??;
        Ok(Self { stream, stall })
    }

    pub(super) async fn next(&mut self) -> Result<WeightsResponse, PeerError> {
        let frame = tokio::time::timeout(self.stall, read_frame(&mut self.stream))
            .await
            .map_err(|_| PeerError::Stalled(self.stall))??
            .ok_or(PeerError::Closed)?;
        Ok(WeightsResponse::decode_bytes(Bytes::from(frame))?)
    }

    pub(super) async fn close(mut self) {
        let _ = self.stream.close().await;
    }
}

/// Whether `r` says the peer is busy: not a fault, ask again later.
pub(super) fn is_busy(r: &WeightsResponse) -> bool {
    matches!(r, WeightsResponse::Error(e) if e.code == Some(ErrorCode::Busy))
}

/// The wait before asking a busy peer again after `n` busy answers in a
/// row: 50 ms doubling to 1.6 s, plus up to 50 ms of jitter.
pub(super) fn busy_backoff(n: u32) -> Duration {
    let jitter = rand::random::<u64>() % 50;
    Duration::from_millis((50u64 << n.min(5)) + jitter)
}

/// One request and its one answer, asked again, backing off, while the
/// peer answers `Busy` and `patience` lasts; each exchange is bounded by
/// `stall`. The last `Busy` is returned when patience runs out.
pub(super) async fn ask(
    net: &NetHandle,
    peer: PeerId,
    req: &WeightsRequest,
    stall: Duration,
    patience: Duration,
) -> Result<WeightsResponse, PeerError> {
    let give_up = tokio::time::Instant::now() + patience;
    let (mut busy, mut dropped) = (0, 0);
    loop {
        let r = async {
            let mut ex = Exchange::open(net, peer, req, stall).await?;
            let r = ex.next().await;
            ex.close().await;
            r
        }
        .await;
        let wait = busy_backoff(busy + dropped + 1);
        let patient = tokio::time::Instant::now() + wait < give_up;
        match r {
            Ok(r) if is_busy(&r) && patient => busy += 1,
            // A peer drops a stream unanswered when several reach it at
            // once (libp2p-stream takes one at a time): ask again, a few
            // times.
            Err(e) if e.unanswered() && dropped < MAX_UNANSWERED && patient => {
                debug!(%peer, "the request went unanswered ({e}); asking again");
                dropped += 1;
            }
            r => return r,
        }
        tokio::time::sleep(wait).await;
    }
}

/// Requests dropped unanswered that [`ask`] sends again.
const MAX_UNANSWERED: u32 = 3;

impl PeerError {
    /// Whether the stream ended, or was stopped, before any answer: the
    /// peer dropped it unread, busy or gone.
    pub(super) fn unanswered(&self) -> bool {
        matches!(self, PeerError::Closed | PeerError::Wire(WireError::Io(_)))
    }
}
