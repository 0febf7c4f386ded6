//! Finding the servers of a model: `/nomoat/info/1` queries to known peers
//! merged with the announcements this node has heard.

use std::time::Duration;

use libp2p::{Multiaddr, PeerId, StreamProtocol};
use nomoat_protocol::{
    decode_info_response, encode_info_request, MessageError, ServerInfo, INFO_PROTOCOL,
};

use super::wire::{read_frame_max, write_frame, WireError};
use super::{NetError, NetHandle};

/// How long an info query may take.
pub const INFO_TIMEOUT: Duration = Duration::from_secs(15);

/// Why the servers of a model could not be learnt from a peer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoverError {
    /// The peer could not be reached.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The info stream could not be opened.
    #[error("{peer} refused the info stream: {reason}")]
    Open {
        /// The peer.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// Reading or writing the query failed.
    #[error("info query to {peer}: {source}")]
    Wire {
        /// The peer.
        peer: PeerId,
        /// What failed.
        #[source]
        source: WireError,
    },
    /// The peer closed the stream without an answer.
    #[error("{peer} closed the info stream without an answer")]
    Closed {
        /// The peer.
        peer: PeerId,
    },
    /// The answer was malformed.
    #[error("bad info answer from {peer}: {source}")]
    Malformed {
        /// The peer.
        peer: PeerId,
        /// What was wrong with it.
        #[source]
        source: MessageError,
    },
    /// The peer did not answer in time.
    #[error("{peer} did not answer the info query within {INFO_TIMEOUT:?}")]
    Timeout {
        /// The peer.
        peer: PeerId,
    },
}

/// Asks a peer for the servers it knows (`/nomoat/info/1`).
pub async fn query_servers(
    net: &NetHandle,
    peer: PeerId,
    model_id: &str,
) -> Result<Vec<ServerInfo>, DiscoverError> {
    let mut control = net.control();
    let fut = async {
        let mut s = control
            .open_stream(peer, StreamProtocol::new(INFO_PROTOCOL))
            .await
            .map_err(|e| DiscoverError::Open {
                peer,
                reason: e.to_string(),
            })?;
        let wire = |source| DiscoverError::Wire { peer, source };
        write_frame(&mut s, &encode_info_request(model_id))
            .await
            .map_err(wire)?;
        let body = read_frame_max(&mut s, nomoat_protocol::MAX_INFO_BYTES)
            .await
            .map_err(wire)?
            .ok_or(DiscoverError::Closed { peer })?;
        let entries = decode_info_response(&body)
            .map_err(|source| DiscoverError::Malformed { peer, source })?;
        // Only what each server signed itself: the answerer may relay
        // announcements, not make them.
        let total = entries.len();
        let servers: Vec<ServerInfo> = entries
            .into_iter()
            .filter(|s| super::signed::verify_info(s).is_ok())
            .map(|s| s.info)
            .collect();
        if servers.len() < total {
            tracing::warn!(
                "{peer} answered {} announcements that their servers did not sign; dropped",
                total - servers.len()
            );
        }
        Ok(servers)
    };
    tokio::time::timeout(INFO_TIMEOUT, fut)
        .await
        .map_err(|_| DiscoverError::Timeout { peer })?
}

/// Keeps the newest announcement of each server, in peer id order.
pub fn merge_servers(mut all: Vec<ServerInfo>) -> Vec<ServerInfo> {
    all.sort_by(|a, b| {
        a.peer_id
            .cmp(&b.peer_id)
            .then(b.timestamp_ms.cmp(&a.timestamp_ms))
    });
    all.dedup_by(|a, b| a.peer_id == b.peer_id);
    all
}

/// The addresses a server announces, those that parse.
pub fn server_addrs(s: &ServerInfo) -> Vec<Multiaddr> {
    s.addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect()
}

/// Tells the network the announced addresses of `servers`, so sessions can
/// dial them.
pub async fn learn_addresses(net: &NetHandle, servers: &[ServerInfo]) {
    for s in servers {
        if let Ok(peer) = PeerId::from_bytes(&s.peer_id) {
            net.add_addresses(peer, server_addrs(s)).await;
        }
    }
}

/// Connects to the bootstrap addresses and collects the live servers of
/// `model_id` they and the swarm's announcements know.
///
/// # Errors
///
/// The last failure, when no server at all was found and some query failed.
pub async fn discover(
    net: &NetHandle,
    bootstrap: &[Multiaddr],
    model_id: &str,
) -> Result<Vec<ServerInfo>, DiscoverError> {
    let mut all: Vec<ServerInfo> = Vec::new();
    let mut last_err = None;
    for addr in bootstrap {
        match net.dial(addr.clone()).await {
            Ok(peer) => match query_servers(net, peer, model_id).await {
                Ok(list) => all.extend(list),
                Err(e) => last_err = Some(e),
            },
            Err(e) => last_err = Some(e.into()),
        }
    }
    all.extend(net.servers(model_id));
    let all = merge_servers(all);
    if all.is_empty() {
        if let Some(e) = last_err {
            return Err(e);
        }
    }
    learn_addresses(net, &all).await;
    Ok(all)
}

/// Waits until the announcements heard cover every one of `num_blocks`
/// blocks of `model_id` (servers found by mDNS announce themselves once
/// connected), or `timeout`. Returns whether they do.
pub async fn wait_covered(
    net: &NetHandle,
    model_id: &str,
    num_blocks: u32,
    timeout: Duration,
) -> bool {
    net.subscribe(model_id).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let ranges: Vec<_> = net.servers(model_id).iter().map(|s| s.blocks).collect();
        if !ranges.is_empty() && nomoat_scheduler::coverage_gaps(num_blocks, &ranges).is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
