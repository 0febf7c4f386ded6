//! `nomoat status`: which peers serve which blocks, and the gaps.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use libp2p::{Multiaddr, PeerId};
use nomoat_node::net::discover::discover;
use nomoat_node::net::{self, NetConfig};
use nomoat_protocol::{BlockRange, ServerInfo};
use nomoat_scheduler::coverage_gaps;

/// How long `--mdns` listens before reporting.
const MDNS_LISTEN: Duration = Duration::from_secs(5);

/// `nomoat status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// A peer of the swarm (repeatable), ending in /p2p/PEER_ID.
    #[arg(long, required_unless_present = "mdns")]
    swarm: Vec<Multiaddr>,
    /// Also find peers on the local network with mDNS (listening for a
    /// few seconds).
    #[arg(long)]
    mdns: bool,
    /// Only this model id.
    #[arg(long, default_value = "")]
    model_id: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    access: crate::cli::access::AccessArgs,
}

pub(crate) async fn status(args: StatusArgs) -> Result<()> {
    let net = net::start(args.access.config(
        NetConfig {
            mdns: args.mdns,
            ..NetConfig::default()
        },
        false,
    )?)
    .await?;
    let mut peers = args.swarm.clone();
    if args.mdns {
        // Ask every peer mDNS connected this node to.
        tokio::time::sleep(MDNS_LISTEN).await;
        peers.extend(
            net.connected_peers()
                .into_iter()
                .map(|(p, a)| a.with_p2p(p).unwrap_or_else(|a| a)),
        );
    }
    let servers = discover(&net, &peers, &args.model_id).await?;
    // Connect to every server at once (on all its addresses, so one it
    // cannot be reached at costs nothing) so ping measures its RTT.
    let rows: Vec<(PeerId, ServerInfo)> = servers
        .iter()
        .filter_map(|s| Some((PeerId::from_bytes(&s.peer_id).ok()?, s.clone())))
        .collect();
    futures::future::join_all(rows.iter().map(|(p, _)| net.connect_known(*p))).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < deadline && rows.iter().any(|(p, _)| net.rtt(p).is_none()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut models: Vec<(String, u32)> = servers
        .iter()
        .map(|s| (s.model_id.clone(), s.num_blocks))
        .collect();
    models.sort();
    models.dedup();
    let gaps = |model: &str, n: u32| -> Vec<BlockRange> {
        let ranges: Vec<BlockRange> = servers
            .iter()
            .filter(|s| s.model_id == model)
            .map(|s| s.blocks)
            .collect();
        coverage_gaps(n, &ranges)
    };
    if args.json {
        let json = serde_json::json!({
            "servers": rows.iter().map(|(p, s)| server_json(p, s, net.rtt(p))).collect::<Vec<_>>(),
            "models": models.iter().map(|(m, n)| serde_json::json!({
                "model_id": m,
                "num_blocks": n,
                "gaps": gaps(m, *n).iter().map(|g| g.to_string()).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        println!("{json}");
    } else {
        if rows.is_empty() {
            println!("no servers known to {:?}", args.swarm);
        }
        for (m, n) in &models {
            let g = gaps(m, *n);
            let cover = if g.is_empty() {
                "all blocks covered".to_string()
            } else {
                format!(
                    "GAPS: blocks {} not served",
                    g.iter()
                        .map(|r| r.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            println!("model {} ({n} blocks): {cover}", short(m));
            println!(
                "  {:<54} {:>8} {:>9} {:>10} {:>6} {:>9} {:>6}",
                "peer", "blocks", "rtt ms", "tokens/s", "load", "sessions", "batch"
            );
            for (p, s) in rows.iter().filter(|(_, s)| &s.model_id == m) {
                let rtt = net
                    .rtt(p)
                    .map(|d| format!("{:.2}", d.as_secs_f64() * 1e3))
                    .unwrap_or_else(|| "-".into());
                println!(
                    "  {:<54} {:>8} {:>9} {:>10.1} {:>6.2} {:>9} {:>6.1}",
                    p.to_string(),
                    s.blocks.to_string(),
                    rtt,
                    s.throughput,
                    s.load,
                    s.active_sessions,
                    s.batch_capacity
                );
            }
        }
    }
    net.shutdown().await;
    Ok(())
}

fn short(id: &str) -> &str {
    &id[..id.len().min(16)]
}

fn server_json(peer: &PeerId, s: &ServerInfo, rtt: Option<Duration>) -> serde_json::Value {
    serde_json::json!({
        "peer_id": peer.to_string(),
        "model_id": s.model_id,
        "blocks": s.blocks.to_string(),
        "num_blocks": s.num_blocks,
        "rtt_ms": rtt.map(|d| d.as_secs_f64() * 1e3),
        "throughput": s.throughput,
        "load": s.load,
        "active_sessions": s.active_sessions,
        "batch_capacity": s.batch_capacity,
        "free_kv_tokens": s.free_kv_tokens,
        "version": s.version,
        "reachability": format!("{:?}", s.reachability).to_lowercase(),
        "addrs": s.addrs.iter().filter_map(|a| Multiaddr::try_from(a.clone()).ok()).map(|a| a.to_string()).collect::<Vec<_>>(),
    })
}
