//! Anthropic's Messages API: `POST /v1/messages`, with and without
//! streaming (Anthropic's event types), and `POST /v1/messages/count_tokens`.
//! Errors take Anthropic's format (see [`Dialect`]).

use axum::body::Bytes;
use axum::extract::State;
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::job::Ask;
use super::openai::{collect, parse};
use super::sse::event_stream;
use super::{ApiError, Dialect, Finish, Gateway, JobEvent};
use crate::engine::{ChatMessage, SamplingParams, DEFAULT_REPETITION_WINDOW};

/// Most stop sequences per request.
pub const MAX_STOP_SEQUENCES: usize = 16;

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: String,
    #[serde(default)]
    max_tokens: Option<usize>,
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i64>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    thinking: Option<Value>,
}

/// The text of a content field: a string, or text blocks.
fn text_of(c: &Content, field: &'static str) -> Result<String, ApiError> {
    match c {
        Content::Text(t) => Ok(t.clone()),
        Content::Blocks(blocks) => {
            let mut t = String::new();
            for b in blocks {
                if b.kind != "text" {
                    return Err(ApiError::invalid(
                        Some(field),
                        format!(
                            "{field}: content blocks of type `{}` are not supported: this model reads text only",
                            b.kind
                        ),
                    ));
                }
                t.push_str(b.text.as_deref().unwrap_or_default());
            }
            Ok(t)
        }
    }
}

/// A checked request: the chat, the text the assistant's turn starts
/// with (the last message, when it is the assistant's), and the sampling.
struct Checked {
    messages: Vec<ChatMessage>,
    prefill: String,
    sampling: SamplingParams,
    stops: Vec<String>,
}

fn check(req: &MessagesRequest) -> Result<Checked, ApiError> {
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::invalid(
            Some("tools"),
            "tools: tool use is not supported by this gateway; send the request without tools",
        ));
    }
    if req
        .thinking
        .as_ref()
        .is_some_and(|t| t["type"] == "enabled")
    {
        return Err(ApiError::invalid(
            Some("thinking"),
            "thinking: extended thinking is not supported by this model; leave it disabled",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages: at least one message is required, e.g. [{\"role\": \"user\", \"content\": \"Hello\"}]",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = &req.system {
        let t = text_of(system, "system")?;
        if !t.is_empty() {
            messages.push(ChatMessage::new("system", t));
        }
    }
    for m in &req.messages {
        if !matches!(m.role.as_str(), "user" | "assistant") {
            return Err(ApiError::invalid(
                Some("messages"),
                format!(
                    "messages: unknown role `{}`: use user or assistant (the system prompt goes in `system`)",
                    m.role
                ),
            ));
        }
        messages.push(ChatMessage::new(
            m.role.clone(),
            text_of(&m.content, "messages")?,
        ));
    }
    // A last assistant message is the start of the answer (a prefill).
    let mut prefill = String::new();
    if messages.last().is_some_and(|m| m.role == "assistant") {
        prefill = messages.pop().map(|m| m.content).unwrap_or_default();
        if prefill.ends_with(char::is_whitespace) {
            return Err(ApiError::invalid(
                Some("messages"),
                "messages: final assistant content cannot end with trailing whitespace",
            ));
        }
    }
    if !messages.iter().any(|m| m.role != "system") {
        return Err(ApiError::invalid(
            Some("messages"),
            "messages: the conversation needs a user message before the assistant's",
        ));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("temperature: {temperature} is out of range: use 0 (greedy) to 1"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            Some("top_p"),
            format!("top_p: {top_p} is out of range: use a value in (0, 1]"),
        ));
    }
    let top_k = match req.top_k {
        None => 0,
        Some(k) if k >= 1 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("top_k: {k} is out of range: use 1 or more, or leave it out"),
            ))
        }
    };
    let stops = req.stop_sequences.clone().unwrap_or_default();
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            Some("stop_sequences"),
            format!(
                "stop_sequences: at most {MAX_STOP_SEQUENCES}, got {}",
                stops.len()
            ),
        ));
    }
    if stops.iter().any(|s| s.trim().is_empty()) {
        return Err(ApiError::invalid(
            Some("stop_sequences"),
            "stop_sequences: each stop sequence must contain non-whitespace",
        ));
    }
    Ok(Checked {
        messages,
        prefill,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            repetition_window: DEFAULT_REPETITION_WINDOW,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: rand::random(),
        },
        stops,
    })
}

fn need_max_tokens(req: &MessagesRequest) -> Result<usize, ApiError> {
    req.max_tokens.ok_or_else(|| {
        ApiError::invalid(
            Some("max_tokens"),
            "max_tokens: Field required (the most tokens to generate, e.g. 256)",
        )
    })
}

/// Parses and checks a request body as `POST /v1/messages` does before
/// the model is involved, with the same typed errors. Decoders of
/// untrusted input are fuzzed through this.
pub fn check_messages_body(body: &[u8]) -> Result<(), ApiError> {
    let req: MessagesRequest = parse(body)?;
    need_max_tokens(&req)?;
    check(&req)?;
    Ok(())
}

/// Why a generation stopped, in Anthropic's words.
fn stop_reason(f: &Finish) -> &'static str {
    match (&f.stop_sequence, f.reason) {
        (Some(_), _) => "stop_sequence",
        (None, "length") => "max_tokens",
        _ => "end_turn",
    }
}

/// The chat prompt of a checked request, as token ids.
async fn prompt_of(gw: &Gateway, c: &Checked) -> Result<Vec<u32>, ApiError> {
    let mut text = gw.tokenizer().chat_prompt(&c.messages);
    text.push_str(&c.prefill);
    gw.encode(text).await
}

/// `POST /v1/messages`.
pub(super) async fn messages(State(gw): State<Gateway>, body: Bytes) -> Response {
    match answer(gw, &body).await {
        Ok(r) => r,
        Err(e) => e.respond(Dialect::Anthropic),
    }
}

async fn answer(gw: Gateway, body: &[u8]) -> Result<Response, ApiError> {
    let req: MessagesRequest = parse(body)?;
    let max_tokens = need_max_tokens(&req)?;
    let c = check(&req)?;
    gw.check_model(&req.model)?;
    let prompt = prompt_of(&gw, &c).await?;
    let input_tokens = prompt.len();
    let job = gw.job(
        Ask {
            model: &req.model,
            max_tokens: Some(max_tokens),
            sampling: c.sampling,
            stops: c.stops,
        },
        prompt,
    )?;
    let rx = gw.start_job(job).await?;
    // Anthropic ids are `msg_` and an opaque tail; clients check the prefix.
    let id = format!("msg_{:024x}", rand::random::<u128>() >> 32);
    let model = gw.model_name().to_string();
    if !req.stream {
        let (text, f) = collect(rx).await?;
        return Ok(Json(json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": stop_reason(&f),
            "stop_sequence": f.stop_sequence,
            "usage": {"input_tokens": f.prompt_tokens, "output_tokens": f.completion_tokens},
        }))
        .into_response());
    }
    let event = |name: &str, data: Value| Event::default().event(name).data(data.to_string());
    let first = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id,
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": {"input_tokens": input_tokens, "output_tokens": 0},
            }}),
        ),
        event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    Ok(event_stream(rx, first, move |ev| match ev {
        JobEvent::Text(t) => (
            vec![event(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}}),
            )],
            false,
        ),
        JobEvent::Done(f) => (
            vec![
                event(
                    "content_block_stop",
                    json!({"type": "content_block_stop", "index": 0}),
                ),
                event(
                    "message_delta",
                    json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(&f), "stop_sequence": f.stop_sequence},
                        "usage": {"output_tokens": f.completion_tokens}}),
                ),
                event("message_stop", json!({"type": "message_stop"})),
            ],
            true,
        ),
        JobEvent::Failed(e) => {
            crate::metrics::global().requests_failed.inc();
            let err = ApiError::generation_failed(e);
            (vec![event("error", err.anthropic_body())], true)
        }
        JobEvent::Retract { liar, .. } => {
            crate::metrics::global().requests_failed.inc();
            let err = ApiError::generation_failed(super::openai::retracted(&liar));
            (vec![event("error", err.anthropic_body())], true)
        }
    }))
}

/// `POST /v1/messages/count_tokens`: the prompt's length in tokens, as the
/// model would read it.
pub(super) async fn count_tokens(State(gw): State<Gateway>, body: Bytes) -> Response {
    let counted = async {
        let req: MessagesRequest = parse(&body)?;
        let c = check(&req)?;
        gw.check_model(&req.model)?;
        let prompt = prompt_of(&gw, &c).await?;
        Ok::<_, ApiError>(Json(json!({"input_tokens": prompt.len()})).into_response())
    };
    match counted.await {
        Ok(r) => r,
        Err(e) => e.respond(Dialect::Anthropic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checked(body: Value) -> Result<Checked, ApiError> {
        let req: MessagesRequest = parse(body.to_string().as_bytes())?;
        check(&req)
    }

    #[test]
    fn system_blocks_and_a_prefill_make_the_chat() {
        let c = checked(json!({
            "model": "m", "max_tokens": 5,
            "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            ],
        }))
        .unwrap();
        assert_eq!(
            c.messages,
            vec![
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi")
            ]
        );
        assert_eq!(c.prefill, "Hello");
        assert_eq!(c.sampling.temperature, 1.0);
    }

    #[test]
    fn bad_fields_name_the_field() {
        let cases = [
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "system", "content": "x"}]}),
                "messages",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
                "messages",
            ),
            (
                json!({"model": "m", "temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}),
                "temperature",
            ),
            (
                json!({"model": "m", "top_k": 0, "messages": [{"role": "user", "content": "x"}]}),
                "top_k",
            ),
            (
                json!({"model": "m", "stop_sequences": [" "], "messages": [{"role": "user", "content": "x"}]}),
                "stop_sequences",
            ),
            (
                json!({"model": "m", "tools": [{"name": "t"}], "messages": [{"role": "user", "content": "x"}]}),
                "tools",
            ),
            (
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a "}]}),
                "messages",
            ),
        ];
        for (body, field) in cases {
            let e = checked(body.clone())
                .err()
                .unwrap_or_else(|| panic!("{body} passed"));
            assert_eq!(e.param, Some(field), "{body}: {e}");
            assert_eq!(e.anthropic_body()["error"]["type"], "invalid_request_error");
        }
        let e = check_messages_body(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
            .unwrap_err();
        assert_eq!(e.param, Some("max_tokens"));
    }

    #[test]
    fn stop_reasons_in_anthropic_words() {
        let f = |reason, stop: Option<&str>| Finish {
            prompt_tokens: 1,
            completion_tokens: 1,
            reason,
            stop_sequence: stop.map(str::to_string),
        };
        assert_eq!(stop_reason(&f("stop", None)), "end_turn");
        assert_eq!(stop_reason(&f("length", None)), "max_tokens");
        assert_eq!(stop_reason(&f("stop", Some("."))), "stop_sequence");
    }
}
