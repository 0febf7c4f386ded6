//! Route planning from what this node knows: announcements, its own
//! measurements and backoffs, handed to the scheduler's pure planner.

use libp2p::PeerId;
use nomoat_protocol::{BlockRange, Hop, ServerInfo};
use nomoat_scheduler::{plan_servers, plan_servers_within, RouteHop, ServerEstimate};

use super::ClientError;
use crate::net::NetHandle;

/// What this node knows of each server, as the scheduler costs it.
fn estimates(net: &NetHandle, servers: &[ServerInfo]) -> Vec<ServerEstimate> {
    servers
        .iter()
        .map(|s| {
            let peer = PeerId::from_bytes(&s.peer_id).ok();
            ServerEstimate {
                span: s.blocks,
                rtt_s: peer.and_then(|p| net.rtt(&p)).map(|d| d.as_secs_f64()),
                observed_secs_per_block: peer.and_then(|p| net.observed_secs_per_block(&p)),
                announced_throughput: s.throughput,
                announced_load: s.load,
                announced_sessions: s.active_sessions,
                batch_capacity: s.batch_capacity,
                own_sessions: peer.map_or(0, |p| net.own_sessions(&p)),
                free_kv_tokens: s.free_kv_tokens,
                backed_off: peer.is_some_and(|p| net.is_backed_off(&p)),
            }
        })
        .collect()
}

fn to_hops(
    model_id: &str,
    servers: &[ServerInfo],
    planned: Result<Vec<RouteHop>, Vec<BlockRange>>,
) -> Result<Vec<Hop>, ClientError> {
    match planned {
        Ok(hops) => Ok(hops
            .iter()
            .map(|h| Hop {
                peer_id: servers[h.server].peer_id.clone(),
                blocks: h.blocks,
            })
            .collect()),
        Err(missing) => Err(ClientError::NoRoute {
            model_id: model_id.to_string(),
            missing,
        }),
    }
}

/// The cheapest route over blocks `0..num_blocks` by expected per-token
/// latency (see [`nomoat_scheduler::plan_servers`]): measured RTTs, this
/// node's own measurements over announced throughput, load (plus this
/// client's own sessions there), and a penalty on servers without KV room
/// for `max_length` positions; legs scaled by a random factor up to
/// [`nomoat_scheduler::ROUTE_JITTER`]. Banned servers are never used,
/// and servers not measured yet only on [`PROBE_SHARE`] of the routes
/// when measured ones would do.
///
/// # Errors
///
/// [`ClientError::NoRoute`] naming the blocks no usable server covers.
pub fn plan(
    net: &NetHandle,
    model_id: &str,
    num_blocks: u32,
    servers: &[ServerInfo],
    max_length: u32,
) -> Result<Vec<Hop>, ClientError> {
    probing(net, servers, |servers| {
        let est = estimates(net, servers);
        let planned = plan_servers(num_blocks, &est, max_length, rand::random::<f64>);
        to_hops(model_id, servers, planned)
    })
}

/// The share of sessions that may use servers this node has not measured
/// yet when measured ones cover the blocks: a new server (or one that
/// claims to be fast) is tried on this share until its speed is known.
pub const PROBE_SHARE: f64 = 0.1;

/// Plans over `servers` less the banned ones; on all but [`PROBE_SHARE`]
/// of the calls, over the measured ones alone first when they suffice.
fn probing(
    net: &NetHandle,
    servers: &[ServerInfo],
    plan: impl Fn(&[ServerInfo]) -> Result<Vec<Hop>, ClientError>,
) -> Result<Vec<Hop>, ClientError> {
    let peer = |s: &ServerInfo| PeerId::from_bytes(&s.peer_id).ok();
    let usable: Vec<ServerInfo> = servers
        .iter()
        .filter(|s| peer(s).is_some_and(|p| !net.is_banned(&p)))
        .cloned()
        .collect();
    let measured: Vec<ServerInfo> = usable
        .iter()
        .filter(|s| peer(s).is_some_and(|p| net.observed_secs_per_block(&p).is_some()))
        .cloned()
        .collect();
    if measured.len() < usable.len() && rand::random::<f64>() >= PROBE_SHARE {
        if let Ok(route) = plan(&measured) {
            return Ok(route);
        }
    }
    plan(&usable)
}

/// The cheapest chain of `servers` covering blocks `start..end` (each may
/// run any sub-range of its span), costed as [`plan`] costs a whole route.
///
/// # Errors
///
/// [`ClientError::NoRoute`] naming the blocks of the range no usable
/// server covers.
pub fn plan_range(
    net: &NetHandle,
    model_id: &str,
    start: u32,
    end: u32,
    servers: &[ServerInfo],
    max_length: u32,
) -> Result<Vec<Hop>, ClientError> {
    probing(net, servers, |servers| {
        let est = estimates(net, servers);
        let planned = plan_servers_within(
            BlockRange { start, end },
            &est,
            max_length,
            rand::random::<f64>,
        );
        to_hops(model_id, servers, planned)
    })
}

/// A chain of `servers` covering blocks `0..num_blocks`, ignoring costs:
/// at each boundary the server that reaches furthest.
///
/// # Errors
///
/// [`ClientError::NoRoute`] naming the uncovered blocks.
pub fn simple_route(
    model_id: &str,
    num_blocks: u32,
    servers: &[ServerInfo],
) -> Result<Vec<Hop>, ClientError> {
    let spans: Vec<BlockRange> = servers.iter().map(|s| s.blocks).collect();
    let planned = nomoat_scheduler::chain_route(num_blocks, &spans).map(|chain| {
        chain
            .into_iter()
            .map(|(server, blocks)| RouteHop { server, blocks })
            .collect()
    });
    to_hops(model_id, servers, planned)
}
