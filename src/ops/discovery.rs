//! `discover_models: true`: the model names an upstream serves, for
//! `GET /v1/models`, where UIs fill their model menus.
//!
//! At start and after each reload, every client that asks for it gets one
//! `GET {base_url}/models` with its first key, in the background: no
//! request waits for it. The answer is bounded (`MAX_BODY` bytes,
//! `MAX_NAMES` names of at most `MAX_NAME_BYTES`, within `TIMEOUT`) and
//! cached until the next reload; a failure is logged and keeps the names
//! fetched before. Only the names the client's own `model_match` matches
//! are listed, so the list never shows a model that would not route there.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};
use http_body_util::BodyExt;

use crate::routing::RoutingTable;
use crate::state::{AppState, Listed};
use crate::upstream::describe;
use crate::upstream::request::build_request;

/// Longest wait for one upstream's list.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Largest list body read.
const MAX_BODY: usize = 4 * 1024 * 1024;
/// Most names kept per client.
const MAX_NAMES: usize = 10_000;
/// Longest name kept: longer ones could not be requested anyway.
const MAX_NAME_BYTES: usize = 256;

/// Starts one background fetch per client with `discover_models: true` in
/// the current table. Call on a tokio runtime.
pub fn refresh(state: &Arc<AppState>) {
    let table = state.table.load_full();
    for (i, c) in table.clients.iter().enumerate() {
        if !c.cfg.discover_models {
            continue;
        }
        let (state, table) = (state.clone(), table.clone());
        tokio::spawn(async move {
            let c = &table.clients[i];
            match fetch(&state, &table, i).await {
                Ok(names) => {
                    tracing::info!(client = %c.cfg.name, models = names.len(), "model list fetched");
                    state.discovered.store(
                        &c.cfg.name,
                        Listed {
                            base_url: c.cfg.base_url.clone(),
                            generation: table.generation,
                            names: names.into(),
                        },
                    );
                }
                Err(e) => tracing::warn!(
                    client = %c.cfg.name,
                    error = %e,
                    "cannot fetch the model list; keeping the last one"
                ),
            }
        });
    }
}

/// `GET {base_url}/models` with the client's first key: the `id` of each
/// entry of `data`, as OpenAI-compatible servers answer.
async fn fetch(
    state: &AppState,
    table: &RoutingTable,
    client: usize,
) -> Result<Vec<String>, String> {
    let c = &table.clients[client];
    let key = c.keys.first().ok_or("the client has no key")?;
    let no_headers = HeaderMap::new();
    let req = build_request(
        c,
        key,
        &Method::GET,
        "models",
        None,
        &no_headers,
        Default::default(),
    )
    .map_err(|e| format!("cannot build the request: {e}"))?;
    let connect_timeout = c.cfg.policy.connect_timeout.min(TIMEOUT);
    let body = tokio::time::timeout(TIMEOUT, async {
        let resp = state
            .upstream
            .send(connect_timeout, req)
            .await
            .map_err(|e| describe(&e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("upstream answered {}", status.as_u16()));
        }
        http_body_util::Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .map_err(|e| format!("cannot read the list (at most {MAX_BODY} bytes): {e}"))
    })
    .await
    .map_err(|_| format!("no list within {TIMEOUT:?}"))??;
    names(&body)
}

/// The model names of an OpenAI-style list, `{"data": [{"id": ...}]}`.
fn names(body: &[u8]) -> Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct List {
        data: Vec<Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        id: Option<serde_json::Value>,
    }
    let list: List = serde_json::from_slice(body).map_err(|e| format!("not a model list: {e}"))?;
    let mut out: Vec<String> = list
        .data
        .into_iter()
        .filter_map(|e| match e.id {
            Some(serde_json::Value::String(id)) => Some(id),
            _ => None,
        })
        .filter(|id| !id.is_empty() && id.len() <= MAX_NAME_BYTES)
        .take(MAX_NAMES)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_and_skips_odd_entries() {
        let long = "m".repeat(MAX_NAME_BYTES + 1);
        let body = format!(
            r#"{{"object":"list","data":[{{"id":"gpt-4o"}},{{"id":5}},{{"name":"x"}},{{"id":""}},{{"id":"{long}"}},{{"id":"gpt-4o-mini","owned_by":"s"}},{{"id":"gpt-4o"}}]}}"#
        );
        assert_eq!(names(body.as_bytes()).unwrap(), ["gpt-4o", "gpt-4o-mini"]);
        assert!(names(b"[]").is_err());
        assert!(names(b"<html>").is_err());
    }
}
