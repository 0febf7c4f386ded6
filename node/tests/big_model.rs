//! A model bigger than its members: Qwen2.5-Coder-1.5B-Instruct (1.1 GB)
//! served by three `nomoat serve --max-memory` processes, each limited to
//! well below the model's size, that together hold every block. Through
//! the swarm the greedy text equals the local text, and each server's peak
//! resident memory (VmHWM) stays within its limit.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use nomoat_tests::harness::Proc;

nomoat_tests::process_helpers!();

const MODEL: &str = "qwen2.5-coder-1.5b";
/// The limit of each server: 58% of the model file.
const LIMIT: &str = "620MiB";
const LIMIT_BYTES: u64 = 620 << 20;
const MODEL_BYTES: u64 = 1_117_320_768;
const PROMPT: &str = "Write a Python function that returns the square of a number.";

/// Peak resident memory of a process, bytes.
fn peak_rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn server(bootstrap: Option<&str>) -> Result<Proc> {
    let mut args = vec![
        "--model",
        MODEL,
        "--blocks",
        "auto",
        "--max-blocks",
        "28",
        "--max-memory",
        LIMIT,
        "--threads",
        "1",
        "--heartbeat",
        "0.5",
    ];
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap", b]);
    }
    serve(&args)
}

fn generate(extra: &[&str]) -> Result<String> {
    nomoat_tests::harness::greedy_text(&nomoat_bin()?, MODEL, PROMPT, 24, extra, &[])
}

#[test]
fn three_servers_each_well_below_the_models_size_serve_it_together() -> Result<()> {
    const { assert!(LIMIT_BYTES < MODEL_BYTES * 6 / 10) };
    // Fetched once (and cached) before the servers race for it.
    let fetched = Command::new(nomoat_bin()?)
        .args(["fetch", MODEL])
        .output()?;
    ensure!(
        fetched.status.success(),
        "fetching {MODEL}: {}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let path = String::from_utf8(fetched.stdout)?;
    assert_eq!(std::fs::metadata(path.trim())?.len(), MODEL_BYTES);
    let local = generate(&[])?;
    ensure!(!local.trim().is_empty(), "the local text is empty");

    // Each takes the most blocks its limit holds, where the swarm is weakest.
    let first = server(None)?;
    let boot = first.addr();
    let mut servers = vec![first];
    let mut covered = Vec::new();
    for _ in 0..2 {
        servers.push(server(Some(&boot))?);
    }
    for s in &servers {
        let b = s.hello["blocks"].as_str().context("blocks")?;
        let (start, end) = b.split_once("..").context("blocks A..B")?;
        let (start, end): (u64, u64) = (start.parse()?, end.parse()?);
        ensure!(end - start < 28, "one server holds every block: {b}");
        covered.push((start, end));
    }
    covered.sort();
    let mut next = 0;
    for (start, end) in &covered {
        ensure!(
            *start <= next,
            "blocks {next}..{start} are held by nobody: {covered:?}"
        );
        next = next.max(*end);
    }
    ensure!(
        next == 28,
        "blocks {next}..28 are held by nobody: {covered:?}"
    );

    nomoat_tests::harness::wait_swarm_covered(&nomoat_bin()?, &boot, 3, Duration::from_secs(60))?;
    let swarm = generate(&["--swarm", &boot])?;
    assert_eq!(swarm, local, "the swarm's text differs from the local text");

    for s in &servers {
        let peak = peak_rss(s.child.id())?;
        println!(
            "server {:?}: peak RSS {} MiB of a {LIMIT} limit",
            s.hello["blocks"],
            peak >> 20
        );
        assert!(
            peak <= LIMIT_BYTES,
            "server {:?} peaked at {} MiB, over its {LIMIT} limit\n{}",
            s.hello["blocks"],
            peak >> 20,
            s.stderr.text()
        );
    }
    Ok(())
}
