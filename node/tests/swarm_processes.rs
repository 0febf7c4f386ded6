//! Real `nomoat` processes with the real SmolLM2: three servers holding
//! blocks 0..10, 10..20 and 20..30 generate exactly the local text, and a
//! server killed mid-generation is named by the client.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use nomoat_tests::harness::Proc;

nomoat_tests::process_helpers!();

/// The tests of this file run one at a time: each starts three servers, and
/// on a small machine nine at once would starve each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the three servers (last first, the others bootstrapping from it)
/// and waits until `nomoat status` shows every block covered.
fn three_servers() -> Result<Vec<Proc>> {
    three_servers_with(&[])
}

/// [`three_servers`] with more `serve` arguments.
fn three_servers_with(extra: &[&str]) -> Result<Vec<Proc>> {
    let s3 = smollm2_serve("20..30", None, extra)?;
    let boot = s3.addr();
    let s2 = smollm2_serve("10..20", Some(&boot), extra)?;
    let s1 = smollm2_serve("0..10", Some(&boot), extra)?;
    nomoat_tests::harness::wait_swarm_covered(&nomoat_bin()?, &boot, 3, Duration::from_secs(30))?;
    Ok(vec![s1, s2, s3])
}

fn generate(extra: &[&str], prompt: &str) -> Result<(String, String)> {
    let out = Command::new(nomoat_bin()?)
        .args([
            "generate",
            "--model",
            "smollm2-135m",
            "--chat",
            "--temperature",
            "0",
            "--max-tokens",
            "48",
            "--prompt",
            prompt,
        ])
        .args(extra)
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        bail!("nomoat generate {extra:?} failed: {stderr}");
    }
    Ok((stdout, stderr))
}

#[test]
fn three_processes_generate_exactly_the_local_text() -> Result<()> {
    let _serial = serial();
    let servers = three_servers()?;
    let boot = servers[2].addr();
    for prompt in [
        "What is the capital of France?",
        "Name three colours of the rainbow.",
    ] {
        let (local, _) = generate(&[], prompt)?;
        let (swarm, stats) = generate(&["--swarm", &boot], prompt)?;
        assert!(!local.trim().is_empty());
        assert_eq!(swarm, local, "prompt {prompt:?}; client stderr: {stats}");
    }
    let (answer, _) = generate(&["--swarm", &boot], "What is the capital of France?")?;
    assert!(answer.contains("Paris"), "{answer:?}");
    // 8-bit blocks on every link still answer the question.
    let q = "What is the capital of France?";
    let (answer, stats) = generate(&["--swarm", &boot, "--wire-dtype", "q8"], q)?;
    assert!(answer.contains("Paris"), "q8: {answer:?}; {stats}");
    // An unknown dtype is refused by name.
    let err = generate(&["--swarm", &boot, "--wire-dtype", "f8"], q).unwrap_err();
    assert!(err.to_string().contains("f32, f16, bf16, q8"), "{err}");
    Ok(())
}

/// The reference prompts of the wire dtype checks.
const WIRE_PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write a haiku about the sea.",
];

#[test]
fn f16_on_every_link_gives_the_f32_text() -> Result<()> {
    // f32 weights: the blocks compute in f32 throughout. (The fast weights'
    // 8-bit matmuls quantize activations, and a near-tie can flip: see
    // DESIGN.md.)
    let _serial = serial();
    let servers = three_servers_with(&["--weights", "f32"])?;
    let boot = servers[2].addr();
    for prompt in WIRE_PROMPTS {
        let (local, _) = generate(&["--weights", "f32"], prompt)?;
        assert!(!local.trim().is_empty());
        let args = ["--weights", "f32", "--swarm", &boot, "--wire-dtype", "f16"];
        let (half, stats) = generate(&args, prompt)?;
        assert_eq!(
            half, local,
            "f16, prompt {prompt:?}; client stderr: {stats}"
        );
    }
    Ok(())
}

/// Starts a long generation through three servers, stops the middle
/// server once text flows (SIGKILL or SIGTERM), and returns the client's
/// exit status, its stderr, the time from the stop to the client's exit, and
/// the middle server's peer id and exit status.
fn stop_middle_mid_generation(
    signal: &str,
    step_timeout: f64,
) -> Result<(
    std::process::ExitStatus,
    String,
    Duration,
    String,
    Option<std::process::ExitStatus>,
)> {
    let mut servers = three_servers()?;
    let boot = servers[2].addr();
    let middle = servers[1].peer_id();
    let mut client = Command::new(nomoat_bin()?)
        .args([
            "generate",
            "--model",
            "smollm2-135m",
            "--chat",
            "--temperature",
            "0",
            "--max-tokens",
            "400",
        ])
        .args([
            "--prompt",
            "Write a long story about a brave knight and a dragon.",
        ])
        .args([
            "--swarm",
            &boot,
            "--step-timeout",
            &step_timeout.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Wait for the first generated bytes, then stop the middle server.
    let mut stdout = client.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(n).is_err() {
                break;
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))?;
    let stopped = Instant::now();
    let mut server_status = None;
    if signal == "KILL" {
        servers[1].kill();
    } else {
        let pid = servers[1].child.id().to_string();
        Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while server_status.is_none() && Instant::now() < deadline {
            server_status = servers[1].child.try_wait()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let deadline = stopped + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = client.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = client.kill();
            bail!("the client did not give up after the middle server stopped");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = stopped.elapsed();
    let mut stderr = String::new();
    client
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr)?;
    Ok((status, stderr, elapsed, middle, server_status))
}

#[test]
fn a_server_killed_mid_generation_is_named() -> Result<()> {
    let _serial = serial();
    let step_timeout = 5.0;
    let (status, stderr, elapsed, middle, _) = stop_middle_mid_generation("KILL", step_timeout)?;
    assert!(
        !status.success(),
        "the generation cannot finish without hop 1"
    );
    assert!(
        stderr.contains("hop 1") && stderr.contains(&middle),
        "stderr: {stderr}"
    );
    assert!(
        elapsed <= Duration::from_secs_f64(step_timeout + 3.0),
        "reported {elapsed:?} after the kill; stderr: {stderr}"
    );
    Ok(())
}

#[test]
fn a_server_stopped_with_sigterm_leaves_cleanly_and_says_so() -> Result<()> {
    let _serial = serial();
    // A long step timeout: the client must learn of the stop from the server,
    // not by waiting.
    let (status, stderr, elapsed, middle, server) = stop_middle_mid_generation("TERM", 60.0)?;
    let server = server.expect("the server exits after SIGTERM");
    assert!(server.success(), "serve exited with {server}");
    assert!(!status.success());
    assert!(
        stderr.contains("hop 1") && stderr.contains(&middle),
        "stderr: {stderr}"
    );
    assert!(
        elapsed < Duration::from_secs(15),
        "reported {elapsed:?} after SIGTERM; stderr: {stderr}"
    );
    Ok(())
}

/// Servers known to `boot`, as `nomoat status --json` reports them.
fn status(boot: &str) -> Result<serde_json::Value> {
    let out = Command::new(nomoat_bin()?)
        .args(["status", "--swarm", boot, "--json"])
        .output()?;
    Ok(serde_json::from_slice(&out.stdout).unwrap_or_default())
}

#[test]
fn servers_placed_automatically_cover_the_model_and_serve() -> Result<()> {
    let _serial = serial();
    let auto = [
        "--model",
        "smollm2-135m",
        "--blocks",
        "auto",
        "--max-blocks",
        "10",
        "--heartbeat",
        "0.5",
    ];
    let first = serve(&auto)?;
    let boot = first.addr();
    let mut servers = vec![first];
    for joined in 2..=3 {
        // Each joins once the swarm knows the ones before it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while status(&boot)?["servers"].as_array().map_or(0, Vec::len) < joined - 1 {
            assert!(
                Instant::now() < deadline,
                "server {} never announced",
                joined - 1
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut args = auto.to_vec();
        args.extend(["--bootstrap", boot.as_str()]);
        servers.push(serve(&args)?);
    }
    let mut spans: Vec<String> = servers
        .iter()
        .map(|s| s.hello["blocks"].as_str().unwrap_or_default().to_string())
        .collect();
    spans.sort();
    assert_eq!(spans, ["0..10", "10..20", "20..30"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = status(&boot)?;
        if st["models"][0]["gaps"]
            .as_array()
            .is_some_and(Vec::is_empty)
            && st["servers"].as_array().map_or(0, Vec::len) == 3
        {
            break;
        }
        assert!(Instant::now() < deadline, "never fully covered: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (answer, _) = generate(&["--swarm", &boot], "What is the capital of France?")?;
    assert!(answer.contains("Paris"), "{answer:?}");
    Ok(())
}

/// Bytes of text the first `n` tokens of `text` make, as the client
/// streams them.
fn prefix_bytes(text: &str, n: usize) -> Result<usize> {
    use nomoat_node::engine::{ChatTokenizer, ModelFile};
    let file = ModelFile::open(nomoat_node::catalog::resolve("smollm2-135m", false)?)?;
    let tok = ChatTokenizer::from_gguf(file.gguf_metadata().expect("a GGUF file"))?;
    let ids = tok.encode(text)?;
    Ok(tok.decode(&ids[..n.min(ids.len())], true)?.len())
}

#[test]
fn a_killed_middle_server_fails_over_to_a_spare_with_the_same_text() -> Result<()> {
    let _serial = serial();
    let mut servers = three_servers()?;
    let boot = servers[2].addr();
    let spare = smollm2_serve("10..20", Some(&boot), &[])?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while status(&boot)?["servers"].as_array().map_or(0, Vec::len) < 4 {
        assert!(Instant::now() < deadline, "the spare never announced");
        std::thread::sleep(Duration::from_millis(200));
    }
    let prompt = "Write a short story about a brave knight and a dragon.";
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "generate",
            "--model",
            "smollm2-135m",
            "--chat",
            "--temperature",
            "0",
            "--max-tokens",
            "64",
            "--prompt",
            prompt,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let reference = Command::new(nomoat_bin()?)
        .args(args(&["--swarm", &boot]))
        .output()?;
    assert!(reference.status.success());
    let reference = String::from_utf8(reference.stdout)?;
    let kill_after = prefix_bytes(&reference, 5)?;
    let mut client = Command::new(nomoat_bin()?)
        .args(args(&["--swarm", &boot]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The client names its route first: hop 1 is the middle server or the spare.
    let mut stderr = std::io::BufReader::new(client.stderr.take().expect("piped"));
    let mut line = String::new();
    let route = loop {
        line.clear();
        if std::io::BufRead::read_line(&mut stderr, &mut line)? == 0 {
            bail!("the client exited without a route");
        }
        if let Some(r) = line.strip_prefix("route: ") {
            break r.trim().to_string();
        }
    };
    let hop1 = route
        .split(" -> ")
        .nth(1)
        .and_then(|h| h.split(' ').next())
        .unwrap_or_default()
        .to_string();
    let mut stdout = client.stdout.take().expect("piped");
    let mut text = Vec::new();
    let mut buf = [0u8; 256];
    while text.len() < kill_after {
        let n = stdout.read(&mut buf)?;
        if n == 0 {
            bail!("the generation ended before {kill_after} bytes");
        }
        text.extend_from_slice(&buf[..n]);
    }
    let victim = if servers[1].peer_id() == hop1 {
        &mut servers[1]
    } else {
        assert_eq!(spare.peer_id(), hop1, "route {route}");
        // Keep the middle server as the spare of the spare.
        servers.push(spare);
        servers.last_mut().expect("just pushed")
    };
    victim.kill();
    stdout.read_to_end(&mut text)?;
    let mut rest = String::new();
    stderr.read_to_string(&mut rest)?;
    let status = client.wait()?;
    assert!(status.success(), "the client failed: {rest}");
    assert!(rest.contains("failover: hop 1..=1"), "stderr: {rest}");
    assert_eq!(
        String::from_utf8(text)?,
        reference,
        "route {route}; stderr: {rest}"
    );
    Ok(())
}
