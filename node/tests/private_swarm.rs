//! Private swarms between real `nomoat` processes with the real SmolLM2:
//! members holding the swarm key (or named in the allow-list) generate the
//! local text through the swarm, while an outsider, without the key, with
//! another key or with another peer id, tries each protocol over QUIC and
//! TCP and gets nothing: no connection, no announcement, no info answer,
//! no session and no weights.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::AsyncWriteExt;
use libp2p::{Multiaddr, PeerId, StreamProtocol};
use nomoat_node::net::access::{self, Access, SwarmKey};
use nomoat_node::net::wire::{read_frame, write_frame};
use nomoat_node::net::{self, NetConfig, NetHandle};
use nomoat_protocol::{INFER_PROTOCOL, INFO_PROTOCOL, WEIGHTS_PROTOCOL};
use nomoat_tests::harness::Proc;

nomoat_tests::process_helpers!();

/// The tests of this file run one at a time (each starts SmolLM2 servers).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const PROMPT: &str = "What is the capital of France?";
/// Loopback on both transports, so the outsider can try each.
const LISTEN: [&str; 4] = [
    "--listen",
    "/ip4/127.0.0.1/udp/0/quic-v1",
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
];

fn server(blocks: &str, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "--model",
        "smollm2-135m",
        "--blocks",
        blocks,
        "--heartbeat",
        "0.5",
    ];
    args.extend(LISTEN);
    args.extend(extra);
    serve(&args)
}

/// Every listen address of a server process, with `/p2p/PEER_ID`.
fn addrs(p: &Proc) -> Result<Vec<Multiaddr>> {
    let hello = &p.hello;
    let list = hello["listen"].as_array().context("no listen addresses")?;
    let addrs = list
        .iter()
        .filter_map(|a| a.as_str()?.parse().ok())
        .collect::<Vec<Multiaddr>>();
    let has = |needle: &str| addrs.iter().any(|a| a.to_string().contains(needle));
    if !has("/quic-v1") || !has("/tcp/") {
        bail!("expected QUIC and TCP addresses, got {addrs:?}");
    }
    Ok(addrs)
}

fn tcp_addr(p: &Proc) -> Result<String> {
    addr_with(p, "/tcp/")
}

fn quic_addr(p: &Proc) -> Result<String> {
    addr_with(p, "/quic-v1")
}

fn addr_with(p: &Proc, needle: &str) -> Result<String> {
    Ok(addrs(p)?
        .into_iter()
        .find(|a| a.to_string().contains(needle))
        .with_context(|| format!("no {needle} address"))?
        .to_string())
}

/// `nomoat generate`, greedy, with `extra` flags: `Ok(text)` or the error.
fn generate(extra: &[&str]) -> Result<Result<String, String>> {
    let out = Command::new(nomoat_bin()?)
        .args([
            "generate",
            "--model",
            "smollm2-135m",
            "--chat",
            "--temperature",
            "0",
            "--max-tokens",
            "24",
            "--step-timeout",
            "5",
            "--prompt",
            PROMPT,
        ])
        .args(extra)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    Ok(if out.status.success() {
        Ok(String::from_utf8(out.stdout)?)
    } else {
        Err(stderr)
    })
}

/// The number of servers `nomoat status` finds through `boot`.
fn status_servers(boot: &str, extra: &[&str]) -> Result<usize> {
    let out = Command::new(nomoat_bin()?)
        .args(["status", "--swarm", boot, "--json"])
        .args(extra)
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    Ok(status["servers"].as_array().map_or(0, Vec::len))
}

/// Waits until `status` (as a member) sees `n` servers.
fn wait_servers(boot: &str, member: &[&str], n: usize) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while status_servers(boot, member)? < n {
        if Instant::now() > deadline {
            bail!("the members never saw {n} servers");
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    Ok(())
}

/// An outsider's node: no key, or `access`, on loopback QUIC and TCP.
async fn outsider(access: Access) -> Result<NetHandle> {
    Ok(net::start(NetConfig {
        listen: vec![
            "/ip4/127.0.0.1/udp/0/quic-v1".parse()?,
            "/ip4/127.0.0.1/tcp/0".parse()?,
        ],
        heartbeat: Duration::from_millis(500),
        access,
        ..NetConfig::default()
    })
    .await?)
}

/// What one attempt on a protocol got back: `Some(bytes)` is an answer.
async fn try_protocol(net: &NetHandle, peer: PeerId, protocol: &'static str) -> Option<Vec<u8>> {
    let attempt = async {
        let mut s = net
            .control()
            .open_stream(peer, StreamProtocol::new(protocol))
            .await
            .ok()?;
        // Any request: a server that answered anything would be serving.
        write_frame(&mut s, b"\x0a\x00").await.ok()?;
        let _ = s.flush().await;
        read_frame(&mut s).await.ok()?
    };
    tokio::time::timeout(Duration::from_secs(3), attempt)
        .await
        .ok()
        .flatten()
}

/// The outsider tries every address of every server, then every protocol,
/// then listens for announcements: it must get nothing at all.
async fn outsider_gets_nothing(access: Access, servers: &[&Proc], model_topic: &str) -> Result<()> {
    let net = outsider(access).await?;
    net.subscribe(model_topic).await;
    for p in servers {
        let peer: PeerId = p.peer_id().parse()?;
        for addr in addrs(p)? {
            // A QUIC dial may complete at the outsider's end before the
            // server refuses the proof; what matters is that nothing is
            // served on it.
            let _ = net.dial(addr.clone()).await;
            for protocol in [INFO_PROTOCOL, INFER_PROTOCOL, WEIGHTS_PROTOCOL] {
                if let Some(answer) = try_protocol(&net, peer, protocol).await {
                    bail!("{protocol} answered an outsider at {addr}: {answer:?}");
                }
            }
        }
        // Info queries through the library, as `nomoat status` makes them.
        if let Ok(found) = net::query_servers(&net, peer, "").await {
            bail!("an outsider's info query was answered: {found:?}");
        }
    }
    // Announcements reach members every half second; none may arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let heard = net.servers(model_topic);
    net.shutdown().await;
    if !heard.is_empty() {
        bail!("an outsider heard {} announcements", heard.len());
    }
    Ok(())
}

/// The swarm's model id, as the servers announce it (from a member's
/// `status`).
fn model_id(boot: &str, member: &[&str]) -> Result<String> {
    let out = Command::new(nomoat_bin()?)
        .args(["status", "--swarm", boot, "--json"])
        .args(member)
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    Ok(status["models"][0]["model_id"]
        .as_str()
        .context("status names no model")?
        .to_string())
}

fn swarm_key(dir: &Path, name: &str) -> Result<String> {
    let path = dir.join(name);
    let out = Command::new(nomoat_bin()?)
        .args(["swarm-key", path.to_str().context("path")?])
        .output()?;
    if !out.status.success() {
        bail!("swarm-key: {}", String::from_utf8_lossy(&out.stderr));
    }
    let fingerprint = String::from_utf8(out.stdout)?;
    assert_eq!(
        fingerprint.trim(),
        SwarmKey::read(&path)?.fingerprint(),
        "the printed fingerprint is the key's"
    );
    Ok(path.to_string_lossy().into_owned())
}

#[test]
fn only_holders_of_the_swarm_key_join_or_are_served() -> Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let key = swarm_key(dir.path(), "swarm.key")?;
    let member = ["--swarm-key", key.as_str()];
    let b = server("15..30", &member)?;
    // The second server joins over TCP: pnet on that link; its pushes to
    // the first and the clients' QUIC links carry the proof.
    let boot_tcp = tcp_addr(&b)?;
    let a = server(
        "0..15",
        &[&member[..], &["--bootstrap", &boot_tcp]].concat(),
    )?;
    wait_servers(&boot_tcp, &member, 2)?;

    let local = generate(&[])?.map_err(anyhow::Error::msg)?;
    let swarm =
        generate(&[&member[..], &["--swarm", &boot_tcp]].concat())?.map_err(anyhow::Error::msg)?;
    assert_eq!(swarm, local, "a member gets the local text");
    assert!(swarm.contains("Paris"), "{swarm:?}");

    // Outsiders: no key, and another swarm's key.
    let other = SwarmKey::read(Path::new(&swarm_key(dir.path(), "other.key")?))?;
    let topic = model_id(&boot_tcp, &member)?;
    let rt = tokio::runtime::Runtime::new()?;
    for access in [
        Access::default(),
        Access {
            swarm_key: Some(other),
            allow: Vec::new(),
        },
    ] {
        rt.block_on(outsider_gets_nothing(access.clone(), &[&a, &b], &topic))
            .with_context(|| format!("outsider with {access:?}"))?;
    }
    for boot in [tcp_addr(&a)?, quic_addr(&b)?] {
        assert_eq!(status_servers(&boot, &[])?, 0, "status without the key");
        let err = generate(&["--swarm", &boot])?.expect_err("an outsider generated");
        assert!(!err.is_empty());
    }
    let other_key = dir.path().join("other.key");
    let other_key = other_key.to_str().context("path")?;
    assert_eq!(status_servers(&boot_tcp, &["--swarm-key", other_key])?, 0);

    // The members were served all along, exactly.
    let again = generate(&[&member[..], &["--swarm", &quic_addr(&a)?]].concat())?
        .map_err(anyhow::Error::msg)?;
    assert_eq!(again, local);
    Ok(())
}

#[test]
fn an_allow_list_admits_only_the_peers_it_names() -> Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let member_id = dir.path().join("member.key");
    let member_id = member_id.to_str().context("path")?;
    let out = Command::new(nomoat_bin()?)
        .args(["peer-id", "--identity", member_id, "--json"])
        .output()?;
    let ids: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let member_peer = ids["peer_id"].as_str().context("peer id")?.to_string();
    // The identity lasts: asked again, the same peer id.
    let again = Command::new(nomoat_bin()?)
        .args(["peer-id", "--identity", member_id])
        .output()?;
    assert_eq!(String::from_utf8(again.stdout)?.trim(), member_peer);
    let server_id = dir.path().join("server.key");
    let s = server(
        "0..30",
        &[
            "--identity",
            server_id.to_str().context("path")?,
            "--allow-peer",
            &member_peer,
        ],
    )?;
    let server_peer = access::read_identity(&server_id)?.public().to_peer_id();
    assert_eq!(
        s.peer_id(),
        server_peer.to_string(),
        "serve uses --identity"
    );
    let boot = s.addr();
    let member = ["--identity", member_id];
    wait_servers(&boot, &member, 1)?;
    let local = generate(&[])?.map_err(anyhow::Error::msg)?;
    let swarm =
        generate(&[&member[..], &["--swarm", &boot]].concat())?.map_err(anyhow::Error::msg)?;
    assert_eq!(swarm, local, "the named peer gets the local text");

    let topic = model_id(&boot, &member)?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(outsider_gets_nothing(Access::default(), &[&s], &topic))?;
    for addr in [tcp_addr(&s)?, quic_addr(&s)?] {
        assert_eq!(
            status_servers(&addr, &[])?,
            0,
            "status from another peer id"
        );
        generate(&["--swarm", &addr])?.expect_err("an unlisted peer generated");
    }
    Ok(())
}
