//! The endpoints answered locally: models, health, readiness, metrics, admin.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use serde_json::json;

use super::api_error::ApiError;
use super::body::ResponseBody;
use super::{AppState, ReloadStatus};
use crate::config::prices::usd;
use crate::config::{CallerConfig, Per};
use crate::routing::RoutingTable;
use crate::secret::constant_time_eq;

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
    let mut text = state.metrics.render(table);
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

/// Every exact model name the caller may use, in OpenAI's list format.
pub fn models(table: &RoutingTable, caller: Option<&CallerConfig>) -> Response<ResponseBody> {
    let data: Vec<_> = table
        .models()
        .into_iter()
        .filter(|(id, _)| caller.is_none_or(|c| c.allows(id)))
        .map(|(id, owner)| model_json(id, owner))
        .collect();
    json_response(StatusCode::OK, &json!({ "object": "list", "data": data }))
}

pub fn model(
    table: &RoutingTable,
    id: &str,
    caller: Option<&CallerConfig>,
) -> Result<Response<ResponseBody>, ApiError> {
    table
        .models()
        .into_iter()
        .filter(|(id, _)| caller.is_none_or(|c| c.allows(id)))
        .find(|(m, _)| *m == id)
        .map(|(m, owner)| json_response(StatusCode::OK, &model_json(m, owner)))
        .ok_or_else(|| ApiError::ModelNotFound(format!("the model `{id}` does not exist")))
}

/// `/admin/status` and `POST /admin/reload`, behind `admin_token`; 404 when
/// no admin token is configured.
pub async fn admin(
    state: &Arc<AppState>,
    table: &RoutingTable,
    method: &Method,
    what: &str,
    headers: &HeaderMap,
) -> Result<Response<ResponseBody>, ApiError> {
    let Some(admin) = &table.config.server.admin_token else {
        return Err(ApiError::NotFound(
            "/admin is disabled: set server.admin_token".to_owned(),
        ));
    };
    let presented = super::handler::bearer_token(headers).unwrap_or("");
    if !constant_time_eq(presented.as_bytes(), admin.expose().as_bytes()) {
        return Err(ApiError::Unauthorized(
            "a valid admin token is required".to_owned(),
        ));
    }
    match (method, what) {
        (&Method::GET, "status") => Ok(json_response(StatusCode::OK, &status_json(state))),
        (&Method::POST, "reload") => {
            crate::ops::reload::reload_now(state, "admin").await;
            Ok(json_response(StatusCode::OK, &status_json(state)))
        }
        (_, "status" | "reload") => Err(ApiError::MethodNotAllowed(format!(
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
                    })
                })
                .collect();
            json!({ "name": c.cfg.name, "keys": keys })
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
