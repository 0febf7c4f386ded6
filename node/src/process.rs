//! `nomoat serve` (or `gateway`) as a child process: started, read, killed
//! on drop. Used by `nomoat demo`, the benches and the multi-process tests.
//!
//! Both of the child's output pipes are drained for its whole life (stdout
//! after its first line is discarded, stderr is kept as a bounded tail for
//! error messages), so a child that logs a lot never blocks on a full pipe.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How much of a child's stderr is kept for error messages.
pub const STDERR_TAIL_BYTES: usize = 64 * 1024;

/// Why a child process did not start serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The program could not be started.
    #[error("starting {bin}: {source}")]
    Spawn {
        /// The program.
        bin: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited or stayed silent instead of printing its JSON line.
    #[error("nomoat {args:?} printed no JSON line within {timeout:?}; stderr:\n{stderr}")]
    Silent {
        /// Its arguments.
        args: Vec<String>,
        /// How long it was given.
        timeout: Duration,
        /// The tail of its stderr.
        stderr: String,
    },
    /// Its first line was not a JSON object.
    #[error("nomoat {args:?} printed {line:?} instead of a JSON line: {source}")]
    BadLine {
        /// Its arguments.
        args: Vec<String>,
        /// The line.
        line: String,
        /// Why it did not parse.
        #[source]
        source: serde_json::Error,
    },
}

/// The last [`STDERR_TAIL_BYTES`] a child wrote to stderr.
#[derive(Debug, Clone, Default)]
pub struct StderrTail(Arc<Mutex<VecDeque<u8>>>);

impl StderrTail {
    /// The tail as text.
    pub fn text(&self) -> String {
        let t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (a, b) = t.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    fn drain(&self, mut r: impl Read) {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
            t.extend(&buf[..n]);
            let over = t.len().saturating_sub(STDERR_TAIL_BYTES);
            t.drain(..over);
        }
    }
}

/// A running `nomoat serve` process; killed when dropped.
#[derive(Debug)]
pub struct ServeProcess {
    /// The process.
    pub child: Child,
    /// The JSON object of its first stdout line.
    pub hello: serde_json::Value,
    /// What it has written to stderr lately.
    pub stderr: StderrTail,
}

impl ServeProcess {
    /// Runs `BIN serve ARGS` and waits (up to `timeout`) for its first line.
    pub fn spawn(bin: &Path, args: &[&str], timeout: Duration) -> Result<Self, ProcessError> {
        Self::spawn_env(bin, args, &[], timeout)
    }

    /// [`spawn`](Self::spawn) with extra environment variables (e.g. its
    /// own `NOMOAT_HOME`).
    pub fn spawn_env(
        bin: &Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
        timeout: Duration,
    ) -> Result<Self, ProcessError> {
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
    ) -> Result<Self, ProcessError> {
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
        let stderr = StderrTail::default();
        if let Some(err) = child.stderr.take() {
            let tail = stderr.clone();
            std::thread::spawn(move || tail.drain(err));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut out = BufReader::new(out);
                let mut line = String::new();
                let _ = out.read_line(&mut line);
                let _ = tx.send(line);
                // Keep the pipe empty for the child's whole life.
                let _ = std::io::copy(&mut out, &mut std::io::sink());
            });
        }
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let line = match rx.recv_timeout(timeout) {
            Ok(l) if !l.is_empty() => l,
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                // The drain thread ends with the pipe; give it a moment.
                std::thread::sleep(Duration::from_millis(50));
                return Err(ProcessError::Silent {
                    args,
                    timeout,
                    stderr: stderr.text(),
                });
            }
        };
        let hello = serde_json::from_str(&line).map_err(|source| ProcessError::BadLine {
            args,
            line: line.clone(),
            source,
        })?;
        Ok(Self {
            child,
            hello,
            stderr,
        })
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

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// A child that writes far more than a pipe holds (64 KiB) to stderr
    /// before its JSON line, and to both pipes after it, still starts and
    /// runs to its end: nothing it writes is left unread.
    #[test]
    fn a_child_that_logs_more_than_a_pipe_holds_does_not_block() {
        let dir = std::env::temp_dir().join(format!("nomoat-pipe-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let script = format!(
            "head -c 300000 /dev/zero >&2; echo '{{\"listen\": []}}'; \
             head -c 300000 /dev/zero; head -c 300000 /dev/zero >&2; touch {}",
            dir.display()
        );
        let mut p = ServeProcess::spawn_command(
            Path::new("sh"),
            &["-c", &script],
            &[],
            Duration::from_secs(20),
        )
        .expect("the child printed its line despite 300 kB on stderr first");
        let status = p.child.wait().expect("the child ends");
        assert!(status.success());
        assert!(dir.exists(), "the child ran to its last command");
        assert!(p.stderr.text().len() <= STDERR_TAIL_BYTES);
        let _ = std::fs::remove_file(&dir);
    }
}
