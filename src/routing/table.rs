//! `RoutingTable`: the immutable value built from a valid config and swapped
//! whole on reload. A request loads it once and keeps it for its life.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use http::HeaderValue;

use super::key_health::KeyHealth;
use super::matcher;
use super::selector::Candidates;
use crate::config::{Api, AuthStyle, CallerConfig, ClientConfig, Config, KeyStrategy, Price};
use crate::limits::CallerState;
use crate::ops::metrics::{ClientMetrics, Metrics};
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
        let mut table = RoutingTable {
            generation: previous.map_or(1, |p| p.generation + 1),
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

    /// True when some key of some client is not cooling down.
    pub fn any_key_available(&self) -> bool {
        self.clients
            .iter()
            .flat_map(|c| &c.keys)
            .any(|k| k.health.is_available())
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
        let n = self.keys.len();
        let untried = |i: &usize| !tried.contains(i);
        let mut soonest: Option<Duration> = None;
        let mut available = |i: usize| match self.keys[i].health.cooling_for() {
            None => true,
            Some(left) => {
                soonest = Some(soonest.map_or(left, |s| s.min(left)));
                false
            }
        };
        let pick =
            match self.cfg.policy.key_strategy {
                KeyStrategy::RoundRobin | KeyStrategy::Random => {
                    let start = match self.cfg.policy.key_strategy {
                        KeyStrategy::Random => fastrand::usize(..n),
                        _ => self.cursor.fetch_add(1, Ordering::Relaxed) % n,
                    };
                    (0..n)
                        .map(|o| (start + o) % n)
                        .filter(untried)
                        .find(|&i| available(i))
                }
                KeyStrategy::LeastUsed => (0..n)
                    .filter(untried)
                    .filter(|&i| available(i))
                    .min_by_key(|&i| {
                        let h = &self.keys[i].health;
                        (h.in_flight(), h.requests())
                    }),
            };
        match (pick, soonest) {
            (Some(i), _) => KeyPick::Key(i),
            (None, Some(left)) => KeyPick::Cooling(left),
            (None, None) => KeyPick::Exhausted,
        }
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
