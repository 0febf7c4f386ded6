//! The announcement table stays bounded: past its cap the oldest entry
//! goes, and expired entries leave memory. In-process nodes on 127.0.0.1.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_protocol::{BlockRange, Reachability, ServerInfo};

const MODEL: &str = "announcement-test-model";

async fn node(bootstrap: Vec<libp2p::Multiaddr>, max_known_servers: usize) -> Result<NetHandle> {
    let net = net::start(NetConfig {
        listen: vec!["/ip4/127.0.0.1/udp/0/quic-v1".parse()?],
        bootstrap,
        heartbeat: Duration::from_millis(500),
        max_known_servers,
        ..NetConfig::default()
    })
    .await?;
    net.wait_listening(1, Duration::from_secs(10)).await;
    Ok(net)
}

fn info(net: &NetHandle, start: u32) -> ServerInfo {
    ServerInfo {
        peer_id: net.peer_id().to_bytes(),
        model_id: MODEL.into(),
        blocks: BlockRange {
            start,
            end: start + 1,
        },
        num_blocks: 64,
        hidden_size: 64,
        throughput: 1.0,
        free_kv_tokens: 1024,
        load: 0.0,
        active_sessions: 0,
        batch_capacity: 0.0,
        version: "test".into(),
        addrs: Vec::new(),
        reachability: Reachability::Unknown,
        timestamp_ms: 0,
        adapters: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_announcement_table_is_capped_and_forgets_the_gone() -> Result<()> {
    const CAP: usize = 8;
    const SENDERS: usize = 20;
    let hub = node(Vec::new(), CAP).await?;
    hub.subscribe(MODEL).await;
    let boot = vec![hub.listen_addrs()[0].clone()];
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let n = node(boot.clone(), net::MAX_KNOWN_SERVERS).await?;
        n.subscribe(MODEL).await;
        n.announce(info(&n, i as u32)).await;
        senders.push(n);
    }
    // Every sender keeps announcing; the hub never holds more than its cap,
    // and does hold that many.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut most = 0;
    let mut full_since: Option<Instant> = None;
    loop {
        let (held, _) = hub.table_sizes();
        assert!(held <= CAP, "{held} announcements held, the cap is {CAP}");
        most = most.max(held);
        if held == CAP {
            // Full: keep watching a few heartbeats of new announcements.
            let since = *full_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!("the hub never held {CAP} announcements (at most {most})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The senders go; past the expiry (4 heartbeats) the hub forgets them.
    for n in &senders {
        n.shutdown().await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (held, _) = hub.table_sizes();
        if held == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{held} announcements of stopped servers still held");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(hub.servers(MODEL).is_empty());
    hub.shutdown().await;
    Ok(())
}

/// An info answer relays only what servers signed: a peer that answers
/// with a server's own announcement re-stamped newer (with other blocks),
/// or with an announcement it signed for another server, or an unsigned
/// old-style entry, gets none of them believed; the announcement it
/// relays untouched is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_answers_relay_only_what_servers_signed() -> Result<()> {
    use futures::StreamExt;
    use libp2p::StreamProtocol;
    use nomoat_node::net::signed::sign_info;
    use nomoat_node::net::wire::{read_frame_max, write_frame};
    use nomoat_protocol::{encode_info_response, MAX_CONTROL_BYTES};
    // An honest server's announcement, as it signs it.
    // A fake bootstrap peer that answers info queries itself.
    let fake = node(Vec::new(), 8).await?;
    let honest_key = libp2p::identity::Keypair::generate_ed25519();
    let mut honest = info(&fake, 0);
    honest.peer_id = honest_key.public().to_peer_id().to_bytes();
    let signed = sign_info(&honest_key, honest.clone());
    let fake_key = libp2p::identity::Keypair::generate_ed25519();
    let mut restamped = signed.clone();
    restamped.info.timestamp_ms = u64::MAX;
    restamped.info.blocks = BlockRange { start: 0, end: 1 };
    restamped.info_bytes = restamped.info.encode();
    let forged = sign_info(
        &fake_key,
        ServerInfo {
            blocks: BlockRange { start: 5, end: 9 },
            ..honest.clone()
        },
    );
    let answer = encode_info_response(&[restamped, forged, signed.clone()]);
    let mut incoming = fake
        .control()
        .accept(StreamProtocol::new(nomoat_protocol::INFO_PROTOCOL))?;
    tokio::spawn(async move {
        while let Some((_, mut s)) = incoming.next().await {
            let _ = read_frame_max(&mut s, MAX_CONTROL_BYTES).await;
            let _ = write_frame(&mut s, &answer).await;
            let _ = futures::AsyncWriteExt::close(&mut s).await;
        }
    });
    let client = node(Vec::new(), 8).await?;
    client.dial(fake.listen_addrs()[0].clone()).await?;
    let got = nomoat_node::net::discover::query_servers(&client, fake.peer_id(), MODEL).await?;
    assert_eq!(got, [honest], "only the untouched signed entry is believed");
    for n in [fake, client] {
        n.shutdown().await;
    }
    Ok(())
}
