//! Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::client::ClientError;

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
