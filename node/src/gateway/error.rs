//! API errors, in OpenAI's format (`{"error": {"message", "type", "param",
//! "code"}}`) or, under `/v1/messages`, in Anthropic's (`{"type": "error",
//! "error": {"type", "message"}}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::client::ClientError;

/// Which API a request speaks, and so the format of its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI's: every route but Anthropic's.
    OpenAi,
    /// Anthropic's Messages API: `/v1/messages` and below.
    Anthropic,
}

impl Dialect {
    /// The dialect of a request path.
    pub fn of(path: &str) -> Self {
        if path == "/v1/messages" || path.starts_with("/v1/messages/") {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }
}

/// An API error: an HTTP status and OpenAI's error object.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// OpenAI's error `type`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<&'static str>,
    /// A machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    /// Sets the code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// A 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("not_found"),
        }
    }

    /// A 429: every generation slot is taken.
    pub fn busy(limit: usize) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "{limit} requests are generating already; retry shortly, or start the gateway with a larger --max-concurrent"
            ),
            kind: "rate_limit_error",
            param: None,
            code: Some("too_many_concurrent_requests"),
        }
    }

    /// A 413: the body is over the limit.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_too_large"),
        }
    }

    /// A 408: the request did not arrive in time.
    pub fn timeout(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::REQUEST_TIMEOUT,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }
    }

    /// A 502: the generation failed after it started.
    pub fn generation_failed(e: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_GATEWAY,
            message: format!("generation failed: {e}; retry, a new request plans a new route"),
            kind: "server_error",
            param: None,
            code: Some("generation_failed"),
        }
    }

    /// A 500.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The error object, as JSON.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl ApiError {
    /// Anthropic's error `type` for this error's status.
    pub fn anthropic_type(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            408 | 504 => "timeout_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The error object in Anthropic's format.
    pub fn anthropic_body(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "error",
            "error": {"type": self.anthropic_type(), "message": self.message},
        })
    }

    /// The response in `dialect`'s format.
    pub fn respond(self, dialect: Dialect) -> Response {
        match dialect {
            Dialect::OpenAi => self.into_response(),
            Dialect::Anthropic => {
                crate::metrics::global().requests_failed.inc();
                (self.status, axum::Json(self.anthropic_body())).into_response()
            }
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match &e {
            ClientError::NoRoute { missing, .. } => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "the swarm cannot serve this model now: {e}. Start a server for the missing blocks, e.g. `nomoat serve --model MODEL --blocks {}`, then retry",
                    missing.first().map(|r| r.to_string()).unwrap_or_default()
                ),
                kind: "service_unavailable",
                param: None,
                code: Some("coverage_gap"),
            },
            ClientError::Engine(_) => Self::internal(e.to_string()),
            _ => Self {
                status: StatusCode::BAD_GATEWAY,
                message: format!("{e}; retry: every request plans a new route over the servers live then"),
                kind: "server_error",
                param: None,
                code: Some("swarm_error"),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        crate::metrics::global().requests_failed.inc();
        (self.status, axum::Json(self.body())).into_response()
    }
}
