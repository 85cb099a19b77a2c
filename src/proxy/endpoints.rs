//! The endpoints answered locally: models, health, readiness, metrics, admin.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use serde_json::json;

use super::admin_ui;
use super::api_error::ApiError;
use super::body::ResponseBody;
use crate::config::prices::usd;
use crate::config::{CallerConfig, Per};
use crate::routing::RoutingTable;
use crate::secret::constant_time_eq;
use crate::state::{AppState, ReloadStatus};

pub fn text(status: StatusCode, body: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Ready when a config is loaded and some key is not cooling down.
pub fn readyz(table: &RoutingTable) -> Response<ResponseBody> {
    if table.any_key_available() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "every key is cooling down\n",
        )
    }
}

pub fn metrics(state: &AppState, table: &RoutingTable) -> Response<ResponseBody> {
    let mut text = state.metrics.render(&table.scrape());
    if let Some(shared) = &state.shared {
        // Only with `shared_state`: a 0 would read as an outage otherwise.
        let up = u8::from(shared.mode().ok);
        let at = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(
            at,
            &format!(
                "# HELP gptbalance_shared_state_up 1 when the shared state answers, 0 during an outage\n\
                 # TYPE gptbalance_shared_state_up gauge\n\
                 gptbalance_shared_state_up {up}\n"
            ),
        );
    }
    let mut resp = Response::new(ResponseBody::full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

fn model_json(id: &str, owner: &str) -> serde_json::Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": owner })
}

/// Every exact model name, then the names upstreams listed for clients
/// with `discover_models` (`ops::discovery`), in OpenAI's list format;
/// only those the caller's `models` allow.
pub fn models(
    state: &AppState,
    table: &RoutingTable,
    caller: Option<&CallerConfig>,
) -> Response<ResponseBody> {
    let exact = table.models();
    let discovered = state.discovered.listed(table);
    let allowed = |id: &str| caller.is_none_or(|c| c.allows(id));
    let mut seen = std::collections::HashSet::new();
    let mut data = Vec::with_capacity(exact.len() + discovered.len());
    for (id, owner) in exact {
        if seen.insert(id) && allowed(id) {
            data.push(model_json(id, owner));
        }
    }
    for (id, _) in &discovered {
        if seen.insert(id.as_str()) && allowed(id) {
            // Owned by the client a request for it tries first.
            let owner = first_candidate(table, id).unwrap_or_default();
            data.push(model_json(id, owner));
        }
    }
    json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

/// Any model name that routes (and the caller may use), whether or not a
/// list shows it.
pub fn model(
    table: &RoutingTable,
    id: &str,
    caller: Option<&CallerConfig>,
) -> Result<Response<ResponseBody>, ApiError> {
    first_candidate(table, id)
        .filter(|_| caller.is_none_or(|c| c.allows(id)))
        .map(|owner| json_response(StatusCode::OK, &model_json(id, owner)))
        .ok_or_else(|| ApiError::ModelNotFound(format!("the model `{id}` does not exist")))
}

/// The client a request for `model` would try first.
fn first_candidate<'t>(table: &'t RoutingTable, model: &str) -> Option<&'t str> {
    let first = table.candidates(model).order().into_iter().next()?;
    Some(table.clients[first].cfg.name.as_str())
}

/// `/admin/status`, `/admin/usage` and `POST /admin/reload`, behind
/// `admin_token`, and the status page; 404 when no admin token is configured.
pub async fn admin(
    state: &Arc<AppState>,
    table: &RoutingTable,
    method: &Method,
    what: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response<ResponseBody>, ApiError> {
    let Some(admin) = &table.config.server.admin_token else {
        return Err(ApiError::NotFound(
            "/admin is disabled: set server.admin_token".to_owned(),
        ));
    };
    // The page's files hold no data: the script asks for the token.
    if method == Method::GET && (what == "ui" || what.starts_with("ui/")) {
        return admin_ui::asset(what)
            .ok_or_else(|| ApiError::NotFound(format!("no admin endpoint /admin/{what}")));
    }
    let presented = super::route::bearer_token(headers).unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), admin.expose().as_bytes()) {
        return Err(ApiError::Unauthorized(
            "a valid admin token is required".to_owned(),
        ));
    }
    let dry_run = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .any(|p| matches!(p, "dry_run=1" | "dry_run=true" | "dry_run"));
    match (method, what) {
        (&Method::GET, "status") => Ok(admin_ui::json_ok(&status_json(state))),
        (&Method::GET, "usage") => Ok(admin_ui::json_ok(&admin_ui::usage(state, query).await?)),
        (&Method::GET, "config") => Ok(admin_ui::json_ok(&crate::config::effective::to_json(
            &table.config,
        ))),
        (&Method::POST, "reload") if dry_run => {
            Ok(admin_ui::json_ok(&crate::ops::reload::dry_run(state).await))
        }
        (&Method::POST, "reload") => {
            crate::ops::reload::reload_now(state, "admin").await;
            Ok(admin_ui::json_ok(&status_json(state)))
        }
        (_, "status" | "reload" | "config" | "usage") => Err(ApiError::MethodNotAllowed(format!(
            "{method} is not allowed on /admin/{what}"
        ))),
        _ => Err(ApiError::NotFound(format!(
            "no admin endpoint /admin/{what}"
        ))),
    }
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// A key's last quota reading while some figure of it holds, else null;
/// resets as wall-clock times.
fn quota_json(q: &crate::routing::key_health::QuotaReading) -> serde_json::Value {
    if q.requests.is_none() && q.tokens.is_none() {
        return serde_json::Value::Null;
    }
    let at = |r: Option<crate::routing::key_health::Remaining>| {
        r.map(|r| rfc3339(std::time::SystemTime::now() + r.resets_in))
    };
    json!({
        "remaining_requests": q.requests.map(|r| r.left),
        "remaining_tokens": q.tokens.map(|r| r.left),
        "reset_requests": at(q.requests),
        "reset_tokens": at(q.tokens),
    })
}

/// The status document: generation, last reload, key health per client.
pub fn status_json(state: &AppState) -> serde_json::Value {
    let table = state.table.load();
    let last: ReloadStatus = state
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let clients: Vec<_> = table
        .clients
        .iter()
        .map(|c| {
            let keys: Vec<_> = c
                .keys
                .iter()
                .map(|k| {
                    json!({
                        "id": k.id.as_str(),
                        "healthy": k.health.is_available(),
                        "cooldown_until": k.health.cooldown_until().map(rfc3339),
                        "requests": k.health.requests(),
                        "failures": k.health.failures(),
                        "awaiting_probe": k.health.awaiting_probe(),
                        "probes": k.health.probes(),
                        "last_probe": k.health.last_probe().map(|r| r.as_str()),
                        "quota": quota_json(&k.health.quota()),
                    })
                })
                .collect();
            json!({
                "name": c.cfg.name,
                "keys": keys,
                "ttfb_ms": c.ttfb.get().map(|d| d.as_millis() as u64),
            })
        })
        .collect();
    let now = (state.clock)();
    let callers: Vec<_> = table
        .callers
        .iter()
        .map(|c| {
            let l = &c.cfg.limits;
            let per = l
                .budget_usd
                .or(l.budget_tokens)
                .map_or(Per::Month, |b| b.per);
            let snap = c.state.snapshot(now, per);
            json!({
                "name": c.cfg.name,
                "in_flight": snap.in_flight,
                "rpm_used": snap.rpm_used,
                "tpm_used": snap.tpm_used,
                "spent_usd": usd(snap.spent_nanos),
                "spent_tokens": snap.spent_tokens,
                "reserved_usd": usd(snap.reserved_nanos),
                "period": per.as_str(),
                "limits": {
                    "rpm": l.rpm,
                    "tpm": l.tpm,
                    "concurrency": l.concurrency,
                    "budget_usd": l.budget_usd.map(|b| usd(b.amount)),
                    "budget_tokens": l.budget_tokens.map(|b| b.amount),
                },
            })
        })
        .collect();
    json!({
        "generation": table.generation,
        "last_reload": { "ok": last.ok, "at": rfc3339(last.at), "errors": last.errors },
        "clients": clients,
        "callers": callers,
        "shared_state": state.shared.as_ref().map(|s| {
            let mode = s.mode();
            json!({
                "mode": if mode.ok { "ok" } else { "outage" },
                "since": rfc3339(mode.since),
                "address": s.address(),
                "instance": s.instance(),
            })
        }),
    })
}
