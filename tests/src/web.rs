//! The HTTP side of the tests: `nomoat gateway` processes, and headless
//! Chromium driven over the DevTools protocol.
//!
//! Chromium is started with `--remote-debugging-pipe`: it reads DevTools
//! commands from file descriptor 3 and writes answers and events to file
//! descriptor 4, each a JSON object ended by a NUL byte. A shell wires the
//! child's stdin to fd 3 and its stdout to fd 4, so no port, websocket or
//! extra crate is involved, and nothing but the page's own requests touches
//! the network.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use nomoat_node::process::ServeProcess;

/// A `nomoat` process whose first stdout line is a JSON object (`gateway`,
/// `serve --api`); killed when dropped.
#[derive(Debug)]
pub struct NomoatProc(ServeProcess);

impl NomoatProc {
    /// Runs `BIN ARGS` and waits (up to `timeout`) for its first line.
    pub fn spawn(bin: &std::path::Path, args: &[&str], timeout: Duration) -> Result<Self> {
        Ok(Self(ServeProcess::spawn_command(bin, args, &[], timeout)?))
    }

    /// [`spawn`](Self::spawn) with more environment variables.
    pub fn spawn_env(
        bin: &std::path::Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        timeout: Duration,
    ) -> Result<Self> {
        Ok(Self(ServeProcess::spawn_command(bin, args, env, timeout)?))
    }

    /// The HTTP address of its API (from `"dashboard": "http://ADDR/"`).
    pub fn http_addr(&self) -> Result<SocketAddr> {
        let url = self.0.hello["dashboard"]
            .as_str()
            .context("no dashboard URL in the first line")?;
        let hostport = url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        Ok(hostport.parse()?)
    }

    /// What it has written to stderr lately.
    pub fn stderr(&self) -> String {
        self.0.stderr.text()
    }
}

/// Polls `f` every 100 ms until it returns `Some` (at most `limit`).
pub fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + limit;
    let mut last_err = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {limit:?} (last error: {last_err:?})");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Chromium binary: `NOMOAT_CHROMIUM`, or `chromium` on the PATH.
pub fn chromium_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NOMOAT_CHROMIUM") {
        return Ok(PathBuf::from(p));
    }
    for name in ["chromium", "chromium-browser"] {
        if let Ok(out) = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
        {
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if out.status.success() && !path.is_empty() {
                return Ok(PathBuf::from(path));
            }
        }
    }
    bail!("chromium is not installed: `apt-get install chromium` (.ci/run does), or set NOMOAT_CHROMIUM")
}

/// Headless Chromium over the DevTools pipe.
#[derive(Debug)]
pub struct Browser {
    child: Child,
    input: ChildStdin,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// How long one DevTools command may take.
pub const CDP_TIMEOUT: Duration = Duration::from_secs(60);

impl Browser {
    /// Starts headless Chromium with an empty profile and a 1280x900 window.
    pub fn launch() -> Result<Self> {
        let bin = chromium_bin()?;
        let profile = tempfile::tempdir()?;
        let log = profile.path().join("chromium.log");
        let script = format!(
            "exec '{}' --headless=new --no-sandbox --disable-gpu --disable-dev-shm-usage \
             --no-first-run --no-default-browser-check --disable-extensions \
             --disable-background-networking --window-size=1280,900 \
             --user-data-dir='{}' --remote-debugging-pipe about:blank \
             3<&0 4>&1 0</dev/null 1>'{}' 2>&1",
            bin.display(),
            profile.path().display(),
            log.display()
        );
        let mut child = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromium")?;
        let input = child.stdin.take().context("no stdin")?;
        let output = child.stdout.take().context("no stdout")?;
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(output);
            loop {
                let mut buf = Vec::new();
                match r.read_until(0, &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if buf.last() == Some(&0) {
                            buf.pop();
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                            if tx.send(v).is_err() {
                                break;
                            }
                        }
                    }
                }
            }
        });
        Ok(Self {
            child,
            input,
            messages,
            next_id: 0,
            _profile: profile,
        })
    }

    /// Sends a command (to a page when `session` is given) and returns its
    /// `result`; events in between are skipped.
    pub fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = s.into();
        }
        let mut bytes = serde_json::to_vec(&msg)?;
        bytes.push(0);
        self.input
            .write_all(&bytes)
            .and_then(|_| self.input.flush())
            .context("chromium's DevTools pipe closed")?;
        let deadline = Instant::now() + CDP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .messages
                .recv_timeout(left)
                .with_context(|| format!("no answer to {method} within {CDP_TIMEOUT:?}"))?;
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    bail!("{method} failed: {e}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Opens `url` in a new tab and returns the tab's session id.
    pub fn open(&mut self, url: &str) -> Result<String> {
        let target = self.call(None, "Target.createTarget", json!({"url": url}))?;
        let target_id = target["targetId"]
            .as_str()
            .context("no targetId")?
            .to_string();
        let attached = self.call(
            None,
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        )?;
        Ok(attached["sessionId"]
            .as_str()
            .context("no sessionId")?
            .to_string())
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, session: &str, expr: &str) -> Result<Value> {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        )?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("`{expr}` threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// A PNG screenshot of the page, written to `path`.
    pub fn screenshot(&mut self, session: &str, path: &Path) -> Result<()> {
        use base64::Engine;
        let r = self.call(
            Some(session),
            "Page.captureScreenshot",
            json!({"format": "png"}),
        )?;
        let data = r["data"].as_str().context("no screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call(None, "Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
