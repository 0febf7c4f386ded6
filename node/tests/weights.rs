//! Weight sharing with the real SmolLM2 and real `nomoat` processes on
//! 127.0.0.1, each with its own `NOMOAT_HOME`: only the first node imports
//! the model; the others fetch verified chunks from their peers.
//!
//! A misbehaving peer is a `nomoat serve` started with the hidden,
//! test-only `--fault` flag (flip-chunks, tamper-manifest), which makes its
//! weight server corrupt what it sends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nomoat_node::engine::{ModelFile, Span, WeightMode};
use nomoat_node::store::ChunkStore;
use nomoat_node::weights::import;
use nomoat_tests::harness::Proc;

nomoat_tests::process_helpers!();

/// The tests of this file run one at a time (several servers each).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// `n` empty homes, one per node.
fn homes(n: usize) -> Result<Vec<tempfile::TempDir>> {
    Ok((0..n)
        .map(|_| tempfile::tempdir())
        .collect::<Result<_, _>>()?)
}

fn smollm2() -> Result<PathBuf> {
    Ok(nomoat_node::catalog::resolve("smollm2-135m", false)?)
}

/// `nomoat import` of SmolLM2 into `home`; returns the model id.
fn import_into(home: &Path) -> Result<String> {
    let out = Command::new(nomoat_bin()?)
        .arg("import")
        .arg(smollm2()?)
        .env("NOMOAT_HOME", home)
        .output()?;
    if !out.status.success() {
        bail!("import failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// `nomoat serve ARGS` with its own home; waits for its first line (after
/// any fetch).
fn serve_in(home: &Path, args: &[&str]) -> Result<Proc> {
    Ok(Proc::spawn_env(
        &nomoat_bin()?,
        args,
        &[("NOMOAT_HOME", home.as_os_str())],
        Duration::from_secs(120),
    )?)
}

fn serve_args<'a>(id: &'a str, blocks: &'a str, boot: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "--model",
        id,
        "--blocks",
        blocks,
        "--heartbeat",
        "0.5",
        "--threads",
        "1",
    ];
    for b in boot {
        a.extend(["--bootstrap", b]);
    }
    a
}

fn verify_in(home: &Path, id: &str) -> Result<String> {
    let out = Command::new(nomoat_bin()?)
        .args(["verify", id])
        .env("NOMOAT_HOME", home)
        .output()?;
    let stdout = String::from_utf8(out.stdout)?;
    if !out.status.success() {
        bail!(
            "verify failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// Runs `nomoat generate` (greedy chat); `home` None: the test's own.
fn generate(home: Option<&Path>, model: &str, swarm: Option<&str>) -> Result<(String, String)> {
    let mut cmd = Command::new(nomoat_bin()?);
    cmd.args([
        "generate",
        "--model",
        model,
        "--chat",
        "--temperature",
        "0",
        "--max-tokens",
        "40",
        "--prompt",
        "What is the capital of France?",
    ]);
    if let Some(s) = swarm {
        cmd.args(["--swarm", s]);
    }
    if let Some(h) = home {
        cmd.env("NOMOAT_HOME", h);
    }
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if !out.status.success() {
        bail!("generate failed: {stderr}");
    }
    Ok((String::from_utf8(out.stdout)?, stderr))
}

/// Chunk files in a home's store (temporary files start with `.`).
fn stored_chunks(home: &Path) -> usize {
    let Ok(dirs) = std::fs::read_dir(home.join("store").join("chunks")) else {
        return 0;
    };
    dirs.filter_map(|d| d.ok())
        .filter_map(|d| std::fs::read_dir(d.path()).ok())
        .flat_map(|files| files.filter_map(|f| f.ok()))
        .filter(|f| !f.file_name().to_string_lossy().starts_with('.'))
        .count()
}

fn fetch_of(p: &Proc) -> &serde_json::Value {
    &p.hello["fetch"]
}

#[test]
fn a_span_loaded_from_the_store_computes_what_the_file_computes() -> Result<()> {
    let home = tempfile::tempdir()?;
    let store = ChunkStore::open(home.path())?;
    let path = smollm2()?;
    let report = import(&store, &path)?;
    // The same file again: same id, nothing new.
    let again = import(&store, &path)?;
    assert_eq!(again.id, report.id);
    assert_eq!(again.new_chunks, 0);
    assert!(report.new_chunks > 0 && report.chunks == report.new_chunks);
    let from_file = ModelFile::open(&path)?;
    let from_store = ModelFile::open_store(&store, &report.id)?;
    assert_eq!(from_file.config(), from_store.config());
    let hidden = from_file.config().hidden_size;
    let x: Vec<f32> = (0..3 * hidden)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let x = candle_core::Tensor::from_vec(x, (1, 3, hidden), &candle_core::Device::Cpu)?;
    for (a, b) in [(0, 1), (10, 20), (29, 30)] {
        let s1 = Span::load(&from_file, a, b, WeightMode::Exact)?;
        let s2 = Span::load(&from_store, a, b, WeightMode::Exact)?;
        let y1 = s1.forward(&x, 0, &mut s1.new_cache())?;
        let y2 = s2.forward(&x, 0, &mut s2.new_cache())?;
        let (y1, y2) = (
            y1.flatten_all()?.to_vec1::<f32>()?,
            y2.flatten_all()?.to_vec1::<f32>()?,
        );
        assert!(
            y1.iter().zip(&y2).all(|(p, q)| p.to_bits() == q.to_bits()),
            "span {a}..{b} differs"
        );
    }
    // A span loads with only its own chunks in the store.
    let partial_home = tempfile::tempdir()?;
    let partial = ChunkStore::open(partial_home.path())?;
    partial.put_manifest(&report.manifest)?;
    for c in report.manifest.chunks_for(&(10..12), false) {
        partial.put(&c.hash, &store.get(&c.hash)?.context("stored")?)?;
    }
    let file = ModelFile::open_store(&partial, &report.id)?;
    Span::load(&file, 10, 12, WeightMode::Fast)?;
    let err = Span::load(&file, 12, 13, WeightMode::Fast).unwrap_err();
    assert!(err.to_string().contains("not in the weight store"), "{err}");
    Ok(())
}

#[test]
fn tiny_models_from_the_store_compute_what_their_files_compute() -> Result<()> {
    use candle_core::quantized::GgmlDType;
    use nomoat_node::engine::LocalModel;
    use nomoat_tests::{TinyArch, TinyModel, TinySpec};
    let dir = tempfile::tempdir()?;
    let store = ChunkStore::open(&dir.path().join("home"))?;
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let model = TinyModel::generate(TinySpec::new(arch))?;
        let paths = [
            model.write_gguf(&dir.path().join(format!("{arch:?}.gguf")), GgmlDType::Q8_0)?,
            model.write_safetensors(&dir.path().join(format!("{arch:?}-st")))?,
        ];
        for path in paths {
            let report = import(&store, &path)?;
            let file = ModelFile::open(&path)?;
            let stored = ModelFile::open_store(&store, &report.id)?;
            let logits = |m: &ModelFile| -> Result<Vec<f32>> {
                let local = LocalModel::load(m, &[2, 6], WeightMode::Fast)?;
                let mut session = local.new_session();
                Ok(local
                    .forward_logits(&mut session, &[3, 17, 42, 5])?
                    .flatten_all()?
                    .to_vec1::<f32>()?)
            };
            assert_eq!(logits(&file)?, logits(&stored)?, "{}", path.display());
        }
    }
    Ok(())
}

#[test]
fn four_nodes_share_weights_and_generate_the_local_text() -> Result<()> {
    let _serial = serial();
    let homes = homes(4)?;
    let id = import_into(homes[0].path())?;
    let a = serve_in(homes[0].path(), &serve_args(&id, "0..10", &[]))?;
    let a_addr = a.addr();
    assert_eq!(a.hello["model_id"], id.as_str());
    assert!(fetch_of(&a).is_null(), "the importer fetches nothing");
    // B fetches blocks 10..20 from A.
    let b = serve_in(homes[1].path(), &serve_args(&id, "10..20", &[&a_addr]))?;
    let b_addr = b.addr();
    assert!(fetch_of(&b)["fetched"].as_u64() > Some(0), "{}", b.hello);
    // C fetches 15..30: blocks 15..20 from A and B, the rest from A.
    let c = serve_in(
        homes[2].path(),
        &serve_args(&id, "15..30", &[&a_addr, &b_addr]),
    )?;
    let per_peer = fetch_of(&c)["per_peer"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert!(
        per_peer.contains_key(&a.peer_id()) && per_peer.contains_key(&b.peer_id()),
        "C fetched from both A and B: {}",
        c.hello
    );
    assert_eq!(fetch_of(&c)["fetched"], fetch_of(&c)["needed"]);
    for home in [&homes[1], &homes[2]] {
        let v = verify_in(home.path(), &id)?;
        assert!(v.contains(" 0 corrupt"), "{v}");
    }
    // D holds nothing: it fetches the head and tokenizer, the blocks run on
    // A, B and C; the text is the local text byte for byte.
    let deadline = Instant::now() + Duration::from_secs(30);
    let swarm = loop {
        match generate(Some(homes[3].path()), &id, Some(&a_addr)) {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    };
    let local = generate(None, smollm2()?.to_str().context("path")?, None)?;
    assert!(local.0.contains("Paris"), "{local:?}");
    assert_eq!(swarm.0, local.0, "swarm stderr: {}", swarm.1);
    drop((a, b, c));
    Ok(())
}

#[test]
fn a_peer_sending_flipped_bytes_is_banned_and_the_download_completes() -> Result<()> {
    let _serial = serial();
    let homes = homes(3)?;
    let id = import_into(homes[0].path())?;
    assert_eq!(import_into(homes[1].path())?, id);
    let honest = serve_in(homes[0].path(), &serve_args(&id, "0..10", &[]))?;
    let mut bad_args = serve_args(&id, "10..20", &[]);
    bad_args.extend(["--fault", "flip-chunks"]);
    let bad = serve_in(homes[1].path(), &bad_args)?;
    let (h_addr, b_addr) = (honest.addr(), bad.addr());
    let f = serve_in(
        homes[2].path(),
        &serve_args(&id, "0..30", &[&b_addr, &h_addr]),
    )?;
    let report = fetch_of(&f);
    let banned: Vec<&str> = report["banned"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    assert_eq!(banned, [bad.peer_id().as_str()], "{}", f.hello);
    assert!(report["rejected"].as_u64() >= Some(3), "{}", f.hello);
    assert!(
        !report["per_peer"]
            .as_object()
            .is_some_and(|m| m.contains_key(&bad.peer_id())),
        "no chunk from the bad peer was kept: {}",
        f.hello
    );
    assert_eq!(report["fetched"], report["needed"]);
    // Every stored chunk re-verifies (the head's are not needed by a server).
    let v = verify_in(homes[2].path(), &id)?;
    assert!(v.contains(" 0 corrupt"), "{v}");
    Ok(())
}

#[test]
fn a_stalling_peer_is_banned_and_the_download_completes_elsewhere() -> Result<()> {
    let _serial = serial();
    let homes = homes(3)?;
    let id = import_into(homes[0].path())?;
    assert_eq!(import_into(homes[1].path())?, id);
    let honest = serve_in(homes[0].path(), &serve_args(&id, "0..10", &[]))?;
    let mut stall_args = serve_args(&id, "10..20", &[]);
    stall_args.extend(["--fault", "stall"]);
    let stalling = serve_in(homes[1].path(), &stall_args)?;
    let (s_addr, h_addr) = (stalling.addr(), honest.addr());
    let mut args = serve_args(&id, "0..30", &[&s_addr, &h_addr]);
    args.extend(["--fetch-stall-timeout", "2"]);
    let f = serve_in(homes[2].path(), &args)?;
    let r = fetch_of(&f);
    assert_eq!(r["fetched"], r["needed"], "{}", f.hello);
    let banned = r["banned"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        banned,
        [serde_json::json!(stalling.peer_id())],
        "{}",
        f.hello
    );
    Ok(())
}

#[test]
fn an_interrupted_download_resumes_without_fetching_stored_chunks_again() -> Result<()> {
    let _serial = serial();
    let homes = homes(2)?;
    let id = import_into(homes[0].path())?;
    let a = serve_in(homes[0].path(), &serve_args(&id, "0..10", &[]))?;
    let a_addr = a.addr();
    // A slow fetch (10 MB/s), killed once part of it is stored.
    let mut args = serve_args(&id, "0..30", &[&a_addr]);
    args.extend(["--fetch-rate", "10"]);
    let mut slow = Command::new(nomoat_bin()?)
        .arg("serve")
        .args(&args)
        .env("NOMOAT_HOME", homes[1].path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored_chunks(homes[1].path()) < 40 {
        if Instant::now() > deadline || slow.try_wait()?.is_some() {
            let _ = slow.kill();
            bail!("the fetch never got a quarter of the way");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    slow.kill()?;
    slow.wait()?;
    let before = stored_chunks(homes[1].path());
    // Restarted, it asks only for what is missing.
    let f = serve_in(homes[1].path(), &serve_args(&id, "0..30", &[&a_addr]))?;
    let r = fetch_of(&f);
    let needed = r["needed"].as_u64().context("a fetch report")? as usize;
    assert!(before < needed, "killed after it finished: {}", f.hello);
    assert_eq!(r["already"].as_u64(), Some(before as u64), "{}", f.hello);
    assert_eq!(
        r["requested"].as_u64(),
        Some((needed - before) as u64),
        "{}",
        f.hello
    );
    assert_eq!(r["fetched"], r["requested"]);
    let v = verify_in(homes[1].path(), &id)?;
    assert!(v.contains(" 0 corrupt"), "{v}");
    Ok(())
}

#[test]
fn a_manifest_tampered_with_in_transit_is_rejected() -> Result<()> {
    let _serial = serial();
    let homes = homes(2)?;
    let id = import_into(homes[0].path())?;
    let mut args = serve_args(&id, "0..30", &[]);
    args.extend(["--fault", "tamper-manifest"]);
    let bad = serve_in(homes[0].path(), &args)?;
    let err = generate(Some(homes[1].path()), &id, Some(&bad.addr())).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no peer gave a valid manifest") && msg.contains("hashes to"),
        "{msg}"
    );
    assert!(
        !homes[1]
            .path()
            .join("store")
            .join("manifests")
            .join(&id)
            .exists(),
        "the tampered manifest was not stored"
    );
    assert_eq!(stored_chunks(homes[1].path()), 0);
    Ok(())
}

/// A disk that fills up mid-fetch: a real ENOSPC from a small tmpfs mounted
/// as the fetching node's home, inside a user and mount namespace of its
/// own (`unshare -Urm`, no privilege needed). The node stops with the
/// disk-full error that says what to do, leaves no temporary file, and every
/// chunk it did store re-verifies.
#[test]
fn a_full_disk_stops_the_fetch_with_a_clear_error_and_keeps_only_whole_chunks() -> Result<()> {
    let _serial = serial();
    let homes = homes(2)?;
    let id = import_into(homes[0].path())?;
    let provider = serve_in(homes[0].path(), &serve_args(&id, "0..30", &[]))?;
    let addr = provider.addr();
    // The manifest (1.8 MB) fits; the span's 90 MB of chunks do not.
    let script = r#"mount -t tmpfs -o size=8m nomoat-full "$NOMOAT_HOME" || exit 90
"$0" serve "$@"
echo "serve-exit=$?"
echo "temp-files=$(find "$NOMOAT_HOME/store" -name '.*' -type f | wc -l)"
"$0" verify "$MODEL"
echo "verify-exit=$?""#;
    let mut args = vec!["-Urm", "sh", "-c", script];
    let bin = nomoat_bin()?;
    let bin = bin.to_str().context("binary path")?;
    args.push(bin);
    args.extend(serve_args(&id, "0..30", &[&addr]));
    let mut child = Command::new("unshare")
        .args(&args)
        .env("NOMOAT_HOME", homes[1].path())
        .env("MODEL", &id)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("unshare (util-linux) is needed to give the node a small disk")?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            child.kill()?;
            bail!("the node neither failed nor finished within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(90),
        "could not mount a tmpfs in a new namespace: {stderr}"
    );
    assert!(
        stdout.contains("serve-exit=1"),
        "serve must fail: {stdout}{stderr}"
    );
    assert!(
        stderr.contains("the disk is full while writing")
            && stderr.contains("free some space, or set NOMOAT_HOME"),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("the disk is full").count(),
        1,
        "said once: {stderr}"
    );
    assert!(stdout.contains("temp-files=0"), "{stdout}");
    // Some chunks made it; all of them are whole.
    let verified = stdout
        .lines()
        .find(|l| l.starts_with("model "))
        .with_context(|| format!("no verify line: {stdout}{stderr}"))?;
    assert!(verified.contains(" 0 corrupt"), "{verified}");
    assert!(!verified.contains(" 0 verified"), "{verified}");
    assert!(stdout.contains("verify-exit=0"), "{stdout}");
    drop(provider);
    Ok(())
}
