//! `nomoat serve` as a child process: started, read, killed on drop. Used by
//! `nomoat bench swarm` and by the multi-process tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// A running `nomoat serve` process; killed when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    /// The process.
    pub child: Child,
    /// The JSON object of its first stdout line.
    pub hello: serde_json::Value,
}

impl ServeProcess {
    /// Runs `BIN serve ARGS` and waits (up to `timeout`) for its first line.
    pub fn spawn(bin: &Path, args: &[&str], timeout: Duration) -> Result<Self> {
        Self::spawn_env(bin, args, &[], timeout)
    }

    /// [`spawn`](Self::spawn) with extra environment variables (e.g. its
    /// own `NOMOAT_HOME`).
    pub fn spawn_env(
        bin: &Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        timeout: Duration,
    ) -> Result<Self> {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        Self::spawn_command(bin, &all, env, timeout)
    }

    /// Runs `BIN ARGS` (any command whose first stdout line is one JSON
    /// object: `serve`, `gateway`) and waits (up to `timeout`) for that line.
    pub fn spawn_command(
        bin: &Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        timeout: Duration,
    ) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = match rx.recv_timeout(timeout) {
            Ok(l) if !l.is_empty() => l,
            _ => {
                let _ = child.kill();
                let out = child.wait_with_output()?;
                bail!(
                    "nomoat {args:?} printed no JSON line; stderr:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        };
        let hello = serde_json::from_str(&line).with_context(|| format!("first line {line:?}"))?;
        Ok(Self { child, hello })
    }

    /// The first listen address (with `/p2p/PEER_ID`).
    pub fn addr(&self) -> String {
        self.hello["listen"][0]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The peer id.
    pub fn peer_id(&self) -> String {
        self.hello["peer_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
