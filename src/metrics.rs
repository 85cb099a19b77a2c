//! Prometheus metrics: what is counted, and the text exposition of `/metrics`.
//!
//! Labels never carry a key or token: keys appear as their redacted id.
//! Model labels come from callers, so their number is capped.
//!
//! A leaf: it knows neither the routing table nor the usage row. Callers
//! hand it plain values: a finished request's counted fields
//! ([`Finished`], borrowed from its usage row) and, per scrape, the key and
//! budget gauges read from the routing table ([`Scrape`]).

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Distinct model label values kept; further models are counted as "other".
const MAX_MODEL_LABELS: usize = 1000;

/// Models per client whose request and token series a client keeps at
/// hand; requests for further models look their series up in the families.
const CACHED_MODELS: usize = 32;

/// Statuses per cached model kept at hand, likewise.
const CACHED_STATUSES: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    client: Arc<str>,
    model: Arc<str>,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    client: Arc<str>,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    client: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    client: Arc<str>,
    model: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    client: String,
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    caller: String,
    /// `usd` or `tokens`.
    budget: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabels {
    caller: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerReasonLabels {
    caller: Arc<str>,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerTokenLabels {
    caller: Arc<str>,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// What a finished request counts: the fields of its usage row that the
/// metrics read, borrowed from it (no copy per request).
#[derive(Debug, Clone, Copy, Default)]
pub struct Finished<'a> {
    pub caller: Option<&'a Arc<str>>,
    pub client: Option<&'a Arc<str>>,
    pub model: Option<&'a str>,
    pub status: u16,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
}

/// The gauges read at a scrape, from the routing table in use.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub generation: u64,
    pub keys: Vec<KeyGauges>,
    pub budgets: Vec<BudgetGauge>,
}

/// One key's state at a scrape.
#[derive(Debug, Clone)]
pub struct KeyGauges {
    pub client: String,
    /// The key's redacted id, never the key.
    pub key: String,
    /// Left of its cooldown; `None` when healthy.
    pub cooling_for: Option<Duration>,
    pub requests: u64,
    /// From its last quota reading, while it holds.
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
}

/// One caller budget at a scrape.
#[derive(Debug, Clone)]
pub struct BudgetGauge {
    pub caller: String,
    /// `usd` or `tokens`.
    pub budget: &'static str,
    /// Share spent in its current day or month (1 = all of it).
    pub used: f64,
}

/// One caller's series: handles into the families, each made on first use
/// (so the exposition is the same as looking them up), kept by the routing
/// table instead of hashing the caller's name into four families per
/// request.
#[derive(Debug, Default)]
pub struct CallerMetrics {
    requests: OnceLock<Counter>,
    spend: OnceLock<Counter<f64, AtomicU64>>,
    prompt: OnceLock<Counter>,
    completion: OnceLock<Counter>,
}

/// The metrics of one client that do not depend on the request's model or
/// status: handles into the families, shared with them.
#[derive(Debug)]
pub struct ClientMetrics {
    client: Arc<str>,
    latency: Histogram,
    ttft: Histogram,
    attempts_ok: Counter,
    /// Series by the requested model name, found by a short scan instead
    /// of hashing three label sets per request. Bounded by
    /// [`CACHED_MODELS`]; the counters are the families' own.
    models: Mutex<Vec<ModelSeries>>,
}

#[derive(Debug)]
struct ModelSeries {
    model: Box<str>,
    /// The model's label: the name, or "other" past the label cap.
    label: Arc<str>,
    prompt: Option<Counter>,
    completion: Option<Counter>,
    statuses: Vec<(u16, Counter)>,
}

impl ClientMetrics {
    pub fn attempt_ok(&self) {
        self.attempts_ok.inc();
    }
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    attempts: Family<AttemptLabels, Counter>,
    latency: Family<ClientLabels, Histogram, fn() -> Histogram>,
    ttft: Family<ClientLabels, Histogram, fn() -> Histogram>,
    tokens: Family<TokenLabels, Counter>,
    key_healthy: Family<KeyLabels, Gauge>,
    key_cooldown: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    budget_used: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    key_requests: Family<KeyLabels, Gauge>,
    affinity: Family<ResultLabels, Counter>,
    key_remaining_requests: Family<KeyLabels, Gauge>,
    key_remaining_tokens: Family<KeyLabels, Gauge>,
    reloads: Family<ResultLabels, Counter>,
    key_probes: Family<AttemptLabels, Counter>,
    generation: Gauge,
    usage_rows: Family<ResultLabels, Counter>,
    in_flight: Gauge,
    caller_requests: Family<CallerLabels, Counter>,
    caller_rejections: Family<CallerReasonLabels, Counter>,
    caller_tokens: Family<CallerTokenLabels, Counter>,
    caller_spend: Family<CallerLabels, Counter<f64, AtomicU64>>,
    client_cost: Family<ClientLabels, Counter<f64, AtomicU64>>,
    auth_failures: Family<ReasonLabels, Counter>,
    shadow: Family<AttemptLabels, Counter>,
    /// Label values are shared, not copied: the per-request path allocates
    /// no label strings.
    models_seen: RwLock<HashSet<Arc<str>>>,
    empty: Arc<str>,
    other: Arc<str>,
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gptbalance");
        let m = Metrics {
            requests: Family::default(),
            attempts: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ttft: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            tokens: Family::default(),
            key_healthy: Family::default(),
            key_cooldown: Family::default(),
            budget_used: Family::default(),
            key_requests: Family::default(),
            affinity: Family::default(),
            key_remaining_requests: Family::default(),
            key_remaining_tokens: Family::default(),
            reloads: Family::default(),
            key_probes: Family::default(),
            generation: Gauge::default(),
            usage_rows: Family::default(),
            in_flight: Gauge::default(),
            caller_requests: Family::default(),
            caller_rejections: Family::default(),
            caller_tokens: Family::default(),
            caller_spend: Family::default(),
            client_cost: Family::default(),
            auth_failures: Family::default(),
            shadow: Family::default(),
            models_seen: RwLock::new(HashSet::new()),
            empty: Arc::from(""),
            other: Arc::from("other"),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by client, model and status",
            m.requests.clone(),
        );
        registry.register(
            "upstream_attempts",
            "Upstream attempts by client and result (ok, or why it failed over)",
            m.attempts.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time until the last response byte, by client",
            m.latency.clone(),
        );
        registry.register(
            "ttft_seconds",
            "Time until the first response body byte, by client",
            m.ttft.clone(),
        );
        registry.register(
            "tokens",
            "Tokens reported by upstreams, by client, model and kind",
            m.tokens.clone(),
        );
        registry.register(
            "key_healthy",
            "1 when the key is not cooling down",
            m.key_healthy.clone(),
        );
        registry.register(
            "key_cooldown_seconds",
            "Seconds left in the key's cooldown",
            m.key_cooldown.clone(),
        );
        registry.register(
            "key_requests",
            "Attempts made with the key since start",
            m.key_requests.clone(),
        );
        registry.register(
            "affinity_requests",
            "Requests routed where affinity applies: with a value (hit) or without (none)",
            m.affinity.clone(),
        );
        registry.register(
            "key_remaining_requests",
            "Requests left by the key's last quota reading, while it holds",
            m.key_remaining_requests.clone(),
        );
        registry.register(
            "key_remaining_tokens",
            "Tokens left by the key's last quota reading, while it holds",
            m.key_remaining_tokens.clone(),
        );
        registry.register(
            "caller_budget_used_ratio",
            "Share of each caller budget spent in its current day or month (1 = all of it)",
            m.budget_used.clone(),
        );
        registry.register("reloads", "Config reloads by result", m.reloads.clone());
        registry.register(
            "key_probes",
            "Background probes of keys refused with 401/403, by client and result",
            m.key_probes.clone(),
        );
        registry.register(
            "config_generation",
            "Generation of the routing table in use",
            m.generation.clone(),
        );
        registry.register(
            "usage_rows",
            "Usage rows by result (written, dropped)",
            m.usage_rows.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being served now",
            m.in_flight.clone(),
        );
        registry.register(
            "caller_requests",
            "Requests of each caller that reached the router (admitted or not)",
            m.caller_requests.clone(),
        );
        registry.register(
            "caller_rejections",
            "Requests refused by a caller's limits, by reason",
            m.caller_rejections.clone(),
        );
        registry.register(
            "caller_tokens",
            "Tokens reported by upstreams, by caller and kind",
            m.caller_tokens.clone(),
        );
        registry.register(
            "caller_spend_usd",
            "Cost in USD of each caller's requests, at the configured prices",
            m.caller_spend.clone(),
        );
        registry.register(
            "cost_usd",
            "Cost in USD of the requests each client answered, at the configured prices",
            m.client_cost.clone(),
        );
        registry.register(
            "auth_failures",
            "Requests refused for a missing or invalid bearer token, by reason",
            m.auth_failures.clone(),
        );
        registry.register(
            "shadow_requests",
            "Mirrored requests by shadow client and result (sent, failed, dropped, no_key)",
            m.shadow.clone(),
        );
        registry.register(
            "build",
            "Build information",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            }),
        );
        Metrics { registry, ..m }
    }

    fn model_label(&self, model: Option<&str>) -> Arc<str> {
        let Some(model) = model else {
            return self.empty.clone();
        };
        if let Some(m) = self
            .models_seen
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return m.clone();
        }
        let mut seen = self.models_seen.write().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = seen.get(model) {
            return m.clone();
        }
        if seen.len() < MAX_MODEL_LABELS {
            let m: Arc<str> = Arc::from(model);
            seen.insert(m.clone());
            return m;
        }
        self.other.clone()
    }

    /// Handles for `client`'s per-client metrics (the same series a lookup
    /// by name finds, across reloads).
    pub fn client(&self, client: &Arc<str>) -> ClientMetrics {
        let labels = ClientLabels {
            client: client.clone(),
        };
        ClientMetrics {
            client: client.clone(),
            latency: self.latency.get_or_create_owned(&labels),
            ttft: self.ttft.get_or_create_owned(&labels),
            attempts_ok: self.attempts.get_or_create_owned(&AttemptLabels {
                client: client.clone(),
                result: "ok",
            }),
            models: Mutex::new(Vec::new()),
        }
    }

    /// Counts `r` in the series `cm` keeps for its model and status; false
    /// when they are not kept (a model or status past the bounds).
    fn count_cached(&self, cm: &ClientMetrics, model: &str, r: &Finished) -> bool {
        let mut models = cm.models.lock().unwrap_or_else(|e| e.into_inner());
        let at = match models.iter().position(|m| &*m.model == model) {
            Some(at) => at,
            None if models.len() < CACHED_MODELS => {
                models.push(ModelSeries {
                    model: model.into(),
                    label: self.model_label(Some(model)),
                    prompt: None,
                    completion: None,
                    statuses: Vec::new(),
                });
                models.len() - 1
            }
            None => return false,
        };
        let series = &mut models[at];
        match series.statuses.iter().find(|(s, _)| *s == r.status) {
            Some((_, c)) => {
                c.inc();
            }
            None if series.statuses.len() < CACHED_STATUSES => {
                let c = self.requests.get_or_create_owned(&RequestLabels {
                    client: cm.client.clone(),
                    model: series.label.clone(),
                    status: r.status,
                });
                c.inc();
                series.statuses.push((r.status, c));
            }
            None => return false,
        }
        // Token series appear with the first count, as the lookups make them.
        for (n, counter, kind) in [
            (r.prompt_tokens, &mut series.prompt, "prompt"),
            (r.completion_tokens, &mut series.completion, "completion"),
        ] {
            if let Some(n) = n {
                counter
                    .get_or_insert_with(|| {
                        self.tokens.get_or_create_owned(&TokenLabels {
                            client: cm.client.clone(),
                            model: series.label.clone(),
                            kind,
                        })
                    })
                    .inc_by(n);
            }
        }
        true
    }

    /// A mirrored request to `client`, by `result`.
    pub fn shadow(&self, client: &Arc<str>, result: &'static str) {
        self.shadow
            .get_or_create(&AttemptLabels {
                client: client.clone(),
                result,
            })
            .inc();
    }

    /// A request refused for a missing or invalid token (`reason`).
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// A request of `caller` refused by its limits.
    pub fn caller_rejected(&self, caller: &Arc<str>, reason: &'static str) {
        self.caller_rejections
            .get_or_create(&CallerReasonLabels {
                caller: caller.clone(),
                reason,
            })
            .inc();
    }

    /// The per-caller and cost series of a finished request; through the
    /// caller's kept handles when given.
    fn count_caller_and_cost(&self, r: &Finished, kept: Option<&CallerMetrics>) {
        if let Some(caller) = r.caller {
            let labels = || CallerLabels {
                caller: caller.clone(),
            };
            let tokens = |kind| CallerTokenLabels {
                caller: caller.clone(),
                kind,
            };
            match kept {
                Some(k) => {
                    k.requests
                        .get_or_init(|| self.caller_requests.get_or_create_owned(&labels()))
                        .inc();
                    if let Some(cost) = r.cost_usd {
                        k.spend
                            .get_or_init(|| self.caller_spend.get_or_create_owned(&labels()))
                            .inc_by(cost);
                    }
                    for (kind, n, handle) in [
                        ("prompt", r.prompt_tokens, &k.prompt),
                        ("completion", r.completion_tokens, &k.completion),
                    ] {
                        if let Some(n) = n {
                            handle
                                .get_or_init(|| {
                                    self.caller_tokens.get_or_create_owned(&tokens(kind))
                                })
                                .inc_by(n);
                        }
                    }
                }
                None => {
                    self.caller_requests.get_or_create(&labels()).inc();
                    if let Some(cost) = r.cost_usd {
                        self.caller_spend.get_or_create(&labels()).inc_by(cost);
                    }
                    for (kind, n) in [
                        ("prompt", r.prompt_tokens),
                        ("completion", r.completion_tokens),
                    ] {
                        if let Some(n) = n {
                            self.caller_tokens.get_or_create(&tokens(kind)).inc_by(n);
                        }
                    }
                }
            }
        }
        if let (Some(cost), Some(client)) = (r.cost_usd, r.client) {
            self.client_cost
                .get_or_create(&ClientLabels {
                    client: client.clone(),
                })
                .inc_by(cost);
        }
    }

    /// `client`: the answering client's handles, when one answered.
    pub fn request_finished(&self, r: &Finished, client_metrics: Option<&ClientMetrics>) {
        self.request_finished_by(r, client_metrics, None);
    }

    /// [`Metrics::request_finished`], with the caller's kept handles.
    pub fn request_finished_by(
        &self,
        r: &Finished,
        client_metrics: Option<&ClientMetrics>,
        caller_metrics: Option<&CallerMetrics>,
    ) {
        if r.caller.is_some() || r.cost_usd.is_some() {
            self.count_caller_and_cost(r, caller_metrics);
        }
        if let (Some(cm), Some(model)) = (client_metrics, r.model) {
            if self.count_cached(cm, model, r) {
                cm.latency.observe(r.latency_ms as f64 / 1000.0);
                if let Some(t) = r.ttft_ms {
                    cm.ttft.observe(t as f64 / 1000.0);
                }
                return;
            }
        }
        let client = r.client.cloned().unwrap_or_else(|| self.empty.clone());
        let model = self.model_label(r.model);
        self.requests
            .get_or_create(&RequestLabels {
                client: client.clone(),
                model: model.clone(),
                status: r.status,
            })
            .inc();
        if let Some(cm) = client_metrics {
            cm.latency.observe(r.latency_ms as f64 / 1000.0);
            if let Some(t) = r.ttft_ms {
                cm.ttft.observe(t as f64 / 1000.0);
            }
        } else if r.client.is_some() {
            let labels = ClientLabels {
                client: client.clone(),
            };
            self.latency
                .get_or_create(&labels)
                .observe(r.latency_ms as f64 / 1000.0);
            if let Some(t) = r.ttft_ms {
                self.ttft.get_or_create(&labels).observe(t as f64 / 1000.0);
            }
        }
        for (kind, n) in [
            ("prompt", r.prompt_tokens),
            ("completion", r.completion_tokens),
        ] {
            if let Some(n) = n {
                self.tokens
                    .get_or_create(&TokenLabels {
                        client: client.clone(),
                        model: model.clone(),
                        kind,
                    })
                    .inc_by(n);
            }
        }
    }

    pub fn attempt(&self, client: &Arc<str>, result: &'static str) {
        self.attempts
            .get_or_create(&AttemptLabels {
                client: client.clone(),
                result,
            })
            .inc();
    }

    pub fn key_probe(&self, client: &Arc<str>, result: &'static str) {
        self.key_probes
            .get_or_create(&AttemptLabels {
                client: client.clone(),
                result,
            })
            .inc();
    }

    /// A request where affinity applies: `hit` (it had a value) or `none`.
    pub fn affinity(&self, result: &'static str) {
        self.affinity.get_or_create(&ResultLabels { result }).inc();
    }

    pub fn reload(&self, ok: bool, generation: u64) {
        let result = if ok { "ok" } else { "failed" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
        self.set_generation(generation);
    }

    pub fn set_generation(&self, generation: u64) {
        self.generation.set(generation as i64);
    }

    pub fn usage_rows(&self, result: &'static str, n: u64) {
        self.usage_rows
            .get_or_create(&ResultLabels { result })
            .inc_by(n);
    }

    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// The exposition text, with the key and budget gauges of `now`.
    pub fn render(&self, now: &Scrape) -> String {
        let _one_scrape_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.set(now.generation as i64);
        self.key_healthy.clear();
        self.key_cooldown.clear();
        self.key_requests.clear();
        self.key_remaining_requests.clear();
        self.key_remaining_tokens.clear();
        for k in &now.keys {
            let labels = KeyLabels {
                client: k.client.clone(),
                key: k.key.clone(),
            };
            self.key_healthy
                .get_or_create(&labels)
                .set(i64::from(k.cooling_for.is_none()));
            self.key_cooldown
                .get_or_create(&labels)
                .set(k.cooling_for.map_or(0.0, |d| d.as_secs_f64()));
            self.key_requests
                .get_or_create(&labels)
                .set(k.requests as i64);
            if let Some(r) = k.remaining_requests {
                self.key_remaining_requests
                    .get_or_create(&labels)
                    .set(r.min(i64::MAX as u64) as i64);
            }
            if let Some(t) = k.remaining_tokens {
                self.key_remaining_tokens
                    .get_or_create(&labels)
                    .set(t.min(i64::MAX as u64) as i64);
            }
        }
        self.budget_used.clear();
        for b in &now.budgets {
            let labels = BudgetLabels {
                caller: b.caller.clone(),
                budget: b.budget,
            };
            self.budget_used.get_or_create(&labels).set(b.used);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(m: &Metrics) -> Vec<String> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    }

    /// The series a client keeps at hand, within and past their bounds,
    /// count exactly what the lookups by label count.
    #[test]
    fn series_kept_for_a_caller_count_what_the_families_count() {
        let (kept, looked_up) = (Metrics::new(), Metrics::new());
        let handles = CallerMetrics::default();
        for i in 0..40u64 {
            let (caller, client) = (Arc::from("app"), Arc::from("c1"));
            let r = Finished {
                caller: Some(&caller),
                client: Some(&client),
                status: 200,
                prompt_tokens: (i % 3 != 0).then_some(i),
                completion_tokens: (i % 2 == 0).then_some(1),
                cost_usd: (i % 5 != 0).then_some(0.25),
                ..Finished::default()
            };
            kept.request_finished_by(&r, None, Some(&handles));
            looked_up.request_finished(&r, None);
        }
        let (a, b) = (exposition(&kept), exposition(&looked_up));
        assert!(a.iter().any(|l| l.contains("caller=\"app\"")), "{a:?}");
        assert_eq!(a, b);
    }

    #[test]
    fn series_kept_by_a_client_count_what_the_families_count() {
        let client: Arc<str> = Arc::from("c1");
        let (kept, looked_up) = (Metrics::new(), Metrics::new());
        let handles = kept.client(&client);
        let _same_series = looked_up.client(&client);
        for i in 0..(3 * CACHED_MODELS * (CACHED_STATUSES + 4)) {
            let model = format!("m{}", i % (CACHED_MODELS + 7));
            let r = Finished {
                client: Some(&client),
                model: Some(&model),
                status: 200 + (i % (CACHED_STATUSES + 3)) as u16,
                latency_ms: i as u64,
                // Model m3 never reports tokens: it gets no token series.
                prompt_tokens: (i % (CACHED_MODELS + 7) != 3).then_some(i as u64),
                completion_tokens: (i % 2 == 0 && i % (CACHED_MODELS + 7) != 3).then_some(1),
                ..Finished::default()
            };
            kept.request_finished(&r, Some(&handles));
            looked_up.request_finished(&r, None);
        }
        let (a, b) = (exposition(&kept), exposition(&looked_up));
        assert!(a
            .iter()
            .any(|l| l.starts_with("gptbalance_requests_total{")));
        assert!(a.iter().any(|l| l.contains("model=\"m38\"")));
        assert!(!a
            .iter()
            .any(|l| l.starts_with("gptbalance_tokens_total{") && l.contains("model=\"m3\"")));
        let differ: Vec<_> = a.iter().filter(|l| !b.contains(l)).collect();
        assert!(differ.is_empty(), "{differ:?}");
        assert_eq!(a.len(), b.len());
    }
}
