//! The test bed itself: its links delay, drop and block what they should,
//! and its home routers map ports as a cone or a symmetric NAT does. Runs
//! as root (CI does); real packets between real namespaces.

use std::path::PathBuf;
use std::process::{Child, Stdio};

use anyhow::{bail, Context, Result};
use nomoat_node::netbed::{Bed, Link, Nat};

fn probe_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/netprobe.py")
}

/// Starts an echo server (`udp-echo` or `tcp-echo`) on `port` in `host`.
fn echo(bed: &Bed, host: &str, kind: &str, port: u16) -> Result<Child> {
    Ok(bed
        .command(host, "python3")
        .arg(probe_script())
        .args([kind, &port.to_string()])
        .stdout(Stdio::null())
        .spawn()?)
}

#[derive(Debug)]
struct Probe {
    sent: usize,
    answered: usize,
    rtts_ms: Vec<f64>,
    observed: Vec<String>,
}

fn probe(bed: &Bed, host: &str, args: &[String]) -> Result<Probe> {
    let out = bed
        .command(host, "python3")
        .arg(probe_script())
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("probe failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("probe output")?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0) as usize;
    Ok(Probe {
        sent: n("sent"),
        answered: n("answered"),
        rtts_ms: v["rtts_ms"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
            .unwrap_or_default(),
        observed: v["observed"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    })
}

fn udp_probe(
    bed: &Bed,
    from: &str,
    to: &str,
    port: u16,
    count: usize,
    timeout_s: f64,
    bind: u16,
) -> Result<Probe> {
    let args = [
        "udp-probe".to_string(),
        bed.ip(to).to_string(),
        port.to_string(),
        count.to_string(),
        timeout_s.to_string(),
        bind.to_string(),
    ];
    probe(bed, from, &args)
}

/// Waits (bounded) until a UDP echo in `to` answers `from`.
fn wait_udp(bed: &Bed, from: &str, to: &str, port: u16) -> Result<()> {
    for _ in 0..20 {
        if udp_probe(bed, from, to, port, 1, 0.5, 0)?.answered == 1 {
            return Ok(());
        }
    }
    bail!("the UDP echo in {to} never answered {from}")
}

#[test]
fn links_delay_and_drop_packets() -> Result<()> {
    let bed = Bed::builder()
        .hosts(&["a", "b"])
        .default_link(Link::delay_ms(20))
        .build()?;
    let _echo = echo(&bed, "b", "udp-echo", 9000)?;
    wait_udp(&bed, "a", "b", 9000)?;
    let p = udp_probe(&bed, "a", "b", 9000, 20, 2.0, 0)?;
    assert_eq!(p.answered, p.sent, "a lossless link lost packets: {p:?}");
    // A packet cannot arrive before its delay: 20 ms each way.
    let min = p.rtts_ms.iter().cloned().fold(f64::MAX, f64::min);
    assert!(min >= 40.0, "round trip {min:.1} ms on a 2 x 20 ms link");
    assert!(
        bed.counters("a", "b")
            .delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 20
    );

    // Half the packets lost each way: about a quarter of the probes answered.
    bed.set_link("a", "b", Link::delay_ms(1).loss(0.5));
    let p = udp_probe(&bed, "a", "b", 9000, 200, 0.2, 0)?;
    assert!(
        (20..=90).contains(&p.answered),
        "{} of 200 answered over a 50% loss link",
        p.answered
    );
    let dropped = bed
        .counters("a", "b")
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped >= 50, "only {dropped} dropped");
    Ok(())
}

#[test]
fn a_rate_limit_queues_packets_and_drops_past_its_buffer() -> Result<()> {
    let bed = Bed::builder()
        .hosts(&["a", "b"])
        .default_link(Link::IDEAL.rate_mbit(4.0))
        .build()?;
    let _udp = echo(&bed, "b", "udp-echo", 9000)?;
    wait_udp(&bed, "a", "b", 9000)?;
    // 100 datagrams of 1,000 bytes (0.2 s at 4 Mbit/s, within the buffer)
    // to a closed port, then a probe: it waits behind them.
    let script = format!(
        "import socket, time\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range(100): s.sendto(b'x' * 1000, ('{b}', 9999))\n\
         t = time.monotonic(); s.sendto(b'0', ('{b}', 9000)); s.settimeout(3)\n\
         s.recvfrom(2048); print((time.monotonic() - t) * 1000)",
        b = bed.ip("b")
    );
    let out = bed.command("a", "python3").args(["-c", &script]).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rtt: f64 = String::from_utf8(out.stdout)?.trim().parse()?;
    assert!(
        rtt >= 150.0,
        "the probe overtook 0.2 s of queue: {rtt:.1} ms"
    );
    let c = bed.counters("a", "b");
    assert_eq!(c.dropped.load(std::sync::atomic::Ordering::Relaxed), 0);
    // 400 more (0.8 s of queue) overflow the 250 ms buffer: drops.
    let script = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range(400): s.sendto(b'x' * 1000, ('{}', 9999))",
        bed.ip("b")
    );
    let out = bed.command("a", "python3").args(["-c", &script]).output()?;
    assert!(out.status.success());
    let dropped = c.dropped.load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped >= 100, "{dropped} dropped past a full buffer");
    Ok(())
}

#[test]
fn blocked_udp_lets_tcp_through() -> Result<()> {
    let bed = Bed::builder()
        .hosts(&["a", "b", "c"])
        .block_udp("a", "b")
        .build()?;
    let _u = echo(&bed, "b", "udp-echo", 9000)?;
    let _t = echo(&bed, "b", "tcp-echo", 9001)?;
    // c still reaches b over UDP, a does not.
    wait_udp(&bed, "c", "b", 9000)?;
    assert_eq!(udp_probe(&bed, "a", "b", 9000, 3, 0.3, 0)?.answered, 0);
    let blocked = bed
        .counters("a", "b")
        .udp_blocked
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(blocked >= 3);
    let args = [
        "tcp-probe".to_string(),
        bed.ip("b").to_string(),
        "9001".into(),
        "5".into(),
    ];
    assert_eq!(probe(&bed, "a", &args)?.answered, 1);
    Ok(())
}

/// What two servers see of one UDP socket behind a NAT: the same public
/// port (cone) or a different one each (symmetric).
fn observed_ports(nat: Nat) -> Result<(Bed, Vec<String>)> {
    let bed = Bed::builder()
        .hosts(&["s1", "s2"])
        .nat_host("home", nat)
        .build()?;
    let _e1 = echo(&bed, "s1", "udp-echo", 9000)?;
    let _e2 = echo(&bed, "s2", "udp-echo", 9000)?;
    wait_udp(&bed, "home", "s1", 9000)?;
    wait_udp(&bed, "home", "s2", 9000)?;
    let mut seen = Vec::new();
    for s in ["s1", "s2"] {
        let p = udp_probe(&bed, "home", s, 9000, 1, 1.0, 40000)?;
        assert_eq!(p.answered, 1);
        seen.push(p.observed[0].clone());
    }
    Ok((bed, seen))
}

#[test]
fn home_routers_map_as_cone_or_symmetric_nats() -> Result<()> {
    let (bed, seen) = observed_ports(Nat::Cone)?;
    let public = bed.ip("home").to_string();
    assert_ne!(public, bed.host("home").ip.to_string());
    for s in &seen {
        assert!(
            s.starts_with(&format!("{public}:")),
            "{s} is not the router"
        );
    }
    assert_eq!(seen[0], seen[1], "a cone NAT keeps the mapping: {seen:?}");
    // The host cannot be reached from outside: no port forwarding.
    let _e = echo(&bed, "home", "tcp-echo", 9001)?;
    let args = ["tcp-probe".to_string(), public, "9001".into(), "1".into()];
    assert_eq!(probe(&bed, "s1", &args)?.answered, 0);
    drop(bed);

    let (bed, seen) = observed_ports(Nat::Symmetric)?;
    let public = bed.ip("home").to_string();
    for s in &seen {
        assert!(
            s.starts_with(&format!("{public}:")),
            "{s} is not the router"
        );
    }
    assert_ne!(
        seen[0], seen[1],
        "a symmetric NAT maps per destination: {seen:?}"
    );
    Ok(())
}

#[test]
fn lan_hosts_share_a_bridge() -> Result<()> {
    let bed = Bed::builder().lan_host("l1").lan_host("l2").build()?;
    let _e = echo(&bed, "l2", "udp-echo", 9000)?;
    wait_udp(&bed, "l1", "l2", 9000)?;
    Ok(())
}
