//! Usage of every proxied request: the record, the background writer, the
//! monthly SQLite files and the reports read from them.
//!
//! No request waits on SQLite: the proxy hands a [`UsageRecord`] to
//! [`UsageSink::send`], which packs it into the writer's buffer. The
//! writer thread (`writer`) packs each batch into rows (`rows`), picks the
//! month's file (`store`: naming, schema, migration, opening) and inserts
//! them through the prepared statements of `insert`. Reports (`report`,
//! `daily`, `replay`) open the files read-only through `store`.

pub mod daily;
// The insert engine binds text in place through SQLite's C API.
#[allow(unsafe_code)]
pub mod insert;
pub mod replay;
pub mod report;
pub mod rows;
pub mod store;
pub mod writer;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::SystemTime;

pub use writer::{UsageSink, UsageWriter};

use crate::metrics::Finished;

/// One row of the `requests` table.
#[derive(Debug, Clone, Default)]
pub struct UsageRecord {
    /// Start of the request; picks the month file.
    pub ts: Option<SystemTime>,
    pub request_id: String,
    /// Shared with the routing table's caller: no copy per request.
    pub caller: Option<Arc<str>>,
    /// Borrowed for the usual endpoints: no copy per request, and the
    /// writer binds it once for a run of rows.
    pub endpoint: Cow<'static, str>,
    /// Shared with the request (and with each other when equal).
    pub model: Option<Arc<str>>,
    pub routed_model: Option<Arc<str>>,
    /// Shared with the routing table: no copy per request.
    pub client: Option<Arc<str>>,
    pub key_id: Option<Arc<str>>,
    pub status: u16,
    pub stream: bool,
    pub attempts: u32,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    pub error: Option<String>,
    /// Prompt tokens served from the provider's cache.
    pub cached_tokens: Option<u64>,
    pub reasoning_tokens: Option<u64>,
    /// What the tokens cost at the config's prices; `None` when unpriced or
    /// the usage is unknown.
    pub cost_usd: Option<f64>,
    /// The caller's reservation, when its limits asked for one.
    pub reserved_usd: Option<f64>,
    pub reserved_tokens: Option<u64>,
    /// A mirrored request (`shadow`), counted against no caller.
    pub shadow: bool,
}

impl UsageRecord {
    /// The fields of this row that the metrics count.
    pub fn counted(&self) -> Finished<'_> {
        Finished {
            caller: self.caller.as_ref(),
            client: self.client.as_ref(),
            model: self.model.as_deref(),
            status: self.status,
            latency_ms: self.latency_ms,
            ttft_ms: self.ttft_ms,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost_usd: self.cost_usd,
        }
    }
}
