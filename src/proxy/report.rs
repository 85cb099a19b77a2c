//! The end of a request: one log line, metrics, one usage row.
//!
//! A [`Completion`] is made when a proxied request starts and reports
//! exactly once: when finished, or when dropped because the caller went away.
//! Its line is the request's access log line (`access`): `info` when the
//! request went well and `logging.access` is on, `warn` when it failed
//! whatever that setting.

use std::sync::Arc;
use std::time::Instant;

use super::access;
use super::sse::Usage;
use crate::config::prices::{self, Price, Tokens};
use crate::limits::shared::{SharedState, SharedTicket};
use crate::limits::{CallerState, Cost, Ticket};
use crate::metrics::ClientMetrics;
use crate::routing::key_health::InFlight;
use crate::routing::ClientRoute;
use crate::state::AppState;
use crate::usage::UsageRecord;

/// A caller's reservation for this request, settled when it reports.
pub enum Admission {
    /// Held in process.
    Local {
        state: Arc<CallerState>,
        ticket: Ticket,
    },
    /// Held in the shared state; boxed so that a request without shared
    /// state carries no bigger `Completion` than before.
    Shared(Box<SharedAdmission>),
}

/// A reservation in the shared state; `state` counts this instance's spend.
pub struct SharedAdmission {
    pub shared: Arc<SharedState>,
    pub caller: Arc<str>,
    pub state: Arc<CallerState>,
    pub ticket: SharedTicket,
}

impl Admission {
    fn reserved(&self) -> Cost {
        match self {
            Admission::Local { ticket, .. } => ticket.reserved,
            Admission::Shared(a) => a.ticket.reserved,
        }
    }

    fn settle(self, actual: Cost) {
        match self {
            Admission::Local { state, ticket } => state.settle(ticket, actual),
            Admission::Shared(a) => {
                let SharedAdmission {
                    shared,
                    caller,
                    state,
                    ticket,
                } = *a;
                shared.settle(caller, &state, ticket, actual)
            }
        }
    }
}

/// Status recorded for a request whose caller left before any response.
pub const CALLER_CLOSED: u16 = 499;

pub struct Completion {
    state: Arc<AppState>,
    /// Boxed from the start: the request's futures move a pointer
    /// instead of the row. Taken when
    /// the request reports: `None` means it has.
    record: Option<Box<UsageRecord>>,
    started: Instant,
    /// Keeps the key's in-flight count up until the response body ends.
    pub in_flight: Option<InFlight>,
    /// The answering client's metric handles.
    pub client_metrics: Option<Arc<ClientMetrics>>,
    /// The caller's metric series, when the request has a caller.
    pub caller_metrics: Option<Arc<crate::metrics::CallerMetrics>>,
    /// The caller's reservation, when its limits took one.
    pub admission: Option<Admission>,
    /// The price of the model the answering client was sent, if priced.
    pub price: Option<Price>,
    /// Sent to a shadow client once this request has ended.
    pub mirror: Option<Box<super::shadow::Mirror>>,
    /// Caller's address, method and path; `None` with `logging.access` off.
    access: Option<Arc<access::Request>>,
}

impl Completion {
    pub fn start(state: Arc<AppState>, record: Box<UsageRecord>, started: Instant) -> Completion {
        state.metrics.in_flight().inc();
        Completion {
            state,
            record: Some(record),
            started,
            in_flight: None,
            client_metrics: None,
            caller_metrics: None,
            admission: None,
            price: None,
            mirror: None,
            access: access::claim(),
        }
    }

    /// The row this request will report.
    pub fn record(&mut self) -> &mut UsageRecord {
        // Taken only by `report`, after which nothing reads it.
        self.record.get_or_insert_with(Box::default)
    }

    /// `client` answers: its metrics are counted when this request ends.
    pub fn answered_by(&mut self, client: &ClientRoute) {
        self.client_metrics = Some(client.metrics(&self.state.metrics).clone());
    }

    pub fn finish(mut self, usage: Option<Usage>, error: Option<String>) {
        self.report(usage, error);
    }

    fn report(&mut self, usage: Option<Usage>, error: Option<String>) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        self.in_flight.take();
        r.latency_ms = self.started.elapsed().as_millis() as u64;
        if let Some(u) = usage {
            r.prompt_tokens = u.prompt_tokens;
            r.completion_tokens = u.completion_tokens;
            r.total_tokens = u.total_tokens;
            r.cached_tokens = u.cached_tokens;
            r.reasoning_tokens = u.reasoning_tokens;
        }
        if error.is_some() {
            r.error = error;
        }
        let counted = usage.filter(|u| u.prompt_tokens.is_some() || u.completion_tokens.is_some());
        let cost = match (self.price, counted) {
            (Some(p), Some(u)) => Some(p.cost_nanos(Tokens {
                prompt: u.prompt_tokens.unwrap_or(0),
                cached: u.cached_tokens.unwrap_or(0),
                completion: u.completion_tokens.unwrap_or(0),
            })),
            _ => None,
        };
        r.cost_usd = cost.map(prices::usd);
        if let Some(a) = self.admission.take() {
            // Refunded unless the caller got a 2xx; settled at what the
            // upstream reported, or at the reservation when it said nothing.
            let actual = if !(200..300).contains(&r.status) {
                Cost::default()
            } else if let Some(total) = counted.and_then(|u| u.total_tokens) {
                Cost {
                    tokens: total,
                    nanos: cost.unwrap_or(0),
                }
            } else {
                r.error.get_or_insert_with(|| "usage unknown".to_owned());
                a.reserved()
            };
            a.settle(actual);
        }
        let state = &self.state;
        state.metrics.in_flight().dec();
        state.metrics.request_finished_by(
            &r.counted(),
            self.client_metrics.as_deref(),
            self.caller_metrics.as_deref(),
        );
        let a = self.access.as_deref();
        let remote_addr = a.and_then(|a| a.remote).map(tracing::field::display);
        let peer = a.and_then(|a| a.peer).map(tracing::field::display);
        let method = a.map(|a| tracing::field::display(&a.method));
        let path = a.map(|a| tracing::field::display(a.path()));
        if r.status >= 500 || r.status == CALLER_CLOSED || (r.error.is_some() && r.status < 400) {
            tracing::warn!(
                remote_addr, peer, method, path,
                request_id = %r.request_id, caller = r.caller.as_deref(), model = r.model.as_deref(),
                client = r.client.as_deref(), key = r.key_id.as_deref(), status = r.status,
                attempts = r.attempts, latency_ms = r.latency_ms, ttft_ms = r.ttft_ms,
                error = r.error.as_deref(), "request"
            );
        } else if a.is_some() {
            tracing::info!(
                remote_addr, peer, method, path,
                request_id = %r.request_id, caller = r.caller.as_deref(), model = r.model.as_deref(),
                client = r.client.as_deref(), key = r.key_id.as_deref(), status = r.status,
                attempts = r.attempts, latency_ms = r.latency_ms, ttft_ms = r.ttft_ms,
                tokens = r.total_tokens, error = r.error.as_deref(), "request"
            );
        }
        state.usage.send(&r);
        if let Some(m) = self.mirror.take() {
            // After the caller's last byte: a mirror never delays it.
            if r.status != CALLER_CLOSED {
                super::shadow::spawn(state.clone(), *m);
            }
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if let Some(r) = self.record.as_mut() {
            if r.status == 0 {
                r.status = CALLER_CLOSED;
            }
            self.report(None, Some("caller closed the connection".to_owned()));
        }
    }
}
