//! OpenAI-compatible endpoints: `/v1/models`, `/v1/chat/completions` and
//! `/v1/completions`, with and without streaming (server-sent events).

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::job::Ask;
use super::sse::event_stream;
use super::{ApiError, Finish, Gateway, Job, JobEvent};
use crate::engine::{ChatMessage, SamplingParams, DEFAULT_REPETITION_WINDOW};

/// Most stop strings per request (as OpenAI).
pub const MAX_STOPS: usize = 4;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The sampling fields both endpoints share.
#[derive(Debug, Deserialize)]
struct Sampling {
    model: String,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    max_tokens: Option<usize>,
    max_completion_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    stop: Option<Stop>,
    seed: Option<u64>,
    n: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<Message>,
    #[serde(flatten)]
    sampling: Sampling,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    sampling: Sampling,
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let msg = if e.is_syntax() || e.is_eof() {
            format!("the request body is not valid JSON ({e}); send a JSON object with Content-Type: application/json")
        } else {
            format!("the request body does not match the API: {e}")
        };
        ApiError::invalid(None, msg).with_code("invalid_json")
    })
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(super) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// The messages of a chat request, checked.
fn chat_messages(req: &ChatRequest) -> Result<Vec<ChatMessage>, ApiError> {
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages is empty: send at least one message, e.g. [{\"role\": \"user\", \"content\": \"Hello\"}]",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                Some("messages"),
                format!("unknown role `{}`: use system, user or assistant", m.role),
            ));
        }
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            Some("messages"),
                            format!("content parts of type `{}` are not supported: this model reads text only", p.kind),
                        ));
                    }
                    t.push_str(&p.text);
                }
                t
            }
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        messages.push(ChatMessage::new(role, text));
    }
    Ok(messages)
}

/// The text of a completion request's prompt.
fn completion_text(prompt: Prompt) -> Result<String, ApiError> {
    match prompt {
        Prompt::One(t) => Ok(t),
        Prompt::Many(mut v) if v.len() == 1 => Ok(v.remove(0)),
        Prompt::Many(_) => Err(ApiError::invalid(
            Some("prompt"),
            "send one prompt per request (a string, or an array of one string)",
        )),
    }
}

/// The sampling fields of a request, checked on their own.
struct Checked {
    temperature: f32,
    top_p: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    stops: Vec<String>,
}

/// Checks the sampling fields that need no model.
fn check_sampling(s: &Sampling) -> Result<Checked, ApiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            Some("n"),
            "only n = 1 is supported; send one request per completion",
        ));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature {temperature} is out of range: use 0 (greedy) to 2"),
        ));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p {top_p} is out of range: use a value in (0, 1]"),
        ));
    }
    let penalty = |name: &'static str, v: Option<f32>| match v.unwrap_or(0.0) {
        v if (-2.0..=2.0).contains(&v) => Ok(v),
        v => Err(ApiError::invalid(
            Some(name),
            format!("{name} {v} is out of range: use -2 to 2"),
        )),
    };
    let presence_penalty = penalty("presence_penalty", s.presence_penalty)?;
    let frequency_penalty = penalty("frequency_penalty", s.frequency_penalty)?;
    let stops = match &s.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            Some("stop"),
            format!("at most {MAX_STOPS} stop strings"),
        ));
    }
    Ok(Checked {
        temperature,
        top_p,
        presence_penalty,
        frequency_penalty,
        stops,
    })
}

/// Parses and checks a request body as `POST /v1/chat/completions`
/// (`chat`) or `POST /v1/completions` does before the model is involved,
/// with the same typed errors. Decoders of untrusted input are fuzzed
/// through this.
pub fn check_body(chat: bool, body: &[u8]) -> Result<(), ApiError> {
    if chat {
        let req: ChatRequest = parse(body)?;
        chat_messages(&req)?;
        check_sampling(&req.sampling)?;
    } else {
        let req: CompletionRequest = parse(body)?;
        completion_text(req.prompt)?;
        check_sampling(&req.sampling)?;
    }
    Ok(())
}

/// Checks the sampling fields and turns them into a job for `prompt`.
fn job(gw: &Gateway, s: &Sampling, prompt: Vec<u32>) -> Result<Job, ApiError> {
    let Checked {
        temperature,
        top_p,
        presence_penalty,
        frequency_penalty,
        stops,
    } = check_sampling(s)?;
    gw.job(
        Ask {
            model: &s.model,
            max_tokens: s.max_completion_tokens.or(s.max_tokens),
            sampling: SamplingParams {
                temperature,
                top_k: 0,
                top_p,
                repetition_penalty: 1.0,
                repetition_window: DEFAULT_REPETITION_WINDOW,
                presence_penalty,
                frequency_penalty,
                seed: s.seed.unwrap_or_else(rand::random),
            },
            stops,
        },
        prompt,
    )
}

/// The final streamed chunk when usage was asked for: no choices, the usage.
fn usage_chunk(mut chunk: serde_json::Value, f: &Finish) -> serde_json::Value {
    chunk["choices"] = serde_json::json!([]);
    chunk["usage"] = usage(f);
    chunk
}

fn usage(f: &Finish) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
    })
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat_completions(State(gw): State<Gateway>, body: Bytes) -> Response {
    match chat(gw, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn chat(gw: Gateway, body: &[u8]) -> Result<Response, ApiError> {
    let req: ChatRequest = parse(body)?;
    let messages = chat_messages(&req)?;
    let text = gw.tokenizer().chat_prompt(&messages);
    let prompt = gw.encode(text).await?;
    let job = job(&gw, &req.sampling, prompt)?;
    let rx = gw.start_job(job).await?;
    let id = new_id("chatcmpl");
    let model = gw.model_name().to_string();
    let created = now_s();
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |delta: serde_json::Value, finish: Option<&str>| {
            serde_json::json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": null,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
            })
        };
        let first = chunk(
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        );
        Ok(sse(rx, first, include_usage, move |ev| match ev {
            Piece::Text(t) => chunk(serde_json::json!({"content": t}), None),
            Piece::End(f) => chunk(serde_json::json!({}), Some(f.reason)),
            Piece::Usage(f) => usage_chunk(chunk(serde_json::json!({}), None), f),
        }))
    } else {
        let (text, fin) = collect(rx).await?;
        Ok(Json(serde_json::json!({
            "id": id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "system_fingerprint": null,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": null,
                "finish_reason": fin.reason,
            }],
            "usage": usage(&fin),
        }))
        .into_response())
    }
}

/// `POST /v1/completions`.
pub(super) async fn completions(State(gw): State<Gateway>, body: Bytes) -> Response {
    match complete(gw, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn complete(gw: Gateway, body: &[u8]) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let text = completion_text(req.prompt)?;
    let prompt = gw.encode(text).await?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(
            Some("prompt"),
            "the prompt is empty: send some text",
        ));
    }
    let job = job(&gw, &req.sampling, prompt)?;
    let rx = gw.start_job(job).await?;
    let id = new_id("cmpl");
    let model = gw.model_name().to_string();
    let created = now_s();
    if req.sampling.stream {
        let include_usage = req.sampling.stream_options.is_some_and(|o| o.include_usage);
        let chunk = move |text: &str, finish: Option<&str>| {
            serde_json::json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            })
        };
        Ok(sse(
            rx,
            serde_json::Value::Null,
            include_usage,
            move |ev| match ev {
                Piece::Text(t) => chunk(t, None),
                Piece::End(f) => chunk("", Some(f.reason)),
                Piece::Usage(f) => usage_chunk(chunk("", None), f),
            },
        ))
    } else {
        let (text, fin) = collect(rx).await?;
        Ok(Json(serde_json::json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": fin.reason}],
            "usage": usage(&fin),
        }))
        .into_response())
    }
}

/// Waits for a whole answer.
pub(super) async fn collect(
    mut rx: mpsc::Receiver<JobEvent>,
) -> Result<(String, Finish), ApiError> {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Text(t) => text.push_str(&t),
            // A caught lie: the answer is not out yet, so it is mended.
            JobEvent::Retract { keep, .. } => text.truncate(keep),
            JobEvent::Done(f) => return Ok((text, f)),
            JobEvent::Failed(e) => return Err(ApiError::generation_failed(e)),
        }
    }
    Err(ApiError::internal("the generation ended without an answer"))
}

/// What one SSE chunk carries.
enum Piece<'a> {
    Text(&'a str),
    End(&'a Finish),
    Usage(&'a Finish),
}

/// Streams a job as server-sent events: `first` (unless null), a chunk
/// per piece, the final chunk, optionally a usage chunk, then `[DONE]`. A
/// failure mid-stream becomes an `{"error": ...}` event.
fn sse(
    rx: mpsc::Receiver<JobEvent>,
    first: serde_json::Value,
    include_usage: bool,
    render: impl Fn(Piece<'_>) -> serde_json::Value + Send + 'static,
) -> Response {
    let data = |v: serde_json::Value| Event::default().data(v.to_string());
    let first = if first.is_null() {
        Vec::new()
    } else {
        vec![data(first)]
    };
    event_stream(rx, first, move |ev| match ev {
        JobEvent::Text(t) => (vec![data(render(Piece::Text(&t)))], false),
        JobEvent::Done(f) => {
            let mut events = vec![data(render(Piece::End(&f)))];
            if include_usage {
                events.push(data(render(Piece::Usage(&f))));
            }
            events.push(Event::default().data("[DONE]"));
            (events, true)
        }
        JobEvent::Failed(e) => {
            crate::metrics::global().requests_failed.inc();
            let err = ApiError::generation_failed(e);
            (vec![data(err.body())], true)
        }
        JobEvent::Retract { liar, .. } => {
            crate::metrics::global().requests_failed.inc();
            let err = ApiError::generation_failed(retracted(&liar));
            (vec![data(err.body())], true)
        }
    })
}

/// Why a streamed answer ends when a lie is caught after its text went out.
pub(super) fn retracted(liar: &str) -> String {
    format!(
        "a server of the swarm ({liar}) was caught lying after part of this answer was sent; \
         the text sent may be wrong: send the request again"
    )
}
