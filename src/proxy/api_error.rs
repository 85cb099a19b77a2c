//! The only builder of error bodies: OpenAI's shape,
//! `{"error": {"message", "type", "param", "code"}}`, or Anthropic's,
//! `{"type": "error", "error": {"type", "message"}}`, for a request on
//! `/v1/messages` (the shape is chosen once per request by
//! [`ErrorShape::scope`] in the handler, and read here).
//!
//! `type` and `code` both carry the error's name (`model_not_found`, ...), so
//! callers matching on either field see the same thing; the caller limits'
//! refusals use OpenAI's own pairs (`permission_error` / `model_not_allowed`,
//! `rate_limit_error` / `rate_limit_exceeded`, `insufficient_quota`).

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Response, StatusCode};
use tokio::task::futures::TaskLocalFuture;

use super::body::ResponseBody;

/// The name is checked once, at compile time, not per response.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which API's error body a request gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ErrorShape {
    #[default]
    OpenAi,
    Anthropic,
}

tokio::task_local! {
    static SHAPE: ErrorShape;
}

impl ErrorShape {
    /// Runs `fut` with every error body it builds in this shape. The
    /// task-local future itself, not an `async fn` around it: that would
    /// hold `fut` twice (its argument and the scope's copy), and every
    /// request's future is moved at least once.
    pub fn scope<F: std::future::Future>(self, fut: F) -> TaskLocalFuture<ErrorShape, F> {
        SHAPE.scope(self, fut)
    }

    /// [`ErrorShape::scope`] for code that does not wait.
    pub fn sync_scope<R>(self, f: impl FnOnce() -> R) -> R {
        SHAPE.sync_scope(self, f)
    }

    fn current() -> ErrorShape {
        SHAPE.try_with(|s| *s).unwrap_or_default()
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    RequestTimeout(String),
    #[error("request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("{0}")]
    Upstream(String),
    #[error("{message}")]
    NoHealthyUpstream {
        message: String,
        retry_after: Duration,
    },
    #[error("{0}")]
    UpstreamTimeout(String),
    #[error("{0}")]
    Overloaded(String),
    /// The caller may not use this model (or it has no price and the
    /// caller has a USD budget).
    #[error("{0}")]
    ModelNotAllowed(String),
    /// A rate limit (concurrency, rpm, tpm): try again later.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: Duration,
    },
    /// A budget is spent: retrying will not help before the period ends.
    #[error("{0}")]
    InsufficientQuota(String),
    /// The shared state does not answer and `on_outage` is `deny`.
    #[error("{0}")]
    SharedStateUnavailable(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::ModelNotFound(_) | ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ApiError::NoHealthyUpstream { .. }
            | ApiError::Overloaded(_)
            | ApiError::SharedStateUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } | ApiError::InsufficientQuota(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
        }
    }

    /// The error's name, used as both `type` and `code`.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidRequest(_) => "invalid_request_error",
            ApiError::Unauthorized(_) => "invalid_api_key",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::TooLarge { .. } => "request_too_large",
            ApiError::Upstream(_) => "upstream_error",
            ApiError::NoHealthyUpstream { .. } => "no_healthy_upstream",
            ApiError::UpstreamTimeout(_) => "upstream_timeout",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::ModelNotAllowed(_) => "model_not_allowed",
            ApiError::RateLimited { .. } => "rate_limit_exceeded",
            ApiError::InsufficientQuota(_) => "insufficient_quota",
            ApiError::SharedStateUnavailable(_) => "shared_state_unavailable",
        }
    }

    /// The error's `type`: its code, but for the caller limits' refusals.
    pub fn kind(&self) -> &'static str {
        match self {
            ApiError::ModelNotAllowed(_) => "permission_error",
            ApiError::RateLimited { .. } => "rate_limit_error",
            other => other.code(),
        }
    }

    fn param(&self) -> Option<&'static str> {
        match self {
            ApiError::ModelNotFound(_) | ApiError::ModelNotAllowed(_) => Some("model"),
            _ => None,
        }
    }

    /// Anthropic's name for the error, by its status.
    fn anthropic_kind(&self) -> &'static str {
        match self.status().as_u16() {
            400 | 405 | 408 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            504 => "timeout_error",
            _ => "api_error",
        }
    }

    /// The JSON body alone, for callers that build their own response.
    pub fn body(&self) -> Bytes {
        if ErrorShape::current() == ErrorShape::Anthropic {
            let body = serde_json::json!({
                "type": "error",
                "error": {"type": self.anthropic_kind(), "message": self.to_string()},
            });
            return Bytes::from(body.to_string());
        }
        let body = serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": self.kind(),
                "param": self.param(),
                "code": self.code(),
            }
        });
        Bytes::from(body.to_string())
    }

    pub fn into_response(self, request_id: Option<&HeaderValue>) -> Response<ResponseBody> {
        let mut resp = Response::new(ResponseBody::full(self.body()));
        *resp.status_mut() = self.status();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(id) = request_id {
            headers.insert(X_REQUEST_ID, id.clone());
        }
        match &self {
            ApiError::NoHealthyUpstream { retry_after, .. } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            ApiError::RateLimited { retry_after, .. } => {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            ApiError::InsufficientQuota(_) => {
                headers.insert(
                    HeaderName::from_static("x-should-retry"),
                    HeaderValue::from_static("false"),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_have_openais_shape() {
        let e = ApiError::ModelNotFound("no client serves model `x`".into());
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
        assert_eq!(v["error"]["type"], "model_not_found");
        assert_eq!(v["error"]["param"], "model");
        assert_eq!(v["error"]["message"], "no client serves model `x`");
        let r = ApiError::NoHealthyUpstream {
            message: "cooling".into(),
            retry_after: Duration::from_millis(1500),
        }
        .into_response(None);
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "2");
    }

    #[test]
    fn messages_requests_get_anthropics_shape() {
        let e = ApiError::ModelNotFound("no `anthropic` client serves model `x`".into());
        let body = ErrorShape::Anthropic.sync_scope(|| e.body());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "error", "error": {"type": "not_found_error", "message": "no `anthropic` client serves model `x`"}})
        );
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "model_not_found");
    }
}
