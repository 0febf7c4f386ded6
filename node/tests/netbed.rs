//! Real `nomoat` processes on separate hosts of the network test bed
//! (namespaces joined by a switch with per-link delay and loss, home
//! routers, a LAN bridge), with the real SmolLM2. Every generated text is
//! compared byte for byte with the same model run whole on this machine.
//! Runs as root (CI does).

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nomoat_node::netbed::{Bed, Link, Nat};
use nomoat_tests::harness::Proc;

nomoat_tests::process_helpers!();

/// One bed at a time: each runs several servers, and a small machine
/// cannot run two such swarms at once without starving both.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const PROMPT: &str = "What is the capital of France?";
const MAX_TOKENS: &str = "32";

/// `nomoat ARGS` in host `host`, started and waited for its JSON line.
fn spawn_in(bed: &Bed, host: &str, args: &[&str], home: Option<&Path>) -> Result<Proc> {
    let bin = nomoat_bin()?;
    let bin = bin.to_str().context("binary path")?;
    let ns = bed.host(host).ns.clone();
    let mut all = vec!["netns", "exec", &ns, bin];
    all.extend_from_slice(args);
    let env: Vec<(&str, &std::ffi::OsStr)> = home
        .map(|h| vec![("NOMOAT_HOME", h.as_os_str())])
        .unwrap_or_default();
    Ok(Proc::spawn_command(
        Path::new("ip"),
        &all,
        &env,
        Duration::from_secs(120),
    )?)
}

/// A SmolLM2 server of `blocks` in `host`.
fn server(bed: &Bed, host: &str, blocks: &str, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "serve",
        "--model",
        "smollm2-135m",
        "--blocks",
        blocks,
        "--heartbeat",
        "0.5",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    spawn_in(bed, host, &args, None)
}

/// The listen address of `p` on `ip`, QUIC first.
fn addr_on(p: &Proc, ip: Ipv4Addr) -> Result<String> {
    let listen: Vec<String> = p.hello["listen"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let prefix = format!("/ip4/{ip}/");
    listen
        .iter()
        .find(|a| a.starts_with(&prefix) && a.contains("quic"))
        .or_else(|| listen.iter().find(|a| a.starts_with(&prefix)))
        .cloned()
        .with_context(|| format!("no address on {ip} in {listen:?}"))
}

/// `nomoat ARGS` in `host` (or here when `None`), to completion.
fn nomoat_in(bed: Option<&Bed>, host: &str, args: &[&str]) -> Result<(String, String)> {
    let mut cmd = match bed {
        Some(bed) => bed.command(host, nomoat_bin()?),
        None => Command::new(nomoat_bin()?),
    };
    let out = cmd.args(args).output()?;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        bail!("nomoat {args:?} in {host} failed: {stderr}");
    }
    Ok((stdout, stderr))
}

fn generate_args<'a>(prompt: &'a str, max_tokens: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "--model",
        "smollm2-135m",
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        max_tokens,
        "--prompt",
        prompt,
    ];
    a.extend_from_slice(extra);
    a
}

/// The text of the model run whole on this machine.
fn local_text(prompt: &str, max_tokens: &str) -> Result<String> {
    Ok(nomoat_in(None, "here", &generate_args(prompt, max_tokens, &[]))?.0)
}

/// `nomoat generate --swarm BOOT` in `host`: stdout and stderr.
fn swarm_text(bed: &Bed, host: &str, boot: &str, extra: &[&str]) -> Result<(String, String)> {
    let mut args = generate_args(PROMPT, MAX_TOKENS, &["--swarm", boot]);
    args.extend_from_slice(extra);
    nomoat_in(Some(bed), host, &args)
}

/// `nomoat status --swarm BOOT --json` in `host`, polled (bounded) until
/// it lists `servers` servers and no gaps.
fn wait_status(bed: &Bed, host: &str, boot: &str, servers: usize) -> Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = bed
            .command(host, nomoat_bin()?)
            .args(["status", "--swarm", boot, "--json"])
            .output()?;
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let n = status["servers"].as_array().map_or(0, Vec::len);
        let gaps = status["models"][0]["gaps"].as_array().map_or(1, Vec::len);
        if n == servers && gaps == 0 {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!(
                "status in {host} never showed {servers} servers covering the model: {status} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The `path:` line of hop `hop` in a client's stderr.
fn path_of(stderr: &str, hop: usize) -> Result<String> {
    stderr
        .lines()
        .find(|l| l.starts_with(&format!("path: hop {hop} ")))
        .map(String::from)
        .with_context(|| format!("no path line for hop {hop} in: {stderr}"))
}

/// Three servers on `s1`, `s2`, `s3` (blocks 0..10, 10..20, 20..30), the
/// first two bootstrapping from the third; returns them and the address to
/// bootstrap from.
fn three_servers(bed: &Bed) -> Result<(Vec<Proc>, String)> {
    let s3 = server(bed, "s3", "20..30", &[])?;
    let boot = addr_on(&s3, bed.ip("s3"))?;
    let s2 = server(bed, "s2", "10..20", &["--bootstrap", &boot])?;
    let s1 = server(bed, "s1", "0..10", &["--bootstrap", &boot])?;
    Ok((vec![s1, s2, s3], boot))
}

fn no_failover(stderr: &str) {
    assert!(
        !stderr.contains("failover:") && !stderr.contains("timed out"),
        "a healthy swarm failed over: {stderr}"
    );
}

#[test]
fn four_hosts_25ms_apart_generate_report_and_serve_the_api() -> Result<()> {
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    assert!(local.contains("Paris"), "{local}");
    let bed = Bed::builder()
        .hosts(&["s1", "s2", "s3", "client"])
        .default_link(Link::delay_ms(25))
        .build()?;
    let (_servers, boot) = three_servers(&bed)?;
    // `status` from another host, with no flags but the peer.
    let status = wait_status(&bed, "client", &boot, 3)?;
    for s in status["servers"].as_array().into_iter().flatten() {
        let rtt = s["rtt_ms"].as_f64().unwrap_or(0.0);
        assert!(rtt >= 50.0, "an RTT under 2 x 25 ms: {s}");
    }
    let (text, stderr) = swarm_text(&bed, "client", &boot, &[])?;
    assert_eq!(text, local, "client stderr: {stderr}");
    no_failover(&stderr);
    for hop in 0..3 {
        assert!(path_of(&stderr, hop)?.contains(" direct "), "{stderr}");
    }

    // The gateway on the client host, with its default listen addresses.
    let gw = spawn_in(
        &bed,
        "client",
        &[
            "gateway",
            "--model",
            "smollm2-135m",
            "--swarm",
            &boot,
            "--api",
            "127.0.0.1:0",
        ],
        None,
    )?;
    let api = gw.hello["api"].as_str().context("api url")?.to_string();
    let script = format!(
        "import json, urllib.request\n\
         body = json.dumps({{'model': 'smollm2-135m', 'temperature': 0, 'max_tokens': {MAX_TOKENS}, \
         'messages': [{{'role': 'user', 'content': {PROMPT:?}}}]}}).encode()\n\
         r = urllib.request.Request('{api}/chat/completions', body, {{'Content-Type': 'application/json'}})\n\
         print(json.load(urllib.request.urlopen(r, timeout=300))['choices'][0]['message']['content'], end='')"
    );
    let out = bed
        .command("client", "python3")
        .args(["-c", &script])
        .output()?;
    assert!(
        out.status.success(),
        "{}; gateway: {}",
        String::from_utf8_lossy(&out.stderr),
        gw.stderr.text()
    );
    assert_eq!(String::from_utf8(out.stdout)?, local.trim_end());
    Ok(())
}

#[test]
fn lossy_links_and_a_200ms_round_trip_cause_no_spurious_failover() -> Result<()> {
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    let bed = Bed::builder()
        .hosts(&["s1", "s2", "s3", "client"])
        .default_link(Link::delay_ms(25).loss(0.01))
        .link("client", "s2", Link::delay_ms(100).loss(0.01))
        .seed(7)
        .build()?;
    let (_servers, boot) = three_servers(&bed)?;
    wait_status(&bed, "client", &boot, 3)?;
    // A tight step timeout: retransmissions and the long link stay within it.
    let (text, stderr) = swarm_text(&bed, "client", &boot, &["--step-timeout", "5"])?;
    assert_eq!(text, local, "client stderr: {stderr}");
    no_failover(&stderr);
    let dropped: u64 = bed
        .wan_hosts()
        .iter()
        .flat_map(|a| bed.wan_hosts().iter().map(move |b| (a, b)))
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            bed.counters(a, b)
                .dropped
                .load(std::sync::atomic::Ordering::Relaxed)
        })
        .sum();
    assert!(dropped > 0, "the links dropped nothing");
    Ok(())
}

#[test]
fn udp_blocked_between_two_hosts_falls_back_to_tcp() -> Result<()> {
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    let bed = Bed::builder()
        .hosts(&["s1", "s2", "s3", "client"])
        .default_link(Link::delay_ms(5))
        .block_udp("client", "s2")
        .build()?;
    // s1 also hands out addresses nobody can reach (a wrong --external, a
    // private network of its own): dialling them costs the client nothing.
    let s3 = server(&bed, "s3", "20..30", &[])?;
    let boot = addr_on(&s3, bed.ip("s3"))?;
    let s2 = server(&bed, "s2", "10..20", &["--bootstrap", &boot])?;
    let unreachable = [
        "--bootstrap",
        &boot,
        "--external",
        "/ip4/10.99.0.250/udp/4001/quic-v1",
        "--external",
        "/ip4/192.168.77.1/tcp/4001",
    ];
    let s1 = server(&bed, "s1", "0..10", &unreachable)?;
    let _servers = [s1, s2, s3];
    wait_status(&bed, "client", &boot, 3)?;
    let started = Instant::now();
    let (text, stderr) = swarm_text(&bed, "client", &boot, &[])?;
    assert_eq!(text, local, "client stderr: {stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the client waited on unreachable addresses: {stderr}"
    );
    let s2 = path_of(&stderr, 1)?;
    assert!(s2.contains("/tcp/") && !s2.contains("quic"), "{s2}");
    assert!(path_of(&stderr, 0)?.contains("quic"), "{stderr}");
    let blocked = bed
        .counters("client", "s2")
        .udp_blocked
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(blocked > 0);
    Ok(())
}

/// A client at home (a cone NAT) and two servers behind home routers,
/// one cone, one symmetric, with no port forwarding: both serve through a
/// relay; DCUtR upgrades the client's relayed connection to the cone server
/// to a direct one, while the symmetric router's per-destination ports
/// defeat hole punching and the relay keeps carrying that hop.
#[test]
fn servers_behind_home_routers_serve_through_a_relay_and_punch_holes_where_they_can() -> Result<()>
{
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    let bed = Bed::builder()
        .hosts(&["relay", "s1"])
        .nat_host("home", Nat::Cone)
        .nat_host("cone", Nat::Cone)
        .nat_host("sym", Nat::Symmetric)
        .default_link(Link::delay_ms(10))
        .build()?;
    let relay = spawn_in(&bed, "relay", &["relay"], None)?;
    let relay_addr = addr_on(&relay, bed.ip("relay"))?;
    let s1 = server(&bed, "s1", "0..10", &["--bootstrap", &relay_addr])?;
    let boot = addr_on(&s1, bed.ip("s1"))?;
    let behind = ["--bootstrap", &boot, "--relay", &relay_addr];
    let cone = server(&bed, "cone", "10..20", &behind)?;
    let sym = server(&bed, "sym", "20..30", &behind)?;
    for p in [&cone, &sym] {
        let listen = p.hello["listen"].to_string();
        assert!(
            listen.contains("p2p-circuit"),
            "no relayed address: {listen}"
        );
    }
    wait_status(&bed, "home", &boot, 3)?;
    let (text, stderr) = swarm_text(&bed, "home", &boot, &[])?;
    assert_eq!(text, local, "client stderr: {stderr}");
    assert!(path_of(&stderr, 0)?.contains(" direct "), "{stderr}");
    assert!(path_of(&stderr, 1)?.contains(" upgraded "), "{stderr}");
    assert!(path_of(&stderr, 2)?.contains(" relayed "), "{stderr}");

    // The relay dies mid-session: the hop it carried fails within the
    // step timeout, named, and the client exits instead of hanging.
    let mut relay = relay;
    let args = generate_args(
        "Write a short story about a brave knight.",
        "200",
        &["--swarm", &boot, "--step-timeout", "5"],
    );
    let (status, _, stderr, elapsed) = interrupted(&bed, "home", &args, |_| {
        relay.kill();
        Ok(())
    })?;
    assert!(!status.success(), "the relayed hop cannot go on: {stderr}");
    assert!(
        stderr.contains("hop 2") && stderr.contains(&sym.peer_id()),
        "{stderr}"
    );
    assert!(elapsed < Duration::from_secs(20), "{elapsed:?}: {stderr}");
    drop((cone, sym, s1));
    Ok(())
}

/// A client behind a symmetric NAT whose router forgets its mappings
/// mid-generation: its packets then leave from new ports. libp2p's QUIC
/// does not migrate connections, so the client's connections die; with no
/// other server for the range, the client names the hop within the step
/// timeout instead of hanging, and a new generation works at once.
#[test]
fn a_nat_mapping_that_changes_mid_session_is_reported_not_hung_on() -> Result<()> {
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    let prompt = "Write a short story about a brave knight.";
    let bed = Bed::builder()
        .hosts(&["s1", "s2", "s3"])
        .nat_host("client", Nat::Symmetric)
        .default_link(Link::delay_ms(10))
        .build()?;
    let (_servers, boot) = three_servers(&bed)?;
    wait_status(&bed, "client", &boot, 3)?;
    let args = generate_args(prompt, "200", &["--swarm", &boot, "--step-timeout", "5"]);
    let (status, long, stderr, elapsed) =
        interrupted(&bed, "client", &args, |_| bed.reset_nat("client"))?;
    if status.success() {
        // Survived (a failover, or a mapping that came back): then exact.
        assert_eq!(long, local_text(prompt, "200")?, "client stderr: {stderr}");
    } else {
        assert!(stderr.contains("hop "), "{stderr}");
        assert!(elapsed < Duration::from_secs(20), "{elapsed:?}: {stderr}");
    }
    let (text, stderr) = swarm_text(&bed, "client", &boot, &[])?;
    assert_eq!(text, local, "client stderr: {stderr}");
    Ok(())
}

#[test]
fn servers_on_one_lan_find_each_other_with_mdns() -> Result<()> {
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    let bed = Bed::builder()
        .lan_host("l1")
        .lan_host("l2")
        .lan_host("client")
        .build()?;
    let _a = server(&bed, "l1", "0..15", &["--mdns"])?;
    let _b = server(&bed, "l2", "15..30", &["--mdns"])?;
    let args = generate_args(PROMPT, MAX_TOKENS, &["--mdns"]);
    let (text, stderr) = nomoat_in(Some(&bed), "client", &args)?;
    assert_eq!(text, local, "client stderr: {stderr}");
    Ok(())
}

/// Runs `nomoat ARGS` in `host`; once text flows, calls `act` with the
/// client's stderr so far (its `route:` line), then waits (bounded) for the
/// client to exit. Returns its status, stdout, stderr and the time from
/// `act` to its exit.
fn interrupted(
    bed: &Bed,
    host: &str,
    args: &[&str],
    act: impl FnOnce(&str) -> Result<()>,
) -> Result<(std::process::ExitStatus, String, String, Duration)> {
    let mut client = bed
        .command(host, nomoat_bin()?)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stderr = client.stderr.take().context("piped")?;
    let (etx, erx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut all = String::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
            let _ = etx.send(all.clone());
        }
    });
    let mut stdout = client.stdout.take().context("piped")?;
    let (otx, orx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || otx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut text = orx.recv_timeout(Duration::from_secs(90))?;
    let mut seen = String::new();
    // The whole route line: a read may end in the middle of it.
    while !seen
        .split_once("route:")
        .is_some_and(|(_, rest)| rest.contains('\n'))
    {
        seen = erx.recv_timeout(Duration::from_secs(30))?;
    }
    act(&seen)?;
    let acted = Instant::now();
    let deadline = acted + Duration::from_secs(120);
    let status = loop {
        while let Ok(b) = orx.try_recv() {
            text.extend(b);
        }
        if let Some(s) = client.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            bail!("the client never finished after the interruption");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = acted.elapsed();
    std::thread::sleep(Duration::from_millis(200));
    while let Ok(b) = orx.try_recv() {
        text.extend(b);
    }
    while let Ok(s) = erx.try_recv() {
        seen = s;
    }
    Ok((status, String::from_utf8(text)?, seen, elapsed))
}

#[test]
fn a_server_killed_on_the_bed_fails_over_to_another_host() -> Result<()> {
    let _serial = serial();
    let max = "96";
    let prompt = "Write a short story about a brave knight.";
    let local = local_text(prompt, max)?;
    let bed = Bed::builder()
        .hosts(&["s1", "s2a", "s2b", "s3", "client"])
        .default_link(Link::delay_ms(10))
        .build()?;
    let s3 = server(&bed, "s3", "20..30", &[])?;
    let boot = addr_on(&s3, bed.ip("s3"))?;
    let mut middle = [
        server(&bed, "s2a", "10..20", &["--bootstrap", &boot])?,
        server(&bed, "s2b", "10..20", &["--bootstrap", &boot])?,
    ];
    let _s1 = server(&bed, "s1", "0..10", &["--bootstrap", &boot])?;
    wait_status(&bed, "client", &boot, 4)?;
    let args = generate_args(prompt, max, &["--swarm", &boot, "--step-timeout", "5"]);
    let (status, text, seen, _) = interrupted(&bed, "client", &args, |route| {
        let routed = middle
            .iter()
            .position(|p| route.contains(&p.peer_id()))
            .context("neither middle server in the route")?;
        middle[routed].kill();
        Ok(())
    })?;
    assert!(status.success(), "client failed: {seen}");
    assert!(seen.contains("failover:"), "no failover: {seen}");
    assert_eq!(text, local, "client stderr: {seen}");
    Ok(())
}

#[test]
fn a_span_is_fetched_across_hosts_over_a_lossy_link() -> Result<()> {
    let _serial = serial();
    let homes: Vec<tempfile::TempDir> = (0..2)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?;
    let path = nomoat_node::catalog::resolve("smollm2-135m", false)?;
    let out = Command::new(nomoat_bin()?)
        .arg("import")
        .arg(&path)
        .env("NOMOAT_HOME", homes[0].path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout)?.trim().to_string();
    let bed = Bed::builder()
        .hosts(&["seeder", "fetcher"])
        .default_link(Link::delay_ms(10).loss(0.05))
        .seed(5)
        .build()?;
    let serve = |host: &str, blocks: &str, boot: Option<&str>, home: &Path| -> Result<Proc> {
        let mut args = vec![
            "serve",
            "--model",
            &id,
            "--blocks",
            blocks,
            "--heartbeat",
            "0.5",
            "--threads",
            "1",
        ];
        if let Some(b) = boot {
            args.extend(["--bootstrap", b]);
        }
        spawn_in(&bed, host, &args, Some(home))
    };
    let seeder = serve("seeder", "0..10", None, homes[0].path())?;
    let boot = addr_on(&seeder, bed.ip("seeder"))?;
    // Three blocks (about 9 MB): loss caps what congestion control allows
    // on the link, so a whole model would take minutes.
    let fetcher = serve("fetcher", "10..13", Some(&boot), homes[1].path())?;
    let fetch = &fetcher.hello["fetch"];
    assert!(fetch["fetched"].as_u64() > Some(0), "{}", fetcher.hello);
    assert_eq!(fetch["rejected"].as_u64(), Some(0), "{fetch}");
    // Every stored chunk re-hashes to its name.
    let out = Command::new(nomoat_bin()?)
        .args(["verify", &id])
        .env("NOMOAT_HOME", homes[1].path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dropped = bed
        .counters("seeder", "fetcher")
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(dropped > 0, "the lossy link dropped nothing");
    Ok(())
}

/// A private swarm across hosts: three servers with a swarm key, a member
/// whose UDP to one server is blocked (so that hop runs over TCP under
/// pnet, the others over QUIC with the key proof) gets the local text; an
/// outsider host without the key finds and generates nothing.
#[test]
fn a_private_swarm_across_hosts_serves_members_only() -> Result<()> {
    let _serial = serial();
    let local = local_text(PROMPT, MAX_TOKENS)?;
    let dir = tempfile::tempdir()?;
    let key_path = dir.path().join("swarm.key");
    let key = key_path.to_str().context("path")?;
    nomoat_in(None, "here", &["swarm-key", key])?;
    let bed = Bed::builder()
        .hosts(&["s1", "s2", "s3", "member", "outsider"])
        .default_link(Link::delay_ms(5))
        .block_udp("member", "s2")
        .build()?;
    let member = ["--swarm-key", key];
    let s3 = server(&bed, "s3", "20..30", &member)?;
    let boot = addr_on(&s3, bed.ip("s3"))?;
    let with_boot = [&member[..], &["--bootstrap", &boot]].concat();
    let s2 = server(&bed, "s2", "10..20", &with_boot)?;
    let s1 = server(&bed, "s1", "0..10", &with_boot)?;
    let _servers = [s1, s2, s3];
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (out, _) = nomoat_in(
            Some(&bed),
            "member",
            &["status", "--swarm", &boot, "--json", "--swarm-key", key],
        )?;
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        if status["servers"].as_array().map_or(0, Vec::len) == 3 {
            break;
        }
        ensure_before(deadline, "the member never saw the three servers")?;
        std::thread::sleep(Duration::from_millis(300));
    }
    let (text, stderr) = swarm_text(&bed, "member", &boot, &member)?;
    assert_eq!(text, local, "member stderr: {stderr}");
    let hop1 = path_of(&stderr, 1)?;
    assert!(hop1.contains("/tcp/") && !hop1.contains("quic"), "{hop1}");
    assert!(path_of(&stderr, 0)?.contains("quic"), "{stderr}");
    // The outsider: status fails or finds no server, generate fails.
    let status = nomoat_in(
        Some(&bed),
        "outsider",
        &["status", "--swarm", &boot, "--json"],
    );
    if let Ok((out, _)) = status {
        let status: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(
            status["servers"].as_array().map_or(0, Vec::len),
            0,
            "{status}"
        );
    }
    assert!(swarm_text(&bed, "outsider", &boot, &["--step-timeout", "5"]).is_err());
    Ok(())
}

fn ensure_before(deadline: Instant, what: &str) -> Result<()> {
    if Instant::now() > deadline {
        bail!("{what}");
    }
    Ok(())
}
