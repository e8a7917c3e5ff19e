//! The one mapping from every failure a client can see to an HTTP status and OpenAI's error
//! envelope `{"error": {"message", "type", "param", "code"}}` (`code` always a string). Both the
//! plain and the streaming paths render errors through [`ApiError::body`]; internal causes are
//! logged where they happen and never shown.

use crate::engine::EngineError;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: a field has a value we do not accept.
    #[error("{message}")]
    Invalid {
        message: String,
        param: Option<&'static str>,
    },
    /// 400 `context_length_exceeded`.
    #[error("{0}")]
    ContextLength(String),
    /// 401.
    #[error("{0}")]
    Unauthorized(String),
    /// 404 (an unknown model or route).
    #[error("{message}")]
    NotFound { message: String, code: &'static str },
    /// 405 (a known route, another method).
    #[error("method not allowed for this route")]
    MethodNotAllowed,
    /// 408: the body did not arrive within `server.body_read_timeout_secs`.
    #[error("the request body was not received within {secs} s")]
    RequestTimeout { secs: u64 },
    /// 413.
    #[error("the request body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// 429 with `Retry-After` and the tenant's `x-ratelimit-*` headers.
    #[error("{message}")]
    RateLimited {
        message: String,
        /// `requests` or `tokens` (OpenAI's error type for rate limits).
        kind: &'static str,
        retry_after_secs: u64,
        headers: Vec<(&'static str, String)>,
    },
    /// 503 with `Retry-After`: the queue is full, or the server is draining.
    #[error("{message}")]
    Unavailable {
        message: String,
        code: &'static str,
        retry_after_secs: u64,
    },
    /// 500; the cause was logged.
    #[error("internal server error")]
    Internal,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            param: Some(param),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } | Self::ContextLength(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NotFound { .. } => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error envelope.
    pub fn body(&self) -> serde_json::Value {
        let (kind, param, code): (&str, Option<&str>, &str) = match self {
            Self::Invalid { param, .. } => ("invalid_request_error", *param, "invalid_value"),
            Self::ContextLength(_) => (
                "invalid_request_error",
                Some("messages"),
                "context_length_exceeded",
            ),
            Self::Unauthorized(_) => ("invalid_request_error", None, "invalid_api_key"),
            Self::NotFound { code, .. } => ("invalid_request_error", None, code),
            Self::MethodNotAllowed => ("invalid_request_error", None, "method_not_allowed"),
            Self::RequestTimeout { .. } => ("invalid_request_error", None, "request_timeout"),
            Self::TooLarge { .. } => ("invalid_request_error", None, "request_too_large"),
            Self::RateLimited { kind, .. } => (kind, None, "rate_limit_exceeded"),
            Self::Unavailable { code, .. } => ("server_error", None, code),
            Self::Internal => ("server_error", None, "internal_error"),
        };
        json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }

    /// The `reason` label this error counts under in `kvserve_request_rejections_total`, if it
    /// is a refusal (auth, limits, load, context length) rather than a malformed request.
    pub fn rejection_reason(&self) -> Option<&'static str> {
        use crate::metrics::reason;
        match self {
            Self::Unauthorized(_) => Some(reason::AUTH),
            Self::RateLimited { .. } => Some(reason::RATE_LIMIT),
            Self::ContextLength(_) => Some(reason::CONTEXT_LENGTH),
            Self::Unavailable { code, .. } => Some(match *code {
                "queue_timeout" => reason::QUEUE_TIMEOUT,
                "draining" => reason::DRAINING,
                "engine_failed" => reason::ENGINE_FAILED,
                _ => reason::OVERLOADED,
            }),
            _ => None,
        }
    }

    /// [`ApiError::rejection_reason`] of the engine error `e` maps to (a KV quota refusal is a
    /// 400 for the client but counts as its own reason).
    pub fn engine_rejection_reason(e: &EngineError) -> Option<&'static str> {
        match e {
            EngineError::KvQuota { .. } => Some(crate::metrics::reason::KV_QUOTA),
            other => ApiError::from(other.clone()).rejection_reason(),
        }
    }

    fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        let mut put = |name: &str, value: &str| {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                h.insert(n, v);
            }
        };
        match self {
            Self::RateLimited {
                retry_after_secs,
                headers,
                ..
            } => {
                put("retry-after", &retry_after_secs.to_string());
                for (k, v) in headers {
                    put(k, v);
                }
            }
            Self::Unavailable {
                retry_after_secs, ..
            } => put("retry-after", &retry_after_secs.to_string()),
            Self::Unauthorized(_) => put("www-authenticate", "Bearer"),
            _ => {}
        }
        h
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), self.headers(), axum::Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Overloaded(_) => Self::Unavailable {
                message: e.to_string(),
                code: "overloaded",
                retry_after_secs: 1,
            },
            EngineError::QueueTimeout { .. } => Self::Unavailable {
                message: e.to_string(),
                code: "queue_timeout",
                retry_after_secs: 5,
            },
            EngineError::ContextLength { .. } => Self::ContextLength(e.to_string()),
            EngineError::KvQuota { .. } => Self::Invalid {
                message: e.to_string(),
                param: None,
            },
            EngineError::Invalid(m) => Self::Invalid {
                message: m,
                param: None,
            },
            EngineError::Shutdown => Self::Unavailable {
                message: "the server is shutting down".into(),
                code: "draining",
                retry_after_secs: 5,
            },
            EngineError::Internal => Self::Internal,
            EngineError::Failed => Self::Unavailable {
                message: e.to_string(),
                code: "engine_failed",
                retry_after_secs: 5,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_the_openai_envelope_with_a_string_code() {
        let all = [
            ApiError::invalid("temperature", "bad"),
            ApiError::ContextLength("long".into()),
            ApiError::Unauthorized("no".into()),
            ApiError::NotFound {
                message: "x".into(),
                code: "model_not_found",
            },
            ApiError::TooLarge { limit: 1 },
            ApiError::RateLimited {
                message: "slow down".into(),
                kind: "requests",
                retry_after_secs: 3,
                headers: vec![("x-ratelimit-limit-requests", "10".into())],
            },
            ApiError::from(EngineError::Overloaded("full".into())),
            ApiError::from(EngineError::Internal),
            ApiError::RequestTimeout { secs: 1 },
            ApiError::from(EngineError::Failed),
        ];
        let statuses: Vec<u16> = all.iter().map(|e| e.status().as_u16()).collect();
        assert_eq!(statuses, [400, 400, 401, 404, 413, 429, 503, 500, 408, 503]);
        for e in &all {
            let b = e.body();
            let err = &b["error"];
            assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(err["type"].is_string() && err["code"].is_string());
            assert!(err.get("param").is_some());
        }
        assert_eq!(all[0].body()["error"]["param"], "temperature");
        assert_eq!(all[1].body()["error"]["code"], "context_length_exceeded");
        let h = all[5].headers();
        assert_eq!(h["retry-after"], "3");
        assert_eq!(h["x-ratelimit-limit-requests"], "10");
        assert_eq!(all[6].headers()["retry-after"], "1");
        assert_eq!(all[7].body()["error"]["message"], "internal server error");
        assert_eq!(all[9].body()["error"]["code"], "engine_failed");
        assert_eq!(all[9].headers()["retry-after"], "5");
        assert_eq!(all[9].rejection_reason(), Some("engine_failed"));
    }
}
