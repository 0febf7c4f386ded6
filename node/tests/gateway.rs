//! The gateway with real processes and the real SmolLM2: the official
//! `openai` Python client, raw HTTP for every bad request and for a swarm
//! with a coverage gap, the dashboard in headless Chromium, a config file,
//! and `nomoat demo --once`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use nomoat_node::gateway::http;
use nomoat_tests::harness::Proc;
use nomoat_tests::web::{wait_for, Browser, NomoatProc};
use serde_json::{json, Value};

nomoat_tests::process_helpers!();

/// The tests of this file run one at a time: several start three servers,
/// and on a small machine many at once would starve each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

const MODEL: &str = "smollm2-135m";
const HTTP_TIMEOUT: Duration = Duration::from_secs(300);

/// Servers for `ranges`, the first one everyone's bootstrap.
fn servers(ranges: &[&str]) -> Result<Vec<Proc>> {
    servers_of(MODEL, ranges, |_| None)
}

/// Servers of `model` for `ranges`, the first one everyone's bootstrap;
/// server `i` runs with `NOMOAT_HOME` at `home(i)` where that is some.
fn servers_of(
    model: &str,
    ranges: &[&str],
    home: impl Fn(usize) -> Option<std::path::PathBuf>,
) -> Result<Vec<Proc>> {
    let mut procs: Vec<Proc> = Vec::new();
    for (i, r) in ranges.iter().enumerate() {
        let boot = procs.first().map(Proc::addr);
        let mut args = vec![
            "--model",
            model,
            "--blocks",
            r,
            "--heartbeat",
            "0.5",
            "--threads",
            "1",
        ];
        if let Some(b) = &boot {
            args.extend(["--bootstrap", b.as_str()]);
        }
        let home = home(i);
        let env: Vec<_> = home
            .iter()
            .map(|h| ("NOMOAT_HOME", h.as_os_str()))
            .collect();
        procs.push(Proc::spawn_env(
            &nomoat_bin()?,
            &args,
            &env,
            Duration::from_secs(120),
        )?);
    }
    Ok(procs)
}

/// `nomoat gateway` on a free port, over the swarm of `boot` (or the whole
/// model when `None`).
fn gateway(boot: Option<&str>, extra: &[&str]) -> Result<NomoatProc> {
    let mut args = vec!["gateway", "--model", MODEL, "--api", "127.0.0.1:0"];
    if let Some(b) = boot {
        args.extend(["--swarm", b]);
    }
    args.extend(extra);
    NomoatProc::spawn(&nomoat_bin()?, &args, Duration::from_secs(120))
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn get(addr: SocketAddr, path: &str) -> Result<http::HttpResponse> {
    Ok(rt()?.block_on(http::request(addr, "GET", path, None, HTTP_TIMEOUT))?)
}

fn post(addr: SocketAddr, path: &str, body: &str) -> Result<http::HttpResponse> {
    Ok(rt()?.block_on(http::request(
        addr,
        "POST",
        path,
        Some(body.as_bytes()),
        HTTP_TIMEOUT,
    ))?)
}

/// Waits until the gateway's dashboard view shows `peers` peers and every
/// block covered.
fn wait_covered(addr: SocketAddr, peers: usize) -> Result<Value> {
    wait_for(
        "full coverage on the dashboard",
        Duration::from_secs(60),
        || {
            let v = get(addr, "/api/swarm")?.json();
            let n = v["peers"].as_array().map_or(0, Vec::len);
            Ok((n == peers && v["covered"] == true).then_some(v))
        },
    )
}

/// Checks OpenAI's error shape and returns the error object.
fn openai_error(r: &http::HttpResponse, status: u16) -> Result<Value> {
    ensure!(
        r.status == status,
        "expected {status}, got {}: {}",
        r.status,
        r.text()
    );
    let e = r.json()["error"].clone();
    for k in ["message", "type", "param", "code"] {
        ensure!(e.get(k).is_some(), "error object without `{k}`: {e}");
    }
    ensure!(
        !e["message"].as_str().unwrap_or_default().is_empty(),
        "empty message: {e}"
    );
    Ok(e)
}

/// Checks Anthropic's error shape and returns the error object.
fn anthropic_error(r: &http::HttpResponse, status: u16) -> Result<Value> {
    ensure!(
        r.status == status,
        "expected {status}, got {}: {}",
        r.status,
        r.text()
    );
    let v = r.json();
    ensure!(v["type"] == "error", "not Anthropic's error shape: {v}");
    let e = v["error"].clone();
    ensure!(e["type"].is_string(), "error object without `type`: {e}");
    ensure!(
        !e["message"].as_str().unwrap_or_default().is_empty(),
        "empty message: {e}"
    );
    Ok(e)
}

/// Runs `tests/python/SCRIPT ARGS` and returns the JSON of its last
/// stdout line.
fn run_python(script: &str, args: &[&str]) -> Result<Value> {
    let path = format!("{}/../tests/python/{script}", env!("CARGO_MANIFEST_DIR"));
    let python = std::env::var("NOMOAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = Command::new(&python)
        .arg(&path)
        .args(args)
        .output()
        .with_context(|| format!("running {python}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for package in ["openai", "anthropic"] {
        if stderr.contains(&format!("No module named '{package}'")) {
            bail!("the {package} package is missing: `{python} -m pip install {package}` (.ci/run does)");
        }
    }
    ensure!(
        out.status.success(),
        "{script} failed:\n{stderr}\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(serde_json::from_slice(
        out.stdout
            .split(|b| *b == b'\n')
            .rfind(|l| !l.is_empty())
            .unwrap_or_default(),
    )?)
}

fn chat_body(content: &str, extra: Value) -> String {
    let mut b = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 48,
    });
    if let (Some(b), Some(e)) = (b.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    b.to_string()
}

#[test]
fn official_openai_and_anthropic_clients_against_a_three_server_swarm() -> Result<()> {
    let _serial = serial();
    let procs = servers(&["0..10", "10..20", "20..30"])?;
    let gw = gateway(Some(&procs[0].addr()), &[])?;
    let addr = gw.http_addr()?;
    wait_covered(addr, 3)?;
    let seen = run_python("openai_client.py", &[&format!("http://{addr}/v1"), MODEL])?;
    let claude = run_python("anthropic_client.py", &[&format!("http://{addr}"), MODEL])?;
    assert!(
        seen["answer"]
            .as_str()
            .unwrap_or_default()
            .contains("Paris"),
        "{seen}"
    );
    // The same answer as `nomoat generate` on one node.
    let local = nomoat_tests::harness::greedy_text(
        &nomoat_bin()?,
        MODEL,
        "What is the capital of France?",
        48,
        &[],
        &[],
    )?;
    assert_eq!(
        seen["answer"].as_str().unwrap_or_default(),
        local.trim_end()
    );
    // Anthropic's API gives the same greedy text; its stop sequence cut
    // it just before "Paris", and a prefilled answer goes on from the
    // prefill.
    assert_eq!(claude["answer"], seen["answer"], "{claude}");
    let before = claude["before_stop"].as_str().unwrap_or_default();
    assert!(
        local.starts_with(before) && local[before.len()..].starts_with("Paris"),
        "{claude}"
    );
    assert!(
        claude["prefilled"]
            .as_str()
            .unwrap_or_default()
            .contains("Paris"),
        "{claude}"
    );
    // Four requests at once through the swarm, each on its own session.
    let body = chat_body("What is the capital of France?", json!({}));
    let answers = rt()?.block_on(async {
        let all = (0..4).map(|_| {
            http::request(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(body.as_bytes()),
                HTTP_TIMEOUT,
            )
        });
        futures::future::try_join_all(all).await
    })?;
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(
            a.json()["choices"][0]["message"]["content"],
            seen["answer"],
            "{}",
            a.text()
        );
    }
    // The metrics saw the sessions and steps.
    let metrics = get(addr, "/metrics")?.text();
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(value("nomoat_sessions_total") >= 3, "{metrics}");
    assert!(value("nomoat_steps_total") > 10, "{metrics}");
    assert!(value("nomoat_bytes_out_total") > 0, "{metrics}");
    assert!(value("nomoat_step_latency_seconds_count") > 10, "{metrics}");
    assert!(value("nomoat_hop_latency_seconds_count") > 10, "{metrics}");
    assert!(metrics.contains("nomoat_failovers_total 0"));
    Ok(())
}

#[test]
fn bad_requests_get_openai_errors_and_concurrent_requests_work() -> Result<()> {
    let _serial = serial();
    let gw = gateway(None, &[])?;
    let addr = gw.http_addr()?;
    let chat = "/v1/chat/completions";

    let e = openai_error(&post(addr, chat, "{not json")?, 400)?;
    assert_eq!(e["type"], "invalid_request_error");
    assert_eq!(e["code"], "invalid_json");

    let e = openai_error(
        &post(addr, chat, &chat_body("hi", json!({"model": "gpt-9"})))?,
        404,
    )?;
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    assert!(e["message"].as_str().unwrap_or_default().contains(MODEL));

    let e = openai_error(
        &post(
            addr,
            chat,
            &chat_body("hi", json!({"max_tokens": 9_000_000})),
        )?,
        400,
    )?;
    assert_eq!(e["code"], "context_length_exceeded");
    assert_eq!(e["param"], "max_tokens");

    let e = openai_error(
        &post(
            addr,
            chat,
            &json!({"model": MODEL, "messages": []}).to_string(),
        )?,
        400,
    )?;
    assert_eq!(e["param"], "messages");

    let e = openai_error(
        &post(addr, chat, &json!({"model": MODEL}).to_string())?,
        400,
    )?;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("messages"),
        "{e}"
    );

    for bad in [
        json!({"temperature": 5}),
        json!({"top_p": 0}),
        json!({"n": 3}),
    ] {
        openai_error(&post(addr, chat, &chat_body("hi", bad))?, 400)?;
    }
    for param in ["presence_penalty", "frequency_penalty"] {
        let e = openai_error(
            &post(addr, chat, &chat_body("hi", json!({param: 2.5})))?,
            400,
        )?;
        assert_eq!(e["param"], param);
    }
    let e = openai_error(
        &post(
            addr,
            "/v1/completions",
            &json!({"model": MODEL, "prompt": ""}).to_string(),
        )?,
        400,
    )?;
    assert_eq!(e["param"], "prompt");
    openai_error(&get(addr, "/v1/nothing-here")?, 404)?;
    openai_error(&get(addr, "/v1/models/gpt-9")?, 404)?;

    // Anthropic's route answers in Anthropic's error format.
    let messages = "/v1/messages";
    let e = anthropic_error(&post(addr, messages, "{not json")?, 400)?;
    assert_eq!(e["type"], "invalid_request_error");
    let e = anthropic_error(
        &post(
            addr,
            messages,
            &json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        )?,
        400,
    )?;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_tokens"),
        "{e}"
    );
    let e = anthropic_error(
        &post(
            addr,
            messages,
            &json!({"model": "claude-9", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        )?,
        404,
    )?;
    assert_eq!(e["type"], "not_found_error");
    let e = anthropic_error(&post(addr, "/v1/messages/nothing", "{}")?, 404)?;
    assert_eq!(e["type"], "not_found_error");
    let huge = format!(
        "{{\"model\": \"{MODEL}\", \"max_tokens\": 4, \"messages\": [{{\"role\": \"user\", \"content\": \"{}\"}}]}}",
        "a".repeat(2 << 20)
    );
    let e = anthropic_error(&post(addr, messages, &huge)?, 413)?;
    assert_eq!(e["type"], "request_too_large");
    assert_eq!(
        get(addr, &format!("/v1/models/{MODEL}"))?.json()["id"],
        MODEL
    );

    // Text completion with a stop string.
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stop": "."}).to_string(),
    )?;
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "text_completion");
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .contains("Paris"),
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    // A frequency penalty changes a greedy answer: every repeat costs more.
    let completion = |extra: Value| -> Result<String> {
        let mut body = json!({"model": MODEL, "prompt": "List the planets of the solar system:", "max_tokens": 24, "temperature": 0});
        for (k, v) in extra.as_object().into_iter().flatten() {
            body[k] = v.clone();
        }
        let r = post(addr, "/v1/completions", &body.to_string())?;
        assert_eq!(r.status, 200, "{}", r.text());
        Ok(r.json()["choices"][0]["text"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let plain = completion(json!({}))?;
    assert_eq!(plain, completion(json!({"frequency_penalty": 0}))?);
    let penalised = completion(json!({"frequency_penalty": 2}))?;
    assert_ne!(plain, penalised, "the penalty changed nothing: {plain:?}");

    // Four requests at once, each on its own session, all answered alike.
    let body = chat_body("What is the capital of France?", json!({}));
    let answers: Vec<Value> = rt()?
        .block_on(async {
            let all = (0..4)
                .map(|_| http::request(addr, "POST", chat, Some(body.as_bytes()), HTTP_TIMEOUT));
            futures::future::try_join_all(all).await
        })?
        .into_iter()
        .map(|r| r.json())
        .collect();
    let first = &answers[0]["choices"][0]["message"]["content"];
    assert!(
        first.as_str().unwrap_or_default().contains("Paris"),
        "{}",
        answers[0]
    );
    for a in &answers {
        assert_eq!(&a["choices"][0]["message"]["content"], first, "{a}");
    }
    // SSE: chunks, then the finish, then [DONE].
    let mut events = Vec::new();
    let (status, _) = rt()?.block_on(http::stream_events(
        addr,
        chat,
        chat_body("What is the capital of France?", json!({"stream": true})).as_bytes(),
        HTTP_TIMEOUT,
        |d| {
            events.push(d.to_string());
            true
        },
    ))?;
    assert_eq!(status, 200);
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let text: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(text.as_str(), first.as_str().unwrap_or_default());
    Ok(())
}

/// A gateway with one generation slot answers a request that arrives while
/// the slot is busy with OpenAI's 429, and serves again once it is free.
#[test]
fn a_request_beyond_max_concurrent_gets_429_and_the_slot_frees() -> Result<()> {
    let _serial = serial();
    let gw = gateway(None, &["--max-concurrent", "1"])?;
    let addr = gw.http_addr()?;
    // A long completion holds the only slot.
    let long = json!({"model": MODEL, "prompt": "Once upon a time, in a village by the sea,", "max_tokens": 300, "temperature": 0}).to_string();
    let first = std::thread::spawn(move || post(addr, "/v1/completions", &long));
    wait_for(
        "the first request generating",
        Duration::from_secs(30),
        || {
            let m = get(addr, "/metrics")?.text();
            Ok(m.lines()
                .any(|l| l == "nomoat_sessions_active 1")
                .then_some(()))
        },
    )?;
    let e = openai_error(
        &post(addr, "/v1/chat/completions", &chat_body("hi", json!({})))?,
        429,
    )?;
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], "too_many_concurrent_requests");
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--max-concurrent"),
        "{e}"
    );
    let first = first
        .join()
        .map_err(|_| anyhow::anyhow!("the first request's thread panicked"))??;
    assert_eq!(first.status, 200, "{}", first.text());
    assert!(
        first.json()["usage"]["completion_tokens"]
            .as_u64()
            .unwrap_or(0)
            > 10,
        "the first request was still generating when the second came"
    );
    // The slot is free again.
    let r = post(
        addr,
        "/v1/chat/completions",
        &chat_body("hi", json!({"max_tokens": 4})),
    )?;
    assert_eq!(r.status, 200, "{}", r.text());
    Ok(())
}

#[test]
fn a_coverage_gap_gets_503_naming_the_missing_blocks() -> Result<()> {
    let _serial = serial();
    let procs = servers(&["0..10", "20..30"])?;
    let gw = gateway(Some(&procs[0].addr()), &[])?;
    let addr = gw.http_addr()?;
    wait_for(
        "both servers on the dashboard",
        Duration::from_secs(60),
        || {
            let v = get(addr, "/api/swarm")?.json();
            Ok((v["peers"].as_array().map_or(0, Vec::len) == 2).then_some(()))
        },
    )?;
    let view = get(addr, "/api/swarm")?.json();
    assert_eq!(view["covered"], false);
    assert_eq!(view["gaps"], json!([{"start": 10, "end": 20}]));
    for path in ["/v1/chat/completions", "/v1/completions"] {
        let body = if path.contains("chat") {
            chat_body("hi", json!({}))
        } else {
            json!({"model": MODEL, "prompt": "hi"}).to_string()
        };
        let e = openai_error(&post(addr, path, &body)?, 503)?;
        assert_eq!(e["code"], "coverage_gap");
        assert!(
            e["message"].as_str().unwrap_or_default().contains("10..20"),
            "{e}"
        );
    }
    Ok(())
}

#[test]
fn dashboard_in_headless_chromium_shows_the_swarm_and_streams_a_chat() -> Result<()> {
    let _serial = serial();
    let procs = servers(&["0..10", "10..20", "20..30"])?;
    let gw = gateway(Some(&procs[0].addr()), &[])?;
    let addr = gw.http_addr()?;
    wait_covered(addr, 3)?;
    let mut browser = Browser::launch()?;
    let page = browser.open(&format!("http://{addr}/"))?;
    wait_for(
        "the map with three peers and full coverage",
        Duration::from_secs(60),
        || {
            let v = browser.eval(
                &page,
                "JSON.stringify({rows: document.querySelectorAll('#map .peer-row').length, \
             peers: document.querySelectorAll('#peers tbody tr').length, \
             coverage: document.getElementById('coverage').textContent, \
             gaps: document.querySelectorAll('#coverage-cells .gap').length, \
             covered: document.querySelectorAll('#coverage-cells .covered').length})",
            )?;
            let v: Value = serde_json::from_str(v.as_str().unwrap_or("{}"))?;
            Ok((v["rows"] == 3
                && v["peers"] == 3
                && v["coverage"] == "full coverage"
                && v["gaps"] == 0
                && v["covered"] == 30)
                .then_some(()))
        },
    )?;
    for p in &procs {
        let id = p.peer_id();
        let shown = browser.eval(
            &page,
            &format!(
                "document.getElementById('peers').innerHTML.includes('{}')",
                &id[id.len() - 6..]
            ),
        )?;
        assert_eq!(shown, true, "peer {id} not in the peers table");
    }
    browser.eval(
        &page,
        "document.getElementById('chat-input').value = 'What is the capital of France?'; \
         document.getElementById('chat-send').click(); true",
    )?;
    let (answer, chunks) = wait_for("the streamed answer", Duration::from_secs(180), || {
        let v = browser.eval(
            &page,
            "(() => { const a = document.querySelector('[data-answer=\"0\"]'); \
             return a && a.getAttribute('data-done') === '1' \
             ? JSON.stringify({text: a.textContent, chunks: a.getAttribute('data-chunks')}) : null })()",
        )?;
        Ok(v.as_str().map(serde_json::from_str::<Value>).transpose()?)
    })
    .map(|v| {
        (
            v["text"].as_str().unwrap_or_default().to_string(),
            v["chunks"].as_str().and_then(|c| c.parse::<usize>().ok()).unwrap_or(0),
        )
    })?;
    // The live counters pick the chat's session up on a later poll.
    wait_for(
        "the dashboard counting the chat's session",
        Duration::from_secs(30),
        || {
            let v = browser.eval(
                &page,
                "JSON.stringify({sessions: document.getElementById('total-sessions').textContent, \
                 tokens: document.getElementById('total-tokens').textContent})",
            )?;
            let v: Value = serde_json::from_str(v.as_str().unwrap_or("{}"))?;
            let n = |k: &str| {
                v[k].as_str()
                    .and_then(|s| s.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Ok((n("sessions") >= 1 && n("tokens") >= 1).then_some(()))
        },
    )?;
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("artifacts/dashboard.png");
    browser.screenshot(&page, &shot)?;
    println!("dashboard screenshot: {}", shot.display());
    assert!(answer.contains("Paris"), "{answer:?}");
    assert!(
        chunks > 1,
        "the answer came in {chunks} chunk(s), not streamed"
    );
    assert!(std::fs::metadata(&shot)?.len() > 1000);
    Ok(())
}

#[test]
fn a_config_file_and_variables_set_the_flags() -> Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("nomoat.toml");
    std::fs::write(
        &cfg,
        format!("model = \"{MODEL}\"\n\n[gateway]\napi = \"127.0.0.1:0\"\nname = \"from-the-file\"\nmax_concurrent = 2\n"),
    )?;
    let path = cfg.to_string_lossy().to_string();
    let gw = NomoatProc::spawn(
        &nomoat_bin()?,
        &["gateway", "--config", &path],
        Duration::from_secs(120),
    )?;
    let models = get(gw.http_addr()?, "/v1/models")?.json();
    assert_eq!(models["data"][0]["id"], "from-the-file", "{models}");
    drop(gw);
    // A variable wins over the file, a flag over both.
    let mut child = Command::new(nomoat_bin()?)
        .args(["gateway", "--config", &path, "--api", "127.0.0.1:0"])
        .env("NOMOAT_NAME", "from-the-variable")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let _ = child.kill();
    let _ = child.wait();
    let hello: Value = serde_json::from_str(&line)?;
    assert_eq!(hello["model"], "from-the-variable", "{hello}");
    // A key that is no flag of the command is an error naming it.
    std::fs::write(&cfg, "[gateway]\nno_such_flag = 1\n")?;
    let out = Command::new(nomoat_bin()?)
        .args(["gateway", "--config", &path])
        .output()?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no_such_flag"));
    // --help documents the variables.
    let help = Command::new(nomoat_bin()?)
        .args(["gateway", "--help"])
        .output()?;
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("NOMOAT_MAX_CONCURRENT"), "{help}");
    Ok(())
}

#[test]
fn demo_once_answers_and_leaves_no_process_behind() -> Result<()> {
    let _serial = serial();
    let mut child = Command::new(nomoat_bin()?)
        .args(["demo", "--once", "--port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let read_all = |r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut BufReader::new(r), &mut s);
            s
        })
    };
    let reader = read_all(Box::new(child.stdout.take().context("stdout")?));
    let err_reader = read_all(Box::new(child.stderr.take().context("stderr")?));
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nomoat demo --once did not exit within 600 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    assert!(
        status.success(),
        "demo failed: {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    let answer = out
        .lines()
        .find(|l| l.starts_with("A: "))
        .unwrap_or_default();
    assert!(answer.contains("Paris"), "stdout:\n{out}");
    assert!(out.contains("dashboard: http://127.0.0.1:"), "{out}");
    let pids: Vec<u32> = out
        .lines()
        .filter(|l| l.starts_with("server "))
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 3, "{out}");
    // Only the first server held the weights; the others fetched theirs.
    let fetched: Vec<u64> = out
        .lines()
        .filter(|l| l.starts_with("server "))
        .filter_map(|l| l.split("fetched ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(fetched.len(), 2, "{out}");
    assert!(fetched.iter().all(|&n| n > 0), "{out}");
    for pid in pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false);
        assert!(!alive, "server process {pid} is still running");
    }
    Ok(())
}

#[test]
fn serve_with_api_answers_through_its_own_swarm() -> Result<()> {
    let _serial = serial();
    let server = NomoatProc::spawn(
        &nomoat_bin()?,
        &[
            "serve",
            "--model",
            MODEL,
            "--blocks",
            "0..30",
            "--heartbeat",
            "0.5",
            "--threads",
            "1",
            "--api",
            "127.0.0.1:0",
        ],
        Duration::from_secs(120),
    )?;
    let addr = server.http_addr()?;
    let view = wait_covered(addr, 1)?;
    assert_eq!(view["peers"][0]["connection"], "direct", "{view}");
    let r = post(
        addr,
        "/v1/chat/completions",
        &chat_body("What is the capital of France?", json!({})),
    )?;
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.json()["choices"][0]["message"]["content"].clone();
    assert!(
        text.as_str().unwrap_or_default().contains("Paris"),
        "{text}"
    );
    Ok(())
}

#[test]
fn an_api_key_is_required_and_foreign_hosts_and_origins_are_refused() -> Result<()> {
    let _serial = serial();
    let key = "sk-nomoat-test-4f2a9c81";
    let gw = gateway(None, &["--api-key", key])?;
    let addr = gw.http_addr()?;
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    let seen = run_python("api_guard.py", &[&ip, &port, MODEL, key])?;
    // The right key: an answer, and the model listed.
    assert!(
        seen["answer"]
            .as_str()
            .unwrap_or_default()
            .contains("Paris"),
        "{seen}"
    );
    assert_eq!(seen["models"], json!([MODEL]), "{seen}");
    // A wrong key: OpenAI's 401, with the key masked.
    assert_eq!(seen["wrong_key"]["status"], 401, "{seen}");
    let body = &seen["wrong_key"]["body"];
    assert_eq!(body["code"], "invalid_api_key", "{seen}");
    assert_eq!(body["type"], "invalid_request_error", "{seen}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(msg.contains("Incorrect API key"), "{msg}");
    assert!(
        !msg.contains("sk-wrong-0000000000"),
        "the key is echoed: {msg}"
    );
    // No key at all: 401 saying how to send one.
    assert_eq!(seen["no_key"]["status"], 401, "{seen}");
    let msg = seen["no_key"]["body"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("Authorization: Bearer"), "{msg}");
    // DNS rebinding (a foreign Host) and a cross-site page (a foreign
    // Origin) are refused even with the key.
    for case in ["rebound_host", "foreign_origin"] {
        assert_eq!(seen[case]["status"], 403, "{case}: {seen}");
        assert_eq!(seen[case]["body"]["error"]["code"], "forbidden", "{case}");
    }
    // The dashboard's own origin is fine, and the dashboard needs no key.
    assert_eq!(seen["own_origin_dashboard"], 200, "{seen}");
    // Anthropic's client with the right key (x-api-key) gets the same
    // answer; a wrong key or none gets Anthropic's 401.
    assert_eq!(seen["anthropic_answer"], seen["answer"], "{seen}");
    assert_eq!(seen["anthropic_wrong_key"]["status"], 401, "{seen}");
    let body = &seen["anthropic_wrong_key"]["body"];
    assert_eq!(body["type"], "error", "{seen}");
    assert_eq!(body["error"]["type"], "authentication_error", "{seen}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("Incorrect API key"), "{msg}");
    assert!(
        !msg.contains("sk-wrong-0000000000"),
        "the key is echoed: {msg}"
    );
    assert_eq!(seen["anthropic_no_key"]["status"], 401, "{seen}");
    let msg = seen["anthropic_no_key"]["body"]["error"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(msg.contains("x-api-key"), "{msg}");
    // The gateway still answers the right key afterwards, from Rust too.
    let r = get(addr, "/v1/models")?;
    openai_error(&r, 401)?;
    Ok(())
}

#[test]
fn slow_http_clients_are_cut_off_while_others_are_served() -> Result<()> {
    use std::io::{Read, Write};
    let _serial = serial();
    let gw = gateway(None, &[])?;
    let addr = gw.http_addr()?;
    // Reads until the gateway closes the connection; returns what came
    // and how long it took.
    let until_closed = move |first: &'static [u8]| {
        std::thread::spawn(move || -> Result<(String, Duration)> {
            let mut c = std::net::TcpStream::connect(addr)?;
            c.set_read_timeout(Some(Duration::from_secs(90)))?;
            c.write_all(first)?;
            let began = Instant::now();
            let mut got = Vec::new();
            let _ = c.read_to_end(&mut got);
            Ok((String::from_utf8_lossy(&got).into_owned(), began.elapsed()))
        })
    };
    // Headers that never end (slowloris), and a body that never comes.
    let headers = until_closed(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    let body = until_closed(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"model\":",
    );
    // Meanwhile everyone else is served.
    let r = post(
        addr,
        "/v1/chat/completions",
        &chat_body("hi", json!({"max_tokens": 4})),
    )?;
    assert_eq!(r.status, 200, "{}", r.text());
    let join = |h: std::thread::JoinHandle<Result<(String, Duration)>>| {
        h.join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?
    };
    let (_, waited) = join(headers)?;
    assert!(
        waited < Duration::from_secs(30),
        "half-sent headers held the connection {waited:?}"
    );
    let (answer, waited) = join(body)?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(
        waited < Duration::from_secs(60),
        "a half-sent body held the connection {waited:?}"
    );
    Ok(())
}

#[test]
fn a_streaming_client_that_stops_reading_gives_up_its_slot() -> Result<()> {
    use std::io::{Read, Write};
    let _serial = serial();
    // One generation at a time: while the stalled client holds the slot,
    // everyone else gets 429.
    let gw = gateway(None, &["--max-concurrent", "1"])?;
    let addr = gw.http_addr()?;
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
    let stalled = std::thread::spawn(move || -> Result<(usize, String)> {
        // A small receive window, so the gateway's writes block soon.
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        sock.set_recv_buffer_size(4096)?;
        sock.connect(&addr.into())?;
        let mut c: std::net::TcpStream = sock.into();
        let body = json!({
            "model": MODEL,
            "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
            "max_tokens": 3000,
            "temperature": 0,
            "stream": true,
        })
        .to_string();
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        // The headers and the first events, then nothing more is read
        // (the socket stays open) until the test is over.
        let mut first = [0u8; 512];
        let n = c.read(&mut first)?;
        // The stream has begun: its generation holds the slot.
        let _ = started_tx.send(());
        let _ = done_rx.recv_timeout(Duration::from_secs(150));
        // Then whatever the gateway had queued, to its end (30 s at most).
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let until = Instant::now() + Duration::from_secs(30);
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < until {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => rest.extend_from_slice(&buf[..k]),
            }
        }
        Ok((n, String::from_utf8_lossy(&rest).into_owned()))
    });
    started_rx
        .recv_timeout(Duration::from_secs(60))
        .context("the stalled client's stream never began")?;
    let began = Instant::now();
    let (mut refused, mut served) = (0, None);
    while began.elapsed() < Duration::from_secs(120) {
        let r = post(
            addr,
            "/v1/chat/completions",
            &chat_body("hi", json!({"max_tokens": 1})),
        )?;
        match r.status {
            429 => refused += 1,
            200 => {
                served = Some(began.elapsed());
                break;
            }
            s => bail!("unexpected {s}: {}", r.text()),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = done_tx.send(());
    let (read, rest) = stalled
        .join()
        .map_err(|_| anyhow::anyhow!("the stalled client panicked"))??;
    assert!(read > 0, "the stalled client got its first bytes");
    // The generation was cut short, not run to its end: it never finished
    // (the 1-token answers count 1 generated token each), and the client
    // got no end of stream.
    let metrics = get(addr, "/metrics")?.text();
    let generated: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("nomoat_generated_tokens_total "))
        .context("no nomoat_generated_tokens_total in /metrics")?
        .trim()
        .parse()?;
    assert!(
        generated < 100.0,
        "{generated} tokens finished: the stalled generation ran"
    );
    assert!(
        !rest.contains("[DONE]") && !rest.contains("\"finish_reason\":\"length\""),
        "the stalled generation ran to its end: {}",
        rest.get(rest.len().saturating_sub(300)..).unwrap_or(&rest)
    );
    assert!(refused > 0, "the stalled client never held the slot");
    let served = served.context("the slot was never given up")?;
    // Filling the socket buffers takes seconds of decoding; then the
    // gateway waits CLIENT_STALL_TIMEOUT (30 s) for the client to read.
    assert!(
        served >= nomoat_node::gateway::CLIENT_STALL_TIMEOUT,
        "served after {served:?}: the slot was given up before the client stalled for the bound"
    );
    Ok(())
}

/// An open question, whose greedy answer a strong random adapter changes
/// (a one-word fact survives it).
const ADAPTER_PROMPT: &str = "Write two sentences about the sea.";

#[test]
fn a_lora_adapter_is_chosen_per_request_by_the_model_name() -> Result<()> {
    use nomoat_tests::lora::TestLora;
    use nomoat_tests::{TinyArch, TinySpec};
    let _serial = serial();
    let fetched = Command::new(nomoat_bin()?)
        .args(["fetch", MODEL])
        .output()?;
    ensure!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let model_path = String::from_utf8(fetched.stdout)?.trim().to_string();
    // A random rank-16 adapter of SmolLM2's shape, in the gateway's home only.
    let dir = tempfile::tempdir()?;
    let smollm2 = TinySpec {
        hidden: 576,
        heads: 9,
        kv_heads: 3,
        ffn: 1536,
        blocks: 30,
        vocab: 49152,
        context: 8192,
        ..TinySpec::new(TinyArch::Llama)
    };
    let peft =
        TestLora::random_for(&smollm2, 16, 64.0, 21, &[])?.write_peft(&dir.path().join("peft"))?;
    let home = dir.path().join("gateway-home");
    let home_env = [("NOMOAT_HOME", home.as_os_str())];
    let out = Command::new(nomoat_bin()?)
        .args(["import-adapter", "--model", &model_path, "--json"])
        .arg(&peft)
        .envs(home_env)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let imported: Value = serde_json::from_slice(&out.stdout)?;
    let id = imported["id"].as_str().context("adapter id")?.to_string();
    assert_eq!(imported["rank"], 16);
    // The local text with and without it.
    let local = |extra: &[&str]| -> Result<String> {
        let text = nomoat_tests::harness::greedy_text(
            &nomoat_bin()?,
            &model_path,
            ADAPTER_PROMPT,
            24,
            extra,
            &home_env,
        )?;
        Ok(text.trim_end().to_string())
    };
    let base_text = local(&[])?;
    let adapted_text = local(&["--adapter", &id])?;
    assert_ne!(base_text, adapted_text, "the adapter changes nothing");
    // Three servers with homes of their own: none has the adapter.
    let procs = servers_of(&model_path, &["0..10", "10..20", "20..30"], |i| {
        Some(dir.path().join(format!("server-{i}")))
    })?;
    let boot = procs[0].addr();
    let gw = NomoatProc::spawn_env(
        &nomoat_bin()?,
        &[
            "gateway",
            "--model",
            &model_path,
            "--api",
            "127.0.0.1:0",
            "--swarm",
            &boot,
        ],
        &home_env,
        Duration::from_secs(120),
    )?;
    let addr = gw.http_addr()?;
    wait_covered(addr, 3)?;
    let listed = get(addr, "/v1/models")?.json();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .map(|d| d.iter().filter_map(|m| m["id"].as_str()).collect())
        .unwrap_or_default();
    let gw_name = ids.first().copied().unwrap_or_default().to_string();
    let with_adapter = format!("{gw_name}:{id}");
    assert!(ids.contains(&with_adapter.as_str()), "{listed}");
    // One request with the adapter and one without, at once: each gives
    // its own local text.
    let body = |model: &str| {
        json!({
            "model": model,
            "messages": [{"role": "user", "content": ADAPTER_PROMPT}],
            "temperature": 0,
            "max_tokens": 24,
        })
        .to_string()
    };
    let (a, b) = (body(&with_adapter), body(&gw_name));
    let answers = rt()?.block_on(async {
        futures::future::try_join(
            http::request(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(a.as_bytes()),
                HTTP_TIMEOUT,
            ),
            http::request(
                addr,
                "POST",
                "/v1/chat/completions",
                Some(b.as_bytes()),
                HTTP_TIMEOUT,
            ),
        )
        .await
    })?;
    for (r, want) in [(&answers.0, &adapted_text), (&answers.1, &base_text)] {
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            json!(want),
            "{}",
            r.text()
        );
    }
    // Anthropic's route takes the same name.
    let r = post(
        addr,
        "/v1/messages",
        &json!({"model": with_adapter, "max_tokens": 24, "temperature": 0,
                "messages": [{"role": "user", "content": ADAPTER_PROMPT}]})
        .to_string(),
    )?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["content"][0]["text"], json!(adapted_text));
    // An adapter nobody holds is not a model here.
    let unknown = format!("{gw_name}:{}", "0".repeat(64));
    let e = openai_error(&post(addr, "/v1/chat/completions", &body(&unknown))?, 404)?;
    assert!(
        e["message"]
            .as_str()
            .unwrap_or_default()
            .contains("import-adapter"),
        "{e}"
    );
    Ok(())
}

/// A swarm with a liar (see `liar_swarm`) in which every dispute has a
/// third chain to settle it, so every answer equals the local one whatever
/// the route. When the liar is on a gateway's route (a new gateway, which
/// has never met it, is tried until one takes it), a non-streamed answer
/// is mended before it goes out, and a streamed one, whose text already
/// went out, ends with an error event naming the liar.
#[test]
fn the_gateway_mends_an_answer_a_liar_spoilt_and_ends_a_stream_with_an_error() -> Result<()> {
    const TRIES: usize = 10;
    let _serial = serial();
    let question = "Name three things a lighthouse keeper does every day.";
    let local = nomoat_tests::harness::greedy_text(&nomoat_bin()?, MODEL, question, 48, &[], &[])?;
    let (honest, liar) = liar_swarm()?;
    let boot = honest[0].addr();
    let mut mended = false;
    for _ in 0..TRIES {
        let gw = gateway(Some(&boot), &[])?;
        let addr = gw.http_addr()?;
        wait_covered(addr, 5)?;
        let r = post(
            addr,
            "/v1/chat/completions",
            &chat_body(question, json!({})),
        )?;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.json()["choices"][0]["message"]["content"],
            local.trim_end(),
            "every answer, mended or not, is the local one; the gateway said:\n{}",
            gw.stderr()
        );
        // A failover here is the liar leaving the route after its lie.
        if metric(addr, "nomoat_failovers_total")? >= 1 {
            mended = true;
            break;
        }
    }
    ensure!(mended, "the liar was on none of {TRIES} gateways' routes");
    drop((liar, honest));

    // A new swarm: the first one's servers now announce the speeds they
    // measured, which makes routes through the liar rarer.
    let (honest, liar) = liar_swarm()?;
    let (boot, liar_id) = (honest[0].addr(), liar.peer_id());

    let mut retracted = false;
    for _ in 0..TRIES {
        let gw = gateway(Some(&boot), &[])?;
        let addr = gw.http_addr()?;
        wait_covered(addr, 5)?;
        let stream = chat_body(question, json!({"stream": true}));
        let r = post(addr, "/v1/chat/completions", &stream)?;
        assert_eq!(r.status, 200, "{}", r.text());
        let body = r.text();
        let events: Vec<Value> = body
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        if let Some(message) = events.iter().find_map(|e| e["error"]["message"].as_str()) {
            ensure!(
                message.contains(&liar_id),
                "the error must name the liar {liar_id}: {body}"
            );
            ensure!(metric(addr, "nomoat_failovers_total")? >= 1);
            retracted = true;
            break;
        }
        let text: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            text,
            local.trim_end(),
            "a stream the liar was not on is whole; the gateway said:\n{}",
            gw.stderr()
        );
        ensure!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    }
    ensure!(
        retracted,
        "the liar was on none of {TRIES} gateways' streamed routes"
    );
    drop((liar, honest));
    Ok(())
}

/// Two honest pairs of servers of 0..16 and 14..30, and a whole-model
/// server that lies after 4 honest steps of every session: the liar alone
/// is the cheapest route (one round trip against two; the route jitter is
/// at most a quarter of a leg), and every dispute has a third chain.
fn liar_swarm() -> Result<(Vec<Proc>, Proc)> {
    let honest = servers(&["0..16", "14..30", "0..16", "14..30"])?;
    let liar = smollm2_serve(
        "0..30",
        Some(&honest[0].addr()),
        &["--threads", "1", "--fault-compute", "perturb:0.5,after=4"],
    )?;
    Ok((honest, liar))
}

/// The value of the gateway's metric `name` now (0 when absent).
fn metric(addr: SocketAddr, name: &str) -> Result<u64> {
    let metrics = get(addr, "/metrics")?.text();
    Ok(metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}
