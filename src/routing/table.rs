//! `RoutingTable`: the immutable value built from a valid config and swapped
//! whole on reload. A request loads it once and keeps it for its life.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;

use smallvec::SmallVec;

use super::affinity;
use super::key_health::KeyHealth;
use super::selector::{self, Candidates, Order, Tier, TtfbAverage};
use crate::config::matcher;
use crate::config::{
    Api, AuthStyle, Balance, CallerConfig, ClientConfig, Config, KeyStrategy, Price, ShadowConfig,
};
use crate::limits::{CallerState, Periods};
use crate::metrics::{BudgetGauge, ClientMetrics, KeyGauges, Metrics, Scrape};
use crate::secret::{KeyId, Secret};

/// Model names resolved on demand and remembered; past this many, further
/// names are resolved per request but not stored, so callers inventing
/// model names cannot grow memory without bound.
const ROUTE_CACHE_LIMIT: usize = 10_000;

/// FNV-1a, for maps looked up on every request with short keys (model
/// names here, upstream authorities in the connection pool) where SipHash
/// costs more than the rest of a lookup. Only for maps whose keys come from
/// the config: a caller cannot choose them to collide.
#[derive(Default)]
pub(crate) struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// A model's candidates: borrowed from the table for the names it knows
/// (no reference count touched per request: the two request threads would
/// share its cache line), shared from the cache for the others.
pub enum CandidatesRef<'a> {
    Known(&'a Candidates),
    Cached(Arc<Candidates>),
}

impl std::ops::Deref for CandidatesRef<'_> {
    type Target = Candidates;

    fn deref(&self) -> &Candidates {
        match self {
            CandidatesRef::Known(c) => c,
            CandidatesRef::Cached(c) => c,
        }
    }
}

#[derive(Debug)]
pub struct RoutingTable {
    /// 1 for the first table, +1 per applied reload.
    pub generation: u64,
    pub config: Arc<Config>,
    pub clients: Vec<ClientRoute>,
    by_name: HashMap<String, usize>,
    /// Routes for every exact model name and fallback target, built up
    /// front, one map per [`Api`] (only clients of a request's API are
    /// its candidates).
    known: [HashMap<String, Arc<Candidates>, BuildHasherDefault<Fnv>>; 2],
    cache: [RwLock<HashMap<Box<str>, Arc<Candidates>>>; 2],
    /// Every caller (`callers`, then `auth_tokens`); empty: no auth.
    pub callers: Vec<CallerRoute>,
    /// `shadow` rules, with their clients resolved.
    pub shadows: Vec<ShadowRoute>,
    /// Callers by the SHA-256 of their token: a request's token is hashed
    /// once and looked up, never compared with each token in turn.
    by_token: HashMap<[u8; 32], usize, BuildHasherDefault<Fnv>>,
}

/// A caller as requests see it: its config, its name shared with usage
/// rows, and its counters (kept across reloads by name).
#[derive(Debug)]
pub struct CallerRoute {
    pub cfg: CallerConfig,
    pub name: Arc<str>,
    pub state: Arc<CallerState>,
    /// The caller's metric series, for this config generation.
    pub metrics: Arc<crate::metrics::CallerMetrics>,
}

#[derive(Debug)]
pub struct ClientRoute {
    pub cfg: ClientConfig,
    /// `{base_url}/{endpoint}` for each of [`USUAL_ENDPOINTS`], parsed once
    /// per config generation instead of per request.
    usual_uris: Vec<Option<http::Uri>>,
    /// `cfg.name`, shared by the usage rows and metric labels of every request.
    pub name: Arc<str>,
    pub keys: Vec<KeyRoute>,
    cursor: AtomicUsize,
    /// This client's metric handles, looked up once instead of per request.
    metrics: OnceLock<Arc<ClientMetrics>>,
    /// Time to first byte on this instance, for `balance: latency`; kept
    /// across reloads by client name.
    pub ttfb: Arc<TtfbAverage>,
}

/// The endpoints most requests go to.
pub const USUAL_ENDPOINTS: [&str; 6] = [
    "chat/completions",
    "completions",
    "embeddings",
    "responses",
    "moderations",
    "images/generations",
];

impl ClientRoute {
    /// The upstream URI of `endpoint` when it is one of [`USUAL_ENDPOINTS`].
    pub fn usual_uri(&self, endpoint: &str) -> Option<&http::Uri> {
        let i = USUAL_ENDPOINTS.iter().position(|e| *e == endpoint)?;
        self.usual_uris.get(i)?.as_ref()
    }

    pub fn metrics(&self, metrics: &Metrics) -> &Arc<ClientMetrics> {
        self.metrics
            .get_or_init(|| Arc::new(metrics.client(&self.name)))
    }
}

impl AsRef<ClientConfig> for ClientRoute {
    fn as_ref(&self) -> &ClientConfig {
        &self.cfg
    }
}

#[derive(Debug)]
pub struct KeyRoute {
    pub id: KeyId,
    /// `id` as text, shared by usage rows and logs.
    pub label: Arc<str>,
    pub secret: Secret,
    pub health: Arc<KeyHealth>,
    /// The headers that carry the key by the client's `auth` (and
    /// `anthropic-version` for an `anthropic` client), marked sensitive so
    /// hyper never logs them; empty for `auth: none`.
    pub credential: Vec<(http::HeaderName, HeaderValue)>,
    /// This (client, key) pair in affinity's rendezvous hashing.
    pub affinity_seed: u64,
}

/// What a request asks of a key beyond being healthy.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyAsk {
    /// The request's reserved tokens: a key whose last reading has fewer
    /// left is skipped until its reset.
    pub tokens: u64,
    /// The hash of the request's affinity value, for this client's source.
    pub affinity: Option<u64>,
}

/// The outcome of asking a client for a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPick {
    Key(usize),
    /// Every key not yet tried is cooling down; the soonest is free after this.
    Cooling(Duration),
    /// Every key was tried in this request.
    Exhausted,
}

impl RoutingTable {
    /// Builds the table; key health carries over from `previous` for every
    /// (client name, key) pair that still exists.
    pub fn build(config: Config, previous: Option<&RoutingTable>) -> RoutingTable {
        let clients: Vec<ClientRoute> = config
            .clients
            .iter()
            .map(|cfg| {
                let old = previous.and_then(|p| p.client(&cfg.name));
                let keys = cfg
                    .keys
                    .iter()
                    .map(|secret| {
                        let health = old
                            .and_then(|o| o.keys.iter().find(|k| &k.secret == secret))
                            .map(|k| k.health.clone())
                            .unwrap_or_default();
                        let credential = credential_headers(cfg, secret);
                        KeyRoute {
                            id: secret.key_id(),
                            label: Arc::from(secret.key_id().to_string()),
                            secret: secret.clone(),
                            health,
                            credential,
                            affinity_seed: affinity::pair_seed(&cfg.name, secret.key_id().as_str()),
                        }
                    })
                    .collect();
                let usual_uris = USUAL_ENDPOINTS
                    .iter()
                    .map(|e| format!("{}/{e}", cfg.base_url).parse().ok())
                    .collect();
                ClientRoute {
                    cfg: cfg.clone(),
                    usual_uris,
                    name: Arc::from(cfg.name.as_str()),
                    metrics: OnceLock::new(),
                    ttfb: old.map(|o| o.ttfb.clone()).unwrap_or_default(),
                    keys,
                    cursor: AtomicUsize::new(fastrand::usize(..cfg.keys.len().max(1))),
                }
            })
            .collect();
        let by_name = clients
            .iter()
            .enumerate()
            .map(|(i, c)| (c.cfg.name.clone(), i))
            .collect();
        let callers: Vec<CallerRoute> = config
            .callers
            .iter()
            .map(|cfg| CallerRoute {
                cfg: cfg.clone(),
                name: Arc::from(cfg.name.as_str()),
                metrics: Arc::default(),
                state: previous
                    .and_then(|p| p.callers.iter().find(|c| c.cfg.name == cfg.name))
                    .map(|c| c.state.clone())
                    .unwrap_or_default(),
            })
            .collect();
        let mut by_token = HashMap::default();
        for (i, c) in callers.iter().enumerate() {
            by_token.entry(c.cfg.token_sha256).or_insert(i);
        }
        let shadows = config
            .shadow
            .iter()
            .filter_map(|cfg| {
                let client = clients.iter().position(|c| c.cfg.name == cfg.client)?;
                let spent = previous
                    .and_then(|p| {
                        p.shadows
                            .iter()
                            .find(|s| s.cfg.client == cfg.client)
                            .map(|s| s.spent.clone())
                    })
                    .unwrap_or_default();
                Some(ShadowRoute {
                    cfg: cfg.clone(),
                    client,
                    spent,
                })
            })
            .collect();
        let mut table = RoutingTable {
            generation: previous.map_or(1, |p| p.generation + 1),
            shadows,
            config: Arc::new(config),
            clients,
            by_name,
            known: Default::default(),
            cache: Default::default(),
            callers,
            by_token,
        };
        let names: Vec<(Api, String)> = table
            .clients
            .iter()
            .flat_map(|c| {
                let api = c.cfg.api;
                let exact = if c.cfg.model_match.kind == crate::config::MatchKind::Exact {
                    c.cfg.model_match.values.clone()
                } else {
                    Vec::new()
                };
                exact
                    .into_iter()
                    .chain(c.cfg.fallback.iter().cloned())
                    .map(move |n| (api, n))
            })
            .collect();
        for (api, name) in names {
            let route = table.resolve(api, &name);
            table.known[api as usize].insert(name, route);
        }
        table
    }

    fn resolve(&self, api: Api, model: &str) -> Arc<Candidates> {
        let sorted = matcher::candidates_of(&self.clients, api, model);
        Arc::new(Candidates::new(
            &sorted,
            |i| self.clients[i].cfg.priority,
            |i| self.clients[i].cfg.weight,
        ))
    }

    /// The candidates for `model`; empty when no client matches it.
    /// Regexes run once per distinct name, not per request.
    pub fn candidates(&self, model: &str) -> CandidatesRef<'_> {
        self.candidates_of(Api::OpenAi, model)
    }

    /// The candidates for `model` among the clients that speak `api`.
    pub fn candidates_of(&self, api: Api, model: &str) -> CandidatesRef<'_> {
        if let Some(c) = self.known[api as usize].get(model) {
            return CandidatesRef::Known(c);
        }
        if let Some(c) = self.cache[api as usize]
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
        {
            return CandidatesRef::Cached(c.clone());
        }
        let route = self.resolve(api, model);
        let mut cache = self.cache[api as usize]
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if cache.len() < ROUTE_CACHE_LIMIT {
            cache.insert(model.into(), route.clone());
        }
        CandidatesRef::Cached(route)
    }

    /// The index in [`RoutingTable::callers`] of the caller whose token
    /// hashes to `digest`.
    pub fn caller_by_token(&self, digest: &[u8; 32]) -> Option<usize> {
        self.by_token.get(digest).copied()
    }

    /// Adds what callers spent before this process started (read from the
    /// usage files) to their budgets' counters.
    pub fn restore_spend(
        &self,
        spent: &std::collections::BTreeMap<String, crate::usage::report::Spent>,
        now: std::time::SystemTime,
    ) {
        use crate::limits::Cost;
        for c in &self.callers {
            if let Some(s) = spent.get(&c.cfg.name) {
                c.state.add_spent(
                    now,
                    Cost {
                        tokens: s.day_tokens,
                        nanos: s.day_nanos,
                    },
                    Cost {
                        tokens: s.month_tokens,
                        nanos: s.month_nanos,
                    },
                );
            }
        }
    }

    pub fn caller(&self, name: &str) -> Option<&CallerRoute> {
        self.callers.iter().find(|c| c.cfg.name == name)
    }

    /// The price of `model` as client `ci` serves it (the name sent
    /// upstream; the client's own prices first, then the top-level ones).
    pub fn price(&self, ci: usize, model: &str) -> Option<Price> {
        let c = &self.clients[ci].cfg;
        if c.prices.is_empty() && self.config.prices.is_empty() {
            return None;
        }
        crate::config::validate::price_of(c, &self.config.prices, model)
    }

    pub fn client_index(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    pub fn client(&self, name: &str) -> Option<&ClientRoute> {
        self.client_index(name).map(|i| &self.clients[i])
    }

    /// The `fallback` of the first candidate (in priority order) that has one.
    pub fn fallback_of(&self, candidates: &Candidates) -> &[String] {
        candidates
            .in_priority_order()
            .map(|i| &self.clients[i].cfg.fallback)
            .find(|f| !f.is_empty())
            .map_or(&[], |f| f.as_slice())
    }

    /// Every exact model name, once, with the client that serves it first.
    pub fn models(&self) -> Vec<(&str, &str)> {
        let mut seen = std::collections::HashSet::new();
        let mut order: Vec<&ClientRoute> = self.clients.iter().collect();
        order.sort_by_key(|c| c.cfg.priority);
        let mut out = Vec::new();
        for c in order {
            if c.cfg.model_match.kind != crate::config::MatchKind::Exact {
                continue;
            }
            for m in &c.cfg.model_match.values {
                if seen.insert(m.as_str()) {
                    out.push((m.as_str(), c.cfg.name.as_str()));
                }
            }
        }
        out
    }

    /// The candidates in the order to try them for one request: a tier is
    /// led by the client of the best (client, key) pair for `affinity`
    /// (`routing.affinity`'s value), else by latency when a member asks for
    /// `balance: latency`, else by smooth weighted round robin.
    pub fn order(&self, candidates: &Candidates, affinity: Option<u64>, tokens: u64) -> Order {
        candidates.order_with(|tier| {
            if let Some(value) = affinity {
                let best = tier
                    .members
                    .iter()
                    .enumerate()
                    .filter_map(|(pos, &ci)| {
                        let c = &self.clients[ci];
                        c.best_affinity_key(value, tokens, &[])
                            .map(|(_, s)| (pos, s))
                    })
                    .max_by(|a, b| a.1.total_cmp(&b.1));
                if let Some((pos, _)) = best {
                    return Some(pos);
                }
            }
            self.latency_lead(tier)
        })
    }

    fn latency_lead(&self, tier: &Tier) -> Option<usize> {
        let latency = tier
            .members
            .iter()
            .any(|&ci| self.clients[ci].cfg.policy.balance == Balance::Latency);
        latency.then(|| {
            selector::two_choices(&tier.weights, |pos| {
                let c = &self.clients[tier.members[pos]];
                c.ttfb.get().map_or(0.0, |d| d.as_secs_f64())
            })
        })
    }

    /// True when some key of some client is not cooling down.
    pub fn any_key_available(&self) -> bool {
        self.clients
            .iter()
            .flat_map(|c| &c.keys)
            .any(|k| k.health.is_available())
    }

    /// The key and budget gauges of a `/metrics` scrape, read now.
    pub fn scrape(&self) -> Scrape {
        let keys = self.clients.iter().flat_map(|c| {
            c.keys.iter().map(|k| {
                let quota = k.health.quota();
                KeyGauges {
                    client: c.cfg.name.clone(),
                    key: k.id.to_string(),
                    cooling_for: k.health.cooling_for(),
                    requests: k.health.requests(),
                    remaining_requests: quota.requests.map(|r| r.left),
                    remaining_tokens: quota.tokens.map(|t| t.left),
                }
            })
        });
        let now = SystemTime::now();
        let mut budgets = Vec::new();
        for c in &self.callers {
            let l = &c.cfg.limits;
            for (budget, b) in [("usd", l.budget_usd), ("tokens", l.budget_tokens)] {
                let Some(b) = b else { continue };
                let snap = c.state.snapshot(now, b.per);
                let used = match budget {
                    "usd" => snap.spent_nanos.max(0) as f64,
                    _ => snap.spent_tokens as f64,
                };
                budgets.push(BudgetGauge {
                    caller: c.cfg.name.clone(),
                    budget,
                    used: used / (b.amount.max(1) as f64),
                });
            }
        }
        Scrape {
            generation: self.generation,
            keys: keys.collect(),
            budgets,
        }
    }
}

/// The headers that send `secret` to `cfg` by its `auth` and `api`.
fn credential_headers(cfg: &ClientConfig, secret: &Secret) -> Vec<(http::HeaderName, HeaderValue)> {
    let sensitive = |text: &str| {
        let mut v = HeaderValue::from_str(text)
            .expect("keys are checked for header-safe characters by validation");
        v.set_sensitive(true);
        v
    };
    let mut out = match cfg.auth {
        AuthStyle::Bearer => vec![(
            http::header::AUTHORIZATION,
            sensitive(&format!("Bearer {}", secret.expose())),
        )],
        AuthStyle::ApiKey => vec![(
            http::HeaderName::from_static("api-key"),
            sensitive(secret.expose()),
        )],
        AuthStyle::XApiKey => vec![(
            http::HeaderName::from_static("x-api-key"),
            sensitive(secret.expose()),
        )],
        AuthStyle::None => Vec::new(),
    };
    if cfg.api == Api::Anthropic {
        let version = HeaderValue::from_str(&cfg.anthropic_version)
            .expect("anthropic_version is checked by validation");
        out.push((http::HeaderName::from_static("anthropic-version"), version));
    }
    out
}

impl ClientRoute {
    /// The next key to try by the client's strategy, skipping keys already
    /// tried in this request and keys in cooldown.
    pub fn pick_key(&self, tried: &[usize]) -> KeyPick {
        self.pick_key_for(tried, &KeyAsk::default())
    }

    /// [`ClientRoute::pick_key`] for a request: keys whose last quota
    /// reading is short of it are skipped while another key is not (when
    /// every key left is short, they are tried as if no reading existed);
    /// an affinity value picks its rendezvous key among the rest.
    pub fn pick_key_for(&self, tried: &[usize], ask: &KeyAsk) -> KeyPick {
        let n = self.keys.len();
        let mut soonest: Option<Duration> = None;
        let mut open: SmallVec<[usize; 8]> = SmallVec::new();
        let mut short: SmallVec<[usize; 8]> = SmallVec::new();
        for (i, k) in self.keys.iter().enumerate() {
            if tried.contains(&i) {
                continue;
            }
            match k.health.cooling_for() {
                Some(left) => soonest = Some(soonest.map_or(left, |s| s.min(left))),
                None if k.health.quota_short(ask.tokens).is_some() => short.push(i),
                None => open.push(i),
            }
        }
        let pool = if open.is_empty() { &short } else { &open };
        if pool.is_empty() {
            return soonest.map_or(KeyPick::Exhausted, KeyPick::Cooling);
        }
        if let Some(value) = ask.affinity {
            let best = pool
                .iter()
                .map(|&i| (i, self.affinity_score(value, i)))
                .max_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((i, _)) = best {
                return KeyPick::Key(i);
            }
        }
        // Keys in turn from a rotating start: the first of the pool at or
        // after it.
        let start = match self.cfg.policy.key_strategy {
            KeyStrategy::Random => fastrand::usize(..n),
            KeyStrategy::LeastUsed => 0,
            KeyStrategy::RoundRobin | KeyStrategy::Headroom => {
                self.cursor.fetch_add(1, Ordering::Relaxed) % n
            }
        };
        let split = pool.iter().position(|&i| i >= start).unwrap_or(0);
        let rotated = pool[split..].iter().chain(&pool[..split]).copied();
        let pick = match self.cfg.policy.key_strategy {
            KeyStrategy::RoundRobin | KeyStrategy::Random => pool[split],
            KeyStrategy::LeastUsed => pool
                .iter()
                .copied()
                .min_by_key(|&i| {
                    let h = &self.keys[i].health;
                    (h.in_flight(), h.requests())
                })
                .unwrap_or(pool[0]),
            // The most headroom; the first in turn among equals.
            KeyStrategy::Headroom => {
                let mut best = (pool[split], 0u64);
                for (j, i) in rotated.enumerate() {
                    let room = self.keys[i].health.headroom(ask.tokens);
                    if j == 0 || room > best.1 {
                        best = (i, room);
                    }
                }
                best.0
            }
        };
        KeyPick::Key(pick)
    }

    /// The key of this client that `value` goes to, and its score, among
    /// keys not tried, not cooling and not short of quota.
    fn best_affinity_key(&self, value: u64, tokens: u64, tried: &[usize]) -> Option<(usize, f64)> {
        (0..self.keys.len())
            .filter(|i| !tried.contains(i))
            .filter(|&i| {
                let h = &self.keys[i].health;
                h.is_available() && h.quota_short(tokens).is_none()
            })
            .map(|i| (i, self.affinity_score(value, i)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Key `i`'s rendezvous score: the client's weight shared by its keys,
    /// so clients take sessions in proportion to their weight.
    fn affinity_score(&self, value: u64, i: usize) -> f64 {
        let weight = f64::from(self.cfg.weight) / self.keys.len().max(1) as f64;
        affinity::score(value, self.keys[i].affinity_seed, weight)
    }
}

/// A `shadow` rule with its client resolved, and what it spent today
/// (kept across reloads by client name).
#[derive(Debug)]
pub struct ShadowRoute {
    pub cfg: ShadowConfig,
    pub client: usize,
    /// `(day since the epoch, nano-dollars spent that day)`.
    pub spent: Arc<Mutex<(u64, i64)>>,
}

impl ShadowRoute {
    pub(crate) fn spent_today(&self, now: SystemTime) -> i64 {
        let day = Periods::of(now).day;
        let s = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        if s.0 == day {
            s.1
        } else {
            0
        }
    }

    pub(crate) fn spend(&self, now: SystemTime, nanos: i64) {
        let day = Periods::of(now).day;
        let mut s = self.spent.lock().unwrap_or_else(PoisonError::into_inner);
        if s.0 != day {
            *s = (day, 0);
        }
        s.1 = s.1.saturating_add(nanos);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::path::Path;

    fn table(yaml: &str) -> RoutingTable {
        let cfg = load_str(yaml, Path::new("t.yaml"), &|_| None)
            .unwrap()
            .config;
        RoutingTable::build(cfg, None)
    }

    const TWO_KEYS: &str = r#"
openai_clients:
  - name: a
    base_url: "http://127.0.0.1:1"
    api_keys: [k1, k2, k1]
    model_match: { type: exact, value: [m] }
"#;

    /// The URIs parsed with the table are the ones a request would build.
    #[test]
    fn usual_endpoint_uris_are_parsed_once_and_match_the_built_ones() {
        let t = table(&TWO_KEYS.replace("127.0.0.1:1", "127.0.0.1:1/openai/v1"));
        let c = &t.clients[0];
        for e in USUAL_ENDPOINTS {
            let want: http::Uri = format!("http://127.0.0.1:1/openai/v1/{e}").parse().unwrap();
            assert_eq!(c.usual_uri(e), Some(&want));
        }
        assert_eq!(c.usual_uri("audio/speech"), None);
    }

    #[test]
    fn round_robin_rotates_and_skips_tried_and_cooling_keys() {
        let t = table(TWO_KEYS);
        let c = &t.clients[0];
        assert_eq!(c.keys.len(), 2, "duplicate keys are removed");
        let KeyPick::Key(first) = c.pick_key(&[]) else {
            panic!()
        };
        let KeyPick::Key(second) = c.pick_key(&[]) else {
            panic!()
        };
        assert_ne!(first, second);
        assert_eq!(c.pick_key(&[0, 1]), KeyPick::Exhausted);
        c.keys[0].health.cool_down(Duration::from_secs(30));
        assert_eq!(c.pick_key(&[]), KeyPick::Key(1));
        assert!(matches!(c.pick_key(&[1]), KeyPick::Cooling(d) if d <= Duration::from_secs(30)));
    }

    fn read(k: &KeyRoute, requests: u64, tokens: u64) {
        use crate::routing::key_health::{QuotaReading, Remaining};
        let r = |left| {
            Some(Remaining {
                left,
                resets_in: Duration::from_secs(60),
            })
        };
        k.health.record_quota(&QuotaReading {
            requests: r(requests),
            tokens: r(tokens),
        });
    }

    const THREE_KEYS: &str = r#"
openai_clients:
  - name: a
    base_url: "http://127.0.0.1:1"
    api_keys: [k1, k2, k3]
    key_strategy: headroom
    model_match: { type: exact, value: [m] }
"#;

    #[test]
    fn headroom_picks_the_most_room_and_rotates_among_equals() {
        let t = table(THREE_KEYS);
        let c = &t.clients[0];
        let ask = KeyAsk {
            tokens: 100,
            affinity: None,
        };
        // No readings: all equal, so in turn.
        let picks: Vec<KeyPick> = (0..3).map(|_| c.pick_key_for(&[], &ask)).collect();
        for i in 0..3 {
            assert!(picks.contains(&KeyPick::Key(i)), "{picks:?}");
        }
        read(&c.keys[0], 5, 100_000);
        read(&c.keys[1], 50, 100_000);
        read(&c.keys[2], 500, 1_000);
        // Room for 5, 50 and 10 requests of 100 tokens.
        assert_eq!(c.pick_key_for(&[], &ask), KeyPick::Key(1));
        assert_eq!(c.pick_key_for(&[1], &ask), KeyPick::Key(2));
    }

    #[test]
    fn keys_short_of_quota_are_skipped_unless_every_key_is() {
        let t = table(&THREE_KEYS.replace("headroom", "round_robin"));
        let c = &t.clients[0];
        let ask = KeyAsk {
            tokens: 5000,
            affinity: None,
        };
        read(&c.keys[0], 0, 100_000);
        read(&c.keys[1], 10, 4000);
        for _ in 0..6 {
            assert_eq!(c.pick_key_for(&[], &ask), KeyPick::Key(2));
        }
        assert_eq!(c.keys[0].health.failures(), 0, "skipping is no failure");
        // Every key left is short: they are tried as if nothing was read.
        read(&c.keys[2], 0, 100_000);
        let picks: Vec<KeyPick> = (0..6).map(|_| c.pick_key_for(&[], &ask)).collect();
        for i in 0..3 {
            assert!(picks.contains(&KeyPick::Key(i)), "{picks:?}");
        }
        // Cooling still wins over quota: a cooling key is never tried.
        c.keys[0].health.cool_down(Duration::from_secs(30));
        assert!(matches!(c.pick_key_for(&[1, 2], &ask), KeyPick::Cooling(_)));
    }

    #[test]
    fn affinity_keeps_a_value_on_one_key_and_moves_it_only_when_that_key_cools() {
        let t = table(THREE_KEYS);
        let c = &t.clients[0];
        let value = crate::routing::affinity::hash_value(b"session-1");
        let ask = KeyAsk {
            tokens: 1,
            affinity: Some(value),
        };
        let KeyPick::Key(home) = c.pick_key_for(&[], &ask) else {
            panic!()
        };
        for _ in 0..20 {
            assert_eq!(c.pick_key_for(&[], &ask), KeyPick::Key(home));
        }
        // The routing-level order agrees with the client's own pick.
        assert_eq!(c.best_affinity_key(value, 1, &[]).map(|b| b.0), Some(home));
        c.keys[home].health.cool_down(Duration::from_secs(30));
        let KeyPick::Key(other) = c.pick_key_for(&[], &ask) else {
            panic!()
        };
        assert_ne!(other, home);
    }

    #[test]
    fn key_health_survives_a_rebuild_for_pairs_that_remain() {
        let t1 = table(TWO_KEYS);
        t1.clients[0].keys[0]
            .health
            .cool_down(Duration::from_secs(30));
        let cfg = load_str(&TWO_KEYS.replace("k2", "k3"), Path::new("t.yaml"), &|_| {
            None
        })
        .unwrap()
        .config;
        let t2 = RoutingTable::build(cfg, Some(&t1));
        assert_eq!(t2.generation, 2);
        assert!(
            !t2.clients[0].keys[0].health.is_available(),
            "k1 keeps its cooldown"
        );
        assert!(
            t2.clients[0].keys[1].health.is_available(),
            "k3 starts fresh"
        );
        assert!(
            Arc::ptr_eq(&t1.clients[0].ttfb, &t2.clients[0].ttfb),
            "the client keeps its latency average"
        );
    }

    #[test]
    fn unknown_models_are_cached_and_fallback_comes_from_first_candidate() {
        let t = table(
            r#"
openai_clients:
  - { name: a, base_url: "http://h", api_key: k, priority: 2, fallback: [x], model_match: { type: keyword, value: [gpt] } }
  - { name: b, base_url: "http://h", api_key: k, priority: 1, model_match: { type: regex, value: ["gpt-.*"] } }
  - { name: c, base_url: "http://h", api_key: k, model_match: { type: exact, value: [x] } }
"#,
        );
        let c = t.candidates("gpt-9");
        assert_eq!(c.order().as_slice(), [1, 0]);
        assert!(std::ptr::eq(&*c, &*t.candidates("gpt-9")));
        assert_eq!(t.fallback_of(&c), ["x".to_string()]);
        assert!(t.candidates("nothing").is_empty());
        assert_eq!(t.models(), vec![("x", "c")]);
    }
}
