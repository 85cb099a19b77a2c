//! Shadow traffic: a share of matching non-stream requests sent again to
//! another client once the caller's response is complete, to compare the
//! two on real traffic.
//!
//! The mirror is chosen when the request arrives (a draw against the
//! rule's `percent`) and sent only when the caller's response has ended,
//! from a task of its own: it never delays, changes or fails the caller's
//! response. At most [`MAX_IN_FLIGHT`] mirrors run at once per process;
//! beyond that they are dropped and counted. A mirrored request writes a
//! usage row with `shadow = 1` and the original's `request_id`, counts
//! against no caller limit, and stops for the UTC day once its rule's
//! `max_usd_per_day` is spent.

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method};
use http_body_util::BodyExt;

use super::sse::usage_in_whole_json;
use crate::config::prices::{usd, Tokens};
use crate::routing::{KeyPick, RoutingTable};
use crate::state::AppState;
use crate::usage::UsageRecord;

/// Mirrors in flight at once, per process.
pub const MAX_IN_FLIGHT: usize = 64;
/// Largest mirrored response body read (for its usage).
const MAX_BODY: usize = 64 * 1024 * 1024;

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// What is needed to send a request again after its caller is answered.
pub struct Mirror {
    pub table: Arc<RoutingTable>,
    pub rule: usize,
    pub method: Method,
    pub endpoint: String,
    pub query: Option<String>,
    pub body: Bytes,
    pub request_id: String,
    pub caller: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
}

/// The rule that mirrors this request, if any draws it: non-stream
/// requests only, the model matching, the day's budget not spent. `now`
/// is read only for a rule with a daily budget: with no shadow configured,
/// a request does not read the clock here.
pub fn choose(
    table: &RoutingTable,
    model: Option<&str>,
    stream: bool,
    now: impl Fn() -> SystemTime,
) -> Option<usize> {
    if stream || table.shadows.is_empty() {
        return None;
    }
    let model = model?;
    table.shadows.iter().position(|s| {
        s.cfg.matches(model)
            && fastrand::f64() * 100.0 < s.cfg.percent
            && s.cfg
                .max_nanos_per_day
                .is_none_or(|max| s.spent_today(now()) < max)
    })
}

/// Sends the mirror from a task of its own, or drops it (counted) when
/// too many are in flight.
pub fn spawn(state: Arc<AppState>, m: Mirror) {
    let client = m.table.clients[m.table.shadows[m.rule].client].name.clone();
    if IN_FLIGHT.fetch_add(1, Ordering::Relaxed) >= MAX_IN_FLIGHT {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        state.metrics.shadow(&client, "dropped");
        return;
    }
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        state.metrics.shadow(&client, "dropped");
        return;
    };
    rt.spawn(async move {
        let result = send(&state, &m).await;
        IN_FLIGHT.fetch_sub(1, Ordering::Relaxed);
        state.metrics.shadow(&client, result);
    });
}

async fn send(state: &AppState, m: &Mirror) -> &'static str {
    let table = &m.table;
    let rule = &table.shadows[m.rule];
    let ci = rule.client;
    let client = &table.clients[ci];
    let started = Instant::now();
    let ts = (state.clock)();
    let ki = match client.pick_key(&[]) {
        KeyPick::Key(i) => i,
        _ => return "no_key",
    };
    let key = &client.keys[ki];
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let routed: Option<Arc<str>> = client
        .cfg
        .upstream_model
        .as_deref()
        .map(Arc::from)
        .or_else(|| m.model.clone());
    let body = match (&client.cfg.upstream_model, routed.as_deref()) {
        (Some(up), _) => with_model(&m.body, up),
        _ => m.body.clone(),
    };
    let mut row = UsageRecord {
        ts: Some(ts),
        request_id: m.request_id.clone(),
        caller: m.caller.clone(),
        endpoint: m.endpoint.clone().into(),
        model: m.model.clone(),
        routed_model: routed.clone(),
        client: Some(client.name.clone()),
        key_id: Some(key.label.clone()),
        attempts: 1,
        shadow: true,
        ..UsageRecord::default()
    };
    let Ok(up) = super::request::build_request(
        client,
        key,
        &m.method,
        &m.endpoint,
        m.query.as_deref(),
        &headers,
        Cow::Owned(body),
    ) else {
        return "failed";
    };
    let policy = &client.cfg.policy;
    let exchange = async {
        let resp = state.upstream.send(policy.connect_timeout, up).await.ok()?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .ok()?
            .to_bytes();
        Some((status, body))
    };
    let result = match tokio::time::timeout(policy.request_timeout, exchange).await {
        Ok(Some((status, body))) => {
            row.status = status;
            if let Ok(Some(u)) = usage_in_whole_json(&body) {
                row.prompt_tokens = u.prompt_tokens;
                row.completion_tokens = u.completion_tokens;
                row.total_tokens = u.total_tokens;
                row.cached_tokens = u.cached_tokens;
                row.reasoning_tokens = u.reasoning_tokens;
                if let Some(price) = routed.as_deref().and_then(|r| table.price(ci, r)) {
                    let nanos = price.cost_nanos(Tokens {
                        prompt: u.prompt_tokens.unwrap_or(0),
                        cached: u.cached_tokens.unwrap_or(0),
                        completion: u.completion_tokens.unwrap_or(0),
                    });
                    rule.spend(ts, nanos);
                    row.cost_usd = Some(usd(nanos));
                }
            } else if (200..300).contains(&status) {
                row.error = Some("usage unknown".to_owned());
            }
            "sent"
        }
        Ok(None) => {
            row.status = 502;
            row.error = Some("the shadow client failed".to_owned());
            "failed"
        }
        Err(_) => {
            row.status = 504;
            row.error = Some(format!(
                "the shadow client sent no answer within {:?} (request_timeout)",
                policy.request_timeout
            ));
            "failed"
        }
    };
    row.latency_ms = started.elapsed().as_millis() as u64;
    state.usage.send(&row);
    result
}

/// `body` with its `model` replaced (the shadow client's `upstream_model`).
fn with_model(body: &Bytes, model: &str) -> Bytes {
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(body) {
        Ok(mut map) => {
            map.insert("model".to_owned(), serde_json::Value::from(model));
            serde_json::to_vec(&map)
                .map(Bytes::from)
                .unwrap_or_else(|_| body.clone())
        }
        Err(_) => body.clone(),
    }
}
