//! One request-answer exchange with one peer on `/nomoat/weights/1`.

use std::time::Duration;

use bytes::Bytes;
use futures::AsyncWriteExt;
use libp2p::{PeerId, StreamProtocol};
use nomoat_protocol::{MessageError, WeightsRequest, WeightsResponse, WEIGHTS_PROTOCOL};

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
