//! Background key checks: a key refused with 401/403 is probed with `GET
//! {base_url}/models` (no tokens spent) every `cooldown` until one probe
//! succeeds, instead of being handed back to callers when its cooldown ends.
//!
//! One task per daemon, off the request path: it looks at the current
//! routing table, probes the keys whose probe is due (a few at a time) and
//! records each result in the key's health and in `/metrics`. Probes write
//! no usage row, and only the redacted key id is ever logged.

use std::sync::{Arc, Weak};
use std::time::Duration;

use http::{HeaderMap, Method};
use http_body_util::BodyExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::routing::key_health::ProbeResult;
use crate::routing::RoutingTable;
use crate::state::AppState;
use crate::upstream::request::build_request;
use crate::upstream::UpstreamClients;

/// Probes in flight at once, across all clients.
const CONCURRENCY: usize = 4;
/// The longest one probe may take, connection included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the table is looked at when no probe is coming up sooner:
/// keys refused since the last look are noticed within this.
const IDLE_LOOK: Duration = Duration::from_secs(1);

/// Starts the probe task. It holds the state weakly and ends with it.
pub fn spawn(state: &Arc<AppState>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(run(Arc::downgrade(state)))
}

async fn run(state: Weak<AppState>) {
    let limit = Arc::new(Semaphore::new(CONCURRENCY));
    loop {
        let next_look = match state.upgrade() {
            Some(state) => probe_due_keys(&state, &limit).await,
            None => return,
        };
        tokio::time::sleep(next_look).await;
    }
}

/// Probes every key whose probe is due; returns how long to wait before
/// looking again.
async fn probe_due_keys(state: &Arc<AppState>, limit: &Arc<Semaphore>) -> Duration {
    let table = state.table.load_full();
    let mut next_look = IDLE_LOOK;
    let mut probes = JoinSet::new();
    for (ci, c) in table.clients.iter().enumerate() {
        for (ki, k) in c.keys.iter().enumerate() {
            if !k.health.awaiting_probe() {
                continue;
            }
            if !c.cfg.policy.probe_keys {
                // Probing was turned off by a reload: the cooldown alone decides.
                k.health.stop_awaiting_probe();
                continue;
            }
            if !k.health.probe_due() {
                if let Some(left) = k.health.cooling_for() {
                    next_look = next_look.min(left);
                }
                continue;
            }
            let (table, state, limit) = (table.clone(), state.clone(), limit.clone());
            probes.spawn(async move {
                let _slot = limit.acquire_owned().await;
                let client = &table.clients[ci];
                let key = &client.keys[ki];
                let result = probe(&state.upstream, &table, ci, ki).await;
                key.health.record_probe(result, client.cfg.policy.cooldown);
                state.metrics.key_probe(&client.name, result.as_str());
                tracing::info!(client = %client.name, key = %key.id, result = result.as_str(), "key probed");
            });
        }
    }
    while probes.join_next().await.is_some() {}
    next_look.max(Duration::from_millis(20))
}

/// One `GET {base_url}/models` with the key; the body is read and dropped.
async fn probe(
    clients: &UpstreamClients,
    table: &RoutingTable,
    ci: usize,
    ki: usize,
) -> ProbeResult {
    let client = &table.clients[ci];
    let key = &client.keys[ki];
    let no_headers = HeaderMap::new();
    let Ok(req) = build_request(
        client,
        key,
        &Method::GET,
        "models",
        None,
        &no_headers,
        Default::default(),
    ) else {
        return ProbeResult::Unreachable;
    };
    let connect_timeout = client.cfg.policy.connect_timeout.min(PROBE_TIMEOUT);
    let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
        let resp = clients.send(connect_timeout, req).await.ok()?;
        let status = resp.status().as_u16();
        let _ = resp.into_body().collect().await;
        Some(status)
    })
    .await;
    match answer {
        Ok(Some(200..=299)) => ProbeResult::Ok,
        Ok(Some(401 | 403)) => ProbeResult::Invalid,
        Ok(Some(429)) => ProbeResult::RateLimited,
        Ok(Some(_)) => ProbeResult::UpstreamError,
        Ok(None) | Err(_) => ProbeResult::Unreachable,
    }
}
