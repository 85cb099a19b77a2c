//! One try of one key of one client → an [`Outcome`], with the key's health
//! updated by what happened.
//!
//! For a 2xx response the headers are held until the first body byte, so an
//! upstream that answers and then dies before sending anything is failed
//! over like a connect error. `request_timeout` runs until that byte, or,
//! for a stream with `first_token_timeout`, until the response headers, and
//! `first_token_timeout` from there to that byte. Every response's quota
//! headers go to the key's reading.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::request::Outgoing;
use super::upstream::{UpstreamBody, UpstreamClients};
use crate::config::RoutingPolicy;
use crate::routing::key_health::MAX_RETRY_AFTER;
use crate::routing::KeyRoute;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("no response within {0:?} (request_timeout)")]
    HeadersTimeout(Duration),
    #[error("no first body byte within {0:?} of the response headers (first_token_timeout)")]
    FirstTokenTimeout(Duration),
    #[error("the response ended before its first body byte")]
    EmptyResponse,
    #[error("upstream answered {0}")]
    Status(u16),
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::HeadersTimeout(_) | UpstreamError::FirstTokenTimeout(_)
        )
    }
}

// Respond is the common case and is moved once or twice per attempt;
// boxing it would cost an allocation on every request.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// Goes to the caller: a 2xx with its first chunk read, or a status that
    /// is not retried.
    Respond {
        parts: http::response::Parts,
        body: UpstreamBody,
        first: Option<Bytes>,
        ttft: Option<Duration>,
        /// When the answer was known (its first byte, or its head): one
        /// reading of the clock for the time to first byte, the client's
        /// average and the relay's idle timer.
        at: std::time::Instant,
    },
    /// Try the next key or client.
    FailOver(UpstreamError),
}

/// `started`: when the request arrived; `sent`: when this attempt began
/// (the caller's reading, so the clock is not read again here).
pub async fn run(
    upstream: &UpstreamClients,
    req: Outgoing<'_>,
    policy: &RoutingPolicy,
    key: &KeyRoute,
    started: std::time::Instant,
    sent: std::time::Instant,
    stream: bool,
) -> Outcome {
    let deadline = Instant::from_std(sent) + policy.request_timeout;
    let head_request = req.method == http::Method::HEAD;
    let failed = |e: UpstreamError| {
        key.health
            .record_failure(policy.max_failures, policy.cooldown);
        Outcome::FailOver(e)
    };
    let resp = match tokio::time::timeout_at(
        deadline,
        upstream.send_at(policy.connect_timeout, req, sent),
    )
    .await
    {
        Err(_) => return failed(UpstreamError::HeadersTimeout(policy.request_timeout)),
        Ok(Err(e)) => return failed(UpstreamError::Connect(describe(&e))),
        Ok(Ok(resp)) => resp,
    };
    key.health.record_quota(&super::quota::read(
        resp.headers(),
        resp.extensions().get::<super::plain::RelayedHeaders>(),
    ));
    let status = resp.status().as_u16();
    if resp.status().is_success() {
        let (parts, mut body) = resp.into_parts();
        let (first_byte_by, late) = match policy.first_token_timeout.filter(|_| stream) {
            Some(t) => (Instant::now() + t, UpstreamError::FirstTokenTimeout(t)),
            None => (
                deadline,
                UpstreamError::HeadersTimeout(policy.request_timeout),
            ),
        };
        loop {
            match tokio::time::timeout_at(first_byte_by, body.frame()).await {
                Err(_) => return failed(late),
                Ok(Some(Err(e))) => return failed(UpstreamError::Connect(describe(&e))),
                Ok(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => {
                        key.health.record_success();
                        let at = std::time::Instant::now();
                        return Outcome::Respond {
                            parts,
                            body,
                            first: Some(data),
                            ttft: Some(at.saturating_duration_since(started)),
                            at,
                        };
                    }
                    _ => continue,
                },
                Ok(None) => {
                    if !framed_empty(head_request, &parts) {
                        return failed(UpstreamError::EmptyResponse);
                    }
                    key.health.record_success();
                    return Outcome::Respond {
                        parts,
                        body,
                        first: None,
                        ttft: None,
                        at: std::time::Instant::now(),
                    };
                }
            }
        }
    }
    match status {
        // The key itself is refused: cool it down and try another, always.
        401 | 403 => {
            key.health
                .record_auth_rejection(policy.cooldown, policy.probe_keys);
            Outcome::FailOver(UpstreamError::Status(status))
        }
        429 => {
            let wait =
                retry_after(resp.headers()).map_or(policy.cooldown, |d| d.min(MAX_RETRY_AFTER));
            key.health.record_rejection(wait);
            if policy.retries(429) {
                Outcome::FailOver(UpstreamError::Status(429))
            } else {
                respond(resp)
            }
        }
        s if policy.retries(s) => failed(UpstreamError::Status(s)),
        _ => {
            // The upstream works; the request itself was refused.
            key.health.record_success();
            respond(resp)
        }
    }
}

/// Whether a 2xx response that ended without a body byte said it would:
/// an answer to HEAD, a 204 or 205, `Content-Length: 0`, a chunked body
/// that ended with its last chunk, or an HTTP/2 stream ended by the
/// upstream. Only a body cut short by a close (it would have errored had
/// its framing promised more) is the upstream failing: no request shape a
/// caller can send counts against a key's health.
fn framed_empty(head_request: bool, parts: &http::response::Parts) -> bool {
    use http::header;
    let status = parts.status;
    head_request
        || status == http::StatusCode::NO_CONTENT
        || status == http::StatusCode::RESET_CONTENT
        || parts.version == http::Version::HTTP_2
        || parts
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().trim_ascii() == b"0")
        || parts
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .next_back()
            .is_some_and(|v| {
                v.as_bytes()
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            })
}

fn respond(resp: http::Response<UpstreamBody>) -> Outcome {
    let (parts, body) = resp.into_parts();
    Outcome::Respond {
        parts,
        body,
        first: None,
        ttft: None,
        at: std::time::Instant::now(),
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn retry_after(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(1e9)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The error and its causes on one line; hyper's errors carry no URL or header.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = http::HeaderMap::new();
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = std::time::SystemTime::now() + Duration::from_secs(120);
        h.insert(
            "retry-after",
            httpdate::fmt_http_date(later).parse().unwrap(),
        );
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        h.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&h), None);
    }
}
